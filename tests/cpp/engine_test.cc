// The public Engine on the real stories260K checkpoint: greedy output equals the transformers
// golden ids (one request and a batch of several), bad input is rejected without harming the
// engine, KV blocks all come back after finishing and aborting, and load errors are typed. One
// test steps on one thread while two others add and abort requests.
#include <accelcore/accelcore.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

namespace accelcore {
namespace {

using json = nlohmann::json;

struct Golden {
  std::vector<int32_t> prompt;
  std::vector<int32_t> new_ids;
};

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_dir_ = testing::test_model_dir();
    const std::string ref = model_dir_ + "/reference_outputs.json";
    std::ifstream in(ref);
    ASSERT_TRUE(in.good()) << "cannot read " << ref
                           << " (set ACCELCORE_TEST_MODEL to the stories260K model directory)";
    const json j = json::parse(in);
    golden_.clear();  // set up again on every --gtest_repeat iteration
    for (const char* key : {"max_new_tokens_64", "max_new_tokens_256"}) {
      for (const json& e : j.at(key)) {
        golden_[key].push_back({e.at("prompt_ids").get<std::vector<int32_t>>(), e.at("new_ids").get<std::vector<int32_t>>()});
      }
    }
  }

  void SetUp() override {
    ASSERT_FALSE(golden_["max_new_tokens_64"].empty()) << "no golden outputs loaded";
  }

  static EngineConfig config(int num_kv_blocks = 128) {
    EngineConfig c;
    c.model_path = model_dir_;
    c.num_threads = 2;
    c.num_kv_blocks = num_kv_blocks;
    return c;
  }

  static SamplingParams greedy(int max_tokens) {
    SamplingParams p;
    p.temperature = 0.0f;
    p.max_tokens = max_tokens;
    p.ignore_eos = true;  // the goldens were made with min_new_tokens == max_new_tokens
    return p;
  }

  // Steps until idle; returns every request's generated ids and final finish reason.
  static std::map<RequestId, std::pair<std::vector<int32_t>, FinishReason>> run_all(Engine& e) {
    std::map<RequestId, std::pair<std::vector<int32_t>, FinishReason>> out;
    for (int guard = 0; e.has_unfinished_requests(); ++guard) {
      EXPECT_LT(guard, 100000) << "engine never finished";
      if (guard >= 100000) break;
      for (const RequestOutput& o : e.step()) {
        auto& slot = out[o.request_id];
        EXPECT_NE(slot.second, FinishReason::kAbort) << "output after the request finished";
        slot.first.insert(slot.first.end(), o.new_token_ids.begin(), o.new_token_ids.end());
        if (o.finished) slot.second = o.finish_reason;
      }
    }
    return out;
  }

  static void expect_all_blocks_free(const Engine& e) {
    const EngineStats s = e.stats();
    EXPECT_EQ(s.num_free_blocks, s.num_total_blocks);
    EXPECT_EQ(s.num_running, 0);
    EXPECT_EQ(s.num_waiting, 0);
  }

  static inline std::string model_dir_;
  static inline std::map<std::string, std::vector<Golden>> golden_;
};

const std::vector<int32_t> kPrompt = {1, 403, 407, 261, 378};  // BOS "Once upon a time"

TEST_F(EngineTest, GreedyMatchesTransformersGolden) {
  const Golden& g = golden_["max_new_tokens_64"][0];
  ASSERT_EQ(g.prompt, kPrompt);
  ASSERT_EQ(g.new_ids.size(), 64u);
  EngineConfig cfg;  // all defaults except the model: the configuration a user gets
  cfg.model_path = model_dir_;
  Engine e(cfg);
  EXPECT_EQ(e.model_info().architecture, "LlamaForCausalLM");
  EXPECT_EQ(e.model_info().vocab_size, 512);
  EXPECT_EQ(e.model_info().max_model_len, 512);
  EXPECT_EQ(e.model_info().eos_token_ids, std::vector<int32_t>{2});
  const RequestId id = e.add_request(kPrompt, greedy(64));
  auto out = run_all(e);
  ASSERT_EQ(out.count(id), 1u);
  EXPECT_EQ(out[id].first, g.new_ids);
  EXPECT_EQ(out[id].second, FinishReason::kLength);
  expect_all_blocks_free(e);
  const EngineStats s = e.stats();
  EXPECT_EQ(s.num_generated_tokens, 64u);
  EXPECT_EQ(s.num_prompt_tokens, 5u);
}

