// The continuous-batching scheduler and its prefix cache, driven by a fake executor instead of a
// model. The fake mirrors Engine::Impl::process() (prompt log-probabilities, on_computed, sample,
// append_token, finish) and replaces the forward pass with a checking stand-in:
//  - every plan is checked against the requests it was built from (budget, seats, contiguous
//    positions, slots from the block table, logit rows, running requests before admissions);
//  - a fake KV cache stores, for every slot written, a hash of the whole token prefix up to that
//    position (as real K/V depends on the whole prefix), and the fake attention reads positions
//    [0, last] of every scheduled sequence through its block table and checks each one. Wrong
//    block tables, blocks handed to two writers, evicted-while-held blocks or prefix-cache hits
//    on the wrong content all show up as a mismatch;
//  - "sampled" tokens are a deterministic function of (request id, output position), so a
//    request must produce exactly the tokens it would produce alone, whatever the batching,
//    chunking, preemption or prefix caching did to it.
#include <accelcore/engine.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kv/block_allocator.h"
#include "sched/batch_plan.h"
#include "sched/request.h"
#include "sched/scheduler.h"

namespace accelcore {

namespace {

const BlockAllocator& allocator_of(const Scheduler& s) { return s.allocator(); }

constexpr int32_t kVocab = 50;

uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The fake model's "sample": a function of the request and the output position only.
int32_t fake_token(RequestId id, int out_pos) {
  return static_cast<int32_t>(mix64(id * 0x100000001B3ull + static_cast<uint64_t>(out_pos)) % kVocab);
}

// The fake model's prompt log-probability row for position pos (scoring prompt[pos + 1]).
TokenLogprobs fake_prompt_logprob(const std::vector<int32_t>& prompt, int pos) {
  return {{prompt[pos + 1], -static_cast<float>(pos) - 0.5f}};
}

struct Expected {
  std::vector<int32_t> tokens;
  FinishReason reason = FinishReason::kNone;
};

// What a request produces when run alone: fake tokens until a stop token, EOS or max_tokens.
Expected expected_alone(RequestId id, const SamplingParams& p, const std::vector<int32_t>& eos) {
  Expected e;
  for (int pos = 0; pos < p.max_tokens; ++pos) {
    const int32_t t = fake_token(id, pos);
    e.tokens.push_back(t);
    const bool is_eos = !p.ignore_eos && std::find(eos.begin(), eos.end(), t) != eos.end();
    const bool is_stop = std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), t) != p.stop_token_ids.end();
    if (is_eos || is_stop) {
      e.reason = FinishReason::kStop;
      return e;
    }
  }
  e.reason = FinishReason::kLength;
  return e;
}

// Tokens that ever need K/V: the prompt and every generated token but the last.
int kv_footprint_tokens(int prompt_len, int max_tokens) { return prompt_len + std::max(max_tokens, 1) - 1; }

SamplingParams params(int max_tokens) {
  SamplingParams p;
  p.max_tokens = max_tokens;
  p.temperature = 0.0f;
  return p;
}

std::vector<int32_t> random_tokens(std::mt19937& rng, int n) {
  std::vector<int32_t> v(n);
  for (int32_t& t : v) t = static_cast<int32_t>(rng() % kVocab);
  return v;
}

std::vector<int32_t> iota_tokens(int n, int32_t start) {
  std::vector<int32_t> v(n);
  for (int i = 0; i < n; ++i) v[i] = (start + i) % kVocab;
  return v;
}

#define INV_CHECK(cond, what)                                             \
  do {                                                                    \
    if (!(cond)) {                                                        \
      ADD_FAILURE() << "check failed: " #cond " -- " << what;             \
      return false;                                                       \
    }                                                                     \
  } while (0)

struct Outcome {
  FinishReason reason = FinishReason::kNone;
  std::vector<int32_t> output;
  std::string error;
  int times_finished = 0;   // must end up 1
  bool via_failed = false;  // reported by schedule() in `failed`
  int num_preemptions = 0;
  int num_cached_tokens = 0;
  int prompt_lp_emitted = 0;
  std::vector<TokenLogprobs> prompt_lp;
};

struct SeqRecord {
  RequestId id = 0;
  int first_token = 0, num_tokens = 0, num_logits = 0;
  bool samples = false;
};

struct AddInfo {
  std::vector<int32_t> prompt;
  SamplingParams params;
};

// Drives a Scheduler the way Engine::step() does, with the checks described at the top.
class FakeExecutor {
 public:
  explicit FakeExecutor(const SchedulerConfig& cfg)
      : cfg_(cfg), sched_(cfg), kv_(static_cast<size_t>(cfg.num_blocks) * cfg.block_size, 0) {}

  Scheduler& sched() { return sched_; }
  const BlockAllocator& alloc() const { return allocator_of(sched_); }

  Request* add(RequestId id, std::vector<int32_t> prompt, const SamplingParams& p) {
    auto r = std::make_unique<Request>();
    r->id = id;
    r->prompt = std::move(prompt);
    r->params = p;
    Request* raw = r.get();
    added_[id] = {raw->prompt, p};
    live_.insert(id);
    sched_.add(std::move(r));
    return raw;
  }

  // Engine::abort as the step applies it.
  bool abort(RequestId id) {
    std::unique_ptr<Request> r = sched_.finish(id, FinishReason::kAbort);
    if (!r) return false;
    record(std::move(r), false);
    return true;
  }

  // One engine step. Returns what was scheduled (copied before processing, which may free requests).
  std::vector<SeqRecord> step() {
    const uint64_t preemptions_before = sched_.counters().num_preemptions;
    sched_.schedule(&plan_, &seqs_, &failed_);
    step_preempted_ = sched_.counters().num_preemptions != preemptions_before;
    for (auto& f : failed_) record(std::move(f), true);
    failed_.clear();
    std::vector<SeqRecord> recs;
    if (!check_plan()) return recs;
    if (!fake_forward()) return recs;
    max_step_tokens = std::max(max_step_tokens, plan_.num_tokens());
    max_step_seqs = std::max(max_step_seqs, plan_.num_seqs());
    tokens_computed += plan_.num_tokens();
    for (const ScheduledSeq& s : seqs_) {
      recs.push_back({s.req->id, s.first_token, s.num_tokens, s.num_logits, s.samples});
      if (!first_scheduled_step.count(s.req->id)) {
        first_scheduled_step[s.req->id] = steps;
        admission_order.push_back(s.req->id);
      }
    }
    for (const ScheduledSeq& s : seqs_) process(s);
    ++steps;
    return recs;
  }

  // Steps until the scheduler holds nothing; false when it does not get there in max_steps.
  bool run(int max_steps = 100000) {
    for (int i = 0; i < max_steps && !sched_.empty(); ++i) {
      step();
      if (::testing::Test::HasFailure()) return false;
      if (!check_invariants()) return false;
    }
    return sched_.empty();
  }

