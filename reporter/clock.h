// The clock of sampled lifetimes: CLOCK_MONOTONIC nanoseconds, comparable
// across threads.
//
// Two reads per sampled block (its allocation and its free). With the
// kernel's clocksource on the time-stamp counter (it then trusts the TSC to
// be invariant and synchronized across CPUs), a read is one rdtsc and a
// multiply by a factor calibrated against CLOCK_MONOTONIC, instead of
// clock_gettime's vDSO call (which reads the same counter, plus a sequence
// lock and a conversion). The calibration costs nothing at start-up: reads
// use clock_gettime until kCalibrationNs have passed since init(), and the
// first read after that computes the factor from the two points.
// Otherwise (another clocksource, not x86-64), clock_gettime throughout.
//
// Layering: no knowledge of the shim; no allocation.
#pragma once

#include <atomic>
#include <cstdint>

#if defined(__x86_64__)
#include <x86intrin.h>
#endif

namespace hotpool::reporter {

class LifetimeClock {
 public:
  static constexpr uint64_t kCalibrationNs = 2000000;  // 2 ms: clock_gettime's jitter is then < 0.01%

  // Reads sysfs (is the kernel's clocksource the TSC?): start-up only.
  void init() { init_with(kernel_clock_is_tsc(), kCalibrationNs); }
  // For tests: whether to use the counter, and after how long.
  void init_with(bool counter_possible, uint64_t calibration_ns);

  bool uses_counter() const { return state_.load(std::memory_order_acquire) == kCounter; }
  // Nanoseconds per tick, times 2^32 (0 before the calibration).
  uint64_t ns_per_tick_q32() const { return uses_counter() ? ns_per_tick_q32_ : 0; }

  uint64_t now_ns() {
#if defined(__x86_64__)
    if (__builtin_expect(state_.load(std::memory_order_acquire) == kCounter, 1)) {
      const uint64_t ticks = __rdtsc();
      // Never before the calibration's start (a counter read early on another CPU).
      const uint64_t elapsed = ticks > start_ticks_ ? ticks - start_ticks_ : 0;
      return start_ns_ + static_cast<uint64_t>((static_cast<unsigned __int128>(elapsed) * ns_per_tick_q32_) >> 32);
    }
#endif
    return now_ns_slow();
  }

  static uint64_t monotonic_ns();
  static bool kernel_clock_is_tsc();

 private:
  enum : uint8_t { kMonotonic, kCalibrating, kCounter, kClaimed };
  uint64_t now_ns_slow() __attribute__((noinline));

  std::atomic<uint8_t> state_{kMonotonic};
  uint64_t calibration_ns_ = kCalibrationNs;
  uint64_t start_ticks_ = 0;
  uint64_t start_ns_ = 0;
  uint64_t ns_per_tick_q32_ = 0;
};

}  // namespace hotpool::reporter
