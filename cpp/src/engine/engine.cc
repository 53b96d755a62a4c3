#include <accelcore/engine.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_features.h"
#include "cuda/cuda_backend.h"
#include "kv/kv_cache.h"
#include "model/llama.h"
#include "model/safetensors.h"
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
    case FinishReason::kError: return "error";
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
  ACCEL_CHECK(speculation == "off" || speculation == "lookahead", InvalidArgument)
      << "speculation must be 'off' or 'lookahead', got '" << speculation << "'";
  ACCEL_CHECK(spec_policy == "smartspec" || spec_policy == "fixed" || spec_policy == "off", InvalidArgument)
      << "spec_policy must be 'smartspec', 'fixed' or 'off', got '" << spec_policy << "'";
  ACCEL_CHECK(spec_max_draft >= 0 && spec_max_draft <= 256, InvalidArgument)
      << "spec_max_draft must be in [0, 256], got " << spec_max_draft;
  ACCEL_CHECK(spec_max_depth >= 1 && spec_max_depth <= 64, InvalidArgument)
      << "spec_max_depth must be in [1, 64], got " << spec_max_depth;
  ACCEL_CHECK(spec_max_match >= 1 && spec_max_match <= 128, InvalidArgument)
      << "spec_max_match must be in [1, 128], got " << spec_max_match;
  ACCEL_CHECK(spec_memory_mb >= 1, InvalidArgument) << "spec_memory_mb must be >= 1, got " << spec_memory_mb;
  ACCEL_CHECK(quantization == "none" || quantization == "w4a8" || quantization == "w4a16" || quantization == "w4a4",
              InvalidArgument)
      << "quantization must be 'none', 'w4a16', 'w4a8' or 'w4a4', got '" << quantization << "'";
  ACCEL_CHECK(quantization != "w4a4" || !quant_calibration.empty(), InvalidArgument)
      << "quantization 'w4a4' (FMPQ) needs quant_calibration: its channel order and 8-bit groups come from "
         "the calibration activations (the Python Engine samples them from the model when none are given)";
  ACCEL_CHECK(quant_method == "gptq" || quant_method == "rtn", InvalidArgument)
      << "quant_method must be 'gptq' or 'rtn', got '" << quant_method << "'";
  ACCEL_CHECK(quant_a8_fraction >= 0 && quant_a8_fraction <= 1, InvalidArgument)
      << "quant_a8_fraction must be in [0, 1], got " << quant_a8_fraction;
  ACCEL_CHECK(quant_group_size >= 32 && quant_group_size % 32 == 0 && quant_group_size <= 4096, InvalidArgument)
      << "quant_group_size must be a multiple of 32 in [32, 4096], got " << quant_group_size;
  ACCEL_CHECK(kv_cache_dtype == "auto" || kv_cache_dtype == "float32" || kv_cache_dtype == "int8" ||
                  kv_cache_dtype == "int4",
              InvalidArgument)
      << "kv_cache_dtype must be 'auto', 'float32', 'int8' or 'int4', got '" << kv_cache_dtype << "'";
  ACCEL_CHECK(quant_calibration.empty() || quantization != "none", InvalidArgument)
      << "quant_calibration was given but quantization is 'none': it calibrates a 4-bit scheme";
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
  int num_total_blocks = 0;
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<KvCache> cache;
  std::unique_ptr<Scheduler> scheduler;
  std::unique_ptr<ThreadPool> pool;

  // Two locks, so that add_request and abort never wait for a forward pass:
  //  - step_mu: one step at a time; guards the scheduler, the model and the KV cache.
  //  - intake_mu: guards what other threads hand to the stepping thread, and the stats snapshot.
  // Order: step_mu before intake_mu.
  std::mutex step_mu;
  mutable std::mutex intake_mu;
  std::vector<std::unique_ptr<Request>> new_requests;
  std::vector<RequestId> abort_ids;
  std::vector<RequestOutput> pending;  // outputs produced outside a step (aborts)
  std::atomic<RequestId> next_id{1};
  int num_active = 0;  // requests the scheduler holds (snapshot, under intake_mu)
  EngineStats counters;
  // The step-time model learns from whole step cycles: from one step's start to the next's, so
  // that the caller's own work per step (a Python loop handling the outputs) counts, as it does
  // for latency. A cycle whose caller left the engine idle for more than kIdleGap (no request,
  // or a paused client) is not observed; neither is the step after it, on cold caches and
  // sleeping cores. Under step_mu.
  Clock::time_point last_step_start, last_step_end;
  StepFeatures last_step_features;
  double last_step_lookup_s = 0;  // its draft lookups' time, which the model keeps apart
  double last_step_tokens = 0;    // the tokens it generated (SmartSpec's goodput guard)
  bool last_step_observable = false;
  static constexpr std::chrono::microseconds kIdleGap{1000};

  // Per-step scratch (under step_mu).
  BatchPlan plan;
  std::vector<ScheduledSeq> seqs;
  std::vector<int32_t> released_blocks;  // scratch: release_kv
  std::vector<uint8_t> released_full;
  // Hands the blocks requests let go of to the KV cache (a quantized one drops their float forms).
  void release_kv() {
    scheduler->take_released(&released_blocks, &released_full);
    cache->release(released_blocks, released_full, *pool);
  }
  std::vector<std::unique_ptr<Request>> failed;
  FloatBuffer logits;
  // Per scheduled sequence: the tokens drawn this step (one, or more through an accepted draft
  // path), the logit row each came from and the draft node of that row (-1: the root).
  struct Samples {
    std::vector<int32_t> tokens, rows, nodes;
  };
  std::vector<Samples> samples;
  uint64_t total_draft_tokens = 0, total_accepted_draft_tokens = 0;

  void profile_step_time();
  void quantize_w4(const EngineConfig& config);
  void apply_intake();  // needs step_mu
  void publish();       // needs step_mu
  void sample_all();    // fills `samples` (sampling and draft verification), in parallel
  void process(size_t i, std::vector<RequestOutput>* outs);
  RequestOutput finished_output(std::unique_ptr<Request> r) const;
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
  if (mc.quant) {
    const std::string stored = "w4" + mc.quant->activations;
    ACCEL_CHECK(config.quantization == "none" || config.quantization == stored, InvalidArgument)
        << config.model_path << " is a quantized checkpoint (" << mc.quant->scheme << "): quantization must be 'none' "
        << "or '" << stored << "', got '" << config.quantization << "'";
    ACCEL_CHECK(config.quant_calibration.empty(), InvalidArgument)
        << config.model_path << " is already quantized (" << mc.quant->scheme << "): quant_calibration does not apply";
    m.config.quantization = stored;
  }
  if (m.config.kv_cache_dtype == "auto") m.config.kv_cache_dtype = mc.quant ? mc.quant->kv_cache : "float32";
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
  shape.kv_bits = m.config.kv_cache_dtype == "int8" ? 8 : m.config.kv_cache_dtype == "int4" ? 4 : 0;
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
  sc.enable_prefix_caching = config.enable_prefix_caching;
  sc.kv_quantized = shape.kv_bits != 0;
  if (config.speculation == "lookahead" && config.spec_policy != "off") {
    sc.spec_policy = config.spec_policy == "fixed" ? SpecPolicy::kFixed : SpecPolicy::kSmart;
    sc.spec_max_draft = config.spec_max_draft;
    sc.spec_max_depth = config.spec_max_depth;
    sc.spec_max_match = config.spec_max_match;
    sc.spec_memory_bytes = static_cast<size_t>(config.spec_memory_mb) << 20;
  }
  sc.eos_token_ids = m.info.eos_token_ids;
  m.scheduler = std::make_unique<Scheduler>(sc);
  m.num_total_blocks = shape.num_blocks;
  m.publish();
  m.pool = std::make_unique<ThreadPool>(config.num_threads > 0 ? config.num_threads : default_num_threads());
  // Before the profile: it times this model.
  if (config.quantization != "none" && !m.model->config().quant) m.quantize_w4(config);
  if (sc.spec_max_draft > 0 && sc.spec_policy == SpecPolicy::kSmart) {
    m.profile_step_time();
    m.cache->reset();  // the profile wrote blocks nothing holds
    m.publish();
  }
}

