// AVX2 linear kernel (this file is compiled with -mavx2 -mfma).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "backend/cpu/ops.h"
#include "quant/q4.h"

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

namespace {

// 16 rows as two 8-lane halves.
struct Avx2F16 {
  struct Vec {
    __m256 h[2];
  };
  static Vec load(const float* p) { return {{_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}}; }
  static void store(float* p, const Vec& a) {
    _mm256_storeu_ps(p, a.h[0]);
    _mm256_storeu_ps(p + 8, a.h[1]);
  }
  static Vec set1(float x) { return {{_mm256_set1_ps(x), _mm256_set1_ps(x)}}; }
  static Vec fma(const Vec& a, const Vec& b, const Vec& c) {
    return {{_mm256_fmadd_ps(a.h[0], b.h[0], c.h[0]), _mm256_fmadd_ps(a.h[1], b.h[1], c.h[1])}};
  }
  static Vec weights(const uint8_t* w64, int c, bool high, const Vec& z, const Vec& s) {
    const __m128i shift = _mm_cvtsi32_si128(8 * c + (high ? 4 : 0));
    Vec r;
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w64 + 32 * h));
      const __m256i q = _mm256_and_si256(_mm256_srl_epi32(v, shift), _mm256_set1_epi32(0x0F));
      r.h[h] = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), z.h[h]), s.h[h]);
    }
    return r;
  }
};

#include "backend/cpu/qlinear_w4a16_impl.h"

}  // namespace

void qlinear_w4a16_avx2(const QLinear16Params& p, int64_t n0, int64_t n1) { qlinear16_rows<Avx2F16>(p, n0, n1); }

}  // namespace accelcore::cpu
