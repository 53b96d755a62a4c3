// CPU kernels against naive double-precision references: linear on every ISA path the machine has
// (direct kernels, column splits, and linear() through 1- and 2-thread pools) with batch
// invariance; rms_norm, apply_rope, silu_mul; write_kv + paged_attention against dense causal
// attention (non-contiguous block tables, GQA/MQA, sliding windows, ragged blocks); draft-tree
// tokens (extra slots) bit-identical to plain causal tokens; copy_kv_slot.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <iostream>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/cpu_features.h"
#include "backend/cpu/ops.h"
#include "kv/kv_cache.h"
#include "quant/kvq.h"
#include "test_util.h"
#include "util/thread_pool.h"

namespace accelcore::cpu {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kSentinel = 12345.0f;

using Kernel = void (*)(const LinearParams&, int64_t, int64_t);

struct IsaPath {
  Isa isa;
  Kernel kernel;
};

// Every path this CPU can run; scalar always.
std::vector<IsaPath> supported_paths() {
  std::vector<IsaPath> out = {{Isa::kScalar, linear_scalar}};
  const Isa best = detected_isa();
  if (static_cast<int>(best) >= static_cast<int>(Isa::kAvx2)) out.push_back({Isa::kAvx2, linear_avx2});
  if (static_cast<int>(best) >= static_cast<int>(Isa::kAvx512)) out.push_back({Isa::kAvx512, linear_avx512});
  return out;
}

// Restores the active ISA when a test that switches it ends.
class IsaGuard {
 public:
  IsaGuard() : saved_(active_isa()) {}
  ~IsaGuard() { set_active_isa(saved_); }

 private:
  Isa saved_;
};

TEST(CpuFeatures, ReportsPathsUnderTest) {
  std::string names;
  for (const IsaPath& p : supported_paths()) names += std::string(isa_name(p.isa)) + " ";
  std::cout << "[ INFO     ] detected ISA " << isa_name(detected_isa()) << "; linear paths tested: " << names << "\n";
  IsaGuard guard;
  set_active_isa(Isa::kScalar);
  EXPECT_EQ(active_isa(), Isa::kScalar);
  set_active_isa(Isa::kAvx512);  // clamped to what the hardware has
  EXPECT_EQ(active_isa(), detected_isa());
}

// A linear problem with padded strides: x rows carry NaN padding (a kernel must never read past k)
// and y rows carry sentinel padding (a kernel must never write past n).
struct LinearProblem {
  int64_t m, n, k, ldx, ldy;
  std::vector<float> x, w, wp, bias, y;  // w row-major (the reference's), wp its panels (the kernels')
  LinearProblem(std::mt19937& rng, int64_t m_, int64_t n_, int64_t k_)
      : m(m_), n(n_), k(k_), ldx(k_ + 3), ldy(n_ + 2) {
    x.assign(m * ldx, kNaN);
    for (int64_t r = 0; r < m; ++r) {
      auto row = testing::random_floats(rng, k);
      std::copy(row.begin(), row.end(), x.begin() + r * ldx);
    }
    w = testing::random_floats(rng, n * k);
    wp.resize(linear_packed_size(n, k));
    linear_pack(w.data(), n, k, wp.data());
    bias = testing::random_floats(rng, n, -2.0f, 2.0f);
    reset_y();
  }
  void reset_y() { y.assign(m * ldy, kSentinel); }
  LinearParams params(bool with_bias) {
    LinearParams p;
    p.x = x.data();
    p.w = wp.data();
    p.bias = with_bias ? bias.data() : nullptr;
    p.y = y.data();
    p.m = m;
    p.n = n;
    p.k = k;
    p.ldx = ldx;
    p.ldy = ldy;
    return p;
  }
  // Checks y against a double-precision reference with a k-scaled tolerance, and the padding.
  void check(bool with_bias, const std::string& what) const {
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t c = 0; c < n; ++c) {
        double acc = 0.0, mag = 0.0;
        for (int64_t i = 0; i < k; ++i) {
          acc += static_cast<double>(x[r * ldx + i]) * w[c * k + i];
          mag += std::abs(static_cast<double>(x[r * ldx + i]) * w[c * k + i]);
        }
        if (with_bias) {
          acc += bias[c];
          mag += std::abs(bias[c]);
        }
        const double tol = 2.0 * (k + 1) * FLT_EPSILON * mag + 1e-7;
        ASSERT_NEAR(y[r * ldy + c], acc, tol) << what << " at (" << r << ", " << c << ")";
      }
      for (int64_t c = n; c < ldy; ++c) ASSERT_EQ(y[r * ldy + c], kSentinel) << what << ": wrote into row padding";
    }
  }
};

std::string describe(const IsaPath& path, int64_t m, int64_t n, int64_t k, bool bias) {
  return std::string(isa_name(path.isa)) + " m=" + std::to_string(m) + " n=" + std::to_string(n) +
         " k=" + std::to_string(k) + (bias ? " +bias" : "");
}

TEST(Linear, EveryIsaPathMatchesReferenceOnOddSizes) {
  std::mt19937 rng(11);
  for (const IsaPath& path : supported_paths()) {
    for (int64_t m : {1, 3, 5, 17}) {
      for (int64_t n : {1, 7, 33}) {
        for (int64_t k : {1, 15, 16, 17, 100}) {
          LinearProblem prob(rng, m, n, k);
          for (bool bias : {false, true}) {
            const std::string what = describe(path, m, n, k, bias);
            prob.reset_y();
            path.kernel(prob.params(bias), 0, n);
            ASSERT_NO_FATAL_FAILURE(prob.check(bias, what));
            const std::vector<float> full = prob.y;

            // Column ranges computed separately (as threads do) give the same bits.
            prob.reset_y();
            for (int64_t s = 0; s < n; s += 3) path.kernel(prob.params(bias), s, std::min(n, s + 3));
            ASSERT_EQ(0, std::memcmp(full.data(), prob.y.data(), full.size() * sizeof(float))) << what << " split by 3";
            prob.reset_y();
            const int64_t half = n / 2;
            path.kernel(prob.params(bias), half, n);
            for (int64_t r = 0; r < m; ++r)
              for (int64_t c = 0; c < half; ++c) ASSERT_EQ(prob.y[r * prob.ldy + c], kSentinel) << what << ": wrote outside [n0, n1)";
            path.kernel(prob.params(bias), 0, half);
            ASSERT_EQ(0, std::memcmp(full.data(), prob.y.data(), full.size() * sizeof(float))) << what << " split in half";
          }
        }
      }
    }
  }
}

