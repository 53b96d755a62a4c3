// The KV block allocator: exhaustion without partial allocation, reference counting, double-free
// detection, and a long randomized sequence checked against a simple model. Then the prefix
// cache: hash chaining, register/lookup (collisions are misses), cached blocks surviving release,
// LRU eviction after never-registered blocks, revival by add_ref, and a randomized model check.
#include <accelcore/errors.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <list>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "kv/block_allocator.h"

namespace accelcore {
namespace {

TEST(BlockAllocator, RejectsEmptyPool) {
  EXPECT_THROW(BlockAllocator(0), InvalidArgument);
  EXPECT_THROW(BlockAllocator(-3), InvalidArgument);
}

TEST(BlockAllocator, AllocatesEveryBlockExactlyOnceThenRunsDry) {
  const int n = 37;
  BlockAllocator a(n);
  EXPECT_EQ(a.num_total(), n);
  EXPECT_EQ(a.num_free(), n);
  std::set<int32_t> seen;
  for (int i = 0; i < n; ++i) {
    const int32_t b = a.allocate();
    ASSERT_GE(b, 0);
    ASSERT_LT(b, n);
    EXPECT_TRUE(seen.insert(b).second) << "block " << b << " handed out twice";
    EXPECT_EQ(a.ref_count(b), 1);
    EXPECT_EQ(a.num_free(), n - i - 1);
  }
  EXPECT_EQ(a.allocate(), -1);
  EXPECT_EQ(a.allocate(), -1);  // still -1, nothing changed
  EXPECT_EQ(a.num_free(), 0);
  std::vector<int32_t> out = {99};
  EXPECT_FALSE(a.allocate(1, &out));
  EXPECT_EQ(out, std::vector<int32_t>{99});  // untouched
  EXPECT_TRUE(a.allocate(0, &out));          // zero blocks always succeed
  EXPECT_EQ(out, std::vector<int32_t>{99});
}

TEST(BlockAllocator, MultiBlockAllocationIsAllOrNothing) {
  BlockAllocator a(10);
  std::vector<int32_t> held;
  ASSERT_TRUE(a.allocate(7, &held));
  EXPECT_EQ(held.size(), 7u);
  EXPECT_EQ(a.num_free(), 3);

  std::vector<int32_t> more = {-5};  // appended to, never cleared
  EXPECT_FALSE(a.allocate(4, &more));
  EXPECT_EQ(more, std::vector<int32_t>{-5});
  EXPECT_EQ(a.num_free(), 3);  // nothing was taken by the failed call
  ASSERT_TRUE(a.allocate(3, &more));
  EXPECT_EQ(more.size(), 4u);
  EXPECT_EQ(more[0], -5);
  EXPECT_EQ(a.num_free(), 0);

  std::set<int32_t> all(held.begin(), held.end());
  all.insert(more.begin() + 1, more.end());
  EXPECT_EQ(all.size(), 10u);
  EXPECT_EQ(*all.begin(), 0);
  EXPECT_EQ(*all.rbegin(), 9);
}

TEST(BlockAllocator, ReferenceCounts) {
  BlockAllocator a(4);
  const int32_t b = a.allocate();
  a.add_ref(b);
  a.add_ref(b);
  EXPECT_EQ(a.ref_count(b), 3);
  a.release(b);
  EXPECT_EQ(a.ref_count(b), 2);
  EXPECT_EQ(a.num_free(), 3);  // still held
  a.release(b);
  EXPECT_EQ(a.num_free(), 3);
  a.release(b);
  EXPECT_EQ(a.ref_count(b), 0);
  EXPECT_EQ(a.num_free(), 4);
  // The freed block comes back; refcount restarts at 1.
  std::set<int32_t> again;
  for (int i = 0; i < 4; ++i) again.insert(a.allocate());
  EXPECT_EQ(again.count(b), 1u);
  EXPECT_EQ(a.ref_count(b), 1);
}

TEST(BlockAllocator, DoubleFreeAndBadIdsThrowInternalError) {
  BlockAllocator a(3);
  const int32_t b = a.allocate();
  a.release(b);
  EXPECT_THROW(a.release(b), InternalError);
  EXPECT_EQ(a.num_free(), 3);  // the failed release did not push it twice
  std::set<int32_t> got;
  for (int i = 0; i < 3; ++i) got.insert(a.allocate());
  EXPECT_EQ(got.size(), 3u);   // so no block is handed out twice
  EXPECT_EQ(a.allocate(), -1);

  BlockAllocator c(3);
  EXPECT_THROW(c.release(0), InternalError);  // never allocated
  EXPECT_THROW(c.release(-1), InternalError);
  EXPECT_THROW(c.release(3), InternalError);
  EXPECT_THROW(c.ref_count(3), InvalidArgument);
  EXPECT_THROW(c.ref_count(-1), InvalidArgument);
}

TEST(BlockAllocator, ReleaseAllClearsTheTable) {
  BlockAllocator a(8);
  std::vector<int32_t> t;
  ASSERT_TRUE(a.allocate(5, &t));
  a.add_ref(t[2]);  // shared with someone else
  a.release_all(&t);
  EXPECT_TRUE(t.empty());
  EXPECT_EQ(a.num_free(), 7);
}

// A long random sequence of allocate / allocate(n) / add_ref / release against a model of
// reference counts: free count, uniqueness and counts must agree after every operation.
TEST(BlockAllocator, RandomizedAgainstModel) {
  for (uint32_t seed : {1u, 2u, 3u, 4u}) {
    const int n = 13 + static_cast<int>(seed) * 7;
    BlockAllocator a(n);
    std::map<int32_t, int> model;  // allocated block -> reference count
    std::vector<int32_t> refs;     // one entry per reference held (a multiset of ids)
    std::mt19937 rng(seed);
    for (int step = 0; step < 20000; ++step) {
      const int op = static_cast<int>(rng() % 4);
      const int free_before = n - static_cast<int>(model.size());
      if (op == 0) {
        const int32_t b = a.allocate();
        if (free_before == 0) {
          ASSERT_EQ(b, -1);
        } else {
          ASSERT_GE(b, 0);
          ASSERT_LT(b, n);
          ASSERT_EQ(model.count(b), 0u) << "block " << b << " is already allocated";
          model[b] = 1;
          refs.push_back(b);
        }
      } else if (op == 1) {
        const int want = static_cast<int>(rng() % 6);
        std::vector<int32_t> out;
        const bool ok = a.allocate(want, &out);
        ASSERT_EQ(ok, want <= free_before);
        ASSERT_EQ(out.size(), ok ? static_cast<size_t>(want) : 0u);
        for (int32_t b : out) {
          ASSERT_GE(b, 0);
          ASSERT_LT(b, n);
          ASSERT_EQ(model.count(b), 0u) << "block " << b << " is already allocated";
          model[b] = 1;
          refs.push_back(b);
        }
      } else if (op == 2 && !refs.empty()) {
        const int32_t b = refs[rng() % refs.size()];
        a.add_ref(b);
        ++model[b];
        refs.push_back(b);
      } else if (!refs.empty()) {
        const size_t i = rng() % refs.size();
        const int32_t b = refs[i];
        refs[i] = refs.back();
        refs.pop_back();
        a.release(b);
        if (--model[b] == 0) model.erase(b);
      }
      ASSERT_EQ(a.num_free(), n - static_cast<int>(model.size())) << "step " << step;
      if (step % 97 == 0) {
        for (int32_t b = 0; b < n; ++b) {
          auto it = model.find(b);
          ASSERT_EQ(a.ref_count(b), it == model.end() ? 0 : it->second) << "block " << b;
        }
      }
    }
    // Everything released: the pool is whole again and hands out each block once.
    for (int32_t b : refs) a.release(b);
    EXPECT_EQ(a.num_free(), n);
    std::vector<int32_t> all;
    ASSERT_TRUE(a.allocate(n, &all));
    std::sort(all.begin(), all.end());
    for (int i = 0; i < n; ++i) EXPECT_EQ(all[i], i);
  }
}

// ---------------------------------------------------------------------------------------------
// Prefix cache.

std::vector<int32_t> toks(std::initializer_list<int32_t> l) { return std::vector<int32_t>(l); }

TEST(BlockAllocatorPrefixCache, HashChainsParentAndTokens) {
  const auto t = toks({5, 6, 7, 8});
  const uint64_t h = hash_block(kRootHash, t.data(), 4);
  EXPECT_EQ(h, hash_block(kRootHash, t.data(), 4));  // deterministic
  EXPECT_NE(h, hash_block(h, t.data(), 4));          // same tokens, different parent
  EXPECT_NE(hash_block(h, t.data(), 4), hash_block(h + 1, t.data(), 4));
  const auto swapped = toks({6, 5, 7, 8});
  EXPECT_NE(h, hash_block(kRootHash, swapped.data(), 4));  // order matters
  const auto other = toks({5, 6, 7, 9});
  EXPECT_NE(h, hash_block(kRootHash, other.data(), 4));
  EXPECT_NE(h, hash_block(kRootHash, t.data(), 3));  // length matters
  // A chain: the second block's hash depends on the first block's tokens through its parent.
  const auto t2 = toks({1, 2, 3, 4});
  EXPECT_NE(hash_block(hash_block(kRootHash, t.data(), 4), t2.data(), 4),
            hash_block(hash_block(kRootHash, other.data(), 4), t2.data(), 4));
}

TEST(BlockAllocatorPrefixCache, RegisterLookupRoundTripAndCollisionsMiss) {
  BlockAllocator a(4);
  const auto t = toks({10, 11, 12});
  const uint64_t h = hash_block(kRootHash, t.data(), 3);
  EXPECT_EQ(a.lookup(h, kRootHash, t.data(), 3), -1);  // nothing cached yet
  const int32_t b = a.allocate();
  EXPECT_FALSE(a.is_cached(b));
  ASSERT_TRUE(a.register_block(b, h, kRootHash, t.data(), 3));
  EXPECT_TRUE(a.is_cached(b));
  EXPECT_EQ(a.num_cached(), 1);
  EXPECT_EQ(a.ref_count(b), 1);  // registering takes no reference
  EXPECT_EQ(a.lookup(h, kRootHash, t.data(), 3), b);
  // Same hash but different tokens, parent or length: a collision, treated as a miss.
  const auto other = toks({10, 11, 13});
  EXPECT_EQ(a.lookup(h, kRootHash, other.data(), 3), -1);
  EXPECT_EQ(a.lookup(h, kRootHash + 1, t.data(), 3), -1);
  EXPECT_EQ(a.lookup(h, kRootHash, t.data(), 2), -1);
  EXPECT_EQ(a.lookup(h + 1, kRootHash, t.data(), 3), -1);  // unknown hash

  // An equal block already cached: a second registration under that hash is refused.
  const int32_t b2 = a.allocate();
  EXPECT_FALSE(a.register_block(b2, h, kRootHash, t.data(), 3));
  EXPECT_FALSE(a.is_cached(b2));
  EXPECT_EQ(a.num_cached(), 1);
  EXPECT_EQ(a.lookup(h, kRootHash, t.data(), 3), b);
  // A different block content registers fine alongside.
  const uint64_t h2 = hash_block(h, other.data(), 3);
  EXPECT_TRUE(a.register_block(b2, h2, h, other.data(), 3));
  EXPECT_EQ(a.num_cached(), 2);
  EXPECT_EQ(a.lookup(h2, h, other.data(), 3), b2);
  EXPECT_EQ(a.lookup(h2, kRootHash, other.data(), 3), -1);  // right tokens under the wrong parent
}

TEST(BlockAllocatorPrefixCache, ReleasedCachedBlocksStayFindableAndRevive) {
  BlockAllocator a(3);
  const auto t = toks({1, 2});
  const uint64_t h = hash_block(kRootHash, t.data(), 2);
  const int32_t b = a.allocate();
  ASSERT_TRUE(a.register_block(b, h, kRootHash, t.data(), 2));
  a.add_ref(b);  // two holders
  a.release(b);
  EXPECT_EQ(a.num_free(), 2);
  a.release(b);
  // Free (counted as such) but still cached and findable.
  EXPECT_EQ(a.ref_count(b), 0);
  EXPECT_EQ(a.num_free(), 3);
  EXPECT_EQ(a.num_cached(), 1);
  EXPECT_TRUE(a.is_cached(b));
  EXPECT_EQ(a.lookup(h, kRootHash, t.data(), 2), b);
  // add_ref revives it: held again, out of the free count, still cached.
  a.add_ref(b);
  EXPECT_EQ(a.ref_count(b), 1);
  EXPECT_EQ(a.num_free(), 2);
  EXPECT_TRUE(a.is_cached(b));
  // So allocation cannot evict it: the other two blocks go, then nothing.
  const int32_t x = a.allocate(), y = a.allocate();
  EXPECT_NE(x, b);
  EXPECT_NE(y, b);
  EXPECT_EQ(a.allocate(), -1);
  EXPECT_EQ(a.lookup(h, kRootHash, t.data(), 2), b);
  // Released again, it is the only free block: the next allocation evicts it.
  a.release(b);
  EXPECT_EQ(a.num_free(), 1);
  EXPECT_EQ(a.allocate(), b);
  EXPECT_FALSE(a.is_cached(b));
  EXPECT_EQ(a.num_cached(), 0);
  EXPECT_EQ(a.lookup(h, kRootHash, t.data(), 2), -1);
  // Evicted, it can be registered under another hash.
  const auto u = toks({3, 4});
  const uint64_t hu = hash_block(kRootHash, u.data(), 2);
  EXPECT_TRUE(a.register_block(b, hu, kRootHash, u.data(), 2));
  EXPECT_EQ(a.lookup(hu, kRootHash, u.data(), 2), b);
}

TEST(BlockAllocatorPrefixCache, EvictsLeastRecentlyReleasedAfterUncachedBlocks) {
  BlockAllocator a(5);
  std::vector<int32_t> b(5);
  std::vector<uint64_t> h(5);
  std::vector<std::vector<int32_t>> t(5);
  for (int i = 0; i < 5; ++i) {
    b[i] = a.allocate();
    t[i] = toks({i, i + 100});
    h[i] = hash_block(kRootHash, t[i].data(), 2);
  }
  for (int i : {0, 1, 2, 3}) ASSERT_TRUE(a.register_block(b[i], h[i], kRootHash, t[i].data(), 2));
  // Released in the order 1, 3, 4 (never registered), 0, 2.
  for (int i : {1, 3, 4, 0, 2}) a.release(b[i]);
  EXPECT_EQ(a.num_free(), 5);
  EXPECT_EQ(a.num_cached(), 4);
  // 3 comes back into use before it could be evicted: out of the LRU order.
  a.add_ref(b[3]);
  EXPECT_EQ(a.num_free(), 4);
  auto cached = [&](int i) { return a.lookup(h[i], kRootHash, t[i].data(), 2) == b[i]; };
  EXPECT_EQ(a.allocate(), b[4]);  // the never-registered block first: no eviction
  EXPECT_EQ(a.num_cached(), 4);
  EXPECT_EQ(a.allocate(), b[1]);  // then the least recently released cached block
  EXPECT_FALSE(cached(1));
  EXPECT_TRUE(cached(0) && cached(2) && cached(3));
  EXPECT_EQ(a.allocate(), b[0]);
  EXPECT_FALSE(cached(0));
  EXPECT_EQ(a.allocate(), b[2]);
  EXPECT_EQ(a.allocate(), -1);  // 3 is held
  EXPECT_TRUE(cached(3));
  EXPECT_EQ(a.num_cached(), 1);
}

TEST(BlockAllocatorPrefixCache, ReleaseAllEvictsTheTailBeforeThePrefix) {
  BlockAllocator a(3);
  std::vector<int32_t> table;
  ASSERT_TRUE(a.allocate(3, &table));
  uint64_t parent = kRootHash;
  std::vector<uint64_t> hs;
  for (int i = 0; i < 3; ++i) {
    const auto t = toks({i});
    hs.push_back(hash_block(parent, t.data(), 1));
    ASSERT_TRUE(a.register_block(table[i], hs.back(), parent, t.data(), 1));
    parent = hs.back();
  }
  const std::vector<int32_t> held = table;
  a.release_all(&table);
  EXPECT_TRUE(table.empty());
  EXPECT_EQ(a.num_free(), 3);
  // Released last to first: the chain's tail is the least recently released.
  EXPECT_EQ(a.allocate(), held[2]);
  EXPECT_EQ(a.allocate(), held[1]);
  EXPECT_EQ(a.allocate(), held[0]);
}

// Random allocate / release / register / lookup / revive against an exact model: which block
// each allocation returns (never-registered free blocks last-freed-first, then the LRU head),
// the free and cached counts, reference counts, and every lookup.
TEST(BlockAllocatorPrefixCache, RandomizedAgainstModel) {
  for (uint32_t seed : {7u, 8u, 9u}) {
    const int n = 6 + static_cast<int>(seed);
    BlockAllocator a(n);
    std::vector<int> ref(n, 0);
    std::vector<int32_t> free_stack;
    for (int i = n - 1; i >= 0; --i) free_stack.push_back(i);
    std::list<int32_t> lru;
    std::map<uint64_t, int32_t> cache;
    std::vector<uint64_t> hash_of(n, 0);
    std::vector<int32_t> refs;  // one entry per reference held
    // Block contents from a small set, so equal blocks (refused registrations) and hits are common.
    std::vector<std::vector<int32_t>> contents;
    for (int c = 0; c < 5; ++c) contents.push_back({c, c * 3 + 1});
    std::mt19937 rng(seed);
    int evictions = 0, refused = 0, hits = 0, revivals = 0;
    for (int step = 0; step < 20000; ++step) {
      const int op = static_cast<int>(rng() % 6);
      if (op == 0 || op == 1) {
        int32_t want = -1;
        if (!free_stack.empty()) {
          want = free_stack.back();
          free_stack.pop_back();
        } else if (!lru.empty()) {
          want = lru.front();
          lru.pop_front();
          cache.erase(hash_of[want]);
          ++evictions;
        }
        ASSERT_EQ(a.allocate(), want) << "step " << step;
        if (want >= 0) {
          ref[want] = 1;
          refs.push_back(want);
          ASSERT_FALSE(a.is_cached(want));
        }
      } else if (op == 2 && !refs.empty()) {
        const size_t i = rng() % refs.size();
        const int32_t b = refs[i];
        refs[i] = refs.back();
        refs.pop_back();
        a.release(b);
        if (--ref[b] == 0) {
          if (a.is_cached(b)) lru.push_back(b);
          else free_stack.push_back(b);
        }
      } else if (op == 3 && !refs.empty()) {
        const int32_t b = refs[rng() % refs.size()];
        const auto& c = contents[rng() % contents.size()];
        const uint64_t parent = rng() % 2 ? kRootHash : 1234;
        const uint64_t h = hash_block(parent, c.data(), 2);
        if (a.is_cached(b)) continue;
        const bool want = cache.count(h) == 0;
        if (!want) ++refused;
        ASSERT_EQ(a.register_block(b, h, parent, c.data(), 2), want) << "step " << step;
        if (want) {
          cache[h] = b;
          hash_of[b] = h;
        }
      } else if (op == 4) {
        const auto& c = contents[rng() % contents.size()];
        const uint64_t parent = rng() % 2 ? kRootHash : 1234;
        const uint64_t h = hash_block(parent, c.data(), 2);
        auto it = cache.find(h);
        const int32_t want = it == cache.end() ? -1 : it->second;
        ASSERT_EQ(a.lookup(h, parent, c.data(), 2), want) << "step " << step;
        if (want >= 0) {
          ++hits;
          a.add_ref(want);  // take it, as a prefix hit does
          if (ref[want]++ == 0) {
            lru.remove(want);
            ++revivals;
          }
          refs.push_back(want);
        }
      }
      ASSERT_EQ(a.num_free(), static_cast<int>(free_stack.size() + lru.size())) << "step " << step;
      ASSERT_EQ(a.num_cached(), static_cast<int>(cache.size())) << "step " << step;
      if (step % 101 == 0) {
        for (int32_t b = 0; b < n; ++b) ASSERT_EQ(a.ref_count(b), ref[b]) << "block " << b;
      }
    }
    EXPECT_GT(evictions, 0);
    EXPECT_GT(refused, 0);
    EXPECT_GT(hits, 0);
    EXPECT_GT(revivals, 0);
    for (int32_t b : refs) a.release(b);
    EXPECT_EQ(a.num_free(), n);
  }
}

}  // namespace
}  // namespace accelcore
