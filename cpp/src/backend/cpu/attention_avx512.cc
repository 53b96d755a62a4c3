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
// its time weighting positions one at a time. This one computes the very same floating-point
// operations in the same order (so every output bit is unchanged), restructured around "virtual
// blocks" of 16 consecutive positions aligned to multiples of 16: position j always sits in lane
// j mod 16, whatever the block size and whether it is read in order from the paged cache or from a
// draft token's own slots. Per virtual block and query head:
// - scores s = ((q0 k0 + q4 k4) + (q1 k1 + q5 k5)) + ((q2 k2 + q6 k6) + (q3 k3 + q7 k7)), scaled;
// - e = exp(s - max) (exp_impl.h's exp_approx, lane-wise), summed per lane (= position mod
//   16) in position order, the lanes then added in sum_tree16's tree;
// - the weighted sum w_j v_j with w_j = e_j / sum, accumulated in position order per parity (even
//   positions in the low 8 lanes, odd in the high 8), as 8 multiplies and adds of two positions
//   each: V's 16 x 8 block is 8 vectors of two rows.
// Blocks the paged cache does not hold as one aligned 16-position float block (other block sizes,
// quantized blocks, lanes from draft slots) are copied or dequantized into staging first, and
// lanes outside the token's range are masked. A token's query heads run side by side (those of all
// its kv heads in the thread's range), so their dependent addition chains overlap.
namespace {

constexpr int kD = 8, kL = 16, kHeads = 8;  // query heads per pass over the blocks

// exp_approx() on 16 lanes, the same operations (no fused multiply-adds; its upper clamp, a no-op
// for a softmax's x <= 0, left out).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), magic), magic);
  __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

inline __m256 high8(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }

// sum_tree16() of the 16 lanes.
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

void attend_d8(const AttentionParams& p, int64_t item_begin, int64_t item_end) {
  const int group = p.num_heads / p.num_kv_heads, bs = p.block_size;
  const int64_t head_floats = static_cast<int64_t>(bs) * kD;
  const KvqLayout lay = kvq_layout(p.kv_bits, kD, bs);
  Scratch scores, stage, dk(p.kv_bits ? head_floats : 0), dv(p.kv_bits ? head_floats : 0);
  std::vector<VBlock> blocks;
  alignas(64) static const int32_t kPairIdx[kD][kL] = {
#define ACCEL_PAIR(k) {2 * k, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k, \
                       2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1}
      ACCEL_PAIR(0), ACCEL_PAIR(1), ACCEL_PAIR(2), ACCEL_PAIR(3), ACCEL_PAIR(4), ACCEL_PAIR(5), ACCEL_PAIR(6), ACCEL_PAIR(7)};
#undef ACCEL_PAIR
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
    const int n_extra = p.extra_offset ? p.extra_offset[t + 1] - p.extra_offset[t] : 0;
    const int64_t* extra_slots = n_extra ? p.extra_slots + p.extra_offset[t] : nullptr;
    const int32_t last = pos - n_extra;  // in order from the cache up to here, then draft slots
    const int32_t own_block = pos / bs;  // blocks before it are read quantized (kv_bits != 0)
    const int32_t vb0 = first / kL, nvb = pos / kL - vb0 + 1;
    blocks.resize(static_cast<size_t>(nh) * nvb);
    stage.resize(static_cast<size_t>(nh) * nvb * 2 * kL * kD);
    scores.resize(static_cast<size_t>(nh) * group * nvb * kL);

