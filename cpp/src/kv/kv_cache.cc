#include "kv/kv_cache.h"

#include "backend/cpu/ops.h"

namespace accelcore {

KvCache::KvCache(const KvCacheShape& shape) : shape_(shape) {
  k_.resize(shape.num_layers);
  v_.resize(shape.num_layers);
  // Not zeroed: a slot is always written before any token attends to it, and untouched pages of
  // a large pool then cost no memory.
  for (int l = 0; l < shape.num_layers; ++l) {
    k_[l].resize(shape.floats_per_layer());
    v_[l].resize(shape.floats_per_layer());
  }
}

void KvCache::copy_slot(int64_t src, int64_t dst) {
  for (int l = 0; l < shape_.num_layers; ++l)
    cpu::copy_kv_slot({k(l), v(l), shape_.num_kv_heads, shape_.head_dim, shape_.block_size}, src, dst);
}

}  // namespace accelcore
