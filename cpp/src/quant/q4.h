// The 4-bit weight and 8-bit activation formats of the quantized linear layers (COMET's W4Ax):
//
//  - Weights W [n, k]: asymmetric 4-bit groups of `group` input channels (a multiple of 32) along
//    k; each (row, group) has a float scale s and an integer zero point z in [0, 15], and
//    w ~= s * (q - z) with q in [0, 15]. k need not be a multiple of the group: the last group is
//    partial and the padding holds q = 0 (the activations' padding is 0, so it adds nothing).
//    Packing, per row and group, in chunks of 32 weights held in 16 bytes: byte j of a chunk has
//    weight j in its low nibble and weight j + 16 in its high nibble, so that one mask and one
//    shift give the chunk's 32 weights in order as bytes (what integer dot products consume).
//  - Activations X [m, k]: symmetric int8 per token and group of the same channels, scale
//    max|x| / 127, with each group's sum of q kept for the weights' zero points; or FMPQ's
//    sub-groups of those groups (a4_quantize below), each with its own scale and sum.
//
// The product of a row x and a weight row is, in this exact order (every kernel computes it so,
// whatever the instruction set and batch size):
//   y = bias; for each group g (one activation group: W4A8):
//     y = fma(s_w[g] * s_x[g], float(dot_g - z[g] * sum_x[g]), y)
// or with FMPQ's sub-groups a of g, the int32 sums scaled into a float sum first:
//   y = bias; for each group g: t = 0; for each sub-group a of g: t = fma(s_x[a], float(dot_a), t)
//     y = fma(s_w[g], fma(-float(z[g]), zsum_x[g], t), y)
// with dot the int32 sum of q_w * q_x over the (sub-)group and zsum_x[g] = the same fma chain
// over float(sum_x[a]) (A8Activations::zsums): per sub-group only a convert and an fma.
#pragma once

#include <cstdint>
#include <vector>

#include "util/buffer.h"

