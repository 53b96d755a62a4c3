// A fixed pool of worker threads for data-parallel loops inside one forward pass.
// parallel_for splits [0, n) into contiguous chunks, at most one per thread, so the work of a
// chunk (and any reduction order inside an item) never depends on timing or on which thread ran it.
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

  // fn(phase, part) for every phase in [0, phases) in order and every part in [0, parts): phase
  // p + 1 starts once all of phase p's parts are done. Thread i (the caller is thread 0) runs part
  // i % parts of each phase when it is free to, so a part's data (its share of a model's weights)
  // stays in one core's cache from phase to phase; a part no thread has claimed by the time one
  // is done with its own is run by that one, so nobody waits for a worker that is asleep or
  // descheduled. One job for many short phases: no publishing or waking between them. Parts are
  // at most 32; exceptions propagate as from parallel_for (the remaining phases still run).
  void run_phases(int phases, int parts, const std::function<void(int, int)>& fn);

 private:
  void worker_loop(int self);
  // Runs this thread's share of phased job `generation` (see run_phases).
  void work_phases(uint32_t generation, int self);
  void run_part(int phase, int part);
  // Claims and runs chunks of job `generation` until none is left (or a newer job replaced it).
  void work(uint32_t generation);
  void run_chunk(int index);

  int num_threads_;
  std::vector<std::thread> workers_;
  // A job is published by storing state_ = (generation << 32 | chunks << 16 | 0) (release) after
  // its fields are set; any thread claims the next chunk by incrementing the low 16 bits. The
  // caller claims chunks too, so it never waits for a worker that is asleep or descheduled (on a
  // shared VM, waking an idle worker took milliseconds), only for chunks a worker already runs.
  // A chunk's bounds depend only on (n, grain, chunks), not on who runs it, so results do not
  // change. Workers spin for a short while before sleeping on cv_, so the many small jobs of one
  // forward pass cost no futex round trips.
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> state_{0};
  std::atomic<int> done_{0};  // chunks of the current job finished
  std::atomic<int> sleeping_{0};
  std::atomic<bool> stop_{false};
  uint32_t generation_ = 0;  // the caller's count of jobs
  // The current job, valid for a thread from a successful claim until it marks the chunk done.
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  int active_ = 0;
  // A phased job: state_'s chunk count is kPhased and its low 16 bits (phases << 6 | parts), which
  // no chunk claim changes. claims_[p] = (generation << 32 | the parts of phase p claimed): a claim
  // is a compare-and-swap that also checks the job, and pins it like a chunk claim. done_ counts
  // finished parts; phase p may start when done_ >= p * parts.
  static constexpr int kPhased = 0xffff, kMaxPhases = 1023;
  const std::function<void(int, int)>* phase_fn_ = nullptr;
  std::atomic<uint64_t> claims_[kMaxPhases];
  std::exception_ptr error_;
};

int default_num_threads();  // cores this process may run on

}  // namespace accelcore
