// The 4-bit weight / 8-bit activation formats and the W4A8 linear kernels:
//  - packing round-trips, and quantize/dequantize stay within half a step (a clipped value within
//    its clip) for group sizes that do and do not divide k;
//  - every kernel path the machine has is bit-exact against a naive reference that unpacks the
//    nibbles and sums in int64, for odd shapes and several group sizes, with poisoned outputs;
//  - a row's result does not depend on the rest of the batch.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <iostream>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <accelcore/errors.h>

#include "backend/cpu/cpu_features.h"
#include "backend/cpu/ops.h"
#include "quant/q4.h"
#include "util/thread_pool.h"

namespace accelcore::cpu {
namespace {

std::vector<float> random_floats(std::mt19937& rng, size_t n, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

TEST(Q4Format, PackUnpackRoundTrip) {
  std::mt19937 rng(1);
  for (int64_t group : {32, 64, 128}) {
    Q4Weight w;
    w.n = 5;
    w.k = 3 * group - 7;
    w.group = group;
    std::vector<uint8_t> q(w.n * w.padded_k());
    for (auto& x : q) x = static_cast<uint8_t>(rng() % 16);
    q4_pack(q.data(), &w);
    ASSERT_EQ(w.packed.size(), static_cast<size_t>(w.n * w.padded_k() / 2));
    for (int64_t r = 0; r < w.n; ++r)
      for (int64_t i = 0; i < w.padded_k(); ++i) ASSERT_EQ(q4_at(w, r, i), q[r * w.padded_k() + i]) << r << " " << i;
  }
}

TEST(Q4Format, TiledLayoutHoldsEveryWeightAndPadsWithZeros) {
  std::mt19937 rng(7);
  for (int64_t group : {32, 64})
    for (int64_t n : {1, 16, 17, 40}) {
      const int64_t k = 2 * group + 5;
      const auto wf = random_floats(rng, n * k);
      const Q4Weight w = q4_quantize_rtn(wf.data(), n, k, group, false);
      const Q4Tiled t = q4_tile(w);
      ASSERT_EQ(t.groups, w.groups());
      ASSERT_EQ(t.data.size(), static_cast<size_t>(t.blocks() * t.groups * group / 8 * 64));
      for (int64_t r = 0; r < t.blocks() * Q4Tiled::kRows; ++r)
        for (int64_t i = 0; i < w.padded_k(); ++i) {
          const uint8_t want = r < n ? q4_at(w, r, i) : 0;
          ASSERT_EQ(q4_tiled_at(t, r, i), want) << "row " << r << " channel " << i;
        }
      for (int64_t b = 0; b < t.blocks(); ++b)
        for (int64_t g = 0; g < t.groups; ++g)
          for (int64_t r = 0; r < Q4Tiled::kRows; ++r) {
            const int64_t row = b * Q4Tiled::kRows + r;
            ASSERT_EQ(t.scales[(b * t.groups + g) * 16 + r], row < n ? w.scales[row * t.groups + g] : 0.0f);
            ASSERT_EQ(t.zeros[(b * t.groups + g) * 16 + r], row < n ? w.zeros[row * t.groups + g] : 0);
          }
    }
}

TEST(Q4Format, QuantizeDequantizeWithinHalfAStep) {
  std::mt19937 rng(2);
  for (int64_t group : {32, 64, 128}) {
    for (int64_t k : {int64_t{1}, int64_t{17}, group, group + 5, 3 * group}) {
      const int64_t n = 7;
      auto w = random_floats(rng, n * k);
      w[0] = 4.0f;  // an outlier in one group
      for (bool clip : {false, true}) {
        const Q4Weight q = q4_quantize_rtn(w.data(), n, k, group, clip);
        ASSERT_EQ(q.groups(), (k + group - 1) / group);
        const std::vector<float> back = q4_dequantize(q);
        for (int64_t r = 0; r < n; ++r)
          for (int64_t i = 0; i < k; ++i) {
            const int64_t g = i / group;
            const float s = q.scales[r * q.groups() + g];
            ASSERT_LE(q.zeros[r * q.groups() + g], 15);
            const float x = w[r * k + i], y = back[r * k + i];
            // Without clipping, within half a step (the zero point's rounding shifts the range by
            // at most that); with it, within half a step of the value clipped to the range.
            const float lo = s * (0.0f - q.zeros[r * q.groups() + g]), hi = s * (15.0f - q.zeros[r * q.groups() + g]);
            const float target = clip ? std::min(std::max(x, lo), hi) : x;
            ASSERT_LE(std::fabs(y - target), 0.5f * s * (1 + 1e-5f)) << "group " << group << " k " << k << " clip " << clip;
          }
      }
    }
  }
  // The clip search never does worse than plain round-to-nearest.
  auto w = random_floats(rng, 64 * 256);
  for (int i = 0; i < 64; ++i) w[i * 256 + i] = 6.0f;
  double err[2] = {0, 0};
  for (bool clip : {false, true}) {
    const auto back = q4_dequantize(q4_quantize_rtn(w.data(), 64, 256, 128, clip));
    for (size_t i = 0; i < w.size(); ++i) err[clip] += (back[i] - w[i]) * (back[i] - w[i]);
  }
  EXPECT_LE(err[1], err[0]);
}

// ||X (W - W_q)^T||^2 over the rows of X: the error GPTQ minimises.
double output_error(const std::vector<float>& x, int64_t tokens, const std::vector<float>& w,
                    const std::vector<float>& wq, int64_t n, int64_t k) {
  double e = 0;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t r = 0; r < n; ++r) {
      double d = 0;
      for (int64_t i = 0; i < k; ++i) d += double(x[t * k + i]) * (double(w[r * k + i]) - wq[r * k + i]);
      e += d * d;
    }
  return e;
}

TEST(Q4Gptq, LowersTheOutputErrorOnCorrelatedInputs) {
  std::mt19937 rng(8);
  const int64_t tokens = 400, k = 96, n = 24, group = 32;
  // Inputs with correlated channels and a few large ones, as a model's activations have.
  const auto z = random_floats(rng, tokens * k);
  std::vector<float> x(tokens * k, 0.0f);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < k; ++i) {
      x[t * k + i] = z[t * k + i] + 0.8f * z[t * k + (i + 1) % k] + (i % 17 == 0 ? 4.0f * z[t * k + (i + 5) % k] : 0.0f);
    }
  std::vector<double> h(k * k, 0.0);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) h[i * k + j] += double(x[t * k + i]) * x[t * k + j];
  const auto w = random_floats(rng, n * k, 0.1f);
  const double rtn = output_error(x, tokens, w, q4_dequantize(q4_quantize_rtn(w.data(), n, k, group, false)), n, k);
  const double rtn_clip = output_error(x, tokens, w, q4_dequantize(q4_quantize_rtn(w.data(), n, k, group, true)), n, k);
  const Q4Weight g = q4_quantize_gptq(w.data(), n, k, group, h.data());
  const double gptq = output_error(x, tokens, w, q4_dequantize(g), n, k);
  std::cout << "[ INFO     ] output error: round to nearest " << rtn << ", with clip search " << rtn_clip << ", GPTQ " << gptq
            << "\n";
  EXPECT_LT(gptq, 0.8 * std::min(rtn, rtn_clip));
  for (uint8_t zp : g.zeros) ASSERT_LE(zp, 15);
}

