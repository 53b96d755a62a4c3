// The pool of KV blocks: which are free, and how many holders each allocated block has
// (reference counts let requests share prefix blocks). Pure bookkeeping; storage is KvCache.
#pragma once

#include <cstdint>
#include <vector>

namespace accelcore {

class BlockAllocator {
 public:
  explicit BlockAllocator(int num_blocks);

  int num_total() const { return static_cast<int>(ref_.size()); }
  int num_free() const { return static_cast<int>(free_.size()); }

  // Returns a block with reference count 1, or -1 when none is free.
  int32_t allocate();
  // Allocates n blocks into out (appended) or none at all; returns whether it succeeded.
  bool allocate(int n, std::vector<int32_t>* out);
  void add_ref(int32_t block);
  // Drops one reference; the block returns to the free list at zero. Throws InternalError on a
  // double free or an id out of range.
  void release(int32_t block);
  void release_all(std::vector<int32_t>* blocks);  // releases each and clears the vector
  int ref_count(int32_t block) const;

 private:
  std::vector<int32_t> free_;  // a stack: recently freed blocks are reused first (warm in cache)
  std::vector<int32_t> ref_;
};

}  // namespace accelcore