TEST(Linear, PackAndUnpackRoundTripWithZeroPadding) {
  std::mt19937 rng(15);
  for (int64_t n : {1, 16, 17, 40}) {
    const int64_t k = 9;
    const std::vector<float> w = testing::random_floats(rng, n * k);
    std::vector<float> packed(linear_packed_size(n, k), kNaN), back(n * k, kNaN);
    linear_pack(w.data(), n, k, packed.data());
    for (int64_t c = n; c < (n + kLinearPanel - 1) / kLinearPanel * kLinearPanel; ++c)
      for (int64_t i = 0; i < k; ++i) ASSERT_EQ(packed[((c / kLinearPanel) * k + i) * kLinearPanel + c % kLinearPanel], 0.0f);
    linear_unpack(packed.data(), n, k, back.data());
    ASSERT_EQ(0, std::memcmp(w.data(), back.data(), w.size() * sizeof(float))) << "n=" << n;
  }
}

// Every path does each output's fused multiply-adds in the same order, so they agree to the bit
// (what lets a model give the same tokens on every machine).
TEST(Linear, EveryIsaPathGivesTheScalarPathsBits) {
  std::mt19937 rng(16);
  for (int64_t m : {1, 2, 3, 7, 13}) {
    for (int64_t n : {5, 16, 80, 130}) {
      LinearProblem prob(rng, m, n, 37);
      prob.reset_y();
      linear_scalar(prob.params(true), 0, n);
      const std::vector<float> scalar = prob.y;
      for (const IsaPath& path : supported_paths()) {
        prob.reset_y();
        path.kernel(prob.params(true), 0, n);
        ASSERT_EQ(0, std::memcmp(scalar.data(), prob.y.data(), scalar.size() * sizeof(float)))
            << describe(path, m, n, 37, true) << " differs from the scalar path";
      }
    }
  }
}

TEST(Linear, ThroughThreadPoolOneAndTwoThreads) {
  IsaGuard guard;
  std::mt19937 rng(12);
  ThreadPool pool1(1), pool2(2);
  // Small shapes run inline; the last two exceed the threading threshold (m*n*k >= 2^17).
  const int64_t shapes[][3] = {{1, 7, 15}, {3, 33, 17}, {5, 33, 100}, {17, 7, 16}, {17, 97, 100}, {8, 300, 64}};
  for (const IsaPath& path : supported_paths()) {
    set_active_isa(path.isa);
    ASSERT_EQ(active_isa(), path.isa);
    for (const auto& s : shapes) {
      LinearProblem prob(rng, s[0], s[1], s[2]);
      for (bool bias : {false, true}) {
        const std::string what = describe(path, s[0], s[1], s[2], bias);
        prob.reset_y();
        path.kernel(prob.params(bias), 0, prob.n);
        const std::vector<float> direct = prob.y;
        for (ThreadPool* pool : {&pool1, &pool2}) {
          prob.reset_y();
          linear(prob.params(bias), *pool);
          ASSERT_NO_FATAL_FAILURE(prob.check(bias, what));
          EXPECT_EQ(0, std::memcmp(direct.data(), prob.y.data(), direct.size() * sizeof(float)))
              << what << " with " << pool->num_threads() << " threads differs from the direct kernel";
        }
      }
    }
  }
}

TEST(Linear, RowOfABatchIsBitIdenticalToThatRowAlone) {
  IsaGuard guard;
  std::mt19937 rng(13);
  ThreadPool pool2(2);
  for (const IsaPath& path : supported_paths()) {
    set_active_isa(path.isa);
    for (int64_t n : {7, 33, 97}) {
      for (int64_t k : {15, 16, 17, 100}) {
        const int64_t m = 17;  // 4 full row blocks plus a remainder of 1
        LinearProblem batch(rng, m, n, k);
        for (bool bias : {false, true}) {
          const std::string what = describe(path, m, n, k, bias);
          batch.reset_y();
          path.kernel(batch.params(bias), 0, n);
          const std::vector<float> direct = batch.y;
          batch.reset_y();
          linear(batch.params(bias), pool2);  // threaded when large enough
          const std::vector<float> pooled = batch.y;
          for (int64_t r = 0; r < m; ++r) {
            std::vector<float> y1(n, kSentinel);
            LinearParams p = batch.params(bias);
            p.x = batch.x.data() + r * batch.ldx;
            p.y = y1.data();
            p.m = 1;
            p.ldy = n;
            path.kernel(p, 0, n);
            EXPECT_EQ(0, std::memcmp(y1.data(), direct.data() + r * batch.ldy, n * sizeof(float)))
                << what << ": row " << r << " alone differs from the same row in the batch";
            std::fill(y1.begin(), y1.end(), kSentinel);
            linear(p, pool2);
            EXPECT_EQ(0, std::memcmp(y1.data(), pooled.data() + r * batch.ldy, n * sizeof(float)))
                << what << ": linear() row " << r << " alone differs from the batched call";
          }
        }
      }
    }
  }
}

TEST(RmsNorm, MatchesReferenceOnEveryIsaPath) {
  std::mt19937 rng(14);
  for (int64_t d : {1, 8, 37, 64}) {
    const int64_t m = 4;
    std::vector<float> x = testing::random_floats(rng, m * d, -3.0f, 3.0f);
    std::fill(x.begin() + 2 * d, x.begin() + 3 * d, 0.0f);  // an all-zero row: eps keeps it finite
    const std::vector<float> w = testing::random_floats(rng, d, 0.5f, 1.5f);
    for (float eps : {1e-6f, 1e-5f}) {
      std::vector<float> out(m * d, kNaN);
      RmsNormParams p;
      p.x = x.data();
      p.weight = w.data();
      p.out = out.data();
      p.m = m;
      p.d = d;
      p.eps = eps;
      rms_norm(p);
      for (int64_t r = 0; r < m; ++r) {
        double ss = 0.0;
        for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(x[r * d + i]) * x[r * d + i];
        const double inv = 1.0 / std::sqrt(ss / d + static_cast<double>(eps));
        for (int64_t i = 0; i < d; ++i) {
          const double want = w[i] * (x[r * d + i] * inv);
          EXPECT_NEAR(out[r * d + i], want, 1e-6 + 2e-6 * std::abs(want)) << "d=" << d << " row " << r << " i=" << i;
        }
      }
      // In place (x and out alias) gives the same result.
      std::vector<float> inplace = x;
      p.x = inplace.data();
      p.out = inplace.data();
      rms_norm(p);
      EXPECT_EQ(0, std::memcmp(inplace.data(), out.data(), out.size() * sizeof(float)));
      // Every instruction set gives the scalar path's bits.
      IsaGuard guard;
      for (const IsaPath& path : supported_paths()) {
        set_active_isa(path.isa);
        std::vector<float> y(m * d, kNaN);
        p.x = x.data();
        p.out = y.data();
        rms_norm(p);
        EXPECT_EQ(0, std::memcmp(y.data(), out.data(), out.size() * sizeof(float))) << isa_name(path.isa) << " d=" << d;
      }
    }
  }
}