TEST(Q4Gptq, WithUncorrelatedInputsItIsRoundToNearest) {
  // H a multiple of the identity: nothing to compensate, so GPTQ rounds as RTN does (with the
  // same clip search for the groups' parameters).
  std::mt19937 rng(9);
  const int64_t k = 70, n = 5, group = 32;
  std::vector<double> h(k * k, 0.0);
  for (int64_t i = 0; i < k; ++i) h[i * k + i] = 3.0;
  const auto w = random_floats(rng, n * k);
  const Q4Weight a = q4_quantize_gptq(w.data(), n, k, group, h.data()), b = q4_quantize_rtn(w.data(), n, k, group, true);
  EXPECT_EQ(a.packed, b.packed);
  EXPECT_EQ(a.scales, b.scales);
  EXPECT_EQ(a.zeros, b.zeros);
}

TEST(Q4Gptq, DeadChannelsAndBadArguments) {
  const int64_t k = 32, n = 2;
  std::vector<double> h(k * k, 0.0);
  for (int64_t i = 1; i < k; ++i) h[i * k + i] = 1.0;  // channel 0 never used
  std::vector<float> w(n * k, 0.5f);
  w[0] = 100.0f;  // would dominate the group's range if it counted
  const Q4Weight q = q4_quantize_gptq(w.data(), n, k, 32, h.data());
  EXPECT_LT(q.scales[0], 1.0f);
  EXPECT_THROW(q4_quantize_gptq(w.data(), n, k, 32, h.data(), 0.0), InvalidArgument);
  EXPECT_THROW(q4_quantize_gptq(w.data(), n, k, 48, h.data()), InvalidArgument);
}

