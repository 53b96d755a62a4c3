// The safetensors reader: a well-formed file read back exactly (F32, F16 incl. subnormals and
// infinities, BF16, F64), every kind of corruption rejected with FormatError (never a crash), and
// sharded checkpoints through model.safetensors.index.json.
#include <accelcore/errors.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/safetensors.h"
#include "test_util.h"

namespace accelcore {
namespace {

using json = nlohmann::json;
using testing::TempDir;
using testing::write_bytes;

// Assembles a safetensors file: header JSON (padded with spaces to `pad_to` bytes if larger) and
// data section, as raw bytes.
std::string safetensors_bytes(const std::string& header, const std::string& data, size_t pad_to = 0) {
  std::string h = header;
  if (h.size() < pad_to) h.append(pad_to - h.size(), ' ');
  std::string out(8, '\0');
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + h + data;
}

// Builds a header and data section tensor by tensor, offsets laid out back to back.
class Builder {
 public:
  template <typename T>
  Builder& add(const std::string& name, const std::string& dtype, std::vector<int64_t> shape,
               const std::vector<T>& values) {
    std::string bytes(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
    return add_raw(name, dtype, std::move(shape), bytes);
  }
  Builder& add_raw(const std::string& name, const std::string& dtype, std::vector<int64_t> shape,
                   const std::string& bytes) {
    header_[name] = {{"dtype", dtype}, {"shape", shape}, {"data_offsets", {data_.size(), data_.size() + bytes.size()}}};
    data_ += bytes;
    return *this;
  }
  Builder& metadata(const json& m) {
    header_["__metadata__"] = m;
    return *this;
  }
  json& header() { return header_; }
  std::string& data() { return data_; }
  std::string bytes() const { return safetensors_bytes(header_.dump(), data_); }
  void write(const std::string& path) const { write_bytes(path, bytes()); }

 private:
  json header_ = json::object();
  std::string data_;
};

std::vector<float> to_f32(const TensorView& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  convert_to_f32(t, out.data());
  return out;
}

TEST(Safetensors, ReadsF32TensorExactly) {
  TempDir dir;
  const std::vector<float> a = {0.0f, 1.0f, -2.5f, 3.25f, 1e-3f, -7.0f};
  Builder().add("a", "F32", {2, 3}, a).metadata({{"format", "pt"}}).write(dir.file("m.safetensors"));

  SafetensorsFile f(dir.file("m.safetensors"));
  ASSERT_TRUE(f.contains("a"));
  EXPECT_FALSE(f.contains("b"));
  EXPECT_EQ(f.tensors().size(), 1u);  // __metadata__ is not a tensor
  ASSERT_EQ(f.metadata().count("format"), 1u);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  const TensorView& t = f.get("a");
  EXPECT_EQ(t.name, "a");
  EXPECT_EQ(t.dtype, DType::kF32);
  EXPECT_EQ(t.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(t.numel(), 6);
  EXPECT_EQ(t.nbytes, 24u);
  EXPECT_EQ(to_f32(t), a);
  EXPECT_THROW(f.get("b"), FormatError);
}

TEST(Safetensors, ConvertsF16IncludingSubnormalsAndInfinities) {
  TempDir dir;
  // IEEE binary16 bit patterns and their exact values (computed by hand from the format:
  // subnormal = mant * 2^-24, normal = (1 + mant/1024) * 2^(exp-15)).
  const std::vector<uint16_t> bits = {0x3C00, 0xC000, 0x0001, 0x03FF, 0x0400, 0x7BFF, 0x3555,
                                      0x8000, 0x8001, 0x7C00, 0xFC00, 0x0000};
  const std::vector<double> want = {1.0,
                                    -2.0,
                                    5.9604644775390625e-08,   // 2^-24, smallest subnormal
                                    6.097555160522461e-05,    // 1023 * 2^-24, largest subnormal
                                    6.103515625e-05,          // 2^-14, smallest normal
                                    65504.0,                  // largest finite
                                    0.333251953125,           // 1 + 341/1024 times 2^-2
                                    -0.0,
                                    -5.9604644775390625e-08,
                                    std::numeric_limits<double>::infinity(),
                                    -std::numeric_limits<double>::infinity(),
                                    0.0};
  Builder b;
  b.add("h", "F16", {3, 4}, bits);
  b.add<uint16_t>("nan", "F16", {1}, {0x7E00});
  b.write(dir.file("h.safetensors"));

  SafetensorsFile f(dir.file("h.safetensors"));
  const TensorView& t = f.get("h");
  EXPECT_EQ(t.dtype, DType::kF16);
  EXPECT_EQ(t.shape, (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(t.nbytes, 24u);
  std::vector<float> got = to_f32(t);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i], static_cast<float>(want[i])) << "bits 0x" << std::hex << bits[i];
    EXPECT_EQ(std::signbit(got[i]), std::signbit(want[i])) << "bits 0x" << std::hex << bits[i];
  }
  EXPECT_TRUE(std::isnan(to_f32(f.get("nan"))[0]));
}

TEST(Safetensors, ConvertsBF16AndF64) {
  TempDir dir;
  // bfloat16 is the top half of a float32.
  const std::vector<uint16_t> bits = {0x3F80, 0xC0A0, 0x4049, 0x7F80, 0xFF80, 0x0001, 0x8000, 0x3F81};
  const std::vector<double> want = {1.0,
                                    -5.0,
                                    3.140625,
                                    std::numeric_limits<double>::infinity(),
                                    -std::numeric_limits<double>::infinity(),
                                    std::ldexp(1.0, -133),  // float32 subnormal 0x00010000
                                    -0.0,
                                    1.0078125};
  const std::vector<double> f64 = {0.1, -1e300, 2.5};
  Builder b;
  b.add("b", "BF16", {8}, bits);
  b.add("d", "F64", {3}, f64);
  b.write(dir.file("b.safetensors"));

  SafetensorsFile f(dir.file("b.safetensors"));
  EXPECT_EQ(f.get("b").dtype, DType::kBF16);
  std::vector<float> got = to_f32(f.get("b"));
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i], static_cast<float>(want[i])) << "bits 0x" << std::hex << bits[i];
    EXPECT_EQ(std::signbit(got[i]), std::signbit(want[i]));
  }
  std::vector<float> d = to_f32(f.get("d"));
  EXPECT_EQ(d[0], 0.1f);
  EXPECT_TRUE(std::isinf(d[1]) && d[1] < 0);  // out of float range
  EXPECT_EQ(d[2], 2.5f);
}

