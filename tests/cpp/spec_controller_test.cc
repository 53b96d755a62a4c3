// SmartSpec: the step-time model, the acceptance estimates, the goodput allocation of draft nodes,
// and the scheduler's speculation policies (smart, fixed, off) driven by a fake executor.
//
// The fake executor mirrors Engine::Impl::sample_all() and process() for drafted steps (append the
// root's token and the accepted path's, on_verified, then on_computed with the root plus the
// accepted nodes) with a "model" whose acceptance the test sets per request, and a step time the
// test sets as a known linear function of step_features(plan). Every request's prompt repeats a
// 10-token pattern and its output continues that pattern, so the drafter always has a
// continuation (a chain) and the exact output of every request is known in advance.
#include <accelcore/engine.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "sched/batch_plan.h"
#include "sched/request.h"
#include "sched/scheduler.h"
#include "sched/spec_controller.h"
#include "spec/drafter.h"
#include "test_util.h"

namespace accelcore {

namespace {

// The "true" step time the tests impose:
//   T = c0 + tok * tokens + kv * kv_tokens + logit * logit_rows + draft * drafted.
struct TrueCost {
  double c0 = 0, tok = 0, kv = 0, logit = 0, draft = 0;
  double at(const StepFeatures& f) const {
    return c0 + tok * f.tokens + kv * f.kv_tokens + logit * f.logit_rows + draft * f.drafted;
  }
  double coef(int i) const { return i == 0 ? c0 : i == 1 ? tok : i == 2 ? kv : i == 3 ? logit : draft; }
};

constexpr int kTerms = StepTimeModel::kTerms;
static_assert(kTerms == 5, "the tests know the terms c0, c_tok, c_kv, c_logit, c_draft");
const char* kTermName[kTerms] = {"c0", "c_tok", "c_kv", "c_logit", "c_draft"};

StepFeatures features(double tokens, double kv_tokens, double logit_rows, double drafted = 0) {
  StepFeatures f;
  f.tokens = tokens;
  f.kv_tokens = kv_tokens;
  f.logit_rows = logit_rows;
  f.drafted = drafted;
  return f;
}

double rel_err(double got, double want) { return std::fabs(got - want) / std::fabs(want); }

// tokens 1..512, kv_tokens up to 1e5, logit rows 1..64 (independent of each other); drafted 0..those
// (capped at 16) when asked for.
StepFeatures random_features(std::mt19937& rng, bool vary_logits = true, bool drafted = false) {
  std::uniform_int_distribution<int> tokens(1, 512), seqs(1, 64);
  std::uniform_real_distribution<double> kv(0.0, 1e5);
  StepFeatures f = features(tokens(rng), kv(rng), vary_logits ? seqs(rng) : 1);
  if (drafted) f.drafted = std::uniform_int_distribution<int>(0, std::min(16, static_cast<int>(f.logit_rows)))(rng);
  return f;
}

// forgetting <= 0: the default.
StepTimeModel make_model(double forgetting) { return forgetting > 0 ? StepTimeModel(forgetting) : StepTimeModel(); }
constexpr double kDefault = -1;

// ---------------------------------------------------------------------------------------------
// 1. StepTimeModel

TEST(SpecControllerTimeModel, ReadyAfterEightObservations) {
  StepTimeModel m;
  const TrueCost c{2e-3, 5e-5, 1e-8, 1e-5};
  std::mt19937 rng(7);
  for (int i = 0; i < 7; ++i) {
    const StepFeatures f = random_features(rng);
    m.observe(f, c.at(f));
    EXPECT_FALSE(m.ready()) << i + 1 << " observations";
  }
  const StepFeatures f = random_features(rng);
  m.observe(f, c.at(f));
  EXPECT_TRUE(m.ready());
  EXPECT_EQ(m.num_observations(), 8u);
  // Garbage measurements are ignored (not counted, no effect on the fit).
  const auto before = m.coefficients();
  m.observe(f, -1.0);
  m.observe(f, NAN);
  m.observe(f, INFINITY);
  EXPECT_EQ(m.num_observations(), 8u);
  EXPECT_EQ(m.coefficients(), before);
}

// ~300 noisy observations (+-1% multiplicative) of random features: the coefficients come back.
void expect_recovers(double forgetting, double tol_strong, double tol_weak, double tol_predict, uint32_t seed) {
  const TrueCost c{2e-3, 5e-5, 1e-8, 1e-5, 3e-5};
  StepTimeModel m = make_model(forgetting);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> noise(-0.01, 0.01);
  for (int i = 0; i < 304; ++i) {  // a multiple of 8: the model refits every 8th observation
    const StepFeatures f = random_features(rng, true, true);
    m.observe(f, c.at(f) * (1 + noise(rng)));
    for (double k : m.coefficients()) ASSERT_GE(k, 0.0);
  }
  ASSERT_TRUE(m.ready());
  const auto& k = m.coefficients();
  std::printf("[ info ] forgetting %.3f seed %u: relative errors", forgetting, seed);
  for (int i = 0; i < kTerms; ++i) std::printf(" %s %.4f", kTermName[i], rel_err(k[i], c.coef(i)));
  std::printf("\n");
  // c0 and c_tok carry most of the time; c_kv, c_logit and c_draft at most ~1e-3 of a 2e-3..3e-2 step.
  for (int i = 0; i < kTerms; ++i)
    EXPECT_LT(rel_err(k[i], c.coef(i)), i <= 1 ? tol_strong : tol_weak)
        << kTermName[i] << " = " << k[i] << ", true " << c.coef(i) << " (forgetting " << forgetting << ", seed " << seed
        << ")";
  // Predictions on fresh features: within the noise.
  for (int i = 0; i < 100; ++i) {
    const StepFeatures f = random_features(rng, true, true);
    EXPECT_LT(rel_err(m.predict(f), c.at(f)), tol_predict);
  }
  // row_cost is the added time of one row with logits: c_tok + c_kv * kv + c_logit; draft_cost the
  // fixed cost of a draft.
  EXPECT_DOUBLE_EQ(m.row_cost(1000.0), k[1] + k[2] * 1000.0 + k[3]);
  EXPECT_DOUBLE_EQ(m.draft_cost(), k[4]);
}

TEST(SpecControllerTimeModel, RecoversKnownCoefficientsFromNoisyObservations) {
  for (uint32_t seed : {1u, 2u, 3u}) expect_recovers(0.995, 0.01, 0.08, 0.01, seed);
}

TEST(SpecControllerTimeModel, RecoversKnownCoefficientsWithTheDefaultForgetting) {
  // The default forgets faster (fewer observations count), so the small terms are looser.
  for (uint32_t seed : {1u, 2u, 3u}) expect_recovers(kDefault, 0.03, 0.25, 0.015, seed);
}

TEST(SpecControllerTimeModel, ExactDataGivesExactCoefficients) {
  const TrueCost c{2e-3, 5e-5, 1e-8, 1e-5, 3e-5};
  StepTimeModel m;
  std::mt19937 rng(11);
  for (int i = 0; i < 40; ++i) {
    const StepFeatures f = random_features(rng, true, true);
    m.observe(f, c.at(f));
  }
  for (int i = 0; i < kTerms; ++i) EXPECT_LT(rel_err(m.coefficients()[i], c.coef(i)), 1e-6) << kTermName[i];
}

TEST(SpecControllerTimeModel, ConstantTermNeverGoesNegativeAndPredictionsStayAccurate) {
  // logit rows are always 1: indistinguishable from the intercept. The split between c0 and c_logit is
  // arbitrary, but neither may go negative and their sum must be right. drafted is always 0:
  // never seen, its coefficient stays 0.
  const TrueCost c{2e-3, 5e-5, 1e-8, 1e-5};
  for (double forgetting : {0.995, kDefault}) {
    StepTimeModel m = make_model(forgetting);
    std::mt19937 rng(5);
    std::uniform_real_distribution<double> noise(-0.01, 0.01);
    for (int i = 0; i < 304; ++i) {
      const StepFeatures f = random_features(rng, /*vary_logits=*/false);
      m.observe(f, c.at(f) * (1 + noise(rng)));
      for (int j = 0; j < kTerms; ++j) ASSERT_GE(m.coefficients()[j], 0.0) << kTermName[j] << " after " << i + 1;
    }
    const auto& k = m.coefficients();
    EXPECT_LT(rel_err(k[1], c.tok), 0.02) << k[1];
    EXPECT_LT(rel_err(k[0] + k[3], c.c0 + c.logit), 0.05) << k[0] << " + " << k[3];
    EXPECT_EQ(k[4], 0.0);
    for (int i = 0; i < 100; ++i) {
      const StepFeatures f = random_features(rng, false);
      EXPECT_LT(rel_err(m.predict(f), c.at(f)), 0.01) << "forgetting " << forgetting;
    }
  }
}

TEST(SpecControllerTimeModel, ZeroTermStaysNonNegativeUnderNoise) {
  // The true c_kv, c_logit and c_draft are 0: plain least squares would give them small negative
  // values about half the time; the fit must clamp them at 0 (and keep the others right).
  const TrueCost c{3e-3, 4e-5, 0.0, 0.0, 0.0};
  int zeroed = 0;
  for (uint32_t seed = 1; seed <= 10; ++seed) {
    StepTimeModel m;
    std::mt19937 rng(seed);
    std::uniform_real_distribution<double> noise(-0.02, 0.02);
    for (int i = 0; i < 200; ++i) {
      const StepFeatures f = random_features(rng, true, true);
      m.observe(f, c.at(f) * (1 + noise(rng)));
      for (int j = 0; j < kTerms; ++j) ASSERT_GE(m.coefficients()[j], 0.0) << kTermName[j] << " seed " << seed;
    }
    const auto& k = m.coefficients();
    zeroed += (k[2] == 0) + (k[3] == 0) + (k[4] == 0);
    EXPECT_LT(rel_err(k[0], c.c0), 0.1) << "seed " << seed;
    EXPECT_LT(rel_err(k[1], c.tok), 0.03) << "seed " << seed;
    // What the spurious terms add over the whole feature range stays small against a step.
    EXPECT_LT(k[2] * 1e5 + k[3] * 64 + k[4] * 16, 0.1 * c.c0) << "seed " << seed;
    for (int i = 0; i < 50; ++i) {
      const StepFeatures f = random_features(rng, true, true);
      EXPECT_LT(rel_err(m.predict(f), c.at(f)), 0.02) << "seed " << seed;
    }
  }
  EXPECT_GT(zeroed, 0) << "the non-negativity constraint was never active";
}

TEST(SpecControllerTimeModel, FollowsDriftThanksToForgetting) {
  const TrueCost a{2e-3, 5e-5, 1e-8, 1e-5};
  const TrueCost b{1e-3, 1e-4, 2e-8, 1e-5};  // c0 halves, c_tok and c_kv double
  for (double forgetting : {0.995, kDefault}) {
    StepTimeModel m = make_model(forgetting);
    StepTimeModel frozen(1.0);  // no forgetting: the average of both regimes
    std::mt19937 rng(21);
    std::uniform_real_distribution<double> noise(-0.01, 0.01);
    auto feed = [&](const TrueCost& c, int n) {
      for (int i = 0; i < n; ++i) {
        const StepFeatures f = random_features(rng);
        const double t = c.at(f) * (1 + noise(rng));
        m.observe(f, t);
        frozen.observe(f, t);
      }
    };
    feed(a, 400);
    EXPECT_LT(rel_err(m.coefficients()[1], a.tok), 0.03) << "forgetting " << forgetting;
    feed(b, 300);
    // More than half way to the new c_tok (old data weighs forgetting^300: 22% at 0.995; every
    // step counts by its relative error, so the new regime's larger steps do not weigh more).
    EXPECT_GT(m.coefficients()[1], (a.tok + b.tok) / 2) << m.coefficients()[1] << ", forgetting " << forgetting;
    feed(b, 700);  // 1000 in all: old data weighs 0.7% at 0.995
    const auto& k = m.coefficients();
    for (int i = 0; i < 3; ++i)
      EXPECT_LT(rel_err(k[i], b.coef(i)), 0.05) << kTermName[i] << " = " << k[i] << ", forgetting " << forgetting;
    EXPECT_LT(rel_err(k[1], b.tok), 0.02) << k[1] << ", forgetting " << forgetting;
    // Without forgetting the fit is still far off: forgetting is what makes it follow.
    EXPECT_GT(rel_err(frozen.coefficients()[1], b.tok), 0.10) << frozen.coefficients()[1];
  }
}

TEST(SpecControllerTimeModel, ProfileAnchorsTermsThatRecentStepsDoNotVary) {
  // A profile that varies everything, then many steps of one shape (64 decode rows, no drafts):
  // tokens == logit rows in every recent step, so only the profile can split c_tok from c_logit. It must
  // keep doing so however long the steady state lasts.
  const TrueCost c{1e-4, 1e-3, 1e-9, 2e-5, 0.0};
  StepTimeModel m;
  std::mt19937 rng(17);
  std::uniform_real_distribution<double> noise(-0.02, 0.02);
  for (int i = 0; i < 20; ++i) {
    const StepFeatures f = random_features(rng, true, true);
    m.observe_profile(f, c.at(f) * (1 + noise(rng)));
  }
  EXPECT_TRUE(m.ready());
  for (int i = 0; i < 5000; ++i) {
    const StepFeatures f = features(64, 64 * (300.0 + i), 64);
    m.observe(f, c.at(f) * (1 + noise(rng)));
  }
  const auto& k = m.coefficients();
  EXPECT_LT(rel_err(k[1], c.tok), 0.15) << "c_tok " << k[1] << " c_logit " << k[3];
  EXPECT_LT(rel_err(m.predict(features(64, 64 * 5300.0, 64)), c.at(features(64, 64 * 5300.0, 64))), 0.02);
}

// ---------------------------------------------------------------------------------------------
// 2. allocate_drafts against brute force

// A model fitted to noise-free times of c over varied features: its coefficients are c's (to
// rounding). The brute force below evaluates costs through the same model, so it is exact anyway.
StepTimeModel exact_model(const TrueCost& c, std::mt19937& rng) {
  StepTimeModel m;
  for (int i = 0; i < 24; ++i) {
    const StepFeatures f = random_features(rng, true, true);
    m.observe(f, c.at(f));
  }
  return m;
}

// What allocate_drafts charges for node j of a candidate: a row attending to the context and the
// node's ancestors, plus, for a request's first node, the fixed cost of drafting for it.
double node_cost(const StepTimeModel& m, const DraftCandidate& c, int j) {
  return std::max(m.row_cost(c.kv_tokens + c.depths[j] - 1) + (j == 0 ? m.draft_cost() : 0.0), 1e-12);
}

double goodput_of(const StepTimeModel& m, const StepFeatures& base, double samples,
                  const std::vector<DraftCandidate>& cands, const std::vector<int>& counts) {
  double tokens = samples, time = std::max(m.predict(base), 1e-9);
  for (size_t i = 0; i < cands.size(); ++i)
    for (int j = 0; j < counts[i]; ++j) {
      tokens += cands[i].probs[j];
      time += node_cost(m, cands[i], j);
    }
  return tokens / time;
}

// The best goodput over every choice of prefixes with at most `budget` nodes in all.
double brute_force(const StepTimeModel& m, const StepFeatures& base, double samples,
                   const std::vector<DraftCandidate>& cands, int budget, std::vector<int>* best_counts) {
  std::vector<int> counts(cands.size(), 0);
  double best = -1;
  std::function<void(size_t, int)> rec = [&](size_t i, int left) {
    if (i == cands.size()) {
      const double g = goodput_of(m, base, samples, cands, counts);
      if (g > best) {
        best = g;
        *best_counts = counts;
      }
      return;
    }
    for (int k = 0; k <= static_cast<int>(cands[i].probs.size()) && k <= left; ++k) {
      counts[i] = k;
      rec(i + 1, left - k);
    }
    counts[i] = 0;
  };
  rec(0, budget);
  return best;
}

struct AllocCase {
  StepFeatures base;
  double samples = 0;
  std::vector<DraftCandidate> cands;
  int total_nodes = 0;
};

AllocCase random_case(std::mt19937& rng) {
  AllocCase a;
  std::uniform_int_distribution<int> num_cands(1, 3), len(0, 5), seqs(1, 16), extra(0, 200);
  std::uniform_real_distribution<double> u(0.0, 1.0), kv(10.0, 20000.0);
  const int s = seqs(rng);
  a.base = features(s + (u(rng) < 0.3 ? extra(rng) : 0), s * kv(rng), s);
  a.samples = s;
  const int n = num_cands(rng);
  for (int i = 0; i < n; ++i) {
    DraftCandidate c;
    const int l = len(rng);
    for (int j = 0; j < l; ++j) {
      c.probs.push_back(static_cast<float>(u(rng)));
      c.depths.push_back(j + 1);  // a chain: depth grows, so does the row's cost
    }
    std::sort(c.probs.begin(), c.probs.end(), std::greater<float>());
    c.kv_tokens = kv(rng);
    c.chosen = 77;  // must be overwritten
    a.total_nodes += l;
    a.cands.push_back(std::move(c));
  }
  return a;
}

double log_uniform(std::mt19937& rng, double lo, double hi) {
  return std::exp(std::uniform_real_distribution<double>(std::log(lo), std::log(hi))(rng));
}

// flat_rows: c_kv = 0 (every row costs the same); draft: the fixed cost per drafted request,
// relative to c_tok (0: none).
TrueCost random_cost(std::mt19937& rng, bool flat_rows, double draft = 0) {
  TrueCost c;
  c.c0 = log_uniform(rng, 1e-4, 2e-2);
  c.tok = log_uniform(rng, 1e-6, 1e-3);
  c.kv = flat_rows ? 0.0 : log_uniform(rng, 1e-10, 1e-7);
  c.logit = log_uniform(rng, 1e-7, 1e-5);
  c.draft = draft * c.tok;
  return c;
}

struct AllocTally {
  int cases = 0, none = 0, all = 0, partial = 0, suboptimal = 0;
  double worst = 1.0;  // lowest goodput / best
};

// One random case: checks the budget, the returned goodput, and compares with the brute force.
// exact: the greedy result must be optimal.
void check_case(const StepTimeModel& m, AllocCase a, int budget, bool exact, AllocTally* t) {
  const double g = allocate_drafts(m, a.base, a.samples, budget, &a.cands);
  std::vector<int> got, want;
  for (const auto& c : a.cands) got.push_back(c.chosen);
  const double best = brute_force(m, a.base, a.samples, a.cands, budget, &want);
  const double g_got = goodput_of(m, a.base, a.samples, a.cands, got);
  EXPECT_NEAR(g, g_got, 1e-9 * g_got) << "returned goodput differs from the chosen drafts' goodput";
  const int taken = std::accumulate(got.begin(), got.end(), 0);
  EXPECT_LE(taken, budget);
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_GE(got[i], 0);
    EXPECT_LE(got[i], static_cast<int>(a.cands[i].probs.size()));
  }
  EXPECT_LE(g_got, best * (1 + 1e-12));
  // Drafting never lowers the predicted goodput below the plain step's.
  EXPECT_GE(g_got, a.samples / std::max(m.predict(a.base), 1e-9) * (1 - 1e-12));
  // Same counts, or (a tie) the same goodput.
  if (exact && got != want) {
    EXPECT_NEAR(g_got, best, 1e-9 * best) << "case " << t->cases;
  }
  ++t->cases;
  t->worst = std::min(t->worst, g_got / best);
  t->suboptimal += g_got < best * (1 - 1e-9);
  if (a.total_nodes > 0) {
    if (taken == 0) ++t->none;
    else if (taken == a.total_nodes) ++t->all;
    else ++t->partial;
  }
}

// The goodput guard: it measures the side without drafts first (every kProbe-th step), then
// lets drafting go on only where it measures at least as fast, probing the other side.
TEST(GoodputGuard, MeasuresThenFollowsTheFasterSideAndProbesTheOther) {
  for (bool drafts_pay : {true, false}) {
    SCOPED_TRACE(drafts_pay ? "drafts pay" : "drafts do not pay");
    GoodputGuard g;
    const int seqs = 6;  // the range 4-7
    // Unmeasured: drafts allowed but on every kProbe-th step, which measures the other side.
    int forbidden = 0, steps = 0;
    auto step = [&](bool allowed) {
      ++steps;
      forbidden += !allowed;
      // With drafts 3 tokens in 2 ms (or 7 in 10 ms), without 6 tokens in 1 ms.
      if (allowed)
        g.observe(seqs, true, drafts_pay ? 14.0 : 7.0, drafts_pay ? 1e-3 : 10e-3);
      else
        g.observe(seqs, false, 6.0, 1e-3);
    };
    for (int i = 0; i < static_cast<int>(GoodputGuard::kProbe * GoodputGuard::kMinSteps); ++i) step(g.allow_drafts(seqs));
    EXPECT_GE(forbidden, static_cast<int>(GoodputGuard::kMinSteps));
    EXPECT_NEAR(g.tokens_per_second(seqs, false), 6000.0, 1e-6);
    EXPECT_NEAR(g.tokens_per_second(seqs, true), drafts_pay ? 14000.0 : 700.0, 1e-6);
    // Measured: the faster side, and the other one step in kProbe.
    forbidden = steps = 0;
    const int n = 10 * GoodputGuard::kProbe;
    for (int i = 0; i < n; ++i) step(g.allow_drafts(seqs));
    EXPECT_EQ(forbidden, drafts_pay ? n / static_cast<int>(GoodputGuard::kProbe) : n - n / static_cast<int>(GoodputGuard::kProbe));
    // Other ranges are measured apart: 8 sequences are still unmeasured.
    EXPECT_EQ(g.tokens_per_second(8, true), 0.0);
  }
}

TEST(GoodputGuard, FewSequencesAreLeftToTheModel) {
  GoodputGuard g;
  for (int i = 0; i < 4 * static_cast<int>(GoodputGuard::kProbe); ++i) {
    ASSERT_TRUE(g.allow_drafts(GoodputGuard::kMinSeqs - 1));
    g.observe(GoodputGuard::kMinSeqs - 1, true, 1.0, 1.0);  // drafting far slower: ignored
  }
  EXPECT_EQ(g.tokens_per_second(GoodputGuard::kMinSeqs - 1, true), 0.0);
}

TEST(GoodputGuard, FollowsAChange) {
  GoodputGuard g;
  const int seqs = 40;
  for (int i = 0; i < 200; ++i) {
    const bool a = g.allow_drafts(seqs);
    g.observe(seqs, a, a ? 20.0 : 10.0, 1e-3);  // drafting twice as fast
  }
  EXPECT_TRUE(g.allow_drafts(seqs) || g.allow_drafts(seqs));
  // Now drafting costs 4x the time for the same tokens: the probes pick that up and it stops.
  for (int i = 0; i < 40 * static_cast<int>(GoodputGuard::kProbe); ++i) {
    const bool a = g.allow_drafts(seqs);
    g.observe(seqs, a, a ? 20.0 : 10.0, a ? 4e-3 : 1e-3);
  }
  int allowed = 0;
  for (int i = 0; i < static_cast<int>(GoodputGuard::kProbe); ++i) allowed += g.allow_drafts(seqs);
  EXPECT_EQ(allowed, 1);
}

TEST(SpecControllerAllocate, MatchesBruteForceWhenTheBudgetIsAmple) {
  // No fixed cost per drafted request: within a candidate each node is worth less and costs more
  // than its parent, and greedy by marginal ratio is optimal.
  std::mt19937 rng(1234);
  AllocTally t;
  for (int model_i = 0; model_i < 60; ++model_i) {
    const StepTimeModel m = exact_model(random_cost(rng, false), rng);
    for (int rep = 0; rep < 30; ++rep) {
      AllocCase a = random_case(rng);
      check_case(m, a, a.total_nodes + static_cast<int>(rng() % 3), true, &t);
    }
  }
  // The cases exercise every regime, not only "take nothing" or "take everything".
  EXPECT_GT(t.none, t.cases / 20) << t.none << " none, " << t.all << " all, " << t.partial << " partial of " << t.cases;
  EXPECT_GT(t.all, t.cases / 20) << t.none << " none, " << t.all << " all, " << t.partial << " partial of " << t.cases;
  EXPECT_GT(t.partial, t.cases / 10) << t.none << " none, " << t.all << " all, " << t.partial << " partial of " << t.cases;
  EXPECT_EQ(t.suboptimal, 0);
}

TEST(SpecControllerAllocate, MatchesBruteForceUnderABindingBudgetWhenRowsCostTheSame) {
  // With c_kv = 0 (and no fixed cost) every draft row costs c_tok, so the greedy order (by
  // probability) is also the best order under a cap on the number of nodes.
  std::mt19937 rng(99);
  AllocTally t;
  int binding = 0;
  for (int model_i = 0; model_i < 40; ++model_i) {
    const StepTimeModel m = exact_model(random_cost(rng, /*flat_rows=*/true), rng);
    for (int rep = 0; rep < 30; ++rep) {
      AllocCase a = random_case(rng);
      if (a.total_nodes == 0) continue;
      const int budget = static_cast<int>(rng() % a.total_nodes);  // < all of them
      const int before = t.all + t.partial;
      check_case(m, a, budget, true, &t);
      binding += budget > 0 && t.all + t.partial > before;
    }
  }
  EXPECT_GT(binding, 100) << "the budget was rarely the limit";
  EXPECT_EQ(t.suboptimal, 0);
}

TEST(SpecControllerAllocate, RespectsTheBudgetAndStaysCloseToBestWhenRowCostsDiffer) {
  // Greedy by marginal ratio is not exactly optimal under a binding node cap when rows cost
  // different amounts (a cheap unlikely node may take the last slot from a dear likely one); the
  // cap must hold and the loss stays small.
  std::mt19937 rng(4242);
  AllocTally t;
  for (int model_i = 0; model_i < 40; ++model_i) {
    const StepTimeModel m = exact_model(random_cost(rng, false), rng);
    for (int rep = 0; rep < 30; ++rep) {
      AllocCase a = random_case(rng);
      if (a.total_nodes == 0) continue;
      check_case(m, a, static_cast<int>(rng() % (a.total_nodes + 1)), false, &t);
    }
  }
  std::printf("[ info ] binding budget, differing row costs: %d of %d cases below the optimum, worst ratio %.5f\n",
              t.suboptimal, t.cases, t.worst);
  // Row costs here differ by up to ~1000x between requests (c_kv * context against c_tok), an
  // extreme spread; the loss stays bounded.
  EXPECT_GT(t.worst, 0.8) << "worst goodput / best " << t.worst;
  EXPECT_LT(t.suboptimal, t.cases / 10);
}

TEST(SpecControllerAllocate, FixedCostPerDraftedRequest) {
  // With a fixed cost per drafted request (c_draft, charged to its first node) a first node can be
  // a loss on its own yet pay off with the nodes after it, so "stop at the first node whose own
  // ratio does not beat the goodput" is no longer optimal.
  {
    // By hand: c_tok 1e-4, c_draft 2e-4; 8 decoding rows in 2e-3 s (goodput 4000 tokens/s). A
    // draft of 5 likely nodes: the first alone is worth 0.9 / 3e-4 = 3000 < 4000, all five
    // (0.9 + 0.85 + 0.8 + 0.75 + 0.7) / 7e-4 = 5714 > 4000: the step goes from 4000 to
    // (8 + 4) / 2.7e-3 = 4444 tokens/s with the draft.
    std::mt19937 rng(5);
    const StepTimeModel m = exact_model(TrueCost{1.2e-3, 1e-4, 0.0, 0.0, 2e-4}, rng);
    std::vector<DraftCandidate> v(1);
    v[0].probs = {0.9f, 0.85f, 0.8f, 0.75f, 0.7f};
    v[0].depths = {1, 2, 3, 4, 5};
    v[0].kv_tokens = 100;
    const StepFeatures base = features(8, 800, 8);
    ASSERT_NEAR(m.predict(base), 2e-3, 1e-9);
    ASSERT_NEAR(m.draft_cost(), 2e-4, 1e-9);
    const double g = allocate_drafts(m, base, 8, 100, &v);
    std::vector<int> want;
    const double best = brute_force(m, base, 8, v, 100, &want);
    EXPECT_EQ(want[0], 5);
    EXPECT_NEAR(best, 12 / 2.7e-3, 1);
    EXPECT_EQ(v[0].chosen, 5) << "goodput " << g << " instead of " << best;
  }
  // Random cases, ample budget, c_draft from half a row to eight rows.
  std::mt19937 rng(777);
  for (double draft : {0.5, 2.0, 8.0}) {
    AllocTally t;
    for (int model_i = 0; model_i < 40; ++model_i) {
      const StepTimeModel m = exact_model(random_cost(rng, false, draft), rng);
      ASSERT_GT(m.draft_cost(), 0.0);
      for (int rep = 0; rep < 30; ++rep) {
        AllocCase a = random_case(rng);
        check_case(m, a, a.total_nodes, false, &t);
      }
    }
    std::printf("[ info ] c_draft = %.1f c_tok, ample budget: %d of %d cases below the optimum, worst ratio %.5f\n",
                draft, t.suboptimal, t.cases, t.worst);
    EXPECT_EQ(t.suboptimal, 0) << "c_draft = " << draft << " c_tok: worst goodput / best " << t.worst;
  }
}

TEST(SpecControllerAllocate, EdgeCases) {
  std::mt19937 rng(3);
  const StepTimeModel m = exact_model(TrueCost{1e-2, 1e-5, 1e-9, 1e-6, 0.0}, rng);
  const StepFeatures base = features(2, 400, 2);
  auto make = [] {
    std::vector<DraftCandidate> v(2);
    v[0].probs = {0.9f, 0.8f, 0.7f};
    v[0].depths = {1, 2, 3};
    v[0].kv_tokens = 200;
    v[1].probs = {};  // no draft
    v[1].kv_tokens = 100;
    return v;
  };
  // Budget 0: nothing, and the goodput is the plain step's.
  auto v = make();
  double g = allocate_drafts(m, base, 2, 0, &v);
  EXPECT_EQ(v[0].chosen, 0);
  EXPECT_EQ(v[1].chosen, 0);
  EXPECT_NEAR(g, 2 / m.predict(base), 1e-9 * g);
  // Weight-bound step (large c0, tiny row cost): everything likely is taken, up to the budget.
  v = make();
  allocate_drafts(m, base, 2, 2, &v);
  EXPECT_EQ(v[0].chosen, 2);
  v = make();
  g = allocate_drafts(m, base, 2, 100, &v);
  EXPECT_EQ(v[0].chosen, 3);
  EXPECT_EQ(v[1].chosen, 0);
  EXPECT_NEAR(g, (2 + 0.9 + 0.8 + 0.7) / (m.predict(base) + 3 * m.row_cost(200) + 3 * m.coefficients()[2]), 1e-4 * g);
  // Zero-probability nodes are never worth a row.
  v = make();
  v[0].probs = {0.5f, 0.0f, 0.0f};
  allocate_drafts(m, base, 2, 100, &v);
  EXPECT_EQ(v[0].chosen, 1);
}

TEST(SpecControllerOrder, SortsKeepsParentsFirstAndCarriesFields) {
  // root -> a(0) -> b(1) -> c(2); root -> d(3) -> e(4); probabilities not in node order.
  DraftTree t;
  t.tokens = {10, 11, 12, 13, 14};
  t.parents = {-1, 0, 1, -1, 3};
  t.depths = {1, 2, 3, 1, 2};
  t.shares = {1.0f, 1.0f, 1.0f, 0.5f, 1.0f};
  t.match = 6;
  std::vector<float> p = {0.6f, 0.3f, 0.1f, 0.4f, 0.3f};
  order_by_probability(&t, &p);
  EXPECT_EQ(t.match, 6);  // verification files its outcome under the match length
  EXPECT_EQ(p, (std::vector<float>{0.6f, 0.4f, 0.3f, 0.3f, 0.1f}));
  EXPECT_EQ(t.tokens, (std::vector<int32_t>{10, 13, 11, 14, 12}));  // ties (0.3) keep their order
  EXPECT_EQ(t.parents, (std::vector<int32_t>{-1, -1, 0, 1, 2}));
  EXPECT_EQ(t.depths, (std::vector<int32_t>{1, 1, 2, 2, 3}));
  EXPECT_EQ(t.shares, (std::vector<float>{1.0f, 0.5f, 1.0f, 1.0f, 1.0f}));
  for (int i = 0; i < t.size(); ++i) EXPECT_LT(t.parents[i], i);
}

// ---------------------------------------------------------------------------------------------
// 5. SpecController acceptance estimates

DraftTree chain(int n, int32_t first_token = 100) {
  DraftTree t;
  for (int i = 0; i < n; ++i) {
    t.tokens.push_back(first_token + i);
    t.parents.push_back(i - 1);
    t.depths.push_back(i + 1);
    t.shares.push_back(1.0f);
  }
  return t;
}

TEST(SpecController, RatesStartAtThePriorAndFallBackToGlobal) {
  SpecController sc(SpecPolicy::kSmart, 4, 32);
  Request r;
  EXPECT_EQ(sc.policy(), SpecPolicy::kSmart);
  ASSERT_EQ(sc.global_rates(/*greedy=*/false).size(), 5u);
  for (int d = 1; d <= 4; ++d) EXPECT_FLOAT_EQ(sc.rate(&r, d), 0.5f);
  EXPECT_EQ(sc.rate(&r, 0), 0.0f);
  EXPECT_EQ(sc.rate(&r, 5), 0.0f);
  // An upper bound of a first node's probability: at least the prior, at most 1.
  EXPECT_GE(sc.first_node_bound(&r), 0.5f);
  EXPECT_LE(sc.first_node_bound(&r), 1.0f);
}

TEST(SpecController, FullAcceptanceRaisesRatesTowardOneAndRejectionLowersThem) {
  SpecController sc(SpecPolicy::kSmart, 4, 32);
  const DraftTree t = chain(4);
  const int32_t all[4] = {0, 1, 2, 3};
  // Give the global rates some history first (other requests, mixed results), so that they are
  // past their first observations (a plain mean over those) and into the moving average.
  std::vector<Request> others(60);
  for (size_t i = 0; i < others.size(); ++i) sc.on_verified(&others[i], t, all, i % 2 ? 4 : 0);
  const float g_start = sc.global_rates(/*greedy=*/false)[1];
  EXPECT_NEAR(g_start, 0.5f, 0.15f);

  Request r, fresh;
  float prev_req = sc.rate(&r, 1), prev_glob = g_start;
  EXPECT_FLOAT_EQ(prev_req, g_start);  // no history of its own: the global rate
  for (int k = 1; k <= 20; ++k) {
    sc.on_verified(&r, t, all, 4);
    ASSERT_EQ(r.spec_accept.size(), 5u);
    for (int d = 1; d <= 4; ++d) EXPECT_GT(sc.rate(&r, d), d == 1 ? prev_req : 0.5f) << "depth " << d << " after " << k;
    // The fraction of the way to the new observation each moved: the global one moves more slowly.
    const float step_req = (sc.rate(&r, 1) - prev_req) / (1 - prev_req);
    const float step_glob = (sc.global_rates(/*greedy=*/false)[1] - prev_glob) / (1 - prev_glob);
    EXPECT_GT(step_glob, 0.0f);
    EXPECT_GT(step_req, 2 * step_glob) << "after " << k << ": the global rate must move more slowly";
    prev_req = sc.rate(&r, 1);
    prev_glob = sc.global_rates(/*greedy=*/false)[1];
  }
  for (int d = 1; d <= 4; ++d) EXPECT_GT(sc.rate(&r, d), 0.99f) << "depth " << d;
  EXPECT_LT(sc.global_rates(/*greedy=*/false)[1], g_start + 0.3f);
  // A request never verified reads the global rates.
  EXPECT_TRUE(fresh.spec_accept.empty());
  for (int d = 1; d <= 4; ++d) EXPECT_FLOAT_EQ(sc.rate(&fresh, d), sc.global_rates(/*greedy=*/false)[d]);

  // Rejection of the first node: only depth 1 was observed.
  const float g_before = sc.global_rates(/*greedy=*/false)[1];
  for (int k = 0; k < 20; ++k) sc.on_verified(&r, t, all, 0);
  EXPECT_LT(sc.rate(&r, 1), 0.01f);
  for (int d = 2; d <= 4; ++d) EXPECT_GT(sc.rate(&r, d), 0.99f) << "depth " << d << " was never observed again";
  EXPECT_LT(sc.global_rates(/*greedy=*/false)[1], g_before);
  EXPECT_GT(sc.global_rates(/*greedy=*/false)[1], g_before - 0.4f);  // moved, but much less than the request's
  EXPECT_GT(sc.global_rates(/*greedy=*/false)[2], g_start);            // depths 2..4 untouched by these

  // First verification of `fresh`: it starts from the global rates and moves from there. Depths 1
  // and 2 hit, 3 missed, 4 not observed.
  std::array<float, 5> g;
  for (int d = 1; d <= 4; ++d) g[d] = sc.global_rates(/*greedy=*/false)[d];
  sc.on_verified(&fresh, t, all, 2);
  EXPECT_GT(sc.rate(&fresh, 1), g[1]);
  EXPECT_GT(sc.rate(&fresh, 2), g[2]);
  EXPECT_LT(sc.rate(&fresh, 3), g[3]);
  EXPECT_FLOAT_EQ(sc.rate(&fresh, 4), g[4]);
}

TEST(SpecController, GlobalRatesAverageTheirFirstObservations) {
  // Over its first observations a global rate is a plain mean (the prior counting as one), so the
  // first few move it more than a request's moving average moves; this is by design.
  SpecController sc(SpecPolicy::kSmart, 2, 32);
  Request r;
  const DraftTree t = chain(2);
  const int32_t all[2] = {0, 1};
  sc.on_verified(&r, t, all, 2);
  EXPECT_NEAR(sc.global_rates(/*greedy=*/false)[1], 0.75f, 1e-6);  // (0.5 + 1) / 2
  sc.on_verified(&r, t, all, 0);
  EXPECT_NEAR(sc.global_rates(/*greedy=*/false)[1], 0.5f, 1e-6);  // (0.5 + 1 + 0) / 3
  EXPECT_NEAR(sc.global_rates(/*greedy=*/false)[2], 0.75f, 1e-6);  // depth 2 observed once
}

TEST(SpecController, TheCheapBoundFollowsTheRequestsLastMatch) {
  // Drafts matched by 1 to 4 tokens are always rejected, by 9 to 16 always accepted.
  SpecController sc(SpecPolicy::kSmart, 2, 32), short_only(SpecPolicy::kSmart, 2, 4);
  const int32_t all[2] = {0, 1};
  std::vector<Request> others(400);
  for (size_t i = 0; i < others.size(); ++i) {
    DraftTree t = chain(2);
    const bool long_match = i % 2;
    t.match = long_match ? 9 + static_cast<int>(i % 8) : 1 + static_cast<int>(i % 4);
    sc.on_verified(&others[i], t, all, long_match ? 2 : 0);
    if (!long_match) short_only.on_verified(&others[i], t, all, 0);
  }
  Request r;
  EXPECT_FLOAT_EQ(sc.first_node_bound(&r), 1.0f);  // no proposal yet: worth a look
  r.spec_match = 2;  // the next match is at most 3 long: the rejected buckets
  const float low = sc.first_node_bound(&r);
  EXPECT_LT(low, 0.1f);
  r.spec_match = 12;
  EXPECT_GT(sc.first_node_bound(&r), 0.7f);  // scaled by the calibration, which the misses lowered
  EXPECT_GT(sc.first_node_bound(&r), 8 * low);
  r.spec_match = 0;  // no match last time
  EXPECT_LT(sc.first_node_bound(&r), 0.1f);
  // Ten tokens later the match may be up to ten tokens longer: a long match's bound.
  r.prompt.assign(30, 1);
  r.spec_match_tokens = 20;
  r.spec_match = 2;
  EXPECT_GT(sc.first_node_bound(&r), 0.7f);
  r.spec_match_tokens = 29;  // one token since: a match of 3 at most
  EXPECT_FLOAT_EQ(sc.first_node_bound(&r), low);
  // A match at the drafter's max_match stays in its bucket (no longer match can come).
  r.spec_match = 4;
  EXPECT_LT(short_only.first_node_bound(&r), 0.1f);
}

// The bound no lookup can beat: at least every request's own first-node bound, whatever its last
// match and record; below 1 once only rejections were seen.
TEST(SpecController, TheLikeliestFirstNodeBoundsEveryRequest) {
  SpecController sc(SpecPolicy::kSmart, 2, 32);
  EXPECT_FLOAT_EQ(sc.max_first_node_rate(/*greedy=*/false, /*sampled=*/true), 1.0f);  // (prior 0.5 + bonus 0.3) x 1.25, capped: worth a look
  const int32_t all[2] = {0, 1};
  std::vector<Request> seen(600);
  for (size_t i = 0; i < seen.size(); ++i) {
    DraftTree t = chain(2);
    t.match = 1 + static_cast<int>(i % 20);
    sc.on_verified(&seen[i], t, all, i % 3 == 0 ? 2 : 0);  // a third accepted
  }
  const float best = sc.max_first_node_rate(/*greedy=*/false, /*sampled=*/true);
  for (size_t i = 0; i < seen.size(); i += 7)
    for (int m : {0, 1, 3, 8, 16, 40}) {
      seen[i].spec_match = m;
      EXPECT_LE(sc.first_node_bound(&seen[i]), best) << "request " << i << ", match " << m;
    }
  SpecController rejected(SpecPolicy::kSmart, 2, 32);
  for (size_t i = 0; i < seen.size(); ++i) {
    DraftTree t = chain(2);
    t.match = 1 + static_cast<int>(i % 20);
    rejected.on_verified(&seen[i], t, all, 0);
  }
  EXPECT_LT(rejected.max_first_node_rate(/*greedy=*/false, /*sampled=*/true), 0.2f);
}

TEST(SpecController, CalibrationDoesNotScaleTheExplorationBonus) {
  // Every draft matched by 1 token rejected: the calibration factor falls to its floor, yet a
  // match length never tried keeps at least the exploration bonus, so it still gets tried.
  SpecController sc(SpecPolicy::kSmart, 2, 32);
  const int32_t all[2] = {0, 1};
  std::vector<Request> others(300);
  for (Request& o : others) {
    DraftTree t = chain(2);
    t.match = 1;
    sc.on_verified(&o, t, all, 0);
  }
  Request r;
  r.spec_match = 0;  // the next match is 1 token long at most
  EXPECT_LT(sc.first_node_bound(&r), 0.05f);
  r.spec_match = 20;
  EXPECT_GE(sc.first_node_bound(&r), 0.3f);  // kExplore, and the calibrated prior
}

TEST(SpecController, RelaxPullsARequestBackTowardTheGlobalRates) {
  // A request that stopped drafting after a bad stretch drifts back, so that it gets tried again.
  SpecController sc(SpecPolicy::kSmart, 2, 32);
  const DraftTree t = chain(2);
  const int32_t all[2] = {0, 1};
  std::vector<Request> others(40);
  for (Request& o : others) sc.on_verified(&o, t, all, 2);
  Request r;
  for (int k = 0; k < 20; ++k) sc.on_verified(&r, t, all, 0);
  r.spec_match = 1;
  const float low = sc.rate(&r, 1), global = sc.global_rates(/*greedy=*/false)[1];
  ASSERT_LT(low, 0.05f);
  ASSERT_GT(global, 0.5f);
  const float bound_low = sc.first_node_bound(&r);
  float prev = low;
  for (int k = 0; k < 100; ++k) {
    sc.relax(&r);
    EXPECT_GE(sc.rate(&r, 1), prev);
    prev = sc.rate(&r, 1);
  }
  EXPECT_NEAR(sc.rate(&r, 1), global, 0.05f * global);
  EXPECT_FLOAT_EQ(sc.global_rates(/*greedy=*/false)[1], global);  // relax does not touch the global rates
  EXPECT_GT(sc.first_node_bound(&r), bound_low);
  // A request with no history has nothing to relax.
  Request fresh;
  sc.relax(&fresh);
  EXPECT_TRUE(fresh.spec_accept.empty());
}

TEST(SpecController, OnlyTheMostFrequentChildCountsAsAHitAndLeavesEndTheObservation) {
  SpecController sc(SpecPolicy::kSmart, 4, 32);
  // root -> 0 (share 1) -> 2 ; root -> 1 (share 0.5) -> 3
  DraftTree t;
  t.tokens = {5, 6, 7, 8};
  t.parents = {-1, -1, 0, 1};
  t.depths = {1, 1, 2, 2};
  t.shares = {1.0f, 0.5f, 1.0f, 1.0f};
  t.match = 8;
  Request r;
  // The less frequent branch accepted twice deep: depth 1 is a miss (the top child lost), depth 2
  // a hit (node 3 is the top child of node 1), depth 3 not observed (node 3 is a leaf).
  const int32_t path[2] = {1, 3};
  sc.on_verified(&r, t, path, 2);
  EXPECT_LT(sc.rate(&r, 1), 0.5f);
  EXPECT_GT(sc.rate(&r, 2), 0.5f);
  EXPECT_FLOAT_EQ(sc.rate(&r, 3), 0.5f);
  EXPECT_FLOAT_EQ(sc.rate(&r, 4), 0.5f);
  EXPECT_LT(sc.global_rates(/*greedy=*/false)[1], 0.5f);
  EXPECT_GT(sc.global_rates(/*greedy=*/false)[2], 0.5f);
  EXPECT_FLOAT_EQ(sc.global_rates(/*greedy=*/false)[3], 0.5f);
}

TEST(SpecController, NodeProbabilitiesArePathProductsScaledByShare) {
  SpecController sc(SpecPolicy::kSmart, 4, 32);
  DraftTree t;  // root -> 0 (share 1) -> 2 -> 4 ; root -> 1 (share 0.5) -> 3
  t.tokens = {5, 6, 7, 8, 9};
  t.parents = {-1, -1, 0, 1, 2};
  t.depths = {1, 1, 2, 2, 3};
  t.shares = {1.0f, 0.5f, 1.0f, 1.0f, 1.0f};
  t.match = 20;
  Request r;
  const DraftTree c = chain(4);
  const int32_t all[4] = {0, 1, 2, 3};
  for (int k = 0; k < 10; ++k) sc.on_verified(&r, c, all, k % 3 ? 1 : 3);
  std::vector<float> p;
  sc.node_probabilities(&r, t, &p);
  ASSERT_EQ(p.size(), 5u);
  for (int i = 0; i < 5; ++i) {
    EXPECT_GT(p[i], 0.0f) << i;
    EXPECT_LE(p[i], 1.0f) << i;
    if (t.parents[i] >= 0) {
      EXPECT_LE(p[i], p[t.parents[i]]) << i;
    }
  }
  // Siblings: the half-as-frequent one is at most as likely, and at least half as likely.
  EXPECT_LE(p[1], p[0]);
  EXPECT_GE(p[1], 0.5f * p[0] * (1 - 1e-6f));
  // The bound from a match one shorter (the last proposal's) covers every first node.
  r.spec_match = t.match - 1;
  EXPECT_GE(sc.first_node_bound(&r) * (1 + 1e-6f), std::max(p[0], p[1]));
}

TEST(SpecController, LongMatchesEarnHigherProbabilities) {
  // Drafts found by long context matches are always accepted, those by 1-token matches never:
  // the per-match-length rates learn it.
  SpecController sc(SpecPolicy::kSmart, 4, 32);
  DraftTree long_match = chain(4), short_match = chain(4);
  long_match.match = 32;
  short_match.match = 1;
  const int32_t all[4] = {0, 1, 2, 3};
  std::vector<Request> rs(200);
  for (size_t i = 0; i < rs.size(); ++i) {
    if (i % 2)
      sc.on_verified(&rs[i], long_match, all, 4);
    else
      sc.on_verified(&rs[i], short_match, all, 0);
  }
  Request fresh;
  std::vector<float> pl, ps;
  sc.node_probabilities(&fresh, long_match, &pl);
  sc.node_probabilities(&fresh, short_match, &ps);
  std::printf("[ info ] first node: long match %.3f, short match %.3f (global rate %.3f)\n", pl[0], ps[0],
              sc.global_rates(/*greedy=*/false)[1]);
  EXPECT_GT(pl[0], 0.6f);
  EXPECT_LT(ps[0], 0.3f);
  EXPECT_GT(pl[3], ps[0]);
}

// The calibration map against the acceptance it is fed: an estimate e is accepted with
// probability truth(e). Checked at the ranges' centres, where the map is each range's mean.
TEST(CalibrationMap, IsTheIdentityUntilObservedThenLearnsTheMeasuredAcceptance) {
  CalibrationMap f;
  for (float e : {0.05f, 0.25f, 0.55f, 0.95f}) EXPECT_NEAR(f(e), e, 1e-6) << e;
  EXPECT_FLOAT_EQ(f(0.0f), 0.0f);
  EXPECT_FLOAT_EQ(f(1.0f), 0.95f);  // past the last centre: the last range's value
  // Underconfident in the middle, as SmartSpec's estimates were on stories260K.
  auto truth = [](float e) { return std::min(1.0f, e < 0.2f ? e : 0.15f + 1.2f * e); };
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (int i = 0; i < 5000; ++i) {
    const float e = u(rng);
    f.observe(e, u(rng) < truth(e));
  }
  for (int b = 0; b < CalibrationMap::kBins; ++b) {
    const float centre = (b + 0.5f) / CalibrationMap::kBins;
    EXPECT_NEAR(f(centre), truth(centre), 0.12f) << "estimate " << centre;  // about 100 observations count per range
    EXPECT_FLOAT_EQ(f.at_centres()[b], f(centre));  // what stats() shows
  }
  EXPECT_GT(f(0.45f), 0.6f);
}

TEST(CalibrationMap, StaysMonotoneWhenTheMeasurementsAreNot) {
  // Estimates below 0.5 accepted 80% of the time, above it 40%: pooled, never decreasing.
  CalibrationMap f;
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (int i = 0; i < 4000; ++i) {
    const float e = u(rng);
    f.observe(e, u(rng) < (e < 0.5f ? 0.8f : 0.4f));
  }
  float prev = 0;
  for (int k = 0; k <= 1000; ++k) {
    const float v = f(k / 1000.0f);
    ASSERT_GE(v, prev) << "estimate " << k / 1000.0f;
    prev = v;
  }
  // Pooled across the violation: the overall mean (0.6) where the two halves meet.
  EXPECT_NEAR(f(0.45f), 0.6f, 0.08f);
  EXPECT_NEAR(f(0.55f), 0.6f, 0.08f);
}

TEST(CalibrationMap, RangesNoLongerReachedDriftBackToTheIdentity) {
  CalibrationMap f;
  for (int i = 0; i < 2000; ++i) f.observe(0.75f, false);  // estimates of 0.75 all rejected
  EXPECT_LT(f(0.75f), 0.05f);
  for (int i = 0; i < 6000; ++i) f.observe(0.95f, true);  // later requests estimate 0.95, all accepted
  EXPECT_GT(f(0.75f), 0.6f);
  EXPECT_GT(f(0.95f), 0.95f);
}

// A node's estimate is calibrated before use: here every less frequent sibling (shares 0.3 to 0.6)
// of an always-accepted node is rejected, so such siblings come to be priced near 0, where the share
// alone made them 0.4; the order by probability stays a tree.
TEST(SpecController, EstimatesAreCalibratedAgainstWhatWasAccepted) {
  SpecController sc(SpecPolicy::kSmart, 2, 32);
  DraftTree t;  // root -> 0 (share 1) -> 2 ; root -> 1 (share 0.4)
  t.tokens = {5, 6, 7};
  t.parents = {-1, -1, 0};
  t.depths = {1, 1, 2};
  t.shares = {1.0f, 0.4f, 1.0f};
  t.match = 4;
  const int32_t path[2] = {0, 2};
  std::vector<Request> rs(100);
  std::vector<float> before;
  sc.node_probabilities(&rs[0], t, &before);
  EXPECT_GT(before[1], 0.3f);  // the share's 0.4 of the prior, with the bonus
  for (int k = 0; k < 2000; ++k) {
    DraftTree seen = t;  // siblings seen 0.3 to 0.6 times as often
    seen.shares[1] = 0.3f + 0.05f * (k % 7);
    sc.on_verified(&rs[k % rs.size()], seen, path, 2);
  }
  Request fresh;
  std::vector<float> p;
  sc.node_probabilities(&fresh, t, &p);
  EXPECT_GT(p[0], 0.9f);
  EXPECT_GT(p[2], 0.8f);
  EXPECT_LT(p[1], 0.1f);
  DraftTree ordered = t;
  order_by_probability(&ordered, &p);
  EXPECT_EQ(ordered.tokens, (std::vector<int32_t>{5, 7, 6}));
}

TEST(SpecController, DepthsBeyondMaxDepthAreIgnored) {
  SpecController sc(SpecPolicy::kSmart, 2, 32);
  Request r;
  const DraftTree t = chain(4);
  const int32_t all[4] = {0, 1, 2, 3};
  sc.on_verified(&r, t, all, 4);
  ASSERT_EQ(r.spec_accept.size(), 3u);
  EXPECT_GT(sc.rate(&r, 2), 0.5f);
  EXPECT_EQ(sc.rate(&r, 3), 0.0f);
  ASSERT_EQ(sc.global_rates(/*greedy=*/false).size(), 3u);
}

// ---------------------------------------------------------------------------------------------
// 3, 4. The scheduler's speculation driven by a fake executor

constexpr int kPattern = 10;

// Request id's pattern: 10 distinct tokens no other request uses.
int32_t pattern_token(RequestId id, int index) { return static_cast<int32_t>(id * 16 + index % kPattern); }

#define INV_CHECK(cond, what)                                 \
  do {                                                        \
    if (!(cond)) {                                            \
      ADD_FAILURE() << "check failed: " #cond " -- " << what; \
      return false;                                           \
    }                                                         \
  } while (0)

struct ReqStats {
  double accept = 0;
  int max_tokens = 0;
  int decode_steps = 0;   // steps that sampled it
  int drafted_steps = 0;  // of those, with a draft
  long draft_nodes = 0, accepted_nodes = 0;
  std::vector<std::pair<int, int>> drafts;  // (step, draft nodes) of every sampling step
  bool finished = false;
  FinishReason reason = FinishReason::kNone;
  std::vector<int32_t> output;
};

struct StepStats {
  int draft_tokens = 0, drafted_seqs = 0, plan_tokens = 0, seqs = 0;
  bool all_decode = false;  // every scheduled sequence had one token and sampled
  double time = 0;
};

// The scheduler's clock in the fake: every reading advances it by g_lookup_seconds, so a lookup
// (read before and after) costs exactly that, whatever the machine's speed.
double g_lookup_seconds = 0, g_fake_now = 0;
double fake_clock() { return g_fake_now += g_lookup_seconds; }

class SpecFake {
 public:
  SpecFake(const SchedulerConfig& cfg, const TrueCost& cost, uint32_t seed, double noise = 0.02)
      : cfg_(cfg), sched_(cfg), cost_(cost), rng_(seed), noise_(noise) {
    sched_.set_clock(fake_clock);
  }