TEST(Q4Format, BadGroupSizesAreRefused) {
  const std::vector<float> w(64, 1.0f);
  EXPECT_THROW(q4_quantize_rtn(w.data(), 1, 64, 48, false), InvalidArgument);
  EXPECT_THROW(q4_quantize_rtn(w.data(), 1, 64, 0, false), InvalidArgument);
  A8Activations a;
  EXPECT_THROW(a8_quantize(w.data(), 1, 64, 64, 16, &a), InvalidArgument);
}

TEST(A8Format, QuantizesPerTokenAndGroup) {
  std::mt19937 rng(3);
  const int64_t m = 3, k = 100, group = 32;
  auto x = random_floats(rng, m * k);
  x[5] = 30.0f;  // one large value: only its own group's scale grows
  A8Activations a;
  a8_quantize(x.data(), m, k, k, group, &a);
  ASSERT_EQ(a.groups(), 4);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < a.groups(); ++g) {
      int32_t sum = 0;
      float amax = 0;
      for (int64_t i = g * group; i < std::min(k, (g + 1) * group); ++i) amax = std::max(amax, std::fabs(x[r * k + i]));
      EXPECT_FLOAT_EQ(a.scales[r * 4 + g], amax / 127.0f);
      for (int64_t i = g * group; i < (g + 1) * group; ++i) {
        const int8_t q = a.q[r * a.padded_k() + i];
        sum += q;
        if (i >= k) {
          ASSERT_EQ(q, 0);  // padding
        } else {
          ASSERT_LE(std::fabs(q * a.scales[r * 4 + g] - x[r * k + i]), 0.5f * a.scales[r * 4 + g] * (1 + 1e-5f));
        }
      }
      EXPECT_EQ(a.sums[r * 4 + g], sum);
    }
  EXPECT_GT(a.scales[0], 10 * a.scales[1]);
}

// The AVX-512 path quantizes whole groups in vectors; it must give the scalar path's bits, ties
// (x * inv exactly half-way: round to even), clamping, zero groups and the partial last group
// included.
TEST(A8Format, EveryPathGivesTheSameBits) {
  const Isa saved = active_isa();
  std::mt19937 rng(11);
  for (int64_t group : {32, 64, 128})
    for (int64_t k : {group, 3 * group, 5 * group + 17, int64_t{2048}}) {
      const int64_t m = 5;
      auto x = random_floats(rng, m * k);
      for (int64_t i = 0; i < k; ++i) x[2 * k + i] = 0.0f;  // a zero row: scale 1
      // Row 3: multiples of amax / 254, so x * inv lands on .5 (ties) and on integers.
      for (int64_t i = 0; i < k; ++i) x[3 * k + i] = static_cast<float>(static_cast<int>(i % 255) - 127) * 0.5f;
      x[4 * k + 1] = 1e30f;  // one huge value: the rest of its group rounds to 0
      A8Activations want;
      set_active_isa(Isa::kScalar);
      a8_quantize(x.data(), m, k, k, group, &want);
      for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
        if (isa > detected_isa()) continue;
        A8Activations got;
        set_active_isa(isa);
        a8_quantize(x.data(), m, k, k, group, &got);
        const std::string where = std::string(isa_name(isa)) + ", group " + std::to_string(group) + ", k " +
                                  std::to_string(k);
        EXPECT_EQ(got.q, want.q) << where;
        EXPECT_EQ(0, std::memcmp(got.scales.data(), want.scales.data(), want.scales.size() * sizeof(float))) << where;
        EXPECT_EQ(got.sums, want.sums) << where;
      }
    }
  set_active_isa(saved);
}

