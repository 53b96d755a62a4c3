// The thread pool: parallel_for covers [0, n) exactly once in grain-aligned chunks for many
// shapes, exceptions reach the caller, and the pool keeps working afterwards.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include <accelcore/errors.h>

#include "util/thread_pool.h"

namespace accelcore {
namespace {

// Runs parallel_for and checks every index is visited exactly once, chunks are non-empty,
// start on a multiple of grain, and there are at most num_threads of them.
void check_cover(ThreadPool& pool, int64_t n, int64_t grain) {
  std::vector<std::atomic<int>> hits(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (auto& h : hits) h.store(0);
  std::atomic<int> chunks{0};
  std::atomic<bool> bad_chunk{false};
  std::mutex mu;
  std::set<std::thread::id> threads;
  pool.parallel_for(n, grain, [&](int64_t b, int64_t e) {
    ++chunks;
    if (b < 0 || e > n || b >= e || b % std::max<int64_t>(grain, 1) != 0) bad_chunk = true;
    for (int64_t i = b; i < e && i < n && i >= 0; ++i) hits[i].fetch_add(1);
    std::lock_guard<std::mutex> lock(mu);
    threads.insert(std::this_thread::get_id());
  });
  ASSERT_FALSE(bad_chunk) << "n=" << n << " grain=" << grain;
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "index " << i << " n=" << n << " grain=" << grain;
  EXPECT_LE(chunks.load(), pool.num_threads());
  EXPECT_LE(static_cast<int>(threads.size()), pool.num_threads());
  if (n <= 0) {
    EXPECT_EQ(chunks.load(), 0);
  }
}

TEST(ThreadPool, CoversEveryIndexExactlyOnce) {
  for (int threads : {1, 2, 3, 4, 8}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.num_threads(), threads);
    for (int64_t n : {0, 1, 2, 3, 5, 7, 8, 16, 17, 63, 100, 1000, 1023}) {
      for (int64_t grain : {0, 1, 2, 3, 16, 64, 1000, 5000}) {
        ASSERT_NO_FATAL_FAILURE(check_cover(pool, n, grain)) << "threads=" << threads;
      }
    }
  }
}

TEST(ThreadPool, UsesSeveralThreadsWhenThereIsWork) {
  ThreadPool pool(2);
  std::mutex mu;
  std::set<std::thread::id> ids;
  std::atomic<int> arrived{0};
  pool.parallel_for(2, 1, [&](int64_t, int64_t) {
    {
      std::lock_guard<std::mutex> lock(mu);
      ids.insert(std::this_thread::get_id());
    }
    // Both chunks wait for each other: only possible if they run concurrently.
    ++arrived;
    for (int spin = 0; arrived.load() < 2 && spin < 200000000; ++spin) std::this_thread::yield();
  });
  EXPECT_EQ(arrived.load(), 2);
  EXPECT_EQ(ids.size(), 2u);
  EXPECT_EQ(ids.count(std::this_thread::get_id()), 1u);  // the caller takes a share
}

TEST(ThreadPool, ZeroOrNegativeThreadCountMeansOne) {
  ThreadPool zero(0), neg(-4);
  EXPECT_EQ(zero.num_threads(), 1);
  EXPECT_EQ(neg.num_threads(), 1);
  ASSERT_NO_FATAL_FAILURE(check_cover(zero, 10, 1));
  EXPECT_GE(default_num_threads(), 1);
}

TEST(ThreadPool, ExceptionFromAWorkerChunkPropagatesAndPoolStillWorks) {
  ThreadPool pool(4);
  for (int round = 0; round < 50; ++round) {
    // Only the last chunk throws (run by a worker, or by the caller when it got there first).
    EXPECT_THROW(pool.parallel_for(1000, 1,
                                   [&](int64_t b, int64_t e) {
                                     if (e == 1000) throw InvalidArgument("boom in worker");
                                   }),
                 InvalidArgument);
    ASSERT_NO_FATAL_FAILURE(check_cover(pool, 1000, 1));
  }
  // The message survives.
  try {
    pool.parallel_for(100, 1, [](int64_t b, int64_t) {
      if (b > 0) throw std::runtime_error("worker says hi");
    });
    FAIL() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "worker says hi");
  }
}

TEST(ThreadPool, ExceptionFromTheCallerChunkOrEveryChunk) {
  ThreadPool pool(3);
  for (int round = 0; round < 50; ++round) {
    // Only the first chunk throws.
    EXPECT_THROW(pool.parallel_for(300, 1, [](int64_t b, int64_t) {
      if (b == 0) throw std::logic_error("caller chunk");
    }),
                 std::logic_error);
    // Every chunk throws: one exception comes out, none is lost to std::terminate.
    EXPECT_THROW(pool.parallel_for(300, 1, [](int64_t, int64_t) { throw std::out_of_range("all"); }),
                 std::out_of_range);
    ASSERT_NO_FATAL_FAILURE(check_cover(pool, 300, 7));
  }
  // Inline path (one unit of work) too.
  EXPECT_THROW(pool.parallel_for(5, 10, [](int64_t, int64_t) { throw std::runtime_error("inline"); }),
               std::runtime_error);
  ASSERT_NO_FATAL_FAILURE(check_cover(pool, 5, 10));
}

TEST(ThreadPool, ManyBackToBackCallsDoNotLoseWakeups) {
  ThreadPool pool(4);
  std::atomic<int64_t> total{0};
  for (int i = 0; i < 5000; ++i) {
    const int64_t n = 1 + i % 9;
    pool.parallel_for(n, 1, [&](int64_t b, int64_t e) { total += e - b; });
  }
  int64_t want = 0;
  for (int i = 0; i < 5000; ++i) want += 1 + i % 9;
  EXPECT_EQ(total.load(), want);
}

TEST(ThreadPool, DestroyedRightAfterUse) {
  for (int i = 0; i < 200; ++i) {
    auto pool = std::make_unique<ThreadPool>(1 + i % 4);
    std::atomic<int> s{0};
    pool->parallel_for(8, 1, [&](int64_t b, int64_t e) { s += static_cast<int>(e - b); });
    EXPECT_EQ(s.load(), 8);
  }
}

// run_phases: every (phase, part) once, and no part of a phase starts before every part of the
// phase before it has finished.
void check_phases(ThreadPool& pool, int phases, int parts, bool slow_part = false) {
  const int want_parts = std::clamp(parts, 1, 32);
  std::vector<std::atomic<int>> hits(static_cast<size_t>(std::max(phases, 0)) * want_parts);
  for (auto& h : hits) h.store(0);
  std::atomic<int> finished{0};  // parts finished so far, over all phases
  std::atomic<bool> early{false};
  pool.run_phases(phases, parts, [&](int phase, int part) {
    if (finished.load() < phase * want_parts) early = true;
    // A slow part on the caller's side gives the workers time to run ahead if they could.
    if (slow_part && part == 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
    hits[static_cast<size_t>(phase) * want_parts + part].fetch_add(1);
    ++finished;
  });
  EXPECT_FALSE(early) << "phases=" << phases << " parts=" << parts;
  for (size_t i = 0; i < hits.size(); ++i) ASSERT_EQ(hits[i].load(), 1) << "phase " << i / want_parts << " part " << i % want_parts;
}

TEST(ThreadPool, PhasesRunEveryPartOnceInPhaseOrder) {
  for (int threads : {1, 2, 3, 4}) {
    ThreadPool pool(threads);
    for (int phases : {0, 1, 2, 5, 40})
      for (int parts : {1, 2, 3, 4, 7})
        ASSERT_NO_FATAL_FAILURE(check_phases(pool, phases, parts)) << "threads=" << threads;
    ASSERT_NO_FATAL_FAILURE(check_phases(pool, 12, threads, true)) << "threads=" << threads;
    // More phases than one job holds, and parts past the 32 a job allows.
    ASSERT_NO_FATAL_FAILURE(check_phases(pool, 2500, 2)) << "threads=" << threads;
    ASSERT_NO_FATAL_FAILURE(check_phases(pool, 3, 40)) << "threads=" << threads;
  }
}

TEST(ThreadPool, PhasesUseSeveralThreadsAndMixWithParallelFor) {
  ThreadPool pool(2);
  std::mutex mu;
  std::set<std::thread::id> ids;
  for (int round = 0; round < 2000 && ids.size() < 2; ++round) {
    pool.run_phases(4, 2, [&](int, int) {
      std::this_thread::sleep_for(std::chrono::microseconds(20));
      std::lock_guard<std::mutex> lock(mu);
      ids.insert(std::this_thread::get_id());
    });
  }
  EXPECT_EQ(ids.size(), 2u);
  // Phased jobs and chunked ones back to back: no lost wake-up, no stale worker running a part.
  std::atomic<int64_t> total{0};
  for (int i = 0; i < 3000; ++i) {
    if (i % 2) pool.run_phases(1 + i % 5, 2, [&](int, int) { total += 1; });
    else pool.parallel_for(1 + i % 9, 1, [&](int64_t b, int64_t e) { total += e - b; });
  }
  int64_t want = 0;
  for (int i = 0; i < 3000; ++i) want += i % 2 ? 2 * (1 + i % 5) : 1 + i % 9;
  EXPECT_EQ(total.load(), want);
}

TEST(ThreadPool, ExceptionFromAPhasePropagatesAndPoolStillWorks) {
  for (int threads : {1, 2, 4}) {
    ThreadPool pool(threads);
    std::atomic<int> ran{0};
    EXPECT_THROW(pool.run_phases(6, 2,
                                 [&](int phase, int part) {
                                   ++ran;
                                   if (phase == 2 && part == 1) throw InvalidArgument("phase 2");
                                 }),
                 InvalidArgument);
    EXPECT_EQ(ran.load(), 12);  // the other phases still ran
    ASSERT_NO_FATAL_FAILURE(check_phases(pool, 5, 2));
  }
}

}  // namespace
}  // namespace accelcore