// Quantizes the model's linears to 4 bits: with calibration sequences, GPTQ layer by layer
// against the Hessians of each layer's inputs, from the calibration run through the model (a
// float32 KV cache of its own: the engine's may be quantized); without, round to nearest.
void Engine::Impl::quantize_w4(const EngineConfig& config) {
  const ActQuant act = config.quantization == "w4a16" ? ActQuant::kFloat
                       : config.quantization == "w4a4" ? ActQuant::kFmpq
                                                       : ActQuant::kInt8;
  if (config.quant_calibration.empty()) {
    model->quantize_weights_w4(config.quant_group_size, act, config.quant_progress);
    model->round_embeddings_int8();
    return;
  }
  const double bytes = static_cast<double>(model->layer_hessian_bytes());
  ACCEL_CHECK(bytes <= 8e9 || config.quant_method == "rtn", InvalidArgument)
      << "GPTQ calibration keeps one layer's input Hessians: " << bytes / 1e9
      << " GB for this model, more than the 8 GB allowed; quantize without quant_calibration (round to nearest)";
  KvCacheShape calib_shape = cache->shape();
  calib_shape.kv_bits = 0;
  calib_shape.num_blocks = (info.max_model_len + config.block_size - 1) / config.block_size;
  KvCache calib_cache(calib_shape);
  std::vector<std::vector<int32_t>> seqs;
  for (size_t s = 0; s < config.quant_calibration.size(); ++s) {
    const std::vector<int32_t>& seq = config.quant_calibration[s];
    const int n = std::min<int>(static_cast<int>(seq.size()), info.max_model_len);
    for (int i = 0; i < n; ++i)
      ACCEL_CHECK(seq[i] >= 0 && seq[i] < info.vocab_size, InvalidArgument)
          << "quant_calibration sequence " << s << " has token id " << seq[i] << " at index " << i
          << ", out of range [0, " << info.vocab_size << ")";
    seqs.emplace_back(seq.begin(), seq.begin() + n);
  }
  model->quantize_weights_w4_calibrated(seqs, calib_cache, *pool, config.quant_group_size, act, config.quant_a8_fraction,
                                        config.quant_method == "gptq", config.quant_progress);
  model->round_embeddings_int8();
}