TEST(Safetensors, IntegerTensorsParseButDoNotConvert) {
  TempDir dir;
  Builder b;
  b.add<int32_t>("i", "I32", {2}, {7, -9});
  b.add<uint8_t>("u", "U8", {3}, {1, 2, 3});
  b.add<uint8_t>("flag", "BOOL", {1}, {1});
  b.write(dir.file("i.safetensors"));
  SafetensorsFile f(dir.file("i.safetensors"));
  EXPECT_EQ(f.get("i").dtype, DType::kI32);
  EXPECT_EQ(f.get("u").dtype, DType::kU8);
  EXPECT_EQ(f.get("flag").dtype, DType::kBool);
  int32_t v[2];
  std::memcpy(v, f.get("i").data, 8);
  EXPECT_EQ(v[0], 7);
  EXPECT_EQ(v[1], -9);
  std::vector<float> out(2);
  EXPECT_THROW(convert_to_f32(f.get("i"), out.data()), FormatError);
}

TEST(Safetensors, EmptyTensorsAndEmptyHeader) {
  TempDir dir;
  Builder b;
  b.add_raw("e", "F32", {0, 3}, "");
  b.add<float>("s", "F32", {}, {4.5f});  // a scalar: shape [] has one element
  b.write(dir.file("e.safetensors"));
  SafetensorsFile f(dir.file("e.safetensors"));
  EXPECT_EQ(f.get("e").numel(), 0);
  EXPECT_EQ(f.get("e").nbytes, 0u);
  EXPECT_EQ(f.get("s").numel(), 1);
  EXPECT_EQ(to_f32(f.get("s"))[0], 4.5f);

  write_bytes(dir.file("none.safetensors"), safetensors_bytes("{}", ""));
  SafetensorsFile g(dir.file("none.safetensors"));
  EXPECT_TRUE(g.tensors().empty());
}

