// SmartSpec: how many draft tokens each decoding request gets in a step, chosen to maximise
// goodput = expected generated tokens / predicted step time.
//
//  - StepTimeModel: T = c0 + c_tok * tokens + c_kv * (KV tokens read) + c_logit * (rows whose
//    logits are computed) + c_draft * (sequences with a draft), with non-negative coefficients,
//    fitted online by exponentially weighted least squares. A draft node is a row with logits
//    (the head and the verification), as a decode row is: it is priced c_tok + c_kv * context +
//    c_logit. (A per-sequence term instead took the head's cost in the start-up profile, and in
//    steady decoding, where rows, rows with logits and sequences are all equal, nothing separates
//    them: stories260K at saturation priced a draft node at half what it cost, and drafted.)
//  - Acceptance: of "the most frequent drafted child of the last accepted node is accepted", as
//    moving averages per draft depth: globally, globally per length of the matched context suffix
//    (the trie's signal: a long match predicts well), and per request (starting from the global
//    rate). A draft node's acceptance given its parent's is
//      share (its trie count over its most frequent sibling's) x rate(match length, depth)
//        x (the request's rate / the global rate at that depth),
//    and a request that goes without drafts drifts back toward the global rates, so one bad
//    stretch does not bar it from drafting for good. Global rates are plain means over their
//    first observations (the prior counting as one), then moving averages; while a (match length,
//    depth) cell has few observations its rate gets an optimistic bonus, kExplore / sqrt(n + 1),
//    so that cells never tried (long matches, say) get tried and measured. The estimate is then
//    calibrated (CalibrationMap: measured acceptance per range of the estimate, kept monotone)
//    before the bonus is added: overconfidence in the cells tried must not bar the others from
//    being tried. (Measured under fixed:8 on stories260K, estimates of 0.3-0.8 were accepted
//    10-30 points more often than estimated: one global factor cannot fix that.)
//  - Lookups: the drafter's proposal is timed by the scheduler (a moving average per lookup) and
//    kept out of the fit; a request is looked up only where its likeliest first node could pay
//    for a row, c_draft and the lookup.
//  - A measured guard (GoodputGuard) over all of that: tokens generated per second of the steps
//    that drafted and of those that did not, per range of sequences in the step. Where drafting
//    measures slower, steps go without drafts, whatever the model predicts.
//  - Allocation (allocate_drafts): moves of all requests ranked by their marginal goodput
//    (expected accepted nodes / added step time), taken greedily while goodput rises and the
//    token budget lasts; a request's first move is its best-ratio prefix (it alone pays
//    c_draft), later moves one node each.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "sched/batch_plan.h"
#include "sched/request.h"
#include "spec/drafter.h"

namespace accelcore {

struct StepFeatures {
  double tokens = 0;      // rows computed (prompt chunks, decode tokens, draft nodes)
  double kv_tokens = 0;   // sum over rows of the positions each attends to
  double logit_rows = 0;  // rows whose logits are computed: a sequence's sampled row, a draft node
  double drafted = 0;     // sequences with a draft tree (proposal, tree attention, verification)
  double seqs = 0;        // sequences in the step (not a model term: the goodput guard's key)
};

// The features of a planned step (a row at position p attends to p + 1 positions).
StepFeatures step_features(const BatchPlan& plan);

class StepTimeModel {
 public:
  // c0, c_tok, c_kv, c_logit, and c_draft: the fixed cost of drafting for a request (measured on
  // the CPU: the first draft node of a step costs about a row more than the next ones).
  static constexpr int kTerms = 5;
  // forgetting: weight of an observation per later one (0.98: about the last 50 steps count, so
  // the fit is local to the current load, where its slope is the marginal cost of a row).
  explicit StepTimeModel(double forgetting = 0.98);

  void observe(const StepFeatures& f, double seconds);
  // A start-up profile measurement: kept for good (never forgotten) at a small total weight, so
  // that terms the recent steps do not vary (no drafts for a while) stay anchored.
  void observe_profile(const StepFeatures& f, double seconds);
  double predict(const StepFeatures& f) const;
  // Added time of one more row with logits (a draft node) that attends to kv_tokens positions.
  double row_cost(double kv_tokens) const { return coef_[1] + coef_[2] * kv_tokens + coef_[3]; }
  double draft_cost() const { return coef_[4]; }
  // One draft lookup (the drafter's proposal for a request), measured by the scheduler around
  // each call, as a moving average, and kept out of the fit: a lone request looks up every step,
  // so a fitted term could not be told from c0, and a lookup costs even when it finds nothing.
  // Observed step times are given without their lookups' time (the engine subtracts it).
  void observe_lookup(double seconds);
  // A step without lookups: the estimate sinks a little (kLookupAging), so that one that priced
  // lookups out is measured again after a while. Lookups are made only where their cost may be
  // paid for, so a high estimate would otherwise stand for good: one slow lookup (a cold cache)
  // once stopped a lone stories260K request from drafting for the rest of its life.
  void age_lookup() { lookup_cost_ *= kLookupAging; }
  static constexpr double kLookupAging = 0.999;  // halves in about 700 steps
  double lookup_cost() const { return lookup_cost_; }
  const std::array<double, kTerms>& coefficients() const { return coef_; }
  uint64_t num_observations() const { return n_; }
  bool ready() const { return n_ >= kMinObservations; }