  Scheduler& sched() { return sched_; }

  // The start-up profile: varied made-up batches timed by the true cost (like the engine's).
  void profile(int n = 20) {
    struct Shape {
      int seqs, tokens, context;
    };
    const Shape shapes[] = {{1, 1, 16}, {1, 1, 256}, {1, 4, 64},  {1, 16, 128}, {1, 64, 0},
                            {4, 1, 64}, {8, 1, 256}, {8, 2, 32}, {16, 1, 64}, {2, 8, 512}};
    std::uniform_int_distribution<int> seqs(1, 32), tokens(1, 16), context(0, 512);
    for (int i = 0; i < n; ++i) {
      Shape s = i < 10 ? shapes[i] : Shape{seqs(rng_), tokens(rng_), context(rng_)};
      StepFeatures f;
      f.logit_rows = s.seqs;  // each sequence's last row
      f.tokens = s.seqs * s.tokens;
      for (int p = s.context; p < s.context + s.tokens; ++p) f.kv_tokens += s.seqs * (p + 1.0);
      sched_.observe_profile(f, time_of(f));  // as Engine::Impl::profile_step_time does
    }
  }

  // temperature: only the controller reads it (its sampling mode); the fake's verification
  // follows `accept` either way.
  void add(RequestId id, double accept, int max_tokens, int reps = 5, float temperature = 0.0f) {
    auto r = std::make_unique<Request>();
    r->id = id;
    for (int i = 0; i < reps * kPattern; ++i) r->prompt.push_back(pattern_token(id, i));
    r->params.max_tokens = max_tokens;
    r->params.temperature = temperature;
    r->params.ignore_eos = true;
    ReqStats& st = stats[id];
    st.accept = accept;
    st.max_tokens = max_tokens;
    sched_.add(std::move(r));
  }

