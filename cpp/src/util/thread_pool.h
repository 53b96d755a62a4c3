// A fixed pool of worker threads for data-parallel loops inside one forward pass.
// parallel_for splits [0, n) into contiguous chunks, one per thread, so the work a thread does
// (and any reduction order inside an item) never depends on timing.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace accelcore {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);  // total threads including the caller
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // fn(begin, end) over chunks of [0, n); chunk boundaries are multiples of `grain`.
  // Runs inline when n <= grain or the pool has one thread. Exceptions from fn propagate to the
  // caller (the first one thrown).
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void worker_loop(int index);
  void run_chunk(int index);

  int num_threads_;
  std::vector<std::thread> workers_;
  // A job is published by bumping generation_ (release) after its fields are set. Workers spin on
  // it for a short while before sleeping on cv_, so the many small jobs of one forward pass cost
  // no futex round trips. Every worker acknowledges every job through pending_, so none can lag
  // behind into the next one.
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> pending_{0};
  // The current job, valid while pending_ > 0.
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  int active_ = 0;
  std::exception_ptr error_;
};

int default_num_threads();  // cores this process may run on

}  // namespace accelcore