// Likewise for FMPQ's sub-groups: the AVX-512 path gathers two through the permutation per vector.
TEST(A4Format, EveryPathGivesTheSameBits) {
  const Isa saved = active_isa();
  std::mt19937 rng(12);
  int cases = 0;
  for (int64_t group : {32, 128})
    for (int64_t k : {int64_t{5}, group, 3 * group + 9})
      for (int with_perm = 0; with_perm < 2; ++with_perm) {
        const int64_t m = 4, subs = (k + kA4SubGroup - 1) / kA4SubGroup;
        auto x = random_floats(rng, m * k);
        for (int64_t i = 0; i < k; ++i) x[1 * k + i] = 0.0f;                                         // a zero row
        for (int64_t i = 0; i < k; ++i) x[2 * k + i] = static_cast<float>(static_cast<int>(i % 17) - 8);  // ties
        x[3 * k] = -1e30f;                                                                            // a huge value
        std::vector<int32_t> perm(k);
        std::iota(perm.begin(), perm.end(), 0);
        std::shuffle(perm.begin(), perm.end(), rng);
        for (int64_t a8 : {int64_t{0}, subs / 2, subs}) {
          A8Activations want;
          set_active_isa(Isa::kScalar);
          a4_quantize(x.data(), m, k, k, group, with_perm ? perm.data() : nullptr, a8, &want);
          for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
            if (isa > detected_isa()) continue;
            A8Activations got;
            set_active_isa(isa);
            a4_quantize(x.data(), m, k, k, group, with_perm ? perm.data() : nullptr, a8, &got);
            const std::string where = std::string(isa_name(isa)) + ", group " + std::to_string(group) + ", k " +
                                      std::to_string(k) + ", perm " + std::to_string(with_perm) + ", a8 " +
                                      std::to_string(a8);
            EXPECT_EQ(got.q, want.q) << where;
            EXPECT_EQ(0, std::memcmp(got.scales.data(), want.scales.data(), want.scales.size() * sizeof(float))) << where;
            EXPECT_EQ(got.sums, want.sums) << where;
            EXPECT_EQ(0, std::memcmp(got.zsums.data(), want.zsums.data(), want.zsums.size() * sizeof(float))) << where;
            ++cases;
          }
        }
      }
  set_active_isa(saved);
  EXPECT_GT(cases, 0);
}

// ---- the kernels against a naive reference ----

struct DotPath {
  DotIsa isa;
  void (*kernel)(const QLinearParams&, int64_t, int64_t);
};

std::vector<DotPath> supported_paths() {
  std::vector<DotPath> out;
  const DotPath all[] = {{DotIsa::kScalar, qlinear_w4a8_scalar},
                         {DotIsa::kAvx2, qlinear_w4a8_avx2},
                         {DotIsa::kAvxVnni, qlinear_w4a8_avxvnni},
                         {DotIsa::kAvx512Vnni, qlinear_w4a8_avx512vnni}};
  for (const DotPath& p : all)
    if (dot_isa_supported(p.isa)) out.push_back(p);
  return out;
}

// Unpacks every nibble with q4_at and sums products in int64 per activation group (the weight
// group, or FMPQ's sub-groups of it); the float steps as documented in quant/q4.h.
std::vector<float> reference(const Q4Weight& w, const A8Activations& a, const std::vector<float>& bias) {
  const int64_t G = w.groups(), ag = a.act_group, AG = a.act_groups(), subs = w.group / ag;
  std::vector<float> y(a.m * w.n);
  for (int64_t m = 0; m < a.m; ++m)
    for (int64_t n = 0; n < w.n; ++n) {
      float acc = bias.empty() ? 0.0f : bias[n];
      for (int64_t g = 0; g < G; ++g) {
        float t = 0.0f, zsum = 0.0f;
        for (int64_t s = g * subs; s < (g + 1) * subs; ++s) {
          int64_t dot = 0, xsum = 0;
          for (int64_t i = s * ag; i < (s + 1) * ag; ++i) {
            const int64_t q = a.q[m * a.padded_k() + i];
            dot += static_cast<int64_t>(q4_at(w, n, i)) * q;
            xsum += q;
          }
          EXPECT_EQ(xsum, a.sums[m * AG + s]);
          if (subs == 1) {
            const int64_t d = dot - static_cast<int64_t>(w.zeros[n * G + g]) * xsum;
            acc = std::fma(w.scales[n * G + g] * a.scales[m * AG + s], static_cast<float>(d), acc);
          } else {
            t = std::fma(a.scales[m * AG + s], static_cast<float>(dot), t);
            zsum = std::fma(a.scales[m * AG + s], static_cast<float>(xsum), zsum);
          }
        }
        if (subs > 1) {
          EXPECT_EQ(zsum, a.zsums[m * G + g]);
          acc = std::fma(w.scales[n * G + g], std::fma(-static_cast<float>(w.zeros[n * G + g]), zsum, t), acc);
        }
      }
      y[m * w.n + n] = acc;
    }
  return y;
}

QLinearParams params(const Q4Tiled& w, const A8Activations& a, const std::vector<float>& bias, float* y) {
  QLinearParams p;
  p.xq = a.q.data();
  p.x_scales = a.scales.data();
  p.x_sums = a.sums.data();
  p.x_zsums = a.zsums.empty() ? nullptr : a.zsums.data();
  p.w = w.data.data();
  p.w_scales = w.scales.data();
  p.w_zeros = w.zeros.data();
  p.bias = bias.empty() ? nullptr : bias.data();
  p.y = y;
  p.m = a.m;
  p.n = w.n;
  p.groups = w.groups;
  p.group = w.group;
  p.act_group = a.act_group;
  p.ldy = w.n;
  return p;
}

