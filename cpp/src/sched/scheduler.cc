#include "sched/scheduler.h"

#include <algorithm>
#include <chrono>
#include <string>

#include "util/check.h"

namespace accelcore {

Scheduler::Scheduler(const SchedulerConfig& config) : config_(config), allocator_(config.num_blocks) {
  ACCEL_CHECK(config.max_num_seqs > 0, InvalidArgument) << "max_num_seqs must be positive";
  if (config.spec_max_draft > 0) {
    DrafterConfig dc;
    dc.max_match = config.spec_max_match;
    dc.max_depth = config.spec_max_depth;
    dc.memory_bytes = config.spec_memory_bytes;
    drafter_ = std::make_unique<Drafter>(dc);
    spec_ = std::make_unique<SpecController>(config.spec_policy, config.spec_max_depth, config.spec_max_match);
    if (config.spec_policy != SpecPolicy::kOff) drafter_->start_background_indexing();
  }
  ACCEL_CHECK(config.max_num_batched_tokens > 0, InvalidArgument) << "max_num_batched_tokens must be positive";
  ACCEL_CHECK(config.block_size > 0, InvalidArgument) << "block_size must be positive";
}

void Scheduler::add(std::unique_ptr<Request> req) {
  Request* r = req.get();
  r->status = Request::Status::kWaiting;
  ACCEL_DCHECK(!requests_.count(r->id));
  requests_.emplace(r->id, std::move(req));
  waiting_.push_back(r);
}

Request* Scheduler::find(RequestId id) {
  auto it = requests_.find(id);
  return it == requests_.end() ? nullptr : it->second.get();
}

bool Scheduler::ensure_blocks(Request* r, int num_tokens) {
  const int need = blocks_for(num_tokens) - static_cast<int>(r->blocks.size());
  return need <= 0 || allocator_.allocate(need, &r->blocks);
}

void Scheduler::preempt(Request* r) {
  ACCEL_DCHECK(r->status == Request::Status::kRunning);
  allocator_.release_all(&r->blocks);
  r->num_computed = 0;
  r->block_hashes.clear();
  // Preempted inside its prompt: the recompute scores the prompt again from position 0, so the
  // log-probabilities gathered so far must go (else they are emitted twice over).
  if (!r->prompt_logprobs_done) r->prompt_logprobs.clear();
  r->status = Request::Status::kWaiting;
  ++r->num_preemptions;
  ++counters_.num_preemptions;
  running_.erase(std::find(running_.begin(), running_.end(), r));
  waiting_.push_front(r);
}

int Scheduler::match_prefix(Request* r) {
  ACCEL_DCHECK(r->blocks.empty() && r->num_computed == 0);
  if (!config_.enable_prefix_caching || r->params.prompt_logprobs >= 0) return 0;
  const int bs = config_.block_size;
  // At least the last token is computed again: its logits are needed for the next sample.
  const int max_blocks = (r->num_tokens() - 1) / bs;
  std::vector<int32_t> tokens(bs);
  uint64_t parent = kRootHash;
  for (int b = 0; b < max_blocks; ++b) {
    for (int i = 0; i < bs; ++i) tokens[i] = r->token_at(b * bs + i);
    const uint64_t h = hash_block(parent, tokens.data(), bs);
    const int32_t block = allocator_.lookup(h, parent, tokens.data(), bs);
    if (block < 0) break;
    allocator_.add_ref(block);
    r->blocks.push_back(block);
    r->block_hashes.push_back(h);
    parent = h;
  }
  r->num_computed = static_cast<int>(r->blocks.size()) * bs;
  return r->num_computed;
}

void Scheduler::add_seq(Request* r, int n, DraftTree draft, BatchPlan* plan, std::vector<ScheduledSeq>* seqs) {
  ScheduledSeq s;
  s.req = r;
  s.first_token = r->num_computed;
  s.num_tokens = n;
  s.samples = r->num_computed + n == r->num_tokens();
  s.draft = std::move(draft);
  const int seq_index = plan->num_seqs();
  plan->block_table_offset.push_back(static_cast<int32_t>(plan->block_tables.size()));
  plan->block_tables.insert(plan->block_tables.end(), r->blocks.begin(), r->blocks.end());
  const int np = static_cast<int>(r->prompt.size());
  const bool want_prompt_lp = r->wants_prompt_logprobs();
  auto slot_of = [&](int index) { return slot(r, index); };
  const bool any_extra = !plan->extra_offset.empty() || !s.draft.tokens.empty();
  if (any_extra && plan->extra_offset.empty()) plan->extra_offset.assign(plan->num_tokens() + 1, 0);
  s.first_logit = static_cast<int>(plan->logit_rows.size());
  for (int i = 0; i < n; ++i) {
    const int pos = s.first_token + i;
    const int row = plan->num_tokens();
    plan->token_ids.push_back(r->token_at(pos));
    plan->positions.push_back(pos);
    plan->slots.push_back(slot_of(pos));
    plan->seq_of_token.push_back(seq_index);
    if (any_extra) plan->extra_offset.push_back(plan->extra_offset.back());
    if ((want_prompt_lp && pos + 1 < np) || (i == n - 1 && s.samples)) plan->logit_rows.push_back(row);
  }
  // Draft nodes: position = root position + depth; slot = the node's own index after the root;
  // extras = the slots of its ancestors and itself, in depth order.
  const int root = s.first_token + n - 1;
  std::vector<int64_t> chain;
  for (int i = 0; i < s.draft.size(); ++i) {
    const int row = plan->num_tokens();
    plan->token_ids.push_back(s.draft.tokens[i]);
    plan->positions.push_back(root + s.draft.depths[i]);
    plan->slots.push_back(slot_of(root + 1 + i));
    plan->seq_of_token.push_back(seq_index);
    chain.clear();
    for (int a = i; a >= 0; a = s.draft.parents[a]) chain.push_back(slot_of(root + 1 + a));
    plan->extra_slots.insert(plan->extra_slots.end(), chain.rbegin(), chain.rend());
    plan->extra_offset.push_back(static_cast<int32_t>(plan->extra_slots.size()));
    plan->logit_rows.push_back(row);
  }
  s.num_logits = static_cast<int>(plan->logit_rows.size()) - s.first_logit;
  seqs->push_back(std::move(s));
}

void Scheduler::schedule(BatchPlan* plan, std::vector<ScheduledSeq>* seqs,
                         std::vector<std::unique_ptr<Request>>* failed) {
  plan->clear();
  seqs->clear();
  picks_.clear();
  int budget = config_.max_num_batched_tokens;
  // Starting from an idle engine, every finished output is in the draft store first (the
  // background thread has usually indexed them all by then): a request arriving after others
  // finished drafts from them, whatever the timing. A backlog left by a busy stretch is cut to
  // kMaxIdleFlush tokens first (about 0.7 ms of indexing for the new request to wait).
  if (drafter_) {
    if (running_.empty() && drafter_->num_pending_tokens() > 0) {
      drafter_->drop_pending(kMaxIdleFlush);
      drafter_->flush();
    }
    drafter_->note_busy();
  }

  // Running requests first, in admission order. One that cannot get a block preempts the most
  // recently admitted request (possibly itself), which comes later in the order: nothing picked
  // is ever preempted.
  const uint64_t preemptions_before = counters_.num_preemptions;
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    Request* r = running_[i];
    const int n = std::min(r->num_tokens() - r->num_computed, budget);
    ACCEL_DCHECK(n >= 1);
    bool self_preempted = false;
    while (!ensure_blocks(r, r->num_computed + n)) {
      Request* victim = running_.back();
      preempt(victim);
      if (victim == r) {
        self_preempted = true;
        break;
      }
    }
    if (self_preempted) break;  // it was the last running request
    picks_.push_back({r, n});
    budget -= n;
  }