  // Accounting of blocks and requests; see the stress test for the list.
  bool check_invariants() {
    const BlockAllocator& a = alloc();
    const int bs = cfg_.block_size;
    const int total = a.num_total();
    std::vector<int> holders(total, 0);
    std::vector<std::vector<std::pair<const Request*, int>>> held_by(total);  // (request, index in its table)
    int holdings = 0;
    INV_CHECK(sched_.num_running() <= cfg_.max_num_seqs, sched_.num_running());
    INV_CHECK(sched_.num_running() + sched_.num_waiting() == static_cast<int>(live_.size()),
              sched_.num_running() << " running + " << sched_.num_waiting() << " waiting vs " << live_.size() << " live");
    for (const Request* r : sched_.running()) {
      INV_CHECK(r->status == Request::Status::kRunning, "request " << r->id);
      INV_CHECK(live_.count(r->id), "running request " << r->id << " already ended");
      // On demand: exactly the blocks its computed tokens need.
      INV_CHECK(static_cast<int>(r->blocks.size()) == sched_.blocks_for(r->num_computed),
                "request " << r->id << " holds " << r->blocks.size() << " blocks for " << r->num_computed << " tokens");
      INV_CHECK(r->num_computed < r->num_tokens(), "request " << r->id << " has no token left to compute");
      if (cfg_.enable_prefix_caching) {
        INV_CHECK(static_cast<int>(r->block_hashes.size()) == r->num_computed / bs, "request " << r->id);
      } else {
        INV_CHECK(r->block_hashes.empty(), "request " << r->id);
      }
      std::set<int32_t> own(r->blocks.begin(), r->blocks.end());
      INV_CHECK(own.size() == r->blocks.size(), "request " << r->id << " holds a block twice");
      for (size_t i = 0; i < r->blocks.size(); ++i) {
        const int32_t b = r->blocks[i];
        INV_CHECK(b >= 0 && b < total, "block id " << b);
        ++holders[b];
        held_by[b].push_back({r, static_cast<int>(i)});
        ++holdings;
      }
      // The fake KV of every computed position is the right prefix.
      for (int p = 0; p < r->num_computed; ++p) {
        const int64_t slot = static_cast<int64_t>(r->blocks[p / bs]) * bs + p % bs;
        INV_CHECK(kv_[slot] == prefix_hash(r, p), "request " << r->id << " position " << p << " has wrong K/V");
      }
    }
    for (const Request* r : sched_.waiting()) {
      INV_CHECK(r->status == Request::Status::kWaiting, "request " << r->id);
      INV_CHECK(live_.count(r->id), "waiting request " << r->id << " already ended");
      INV_CHECK(r->blocks.empty() && r->num_computed == 0 && r->block_hashes.empty(),
                "waiting request " << r->id << " holds " << r->blocks.size() << " blocks, computed " << r->num_computed);
    }
    int distinct = 0, ref_sum = 0;
    for (int32_t b = 0; b < total; ++b) {
      INV_CHECK(a.ref_count(b) == holders[b], "block " << b << " ref " << a.ref_count(b) << " holders " << holders[b]);
      ref_sum += a.ref_count(b);
      if (holders[b] > 0) ++distinct;
      if (holders[b] > 1) {
        // Only a full, computed, cached prefix block may be shared.
        INV_CHECK(cfg_.enable_prefix_caching && a.is_cached(b), "block " << b << " shared but not cached");
        for (const auto& [r, i] : held_by[b])
          INV_CHECK((i + 1) * bs <= r->num_computed, "shared block " << b << " is not a full computed block of " << r->id);
      }
    }
    INV_CHECK(ref_sum == holdings, ref_sum << " vs " << holdings);
    INV_CHECK(a.num_free() + distinct == total, a.num_free() << " free + " << distinct << " held vs " << total);
    INV_CHECK(sched_.num_free_blocks() == a.num_free(), "");
    if (!cfg_.enable_prefix_caching) INV_CHECK(sched_.num_cached_blocks() == 0, sched_.num_cached_blocks());
    return true;
  }

  const std::map<RequestId, AddInfo>& added() const { return added_; }
  const std::set<RequestId>& live() const { return live_; }
  const std::vector<int32_t>& eos() const { return cfg_.eos_token_ids; }
  Expected expected(RequestId id) const { return expected_alone(id, added_.at(id).params, cfg_.eos_token_ids); }

  std::map<RequestId, Outcome> outcomes;
  std::map<RequestId, int> first_scheduled_step;
  std::vector<RequestId> admission_order;  // first admissions, in order
  int steps = 0;
  uint64_t tokens_computed = 0;
  int max_step_tokens = 0, max_step_seqs = 0;

 private:
  uint64_t prefix_hash(const Request* r, int pos) {
    std::vector<uint64_t>& h = prefix_hashes_[r->id];
    while (static_cast<int>(h.size()) <= pos) {
      const int p = static_cast<int>(h.size());
      const uint64_t prev = p == 0 ? 0x243F6A8885A308D3ull : h.back();
      h.push_back(mix64(prev ^ (static_cast<uint64_t>(r->token_at(p)) << 20) ^ static_cast<uint64_t>(p)) | 1);
    }
    return h[pos];
  }

  bool step_preempted_ = false;

