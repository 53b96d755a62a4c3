// Element-wise kernels for the avx512 path (see elementwise_impl.h; compiler flags set per file in
// CMake).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "backend/cpu/ops.h"

namespace accelcore::cpu {
namespace avx512_impl {
#include "backend/cpu/elementwise_impl.h"
}  // namespace avx512_impl

void rms_norm_avx512(const RmsNormParams& p) { avx512_impl::rms_norm_rows(p); }
void silu_mul_avx512(const float* gate_up, float* out, int64_t m, int64_t d, int64_t i0, int64_t i1) {
  avx512_impl::silu_mul_rows(gate_up, out, m, d, i0, i1 < 0 ? d : i1);
}

double softmax_exps_avx512(const SoftmaxExpParams& p) { return avx512_impl::softmax_exps_row(p); }

}  // namespace accelcore::cpu
