// The subset of a Hugging Face config.json that the Llama-family forward needs, parsed and
// validated once. Accepts both the transformers 4 spelling (rope_theta + rope_scaling) and the
// transformers 5 one (rope_parameters).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace accelcore {

struct RopeConfig {
  enum class Type { kDefault, kLinear, kLlama3 };
  Type type = Type::kDefault;
  double theta = 10000.0;
  double factor = 1.0;                    // linear and llama3
  double low_freq_factor = 1.0;           // llama3
  double high_freq_factor = 4.0;          // llama3
  int original_max_position_embeddings = 8192;  // llama3
};

// The quantization_config of a checkpoint written by `accelcore quantize` (quant_method
// "accelcore", format_version 1): what the packed tensors hold and how the engine runs them.
struct QuantConfig {
  std::string scheme;       // e.g. "w4a4kv4"
  std::string activations;  // "a16", "a8" or "a4" (FMPQ)
  std::string kv_cache;     // "float32", "int8" or "int4": the engine's default kv_cache_dtype
  int group_size = 0;       // weight group, a multiple of 32
  int act_group = 0;        // a4: activation sub-group (quant/q4.h kA4SubGroup)
  double a8_fraction = 0;   // a4: what the 8-bit sub-groups were chosen for (informative)
};

struct ModelConfig {
  std::string architecture;  // LlamaForCausalLM | MistralForCausalLM | Qwen2ForCausalLM
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  float rms_norm_eps = 1e-6f;
  int max_position_embeddings = 0;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  // Qwen2, or Llama with attention_bias
  bool o_bias = false;    // Llama with attention_bias
  bool mlp_bias = false;  // Llama with mlp_bias
  RopeConfig rope;
  // Per layer: 0 for full attention, otherwise the window (a query at position p sees keys at
  // positions > p - window, as transformers' sliding_window_overlay does).
  std::vector<int> sliding_window;
  std::vector<int32_t> eos_token_ids;
  std::optional<int32_t> bos_token_id;
  std::optional<QuantConfig> quant;  // a quantized checkpoint (accelcore's own format)

  int q_size() const { return num_heads * head_dim; }
  int kv_size() const { return num_kv_heads * head_dim; }
};

// Parses `config.json` text; `generation_config` (may be empty) overrides eos/bos as transformers
// does. `where` names the source in error messages. Throws FormatError / Unsupported.
ModelConfig parse_model_config(const std::string& config_json, const std::string& generation_config_json,
                               const std::string& where);

// Reads <dir>/config.json and <dir>/generation_config.json. Throws NotFound if the directory or
// config.json is missing.
ModelConfig load_model_config(const std::string& model_dir);

}  // namespace accelcore
