// AVX2 linear kernel (this file is compiled with -mavx2 -mfma).
#include <immintrin.h>

#include "backend/cpu/ops.h"

namespace accelcore::cpu {
namespace {

struct Avx2 {
  using Vec = __m256;
  using Mask = __m256i;
  static constexpr int kWidth = 8;
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Mask tail_mask(int n) {
    alignas(32) static const int32_t kMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask + 8 - n));
  }
  static Vec load_masked(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

#include "backend/cpu/linear_impl.h"

}  // namespace

void linear_avx2(const LinearParams& p, int64_t n0, int64_t n1) { linear_blocks<Avx2, 4>(p, n0, n1); }

}  // namespace accelcore::cpu
