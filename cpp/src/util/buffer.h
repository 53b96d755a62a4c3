// A 64-byte aligned, owned float array (weights, activations, KV pools).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

namespace accelcore {

class FloatBuffer {
 public:
  FloatBuffer() = default;
  explicit FloatBuffer(size_t n) { resize(n); }
  ~FloatBuffer() { std::free(data_); }
  FloatBuffer(FloatBuffer&& o) noexcept : data_(o.data_), size_(o.size_), cap_(o.cap_) {
    o.data_ = nullptr;
    o.size_ = o.cap_ = 0;
  }
  FloatBuffer& operator=(FloatBuffer&& o) noexcept {
    if (this != &o) {
      std::free(data_);
      data_ = o.data_;
      size_ = o.size_;
      cap_ = o.cap_;
      o.data_ = nullptr;
      o.size_ = o.cap_ = 0;
    }
    return *this;
  }
  FloatBuffer(const FloatBuffer&) = delete;
  FloatBuffer& operator=(const FloatBuffer&) = delete;

  // Grows capacity as needed; contents are not preserved across growth.
  void resize(size_t n) {
    if (n > cap_) {
      std::free(data_);
      size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
      data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (data_ == nullptr) throw std::bad_alloc();
      cap_ = n;
    }
    size_ = n;
  }
  void zero() { std::memset(data_, 0, size_ * sizeof(float)); }

  float* data() { return data_; }
  const float* data() const { return data_; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  float& operator[](size_t i) { return data_[i]; }
  const float& operator[](size_t i) const { return data_[i]; }

 private:
  float* data_ = nullptr;
  size_t size_ = 0, cap_ = 0;
};

}  // namespace accelcore
