#include "kv/kv_cache.h"

namespace accelcore {

KvCache::KvCache(const KvCacheShape& shape) : shape_(shape) {
  k_.resize(shape.num_layers);
  v_.resize(shape.num_layers);
  for (int l = 0; l < shape.num_layers; ++l) {
    // Zeroed so that a stray read of an unwritten slot is a wrong number, never a NaN from garbage.
    k_[l].resize(shape.floats_per_layer());
    k_[l].zero();
    v_[l].resize(shape.floats_per_layer());
    v_[l].zero();
  }
}

}  // namespace accelcore
