// The Llama-family decoder (Llama 2/3, Mistral, Qwen2) in float32 on the CPU, run over a
// BatchPlan against a paged KV cache.
#pragma once

#include <array>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backend/cpu/ops.h"
#include "kv/kv_cache.h"
#include "model/model_config.h"
#include "model/safetensors.h"
#include "model/split_timer.h"
#include "quant/q4.h"
#include "sched/batch_plan.h"
#include "util/buffer.h"
#include "util/thread_pool.h"

namespace accelcore {

// FMPQ (w4a4): the order in which a linear reads its input channels (outliers last; the weight's
// columns are stored in that order) and how many of its last activation sub-groups are 8-bit.
struct ActOrder {
  std::vector<int32_t> perm;  // empty: the natural order
  int64_t a8_subgroups = 0;
};

// What the quantized linears take as input: float (w4a16), 8 bits per token and group (w4a8), or
// FMPQ's mixed 4/8 bits (w4a4).
enum class ActQuant { kFloat, kInt8, kFmpq };

struct LayerWeights {
  FloatBuffer input_norm, post_norm;
  // The float matrices in the linear kernel's panels (cpu::linear_pack); biases plain.
  FloatBuffer qkv_w, qkv_b;      // [q + 2 kv, hidden]: q, k, v projections stacked
  FloatBuffer o_w, o_b;          // [hidden, q]
  FloatBuffer gate_up_w, gate_up_b;  // [2 * intermediate, hidden]: gate then up
  FloatBuffer down_w, down_b;    // [hidden, intermediate]
  // The same four matrices in 4 bits (the 4-bit schemes), in the kernels' tiled layout; the
  // float ones are then empty.
  Q4Tiled qkv_q, o_q, gate_up_q, down_q;
  ActOrder qkv_a, o_a, gate_up_a, down_a;  // kFmpq
};

// As loaded; a float model moves its head into LlamaModel's panels.
struct ModelWeights {
  FloatBuffer embed;      // [vocab, hidden]
  FloatBuffer lm_head;    // [vocab, hidden]; empty when tied to embed
  // 4-bit schemes: the embedding and head were rounded to 8 bits per row (quant/q4.h Q8Rows);
  // their scales (the floats above are scale * q).
  std::vector<float> embed_scales, head_scales;
  FloatBuffer final_norm;
  std::vector<LayerWeights> layers;
  const float* head() const { return lm_head.empty() ? embed.data() : lm_head.data(); }
};

// Loads and checks every tensor's shape against the config: float checkpoints, or a quantized one
// (config.quant; the layout of LlamaModel::export_quantized). Throws FormatError naming the tensor.
ModelWeights load_weights(const ModelConfig& config, const std::string& model_dir);

// A layer's four linears' input Gram matrices (sum of x x^T, [k, k]), in the order qkv, o,
// gate_up, down: what GPTQ needs.
using LayerHessian = std::array<std::vector<double>, 4>;

class LlamaModel {
 public:
  LlamaModel(ModelConfig config, ModelWeights weights);

  const ModelConfig& config() const { return config_; }

  // Runs the plan: writes each token's K/V to its slot, and the logits of plan.logit_rows
  // (in that order) to `logits` ([logit_rows.size(), vocab]).
  void forward(const BatchPlan& plan, KvCache& cache, ThreadPool& pool, FloatBuffer* logits);
  // Whether a step of T rows may run either of two splits, picked by measured time (so its first
  // steps of that size try both): see run_parts.
  bool can_split_parts(int64_t T, const KvCache& cache, ThreadPool& pool) const;
  // Tests: run every step kernel by kernel, or phased wherever it may, instead of by measured time.
  enum class Split { kMeasured, kKernels, kParts };
  void set_split(Split split) { split_ = split; }

  // Replaces the four linear weight matrices of every layer by 4-bit ones (quant/q4.h) rounded to
  // nearest with a clip search, and frees the float ones. Their inputs then go as `act` says
  // (not kFmpq, which needs calibration).
  // progress (may be empty) is called after each layer with (layers done, layers).
  void quantize_weights_w4(int group_size, ActQuant act, const std::function<void(int, int)>& progress = {});
  // The same with GPTQ, layer by layer in GPTQ's sequential order over the calibration token
  // sequences (run through the model with `cache`, a float32 cache of at least the longest). For
  // kFmpq each linear's input channels are ordered by their calibration magnitude (the Hessian
  // diagonal), the weight's columns permuted to match, and the last a8_fraction of the activation
  // sub-groups kept in 8 bits.
  // gptq false: the weights are rounded to nearest (the calibration gives only kFmpq's order).
  void quantize_weights_w4_calibrated(const std::vector<std::vector<int32_t>>& seqs, KvCache& cache, ThreadPool& pool,
                                      int group_size, ActQuant act, double a8_fraction, bool gptq = true,
                                      const std::function<void(int, int)>& progress = {});
  // Memory the calibrated quantizer holds for one layer's Hessians.
  size_t layer_hessian_bytes() const;
  // Rounds the embedding and the head to 8 bits per row (part of every 4-bit scheme: a 4-bit
  // checkpoint stores them so).
  void round_embeddings_int8();
  bool quantized() const { return !w_.layers.empty() && w_.layers[0].qkv_q.n != 0; }
  // The quantized model as checkpoint tensors (Hugging Face names): per linear `.qweight` (U8,
  // [rows, padded_k / 2], quant/q4.h Q4Weight packing, columns in the input's stored order),
  // `.scales` (F32, [rows, groups]), `.zeros` (U8); w4a4 per linear input `.input_order` (I32,
  // [k]) and `.a8_subgroups` (I32, [1]) under self_attn.qkv_proj, self_attn.o_proj,
  // mlp.gate_up_proj and mlp.down_proj; embedding and head `.qweight` (I8) and `.scales` (F32,
  // [vocab]); norms and biases F32.
  std::vector<TensorOut> export_quantized() const;

