#include <accelcore/engine.h>

#include <algorithm>
#include <limits>
#include <mutex>

#include "backend/cpu/cpu_features.h"
#include "cuda/cuda_backend.h"
#include "kv/kv_cache.h"
#include "model/llama.h"
#include "sample/sampler.h"
#include "sched/scheduler.h"
#include "util/check.h"
#include "util/thread_pool.h"

namespace accelcore {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kAbort: return "abort";
    case FinishReason::kNone: return "";
  }
  return "";
}

void EngineConfig::validate() const {
  ACCEL_CHECK(dtype == "float32" || dtype == "auto", InvalidArgument)
      << "dtype '" << dtype << "' is not supported on the CPU (supported: float32, auto)";
  ACCEL_CHECK(device == "cpu" || device == "cuda", InvalidArgument)
      << "device must be 'cpu' or 'cuda', got '" << device << "'";
  ACCEL_CHECK(num_threads >= 0, InvalidArgument) << "num_threads must be >= 0, got " << num_threads;
  ACCEL_CHECK(block_size > 0 && block_size <= 1024, InvalidArgument) << "block_size must be in [1, 1024], got " << block_size;
  ACCEL_CHECK(num_kv_blocks >= 0, InvalidArgument) << "num_kv_blocks must be >= 0, got " << num_kv_blocks;
  ACCEL_CHECK(kv_cache_memory_bytes >= 0, InvalidArgument) << "kv_cache_memory_bytes must be >= 0";
  ACCEL_CHECK(max_num_seqs > 0, InvalidArgument) << "max_num_seqs must be positive, got " << max_num_seqs;
  ACCEL_CHECK(max_num_batched_tokens > 0, InvalidArgument)
      << "max_num_batched_tokens must be positive, got " << max_num_batched_tokens;
  ACCEL_CHECK(max_model_len >= 0, InvalidArgument) << "max_model_len must be >= 0, got " << max_model_len;
}

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

constexpr int64_t kDefaultKvBytesCap = 2ll << 30;

}  // namespace

struct Engine::Impl {
  EngineConfig config;
  ModelInfo info;
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<KvCache> cache;
  std::unique_ptr<Scheduler> scheduler;
  std::unique_ptr<ThreadPool> pool;
  mutable std::mutex mu;
  RequestId next_id = 1;
  EngineStats counters;
  std::vector<RequestOutput> pending;  // outputs of requests aborted between steps
  // Per-step scratch.
  BatchPlan plan;
  std::vector<ScheduledSeq> seqs;
  FloatBuffer logits;
  std::vector<double> probs;

  void process(const ScheduledSeq& s, std::vector<RequestOutput>* outs);
};