  // Then admit waiting requests, first come first served, while seats, budget and blocks allow;
  // not in a step that had to preempt (memory is short: admitting would only thrash).
  const bool preempted = counters_.num_preemptions != preemptions_before;
  while (!preempted && !waiting_.empty() && budget > 0 && static_cast<int>(running_.size()) < config_.max_num_seqs) {
    Request* r = waiting_.front();
    const int np = static_cast<int>(r->prompt.size());
    // K/V is needed for the prompt and every generated token but the last. A request whose K/V
    // cannot fit in the whole pool must fail now: its chunks fit one by one, so otherwise it
    // would be admitted, preempt itself when the pool runs dry, and start over, forever (and
    // hold up every request queued behind it).
    const int max_kv_tokens = np + std::max(r->params.max_tokens, 1) - 1;
    if (blocks_for(max_kv_tokens) > allocator_.num_total()) {
      r->error = "request needs " + std::to_string(blocks_for(max_kv_tokens)) + " KV blocks (prompt " +
                 std::to_string(np) + " tokens, max_tokens " + std::to_string(r->params.max_tokens) +
                 ") but the pool has only " + std::to_string(allocator_.num_total());
      waiting_.pop_front();
      failed->push_back(finish(r->id, FinishReason::kError));
      continue;
    }
    const int hit = match_prefix(r);
    const int n = std::min(r->num_tokens() - r->num_computed, budget);
    if (!ensure_blocks(r, r->num_computed + n)) {
      allocator_.release_all(&r->blocks);  // give back the prefix hits; retried next step
      r->block_hashes.clear();
      r->num_computed = 0;
      if (running_.empty() && picks_.empty()) {
        // Nothing runs and it still does not fit: it never will. Fail it rather than hang.
        r->error = "request needs more KV blocks than the pool can ever free for it";
        waiting_.pop_front();
        failed->push_back(finish(r->id, FinishReason::kError));
        continue;
      }
      break;
    }
    waiting_.pop_front();
    r->status = Request::Status::kRunning;
    running_.push_back(r);
    if (r->num_preemptions == 0) {  // a resumed request's own blocks are not prefix hits
      r->num_cached_tokens = std::min(hit, np);
      counters_.prefix_cache_query_tokens += np;
      counters_.prefix_cache_hit_tokens += r->num_cached_tokens;
    }
    picks_.push_back({r, n});
    budget -= n;
  }

