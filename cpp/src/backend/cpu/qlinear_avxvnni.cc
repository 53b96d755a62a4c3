// W4A8 kernel with AVX-VNNI (compiled with -mavxvnni -mavx2 -mfma): vpdpbusd on 256 bits.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cpu/ops.h"
#include "quant/q4.h"

namespace accelcore::cpu {
namespace {

inline __m256i add_products(__m256i acc, __m256i w_lo, __m256i x_lo, __m256i w_hi, __m256i x_hi) {
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc, w_lo, x_lo), w_hi, x_hi);
}

#include "backend/cpu/qlinear_impl.h"
#include "backend/cpu/qlinear_256_impl.h"

}  // namespace

void qlinear_w4a8_avxvnni(const QLinearParams& p, int64_t n0, int64_t n1) { qlinear_rows<Dot256>(p, n0, n1); }

}  // namespace accelcore::cpu
