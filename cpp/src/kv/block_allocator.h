// The pool of KV blocks: which are free, how many holders each allocated block has (requests
// share prefix blocks), and the prefix cache.
//
// Prefix cache: a full block can be registered under the hash of (its parent block's hash, its
// tokens). When its last holder releases it, a registered block is not forgotten: it waits in an
// LRU list, still findable by lookup(), until an allocation needs it. Allocation takes never-
// registered free blocks first and evicts the least recently released cached block last.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace accelcore {

// Hash of a full block: chains the parent's hash with the block's tokens (kRootHash for the first).
constexpr uint64_t kRootHash = 0x6a09e667f3bcc908ull;
uint64_t hash_block(uint64_t parent_hash, const int32_t* tokens, int n);

class BlockAllocator {
 public:
  explicit BlockAllocator(int num_blocks);

  int num_total() const { return static_cast<int>(ref_.size()); }
  // Blocks no request holds, cached ones included (they can be evicted on demand).
  int num_free() const { return static_cast<int>(free_.size()) + num_cached_free_; }
  int num_cached() const { return static_cast<int>(cache_.size()); }

  // Returns a block with reference count 1, or -1 when none is free. May evict a cached block.
  int32_t allocate();
  // Allocates n blocks into out (appended) or none at all; returns whether it succeeded.
  bool allocate(int n, std::vector<int32_t>* out);
  // One more holder. A cached block nobody held leaves the LRU list.
  void add_ref(int32_t block);
  // Drops one reference; at zero the block is free (cached ones go to the LRU tail). Throws
  // InternalError on a double free or an id out of range.
  void release(int32_t block);
  // Releases a request's blocks last to first, so its tail blocks are evicted before its prefix,
  // and clears the vector.
  void release_all(std::vector<int32_t>* blocks);
  int ref_count(int32_t block) const;

  // The cached block holding exactly these tokens after this parent, or -1.
  int32_t lookup(uint64_t hash, uint64_t parent_hash, const int32_t* tokens, int n) const;
  // Registers a full block the caller holds. Returns false (and registers nothing) when an equal
  // block is already cached.
  bool register_block(int32_t block, uint64_t hash, uint64_t parent_hash, const int32_t* tokens, int n);
  bool is_cached(int32_t block) const { return meta_[block].cached; }
  // Appends the blocks whose reference count fell to zero since the last call, in that order,
  // and forgets them (what a quantized KV cache needs to know to drop their float forms).
  void take_released(std::vector<int32_t>* out) {
    out->insert(out->end(), released_.begin(), released_.end());
    released_.clear();
  }

 private:
  struct Meta {
    bool cached = false;
    uint64_t hash = 0, parent_hash = 0;
    std::vector<int32_t> tokens;     // kept to confirm a hash match token by token
    int32_t prev = -1, next = -1;    // LRU list links while cached and free
  };
  void lru_push_back(int32_t b);
  void lru_remove(int32_t b);
  void evict(int32_t b);

  std::vector<int32_t> free_;  // never-registered free blocks: a stack (recently freed reused first)
  std::vector<int32_t> ref_;
  std::vector<int32_t> released_;
  std::vector<Meta> meta_;
  std::unordered_map<uint64_t, int32_t> cache_;
  int32_t lru_head_ = -1, lru_tail_ = -1;  // cached free blocks, least recently released first
  int num_cached_free_ = 0;
};

}  // namespace accelcore