TEST(Safetensors, MissingFileIsNotFound) {
  TempDir dir;
  EXPECT_THROW(SafetensorsFile(dir.file("absent.safetensors")), NotFound);
  // A directory is not a file: FormatError, not a crash.
  EXPECT_THROW(SafetensorsFile(dir.path().string()), FormatError);
}

// Each corrupt file must be rejected with FormatError.
struct CorruptCase {
  const char* name;
  std::string bytes;
};
void PrintTo(const CorruptCase& c, std::ostream* os) { *os << c.name; }

class CorruptFile : public ::testing::TestWithParam<CorruptCase> {};

std::string f32_bytes(size_t n) { return std::string(4 * n, '\x01'); }

std::string entry_file(const json& entry, const std::string& data) {
  return safetensors_bytes(json{{"t", entry}}.dump(), data);
}

std::string header_size_only(uint64_t n, const std::string& rest) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + rest;
}

std::vector<CorruptCase> corrupt_cases() {
  const json ok = {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}};
  auto without = [&](const char* key) {
    json e = ok;
    e.erase(key);
    return entry_file(e, f32_bytes(2));
  };
  auto with = [&](const char* key, json v) {
    json e = ok;
    e[key] = std::move(v);
    return entry_file(e, f32_bytes(2));
  };
  std::vector<CorruptCase> c;
  c.push_back(CorruptCase{"empty_file", ""});
  c.push_back(CorruptCase{"seven_bytes", std::string(7, '\0')});
  c.push_back(CorruptCase{"header_size_zero", header_size_only(0, "{}")});
  c.push_back(CorruptCase{"header_larger_than_file", header_size_only(1000, R"({"t": {}})")});
  c.push_back(CorruptCase{"header_size_one_past_end", header_size_only(3, "{}")});
  c.push_back(CorruptCase{"header_size_huge", header_size_only(~0ull, "{}")});
  c.push_back(CorruptCase{"header_not_json", safetensors_bytes("{not json at all", "")});
  c.push_back(CorruptCase{"header_truncated_json", safetensors_bytes(R"({"t": {"dtype": "F32")", "")});
  c.push_back(CorruptCase{"header_binary_garbage", safetensors_bytes(std::string("\xff\xfe\x00\x01", 4), "")});
  c.push_back(CorruptCase{"header_is_array", safetensors_bytes("[1, 2, 3]", "")});
  c.push_back(CorruptCase{"header_is_number", safetensors_bytes("42", "")});
  c.push_back(CorruptCase{"entry_not_object", safetensors_bytes(R"({"t": 5})", "")});
  c.push_back(CorruptCase{"metadata_not_object", safetensors_bytes(R"({"__metadata__": [1]})", "")});
  c.push_back(CorruptCase{"metadata_value_not_string", safetensors_bytes(R"({"__metadata__": {"a": 1}})", "")});
  c.push_back(CorruptCase{"missing_dtype", without("dtype")});
  c.push_back(CorruptCase{"missing_shape", without("shape")});
  c.push_back(CorruptCase{"missing_data_offsets", without("data_offsets")});
  c.push_back(CorruptCase{"dtype_not_string", with("dtype", 4)});
  c.push_back(CorruptCase{"unknown_dtype", with("dtype", "FOO")});
  c.push_back(CorruptCase{"unsupported_dtype_f8", with("dtype", "F8_E4M3")});
  c.push_back(CorruptCase{"lowercase_dtype", with("dtype", "f32")});
  c.push_back(CorruptCase{"shape_not_array", with("shape", 2)});
  c.push_back(CorruptCase{"negative_dim", entry_file({{"dtype", "F32"}, {"shape", {-1, 2}}, {"data_offsets", {0, 8}}}, f32_bytes(2))});
  c.push_back(CorruptCase{"fractional_dim", with("shape", {2.5})});
  c.push_back(CorruptCase{"string_dim", with("shape", {"2"})});
  c.push_back(CorruptCase{"shape_overflow",
                          entry_file({{"dtype", "F32"}, {"shape", {1ull << 40, 1ull << 40}}, {"data_offsets", {0, 8}}}, f32_bytes(2))});
  c.push_back(CorruptCase{"data_offsets_one_value", with("data_offsets", {0})});
  c.push_back(CorruptCase{"data_offsets_three_values", with("data_offsets", {0, 4, 8})});
  c.push_back(CorruptCase{"data_offsets_negative", with("data_offsets", {-4, 4})});
  c.push_back(CorruptCase{"data_offsets_not_numbers", with("data_offsets", {"0", "8"})});
  c.push_back(CorruptCase{"data_offsets_reversed", entry_file({{"dtype", "F32"}, {"shape", {0}}, {"data_offsets", {8, 0}}}, f32_bytes(2))});
  // The header promises 16 bytes of data but the file ends after 8: a truncated download.
  c.push_back(CorruptCase{"truncated_data_section",
                          entry_file({{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}}, f32_bytes(2))});
  c.push_back(CorruptCase{"offsets_past_end", entry_file({{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {4, 12}}}, f32_bytes(2))});
  c.push_back(CorruptCase{"byte_count_too_small", entry_file({{"dtype", "F32"}, {"shape", {2, 2}}, {"data_offsets", {0, 12}}}, f32_bytes(3))});
  c.push_back(CorruptCase{"byte_count_too_large", entry_file({{"dtype", "F16"}, {"shape", {2}}, {"data_offsets", {0, 8}}}, f32_bytes(2))});
  {
    json h = {{"a", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}},
              {"b", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {4, 12}}}}};
    c.push_back(CorruptCase{"overlapping_ranges", safetensors_bytes(h.dump(), f32_bytes(3))});
  }
  {
    json h = {{"a", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}},
              {"b", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}}};
    c.push_back(CorruptCase{"identical_ranges", safetensors_bytes(h.dump(), f32_bytes(2))});
  }
  {
    json h = {{"a", {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}}},
              {"b", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {8, 12}}}}};
    c.push_back(CorruptCase{"nested_ranges", safetensors_bytes(h.dump(), f32_bytes(4))});
  }
  return c;
}