  bool check_plan() {
    const BatchPlan& pl = plan_;
    const int bs = cfg_.block_size;
    const int nt = pl.num_tokens();
    INV_CHECK(nt <= cfg_.max_num_batched_tokens, nt << " tokens, budget " << cfg_.max_num_batched_tokens);
    INV_CHECK(pl.num_seqs() <= cfg_.max_num_seqs, pl.num_seqs());
    INV_CHECK(static_cast<int>(seqs_.size()) == pl.num_seqs(), seqs_.size() << " vs " << pl.num_seqs());
    INV_CHECK(pl.positions.size() == static_cast<size_t>(nt) && pl.slots.size() == static_cast<size_t>(nt) &&
                  pl.seq_of_token.size() == static_cast<size_t>(nt),
              "per-token arrays differ in size");
    INV_CHECK(nt > 0 || sched_.num_running() == 0, "running requests but an empty plan");
    int tok = 0, logit = 0;
    std::set<const Request*> seen;
    std::set<int64_t> slots;
    const auto& running = sched_.running();
    int last_running_index = -1;
    for (int i = 0; i < pl.num_seqs(); ++i) {
      const ScheduledSeq& s = seqs_[i];
      const Request* r = s.req;
      INV_CHECK(seen.insert(r).second, "request " << r->id << " scheduled twice in one step");
      INV_CHECK(r->status == Request::Status::kRunning, "scheduled request " << r->id << " is not running");
      // Scheduled in admission order: a subsequence of running().
      const int ri = static_cast<int>(std::find(running.begin(), running.end(), r) - running.begin());
      INV_CHECK(ri < static_cast<int>(running.size()) && ri > last_running_index, "request " << r->id << " out of order");
      last_running_index = ri;
      INV_CHECK(s.first_token == r->num_computed, "request " << r->id);
      INV_CHECK(s.num_tokens >= 1 && s.first_token + s.num_tokens <= r->num_tokens(), "request " << r->id);
      INV_CHECK(s.samples == (s.first_token + s.num_tokens == r->num_tokens()), "request " << r->id);
      const int end = i + 1 < pl.num_seqs() ? pl.block_table_offset[i + 1] : static_cast<int>(pl.block_tables.size());
      const std::vector<int32_t> table(pl.block_tables.begin() + pl.block_table_offset[i], pl.block_tables.begin() + end);
      INV_CHECK(table == r->blocks, "request " << r->id << " block table differs from its blocks");
      INV_CHECK(static_cast<int>(table.size()) == sched_.blocks_for(s.first_token + s.num_tokens),
                "request " << r->id << " has " << table.size() << " blocks for " << s.first_token + s.num_tokens << " tokens");
      INV_CHECK(s.first_logit == logit, "request " << r->id);
      const int np = static_cast<int>(r->prompt.size());
      std::vector<int32_t> want_rows;
      for (int k = 0; k < s.num_tokens; ++k, ++tok) {
        const int pos = s.first_token + k;
        INV_CHECK(tok < nt, "tokens run past the plan");
        INV_CHECK(pl.seq_of_token[tok] == i, "token " << tok);
        INV_CHECK(pl.positions[tok] == pos, "token " << tok << " position " << pl.positions[tok] << " want " << pos);
        INV_CHECK(pl.token_ids[tok] == r->token_at(pos), "token " << tok);
        const int64_t slot = static_cast<int64_t>(table[pos / bs]) * bs + pos % bs;
        INV_CHECK(pl.slots[tok] == slot, "token " << tok << " slot " << pl.slots[tok] << " want " << slot);
        INV_CHECK(slots.insert(slot).second, "slot " << slot << " written twice in one step");
        if ((r->wants_prompt_logprobs() && pos + 1 < np) || (k == s.num_tokens - 1 && s.samples)) want_rows.push_back(tok);
      }
      INV_CHECK(s.num_logits == static_cast<int>(want_rows.size()), "request " << r->id << " has " << s.num_logits << " logit rows");
      INV_CHECK(std::equal(want_rows.begin(), want_rows.end(), pl.logit_rows.begin() + logit), "request " << r->id << " logit rows");
      logit += s.num_logits;
    }
    INV_CHECK(tok == nt && logit == static_cast<int>(pl.logit_rows.size()), tok << " " << logit);
    // Running requests come first: one left out only when the token budget ran out.
    if (static_cast<int>(running.size()) > pl.num_seqs())
      INV_CHECK(nt == cfg_.max_num_batched_tokens, "a running request was left out with budget to spare");
    // Admission is work-conserving: the head of the queue waits only for a seat, budget or blocks,
    // or because this step had to preempt (no admissions then, to avoid thrashing).
    if (!step_preempted_ && !sched_.waiting().empty() && nt < cfg_.max_num_batched_tokens &&
        static_cast<int>(running.size()) < cfg_.max_num_seqs && !cfg_.enable_prefix_caching) {
      const Request* head = sched_.waiting().front();
      const int n = std::min(head->num_tokens(), cfg_.max_num_batched_tokens - nt);
      INV_CHECK(sched_.blocks_for(n) > sched_.num_free_blocks(),
                "request " << head->id << " left waiting though its chunk fits (" << sched_.blocks_for(n) << " blocks, "
                           << sched_.num_free_blocks() << " free)");
    }
    return true;
  }

  bool fake_forward() {
    const BlockAllocator& a = alloc();
    const int bs = cfg_.block_size;
    // Write K/V for every token of the step: only into blocks the writer holds alone.
    for (int t = 0; t < plan_.num_tokens(); ++t) {
      const Request* r = seqs_[plan_.seq_of_token[t]].req;
      const int32_t block = static_cast<int32_t>(plan_.slots[t] / bs);
      INV_CHECK(a.ref_count(block) == 1 && !a.is_cached(block),
                "request " << r->id << " writes into block " << block << " (refs " << a.ref_count(block) << ", cached "
                           << a.is_cached(block) << ")");
      kv_[plan_.slots[t]] = prefix_hash(r, plan_.positions[t]);
    }
    // Attend: the last token of each sequence reads every position up to itself.
    for (int i = 0; i < plan_.num_seqs(); ++i) {
      const ScheduledSeq& s = seqs_[i];
      const int32_t* table = plan_.block_tables.data() + plan_.block_table_offset[i];
      for (int p = 0; p < s.first_token + s.num_tokens; ++p) {
        const int64_t slot = static_cast<int64_t>(table[p / bs]) * bs + p % bs;
        INV_CHECK(kv_[slot] == prefix_hash(s.req, p), "request " << s.req->id << " reads wrong K/V at position " << p
                                                                 << " (first_token " << s.first_token << ")");
      }
    }
    return true;
  }

  // Engine::Impl::process, with the fake model.
  void process(const ScheduledSeq& s) {
    Request* r = s.req;
    const int np = static_cast<int>(r->prompt.size());
    if (r->wants_prompt_logprobs()) {
      if (s.first_token == 0) r->prompt_logprobs.emplace_back();
      for (int pos = s.first_token; pos < s.first_token + s.num_tokens && pos + 1 < np; ++pos)
        r->prompt_logprobs.push_back(fake_prompt_logprob(r->prompt, pos));
      if (s.first_token + s.num_tokens >= np) {
        Outcome& o = outcomes[r->id];
        ++o.prompt_lp_emitted;
        o.prompt_lp = std::move(r->prompt_logprobs);
        r->prompt_logprobs_done = true;
      }
    }
    sched_.on_computed(s, s.num_tokens);
    FinishReason finish = FinishReason::kNone;
    if (s.samples) {
      if (static_cast<int>(r->output.size()) >= r->params.max_tokens) {
        finish = FinishReason::kLength;
      } else {
        finish = sched_.append_token(r, fake_token(r->id, static_cast<int>(r->output.size())));
      }
    }
    if (finish != FinishReason::kNone) {
      std::unique_ptr<Request> done = sched_.finish(r->id, finish);
      ASSERT_NE(done, nullptr);
      record(std::move(done), false);
    }
  }

  void record(std::unique_ptr<Request> r, bool via_failed) {
    EXPECT_EQ(r->status, Request::Status::kFinished);
    EXPECT_TRUE(r->blocks.empty());
    EXPECT_EQ(sched_.find(r->id), nullptr);
    Outcome& o = outcomes[r->id];
    ++o.times_finished;
    o.reason = r->finish_reason;
    o.output = r->output;
    o.error = r->error;
    o.via_failed = via_failed;
    o.num_preemptions = r->num_preemptions;
    o.num_cached_tokens = r->num_cached_tokens;
    live_.erase(r->id);
    prefix_hashes_.erase(r->id);
  }

  SchedulerConfig cfg_;
  Scheduler sched_;
  std::vector<uint64_t> kv_;  // per slot: hash of the token prefix whose last K/V it holds (0: never written)
  std::map<RequestId, std::vector<uint64_t>> prefix_hashes_;
  std::map<RequestId, AddInfo> added_;
  std::set<RequestId> live_;
  BatchPlan plan_;
  std::vector<ScheduledSeq> seqs_;
  std::vector<std::unique_ptr<Request>> failed_;
};

