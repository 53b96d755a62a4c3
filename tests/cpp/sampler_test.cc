// The sampler: argmax tie-breaking, temperature / top-k / top-p against direct references, the
// inverse-CDF draw, empirical frequencies, reproducibility, and log-probabilities.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "sample/philox.h"
#include "sample/sampler.h"
#include "test_util.h"

namespace accelcore {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// softmax(logits / T) in double; T is the float the API carries, widened exactly.
std::vector<double> softmax_ref(const std::vector<float>& logits, float temperature_f) {
  const double temperature = static_cast<double>(temperature_f);
  double mx = -INFINITY;
  for (float l : logits) mx = std::max(mx, static_cast<double>(l));
  std::vector<double> p(logits.size());
  double sum = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) sum += p[i] = std::exp((logits[i] - mx) / temperature);
  for (double& x : p) x /= sum;
  return p;
}

// Distinct logits (ties broken away) so that every ordering question has one answer.
std::vector<float> distinct_logits(std::mt19937& rng, int vocab, float scale = 3.0f) {
  std::vector<float> l = testing::random_floats(rng, vocab, -scale, scale);
  std::sort(l.begin(), l.end());
  for (size_t i = 1; i < l.size(); ++i)
    if (l[i] <= l[i - 1]) l[i] = std::nextafter(l[i - 1], kInf);
  std::shuffle(l.begin(), l.end(), rng);
  return l;
}

SamplingParams params(float temperature, int top_k = -1, float top_p = 1.0f) {
  SamplingParams p;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  return p;
}

void expect_probs_near(const std::vector<double>& got, const std::vector<double>& want, double tol = 1e-12) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], tol) << "token " << i;
    if (want[i] == 0.0) {
      EXPECT_EQ(got[i], 0.0) << "token " << i << " should be filtered out";
    }
  }
}

TEST(Argmax, TiesGoToTheLowestId) {
  std::vector<float> l = {1.0f, 3.0f, 3.0f, 2.0f, 3.0f};
  EXPECT_EQ(argmax(l.data(), 5), 1);
  std::vector<float> same(7, 0.5f);
  EXPECT_EQ(argmax(same.data(), 7), 0);
  std::vector<float> neg = {-kInf, -3.0f, -kInf, -3.0f};
  EXPECT_EQ(argmax(neg.data(), 4), 1);
  std::vector<float> inf = {0.0f, kInf, kInf};
  EXPECT_EQ(argmax(inf.data(), 3), 1);
  std::vector<float> one = {-2.0f};
  EXPECT_EQ(argmax(one.data(), 1), 0);
}

TEST(Argmax, NaNNeverWins) {
  std::vector<float> first = {kNaN, 1.0f, 2.0f, 0.0f};
  EXPECT_EQ(argmax(first.data(), 4), 2);
  std::vector<float> middle = {1.0f, kNaN, 0.5f};
  EXPECT_EQ(argmax(middle.data(), 3), 0);
  std::vector<float> last = {1.0f, 4.0f, kNaN};
  EXPECT_EQ(argmax(last.data(), 3), 1);
}

TEST(Argmax, MatchesAScanOnRandomRows) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 200; ++trial) {
    const int vocab = 1 + static_cast<int>(rng() % 300);
    std::vector<float> l(vocab);
    for (float& x : l) x = static_cast<float>(static_cast<int>(rng() % 20));  // many ties
    int32_t want = 0;
    for (int i = 1; i < vocab; ++i)
      if (l[i] > l[want]) want = i;
    EXPECT_EQ(argmax(l.data(), vocab), want);
  }
}

TEST(SampleToken, GreedyIsArgmaxForAnySeedAndPosition) {
  std::mt19937 rng(1);
  std::vector<double> scratch;
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<float> l = testing::random_floats(rng, 100, -5.0f, 5.0f);
    l[37] = l[60] = 9.0f;  // a tie for the maximum
    for (uint64_t pos = 0; pos < 5; ++pos) {
      EXPECT_EQ(sample_token(l.data(), 100, params(0.0f), rng(), pos, &scratch), 37);
      // Greedy ignores top-k / top-p.
      EXPECT_EQ(sample_token(l.data(), 100, params(0.0f, 3, 0.1f), rng(), pos, &scratch), 37);
    }
  }
}

