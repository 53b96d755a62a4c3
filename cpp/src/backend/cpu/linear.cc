#include "backend/cpu/cpu_features.h"
#include "backend/cpu/ops.h"
#include "util/check.h"

namespace accelcore::cpu {

// The obviously right path, and the reference the SIMD paths are tested against (to rounding).
void linear_scalar(const LinearParams& p, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < p.m; ++m) {
    const float* x = p.x + m * p.ldx;
    for (int64_t n = n0; n < n1; ++n) {
      const float* w = p.w + n * p.k;
      float acc = 0.0f;
      for (int64_t i = 0; i < p.k; ++i) acc += x[i] * w[i];
      p.y[m * p.ldy + n] = acc + (p.bias ? p.bias[n] : 0.0f);
    }
  }
}

void linear(const LinearParams& p, ThreadPool& pool) {
  ACCEL_DCHECK(p.x && p.w && p.y && p.m >= 0 && p.n >= 0 && p.k >= 0);
  ACCEL_DCHECK(p.ldx >= p.k && p.ldy >= p.n);
  if (p.m == 0 || p.n == 0) return;
  void (*kernel)(const LinearParams&, int64_t, int64_t) = linear_scalar;
  switch (active_isa()) {
    case Isa::kAvx512: kernel = linear_avx512; break;
    case Isa::kAvx2: kernel = linear_avx2; break;
    case Isa::kScalar: break;
  }
  // Split output columns; small products run on the calling thread, where waking workers would
  // cost more than the work.
  const int64_t work = p.m * p.n * p.k;
  if (work < (1 << 17) || pool.num_threads() == 1) {
    kernel(p, 0, p.n);
    return;
  }
  const int64_t grain = 24;  // a multiple of every kernel's column block (4 and 6)
  pool.parallel_for(p.n, grain, [&](int64_t b, int64_t e) { kernel(p, b, e); });
}

}  // namespace accelcore::cpu