SchedulerConfig make_config(int block_size, int num_blocks, int budget, int max_seqs, bool caching = false) {
  SchedulerConfig c;
  c.block_size = block_size;
  c.num_blocks = num_blocks;
  c.max_num_batched_tokens = budget;
  c.max_num_seqs = max_seqs;
  c.enable_prefix_caching = caching;
  return c;
}

// Every request ended once, normally, with exactly the tokens it gives alone.
void expect_all_exact(const FakeExecutor& ex) {
  for (const auto& [id, info] : ex.added()) {
    auto it = ex.outcomes.find(id);
    ASSERT_NE(it, ex.outcomes.end()) << "request " << id << " never finished";
    const Outcome& o = it->second;
    EXPECT_EQ(o.times_finished, 1) << "request " << id;
    const Expected e = ex.expected(id);
    EXPECT_EQ(o.output, e.tokens) << "request " << id;
    EXPECT_EQ(o.reason, e.reason) << "request " << id;
  }
}

// ---------------------------------------------------------------------------------------------
// 1. Budget, seats and plan layout.

TEST(Scheduler, PlansStayWithinBudgetAndSeatsAndAreConsistent) {
  struct Case {
    int block_size, budget, max_seqs;
  };
  for (const Case& c : {Case{3, 7, 3}, Case{16, 64, 4}, Case{1, 1, 2}, Case{4, 33, 6}}) {
    SCOPED_TRACE("block_size " + std::to_string(c.block_size) + " budget " + std::to_string(c.budget) + " seqs " +
                 std::to_string(c.max_seqs));
    SchedulerConfig cfg = make_config(c.block_size, 4096, c.budget, c.max_seqs);
    cfg.eos_token_ids = {7};
    FakeExecutor ex(cfg);
    std::mt19937 rng(c.budget * 31 + c.max_seqs);
    uint64_t want_tokens = 0;
    for (RequestId id = 1; id <= 40; ++id) {
      SamplingParams p = params(static_cast<int>(rng() % 12));
      if (id % 5 == 0) p.prompt_logprobs = 2;
      if (id % 7 == 0) p.stop_token_ids = {3, 4};
      const int np = 1 + static_cast<int>(rng() % 40);
      ex.add(id, random_tokens(rng, np), p);
      const Expected e = expected_alone(id, p, cfg.eos_token_ids);
      // Every prompt token and every generated token but the last is computed exactly once.
      want_tokens += np + std::max<int>(static_cast<int>(e.tokens.size()), 1) - 1;
    }
    ASSERT_TRUE(ex.run());
    expect_all_exact(ex);
    EXPECT_EQ(ex.tokens_computed, want_tokens);
    EXPECT_EQ(ex.sched().counters().num_preemptions, 0u);  // the pool is large
    // The limits were actually reached (so the checks in step() had something to check).
    EXPECT_EQ(ex.max_step_tokens, c.budget);
    EXPECT_EQ(ex.max_step_seqs, std::min(c.max_seqs, c.budget));
    EXPECT_GE(static_cast<uint64_t>(ex.steps) * c.budget, want_tokens);
    EXPECT_EQ(ex.sched().num_free_blocks(), ex.sched().num_total_blocks());
  }
}

// ---------------------------------------------------------------------------------------------
// 2. Chunked prefill, running requests first.

TEST(Scheduler, ChunkedPrefillAndRunningRequestsFirst) {
  FakeExecutor ex(make_config(4, 64, 8, 8));
  auto expect_step = [&](const std::vector<SeqRecord>& got, const std::vector<SeqRecord>& want, int line) {
    SCOPED_TRACE("step checked at line " + std::to_string(line));
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(got[i].id, want[i].id) << i;
      EXPECT_EQ(got[i].first_token, want[i].first_token) << i;
      EXPECT_EQ(got[i].num_tokens, want[i].num_tokens) << i;
      EXPECT_EQ(got[i].samples, want[i].samples) << i;
      EXPECT_EQ(got[i].num_logits, want[i].samples ? 1 : 0) << i;
    }
  };
  Request* a = ex.add(1, iota_tokens(20, 0), params(3));  // 20 prompt tokens, budget 8: three chunks
  expect_step(ex.step(), {{1, 0, 8, 0, false}}, __LINE__);
  EXPECT_EQ(a->blocks.size(), 2u);  // blocks as the chunks need them
  EXPECT_TRUE(a->output.empty());
  expect_step(ex.step(), {{1, 8, 8, 0, false}}, __LINE__);
  EXPECT_EQ(a->blocks.size(), 4u);
  expect_step(ex.step(), {{1, 16, 4, 1, true}}, __LINE__);
  EXPECT_EQ(a->blocks.size(), 5u);
  EXPECT_EQ(a->output.size(), 1u);

  // A decodes; B's long prompt gets what is left of the budget in the same step.
  ex.add(2, iota_tokens(20, 5), params(5));
  expect_step(ex.step(), {{1, 20, 1, 1, true}, {2, 0, 7, 0, false}}, __LINE__);
  // C arrives; A and B (mid-prompt) are served first and use the whole budget: C waits.
  ex.add(3, iota_tokens(10, 9), params(2));
  expect_step(ex.step(), {{1, 21, 1, 1, true}, {2, 7, 7, 0, false}}, __LINE__);
  EXPECT_EQ(ex.outcomes.count(1), 1u);  // A had its 3 tokens
  ASSERT_EQ(ex.sched().num_waiting(), 1);
  EXPECT_EQ(ex.sched().waiting().front()->id, 3u);
  EXPECT_EQ(ex.first_scheduled_step.count(3), 0u);
  // B's last prompt chunk goes first; C's first chunk takes the 2 tokens left.
  expect_step(ex.step(), {{2, 14, 6, 1, true}, {3, 0, 2, 0, false}}, __LINE__);
  expect_step(ex.step(), {{2, 20, 1, 1, true}, {3, 2, 7, 0, false}}, __LINE__);
  expect_step(ex.step(), {{2, 21, 1, 1, true}, {3, 9, 1, 1, true}}, __LINE__);
  ASSERT_TRUE(ex.run());
  expect_all_exact(ex);
}

// ---------------------------------------------------------------------------------------------
// 3. First come first served, bounded waits.

TEST(Scheduler, FcfsAdmissionWithExactWaits) {
  // Seats are the only constraint: the scheduler is then a k-server FCFS queue in which a request
  // with max_tokens m holds its seat for max(m, 1) steps. Each admission step is predictable.
  for (int seats : {1, 3, 8}) {
    SCOPED_TRACE("max_num_seqs " + std::to_string(seats));
    FakeExecutor ex(make_config(4, 4096, 1 << 20, seats));
    std::mt19937 rng(seats);
    std::vector<int> free_at(seats, 0);
    std::map<RequestId, int> want_start;
    int prev_start = 0;
    for (RequestId id = 1; id <= 60; ++id) {
      const int m = static_cast<int>(rng() % 16);
      ex.add(id, random_tokens(rng, 1 + static_cast<int>(rng() % 30)), params(m));
      auto seat = std::min_element(free_at.begin(), free_at.end());
      const int start = std::max(prev_start, *seat);
      *seat = start + std::max(m, 1);
      want_start[id] = prev_start = start;
    }
    ASSERT_TRUE(ex.run());
    expect_all_exact(ex);
    int max_wait = 0;
    for (const auto& [id, start] : want_start) {
      EXPECT_EQ(ex.first_scheduled_step.at(id), start) << "request " << id;
      max_wait = std::max(max_wait, ex.first_scheduled_step.at(id));
    }
    EXPECT_EQ(ex.steps, *std::max_element(free_at.begin(), free_at.end()));
    std::vector<RequestId> fcfs(ex.admission_order);
    std::sort(fcfs.begin(), fcfs.end());
    EXPECT_EQ(ex.admission_order, fcfs);
    // Bounded as a k-server queue: at most the sum of all earlier requests' seat time / k, plus
    // the longest one.
    EXPECT_LE(max_wait, 60 * 15 / seats + 15);
  }
}

