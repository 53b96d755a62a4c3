// config.json parsing for the supported architectures (Llama, Mistral, Qwen2): sizes, head_dim,
// GQA, RoPE in both spellings, sliding windows, eos/bos overrides from generation_config.json,
// errors; and rope_inv_freq against an independent double-precision transformers formula.
#include <accelcore/errors.h>
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/llama.h"
#include "model/model_config.h"
#include "test_util.h"

namespace accelcore {
namespace {

using json = nlohmann::json;

// Llama-3.1-8B's config.json (abridged to what matters, values as published).
json llama31_8b() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": false,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": false,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
      "factor": 8.0,
      "high_freq_factor": 4.0,
      "low_freq_factor": 1.0,
      "original_max_position_embeddings": 8192,
      "rope_type": "llama3"
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": false,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256
  })");
}

// stories260K (Llama 2 architecture in miniature).
json stories() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 172, "num_hidden_layers": 5, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 8, "hidden_act": "silu", "max_position_embeddings": 512,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": null, "attention_bias": false,
    "mlp_bias": false, "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2})");
}

// Mistral-7B-v0.1.
json mistral() {
  return json::parse(R"({
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": false, "vocab_size": 32000})");
}

// Qwen2-0.5B-style (small number of layers so per-layer windows are easy to check).
json qwen2() {
  return json::parse(R"({
    "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 2, "num_attention_heads": 14,
    "num_hidden_layers": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": true,
    "use_sliding_window": false, "vocab_size": 151936})");
}

ModelConfig parse(const json& cfg, const std::string& gen = "") { return parse_model_config(cfg.dump(), gen, "config.json"); }

TEST(ModelConfig, ParsesStories) {
  ModelConfig c = parse(stories());
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 172);
  EXPECT_EQ(c.num_layers, 5);
  EXPECT_EQ(c.num_heads, 8);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.q_size(), 64);
  EXPECT_EQ(c.kv_size(), 32);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-5f);
  EXPECT_EQ(c.max_position_embeddings, 512);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_FALSE(c.mlp_bias);
  EXPECT_EQ(c.rope.type, RopeConfig::Type::kDefault);
  EXPECT_DOUBLE_EQ(c.rope.theta, 10000.0);
  EXPECT_EQ(c.sliding_window, std::vector<int>(5, 0));
  EXPECT_EQ(c.eos_token_ids, std::vector<int32_t>{2});
  ASSERT_TRUE(c.bos_token_id.has_value());
  EXPECT_EQ(*c.bos_token_id, 1);
}

TEST(ModelConfig, ParsesLlama31WithLlama3RopeOldStyle) {
  ModelConfig c = parse(llama31_8b());
  EXPECT_EQ(c.head_dim, 128);  // derived: 4096 / 32
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.q_size(), 4096);
  EXPECT_EQ(c.kv_size(), 1024);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.rope.type, RopeConfig::Type::kLlama3);
  EXPECT_DOUBLE_EQ(c.rope.theta, 500000.0);
  EXPECT_DOUBLE_EQ(c.rope.factor, 8.0);
  EXPECT_DOUBLE_EQ(c.rope.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c.rope.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 8192);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{128001, 128008, 128009}));
  EXPECT_EQ(c.sliding_window, std::vector<int>(32, 0));
}

TEST(ModelConfig, RopeNewStyleRopeParameters) {
  // transformers 5: rope_theta moves inside rope_parameters.
  json j = llama31_8b();
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "llama3"}, {"rope_theta", 500000.0}, {"factor", 32.0},
                          {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                          {"original_max_position_embeddings", 8192}};
  ModelConfig c = parse(j);
  EXPECT_EQ(c.rope.type, RopeConfig::Type::kLlama3);
  EXPECT_DOUBLE_EQ(c.rope.theta, 500000.0);
  EXPECT_DOUBLE_EQ(c.rope.factor, 32.0);

  json d = stories();
  d.erase("rope_theta");
  d.erase("rope_scaling");
  d["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1e6}};
  ModelConfig cd = parse(d);
  EXPECT_EQ(cd.rope.type, RopeConfig::Type::kDefault);
  EXPECT_DOUBLE_EQ(cd.rope.theta, 1e6);

  // No rope fields at all: the transformers default base.
  d.erase("rope_parameters");
  EXPECT_DOUBLE_EQ(parse(d).rope.theta, 10000.0);
}

