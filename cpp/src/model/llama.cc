#include "model/llama.h"

#include <cmath>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <numeric>
#include <optional>

#include "backend/cpu/ops.h"
#include "model/safetensors.h"
#include "util/check.h"

namespace accelcore {

std::vector<float> rope_inv_freq(const RopeConfig& rope, int head_dim) {
  const int half = head_dim / 2;
  std::vector<float> inv(half);
  for (int i = 0; i < half; ++i) {
    // transformers: 1 / base ** (arange(0, dim, 2).float() / dim), all in float32.
    float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv[i] = 1.0f / std::pow(static_cast<float>(rope.theta), exponent);
  }
  if (rope.type == RopeConfig::Type::kLinear) {
    for (float& f : inv) f = static_cast<float>(f / rope.factor);
  } else if (rope.type == RopeConfig::Type::kLlama3) {
    const double old_len = rope.original_max_position_embeddings;
    const double low_wavelen = old_len / rope.low_freq_factor;
    const double high_wavelen = old_len / rope.high_freq_factor;
    for (float& f : inv) {
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_wavelen) {
        f = static_cast<float>(f / rope.factor);
      } else if (wavelen >= high_wavelen) {
        const double smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor);
        f = static_cast<float>((1.0 - smooth) * f / rope.factor + smooth * f);
      }
    }
  }
  return inv;
}

