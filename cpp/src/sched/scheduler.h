// Decides which requests run in the next step and how many of their tokens, and lays that out
// as a BatchPlan. FCFS admission within max_num_seqs and a token budget; a request's prompt may
// be split across steps (chunked prefill) and mixes with other requests' decode tokens.
//
// Memory policy (this version): a request is admitted only when blocks for its whole prompt plus
// max_tokens are free, and holds them until it ends, so a running request never runs out.
#pragma once

#include <deque>
#include <memory>
#include <unordered_map>
#include <vector>

#include "kv/block_allocator.h"
#include "sched/batch_plan.h"
#include "sched/request.h"

namespace accelcore {

struct SchedulerConfig {
  int max_num_seqs = 256;
  int max_num_batched_tokens = 2048;
  int block_size = 16;
  int num_blocks = 0;
};

// One request's share of a step.
struct ScheduledSeq {
  Request* req = nullptr;
  int first_token = 0;    // index of the first token computed in this step (== num_computed)
  int num_tokens = 0;
  int first_logit = 0;    // index into the plan's logit rows of this sequence's first row
  int num_logits = 0;     // rows for prompt log-probabilities and/or the sampling row
  bool samples = false;   // the step reaches the end of the known tokens: sample the next one
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& config);

  // Blocks a request of this many tokens in all needs.
  int blocks_for(int num_tokens) const { return (num_tokens + config_.block_size - 1) / config_.block_size; }
  int num_total_blocks() const { return allocator_.num_total(); }
  int num_free_blocks() const { return allocator_.num_free(); }
  int num_running() const { return static_cast<int>(running_.size()); }
  int num_waiting() const { return static_cast<int>(waiting_.size()); }
  bool empty() const { return requests_.empty(); }

  void add(std::unique_ptr<Request> req);
  Request* find(RequestId id);

  // Plans the next step. Clears and fills `plan` and `seqs`.
  void schedule(BatchPlan* plan, std::vector<ScheduledSeq>* seqs);

  // Ends a request: frees its blocks and forgets it. Returns the request for the caller's output.
  std::unique_ptr<Request> finish(RequestId id, FinishReason reason);

 private:
  SchedulerConfig config_;
  BlockAllocator allocator_;
  std::unordered_map<RequestId, std::unique_ptr<Request>> requests_;
  std::deque<Request*> waiting_;
  std::vector<Request*> running_;  // in admission order
};

}  // namespace accelcore
