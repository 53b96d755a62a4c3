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

ThreadPool::ThreadPool(int num_threads) : num_threads_(std::max(1, std::min(num_threads, 1 << 15))) {
  for (int i = 1; i < num_threads_; ++i) workers_.emplace_back([this] { worker_loop(); });
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

inline uint32_t generation_of(uint64_t state) { return static_cast<uint32_t>(state >> 32); }

}  // namespace

void ThreadPool::run_chunk(int index) {
  // Contiguous split in units of grain: chunk i is the i-th share.
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

void ThreadPool::work(uint32_t generation) {
  uint64_t s = state_.load(std::memory_order_acquire);
  for (;;) {
    if (generation_of(s) != generation) return;
    const int chunks = static_cast<int>((s >> 16) & 0xffff), next = static_cast<int>(s & 0xffff);
    if (next >= chunks) return;
    // A successful claim pins the job: the caller cannot publish another before this chunk is done.
    if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
      run_chunk(next);
      done_.fetch_add(1, std::memory_order_release);
      s = state_.load(std::memory_order_acquire);
    }
  }
}

void ThreadPool::worker_loop() {
  uint32_t seen = 0;
  for (;;) {
    const auto spin_until = std::chrono::steady_clock::now() + kSpinTime;
    for (int spins = 0;
         generation_of(state_.load(std::memory_order_acquire)) == seen && !stop_.load(std::memory_order_relaxed);
         ++spins) {
      cpu_relax();
      // Yield now and then: a worker woken onto the caller's core must not spin it away.
      if ((spins & 63) == 63) std::this_thread::yield();
      if ((spins & 255) == 255 && std::chrono::steady_clock::now() > spin_until) {
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.fetch_add(1);
        cv_.wait(lock, [&] { return stop_.load() || generation_of(state_.load()) != seen; });
        sleeping_.fetch_sub(1);
        break;
      }
    }
    if (stop_.load()) return;
    seen = generation_of(state_.load(std::memory_order_acquire));
    work(seen);
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
  done_.store(0, std::memory_order_relaxed);
  const uint32_t generation = ++generation_;
  {
    // Under the lock so that a worker about to sleep either sees the new generation or is woken.
    std::lock_guard<std::mutex> lock(mu_);
    state_.store(static_cast<uint64_t>(generation) << 32 | static_cast<uint64_t>(active) << 16,
                 std::memory_order_release);
  }
  if (sleeping_.load() > 0) cv_.notify_all();
  work(generation);
  for (int spins = 0; done_.load(std::memory_order_acquire) != active; ++spins) {
    cpu_relax();
    if ((spins & 1023) == 1023) std::this_thread::yield();  // the worker running a chunk may be descheduled
  }
  fn_ = nullptr;
  std::exception_ptr err = std::move(error_);
  error_ = nullptr;
  if (err) std::rethrow_exception(err);
}

}  // namespace accelcore
