#include <cmath>

#include "backend/cpu/cpu_features.h"
#include "backend/cpu/ops.h"
#include "util/check.h"

namespace accelcore::cpu {
namespace {

// The obviously right path: each byte's two nibbles, one product at a time.
struct ScalarDot {
  static int32_t dot(const uint8_t* packed, const int8_t* x, int64_t len) {
    int32_t acc = 0;
    for (int64_t c = 0; c < len; c += 32, packed += 16, x += 32)
      for (int j = 0; j < 16; ++j) acc += (packed[j] & 0x0F) * x[j] + (packed[j] >> 4) * x[j + 16];
    return acc;
  }
};

#include "backend/cpu/qlinear_impl.h"

}  // namespace

void qlinear_w4a8_scalar(const QLinearParams& p, int64_t n0, int64_t n1) { qlinear_rows<ScalarDot>(p, n0, n1); }

void qlinear_w4a8(const QLinearParams& p, ThreadPool& pool) {
  ACCEL_DCHECK(p.xq && p.x_scales && p.x_sums && p.w && p.w_scales && p.w_zeros && p.y);
  ACCEL_DCHECK(p.group >= 32 && p.group % 32 == 0 && p.ldy >= p.n);
  if (p.m == 0 || p.n == 0) return;
  void (*kernel)(const QLinearParams&, int64_t, int64_t) = qlinear_w4a8_scalar;
  switch (active_dot_isa()) {
    case DotIsa::kAvx512Vnni: kernel = qlinear_w4a8_avx512vnni; break;
    case DotIsa::kAvxVnni: kernel = qlinear_w4a8_avxvnni; break;
    case DotIsa::kAvx2: kernel = qlinear_w4a8_avx2; break;
    case DotIsa::kScalar: break;
  }
  const int64_t work = p.m * p.n * p.groups * p.group;
  if (work < (1 << 18) || pool.num_threads() == 1) {
    kernel(p, 0, p.n);
    return;
  }
  pool.parallel_for(p.n, 16, [&](int64_t b, int64_t e) { kernel(p, b, e); });
}

}  // namespace accelcore::cpu