TEST(ProcessedProbs, TemperatureMatchesSoftmaxOfScaledLogits) {
  std::mt19937 rng(2);
  std::vector<double> got;
  for (float t : {0.25f, 0.5f, 1.0f, 1.7f, 4.0f}) {
    for (int trial = 0; trial < 10; ++trial) {
      std::vector<float> l = testing::random_floats(rng, 257, -8.0f, 8.0f);
      processed_probs(l.data(), 257, params(t), &got);
      expect_probs_near(got, softmax_ref(l, t));
      EXPECT_NEAR(std::accumulate(got.begin(), got.end(), 0.0), 1.0, 1e-12);
    }
  }
  // Huge logits do not overflow (max subtraction).
  std::vector<float> big = {1000.0f, 999.0f, -1000.0f};
  processed_probs(big.data(), 3, params(1.0f), &got);
  expect_probs_near(got, softmax_ref(big, 1.0f));
  EXPECT_FALSE(std::isnan(got[0]));
}

TEST(ProcessedProbs, TopKKeepsExactlyTheKLargest) {
  std::mt19937 rng(3);
  std::vector<double> got;
  for (int k : {1, 2, 5, 49, 50}) {
    for (int trial = 0; trial < 10; ++trial) {
      const int vocab = 50;
      std::vector<float> l = distinct_logits(rng, vocab);
      processed_probs(l.data(), vocab, params(0.8f, k), &got);
      // Reference: sort ids by logit, keep the first k, softmax over those only.
      std::vector<int> order(vocab);
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int a, int b) { return l[a] > l[b]; });
      std::vector<float> masked(vocab, -kInf);
      for (int i = 0; i < k; ++i) masked[order[i]] = l[order[i]];
      std::vector<double> want = softmax_ref(masked, 0.8f);
      expect_probs_near(got, want);
      EXPECT_EQ(std::count_if(got.begin(), got.end(), [](double p) { return p > 0; }), k);
    }
  }
  // k >= vocab and k <= 0 disable the filter.
  std::vector<float> l = distinct_logits(rng, 20);
  for (int k : {-1, 0, 20, 1000}) {
    processed_probs(l.data(), 20, params(1.0f, k), &got);
    expect_probs_near(got, softmax_ref(l, 1.0f));
  }
}

TEST(ProcessedProbs, TopKKeepsAllTiesAtTheBoundary) {
  // Documented behaviour: every token whose logit equals the k-th largest survives, so a tie at the
  // boundary may keep more than k tokens (it never drops one of two equal tokens arbitrarily).
  std::vector<float> l = {1.0f, 2.0f, 2.0f, 2.0f, 0.0f, 3.0f};
  std::vector<double> got;
  processed_probs(l.data(), 6, params(1.0f, 2), &got);
  std::vector<float> masked = {-kInf, 2.0f, 2.0f, 2.0f, -kInf, 3.0f};
  expect_probs_near(got, softmax_ref(masked, 1.0f));
  // With no tie at the boundary exactly k remain.
  processed_probs(l.data(), 6, params(1.0f, 5), &got);
  EXPECT_EQ(std::count_if(got.begin(), got.end(), [](double p) { return p > 0; }), 5);
  EXPECT_EQ(got[4], 0.0);
  EXPECT_GT(got[0], 0.0);
  processed_probs(l.data(), 6, params(1.0f, 1), &got);
  expect_probs_near(got, {0.0, 0.0, 0.0, 0.0, 0.0, 1.0});
}

// Nucleus filtering, brute force: token i survives iff the total probability of the tokens ranked
// strictly before it (by probability, ties to the lower id) is below top_p. Survivors renormalised.
std::vector<double> nucleus_ref(const std::vector<double>& p, double top_p) {
  const int v = static_cast<int>(p.size());
  std::vector<double> out(v, 0.0);
  double kept = 0.0;
  for (int i = 0; i < v; ++i) {
    if (p[i] <= 0.0) continue;
    double before = 0.0;
    for (int j = 0; j < v; ++j)
      if (p[j] > p[i] || (p[j] == p[i] && j < i)) before += p[j];
    if (before < top_p) {
      out[i] = p[i];
      kept += p[i];
    }
  }
  for (double& x : out) x /= kept;
  return out;
}

