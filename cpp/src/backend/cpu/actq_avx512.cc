// Activation quantization to int8 per group (quant/q4.h, a8_quantize_rows) with AVX-512
// (compiled with -mavx512f -mavx512bw -ffp-contract=off): the scalar code's float operations lane
// by lane, so the same bits. -ffp-contract=off keeps x * inv + C an unfused multiply and add.
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

}  // namespace accelcore::cpu