TEST_F(EngineTest, BatchedRequestsEachMatchTheirGolden) {
  // All golden prompts at once, with a small token budget so prompts are chunked and mixed with
  // other requests' decode steps; each must still equal its own golden continuation.
  for (const char* key : {"max_new_tokens_64", "max_new_tokens_256"}) {
    EngineConfig cfg = config(256);
    cfg.max_num_batched_tokens = 7;
    cfg.block_size = 5;
    Engine e(cfg);
    std::map<RequestId, const Golden*> ids;
    for (const Golden& g : golden_[key]) ids[e.add_request(g.prompt, greedy(static_cast<int>(g.new_ids.size())))] = &g;
    auto out = run_all(e);
    for (const auto& [id, g] : ids) {
      EXPECT_EQ(out[id].first, g->new_ids) << key << " prompt of " << g->prompt.size() << " tokens";
      EXPECT_EQ(out[id].second, FinishReason::kLength);
    }
    expect_all_blocks_free(e);
  }
}

TEST_F(EngineTest, BadInputThrowsInvalidArgumentAndEngineStillWorks) {
  Engine e(config());
  const std::vector<int32_t> ok = kPrompt;
  EXPECT_THROW(e.add_request({}, greedy(4)), InvalidArgument);
  EXPECT_THROW(e.add_request({1, -1, 5}, greedy(4)), InvalidArgument);
  EXPECT_THROW(e.add_request({1, 512}, greedy(4)), InvalidArgument);  // vocab is 512
  EXPECT_THROW(e.add_request(ok, greedy(-1)), InvalidArgument);
  EXPECT_THROW(e.add_request(ok, greedy(512 - 5 + 1)), InvalidArgument);  // 513 > max_model_len 512
  EXPECT_THROW(e.add_request(std::vector<int32_t>(513, 1), greedy(0)), InvalidArgument);
  SamplingParams bad = greedy(4);
  bad.temperature = -1.0f;
  EXPECT_THROW(e.add_request(ok, bad), InvalidArgument);
  bad = greedy(4);
  bad.top_p = 0.0f;
  EXPECT_THROW(e.add_request(ok, bad), InvalidArgument);
  bad = greedy(4);
  bad.stop_token_ids = {600};
  EXPECT_THROW(e.add_request(ok, bad), InvalidArgument);
  bad = greedy(4);
  bad.logprobs = 513;
  EXPECT_THROW(e.add_request(ok, bad), InvalidArgument);
  // Nothing was queued by the failed calls.
  EXPECT_FALSE(e.has_unfinished_requests());
  EXPECT_EQ(e.stats().num_waiting, 0);
  EXPECT_EQ(e.stats().num_prompt_tokens, 0u);

  // Exactly at the limit is fine (abort it before it runs).
  const RequestId edge = e.add_request(ok, greedy(512 - 5));
  e.abort(edge);
  auto aborted = run_all(e);
  EXPECT_EQ(aborted[edge].second, FinishReason::kAbort);

  const RequestId id = e.add_request(ok, greedy(16));
  auto out = run_all(e);
  const std::vector<int32_t>& g = golden_["max_new_tokens_64"][0].new_ids;
  EXPECT_EQ(out[id].first, std::vector<int32_t>(g.begin(), g.begin() + 16));
  expect_all_blocks_free(e);
}

