// SpinLock: the lock of hotpool's slow paths (depots, thread registry,
// report). Never taken on a fast path; never held while calling anything
// that may take the loader's lock (dlsym, dlopen, unwinding).
#pragma once

#include <pthread.h>
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

// The calling thread's cancellation disabled for a scope: an asynchronous
// cancellation (PTHREAD_CANCEL_ASYNCHRONOUS) may stop a thread at any
// instruction, and must not stop it with a lock held (every other thread
// would wait for it forever) or halfway through moving blocks between its
// cache and a depot (a block in both would be handed out twice). One
// requested meanwhile takes effect at the end of the scope. Slow paths only.
// The type goes to deferred too: glibc 2.36's cancellation signal, sent
// while the type was asynchronous and the state enabled, cancels on arrival
// if the type is still asynchronous, whatever the state by then.
class CancellationOff {
 public:
  CancellationOff() {
    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &state_);
    pthread_setcanceltype(PTHREAD_CANCEL_DEFERRED, &type_);
  }
  ~CancellationOff() {
    pthread_setcanceltype(type_, nullptr);
    pthread_setcancelstate(state_, nullptr);
  }
  CancellationOff(const CancellationOff&) = delete;
  CancellationOff& operator=(const CancellationOff&) = delete;

 private:
  int state_ = PTHREAD_CANCEL_ENABLE;
  int type_ = PTHREAD_CANCEL_DEFERRED;
};

// Holds the lock with the thread's cancellation off (see CancellationOff).
class SpinLockGuard {
 public:
  explicit SpinLockGuard(SpinLock& lock) : lock_(lock) { lock_.lock(); }
  ~SpinLockGuard() { lock_.unlock(); }
  SpinLockGuard(const SpinLockGuard&) = delete;
  SpinLockGuard& operator=(const SpinLockGuard&) = delete;

 private:
  CancellationOff cancellation_off_;  // constructed first, destroyed last: around the lock
  SpinLock& lock_;
};

}  // namespace hotpool::recycler
