// Storage of the paged KV cache.
//
// Float (kv_bits 0): per layer, a K pool laid out [num_blocks][num_kv_heads][head_dim][block_size]
// (transposed within a block, so attention scores a whole block with one vector operation per
// channel) and a V pool [num_blocks][num_kv_heads][block_size][head_dim].
//
// Quantized (kv_bits 8 or 4): per layer, one record per (block, kv head) in the format of
// quant/kvq.h. A token reads the blocks before its own from those records and its own block (the
// one being filled) in float, so a block is quantized once, from all its tokens, when it is full:
// the result depends only on the block's contents, and every reading of a position is the same
// whether it comes alone, batched, drafted or after a prefix-cache hit. The float forms live in a
// staging pool (the float layout, indexed by stage) that only the blocks being written hold: a
// block gets a stage when a step writes to it and loses it once every sequence holding it reads
// it quantized. Draft nodes stay inside their root's next block (the scheduler bounds their
// depth), so their K/V is always read in float.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "quant/kvq.h"
#include "sched/batch_plan.h"
#include "util/buffer.h"
#include "util/thread_pool.h"

namespace accelcore {

struct KvCacheShape {
  int num_layers = 0, num_blocks = 0, num_kv_heads = 0, block_size = 0, head_dim = 0;
  int kv_bits = 0;  // 0: float32; 8 or 4: quantized records
  size_t floats_per_block() const { return static_cast<size_t>(num_kv_heads) * block_size * head_dim; }
  KvqLayout layout() const { return kvq_layout(kv_bits, head_dim, block_size); }
  // Bytes one block costs across all layers, K and V (a float block's, or a quantized one's
  // records; staging is extra, a few blocks per running request).
  size_t bytes_per_block() const {
    if (kv_bits == 0) return 2ull * num_layers * floats_per_block() * sizeof(float);
    return static_cast<size_t>(num_layers) * num_kv_heads * layout().bytes;
  }
};

class KvCache {
 public:
  explicit KvCache(const KvCacheShape& shape);
  const KvCacheShape& shape() const { return shape_; }
  bool quantized() const { return shape_.kv_bits != 0; }

  // The float pools: indexed by block (float cache) or by stage (quantized cache).
  float* k(int layer) { return k_[layer].data(); }
  float* v(int layer) { return v_[layer].data(); }
  // Quantized cache only: the records of a layer, and each block's stage (-1: none).
  const uint8_t* records(int layer) const { return q_[layer].get(); }
  const int32_t* stage_of_block() const { return stage_.data(); }

  // Quantized cache. release(): blocks whose last holder let go lose their stages (a full one the
  // prefix cache keeps is quantized first, if no step did). Around each forward pass: begin_step
  // gives every block the step writes a stage and maps the plan's slots to staging slots
  // (slots(), extra_slots()); after layer l's K/V is written, quantize_layer(l) quantizes the
  // blocks some token of the step reads quantized for the first time; end_step then frees the
  // stages no sequence of the step will read again.
  void release(const std::vector<int32_t>& blocks, const std::vector<uint8_t>& full, ThreadPool& pool);
  void begin_step(const BatchPlan& plan);
  void quantize_layer(int layer, ThreadPool& pool);
  void end_step();
  const int64_t* slots(const BatchPlan& plan) const { return quantized() ? slots_.data() : plan.slots.data(); }
  const int64_t* extra_slots(const BatchPlan& plan) const {
    return quantized() ? extra_slots_.data() : plan.extra_slots.data();
  }
  // Forgets every block's state (after start-up passes that used the pool without allocating).
  void reset();
  // Zeroes blocks [0, count): K and V, or their quantized records. The start-up timing passes read
  // made-up contexts that nothing wrote, and whatever freed memory held there (denormals, NaNs)
  // made their floating point seconds slower, now and then.
  void zero_blocks(int32_t count);

  // Moves one token's K and V, in every layer, from slot src to slot dst (verified draft nodes;
  // both in blocks the last step wrote).
  void copy_slot(int64_t src, int64_t dst);

  int num_stages() const { return static_cast<int>(stage_block_.size()); }
  int num_staged_blocks() const { return num_stages() - static_cast<int>(free_stages_.size()); }
  size_t bytes() const;  // all pools, staging included

 private:
  int64_t map_slot(int64_t slot) const {
    return static_cast<int64_t>(stage_[slot / shape_.block_size]) * shape_.block_size + slot % shape_.block_size;
  }
  void give_stage(int32_t block);
  void drop_stage(int32_t block);
  void quantize_blocks(int layer, const std::vector<int32_t>& blocks, ThreadPool& pool);

  KvCacheShape shape_;
  std::vector<FloatBuffer> k_, v_;
  std::vector<std::unique_ptr<uint8_t[]>> q_;
  // Quantized cache state.
  std::vector<int32_t> stage_;        // per block
  std::vector<uint8_t> is_quantized_;  // per block: its records hold its current contents
  std::vector<int32_t> stage_block_;  // per stage: its block (-1: free)
  std::vector<int32_t> free_stages_;
  std::vector<int32_t> to_quantize_, to_unstage_;  // this step's
  std::vector<int64_t> slots_, extra_slots_;
};

}  // namespace accelcore
