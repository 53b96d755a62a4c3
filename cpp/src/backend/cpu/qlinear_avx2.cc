// W4A8 kernel with AVX2 integer dot products (compiled with -mavx2 -mfma): u8 x s8 pairs summed
// to int16 (at most 2 * 15 * 127, no saturation), then to int32.
#include <immintrin.h>

#include <cmath>

#include "backend/cpu/ops.h"

namespace accelcore::cpu {
namespace {

inline __m256i unpack32(const uint8_t* packed) {
  const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p, 4), mask), _mm_and_si128(p, mask));
}

inline int32_t hsum(__m256i v) {
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i t = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1))));
}

struct Avx2Dot {
  static int32_t dot(const uint8_t* packed, const int8_t* x, int64_t len) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    for (int64_t c = 0; c < len; c += 32, packed += 16, x += 32) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(unpack32(packed), xv), ones));
    }
    return hsum(acc);
  }
};

#include "backend/cpu/qlinear_impl.h"

}  // namespace

void qlinear_w4a8_avx2(const QLinearParams& p, int64_t n0, int64_t n1) { qlinear_rows<Avx2Dot>(p, n0, n1); }

}  // namespace accelcore::cpu