 private:
  static constexpr uint64_t kMinObservations = 8;
  void refit();

  static constexpr double kProfileWeight = 25.0;  // the whole profile counts as this many steps
  // Each step weighs 1 / seconds^2: the fit minimises relative errors. In absolute ones a batch of
  // 100 rows (300 us) outweighed a lone request's step (13 us) 500 times over, so after a busy
  // spell the fixed cost c0 fitted to 0, a lone request's draft row then looked as dear as its
  // whole step, and it never drafted again (stories260K after a warm-up of 100 stories).
  static double relative_weight(double seconds) { return 1.0 / std::max(seconds * seconds, 1e-18); }
  static void accumulate(const StepFeatures& f, double seconds, double weight, double* ata, double* aty);

  double forgetting_;
  std::array<double, kTerms * kTerms> ata_{};  // weighted sums of x x^T, x = (1, tokens, kv, logit rows, drafted)
  std::array<double, kTerms> aty_{};
  std::array<double, kTerms * kTerms> profile_ata_{};  // the profile's, unweighted
  std::array<double, kTerms> profile_aty_{};
  int profile_n_ = 0;
  std::array<double, kTerms> coef_{};
  uint64_t n_ = 0;
  static constexpr double kLookupAlpha = 0.05;
  double lookup_cost_ = 0;
  uint64_t lookups_ = 0;
};

// SmartSpec's measured guard. The step-time model is linear, and a machine's step time is not
// (threads that split a few rows but not more, caches, a VM's neighbours): at stories260K's
// 1600 req/s the model priced draft rows below their cost and SmartSpec ran 9-15% slower than no
// speculation. So the tokens generated per second (step start to step start) of steps with and
// without drafts are measured per range of sequences in the step (1, 2-3, 4-7, ..., 128+), and
// once both are measured a range drafts only while drafting measures at least as fast. Every
// kProbe-th step of a range goes the other way, so both stay measured; before the side without
// drafts is measured, those steps go without.
class GoodputGuard {
 public:
  static constexpr int kRanges = 8;
  static constexpr uint32_t kProbe = 32;
  static constexpr uint32_t kMinSteps = 4;  // observations of a side before it is trusted
  static constexpr double kAlpha = 0.05;    // moving averages of tokens and of seconds per step
  // Steps of fewer sequences are left to the model: there a drafted step's gain is near the noise
  // of one step's time, and the guard's probes (and its wrong verdicts) cost a lone request more
  // than they save (stories260K at 20 req/s: 2.5-3.0 tokens a step with it, 4.0-5.1 without).
  static constexpr int kMinSeqs = 4;

  // May this step, of `seqs` sequences, draft (the model then decides how much)?
  bool allow_drafts(int seqs);
  void observe(int seqs, bool drafted, double tokens, double seconds);
  // Measured tokens per second of a range's steps with or without drafts (0: none yet).
  double tokens_per_second(int seqs, bool drafted) const;

 private:
  static int range(int seqs);
  struct Side {
    double tokens = 0, seconds = 0;
    uint32_t n = 0;
  };
  std::array<std::array<Side, 2>, kRanges> sides_{};  // [range][drafted]
  std::array<uint32_t, kRanges> steps_{};
};

// Maps an acceptance estimate to the acceptance measured for estimates like it: per range of
// the estimate (kBins equal ones), the mean outcome, shrunk toward the range's centre while it
// has few observations, made non-decreasing by pooling adjacent violators, and interpolated
// linearly between the ranges' centres. Monotone, so a likelier-estimated node stays at least as
// likely after it: siblings keep their order and any prefix of a draft ordered by probability
// is still a tree. Every observation ages all ranges' outcomes (kForgetting), so a range that
// the current requests no longer reach drifts back to the identity instead of keeping what
// earlier ones did there: a request whose own rate dipped once reads that range, and stale
// outcomes of poor requests there kept it from drafting deep again.
class CalibrationMap {
 public:
  static constexpr int kBins = 10;
  CalibrationMap();
  void observe(float estimate, bool hit);
  float operator()(float estimate) const;
  // The map at the ranges' centres, estimates 0.05, 0.15, ..., 0.95.
  const std::array<float, kBins>& at_centres() const;

 private:
  static constexpr float kPriorWeight = 8;       // the centre counts as this many observations
  static constexpr float kForgetting = 0.999f;   // about the last 1000 observations count
  static int bin(float estimate);
  void rebuild() const;
  std::array<float, kBins> hits_{}, weight_{};   // aged sums of outcomes and of observations
  // Rebuilt when read after observations: a verification observes several nodes at once.
  mutable std::array<float, kBins> map_{};
  mutable bool stale_ = false;
};

enum class SpecPolicy { kOff, kFixed, kSmart };

class SpecController {
 public:
  // max_match: the drafter's longest matched suffix (match lengths above it never occur).
  SpecController(SpecPolicy policy, int max_depth, int max_match);