TEST(Scheduler, HeadOfQueueIsNeverOvertaken) {
  // 10 blocks of 4. A runs; B's prompt needs 7 blocks and must wait for A; C (1 block) would fit
  // but must not jump ahead of B.
  FakeExecutor ex(make_config(4, 10, 64, 8));
  ex.add(1, iota_tokens(16, 0), params(8));  // up to 23 tokens: 6 blocks
  ex.step();
  ex.add(2, iota_tokens(28, 1), params(3));  // 7 blocks for its prompt
  ex.add(3, iota_tokens(2, 2), params(3));
  for (int guard = 0; ex.outcomes.count(1) == 0; ++guard) {
    ASSERT_LT(guard, 100);
    const auto recs = ex.step();
    ASSERT_FALSE(::testing::Test::HasFailure());
    ASSERT_TRUE(ex.check_invariants());
    ASSERT_EQ(recs.size(), 1u);
    EXPECT_EQ(recs[0].id, 1u);
    ASSERT_EQ(ex.sched().num_waiting(), 2);
    EXPECT_EQ(ex.sched().waiting()[0]->id, 2u);
    EXPECT_EQ(ex.sched().waiting()[1]->id, 3u);
  }
  // A is done: B and C are admitted together, B first.
  const auto recs = ex.step();
  ASSERT_EQ(recs.size(), 2u);
  EXPECT_EQ(recs[0].id, 2u);
  EXPECT_EQ(recs[1].id, 3u);
  ASSERT_TRUE(ex.run());
  expect_all_exact(ex);
  EXPECT_EQ(ex.sched().counters().num_preemptions, 0u);
}

TEST(Scheduler, ManyRequestsFewSeatsSmallPoolAllFinish) {
  // 300 requests through 2 seats, a 5-token budget and a pool that forces preemptions: nobody
  // starves, first admissions are in arrival order, every output is exact.
  SchedulerConfig cfg = make_config(3, 30, 5, 2);
  cfg.eos_token_ids = {0};
  FakeExecutor ex(cfg);
  std::mt19937 rng(42);
  RequestId next = 1;
  for (int round = 0; round < 300; ++round) {
    ex.add(next++, random_tokens(rng, 1 + static_cast<int>(rng() % 40)), params(static_cast<int>(rng() % 40)));
    if (round % 2) {
      ex.step();
      ASSERT_FALSE(::testing::Test::HasFailure());
    }
  }
  ASSERT_TRUE(ex.run());
  expect_all_exact(ex);
  std::vector<RequestId> fcfs(ex.admission_order);
  std::sort(fcfs.begin(), fcfs.end());
  EXPECT_EQ(ex.admission_order, fcfs);
  EXPECT_EQ(ex.admission_order.size(), 300u);
  EXPECT_GT(ex.sched().counters().num_preemptions, 0u);
  EXPECT_EQ(ex.sched().num_free_blocks(), 30);
}

// ---------------------------------------------------------------------------------------------
// 4. Preemption.

TEST(Scheduler, PreemptsMostRecentlyAdmittedAndResumesExactly) {
  // 7 blocks of 4, 3 seats. A, B, C (4-token prompts, 12 new tokens: up to 15 tokens, 4 blocks
  // each) start together; D waits for a seat. At position 8 A takes the last free block, B needs
  // one: C, the most recently admitted, is preempted for it.
  auto build = [](int num_blocks) {
    auto ex = std::make_unique<FakeExecutor>(make_config(4, num_blocks, 64, 3));
    for (RequestId id = 1; id <= 4; ++id) ex->add(id, iota_tokens(4, static_cast<int32_t>(id * 10)), params(12));
    return ex;
  };
  auto ex = build(7);
  Request* a = ex->sched().find(1);
  Request* b = ex->sched().find(2);
  Request* c = ex->sched().find(3);
  std::vector<int32_t> c_blocks;
  while (ex->sched().counters().num_preemptions == 0) {
    ASSERT_LT(ex->steps, 20);
    c_blocks = c->blocks;
    ex->step();
    ASSERT_FALSE(::testing::Test::HasFailure());
    ASSERT_TRUE(ex->check_invariants());
  }
  EXPECT_EQ(ex->steps, 6);  // step 1: prompts, steps 2-5: positions 4-7, step 6: position 8
  EXPECT_EQ(ex->sched().counters().num_preemptions, 1u);
  ASSERT_EQ(c_blocks.size(), 2u);
  EXPECT_EQ(c->status, Request::Status::kWaiting);
  EXPECT_EQ(c->num_preemptions, 1);
  EXPECT_EQ(c->num_computed, 0);
  EXPECT_TRUE(c->blocks.empty());
  EXPECT_TRUE(c->block_hashes.empty());
  EXPECT_EQ(c->output.size(), 5u);  // its tokens are kept, to be recomputed
  ASSERT_EQ(ex->sched().num_waiting(), 2);
  EXPECT_EQ(ex->sched().waiting()[0], c);  // at the front, ahead of D which was waiting already
  EXPECT_EQ(ex->sched().waiting()[1]->id, 4u);
  ASSERT_EQ(ex->sched().num_running(), 2);
  EXPECT_EQ(ex->sched().running()[0], a);
  EXPECT_EQ(ex->sched().running()[1], b);
  EXPECT_EQ(a->num_preemptions + b->num_preemptions, 0);
  EXPECT_EQ(a->blocks.size(), 3u);
  EXPECT_EQ(b->blocks.size(), 3u);
  EXPECT_EQ(ex->sched().num_free_blocks(), 1);  // C's two blocks came back, B took one
  int c_blocks_reused = 0;
  for (int32_t blk : c_blocks) {
    const bool reused = std::count(b->blocks.begin(), b->blocks.end(), blk) > 0;
    c_blocks_reused += reused;
    EXPECT_EQ(ex->alloc().ref_count(blk), reused ? 1 : 0);
  }
  EXPECT_EQ(c_blocks_reused, 1);

  ASSERT_TRUE(ex->run());
  expect_all_exact(*ex);
  EXPECT_GE(ex->outcomes.at(3).num_preemptions, 1);
  EXPECT_EQ(ex->sched().num_free_blocks(), 7);

  // The same requests with a pool that never runs dry: no preemption, the same outputs.
  auto big = build(1000);
  ASSERT_TRUE(big->run());
  EXPECT_EQ(big->sched().counters().num_preemptions, 0u);
  for (RequestId id = 1; id <= 4; ++id) {
    EXPECT_EQ(ex->outcomes.at(id).output, big->outcomes.at(id).output) << "request " << id;
    EXPECT_EQ(ex->outcomes.at(id).reason, big->outcomes.at(id).reason) << "request " << id;
  }
}

