#include "model/model_config.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "util/check.h"

namespace accelcore {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

class Reader {
 public:
  Reader(const json& j, const std::string& where) : j_(j), where_(where) {}

  bool has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }

  int get_int(const char* key, std::optional<int> def = std::nullopt) const {
    if (!has(key)) {
      ACCEL_CHECK(def.has_value(), FormatError) << where_ << ": missing required field '" << key << "'";
      return *def;
    }
    const json& v = j_[key];
    ACCEL_CHECK(v.is_number_integer(), FormatError)
        << where_ << ": field '" << key << "' must be an integer, got " << v.dump();
    int64_t x = v.get<int64_t>();
    ACCEL_CHECK(x >= 0 && x <= INT32_MAX, FormatError)
        << where_ << ": field '" << key << "' is out of range: " << x;
    return static_cast<int>(x);
  }

  double get_double(const char* key, std::optional<double> def = std::nullopt) const {
    if (!has(key)) {
      ACCEL_CHECK(def.has_value(), FormatError) << where_ << ": missing required field '" << key << "'";
      return *def;
    }
    const json& v = j_[key];
    ACCEL_CHECK(v.is_number(), FormatError)
        << where_ << ": field '" << key << "' must be a number, got " << v.dump();
    return v.get<double>();
  }

  bool get_bool(const char* key, bool def) const {
    if (!has(key)) return def;
    ACCEL_CHECK(j_[key].is_boolean(), FormatError) << where_ << ": field '" << key << "' must be a boolean";
    return j_[key].get<bool>();
  }

  std::string get_string(const char* key, const std::string& def) const {
    if (!has(key)) return def;
    ACCEL_CHECK(j_[key].is_string(), FormatError) << where_ << ": field '" << key << "' must be a string";
    return j_[key].get<std::string>();
  }

 private:
  const json& j_;
  const std::string& where_;
};

json parse_json(const std::string& text, const std::string& where) {
  try {
    json j = json::parse(text);
    ACCEL_CHECK(j.is_object(), FormatError) << where << " is not a JSON object";
    return j;
  } catch (const json::exception& e) {
    ACCEL_THROW(FormatError) << where << " is not valid JSON: " << e.what();
  }
}

// eos_token_id may be an int or a list of ints.
std::vector<int32_t> token_list(const json& v, const std::string& where) {
  std::vector<int32_t> out;
  if (v.is_number_integer()) {
    out.push_back(v.get<int32_t>());
  } else if (v.is_array()) {
    for (const json& e : v) {
      ACCEL_CHECK(e.is_number_integer(), FormatError) << where << ": eos_token_id entries must be integers";
      out.push_back(e.get<int32_t>());
    }
  } else if (!v.is_null()) {
    ACCEL_THROW(FormatError) << where << ": eos_token_id must be an integer or a list";
  }
  return out;
}

RopeConfig parse_rope(const json& j, const std::string& where) {
  RopeConfig rope;
  Reader top(j, where);
  rope.theta = top.get_double("rope_theta", 10000.0);
  const json* params = nullptr;
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) params = &j["rope_parameters"];
  else if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) params = &j["rope_scaling"];
  if (params == nullptr) return rope;
  Reader p(*params, where);
  rope.theta = p.get_double("rope_theta", rope.theta);
  std::string type = p.get_string("rope_type", p.get_string("type", "default"));
  if (type == "default") {
    rope.type = RopeConfig::Type::kDefault;
  } else if (type == "linear") {
    rope.type = RopeConfig::Type::kLinear;
    rope.factor = p.get_double("factor");
  } else if (type == "llama3") {
    rope.type = RopeConfig::Type::kLlama3;
    rope.factor = p.get_double("factor");
    rope.low_freq_factor = p.get_double("low_freq_factor");
    rope.high_freq_factor = p.get_double("high_freq_factor");
    rope.original_max_position_embeddings = p.get_int("original_max_position_embeddings");
    ACCEL_CHECK(rope.high_freq_factor != rope.low_freq_factor, FormatError)
        << where << ": llama3 rope needs high_freq_factor != low_freq_factor";
  } else {
    ACCEL_THROW(Unsupported) << where << ": rope type '" << type
                             << "' is not supported (supported: default, linear, llama3)";
  }
  ACCEL_CHECK(rope.factor > 0, FormatError) << where << ": rope factor must be positive";
  ACCEL_CHECK(rope.theta > 0, FormatError) << where << ": rope_theta must be positive";
  return rope;
}

}  // namespace

