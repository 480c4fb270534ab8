// SpinLock: the lock of hotpool's slow paths (depots, thread registry,
// report). Never taken on a fast path; never held while calling anything
// that may take the loader's lock (dlsym, dlopen, unwinding).
#pragma once

#include <sched.h>

#include <atomic>

namespace hotpool::recycler {

class SpinLock {
 public:
  void lock() {
    while (locked_.exchange(true, std::memory_order_acquire)) {
      for (unsigned spins = 0; locked_.load(std::memory_order_relaxed); ++spins) {
        if (spins < 64) __builtin_ia32_pause(); else sched_yield();
      }
    }
  }
  void unlock() { locked_.store(false, std::memory_order_release); }
  // In a fork child only one thread exists: whoever held the lock is gone.
  void reset_after_fork() { locked_.store(false, std::memory_order_relaxed); }

 private:
  std::atomic<bool> locked_{false};
};

class SpinLockGuard {
 public:
  explicit SpinLockGuard(SpinLock& lock) : lock_(lock) { lock_.lock(); }
  ~SpinLockGuard() { lock_.unlock(); }
  SpinLockGuard(const SpinLockGuard&) = delete;
  SpinLockGuard& operator=(const SpinLockGuard&) = delete;

 private:
  SpinLock& lock_;
};

}  // namespace hotpool::recycler
