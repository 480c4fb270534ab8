#include "clock.h"

#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <cstring>

namespace hotpool::reporter {

// True when the kernel keeps time with the TSC: it found the counter
// invariant and synchronized between CPUs (else it would have switched to
// another clocksource).
bool LifetimeClock::kernel_clock_is_tsc() {
#if defined(__x86_64__)
  const int fd = open("/sys/devices/system/clocksource/clocksource0/current_clocksource", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char name[32] = {};
  const ssize_t got = read(fd, name, sizeof(name) - 1);
  close(fd);
  return got >= 3 && std::strncmp(name, "tsc", 3) == 0 && (got == 3 || name[3] == '\n');
#else
  return false;
#endif
}

#if defined(__x86_64__)
namespace {
// A counter reading and the clock_gettime time it corresponds to: the
// counter read between two clock reads, retried when they lie far apart
// (the thread was preempted or interrupted in between).
void paired_read(uint64_t& ns, uint64_t& ticks) {
  for (int attempt = 0;; ++attempt) {
    const uint64_t before = LifetimeClock::monotonic_ns();
    ticks = __rdtsc();
    const uint64_t after = LifetimeClock::monotonic_ns();
    ns = before + (after - before) / 2;
    if (after - before < 2000 || attempt == 16) return;
  }
}
}  // namespace
#endif

uint64_t LifetimeClock::monotonic_ns() {
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);  // vDSO: no syscall
  return static_cast<uint64_t>(now.tv_sec) * 1000000000u + static_cast<uint64_t>(now.tv_nsec);
}

void LifetimeClock::init_with(bool counter_possible, uint64_t calibration_ns) {
  state_.store(kMonotonic, std::memory_order_relaxed);
  calibration_ns_ = calibration_ns;
#if defined(__x86_64__)
  if (!counter_possible) return;
  paired_read(start_ns_, start_ticks_);
  state_.store(kCalibrating, std::memory_order_release);
#else
  (void)counter_possible;
#endif
}

uint64_t LifetimeClock::now_ns_slow() {
  const uint64_t ns = monotonic_ns();
#if defined(__x86_64__)
  if (state_.load(std::memory_order_acquire) != kCalibrating || ns - start_ns_ < calibration_ns_) return ns;
  // One thread computes the factor; the others read clock_gettime meanwhile.
  uint8_t expected = kCalibrating;
  if (!state_.compare_exchange_strong(expected, kClaimed, std::memory_order_acquire)) return ns;
  uint64_t pair_ns, ticks;
  paired_read(pair_ns, ticks);
  if (ticks <= start_ticks_) {
    state_.store(kMonotonic, std::memory_order_release);
    return ns;
  }
  const uint64_t factor =
      static_cast<uint64_t>((static_cast<unsigned __int128>(pair_ns - start_ns_) << 32) / (ticks - start_ticks_));
  // A counter between 100 MHz and 20 GHz, or something is off: keep clock_gettime.
  if (factor > (uint64_t{10} << 32) || factor < (uint64_t{1} << 32) / 20) {
    state_.store(kMonotonic, std::memory_order_release);
    return ns;
  }
  ns_per_tick_q32_ = factor;
  state_.store(kCounter, std::memory_order_release);
#endif
  return ns;
}

}  // namespace hotpool::reporter
