// W4A8 kernel with AVX2 integer dot products (compiled with -mavx2 -mfma): u8 x s8 pairs summed
// to int16 (at most 2 * 15 * 127, no saturation), then to int32. A 16-row block is two 8-lane
// halves.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cpu/ops.h"
#include "quant/q4.h"

namespace accelcore::cpu {
namespace {

inline __m256i broadcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}

struct Avx2Dot {
  static constexpr int kBlocks = 1;  // 16-row blocks per pass
  struct Acc {
    __m256i h[2];
  };
  struct W {
    __m256i lo[2], hi[2];
  };
  static Acc zero() { return {{_mm256_setzero_si256(), _mm256_setzero_si256()}}; }
  static W unpack(const uint8_t* w64) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    W w;
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w64 + 32 * h));
      w.lo[h] = _mm256_and_si256(v, mask);
      w.hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
    return w;
  }
  static void dot(Acc& acc, const W& w, const int8_t* x) {
    const __m256i ones = _mm256_set1_epi16(1), xa = broadcast4(x), xb = broadcast4(x + 4);
    for (int h = 0; h < 2; ++h) {
      const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(w.lo[h], xa), _mm256_maddubs_epi16(w.hi[h], xb));
      acc.h[h] = _mm256_add_epi32(acc.h[h], _mm256_madd_epi16(s, ones));
    }
  }
  static void finish(const Acc& acc, const float* sw, const uint8_t* z, float sx, int32_t xsum, float* y) {
    const __m256 vsx = _mm256_set1_ps(sx);
    const __m256i vxsum = _mm256_set1_epi32(xsum);
    for (int h = 0; h < 2; ++h) {
      const __m256i z32 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z + 8 * h)));
      const __m256 t = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc.h[h], _mm256_mullo_epi32(z32, vxsum)));
      const __m256 c = _mm256_mul_ps(_mm256_loadu_ps(sw + 8 * h), vsx);
      _mm256_storeu_ps(y + 8 * h, _mm256_fmadd_ps(c, t, _mm256_loadu_ps(y + 8 * h)));
    }
  }
};

#include "backend/cpu/qlinear_impl.h"

}  // namespace

void qlinear_w4a8_avx2(const QLinearParams& p, int64_t n0, int64_t n1) { qlinear_rows<Avx2Dot>(p, n0, n1); }

}  // namespace accelcore::cpu
