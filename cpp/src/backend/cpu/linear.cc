#include <algorithm>
#include <cmath>

#include "backend/cpu/cpu_features.h"
#include "backend/cpu/ops.h"
#include "quant/q4.h"
#include "util/check.h"

namespace accelcore::cpu {

void linear_pack(const float* w, int64_t n, int64_t k, float* packed) {
  std::fill(packed, packed + linear_packed_size(n, k), 0.0f);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < k; ++i) packed[((r / kLinearPanel) * k + i) * kLinearPanel + r % kLinearPanel] = w[r * k + i];
}

void linear_unpack(const float* packed, int64_t n, int64_t k, float* w) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < k; ++i) w[r * k + i] = packed[((r / kLinearPanel) * k + i) * kLinearPanel + r % kLinearPanel];
}

// The obviously right path, and the reference the SIMD paths are tested against: each output
// accumulated by fused multiply-adds over k in order, as they do (linear_impl.h).
void linear_scalar(const LinearParams& p, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < p.m; ++m) {
    const float* x = p.x + m * p.ldx;
    for (int64_t n = n0; n < n1; ++n) {
      const float* w = p.w + (n / kLinearPanel) * p.k * kLinearPanel + n % kLinearPanel;
      float acc = 0.0f;
      for (int64_t i = 0; i < p.k; ++i) acc = std::fma(x[i], w[i * kLinearPanel], acc);
      p.y[m * p.ldy + n] = p.bias ? acc + p.bias[n] : acc;
    }
  }
}

namespace {

void (*linear_kernel())(const LinearParams&, int64_t, int64_t) {
  switch (active_isa()) {
    case Isa::kAvx512: return linear_avx512;
    case Isa::kAvx2: return linear_avx2;
    case Isa::kScalar: break;
  }
  return linear_scalar;
}

}  // namespace

void linear(const LinearParams& p, ThreadPool& pool) {
  ACCEL_DCHECK(p.x && p.w && p.y && p.m >= 0 && p.n >= 0 && p.k >= 0);
  ACCEL_DCHECK(p.ldx >= p.k && p.ldy >= p.n);
  if (p.m == 0 || p.n == 0) return;
  void (*kernel)(const LinearParams&, int64_t, int64_t) = linear_kernel();
  // Split output columns; small products run on the calling thread, where waking workers would
  // cost more than the work.
  const int64_t work = p.m * p.n * p.k;
  if (work < (1 << 17) || pool.num_threads() == 1) {
    kernel(p, 0, p.n);
    return;
  }
  const int64_t grain = 4 * kLinearPanel;  // a multiple of every kernel's panel block
  pool.parallel_for(p.n, grain, [&](int64_t b, int64_t e) { kernel(p, b, e); });
}

void linear_columns(const LinearParams& p, int64_t n0, int64_t n1) {
  ACCEL_DCHECK(p.x && p.w && p.y && 0 <= n0 && n0 <= n1 && n1 <= p.n && p.ldx >= p.k && p.ldy >= p.n);
  if (p.m == 0 || n0 == n1) return;
  linear_kernel()(p, n0, n1);
}

namespace {

struct ScalarF16 {
  struct Vec {
    float v[16];
  };
  static Vec load(const float* p) {
    Vec r;
    for (int i = 0; i < 16; ++i) r.v[i] = p[i];
    return r;
  }
  static void store(float* p, const Vec& a) {
    for (int i = 0; i < 16; ++i) p[i] = a.v[i];
  }
  static Vec set1(float x) {
    Vec r;
    for (float& e : r.v) e = x;
    return r;
  }
  static Vec fma(const Vec& a, const Vec& b, const Vec& c) {
    Vec r;
    for (int i = 0; i < 16; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
    return r;
  }
  static Vec weights(const uint8_t* w64, int c, bool high, const Vec& z, const Vec& s) {
    Vec r;
    for (int i = 0; i < 16; ++i) {
      const uint8_t byte = w64[4 * i + c];
      r.v[i] = (static_cast<float>(high ? byte >> 4 : byte & 0x0F) - z.v[i]) * s.v[i];
    }
    return r;
  }
};

#include "backend/cpu/qlinear_w4a16_impl.h"

}  // namespace

void qlinear_w4a16_scalar(const QLinear16Params& p, int64_t n0, int64_t n1) { qlinear16_rows<ScalarF16>(p, n0, n1); }

void qlinear_w4a16(const QLinear16Params& p, ThreadPool& pool) {
  ACCEL_DCHECK(p.x && p.w && p.w_scales && p.w_zeros && p.y && p.ldx >= p.k && p.ldy >= p.n);
  if (p.m == 0 || p.n == 0) return;
  void (*kernel)(const QLinear16Params&, int64_t, int64_t) = qlinear_w4a16_scalar;
  switch (active_isa()) {
    case Isa::kAvx512: kernel = qlinear_w4a16_avx512; break;
    case Isa::kAvx2: kernel = qlinear_w4a16_avx2; break;
    case Isa::kScalar: break;
  }
  if (p.m * p.n * p.k < (1 << 17) || pool.num_threads() == 1) {
    kernel(p, 0, p.n);
    return;
  }
  pool.parallel_for(p.n, Q4Tiled::kRows, [&](int64_t b, int64_t e) { kernel(p, b, e); });
}

}  // namespace accelcore::cpu
