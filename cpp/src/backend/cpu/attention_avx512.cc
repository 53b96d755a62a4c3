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

// Head dim 8 (stories260K and other small models), where the generic kernel above spends most of
// its time weighting positions one at a time. This one is built around "virtual blocks" of 16
// consecutive positions aligned to multiples of 16: position j always sits in lane j mod 16,
// whatever the block size and whether it is read in order from the paged cache or from a draft
// token's own slots, so a token's bits do not depend on either (nor on the thread split). Per
// virtual block and query head:
// - scores s = q'0 k0 + q'1 k1 + ... + q'7 k7 in that order (fused multiply-adds), q' = q * scale;
// - e = exp(s - max) (exp16), summed per lane in position order, the lanes then added in a tree;
// - the e-weighted sum of V, accumulated by fused multiply-adds, two positions per vector (V's
//   16 x 8 block is 8 vectors of two rows, e's lanes paired to match): positions 4m and 4m + 1 of
//   each virtual block into one accumulator, 4m + 2 and 4m + 3 into another, each in position
//   order; at the end the two added, then their low (even) and high (odd) halves, divided by the
//   sum.
// It rounds differently from the generic kernel (the scalar and AVX2 paths), within float error.
// Blocks the paged cache does not hold as one aligned 16-position float block (other block sizes,
// quantized blocks, lanes from draft slots) are copied or dequantized into staging first, and
// lanes outside the token's range are masked. A token's query heads run side by side (those of all
// its kv heads in the thread's range, up to kHeads), so their dependent chains overlap, and the
// exponentials are a pass of their own: chained to the weighted sum (the previous form) a
// block's exponential and its eight fused multiply-adds into one accumulator made a dependency
// chain that the out-of-order window could not hide (29 cycles per head and block, now 24).
namespace {

constexpr int kD = 8, kL = 16, kHeads = 4;  // query heads per pass over the blocks (registers: 2 accumulators each)

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

struct VBlock {
  const float* kt;  // [8][16]: channel i of lane l at kt[16 i + l]
  const float* v;   // [16][8]: lane l's values at v[8 l]
  __mmask16 valid;  // lanes whose positions are in range
};

// One pass over a token's virtual blocks for NX query heads (from head x0 of kv head h0 on),
// their accumulators in registers.
struct HeadPass {
  const AttentionParams& p;
  const VBlock* blocks;  // [kv head][nvb]
  float* scores;         // [head][nvb][16]
  int32_t nvb;
  int group;
  int64_t t;
  int h0, x0;
};

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

void attend_d8(const AttentionParams& p, int64_t item_begin, int64_t item_end) {
  const int group = p.num_heads / p.num_kv_heads, bs = p.block_size;
  const int64_t head_floats = static_cast<int64_t>(bs) * kD;
  const KvqLayout lay = kvq_layout(p.kv_bits, kD, bs);
  // Per thread, kept between calls: a call may cover only a token's kv heads.
  thread_local Scratch scores, stage, dk, dv;
  thread_local std::vector<VBlock> blocks;
  thread_local DequantMemo memo;
  memo.begin(p, item_begin, item_end);
  dk.resize(p.kv_bits ? head_floats : 0);
  dv.resize(p.kv_bits ? head_floats : 0);
  auto pool_block = [&](int32_t block) -> int64_t { return p.stage_of_block ? p.stage_of_block[block] : block; };

  for (int64_t item = item_begin; item < item_end;) {
    // This token's kv heads in the range, all at once: their heads' chains overlap below.
    const int64_t t = item / p.num_kv_heads;
    const int h0 = static_cast<int>(item % p.num_kv_heads);
    const int nh = static_cast<int>(std::min<int64_t>(item_end - item, p.num_kv_heads - h0));
    item += nh;
    const int32_t pos = p.positions[t];
    const int32_t* table = p.block_tables + p.block_table_offset[p.seq_of_token[t]];
    const int32_t first = p.window > 0 ? std::max<int32_t>(0, pos - p.window + 1) : 0;
    int n_extra = p.extra_offset ? p.extra_offset[t + 1] - p.extra_offset[t] : 0;
    const int64_t* extra_slots = n_extra ? p.extra_slots + p.extra_offset[t] : nullptr;
    if (n_extra) {
      const int k = extras_in_order(p, table, pos, n_extra, extra_slots);
      n_extra -= k, extra_slots += k;
    }
    const int32_t last = pos - n_extra;  // in order from the cache up to here, then draft slots
    const int32_t own_block = pos / bs;  // blocks before it are read quantized (kv_bits != 0)
    const int32_t vb0 = first / kL, nvb = pos / kL - vb0 + 1;
    blocks.resize(static_cast<size_t>(nh) * nvb);
    stage.resize(static_cast<size_t>(nh) * nvb * 2 * kL * kD);
    scores.resize(static_cast<size_t>(nh) * group * nvb * kL);

    // Where each virtual block's K and V come from, per kv head.
    for (int hh = 0; hh < nh; ++hh) {
      const int kvh = h0 + hh;
      int32_t dequantized = -1;  // the block now in dqk/dqv
      const float *dqk = nullptr, *dqv = nullptr;
      for (int32_t i = 0; i < nvb; ++i) {
        const int32_t base = (vb0 + i) * kL;
        const int la = std::max(first - base, 0), lz = std::min(pos - base, kL - 1);
        VBlock& vb = blocks[static_cast<size_t>(hh) * nvb + i];
        vb.valid = static_cast<__mmask16>(((1u << (lz + 1)) - 1) & ~((1u << la) - 1));
        float* sk = stage.data() + (static_cast<size_t>(hh) * nvb + i) * 2 * kL * kD;
        float* sv = sk + kL * kD;
        const int32_t b = base / bs;
        if (bs == kL && base + lz <= last) {  // one whole block of the cache, in order
          if (p.kv_bits && b < own_block) {
            const uint8_t* rec = p.kv_records + (static_cast<int64_t>(table[b]) * p.num_kv_heads + kvh) * lay.bytes;
            if (!memo.get(lay, rec, table[b], kvh, &vb.kt, &vb.v)) {
              dequantize_k(lay, rec, sk);
              dequantize_v(lay, rec, sv);
              vb.kt = sk, vb.v = sv;
            }
          } else {
            const int64_t h = (pool_block(table[b]) * p.num_kv_heads + kvh) * head_floats;
            vb.kt = p.k_cache + h, vb.v = p.v_cache + h;
          }
          continue;
        }
        // A draft token's block of the cache (block size 16, in float): its in-order lanes copied
        // whole, the lanes past them then replaced or masked. Otherwise position by
        // position: from the cache (any block size, quantized or not) or a draft slot.
        int l0 = la;
        if (bs == kL && base <= last && !(p.kv_bits && b < own_block)) {
          const int64_t h = (pool_block(table[b]) * p.num_kv_heads + kvh) * head_floats;
          for (int c = 0; c < kD; ++c) {
            _mm512_storeu_ps(sk + c * kL, _mm512_loadu_ps(p.k_cache + h + c * kL));
            _mm512_storeu_ps(sv + c * kL, _mm512_loadu_ps(p.v_cache + h + c * kL));
          }
          l0 = std::max(la, last - base + 1);
        } else {
          for (int c = 0; c < 2 * kD; ++c) _mm512_storeu_ps(sk + c * kL, _mm512_setzero_ps());
        }
        for (int l = l0; l <= lz; ++l) {
          const int32_t j = base + l;
          const float *kcol, *vrow;  // channel c at kcol[c * bs]
          if (j <= last) {
            const int32_t pb = j / bs, off = j % bs;
            if (p.kv_bits && pb < own_block) {
              if (dequantized != pb) {
                const uint8_t* rec = p.kv_records + (static_cast<int64_t>(table[pb]) * p.num_kv_heads + kvh) * lay.bytes;
                if (!memo.get(lay, rec, table[pb], kvh, &dqk, &dqv)) {
                  dequantize_k(lay, rec, dk.data());
                  dequantize_v(lay, rec, dv.data());
                  dqk = dk.data(), dqv = dv.data();
                }
                dequantized = pb;
              }
              kcol = dqk + off, vrow = dqv + static_cast<int64_t>(off) * kD;
            } else {
              const int64_t h = (pool_block(table[pb]) * p.num_kv_heads + kvh) * head_floats;
              kcol = p.k_cache + h + off, vrow = p.v_cache + h + static_cast<int64_t>(off) * kD;
            }
          } else {  // draft slots index the float pools directly
            const int64_t slot = extra_slots[j - last - 1];
            const int64_t h = ((slot / bs) * p.num_kv_heads + kvh) * head_floats, off = slot % bs;
            kcol = p.k_cache + h + off, vrow = p.v_cache + h + off * kD;
          }
          for (int c = 0; c < kD; ++c) sk[c * kL + l] = kcol[static_cast<int64_t>(c) * bs];
          std::memcpy(sv + l * kD, vrow, kD * sizeof(float));
        }
        vb.kt = sk, vb.v = sv;
      }
    }

    // Query heads in passes of kHeads; head x = (kv head h0 + x / group, its query head x % group).
    const int heads = nh * group;
    for (int x0 = 0; x0 < heads; x0 += kHeads) {
      const HeadPass hp{p, blocks.data(), scores.data(), nvb, group, t, h0, x0};
      static_assert(kHeads == 4);
      switch (std::min(kHeads, heads - x0)) {
        case 4: attend_heads<4>(hp); break;
        case 3: attend_heads<3>(hp); break;
        case 2: attend_heads<2>(hp); break;
        default: attend_heads<1>(hp); break;
      }
    }
  }
}

}  // namespace
}  // namespace avx512_impl

void attention_avx512(const AttentionParams& p, int64_t item_begin, int64_t item_end) {
  if (p.head_dim == avx512_impl::kD) return avx512_impl::attend_d8(p, item_begin, item_end);
  avx512_impl::attend_items(p, item_begin, item_end);
}

}  // namespace accelcore::cpu