TEST(QLinearW4A8, EveryPathIsBitExactAgainstTheReference) {
  std::string names;
  for (const DotPath& p : supported_paths()) names += std::string(dot_isa_name(p.isa)) + " ";
  std::cout << "[ INFO     ] W4A8 paths tested: " << names << "(active: " << dot_isa_name(active_dot_isa()) << ")\n";
  std::mt19937 rng(4);
  int cases = 0;
  for (int64_t group : {32, 64, 128, 256})
    for (int64_t m : {1, 3, 16, 17, 25})
      for (int64_t n : {1, 7, 33, 48})
        for (int64_t k : {int64_t{5}, group - 1, group, 3 * group + 9}) {
          const auto wf = random_floats(rng, n * k, 0.1f);
          auto xf = random_floats(rng, m * k);
          if (k > 3) xf[2] = 50.0f;  // saturating magnitudes in the first group
          const Q4Weight w = q4_quantize_rtn(wf.data(), n, k, group, rng() % 2);
          A8Activations a;
          a8_quantize(xf.data(), m, k, k, group, &a);
          const std::vector<float> bias = rng() % 2 ? random_floats(rng, n) : std::vector<float>();
          const std::vector<float> want = reference(w, a, bias);
          const Q4Tiled tiled = q4_tile(w);
          for (const DotPath& path : supported_paths()) {
            std::vector<float> y(m * n, std::numeric_limits<float>::quiet_NaN());  // poison
            // Split the columns in two calls at a block boundary, as the thread pool does.
            const QLinearParams p = params(tiled, a, bias, y.data());
            const int64_t split = n / 2 / Q4Tiled::kRows * Q4Tiled::kRows;
            path.kernel(p, 0, split);
            path.kernel(p, split, n);
            ASSERT_EQ(0, std::memcmp(y.data(), want.data(), y.size() * sizeof(float)))
                << dot_isa_name(path.isa) << " group " << group << " m " << m << " n " << n << " k " << k;
            ++cases;
          }
        }
  EXPECT_GT(cases, 100);
}

TEST(A4Format, FmpqSubGroupsPermutationAndEightBitTail) {
  std::mt19937 rng(7);
  const int64_t m = 2, k = 100, group = 32, a8 = 3;  // 13 sub-groups of 8, the last 3 in 8 bits
  auto x = random_floats(rng, m * k);
  x[17] = 9.0f;  // an outlier channel
  std::vector<int32_t> perm(k);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  A8Activations a;
  a4_quantize(x.data(), m, k, k, group, perm.data(), a8, &a);
  ASSERT_EQ(a.act_group, kA4SubGroup);
  ASSERT_EQ(a.act_groups(), 4 * group / kA4SubGroup);
  const int64_t subs = (k + kA4SubGroup - 1) / kA4SubGroup;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t s = 0; s < a.act_groups(); ++s) {
      const bool eight = s >= subs - a8 && s < subs;
      const float scale = a.scales[r * a.act_groups() + s];
      int32_t sum = 0;
      int lo = 0, hi = 0;
      for (int64_t i = s * kA4SubGroup; i < (s + 1) * kA4SubGroup; ++i) {
        const int q = a.q[r * a.padded_k() + i];
        sum += q;
        lo = std::min(lo, q), hi = std::max(hi, q);
        if (i >= k) {
          ASSERT_EQ(q, 0);
        } else {
          ASSERT_LE(std::fabs(q * scale - x[r * k + perm[i]]), 0.5f * scale * (1 + 1e-5f)) << "sub-group " << s;
        }
      }
      EXPECT_EQ(a.sums[r * a.act_groups() + s], sum);
      if (eight) {
        EXPECT_TRUE(lo == -127 || hi == 127) << "sub-group " << s;  // the full 8-bit range is used
      } else {
        EXPECT_GE(lo, -8);
        EXPECT_LE(hi, 7);
        if (s < subs) {
          EXPECT_TRUE(lo == -8 || hi == 7) << "sub-group " << s;
        }
      }
    }
}