TEST(ProcessedProbs, TopPMatchesBruteForceNucleus) {
  std::mt19937 rng(4);
  std::vector<double> got;
  for (float top_p : {0.05f, 0.3f, 0.5f, 0.8f, 0.95f, 0.999f}) {
    for (int trial = 0; trial < 20; ++trial) {
      const int vocab = 40;
      std::vector<float> l = distinct_logits(rng, vocab);
      processed_probs(l.data(), vocab, params(1.3f, -1, top_p), &got);
      std::vector<double> want = nucleus_ref(softmax_ref(l, 1.3f), static_cast<double>(top_p));
      expect_probs_near(got, want);
      // The most likely token always survives.
      EXPECT_GT(got[argmax(l.data(), vocab)], 0.0);
    }
  }
}

// The nucleus as one full sort of the vocabulary (the rule spelled out step by step): the
// most likely tokens (a stable sort, so ties to the lower id) until their mass reaches top_p, the
// one crossing it included; the others 0; all divided by the kept mass.
std::vector<double> full_sort_nucleus(std::vector<double> p, double top_p) {
  std::vector<int32_t> order(p.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
  double cum = 0.0;
  size_t i = 0;
  for (; i < order.size(); ++i) {
    if (p[order[i]] <= 0.0) break;
    cum += p[order[i]];
    if (cum >= top_p) {
      ++i;
      break;
    }
  }
  for (; i < order.size(); ++i) p[order[i]] = 0.0;
  for (double& x : p) x /= cum;
  return p;
}

// Large vocabularies: the nucleus sorts only its likeliest candidates, and must give exactly (bit
// for bit) what sorting the whole vocabulary gives: peaked and flat distributions, many ties,
// top-k before it, top_p near 0 and near 1.
TEST(ProcessedProbs, TopPIsExactlyTheFullSortNucleus) {
  std::mt19937 rng(12);
  std::vector<double> plain, got;
  int cases = 0;
  for (const int vocab : {1000, 4099, 32000}) {
    for (const float sigma : {0.05f, 1.0f, 4.0f, 12.0f}) {
      for (const bool ties : {false, true}) {
        std::normal_distribution<float> n(0.0f, sigma);
        std::vector<float> l(vocab);
        for (float& x : l) x = ties ? std::round(n(rng)) : n(rng);
        for (const float top_p : {1e-4f, 0.3f, 0.9f, 0.95f, 0.999f, 0.99999994f}) {
          for (const int k : {-1, 40}) {
            processed_probs(l.data(), vocab, params(0.9f, k, 1.0f), &plain);
            const std::vector<double> want = full_sort_nucleus(plain, static_cast<double>(top_p));
            processed_probs(l.data(), vocab, params(0.9f, k, top_p), &got);
            ASSERT_EQ(got.size(), want.size());
            for (int t = 0; t < vocab; ++t)
              ASSERT_EQ(got[t], want[t]) << "vocab " << vocab << " sigma " << sigma << " ties " << ties << " top_p "
                                         << top_p << " k " << k << " token " << t;
            ++cases;
          }
        }
      }
    }
  }
  EXPECT_EQ(cases, 3 * 4 * 2 * 6 * 2);
  // A few levels, each shared by many tokens, interleaved by id: the cut falls inside a level,
  // where only the order of equal probabilities (by id) decides what is kept.
  for (const int vocab : {3001, 32000}) {
    for (const int levels : {2, 3, 7}) {
      std::vector<float> l(vocab);
      for (int t = 0; t < vocab; ++t) l[t] = static_cast<float>((t * 5 + t / 7) % levels);
      for (const float top_p : {0.11f, 0.37f, 0.5f, 0.93f}) {
        processed_probs(l.data(), vocab, params(0.9f, -1, 1.0f), &plain);
        const std::vector<double> want = full_sort_nucleus(plain, static_cast<double>(top_p));
        processed_probs(l.data(), vocab, params(0.9f, -1, top_p), &got);
        for (int t = 0; t < vocab; ++t)
          ASSERT_EQ(got[t], want[t]) << "vocab " << vocab << " levels " << levels << " top_p " << top_p << " token " << t;
      }
    }
  }
}

TEST(ProcessedProbs, TopKThenTopP) {
  // As in vLLM: top-k first, renormalise, then the nucleus over what is left.
  std::mt19937 rng(6);
  std::vector<double> got;
  for (int trial = 0; trial < 30; ++trial) {
    const int vocab = 64;
    std::vector<float> l = distinct_logits(rng, vocab);
    const int k = 1 + static_cast<int>(rng() % 20);
    const float top_p = 0.2f + 0.7f * static_cast<float>(rng() % 100) / 100.0f;
    processed_probs(l.data(), vocab, params(0.7f, k, top_p), &got);
    std::vector<int> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return l[a] > l[b]; });
    std::vector<float> masked(vocab, -kInf);
    for (int i = 0; i < k; ++i) masked[order[i]] = l[order[i]];
    expect_probs_near(got, nucleus_ref(softmax_ref(masked, 0.7f), static_cast<double>(top_p)));
  }
}