// Seeds SmartSpec's step-time model: forward passes over made-up batches that vary the token
// count, the context read and the number of sequences. They write K/V into the idle pool (nothing
// is allocated yet; block 0 onwards) and are discarded.
void Engine::Impl::profile_step_time() {
  const int bs = config.block_size, pool_tokens = num_total_blocks * bs;
  struct Shape {
    int seqs, tokens, context;  // per sequence: `tokens` rows after `context` earlier positions
    int draft = 0;              // then a chain of draft nodes after the last row
  };
  const Shape shapes[] = {{1, 1, 16},  {1, 1, 256}, {1, 4, 64},  {1, 16, 128}, {1, 64, 0},  {4, 1, 64},
                          {8, 1, 256}, {8, 2, 32},  {16, 1, 64}, {2, 8, 512},  {1, 1, 128, 1}, {1, 1, 128, 4},
                          {4, 1, 64, 2}, {32, 1, 64}, {32, 1, 64, 1}};
  for (const Shape& sh : shapes) {
    const int per_seq = std::min(sh.context + sh.tokens + sh.draft, info.max_model_len);
    const int blocks_per_seq = (per_seq + bs - 1) / bs;
    if (per_seq <= sh.tokens + sh.draft || blocks_per_seq * sh.seqs > num_total_blocks || per_seq > pool_tokens) continue;
    cache->zero_blocks(blocks_per_seq * sh.seqs);  // made-up contexts: see KvCache::zero_blocks
    plan.clear();
    auto slot = [&](int q, int i) { return static_cast<int64_t>(q * blocks_per_seq + i / bs) * bs + i % bs; };
    for (int q = 0; q < sh.seqs; ++q) {
      plan.block_table_offset.push_back(static_cast<int32_t>(plan.block_tables.size()));
      for (int b = 0; b < blocks_per_seq; ++b) plan.block_tables.push_back(q * blocks_per_seq + b);
      const int root = per_seq - sh.draft - 1;
      for (int i = root - sh.tokens + 1; i <= root + sh.draft; ++i) {
        plan.token_ids.push_back(0);
        plan.positions.push_back(i);
        plan.slots.push_back(slot(q, i));
        plan.seq_of_token.push_back(q);
        if (sh.draft > 0) {  // every row of the shape has an extra_offset entry (none before it)
          if (plan.extra_offset.empty()) plan.extra_offset.assign(plan.num_tokens(), 0);
          for (int a = root + 1; a <= i; ++a) plan.extra_slots.push_back(slot(q, a));  // a chain: ancestors, itself
          plan.extra_offset.push_back(static_cast<int32_t>(plan.extra_slots.size()));
        }
        if (i >= root) plan.logit_rows.push_back(plan.num_tokens() - 1);
      }
    }
    // The first run warms caches and buffers. Where the model picks between two splits by
    // measured time, its first runs of a size try each twice (model/split_timer.h): the fastest
    // timed run is of the one the engine will mostly run (one run of either kind made the fit
    // noisy enough to lose its fixed and per-token costs altogether).
    const int reps = model->can_split_parts(plan.num_tokens(), *cache, *pool) ? 4 : 2;
    double best = 0;
    for (int rep = 0; rep < reps; ++rep) {
      const auto t0 = Clock::now();
      model->forward(plan, *cache, *pool, &logits);
      const double s = std::chrono::duration<double>(Clock::now() - t0).count();
      if (rep > 0) best = rep == 1 ? s : std::min(best, s);
    }
    scheduler->observe_profile(step_features(plan), best);
  }
  plan.clear();
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
  const int64_t blocks = (total + m.config.block_size - 1) / m.config.block_size;
  ACCEL_CHECK(blocks <= m.num_total_blocks, InvalidArgument)
      << "prompt plus max_tokens (" << total << " tokens) needs more KV blocks than the whole pool holds ("
      << m.num_total_blocks << " blocks of " << m.config.block_size << ")";
  auto req = std::make_unique<Request>();
  req->id = m.next_id.fetch_add(1);
  req->prompt = std::move(prompt);
  req->params = params;
  req->seed = params.seed.has_value() ? *params.seed : splitmix64(m.config.seed ^ splitmix64(req->id));
  req->output.reserve(params.max_tokens);
  req->arrival_time = Clock::now();
  const RequestId id = req->id;
  std::lock_guard<std::mutex> lock(m.intake_mu);
  m.counters.num_prompt_tokens += req->prompt.size();
  m.new_requests.push_back(std::move(req));
  return id;
}

