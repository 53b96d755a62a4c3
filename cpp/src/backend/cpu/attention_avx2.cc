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
// - e = exp(s - max) (exp8n), 0 outside the token's range, summed per lane in position order, the
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
// polynomial, with fused multiply-adds; N vectors side by side, each step for all before the
// next (each vector's operations are those of one alone). One vector at a time, its 15 dependent
// steps left the out-of-order window too few independent ones.
template <int N>
inline void exp8n(__m256 (&v)[N]) {
  __m256 n[N], r[N], p[N];
  for (int j = 0; j < N; ++j) v[j] = _mm256_max_ps(v[j], _mm256_set1_ps(-87.0f));
  for (int j = 0; j < N; ++j)
    n[j] = _mm256_round_ps(_mm256_mul_ps(v[j], _mm256_set1_ps(1.44269504088896341f)),
                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  for (int j = 0; j < N; ++j) r[j] = _mm256_fnmadd_ps(n[j], _mm256_set1_ps(0.693359375f), v[j]);
  for (int j = 0; j < N; ++j) r[j] = _mm256_fnmadd_ps(n[j], _mm256_set1_ps(-2.12194440e-4f), r[j]);
  for (int j = 0; j < N; ++j)
    p[j] = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500e-4f), r[j], _mm256_set1_ps(1.3981999507e-3f));
  for (int j = 0; j < N; ++j) p[j] = _mm256_fmadd_ps(p[j], r[j], _mm256_set1_ps(8.3334519073e-3f));
  for (int j = 0; j < N; ++j) p[j] = _mm256_fmadd_ps(p[j], r[j], _mm256_set1_ps(4.1665795894e-2f));
  for (int j = 0; j < N; ++j) p[j] = _mm256_fmadd_ps(p[j], r[j], _mm256_set1_ps(1.6666665459e-1f));
  for (int j = 0; j < N; ++j) p[j] = _mm256_fmadd_ps(p[j], r[j], _mm256_set1_ps(5.0000001201e-1f));
  for (int j = 0; j < N; ++j)
    p[j] = _mm256_add_ps(_mm256_fmadd_ps(p[j], _mm256_mul_ps(r[j], r[j]), r[j]), _mm256_set1_ps(1.0f));
  for (int j = 0; j < N; ++j) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n[j]), _mm256_set1_epi32(127)), 23);
    v[j] = _mm256_mul_ps(p[j], _mm256_castsi256_ps(e));
  }
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

