// The KV block allocator: exhaustion without partial allocation, reference counting, double-free
// detection, and a long randomized sequence checked against a simple model.
#include <accelcore/errors.h>
#include <gtest/gtest.h>

#include <algorithm>
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

}  // namespace
}  // namespace accelcore
