// A validating reader for the safetensors format (https://huggingface.co/docs/safetensors):
// 8-byte little-endian header size, a JSON header, then the tensor bytes. The file is mmapped;
// every field of the header is checked before any tensor byte is touched, so a corrupt or
// truncated file is a FormatError, never a crash.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace accelcore {

enum class DType { kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU8, kBool };

const char* dtype_name(DType t);
size_t dtype_size(DType t);

struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapping, valid while the file is open
  size_t nbytes = 0;
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  // Throws NotFound if the path does not exist, FormatError if it is not valid safetensors.
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorView& get(const std::string& name) const;  // throws FormatError if absent

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// The tensors of a model directory: model.safetensors, or the shards named by
// model.safetensors.index.json. Each tensor name is looked up in the shard that holds it.
class CheckpointReader {
 public:
  explicit CheckpointReader(const std::string& model_dir);
  bool contains(const std::string& name) const;
  const TensorView& get(const std::string& name) const;  // throws FormatError naming the tensor
  std::vector<std::string> names() const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> index_;
};

// A tensor to write: its bytes, little-endian, numel * dtype_size of them.
struct TensorOut {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};
template <class T>
TensorOut tensor_out(std::string name, DType dtype, std::vector<int64_t> shape, const T* data, size_t count) {
  TensorOut t{std::move(name), dtype, std::move(shape), {}};
  t.bytes.resize(count * sizeof(T));
  if (count) std::memcpy(t.bytes.data(), data, t.bytes.size());
  return t;
}

// Writes a safetensors file (through a temporary file renamed into place). Throws InvalidArgument
// on duplicate names or sizes that do not match the shapes, NotFound if it cannot be written.
void write_safetensors(const std::string& path, const std::vector<TensorOut>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Converts any float tensor (f32, f16, bf16, f64) to float32 into `out` (numel floats).
void convert_to_f32(const TensorView& t, float* out);

}  // namespace accelcore