  bool step() {
    sched_.schedule(&plan_, &seqs_, &failed_);
    if (sched_.last_lookup_seconds() > 0) ++lookup_steps;
    INV_CHECK(failed_.empty(), failed_.size() << " requests failed");
    if (!check_plan()) return false;
    StepStats ss;
    ss.draft_tokens = sched_.last_draft_tokens();
    ss.drafted_seqs = sched_.last_drafted_seqs();
    ss.plan_tokens = plan_.num_tokens();
    ss.seqs = plan_.num_seqs();
    ss.all_decode = !seqs_.empty();
    for (const ScheduledSeq& s : seqs_) ss.all_decode &= s.num_tokens == 1 && s.samples;
    const StepFeatures f = step_features(plan_);
    ss.time = time_of(f);
    size_t before = 0, after = 0;
    for (const auto& [id, st] : stats) before += st.output.size();
    for (const ScheduledSeq& s : seqs_)
      if (!process(s)) return false;
    for (const auto& [id, st] : stats) after += st.output.size();
    if (plan_.num_tokens() > 0) sched_.observe_step(f, ss.time, static_cast<double>(after - before));
    steps.push_back(ss);
    return check_blocks();
  }

  bool run(int max_steps = 5000) {
    for (int i = 0; i < max_steps && !sched_.empty(); ++i)
      if (!step() || ::testing::Test::HasFailure()) return false;
    return sched_.empty();
  }

