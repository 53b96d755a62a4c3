// W4A8 kernel with AVX-512 VNNI (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni
// -mfma): vpdpbusd on 512 bits, two 32-weight chunks at a time.
#include <immintrin.h>

#include <cmath>

#include "backend/cpu/ops.h"

namespace accelcore::cpu {
namespace {

struct Avx512VnniDot {
  static int32_t dot(const uint8_t* packed, const int8_t* x, int64_t len) {
    const __m512i mask = _mm512_set1_epi8(0x0F);
    __m512i acc = _mm512_setzero_si512();
    int64_t c = 0;
    for (; c + 64 <= len; c += 64, packed += 32, x += 64) {
      // 32 bytes = two chunks (a, b): nibbles [lo_a lo_b | hi_a hi_b] -> [lo_a hi_a lo_b hi_b].
      const __m512i p = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed)));
      const __m512i both = _mm512_inserti64x4(p, _mm512_castsi512_si256(_mm512_srli_epi16(p, 4)), 1);
      const __m512i w = _mm512_and_si512(_mm512_shuffle_i64x2(both, both, _MM_SHUFFLE(3, 1, 2, 0)), mask);
      acc = _mm512_dpbusd_epi32(acc, w, _mm512_loadu_si512(x));
    }
    int32_t total = _mm512_reduce_add_epi32(acc);
    if (c < len) {  // an odd last chunk
      const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed));
      const __m128i m4 = _mm_set1_epi8(0x0F);
      const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p, 4), m4), _mm_and_si128(p, m4));
      const __m256i a = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
      const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
      const __m128i t = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
      total += _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1))));
    }
    return total;
  }
};

#include "backend/cpu/qlinear_impl.h"

}  // namespace

void qlinear_w4a8_avx512vnni(const QLinearParams& p, int64_t n0, int64_t n1) {
  qlinear_rows<Avx512VnniDot>(p, n0, n1);
}

}  // namespace accelcore::cpu
