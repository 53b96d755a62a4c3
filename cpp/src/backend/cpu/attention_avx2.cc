// Paged attention for the avx2 path (see attention_impl.h; compiler flags set per file in CMake),
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
namespace avx2_impl {
#include "backend/cpu/attention_impl.h"

// Head dim 8: the virtual-block kernel of attention_d8_impl.h, a position's 8 values being one
// 8-lane vector. Per virtual block and query head:
// - scores s = q'0 k0 + q'1 k1 + ... + q'7 k7 in that order (fused multiply-adds, lanes 0-7 and
//   8-15 as two vectors), q' = q * scale;
// - e = exp(s - max) (exp8), 0 outside the token's range, summed per lane in position order, the
//   lanes then added in a tree;
// - the e-weighted sum of V by fused multiply-adds, even positions into one accumulator and odd
//   ones into another, each in position order, only the lanes in range; at the end the two
//   added and divided by the sum.
// It rounds differently from the generic kernel (the scalar path) and from AVX-512's, within
// float error; on this path every token's bits are the same wherever its lanes come from.
namespace {

constexpr int kHeads = 4;  // query heads per pass over the blocks (registers: 2 accumulators each)
#include "backend/cpu/attention_d8_impl.h"

// exp(x) on 8 lanes for the softmax's x <= 0: exp_approx()'s clamp, range reduction and
// polynomial, with fused multiply-adds.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Lanes 8h to 8h + 7 of a 16-bit lane mask as an 8-lane vector mask.
inline __m256 lane_mask(uint16_t valid, int h) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i m = _mm256_and_si256(_mm256_set1_epi32((valid >> (8 * h)) & 0xFF), bits);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(m, bits));
}

// The 8 lanes added in a fixed tree.
inline float sum8(__m256 v) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}

inline float max8(__m256 v) {
  const __m128 q = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 d = _mm_max_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_max_ss(d, _mm_movehdup_ps(d)));
}

template <int NX>
void attend_heads(const HeadPass& hp) {
  const AttentionParams& p = hp.p;
  const int32_t nvb = hp.nvb;
  const VBlock* hb[NX];
  float* sc[NX];
  __m256 mx[NX];
  const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
  // Scores (the query pre-scaled) and their maximum over the valid lanes.
  for (int x = 0; x < NX; ++x) {
    hb[x] = hp.blocks + static_cast<size_t>((hp.x0 + x) / hp.group) * nvb;
    sc[x] = hp.scores + static_cast<size_t>(hp.x0 + x) * nvb * kL;
    const float* q = p.q + hp.t * p.ldq + static_cast<int64_t>(hp.h0 * hp.group + hp.x0 + x) * kD;
    __m256 qb[kD];
    for (int c = 0; c < kD; ++c) qb[c] = _mm256_set1_ps(q[c] * p.scale);
    __m256 m = neg_inf;
    for (int32_t i = 0; i < nvb; ++i) {
      const float* kt = hb[x][i].kt;
      for (int h = 0; h < 2; ++h) {
        __m256 si = _mm256_mul_ps(qb[0], _mm256_loadu_ps(kt + 8 * h));
        for (int c = 1; c < kD; ++c) si = _mm256_fmadd_ps(qb[c], _mm256_loadu_ps(kt + c * kL + 8 * h), si);
        _mm256_storeu_ps(sc[x] + i * kL + 8 * h, si);
        const uint16_t valid = hb[x][i].valid;
        m = _mm256_max_ps(m, valid == 0xFFFF ? si : _mm256_blendv_ps(neg_inf, si, lane_mask(valid, h)));
      }
    }
    mx[x] = _mm256_set1_ps(max8(m));
  }
  // e = exp(s - max), 0 outside the range, in place of the scores, summed per lane.
  __m256 sum[NX][2];
  for (int x = 0; x < NX; ++x) sum[x][0] = sum[x][1] = _mm256_setzero_ps();
  for (int32_t i = 0; i < nvb; ++i) {
    const uint16_t valid = hb[0][i].valid;  // the same for every kv head (positions only)
#pragma GCC unroll 4
    for (int x = 0; x < NX; ++x)
      for (int h = 0; h < 2; ++h) {
        float* s = sc[x] + i * kL + 8 * h;
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s), mx[x]));
        if (valid != 0xFFFF) e = _mm256_and_ps(e, lane_mask(valid, h));
        _mm256_storeu_ps(s, e);
        sum[x][h] = _mm256_add_ps(sum[x][h], e);
      }
  }
  // The e-weighted sum of V, block by block with the heads side by side; normalised at the end.
  __m256 acc[NX][2];
  for (int x = 0; x < NX; ++x) acc[x][0] = acc[x][1] = _mm256_setzero_ps();
  for (int32_t i = 0; i < nvb; ++i) {
    const uint16_t valid = hb[0][i].valid;
    if (valid == 0xFFFF) {
#pragma GCC unroll 4
      for (int x = 0; x < NX; ++x) {
        const float* e = sc[x] + i * kL;
        const float* v = hb[x][i].v;
#pragma GCC unroll 16
        for (int l = 0; l < kL; ++l)
          acc[x][l & 1] = _mm256_fmadd_ps(_mm256_broadcast_ss(e + l), _mm256_loadu_ps(v + l * kD), acc[x][l & 1]);
      }
      continue;
    }
    // Edge blocks: only the lanes in range (the others may hold anything).
    const int la = __builtin_ctz(valid), lz = 31 - __builtin_clz(valid);
    for (int x = 0; x < NX; ++x) {
      const float* e = sc[x] + i * kL;
      const float* v = hb[x][i].v;
      for (int l = la; l <= lz; ++l)
        acc[x][l & 1] = _mm256_fmadd_ps(_mm256_broadcast_ss(e + l), _mm256_loadu_ps(v + l * kD), acc[x][l & 1]);
    }
  }
  float* out = p.out + hp.t * static_cast<int64_t>(p.num_heads) * kD + static_cast<int64_t>(hp.h0 * hp.group + hp.x0) * kD;
  for (int x = 0; x < NX; ++x) {
    const __m256 inv = _mm256_set1_ps(1.0f / sum8(_mm256_add_ps(sum[x][0], sum[x][1])));
    _mm256_storeu_ps(out + x * kD, _mm256_mul_ps(_mm256_add_ps(acc[x][0], acc[x][1]), inv));
  }
}

}  // namespace
}  // namespace avx2_impl

void attention_avx2(const AttentionParams& p, int64_t item_begin, int64_t item_end) {
  if (p.head_dim == avx2_impl::kD) return avx2_impl::attend_d8(p, item_begin, item_end);
  avx2_impl::attend_items(p, item_begin, item_end);
}

}  // namespace accelcore::cpu
