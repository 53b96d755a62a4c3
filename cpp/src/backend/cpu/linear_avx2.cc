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
  static constexpr int kWidth = 8;
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec set1(float x) { return _mm256_set1_ps(x); }
  static void store(float* p, Vec a) { _mm256_storeu_ps(p, a); }
  static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
};

#include "backend/cpu/linear_impl.h"

}  // namespace

void linear_avx2(const LinearParams& p, int64_t n0, int64_t n1) {
  // 16 registers: 6 tokens x 1 panel (12 accumulators), or for one or two tokens 4 or 2 panels:
  // at least 8 independent FMA chains, which hide the FMA latency (one token by 2 panels, 4
  // chains, ran at half the rate).
  if (p.m == 1) return linear_panels<Avx2, 1, 4>(p, n0, n1);
  if (p.m == 2) return linear_panels<Avx2, 2, 2>(p, n0, n1);
  linear_panels<Avx2, 6, 1>(p, n0, n1);
}

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