TEST_F(EngineTest, BlocksComeBackAfterAbort) {
  Engine e(config(32));  // 32 blocks of 16: exactly one max_model_len (512) request
  const int total = e.stats().num_total_blocks;
  EXPECT_EQ(total, 32);
  EXPECT_EQ(e.stats().block_size, 16);
  EXPECT_EQ(e.stats().num_free_blocks, total);

  // Abort while running (after a few steps).
  const RequestId running = e.add_request(kPrompt, greedy(200));
  const RequestId also_running = e.add_request({1, 2, 3}, greedy(10));
  for (int i = 0; i < 3; ++i) e.step();
  EXPECT_EQ(e.stats().num_running, 2);
  // Blocks are taken as tokens need them: 5 + 2 and 3 + 2 computed tokens, one block each.
  EXPECT_EQ(e.stats().num_free_blocks, total - 1 - 1);
  e.abort(running);
  e.abort(also_running);
  e.abort(987654);  // unknown ids are ignored
  EXPECT_EQ(e.stats().num_free_blocks, total);  // released at once, before the next step
  std::vector<RequestOutput> outs = e.step();
  std::map<RequestId, FinishReason> reasons;
  for (const RequestOutput& o : outs) {
    if (o.finished) reasons[o.request_id] = o.finish_reason;
    EXPECT_TRUE(o.new_token_ids.empty());
  }
  EXPECT_EQ(reasons[running], FinishReason::kAbort);
  EXPECT_EQ(reasons[also_running], FinishReason::kAbort);
  EXPECT_STREQ(finish_reason_name(FinishReason::kAbort), "abort");
  EXPECT_FALSE(e.has_unfinished_requests());
  expect_all_blocks_free(e);

  // Abort a request that never ran, then one mid-decode.
  const RequestId big = e.add_request(kPrompt, greedy(512 - 5));
  const RequestId queued = e.add_request(kPrompt, greedy(8));
  EXPECT_EQ(e.stats().num_waiting, 2);
  e.abort(queued);
  EXPECT_EQ(e.stats().num_waiting, 1);
  bool queued_reported = false;
  for (const RequestOutput& o : e.step())
    queued_reported |= o.request_id == queued && o.finished && o.finish_reason == FinishReason::kAbort;
  EXPECT_TRUE(queued_reported);
  EXPECT_EQ(e.stats().num_running, 1);
  EXPECT_EQ(e.stats().num_waiting, 0);
  EXPECT_EQ(e.stats().num_free_blocks, total - 1);
  e.abort(big);
  EXPECT_EQ(e.stats().num_free_blocks, total);
  auto rest = run_all(e);
  EXPECT_EQ(rest[big].second, FinishReason::kAbort);
  expect_all_blocks_free(e);

  // Requests that finish normally give their blocks back too, and the engine still produces
  // the golden continuation.
  const RequestId id = e.add_request(kPrompt, greedy(8));
  auto out = run_all(e);
  const std::vector<int32_t>& g = golden_["max_new_tokens_64"][0].new_ids;
  EXPECT_EQ(out[id].first, std::vector<int32_t>(g.begin(), g.begin() + 8));
  EXPECT_EQ(out[id].second, FinishReason::kLength);
  expect_all_blocks_free(e);
}

TEST_F(EngineTest, StopTokensAndEos) {
  Engine e(config());
  const std::vector<int32_t>& g = golden_["max_new_tokens_64"][0].new_ids;
  // Stop on the 4th golden token: it is kept and the request ends with "stop".
  SamplingParams p = greedy(64);
  p.stop_token_ids = {g[3]};
  const RequestId id = e.add_request(kPrompt, p);
  auto out = run_all(e);
  // The first occurrence of g[3] in the golden run ends it.
  size_t first = 0;
  while (g[first] != g[3]) ++first;
  EXPECT_EQ(out[id].first, std::vector<int32_t>(g.begin(), g.begin() + first + 1));
  EXPECT_EQ(out[id].second, FinishReason::kStop);
  EXPECT_STREQ(finish_reason_name(out[id].second), "stop");
  expect_all_blocks_free(e);
}

TEST_F(EngineTest, MaxTokensZeroOnlyScoresThePrompt) {
  Engine e(config());
  SamplingParams p = greedy(0);
  p.prompt_logprobs = 1;
  const RequestId id = e.add_request(kPrompt, p);
  std::vector<RequestOutput> outs;
  while (e.has_unfinished_requests())
    for (RequestOutput& o : e.step()) outs.push_back(std::move(o));
  ASSERT_EQ(outs.size(), 1u);
  EXPECT_EQ(outs[0].request_id, id);
  EXPECT_TRUE(outs[0].new_token_ids.empty());
  EXPECT_TRUE(outs[0].finished);
  EXPECT_EQ(outs[0].finish_reason, FinishReason::kLength);
  ASSERT_TRUE(outs[0].prompt_logprobs.has_value());
  EXPECT_EQ(outs[0].prompt_logprobs->size(), kPrompt.size());
  expect_all_blocks_free(e);
}

