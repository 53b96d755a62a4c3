// Decides which requests run in the next step and how many of their tokens, and lays that out as
// a BatchPlan. No prefill/decode phases: each step serves running requests first (decode tokens,
// unfinished prompt chunks), then admits waiting ones first come first served, within
// max_num_seqs and the token budget max_num_batched_tokens; a prompt longer than the budget left
// is split across steps (chunked prefill).
//
// Memory: blocks are taken as tokens need them. When none is left, the most recently admitted
// running request is preempted: its blocks are released and it goes back to the head of the
// queue, to be recomputed from its known tokens (which gives exactly the same continuation: the
// kernels are batch-invariant and sampling is keyed by output position). With prefix caching,
// full blocks are registered under a hash chain of their tokens and new requests reuse them.
//
// The scheduler owns the request lifecycle (tokens appended, stop conditions, finish) but never
// sees the model: a test drives it with a fake executor.
#pragma once

#include <deque>
#include <memory>
#include <optional>
#include <unordered_map>
#include <vector>

#include "kv/block_allocator.h"
#include "sched/batch_plan.h"
#include "sched/request.h"
#include "sched/spec_controller.h"
#include "spec/drafter.h"

namespace accelcore {

struct SchedulerConfig {
  int max_num_seqs = 256;
  int max_num_batched_tokens = 2048;
  int block_size = 16;
  int num_blocks = 0;
  bool enable_prefix_caching = false;
  std::vector<int32_t> eos_token_ids;
  // Speculation (Lookahead): draft trees of at most spec_max_draft nodes and depth <=
  // spec_max_depth after decoding requests' last tokens (0 nodes: no drafter at all). How many
  // each request gets: kFixed, all of them the budget allows; kSmart, the goodput-maximising
  // number (0 or more); kOff, none.
  int spec_max_draft = 0;
  SpecPolicy spec_policy = SpecPolicy::kFixed;
  int spec_max_depth = 8;
  int spec_max_match = 8;
  size_t spec_memory_bytes = 64ull << 20;
  // The KV cache is quantized (kv/kv_cache.h): a draft stays inside the block after its root, whose
  // float form every node reads, so its depth is at most the room left there.
  bool kv_quantized = false;
};

// One request's share of a step.
struct ScheduledSeq {
  Request* req = nullptr;
  int first_token = 0;    // index of the first token computed in this step (== num_computed)
  int num_tokens = 0;
  int first_logit = 0;    // index into the plan's logit rows of this sequence's first row
  int num_logits = 0;     // rows for prompt log-probabilities and/or the sampling row
  bool samples = false;   // the step reaches the end of the known tokens: sample the next one
  // Speculation: draft nodes follow the last token (rows first_token + 1 ...), one logit row each
  // after the root's; node i's K/V sits at position index first_token + 1 + i until verified.
  DraftTree draft;
};

struct SchedulerCounters {
  uint64_t num_preemptions = 0;
  uint64_t prefix_cache_hit_tokens = 0;   // prompt tokens whose prefill was skipped
  uint64_t prefix_cache_query_tokens = 0; // prompt tokens looked up
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& config);

  const SchedulerConfig& config() const { return config_; }
  int blocks_for(int num_tokens) const { return (num_tokens + config_.block_size - 1) / config_.block_size; }
  int num_total_blocks() const { return allocator_.num_total(); }
  int num_free_blocks() const { return allocator_.num_free(); }
  int num_cached_blocks() const { return allocator_.num_cached(); }
  int num_running() const { return static_cast<int>(running_.size()); }
  int num_waiting() const { return static_cast<int>(waiting_.size()); }
  bool empty() const { return requests_.empty(); }
  const SchedulerCounters& counters() const { return counters_; }
  const std::vector<Request*>& running() const { return running_; }
  const std::deque<Request*>& waiting() const { return waiting_; }
  const BlockAllocator& allocator() const { return allocator_; }
  // Null without speculation.
  const SpecController* spec() const { return spec_.get(); }
  const Drafter* drafter() const { return drafter_.get(); }  // null without speculation
  // Draft nodes and requests with a draft in the last planned step.
  int last_draft_tokens() const { return last_draft_tokens_; }
  int last_drafted_seqs() const { return last_drafted_seqs_; }
  // Seconds the last planned step spent looking up drafts (SmartSpec times each lookup).
  double last_lookup_seconds() const { return last_lookup_s_; }
  // The clock that times lookups (seconds); tests replace it to make lookups cost what they say.
  using Clock = double (*)();
  void set_clock(Clock clock) { clock_ = clock; }

