// Owned arrays for weights, activations and KV pools: 64-byte aligned, and large ones on huge
// pages where the kernel allows it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace accelcore {

// Arrays from 2 MB on are 2 MB aligned and advised to transparent huge pages (where THP is set
// to "madvise", the usual default, nothing else gets them). Decode streams every weight once per
// step: with 4 KB pages each page crossing costs a TLB walk and stops the hardware prefetcher.
// TinyLlama's W4A8 layers at 16 rows, streamed: 1111-1144 -> 1077-1098 us (qlinear_bench).
inline void* alloc_array(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20;
  if (bytes >= kHuge) {
    bytes = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = std::aligned_alloc(kHuge, bytes);
    if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without THP the pages are 4 KB
#endif
    return p;
  }
  void* p = std::aligned_alloc(64, std::max<size_t>(64, (bytes + 63) / 64 * 64));  // never 0: may be null
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

// A std::vector allocator over alloc_array (the packed 4-bit weights).
template <class T>
struct ArrayAllocator {
  using value_type = T;
  ArrayAllocator() = default;
  template <class U>
  ArrayAllocator(const ArrayAllocator<U>&) noexcept {}
  T* allocate(size_t n) { return static_cast<T*>(alloc_array(n * sizeof(T))); }
  void deallocate(T* p, size_t) noexcept { std::free(p); }
  template <class U>
  bool operator==(const ArrayAllocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const ArrayAllocator<U>&) const noexcept { return false; }
};

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
      data_ = nullptr;
      size_ = cap_ = 0;
      data_ = static_cast<float*>(alloc_array(n * sizeof(float)));
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
