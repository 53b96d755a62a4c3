// AVX-512 linear kernel (this file is compiled with -mavx512f -mavx512bw -mavx512vl -mfma).
// Dot-product form: each output (m, n) has one vector accumulator over k in chunks of 16 (the tail
// masked), then a fixed horizontal reduction; the same sequence for every block shape, so results
// do not depend on how many tokens share the call.
#include <immintrin.h>

#include "backend/cpu/ops.h"

namespace accelcore::cpu {
namespace {

template <int MR, int NR>
inline void block(const LinearParams& p, int64_t m0, int64_t n0) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const float* xr[MR];
  const float* wr[NR];
  for (int i = 0; i < MR; ++i) xr[i] = p.x + (m0 + i) * p.ldx;
  for (int j = 0; j < NR; ++j) wr[j] = p.w + (n0 + j) * p.k;
  int64_t kk = 0;
  for (; kk + 16 <= p.k; kk += 16) {
    __m512 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(xr[i] + kk);
    for (int j = 0; j < NR; ++j) {
      __m512 wv = _mm512_loadu_ps(wr[j] + kk);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  if (kk < p.k) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (p.k - kk)) - 1);
    __m512 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_maskz_loadu_ps(mask, xr[i] + kk);
    for (int j = 0; j < NR; ++j) {
      __m512 wv = _mm512_maskz_loadu_ps(mask, wr[j] + kk);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float b = p.bias ? p.bias[n0 + j] : 0.0f;
      p.y[(m0 + i) * p.ldy + n0 + j] = _mm512_reduce_add_ps(acc[i][j]) + b;
    }
}

template <int NR>
inline void rows(const LinearParams& p, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= p.m; m += 4) block<4, NR>(p, m, n0);
  switch (p.m - m) {
    case 3: block<3, NR>(p, m, n0); break;
    case 2: block<2, NR>(p, m, n0); break;
    case 1: block<1, NR>(p, m, n0); break;
    default: break;
  }
}

}  // namespace

void linear_avx512(const LinearParams& p, int64_t n0, int64_t n1) {
  // 4 tokens x 6 weight rows: 24 accumulators, 10 loads per 24 FMAs (measured best on Zen 5).
  int64_t n = n0;
  for (; n + 6 <= n1; n += 6) rows<6>(p, n);
  for (; n < n1; ++n) rows<1>(p, n);
}

}  // namespace accelcore::cpu