TEST(ProcessedProbs, TopPTiesBreakToLowerId) {
  // Four equally likely tokens, top_p 0.5: exactly the two lowest ids reach the mass.
  std::vector<float> l = {0.0f, 0.0f, 0.0f, 0.0f};
  std::vector<double> got;
  processed_probs(l.data(), 4, params(1.0f, -1, 0.5f), &got);
  expect_probs_near(got, {0.5, 0.5, 0.0, 0.0});
}

TEST(SampleToken, IsTheInverseCdfOfProcessedProbsInIdOrder) {
  // The documented contract: u = uniform_at(seed, position); the first id whose cumulative
  // probability exceeds u.
  std::mt19937 rng(7);
  std::vector<double> scratch, probs;
  for (int trial = 0; trial < 20; ++trial) {
    const int vocab = 30;
    std::vector<float> l = distinct_logits(rng, vocab);
    SamplingParams p = params(0.9f, trial % 3 == 0 ? 10 : -1, trial % 2 == 0 ? 0.9f : 1.0f);
    processed_probs(l.data(), vocab, p, &probs);
    const uint64_t seed = rng();
    for (uint64_t pos = 0; pos < 200; ++pos) {
      const double u = uniform_at(seed, pos);
      double cum = 0.0;
      int32_t want = -1;
      for (int i = 0; i < vocab && want < 0; ++i) {
        cum += probs[i];
        if (probs[i] > 0 && u < cum) want = i;
      }
      ASSERT_GE(want, 0);
      EXPECT_EQ(sample_token(l.data(), vocab, p, seed, pos, &scratch), want);
    }
  }
}

TEST(SampleToken, EmpiricalFrequenciesMatchProcessedProbs) {
  // Many positions of one seed: the token histogram should follow processed_probs (chi-square).
  const int vocab = 12;
  std::vector<float> l = {0.1f, 2.0f, -1.0f, 1.5f, 0.7f, -3.0f, 1.9f, 0.0f, 2.2f, -0.5f, 1.0f, 0.3f};
  std::vector<double> probs, scratch;
  for (const SamplingParams& p : {params(1.0f), params(0.6f, 6), params(1.5f, -1, 0.8f), params(0.9f, 8, 0.9f)}) {
    processed_probs(l.data(), vocab, p, &probs);
    const int kDraws = 60000;
    std::vector<int> counts(vocab, 0);
    for (int i = 0; i < kDraws; ++i) ++counts[sample_token(l.data(), vocab, p, 2024, i, &scratch)];
    double chi2 = 0.0;
    int dof = -1;
    for (int t = 0; t < vocab; ++t) {
      if (probs[t] == 0.0) {
        EXPECT_EQ(counts[t], 0) << "token " << t << " is filtered out but was drawn";
        continue;
      }
      const double expected = probs[t] * kDraws;
      chi2 += (counts[t] - expected) * (counts[t] - expected) / expected;
      ++dof;
    }
    // At most 11 degrees of freedom; P(chi2 > 50) < 1e-6 there.
    EXPECT_LT(chi2, 50.0) << "dof " << dof << ", temperature " << p.temperature << " top_k " << p.top_k
                          << " top_p " << p.top_p;
  }
}

