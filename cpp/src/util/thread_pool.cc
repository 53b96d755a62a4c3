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
    if (chunks == kPhased || next >= chunks) return;
    // A successful claim pins the job: the caller cannot publish another before this chunk is done.
    if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
      run_chunk(next);
      done_.fetch_add(1, std::memory_order_release);
      s = state_.load(std::memory_order_acquire);
    }
  }
}

void ThreadPool::worker_loop(int self) {
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
    const uint64_t s = state_.load(std::memory_order_acquire);
    seen = generation_of(s);
    if (((s >> 16) & 0xffff) == kPhased)
      work_phases(seen, self);
    else
      work(seen);
  }
}

void ThreadPool::run_part(int phase, int part) {
  try {
    (*phase_fn_)(phase, part);
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!error_) error_ = std::current_exception();
  }
  done_.fetch_add(1, std::memory_order_release);
}

void ThreadPool::work_phases(uint32_t generation, int self) {
  const uint64_t s0 = state_.load(std::memory_order_acquire);
  if (generation_of(s0) != generation) return;
  const int phases = static_cast<int>((s0 & 0xffff) >> 6), parts = static_cast<int>(s0 & 63);
  const uint64_t job = static_cast<uint64_t>(generation) << 32;
  for (int phase = 0; phase < phases; ++phase) {
    for (int spins = 0; done_.load(std::memory_order_acquire) < phase * parts; ++spins) {
      if (generation_of(state_.load(std::memory_order_acquire)) != generation) return;
      cpu_relax();
      if ((spins & 1023) == 1023) std::this_thread::yield();  // whoever runs the last part may be descheduled
    }
    // This thread's own part first, then any other nobody has claimed.
    for (int k = 0; k < parts; ++k) {
      const int part = (self + k) % parts;
      const uint64_t bit = uint64_t{1} << part;
      uint64_t c = claims_[phase].load(std::memory_order_acquire);
      while ((c & ~uint64_t{0xffffffff}) == job && !(c & bit)) {
        if (claims_[phase].compare_exchange_weak(c, c | bit, std::memory_order_acq_rel, std::memory_order_acquire)) {
          run_part(phase, part);
          break;
        }
      }
      if ((c & ~uint64_t{0xffffffff}) != job) return;  // the job is over (all its parts were done)
    }
  }
}

void ThreadPool::run_phases(int phases, int parts, const std::function<void(int, int)>& fn) {
  if (phases <= 0) return;
  parts = std::clamp(parts, 1, 32);
  if (parts == 1 || num_threads_ == 1) {
    std::exception_ptr err;
    for (int phase = 0; phase < phases; ++phase)
      for (int part = 0; part < parts; ++part) try {
          fn(phase, part);
        } catch (...) {
          if (!err) err = std::current_exception();
        }
    if (err) std::rethrow_exception(err);
    return;
  }
  for (int first = 0; first < phases; first += kMaxPhases) {
    const int n = std::min(kMaxPhases, phases - first);
    const std::function<void(int, int)> shifted = [&](int phase, int part) { fn(first + phase, part); };
    phase_fn_ = &shifted;
    error_ = nullptr;
    done_.store(0, std::memory_order_relaxed);
    const uint32_t generation = ++generation_;
    const uint64_t job = static_cast<uint64_t>(generation) << 32;
    for (int p = 0; p < n; ++p) claims_[p].store(job, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mu_);
      state_.store(job | static_cast<uint64_t>(kPhased) << 16 | static_cast<uint64_t>(n) << 6 | static_cast<uint64_t>(parts),
                   std::memory_order_release);
    }
    if (sleeping_.load() > 0) cv_.notify_all();
    work_phases(generation, 0);
    for (int spins = 0; done_.load(std::memory_order_acquire) != n * parts; ++spins) {
      cpu_relax();
      if ((spins & 1023) == 1023) std::this_thread::yield();
    }
    phase_fn_ = nullptr;
    std::exception_ptr err = std::move(error_);
    error_ = nullptr;
    if (err) std::rethrow_exception(err);
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