// NX query heads, G consecutive ones sharing a kv head (their K and V loads shared). Every
// loop runs the heads' independent chains side by side: written head by head (the previous
// form), each pass ran at a third to a half of the rate the multiply-add units allow, the
// out-of-order window seeing only a head's dependent chain or two. Each chain's operations and
// their order are unchanged, so are the bits.
template <int NX, int G>
void attend_heads_g(const HeadPass& hp) {
  static_assert(NX % G == 0);
  constexpr int NK = NX / G;  // kv heads
  const AttentionParams& p = hp.p;
  const int32_t nvb = hp.nvb;
  const VBlock* hb[NK];
  float* sc[NX];
  for (int g = 0; g < NK; ++g) hb[g] = hp.blocks + static_cast<size_t>((hp.x0 + g * G) / hp.group) * nvb;
  for (int x = 0; x < NX; ++x) sc[x] = hp.scores + static_cast<size_t>(hp.x0 + x) * nvb * kL;
  // Scores (the query pre-scaled, its broadcasts read from memory: registers hold the chains)
  // and their maximum over the valid lanes.
  __m256 qb[NX][kD];
  for (int x = 0; x < NX; ++x) {
    const float* q = p.q + hp.t * p.ldq + static_cast<int64_t>(hp.h0 * hp.group + hp.x0 + x) * kD;
    for (int c = 0; c < kD; ++c) qb[x][c] = _mm256_set1_ps(q[c] * p.scale);
  }
  const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
  __m256 m[NX];
  for (int x = 0; x < NX; ++x) m[x] = neg_inf;
  for (int32_t i = 0; i < nvb; ++i) {
    __m256 si[NX][2];
    for (int g = 0; g < NK; ++g)
      for (int h = 0; h < 2; ++h) {
        const __m256 k = _mm256_loadu_ps(hb[g][i].kt + 8 * h);
        for (int y = 0; y < G; ++y) si[g * G + y][h] = _mm256_mul_ps(qb[g * G + y][0], k);
      }
    for (int c = 1; c < kD; ++c)
      for (int g = 0; g < NK; ++g)
        for (int h = 0; h < 2; ++h) {
          const __m256 k = _mm256_loadu_ps(hb[g][i].kt + c * kL + 8 * h);
          for (int y = 0; y < G; ++y) si[g * G + y][h] = _mm256_fmadd_ps(qb[g * G + y][c], k, si[g * G + y][h]);
        }
    const uint16_t valid = hb[0][i].valid;  // the same for every kv head (positions only)
    for (int x = 0; x < NX; ++x)
      for (int h = 0; h < 2; ++h) {
        _mm256_storeu_ps(sc[x] + i * kL + 8 * h, si[x][h]);
        const __m256 s = valid == 0xFFFF ? si[x][h] : _mm256_blendv_ps(neg_inf, si[x][h], lane_mask(valid, h));
        m[x] = _mm256_max_ps(m[x], s);
      }
  }
  __m256 mx[NX];
  for (int x = 0; x < NX; ++x) mx[x] = _mm256_set1_ps(max8(m[x]));
  // e = exp(s - max), 0 outside the range, in place of the scores, summed per lane; four vectors
  // of a block side by side.
  constexpr int kE = 2 * NX, kE4 = (kE + 3) / 4 * 4;
  __m256 sum[kE];
  for (int j = 0; j < kE; ++j) sum[j] = _mm256_setzero_ps();
  for (int32_t i = 0; i < nvb; ++i) {
    const uint16_t valid = hb[0][i].valid;
    for (int j0 = 0; j0 < kE4; j0 += 4) {
      __m256 e[4];
      for (int j = 0; j < 4; ++j) {
        const int x = (j0 + j) / 2, h = (j0 + j) % 2;
        e[j] = j0 + j < kE ? _mm256_sub_ps(_mm256_loadu_ps(sc[x] + i * kL + 8 * h), mx[x]) : _mm256_setzero_ps();
      }
      exp8n<4>(e);
      for (int j = 0; j < 4 && j0 + j < kE; ++j) {
        const int x = (j0 + j) / 2, h = (j0 + j) % 2;
        if (valid != 0xFFFF) e[j] = _mm256_and_ps(e[j], lane_mask(valid, h));
        _mm256_storeu_ps(sc[x] + i * kL + 8 * h, e[j]);
        sum[j0 + j] = _mm256_add_ps(sum[j0 + j], e[j]);
      }
    }
  }
  // The e-weighted sum of V, block by block, position by position with the heads side by side;
  // normalised at the end.
  __m256 acc[NX][2];
  for (int x = 0; x < NX; ++x) acc[x][0] = acc[x][1] = _mm256_setzero_ps();
  for (int32_t i = 0; i < nvb; ++i) {
    const uint16_t valid = hb[0][i].valid;
    if (valid == 0xFFFF) {
#pragma GCC unroll 16
      for (int l = 0; l < kL; ++l)
        for (int g = 0; g < NK; ++g) {
          const __m256 v = _mm256_loadu_ps(hb[g][i].v + l * kD);
          for (int y = 0; y < G; ++y) {
            const int x = g * G + y;
            acc[x][l & 1] = _mm256_fmadd_ps(_mm256_broadcast_ss(sc[x] + i * kL + l), v, acc[x][l & 1]);
          }
        }
      continue;
    }
    // Edge blocks: only the lanes in range (the others may hold anything).
    const int la = __builtin_ctz(valid), lz = 31 - __builtin_clz(valid);
    for (int l = la; l <= lz; ++l)
      for (int g = 0; g < NK; ++g) {
        const __m256 v = _mm256_loadu_ps(hb[g][i].v + l * kD);
        for (int y = 0; y < G; ++y) {
          const int x = g * G + y;
          acc[x][l & 1] = _mm256_fmadd_ps(_mm256_broadcast_ss(sc[x] + i * kL + l), v, acc[x][l & 1]);
        }
      }
  }
  float* out = p.out + hp.t * static_cast<int64_t>(p.num_heads) * kD + static_cast<int64_t>(hp.h0 * hp.group + hp.x0) * kD;
  for (int x = 0; x < NX; ++x) {
    const __m256 inv = _mm256_set1_ps(1.0f / sum8(_mm256_add_ps(sum[2 * x], sum[2 * x + 1])));
    _mm256_storeu_ps(out + x * kD, _mm256_mul_ps(_mm256_add_ps(acc[x][0], acc[x][1]), inv));
  }
}

template <int NX>
void attend_heads(const HeadPass& hp) {
  // Query heads x0, x0 + 1, ... (x0 a multiple of kHeads): pairs share a kv head where the group is even.
  if constexpr (NX % 2 == 0) {
    if (hp.group % 2 == 0) return attend_heads_g<NX, 2>(hp);
  }
  attend_heads_g<NX, 1>(hp);
}

}  // namespace
}  // namespace avx2_impl

void attention_avx2(const AttentionParams& p, int64_t item_begin, int64_t item_end) {
  if (p.head_dim == avx2_impl::kD) return avx2_impl::attend_d8(p, item_begin, item_end);
  avx2_impl::attend_items(p, item_begin, item_end);
}

}  // namespace accelcore::cpu
