#include "kv/kv_cache.h"

#include <algorithm>
#include <cstring>

#include "backend/cpu/ops.h"
#include "util/check.h"

namespace accelcore {

KvCache::KvCache(const KvCacheShape& shape) : shape_(shape) {
  ACCEL_CHECK(shape.kv_bits == 0 || shape.kv_bits == 4 || shape.kv_bits == 8, InvalidArgument)
      << "KV cache bits must be 0 (float32), 4 or 8, got " << shape.kv_bits;
  k_.resize(shape.num_layers);
  v_.resize(shape.num_layers);
  if (!quantized()) {
    // Not zeroed: a slot is always written before any token attends to it, and untouched pages of
    // a large pool then cost no memory.
    for (int l = 0; l < shape.num_layers; ++l) {
      k_[l].resize(shape.num_blocks * shape.floats_per_block());
      v_[l].resize(shape.num_blocks * shape.floats_per_block());
    }
    return;
  }
  ACCEL_CHECK(shape.head_dim % 2 == 0, InvalidArgument) << "a quantized KV cache needs an even head_dim";
  q_.resize(shape.num_layers);
  const size_t bytes = static_cast<size_t>(shape.num_blocks) * shape.num_kv_heads * shape.layout().bytes;
  for (auto& q : q_) q.reset(new uint8_t[bytes]);  // uninitialised, like the float pools
  stage_.assign(shape.num_blocks, -1);
  is_quantized_.assign(shape.num_blocks, 0);
}

size_t KvCache::bytes() const {
  const size_t stage_floats = quantized() ? stage_block_.size() : shape_.num_blocks;
  size_t b = 2ull * shape_.num_layers * stage_floats * shape_.floats_per_block() * sizeof(float);
  if (quantized()) b += static_cast<size_t>(shape_.num_layers) * shape_.num_blocks * shape_.num_kv_heads * shape_.layout().bytes;
  return b;
}

void KvCache::give_stage(int32_t block) {
  if (free_stages_.empty()) {
    // Grow every layer's staging pools, keeping their contents (staged blocks stay staged).
    const size_t old_n = stage_block_.size(), new_n = std::max<size_t>(8, 2 * old_n), fpb = shape_.floats_per_block();
    for (auto* pools : {&k_, &v_})
      for (FloatBuffer& b : *pools) {
        FloatBuffer grown(new_n * fpb);
        if (old_n) std::memcpy(grown.data(), b.data(), old_n * fpb * sizeof(float));
        // Zeroed: a stage given to a block nothing wrote (the start-up timing passes) is read.
        std::memset(grown.data() + old_n * fpb, 0, (new_n - old_n) * fpb * sizeof(float));
        b = std::move(grown);
      }
    stage_block_.resize(new_n, -1);
    for (size_t s = new_n; s-- > old_n;) free_stages_.push_back(static_cast<int32_t>(s));
  }
  const int32_t s = free_stages_.back();
  free_stages_.pop_back();
  stage_[block] = s;
  stage_block_[s] = block;
}

void KvCache::drop_stage(int32_t block) {
  const int32_t s = stage_[block];
  if (s < 0) return;
  stage_block_[s] = -1;
  free_stages_.push_back(s);
  stage_[block] = -1;
}

void KvCache::zero_blocks(int32_t count) {
  ACCEL_DCHECK(count >= 0 && count <= shape_.num_blocks);
  if (quantized()) {
    const size_t bytes = static_cast<size_t>(shape_.num_kv_heads) * shape_.layout().bytes;
    for (auto& q : q_) std::memset(q.get(), 0, bytes * count);
    return;
  }
  const size_t floats = static_cast<size_t>(count) * shape_.floats_per_block();
  for (auto* pools : {&k_, &v_})
    for (FloatBuffer& b : *pools) std::memset(b.data(), 0, floats * sizeof(float));
}

void KvCache::reset() {
  for (int32_t b = 0; b < shape_.num_blocks && quantized(); ++b) {
    drop_stage(b);
    is_quantized_[b] = 0;
  }
}

void KvCache::quantize_blocks(int layer, const std::vector<int32_t>& blocks, ThreadPool& pool) {
  if (blocks.empty()) return;
  const KvqLayout lay = shape_.layout();
  const int heads = shape_.num_kv_heads;
  const int64_t head_floats = static_cast<int64_t>(shape_.block_size) * shape_.head_dim;
  const int64_t items = static_cast<int64_t>(blocks.size()) * heads;
  auto run = [&](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i) {
      const int32_t block = blocks[i / heads];
      const int h = static_cast<int>(i % heads);
      ACCEL_DCHECK(stage_[block] >= 0);
      const int64_t src = (static_cast<int64_t>(stage_[block]) * heads + h) * head_floats;
      kvq_quantize(lay, k_[layer].data() + src, v_[layer].data() + src,
                   q_[layer].get() + (static_cast<int64_t>(block) * heads + h) * lay.bytes);
    }
  };
  if (items * head_floats < (1 << 14)) run(0, items);
  else pool.parallel_for(items, 1, run);
}

