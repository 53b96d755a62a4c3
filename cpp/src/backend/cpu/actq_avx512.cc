// Activation quantization (quant/q4.h: a8_quantize_rows per group, a4_quantize_rows per FMPQ
// sub-group) with AVX-512 (compiled with -mavx512f -mavx512bw -ffp-contract=off): the scalar
// code's float operations lane by lane, so the same bits. -ffp-contract=off keeps x * inv + C an
// unfused multiply and add.
#include <immintrin.h>

#include "backend/cpu/ops.h"

namespace accelcore::cpu {

void a8_quantize_groups_avx512(const float* x, int64_t n, int64_t group, int8_t* q, float* scales, int32_t* sums) {
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  for (int64_t g = 0; g < n; ++g, x += group, q += group) {
    // The maximum magnitude: exact in any order.
    __m512 m = _mm512_setzero_ps();
    for (int64_t i = 0; i < group; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    const float amax = _mm512_reduce_max_ps(m);
    const float scale = amax > 0 ? amax / 127.0f : 1.0f;
    const float inv_s = 1.0f / scale;
    const __m512 inv = _mm512_set1_ps(inv_s);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = 0; i < group; i += 16) {
      // round_even(x * inv) by the 1.5 * 2^23 trick, then the clamp, as the scalar code does.
      const __m512 v = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv), magic), magic);
      const __m512i qi = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi));
      sum = _mm512_add_epi32(sum, qi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(qi));
    }
    scales[g] = scale;
    sums[g] = _mm512_reduce_add_epi32(sum);
  }
}

namespace {

// Lane l of the result: the maximum (kMax) or minimum over the 8 lanes of l's half. Exact.
template <bool kMax>
inline __m512 half_reduce(__m512 v) {
  auto op = [](__m512 a, __m512 b) { return kMax ? _mm512_max_ps(a, b) : _mm512_min_ps(a, b); };
  v = op(v, _mm512_permute_ps(v, 0xB1));                                            // pairs
  v = op(v, _mm512_permute_ps(v, 0x4E));                                            // quads
  return op(v, _mm512_shuffle_f32x4(v, v, 0xB1));                                   // 128-bit lanes
}

}  // namespace

void a4_quantize_subgroups_avx512(const float* x, int64_t k, const int32_t* perm, int64_t subgroups, int64_t first8,
                                  int8_t* q, float* scales, int32_t* sums) {
  const __m512 magic = _mm512_set1_ps(12582912.0f), zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  alignas(64) float sc[16];
  alignas(64) int32_t sm[16];
  // Two 8-channel sub-groups per vector: j and j + 1, channels 8j .. 8j + 15 (zero past k).
  for (int64_t j = 0; j < subgroups; j += 2) {
    const __m512i c = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(8 * j)), lane);
    const __mmask16 in = _mm512_cmplt_epi32_mask(c, _mm512_set1_epi32(static_cast<int32_t>(k)));
    const __m512i idx = perm ? _mm512_mask_loadu_epi32(_mm512_setzero_si512(), in, perm + 8 * j) : c;
    const __m512 v = _mm512_mask_i32gather_ps(zero, in, idx, x, 4);
    // 8 bits ([-127, 127]) from sub-group first8 on, else 4 ([-8, 7]): per half.
    const __mmask16 eight = static_cast<__mmask16>((j >= first8 ? 0x00FF : 0) | (j + 1 >= first8 ? 0xFF00 : 0));
    const __m512 qhi = _mm512_mask_blend_ps(eight, _mm512_set1_ps(7.0f), _mm512_set1_ps(127.0f));
    const __m512 qlo = _mm512_mask_blend_ps(eight, _mm512_set1_ps(-8.0f), _mm512_set1_ps(-127.0f));
    const __m512 hi = _mm512_max_ps(half_reduce<true>(v), zero), lo = _mm512_min_ps(half_reduce<false>(v), zero);
    // scale = hi > 0 || lo < 0 ? max(hi / qhi, lo / qlo) : 1
    const __mmask16 any = _mm512_cmp_ps_mask(hi, zero, _CMP_GT_OQ) | _mm512_cmp_ps_mask(lo, zero, _CMP_LT_OQ);
    const __m512 scale = _mm512_mask_blend_ps(any, one, _mm512_max_ps(_mm512_div_ps(lo, qlo), _mm512_div_ps(hi, qhi)));
    const __m512 inv = _mm512_div_ps(one, scale);
    const __m512 r = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(v, inv), magic), magic);
    const __m512i qi = _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(r, qhi), qlo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 8 * j), _mm512_cvtepi32_epi8(qi));
    _mm512_store_ps(sc, scale);
    _mm512_store_si512(sm, qi);
    for (int h = 0; h < 2 && j + h < subgroups; ++h) {
      int32_t sum = 0;
      for (int i = 0; i < 8; ++i) sum += sm[8 * h + i];
      scales[j + h] = sc[8 * h];
      sums[j + h] = sum;
    }
  }
}

}  // namespace accelcore::cpu