  void add(std::unique_ptr<Request> req);
  Request* find(RequestId id);

  // Plans the next step. Clears and fills `plan` and `seqs`. Requests that can never be served
  // (nothing runs and the head of the queue still cannot get memory) are finished with kError and
  // reported in `failed`.
  void schedule(BatchPlan* plan, std::vector<ScheduledSeq>* seqs, std::vector<std::unique_ptr<Request>>* failed);

  // After the forward pass, for each scheduled sequence: its first `num_computed` tokens of the
  // step now have K/V in their final slots (all of them, or the root plus accepted draft nodes).
  void on_computed(const ScheduledSeq& s, int num_computed);
  // After the forward pass of a sequence with a draft: path[0, n) are its accepted draft nodes in
  // depth order (updates the acceptance estimates; call before on_computed).
  void on_verified(const ScheduledSeq& s, const int32_t* path, int n);
  // A step's measured duration, for the step-time model (features: step_features of its plan),
  // and the tokens it generated, for SmartSpec's goodput guard (seconds then from its start to
  // the next step's; -1: not known, the guard learns nothing).
  void observe_step(const StepFeatures& f, double seconds, double generated_tokens = -1);
  void observe_profile(const StepFeatures& f, double seconds);  // a start-up profile measurement
  // The KV slot of token index `index` of request r (its block table must cover it).
  int64_t slot(const Request* r, int index) const {
    return static_cast<int64_t>(r->blocks[index / config_.block_size]) * config_.block_size + index % config_.block_size;
  }
  // Appends a sampled token and returns the finish reason it causes (kNone to go on).
  FinishReason append_token(Request* r, int32_t token);
  // The blocks whose last holder let go since the last call (finished or preempted requests), and
  // whether each is a full block the prefix cache keeps.
  void take_released(std::vector<int32_t>* blocks, std::vector<uint8_t>* full);
  // Ends a request: releases its blocks and forgets it. Returns it (null for an unknown id).
  std::unique_ptr<Request> finish(RequestId id, FinishReason reason);

 private:
  bool ensure_blocks(Request* r, int num_tokens);  // blocks for positions [0, num_tokens)
  void preempt(Request* r);
  int match_prefix(Request* r);  // takes cached blocks for r's prefix; returns tokens matched
  void add_seq(Request* r, int n, DraftTree draft, BatchPlan* plan, std::vector<ScheduledSeq>* seqs);
  // Drafts for the picked sequences, within `budget` draft nodes, by the configured policy.
  void plan_drafts(int budget, std::vector<DraftTree>* drafts);
  void propose(Request* r, int max_nodes, DraftTree* out);

  SchedulerConfig config_;
  BlockAllocator allocator_;
  std::unique_ptr<Drafter> drafter_;  // null without speculation
  std::unique_ptr<SpecController> spec_;
  SchedulerCounters counters_;
  std::unordered_map<RequestId, std::unique_ptr<Request>> requests_;
  std::deque<Request*> waiting_;
  std::vector<Request*> running_;  // in admission order; the tail is preempted first
  std::vector<int32_t> context_;   // scratch: a request's tokens, for the drafter
  struct Pick {
    Request* req;
    int num_tokens;
  };
  std::vector<Pick> picks_;  // scratch: the sequences of the step being planned
  int last_draft_tokens_ = 0, last_drafted_seqs_ = 0;
  double last_lookup_s_ = 0;
  Clock clock_ = steady_seconds;
  static double steady_seconds();
  // SmartSpec: steps between the steps that draft a node more than allocated (for the step-time
  // model and the acceptance estimates).
  static constexpr int kDraftProbeInterval = 32;
  int steps_since_draft_probe_ = 0;
  // SmartSpec: steps in which the global gate (no first node any request could have pays) turned
  // every request away since one request last went through it with a forced first node.
  static constexpr int kGateProbeInterval = 64;
  int steps_gate_shut_ = 0;
  // Finished outputs waiting for the draft store beyond which the oldest are dropped; at most
  // kMaxIdleFlush of them are indexed by a step that starts from an idle engine.
  static constexpr size_t kMaxIndexBacklog = 4096, kMaxIdleFlush = 1024;
};

}  // namespace accelcore