TEST_F(EngineTest, LogprobsAreConsistentBetweenDecodeAndPrefill) {
  // Greedy decode with logprobs: each taken token is the most likely one in its entry.
  Engine e(config());
  SamplingParams p = greedy(12);
  p.logprobs = 3;
  const RequestId id = e.add_request(kPrompt, p);
  std::vector<int32_t> gen;
  std::vector<TokenLogprobs> lps;
  while (e.has_unfinished_requests())
    for (const RequestOutput& o : e.step()) {
      ASSERT_EQ(o.request_id, id);
      ASSERT_EQ(o.new_logprobs.size(), o.new_token_ids.size());
      gen.insert(gen.end(), o.new_token_ids.begin(), o.new_token_ids.end());
      lps.insert(lps.end(), o.new_logprobs.begin(), o.new_logprobs.end());
    }
  const std::vector<int32_t>& g = golden_["max_new_tokens_64"][0].new_ids;
  ASSERT_EQ(gen, std::vector<int32_t>(g.begin(), g.begin() + 12));
  for (size_t i = 0; i < gen.size(); ++i) {
    ASSERT_EQ(lps[i].size(), 3u);  // greedy: the taken token is among the top 3
    ASSERT_EQ(lps[i].count(gen[i]), 1u);
    double total = 0.0;
    for (const auto& [tok, lp] : lps[i]) {
      EXPECT_LE(lp, lps[i].at(gen[i])) << "a token more likely than the greedy choice";
      EXPECT_LE(lp, 0.0f);
      total += std::exp(static_cast<double>(lp));
    }
    EXPECT_LE(total, 1.0 + 1e-6);
  }

  // Scoring prompt + generated ids as one prompt gives the same log-probabilities: prefill rows and
  // decode rows are computed by the same batch-invariant kernels.
  std::vector<int32_t> full = kPrompt;
  full.insert(full.end(), gen.begin(), gen.end());
  SamplingParams q = greedy(1);
  q.prompt_logprobs = 0;
  const RequestId id2 = e.add_request(full, q);
  std::optional<std::vector<TokenLogprobs>> plp;
  while (e.has_unfinished_requests())
    for (RequestOutput& o : e.step())
      if (o.request_id == id2 && o.prompt_logprobs) plp = std::move(o.prompt_logprobs);
  ASSERT_TRUE(plp.has_value());
  ASSERT_EQ(plp->size(), full.size());
  EXPECT_TRUE((*plp)[0].empty());  // nothing predicts the first token
  for (size_t pos = 1; pos < full.size(); ++pos) {
    ASSERT_EQ((*plp)[pos].size(), 1u);
    ASSERT_EQ((*plp)[pos].count(full[pos]), 1u);
  }
  for (size_t i = 0; i < gen.size(); ++i) {
    EXPECT_EQ((*plp)[kPrompt.size() + i].at(gen[i]), lps[i].at(gen[i])) << "generated token " << i;
  }
}

TEST_F(EngineTest, SeededSamplingIsReproducibleAcrossBatching) {
  SamplingParams p;
  p.temperature = 0.9f;
  p.top_k = 50;
  p.top_p = 0.95f;
  p.max_tokens = 40;
  p.ignore_eos = true;
  p.seed = 1234;
  std::vector<int32_t> alone;
  {
    Engine e(config());
    const RequestId id = e.add_request(kPrompt, p);
    alone = run_all(e)[id].first;
  }
  ASSERT_EQ(alone.size(), 40u);
  // Same request behind and between others, with chunked prefill: same tokens.
  EngineConfig cfg = config();
  cfg.max_num_batched_tokens = 6;
  Engine e(cfg);
  SamplingParams other = p;
  other.seed = 99;
  e.add_request({1, 291, 376, 400, 428, 286, 296}, other);
  const RequestId id = e.add_request(kPrompt, p);
  e.add_request({1, 317, 269}, greedy(20));
  auto out = run_all(e);
  EXPECT_EQ(out[id].first, alone);
  // A different seed gives a different continuation (40 tokens from a flat-ish distribution).
  Engine e2(config());
  SamplingParams p2 = p;
  p2.seed = 1235;
  const RequestId id2 = e2.add_request(kPrompt, p2);
  EXPECT_NE(run_all(e2)[id2].first, alone);
}