  // Every request finished by length with exactly its pattern continued; every block is free.
  void expect_all_exact() {
    for (const auto& [id, st] : stats) {
      EXPECT_TRUE(st.finished) << "request " << id;
      EXPECT_EQ(st.reason, FinishReason::kLength) << "request " << id;
      ASSERT_EQ(static_cast<int>(st.output.size()), st.max_tokens) << "request " << id;
      for (int k = 0; k < st.max_tokens; ++k)
        ASSERT_EQ(st.output[k], pattern_token(id, 5 * kPattern + k)) << "request " << id << " output " << k;
    }
    EXPECT_EQ(sched_.num_free_blocks(), sched_.num_total_blocks());
    EXPECT_TRUE(sched_.empty());
  }

  std::map<RequestId, ReqStats> stats;
  std::vector<StepStats> steps;
  double total_time() const {
    double t = 0;
    for (const StepStats& s : steps) t += s.time;
    return t;
  }
  int max_draft_seen = 0;
  int lookup_steps = 0;  // steps whose planning looked up a draft (with g_lookup_seconds > 0)
  uint64_t preemptions() const { return sched_.counters().num_preemptions; }

 private:
  double time_of(const StepFeatures& f) {
    return cost_.at(f) * (1 + std::uniform_real_distribution<double>(-noise_, noise_)(rng_));
  }

