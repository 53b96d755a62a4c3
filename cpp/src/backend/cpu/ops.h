// CPU kernels. Each takes plain pointers and a Params struct; shapes were validated by the caller
// (the model), so kernels only DCHECK. Every kernel computes each output element with an
// instruction sequence that does not depend on the batch size or the thread split, which is what
// makes batching bit-exact.
#pragma once

#include <cmath>
#include <cstdint>

#include "util/thread_pool.h"

namespace accelcore::cpu {

// The float linear's weight layout: panels of kLinearPanel output columns, each [k][kLinearPanel]
// row-major (panel q holds columns 16 q .. 16 q + 15, zero past n), so a kernel reads one vector
// per input channel for 16 outputs.
constexpr int kLinearPanel = 16;
inline int64_t linear_packed_size(int64_t n, int64_t k) {
  return (n + kLinearPanel - 1) / kLinearPanel * kLinearPanel * k;
}
// w [n, k] row-major (the Hugging Face layout) into panels (linear_packed_size(n, k) floats), and back.
void linear_pack(const float* w, int64_t n, int64_t k, float* packed);
void linear_unpack(const float* packed, int64_t n, int64_t k, float* w);

// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]); x row stride ldx, y row stride ldy.
struct LinearParams {
  const float* x = nullptr;
  const float* w = nullptr;     // panels (linear_pack)
  const float* bias = nullptr;  // [n] or null
  float* y = nullptr;
  int64_t m = 0, n = 0, k = 0;
  int64_t ldx = 0, ldy = 0;
};
void linear(const LinearParams& p, ThreadPool& pool);
// Output columns [n0, n1) only (any bounds; the same bits as linear()), on the calling thread.
void linear_columns(const LinearParams& p, int64_t n0, int64_t n1);
// The single-ISA kernels behind linear(), over output columns [n0, n1); exposed for tests. All give
// the same bits (linear_impl.h).
void linear_scalar(const LinearParams& p, int64_t n0, int64_t n1);
void linear_avx2(const LinearParams& p, int64_t n0, int64_t n1);
void linear_avx512(const LinearParams& p, int64_t n0, int64_t n1);

// Quantized linear, 4-bit weights by 8-bit activations (formats and exact arithmetic in
// quant/q4.h; the weights in its tiled layout, Q4Tiled): y[m, n] = sum over groups of the int32
// group products, scaled in float.
struct QLinearParams {
  const int8_t* xq = nullptr;        // [m][groups * group], zero past k
  // Activation scales and sums per act_group channels (a divisor of group, a multiple of 8; 0:
  // group): FMPQ's 4-bit sub-groups. Each is its own int32 sum, scaled in float.
  const float* x_scales = nullptr;   // [m][groups * group / act_group]
  const int32_t* x_sums = nullptr;   // [m][groups * group / act_group]
  const float* x_zsums = nullptr;    // act_group < group: [m][groups], A8Activations::zsums
  const uint8_t* w = nullptr;        // Q4Tiled::data
  const float* w_scales = nullptr;   // Q4Tiled::scales
  const uint8_t* w_zeros = nullptr;  // Q4Tiled::zeros
  const float* bias = nullptr;       // [n] or null
  float* y = nullptr;
  int64_t m = 0, n = 0, groups = 0, group = 0, ldy = 0;
  int64_t act_group = 0;
  // W8A8 on 8-bit rows split into 4-bit halves (quant/q4.h q8_split_q4), where not 0: output block
  // b (16 outputs) sums 16 x block b and block b + w8_lo_block of w in integers per group (one
  // 8-bit product), finished with block b + w8_lo_block's scales and zero points 16 z_b + z_lo.
  // Weight-group activations only (act_group 0 or group).
  int64_t w8_lo_block = 0;
};
void qlinear_w4a8(const QLinearParams& p, ThreadPool& pool);
// The single-ISA kernels behind qlinear_w4a8(), over output columns [n0, n1) (n0 a multiple of
// 16); exposed for tests.
void qlinear_w4a8_scalar(const QLinearParams& p, int64_t n0, int64_t n1);
void qlinear_w4a8_avx2(const QLinearParams& p, int64_t n0, int64_t n1);
void qlinear_w4a8_avxvnni(const QLinearParams& p, int64_t n0, int64_t n1);
void qlinear_w4a8_avx512vnni(const QLinearParams& p, int64_t n0, int64_t n1);

// W4A8 activation quantization (quant/q4.h a8_quantize_rows) of n whole groups of `group` floats
// at x (a multiple of 32) into q, with each group's scale and int32 sum: AVX-512 or AVX2, the same
// bits as the scalar code, which a8_quantize_rows runs on other machines and for a last partial group.
void a8_quantize_groups_avx512(const float* x, int64_t n, int64_t group, int8_t* q, float* scales, int32_t* sums);
void a8_quantize_groups_avx2(const float* x, int64_t n, int64_t group, int8_t* q, float* scales, int32_t* sums);  // likewise
// FMPQ activation quantization (quant/q4.h a4_quantize_rows) of one row x of k channels: its
// `subgroups` 8-channel sub-groups (for AVX-512 an even number) through perm (or none), 8 bits
// from sub-group first8 on, into q, with each sub-group's scale and sum. AVX-512 or AVX2, the
// scalar code's bits.
void a4_quantize_subgroups_avx512(const float* x, int64_t k, const int32_t* perm, int64_t subgroups, int64_t first8,
                                  int8_t* q, float* scales, int32_t* sums);
void a4_quantize_subgroups_avx2(const float* x, int64_t k, const int32_t* perm, int64_t subgroups, int64_t first8,
                                int8_t* q, float* scales, int32_t* sums);  // likewise

// Quantized linear, 4-bit weights (Q4Tiled) by float activations: per output, in channel order,
// y = fma(s * float(q - z), x, y) starting from the bias (qlinear_w4a16_impl.h).
struct QLinear16Params {
  const float* x = nullptr;  // [m, k], row stride ldx
  const uint8_t* w = nullptr;        // Q4Tiled::data
  const float* w_scales = nullptr;   // Q4Tiled::scales
  const uint8_t* w_zeros = nullptr;  // Q4Tiled::zeros
  const float* bias = nullptr;
  float* y = nullptr;
  int64_t m = 0, n = 0, k = 0, groups = 0, group = 0, ldx = 0, ldy = 0;
};
void qlinear_w4a16(const QLinear16Params& p, ThreadPool& pool);
// The single-ISA kernels behind it (the float ISA, Isa), over output columns [n0, n1), n0 a
// multiple of 16; exposed for tests.
void qlinear_w4a16_scalar(const QLinear16Params& p, int64_t n0, int64_t n1);
void qlinear_w4a16_avx2(const QLinear16Params& p, int64_t n0, int64_t n1);
void qlinear_w4a16_avx512(const QLinear16Params& p, int64_t n0, int64_t n1);

// out[m, :] = x[m, :] / rms(x[m, :]) * weight; x and out may alias.
struct RmsNormParams {
  const float* x = nullptr;
  const float* weight = nullptr;
  float* out = nullptr;
  int64_t m = 0, d = 0;
  float eps = 1e-6f;
};
void rms_norm(const RmsNormParams& p);
// The single-ISA kernels behind rms_norm(), all with the same bits; exposed for tests.
void rms_norm_scalar(const RmsNormParams& p);
void rms_norm_avx2(const RmsNormParams& p);
void rms_norm_avx512(const RmsNormParams& p);

// Rotary embedding in the rotate_half convention, in place on [m, num_heads, head_dim] rows.
// cos/sin: [m, head_dim / 2] for each row's position.
struct RopeParams {
  float* x = nullptr;
  int64_t m = 0, num_heads = 0, head_dim = 0, ld = 0;  // ld: row stride of x
  const float* cos = nullptr;
  const float* sin = nullptr;
};
void apply_rope(const RopeParams& p);

// gate_up: [m, 2 * d] (gate then up); out[m, d] = silu(gate) * up, in columns [i0, i1) (i1 -1: d)
// only, each element computed alone (the same bits whatever the range).
void silu_mul(const float* gate_up, float* out, int64_t m, int64_t d, int64_t i0 = 0, int64_t i1 = -1);
// The single-ISA kernels behind silu_mul(), all with the same bits; exposed for tests.
void silu_mul_scalar(const float* gate_up, float* out, int64_t m, int64_t d, int64_t i0 = 0, int64_t i1 = -1);
void silu_mul_avx2(const float* gate_up, float* out, int64_t m, int64_t d, int64_t i0 = 0, int64_t i1 = -1);
void silu_mul_avx512(const float* gate_up, float* out, int64_t m, int64_t d, int64_t i0 = 0, int64_t i1 = -1);

// A sampler's softmax numerators over a row of n logits x: out[i] = exp((x[i] - max) *
// inv_temperature) in double (within a few ulp of std::exp; 0 below exp(-708)), or 0 where x[i] <
// threshold (top-k); returns the sum of out. The same bits on every path.
struct SoftmaxExpParams {
  const float* x = nullptr;
  double* out = nullptr;
  int64_t n = 0;
  double max = 0, inv_temperature = 1, threshold = -INFINITY;
};
double softmax_exps(const SoftmaxExpParams& p);
// The single-ISA kernels behind softmax_exps(); exposed for tests.
double softmax_exps_scalar(const SoftmaxExpParams& p);
double softmax_exps_avx2(const SoftmaxExpParams& p);
double softmax_exps_avx512(const SoftmaxExpParams& p);

// Paged attention over a ragged batch. The KV pool of one layer holds K as
// [num_blocks][num_kv_heads][head_dim][block_size] (transposed within a block) and V as
// [num_blocks][num_kv_heads][block_size][head_dim]. Token t belongs to sequence
// seq_of_token[t], sits at position positions[t], and attends to cache positions
// [max(0, pos - window + 1), pos] (window 0: all), read through that sequence's block table.
struct AttentionParams {
  const float* q = nullptr;  // [num_tokens, num_heads * head_dim], row stride ldq
  float* out = nullptr;      // [num_tokens, num_heads * head_dim]
  const float* k_cache = nullptr;
  const float* v_cache = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* seq_of_token = nullptr;
  const int32_t* block_tables = nullptr;      // flattened
  const int32_t* block_table_offset = nullptr;  // per sequence, into block_tables
  int64_t num_tokens = 0, ldq = 0;
  int num_heads = 0, num_kv_heads = 0, head_dim = 0, block_size = 0;
  int window = 0;
  float scale = 1.0f;
  // Draft-tree tokens (null when none): token t's tree ancestors and itself sit at
  // extra_slots[extra_offset[t] .. extra_offset[t + 1]) in depth order, at positions
  // pos - n_extra + 1 .. pos; such a token reads the context in order only up to pos - n_extra
  // (and on through those of its first extras that sit at their positions' slots). Its
  // sequence's block table covers its position all the same.
  const int32_t* extra_offset = nullptr;  // [num_tokens + 1]
  const int64_t* extra_slots = nullptr;
  // Quantized KV cache (kv/kv_cache.h; kv_bits 4 or 8, else 0): a token reads the blocks before
  // its own from kv_records ([num_blocks][num_kv_heads] records, quant/kvq.h) and its own block
  // from the float pools above, where block b sits at index stage_of_block[b] (null: at b). The
  // extra slots then index the float pools directly.
  int kv_bits = 0;
  const uint8_t* kv_records = nullptr;
  const int32_t* stage_of_block = nullptr;
};
void paged_attention(const AttentionParams& p, ThreadPool& pool);
// paged_attention() for every token's kv heads [kvh0, kvh1) (and their query heads) only, on the
// calling thread.
void paged_attention_kv_heads(const AttentionParams& p, int kvh0, int kvh1);
// The single-ISA kernels behind paged_attention(), over (token, kv head) items [begin, end) with
// item = token * num_kv_heads + kv_head; exposed for tests.
void attention_scalar(const AttentionParams& p, int64_t item_begin, int64_t item_end);
void attention_avx2(const AttentionParams& p, int64_t item_begin, int64_t item_end);
void attention_avx512(const AttentionParams& p, int64_t item_begin, int64_t item_end);

// Writes K and V rows of this step into the pool at the given slots (slot = block * bs + offset),
// in the layouts paged_attention reads.
struct KvWriteParams {
  const float* k = nullptr;  // [num_tokens, num_kv_heads * head_dim], row stride ld
  const float* v = nullptr;
  int64_t ld = 0;
  float* k_cache = nullptr;
  float* v_cache = nullptr;
  const int64_t* slots = nullptr;
  int64_t num_tokens = 0;
  int num_kv_heads = 0, head_dim = 0, block_size = 0;
  int head_begin = 0, head_end = -1;  // the kv heads written (-1: to the last)
};
void write_kv(const KvWriteParams& p);

// Copies one token's K and V (every layer's pool) from slot src to slot dst.
struct KvCopyParams {
  float* k_cache = nullptr;
  float* v_cache = nullptr;
  int num_kv_heads = 0, head_dim = 0, block_size = 0;
};
void copy_kv_slot(const KvCopyParams& p, int64_t src, int64_t dst);

// out[i, :] = x[i, :] + y[i, :]
void add_inplace(float* x, const float* y, int64_t n);

}  // namespace accelcore::cpu