TEST(Scheduler, PromptLogprobsSurvivePreemptionMidPrompt) {
  // B scores its prompt in chunks of at most 3 tokens while A grows; A's next block preempts B
  // in the middle of its prompt. The prompt log-probabilities must still be emitted once, one
  // entry per prompt token, each the right one.
  FakeExecutor ex(make_config(2, 8, 4, 2));
  ex.add(1, iota_tokens(3, 0), params(14));  // up to 16 tokens: all 8 blocks
  SamplingParams pb = params(4);
  pb.prompt_logprobs = 1;
  const std::vector<int32_t> b_prompt = iota_tokens(12, 20);
  ex.add(2, b_prompt, pb);
  bool preempted_mid_prompt = false;
  for (int guard = 0; !ex.sched().empty(); ++guard) {
    ASSERT_LT(guard, 1000);
    const Request* b = ex.sched().find(2);
    const bool b_mid_prompt = b && b->status == Request::Status::kRunning && b->num_computed > 0 &&
                              b->num_computed < static_cast<int>(b->prompt.size());
    const int b_preemptions = b ? b->num_preemptions : 0;
    ex.step();
    ASSERT_FALSE(::testing::Test::HasFailure());
    ASSERT_TRUE(ex.check_invariants());
    b = ex.sched().find(2);  // (gone once finished)
    if (b_mid_prompt && b && b->num_preemptions > b_preemptions) preempted_mid_prompt = true;
  }
  EXPECT_TRUE(preempted_mid_prompt) << "the scenario no longer preempts B inside its prompt";
  expect_all_exact(ex);
  const Outcome& o = ex.outcomes.at(2);
  EXPECT_EQ(o.prompt_lp_emitted, 1);
  ASSERT_EQ(o.prompt_lp.size(), b_prompt.size());
  EXPECT_TRUE(o.prompt_lp[0].empty());
  for (size_t p = 1; p < b_prompt.size(); ++p)
    EXPECT_EQ(o.prompt_lp[p], fake_prompt_logprob(b_prompt, static_cast<int>(p) - 1)) << "position " << p;
}

// ---------------------------------------------------------------------------------------------
// 5. A request that can never fit.

TEST(Scheduler, RequestLargerThanThePoolFailsInsteadOfHanging) {
  struct Case {
    int prompt, max_tokens, budget;
    bool big_first;
  };
  // Pool: 4 blocks of 4 = 16 tokens.
  for (const Case& c : {Case{20, 4, 64, true},    // the prompt alone is too long
                        Case{10, 20, 64, true},   // the prompt fits, the whole request does not
                        Case{10, 20, 5, true},    // ... with chunked prefill
                        Case{10, 20, 5, false},   // ... queued behind a request that fits
                        Case{17, 0, 3, true}}) {  // scoring only, one token too many
    SCOPED_TRACE("prompt " + std::to_string(c.prompt) + " max_tokens " + std::to_string(c.max_tokens) + " budget " +
                 std::to_string(c.budget));
    FakeExecutor ex(make_config(4, 4, c.budget, 4));
    const RequestId big = c.big_first ? 1 : 2, small = c.big_first ? 2 : 1;
    if (c.big_first) ex.add(big, iota_tokens(c.prompt, 1), params(c.max_tokens));
    ex.add(small, iota_tokens(3, 7), params(5));
    if (!c.big_first) ex.add(big, iota_tokens(c.prompt, 1), params(c.max_tokens));
    ex.add(3, iota_tokens(6, 9), params(10));  // 15 tokens: fits, but only alone
    ASSERT_TRUE(ex.run(2000)) << "the scheduler did not drain";
    const Outcome& o = ex.outcomes.at(big);
    EXPECT_EQ(o.times_finished, 1);
    EXPECT_EQ(o.reason, FinishReason::kError);
    EXPECT_TRUE(o.via_failed);
    EXPECT_FALSE(o.error.empty());
    for (RequestId id : {small, RequestId{3}}) {
      EXPECT_EQ(ex.outcomes.at(id).output, ex.expected(id).tokens) << "request " << id;
      EXPECT_EQ(ex.outcomes.at(id).reason, FinishReason::kLength) << "request " << id;
    }
    EXPECT_EQ(ex.sched().num_free_blocks(), 4);
  }
  // Exactly the pool's size is fine: 10 prompt tokens + 7 new ones compute 16 tokens.
  FakeExecutor ex(make_config(4, 4, 5, 4));
  ex.add(1, iota_tokens(10, 1), params(7));
  ASSERT_TRUE(ex.run(2000));
  expect_all_exact(ex);
}

// ---------------------------------------------------------------------------------------------
// 6. Prefix caching.

class SchedulerPrefixCache : public ::testing::Test {
 protected:
  // The first scheduling of a request just added: (first_token, num_tokens).
  static std::pair<int, int> admit(FakeExecutor& ex, RequestId id, std::vector<int32_t> prompt, SamplingParams p) {
    ex.add(id, std::move(prompt), p);
    for (int guard = 0; guard < 100; ++guard) {
      for (const SeqRecord& s : ex.step())
        if (s.id == id) return {s.first_token, s.num_tokens};
      if (::testing::Test::HasFailure()) break;
    }
    ADD_FAILURE() << "request " << id << " was never scheduled";
    return {-1, -1};
  }
};