TEST(SampleToken, SameSeedAndPositionGiveTheSameToken) {
  std::mt19937 rng(8);
  const int vocab = 100;
  std::vector<float> l = testing::random_floats(rng, vocab, -1.0f, 1.0f);  // flat: many candidates
  std::vector<double> s1, s2;
  SamplingParams p = params(1.0f);
  int differ_across_seeds = 0, differ_across_positions = 0;
  for (uint64_t pos = 0; pos < 300; ++pos) {
    const int32_t a = sample_token(l.data(), vocab, p, 99, pos, &s1);
    const int32_t b = sample_token(l.data(), vocab, p, 99, pos, &s2);
    EXPECT_EQ(a, b);
    // A different scratch history must not matter: sample something else in between.
    sample_token(l.data(), vocab, params(0.3f, 5), 1, pos + 7, &s1);
    EXPECT_EQ(sample_token(l.data(), vocab, p, 99, pos, &s1), a);
    differ_across_seeds += sample_token(l.data(), vocab, p, 100, pos, &s1) != a;
    differ_across_positions += sample_token(l.data(), vocab, p, 99, pos + 1, &s1) != a;
  }
  // With ~100 near-equally likely tokens, other seeds/positions almost always differ.
  EXPECT_GT(differ_across_seeds, 250);
  EXPECT_GT(differ_across_positions, 250);
}

std::vector<double> log_softmax_ref(const std::vector<float>& l) {
  double mx = -INFINITY;
  for (float x : l) mx = std::max(mx, static_cast<double>(x));
  double s = 0.0;
  for (float x : l) s += std::exp(x - mx);
  std::vector<double> out;
  for (float x : l) out.push_back(x - mx - std::log(s));
  return out;
}

TEST(TopLogprobs, MatchesLogSoftmaxAndContainsTheTakenToken) {
  std::mt19937 rng(9);
  for (int trial = 0; trial < 20; ++trial) {
    const int vocab = 200;
    std::vector<float> l = distinct_logits(rng, vocab, 6.0f);
    const std::vector<double> ref = log_softmax_ref(l);
    std::vector<int> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return l[a] > l[b]; });
    const int k = 1 + trial % 7;
    const int32_t taken = order[k + 10];  // outside the top k
    TokenLogprobs out;
    top_logprobs(l.data(), vocab, k, taken, &out);
    ASSERT_EQ(out.size(), static_cast<size_t>(k + 1));
    for (int i = 0; i < k; ++i) {
      ASSERT_EQ(out.count(order[i]), 1u) << "top-" << i << " token missing";
      EXPECT_NEAR(out[order[i]], ref[order[i]], 1e-5);
    }
    ASSERT_EQ(out.count(taken), 1u);
    EXPECT_NEAR(out[taken], ref[taken], 1e-5);

    // The taken token inside the top k adds no extra entry.
    top_logprobs(l.data(), vocab, k, order[0], &out);
    EXPECT_EQ(out.size(), static_cast<size_t>(k));
    // k = 0: only the taken token. The map is replaced, not appended to.
    top_logprobs(l.data(), vocab, 0, order[3], &out);
    ASSERT_EQ(out.size(), 1u);
    EXPECT_NEAR(out.at(order[3]), ref[order[3]], 1e-5);
  }
  // Probabilities of the full vocabulary sum to one.
  std::vector<float> l = testing::random_floats(rng, 50, -10.0f, 10.0f);
  TokenLogprobs all;
  top_logprobs(l.data(), 50, 50, -1, &all);
  ASSERT_EQ(all.size(), 50u);
  double s = 0.0;
  for (const auto& [tok, lp] : all) {
    EXPECT_LE(lp, 0.0f);
    s += std::exp(static_cast<double>(lp));
  }
  EXPECT_NEAR(s, 1.0, 1e-5);
  // k larger than the vocabulary is clamped.
  top_logprobs(l.data(), 50, 500, 3, &all);
  EXPECT_EQ(all.size(), 50u);
}

TEST(TopLogprobs, TiesPreferTheLowerId) {
  std::vector<float> l = {0.0f, 5.0f, 1.0f, 5.0f, 5.0f};
  TokenLogprobs out;
  top_logprobs(l.data(), 5, 2, -1, &out);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out.count(1), 1u);
  EXPECT_EQ(out.count(3), 1u);
}

}  // namespace
}  // namespace accelcore
