#include "kv/block_allocator.h"

#include "util/check.h"

namespace accelcore {

BlockAllocator::BlockAllocator(int num_blocks) : ref_(num_blocks > 0 ? num_blocks : 0, 0) {
  ACCEL_CHECK(num_blocks > 0, InvalidArgument) << "the KV pool needs at least one block, got " << num_blocks;
  free_.reserve(num_blocks);
  for (int i = num_blocks - 1; i >= 0; --i) free_.push_back(i);
}

int32_t BlockAllocator::allocate() {
  if (free_.empty()) return -1;
  int32_t b = free_.back();
  free_.pop_back();
  ACCEL_DCHECK(ref_[b] == 0);
  ref_[b] = 1;
  return b;
}

bool BlockAllocator::allocate(int n, std::vector<int32_t>* out) {
  if (n > num_free()) return false;
  for (int i = 0; i < n; ++i) out->push_back(allocate());
  return true;
}

void BlockAllocator::add_ref(int32_t block) {
  ACCEL_DCHECK(block >= 0 && block < num_total() && ref_[block] > 0);
  ++ref_[block];
}

void BlockAllocator::release(int32_t block) {
  ACCEL_CHECK(block >= 0 && block < num_total(), InternalError) << "release of block id " << block << " out of range";
  ACCEL_CHECK(ref_[block] > 0, InternalError) << "double free of KV block " << block;
  if (--ref_[block] == 0) free_.push_back(block);
}

void BlockAllocator::release_all(std::vector<int32_t>* blocks) {
  for (int32_t b : *blocks) release(b);
  blocks->clear();
}

int BlockAllocator::ref_count(int32_t block) const {
  ACCEL_CHECK(block >= 0 && block < num_total(), InvalidArgument) << "block id " << block << " out of range";
  return ref_[block];
}

}  // namespace accelcore