void Engine::Impl::apply_intake() {
  std::vector<std::unique_ptr<Request>> adds;
  std::vector<RequestId> aborts;
  {
    std::lock_guard<std::mutex> lock(intake_mu);
    adds.swap(new_requests);
    aborts.swap(abort_ids);
    num_active += static_cast<int>(adds.size());  // keeps has_unfinished_requests() true meanwhile
  }
  for (auto& r : adds) scheduler->add(std::move(r));
  std::vector<RequestOutput> outs;
  for (RequestId id : aborts) {
    std::unique_ptr<Request> r = scheduler->finish(id, FinishReason::kAbort);
    if (r) outs.push_back(finished_output(std::move(r)));
  }
  if (!outs.empty()) {
    std::lock_guard<std::mutex> lock(intake_mu);
    for (auto& o : outs) pending.push_back(std::move(o));
  }
}

void Engine::Impl::publish() {
  std::lock_guard<std::mutex> lock(intake_mu);
  num_active = scheduler->num_running() + scheduler->num_waiting();
  counters.num_running = scheduler->num_running();
  counters.num_waiting = scheduler->num_waiting();
  counters.num_free_blocks = scheduler->num_free_blocks();
  counters.num_total_blocks = scheduler->num_total_blocks();
  counters.num_cached_blocks = scheduler->num_cached_blocks();
  counters.kv_block_bytes = cache->shape().bytes_per_block();
  counters.kv_cache_bytes = cache->bytes();
  counters.num_staged_blocks = cache->num_staged_blocks();
  counters.num_preemptions = scheduler->counters().num_preemptions;
  counters.prefix_cache_hit_tokens = scheduler->counters().prefix_cache_hit_tokens;
  counters.prefix_cache_query_tokens = scheduler->counters().prefix_cache_query_tokens;
  if (const SpecController* spec = scheduler->spec()) {
    counters.spec_policy = spec->policy() == SpecPolicy::kSmart ? "smartspec" : "fixed";
    counters.num_draft_tokens = total_draft_tokens;
    counters.num_accepted_draft_tokens = total_accepted_draft_tokens;
    counters.last_step_draft_tokens = scheduler->last_draft_tokens();
    counters.last_step_drafted_seqs = scheduler->last_drafted_seqs();
    counters.spec_acceptance.assign(spec->global_rates(true).begin() + 1, spec->global_rates(true).end());
    counters.spec_acceptance_sampled.assign(spec->global_rates(false).begin() + 1, spec->global_rates(false).end());
    const auto& c = spec->model().coefficients();
    counters.step_time_coefficients.assign(c.begin(), c.end());
    counters.spec_lookup_cost_s = spec->model().lookup_cost();
    const auto& cal = spec->calibration(true).at_centres();
    counters.spec_calibration.assign(cal.begin(), cal.end());
    const auto& cal_sampled = spec->calibration(false).at_centres();
    counters.spec_calibration_sampled.assign(cal_sampled.begin(), cal_sampled.end());
    counters.spec_guard_plain_tok_s.clear();
    counters.spec_guard_drafted_tok_s.clear();
    for (int r = 0; r < GoodputGuard::kRanges; ++r) {
      counters.spec_guard_plain_tok_s.push_back(spec->guard().tokens_per_second(1 << r, false));
      counters.spec_guard_drafted_tok_s.push_back(spec->guard().tokens_per_second(1 << r, true));
    }
  } else {
    counters.spec_policy = config.speculation == "lookahead" ? "off" : "";
  }
}