TEST_F(SchedulerPrefixCache, HitsOnAFinishedRequestsBlocks) {
  for (bool caching : {true, false}) {
    SCOPED_TRACE(caching ? "caching on" : "caching off");
    FakeExecutor ex(make_config(4, 32, 64, 8, caching));
    const std::vector<int32_t> t = iota_tokens(12, 1);  // three full blocks
    auto prefix = [&](int n, std::vector<int32_t> tail) {
      std::vector<int32_t> v(t.begin(), t.begin() + n);
      v.insert(v.end(), tail.begin(), tail.end());
      return v;
    };
    const auto& ctr = ex.sched().counters();
    EXPECT_EQ(admit(ex, 1, t, params(2)), std::make_pair(0, 12));
    ASSERT_TRUE(ex.run());
    EXPECT_EQ(ctr.prefix_cache_hit_tokens, 0u);
    EXPECT_EQ(ctr.prefix_cache_query_tokens, 12u);  // looked up (and counted) either way
    // Finished, its blocks are free but (with caching) still findable: 12 prompt tokens and the
    // first output token were computed, three full blocks.
    EXPECT_EQ(ex.sched().num_free_blocks(), 32);
    EXPECT_EQ(ex.sched().num_cached_blocks(), caching ? 3 : 0);

    struct Probe {
      RequestId id;
      std::vector<int32_t> prompt;
      int want_first;  // with caching
      int prompt_logprobs = -1;
    };
    const std::vector<Probe> probes = {
        {2, prefix(8, {40, 41, 42, 43, 44}), 8},  // two shared blocks, then different
        {3, t, 8},                                // all three cached, but the last token is recomputed
        {4, prefix(12, {45}), 12},                // three full blocks and one more token
        {5, prefix(11, {46}), 8},                 // third block differs in its last token
        {6, prefix(3, {47}), 0},                  // less than a block
        {7, prefix(12, {45, 46}), 0, 0},          // prompt_logprobs: no cache
        {8, [&] { auto v = t; v[0] = 49; return v; }(), 0},  // first block differs: the chain breaks
    };
    for (const Probe& pr : probes) {
      SCOPED_TRACE("probe " + std::to_string(pr.id));
      const uint64_t hits_before = ctr.prefix_cache_hit_tokens, query_before = ctr.prefix_cache_query_tokens;
      SamplingParams p = params(2);
      p.prompt_logprobs = pr.prompt_logprobs;
      const int np = static_cast<int>(pr.prompt.size());
      const int want = caching ? pr.want_first : 0;
      EXPECT_EQ(admit(ex, pr.id, pr.prompt, p), std::make_pair(want, np - want));
      EXPECT_EQ(ctr.prefix_cache_hit_tokens - hits_before, static_cast<uint64_t>(want));
      EXPECT_EQ(ctr.prefix_cache_query_tokens - query_before, static_cast<uint64_t>(np));
      ASSERT_TRUE(ex.run());
      EXPECT_EQ(ex.outcomes.at(pr.id).num_cached_tokens, want);
      EXPECT_EQ(ex.outcomes.at(pr.id).output, ex.expected(pr.id).tokens);
      if (pr.prompt_logprobs >= 0) { EXPECT_EQ(ex.outcomes.at(pr.id).prompt_lp.size(), pr.prompt.size()); }
    }
    if (!caching) { EXPECT_EQ(ctr.prefix_cache_hit_tokens, 0u); }
    EXPECT_EQ(ex.sched().num_free_blocks(), 32);
  }
}

TEST_F(SchedulerPrefixCache, SharesBlocksWithARunningRequest) {
  FakeExecutor ex(make_config(4, 32, 64, 8, true));
  const std::vector<int32_t> pa = iota_tokens(8, 3);
  EXPECT_EQ(admit(ex, 1, pa, params(20)), std::make_pair(0, 8));
  Request* a = ex.sched().find(1);
  ASSERT_NE(a, nullptr);
  std::vector<int32_t> pb = pa;
  pb.insert(pb.end(), {30, 31, 32});
  EXPECT_EQ(admit(ex, 2, pb, params(20)), std::make_pair(8, 3));
  Request* b = ex.sched().find(2);
  ASSERT_NE(b, nullptr);
  ASSERT_GE(b->blocks.size(), 2u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(b->blocks[i], a->blocks[i]);
    EXPECT_EQ(ex.alloc().ref_count(a->blocks[i]), 2);
    EXPECT_TRUE(ex.alloc().is_cached(a->blocks[i]));
  }
  EXPECT_EQ(ex.alloc().ref_count(b->blocks[2]), 1);
  EXPECT_EQ(ex.sched().counters().prefix_cache_hit_tokens, 8u);
  ASSERT_TRUE(ex.check_invariants());

  // Blocks full of generated tokens are cached too: a prompt equal to A's prompt and its first
  // five outputs matches A's first three blocks (12 tokens) once A has computed them.
  while (a->num_computed < 12) {
    ex.step();
    ASSERT_FALSE(::testing::Test::HasFailure());
  }
  std::vector<int32_t> pc = pa;
  pc.insert(pc.end(), a->output.begin(), a->output.begin() + 5);
  EXPECT_EQ(admit(ex, 3, pc, params(3)), std::make_pair(12, 1));
  Request* c = ex.sched().find(3);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(ex.alloc().ref_count(a->blocks[0]), 3);
  EXPECT_EQ(ex.alloc().ref_count(a->blocks[2]), 2);
  EXPECT_EQ(c->blocks[2], a->blocks[2]);
  ASSERT_TRUE(ex.check_invariants());

  ASSERT_TRUE(ex.run());
  expect_all_exact(ex);
  EXPECT_EQ(ex.sched().num_free_blocks(), 32);
  EXPECT_GT(ex.sched().num_cached_blocks(), 0);
}

TEST_F(SchedulerPrefixCache, RevivedBlocksLeaveTheFreePool) {
  // A finished request's cached blocks count as free; a hit takes them back out.
  FakeExecutor ex(make_config(4, 16, 64, 8, true));
  const std::vector<int32_t> t = iota_tokens(16, 2);
  admit(ex, 1, t, params(1));
  ASSERT_TRUE(ex.run());
  EXPECT_EQ(ex.sched().num_free_blocks(), 16);
  EXPECT_EQ(ex.sched().num_cached_blocks(), 4);
  std::vector<int32_t> p2 = t;
  p2.push_back(9);
  ex.add(2, p2, params(30));
  ex.step();
  // 16 tokens from the cache (4 blocks revived), the 17th computed in a fresh block.
  EXPECT_EQ(ex.first_scheduled_step.count(2), 1u);
  EXPECT_EQ(ex.sched().find(2)->num_cached_tokens, 16);
  EXPECT_EQ(ex.sched().num_free_blocks(), 16 - 5);
  ASSERT_TRUE(ex.check_invariants());
  ASSERT_TRUE(ex.run());
  expect_all_exact(ex);
}

// ---------------------------------------------------------------------------------------------
// 7. Randomized stress.

