// SmartSpec: how many draft tokens each decoding request gets in a step, chosen to maximise
// goodput = expected generated tokens / predicted step time.
//
//  - StepTimeModel: T = c0 + c_tok * tokens + c_kv * (KV tokens read) + c_seq * sequences, with
//    non-negative coefficients, fitted online by exponentially weighted least squares.
//  - Acceptance: per draft depth, globally and per request (a moving average that starts from the
//    global one), of "the most frequent drafted child of the last accepted node is accepted". A
//    draft node's acceptance given its parent's is that depth's rate times the node's share of the
//    trie counts among its siblings (share 1 for the most frequent one): the trie's own signal.
//  - Allocation (allocate_drafts): draft nodes of all requests ranked by their marginal goodput
//    (probability of being accepted / added step time), taken greedily while goodput rises and
//    the token budget lasts.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "sched/batch_plan.h"
#include "sched/request.h"
#include "spec/drafter.h"

namespace accelcore {

struct StepFeatures {
  double tokens = 0;     // rows computed (prompt chunks, decode tokens, draft nodes)
  double kv_tokens = 0;  // sum over rows of the positions each attends to
  double seqs = 0;       // sequences in the step
};

// The features of a planned step (a row at position p attends to p + 1 positions).
StepFeatures step_features(const BatchPlan& plan);

class StepTimeModel {
 public:
  static constexpr int kTerms = 4;  // c0, c_tok, c_kv, c_seq
  // forgetting: weight of an observation per later one (0.995: about the last 200 steps count).
  explicit StepTimeModel(double forgetting = 0.995);

  void observe(const StepFeatures& f, double seconds);
  double predict(const StepFeatures& f) const;
  // Added time of one more row that attends to kv_tokens positions.
  double row_cost(double kv_tokens) const { return coef_[1] + coef_[2] * kv_tokens; }
  const std::array<double, kTerms>& coefficients() const { return coef_; }
  uint64_t num_observations() const { return n_; }
  bool ready() const { return n_ >= kMinObservations; }

 private:
  static constexpr uint64_t kMinObservations = 8;
  void refit();

  double forgetting_;
  std::array<double, kTerms * kTerms> ata_{};  // weighted sums of x x^T, x = (1, tokens, kv, seqs)
  std::array<double, kTerms> aty_{};
  std::array<double, kTerms> coef_{};
  uint64_t n_ = 0;
};

enum class SpecPolicy { kOff, kFixed, kSmart };

class SpecController {
 public:
  SpecController(SpecPolicy policy, int max_depth);

  SpecPolicy policy() const { return policy_; }
  StepTimeModel& model() { return model_; }
  const StepTimeModel& model() const { return model_; }

  // The acceptance rate at depth d (1-based) for request r: its own once it has one, else global.
  float rate(const Request* r, int d) const;
  const std::vector<float>& global_rates() const { return global_; }
  // The most any first draft node of r can be worth (its acceptance probability).
  float first_node_bound(const Request* r) const { return rate(r, 1); }

  // Probability that each node of `t` is accepted (the product along its path).
  void node_probabilities(const Request* r, const DraftTree& t, std::vector<float>* p) const;

  // After verification: path[0..n) are the accepted draft nodes in depth order.
  void on_verified(Request* r, const DraftTree& t, const int32_t* path, int n);

 private:
  static constexpr float kPrior = 0.5f;          // acceptance before anything was measured
  static constexpr float kRequestAlpha = 0.25f;  // per-request moving average
  static constexpr float kGlobalAlpha = 0.02f;

  SpecPolicy policy_;
  int max_depth_;
  std::vector<float> global_;  // [d] for d in 1..max_depth (index 0 unused)
  StepTimeModel model_;
};

// One decoding request's candidate draft, its nodes ordered by acceptance probability (parents
// first). kv_tokens: the positions its first draft node attends to (context + 1).
struct DraftCandidate {
  std::vector<float> probs;
  std::vector<int32_t> depths;
  double kv_tokens = 0;
  int chosen = 0;  // output: nodes taken
};

// Greedy goodput allocation. `base` describes the step without drafts, which samples
// `base_samples` tokens; at most `budget` draft nodes in all. Returns the predicted goodput.
double allocate_drafts(const StepTimeModel& model, const StepFeatures& base, double base_samples, int budget,
                       std::vector<DraftCandidate>* cands);

// Reorders t's nodes (and probs alongside) by decreasing probability; ties keep their order, so
// parents stay before children (a child is never likelier than its parent). Any prefix of the
// result is then a valid tree: truncate it to the k nodes allocated.
void order_by_probability(DraftTree* t, std::vector<float>* probs);

}  // namespace accelcore
