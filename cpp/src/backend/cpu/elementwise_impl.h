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

// A sampler's softmax numerators: out[i] = exp((x[i] - max) * inv_temperature) in double, 0 where
// x[i] < threshold; returns their sum, in four partial sums (i mod 4, each in order) added as
// (s0 + s1) + (s2 + s3). Three loops, each vectorised alone; under a top-k threshold, one loop
// that computes the exps of the few tokens above it only (the zeros add nothing to the sums, so
// the bits are the same).
inline double softmax_exps_row(const SoftmaxExpParams& p) {
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  if (p.threshold > -INFINITY) {
    for (int64_t i = 0; i < p.n; ++i) {
      const double x = static_cast<double>(p.x[i]);
      if (x < p.threshold) {
        p.out[i] = 0.0;
        continue;
      }
      p.out[i] = exp_f64_nonpositive((x - p.max) * p.inv_temperature);
      part[i & 3] += p.out[i];
    }
    return (part[0] + part[1]) + (part[2] + part[3]);
  }
  for (int64_t i = 0; i < p.n; ++i) {
    const double x = static_cast<double>(p.x[i]);
    p.out[i] = (x - p.max) * p.inv_temperature;
  }
  for (int64_t i = 0; i < p.n; ++i) p.out[i] = exp_f64_nonpositive(p.out[i]);
  int64_t i = 0;
  for (; i + 4 <= p.n; i += 4)
    for (int l = 0; l < 4; ++l) part[l] += p.out[i + l];
  for (int l = 0; i + l < p.n; ++l) part[l] += p.out[i + l];
  return (part[0] + part[1]) + (part[2] + part[3]);
}