TEST(SchedulerStress, RandomOperationsKeepEveryInvariant) {
  // Every combination of block size, budget and seats (prefix caching on in half of them, and
  // for every value of each), 3000 operations each.
  constexpr int kOpsPerConfig = 3000;
  constexpr int kConfigs = 36;
  uint64_t ops = 0, steps = 0, preemptions = 0, hits = 0, failed_never_fit = 0;
  uint64_t aborts_waiting = 0, aborts_prefill = 0, aborts_decode = 0, aborts_unknown = 0;
  uint64_t stopped = 0, lengthed = 0, prompt_lp_checked = 0;
  for (int ci = 0; ci < kConfigs; ++ci) {
    std::mt19937 rng(1000 + ci);
    const int bs = std::vector<int>{1, 3, 16}[ci % 3];
    const int budget = std::vector<int>{1, 7, 64, 512}[(ci / 3) % 4];
    const int seats = std::vector<int>{1, 4, 32}[ci / 12];
    const bool caching = ci % 2 == 0;
    // A pool that holds one to a few of the largest requests (prompt 100 + 60 new tokens), and
    // sometimes less: such requests can never fit and must fail.
    const int pool_tokens = 120 + static_cast<int>(rng() % 280);
    SchedulerConfig cfg = make_config(bs, (pool_tokens + bs - 1) / bs, budget, seats, caching);
    cfg.eos_token_ids = {0};
    const std::string where = "config " + std::to_string(ci) + ": block_size " + std::to_string(bs) + " budget " +
                              std::to_string(budget) + " seats " + std::to_string(seats) + " blocks " +
                              std::to_string(cfg.num_blocks) + (caching ? " caching" : "");
    SCOPED_TRACE(where);
    FakeExecutor ex(cfg);
    std::vector<std::vector<int32_t>> prefixes;
    for (int i = 0; i < 4; ++i) prefixes.push_back(random_tokens(rng, 20 + static_cast<int>(rng() % 45)));
    // Keep enough in flight that the pool runs dry, but not so much that a 1-token budget never
    // catches up.
    const int max_live = budget == 1 ? 4 : 24;
    RequestId next_id = 1;
    std::set<RequestId> never_fit;
    for (int op = 0; op < kOpsPerConfig; ++op, ++ops) {
      const int kind = static_cast<int>(rng() % 10);
      if (kind < 3 && static_cast<int>(ex.live().size()) < max_live) {
        const int np = 1 + static_cast<int>(rng() % 100);
        std::vector<int32_t> prompt;
        if (rng() % 3 != 0) {
          const auto& pre = prefixes[rng() % prefixes.size()];
          prompt.assign(pre.begin(), pre.begin() + std::min<int>(np, static_cast<int>(pre.size())));
        }
        const auto tail = random_tokens(rng, np - static_cast<int>(prompt.size()));
        prompt.insert(prompt.end(), tail.begin(), tail.end());
        SamplingParams p = params(static_cast<int>(rng() % 61));
        if (rng() % 6 == 0) p.prompt_logprobs = static_cast<int>(rng() % 3);
        if (rng() % 4 == 0) p.stop_token_ids = {static_cast<int32_t>(1 + rng() % (kVocab - 1))};
        if (rng() % 3 == 0) p.ignore_eos = true;
        if (ex.sched().blocks_for(kv_footprint_tokens(np, p.max_tokens)) > cfg.num_blocks) never_fit.insert(next_id);
        ex.add(next_id++, std::move(prompt), p);
      } else if (kind == 3) {
        RequestId id;
        if (!ex.live().empty() && rng() % 4 != 0) {
          auto it = ex.live().begin();
          std::advance(it, rng() % ex.live().size());
          id = *it;
          const Request* r = ex.sched().find(id);
          ASSERT_NE(r, nullptr);
          if (r->status == Request::Status::kWaiting) ++aborts_waiting;
          else if (r->num_computed < static_cast<int>(r->prompt.size())) ++aborts_prefill;
          else ++aborts_decode;
          ASSERT_TRUE(ex.abort(id));
        } else {
          id = rng() % 2 ? next_id + 1000 : 1 + rng() % next_id;  // unknown, or possibly already ended
          if (!ex.live().count(id)) {
            ASSERT_FALSE(ex.abort(id));
            ++aborts_unknown;
          }
        }
        ASSERT_TRUE(ex.check_invariants()) << where << " after aborting " << id;
      } else {
        ex.step();
        ASSERT_FALSE(::testing::Test::HasFailure()) << where << " step " << ex.steps;
        ASSERT_TRUE(ex.check_invariants()) << where << " after step " << ex.steps;
      }
    }
    // Drain.
    ASSERT_TRUE(ex.run(200000)) << where;
    steps += ex.steps;
    EXPECT_EQ(ex.sched().num_free_blocks(), ex.sched().num_total_blocks());
    EXPECT_EQ(ex.sched().num_running() + ex.sched().num_waiting(), 0);

    uint64_t cached_sum = 0, query_sum = 0;
    for (const auto& [id, info] : ex.added()) {
      SCOPED_TRACE("request " + std::to_string(id));
      auto it = ex.outcomes.find(id);
      ASSERT_NE(it, ex.outcomes.end()) << "never ended";
      const Outcome& o = it->second;
      ASSERT_EQ(o.times_finished, 1);
      const Expected e = ex.expected(id);
      const bool admitted = ex.first_scheduled_step.count(id) > 0;
      if (never_fit.count(id)) {
        ASSERT_TRUE(o.reason == FinishReason::kError || o.reason == FinishReason::kAbort) << finish_reason_name(o.reason);
        if (o.reason == FinishReason::kError) {
          EXPECT_FALSE(o.error.empty());
          EXPECT_TRUE(o.via_failed);
          ++failed_never_fit;
        }
      } else if (o.reason == FinishReason::kAbort) {
        ASSERT_LE(o.output.size(), e.tokens.size());
        EXPECT_TRUE(std::equal(o.output.begin(), o.output.end(), e.tokens.begin())) << "aborted output is not a prefix";
      } else {
        ASSERT_EQ(o.reason, e.reason) << finish_reason_name(o.reason) << " " << o.error;
        ASSERT_EQ(o.output, e.tokens);
        (e.reason == FinishReason::kStop ? stopped : lengthed) += 1;
      }
      if (info.params.prompt_logprobs >= 0 || !caching) { EXPECT_EQ(o.num_cached_tokens, 0); }
      if (info.params.prompt_logprobs >= 0 && o.reason != FinishReason::kAbort && o.reason != FinishReason::kError) {
        ASSERT_EQ(o.prompt_lp_emitted, 1);
        ASSERT_EQ(o.prompt_lp.size(), info.prompt.size());
        for (size_t p = 1; p < info.prompt.size(); ++p)
          ASSERT_EQ(o.prompt_lp[p], fake_prompt_logprob(info.prompt, static_cast<int>(p) - 1));
        ++prompt_lp_checked;
      }
      EXPECT_LE(o.prompt_lp_emitted, 1);
      cached_sum += o.num_cached_tokens;
      if (admitted) query_sum += info.prompt.size();
    }
    const SchedulerCounters& ctr = ex.sched().counters();
    EXPECT_EQ(ctr.prefix_cache_hit_tokens, cached_sum);
    EXPECT_EQ(ctr.prefix_cache_query_tokens, query_sum);
    if (!caching) { EXPECT_EQ(ctr.prefix_cache_hit_tokens, 0u); }
    preemptions += ctr.num_preemptions;
    hits += ctr.prefix_cache_hit_tokens;
  }
  EXPECT_GE(ops, 100000u);
  EXPECT_GT(preemptions, 0u);
  EXPECT_GT(hits, 0u);
  EXPECT_GT(failed_never_fit, 0u);
  EXPECT_GT(aborts_waiting, 0u);
  EXPECT_GT(aborts_prefill, 0u);
  EXPECT_GT(aborts_decode, 0u);
  EXPECT_GT(aborts_unknown, 0u);
  EXPECT_GT(stopped, 0u);
  EXPECT_GT(lengthed, 0u);
  EXPECT_GT(prompt_lp_checked, 0u);
  std::cout << "[ stress   ] " << ops << " operations, " << steps << " steps, " << preemptions << " preemptions, "
            << hits << " prefix-hit tokens, " << failed_never_fit << " never-fit failures, aborts "
            << aborts_waiting << "/" << aborts_prefill << "/" << aborts_decode << "/" << aborts_unknown
            << " (waiting/prefill/decode/unknown)\n";
}

}  // namespace
}  // namespace accelcore