Engine::Engine(const EngineConfig& config) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.config = config;
  config.validate();
  if (config.device == "cuda") {
    ACCEL_CHECK(cuda::compiled(), Unsupported) << "device='cuda' requested but this build has no CUDA backend "
                                                   "(built with ACCELCORE_CUDA=OFF or without nvcc)";
    ACCEL_CHECK(cuda::device_count() > 0, Unsupported)
        << "device='cuda' requested but no CUDA device is usable: " << cuda::status_message();
    ACCEL_THROW(Unsupported) << "device='cuda': model execution on CUDA is not implemented yet; use device='cpu'";
  }
  ModelConfig mc = load_model_config(config.model_path);
  const int max_len = config.max_model_len > 0 ? config.max_model_len : mc.max_position_embeddings;
  ACCEL_CHECK(max_len <= mc.max_position_embeddings, InvalidArgument)
      << "max_model_len " << max_len << " exceeds the model's max_position_embeddings " << mc.max_position_embeddings;
  ModelWeights weights = load_weights(mc, config.model_path);

  m.info.architecture = mc.architecture;
  m.info.vocab_size = mc.vocab_size;
  m.info.hidden_size = mc.hidden_size;
  m.info.num_layers = mc.num_layers;
  m.info.max_model_len = max_len;
  m.info.eos_token_ids = mc.eos_token_ids;
  m.info.bos_token_id = mc.bos_token_id;

  KvCacheShape shape;
  shape.num_layers = mc.num_layers;
  shape.num_kv_heads = mc.num_kv_heads;
  shape.head_dim = mc.head_dim;
  shape.block_size = config.block_size;
  const int64_t blocks_per_seq = (max_len + config.block_size - 1) / config.block_size;
  if (config.num_kv_blocks > 0) {
    shape.num_blocks = config.num_kv_blocks;
  } else if (config.kv_cache_memory_bytes > 0) {
    // In 64 bits: a large byte budget must not wrap around when narrowed to the block count.
    const int64_t blocks = config.kv_cache_memory_bytes / static_cast<int64_t>(shape.bytes_per_block());
    ACCEL_CHECK(blocks > 0, InvalidArgument)
        << "kv_cache_memory_bytes " << config.kv_cache_memory_bytes << " is less than one KV block ("
        << shape.bytes_per_block() << " bytes)";
    ACCEL_CHECK(blocks <= std::numeric_limits<int32_t>::max(), InvalidArgument)
        << "kv_cache_memory_bytes " << config.kv_cache_memory_bytes << " asks for " << blocks
        << " KV blocks, more than the " << std::numeric_limits<int32_t>::max() << " supported";
    shape.num_blocks = static_cast<int>(blocks);
  } else {
    // Room for max_num_seqs full-length requests, capped in memory but never below one of them.
    const int64_t want = blocks_per_seq * config.max_num_seqs;
    const int64_t cap = std::max<int64_t>(blocks_per_seq, kDefaultKvBytesCap / shape.bytes_per_block());
    shape.num_blocks = static_cast<int>(std::min(want, cap));
  }
  m.cache = std::make_unique<KvCache>(shape);
  m.model = std::make_unique<LlamaModel>(std::move(mc), std::move(weights));
  SchedulerConfig sc;
  sc.max_num_seqs = config.max_num_seqs;
  sc.max_num_batched_tokens = config.max_num_batched_tokens;
  sc.block_size = config.block_size;
  sc.num_blocks = shape.num_blocks;
  m.scheduler = std::make_unique<Scheduler>(sc);
  m.pool = std::make_unique<ThreadPool>(config.num_threads > 0 ? config.num_threads : default_num_threads());
}

Engine::~Engine() = default;

RequestId Engine::add_request(std::vector<int32_t> prompt, const SamplingParams& params) {
  Impl& m = *impl_;
  params.validate();
  ACCEL_CHECK(!prompt.empty(), InvalidArgument) << "prompt is empty: give at least one token";
  const int vocab = m.info.vocab_size;
  for (size_t i = 0; i < prompt.size(); ++i) {
    ACCEL_CHECK(prompt[i] >= 0 && prompt[i] < vocab, InvalidArgument)
        << "prompt token id " << prompt[i] << " at index " << i << " is out of range [0, " << vocab << ")";
  }
  for (int32_t t : params.stop_token_ids) {
    ACCEL_CHECK(t >= 0 && t < vocab, InvalidArgument)
        << "stop token id " << t << " is out of range [0, " << vocab << ")";
  }
  ACCEL_CHECK(params.logprobs <= vocab && params.prompt_logprobs <= vocab, InvalidArgument)
      << "logprobs and prompt_logprobs must be <= the vocabulary size " << vocab;
  const int64_t total = static_cast<int64_t>(prompt.size()) + params.max_tokens;
  ACCEL_CHECK(total <= m.info.max_model_len, InvalidArgument)
      << "prompt (" << prompt.size() << " tokens) plus max_tokens (" << params.max_tokens
      << ") exceeds the maximum model length " << m.info.max_model_len;
  std::lock_guard<std::mutex> lock(m.mu);
  ACCEL_CHECK(m.scheduler->blocks_for(static_cast<int>(total)) <= m.scheduler->num_total_blocks(), InvalidArgument)
      << "prompt plus max_tokens (" << total << " tokens) needs more KV blocks than the whole pool holds ("
      << m.scheduler->num_total_blocks() << " blocks of " << m.config.block_size << ")";
  auto req = std::make_unique<Request>();
  req->id = m.next_id++;
  req->prompt = std::move(prompt);
  req->params = params;
  req->seed = params.seed.has_value() ? *params.seed : splitmix64(m.config.seed ^ splitmix64(req->id));
  req->output.reserve(params.max_tokens);
  const RequestId id = req->id;
  m.counters.num_prompt_tokens += req->prompt.size();
  m.scheduler->add(std::move(req));
  return id;
}