TEST(QLinearW4A4, EveryPathIsBitExactAgainstTheReference) {
  std::mt19937 rng(8);
  int cases = 0;
  for (int64_t group : {32, 128})
    for (int64_t m : {1, 5, 16, 21})
      for (int64_t n : {7, 48})
        for (int64_t k : {int64_t{5}, group + 9, 3 * group}) {
          const auto wf = random_floats(rng, n * k, 0.1f);
          auto xf = random_floats(rng, m * k);
          std::vector<int32_t> perm(k);
          std::iota(perm.begin(), perm.end(), 0);
          std::shuffle(perm.begin(), perm.end(), rng);
          const int64_t subs = (k + kA4SubGroup - 1) / kA4SubGroup;
          const Q4Weight w = q4_quantize_rtn(wf.data(), n, k, group, rng() % 2);
          A8Activations a;
          a4_quantize(xf.data(), m, k, k, group, perm.data(), rng() % (subs + 1), &a);
          const std::vector<float> bias = rng() % 2 ? random_floats(rng, n) : std::vector<float>();
          const std::vector<float> want = reference(w, a, bias);
          const Q4Tiled tiled = q4_tile(w);
          for (const DotPath& path : supported_paths()) {
            std::vector<float> y(m * n, std::numeric_limits<float>::quiet_NaN());
            path.kernel(params(tiled, a, bias, y.data()), 0, n);
            ASSERT_EQ(0, std::memcmp(y.data(), want.data(), y.size() * sizeof(float)))
                << dot_isa_name(path.isa) << " group " << group << " m " << m << " n " << n << " k " << k;
            ++cases;
          }
        }
  EXPECT_GT(cases, 30);
}

TEST(Q8Rows, SplitIntoTwo4BitHalvesRunsOnTheW4A8Kernels) {
  std::mt19937 rng(12);
  const int64_t n = 37, k = 150, m = 3;
  const auto wf = random_floats(rng, n * k);
  const Q8Rows r = q8_quantize_rows(wf.data(), n, k);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < k; ++j)
      ASSERT_LE(std::fabs(r.scales[i] * r.q[i * k + j] - wf[i * k + j]), 0.5f * r.scales[i] * (1 + 1e-5f));
  const Q4Weight w = q8_split_q4(r, 64);
  const int64_t lo = q8_split_lo(n);
  ASSERT_EQ(lo, 48);  // the low half starts at a whole 16-row block
  ASSERT_EQ(w.n, 2 * lo);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < k; ++j)
      ASSERT_EQ(16 * q4_at(w, i, j) + q4_at(w, lo + i, j) - 128, r.q[i * k + j]) << i << " " << j;
  // Through every kernel path: output i plus output n + i is the 8-bit row's product, to float
  // rounding of the two halves (each exact in integers).
  const auto xf = random_floats(rng, m * k);
  A8Activations a;
  a8_quantize(xf.data(), m, k, k, 64, &a);
  const std::vector<float> want = reference(w, a, {});
  for (const DotPath& path : supported_paths()) {
    std::vector<float> y(m * 2 * lo);
    path.kernel(params(q4_tile(w), a, {}, y.data()), 0, 2 * lo);
    ASSERT_EQ(0, std::memcmp(y.data(), want.data(), y.size() * sizeof(float))) << dot_isa_name(path.isa);
    for (int64_t t = 0; t < m; ++t)
      for (int64_t i = 0; i < n; ++i) {
        double exact = 0;
        for (int64_t g = 0; g < a.groups(); ++g) {
          int64_t dot = 0;
          for (int64_t j = g * 64; j < std::min(k, (g + 1) * 64); ++j) dot += int64_t{r.q[i * k + j]} * a.q[t * a.padded_k() + j];
          exact += double(r.scales[i]) * a.scales[t * a.groups() + g] * dot;
        }
        const double got = double(y[t * 2 * lo + i]) + y[t * 2 * lo + lo + i];
        EXPECT_NEAR(got, exact, 1e-4 * (std::fabs(exact) + 1)) << "row " << i;
      }
  }
}

// W8A8 on the split halves (QLinearParams::w8_lo_block): per weight group, one exact integer
// product of the 8-bit rows, y = fma(s * sx, float(sum of q x), y), the groups in order.
std::vector<float> reference_w8(const Q8Rows& r, const A8Activations& a) {
  std::vector<float> y(a.m * r.n);
  for (int64_t m = 0; m < a.m; ++m)
    for (int64_t i = 0; i < r.n; ++i) {
      float acc = 0.0f;
      for (int64_t g = 0; g < a.groups(); ++g) {
        int64_t dot = 0;
        for (int64_t j = g * a.group; j < std::min(r.k, (g + 1) * a.group); ++j)
          dot += int64_t{r.q[i * r.k + j]} * a.q[m * a.padded_k() + j];
        acc = std::fma(r.scales[i] * a.scales[m * a.groups() + g], static_cast<float>(dot), acc);
      }
      y[m * r.n + i] = acc;
    }
  return y;
}