RequestOutput Engine::Impl::finished_output(std::unique_ptr<Request> r) const {
  RequestOutput out;
  out.request_id = r->id;
  out.finished = true;
  out.finish_reason = r->finish_reason;
  out.error = r->error;
  const auto now = Clock::now();
  auto secs = [](Clock::duration d) { return std::chrono::duration<double>(d).count(); };
  RequestMetrics& mt = out.metrics;
  mt.e2e_s = secs(now - r->arrival_time);
  if (!r->output.empty()) {
    mt.ttft_s = secs(r->first_token_time - r->arrival_time);
    if (r->output.size() > 1) mt.tpot_s = secs(r->last_token_time - r->first_token_time) / (r->output.size() - 1);
  }
  mt.num_cached_tokens = r->num_cached_tokens;
  mt.num_preemptions = r->num_preemptions;
  mt.num_steps = r->num_steps;
  mt.num_draft_tokens = r->num_draft_tokens;
  mt.num_accepted_draft_tokens = r->num_accepted_draft_tokens;
  return out;
}

void Engine::Impl::sample_all() {
  samples.resize(seqs.size());
  const int vocab = info.vocab_size;
  // Each draw is a pure function of (logits row, params, seed, output position): any split across
  // threads gives the same tokens.
  pool->parallel_for(static_cast<int64_t>(seqs.size()), 8, [&](int64_t b, int64_t e) {
    std::vector<double> probs;
    for (int64_t i = b; i < e; ++i) {
      const ScheduledSeq& s = seqs[i];
      const Request* r = s.req;
      Samples& out = samples[i];
      out.tokens.clear();
      out.rows.clear();
      out.nodes.clear();
      if (!s.samples || static_cast<int>(r->output.size()) >= r->params.max_tokens) continue;
      // Verification: sample at the root, then move to the draft child holding that token (if
      // any) and sample there, and so on. Every token is drawn exactly as plain decoding draws it
      // at that position, so the output is the same with or without a draft.
      const int draft_size = s.draft.size();
      int row = s.first_logit + s.num_logits - 1 - draft_size;  // the root's logits
      int node = -1;
      for (;;) {
        const float* lg = logits.data() + static_cast<int64_t>(row) * vocab;
        const int32_t tok = sample_token(lg, vocab, r->params, r->seed, r->output.size() + out.tokens.size(), &probs);
        out.tokens.push_back(tok);
        out.rows.push_back(row);
        out.nodes.push_back(node);
        int next = -1;
        for (int c = node + 1; c < draft_size; ++c)
          if (s.draft.parents[c] == node && s.draft.tokens[c] == tok) {
            next = c;
            break;
          }
        if (next < 0) break;
        node = next;
        row = s.first_logit + s.num_logits - draft_size + node;
      }
    }
  });
}