  bool check_plan() {
    const BatchPlan& pl = plan_;
    const int bs = cfg_.block_size;
    INV_CHECK(pl.num_tokens() <= cfg_.max_num_batched_tokens,
              pl.num_tokens() << " tokens, budget " << cfg_.max_num_batched_tokens);
    int sum = 0, drafted = 0, draft_tokens = 0, budget_left = cfg_.max_num_batched_tokens;
    for (const ScheduledSeq& s : seqs_) budget_left -= s.num_tokens;
    std::set<int64_t> slots;
    int row = 0;
    for (int i = 0; i < static_cast<int>(seqs_.size()); ++i) {
      const ScheduledSeq& s = seqs_[i];
      const Request* r = s.req;
      const DraftTree& d = s.draft;
      const int n = d.size();
      sum += s.num_tokens + n;
      drafted += n > 0;
      draft_tokens += n;
      max_draft_seen = std::max(max_draft_seen, n);
      INV_CHECK(s.first_token == r->num_computed, "request " << r->id);
      INV_CHECK(n <= cfg_.spec_max_draft, "request " << r->id << " draft of " << n << " > " << cfg_.spec_max_draft);
      if (cfg_.spec_policy == SpecPolicy::kOff) INV_CHECK(n == 0, "kOff drafted " << n);
      const int room = r->params.max_tokens - static_cast<int>(r->output.size()) - 1;
      if (n > 0) {
        INV_CHECK(s.samples, "request " << r->id << " drafts without sampling");
        INV_CHECK(n <= room, "request " << r->id << " draft of " << n << " with room for " << room);
        INV_CHECK(static_cast<int>(r->blocks.size()) * bs >= s.first_token + s.num_tokens + n,
                  "request " << r->id << " blocks do not cover its draft");
      }
      // The draft is the pattern continued: a chain of shares 1 (the request's own tokens are
      // periodic and no other request uses its tokens).
      const int root = s.first_token + s.num_tokens - 1;
      for (int j = 0; j < n; ++j) {
        INV_CHECK(d.parents[j] == j - 1 && d.depths[j] == j + 1 && d.shares[j] == 1.0f,
                  "request " << r->id << " draft node " << j << " parent " << d.parents[j] << " depth " << d.depths[j]
                             << " share " << d.shares[j]);
        INV_CHECK(d.depths[j] <= cfg_.spec_max_depth, "depth " << d.depths[j]);
        INV_CHECK(d.tokens[j] == pattern_token(r->id, root + 1 + j), "request " << r->id << " draft token " << j);
      }
      // Layout: the sequence's rows, then its draft rows (position root + depth, own slot, logits).
      for (int k = 0; k < s.num_tokens; ++k, ++row) {
        INV_CHECK(pl.positions[row] == s.first_token + k, "row " << row);
        INV_CHECK(pl.slots[row] == sched_.slot(r, s.first_token + k), "row " << row);
        INV_CHECK(slots.insert(pl.slots[row]).second, "slot written twice");
      }
      for (int j = 0; j < n; ++j, ++row) {
        INV_CHECK(pl.token_ids[row] == d.tokens[j], "draft row " << row);
        INV_CHECK(pl.positions[row] == root + d.depths[j], "draft row " << row);
        INV_CHECK(pl.slots[row] == sched_.slot(r, root + 1 + j), "draft row " << row);
        INV_CHECK(pl.seq_of_token[row] == i, "draft row " << row);
        INV_CHECK(slots.insert(pl.slots[row]).second, "draft slot written twice");
        const int e0 = pl.extra_offset[row], e1 = pl.extra_offset[row + 1];
        INV_CHECK(e1 - e0 == d.depths[j], "draft row " << row << " has " << e1 - e0 << " extra slots");
        for (int a = 0; a <= j; ++a) INV_CHECK(pl.extra_slots[e0 + a] == sched_.slot(r, root + 1 + a), "extra slot");
      }
      INV_CHECK(s.num_logits == (s.samples ? 1 : 0) + n, "request " << r->id << " logits " << s.num_logits);
      // kFixed: every sampled request with a continuation gets min(spec_max_draft, room, budget
      // left) nodes, in scheduling order (the pool here is ample and the drafter's chain is deep
      // enough once the context holds the 32-token match plus a period).
      if (cfg_.spec_policy == SpecPolicy::kFixed && s.samples && r->num_tokens() >= 42 && ample_blocks_) {
        const int want = std::max(0, std::min({cfg_.spec_max_draft, room, budget_left}));
        INV_CHECK(n == want, "kFixed: request " << r->id << " drafted " << n << " want " << want);
      }
      budget_left -= n;
    }
    INV_CHECK(row == pl.num_tokens() && sum == pl.num_tokens(), sum << " vs " << pl.num_tokens());
    INV_CHECK(sched_.last_draft_tokens() == draft_tokens, sched_.last_draft_tokens() << " vs " << draft_tokens);
    INV_CHECK(sched_.last_drafted_seqs() == drafted, sched_.last_drafted_seqs() << " vs " << drafted);
    return true;
  }

