#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "util/check.h"
#include "util/fp16.h"

namespace accelcore {

namespace fs = std::filesystem;
using json = nlohmann::json;

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
    case DType::kF64: return "F64";
    case DType::kI64: return "I64";
    case DType::kI32: return "I32";
    case DType::kI16: return "I16";
    case DType::kI8: return "I8";
    case DType::kU8: return "U8";
    case DType::kBool: return "BOOL";
  }
  return "?";
}

size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF64: case DType::kI64: return 8;
    case DType::kF32: case DType::kI32: return 4;
    case DType::kF16: case DType::kBF16: case DType::kI16: return 2;
    case DType::kI8: case DType::kU8: case DType::kBool: return 1;
  }
  return 0;
}

static bool parse_dtype(const std::string& s, DType* out) {
  static const std::map<std::string, DType> kNames = {
      {"F32", DType::kF32}, {"F16", DType::kF16}, {"BF16", DType::kBF16}, {"F64", DType::kF64},
      {"I64", DType::kI64}, {"I32", DType::kI32}, {"I16", DType::kI16},   {"I8", DType::kI8},
      {"U8", DType::kU8},   {"BOOL", DType::kBool}};
  auto it = kNames.find(s);
  if (it == kNames.end()) return false;
  *out = it->second;
  return true;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    ACCEL_CHECK(errno != ENOENT, NotFound) << "safetensors file not found: " << path;
    ACCEL_THROW(FormatError) << "cannot open " << path << ": " << std::strerror(errno);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    ACCEL_THROW(FormatError) << path << " is not a regular file";
  }
  map_size_ = static_cast<size_t>(st.st_size);
  if (map_size_ < 8) {
    ::close(fd);
    ACCEL_THROW(FormatError) << path << ": truncated safetensors file (" << map_size_
                             << " bytes, the 8-byte header size is missing)";
  }
  map_ = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    ACCEL_THROW(FormatError) << "cannot mmap " << path << ": " << std::strerror(errno);
  }
  try {
    const auto* base = static_cast<const uint8_t*>(map_);
    uint64_t header_size = 0;
    for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | base[i];
    ACCEL_CHECK(header_size >= 2 && header_size <= map_size_ - 8, FormatError)
        << path << ": header size " << header_size << " does not fit in a file of " << map_size_
        << " bytes (truncated or not a safetensors file)";
    ACCEL_CHECK(header_size <= (100u << 20), FormatError)
        << path << ": header size " << header_size << " exceeds the 100 MB limit";
    const char* hdr = reinterpret_cast<const char*>(base + 8);
    json j;
    try {
      j = json::parse(hdr, hdr + header_size);
    } catch (const json::exception& e) {
      ACCEL_THROW(FormatError) << path << ": header is not valid JSON: " << e.what();
    }
    ACCEL_CHECK(j.is_object(), FormatError) << path << ": header is not a JSON object";
    const uint64_t data_size = map_size_ - 8 - header_size;
    const uint8_t* data = base + 8 + header_size;
    std::vector<std::pair<uint64_t, uint64_t>> ranges;
    for (auto it = j.begin(); it != j.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        ACCEL_CHECK(v.is_object(), FormatError) << path << ": __metadata__ is not an object";
        for (auto m = v.begin(); m != v.end(); ++m) {
          ACCEL_CHECK(m.value().is_string(), FormatError)
              << path << ": __metadata__ value for '" << m.key() << "' is not a string";
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      ACCEL_CHECK(v.is_object(), FormatError) << path << ": entry '" << name << "' is not an object";
      ACCEL_CHECK(v.contains("dtype") && v["dtype"].is_string(), FormatError)
          << path << ": tensor '" << name << "' has no string dtype";
      ACCEL_CHECK(v.contains("shape") && v["shape"].is_array(), FormatError)
          << path << ": tensor '" << name << "' has no shape array";
      ACCEL_CHECK(v.contains("data_offsets") && v["data_offsets"].is_array() &&
                      v["data_offsets"].size() == 2,
                  FormatError)
          << path << ": tensor '" << name << "' has no [begin, end] data_offsets";
      TensorView t;
      t.name = name;
      std::string dt = v["dtype"].get<std::string>();
      ACCEL_CHECK(parse_dtype(dt, &t.dtype), FormatError)
          << path << ": tensor '" << name << "' has unsupported dtype " << dt;
      uint64_t numel = 1;
      for (const json& d : v["shape"]) {
        ACCEL_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0),
                    FormatError)
            << path << ": tensor '" << name << "' has a negative or non-integer dimension";
        uint64_t dim = d.get<uint64_t>();
        ACCEL_CHECK(dim == 0 || numel <= std::numeric_limits<uint64_t>::max() / dim / 8, FormatError)
            << path << ": tensor '" << name << "' shape overflows";
        numel *= dim;
        t.shape.push_back(static_cast<int64_t>(dim));
      }
      const json& off = v["data_offsets"];
      ACCEL_CHECK(off[0].is_number_unsigned() && off[1].is_number_unsigned(), FormatError)
          << path << ": tensor '" << name << "' data_offsets are not non-negative integers";
      uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
      ACCEL_CHECK(b <= e && e <= data_size, FormatError)
          << path << ": tensor '" << name << "' data_offsets [" << b << ", " << e
          << "] lie outside the " << data_size << "-byte data section (truncated file?)";
      ACCEL_CHECK(e - b == numel * dtype_size(t.dtype), FormatError)
          << path << ": tensor '" << name << "' holds " << (e - b) << " bytes but its shape and dtype "
          << dt << " need " << numel * dtype_size(t.dtype);
      t.data = data + b;
      t.nbytes = e - b;
      if (e > b) ranges.emplace_back(b, e);
      tensors_.emplace(name, std::move(t));
    }
    std::sort(ranges.begin(), ranges.end());
    for (size_t i = 1; i < ranges.size(); ++i) {
      ACCEL_CHECK(ranges[i].first >= ranges[i - 1].second, FormatError)
          << path << ": tensor data ranges overlap";
    }
  } catch (...) {
    ::munmap(map_, map_size_);
    map_ = nullptr;
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_size_);
}

