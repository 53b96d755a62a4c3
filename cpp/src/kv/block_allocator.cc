#include "kv/block_allocator.h"

#include <algorithm>

#include "util/check.h"

namespace accelcore {

uint64_t hash_block(uint64_t parent_hash, const int32_t* tokens, int n) {
  // splitmix64 finalizer folded over the tokens: cheap, well mixed; a match is confirmed token by
  // token anyway, so the hash only has to spread.
  auto mix = [](uint64_t x) {
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    return x ^ (x >> 31);
  };
  uint64_t h = mix(parent_hash + 0x9E3779B97F4A7C15ull);
  for (int i = 0; i < n; ++i) h = mix(h ^ (static_cast<uint64_t>(static_cast<uint32_t>(tokens[i])) + 0x9E3779B97F4A7C15ull));
  return h;
}

BlockAllocator::BlockAllocator(int num_blocks)
    : ref_(num_blocks > 0 ? num_blocks : 0, 0), meta_(num_blocks > 0 ? num_blocks : 0) {
  ACCEL_CHECK(num_blocks > 0, InvalidArgument) << "the KV pool needs at least one block, got " << num_blocks;
  free_.reserve(num_blocks);
  for (int i = num_blocks - 1; i >= 0; --i) free_.push_back(i);
}

void BlockAllocator::lru_push_back(int32_t b) {
  Meta& m = meta_[b];
  m.prev = lru_tail_;
  m.next = -1;
  if (lru_tail_ >= 0) meta_[lru_tail_].next = b;
  else lru_head_ = b;
  lru_tail_ = b;
  ++num_cached_free_;
}

void BlockAllocator::lru_remove(int32_t b) {
  Meta& m = meta_[b];
  if (m.prev >= 0) meta_[m.prev].next = m.next;
  else lru_head_ = m.next;
  if (m.next >= 0) meta_[m.next].prev = m.prev;
  else lru_tail_ = m.prev;
  m.prev = m.next = -1;
  --num_cached_free_;
}

void BlockAllocator::evict(int32_t b) {
  Meta& m = meta_[b];
  ACCEL_DCHECK(m.cached);
  cache_.erase(m.hash);
  m.cached = false;
  m.tokens.clear();
}

int32_t BlockAllocator::allocate() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else if (lru_head_ >= 0) {
    b = lru_head_;
    lru_remove(b);
    evict(b);
  } else {
    return -1;
  }
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
  ACCEL_DCHECK(block >= 0 && block < num_total());
  if (ref_[block] == 0) {
    ACCEL_DCHECK(meta_[block].cached);  // only a cached block can be revived from free
    lru_remove(block);
  }
  ++ref_[block];
}

void BlockAllocator::release(int32_t block) {
  ACCEL_CHECK(block >= 0 && block < num_total(), InternalError) << "release of block id " << block << " out of range";
  ACCEL_CHECK(ref_[block] > 0, InternalError) << "double free of KV block " << block;
  if (--ref_[block] > 0) return;
  released_.push_back(block);
  if (meta_[block].cached) lru_push_back(block);
  else free_.push_back(block);
}

void BlockAllocator::release_all(std::vector<int32_t>* blocks) {
  for (auto it = blocks->rbegin(); it != blocks->rend(); ++it) release(*it);
  blocks->clear();
}

int BlockAllocator::ref_count(int32_t block) const {
  ACCEL_CHECK(block >= 0 && block < num_total(), InvalidArgument) << "block id " << block << " out of range";
  return ref_[block];
}

int32_t BlockAllocator::lookup(uint64_t hash, uint64_t parent_hash, const int32_t* tokens, int n) const {
  auto it = cache_.find(hash);
  if (it == cache_.end()) return -1;
  const Meta& m = meta_[it->second];
  if (m.parent_hash != parent_hash || static_cast<int>(m.tokens.size()) != n ||
      !std::equal(m.tokens.begin(), m.tokens.end(), tokens))
    return -1;  // a hash collision: treat as a miss
  return it->second;
}

bool BlockAllocator::register_block(int32_t block, uint64_t hash, uint64_t parent_hash, const int32_t* tokens, int n) {
  ACCEL_DCHECK(block >= 0 && block < num_total() && ref_[block] > 0 && !meta_[block].cached);
  if (cache_.count(hash)) return false;
  Meta& m = meta_[block];
  m.cached = true;
  m.hash = hash;
  m.parent_hash = parent_hash;
  m.tokens.assign(tokens, tokens + n);
  cache_.emplace(hash, block);
  return true;
}

}  // namespace accelcore