    // Where each virtual block's K and V come from, per kv head.
    for (int hh = 0; hh < nh; ++hh) {
      const int kvh = h0 + hh;
      int32_t dequantized = -1;  // the physical block now in dk/dv
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
            dequantize_k(lay, rec, sk);
            dequantize_v(lay, rec, sv);
            vb.kt = sk, vb.v = sv;
          } else {
            const int64_t h = (pool_block(table[b]) * p.num_kv_heads + kvh) * head_floats;
            vb.kt = p.k_cache + h, vb.v = p.v_cache + h;
          }
          continue;
        }
        // Position by position: from the cache (any block size, quantized or not) or a draft slot.
        for (int c = 0; c < 2 * kL * kD; ++c) sk[c] = 0.0f;
        for (int l = la; l <= lz; ++l) {
          const int32_t j = base + l;
          const float *kcol, *vrow;  // channel c at kcol[c * bs]
          if (j <= last) {
            const int32_t pb = j / bs, off = j % bs;
            if (p.kv_bits && pb < own_block) {
              if (dequantized != pb) {
                const uint8_t* rec = p.kv_records + (static_cast<int64_t>(table[pb]) * p.num_kv_heads + kvh) * lay.bytes;
                dequantize_k(lay, rec, dk.data());
                dequantize_v(lay, rec, dv.data());
                dequantized = pb;
              }
              kcol = dk.data() + off, vrow = dv.data() + static_cast<int64_t>(off) * kD;
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
    const __m512 scale = _mm512_set1_ps(p.scale);
    const int heads = nh * group;
    for (int x0 = 0; x0 < heads; x0 += kHeads) {
      const int nx = std::min(kHeads, heads - x0);
      __m512 inv[kHeads], acc[kHeads];
      for (int x = 0; x < nx; ++x) {
        const VBlock* hb = blocks.data() + static_cast<size_t>((x0 + x) / group) * nvb;
        const float* q = p.q + t * p.ldq + static_cast<int64_t>(h0 * group + x0 + x) * kD;
        float* s = scores.data() + static_cast<size_t>(x0 + x) * nvb * kL;
        __m512 qb[kD];
        for (int c = 0; c < kD; ++c) qb[c] = _mm512_set1_ps(q[c]);
        // Scaled scores and their maximum over the valid lanes.
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int32_t i = 0; i < nvb; ++i) {
          const float* kt = hb[i].kt;
          __m512 a[4];
          for (int u = 0; u < 4; ++u)
            a[u] = _mm512_add_ps(_mm512_mul_ps(qb[u], _mm512_loadu_ps(kt + u * kL)),
                                 _mm512_mul_ps(qb[u + 4], _mm512_loadu_ps(kt + (u + 4) * kL)));
          const __m512 si = _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])), scale);
          _mm512_storeu_ps(s + i * kL, si);
          mx = _mm512_mask_max_ps(mx, hb[i].valid, mx, si);
        }
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        // e = exp(s - max) in place, summed per lane in position order.
        __m512 sum = _mm512_setzero_ps();
        for (int32_t i = 0; i < nvb; ++i) {
          const __m512 e = _mm512_maskz_mov_ps(hb[i].valid, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i * kL), m)));
          _mm512_storeu_ps(s + i * kL, e);
          sum = _mm512_add_ps(sum, e);
        }
        inv[x] = _mm512_set1_ps(1.0f / sum16(sum));
        acc[x] = _mm512_setzero_ps();
      }
      // The weighted sum, block by block with the heads side by side.
      for (int32_t i = 0; i < nvb; ++i) {
        for (int x = 0; x < nx; ++x) {
          const VBlock& vb = blocks[static_cast<size_t>((x0 + x) / group) * nvb + i];
          const __m512 w = _mm512_mul_ps(_mm512_loadu_ps(scores.data() + (static_cast<size_t>(x0 + x) * nvb + i) * kL), inv[x]);
          if (vb.valid == 0xFFFF) {
#pragma GCC unroll 8
            for (int k = 0; k < kD; ++k) {
              const __m512 wk = _mm512_permutexvar_ps(_mm512_load_si512(kPairIdx[k]), w);
              acc[x] = _mm512_add_ps(acc[x], _mm512_mul_ps(wk, _mm512_loadu_ps(vb.v + 2 * k * kD)));
            }
          } else {
            // Edge blocks: only the positions in range are added (others may hold anything).
            for (int k = 0; k < kD; ++k) {
              const __mmask16 pair = static_cast<__mmask16>(((vb.valid >> (2 * k)) & 1 ? 0x00FF : 0) |
                                                            ((vb.valid >> (2 * k + 1)) & 1 ? 0xFF00 : 0));
              if (pair == 0) continue;
              const __m512 wk = _mm512_permutexvar_ps(_mm512_load_si512(kPairIdx[k]), w);
              acc[x] = _mm512_mask_add_ps(acc[x], pair, acc[x], _mm512_mul_ps(wk, _mm512_maskz_loadu_ps(pair, vb.v + 2 * k * kD)));
            }
          }
        }
      }
      float* out = p.out + t * static_cast<int64_t>(p.num_heads) * kD + static_cast<int64_t>(h0 * group + x0) * kD;
      for (int x = 0; x < nx; ++x) _mm256_storeu_ps(out + x * kD, _mm256_add_ps(_mm512_castps512_ps256(acc[x]), high8(acc[x])));
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
