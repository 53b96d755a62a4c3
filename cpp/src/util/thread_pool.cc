#include "util/thread_pool.h"

#include <sched.h>

#include <algorithm>
#include <chrono>

namespace accelcore {

int default_num_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

ThreadPool::ThreadPool(int num_threads) : num_threads_(std::max(1, num_threads)) {
  for (int i = 1; i < num_threads_; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

namespace {

inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

// How long an idle worker spins before sleeping: longer than the gaps between the jobs of one
// forward pass, short enough that an idle engine does not burn a core.
constexpr auto kSpinTime = std::chrono::microseconds(200);

}  // namespace

void ThreadPool::run_chunk(int index) {
  // Contiguous split in units of grain: thread i gets the i-th share.
  int64_t units = (n_ + grain_ - 1) / grain_;
  int64_t per = units / active_, extra = units % active_;
  int64_t ubegin = index * per + std::min<int64_t>(index, extra);
  int64_t uend = ubegin + per + (index < extra ? 1 : 0);
  int64_t begin = std::min(n_, ubegin * grain_), end = std::min(n_, uend * grain_);
  if (begin >= end) return;
  try {
    (*fn_)(begin, end);
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!error_) error_ = std::current_exception();
  }
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen = 0;
  for (;;) {
    const auto spin_until = std::chrono::steady_clock::now() + kSpinTime;
    for (int spins = 0; generation_.load(std::memory_order_acquire) == seen && !stop_.load(std::memory_order_relaxed);
         ++spins) {
      cpu_relax();
      if ((spins & 255) == 255 && std::chrono::steady_clock::now() > spin_until) {
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.fetch_add(1);
        cv_.wait(lock, [&] { return stop_.load() || generation_.load() != seen; });
        sleeping_.fetch_sub(1);
        break;
      }
    }
    if (stop_.load()) return;
    seen = generation_.load(std::memory_order_acquire);
    if (index < active_) run_chunk(index);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain,
                              const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  int64_t units = (n + grain - 1) / grain;
  int active = static_cast<int>(std::min<int64_t>(num_threads_, units));
  if (active <= 1) {
    fn(0, n);
    return;
  }
  fn_ = &fn;
  n_ = n;
  grain_ = grain;
  active_ = active;
  error_ = nullptr;
  pending_.store(num_threads_ - 1, std::memory_order_relaxed);
  {
    // Under the lock so that a worker about to sleep either sees the new generation or is woken.
    std::lock_guard<std::mutex> lock(mu_);
    generation_.fetch_add(1, std::memory_order_release);
  }
  if (sleeping_.load() > 0) cv_.notify_all();
  run_chunk(0);
  for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
    cpu_relax();
    if ((spins & 1023) == 1023) std::this_thread::yield();  // a worker may have been descheduled
  }
  fn_ = nullptr;
  std::exception_ptr err = std::move(error_);
  error_ = nullptr;
  if (err) std::rethrow_exception(err);
}

}  // namespace accelcore