  // Drafts take what budget is left (after every prompt chunk and admission) and free blocks
  // only: they never cause a preemption or delay a request.
  std::vector<DraftTree> drafts(picks_.size());
  last_draft_tokens_ = last_drafted_seqs_ = 0;
  last_lookup_s_ = 0;
  if (drafter_ && budget > 0) plan_drafts(budget, &drafts);
  for (size_t i = 0; i < picks_.size(); ++i) {
    last_draft_tokens_ += drafts[i].size();
    last_drafted_seqs_ += drafts[i].size() > 0;
    add_seq(picks_[i].req, picks_[i].num_tokens, std::move(drafts[i]), plan, seqs);
  }
  // Finished outputs join the draft store in the background, on idle cores. When none is ever
  // idle (sustained full load) the oldest waiting outputs are dropped instead: indexing them here
  // cost more than the steps themselves (256 tokens, about 180 us, in a 70 us step of
  // stories260K at 1600 req/s), and under such a load drafts do not pay anyway.
  if (drafter_ && drafter_->num_pending_tokens() > kMaxIndexBacklog) drafter_->drop_pending(kMaxIndexBacklog);
  if (drafter_ && running_.empty() && waiting_.empty()) drafter_->note_idle();
}

void Scheduler::take_released(std::vector<int32_t>* blocks, std::vector<uint8_t>* full) {
  blocks->clear();
  full->clear();
  allocator_.take_released(blocks);
  for (int32_t b : *blocks) full->push_back(allocator_.is_cached(b));
}