  SpecPolicy policy() const { return policy_; }
  StepTimeModel& model() { return model_; }
  const StepTimeModel& model() const { return model_; }
  GoodputGuard& guard() { return guard_; }
  const GoodputGuard& guard() const { return guard_; }
  // Acceptance is learned per sampling mode, greedy requests apart from sampled ones (mode()).
  const CalibrationMap& calibration(bool greedy) const { return modes_[mode(greedy)].calibration; }

  // The acceptance rate at depth d (1-based) for request r: its own once it has one, else global.
  float rate(const Request* r, int d) const;
  const std::vector<float>& global_rates(bool greedy) const { return modes_[mode(greedy)].global; }
  // What r's likeliest first draft node is worth at most, as far as its last proposal tells: the
  // optimistic rate for the longest match it can have now (a repeating text matches one token
  // longer per token appended), or 1 before any proposal. The scheduler skips the lookup when
  // even this cannot raise goodput, and still proposes every kProbeInterval steps to refresh the
  // match.
  float first_node_bound(const Request* r) const;
  static constexpr int kProbeInterval = 16;
  // What any request's first draft node is worth at most: the highest optimistic rate over the
  // match lengths, with the most a request's own record may raise it, over the sampling modes of
  // the requests that could draft (greedy and/or sampled ones). Where even this cannot raise
  // goodput, no lookup (nor periodic probe) can find a draft that pays.
  float max_first_node_rate(bool greedy, bool sampled) const;
  // r went through a step without a draft: its rates move a little toward the global ones.
  void relax(Request* r);

  // Probability that each node of `t` is accepted (the product along its path).
  void node_probabilities(const Request* r, const DraftTree& t, std::vector<float>* p) const;

  // After verification: path[0..n) are the accepted draft nodes in depth order.
  void on_verified(Request* r, const DraftTree& t, const int32_t* path, int n);

 private:
  static constexpr float kPrior = 0.5f;          // acceptance before anything was measured
  static constexpr float kRequestAlpha = 0.25f;  // per-request moving average
  static constexpr float kGlobalAlpha = 0.02f;
  static constexpr float kRelax = 0.05f;         // per step without a draft
  static constexpr float kExplore = 0.3f;
  static constexpr float kMaxRequestFactor = 1.25f;  // a request's own rate over the global one, capped
  static constexpr int kMatchBuckets = 6;        // match lengths 1, 2, 3-4, 5-8, 9-16, 17+
  static int bucket(int match);
  float request_factor(const Request* r, int d) const;

  SpecPolicy policy_;
  int max_depth_;
  int num_buckets_;  // the match buckets max_match reaches: the others are never observed
  // The acceptance statistics, one set per sampling mode: drafts of greedy and of sampled
  // requests are accepted at very different rates, and estimates learned from one kind of traffic
  // mislead for the other (sampled traffic whose drafts failed left greedy requests that would be
  // accepted 99% of the time drafting nothing: SampledTrafficDoesNotLowerGreedyEstimates).
  struct ModeStats {
    std::vector<float> global;    // [d] for d in 1..max_depth (index 0 unused)
    std::vector<float> by_match;  // [bucket * (max_depth + 1) + d]
    std::vector<uint32_t> global_n, by_match_n;  // observations behind each rate
    CalibrationMap calibration;
  };
  std::array<ModeStats, 2> modes_;  // greedy, sampled
  static int mode(bool greedy) { return greedy ? 0 : 1; }
  static int mode(const Request* r) { return mode(r->params.greedy()); }
  const ModeStats& stats(const Request* r) const { return modes_[mode(r)]; }
  // The probability that a node is accepted given its parent was: its calibrated estimate
  // share x rate(cell) x factor, plus the cell's exploration bonus (scaled by share x factor).
  static float conditional(const ModeStats& m, int cell, float share, float factor);
  static float estimate(const ModeStats& m, int cell, float share, float factor);  // the uncalibrated one
  StepTimeModel model_;
  GoodputGuard guard_;
};

// One decoding request's candidate draft, its nodes ordered by acceptance probability (parents
// first). kv_tokens: the positions its first draft node attends to (context + 1).
struct DraftCandidate {
  std::vector<float> probs;
  std::vector<int32_t> depths;
  double kv_tokens = 0;
  int chosen = 0;  // output: nodes taken
};

// Greedy goodput allocation. `base` describes the rows a draft competes with (the scheduler
// passes the step's sampled rows: its prompt rows run anyway), which sample `base_samples` tokens;
// at most `budget` draft nodes in all. Returns the predicted goodput.
double allocate_drafts(const StepTimeModel& model, const StepFeatures& base, double base_samples, int budget,
                       std::vector<DraftCandidate>* cands);

// Reorders t's nodes (and probs alongside) by decreasing probability; ties keep their order, so
// parents stay before children (a child is never likelier than its parent). Any prefix of the
// result is then a valid tree: truncate it to the k nodes allocated.
void order_by_probability(DraftTree* t, std::vector<float>* probs);

}  // namespace accelcore
