// Engine construction options.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace accelcore {

struct EngineConfig {
  std::string model_path;           // a Hugging Face model directory
  std::string dtype = "float32";    // compute dtype; "auto" picks float32 on the CPU
  std::string device = "cpu";       // "cpu" or "cuda"
  int num_threads = 0;              // 0: all cores available to the process
  int block_size = 16;              // tokens per KV block
  int num_kv_blocks = 0;            // 0: derived from kv_cache_memory_bytes
  int64_t kv_cache_memory_bytes = 0;  // 0: enough for max_num_seqs full-length requests, capped at 2 GiB
  int max_num_seqs = 256;           // requests in one step at most
  int max_num_batched_tokens = 2048;  // tokens in one step at most (prompt chunks + decode tokens)
  int max_model_len = 0;            // 0: the model's max_position_embeddings
  bool enable_prefix_caching = false;  // reuse the KV of full blocks shared with earlier requests
  uint64_t seed = 0;                // seeds requests that bring no seed of their own
  // Speculation: "off", or "lookahead" (model-free multi-branch drafts from a token trie of the
  // request's own tokens and of earlier outputs, verified losslessly in the same forward pass).
  std::string speculation = "off";
  // How many draft nodes each request gets per step: "smartspec" (the number, 0 or more, that
  // maximises expected tokens per second, from measured acceptance and a fitted step-time model),
  // "fixed" (always spec_max_draft, as the token budget allows) or "off" (none).
  std::string spec_policy = "smartspec";
  int spec_max_draft = 8;    // draft tree nodes per request and step, at most
  int spec_max_depth = 8;    // deepest draft path
  // Longest context suffix matched in the trie. Its windows are max_match + max_depth tokens, and
  // indexing costs that many node updates per token; longer matches drafted no better on
  // stories260K (3.43 tokens per pass at 32, 3.46 at 8: benchmarks/speculation.py).
  int spec_max_match = 8;
  int spec_memory_mb = 64;   // bound on the global draft store
  // Weight quantization applied at load (a quantized checkpoint, written by Engine::save_quantized
  // or `accelcore quantize`, is run as stored; "none" or its own scheme then): "none", "w4a8" (the linear layers' weights to 4 bits,
  // asymmetric groups of quant_group_size input channels; their input activations to 8 bits per
  // token and group at run time), "w4a16" (the same weights, float activations) or "w4a4" (FMPQ:
  // activations in 4 bits but for the outlier channels, needs quant_calibration). The embedding
  // and the head stay in float32; the KV cache is kv_cache_dtype.
  std::string quantization = "none";
  int quant_group_size = 128;  // a multiple of 32
  // w4a4 (COMET's FMPQ): the share of each linear's input channels (its largest, by calibration
  // magnitude, in sub-groups of 8) whose activations stay 8-bit; the rest are 4-bit. Measured on
  // stories260K (w4a4kv4, the protocol): 0.25 gives top-1 85.1% / KL 0.092, 0.4 gives
  // 86.1% / 0.086 (the bar: 85.5% / 0.090).
  double quant_a8_fraction = 0.4;
  // KV cache storage: "auto", "float32", "int8" or "int4". The quantized forms keep keys per
  // channel over each full block of block_size tokens and values per token and head: 4-bit KV
  // costs 30% of float16's bytes at head_dim 64. The blocks being filled (about one per running
  // request, and draft blocks) stay float32 in a staging pool that grows on demand outside
  // kv_cache_memory_bytes (stats: kv_cache_bytes, num_staged_blocks). Speculation then drafts at
  // most to the end of the block after the last token. "auto": the quantized checkpoint's
  // kv_cache, else float32.
  std::string kv_cache_dtype = "auto";
  // Calibration token sequences for the 4-bit schemes: when given, the weights are rounded by GPTQ against
  // the Hessians of the layers' inputs on these sequences (the float model runs them at load);
  // otherwise by round to nearest with a clip search.
  std::vector<std::vector<int32_t>> quant_calibration;
  // How weights are rounded with calibration: "gptq", or "rtn" (round to nearest with a clip
  // search; the calibration then only orders w4a4's channels: fast for large models).
  std::string quant_method = "gptq";
  // Called after each layer is quantized, with (layers done, layers in all): a progress display.
  std::function<void(int, int)> quant_progress;

  void validate() const;  // throws InvalidArgument
};

}  // namespace accelcore