void KvCache::release(const std::vector<int32_t>& blocks, const std::vector<uint8_t>& full, ThreadPool& pool) {
  if (!quantized()) return;
  ACCEL_DCHECK(blocks.size() == full.size() && to_quantize_.empty());
  for (size_t i = 0; i < blocks.size(); ++i)
    if (stage_[blocks[i]] >= 0 && full[i] && !is_quantized_[blocks[i]]) to_quantize_.push_back(blocks[i]);
  for (int l = 0; l < shape_.num_layers; ++l) quantize_blocks(l, to_quantize_, pool);
  for (int32_t b : to_quantize_) is_quantized_[b] = 1;
  to_quantize_.clear();
  for (size_t i = 0; i < blocks.size(); ++i) {
    drop_stage(blocks[i]);
    if (!full[i]) is_quantized_[blocks[i]] = 0;
  }
}

void KvCache::begin_step(const BatchPlan& plan) {
  ACCEL_DCHECK(quantized());
  const int bs = shape_.block_size;
  // Every block written gets a stage; one written while marked quantized was reallocated.
  const int T = plan.num_tokens();
  slots_.resize(T);
  for (int t = 0; t < T; ++t) {
    const int32_t b = static_cast<int32_t>(plan.slots[t] / bs);
    if (stage_[b] < 0) give_stage(b);
    is_quantized_[b] = 0;
    slots_[t] = map_slot(plan.slots[t]);
  }
  extra_slots_.resize(plan.extra_slots.size());
  for (size_t i = 0; i < plan.extra_slots.size(); ++i) {
    ACCEL_DCHECK(stage_[plan.extra_slots[i] / bs] >= 0);
    extra_slots_[i] = map_slot(plan.extra_slots[i]);
  }

  // Per sequence: a token at position p reads blocks [0, p / bs) quantized. Blocks below the
  // furthest such bound not yet quantized are quantized in this step (they are quantized in
  // position order, so a downward scan stops at the first done); blocks below the sequence's
  // first position are never read in float again by it.
  const int S = plan.num_seqs();
  std::vector<int32_t> lo(S, INT32_MAX), hi(S, -1);
  for (int t = 0; t < T; ++t) {
    const int s = plan.seq_of_token[t], p = plan.positions[t];
    lo[s] = std::min(lo[s], p);
    hi[s] = std::max(hi[s], p);
  }
  to_unstage_.clear();
  for (int s = 0; s < S; ++s) {
    if (hi[s] < 0) continue;
    const int32_t* table = plan.block_tables.data() + plan.block_table_offset[s];
    for (int b = hi[s] / bs - 1; b >= 0 && !is_quantized_[table[b]]; --b) {
      // A block read but never written happens only in the engine's start-up timing passes (their
      // contexts are made up); give it a stage so that its (meaningless) quantization stays in bounds.
      if (stage_[table[b]] < 0) give_stage(table[b]);
      is_quantized_[table[b]] = 2;  // pending: listed once, however many sequences share it
      to_quantize_.push_back(table[b]);
    }
    for (int b = lo[s] / bs - 1; b >= 0 && stage_[table[b]] >= 0; --b) to_unstage_.push_back(table[b]);
  }
}

void KvCache::quantize_layer(int layer, ThreadPool& pool) { quantize_blocks(layer, to_quantize_, pool); }

void KvCache::end_step() {
  for (int32_t b : to_quantize_) is_quantized_[b] = 1;
  for (int32_t b : to_unstage_) {
    ACCEL_DCHECK(is_quantized_[b] == 1);
    drop_stage(b);
  }
  to_quantize_.clear();
  to_unstage_.clear();
}

void KvCache::copy_slot(int64_t src, int64_t dst) {
  if (quantized()) {
    ACCEL_DCHECK(stage_[src / shape_.block_size] >= 0 && stage_[dst / shape_.block_size] >= 0);
    src = map_slot(src);
    dst = map_slot(dst);
  }
  for (int l = 0; l < shape_.num_layers; ++l)
    cpu::copy_kv_slot({k(l), v(l), shape_.num_kv_heads, shape_.head_dim, shape_.block_size}, src, dst);
}

}  // namespace accelcore
