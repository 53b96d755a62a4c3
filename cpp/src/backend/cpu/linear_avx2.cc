// AVX2 linear kernel (this file is compiled with -mavx2 -mfma).
// Dot-product form: each output (m, n) has one vector accumulator over k in chunks of 8 (the tail
// masked), then a fixed horizontal reduction; the same sequence for every block shape, so results
// do not depend on how many tokens share the call.
#include <immintrin.h>

#include "backend/cpu/ops.h"

namespace accelcore::cpu {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MR, int NR>
inline void block(const LinearParams& p, int64_t m0, int64_t n0) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const float* xr[MR];
  const float* wr[NR];
  for (int i = 0; i < MR; ++i) xr[i] = p.x + (m0 + i) * p.ldx;
  for (int j = 0; j < NR; ++j) wr[j] = p.w + (n0 + j) * p.k;
  int64_t kk = 0;
  for (; kk + 8 <= p.k; kk += 8) {
    __m256 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(xr[i] + kk);
    for (int j = 0; j < NR; ++j) {
      __m256 wv = _mm256_loadu_ps(wr[j] + kk);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  if (kk < p.k) {
    alignas(32) static const int32_t kMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    const __m256i mask = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask + 8 - (p.k - kk)));
    __m256 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_maskload_ps(xr[i] + kk, mask);
    for (int j = 0; j < NR; ++j) {
      __m256 wv = _mm256_maskload_ps(wr[j] + kk, mask);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float b = p.bias ? p.bias[n0 + j] : 0.0f;
      p.y[(m0 + i) * p.ldy + n0 + j] = hsum(acc[i][j]) + b;
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

void linear_avx2(const LinearParams& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) rows<4>(p, n);
  for (; n < n1; ++n) rows<1>(p, n);
}

}  // namespace accelcore::cpu