namespace {

std::string fmt(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

class WeightLoader {
 public:
  WeightLoader(const CheckpointReader& ckpt) : ckpt_(ckpt) {}

  // Copies the named tensor (any float dtype) into dst at row offset, checking its shape.
  void load(const std::string& name, std::vector<int64_t> shape, float* dst) {
    const TensorView& t = ckpt_.get(name);
    ACCEL_CHECK(t.shape == shape, FormatError)
        << "tensor '" << name << "' has shape " << fmt(t.shape) << ", the config implies " << fmt(shape);
    convert_to_f32(t, dst);
  }

  FloatBuffer load(const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    FloatBuffer b(n);
    load(name, std::move(shape), b.data());
    return b;
  }

  // Stacks several [rows_i, cols] matrices (or vectors) into one buffer.
  FloatBuffer stack(const std::vector<std::string>& names, const std::vector<int64_t>& rows, int64_t cols) {
    int64_t total = 0;
    for (int64_t r : rows) total += r;
    FloatBuffer b(total * std::max<int64_t>(cols, 1));
    int64_t off = 0;
    for (size_t i = 0; i < names.size(); ++i) {
      std::vector<int64_t> shape = cols > 0 ? std::vector<int64_t>{rows[i], cols} : std::vector<int64_t>{rows[i]};
      load(names[i], shape, b.data() + off * std::max<int64_t>(cols, 1));
      off += rows[i];
    }
    return b;
  }

  bool contains(const std::string& name) const { return ckpt_.contains(name); }

 private:
  const CheckpointReader& ckpt_;
};

// A quantized checkpoint's tensors, each checked for dtype and shape before use.
class QuantLoader {
 public:
  QuantLoader(const CheckpointReader& ckpt, const ModelConfig& c) : ckpt_(ckpt), c_(c) {}

  const TensorView& get(const std::string& name, DType dtype, const std::vector<int64_t>& shape) const {
    ACCEL_CHECK(ckpt_.contains(name), FormatError)
        << "quantized checkpoint has no tensor '" << name << "' (is it a complete `accelcore quantize` output?)";
    const TensorView& t = ckpt_.get(name);
    ACCEL_CHECK(t.dtype == dtype && t.shape == shape, FormatError)
        << "tensor '" << name << "' is " << dtype_name(t.dtype) << " " << fmt(t.shape) << ", the config and its "
        << "quantization_config imply " << dtype_name(dtype) << " " << fmt(shape);
    return t;
  }

  // 8-bit rows into floats (scale * q), keeping the scales.
  void q8(const std::string& prefix, int64_t n, int64_t k, FloatBuffer* out, std::vector<float>* scales) const {
    const TensorView& q = get(prefix + ".qweight", DType::kI8, {n, k});
    const TensorView& s = get(prefix + ".scales", DType::kF32, {n});
    Q8Rows r;
    r.n = n;
    r.k = k;
    r.q.resize(n * k);
    r.scales.resize(n);
    std::memcpy(r.q.data(), q.data, q.nbytes);
    std::memcpy(r.scales.data(), s.data, s.nbytes);
    out->resize(n * k);
    q8_dequantize(r, out->data());
    *scales = std::move(r.scales);
  }

  // Linears stacked by rows (q, k, v or gate, up) into one tiled 4-bit weight.
  Q4Tiled q4(const std::vector<std::string>& prefixes, const std::vector<int64_t>& rows, int64_t k) const {
    Q4Weight w;
    w.k = k;
    w.group = c_.quant->group_size;
    const int64_t G = w.groups(), kp = w.padded_k();
    for (size_t i = 0; i < prefixes.size(); ++i) {
      const TensorView& q = get(prefixes[i] + ".qweight", DType::kU8, {rows[i], kp / 2});
      const TensorView& s = get(prefixes[i] + ".scales", DType::kF32, {rows[i], G});
      const TensorView& z = get(prefixes[i] + ".zeros", DType::kU8, {rows[i], G});
      for (size_t b = 0; b < z.nbytes; ++b)
        ACCEL_CHECK(z.data[b] < 16, FormatError) << "tensor '" << prefixes[i] << ".zeros' holds " << int(z.data[b])
                                                 << ", not a 4-bit zero point";
      w.packed.insert(w.packed.end(), q.data, q.data + q.nbytes);
      const float* sp = reinterpret_cast<const float*>(s.data);
      w.scales.insert(w.scales.end(), sp, sp + s.numel());
      w.zeros.insert(w.zeros.end(), z.data, z.data + z.nbytes);
      w.n += rows[i];
    }
    return q4_tile(w);
  }

  ActOrder order(const std::string& prefix, int64_t k) const {
    ActOrder o;
    const TensorView& p = get(prefix + ".input_order", DType::kI32, {k});
    const TensorView& a = get(prefix + ".a8_subgroups", DType::kI32, {1});
    o.perm.resize(k);
    std::memcpy(o.perm.data(), p.data, p.nbytes);
    std::vector<char> seen(k, 0);
    for (int32_t i : o.perm) {
      ACCEL_CHECK(i >= 0 && i < k && !seen[i], FormatError)
          << "tensor '" << prefix << ".input_order' is not a permutation of [0, " << k << ")";
      seen[i] = 1;
    }
    int32_t a8;
    std::memcpy(&a8, a.data, sizeof(a8));
    const int64_t subs = (k + kA4SubGroup - 1) / kA4SubGroup;
    ACCEL_CHECK(a8 >= 0 && a8 <= subs, FormatError)
        << "tensor '" << prefix << ".a8_subgroups' is " << a8 << ", outside [0, " << subs << "]";
    o.a8_subgroups = a8;
    return o;
  }

 private:
  const CheckpointReader& ckpt_;
  const ModelConfig& c_;
};

}  // namespace

// A [rows, k] row-major matrix in the float linear's panel layout, and back.
static FloatBuffer packed(const FloatBuffer& w, int64_t k) {
  const int64_t rows = static_cast<int64_t>(w.size()) / k;
  FloatBuffer p(static_cast<size_t>(cpu::linear_packed_size(rows, k)));
  cpu::linear_pack(w.data(), rows, k, p.data());
  return p;
}

static FloatBuffer unpacked(const FloatBuffer& p, int64_t rows, int64_t k) {
  FloatBuffer w(static_cast<size_t>(rows * k));
  cpu::linear_unpack(p.data(), rows, k, w.data());
  return w;
}

ModelWeights load_weights(const ModelConfig& c, const std::string& model_dir) {
  CheckpointReader ckpt(model_dir);
  WeightLoader ld(ckpt);
  // A quantized checkpoint differs only in the embedding, the head and the linears' weights.
  std::optional<QuantLoader> qld;
  if (c.quant) {
    ACCEL_CHECK(c.quant->activations != "a4" || c.quant->act_group == kA4SubGroup, FormatError)
        << "quantization_config.act_group is " << c.quant->act_group << "; this engine's FMPQ sub-groups are "
        << kA4SubGroup;
    qld.emplace(ckpt, c);
  }
  ModelWeights w;
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t Q = c.q_size(), KV = c.kv_size();
  if (qld) {
    qld->q8("model.embed_tokens", V, H, &w.embed, &w.embed_scales);
    if (!c.tie_word_embeddings) qld->q8("lm_head", V, H, &w.lm_head, &w.head_scales);
  } else {
    w.embed = ld.load("model.embed_tokens.weight", {V, H});
    if (!c.tie_word_embeddings) {
      ACCEL_CHECK(ld.contains("lm_head.weight"), FormatError)
          << "checkpoint has no lm_head.weight and the config does not tie word embeddings";
      w.lm_head = ld.load("lm_head.weight", {V, H});
    }
  }
  w.final_norm = ld.load("model.norm.weight", {H});
  w.layers.resize(c.num_layers);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights& L = w.layers[l];
    L.input_norm = ld.load(p + "input_layernorm.weight", {H});
    L.post_norm = ld.load(p + "post_attention_layernorm.weight", {H});
    const std::string a = p + "self_attn.", m = p + "mlp.";
    if (qld) {
      L.qkv_q = qld->q4({a + "q_proj", a + "k_proj", a + "v_proj"}, {Q, KV, KV}, H);
      L.o_q = qld->q4({a + "o_proj"}, {H}, Q);
      L.gate_up_q = qld->q4({m + "gate_proj", m + "up_proj"}, {I, I}, H);
      L.down_q = qld->q4({m + "down_proj"}, {H}, I);
      if (c.quant->activations == "a4") {
        L.qkv_a = qld->order(a + "qkv_proj", H);
        L.o_a = qld->order(a + "o_proj", Q);
        L.gate_up_a = qld->order(m + "gate_up_proj", H);
        L.down_a = qld->order(m + "down_proj", I);
      }
    } else {
      L.qkv_w = packed(ld.stack({a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"}, {Q, KV, KV}, H), H);
      L.o_w = packed(ld.load(a + "o_proj.weight", {H, Q}), Q);
      L.gate_up_w = packed(ld.stack({m + "gate_proj.weight", m + "up_proj.weight"}, {I, I}, H), H);
      L.down_w = packed(ld.load(m + "down_proj.weight", {H, I}), I);
    }
    if (c.qkv_bias) L.qkv_b = ld.stack({a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"}, {Q, KV, KV}, 0);
    if (c.o_bias) L.o_b = ld.load(a + "o_proj.bias", {H});
    if (c.mlp_bias) {
      L.gate_up_b = ld.stack({m + "gate_proj.bias", m + "up_proj.bias"}, {I, I}, 0);
      L.down_b = ld.load(m + "down_proj.bias", {H});
    }
  }
  return w;
}

LlamaModel::LlamaModel(ModelConfig config, ModelWeights weights)
    : config_(std::move(config)), w_(std::move(weights)) {
  inv_freq_ = rope_inv_freq(config_.rope, config_.head_dim);
  if (config_.quant) {
    const std::string& a = config_.quant->activations;
    act_quant_ = a == "a16" ? ActQuant::kFloat : a == "a4" ? ActQuant::kFmpq : ActQuant::kInt8;
    build_q8_head();
  } else {
    // The float head in the linear's panels; a tied one is the embedding too, whose rows are then
    // read from the panels (embed_row) rather than kept twice.
    FloatBuffer& head = w_.lm_head.empty() ? w_.embed : w_.lm_head;
    head_panels_ = packed(head, config_.hidden_size);
    head = FloatBuffer();
  }
}

void LlamaModel::embed_row(int32_t token, float* out) const {
  const int64_t H = config_.hidden_size;
  if (!w_.embed.empty()) {
    std::memcpy(out, w_.embed.data() + static_cast<int64_t>(token) * H, H * sizeof(float));
    return;
  }
  const float* p = head_panels_.data() + (token / cpu::kLinearPanel) * H * cpu::kLinearPanel + token % cpu::kLinearPanel;
  for (int64_t i = 0; i < H; ++i) out[i] = p[i * cpu::kLinearPanel];
}

void LlamaModel::round_embeddings_int8() {
  const int64_t V = config_.vocab_size, H = config_.hidden_size;
  if (!head_panels_.empty()) {  // the float head back in rows (the embedding, when tied)
    (w_.embed.empty() ? w_.embed : w_.lm_head) = unpacked(head_panels_, V, H);
    head_panels_ = FloatBuffer();
  }
  auto round = [&](FloatBuffer* w, std::vector<float>* scales) {
    Q8Rows r = q8_quantize_rows(w->data(), V, H);
    q8_dequantize(r, w->data());
    *scales = std::move(r.scales);
  };
  round(&w_.embed, &w_.embed_scales);
  if (!w_.lm_head.empty()) round(&w_.lm_head, &w_.head_scales);
  build_q8_head();
}

void LlamaModel::build_q8_head() {
  // The head's 8-bit rows, recovered exactly from the rounded floats (w = scale * q), kept as two
  // 4-bit halves (which the W8A8 form of the W4A8 kernels sums in integers); the float head is
  // then dropped (a tied one stays: it is the embedding).
  const int64_t V = config_.vocab_size, H = config_.hidden_size;
  const bool tied = w_.lm_head.empty();
  const float* w = w_.head();
  Q8Rows r;
  r.n = V;
  r.k = H;
  r.scales = tied ? w_.embed_scales : w_.head_scales;
  r.q.resize(V * H);
  for (int64_t i = 0; i < V; ++i)
    for (int64_t j = 0; j < H; ++j) r.q[i * H + j] = static_cast<int8_t>(std::lround(w[i * H + j] / r.scales[i]));
  head_q_ = q4_tile(q8_split_q4(r, std::min<int64_t>(128, (H + 31) / 32 * 32)));
  if (!tied) w_.lm_head = FloatBuffer();
}

std::vector<TensorOut> LlamaModel::export_quantized() const {
  ACCEL_CHECK(quantized() && !w_.embed_scales.empty(), InvalidArgument)
      << "the model is not quantized: nothing to export (give the engine a 4-bit quantization option)";
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, Q = c.q_size(), KV = c.kv_size();
  std::vector<TensorOut> out;
  auto q8 = [&](const std::string& prefix, const FloatBuffer& w, const std::vector<float>& scales) {
    std::vector<int8_t> q(static_cast<size_t>(V * H));
    for (int64_t r = 0; r < V; ++r)
      for (int64_t i = 0; i < H; ++i)
        q[r * H + i] = w.empty()  // the head, kept only as 4-bit halves: q + 128 = 16 h + l
                           ? static_cast<int8_t>(16 * q4_tiled_at(head_q_, r, i) + q4_tiled_at(head_q_, q8_split_lo(V) + r, i) - 128)
                           : static_cast<int8_t>(std::lround(w[r * H + i] / scales[r]));  // w = scale * q exactly
    out.push_back(tensor_out(prefix + ".qweight", DType::kI8, {V, H}, q.data(), q.size()));
    out.push_back(tensor_out(prefix + ".scales", DType::kF32, {V}, scales.data(), scales.size()));
  };
  auto f32 = [&](const std::string& name, const float* data, int64_t n) {
    out.push_back(tensor_out(name, DType::kF32, {n}, data, static_cast<size_t>(n)));
  };
  auto q4 = [&](const Q4Tiled& t, const std::vector<std::string>& prefixes, const std::vector<int64_t>& rows) {
    int64_t row0 = 0;
    for (size_t i = 0; i < prefixes.size(); ++i) {
      const Q4Weight w = q4_untile(t, row0, rows[i]);
      out.push_back(tensor_out(prefixes[i] + ".qweight", DType::kU8, {rows[i], w.padded_k() / 2}, w.packed.data(), w.packed.size()));
      out.push_back(tensor_out(prefixes[i] + ".scales", DType::kF32, {rows[i], w.groups()}, w.scales.data(), w.scales.size()));
      out.push_back(tensor_out(prefixes[i] + ".zeros", DType::kU8, {rows[i], w.groups()}, w.zeros.data(), w.zeros.size()));
      row0 += rows[i];
    }
  };
  auto order = [&](const ActOrder& o, const std::string& prefix) {
    if (act_quant_ != ActQuant::kFmpq) return;
    out.push_back(tensor_out(prefix + ".input_order", DType::kI32, {static_cast<int64_t>(o.perm.size())}, o.perm.data(), o.perm.size()));
    const int32_t a8 = static_cast<int32_t>(o.a8_subgroups);
    out.push_back(tensor_out(prefix + ".a8_subgroups", DType::kI32, {1}, &a8, 1));
  };
  q8("model.embed_tokens", w_.embed, w_.embed_scales);
  if (!c.tie_word_embeddings) q8("lm_head", w_.lm_head, w_.head_scales);
  f32("model.norm.weight", w_.final_norm.data(), H);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".", a = p + "self_attn.", m = p + "mlp.";
    const LayerWeights& L = w_.layers[l];
    f32(p + "input_layernorm.weight", L.input_norm.data(), H);
    f32(p + "post_attention_layernorm.weight", L.post_norm.data(), H);
    q4(L.qkv_q, {a + "q_proj", a + "k_proj", a + "v_proj"}, {Q, KV, KV});
    q4(L.o_q, {a + "o_proj"}, {H});
    q4(L.gate_up_q, {m + "gate_proj", m + "up_proj"}, {I, I});
    q4(L.down_q, {m + "down_proj"}, {H});
    if (!L.qkv_b.empty()) {
      f32(a + "q_proj.bias", L.qkv_b.data(), Q);
      f32(a + "k_proj.bias", L.qkv_b.data() + Q, KV);
      f32(a + "v_proj.bias", L.qkv_b.data() + Q + KV, KV);
    }
    if (!L.o_b.empty()) f32(a + "o_proj.bias", L.o_b.data(), H);
    if (!L.gate_up_b.empty()) {
      f32(m + "gate_proj.bias", L.gate_up_b.data(), I);
      f32(m + "up_proj.bias", L.gate_up_b.data() + I, I);
    }
    if (!L.down_b.empty()) f32(m + "down_proj.bias", L.down_b.data(), H);
    order(L.qkv_a, a + "qkv_proj");
    order(L.o_a, a + "o_proj");
    order(L.gate_up_a, m + "gate_up_proj");
    order(L.down_a, m + "down_proj");
  }
  return out;
}

void LlamaModel::compute_rope(const BatchPlan& plan) {
  const int T = plan.num_tokens(), half = config_.head_dim / 2;
  cos_.resize(static_cast<size_t>(T) * half);
  sin_.resize(static_cast<size_t>(T) * half);
  for (int t = 0; t < T; ++t) {
    const float pos = static_cast<float>(plan.positions[t]);
    for (int i = 0; i < half; ++i) {
      const float angle = pos * inv_freq_[i];  // float32 product, as transformers computes it
      cos_[t * half + i] = std::cos(angle);
      sin_[t * half + i] = std::sin(angle);
    }
  }
}

static const float* opt(const FloatBuffer& b) { return b.empty() ? nullptr : b.data(); }

static void add_gram(std::vector<double>* h, const float* x, int64_t T, int64_t k, bool diag_only) {
  if (diag_only) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < k; ++i) (*h)[i * k + i] += static_cast<double>(x[t * k + i]) * x[t * k + i];
    return;
  }
  for (int64_t t = 0; t < T; ++t) {
    const float* r = x + t * k;
    for (int64_t i = 0; i < k; ++i) {
      const double xi = r[i];
      double* row = h->data() + i * k;
      for (int64_t j = 0; j < k; ++j) row[j] += xi * r[j];
    }
  }
}

void LlamaModel::quantize_layer_w4(int l, int group_size, const LayerHessian* h, double a8_fraction, bool gptq) {
  const ActQuant act = act_quant_;
  ACCEL_CHECK(act != ActQuant::kFmpq || h, InvalidArgument) << "w4a4 (FMPQ) needs calibration data";
  auto quantize = [&](FloatBuffer* packed_w, int64_t rows, int64_t cols, const std::vector<double>* hess, Q4Tiled* q,
                      ActOrder* order) {
    FloatBuffer rows_w = unpacked(*packed_w, rows, cols);
    *packed_w = FloatBuffer();
    FloatBuffer* f = &rows_w;
    if (act == ActQuant::kFmpq) {
      // Channels by increasing calibration magnitude (mean square: the Hessian's diagonal), so the
      // outliers share the last sub-groups, which stay 8-bit; the weight's columns and the
      // Hessian follow the same order.
      std::vector<int32_t>& perm = order->perm;
      perm.resize(cols);
      std::iota(perm.begin(), perm.end(), 0);
      std::stable_sort(perm.begin(), perm.end(),
                       [&](int32_t a, int32_t b) { return (*hess)[a * cols + a] < (*hess)[b * cols + b]; });
      const int64_t subs = (cols + kA4SubGroup - 1) / kA4SubGroup;
      order->a8_subgroups = std::clamp<int64_t>(std::llround(a8_fraction * subs), 0, subs);
      std::vector<float> row(cols);
      for (int64_t r = 0; r < rows; ++r) {
        float* w = f->data() + r * cols;
        for (int64_t i = 0; i < cols; ++i) row[i] = w[perm[i]];
        std::copy(row.begin(), row.end(), w);
      }
      if (gptq) {
        std::vector<double> hp(static_cast<size_t>(cols * cols));
        for (int64_t i = 0; i < cols; ++i)
          for (int64_t j = 0; j < cols; ++j) hp[i * cols + j] = (*hess)[perm[i] * cols + perm[j]];
        *q = q4_tile(q4_quantize_gptq(f->data(), rows, cols, group_size, hp.data()));
      } else {
        *q = q4_tile(q4_quantize_rtn(f->data(), rows, cols, group_size, /*clip_search=*/true));
      }
    } else {
      *q = q4_tile(hess && gptq ? q4_quantize_gptq(f->data(), rows, cols, group_size, hess->data())
                                : q4_quantize_rtn(f->data(), rows, cols, group_size, /*clip_search=*/true));
    }
  };
  const ModelConfig& c = config_;
  LayerWeights& L = w_.layers[l];
  const int64_t H = c.hidden_size, I = c.intermediate_size, Q = c.q_size();
  quantize(&L.qkv_w, Q + 2 * c.kv_size(), H, h ? &(*h)[0] : nullptr, &L.qkv_q, &L.qkv_a);
  quantize(&L.o_w, H, Q, h ? &(*h)[1] : nullptr, &L.o_q, &L.o_a);
  quantize(&L.gate_up_w, 2 * I, H, h ? &(*h)[2] : nullptr, &L.gate_up_q, &L.gate_up_a);
  quantize(&L.down_w, H, I, h ? &(*h)[3] : nullptr, &L.down_q, &L.down_a);
}

void LlamaModel::quantize_weights_w4(int group_size, ActQuant act, const std::function<void(int, int)>& progress) {
  ACCEL_CHECK(act != ActQuant::kFmpq, InvalidArgument) << "w4a4 (FMPQ) needs calibration data";
  act_quant_ = act;
  for (int l = 0; l < config_.num_layers; ++l) {
    quantize_layer_w4(l, group_size, nullptr, 0, false);
    if (progress) progress(l + 1, config_.num_layers);
  }
}

size_t LlamaModel::layer_hessian_bytes() const {
  const ModelConfig& c = config_;
  const double ks[4] = {double(c.hidden_size), double(c.q_size()), double(c.hidden_size), double(c.intermediate_size)};
  double b = 0;
  for (double k : ks) b += 8 * k * k;
  return static_cast<size_t>(b);
}

void LlamaModel::quantize_weights_w4_calibrated(const std::vector<std::vector<int32_t>>& seqs, KvCache& cache,
                                                ThreadPool& pool, int group_size, ActQuant act, double a8_fraction,
                                                bool gptq, const std::function<void(int, int)>& progress) {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, bs = cache.shape().block_size;
  ACCEL_CHECK(!cache.quantized(), InvalidArgument) << "calibration runs the float model: give it a float32 KV cache";
  act_quant_ = act;
  // Each sequence is one plan (positions 0.., blocks 0.. of the cache) whose residual stream X is
  // kept between layers.
  std::vector<BatchPlan> plans(seqs.size());
  std::vector<std::vector<float>> X(seqs.size());
  for (size_t s = 0; s < seqs.size(); ++s) {
    const int64_t n = static_cast<int64_t>(seqs[s].size());
    ACCEL_CHECK(n <= static_cast<int64_t>(cache.shape().num_blocks) * bs, InvalidArgument)
        << "calibration sequence " << s << " has " << n << " tokens, more than the calibration KV cache holds";
    BatchPlan& p = plans[s];
    p.block_table_offset.push_back(0);
    for (int64_t b = 0; b < (n + bs - 1) / bs; ++b) p.block_tables.push_back(static_cast<int32_t>(b));
    X[s].resize(n * H);
    for (int64_t i = 0; i < n; ++i) {
      p.token_ids.push_back(seqs[s][i]);
      p.positions.push_back(static_cast<int32_t>(i));
      p.slots.push_back(i);
      p.seq_of_token.push_back(0);
      embed_row(seqs[s][i], X[s].data() + i * H);
    }
  }
  auto pass = [&](int l, bool keep) {
    for (size_t s = 0; s < seqs.size(); ++s) {
      if (plans[s].num_tokens() == 0) continue;
      prepare(plans[s]);
      std::memcpy(x_.data(), X[s].data(), X[s].size() * sizeof(float));
      run_layer(l, plans[s], cache, plans[s].slots.data(), pool);
      if (keep) std::memcpy(X[s].data(), x_.data(), X[s].size() * sizeof(float));
    }
  };
  // GPTQ's sequential order: layer l is calibrated on the outputs of the quantized layers before
  // it, then quantized, then run again (quantized) to give the next layer its inputs. One layer's
  // Hessians in memory at a time.
  const int64_t ks[4] = {H, c.q_size(), H, c.intermediate_size};
  for (int l = 0; l < c.num_layers; ++l) {
    LayerHessian h;
    for (int i = 0; i < 4; ++i) h[i].assign(static_cast<size_t>(ks[i] * ks[i]), 0.0);
    hessians_ = &h;
    hessian_diag_only_ = !gptq;  // round to nearest needs only the channel magnitudes (FMPQ's order)
    pass(l, false);
    hessians_ = nullptr;
    quantize_layer_w4(l, group_size, &h, a8_fraction, gptq);
    pass(l, true);
    if (progress) progress(l + 1, c.num_layers);
  }
}

bool LlamaModel::produce(int64_t T, int64_t k, const float* x, const Q4Tiled& q, const ActOrder& order, ThreadPool& pool,
                         const std::function<void(int64_t, int64_t)>& fn) {
  const bool quantize = q.n != 0 && act_quant_ != ActQuant::kFloat;
  if (quantize) a8_resize(&xq_, T, k, q.group, act_quant_ == ActQuant::kFmpq ? kA4SubGroup : q.group);
  auto run = [&](int64_t a, int64_t e) {
    fn(a, e);
    if (!quantize) return;
    if (act_quant_ == ActQuant::kFmpq)
      a4_quantize_rows(x, a, e, k, order.perm.empty() ? nullptr : order.perm.data(), order.a8_subgroups, &xq_);
    else
      a8_quantize_rows(x, a, e, k, &xq_);
  };
  if (T * k < (1 << 15)) run(0, T);
  else pool.parallel_for(T, std::max<int64_t>(1, 16384 / k), run);  // chunks of about 64 KB of floats
  return quantize;
}

void LlamaModel::linear(const float* x, int64_t T, int64_t k, const FloatBuffer& w, const Q4Tiled& q,
                        const ActOrder& order, const FloatBuffer& b, float* y, int64_t n, ThreadPool& pool,
                        bool input_quantized) {
  if (q.n == 0) {
    cpu::linear({x, w.data(), opt(b), y, T, n, k, k, n}, pool);
    return;
  }
  qlinear(x, T, k, q, order, b, y, n, act_quant_, pool, input_quantized);
}

void LlamaModel::qlinear(const float* x, int64_t T, int64_t k, const Q4Tiled& q, const ActOrder& order,
                         const FloatBuffer& b, float* y, int64_t n, ActQuant act, ThreadPool& pool,
                         bool input_quantized) {
  ACCEL_DCHECK(q.n == n && q.k == k);
  if (act == ActQuant::kFloat) {
    cpu::QLinear16Params p;
    p.x = x;
    p.w = q.data.data();
    p.w_scales = q.scales.data();
    p.w_zeros = q.zeros.data();
    p.bias = opt(b);
    p.y = y;
    p.m = T;
    p.n = n;
    p.k = k;
    p.groups = q.groups;
    p.group = q.group;
    p.ldx = k;
    p.ldy = n;
    cpu::qlinear_w4a16(p, pool);
    return;
  }
  if (input_quantized)
    ACCEL_DCHECK(xq_.m == T && xq_.k == k && xq_.group == q.group);
  else if (act == ActQuant::kFmpq)
    a4_quantize(x, T, k, k, q.group, order.perm.empty() ? nullptr : order.perm.data(), order.a8_subgroups, &xq_);
  else
    a8_quantize(x, T, k, k, q.group, &xq_);
  cpu::qlinear_w4a8(w4a8_params(q, opt(b), y, T, n), pool);
}

cpu::QLinearParams LlamaModel::w4a8_params(const Q4Tiled& q, const float* bias, float* y, int64_t T, int64_t n) const {
  cpu::QLinearParams p;
  p.xq = xq_.q.data();
  p.x_scales = xq_.scales.data();
  p.x_sums = xq_.sums.data();
  p.x_zsums = xq_.zsums.empty() ? nullptr : xq_.zsums.data();
  p.w = q.data.data();
  p.w_scales = q.scales.data();
  p.w_zeros = q.zeros.data();
  p.bias = bias;
  p.y = y;
  p.m = T;
  p.n = n;
  p.groups = q.groups;
  p.group = q.group;
  p.act_group = xq_.act_group;
  p.ldy = n;
  return p;
}

void LlamaModel::prepare(const BatchPlan& plan) {
  const ModelConfig& c = config_;
  const int64_t T = plan.num_tokens(), H = c.hidden_size;
  x_.resize(T * H);
  h_.resize(T * H);
  qkv_.resize(T * (c.q_size() + 2 * c.kv_size()));
  attn_.resize(T * c.q_size());
  mlp_.resize(T * 2 * c.intermediate_size);
  act_.resize(T * c.intermediate_size);
  compute_rope(plan);
}

cpu::AttentionParams LlamaModel::attention_params(int l, const BatchPlan& plan, KvCache& cache) {
  const ModelConfig& c = config_;
  const int64_t QKV = c.q_size() + 2 * c.kv_size();
  const KvCacheShape& ks = cache.shape();
  cpu::AttentionParams ap;
  if (cache.quantized()) {
    ap.kv_bits = ks.kv_bits;
    ap.kv_records = cache.records(l);
    ap.stage_of_block = cache.stage_of_block();
  }
  ap.q = qkv_.data();
  ap.ldq = QKV;
  ap.out = attn_.data();
  ap.k_cache = cache.k(l);
  ap.v_cache = cache.v(l);
  ap.positions = plan.positions.data();
  ap.seq_of_token = plan.seq_of_token.data();
  ap.block_tables = plan.block_tables.data();
  ap.block_table_offset = plan.block_table_offset.data();
  ap.num_tokens = plan.num_tokens();
  ap.num_heads = c.num_heads;
  ap.num_kv_heads = c.num_kv_heads;
  ap.head_dim = c.head_dim;
  ap.block_size = ks.block_size;
  ap.window = c.sliding_window[l];
  ap.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  if (!plan.extra_offset.empty()) {
    ap.extra_offset = plan.extra_offset.data();
    ap.extra_slots = cache.extra_slots(plan);
  }
  return ap;
}

bool LlamaModel::can_split_parts(int64_t T, const KvCache& cache, ThreadPool& pool) const {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, I = c.intermediate_size, Q = c.q_size();
  const int64_t layer_floats = H * (Q + 2 * c.kv_size()) + Q * H + 3 * H * I;
  // Only where a layer's weights fit a core's L2, so each thread's share of them stays there.
  return T > 0 && split_parts(pool) > 1 && layer_floats * static_cast<int64_t>(sizeof(float)) <= (1 << 20) &&
         !quantized() && head_q_.n == 0 && !cache.quantized() && hessians_ == nullptr;
}

void LlamaModel::run_parts(const BatchPlan& plan, KvCache& cache, const int64_t* slots, ThreadPool& pool,
                          FloatBuffer* logits) {
  const ModelConfig& c = config_;
  const int64_t T = plan.num_tokens();
  const int64_t H = c.hidden_size, I = c.intermediate_size, Q = c.q_size(), KV = c.kv_size();
  const int64_t QKV = Q + 2 * KV, hd = c.head_dim, group = c.num_heads / c.num_kv_heads;
  const KvCacheShape& ks = cache.shape();
  const int parts = split_parts(pool);
  std::vector<cpu::AttentionParams> ap(static_cast<size_t>(c.num_layers));
  for (int l = 0; l < c.num_layers; ++l) ap[static_cast<size_t>(l)] = attention_params(l, plan, cache);
  const int64_t R = static_cast<int64_t>(plan.logit_rows.size()), V = c.vocab_size;
  part_h_.resize(parts * T * H);
  logits->resize(std::max<int64_t>(R, 1) * V);
  // Part p's share of n columns, in whole panels (no panel is computed twice).
  auto share = [&](int64_t n, int part) {
    const int64_t panels = (n + cpu::kLinearPanel - 1) / cpu::kLinearPanel;
    return std::pair<int64_t, int64_t>{std::min(n, panels * part / parts * cpu::kLinearPanel),
                                       std::min(n, panels * (part + 1) / parts * cpu::kLinearPanel)};
  };
  auto add_columns = [&](float* x, const float* y, int64_t c0, int64_t c1) {
    for (int64_t t = 0; t < T; ++t) cpu::add_inplace(x + t * H + c0, y + t * H + c0, c1 - c0);
  };
  pool.run_phases(4 * c.num_layers + 1, parts, [&](int phase, int part) {
    float* h = part_h_.data() + part * T * H;  // this part's normed rows
    if (phase == 4 * c.num_layers) {  // the final norm of the rows that need logits, and the part's share of the head
      for (int64_t r = 0; r < R; ++r)
        cpu::rms_norm({x_.data() + static_cast<int64_t>(plan.logit_rows[r]) * H, w_.final_norm.data(), h + r * H, 1, H,
                       c.rms_norm_eps});
      const auto [v0, v1] = share(V, part);
      cpu::linear_columns({h, head_panels_.data(), nullptr, logits->data(), R, V, H, H, V}, v0, v1);
      return;
    }
    const int l = phase / 4;
    const LayerWeights& L = w_.layers[l];
    const auto [c0, c1] = share(H, part);
    switch (phase % 4) {
      case 0: {  // the part's kv heads: their q, k and v columns, RoPE, the cache, attention
        const int kh0 = static_cast<int>(c.num_kv_heads * part / parts);
        const int kh1 = static_cast<int>(c.num_kv_heads * (part + 1) / parts);
        if (kh0 == kh1) return;
        cpu::rms_norm({x_.data(), L.input_norm.data(), h, T, H, c.rms_norm_eps});
        const cpu::LinearParams lp{h, L.qkv_w.data(), opt(L.qkv_b), qkv_.data(), T, QKV, H, H, QKV};
        cpu::linear_columns(lp, kh0 * group * hd, kh1 * group * hd);
        cpu::linear_columns(lp, Q + kh0 * hd, Q + kh1 * hd);
        cpu::linear_columns(lp, Q + KV + kh0 * hd, Q + KV + kh1 * hd);
        float* q = qkv_.data() + kh0 * group * hd;
        cpu::apply_rope({q, T, (kh1 - kh0) * group, hd, QKV, cos_.data(), sin_.data()});
        cpu::apply_rope({qkv_.data() + Q + kh0 * hd, T, kh1 - kh0, hd, QKV, cos_.data(), sin_.data()});
        cpu::write_kv({qkv_.data() + Q, qkv_.data() + Q + KV, QKV, cache.k(l), cache.v(l), slots, T, c.num_kv_heads,
                       c.head_dim, ks.block_size, kh0, kh1});
        cpu::paged_attention_kv_heads(ap[static_cast<size_t>(l)], kh0, kh1);
        return;
      }
      case 1:  // the o projection's columns of the part, into the residual
        cpu::linear_columns({attn_.data(), L.o_w.data(), opt(L.o_b), h_.data(), T, H, Q, Q, H}, c0, c1);
        add_columns(x_.data(), h_.data(), c0, c1);
        return;
      case 2: {  // gate and up of the part's intermediate columns, and their product
        const auto [i0, i1] = share(I, part);
        cpu::rms_norm({x_.data(), L.post_norm.data(), h, T, H, c.rms_norm_eps});
        const cpu::LinearParams lp{h, L.gate_up_w.data(), opt(L.gate_up_b), mlp_.data(), T, 2 * I, H, H, 2 * I};
        cpu::linear_columns(lp, i0, i1);
        cpu::linear_columns(lp, I + i0, I + i1);
        cpu::silu_mul(mlp_.data(), act_.data(), T, I, i0, i1);
        return;
      }
      default:  // down's columns of the part, into the residual
        cpu::linear_columns({act_.data(), L.down_w.data(), opt(L.down_b), h_.data(), T, H, I, I, H}, c0, c1);
        add_columns(x_.data(), h_.data(), c0, c1);
        return;
    }
  });
}

void LlamaModel::run_layer(int l, const BatchPlan& plan, KvCache& cache, const int64_t* slots, ThreadPool& pool) {
  const ModelConfig& c = config_;
  const int64_t T = plan.num_tokens();
  const int64_t H = c.hidden_size, I = c.intermediate_size, Q = c.q_size(), KV = c.kv_size();
  const int64_t QKV = Q + 2 * KV;
  const KvCacheShape& ks = cache.shape();
  const LayerWeights& L = w_.layers[l];
  auto* gram = hessians_;  // calibration: this layer's input Gram matrices
  // The linears' inputs are produced a chunk of rows at a time across threads, each chunk
  // quantized (8 or 4 bits, through FMPQ's channel order) as soon as it is written.
  bool q_in = produce(T, H, h_.data(), L.qkv_q, L.qkv_a, pool, [&](int64_t a, int64_t e) {
    cpu::rms_norm({x_.data() + a * H, L.input_norm.data(), h_.data() + a * H, e - a, H, c.rms_norm_eps});
  });
  if (gram) add_gram(&(*gram)[0], h_.data(), T, H, hessian_diag_only_);
  linear(h_.data(), T, H, L.qkv_w, L.qkv_q, L.qkv_a, L.qkv_b, qkv_.data(), QKV, pool, q_in);
  cpu::apply_rope({qkv_.data(), T, c.num_heads, c.head_dim, QKV, cos_.data(), sin_.data()});
  cpu::apply_rope({qkv_.data() + Q, T, c.num_kv_heads, c.head_dim, QKV, cos_.data(), sin_.data()});
  cpu::write_kv({qkv_.data() + Q, qkv_.data() + Q + KV, QKV, cache.k(l), cache.v(l), slots, T, c.num_kv_heads,
                 c.head_dim, ks.block_size});
  if (cache.quantized()) cache.quantize_layer(l, pool);
  cpu::paged_attention(attention_params(l, plan, cache), pool);
  if (gram) add_gram(&(*gram)[1], attn_.data(), T, Q, hessian_diag_only_);
  q_in = produce(T, Q, attn_.data(), L.o_q, L.o_a, pool, [](int64_t, int64_t) {});  // attention wrote it
  linear(attn_.data(), T, Q, L.o_w, L.o_q, L.o_a, L.o_b, h_.data(), H, pool, q_in);
  cpu::add_inplace(x_.data(), h_.data(), T * H);
  q_in = produce(T, H, h_.data(), L.gate_up_q, L.gate_up_a, pool, [&](int64_t a, int64_t e) {
    cpu::rms_norm({x_.data() + a * H, L.post_norm.data(), h_.data() + a * H, e - a, H, c.rms_norm_eps});
  });
  if (gram) add_gram(&(*gram)[2], h_.data(), T, H, hessian_diag_only_);
  linear(h_.data(), T, H, L.gate_up_w, L.gate_up_q, L.gate_up_a, L.gate_up_b, mlp_.data(), 2 * I, pool, q_in);
  q_in = produce(T, I, act_.data(), L.down_q, L.down_a, pool, [&](int64_t a, int64_t e) {
    cpu::silu_mul(mlp_.data() + a * 2 * I, act_.data() + a * I, e - a, I);
  });
  if (gram) add_gram(&(*gram)[3], act_.data(), T, I, hessian_diag_only_);
  linear(act_.data(), T, I, L.down_w, L.down_q, L.down_a, L.down_b, h_.data(), H, pool, q_in);
  cpu::add_inplace(x_.data(), h_.data(), T * H);
}

void LlamaModel::forward(const BatchPlan& plan, KvCache& cache, ThreadPool& pool, FloatBuffer* logits) {
  const ModelConfig& c = config_;
  const int64_t T = plan.num_tokens(), H = c.hidden_size;
  ACCEL_DCHECK(static_cast<int64_t>(plan.positions.size()) == T && static_cast<int64_t>(plan.slots.size()) == T);
  if (T == 0) {
    logits->resize(0);
    return;
  }
  prepare(plan);
  for (int64_t t = 0; t < T; ++t) embed_row(plan.token_ids[t], x_.data() + t * H);
  if (cache.quantized()) cache.begin_step(plan);
  const int64_t* slots = cache.slots(plan);
  // Small float models: the layers and the head as one phased job, or kernel by kernel, whichever
  // has measured faster for steps of this many rows.
  SplitTimer* timer = nullptr;
  bool by_parts = false;
  if (split_ != Split::kMeasured) {
    by_parts = split_ == Split::kParts && can_split_parts(T, cache, pool);
  } else if (can_split_parts(T, cache, pool)) {
    int range = 0;
    while (range + 1 < static_cast<int>(parts_timers_.size()) && (T >> (range + 1)) > 0) ++range;
    timer = &parts_timers_[range];
    by_parts = timer->pick();
  }
  const auto t0 = std::chrono::steady_clock::now();
  if (by_parts) {
    run_parts(plan, cache, slots, pool, logits);
  } else {
    for (int l = 0; l < c.num_layers; ++l) run_layer(l, plan, cache, slots, pool);
    head(plan, pool, logits);
  }
  if (timer) timer->record(by_parts, std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count(), T);
  if (cache.quantized()) cache.end_step();
}

void LlamaModel::head(const BatchPlan& plan, ThreadPool& pool, FloatBuffer* logits) {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size;
  // Final norm and head only for the rows that need logits.
  const int64_t R = static_cast<int64_t>(plan.logit_rows.size());
  rows_.resize(std::max<int64_t>(R, 1) * H);
  for (int64_t r = 0; r < R; ++r) {
    std::memcpy(rows_.data() + r * H, x_.data() + static_cast<int64_t>(plan.logit_rows[r]) * H, H * sizeof(float));
  }
  cpu::rms_norm({rows_.data(), w_.final_norm.data(), rows_.data(), R, H, c.rms_norm_eps});
  logits->resize(std::max<int64_t>(R, 1) * c.vocab_size);
  if (head_q_.n == 0) {
    cpu::linear({rows_.data(), head_panels_.data(), nullptr, logits->data(), R, c.vocab_size, H, H, c.vocab_size}, pool);
    return;
  }
  const int64_t V = c.vocab_size, lo = q8_split_lo(V);
  if (act_quant_ != ActQuant::kFloat) {
    // The 8-bit head by 8-bit activations: one W8A8 product (the halves summed in integers).
    a8_quantize(rows_.data(), R, H, H, head_q_.group, &xq_);
    cpu::QLinearParams p = w4a8_params(head_q_, nullptr, logits->data(), R, V);
    p.w8_lo_block = lo / Q4Tiled::kRows;
    cpu::qlinear_w4a8(p, pool);
    return;
  }
  // w4a16: the two 4-bit halves by float activations, then summed.
  head_y_.resize(std::max<int64_t>(R, 1) * 2 * lo);
  qlinear(rows_.data(), R, H, head_q_, ActOrder(), FloatBuffer(), head_y_.data(), 2 * lo, ActQuant::kFloat, pool);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < V; ++v) (*logits)[r * V + v] = head_y_[r * 2 * lo + v] + head_y_[r * 2 * lo + lo + v];
}

}  // namespace accelcore
