// AVX-512 linear kernel (this file is compiled with -mavx512f -mavx512bw -mavx512vl -mfma).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "backend/cpu/ops.h"
#include "quant/q4.h"

namespace accelcore::cpu {
namespace {

struct Avx512 {
  using Vec = __m512;
  static constexpr int kWidth = 16;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec set1(float x) { return _mm512_set1_ps(x); }
  static void store(float* p, Vec a) { _mm512_storeu_ps(p, a); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
};

#include "backend/cpu/linear_impl.h"

}  // namespace

void linear_avx512(const LinearParams& p, int64_t n0, int64_t n1) {
  // 6 tokens x 4 panels: 24 accumulators, 4 loads and 6 broadcasts per 24 FMAs. One or two tokens
  // take 8 panels, so that at least 8 independent FMA chains hide the FMA latency.
  if (p.m <= 2) return linear_panels<Avx512, 2, 8>(p, n0, n1);
  linear_panels<Avx512, 6, 4>(p, n0, n1);
}

namespace {

struct Avx512F16 {
  using Vec = __m512;
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Vec a) { _mm512_storeu_ps(p, a); }
  static Vec set1(float x) { return _mm512_set1_ps(x); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec weights(const uint8_t* w64, int c, bool high, Vec z, Vec s) {
    const __m512i v = _mm512_loadu_si512(w64);
    const __m512i q = _mm512_and_si512(_mm512_srl_epi32(v, _mm_cvtsi32_si128(8 * c + (high ? 4 : 0))),
                                       _mm512_set1_epi32(0x0F));
    return _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), z), s);
  }
};

#include "backend/cpu/qlinear_w4a16_impl.h"

}  // namespace

void qlinear_w4a16_avx512(const QLinear16Params& p, int64_t n0, int64_t n1) { qlinear16_rows<Avx512F16>(p, n0, n1); }

}  // namespace accelcore::cpu
