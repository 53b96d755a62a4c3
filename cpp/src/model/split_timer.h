// Chooses between two ways of running the same work that give the same bits (for the layers:
// each kernel split across threads, or one phased job of each thread's share) by their measured
// time.
#pragma once

#include <algorithm>
#include <cstdint>

namespace accelcore {

// Mean time per row of each way (exponential, 0: none yet). The faster runs; the other two steps
// in every period, so a change of conditions (on a VM whose threads sometimes share a core, a
// split can go from 20-30% faster to 20-40% slower) is followed. The period is kExplore steps
// while the two are close or the slower is measured fewer than kTrusted times, longer the
// further apart they are (explore_period), so exploring costs about 0.5% of the time: at every
// 32nd step, one-row steps of stories260K spent 2-3% on explorations of the way 35% slower.
// A way that takes over runs twice: the first step after a switch pays for the switch (a worker
// woken from its sleep, other data in the caches) and is not recorded. Recording it had kept the
// phased split, whose worker sleeps through the steps run kernel by kernel on one thread,
// measured 30% slower than it runs.
class SplitTimer {
 public:
  static constexpr int64_t kExplore = 32, kMaxExplore = 16 * kExplore;
  // Recorded steps of the slower way before its mean earns the longer period: a slow first
  // measurement (a cold start) is corrected at the short period.
  static constexpr int64_t kTrusted = 8;
  // Two steps of the slower way (slower / faster = 1 + gap) in every period cost 2 gap / period.
  static int64_t explore_period(double gap) {
    return std::clamp(static_cast<int64_t>(400.0 * gap), kExplore, kMaxExplore);
  }

  // The way to run this step: true for the second (the phased split).
  bool pick() {
    bool second;
    if (mean_[1] == 0.0 || mean_[0] == 0.0) {
      second = mean_[1] == 0.0;  // measure each
    } else {
      const bool second_faster = mean_[1] < mean_[0];
      const double gap = std::max(mean_[0], mean_[1]) / std::min(mean_[0], mean_[1]) - 1.0;
      const int64_t period = recorded_[second_faster ? 0 : 1] < kTrusted ? kExplore : explore_period(gap);
      second = ++steps_ % period < 2 ? !second_faster : second_faster;
    }
    switched_ = last_ != static_cast<int>(second);
    last_ = second;
    return second;
  }
  // The time of the step pick() chose.
  void record(bool second, double us, int64_t rows) {
    if (switched_) return;
    ++recorded_[second];
    double& mean = mean_[second];
    const double v = us / static_cast<double>(rows);
    // A step slowed by a descheduled thread moves the mean by at most 10%: one outlier must not
    // hide the faster way until enough explorations wash it out. Noise only ever slows a step,
    // so a faster one moves the mean halfway at once: a slow first measurement (82 us a row for
    // the phased split of one-row steps, which run in 7) had kept the slower way for a thousand
    // steps.
    if (mean == 0.0) mean = v;
    else if (v < mean) mean += 0.5 * (v - mean);
    else mean += 0.1 * (std::min(v, 2.0 * mean) - mean);
  }
  double mean_us_per_row(bool second) const { return mean_[second]; }

 private:
  double mean_[2] = {0.0, 0.0};
  int64_t recorded_[2] = {0, 0};
  int64_t steps_ = 0;
  int last_ = -1;  // the way of the last step (-1: none yet)
  bool switched_ = false;
};

}  // namespace accelcore