  // The fake model: the true continuation is the pattern. Walk the draft from the root taking the
  // most frequent child (highest share, ties lowest index) with the request's acceptance
  // probability; append the accepted nodes' tokens and one more (the root's or last node's sample).
  bool process(const ScheduledSeq& s) {
    Request* r = s.req;
    ReqStats& st = stats[r->id];
    const DraftTree& d = s.draft;
    std::vector<int32_t> path;
    FinishReason finish = FinishReason::kNone;
    int appended = 0;
    if (s.samples) {
      INV_CHECK(static_cast<int>(r->output.size()) < r->params.max_tokens, "request " << r->id);
      std::uniform_real_distribution<double> u(0.0, 1.0);
      for (int node = -1;;) {
        int top = -1;
        for (int c = node + 1; c < d.size(); ++c)
          if (d.parents[c] == node && (top < 0 || d.shares[c] > d.shares[top])) top = c;
        if (top < 0 || u(rng_) >= st.accept) break;
        path.push_back(top);
        node = top;
      }
      std::vector<int32_t> toks;
      for (int32_t node : path) toks.push_back(d.tokens[node]);
      toks.push_back(pattern_token(r->id, r->num_tokens() + static_cast<int>(path.size())));
      for (size_t k = 0; k < toks.size() && finish == FinishReason::kNone; ++k) {
        finish = sched_.append_token(r, toks[k]);
        ++appended;
      }
      ++st.decode_steps;
      st.drafted_steps += d.size() > 0;
      st.drafts.push_back({static_cast<int>(steps.size()), d.size()});
    }
    int computed = s.num_tokens;
    if (d.size() > 0) {
      const int accepted = std::max(0, appended - 1);
      computed += accepted;
      st.draft_nodes += d.size();
      st.accepted_nodes += accepted;
      sched_.on_verified(s, path.data(), accepted);
    }
    sched_.on_computed(s, computed);
    if (finish != FinishReason::kNone) {
      std::unique_ptr<Request> done = sched_.finish(r->id, finish);
      INV_CHECK(done != nullptr, "request " << r->id);
      INV_CHECK(done->blocks.empty(), "request " << r->id);
      st.finished = true;
      st.reason = done->finish_reason;
      st.output = done->output;
    }
    return true;
  }

  // Block accounting: no block leaks through rejected draft slots.
  bool check_blocks() {
    int held = 0;
    std::set<int32_t> seen;
    for (const Request* r : sched_.running()) {
      INV_CHECK(static_cast<int>(r->blocks.size()) >= sched_.blocks_for(r->num_computed), "request " << r->id);
      // At most the blocks of its computed tokens plus a draft's worth.
      INV_CHECK(static_cast<int>(r->blocks.size()) <= sched_.blocks_for(r->num_computed + cfg_.spec_max_draft),
                "request " << r->id << " holds " << r->blocks.size() << " blocks for " << r->num_computed);
      for (int32_t b : r->blocks) INV_CHECK(seen.insert(b).second, "block " << b << " held twice");
      held += static_cast<int>(r->blocks.size());
    }
    for (const Request* r : sched_.waiting()) INV_CHECK(r->blocks.empty(), "waiting request " << r->id << " holds blocks");
    INV_CHECK(held + sched_.num_free_blocks() == sched_.num_total_blocks(),
              held << " held + " << sched_.num_free_blocks() << " free vs " << sched_.num_total_blocks());
    return true;
  }

 public:
  bool ample_blocks_ = true;  // kFixed's exact draft size holds only when blocks never run short