double Scheduler::steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void Scheduler::propose(Request* r, int max_nodes, DraftTree* out) {
  context_.resize(r->num_tokens());
  for (int k = 0; k < r->num_tokens(); ++k) context_[k] = r->token_at(k);
  int max_depth = config_.spec_max_depth;
  if (config_.kv_quantized) max_depth = std::min(max_depth, config_.block_size - r->num_tokens() % config_.block_size);
  // The last match, grown by the tokens since, is the likeliest match now.
  const int hint = r->spec_match > 0 ? r->spec_match + r->num_tokens() - r->spec_match_tokens : 0;
  drafter_->propose(context_.data(), r->num_tokens(), max_nodes, max_depth, out, true, hint);
  r->spec_match = out->match;
  r->spec_match_tokens = r->num_tokens();
}

void Scheduler::plan_drafts(int budget, std::vector<DraftTree>* drafts) {
  const SpecPolicy policy = spec_->policy();
  if (policy == SpecPolicy::kOff) return;
  // A request can draft when this step samples its next token and more than one is still to come.
  auto room = [&](const Pick& p) {
    const Request* r = p.req;
    if (r->num_computed + p.num_tokens != r->num_tokens()) return 0;
    return std::min(config_.spec_max_draft, r->params.max_tokens - static_cast<int>(r->output.size()) - 1);
  };
  auto take = [&](size_t i, DraftTree&& t) {
    Request* r = picks_[i].req;
    if (t.size() == 0 || !ensure_blocks(r, r->num_computed + picks_[i].num_tokens + t.size())) return 0;
    (*drafts)[i] = std::move(t);
    return (*drafts)[i].size();
  };

  if (policy == SpecPolicy::kFixed) {
    for (size_t i = 0; i < picks_.size() && budget > 0; ++i) {
      const int k = std::min(room(picks_[i]), budget);
      if (k <= 0) continue;
      DraftTree t;
      propose(picks_[i].req, k, &t);
      budget -= take(i, std::move(t));
    }
    return;
  }

  // SmartSpec. Until the step-time model has data, no drafts (the engine profiles at start-up).
  const StepTimeModel& model = spec_->model();
  if (!model.ready()) return;
  // Requests left waiting after admission: the engine is past its capacity, where every row a
  // draft adds delays them all and the goodput of the running ones says nothing of theirs
  // (stories260K at 1600 req/s past saturation: 8% less throughput and 36% more latency than no
  // speculation with drafts, equal without).
  if (!waiting_.empty()) return;
  if (!spec_->guard().allow_drafts(static_cast<int>(picks_.size()))) return;
  // The goodput a draft must beat is that of the step's sampled rows (and its fixed cost) alone.
  // Prompt rows without a sample are work done once whatever is drafted: counted in, their time
  // dilutes the goodput, and under load (prompts in every step) drafts yielding less per row than
  // decoding looked worth it (stories260K at 1600 req/s: 0.75 tokens for a row's time).
  StepFeatures base;  // one row with logits per sampled request
  for (const Pick& p : picks_) {
    const int end = p.req->num_computed + p.num_tokens;
    if (end == p.req->num_tokens()) base.tokens += 1, base.kv_tokens += end;
  }
  base.logit_rows = base.tokens;
  const double samples = base.tokens;
  const double base_goodput = samples / std::max(model.predict(base), 1e-9);
  bool greedy = false, sampled = false;  // the sampling modes of the requests that could draft
  for (const Pick& p : picks_) (p.req->params.greedy() ? greedy : sampled) = true;
  const double best_rate = spec_->max_first_node_rate(greedy, sampled);
  std::vector<DraftCandidate> cands;
  std::vector<size_t> cand_pick;
  std::vector<DraftTree> trees;
  // The gate below rests on the global estimates, which only drafts update: traffic whose drafts
  // failed at every match length (a sampled warm-up, say) could shut it for good, and later
  // requests whose drafts would be right never drafted (stories260K at 20 req/s: 1.04 tokens a
  // step in one run of 25). So once the estimates alone have shut it (a first node sure to be
  // accepted would pay: not under full load, nor where a lookup costs more than a row's gain) for
  // kGateProbeInterval steps, one request goes through with its first node forced.
  bool gate_shut = false, gate_used = false;
  int gate_probe = -1;  // the candidate let through, if its lookup found a draft
  for (size_t i = 0; i < picks_.size(); ++i) {
    const int k = std::min(room(picks_[i]), budget);
    if (k <= 0) continue;
    Request* r = picks_[i].req;
    DraftCandidate c;
    c.kv_tokens = r->num_tokens() + 1.0;  // a depth-1 node attends to the context and itself
    // No draft can pay where even the likeliest first node any request could have would not
    // raise goodput (a deeper node is no likelier and costs no less), as under full load, where
    // every row costs what a decode row does: then skip the lookup altogether, periodic probe
    // included (stories260K at 1600 req/s: the probes' lookups cost about 5% of a step). A first
    // node must also pay for the lookup that finds it: a lone stories260K request's lookups took
    // 3-12 us of a 23 us step, more than its drafts gained.
    const double first_cost = model.row_cost(c.kv_tokens) + model.draft_cost() + model.lookup_cost();
    bool through_gate = false;
    if (best_rate / std::max(first_cost, 1e-12) <= base_goodput) {
      // Shut by the estimates alone: a first node sure to be accepted would pay.
      const bool estimates_shut = 1.0 / std::max(first_cost, 1e-12) > base_goodput;
      gate_shut = gate_shut || estimates_shut;
      if (!estimates_shut || gate_used || steps_gate_shut_ < kGateProbeInterval) {
        spec_->relax(r);
        continue;
      }
      through_gate = gate_used = true;
    }
    // The cheap check: if even the likeliest first node would not raise goodput, skip the lookup,
    // unless the request's last proposal is old (its text may have become predictable).
    const bool probe = through_gate || ++r->spec_steps_unprobed >= SpecController::kProbeInterval;
    if (!probe && spec_->first_node_bound(r) / std::max(first_cost, 1e-12) <= base_goodput) {
      spec_->relax(r);
      continue;
    }
    DraftTree t;
    const double t0 = clock_();
    propose(r, k, &t);
    const double lookup_s = clock_() - t0;
    spec_->model().observe_lookup(lookup_s);
    last_lookup_s_ += lookup_s;
    r->spec_steps_unprobed = 0;
    if (t.size() == 0) continue;
    spec_->node_probabilities(r, t, &c.probs);
    order_by_probability(&t, &c.probs);
    c.depths = t.depths;
    if (through_gate) gate_probe = static_cast<int>(cands.size());
    cands.push_back(std::move(c));
    cand_pick.push_back(i);
    trees.push_back(std::move(t));
  }
  // Steps the gate shut count until a request goes through it (found a draft or not).
  steps_gate_shut_ = gate_used ? 0 : steps_gate_shut_ + (gate_shut ? 1 : 0);
  if (cands.empty()) return;
  allocate_drafts(model, base, samples, budget, &cands);
  if (gate_probe >= 0 && cands[static_cast<size_t>(gate_probe)].chosen == 0) {
    int used = 0;
    for (const DraftCandidate& c : cands) used += c.chosen;
    if (used < budget) cands[static_cast<size_t>(gate_probe)].chosen = 1;
  }
  // Now and then a step drafts one node more than allocated for some requests, where that node
  // may well be accepted though the model says it does not pay:
  //  - a first node: without such steps a steady load never varies the step's shape, and the
  //    model's marginal costs rest on the start-up profile, measured at small batches (rows cost
  //    less in large ones);
  //  - a node past the allocation, or a first node after drafts stopped: estimates that fell
  //    (the first stories of a kind missed, say) are never observed again if never drafted. Runs of
  //    stories260K served one at a time stayed at 2-4 nodes a step, depths 3-8 at their prior or
  //    below it, while 8-node drafts (fixed:8) of the same requests were accepted at 93-100% at
  //    every depth.
  if (++steps_since_draft_probe_ >= kDraftProbeInterval) {
    steps_since_draft_probe_ = 0;
    int left = std::max<int>(1, static_cast<int>(picks_.size()) / 8);
    for (const DraftCandidate& c : cands) budget -= c.chosen;
    for (DraftCandidate& c : cands) {
      if (left <= 0 || budget <= 0 || c.chosen == static_cast<int>(c.probs.size())) continue;
      if (c.probs[c.chosen] >= 0.2f) ++c.chosen, --left, --budget;
    }
  }
  for (size_t j = 0; j < cands.size(); ++j) {
    if (cands[j].chosen == 0) {
      spec_->relax(picks_[cand_pick[j]].req);
      continue;
    }
    trees[j].truncate(cands[j].chosen);
    take(cand_pick[j], std::move(trees[j]));
  }
}