TEST(ModelConfig, RopeLinearBothSpellings) {
  json j = stories();
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};  // the old key name
  ModelConfig c = parse(j);
  EXPECT_EQ(c.rope.type, RopeConfig::Type::kLinear);
  EXPECT_DOUBLE_EQ(c.rope.factor, 4.0);
  EXPECT_DOUBLE_EQ(c.rope.theta, 10000.0);

  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}};
  c = parse(j);
  EXPECT_EQ(c.rope.type, RopeConfig::Type::kLinear);
  EXPECT_DOUBLE_EQ(c.rope.factor, 2.0);
}

TEST(ModelConfig, RopeErrors) {
  json j = stories();
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  EXPECT_THROW(parse(j), Unsupported);
  j["rope_scaling"] = {{"rope_type", "linear"}};  // factor missing
  EXPECT_THROW(parse(j), FormatError);
  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", -1.0}};
  EXPECT_THROW(parse(j), FormatError);
  json l = llama31_8b();
  l["rope_scaling"].erase("low_freq_factor");
  EXPECT_THROW(parse(l), FormatError);
  l = llama31_8b();
  l["rope_scaling"]["high_freq_factor"] = 1.0;  // equal to low: division by zero in the formula
  EXPECT_THROW(parse(l), FormatError);
}

TEST(ModelConfig, HeadDimGivenVersusDerived) {
  json j = stories();
  j["head_dim"] = 16;  // given and different from hidden / heads (as in Qwen3, Gemma)
  ModelConfig c = parse(j);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.q_size(), 128);
  EXPECT_EQ(c.kv_size(), 64);

  j.erase("head_dim");
  EXPECT_EQ(parse(j).head_dim, 8);  // 64 / 8

  j["num_attention_heads"] = 6;  // 64 is not a multiple of 6 and no head_dim
  j["num_key_value_heads"] = 3;
  EXPECT_THROW(parse(j), FormatError);
  j["head_dim"] = 10;  // now explicit: fine
  EXPECT_EQ(parse(j).head_dim, 10);
  j["head_dim"] = 7;  // RoPE needs an even head_dim
  EXPECT_THROW(parse(j), FormatError);
}

TEST(ModelConfig, GroupedQueryAttention) {
  json j = stories();
  j.erase("num_key_value_heads");  // absent: multi-head attention
  EXPECT_EQ(parse(j).num_kv_heads, 8);
  j["num_key_value_heads"] = 1;  // multi-query
  EXPECT_EQ(parse(j).num_kv_heads, 1);
  j["num_key_value_heads"] = 3;  // 8 heads cannot be split into 3 groups
  EXPECT_THROW(parse(j), FormatError);
  j["num_key_value_heads"] = 0;
  EXPECT_THROW(parse(j), FormatError);
}

TEST(ModelConfig, AttentionAndMlpBias) {
  json j = stories();
  j["attention_bias"] = true;
  j["mlp_bias"] = true;
  ModelConfig c = parse(j);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_TRUE(c.o_bias);
  EXPECT_TRUE(c.mlp_bias);
  // Qwen2 always has q/k/v bias and never o/mlp bias.
  ModelConfig q = parse(qwen2());
  EXPECT_TRUE(q.qkv_bias);
  EXPECT_FALSE(q.o_bias);
  EXPECT_FALSE(q.mlp_bias);
}

TEST(ModelConfig, UnsupportedArchitectureAndActivation) {
  json j = stories();
  j["architectures"] = {"GPT2LMHeadModel"};
  EXPECT_THROW(parse(j), Unsupported);
  j["architectures"] = {"MixtralForCausalLM"};
  EXPECT_THROW(parse(j), Unsupported);
  j = stories();
  j["hidden_act"] = "gelu";
  EXPECT_THROW(parse(j), Unsupported);
  j = stories();
  j["partial_rotary_factor"] = 0.5;
  EXPECT_THROW(parse(j), Unsupported);
}

TEST(ModelConfig, MissingOrMalformedFieldsAreFormatErrors) {
  for (const char* key : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "architectures"}) {
    json j = stories();
    j.erase(key);
    try {
      parse(j);
      FAIL() << "accepted a config without " << key;
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find("config.json"), std::string::npos) << e.what();
    }
    j[key] = nullptr;  // null counts as missing
    EXPECT_THROW(parse(j), FormatError) << key;
  }
  json j = stories();
  j["hidden_size"] = "64";
  EXPECT_THROW(parse(j), FormatError);
  j = stories();
  j["hidden_size"] = 64.5;
  EXPECT_THROW(parse(j), FormatError);
  j = stories();
  j["vocab_size"] = -5;
  EXPECT_THROW(parse(j), FormatError);
  j = stories();
  j["architectures"] = json::array();
  EXPECT_THROW(parse(j), FormatError);
  j = stories();
  j["tie_word_embeddings"] = "yes";
  EXPECT_THROW(parse(j), FormatError);
  j = stories();
  j["eos_token_id"] = "2";
  EXPECT_THROW(parse(j), FormatError);
  EXPECT_THROW(parse_model_config("{ not json", "", "config.json"), FormatError);
  EXPECT_THROW(parse_model_config("[1, 2]", "", "config.json"), FormatError);
  EXPECT_THROW(parse_model_config("", "", "config.json"), FormatError);
}

