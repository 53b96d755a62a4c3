#include "sched/scheduler.h"

#include <algorithm>

#include "util/check.h"

namespace accelcore {

Scheduler::Scheduler(const SchedulerConfig& config) : config_(config), allocator_(config.num_blocks) {
  ACCEL_CHECK(config.max_num_seqs > 0, InvalidArgument) << "max_num_seqs must be positive";
  ACCEL_CHECK(config.max_num_batched_tokens > 0, InvalidArgument) << "max_num_batched_tokens must be positive";
  ACCEL_CHECK(config.block_size > 0, InvalidArgument) << "block_size must be positive";
}

void Scheduler::add(std::unique_ptr<Request> req) {
  Request* r = req.get();
  r->status = Request::Status::kWaiting;
  requests_.emplace(r->id, std::move(req));
  waiting_.push_back(r);
}

Request* Scheduler::find(RequestId id) {
  auto it = requests_.find(id);
  return it == requests_.end() ? nullptr : it->second.get();
}

void Scheduler::schedule(BatchPlan* plan, std::vector<ScheduledSeq>* seqs) {
  plan->clear();
  seqs->clear();
  int budget = config_.max_num_batched_tokens;

  auto add_seq = [&](Request* r, int n) {
    ScheduledSeq s;
    s.req = r;
    s.first_token = r->num_computed;
    s.num_tokens = n;
    s.samples = r->num_computed + n == r->num_tokens();
    const int seq_index = plan->num_seqs();
    plan->block_table_offset.push_back(static_cast<int32_t>(plan->block_tables.size()));
    plan->block_tables.insert(plan->block_tables.end(), r->blocks.begin(), r->blocks.end());
    const int np = static_cast<int>(r->prompt.size());
    const bool want_prompt_lp = r->params.prompt_logprobs >= 0;
    s.first_logit = static_cast<int>(plan->logit_rows.size());
    for (int i = 0; i < n; ++i) {
      const int pos = s.first_token + i;
      const int row = plan->num_tokens();
      plan->token_ids.push_back(r->token_at(pos));
      plan->positions.push_back(pos);
      plan->slots.push_back(static_cast<int64_t>(r->blocks[pos / config_.block_size]) * config_.block_size +
                            pos % config_.block_size);
      plan->seq_of_token.push_back(seq_index);
      const bool last = i == n - 1;
      if ((want_prompt_lp && pos + 1 < np) || (last && s.samples)) plan->logit_rows.push_back(row);
    }
    s.num_logits = static_cast<int>(plan->logit_rows.size()) - s.first_logit;
    seqs->push_back(s);
    budget -= n;
  };

  // Running requests first, in admission order: decode tokens and unfinished prompt chunks.
  for (Request* r : running_) {
    if (budget == 0) break;
    const int need = r->num_tokens() - r->num_computed;
    ACCEL_DCHECK(need >= 1);
    add_seq(r, std::min(need, budget));
  }
  // Then admit waiting requests, first come first served, while blocks and budget allow.
  while (!waiting_.empty() && budget > 0 && static_cast<int>(running_.size()) < config_.max_num_seqs) {
    Request* r = waiting_.front();
    const int need_blocks = blocks_for(static_cast<int>(r->prompt.size()) + r->params.max_tokens);
    ACCEL_DCHECK(need_blocks <= allocator_.num_total());
    if (!allocator_.allocate(need_blocks, &r->blocks)) break;
    waiting_.pop_front();
    r->status = Request::Status::kRunning;
    running_.push_back(r);
    add_seq(r, std::min(r->num_tokens() - r->num_computed, budget));
  }
}

std::unique_ptr<Request> Scheduler::finish(RequestId id, FinishReason reason) {
  auto it = requests_.find(id);
  if (it == requests_.end()) return nullptr;
  std::unique_ptr<Request> req = std::move(it->second);
  requests_.erase(it);
  Request* r = req.get();
  if (r->status == Request::Status::kWaiting) {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), r));
  } else if (r->status == Request::Status::kRunning) {
    running_.erase(std::find(running_.begin(), running_.end(), r));
  }
  allocator_.release_all(&r->blocks);
  r->status = Request::Status::kFinished;
  r->finish_reason = reason;
  return req;
}

}  // namespace accelcore