namespace accelcore {

struct Q4Weight {
  int64_t n = 0, k = 0, group = 0;
  int64_t groups() const { return (k + group - 1) / group; }
  int64_t padded_k() const { return groups() * group; }
  std::vector<uint8_t> packed;  // [n][groups][group / 2]
  std::vector<float> scales;    // [n][groups]
  std::vector<uint8_t> zeros;   // [n][groups], each in [0, 15]
};

// The 4-bit value of weight (row, i), unpacked.
uint8_t q4_at(const Q4Weight& w, int64_t row, int64_t i);

// Packs q (values in [0, 15], [n, padded_k]) into w.packed.
void q4_pack(const uint8_t* q, Q4Weight* w);

// Round to nearest per group: scale and zero point from each group's range, searched over
// shrinking clip ratios (1, 0.95, ... 0.75) for the least squared error when clip_search is set.
Q4Weight q4_quantize_rtn(const float* w, int64_t n, int64_t k, int64_t group, bool clip_search);

// GPTQ (Frantar et al., 2022): column by column, each column's rounding error is pushed onto the
// columns not yet quantized through the Cholesky factor of the inverse Hessian H = sum of x x^T
// over calibration inputs x ([k, k], row-major), so that x W^T, not W itself, stays close. The
// columns go by decreasing H[i][i] (act-order); each group's scale and zero point are fixed
// first, as q4_quantize_rtn's clip search chooses them. damp: added to H's diagonal, as a
// fraction of its mean (dead channels, H[i][i] = 0, get weight 0).
Q4Weight q4_quantize_gptq(const float* w, int64_t n, int64_t k, int64_t group, const double* h, double damp = 0.01);

// W as floats, [n, k].
std::vector<float> q4_dequantize(const Q4Weight& w);

// The CPU kernels' layout of a Q4Weight, built once at load: rows in blocks of 16 (the last block
// padded with zero rows), and within a block, group and step of 8 input channels, 64 bytes: byte
// 4 * r + c holds weight (row r, channel 8 j + c) in its low nibble and (r, 8 j + 4 + c) in its
// high one (c < 4). A mask or a shift then gives 16 rows x 4 consecutive channels as the 32-bit
// lanes that an integer dot-product instruction multiplies by 4 broadcast activations, so the
// lanes are output rows and no horizontal sum is needed. Scales and zero points per block and
// group, 16 rows contiguous.
struct Q4Tiled {
  static constexpr int64_t kRows = 16;
  int64_t n = 0, k = 0, group = 0, groups = 0;
  int64_t blocks() const { return (n + kRows - 1) / kRows; }
  std::vector<uint8_t, ArrayAllocator<uint8_t>> data;  // [blocks][groups][group / 8][64]
  std::vector<float> scales;    // [blocks][groups][16]
  std::vector<uint8_t> zeros;   // [blocks][groups][16]
};
Q4Tiled q4_tile(const Q4Weight& w);
// The 4-bit value of weight (row, i) in the tiled layout.
uint8_t q4_tiled_at(const Q4Tiled& t, int64_t row, int64_t i);
// The inverse of q4_tile (rows [row0, row0 + n) of it): the checkpoint's layout.
Q4Weight q4_untile(const Q4Tiled& t, int64_t row0, int64_t n);

// 8 bits per row, symmetric: w[r][i] ~= scale[r] * q[r][i], q in [-127, 127] (the embedding and
// the head of a 4-bit checkpoint). q8_dequantize gives the floats the engine then runs.
struct Q8Rows {
  int64_t n = 0, k = 0;
  std::vector<int8_t> q;      // [n][k]
  std::vector<float> scales;  // [n]
};
Q8Rows q8_quantize_rows(const float* w, int64_t n, int64_t k);
void q8_dequantize(const Q8Rows& r, float* w);
// 8-bit rows as 4-bit ones the W4A8 kernels run: q + 128 = 16 h + l with h, l in [0, 15], so row r
// of the result (r < n) holds h with scale 16 s and zero point 8, and row q8_split_lo(n) + r holds
// l with scale s and zero 0 (the low half starts at a whole 16-row block; the rows between are
// padding). Every integer product is exact: run as W4A8, the product with row r of the 8-bit
// weight is the sum of outputs r and q8_split_lo(n) + r; run as W8A8 (QLinearParams::w8_lo_block)
// it is one output, the halves summed as 16 h + l in integers.
inline int64_t q8_split_lo(int64_t n) { return (n + Q4Tiled::kRows - 1) / Q4Tiled::kRows * Q4Tiled::kRows; }
Q4Weight q8_split_q4(const Q8Rows& r, int64_t group);

struct A8Activations {
  int64_t m = 0, k = 0, group = 0;
  int64_t act_group = 0;  // channels per activation scale: group (a8_quantize) or kA4SubGroup
  int64_t groups() const { return (k + group - 1) / group; }
  int64_t padded_k() const { return groups() * group; }
  int64_t act_groups() const { return padded_k() / act_group; }
  std::vector<int8_t> q;      // [m][padded_k], zero past k
  std::vector<float> scales;  // [m][act_groups]
  std::vector<int32_t> sums;  // [m][act_groups]: sum of q over the activation group
  // Sub-groups (act_group < group): per weight group, the fma chain over its sub-groups a in
  // order of c = fma(scale_a, float(sum_a), c) from 0: the zero points' term, folded.
  std::vector<float> zsums;   // [m][groups]
};

// Quantizes rows x[i * ldx, + k) (i < m) into a (buffers reused), one scale per weight group.
void a8_quantize(const float* x, int64_t m, int64_t k, int64_t ldx, int64_t group, A8Activations* a);
// The same in two steps, so that rows can be quantized as their producer writes them (by
// threads, each its own rows): sizing a for m rows, then rows [r0, r1).
void a8_resize(A8Activations* a, int64_t m, int64_t k, int64_t group, int64_t act_group);
void a8_quantize_rows(const float* x, int64_t r0, int64_t r1, int64_t ldx, A8Activations* a);

// FMPQ activations (COMET's W4Ax): channel i of the quantized row is x[perm[i]] (outlier channels
// last; perm null: identity), in sub-groups of kA4SubGroup channels with a float scale each, the
// last a8_subgroups of them (of the k / kA4SubGroup, rounded up) in 8 bits ([-127, 127]) and the
// others in 4 (all 16 levels, [-8, 7]: the scale is the larger of max / 7 and -min / 8); held in
// int8, since a CPU has no narrower integer dot product. Sub-groups of 8 (not 16) are what it takes
// on stories260K to come near the w4a4kv4 bar.
constexpr int64_t kA4SubGroup = 8;
void a4_quantize(const float* x, int64_t m, int64_t k, int64_t ldx, int64_t group, const int32_t* perm,
                 int64_t a8_subgroups, A8Activations* a);
// Rows [r0, r1) of a sized by a8_resize(a, m, k, group, kA4SubGroup).
void a4_quantize_rows(const float* x, int64_t r0, int64_t r1, int64_t ldx, const int32_t* perm, int64_t a8_subgroups,
                      A8Activations* a);

}  // namespace accelcore
