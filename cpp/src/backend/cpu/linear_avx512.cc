// AVX-512 linear kernel (this file is compiled with -mavx512f -mavx512bw -mavx512vl -mfma).
#include <immintrin.h>

#include "backend/cpu/ops.h"

namespace accelcore::cpu {
namespace {

struct Avx512 {
  using Vec = __m512;
  using Mask = __mmask16;
  static constexpr int kWidth = 16;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Mask tail_mask(int n) { return static_cast<Mask>((1u << n) - 1); }
  static Vec load_masked(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(Vec v) { return _mm512_reduce_add_ps(v); }
};

#include "backend/cpu/linear_impl.h"

}  // namespace

void linear_avx512(const LinearParams& p, int64_t n0, int64_t n1) {
  // 4 tokens x 6 weight rows: 24 accumulators, 10 loads per 24 FMAs (measured best on Zen 5).
  linear_blocks<Avx512, 6>(p, n0, n1);
}

}  // namespace accelcore::cpu