TEST_P(CorruptFile, ThrowsFormatError) {
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  write_bytes(path, GetParam().bytes);
  try {
    SafetensorsFile f(path);
    FAIL() << "accepted a corrupt file (" << GetParam().name << ")";
  } catch (const FormatError& e) {
    // The message names the file, so a user can tell which shard is broken.
    EXPECT_NE(std::string(e.what()).find("bad.safetensors"), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    FAIL() << "threw something other than FormatError: " << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Safetensors, CorruptFile, ::testing::ValuesIn(corrupt_cases()),
                         [](const ::testing::TestParamInfo<CorruptFile::ParamType>& info) {
                           return std::string(info.param.name);
                         });

TEST(Safetensors, AdjacentRangesAndUnorderedOffsetsAreValid) {
  TempDir dir;
  // Tensors need not be stored in header order; back-to-back ranges do not overlap.
  json h = {{"a", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {4, 8}}}},
            {"b", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0, 4}}}}};
  const float vals[2] = {1.5f, -2.5f};
  write_bytes(dir.file("ok.safetensors"),
              safetensors_bytes(h.dump(), std::string(reinterpret_cast<const char*>(vals), 8), 64));
  SafetensorsFile f(dir.file("ok.safetensors"));
  EXPECT_EQ(to_f32(f.get("a"))[0], -2.5f);
  EXPECT_EQ(to_f32(f.get("b"))[0], 1.5f);
}

// ---- Sharded checkpoints ----

void write_index(const TempDir& dir, const json& weight_map) {
  write_bytes(dir.file("model.safetensors.index.json"),
              json{{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}}.dump(2));
}

TEST(CheckpointReader, SingleFile) {
  TempDir dir;
  Builder().add<float>("w", "F32", {2}, {1.0f, 2.0f}).write(dir.file("model.safetensors"));
  CheckpointReader r(dir.path().string());
  EXPECT_TRUE(r.contains("w"));
  EXPECT_FALSE(r.contains("x"));
  EXPECT_EQ(r.names(), std::vector<std::string>{"w"});
  EXPECT_EQ(to_f32(r.get("w")), (std::vector<float>{1.0f, 2.0f}));
  EXPECT_THROW(r.get("x"), FormatError);
}