void Engine::Impl::process(size_t i, std::vector<RequestOutput>* outs) {
  const ScheduledSeq& s = seqs[i];
  Request* r = s.req;
  const int vocab = info.vocab_size;
  const int np = static_cast<int>(r->prompt.size());
  RequestOutput out;
  out.request_id = r->id;
  int row = s.first_logit;
  // Prompt log-probabilities: the row at position p scores prompt token p + 1.
  if (r->wants_prompt_logprobs()) {
    if (s.first_token == 0) r->prompt_logprobs.emplace_back();  // position 0 has no prediction
    for (int pos = s.first_token; pos < s.first_token + s.num_tokens && pos + 1 < np; ++pos, ++row) {
      TokenLogprobs lp;
      top_logprobs(logits.data() + static_cast<int64_t>(row) * vocab, vocab, r->params.prompt_logprobs,
                   r->prompt[pos + 1], &lp);
      r->prompt_logprobs.push_back(std::move(lp));
    }
    if (s.first_token + s.num_tokens >= np) {
      out.prompt_logprobs = std::move(r->prompt_logprobs);
      r->prompt_logprobs_done = true;
    }
  }

  FinishReason finish = FinishReason::kNone;
  int appended = 0;
  if (s.samples && static_cast<int>(r->output.size()) >= r->params.max_tokens) {
    finish = FinishReason::kLength;  // max_tokens == 0: the prompt was only scored
  } else if (s.samples) {
    const Samples& got = samples[i];
    const auto now = Clock::now();
    if (r->output.empty()) r->first_token_time = now;
    r->last_token_time = now;
    for (size_t k = 0; k < got.tokens.size() && finish == FinishReason::kNone; ++k) {
      const int32_t tok = got.tokens[k];
      out.new_token_ids.push_back(tok);
      if (r->params.logprobs >= 0) {
        out.new_logprobs.emplace_back();
        top_logprobs(logits.data() + static_cast<int64_t>(got.rows[k]) * vocab, vocab, r->params.logprobs, tok,
                     &out.new_logprobs.back());
      }
      finish = scheduler->append_token(r, tok);
      ++appended;
    }
    ++r->num_steps;
  }
  // K/V: every token of a plain step; with a draft, the root and the accepted nodes, whose K/V
  // moves from the node's slot to its position's (increasing depth, so no source is overwritten
  // before it is read).
  int computed = s.num_tokens;
  if (s.draft.size() > 0) {
    const int accepted = std::max(0, appended - 1);
    const int root = s.first_token + s.num_tokens - 1;
    for (int k = 0; k < accepted; ++k) {
      const int node = samples[i].nodes[k + 1];
      const int64_t src = scheduler->slot(r, root + 1 + node), dst = scheduler->slot(r, root + 1 + k);
      if (src != dst) cache->copy_slot(src, dst);
    }
    computed += accepted;
    r->num_draft_tokens += s.draft.size();
    r->num_accepted_draft_tokens += accepted;
    total_draft_tokens += s.draft.size();
    total_accepted_draft_tokens += accepted;
    scheduler->on_verified(s, samples[i].nodes.data() + 1, accepted);
  }
  scheduler->on_computed(s, computed);
  if (finish != FinishReason::kNone) {
    RequestOutput done = finished_output(scheduler->finish(r->id, finish));  // r is gone after this
    out.finished = true;
    out.finish_reason = finish;
    out.metrics = done.metrics;
  }
  if (out.finished || !out.new_token_ids.empty() || out.prompt_logprobs.has_value()) outs->push_back(std::move(out));
}