 private:
  SchedulerConfig cfg_;
  Scheduler sched_;
  TrueCost cost_;
  std::mt19937 rng_;
  double noise_;
  BatchPlan plan_;
  std::vector<ScheduledSeq> seqs_;
  std::vector<std::unique_ptr<Request>> failed_;
};

SchedulerConfig spec_config(SpecPolicy policy, int budget, int num_blocks, int max_seqs = 256) {
  SchedulerConfig c;
  c.block_size = 16;
  c.num_blocks = num_blocks;
  c.max_num_batched_tokens = budget;
  c.max_num_seqs = max_seqs;
  c.spec_max_draft = 8;
  c.spec_max_depth = 8;
  c.spec_policy = policy;
  return c;
}

// Mean draft nodes per sampling step over a request's steps [from, end).
double mean_draft_nodes(const std::vector<std::pair<int, int>>& drafts, size_t from) {
  long nodes = 0;
  for (size_t i = from; i < drafts.size(); ++i) nodes += drafts[i].second;
  return static_cast<double>(nodes) / static_cast<double>(drafts.size() - from);
}

// The first step after which every request has been sampled at least once (prompts done).
int warm_up_end(const SpecFake& ex) {
  int end = 0;
  for (const auto& [id, st] : ex.stats) end = std::max(end, st.drafts.empty() ? 0 : st.drafts.front().first + 1);
  return end;
}

// 3a. Many decoding requests, step time dominated by the per-row cost: a draft row costs almost
// as much as a whole request's decode row and yields < 1 token, so drafting lowers goodput.
// Whether that cost is the row's (c_tok) or its logits' (c_logit: the head, sampling or
// verification), which the steady state cannot tell apart: a draft node has logits too.
TEST(SpecControllerSmart, HighLoadDraftsNothing) {
  for (const TrueCost& cost : {TrueCost{1e-4, 1e-3, 1e-9, 2e-5}, TrueCost{1e-4, 2e-5, 1e-9, 1e-3}}) {
    SCOPED_TRACE(cost.tok > cost.logit ? "row cost" : "logit cost");
    SpecFake ex(spec_config(SpecPolicy::kSmart, 4096, 1400), cost, 1);
    ex.profile();
    for (RequestId id = 1; id <= 64; ++id) ex.add(id, 0.9, 200);
    ASSERT_TRUE(ex.run());
    ex.expect_all_exact();
    const int warm = warm_up_end(ex);
    int decode_steps = 0;
    for (int i = warm; i < static_cast<int>(ex.steps.size()); ++i) {
      EXPECT_EQ(ex.steps[i].draft_tokens, 0) << "step " << i << " (" << ex.steps[i].seqs << " seqs)";
      decode_steps += ex.steps[i].all_decode && ex.steps[i].seqs == 64;
    }
    EXPECT_LE(warm, 2);
    EXPECT_GE(decode_steps, 150);
    // The model it decided with is the true one.
    const auto& k = ex.sched().spec()->model().coefficients();
    EXPECT_LT(rel_err(k[1] + k[3], cost.tok + cost.logit), 0.05) << k[1] << " + " << k[3];

    // Control: the same workload under kFixed drafts on every decode step, so the drafter did have
    // continuations and the zero above is SmartSpec's choice.
    SpecFake fixed(spec_config(SpecPolicy::kFixed, 4096, 1400), cost, 1);
    for (RequestId id = 1; id <= 64; ++id) fixed.add(id, 0.9, 200);
    ASSERT_TRUE(fixed.run());
    fixed.expect_all_exact();
    long fixed_sampled = 0, fixed_drafted = 0;
    for (const auto& [id, st] : fixed.stats) {
      fixed_sampled += st.decode_steps;
      fixed_drafted += st.drafted_steps;
    }
    EXPECT_GT(fixed_drafted, fixed_sampled * 9 / 10) << fixed_drafted << " of " << fixed_sampled;
    // And drafting would have cost time: SmartSpec's run is faster (in the fake's step times).
    int warm_drafts = 0;
    for (int i = 0; i < warm; ++i) warm_drafts += ex.steps[i].draft_tokens;
    std::printf("[ info ] high load: %d warm-up step(s) with %d draft nodes, then %d decode steps without; "
                "time %.3f s (smart) vs %.3f s (fixed)\n",
                warm, warm_drafts, decode_steps, ex.total_time(), fixed.total_time());
    EXPECT_LT(ex.total_time(), fixed.total_time());
  }
}

// 3a'. The same load with a prompt arriving every step: the prompt rows run whatever is drafted,
// so they must not lower the bar a draft has to clear (counted in the goodput, their time made a
// 0.9-token row look worth it next to 64 decode rows plus 50 prompt rows). Only the periodic cost
// probes (one node for a few requests, every kDraftProbeInterval steps) may draft.
TEST(SpecControllerSmart, PromptRowsInTheStepDoNotMakeDraftsLookCheap) {
  const TrueCost cost{1e-4, 1e-3, 1e-9, 2e-5};
  SpecFake ex(spec_config(SpecPolicy::kSmart, 4096, 1400), cost, 2);
  ex.profile();
  RequestId next = 1;
  for (; next <= 64; ++next) ex.add(next, 0.9, 200);
  int prompt_steps = 0, drafted_steps = 0;
  for (int i = 0; i < 400 && !ex.sched().empty(); ++i) {
    if (next <= 64 + 150) ex.add(next++, 0.9, 100, /*reps=*/5);  // a 50-token prompt
    ASSERT_TRUE(ex.step()) << "step " << i;
    const StepStats& st = ex.steps.back();
    if (i < 2 || st.seqs < 32 || st.all_decode) continue;
    ++prompt_steps;
    drafted_steps += st.draft_tokens > 0;
    EXPECT_EQ(st.draft_tokens, st.drafted_seqs) << "step " << i << ": more than one node for a request";
  }
  std::printf("[ info ] %d steps with prompt rows beside 32+ decoding requests, %d with (probe) drafts\n",
              prompt_steps, drafted_steps);
  EXPECT_GE(prompt_steps, 100);
  EXPECT_LE(drafted_steps, prompt_steps / 16);
}

// 3b. One or two requests, a weight-bound step (large c0, tiny row cost), high acceptance: long
// drafts.
TEST(SpecControllerSmart, LowLoadHighAcceptanceDraftsLong) {
  const TrueCost cost{1e-2, 2e-5, 1e-9, 1e-5};
  for (int num : {1, 2}) {
    SpecFake ex(spec_config(SpecPolicy::kSmart, 2048, 200), cost, 10 + num);
    ex.profile();
    for (RequestId id = 1; id <= static_cast<RequestId>(num); ++id) ex.add(id, 0.9, 300);
    ASSERT_TRUE(ex.run());
    ex.expect_all_exact();
    long nodes = 0, drafted = 0, sampled = 0, tokens = 0;
    for (const auto& [id, st] : ex.stats) {
      nodes += st.draft_nodes;
      drafted += st.drafted_steps;
      sampled += st.decode_steps;
      tokens += static_cast<long>(st.output.size());
    }
    const double mean = static_cast<double>(nodes) / drafted;
    EXPECT_GE(mean, 6.0) << num << " requests: " << nodes << " nodes in " << drafted << " drafted steps";
    EXPECT_GE(drafted, sampled * 9 / 10) << num << " requests";
    // About 1 + 0.9 + ... + 0.9^8 = 6.1 tokens per sampled step (prefill step included).
    EXPECT_GT(static_cast<double>(tokens) / sampled, 4.5) << num << " requests";
    EXPECT_EQ(ex.max_draft_seen, 8);
    // The global estimate moved from the prior toward the true rate.
    EXPECT_GT(ex.sched().spec()->global_rates(/*greedy=*/true)[1], 0.6f);
    // Against no speculation at all (same workload, kOff): several times less time.
    SpecFake off(spec_config(SpecPolicy::kOff, 2048, 200), cost, 10 + num);
    for (RequestId id = 1; id <= static_cast<RequestId>(num); ++id) off.add(id, 0.9, 300);
    ASSERT_TRUE(off.run());
    EXPECT_LT(ex.total_time() * 3, off.total_time()) << ex.total_time() << " s vs " << off.total_time() << " s";
    std::printf("[ info ] low load, %d request(s): %.2f draft nodes per drafted step, %.2f tokens per step, %ld steps\n",
                num, mean, static_cast<double>(tokens) / sampled, sampled / num);
  }
}

// 3b1. A CPU-like step (a draft row costs a third of the fixed cost) and drafts that are nearly
// always right: long drafts pay only once the acceptance of long matches is learned. (When the
// reordered draft lost its match length, every outcome was filed under matches of 1 token, the
// long-match estimates kept their prior, and a lone request drafted 3-4 nodes a step.)
TEST(SpecControllerSmart, NearCertainDraftsAreLearnedAndGrowLong) {
  const TrueCost cost{12e-6, 3e-6, 1e-9, 1e-6};
  SpecFake ex(spec_config(SpecPolicy::kSmart, 2048, 200), cost, 12);
  ex.profile();
  ex.add(1, 0.99, 600);
  ASSERT_TRUE(ex.run());
  ex.expect_all_exact();
  // The second half of the request's sampling steps: the estimates have settled.
  const auto& drafts = ex.stats[1].drafts;
  ASSERT_GT(drafts.size(), 40u);
  EXPECT_GE(mean_draft_nodes(drafts, drafts.size() / 2), 7.0);
}

// 3b2. Acceptance that changes: early requests whose drafts mostly fail, then one whose drafts
// are nearly always right. The deep nodes the early ones made the model give up on are drafted
// now and then anyway (the scheduler's probes), so their estimates recover and the drafts grow
// long again; without the probes a depth once judged poor was never drafted, so never observed.
TEST(SpecControllerSmart, DepthsJudgedPoorEarlyAreTriedAgain) {
  const TrueCost cost{12e-6, 3e-6, 1e-9, 1e-6};
  SpecFake ex(spec_config(SpecPolicy::kSmart, 2048, 400), cost, 13);
  ex.profile();
  for (RequestId id = 1; id <= 4; ++id) {
    ex.add(id, 0.3, 150);
    ASSERT_TRUE(ex.run());
  }
  ex.add(5, 0.99, 1500);
  ASSERT_TRUE(ex.run());
  ex.expect_all_exact();
  const auto& drafts = ex.stats[5].drafts;
  ASSERT_GT(drafts.size(), 60u);
  EXPECT_GE(mean_draft_nodes(drafts, drafts.size() * 3 / 4), 6.0);
}

// 3b2''. Sampled traffic whose drafts all failed says nothing of greedy requests' drafts: the
// statistics are kept per sampling mode, so a greedy request after it drafts fully from its first
// steps. (With one set of statistics it drafted no node in its 400 tokens.)
TEST(SpecControllerSmart, SampledTrafficDoesNotLowerGreedyEstimates) {
  const TrueCost cost{12e-6, 3e-6, 1e-9, 1e-6};
  SpecFake ex(spec_config(SpecPolicy::kSmart, 2048, 400), cost, 15);
  ex.profile();
  for (RequestId id = 1; id <= 12; ++id) {
    ex.add(id, 0.0, 150, /*reps=*/1, /*temperature=*/1.0f);
    ASSERT_TRUE(ex.run());
  }
  const SpecController& sc = *ex.sched().spec();
  EXPECT_LT(sc.global_rates(/*greedy=*/false)[1], 0.2f);             // learned from the sampled ones
  EXPECT_FLOAT_EQ(sc.global_rates(/*greedy=*/true)[1], 0.5f);        // the prior, untouched
  EXPECT_LT(sc.max_first_node_rate(/*greedy=*/false, /*sampled=*/true), 0.4375f);  // their gate shut
  ex.add(13, 0.99, 400);
  ASSERT_TRUE(ex.run());
  ex.expect_all_exact();
  const auto& drafts = ex.stats[13].drafts;
  ASSERT_GT(drafts.size(), 20u);
  EXPECT_GE(mean_draft_nodes(drafts, 0), 6.0);  // from its first steps on
  EXPECT_GT(sc.global_rates(/*greedy=*/true)[1], 0.9f);
  EXPECT_LT(sc.global_rates(/*greedy=*/false)[1], 0.2f);  // and its drafts left the sampled ones alone
}

// 3b2'. Earlier traffic whose drafts all failed (sampled text, say), at every match length,
// teaches the global estimates that no first node pays, so that no lookup is made at all,
// per-request probes included. A request whose drafts would be right must still get to draft, and
// the estimates recover: stories260K served at 20 req/s after a sampled warm-up stayed at 1.04
// tokens a step in one run of 25 (the others 2.8-5.6; its first-node estimate 0.12).
TEST(SpecControllerSmart, FirstNodesJudgedPoorByEarlierTrafficAreTriedAgain) {
  const TrueCost cost{12e-6, 3e-6, 1e-9, 1e-6};
  struct ResetClock {
    ~ResetClock() { g_lookup_seconds = 0; }
  } reset;
  g_lookup_seconds = 3e-6;  // a first node costs its row (4 us) and the lookup: 7 us of a 16 us step
  SpecFake ex(spec_config(SpecPolicy::kSmart, 2048, 400), cost, 14);
  ex.profile();
  for (RequestId id = 1; id <= 12; ++id) {
    ex.add(id, 0.0, 150, /*reps=*/1);  // matches from 1 token up
    ASSERT_TRUE(ex.run());
  }
  // The gate is shut: no first node is estimated likelier than 7 / 16.
  ASSERT_LT(ex.sched().spec()->max_first_node_rate(/*greedy=*/true, /*sampled=*/false), 0.4375f);
  ex.add(13, 0.99, 1500);
  ASSERT_TRUE(ex.run());
  ex.expect_all_exact();
  const auto& drafts = ex.stats[13].drafts;
  ASSERT_GT(drafts.size(), 60u);
  EXPECT_GE(mean_draft_nodes(drafts, drafts.size() * 3 / 4), 6.0);
}

// 3b3. Drafts that would pay (a weight-bound step, high acceptance), but more requests than the
// engine runs at once: while any wait, no drafts (past capacity every added row delays them all);
// once none waits, the running ones draft.
TEST(SpecControllerSmart, NoDraftsWhileRequestsWait) {
  const TrueCost cost{1e-2, 2e-5, 1e-9, 1e-5};
  SpecFake ex(spec_config(SpecPolicy::kSmart, 2048, 400, /*max_seqs=*/2), cost, 21);
  ex.profile();
  for (RequestId id = 1; id <= 6; ++id) ex.add(id, 0.9, 60 + 20 * static_cast<int>(id));
  int waiting_steps = 0, free_drafted = 0;
  for (int i = 0; i < 2000 && !ex.sched().empty(); ++i) {
    ASSERT_TRUE(ex.step()) << "step " << i;
    const StepStats& st = ex.steps.back();
    // Nothing but the scheduler admits from the queue: what waits now waited when it planned.
    if (ex.sched().num_waiting() > 0) {
      ++waiting_steps;
      EXPECT_EQ(st.draft_tokens, 0) << "step " << i << " drafted with " << ex.sched().num_waiting() << " waiting";
    } else {
      free_drafted += st.draft_tokens > 0;
    }
  }
  ex.expect_all_exact();
  EXPECT_GE(waiting_steps, 50);
  EXPECT_GE(free_drafted, 10);
}

// 3b4. A lone request whose drafts would pay on their own, but whose every lookup costs more than
// any first node could gain: after the first lookup has measured that, no more lookups (the
// engine's step time leaves lookups out, and the fake's cost has none). With (nearly) free lookups
// the same request looks up and drafts in nearly every step.
TEST(SpecControllerSmart, LookupsThatCannotPayForThemselvesAreNotMade) {
  const TrueCost cost{1e-3, 2e-5, 1e-9, 1e-5};  // a step of about 1 ms, a row of 30 us
  for (double lookup : {1e-9, 2e-3}) {  // about free, and twice a whole step
    g_lookup_seconds = lookup;
    SpecFake ex(spec_config(SpecPolicy::kSmart, 2048, 200), cost, 21);
    ex.profile();
    ex.add(1, 0.9, 300);
    const bool ok = ex.run();
    g_lookup_seconds = 0;
    ASSERT_TRUE(ok);
    ex.expect_all_exact();
    const int steps = static_cast<int>(ex.steps.size());
    // The measured cost, aged a little by each step without a lookup since.
    const double cost_now = ex.sched().spec()->model().lookup_cost();
    EXPECT_LE(cost_now, lookup * (1 + 1e-9));
    EXPECT_GE(cost_now, lookup * std::pow(StepTimeModel::kLookupAging, steps));
    std::printf("[ info ] lookups costing %.0f us: %d of %d steps looked up, %.2f tokens per step\n", lookup * 1e6,
                ex.lookup_steps, steps, 300.0 / steps);
    if (lookup < 1e-6) {
      EXPECT_GE(ex.lookup_steps, steps * 9 / 10);
      EXPECT_GE(ex.stats[1].drafted_steps, ex.stats[1].decode_steps * 9 / 10);
    } else {
      EXPECT_LE(ex.lookup_steps, 1);
      EXPECT_EQ(ex.stats[1].drafted_steps, ex.lookup_steps);
    }
  }
}

// 3b5. The first lookup is slow (twice a step: a cold cache), the rest nearly free: the estimate
// ages while no lookup is made, lookups resume, and the request drafts again.
TEST(SpecControllerSmart, OneSlowLookupDoesNotStopLookupsForGood) {
  const TrueCost cost{1e-3, 2e-5, 1e-9, 1e-5};
  struct ResetClock {
    ~ResetClock() { g_lookup_seconds = 0; }
  } reset;
  g_lookup_seconds = 2e-3;
  SpecFake ex(spec_config(SpecPolicy::kSmart, 2048, 400), cost, 23);
  ex.profile();
  ex.add(1, 0.9, 4000);
  for (int i = 0; i < 6000 && !ex.sched().empty(); ++i) {
    if (ex.lookup_steps >= 1) g_lookup_seconds = 1e-9;
    ASSERT_TRUE(ex.step()) << "step " << i;
  }
  ASSERT_TRUE(ex.sched().empty());
  ex.expect_all_exact();
  const int steps = static_cast<int>(ex.steps.size());
  const int late = steps * 3 / 4;  // the last quarter
  int drafted_late = 0;
  for (int i = late; i < steps; ++i) drafted_late += ex.steps[i].draft_tokens > 0;
  std::printf("[ info ] one slow lookup: %d steps, %d lookups, %d of the last %d steps drafted\n", steps,
              ex.lookup_steps, drafted_late, steps - late);
  EXPECT_GT(ex.lookup_steps, 10);
  EXPECT_GT(drafted_late, (steps - late) * 9 / 10);
}

// Without a profile, SmartSpec drafts nothing until the step-time model has 8 observations.
TEST(SpecControllerSmart, NoDraftsUntilTheModelIsReady) {
  const TrueCost cost{1e-2, 2e-5, 1e-9, 1e-5};
  SpecFake ex(spec_config(SpecPolicy::kSmart, 2048, 200), cost, 5, /*noise=*/0.0);
  ex.add(1, 0.9, 300);
  ASSERT_TRUE(ex.run());
  ex.expect_all_exact();
  ASSERT_GT(ex.steps.size(), 10u);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(ex.steps[i].draft_tokens, 0) << "step " << i;
  EXPECT_GT(ex.steps[8].draft_tokens, 0);
}

// 3c. Low- and high-acceptance requests in the same steps: the low ones get shorter drafts.
TEST(SpecControllerSmart, LowAcceptanceRequestsGetShorterDrafts) {
  const TrueCost cost{5e-3, 1e-4, 1e-9, 1e-5};
  SpecFake ex(spec_config(SpecPolicy::kSmart, 2048, 600), cost, 77);
  ex.profile();
  std::set<RequestId> low, high;
  for (RequestId id = 1; id <= 8; ++id) {
    const bool lo = id % 2 == 1;
    (lo ? low : high).insert(id);
    ex.add(id, lo ? 0.1 : 0.9, lo ? 150 : 600);
  }
  // Step until the per-request estimates have separated, checking them on the way.
  float min_high = 1, max_low = 0;
  bool checked = false;
  for (int i = 0; i < 5000 && !ex.sched().empty(); ++i) {
    ASSERT_TRUE(ex.step());
    if (i == 40) {
      ASSERT_EQ(ex.sched().num_running(), 8);
      for (const Request* r : ex.sched().running()) {
        ASSERT_FALSE(r->spec_accept.empty()) << "request " << r->id << " never drafted";
        if (low.count(r->id))
          max_low = std::max(max_low, r->spec_accept[1]);
        else
          min_high = std::min(min_high, r->spec_accept[1]);
      }
      std::printf("[ info ] mixed, step 40: depth-1 estimates: acceptance 0.1 requests <= %.3f, 0.9 requests >= %.3f\n",
                  max_low, min_high);
      checked = true;
    }
  }
  ASSERT_TRUE(ex.sched().empty());
  ASSERT_TRUE(checked);
  EXPECT_LT(max_low, 0.45f);
  EXPECT_GT(min_high, 0.5f);
  ex.expect_all_exact();
  // Average draft per sampled step, over steps where all 8 run and decode, after 15 steps.
  const int first = 15;
  int last = 0;
  for (int i = 0; i < static_cast<int>(ex.steps.size()); ++i)
    if (ex.steps[i].seqs == 8) last = i;
  ASSERT_GT(last - first, 20);
  double lo_nodes = 0, hi_nodes = 0;
  int lo_n = 0, hi_n = 0;
  for (const auto& [id, st] : ex.stats)
    for (const auto& [step, nodes] : st.drafts)
      if (step >= first && step <= last) {
        (low.count(id) ? lo_nodes : hi_nodes) += nodes;
        ++(low.count(id) ? lo_n : hi_n);
      }
  ASSERT_GT(lo_n, 0);
  ASSERT_GT(hi_n, 0);
  const double lo_avg = lo_nodes / lo_n, hi_avg = hi_nodes / hi_n;
  std::printf("[ info ] mixed: steps %d..%d, acceptance 0.1 -> %.2f nodes, acceptance 0.9 -> %.2f nodes per step\n", first,
              last, lo_avg, hi_avg);
  EXPECT_LT(lo_avg, 1.0);
  EXPECT_GT(hi_avg, 3.0);
  EXPECT_GT(hi_avg, lo_avg + 2.5);
}

// 3d, 4. Bookkeeping under every policy: staggered arrivals, a binding token budget, a small pool
// (preemptions), requests of every length, acceptance from 0 to 1, prompts without a repeat.
TEST(SpecControllerScheduler, BookkeepingUnderEveryPolicy) {
  const TrueCost cost{3e-3, 1e-4, 1e-8, 1e-5};
  for (SpecPolicy policy : {SpecPolicy::kSmart, SpecPolicy::kFixed, SpecPolicy::kOff}) {
    SCOPED_TRACE(policy == SpecPolicy::kSmart ? "kSmart" : policy == SpecPolicy::kFixed ? "kFixed" : "kOff");
    SpecFake ex(spec_config(policy, 64, 48, 12), cost, 31);
    ex.ample_blocks_ = false;
    if (policy == SpecPolicy::kSmart) ex.profile();
    std::mt19937 rng(8);
    std::uniform_int_distribution<int> max_tokens(1, 120);
    RequestId next = 1;
    int total_tokens = 0;
    for (int i = 0; i < 4; ++i) {
      const int mt = max_tokens(rng);
      ex.add(next, (next * 3 % 5) / 4.0, mt, 1 + next % 5);  // reps 1..5 (1: no repeat in the prompt)
      total_tokens += mt;
      ++next;
    }
    for (int i = 0; i < 3000 && !ex.sched().empty(); ++i) {
      if (next <= 30 && i % 3 == 0) {
        const int mt = max_tokens(rng);
        ex.add(next, (next * 3 % 5) / 4.0, mt, 1 + next % 5);
        total_tokens += mt;
        ++next;
      }
      ASSERT_TRUE(ex.step()) << "step " << i;
    }
    ASSERT_TRUE(ex.sched().empty());
    // Exactness (outputs are the pattern continued from the prompt's end, whatever the prompt's
    // length): checked per request here since prompts differ in length.
    for (const auto& [id, st] : ex.stats) {
      EXPECT_TRUE(st.finished) << "request " << id;
      EXPECT_EQ(st.reason, FinishReason::kLength);
      ASSERT_EQ(static_cast<int>(st.output.size()), st.max_tokens) << "request " << id;
      const int np = (1 + static_cast<int>(id) % 5) * kPattern;
      for (int k = 0; k < st.max_tokens; ++k) ASSERT_EQ(st.output[k], pattern_token(id, np + k)) << "request " << id;
    }
    EXPECT_EQ(ex.sched().num_free_blocks(), ex.sched().num_total_blocks());
    EXPECT_GT(ex.preemptions(), 0u) << "the pool never ran short";
    long drafts = 0, accepted = 0;
    for (const auto& [id, st] : ex.stats) {
      drafts += st.draft_nodes;
      accepted += st.accepted_nodes;
    }
    int budget_full = 0;
    for (const StepStats& s : ex.steps) budget_full += s.plan_tokens == 64;
    std::printf("[ info ] bookkeeping %s: %zu steps, %d tokens, %ld draft nodes (%ld accepted), %llu preemptions, "
                "%d steps at the budget\n",
                policy == SpecPolicy::kSmart ? "smart" : policy == SpecPolicy::kFixed ? "fixed" : "off", ex.steps.size(),
                total_tokens, drafts, accepted, static_cast<unsigned long long>(ex.preemptions()), budget_full);
    if (policy == SpecPolicy::kOff) {
      EXPECT_EQ(drafts, 0);
    } else {
      EXPECT_GT(drafts, 100);
      EXPECT_GT(accepted, 0);
      // kFixed's drafts fill spec_max_draft (the largest trees' bookkeeping); kSmart's sizes are
      // its own choice: multi-node trees, within the maximum.
      if (policy == SpecPolicy::kFixed)
        EXPECT_EQ(ex.max_draft_seen, 8);
      else
        EXPECT_TRUE(ex.max_draft_seen >= 4 && ex.max_draft_seen <= 8) << ex.max_draft_seen;
    }
  }
}

// 4. kFixed drafts min(spec_max_draft, room, budget left) whenever the drafter has a continuation
// (checked exactly inside the fake for every step); kOff never drafts.
TEST(SpecControllerScheduler, FixedDraftsTheMaximumAndOffDraftsNothing) {
  const TrueCost cost{1e-4, 1e-3, 1e-9, 2e-5};  // would make SmartSpec draft nothing
  {
    // Budget 40 for 6 decoding requests: drafts compete for the 34 left, the first ones get 8.
    SpecFake ex(spec_config(SpecPolicy::kFixed, 40, 400), cost, 2);
    for (RequestId id = 1; id <= 6; ++id) ex.add(id, 0.5, 100 + static_cast<int>(id));
    ASSERT_TRUE(ex.run());
    ex.expect_all_exact();
    int at_budget = 0, decode = 0;
    for (const StepStats& s : ex.steps)
      if (s.all_decode && s.seqs == 6) {
        ++decode;
        at_budget += s.plan_tokens == 40;
      }
    EXPECT_GT(decode, 10);
    EXPECT_GT(at_budget, decode / 2) << "drafts should fill the budget";
    EXPECT_EQ(ex.max_draft_seen, 8);
  }
  {
    SpecFake ex(spec_config(SpecPolicy::kOff, 2048, 400), cost, 3);
    for (RequestId id = 1; id <= 6; ++id) ex.add(id, 1.0, 100);
    ASSERT_TRUE(ex.run());
    ex.expect_all_exact();
    EXPECT_EQ(ex.max_draft_seen, 0);
    for (const StepStats& s : ex.steps) EXPECT_EQ(s.draft_tokens, 0);
    ASSERT_NE(ex.sched().spec(), nullptr);
    for (int d = 1; d <= 8; ++d) EXPECT_FLOAT_EQ(ex.sched().spec()->global_rates(/*greedy=*/true)[d], 0.5f);
  }
}

// Finished outputs are indexed in the background only once the scheduler has nothing left to
// run: while a request still decodes, an earlier one's output stays pending (the background
// thread does not run beside the steps), and once the last one finishes it is indexed with no
// further step.
TEST(SpecControllerScheduler, OutputsAreIndexedInTheBackgroundOnlyWhenIdle) {
  const TrueCost cost{1e-4, 1e-3, 1e-9, 2e-5};
  SpecFake ex(spec_config(SpecPolicy::kFixed, 64, 400), cost, 4);
  ex.add(1, 0.5, 5);
  ex.add(2, 0.5, 200);
  const Drafter* d = ex.sched().drafter();
  ASSERT_NE(d, nullptr);
  bool pending_while_busy = false;
  while (!ex.sched().empty()) {
    ASSERT_TRUE(ex.step());
    if (ex.stats[1].output.size() == 5 && !ex.sched().empty()) {
      // Steps 0.5 ms apart: longer than the background thread's quiet window.
      std::this_thread::sleep_for(std::chrono::microseconds(500));
      pending_while_busy |= d->num_pending_tokens() > 0;
      EXPECT_EQ(d->num_pending_tokens(), 5u) << "indexed while a request was running";
    }
  }
  EXPECT_TRUE(pending_while_busy);
  testing::eventually([&] { return d->num_pending_tokens() == 0; });
  EXPECT_EQ(d->num_pending_tokens(), 0u);
}

}  // namespace

}  // namespace accelcore