void Scheduler::on_verified(const ScheduledSeq& s, const int32_t* path, int n) {
  if (spec_ && s.draft.size() > 0) spec_->on_verified(s.req, s.draft, path, n);
}

void Scheduler::observe_step(const StepFeatures& f, double seconds, double generated_tokens) {
  if (!spec_) return;
  spec_->model().observe(f, seconds);
  if (last_lookup_s_ == 0) spec_->model().age_lookup();
  if (spec_->policy() == SpecPolicy::kSmart && generated_tokens >= 0)
    spec_->guard().observe(static_cast<int>(f.seqs), f.drafted > 0, generated_tokens, seconds);
}

void Scheduler::observe_profile(const StepFeatures& f, double seconds) {
  if (spec_) spec_->model().observe_profile(f, seconds);
}

void Scheduler::on_computed(const ScheduledSeq& s, int num_computed) {
  Request* r = s.req;
  ACCEL_DCHECK(r->num_computed == s.first_token);
  r->num_computed += num_computed;
  if (!config_.enable_prefix_caching) return;
  // Register blocks that became full of computed tokens.
  const int bs = config_.block_size;
  const int full = r->num_computed / bs;
  std::vector<int32_t> tokens(bs);
  while (static_cast<int>(r->block_hashes.size()) < full) {
    const int b = static_cast<int>(r->block_hashes.size());
    for (int i = 0; i < bs; ++i) tokens[i] = r->token_at(b * bs + i);
    const uint64_t parent = b == 0 ? kRootHash : r->block_hashes[b - 1];
    const uint64_t h = hash_block(parent, tokens.data(), bs);
    if (!allocator_.is_cached(r->blocks[b])) allocator_.register_block(r->blocks[b], h, parent, tokens.data(), bs);
    r->block_hashes.push_back(h);
  }
}

