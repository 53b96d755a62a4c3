// Storage of the paged KV cache: per layer, a K pool laid out
// [num_blocks][num_kv_heads][head_dim][block_size] (transposed within a block, so attention scores
// a whole block with one vector operation per channel) and a V pool
// [num_blocks][num_kv_heads][block_size][head_dim].
#pragma once

#include <vector>

#include "util/buffer.h"

namespace accelcore {

struct KvCacheShape {
  int num_layers = 0, num_blocks = 0, num_kv_heads = 0, block_size = 0, head_dim = 0;
  size_t floats_per_layer() const {
    return static_cast<size_t>(num_blocks) * num_kv_heads * block_size * head_dim;
  }
  // Bytes one block costs across all layers, K and V.
  size_t bytes_per_block() const {
    return 2ull * num_layers * num_kv_heads * block_size * head_dim * sizeof(float);
  }
};

class KvCache {
 public:
  explicit KvCache(const KvCacheShape& shape);
  const KvCacheShape& shape() const { return shape_; }
  float* k(int layer) { return k_[layer].data(); }
  float* v(int layer) { return v_[layer].data(); }
  // Moves one token's K and V, in every layer, from slot src to slot dst (verified draft nodes).
  void copy_slot(int64_t src, int64_t dst);

 private:
  KvCacheShape shape_;
  std::vector<FloatBuffer> k_, v_;
};

}  // namespace accelcore