TEST(QLinearW8A8, EveryPathIsBitExactAgainstTheReferenceAndRowsDoNotDependOnTheBatch) {
  std::mt19937 rng(13);
  ThreadPool pool(3);
  const DotIsa saved = active_dot_isa();
  int cases = 0;
  for (int64_t group : {32, 64, 128})
    for (int64_t m : {1, 3, 8, 16, 21})
      for (int64_t n : {1, 7, 33, 48})
        for (int64_t k : {int64_t{5}, group - 1, group, 3 * group + 9}) {
          auto wf = random_floats(rng, n * k);
          wf[0] = 1.0f, wf[1] = -1.0f;  // q = 127 and -127 (u = 255 and 1) in row 0
          const Q8Rows r = q8_quantize_rows(wf.data(), n, k);
          const Q4Tiled w = q4_tile(q8_split_q4(r, group));
          auto xf = random_floats(rng, m * k);
          xf[0] = 50.0f;  // saturating magnitudes in the first group
          A8Activations a;
          a8_quantize(xf.data(), m, k, k, group, &a);
          const std::vector<float> want = reference_w8(r, a);
          for (const DotPath& path : supported_paths()) {
            std::vector<float> y(m * n, std::numeric_limits<float>::quiet_NaN());
            QLinearParams p = params(w, a, {}, y.data());
            p.n = n;
            p.ldy = n;
            p.w8_lo_block = q8_split_lo(n) / Q4Tiled::kRows;
            const int64_t split = n / 2 / Q4Tiled::kRows * Q4Tiled::kRows;
            path.kernel(p, 0, split);
            path.kernel(p, split, n);
            ASSERT_EQ(0, std::memcmp(y.data(), want.data(), y.size() * sizeof(float)))
                << dot_isa_name(path.isa) << " group " << group << " m " << m << " n " << n << " k " << k;
            // Through the dispatch and the pool, one row at a time: the same bits.
            set_active_dot_isa(path.isa);
            for (int64_t t = 0; t < m; t += std::max<int64_t>(1, m / 3)) {
              A8Activations one;
              a8_quantize(xf.data() + t * k, 1, k, k, group, &one);
              std::vector<float> y1(n);
              QLinearParams p1 = params(w, one, {}, y1.data());
              p1.n = p1.ldy = n;
              p1.w8_lo_block = p.w8_lo_block;
              qlinear_w4a8(p1, pool);
              ASSERT_EQ(0, std::memcmp(y1.data(), want.data() + t * n, n * sizeof(float)))
                  << dot_isa_name(path.isa) << " row " << t;
            }
            set_active_dot_isa(saved);
            ++cases;
          }
        }
  EXPECT_GT(cases, 100);
}

TEST(QLinearW4A8, DispatchAndThreadsGiveTheSameBitsAndRowsDoNotDependOnTheBatch) {
  std::mt19937 rng(5);
  const int64_t n = 300, k = 700, group = 128;
  const auto wf = random_floats(rng, n * k, 0.05f);
  const Q4Tiled w = q4_tile(q4_quantize_rtn(wf.data(), n, k, group, true));
  const auto xf = random_floats(rng, 9 * k);
  A8Activations batch, one;
  a8_quantize(xf.data(), 9, k, k, group, &batch);
  ThreadPool pool(3);
  const DotIsa saved = active_dot_isa();
  for (const DotPath& path : supported_paths()) {
    set_active_dot_isa(path.isa);
    std::vector<float> y(9 * n);
    qlinear_w4a8(params(w, batch, {}, y.data()), pool);
    for (int64_t r = 0; r < 9; ++r) {
      a8_quantize(xf.data() + r * k, 1, k, k, group, &one);
      std::vector<float> y1(n);
      qlinear_w4a8(params(w, one, {}, y1.data()), pool);
      ASSERT_EQ(0, std::memcmp(y1.data(), y.data() + r * n, n * sizeof(float))) << dot_isa_name(path.isa) << " row " << r;
    }
  }
  set_active_dot_isa(saved);
}

