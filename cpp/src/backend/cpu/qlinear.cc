#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cpu/cpu_features.h"
#include "backend/cpu/ops.h"
#include "quant/q4.h"
#include "util/check.h"

namespace accelcore::cpu {
namespace {

// The obviously right path: each byte's two nibbles, one product at a time.
struct ScalarDot {
  static constexpr int kBlocks = 1;  // 16-row blocks per pass
  static constexpr int kWideBlocks = 1, kWideRows = 4;  // no wider pass
  static constexpr int kAsmBlocks = 0, kAsmRows = 0, kSubAsmBlocks = 0, kSubAsmRows = 0;
  static constexpr bool kSubAsmFewerRows = false;
  static constexpr bool kW8Combined = false;
  struct Acc {
    int32_t v[16];
  };
  static Acc combine(const Acc& h, const Acc& l) {
    Acc a;
    for (int r = 0; r < 16; ++r) a.v[r] = 16 * h.v[r] + l.v[r];
    return a;
  }
  using W = const uint8_t*;
  static Acc zero() { return Acc{}; }
  static W unpack(const uint8_t* w64) { return w64; }
  static void dot(Acc& acc, W w, const int8_t* x) {
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 4; ++c) acc.v[r] += (w[4 * r + c] & 0x0F) * x[c] + (w[4 * r + c] >> 4) * x[4 + c];
  }
  static void finish(const Acc& acc, const float* sw, const uint8_t* z, float sx, int32_t xsum, float* y) {
    for (int r = 0; r < 16; ++r)
      y[r] = std::fma(sw[r] * sx, static_cast<float>(acc.v[r] - static_cast<int32_t>(z[r]) * xsum), y[r]);
  }
  static void accumulate(const Acc& acc, float sx, float* t) {
    for (int r = 0; r < 16; ++r) t[r] = std::fma(sx, static_cast<float>(acc.v[r]), t[r]);
  }
  static void finish_group(const float* t, const float* sw, const uint8_t* z, float zsum, float* y) {
    for (int r = 0; r < 16; ++r) y[r] = std::fma(sw[r], std::fma(-static_cast<float>(z[r]), zsum, t[r]), y[r]);
  }
};

#include "backend/cpu/qlinear_impl.h"

}  // namespace

void qlinear_w4a8_scalar(const QLinearParams& p, int64_t n0, int64_t n1) { qlinear_rows<ScalarDot>(p, n0, n1); }

void qlinear_w4a8(const QLinearParams& p, ThreadPool& pool) {
  ACCEL_DCHECK(p.xq && p.x_scales && p.x_sums && p.w && p.w_scales && p.w_zeros && p.y);
  ACCEL_DCHECK(p.group >= 32 && p.group % 32 == 0 && p.ldy >= p.n);
  ACCEL_DCHECK(p.act_group == 0 || (p.act_group % 8 == 0 && p.group % p.act_group == 0));
  ACCEL_DCHECK(p.act_group == 0 || p.act_group == p.group || p.x_zsums);
  ACCEL_DCHECK(p.w8_lo_block == 0 || ((p.act_group == 0 || p.act_group == p.group) &&
                                      p.w8_lo_block >= (p.n + Q4Tiled::kRows - 1) / Q4Tiled::kRows));
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
  pool.parallel_for(p.n, Q4Tiled::kRows, [&](int64_t b, int64_t e) { kernel(p, b, e); });
}

}  // namespace accelcore::cpu