TEST(ModelConfig, MistralSlidingWindowAppliesToAllLayers) {
  ModelConfig c = parse(mistral());
  EXPECT_EQ(c.architecture, "MistralForCausalLM");
  EXPECT_EQ(c.sliding_window, std::vector<int>(32, 4096));
  json j = mistral();
  j["sliding_window"] = nullptr;  // Mistral v0.2+: no window
  EXPECT_EQ(parse(j).sliding_window, std::vector<int>(32, 0));
  j.erase("sliding_window");
  EXPECT_EQ(parse(j).sliding_window, std::vector<int>(32, 0));
}

TEST(ModelConfig, Qwen2SlidingWindowViaUseSlidingWindowAndMaxWindowLayers) {
  // use_sliding_window false: the window is ignored (transformers sets sliding_window = None).
  EXPECT_EQ(parse(qwen2()).sliding_window, std::vector<int>(4, 0));
  json j = qwen2();
  j["use_sliding_window"] = true;
  j["sliding_window"] = 128;
  // Layers >= max_window_layers (2) use the window.
  EXPECT_EQ(parse(j).sliding_window, (std::vector<int>{0, 0, 128, 128}));
  j["max_window_layers"] = 0;
  EXPECT_EQ(parse(j).sliding_window, (std::vector<int>{128, 128, 128, 128}));
  j["max_window_layers"] = 4;
  EXPECT_EQ(parse(j).sliding_window, (std::vector<int>{0, 0, 0, 0}));
}

TEST(ModelConfig, Qwen2SlidingWindowViaLayerTypes) {
  json j = qwen2();
  j["use_sliding_window"] = true;
  j["sliding_window"] = 64;
  // transformers 5 writes layer_types; it wins over max_window_layers.
  j["layer_types"] = {"sliding_attention", "full_attention", "sliding_attention", "full_attention"};
  EXPECT_EQ(parse(j).sliding_window, (std::vector<int>{64, 0, 64, 0}));
  j["layer_types"] = {"full_attention", "sliding_attention"};  // wrong length
  EXPECT_THROW(parse(j), FormatError);
  j["layer_types"] = {"full_attention", "chunked_attention", "full_attention", "full_attention"};
  EXPECT_THROW(parse(j), Unsupported);
}

TEST(ModelConfig, EosFromGenerationConfigOverridesConfig) {
  json gen = {{"bos_token_id", 5}, {"eos_token_id", {7, 9}}, {"do_sample", true}};
  ModelConfig c = parse(stories(), gen.dump());
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{7, 9}));
  ASSERT_TRUE(c.bos_token_id.has_value());
  EXPECT_EQ(*c.bos_token_id, 5);

  // A single integer works too.
  c = parse(llama31_8b(), R"({"eos_token_id": 128009})");
  EXPECT_EQ(c.eos_token_ids, std::vector<int32_t>{128009});
  EXPECT_EQ(*c.bos_token_id, 128000);  // not overridden

  // Absent or null in generation_config: config.json's value stays.
  EXPECT_EQ(parse(stories(), R"({"do_sample": false})").eos_token_ids, std::vector<int32_t>{2});
  EXPECT_EQ(parse(stories(), R"({"eos_token_id": null})").eos_token_ids, std::vector<int32_t>{2});
  // No eos anywhere.
  json j = stories();
  j.erase("eos_token_id");
  j.erase("bos_token_id");
  c = parse(j);
  EXPECT_TRUE(c.eos_token_ids.empty());
  EXPECT_FALSE(c.bos_token_id.has_value());

  EXPECT_THROW(parse(stories(), "not json"), FormatError);
  EXPECT_THROW(parse(stories(), R"({"eos_token_id": [1, "x"]})"), FormatError);
}