TEST(ApplyRope, RotateHalfConvention) {
  std::mt19937 rng(15);
  const int64_t m = 3, heads = 2, hd = 8, half = hd / 2, ld = heads * hd + 5;
  std::vector<float> x(m * ld, kSentinel);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < heads * hd; ++i) x[r * ld + i] = testing::random_floats(rng, 1)[0];
  const std::vector<float> angles = testing::random_floats(rng, m * half, -3.0f, 3.0f);
  std::vector<float> cs(m * half), sn(m * half);
  for (size_t i = 0; i < angles.size(); ++i) {
    cs[i] = std::cos(angles[i]);
    sn[i] = std::sin(angles[i]);
  }
  std::vector<float> y = x;
  RopeParams p;
  p.x = y.data();
  p.m = m;
  p.num_heads = heads;
  p.head_dim = hd;
  p.ld = ld;
  p.cos = cs.data();
  p.sin = sn.data();
  apply_rope(p);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      const float* in = x.data() + r * ld + h * hd;
      const float* out = y.data() + r * ld + h * hd;
      // transformers: x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), rotate_half = cat(-x2, x1).
      for (int64_t i = 0; i < hd; ++i) {
        const double c = cs[r * half + i % half], s = sn[r * half + i % half];
        const double rot = i < half ? -static_cast<double>(in[i + half]) : static_cast<double>(in[i - half]);
        const double want = in[i] * c + rot * s;
        EXPECT_NEAR(out[i], want, 1e-6) << "row " << r << " head " << h << " i " << i;
      }
    }
    for (int64_t i = heads * hd; i < ld; ++i) EXPECT_EQ(y[r * ld + i], kSentinel) << "wrote into row padding";
  }
}

TEST(ApplyRope, ScoresDependOnlyOnRelativePosition) {
  // <rope(q, p1), rope(k, p2)> is a function of p1 - p2: the property RoPE exists for.
  std::mt19937 rng(16);
  const int64_t hd = 16, half = hd / 2;
  const std::vector<float> q = testing::random_floats(rng, hd), k = testing::random_floats(rng, hd);
  auto rotated = [&](const std::vector<float>& v, int pos) {
    std::vector<float> out = v, cs(half), sn(half);
    for (int64_t i = 0; i < half; ++i) {
      const double inv = 1.0 / std::pow(10000.0, 2.0 * i / hd);
      cs[i] = static_cast<float>(std::cos(pos * inv));
      sn[i] = static_cast<float>(std::sin(pos * inv));
    }
    RopeParams p;
    p.x = out.data();
    p.m = 1;
    p.num_heads = 1;
    p.head_dim = hd;
    p.ld = hd;
    p.cos = cs.data();
    p.sin = sn.data();
    apply_rope(p);
    return out;
  };
  auto dot = [](const std::vector<float>& a, const std::vector<float>& b) {
    double s = 0.0;
    for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
    return s;
  };
  const double d_3 = dot(rotated(q, 10), rotated(k, 7));
  EXPECT_NEAR(dot(rotated(q, 25), rotated(k, 22)), d_3, 1e-4);
  EXPECT_NEAR(dot(rotated(q, 3), rotated(k, 0)), d_3, 1e-4);
  EXPECT_NEAR(dot(rotated(q, 0), rotated(k, 0)), dot(q, k), 1e-5);
  // Norms are preserved (a rotation).
  EXPECT_NEAR(dot(rotated(q, 123), rotated(q, 123)), dot(q, q), 1e-4);
}

TEST(SiluMul, EveryIsaPathMatchesReferenceWithTheSameBits) {
  std::mt19937 rng(17);
  const int64_t m = 3, d = 150;  // rows of several vectors and of the kernels' 64-column chunks, with tails
  std::vector<float> gu = testing::random_floats(rng, m * 2 * d, -6.0f, 6.0f);
  gu[0] = 30.0f;
  gu[1] = -30.0f;
  gu[2] = -100.0f;  // exp(100) overflows float: the result must still be ~0, not NaN
  gu[3] = 0.0f;
  gu[4] = 95.0f;    // exp(-95) underflows: silu is x itself
  gu[5] = -87.5f;
  std::vector<float> scalar(m * d, kNaN);
  silu_mul_scalar(gu.data(), scalar.data(), m, d);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < d; ++i) {
      const double g = gu[r * 2 * d + i], u = gu[r * 2 * d + d + i];
      const double want = g / (1.0 + std::exp(-g)) * u;
      EXPECT_NEAR(scalar[r * d + i], want, 1e-30 + 1e-6 * std::abs(want)) << "row " << r << " i " << i;
    }
  IsaGuard guard;
  for (const IsaPath& path : supported_paths()) {
    set_active_isa(path.isa);
    std::vector<float> out(m * d, kNaN);
    silu_mul(gu.data(), out.data(), m, d);
    EXPECT_EQ(0, std::memcmp(scalar.data(), out.data(), out.size() * sizeof(float)))
        << isa_name(path.isa) << " differs from the scalar path";
    // A column range (as a thread's share), across chunk boundaries: the same bits, nothing
    // written outside it.
    std::vector<float> part(m * d, kNaN);
    silu_mul(gu.data(), part.data(), m, d, 37, 141);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < d; ++i) {
        if (i >= 37 && i < 141) {
          EXPECT_EQ(0, std::memcmp(&scalar[r * d + i], &part[r * d + i], sizeof(float))) << isa_name(path.isa) << " " << i;
        } else {
          EXPECT_TRUE(std::isnan(part[r * d + i])) << isa_name(path.isa) << " wrote column " << i;
        }
      }
  }
}

TEST(SoftmaxExps, EveryIsaPathIsWithinTwoUlpOfStdExpWithTheSameBits) {
  std::mt19937 rng(23);
  const int64_t n = 1027;  // several vectors of every width, and a tail
  std::vector<float> x = testing::random_floats(rng, n, -40.0f, 12.0f);
  x[0] = 12.5f;  // the maximum: exp(0) = 1 exactly
  x[1] = -std::numeric_limits<float>::infinity();  // a masked token: 0
  x[2] = -590.0f;  // exp(-861), below exp(-708): 0
  x[3] = 12.5f - 490.0f;  // exp(-700), just above it: normal
  x[4] = -650.0f;  // below the top-k threshold (when there is one): 0
  // Without a threshold (all tokens' exps) and with one (a top-k's: only the tokens at or above it).
  for (const double threshold : {-static_cast<double>(INFINITY), -600.0, 0.0}) {
    SCOPED_TRACE(threshold);
    SoftmaxExpParams p;
    p.x = x.data();
    p.n = n;
    p.max = 12.5;
    p.inv_temperature = 1.0 / 0.7;
    p.threshold = threshold;
    std::vector<double> scalar(n, kNaN);
    p.out = scalar.data();
    const double sum = softmax_exps_scalar(p);
    double want_sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double e = x[i] < threshold ? 0.0 : std::exp((static_cast<double>(x[i]) - p.max) * p.inv_temperature);
      const double want = e < 1e-307 ? 0.0 : e;
      want_sum += want;
      const double ulp = std::nextafter(want, INFINITY) - want;
      EXPECT_LE(std::abs(scalar[i] - want), 2 * ulp) << "i " << i << " x " << x[i];
    }
    EXPECT_EQ(scalar[0], 1.0);
    EXPECT_EQ(scalar[1], 0.0);
    EXPECT_EQ(scalar[2], 0.0);
    EXPECT_EQ(scalar[3] > 0.0, threshold < x[3]);
    EXPECT_EQ(scalar[4], 0.0);
    EXPECT_NEAR(sum, want_sum, 1e-14 * want_sum);
    IsaGuard guard;
    for (const IsaPath& path : supported_paths()) {
      set_active_isa(path.isa);
      std::vector<double> out(n, kNaN);
      p.out = out.data();
      const double s = softmax_exps(p);
      EXPECT_EQ(0, std::memcmp(&s, &sum, sizeof s)) << isa_name(path.isa) << ": the sum differs from the scalar path's";
      EXPECT_EQ(0, std::memcmp(scalar.data(), out.data(), out.size() * sizeof(double)))
          << isa_name(path.isa) << " differs from the scalar path";
    }
  }
}

