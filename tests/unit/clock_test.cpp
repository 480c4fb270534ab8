// The clock of sampled lifetimes: clock_gettime's monotonic nanoseconds,
// read from the time-stamp counter once calibrated.
#include "reporter/clock.h"

#include <gtest/gtest.h>

#include <time.h>

#include <cstdint>

namespace {

using hotpool::reporter::LifetimeClock;

void sleep_ns(uint64_t ns) {
  timespec wait{static_cast<time_t>(ns / 1000000000u), static_cast<long>(ns % 1000000000u)};
  while (nanosleep(&wait, &wait) != 0) {
  }
}

TEST(LifetimeClock, WithoutTheCounterItIsClockGettime) {
  LifetimeClock clock;
  clock.init_with(false, 1000);
  sleep_ns(2000000);
  const uint64_t before = LifetimeClock::monotonic_ns();
  const uint64_t read = clock.now_ns();
  const uint64_t after = LifetimeClock::monotonic_ns();
  EXPECT_FALSE(clock.uses_counter());
  EXPECT_GE(read, before);
  EXPECT_LE(read, after);
}

TEST(LifetimeClock, CalibratedCounterAgreesWithClockGettime) {
  if (!LifetimeClock::kernel_clock_is_tsc()) {
    GTEST_SKIP() << "the kernel's clocksource is not the TSC here: hotpool reads clock_gettime";
  }
  LifetimeClock clock;
  const uint64_t initialized = LifetimeClock::monotonic_ns();
  clock.init_with(true, 1000000);  // 1 ms
  // Before the calibration window has passed: clock_gettime (unless this
  // thread was preempted for that long, on a loaded machine).
  EXPECT_FALSE(clock.uses_counter());
  (void)clock.now_ns();
  if (LifetimeClock::monotonic_ns() - initialized < 900000) {
    EXPECT_FALSE(clock.uses_counter());
  }
  sleep_ns(2000000);
  const uint64_t switched_at = clock.now_ns();  // this read calibrates
  ASSERT_TRUE(clock.uses_counter());
  EXPECT_GT(clock.ns_per_tick_q32(), 0u);
  // Continuous at the switch, and then the same time as clock_gettime:
  // within 1% of what passed (the calibration window is 1 ms here; hotpool
  // uses 2 ms) plus 50 µs for the two reads being apart.
  // Each counter read is bracketed by two clock_gettime reads: a thread
  // preempted in between widens the bracket, not the error.
  auto expect_within = [&](int round) {
    const uint64_t before = LifetimeClock::monotonic_ns();
    const uint64_t counter = clock.now_ns();
    const uint64_t after = LifetimeClock::monotonic_ns();
    const uint64_t tolerance = (after - switched_at) / 100 + 50000;
    EXPECT_GE(counter + tolerance, before) << "round " << round;
    EXPECT_LE(counter, after + tolerance) << "round " << round;
    return counter;
  };
  uint64_t last = expect_within(-1);
  EXPECT_GE(last, switched_at);
  for (int round = 0; round < 5; ++round) {
    sleep_ns(10000000);
    const uint64_t counter = expect_within(round);
    EXPECT_GE(counter, last) << "round " << round;
    last = counter;
  }
}

}  // namespace
