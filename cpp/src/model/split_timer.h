// Chooses between two ways of running the same work that give the same bits (for the layers:
// columns of each kernel across threads, or whole rows per thread) by their measured time.
#pragma once

#include <algorithm>
#include <cstdint>

namespace accelcore {

// Mean time per row of each way (exponential, 0: none yet). The faster runs; the other every
// kExplore-th step, so a change of conditions (on a VM whose threads sometimes share a core, the
// row split goes from 20-30% faster to 20-40% slower) is followed.
class SplitTimer {
 public:
  static constexpr int64_t kExplore = 32;

  // The way to run this step: true for the second (the row split).
  bool pick() {
    if (mean_[0] == 0.0 || mean_[1] == 0.0) return mean_[1] == 0.0;  // measure each once
    const bool second_faster = mean_[1] < mean_[0];
    return ++steps_ % kExplore == 0 ? !second_faster : second_faster;
  }
  void record(bool second, double us, int64_t rows) {
    double& mean = mean_[second];
    const double v = us / static_cast<double>(rows);
    // A step slowed by a descheduled thread moves the mean by at most 10%: one outlier must not
    // hide the faster way until enough explorations wash it out.
    mean = mean == 0.0 ? v : 0.9 * mean + 0.1 * std::min(v, 2.0 * mean);
  }
  double mean_us_per_row(bool second) const { return mean_[second]; }

 private:
  double mean_[2] = {0.0, 0.0};
  int64_t steps_ = 0;
};

}  // namespace accelcore