FinishReason Scheduler::append_token(Request* r, int32_t token) {
  r->output.push_back(token);
  const auto& eos = config_.eos_token_ids;
  const auto& stops = r->params.stop_token_ids;
  if ((!r->params.ignore_eos && std::find(eos.begin(), eos.end(), token) != eos.end()) ||
      std::find(stops.begin(), stops.end(), token) != stops.end())
    return FinishReason::kStop;
  if (static_cast<int>(r->output.size()) >= r->params.max_tokens) return FinishReason::kLength;
  return FinishReason::kNone;
}

std::unique_ptr<Request> Scheduler::finish(RequestId id, FinishReason reason) {
  auto it = requests_.find(id);
  if (it == requests_.end()) return nullptr;
  std::unique_ptr<Request> req = std::move(it->second);
  requests_.erase(it);
  Request* r = req.get();
  if (r->status == Request::Status::kWaiting) {
    auto w = std::find(waiting_.begin(), waiting_.end(), r);
    if (w != waiting_.end()) waiting_.erase(w);
  } else if (r->status == Request::Status::kRunning) {
    running_.erase(std::find(running_.begin(), running_.end(), r));
  }
  allocator_.release_all(&r->blocks);
  r->status = Request::Status::kFinished;
  r->finish_reason = reason;
  // A completed output joins the draft store (an aborted or failed one is no text to repeat).
  if (drafter_ && spec_->policy() != SpecPolicy::kOff &&
      (reason == FinishReason::kStop || reason == FinishReason::kLength))
    drafter_->add_output(r->output.data(), static_cast<int>(r->output.size()));
  if (drafter_ && running_.empty() && waiting_.empty()) drafter_->note_idle();
  return req;
}

}  // namespace accelcore