void Engine::Impl::process(const ScheduledSeq& s, std::vector<RequestOutput>* outs) {
  Request* r = s.req;
  const int vocab = info.vocab_size;
  const int np = static_cast<int>(r->prompt.size());
  RequestOutput out;
  out.request_id = r->id;
  int row = s.first_logit;
  // Prompt log-probabilities: the row at position p scores prompt token p + 1.
  if (r->params.prompt_logprobs >= 0) {
    if (s.first_token == 0) r->prompt_logprobs.emplace_back();  // position 0 has no prediction
    for (int pos = s.first_token; pos < s.first_token + s.num_tokens && pos + 1 < np; ++pos, ++row) {
      TokenLogprobs lp;
      top_logprobs(logits.data() + static_cast<int64_t>(row) * vocab, vocab, r->params.prompt_logprobs,
                   r->prompt[pos + 1], &lp);
      r->prompt_logprobs.push_back(std::move(lp));
    }
  }
  r->num_computed += s.num_tokens;
  const bool prompt_done_now = s.first_token < np && r->num_computed >= np;
  if (prompt_done_now && r->params.prompt_logprobs >= 0) out.prompt_logprobs = std::move(r->prompt_logprobs);

  FinishReason finish = FinishReason::kNone;
  if (s.samples) {
    if (static_cast<int>(r->output.size()) >= r->params.max_tokens) {
      finish = FinishReason::kLength;  // max_tokens == 0: the prompt was only scored
    } else {
      const int sample_row = s.first_logit + s.num_logits - 1;
      const float* lg = logits.data() + static_cast<int64_t>(sample_row) * vocab;
      const int32_t tok = sample_token(lg, vocab, r->params, r->seed, r->output.size(), &probs);
      r->output.push_back(tok);
      out.new_token_ids.push_back(tok);
      ++counters.num_generated_tokens;
      if (r->params.logprobs >= 0) {
        out.new_logprobs.emplace_back();
        top_logprobs(lg, vocab, r->params.logprobs, tok, &out.new_logprobs.back());
      }
      const auto& eos = info.eos_token_ids;
      const auto& stops = r->params.stop_token_ids;
      if ((!r->params.ignore_eos && std::find(eos.begin(), eos.end(), tok) != eos.end()) ||
          std::find(stops.begin(), stops.end(), tok) != stops.end()) {
        finish = FinishReason::kStop;
      } else if (static_cast<int>(r->output.size()) >= r->params.max_tokens) {
        finish = FinishReason::kLength;
      }
    }
  }
  if (finish != FinishReason::kNone) {
    scheduler->finish(r->id, finish);  // r is gone after this
    out.finished = true;
    out.finish_reason = finish;
  }
  if (out.finished || !out.new_token_ids.empty() || out.prompt_logprobs.has_value()) outs->push_back(std::move(out));
}

std::vector<RequestOutput> Engine::step() {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  std::vector<RequestOutput> outs = std::move(m.pending);
  m.pending.clear();
  m.scheduler->schedule(&m.plan, &m.seqs);
  if (m.plan.num_tokens() == 0) return outs;
  m.model->forward(m.plan, *m.cache, *m.pool, &m.logits);
  ++m.counters.num_steps;
  for (const ScheduledSeq& s : m.seqs) m.process(s, &outs);
  return outs;
}

void Engine::abort(RequestId id) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  if (m.scheduler->finish(id, FinishReason::kAbort) == nullptr) return;
  RequestOutput out;
  out.request_id = id;
  out.finished = true;
  out.finish_reason = FinishReason::kAbort;
  m.pending.push_back(std::move(out));
}

bool Engine::has_unfinished_requests() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return !impl_->scheduler->empty() || !impl_->pending.empty();
}

EngineStats Engine::stats() const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  EngineStats s = m.counters;
  s.num_running = m.scheduler->num_running();
  s.num_waiting = m.scheduler->num_waiting();
  s.num_free_blocks = m.scheduler->num_free_blocks();
  s.num_total_blocks = m.scheduler->num_total_blocks();
  s.block_size = m.config.block_size;
  return s;
}

const ModelInfo& Engine::model_info() const { return impl_->info; }
const EngineConfig& Engine::config() const { return impl_->config; }

bool cuda_compiled() { return cuda::compiled(); }
bool cuda_available() { return cuda::compiled() && cuda::device_count() > 0; }
std::string cpu_isa() { return cpu::isa_name(cpu::active_isa()); }
const char* version() { return ACCELCORE_VERSION; }

}  // namespace accelcore