TEST(ModelConfig, LoadModelConfigFromDirectory) {
  testing::TempDir dir;
  EXPECT_THROW(load_model_config(dir.file("nope")), NotFound);
  EXPECT_THROW(load_model_config(dir.path().string()), NotFound);  // no config.json
  testing::write_bytes(dir.file("config.json"), stories().dump());
  testing::write_bytes(dir.file("generation_config.json"), R"({"eos_token_id": [2, 3]})");
  ModelConfig c = load_model_config(dir.path().string());
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{2, 3}));
}

// ---- rope_inv_freq ----

// transformers' _compute_default_rope_parameters and _compute_llama3_parameters, in double.
std::vector<double> reference_inv_freq(const RopeConfig& r, int head_dim) {
  std::vector<double> inv;
  for (int i = 0; i < head_dim; i += 2) inv.push_back(1.0 / std::pow(r.theta, static_cast<double>(i) / head_dim));
  if (r.type == RopeConfig::Type::kLinear) {
    for (double& f : inv) f /= r.factor;
  } else if (r.type == RopeConfig::Type::kLlama3) {
    const double low_freq_wavelen = r.original_max_position_embeddings / r.low_freq_factor;
    const double high_freq_wavelen = r.original_max_position_embeddings / r.high_freq_factor;
    for (double& f : inv) {
      const double wavelen = 2 * M_PI / f;
      // inv_freq_llama = where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
      double llama = wavelen > low_freq_wavelen ? f / r.factor : f;
      const double smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor) /
                            (r.high_freq_factor - r.low_freq_factor);
      const double smoothed = (1 - smooth) * llama / r.factor + smooth * llama;
      const bool is_medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
      f = is_medium ? smoothed : llama;
    }
  }
  return inv;
}

void expect_close_rel(const std::vector<float>& got, const std::vector<double>& want, double rel) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_LE(std::abs(got[i] - want[i]), rel * std::abs(want[i])) << "i=" << i << " got " << got[i] << " want " << want[i];
  }
}

TEST(RopeInvFreq, DefaultMatchesTransformers) {
  RopeConfig r;
  r.theta = 10000.0;
  expect_close_rel(rope_inv_freq(r, 8), reference_inv_freq(r, 8), 1e-6);
  r.theta = 1e6;
  expect_close_rel(rope_inv_freq(r, 128), reference_inv_freq(r, 128), 1e-6);
  // Exact first entry, and strictly decreasing.
  std::vector<float> inv = rope_inv_freq(r, 128);
  EXPECT_EQ(inv[0], 1.0f);
  for (size_t i = 1; i < inv.size(); ++i) EXPECT_LT(inv[i], inv[i - 1]);
}

TEST(RopeInvFreq, LinearDividesByFactor) {
  RopeConfig r;
  r.type = RopeConfig::Type::kLinear;
  r.factor = 4.0;
  expect_close_rel(rope_inv_freq(r, 64), reference_inv_freq(r, 64), 1e-6);
}

TEST(RopeInvFreq, Llama3MatchesTransformersFormula) {
  // Llama 3.1 parameters as parsed from its config; all three frequency bands occur at head_dim 128.
  ModelConfig c = parse(llama31_8b());
  const std::vector<float> got = rope_inv_freq(c.rope, c.head_dim);
  const std::vector<double> want = reference_inv_freq(c.rope, c.head_dim);
  ASSERT_EQ(got.size(), 64u);
  expect_close_rel(got, want, 1e-6);

  RopeConfig plain;
  plain.theta = c.rope.theta;
  const std::vector<double> base = reference_inv_freq(plain, c.head_dim);
  int high = 0, low = 0, medium = 0;
  for (size_t i = 0; i < base.size(); ++i) {
    const double ratio = want[i] / base[i];
    if (std::abs(ratio - 1.0) < 1e-12) ++high;                 // short wavelengths untouched
    else if (std::abs(ratio - 1.0 / 8.0) < 1e-12) ++low;       // long wavelengths divided by factor
    else {
      ++medium;
      EXPECT_GT(ratio, 1.0 / 8.0);
      EXPECT_LT(ratio, 1.0);
    }
  }
  EXPECT_GT(high, 0);
  EXPECT_GT(low, 0);
  EXPECT_GT(medium, 0);

  // A second parameter set (Llama 3.2-style factor 32) with a different head size.
  RopeConfig r = c.rope;
  r.factor = 32.0;
  r.theta = 500000.0;
  expect_close_rel(rope_inv_freq(r, 64), reference_inv_freq(r, 64), 1e-6);
}

}  // namespace
}  // namespace accelcore