TEST(CheckpointReader, ShardedThroughIndex) {
  TempDir dir;
  Builder()
      .add<float>("x", "F32", {2}, {1.0f, 2.0f})
      .add<uint16_t>("y", "BF16", {1}, {0x4040})  // 3.0
      .write(dir.file("model-00001-of-00002.safetensors"));
  Builder()
      .add<uint16_t>("z", "F16", {2}, {0x3800, 0xB800})  // 0.5, -0.5
      .add<float>("unlisted", "F32", {1}, {9.0f})
      .write(dir.file("model-00002-of-00002.safetensors"));
  write_index(dir, {{"x", "model-00001-of-00002.safetensors"},
                    {"y", "model-00001-of-00002.safetensors"},
                    {"z", "model-00002-of-00002.safetensors"}});
  // A stray single-file checkpoint next to the index must not be used instead.
  Builder().add<float>("x", "F32", {2}, {-1.0f, -1.0f}).write(dir.file("model.safetensors"));

  CheckpointReader r(dir.path().string());
  EXPECT_EQ(r.names(), (std::vector<std::string>{"x", "y", "z"}));
  EXPECT_EQ(to_f32(r.get("x")), (std::vector<float>{1.0f, 2.0f}));
  EXPECT_EQ(to_f32(r.get("y")), (std::vector<float>{3.0f}));
  EXPECT_EQ(to_f32(r.get("z")), (std::vector<float>{0.5f, -0.5f}));
  EXPECT_FALSE(r.contains("unlisted"));  // only what the index lists
  EXPECT_THROW(r.get("unlisted"), FormatError);
}

TEST(CheckpointReader, IndexPointingToShardLackingTheTensorIsFormatError) {
  TempDir dir;
  Builder().add<float>("x", "F32", {1}, {1.0f}).write(dir.file("a.safetensors"));
  Builder().add<float>("z", "F32", {1}, {2.0f}).write(dir.file("b.safetensors"));
  write_index(dir, {{"x", "a.safetensors"}, {"z", "a.safetensors"}});
  try {
    CheckpointReader r(dir.path().string());
    FAIL() << "accepted an index that maps 'z' to a shard without it";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("'z'"), std::string::npos) << e.what();
  }
}

TEST(CheckpointReader, BadIndexes) {
  {
    TempDir dir;
    write_bytes(dir.file("model.safetensors.index.json"), "{ this is not json");
    EXPECT_THROW(CheckpointReader(dir.path().string()), FormatError);
  }
  {
    TempDir dir;
    write_bytes(dir.file("model.safetensors.index.json"), R"({"metadata": {}})");
    EXPECT_THROW(CheckpointReader(dir.path().string()), FormatError);
  }
  {
    TempDir dir;
    write_index(dir, {{"x", 3}});
    EXPECT_THROW(CheckpointReader(dir.path().string()), FormatError);
  }
  {
    TempDir dir;  // a shard name must not escape the model directory
    std::filesystem::create_directory(dir.path() / "sub");
    Builder().add<float>("x", "F32", {1}, {1.0f}).write((dir.path() / "sub" / "a.safetensors").string());
    write_index(dir, {{"x", "sub/a.safetensors"}});
    EXPECT_THROW(CheckpointReader(dir.path().string()), FormatError);
  }
  {
    TempDir dir;  // a shard that does not exist
    write_index(dir, {{"x", "missing.safetensors"}});
    EXPECT_THROW(CheckpointReader(dir.path().string()), NotFound);
  }
  {
    TempDir dir;  // a corrupt shard is reported as such
    write_bytes(dir.file("a.safetensors"), "short");
    write_index(dir, {{"x", "a.safetensors"}});
    EXPECT_THROW(CheckpointReader(dir.path().string()), FormatError);
  }
}

TEST(CheckpointReader, EmptyDirectoryIsNotFound) {
  TempDir dir;
  EXPECT_THROW(CheckpointReader(dir.path().string()), NotFound);
  EXPECT_THROW(CheckpointReader(dir.file("does_not_exist")), NotFound);
}

}  // namespace
}  // namespace accelcore
