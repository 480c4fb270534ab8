// SpinLock: the lock of hotpool's slow paths (depots, thread registry,
// report). Never taken on a fast path; never held while calling anything
// that may take the loader's lock (dlsym, dlopen, unwinding).
#pragma once

#include <pthread.h>
#include <sched.h>
#include <signal.h>

#include <atomic>
#include <cstdint>

namespace hotpool::recycler {

// The calling thread's nesting of fork() calls in progress: 1 inside the
// atfork handlers of a fork(), 2 in those of a fork() from a signal handler
// that interrupted the first, ... (the prepare handler raises it, the
// parent and child handlers lower it).
inline thread_local unsigned tls_fork_depth __attribute__((tls_model("initial-exec"))) = 0;

class SpinLock {
 public:
  void lock() {
    const uintptr_t me = caller();
    uintptr_t expected = 0;
    while (!owner_.compare_exchange_weak(expected, me, std::memory_order_acquire, std::memory_order_relaxed)) {
      for (unsigned spins = 0; owner_.load(std::memory_order_relaxed) != 0; ++spins) {
        if (spins < 64) __builtin_ia32_pause(); else sched_yield();
      }
      expected = 0;
    }
  }
  void unlock() { owner_.store(0, std::memory_order_release); }

  // The atfork handlers. A fork() from a signal handler may have
  // interrupted this very thread while it held the lock (or while an outer
  // fork() held it): the prepare handler then leaves it as it is instead
  // of waiting for itself, and the parent handler releases only what its
  // own prepare took.
  //
  // The prepare handler takes the locks in one order, but such a thread
  // holds one of them out of that order while it waits for the others, and
  // a second thread's fork() may hold those and wait for the one it holds.
  // So the prepare handler does not wait for long: false when the lock
  // stays busy; the caller then releases what it took (as the parent
  // handler does) and starts again.
  bool try_lock_for_fork() {
    if (held_by_caller()) return true;
    const uintptr_t me = caller();
    for (unsigned spins = 0;; ++spins) {
      uintptr_t expected = 0;
      if (owner_.load(std::memory_order_relaxed) == 0 &&
          owner_.compare_exchange_weak(expected, me, std::memory_order_acquire, std::memory_order_relaxed)) {
        fork_depth_ = tls_fork_depth;
        return true;
      }
      if (spins >= kForkSpins) return false;
      if (spins < 64) __builtin_ia32_pause(); else sched_yield();
    }
  }
  void unlock_after_fork_parent() {
    if (!held_by_caller() || fork_depth_ != tls_fork_depth) return;
    fork_depth_ = 0;
    unlock();
  }
  // In the child only the forking thread exists: a lock that another thread
  // held, or that this fork's prepare took, is free; one that this thread
  // held before (the code the signal handler interrupted, which goes on
  // when the handler returns) stays held.
  void reset_after_fork() {
    if (held_before_this_fork()) return;
    fork_depth_ = 0;
    owner_.store(0, std::memory_order_relaxed);
  }
  // In the atfork handlers: true when this thread held the lock before this
  // fork() began (the code its signal handler interrupted, or an outer
  // fork()). What the lock guards may be halfway through a change then, and
  // the lock stays held until that code is done with it.
  bool held_before_this_fork() const { return held_by_caller() && fork_depth_ != tls_fork_depth; }

 private:
  // A holder that is not stuck leaves within this: slow paths hold a lock
  // for microseconds (an mmap or madvise at most), and the yields let a
  // holder that was preempted run.
  static constexpr unsigned kForkSpins = 64 + 256;

  static uintptr_t caller() { return static_cast<uintptr_t>(pthread_self()); }
  bool held_by_caller() const { return owner_.load(std::memory_order_relaxed) == caller(); }

