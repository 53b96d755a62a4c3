// Activation quantization (quant/q4.h: a8_quantize_rows per group, a4_quantize_rows per FMPQ
// sub-group) with AVX2 (compiled with -mavx2 -mfma -ffp-contract=off): the scalar code's float
// operations lane by lane, so the same bits. -ffp-contract=off keeps x * inv + C an unfused
// multiply and add.
#include <immintrin.h>

#include <algorithm>

#include "backend/cpu/ops.h"

namespace accelcore::cpu {
namespace {

int32_t sum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

}  // namespace

void a8_quantize_groups_avx2(const float* x, int64_t n, int64_t group, int8_t* q, float* scales, int32_t* sums) {
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  // packs leaves 4-byte runs in the order q0 q1 q2 q3 of the low 128-bit lanes, then of the high.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g = 0; g < n; ++g, x += group, q += group) {
    // The maximum magnitude: exact in any order (a NaN is skipped, as std::max skips it).
    __m256 m = _mm256_setzero_ps();
    for (int64_t i = 0; i < group; i += 8) m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask), m);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    const float scale = amax > 0 ? amax / 127.0f : 1.0f;
    const __m256 inv = _mm256_set1_ps(1.0f / scale);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t i = 0; i < group; i += 32) {  // groups are multiples of 32
      __m256i qi[4];
      for (int u = 0; u < 4; ++u) {
        // round_even(x * inv) by the 1.5 * 2^23 trick, then the clamp, as the scalar code does.
        const __m256 v = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * u), inv), magic), magic);
        qi[u] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
        sum = _mm256_add_epi32(sum, qi[u]);
      }
      const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(b, order));
    }
    scales[g] = scale;
    sums[g] = sum8(sum);
  }
}

void a4_quantize_subgroups_avx2(const float* x, int64_t k, const int32_t* perm, int64_t subgroups, int64_t first8,
                                int8_t* q, float* scales, int32_t* sums) {
  const __m256 magic = _mm256_set1_ps(12582912.0f), zero = _mm256_setzero_ps();
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  // One 8-channel sub-group per vector: channels 8j .. 8j + 7 through perm, zero past k.
  for (int64_t j = 0; j < subgroups; ++j) {
    const int64_t c0 = 8 * j;
    __m256 v;
    if (c0 + 8 <= k) {
      v = perm ? _mm256_i32gather_ps(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(perm + c0)), 4)
               : _mm256_loadu_ps(x + c0);
    } else {  // the last, partial sub-group: masked loads read nothing past k
      const __m256i c = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(c0)), lane);
      const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(k)), c);
      const __m256i idx = perm ? _mm256_maskload_epi32(perm + c0, in) : c;
      v = _mm256_mask_i32gather_ps(zero, x, idx, _mm256_castsi256_ps(in), 4);
    }
    // hi = max(0, channels), lo = min(0, channels), as the scalar loop from 0 (a NaN skipped).
    __m256 h = _mm256_max_ps(v, zero), l = _mm256_min_ps(v, zero);
    __m128 h4 = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    __m128 l4 = _mm_min_ps(_mm256_castps256_ps128(l), _mm256_extractf128_ps(l, 1));
    h4 = _mm_max_ps(h4, _mm_movehl_ps(h4, h4)), l4 = _mm_min_ps(l4, _mm_movehl_ps(l4, l4));
    const float hi = _mm_cvtss_f32(_mm_max_ss(h4, _mm_movehdup_ps(h4)));
    const float lo = _mm_cvtss_f32(_mm_min_ss(l4, _mm_movehdup_ps(l4)));
    const bool eight = j >= first8;  // 8 bits: [-127, 127]; 4 bits: [-8, 7]
    const float qhi = eight ? 127.0f : 7.0f, qlo = eight ? -127.0f : -8.0f;
    const float scale = hi > 0 || lo < 0 ? std::max(hi / qhi, lo / qlo) : 1.0f;
    const __m256 inv = _mm256_set1_ps(1.0f / scale);
    const __m256 r = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(v, inv), magic), magic);
    const __m256i qi = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(r, _mm256_set1_ps(qhi)), _mm256_set1_ps(qlo)));
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + c0), _mm_packs_epi16(q16, q16));
    scales[j] = scale;
    sums[j] = sum8(qi);
  }
}

}  // namespace accelcore::cpu