std::vector<RequestOutput> Engine::step() {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> step_lock(m.step_mu);
  const auto t0 = Clock::now();
  m.apply_intake();
  std::vector<RequestOutput> outs;
  const auto s0 = Clock::now();
  m.scheduler->schedule(&m.plan, &m.seqs, &m.failed);
  const double schedule_s = std::chrono::duration<double>(Clock::now() - s0).count();
  for (auto& r : m.failed) outs.push_back(m.finished_output(std::move(r)));
  m.failed.clear();
  m.release_kv();  // before the pass: it may write blocks preempted requests held
  double forward_s = 0;
  if (m.plan.num_tokens() > 0) {
    const auto f0 = Clock::now();
    m.model->forward(m.plan, *m.cache, *m.pool, &m.logits);
    forward_s = std::chrono::duration<double>(Clock::now() - f0).count();
    m.sample_all();
    for (size_t i = 0; i < m.seqs.size(); ++i) m.process(i, &outs);
  }
  m.apply_intake();  // aborts that arrived during the forward pass
  m.release_kv();
  m.publish();
  std::lock_guard<std::mutex> lock(m.intake_mu);
  if (!m.pending.empty()) {
    for (auto& o : m.pending) outs.push_back(std::move(o));
    m.pending.clear();
  }
  if (m.plan.num_tokens() > 0) {
    const double step_s = std::chrono::duration<double>(Clock::now() - t0).count();
    const bool after_idle = t0 - m.last_step_end >= Impl::kIdleGap;
    if (m.last_step_observable && !after_idle)  // the model predicts steps without their lookups
      m.scheduler->observe_step(m.last_step_features,
                                std::chrono::duration<double>(t0 - m.last_step_start).count() - m.last_step_lookup_s,
                                m.last_step_tokens);
    m.last_step_features = step_features(m.plan);
    m.last_step_lookup_s = m.scheduler->last_lookup_seconds();
    m.last_step_start = t0;
    m.last_step_observable = !after_idle;
    ++m.counters.num_steps;
    m.counters.step_time_s += step_s;
    m.counters.forward_time_s += forward_s;
    m.counters.schedule_time_s += schedule_s;
  } else {
    m.last_step_observable = false;
  }
  m.last_step_tokens = 0;
  for (const auto& o : outs) m.last_step_tokens += static_cast<double>(o.new_token_ids.size());
  m.counters.num_generated_tokens += static_cast<uint64_t>(m.last_step_tokens);
  m.last_step_end = Clock::now();
  return outs;
}