 private:
  void compute_rope(const BatchPlan& plan);
  void prepare(const BatchPlan& plan);  // scratch sizes and RoPE tables for the plan
  // One decoder layer over the plan, in place on x_, kernel by kernel (each split across threads
  // where it is big enough).
  void run_layer(int l, const BatchPlan& plan, KvCache& cache, const int64_t* slots, ThreadPool& pool);
  // The final norm and the head of plan.logit_rows into logits.
  void head(const BatchPlan& plan, ThreadPool& pool, FloatBuffer* logits);
  // A small float model's layers and head as one phased job (ThreadPool::run_phases), four phases
  // per layer, each thread always on the same share: its kv heads (their q, k, v columns, RoPE, the
  // cache and attention), then its columns of o, of gate and up (and their product), of down, and
  // of the head. Its share of the weights stays in its core's L2, and one job replaces about six
  // per layer (most too small to split before, so they ran on one thread). The same kernels on
  // the same elements: the bits of run_layer and head. stories260K, 2 threads, against the row
  // split it replaced (docs/performance.md): batch 1 decode 57K -> 75K tok/s, 256-token prefill
  // 181K -> 229K where the VM's two vCPUs run in parallel, about equal where they share a core;
  // there it can be slower, so parts_timers_ pick it by measured time per range of rows (1, 2-3,
  // 4-7, ..., 64 and more).
  void run_parts(const BatchPlan& plan, KvCache& cache, const int64_t* slots, ThreadPool& pool, FloatBuffer* logits);
  int split_parts(ThreadPool& pool) const { return std::min(pool.num_threads(), config_.num_kv_heads); }
  std::array<SplitTimer, 7> parts_timers_;
  Split split_ = Split::kMeasured;
  cpu::AttentionParams attention_params(int l, const BatchPlan& plan, KvCache& cache);
  void quantize_layer_w4(int l, int group_size, const LayerHessian* h, double a8_fraction, bool gptq);
  // y[T, n] = x[T, k] W^T + b, through the float or the 4-bit weights, whichever the layer has.
  // input_quantized: xq_ already holds x quantized for q (produce).
  void linear(const float* x, int64_t T, int64_t k, const FloatBuffer& w, const Q4Tiled& q, const ActOrder& order,
              const FloatBuffer& b, float* y, int64_t n, ThreadPool& pool, bool input_quantized = false);
  // The 4-bit path of linear, its input quantized as `act` says.
  void qlinear(const float* x, int64_t T, int64_t k, const Q4Tiled& q, const ActOrder& order, const FloatBuffer& b,
               float* y, int64_t n, ActQuant act, ThreadPool& pool, bool input_quantized = false);
  // The W4A8 kernel's operands for q by the T rows quantized in xq_, into y ([T, n]).
  cpu::QLinearParams w4a8_params(const Q4Tiled& q, const float* bias, float* y, int64_t T, int64_t n) const;
  // Runs fn(a, e), which writes rows [a, e) of x ([T, k]), over chunks of rows across threads,
  // and when q takes 8- or 4-bit inputs quantizes each chunk into xq_ right after (while it is in
  // cache): the producer and the quantizer in one pass. Returns whether it quantized.
  bool produce(int64_t T, int64_t k, const float* x, const Q4Tiled& q, const ActOrder& order, ThreadPool& pool,
               const std::function<void(int64_t, int64_t)>& fn);
  void build_q8_head();
  void embed_row(int32_t token, float* out) const;  // the token's embedding, hidden floats

  ModelConfig config_;
  ModelWeights w_;
  std::vector<float> inv_freq_;
  // Scratch, grown to the largest step seen.
  FloatBuffer x_, h_, qkv_, attn_, mlp_, act_, cos_, sin_, rows_;
  FloatBuffer part_h_;  // run_parts: each part's normed rows
  A8Activations xq_;
  // 4-bit schemes: the head's 8-bit rows as two 4-bit halves (quant/q4.h q8_split_q4), and the
  // halves' outputs.
  Q4Tiled head_q_;
  FloatBuffer head_y_;
  // Float models: the head in the linear's panels. The row-major matrix it came from is dropped
  // (lm_head, or a tied embedding, read back from here) until a 4-bit scheme rounds it.
  FloatBuffer head_panels_;
  LayerHessian* hessians_ = nullptr;   // calibration: run_layer adds its inputs' Gram matrices
  bool hessian_diag_only_ = false;     // ... or only their diagonals
  ActQuant act_quant_ = ActQuant::kInt8;  // what the quantized linears take as input
};

// RoPE inverse frequencies as transformers computes them (float32), for each rope type.
std::vector<float> rope_inv_freq(const RopeConfig& rope, int head_dim);

}  // namespace accelcore