TEST_F(EngineTest, OneSequenceAtATime) {
  // max_num_seqs 1: requests queue and run one after another, each still exact.
  EngineConfig cfg = config();
  cfg.max_num_seqs = 1;
  Engine e(cfg);
  std::map<RequestId, const Golden*> ids;
  for (const Golden& g : golden_["max_new_tokens_64"]) ids[e.add_request(g.prompt, greedy(64))] = &g;
  EXPECT_EQ(e.stats().num_waiting, 3);
  const std::vector<RequestOutput> first = e.step();  // prefill and first token of request 1
  EXPECT_EQ(e.stats().num_running, 1);
  EXPECT_EQ(e.stats().num_waiting, 2);
  auto out = run_all(e);
  for (const RequestOutput& o : first) {
    auto& toks = out[o.request_id].first;
    toks.insert(toks.begin(), o.new_token_ids.begin(), o.new_token_ids.end());
  }
  for (const auto& [id, g] : ids) EXPECT_EQ(out[id].first, g->new_ids);
  expect_all_blocks_free(e);
}

TEST_F(EngineTest, ConcurrentAddAndAbortWhileStepping) {
  // One thread steps; two others add requests and abort some of them (at once, a little later,
  // or never; and ids that do not exist). A small pool forces preemptions and shared prompts hit
  // the prefix cache. Every request is reported finished exactly once, nothing is reported after
  // that, all blocks come back, and requests nobody aborted give exactly their golden tokens.
  EngineConfig cfg = config(24);  // 24 blocks of 4: room for one full-length request and a bit
  cfg.block_size = 4;
  cfg.max_num_seqs = 4;
  cfg.max_num_batched_tokens = 16;
  cfg.enable_prefix_caching = true;
  Engine e(cfg);
  const std::vector<Golden>& goldens = golden_["max_new_tokens_64"];
  ASSERT_EQ(goldens.size(), 3u);

  struct Added {
    size_t golden = 0;
    int max_tokens = 0;
    bool abort_requested = false;
  };
  struct Seen {
    std::vector<int32_t> tokens;
    int times_finished = 0;
    FinishReason reason = FinishReason::kNone;
    int outputs_after_finish = 0;
  };
  std::mutex mu;
  std::map<RequestId, Added> added;  // under mu
  std::map<RequestId, Seen> seen;    // the stepping thread's, read after join
  std::atomic<int> adders_left{2};
  std::atomic<bool> timed_out{false};

  std::thread stepper([&] {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (adders_left.load() > 0 || e.has_unfinished_requests()) {
      if (std::chrono::steady_clock::now() > deadline) {
        timed_out = true;
        return;
      }
      const std::vector<RequestOutput> outs = e.step();
      for (const RequestOutput& o : outs) {
        Seen& s = seen[o.request_id];
        if (s.times_finished > 0) ++s.outputs_after_finish;
        s.tokens.insert(s.tokens.end(), o.new_token_ids.begin(), o.new_token_ids.end());
        if (o.finished) {
          ++s.times_finished;
          s.reason = o.finish_reason;
        }
      }
      if (outs.empty()) std::this_thread::yield();
    }
  });
  auto adder = [&](uint32_t seed) {
    std::mt19937 rng(seed);
    for (int i = 0; i < 10; ++i) {
      const int action = static_cast<int>(rng() % 4);  // 0: abort at once, 1: abort soon, else keep
      Added a;
      a.golden = rng() % goldens.size();
      a.max_tokens = action == 0 ? 64 : std::vector<int>{64, 33, 9, 1}[rng() % 4];
      a.abort_requested = action <= 1;
      const RequestId id = e.add_request(goldens[a.golden].prompt, greedy(a.max_tokens));
      {
        std::lock_guard<std::mutex> lock(mu);
        added[id] = a;
      }
      if (action == 0) e.abort(id);
      if (action == 1) {
        std::this_thread::sleep_for(std::chrono::microseconds(rng() % 3000));
        e.abort(id);
      }
      if (i % 4 == 0) e.abort(1000000 + seed * 100 + i);  // never added: ignored
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 1500));
    }
    --adders_left;
  };
  std::thread a1(adder, 1u), a2(adder, 2u);
  a1.join();
  a2.join();
  stepper.join();
  ASSERT_FALSE(timed_out.load()) << "the engine did not finish within 60 s";

  EXPECT_FALSE(e.has_unfinished_requests());
  expect_all_blocks_free(e);
  ASSERT_EQ(added.size(), 20u);
  int aborted = 0, exact = 0;
  for (const auto& [id, a] : added) {
    SCOPED_TRACE("request " + std::to_string(id) + " max_tokens " + std::to_string(a.max_tokens) +
                 (a.abort_requested ? " (abort requested)" : ""));
    ASSERT_EQ(seen.count(id), 1u) << "never reported";
    const Seen& s = seen.at(id);
    EXPECT_EQ(s.times_finished, 1);
    EXPECT_EQ(s.outputs_after_finish, 0);
    const std::vector<int32_t>& g = goldens[a.golden].new_ids;
    ASSERT_LE(s.tokens.size(), static_cast<size_t>(a.max_tokens));
    // Whatever was generated, aborted or not, is the golden continuation so far.
    EXPECT_EQ(s.tokens, std::vector<int32_t>(g.begin(), g.begin() + s.tokens.size()));
    if (s.reason == FinishReason::kAbort) {
      EXPECT_TRUE(a.abort_requested);
      ++aborted;
    } else {
      EXPECT_EQ(s.reason, FinishReason::kLength);
      EXPECT_EQ(s.tokens.size(), static_cast<size_t>(a.max_tokens));
      ++exact;
    }
  }
  for (const auto& [id, s] : seen) EXPECT_EQ(added.count(id), 1u) << "output for unknown request " << id;
  EXPECT_GT(aborted, 0);
  EXPECT_GT(exact, 0);
  const EngineStats st = e.stats();
  std::cout << "[ threads  ] " << added.size() << " requests, " << aborted << " aborted, " << st.num_steps
            << " steps, " << st.num_preemptions << " preemptions, " << st.prefix_cache_hit_tokens
            << " prefix-hit tokens\n";
}