  std::atomic<uintptr_t> owner_{0};  // pthread_self() of the holder, 0 when free
  unsigned fork_depth_ = 0;          // the tls_fork_depth of the prepare that took it, 0 if none
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
//
// Nested ones cost nothing: only the outermost of a thread calls into
// glibc (a sampled allocation takes a lock, captures a stack and takes
// another lock: four calls instead of twelve). The depth is counted after
// the outermost has turned cancellation off and before it turns it back
// on, so a signal handler that interrupts in between does the calls itself.
inline thread_local unsigned tls_cancellation_off __attribute__((tls_model("initial-exec"))) = 0;

// Whether any thread of this process may be cancelled: false until the
// program calls pthread_cancel or asks for asynchronous cancellation (the
// shim interposes pthread_cancel and pthread_setcanceltype and sets it
// first). Until then no cancellation is pending anywhere, and the scopes
// that reach no cancellation point (the depots' locked sections, libgcc's
// stack walk) skip the four calls into glibc (each a compare-and-swap on
// the thread's cancellation word in glibc 2.36), per pool refill or drain
// and per sampled allocation.
//
// Not covered: a thread that runs a signal handler while glibc has its
// cancellation type asynchronous inside a blocking call (as glibc does in
// some versions), whose handler allocates, when the process's very first
// pthread_cancel targets it at that moment. malloc is not
// async-cancel-safe; glibc itself gives no promise there either.
inline constinit std::atomic<bool> g_cancellation_used{false};

class CancellationOff {
 public:
  // A scope that may reach a cancellation point (a read, a write...).
  CancellationOff() : CancellationOff(true) {}
  // `reaches_cancellation_points` false: only once cancellation is used.
  explicit CancellationOff(bool reaches_cancellation_points)
      : active_(reaches_cancellation_points || g_cancellation_used.load(std::memory_order_relaxed)),
        outer_(active_ && tls_cancellation_off == 0) {
    if (!active_) return;
    if (outer_) {
      pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &state_);
      pthread_setcanceltype(PTHREAD_CANCEL_DEFERRED, &type_);
    }
    asm volatile("" ::: "memory");
    ++tls_cancellation_off;
    asm volatile("" ::: "memory");
  }
  ~CancellationOff() {
    if (!active_) return;
    asm volatile("" ::: "memory");
    --tls_cancellation_off;
    asm volatile("" ::: "memory");
    if (outer_) {
      pthread_setcanceltype(type_, nullptr);
      pthread_setcancelstate(state_, nullptr);
    }
  }
  CancellationOff(const CancellationOff&) = delete;
  CancellationOff& operator=(const CancellationOff&) = delete;

 private:
  bool active_;
  bool outer_;
  int state_ = PTHREAD_CANCEL_ENABLE;
  int type_ = PTHREAD_CANCEL_DEFERRED;
};

// Every signal the C library lets a thread block (all but its own two),
// blocked for a scope: no handler runs on this thread inside it. For the
// locks of a thread without a hotpool state of its own (torn down, or
// never given one), which neither its recursion guard nor its deferred
// frees cover: a handler that allocates or frees would take the same lock
// and wait for itself. Two system calls: never on a fast path.
class SignalsBlocked {
 public:
  SignalsBlocked() {
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &saved_);  // returns its error: errno stays
  }
  ~SignalsBlocked() { pthread_sigmask(SIG_SETMASK, &saved_, nullptr); }
  SignalsBlocked(const SignalsBlocked&) = delete;
  SignalsBlocked& operator=(const SignalsBlocked&) = delete;

 private:
  sigset_t saved_;
};

// Holds the lock with the thread's cancellation off (see CancellationOff).
inline constexpr bool kNoCancellationPoint = false;  // for CancellationOff and SpinLockGuard

class SpinLockGuard {
 public:
  explicit SpinLockGuard(SpinLock& lock, bool reaches_cancellation_points = true)
      : cancellation_off_(reaches_cancellation_points), lock_(lock) {
    lock_.lock();
  }
  ~SpinLockGuard() { lock_.unlock(); }
  SpinLockGuard(const SpinLockGuard&) = delete;
  SpinLockGuard& operator=(const SpinLockGuard&) = delete;

 private:
  CancellationOff cancellation_off_;  // constructed first, destroyed last: around the lock
  SpinLock& lock_;
};

}  // namespace hotpool::recycler