TEST(AddInplace, Adds) {
  std::vector<float> x = {1.0f, 2.0f, -3.0f}, y = {0.5f, -2.0f, 4.0f};
  add_inplace(x.data(), y.data(), 3);
  EXPECT_EQ(x, (std::vector<float>{1.5f, 0.0f, 1.0f}));
}

// ---- write_kv + paged_attention ----

struct AttnCase {
  int num_heads, num_kv_heads, head_dim, block_size, window;
};

std::string describe(const AttnCase& c) {
  return "heads=" + std::to_string(c.num_heads) + " kv_heads=" + std::to_string(c.num_kv_heads) +
         " head_dim=" + std::to_string(c.head_dim) + " block_size=" + std::to_string(c.block_size) +
         " window=" + std::to_string(c.window);
}

void PrintTo(const AttnCase& c, std::ostream* os) { *os << describe(c); }

class PagedAttention : public ::testing::TestWithParam<AttnCase> {};

TEST_P(PagedAttention, MatchesDenseCausalAttention) {
  const AttnCase c = GetParam();
  const std::string what = describe(c);
  std::mt19937 rng(18 + c.num_heads * 7 + c.block_size * 13 + c.window);
  const int kvh = c.num_kv_heads, hd = c.head_dim, bs = c.block_size, H = c.num_heads;
  const int group = H / kvh;
  const int kv_size = kvh * hd;

  // Three sequences: one token; a chunk at the end of a longer context; a full prefill.
  const std::vector<int> lens = {1, 23, 50};
  struct Tok {
    int seq, pos;
  };
  std::vector<Tok> toks = {{0, 0}};
  for (int p = 19; p < 23; ++p) toks.push_back({1, p});
  for (int p = 0; p < 50; ++p) toks.push_back({2, p});

  // Random, non-contiguous block tables drawn from a shuffled pool with spare blocks.
  int blocks_needed = 0;
  for (int l : lens) blocks_needed += (l + bs - 1) / bs;
  const int num_blocks = blocks_needed + 7;
  std::vector<int32_t> perm(num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> tables, table_offset;
  for (int s = 0, next = 0; s < 3; ++s) {
    table_offset.push_back(static_cast<int32_t>(tables.size()));
    for (int b = 0; b < (lens[s] + bs - 1) / bs; ++b) tables.push_back(perm[next++]);
  }

  // Dense K/V per sequence: [len][kv_heads * head_dim], written through write_kv with a row stride.
  std::vector<std::vector<float>> K(3), V(3);
  const int64_t ld = kv_size + 3;
  std::vector<float> krows, vrows;
  std::vector<int64_t> slots;
  for (int s = 0; s < 3; ++s) {
    K[s] = testing::random_floats(rng, static_cast<size_t>(lens[s]) * kv_size);
    V[s] = testing::random_floats(rng, static_cast<size_t>(lens[s]) * kv_size);
    for (int p = 0; p < lens[s]; ++p) {
      krows.insert(krows.end(), K[s].begin() + p * kv_size, K[s].begin() + (p + 1) * kv_size);
      krows.insert(krows.end(), 3, kNaN);
      vrows.insert(vrows.end(), V[s].begin() + p * kv_size, V[s].begin() + (p + 1) * kv_size);
      vrows.insert(vrows.end(), 3, kNaN);
      slots.push_back(static_cast<int64_t>(tables[table_offset[s] + p / bs]) * bs + p % bs);
    }
  }
  // Unwritten slots hold NaN: reading one (a bad block-table lookup, or past the causal bound)
  // poisons the output.
  const size_t pool_floats = static_cast<size_t>(num_blocks) * kvh * bs * hd;
  std::vector<float> k_cache(pool_floats, kNaN), v_cache(pool_floats, kNaN);
  KvWriteParams wp;
  wp.k = krows.data();
  wp.v = vrows.data();
  wp.ld = ld;
  wp.k_cache = k_cache.data();
  wp.v_cache = v_cache.data();
  wp.slots = slots.data();
  wp.num_tokens = static_cast<int64_t>(slots.size());
  wp.num_kv_heads = kvh;
  wp.head_dim = hd;
  wp.block_size = bs;
  write_kv(wp);

  // write_kv: V row (seq, pos, head) sits at [block][head][offset][:], K channel i at
  // [block][head][i][offset] (transposed), and nothing else was touched.
  size_t written = 0;
  for (int s = 0; s < 3; ++s)
    for (int p = 0; p < lens[s]; ++p)
      for (int h = 0; h < kvh; ++h) {
        const size_t head = (static_cast<size_t>(tables[table_offset[s] + p / bs]) * kvh + h) * bs * hd;
        for (int i = 0; i < hd; ++i)
          ASSERT_EQ(0, std::memcmp(&k_cache[head + static_cast<size_t>(i) * bs + p % bs], &K[s][p * kv_size + h * hd + i],
                                   sizeof(float)))
              << what;
        ASSERT_EQ(0, std::memcmp(&v_cache[head + static_cast<size_t>(p % bs) * hd], &V[s][p * kv_size + h * hd],
                                 hd * sizeof(float)))
            << what;
        written += hd;
      }
  EXPECT_EQ(static_cast<size_t>(std::count_if(k_cache.begin(), k_cache.end(), [](float f) { return !std::isnan(f); })),
            written);

  // Queries with a padded row stride.
  const int64_t T = static_cast<int64_t>(toks.size()), ldq = H * hd + 5;
  std::vector<float> q(T * ldq, kNaN);
  for (int64_t t = 0; t < T; ++t) {
    auto row = testing::random_floats(rng, H * hd, -2.0f, 2.0f);
    std::copy(row.begin(), row.end(), q.begin() + t * ldq);
  }
  std::vector<int32_t> positions, seq_of_token;
  for (const Tok& t : toks) {
    positions.push_back(t.pos);
    seq_of_token.push_back(t.seq);
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  AttentionParams ap;
  ap.q = q.data();
  ap.k_cache = k_cache.data();
  ap.v_cache = v_cache.data();
  ap.positions = positions.data();
  ap.seq_of_token = seq_of_token.data();
  ap.block_tables = tables.data();
  ap.block_table_offset = table_offset.data();
  ap.num_tokens = T;
  ap.ldq = ldq;
  ap.num_heads = H;
  ap.num_kv_heads = kvh;
  ap.head_dim = hd;
  ap.block_size = bs;
  ap.window = c.window;
  ap.scale = scale;

  // Dense reference: softmax over the causal (and windowed) keys of the token's own sequence.
  std::vector<double> ref(T * H * hd);
  for (int64_t t = 0; t < T; ++t) {
    const int s = toks[t].seq, pos = toks[t].pos;
    const int first = c.window > 0 ? std::max(0, pos - c.window + 1) : 0;
    for (int h = 0; h < H; ++h) {
      const int g = h / group;  // the kv head this query head reads
      std::vector<double> sc;
      double mx = -INFINITY;
      for (int j = first; j <= pos; ++j) {
        double d = 0.0;
        for (int i = 0; i < hd; ++i) d += static_cast<double>(q[t * ldq + h * hd + i]) * K[s][j * kv_size + g * hd + i];
        sc.push_back(d * scale);
        mx = std::max(mx, sc.back());
      }
      double sum = 0.0;
      for (double& x : sc) sum += x = std::exp(x - mx);
      for (int i = 0; i < hd; ++i) {
        double o = 0.0;
        for (int j = first; j <= pos; ++j) o += sc[j - first] / sum * V[s][j * kv_size + g * hd + i];
        ref[(t * H + h) * hd + i] = o;
      }
    }
  }

  // Every instruction-set path (each is exercised whatever the machine's best).
  IsaGuard guard;
  for (const IsaPath& path : supported_paths()) {
    set_active_isa(path.isa);
    const std::string what_isa = what + " isa=" + isa_name(path.isa);
    ThreadPool pool1(1), pool2(2);
    std::vector<float> out1(T * H * hd, kNaN), out2(T * H * hd, kNaN);
    ap.out = out1.data();
    paged_attention(ap, pool1);
    ap.out = out2.data();
    paged_attention(ap, pool2);  // split across threads where the context is large enough
    for (size_t i = 0; i < ref.size(); ++i) {
      ASSERT_NEAR(out1[i], ref[i], 2e-5) << what_isa << " token " << i / (H * hd) << " head " << (i / hd) % H;
    }
    EXPECT_EQ(0, std::memcmp(out1.data(), out2.data(), out1.size() * sizeof(float))) << what_isa << ": threads changed bits";

    // Each token computed alone gives the same bits as inside the batch.
    for (int64_t t = 0; t < T; ++t) {
      AttentionParams one = ap;
      one.q = q.data() + t * ldq;
      one.positions = positions.data() + t;
      one.seq_of_token = seq_of_token.data() + t;
      one.num_tokens = 1;
      std::vector<float> o(H * hd, kNaN);
      one.out = o.data();
      paged_attention(one, pool2);
      ASSERT_EQ(0, std::memcmp(o.data(), out1.data() + t * H * hd, o.size() * sizeof(float)))
          << what_isa << ": token " << t << " alone differs from the batch";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, PagedAttention,
    ::testing::Values(AttnCase{6, 2, 16, 5, 0},   // GQA, block size not dividing any length
                      AttnCase{6, 2, 16, 5, 7},   // ... with a sliding window
                      AttnCase{4, 4, 8, 16, 0},   // MHA, one block holds a whole short sequence
                      AttnCase{4, 1, 8, 3, 10},   // MQA with a window spanning blocks
                      AttnCase{8, 2, 12, 7, 1},   // window 1: each token sees only itself
                      AttnCase{2, 1, 4, 1, 0},    // block size 1
                      AttnCase{8, 4, 8, 16, 64},  // window larger than every context: no effect
                      AttnCase{4, 2, 64, 16, 0},  // the shapes with their own instantiations:
                      AttnCase{2, 1, 128, 16, 9}, //   head_dim 64/128 with block size 16,
                      AttnCase{2, 2, 64, 5, 0}),  //   head_dim 64 with another block size
    [](const ::testing::TestParamInfo<AttnCase>& info) {
      const AttnCase& c = info.param;
      return "h" + std::to_string(c.num_heads) + "_kv" + std::to_string(c.num_kv_heads) + "_d" +
             std::to_string(c.head_dim) + "_bs" + std::to_string(c.block_size) + "_w" + std::to_string(c.window);
    });

// ---- draft-tree tokens: bit-identical to the plain causal computation ----
//
// A draft node at depth d after its tree root (the request's last known token, at position
// root) sits at position root + d; it reads the context in order up to the root and its tree
// ancestors and itself from wherever the step put their K/V (extra_slots, depth order). The
// scheduler places node i at the slot of position root + 1 + i, so an ancestor's K/V is usually
// not where its position would put it, and the slots between belong to sibling branches. The
// output must be exactly what the same query computes as a plain token at the same position
// over the same keys in order: verification compares the sampled tokens of the two.

struct DraftAttnCase {
  int num_heads, num_kv_heads, head_dim, block_size, window;
};

std::string describe(const DraftAttnCase& c) {
  return describe(AttnCase{c.num_heads, c.num_kv_heads, c.head_dim, c.block_size, c.window});
}
void PrintTo(const DraftAttnCase& c, std::ostream* os) { *os << describe(c); }

class DraftTreeAttention : public ::testing::TestWithParam<DraftAttnCase> {};

TEST_P(DraftTreeAttention, DraftNodeIsBitIdenticalToThePlainToken) {
  const DraftAttnCase c = GetParam();
  const std::string what = describe(c);
  const int kvh = c.num_kv_heads, hd = c.head_dim, bs = c.block_size, H = c.num_heads;
  const int kv_size = kvh * hd;
  constexpr int kDepth = 6;           // the chain of draft nodes checked: depths 1..6
  constexpr int kRoom = kDepth + 7;   // node slots after the root; those off the chain are siblings
  std::mt19937 rng(77 + c.head_dim * 5 + c.block_size * 3 + c.window);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  auto write = [&](std::vector<float>* kc, std::vector<float>* vc, const std::vector<int64_t>& slots,
                   const std::vector<float>& krows, const std::vector<float>& vrows) {
    KvWriteParams wp;
    wp.k = krows.data();
    wp.v = vrows.data();
    wp.ld = kv_size;
    wp.k_cache = kc->data();
    wp.v_cache = vc->data();
    wp.slots = slots.data();
    wp.num_tokens = static_cast<int64_t>(slots.size());
    wp.num_kv_heads = kvh;
    wp.head_dim = hd;
    wp.block_size = bs;
    write_kv(wp);
  };

  IsaGuard guard;
  ThreadPool pool1(1), pool2(2);
  int compared = 0;
  for (int root : {0, 1, bs - 1, bs, 2 * bs + 3, 41}) {
    // The chain in the sequence's own later slots (0: with gaps where siblings sit; 1: without,
    // each node at its position's slot, as a chain drafted alone is; 2: its first 3 nodes so, then
    // gaps), or (3) in blocks outside its table.
    for (int where : {0, 1, 2, 3}) {
      const bool spare = where == 3;
      const char* names[] = {"", " (chain at its positions' slots)", " (first 3 nodes at their positions' slots)",
                             " (chain in spare blocks)"};
      const std::string what_root = what + " root=" + std::to_string(root) + names[where];
      const int last_pos = root + kDepth;
      const int table_blocks = (root + 1 + kRoom + bs - 1) / bs;
      const int spare_blocks = (kDepth + bs - 1) / bs + 2;
      const int num_blocks = table_blocks + spare_blocks + 3;
      std::vector<int32_t> perm(num_blocks);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      const std::vector<int32_t> table(perm.begin(), perm.begin() + table_blocks);
      const int32_t table_offset = 0;
      auto slot_of = [&](int pos) { return static_cast<int64_t>(table[pos / bs]) * bs + pos % bs; };

      // True K/V of positions 0..last_pos, and garbage for the sibling nodes.
      const auto K = testing::random_floats(rng, static_cast<size_t>(last_pos + 1) * kv_size);
      const auto V = testing::random_floats(rng, static_cast<size_t>(last_pos + 1) * kv_size);
      auto rows = [&](const std::vector<float>& src, int from, int to) {  // positions [from, to)
        return std::vector<float>(src.begin() + static_cast<int64_t>(from) * kv_size, src.begin() + static_cast<int64_t>(to) * kv_size);
      };

      // The chain's node indices: ascending (a parent precedes its children), with gaps.
      std::vector<int> idx(kRoom);
      std::iota(idx.begin(), idx.end(), 0);
      std::shuffle(idx.begin(), idx.end(), rng);
      idx.resize(kDepth);
      std::sort(idx.begin(), idx.end());
      if (where == 1) std::iota(idx.begin(), idx.end(), 0);
      if (where == 2)
        for (int k = 0; k < kDepth; ++k) idx[k] = k < 3 ? k : 2 * k;
      std::vector<int64_t> chain(kDepth);
      if (spare) {
        std::vector<int64_t> free_slots;
        for (int b = table_blocks; b < table_blocks + spare_blocks; ++b)
          for (int o = 0; o < bs; ++o) free_slots.push_back(static_cast<int64_t>(perm[b]) * bs + o);
        std::shuffle(free_slots.begin(), free_slots.end(), rng);
        std::copy(free_slots.begin(), free_slots.begin() + kDepth, chain.begin());
      } else {
        for (int k = 0; k < kDepth; ++k) chain[k] = slot_of(root + 1 + idx[k]);
      }

      // Plain cache: every position in order. Draft cache: the context up to the root in order,
      // sibling garbage in the node slots, the chain's K/V in its own slots. Unwritten: NaN.
      const size_t pool_floats = static_cast<size_t>(num_blocks) * kvh * bs * hd;
      std::vector<float> pk(pool_floats, kNaN), pv(pool_floats, kNaN), dk(pool_floats, kNaN), dv(pool_floats, kNaN);
      std::vector<int64_t> in_order;
      for (int pos = 0; pos <= last_pos; ++pos) in_order.push_back(slot_of(pos));
      write(&pk, &pv, in_order, K, V);
      in_order.resize(root + 1);
      write(&dk, &dv, in_order, rows(K, 0, root + 1), rows(V, 0, root + 1));
      std::vector<int64_t> siblings;
      for (int i = 0; i < kRoom; ++i) siblings.push_back(slot_of(root + 1 + i));
      write(&dk, &dv, siblings, testing::random_floats(rng, kRoom * kv_size, -3.0f, 3.0f),
            testing::random_floats(rng, kRoom * kv_size, -3.0f, 3.0f));
      write(&dk, &dv, chain, rows(K, root + 1, last_pos + 1), rows(V, root + 1, last_pos + 1));

      // Tokens: the root (a plain token inside the draft step), then the chain's nodes.
      const int T = kDepth + 1;
      const int64_t ldq = H * hd + 3;
      std::vector<float> q(T * ldq, kNaN);
      for (int t = 0; t < T; ++t) {
        auto row = testing::random_floats(rng, H * hd, -2.0f, 2.0f);
        std::copy(row.begin(), row.end(), q.begin() + t * ldq);
      }
      std::vector<int32_t> positions(T), seq_of_token(T, 0), extra_offset = {0, 0};
      std::vector<int64_t> extra_slots;
      for (int t = 0; t < T; ++t) positions[t] = root + t;
      for (int d = 1; d <= kDepth; ++d) {
        extra_slots.insert(extra_slots.end(), chain.begin(), chain.begin() + d);  // ancestors, then itself
        extra_offset.push_back(static_cast<int32_t>(extra_slots.size()));
      }

      AttentionParams plain;
      plain.q = q.data();
      plain.k_cache = pk.data();
      plain.v_cache = pv.data();
      plain.positions = positions.data();
      plain.seq_of_token = seq_of_token.data();
      plain.block_tables = table.data();
      plain.block_table_offset = &table_offset;
      plain.num_tokens = T;
      plain.ldq = ldq;
      plain.num_heads = H;
      plain.num_kv_heads = kvh;
      plain.head_dim = hd;
      plain.block_size = bs;
      plain.window = c.window;
      plain.scale = scale;
      AttentionParams draft = plain;
      draft.k_cache = dk.data();
      draft.v_cache = dv.data();
      draft.extra_offset = extra_offset.data();
      draft.extra_slots = extra_slots.data();

      for (const IsaPath& path : supported_paths()) {
        set_active_isa(path.isa);
        const std::string what_isa = what_root + " isa=" + isa_name(path.isa);
        std::vector<float> want(T * H * hd, kNaN), got1(T * H * hd, kNaN), got2(T * H * hd, kNaN);
        plain.out = want.data();
        paged_attention(plain, pool1);
        for (float f : want) ASSERT_TRUE(std::isfinite(f)) << what_isa;
        draft.out = got1.data();
        paged_attention(draft, pool1);
        draft.out = got2.data();
        paged_attention(draft, pool2);
        for (int t = 0; t < T; ++t) {
          ASSERT_EQ(0, std::memcmp(got1.data() + t * H * hd, want.data() + t * H * hd, H * hd * sizeof(float)))
              << what_isa << ": the node at depth " << t << " (position " << root + t << ") differs from the plain token";
          ++compared;
        }
        ASSERT_EQ(0, std::memcmp(got1.data(), got2.data(), got1.size() * sizeof(float))) << what_isa << ": threads changed bits";
        // Each node alone (as in a step with just that node) gives the same bits.
        for (int t = 1; t < T; ++t) {
          AttentionParams one = draft;
          one.q = q.data() + t * ldq;
          one.positions = positions.data() + t;
          one.seq_of_token = seq_of_token.data() + t;
          one.extra_offset = extra_offset.data() + t;
          one.num_tokens = 1;
          std::vector<float> o(H * hd, kNaN);
          one.out = o.data();
          paged_attention(one, pool2);
          ASSERT_EQ(0, std::memcmp(o.data(), want.data() + t * H * hd, o.size() * sizeof(float)))
              << what_isa << ": the node at depth " << t << " alone differs from the plain token";
        }
      }
    }
  }
  EXPECT_GT(compared, 0);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, DraftTreeAttention,
    ::testing::Values(DraftAttnCase{4, 2, 64, 16, 0},    // the specialised instantiations (GQA) ...
                      DraftAttnCase{4, 2, 64, 16, 20},   //   ... with a window wider than the chain
                      DraftAttnCase{2, 1, 128, 16, 0},
                      DraftAttnCase{2, 1, 128, 16, 3},   //   ... a window smaller than the depth
                      DraftAttnCase{4, 1, 64, 5, 4},     // head_dim 64 with another block size
                      DraftAttnCase{6, 2, 8, 5, 0},      // small head dims, generic block sizes
                      DraftAttnCase{6, 2, 8, 16, 2},
                      DraftAttnCase{8, 2, 8, 16, 0},     //   head dim 8 at block size 16, no window
                      DraftAttnCase{6, 3, 8, 1, 0},      //   ... and at block size 1
                      DraftAttnCase{6, 3, 12, 5, 0},
                      DraftAttnCase{4, 2, 12, 5, 1},     //   window 1: a node sees only itself
                      DraftAttnCase{4, 4, 12, 16, 9},
                      DraftAttnCase{8, 2, 12, 16, 0}),
    [](const ::testing::TestParamInfo<DraftAttnCase>& info) {
      const DraftAttnCase& c = info.param;
      return "h" + std::to_string(c.num_heads) + "_kv" + std::to_string(c.num_kv_heads) + "_d" +
             std::to_string(c.head_dim) + "_bs" + std::to_string(c.block_size) + "_w" + std::to_string(c.window);
    });

// Head dim 8 has a kernel of its own on AVX-512, which gathers blocks of other sizes into
// 16-position blocks: every block size must give the bits block size 16 gives (an engine's
// outputs do not depend on its block size), also when threads split a token's kv heads, and with
// more query heads per kv head than the kernel runs at once.
TEST(PagedAttentionHeadDim8, EveryBlockSizeAndThreadSplitGivesTheSameBits) {
  constexpr int H = 20, kvh = 2, hd = 8, kv_size = kvh * hd;
  const std::vector<int> lens = {1, 17, 300, 161};
  std::mt19937 rng(8);
  std::vector<std::vector<float>> K, V;
  for (int len : lens) {
    K.push_back(testing::random_floats(rng, static_cast<size_t>(len) * kv_size));
    V.push_back(testing::random_floats(rng, static_cast<size_t>(len) * kv_size));
  }
  // Queries: the last 3 positions of each sequence (fewer where shorter).
  std::vector<int32_t> positions, seq_of_token;
  for (int s = 0; s < static_cast<int>(lens.size()); ++s)
    for (int p = std::max(0, lens[s] - 3); p < lens[s]; ++p) positions.push_back(p), seq_of_token.push_back(s);
  const int64_t T = static_cast<int64_t>(positions.size());
  const std::vector<float> q = testing::random_floats(rng, static_cast<size_t>(T) * H * hd, -2.0f, 2.0f);

  auto run = [&](int bs, int threads, int window) {
    std::vector<int32_t> tables, table_offset;
    int next = 0;
    for (int len : lens) {
      table_offset.push_back(static_cast<int32_t>(tables.size()));
      for (int b = 0; b < (len + bs - 1) / bs; ++b) tables.push_back(next++);
    }
    std::vector<float> kc(static_cast<size_t>(next) * kvh * bs * hd, kNaN), vc(kc.size(), kNaN);
    for (int s = 0; s < static_cast<int>(lens.size()); ++s) {
      std::vector<int64_t> slots;
      for (int p = 0; p < lens[s]; ++p) slots.push_back(static_cast<int64_t>(tables[table_offset[s] + p / bs]) * bs + p % bs);
      KvWriteParams wp;
      wp.k = K[s].data();
      wp.v = V[s].data();
      wp.ld = kv_size;
      wp.k_cache = kc.data();
      wp.v_cache = vc.data();
      wp.slots = slots.data();
      wp.num_tokens = lens[s];
      wp.num_kv_heads = kvh;
      wp.head_dim = hd;
      wp.block_size = bs;
      write_kv(wp);
    }
    AttentionParams ap;
    ap.q = q.data();
    ap.k_cache = kc.data();
    ap.v_cache = vc.data();
    ap.positions = positions.data();
    ap.seq_of_token = seq_of_token.data();
    ap.block_tables = tables.data();
    ap.block_table_offset = table_offset.data();
    ap.num_tokens = T;
    ap.ldq = H * hd;
    ap.num_heads = H;
    ap.num_kv_heads = kvh;
    ap.head_dim = hd;
    ap.block_size = bs;
    ap.window = window;
    ap.scale = 0.35f;
    std::vector<float> out(static_cast<size_t>(T) * H * hd, kNaN);
    ap.out = out.data();
    ThreadPool pool(threads);
    paged_attention(ap, pool);
    return out;
  };
  IsaGuard guard;
  for (const IsaPath& path : supported_paths()) {
    set_active_isa(path.isa);
    for (int window : {0, 21}) {
      const std::vector<float> want = run(16, 1, window);
      for (float f : want) ASSERT_TRUE(std::isfinite(f));
      for (int bs : {16, 1, 5, 32})
        for (int threads : {1, 3}) {
          const std::vector<float> got = run(bs, threads, window);
          ASSERT_EQ(0, std::memcmp(got.data(), want.data(), want.size() * sizeof(float)))
              << isa_name(path.isa) << " block size " << bs << ", " << threads << " threads, window " << window;
        }
    }
  }
}

// ---- copy_kv_slot: moves one token's K and V (verified draft nodes to their positions) ----

TEST(CopyKvSlot, MovesExactlyOneTokensKAndV) {
  std::mt19937 rng(31);
  struct Shape {
    int kvh, hd, bs;
  };
  for (const Shape sh : {Shape{3, 12, 5}, Shape{2, 64, 16}, Shape{1, 4, 1}, Shape{2, 8, 16}}) {
    const int num_blocks = 4, num_slots = num_blocks * sh.bs;
    const size_t n = static_cast<size_t>(num_blocks) * sh.kvh * sh.bs * sh.hd;
    const auto K = testing::random_floats(rng, n), V = testing::random_floats(rng, n);
    const int64_t pairs[][2] = {{0, num_slots - 1}, {num_slots - 1, 0}, {sh.bs + 1, 2}, {1, 0}, {3, 3}, {num_slots / 2, num_slots / 2 + 1}};
    for (const auto& pr : pairs) {
      const int64_t src = std::min<int64_t>(pr[0], num_slots - 1), dst = std::min<int64_t>(pr[1], num_slots - 1);
      const std::string what = "kv_heads=" + std::to_string(sh.kvh) + " head_dim=" + std::to_string(sh.hd) +
                               " block_size=" + std::to_string(sh.bs) + " " + std::to_string(src) + " -> " + std::to_string(dst);
      std::vector<float> k = K, v = V, ek = K, ev = V;
      for (int h = 0; h < sh.kvh; ++h) {
        const int64_t sbase = ((src / sh.bs) * sh.kvh + h) * sh.bs * sh.hd, dbase = ((dst / sh.bs) * sh.kvh + h) * sh.bs * sh.hd;
        for (int i = 0; i < sh.hd; ++i) {
          ek[dbase + static_cast<int64_t>(i) * sh.bs + dst % sh.bs] = K[sbase + static_cast<int64_t>(i) * sh.bs + src % sh.bs];
          ev[dbase + (dst % sh.bs) * sh.hd + i] = V[sbase + (src % sh.bs) * sh.hd + i];
        }
      }
      copy_kv_slot({k.data(), v.data(), sh.kvh, sh.hd, sh.bs}, src, dst);
      ASSERT_EQ(0, std::memcmp(k.data(), ek.data(), n * sizeof(float))) << what << ": K";
      ASSERT_EQ(0, std::memcmp(v.data(), ev.data(), n * sizeof(float))) << what << ": V";
      if (src != dst) {
        EXPECT_NE(0, std::memcmp(k.data(), K.data(), n * sizeof(float))) << what << ": nothing moved";
      }

      // Moving a token written at src is the same as writing it at dst (and at src).
      const auto row_k = testing::random_floats(rng, static_cast<size_t>(sh.kvh) * sh.hd);
      const auto row_v = testing::random_floats(rng, static_cast<size_t>(sh.kvh) * sh.hd);
      std::vector<float> ak = K, av = V, bk = K, bv = V;
      KvWriteParams wp;
      wp.k = row_k.data();
      wp.v = row_v.data();
      wp.ld = sh.kvh * sh.hd;
      wp.num_tokens = 1;
      wp.num_kv_heads = sh.kvh;
      wp.head_dim = sh.hd;
      wp.block_size = sh.bs;
      wp.k_cache = ak.data();
      wp.v_cache = av.data();
      wp.slots = &src;
      write_kv(wp);
      copy_kv_slot({ak.data(), av.data(), sh.kvh, sh.hd, sh.bs}, src, dst);
      wp.k_cache = bk.data();
      wp.v_cache = bv.data();
      write_kv(wp);
      wp.slots = &dst;
      write_kv(wp);
      ASSERT_EQ(0, std::memcmp(ak.data(), bk.data(), n * sizeof(float))) << what << ": K after write + move";
      ASSERT_EQ(0, std::memcmp(av.data(), bv.data(), n * sizeof(float))) << what << ": V after write + move";
    }
  }
}

TEST(CopyKvSlot, KvCacheMovesTheTokenInEveryLayer) {
  std::mt19937 rng(32);
  KvCacheShape shape;
  shape.num_layers = 3;
  shape.num_blocks = 5;
  shape.num_kv_heads = 2;
  shape.block_size = 4;
  shape.head_dim = 8;
  KvCache cache(shape);
  const size_t n = shape.num_blocks * shape.floats_per_block();
  std::vector<std::vector<float>> k(3), v(3);
  for (int l = 0; l < 3; ++l) {
    k[l] = testing::random_floats(rng, n);
    v[l] = testing::random_floats(rng, n);
    std::copy(k[l].begin(), k[l].end(), cache.k(l));
    std::copy(v[l].begin(), v[l].end(), cache.v(l));
  }
  cache.copy_slot(17, 6);
  for (int l = 0; l < 3; ++l) {
    copy_kv_slot({k[l].data(), v[l].data(), shape.num_kv_heads, shape.head_dim, shape.block_size}, 17, 6);
    EXPECT_EQ(0, std::memcmp(cache.k(l), k[l].data(), n * sizeof(float))) << "layer " << l;
    EXPECT_EQ(0, std::memcmp(cache.v(l), v[l].data(), n * sizeof(float))) << "layer " << l;
  }
}

// The start-up timing passes read blocks nothing wrote: zero_blocks(n) zeroes exactly the first n
// blocks of every layer (float pools), and of a quantized cache the records, which then read as
// zeros.
TEST(KvCache, ZeroBlocksClearsTheFirstBlocksOnly) {
  KvCacheShape shape;
  shape.num_layers = 2;
  shape.num_blocks = 6;
  shape.num_kv_heads = 2;
  shape.block_size = 4;
  shape.head_dim = 8;
  KvCache cache(shape);
  const size_t fpb = shape.floats_per_block(), n = shape.num_blocks * fpb;
  for (int l = 0; l < 2; ++l) std::fill(cache.k(l), cache.k(l) + n, kNaN), std::fill(cache.v(l), cache.v(l) + n, kNaN);
  cache.zero_blocks(4);
  for (int l = 0; l < 2; ++l)
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(cache.k(l)[i] == 0.0f, i < 4 * fpb) << "layer " << l << " K float " << i;
      ASSERT_EQ(cache.v(l)[i] == 0.0f, i < 4 * fpb) << "layer " << l << " V float " << i;
    }

  shape.kv_bits = 4;
  KvCache q(shape);
  q.zero_blocks(3);
  const KvqLayout lay = shape.layout();
  std::vector<float> kt(fpb / shape.num_kv_heads), vv(kt.size());
  for (int l = 0; l < 2; ++l)
    for (int b = 0; b < 3; ++b)
      for (int h = 0; h < shape.num_kv_heads; ++h) {
        const uint8_t* rec = q.records(l) + (static_cast<size_t>(b) * shape.num_kv_heads + h) * lay.bytes;
        for (size_t i = 0; i < lay.bytes; ++i) ASSERT_EQ(rec[i], 0) << "layer " << l << " block " << b;
        kvq_dequantize_k(lay, rec, kt.data());
        kvq_dequantize_v(lay, rec, vv.data());
        for (size_t i = 0; i < kt.size(); ++i) ASSERT_TRUE(kt[i] == 0.0f && vv[i] == 0.0f);
      }
}

}  // namespace
}  // namespace accelcore::cpu
