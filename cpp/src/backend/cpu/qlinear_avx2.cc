// W4A8 kernel with AVX2 integer dot products (compiled with -mavx2 -mfma): u8 x s8 pairs summed
// to int16 (at most 2 * 2 * 15 * 127, no saturation), then to int32.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cpu/ops.h"
#include "quant/q4.h"

namespace accelcore::cpu {
namespace {

inline __m256i add_products(__m256i acc, __m256i w_lo, __m256i x_lo, __m256i w_hi, __m256i x_hi) {
  const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(w_lo, x_lo), _mm256_maddubs_epi16(w_hi, x_hi));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(s, _mm256_set1_epi16(1)));
}

#include "backend/cpu/qlinear_impl.h"
#include "backend/cpu/qlinear_256_impl.h"

}  // namespace

void qlinear_w4a8_avx2(const QLinearParams& p, int64_t n0, int64_t n1) { qlinear_rows<Dot256>(p, n0, n1); }

}  // namespace accelcore::cpu