const TensorView& SafetensorsFile::get(const std::string& name) const {
  auto it = tensors_.find(name);
  ACCEL_CHECK(it != tensors_.end(), FormatError) << path_ << ": no tensor named '" << name << "'";
  return it->second;
}

CheckpointReader::CheckpointReader(const std::string& model_dir) {
  fs::path dir(model_dir);
  fs::path single = dir / "model.safetensors";
  fs::path index = dir / "model.safetensors.index.json";
  if (fs::exists(index)) {
    json j;
    try {
      std::ifstream in(index);
      j = json::parse(in);
    } catch (const json::exception& e) {
      ACCEL_THROW(FormatError) << index.string() << " is not valid JSON: " << e.what();
    }
    ACCEL_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
                FormatError)
        << index.string() << " has no weight_map object";
    std::map<std::string, size_t> shard_of_file;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      ACCEL_CHECK(it.value().is_string(), FormatError)
          << index.string() << ": weight_map entry '" << it.key() << "' is not a file name";
      std::string file = it.value().get<std::string>();
      ACCEL_CHECK(file.find('/') == std::string::npos && file != ".." && !file.empty(), FormatError)
          << index.string() << ": shard name '" << file << "' must be a plain file name";
      auto s = shard_of_file.find(file);
      if (s == shard_of_file.end()) {
        files_.push_back(std::make_unique<SafetensorsFile>((dir / file).string()));
        s = shard_of_file.emplace(file, files_.size() - 1).first;
      }
      const SafetensorsFile& f = *files_[s->second];
      ACCEL_CHECK(f.contains(it.key()), FormatError)
          << index.string() << " maps '" << it.key() << "' to " << file << ", which lacks it";
      index_[it.key()] = &f.get(it.key());
    }
  } else if (fs::exists(single)) {
    files_.push_back(std::make_unique<SafetensorsFile>(single.string()));
    for (const auto& [name, t] : files_.back()->tensors()) index_[name] = &t;
  } else {
    ACCEL_THROW(NotFound) << "no model.safetensors or model.safetensors.index.json in " << model_dir;
  }
}

bool CheckpointReader::contains(const std::string& name) const { return index_.count(name) != 0; }

const TensorView& CheckpointReader::get(const std::string& name) const {
  auto it = index_.find(name);
  ACCEL_CHECK(it != index_.end(), FormatError) << "checkpoint has no tensor named '" << name << "'";
  return *it->second;
}

std::vector<std::string> CheckpointReader::names() const {
  std::vector<std::string> out;
  for (const auto& kv : index_) out.push_back(kv.first);
  return out;
}

void convert_to_f32(const TensorView& t, float* out) {
  const int64_t n = t.numel();
  switch (t.dtype) {
    case DType::kF32:
      std::memcpy(out, t.data, n * sizeof(float));
      return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, t.data + 2 * i, 2);
        out[i] = fp16_to_f32(h);
      }
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, t.data + 2 * i, 2);
        out[i] = bf16_to_f32(h);
      }
      return;
    case DType::kF64:
      for (int64_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, t.data + 8 * i, 8);
        out[i] = static_cast<float>(d);
      }
      return;
    default:
      ACCEL_THROW(FormatError) << "tensor '" << t.name << "' has dtype " << dtype_name(t.dtype)
                               << ", expected a float type (F32, F16, BF16)";
  }
}

void write_safetensors(const std::string& path, const std::vector<TensorOut>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  std::set<std::string> names;
  for (const TensorOut& t : tensors) {
    ACCEL_CHECK(names.insert(t.name).second, InvalidArgument) << "duplicate tensor name '" << t.name << "'";
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    ACCEL_CHECK(static_cast<size_t>(numel) * dtype_size(t.dtype) == t.bytes.size(), InvalidArgument)
        << "tensor '" << t.name << "' holds " << t.bytes.size() << " bytes, its shape and dtype need "
        << numel * dtype_size(t.dtype);
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // tensor data starts 8-byte aligned
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    ACCEL_CHECK(out.good(), NotFound) << "cannot write " << tmp;
    uint64_t n = text.size();
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const TensorOut& t : tensors) out.write(reinterpret_cast<const char*>(t.bytes.data()), static_cast<std::streamsize>(t.bytes.size()));
    ACCEL_CHECK(out.good(), NotFound) << "error writing " << tmp;
  }
  std::filesystem::rename(tmp, path);
}

}  // namespace accelcore
