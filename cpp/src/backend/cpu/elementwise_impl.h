// Element-wise kernels whose bits must not depend on the instruction set, compiled once per ISA:
// elementwise.cc (scalar), elementwise_{avx2,avx512}.cc include this inside their own namespace
// with their flags (-ffp-contract=off), and the compiler vectorises the loops.
//
// Not a standalone header: the including file defines the namespace.

#include "backend/cpu/exp_impl.h"

// The sum of squares in double, in 8 partial sums (channel mod 8, each in channel order) added in
// a fixed tree: what a vector of 8 doubles does, so every path vectorises it the same way.
inline void rms_norm_rows(const RmsNormParams& p) {
  for (int64_t m = 0; m < p.m; ++m) {
    const float* x = p.x + m * p.d;
    float* o = p.out + m * p.d;
    double part[8] = {};
    int64_t i = 0;
    for (; i + 8 <= p.d; i += 8)
      for (int l = 0; l < 8; ++l) part[l] += static_cast<double>(x[i + l]) * x[i + l];
    for (int l = 0; i + l < p.d; ++l) part[l] += static_cast<double>(x[i + l]) * x[i + l];
    const double ss = ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7]));
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(p.d) + p.eps));
    for (int64_t j = 0; j < p.d; ++j) o[j] = p.weight[j] * (x[j] * inv);
  }
}

// out[r, i] = silu(gate[r, i]) * up[r, i] for i in [i0, i1), gate_up rows [gate | up].
// The exps first, then the quotients, in chunks: in one loop GCC threads exp's clamps into
// per-case copies of the quotient and evaluates them on every lane before blending, and the
// copy for the upper clamp, g / (1 + exp(88)), makes a subnormal of any |g| < 2: a microcode
// assist per vector (AVX2 on Zen 4: 3.4 ns an element against 1.0 split like this). The bits
// are the same either way.
inline void silu_mul_rows(const float* gate_up, float* out, int64_t m, int64_t d, int64_t i0, int64_t i1) {
  constexpr int64_t kChunk = 64;
  float e[kChunk];
  for (int64_t r = 0; r < m; ++r) {
    const float* g = gate_up + r * 2 * d;
    const float* u = g + d;
    float* o = out + r * d;
    for (int64_t a = i0; a < i1; a += kChunk) {
      const int64_t n = std::min(kChunk, i1 - a);
      for (int64_t i = 0; i < n; ++i) e[i] = exp_approx(-g[a + i]);
      for (int64_t i = 0; i < n; ++i) o[a + i] = g[a + i] / (1.0f + e[i]) * u[a + i];
    }
  }
}
