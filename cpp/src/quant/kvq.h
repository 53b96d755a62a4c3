// The quantized KV cache format (kv8, kv4): one record per (block, kv head) of a layer.
//
// Keys are quantized per channel over the block's tokens (KIVI): after RoPE some channels carry
// large offsets that per-token scales would spread over every other channel (stories260K: top-1
// 74% with keys per token and head in 4 bits, 97% per channel). Each channel c has its own step
// and offset, k = step_c * q + min_c, coded in two levels so 4-bit keys cost 5 bits a value
// rather than 6: step_c = k_step_unit * sc_c and min_c = k_min_base + k_min_unit * mc_c with 8-bit
// sc_c, mc_c and three floats per record. Values are quantized per token and head: v = step_t *
// (q - zero_t), a bfloat16 step (rounded up) and an integer zero point.
//
// Record layout (bytes, in this order): k_step_unit, k_min_base, k_min_unit (3 float32);
// v_step (block_size bfloat16); sc, mc (head_dim bytes each); v_zero (block_size bytes); K codes
// [head_dim][block_size] (transposed, as the float pool), then V codes [block_size][head_dim],
// each `bits` wide and packed two to a byte for 4 bits (element i of the array in byte i / 2,
// low nibble first).
#pragma once

#include <cstddef>
#include <cstdint>

namespace accelcore {

struct KvqLayout {
  int bits = 0, head_dim = 0, block_size = 0;
  size_t v_step = 0, sc = 0, mc = 0, v_zero = 0, k_codes = 0, v_codes = 0, bytes = 0;
  int qmax() const { return (1 << bits) - 1; }
};

KvqLayout kvq_layout(int bits, int head_dim, int block_size);

// Writes one record from a float head slice: kt [head_dim][block_size], v [block_size][head_dim].
void kvq_quantize(const KvqLayout& l, const float* kt, const float* v, uint8_t* rec);
// The inverse, into the same float layouts (what the attention kernels compute, from
// kvq_dequant_impl.h).
void kvq_dequantize_k(const KvqLayout& l, const uint8_t* rec, float* kt);
void kvq_dequantize_v(const KvqLayout& l, const uint8_t* rec, float* v);

}  // namespace accelcore
