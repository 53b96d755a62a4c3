// SplitTimer: the faster way runs, the slower is re-measured twice in a row (the step that
// switches not counted) every kExplore-th step until measured kTrusted times, then at a period
// that grows with how much slower it is; a single slow step cannot flip the choice.
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
  // The second is faster: it runs, except two steps in kExplore until the first has been measured
  // kTrusted times, then two in explore_period(0.5).
  EXPECT_EQ(run(timer, SplitTimer::kTrusted * SplitTimer::kExplore, 3.0, 2.0),
            SplitTimer::kTrusted * SplitTimer::kExplore - 2 * SplitTimer::kTrusted + 1);
  const int64_t period = SplitTimer::explore_period(0.5);
  EXPECT_EQ(period, 200);
  const int n = static_cast<int>(4 * period);
  EXPECT_EQ(run(timer, n, 3.0, 2.0), n - 8);
}

TEST(SplitTimer, ExploresLessTheSlowerTheOtherWay) {
  EXPECT_EQ(SplitTimer::explore_period(0.02), SplitTimer::kExplore);  // close: the short period
  EXPECT_EQ(SplitTimer::explore_period(0.35), 140);                   // 2 x 0.35 / 140 = 0.5%
  EXPECT_EQ(SplitTimer::explore_period(5.0), SplitTimer::kMaxExplore);
  for (double gap : {0.1, 0.2, 0.4, 0.8}) {
    // Once the slower way is trusted, the steps spent on it cost about 0.5%.
    SplitTimer timer;
    run(timer, 4096, 1.0, 1.0 + gap);
    const int n = 8192;
    const int slow = run(timer, n, 1.0, 1.0 + gap);
    EXPECT_LE(slow * gap / n, 0.0055) << "gap " << gap;
    EXPECT_GE(slow, 2 * (n / SplitTimer::explore_period(gap))) << "gap " << gap;  // still explored
  }
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
  EXPECT_LE(run(timer, n, 3.0, 6.0), 2 * n / SplitTimer::kExplore);  // explorations only
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
  const int n = static_cast<int>(4 * SplitTimer::explore_period(0.5));
  EXPECT_EQ(run(timer, n, 3.0, 2.0), n - 8);
}

}  // namespace
}  // namespace accelcore