void Engine::abort(RequestId id) {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.intake_mu);
    m.abort_ids.push_back(id);
  }
  // Idle engine: free everything now. Otherwise the running step applies it when its forward ends.
  std::unique_lock<std::mutex> step_lock(m.step_mu, std::try_to_lock);
  if (step_lock.owns_lock()) {
    m.apply_intake();
    m.publish();
  }
}

bool Engine::has_unfinished_requests() const {
  std::lock_guard<std::mutex> lock(impl_->intake_mu);
  return impl_->num_active > 0 || !impl_->new_requests.empty() || !impl_->pending.empty();
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(impl_->intake_mu);
  EngineStats s = impl_->counters;
  s.num_waiting += static_cast<int>(impl_->new_requests.size());
  s.block_size = impl_->config.block_size;
  return s;
}

const ModelInfo& Engine::model_info() const { return impl_->info; }
const EngineConfig& Engine::config() const { return impl_->config; }

void Engine::save_quantized(const std::string& out_dir) const {
  namespace fs = std::filesystem;
  Impl& m = *impl_;  // the weights are only read; the lock keeps a step from running meanwhile
  std::lock_guard<std::mutex> step_lock(m.step_mu);
  ACCEL_CHECK(m.config.quantization != "none", InvalidArgument)
      << "save_quantized: the model is not quantized (quantization='none'); nothing to save";
  const fs::path out(out_dir), src(m.config.model_path);
  ACCEL_CHECK(!(fs::exists(out) && fs::exists(src) && fs::equivalent(out, src)), InvalidArgument)
      << "save_quantized: out_dir is the model's own directory " << out_dir;
  ACCEL_CHECK(!fs::exists(out) || (fs::is_directory(out) && fs::is_empty(out)), InvalidArgument)
      << "save_quantized: " << out_dir << " exists and is not an empty directory";
  const std::vector<TensorOut> tensors = m.model->export_quantized();
  fs::create_directories(out);
  write_safetensors((out / "model.safetensors").string(), tensors, {{"format", "pt"}});

  std::ifstream in(src / "config.json");
  ACCEL_CHECK(in.good(), NotFound) << "save_quantized: cannot read " << (src / "config.json").string();
  nlohmann::ordered_json cfg = nlohmann::ordered_json::parse(in);
  const std::string& kv = m.config.kv_cache_dtype;
  const std::string act = m.config.quantization.substr(2);  // "a16", "a8" or "a4"
  const int group = m.model->config().quant ? m.model->config().quant->group_size : m.config.quant_group_size;
  nlohmann::ordered_json q = {
      {"quant_method", "accelcore"},
      {"format_version", 1},
      {"scheme", m.config.quantization + (kv == "int4" ? "kv4" : kv == "int8" ? "kv8" : "kv16")},
      {"weight_bits", 4},
      {"activations", act},
      {"kv_cache", kv},
      {"group_size", group},
  };
  if (act == "a4") {
    q["act_group"] = kA4SubGroup;
    q["a8_fraction"] = m.model->config().quant ? m.model->config().quant->a8_fraction : m.config.quant_a8_fraction;
  }
  cfg["quantization_config"] = q;
  std::ofstream cfg_out(out / "config.json");
  cfg_out << cfg.dump(2) << "\n";
  ACCEL_CHECK(cfg_out.good(), NotFound) << "save_quantized: cannot write " << (out / "config.json").string();
  for (const char* f : {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt"})
    if (fs::exists(src / f)) fs::copy_file(src / f, out / f, fs::copy_options::overwrite_existing);
}

bool cuda_compiled() { return cuda::compiled(); }
bool cuda_available() { return cuda::compiled() && cuda::device_count() > 0; }
std::string cpu_isa() { return cpu::isa_name(cpu::active_isa()); }
const char* version() { return ACCELCORE_VERSION; }

}  // namespace accelcore
