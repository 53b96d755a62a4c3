// SplitTimer: the faster way runs, the slower is re-measured every kExplore-th step (twice in a row,
// the step that switches not counted), and a single slow step cannot flip the choice.
#include "model/split_timer.h"

#include <gtest/gtest.h>

namespace accelcore {
namespace {

// Runs n steps where way 0 costs t0 and way 1 costs t1 microseconds per row; returns how many
// steps ran the second way.
int run(SplitTimer& timer, int n, double t0, double t1) {
  int second = 0;
  for (int i = 0; i < n; ++i) {
    const bool s = timer.pick();
    second += s;
    timer.record(s, (s ? t1 : t0) * 4, 4);
  }
  return second;
}

TEST(SplitTimer, MeasuresBothThenRunsTheFasterAndExploresTheOther) {
  SplitTimer timer;
  // The second way first, then the first, each twice: the step that switches is not recorded.
  EXPECT_TRUE(timer.pick());
  timer.record(true, 400.0, 4);
  EXPECT_TRUE(timer.pick());
  timer.record(true, 8.0, 4);
  EXPECT_FALSE(timer.pick());
  timer.record(false, 400.0, 4);
  EXPECT_FALSE(timer.pick());
  timer.record(false, 12.0, 4);
  EXPECT_DOUBLE_EQ(timer.mean_us_per_row(true), 2.0);
  EXPECT_DOUBLE_EQ(timer.mean_us_per_row(false), 3.0);
  // The second is faster: it runs, except two steps in kExplore.
  const int n = 64 * SplitTimer::kExplore;
  EXPECT_EQ(run(timer, n, 3.0, 2.0), n - 2 * n / SplitTimer::kExplore);
}

TEST(SplitTimer, TheStepThatSwitchesIsNotRecorded) {
  SplitTimer timer;
  run(timer, 200, 3.0, 2.0);
  // Each exploration's first step (and the step back) takes 10x as long: a woken worker. The
  // means do not move.
  int last = 1;  // the second way ran last
  for (int i = 0; i < 20 * SplitTimer::kExplore; ++i) {
    const bool s = timer.pick();
    const double per_row = (s ? 2.0 : 3.0) * (static_cast<int>(s) != last ? 10.0 : 1.0);
    last = s;
    timer.record(s, per_row * 4, 4);
  }
  EXPECT_DOUBLE_EQ(timer.mean_us_per_row(true), 2.0);
  EXPECT_DOUBLE_EQ(timer.mean_us_per_row(false), 3.0);
}

TEST(SplitTimer, FollowsAChangeOfConditions) {
  SplitTimer timer;
  run(timer, 200, 3.0, 2.0);  // the second faster
  // Now the second is twice as slow as the first: within a few dozen explorations it stops.
  run(timer, 40 * SplitTimer::kExplore, 3.0, 6.0);
  const int n = 10 * SplitTimer::kExplore;
  EXPECT_EQ(run(timer, n, 3.0, 6.0), 2 * n / SplitTimer::kExplore);
}

TEST(SplitTimer, OneSlowStepDoesNotFlipTheChoice) {
  SplitTimer timer;
  run(timer, 200, 3.0, 2.0);
  // The second way's step takes 100x longer once (a descheduled thread): its mean rises by at
  // most 10%, still below the first's.
  while (!timer.pick()) timer.record(false, 12.0, 4);
  timer.record(true, 800.0, 4);
  EXPECT_LE(timer.mean_us_per_row(true), 2.0 * 1.1 + 1e-9);
  EXPECT_TRUE(timer.pick() || timer.pick());  // an exploration step may come first
}

TEST(SplitTimer, ASlowFirstMeasurementIsSoonCorrected) {
  SplitTimer timer;
  // The second way's first recorded step took 40x its usual time (a cold start); the first way
  // measures 3.0. Within a handful of explorations the second (2.0) runs again.
  EXPECT_TRUE(timer.pick());
  timer.record(true, 80.0 * 4, 4);
  EXPECT_TRUE(timer.pick());
  timer.record(true, 80.0 * 4, 4);
  run(timer, 8 * SplitTimer::kExplore, 3.0, 2.0);
  const int n = 10 * SplitTimer::kExplore;
  EXPECT_EQ(run(timer, n, 3.0, 2.0), n - 2 * n / SplitTimer::kExplore);
}

}  // namespace
}  // namespace accelcore