ModelConfig parse_model_config(const std::string& config_text, const std::string& gen_text,
                               const std::string& where) {
  json j = parse_json(config_text, where);
  Reader r(j, where);
  ModelConfig c;
  ACCEL_CHECK(j.contains("architectures") && j["architectures"].is_array() &&
                  !j["architectures"].empty() && j["architectures"][0].is_string(),
              FormatError)
      << where << ": missing 'architectures'";
  c.architecture = j["architectures"][0].get<std::string>();
  const bool llama = c.architecture == "LlamaForCausalLM";
  const bool mistral = c.architecture == "MistralForCausalLM";
  const bool qwen2 = c.architecture == "Qwen2ForCausalLM";
  ACCEL_CHECK(llama || mistral || qwen2, Unsupported)
      << where << ": unsupported architecture '" << c.architecture
      << "' (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)";

  c.vocab_size = r.get_int("vocab_size");
  c.hidden_size = r.get_int("hidden_size");
  c.intermediate_size = r.get_int("intermediate_size");
  c.num_layers = r.get_int("num_hidden_layers");
  c.num_heads = r.get_int("num_attention_heads");
  c.num_kv_heads = r.get_int("num_key_value_heads", c.num_heads);
  ACCEL_CHECK(c.vocab_size > 0 && c.hidden_size > 0 && c.intermediate_size > 0 && c.num_layers > 0 &&
                  c.num_heads > 0 && c.num_kv_heads > 0,
              FormatError)
      << where << ": model sizes must be positive";
  ACCEL_CHECK(c.num_heads % c.num_kv_heads == 0, FormatError)
      << where << ": num_attention_heads (" << c.num_heads << ") is not a multiple of num_key_value_heads ("
      << c.num_kv_heads << ")";
  if (r.has("head_dim")) {
    c.head_dim = r.get_int("head_dim");
  } else {
    ACCEL_CHECK(c.hidden_size % c.num_heads == 0, FormatError)
        << where << ": hidden_size is not a multiple of num_attention_heads and head_dim is not given";
    c.head_dim = c.hidden_size / c.num_heads;
  }
  ACCEL_CHECK(c.head_dim > 0 && c.head_dim % 2 == 0, FormatError)
      << where << ": head_dim must be a positive even number, got " << c.head_dim;
  c.rms_norm_eps = static_cast<float>(r.get_double("rms_norm_eps", 1e-6));
  c.max_position_embeddings = r.get_int("max_position_embeddings", 2048);
  ACCEL_CHECK(c.max_position_embeddings > 0, FormatError) << where << ": max_position_embeddings must be positive";
  c.tie_word_embeddings = r.get_bool("tie_word_embeddings", false);
  std::string act = r.get_string("hidden_act", "silu");
  ACCEL_CHECK(act == "silu", Unsupported) << where << ": hidden_act '" << act << "' is not supported (only silu)";
  ACCEL_CHECK(r.get_double("partial_rotary_factor", 1.0) == 1.0, Unsupported)
      << where << ": partial_rotary_factor != 1 is not supported";

  if (qwen2) {
    c.qkv_bias = true;
  } else {
    c.qkv_bias = c.o_bias = r.get_bool("attention_bias", false);
    c.mlp_bias = r.get_bool("mlp_bias", false);
  }
  c.rope = parse_rope(j, where);

  // Sliding windows: layer_types (transformers 5) wins; otherwise Mistral applies its window to
  // every layer and Qwen2 to layers >= max_window_layers when use_sliding_window is set.
  c.sliding_window.assign(c.num_layers, 0);
  // Absent keys take transformers' defaults (Qwen2: window 4096 from layer 28 on).
  int window = r.has("sliding_window") ? r.get_int("sliding_window") : (qwen2 ? 4096 : 0);
  if (qwen2 && !r.get_bool("use_sliding_window", false)) window = 0;
  if (window > 0) {
    if (j.contains("layer_types") && j["layer_types"].is_array()) {
      const json& lt = j["layer_types"];
      ACCEL_CHECK(static_cast<int>(lt.size()) == c.num_layers, FormatError)
          << where << ": layer_types has " << lt.size() << " entries for " << c.num_layers << " layers";
      for (int i = 0; i < c.num_layers; ++i) {
        ACCEL_CHECK(lt[i].is_string(), FormatError) << where << ": layer_types entries must be strings";
        std::string t = lt[i].get<std::string>();
        ACCEL_CHECK(t == "full_attention" || t == "sliding_attention", Unsupported)
            << where << ": layer type '" << t << "' is not supported";
        if (t == "sliding_attention") c.sliding_window[i] = window;
      }
    } else {
      int first = qwen2 ? r.get_int("max_window_layers", 28) : 0;
      for (int i = first; i < c.num_layers; ++i) c.sliding_window[i] = window;
    }
  }

  if (j.contains("quantization_config") && !j["quantization_config"].is_null()) {
    const json& qj = j["quantization_config"];
    const std::string qw = where + ": quantization_config";
    ACCEL_CHECK(qj.is_object(), FormatError) << qw << " must be an object";
    Reader q(qj, qw);
    const std::string method = q.get_string("quant_method", "");
    ACCEL_CHECK(method == "accelcore", Unsupported)
        << qw << ".quant_method is '" << method << "': accelcore reads only its own quantized checkpoints "
        << "(written by `accelcore quantize`); give it the float checkpoint and a quantization option instead";
    ACCEL_CHECK(q.get_int("format_version") == 1, FormatError) << qw << ".format_version must be 1";
    ACCEL_CHECK(q.get_int("weight_bits") == 4, FormatError) << qw << ".weight_bits must be 4";
    QuantConfig qc;
    qc.scheme = q.get_string("scheme", "");
    qc.activations = q.get_string("activations", "");
    ACCEL_CHECK(qc.activations == "a16" || qc.activations == "a8" || qc.activations == "a4", FormatError)
        << qw << ".activations must be 'a16', 'a8' or 'a4', got '" << qc.activations << "'";
    qc.kv_cache = q.get_string("kv_cache", "float32");
    ACCEL_CHECK(qc.kv_cache == "float32" || qc.kv_cache == "int8" || qc.kv_cache == "int4", FormatError)
        << qw << ".kv_cache must be 'float32', 'int8' or 'int4', got '" << qc.kv_cache << "'";
    qc.group_size = q.get_int("group_size");
    ACCEL_CHECK(qc.group_size >= 32 && qc.group_size % 32 == 0 && qc.group_size <= 4096, FormatError)
        << qw << ".group_size must be a multiple of 32 in [32, 4096], got " << qc.group_size;
    if (qc.activations == "a4") {
      qc.act_group = q.get_int("act_group");
      qc.a8_fraction = q.get_double("a8_fraction", 0.0);
    }
    c.quant = qc;
  }

  if (j.contains("eos_token_id")) c.eos_token_ids = token_list(j["eos_token_id"], where);
  if (r.has("bos_token_id")) c.bos_token_id = r.get_int("bos_token_id");
  if (!gen_text.empty()) {
    json g = parse_json(gen_text, "generation_config.json");
    if (g.contains("eos_token_id") && !g["eos_token_id"].is_null())
      c.eos_token_ids = token_list(g["eos_token_id"], "generation_config.json");
    Reader gr(g, "generation_config.json");
    if (gr.has("bos_token_id")) c.bos_token_id = gr.get_int("bos_token_id");
  }
  return c;
}

static std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  ACCEL_CHECK(in.good(), NotFound) << "cannot read " << p.string();
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

ModelConfig load_model_config(const std::string& model_dir) {
  fs::path dir(model_dir);
  ACCEL_CHECK(fs::is_directory(dir), NotFound) << "model directory not found: " << model_dir;
  fs::path cfg = dir / "config.json";
  ACCEL_CHECK(fs::exists(cfg), NotFound) << "no config.json in model directory " << model_dir;
  fs::path gen = dir / "generation_config.json";
  return parse_model_config(read_file(cfg), fs::exists(gen) ? read_file(gen) : "", cfg.string());
}

}  // namespace accelcore
