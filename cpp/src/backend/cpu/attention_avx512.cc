// Paged attention for the avx512 path (see attention_impl.h; compiler flags set per file in CMake),
// with a kernel of its own for head dim 8.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "backend/cpu/ops.h"
#include "quant/kvq.h"

namespace accelcore::cpu {
namespace avx512_impl {
#include "backend/cpu/attention_impl.h"

// Head dim 8: the virtual-block kernel of attention_d8_impl.h. Per virtual block and query head:
// - scores s = q'0 k0 + q'1 k1 + ... + q'7 k7 in that order (fused multiply-adds), q' = q * scale;
// - e = exp(s - max) (exp16), summed per lane in position order, the lanes then added in a tree;
// - the e-weighted sum of V, accumulated by fused multiply-adds, two positions per vector (V's
//   16 x 8 block is 8 vectors of two rows, e's lanes paired to match): positions 4m and 4m + 1 of
//   each virtual block into one accumulator, 4m + 2 and 4m + 3 into another, each in position
//   order; at the end the two added, then their low (even) and high (odd) halves, divided by the
//   sum.
// It rounds differently from the generic kernel (the scalar path) and from the AVX2 one, within
// float error. Lanes outside the token's range are masked. The exponentials are a pass of their
// own: chained to the weighted sum (the previous form) a block's exponential and its eight fused
// multiply-adds into one accumulator made a dependency chain that the out-of-order window could
// not hide (29 cycles per head and block, now 24).
namespace {

constexpr int kHeads = 4;  // query heads per pass over the blocks (registers: 2 accumulators each)
#include "backend/cpu/attention_d8_impl.h"

// exp(x) on 16 lanes for the softmax's x <= 0: exp_approx()'s range reduction and polynomial
// with fused multiply-adds, x / ln 2 rounded by roundscale and the power of two applied by scalef
// (which needs no clamp: far below, the result is 0).
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m256 high8(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }

// The 16 lanes added in a fixed tree.
inline float sum16(__m512 v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), high8(v));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}

template <int NX>
void attend_heads(const HeadPass& hp) {
  const AttentionParams& p = hp.p;
  const int32_t nvb = hp.nvb;
  const VBlock* hb[NX];
  float* sc[NX];
  __m512 mx[NX];
  // Scores (the query pre-scaled) and their maximum over the valid lanes.
  for (int x = 0; x < NX; ++x) {
    hb[x] = hp.blocks + static_cast<size_t>((hp.x0 + x) / hp.group) * nvb;
    sc[x] = hp.scores + static_cast<size_t>(hp.x0 + x) * nvb * kL;
    const float* q = p.q + hp.t * p.ldq + static_cast<int64_t>(hp.h0 * hp.group + hp.x0 + x) * kD;
    __m512 qb[kD];
    for (int c = 0; c < kD; ++c) qb[c] = _mm512_set1_ps(q[c] * p.scale);
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int32_t i = 0; i < nvb; ++i) {
      const float* kt = hb[x][i].kt;
      __m512 si = _mm512_mul_ps(qb[0], _mm512_loadu_ps(kt));
      for (int c = 1; c < kD; ++c) si = _mm512_fmadd_ps(qb[c], _mm512_loadu_ps(kt + c * kL), si);
      _mm512_storeu_ps(sc[x] + i * kL, si);
      m = _mm512_mask_max_ps(m, hb[x][i].valid, m, si);
    }
    mx[x] = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  }
  // e = exp(s - max), in place of the scores, summed per lane.
  __m512 sum[NX];
  for (int x = 0; x < NX; ++x) sum[x] = _mm512_setzero_ps();
  for (int32_t i = 0; i < nvb; ++i) {
#pragma GCC unroll 8
    for (int x = 0; x < NX; ++x) {
      float* s = sc[x] + i * kL;
      const __m512 e = _mm512_maskz_mov_ps(hb[x][i].valid, exp16(_mm512_sub_ps(_mm512_loadu_ps(s), mx[x])));
      _mm512_storeu_ps(s, e);
      sum[x] = _mm512_add_ps(sum[x], e);
    }
  }
  // The e-weighted sum of V, block by block with the heads side by side; normalised at the end.
  __m512i idx[kD];
  for (int k = 0; k < kD; ++k)
    idx[k] = _mm512_add_epi32(_mm512_set1_epi32(2 * k), _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0));
  __m512 acc[NX][2];
  for (int x = 0; x < NX; ++x) acc[x][0] = acc[x][1] = _mm512_setzero_ps();
  for (int32_t i = 0; i < nvb; ++i) {
    // Every kv head of the token has the same lanes in range (they depend on positions only).
    const __mmask16 valid = hb[0][i].valid;
    if (valid == 0xFFFF) {
#pragma GCC unroll 8
      for (int x = 0; x < NX; ++x) {
        const __m512 e = _mm512_loadu_ps(sc[x] + i * kL);
        const float* v = hb[x][i].v;
#pragma GCC unroll 8
        for (int k = 0; k < kD; ++k)
          acc[x][k & 1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx[k], e), _mm512_loadu_ps(v + 2 * k * kD), acc[x][k & 1]);
      }
      continue;
    }
    // Edge blocks: only the positions in range are added (others may hold anything). Position
    // pair k's mask (low half: lane 2k, high half: lane 2k + 1), once for all heads.
    __mmask16 pair[kD];
    for (int k = 0; k < kD; ++k)
      pair[k] = static_cast<__mmask16>(((valid >> (2 * k)) & 1 ? 0x00FF : 0) | ((valid >> (2 * k + 1)) & 1 ? 0xFF00 : 0));
    for (int x = 0; x < NX; ++x) {
      const __m512 e = _mm512_loadu_ps(sc[x] + i * kL);
      const float* v = hb[x][i].v;
      for (int k = 0; k < kD; ++k)
        acc[x][k & 1] = _mm512_mask3_fmadd_ps(_mm512_permutexvar_ps(idx[k], e), _mm512_maskz_loadu_ps(pair[k], v + 2 * k * kD),
                                              acc[x][k & 1], pair[k]);
    }
  }
  float* out = p.out + hp.t * static_cast<int64_t>(p.num_heads) * kD + static_cast<int64_t>(hp.h0 * hp.group + hp.x0) * kD;
  for (int x = 0; x < NX; ++x) {
    const __m256 inv = _mm256_set1_ps(1.0f / sum16(sum[x]));
    const __m512 a = _mm512_add_ps(acc[x][0], acc[x][1]);
    _mm256_storeu_ps(out + x * kD, _mm256_mul_ps(_mm256_add_ps(_mm512_castps512_ps256(a), high8(a)), inv));
  }
}

}  // namespace
}  // namespace avx512_impl

void attention_avx512(const AttentionParams& p, int64_t item_begin, int64_t item_end) {
  if (p.head_dim == avx512_impl::kD) return avx512_impl::attend_d8(p, item_begin, item_end);
  avx512_impl::attend_items(p, item_begin, item_end);
}

}  // namespace accelcore::cpu
