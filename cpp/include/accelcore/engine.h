// accelcore::Engine: the public entry point. Add requests, run steps, read outputs.
//
// Thread safety: all methods may be called from any thread. add_request and abort never wait for a
// forward pass: they queue their change, and the next step applies it (an abort while the engine
// is idle takes effect at once). One thread at a time runs step().
#pragma once

#include <accelcore/config.h>
#include <accelcore/errors.h>
#include <accelcore/sampling.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace accelcore {

using RequestId = uint64_t;

// Log-probabilities at one position: the top-k tokens and the token actually taken.
using TokenLogprobs = std::map<int32_t, float>;

enum class FinishReason { kNone, kStop, kLength, kAbort, kError };
// "stop" | "length" | "abort" | "error" | "" for kNone
const char* finish_reason_name(FinishReason r);

// Timings of a finished request (seconds, steady clock).
struct RequestMetrics {
  double ttft_s = 0;   // arrival to first generated token
  double tpot_s = 0;   // mean time per output token after the first (0 with fewer than 2 tokens)
  double e2e_s = 0;    // arrival to finish
  int num_cached_tokens = 0;  // prompt tokens served from the prefix cache
  int num_preemptions = 0;
  int num_steps = 0;          // forward passes that produced its tokens (the last prefill pass included)
  int num_draft_tokens = 0;   // draft nodes verified for it
  int num_accepted_draft_tokens = 0;
};

// What one step produced for one request: only the new tokens since the previous output.
struct RequestOutput {
  RequestId request_id = 0;
  std::vector<int32_t> new_token_ids;
  std::vector<TokenLogprobs> new_logprobs;  // one per new token when SamplingParams::logprobs >= 0
  // Set once, on the step that finished the prompt: one entry per prompt token (the first is empty).
  std::optional<std::vector<TokenLogprobs>> prompt_logprobs;
  bool finished = false;
  FinishReason finish_reason = FinishReason::kNone;
  std::string error;       // set with FinishReason::kError
  RequestMetrics metrics;  // set when finished
};

struct ModelInfo {
  std::string architecture;
  int vocab_size = 0;
  int hidden_size = 0;
  int num_layers = 0;
  int max_model_len = 0;
  std::vector<int32_t> eos_token_ids;
  std::optional<int32_t> bos_token_id;
};

struct EngineStats {
  int num_running = 0;
  int num_waiting = 0;
  int num_free_blocks = 0;    // includes cached blocks no request holds (evicted on demand)
  int num_total_blocks = 0;
  int num_cached_blocks = 0;  // blocks registered in the prefix cache
  int block_size = 0;
  // KV memory: one block across all layers (K and V, scales included), and the whole cache
  // (a quantized one's float staging included: the blocks being filled, num_staged_blocks).
  uint64_t kv_block_bytes = 0;
  uint64_t kv_cache_bytes = 0;
  int num_staged_blocks = 0;
  uint64_t num_steps = 0;
  uint64_t num_generated_tokens = 0;
  uint64_t num_prompt_tokens = 0;
  uint64_t num_preemptions = 0;
  uint64_t prefix_cache_hit_tokens = 0;
  uint64_t prefix_cache_query_tokens = 0;
  double step_time_s = 0;      // total time inside step()
  double forward_time_s = 0;   // of which the model's forward pass
  double schedule_time_s = 0;  // of which planning the batch (Scheduler::schedule)
  // Speculation (empty policy: off).
  std::string spec_policy;
  uint64_t num_draft_tokens = 0;           // draft nodes verified
  uint64_t num_accepted_draft_tokens = 0;  // of which accepted
  int last_step_draft_tokens = 0;          // draft nodes in the last step
  int last_step_drafted_seqs = 0;          // requests with a draft in the last step
  // Global acceptance rate by draft depth 1, 2, ..., of greedy requests and of sampled ones
  // (learned apart: their drafts are accepted at very different rates).
  std::vector<double> spec_acceptance, spec_acceptance_sampled;
  // SmartSpec's step-time model, seconds: c0 + c_tok * tokens + c_kv * KV tokens read + c_logit *
  // rows with logits (sampled rows and draft nodes) + c_draft * seqs with a draft; lookups apart.
  std::vector<double> step_time_coefficients;
  double spec_lookup_cost_s = 0;  // SmartSpec's measured cost of one draft lookup (not in the fit)
  // SmartSpec's calibration: the acceptance it uses for estimates of 0.05, 0.15, ..., 0.95 (at
  // first those very values; then what drafts so estimated were measured to be accepted at), for
  // greedy requests and for sampled ones.
  std::vector<double> spec_calibration, spec_calibration_sampled;
  // SmartSpec's goodput guard: tokens generated per second of steps without and with drafts, per
  // range of sequences in the step (1, 2-3, 4-7, ..., 128+; 0: not measured).
  std::vector<double> spec_guard_plain_tok_s, spec_guard_drafted_tok_s;
};

class Engine {
 public:
  // Loads the model. Throws NotFound, FormatError, Unsupported or InvalidArgument.
  explicit Engine(const EngineConfig& config);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues a request; validates it first (throws InvalidArgument), so a bad request never
  // reaches a step.
  RequestId add_request(std::vector<int32_t> prompt_token_ids, const SamplingParams& params);

  // Runs one forward pass over the scheduled batch; returns an output for every request that
  // produced tokens or finished in this step.
  std::vector<RequestOutput> step();

  // Ends a request wherever it is and frees all it holds (at once when no step is running, else
  // right after that step); a later step() reports it with "abort". Unknown ids are ignored.
  void abort(RequestId id);

  bool has_unfinished_requests() const;
  EngineStats stats() const;
  const ModelInfo& model_info() const;
  const EngineConfig& config() const;
  // Writes the quantized model (a 4-bit quantization option, or a quantized checkpoint loaded) to
  // out_dir as a Hugging Face style checkpoint that Engine loads: model.safetensors with the
  // packed tensors, config.json with a quantization_config recording the scheme (and the KV
  // cache dtype as the default for engines that load it), the tokenizer and generation config
  // copied. Throws InvalidArgument for a float model or out_dir == the model's directory.
  void save_quantized(const std::string& out_dir) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Backends compiled into this build and usable on this machine.
bool cuda_available();         // compiled with CUDA and a device is present
bool cuda_compiled();          // compiled with CUDA
std::string cpu_isa();         // the SIMD level the CPU kernels use: "avx512", "avx2" or "scalar"
const char* version();

}  // namespace accelcore