TEST_F(EngineTest, KvCacheMemoryBytesSizesThePool) {
  EngineConfig c = config(0);  // num_kv_blocks 0: size from the byte budget
  // stories260K: 5 layers x 4 kv heads x 8 dims, K and V, float32 = 1280 bytes per token.
  const int64_t per_block = 2ll * 5 * 4 * 16 * 8 * 4;
  c.kv_cache_memory_bytes = 40 * per_block + per_block / 2;
  {
    Engine e(c);
    EXPECT_EQ(e.stats().num_total_blocks, 40);
  }
  c.kv_cache_memory_bytes = per_block - 1;
  EXPECT_THROW(Engine{c}, InvalidArgument);
  // Far more blocks than an int holds: rejected with the real reason, not wrapped around.
  c.kv_cache_memory_bytes = int64_t{1} << 62;
  try {
    Engine e(c);
    FAIL() << "accepted a KV budget of 2^62 bytes";
  } catch (const InvalidArgument& err) {
    EXPECT_EQ(std::string(err.what()).find("less than one KV block"), std::string::npos) << err.what();
  }
}

TEST_F(EngineTest, MissingModelIsNotFound) {
  testing::TempDir dir;
  EngineConfig c = config();
  c.model_path = dir.file("no_such_model");
  EXPECT_THROW(Engine{c}, NotFound);
  c.model_path = dir.path().string();  // exists but has no config.json
  EXPECT_THROW(Engine{c}, NotFound);
  std::filesystem::copy_file(model_dir_ + "/config.json", dir.file("config.json"));
  EXPECT_THROW(Engine{c}, NotFound);  // config but no weights
}

TEST_F(EngineTest, BadConfigIsRejected) {
  EngineConfig c = config();
  c.dtype = "float16";
  EXPECT_THROW(Engine{c}, InvalidArgument);
  c = config();
  c.device = "tpu";
  EXPECT_THROW(Engine{c}, InvalidArgument);
  c = config();
  c.max_model_len = 1024;  // beyond max_position_embeddings 512
  EXPECT_THROW(Engine{c}, InvalidArgument);
  c = config();
  c.block_size = 0;
  EXPECT_THROW(Engine{c}, InvalidArgument);
}

TEST_F(EngineTest, CudaDeviceIsUnsupportedHere) {
  // Without a CUDA build or a GPU (and, for now, even with one: model execution is CPU-only)
  // device="cuda" is a clean Unsupported, never a crash.
  EngineConfig c = config();
  c.device = "cuda";
  EXPECT_THROW(Engine{c}, Unsupported);
  if (!cuda_compiled()) {
    EXPECT_FALSE(cuda_available());
  }
}

TEST_F(EngineTest, LibraryInfo) {
  EXPECT_STREQ(version(), ACCELCORE_TEST_EXPECTED_VERSION);
  const std::string isa = cpu_isa();
  EXPECT_TRUE(isa == "scalar" || isa == "avx2" || isa == "avx512") << isa;
}

}  // namespace
}  // namespace accelcore