TEST(QLinearW4A8, CloseToTheFloatProduct) {
  // Not exactness (quantization loses information) but sanity: the relative error of the
  // quantized product is that of 4-bit weights, a few percent.
  std::mt19937 rng(6);
  const int64_t m = 4, n = 64, k = 512, group = 64;
  const auto wf = random_floats(rng, n * k, 0.05f);
  const auto xf = random_floats(rng, m * k);
  const Q4Tiled w = q4_tile(q4_quantize_rtn(wf.data(), n, k, group, true));
  A8Activations a;
  a8_quantize(xf.data(), m, k, k, group, &a);
  std::vector<float> y(m * n);
  ThreadPool pool(1);
  qlinear_w4a8(params(w, a, {}, y.data()), pool);
  double err = 0, ref = 0;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < n; ++c) {
      double exact = 0;
      for (int64_t i = 0; i < k; ++i) exact += double(xf[r * k + i]) * wf[c * k + i];
      err += (y[r * n + c] - exact) * (y[r * n + c] - exact);
      ref += exact * exact;
    }
  EXPECT_LT(std::sqrt(err / ref), 0.12);
}

// ---- W4A16: float activations ----

std::vector<float> reference16(const Q4Weight& w, const std::vector<float>& x, int64_t m, const std::vector<float>& bias) {
  const int64_t G = w.groups();
  std::vector<float> y(m * w.n);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t n = 0; n < w.n; ++n) {
      float acc = bias.empty() ? 0.0f : bias[n];
      for (int64_t i = 0; i < w.k; ++i) {
        const int64_t g = i / w.group;
        const float wq = (static_cast<float>(q4_at(w, n, i)) - static_cast<float>(w.zeros[n * G + g])) * w.scales[n * G + g];
        acc = std::fma(wq, x[r * w.k + i], acc);
      }
      y[r * w.n + n] = acc;
    }
  return y;
}

TEST(QLinearW4A16, EveryPathIsBitExactAgainstTheReference) {
  struct Path {
    Isa isa;
    void (*kernel)(const QLinear16Params&, int64_t, int64_t);
  };
  std::vector<Path> paths = {{Isa::kScalar, qlinear_w4a16_scalar}};
  if (static_cast<int>(detected_isa()) >= static_cast<int>(Isa::kAvx2)) paths.push_back({Isa::kAvx2, qlinear_w4a16_avx2});
  if (static_cast<int>(detected_isa()) >= static_cast<int>(Isa::kAvx512)) paths.push_back({Isa::kAvx512, qlinear_w4a16_avx512});
  std::mt19937 rng(10);
  int cases = 0;
  for (int64_t group : {32, 64, 128})
    for (int64_t m : {1, 3, 5})
      for (int64_t n : {1, 17, 48})
        for (int64_t k : {int64_t{7}, group, 2 * group + 13}) {
          const auto wf = random_floats(rng, n * k, 0.1f);
          const auto x = random_floats(rng, m * k);
          const Q4Weight w = q4_quantize_rtn(wf.data(), n, k, group, true);
          const Q4Tiled t = q4_tile(w);
          const std::vector<float> bias = rng() % 2 ? random_floats(rng, n) : std::vector<float>();
          const std::vector<float> want = reference16(w, x, m, bias);
          for (const Path& path : paths) {
            std::vector<float> y(m * n, std::numeric_limits<float>::quiet_NaN());
            QLinear16Params p;
            p.x = x.data();
            p.w = t.data.data();
            p.w_scales = t.scales.data();
            p.w_zeros = t.zeros.data();
            p.bias = bias.empty() ? nullptr : bias.data();
            p.y = y.data();
            p.m = m;
            p.n = n;
            p.k = k;
            p.groups = t.groups;
            p.group = group;
            p.ldx = k;
            p.ldy = n;
            const int64_t split = n / 2 / Q4Tiled::kRows * Q4Tiled::kRows;
            path.kernel(p, 0, split);
            path.kernel(p, split, n);
            ASSERT_EQ(0, std::memcmp(y.data(), want.data(), y.size() * sizeof(float)))
                << isa_name(path.isa) << " group " << group << " m " << m << " n " << n << " k " << k;
            ++cases;
          }
        }
  EXPECT_GT(cases, 80);
}

TEST(QLinearW4A8, ForcingAnUnsupportedPathIsAnError) {
  const DotIsa saved = active_dot_isa();
  EXPECT_THROW(set_active_dot_isa(static_cast<DotIsa>(7)), InvalidArgument);
  for (DotIsa isa : {DotIsa::kAvx2, DotIsa::kAvxVnni, DotIsa::kAvx512Vnni}) {
    if (!dot_isa_supported(isa)) {
      EXPECT_THROW(set_active_dot_isa(isa), InvalidArgument);
    }
  }
  EXPECT_EQ(active_dot_isa(), saved);  // a refused request changes nothing
  EXPECT_TRUE(dot_isa_supported(DotIsa::kScalar));
}

}  // namespace
}  // namespace accelcore::cpu
