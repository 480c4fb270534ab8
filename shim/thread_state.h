// Per-thread state: the recursion guard, the thread's statistics and their
// lifecycle (not attached -> attached -> torn down).
//
// The only TLS is one small initial-exec struct: no TLS wrapper calls, no
// __tls_get_addr, no allocation. Everything bigger (the per-class counters)
// lives in ThreadState blocks carved from hotpool's own mmap'd memory and
// reused after a thread exits, so thread churn stays bounded.
#pragma once

#include <pthread.h>

#include <atomic>
#include <cstdint>

#include "recycler/recycler.h"
#include "recycler/spin_lock.h"
#include "reporter/class_stats.h"
#include "reporter/sites.h"
#include "reporter/unwinder.h"

namespace hotpool::shim {

using recycler::SpinLock;
using recycler::SpinLockGuard;

// A thread's LIFO of free sampled blocks of one class (see
// ThreadState::sample_stash): four cache lines, touched only for the
// classes the thread samples. 31 slots, not 7: a trip to the depot (its
// lock, a refill or a drain) every 16 allocations or frees of a class in
// one direction instead of every 4 (python3 with HOTPOOL_SAMPLE=1: 45
// instructions fewer per sample). A slot is stored before the
// count that covers it, and the count lowered before its slot is reused: a
// fork() by another thread at any instant leaves the child a stash whose
// counted slots are blocks out of the depot.
struct alignas(64) SampleStash {
  static constexpr unsigned kSlots = 31;
  uint32_t count;
  void* slots[kSlots];
};

// Never constructed: every member starts at zero, as the registry's fresh
// mmap'd memory is (see ThreadRegistry::carve_locked). A member added here
// must have zero as its initial value.
struct ThreadState {
  // The one countdown that malloc and calloc decrement (next to the first
  // of the counters' cache line, see ThreadClassStats): allocations until
  // the next event, a sample or a tick or both (runtime.h, take_event).
  alignas(64) uint64_t countdown;
  // Set at the events: the countdown's start (window), the allocations it
  // counted before (alloc_base), and from its start, the allocations to
  // the next sample (kNever: none) and to the next tick.
  uint64_t window;
  uint64_t alloc_base;
  uint64_t sample_left;
  uint64_t tick_left;
  // The auto policy's window over this thread's counts (mode auto only):
  // allocations until the next evaluation, counted down by the ticks.
  uint64_t policy_countdown;
  reporter::ThreadClassStats stats;
  recycler::ThreadCache cache;
  ThreadState* prev;  // active list, or free list (next only)
  ThreadState* next;
  unsigned destructor_rounds;
  // The thread's kernel ids (getpid, gettid), for the registry's check
  // whether it still exists (see ThreadRegistry::claim_dead); set at
  // attach, and in a fork child for the forking thread.
  int32_t tgid;
  int32_t tid;
  bool active;            // in the active list (registry lock)
  uint32_t reaped_by;     // the ordinal of the thread retiring this dead one, 0 if none (registry lock)
  uint32_t ordinal;            // 1, 2, ... in the order threads attached (sampled blocks name their thread)
  // Sampling: the generator of the geometric intervals (seeded from the
  // ordinal: runs are repeatable).
  uint64_t sample_random;
  // Sampling by bytes (HOTPOOL_SAMPLE_BYTES): bytes to allocate until the
  // next sample, 0 until the first draw (see sampled_allocate).
  uint64_t bytes_left;
  // The thread's stack, [low, high) (0, 0 if unknown): where the frame of a
  // sampled allocation may be looked at (see sampled_free_record).
  uintptr_t stack_low;
  uintptr_t stack_high;
  // The bounds were looked for (at the thread's first sample: see
  // sampled_allocate).
  bool stack_probed;
  reporter::TraceCache trace_cache;  // the last stack captured (libgcc's unwinder)
  // Captures in progress on this thread (the fork gate, see capture_stack):
  // written by the thread, read by a forking one.
  std::atomic<uint32_t> unwinding;
  ThreadState* next_carved;  // every state ever carved, newest first (never unlinked)
  // Per sample-region class, a few freed sampled blocks kept for this
  // thread's next samples of the class instead of going back to the depot
  // (HOTPOOL_SAMPLE=1 would take the depot's lock twice per allocation).
  // Taken and put back only under the recursion guard by the thread
  // itself, outside any other hotpool call (see sampled_free_release).
  SampleStash sample_stash[reporter::kMaxClasses];
  // Sampled counts per site and class not yet merged into the shared ones.
  reporter::PendingSamples pending;
  // The sites of this thread's last sampled stacks; memo_busy while it is
  // being read or changed (a signal handler's sample then goes to the depot).
  reporter::SiteMemo site_memo;
  bool memo_busy;
  // The thread's recent sampled stacks with their sites, at dense rates
  // (see reporter::StackMemo): used while memo_busy, set up when the
  // thread's stack is looked up (stack_probed), untouched at sparse rates.
  reporter::StackMemo stack_memo;
  // Pooled or sampled blocks a signal handler freed while this thread was
  // inside hotpool (a cache's or a stash's change, a depot's lock): kept
  // here until the thread is out (free_deferred) or exits. A sampled
  // block's free is recorded when it comes. Full: the block leaks.
  static constexpr unsigned kDeferredFrees = 16;
  void* deferred_frees[kDeferredFrees];
  unsigned deferred_count;
  uint64_t policy_window;     // the current window length (mode auto)
  uint64_t policy_started_ns;  // when the current window began (lifetime_clock_ns)
  uint64_t policy_allocs[reporter::kMaxClasses];  // counts at the last evaluation
  uint64_t policy_frees[reporter::kMaxClasses];
};

// A thread's frees of pooled blocks of class c: its pooled allocations
// (pops, and reallocs in place, which free as they allocate) plus its
// bin's pushes minus pops. The free fast path counts nothing; the owner
// writes this into its pooled_frees counter at its slow paths
// (runtime.cpp, note_pooled), a report computes it for running threads.
// From another thread the parts are read while the owner changes them
// (a pop lowers the bin's count before the allocation is counted): the
// figure may then read low by an operation or two, never below zero.
inline uint64_t pooled_frees_of(const ThreadState& state, unsigned c) {
  const int64_t frees = static_cast<int64_t>(state.stats.pooled_allocs(c)) +
                        recycler::Recycler::pushes_minus_pops(state.cache, c);
  return frees > 0 ? static_cast<uint64_t>(frees) : 0;
}

enum class ThreadStatus : uint8_t { NotAttached = 0, Attached, TornDown };

struct ThreadLocal {
  ThreadState* state;       // non-null exactly while Attached
  // state, but null while in_hotpool, and while the pooled fast paths pop
  // from or push to the thread cache (a signal handler arriving then stays
  // out of it): one test for the pooled fast paths.
  ThreadState* pool_state;
  ThreadStatus status;
  bool in_hotpool;          // the recursion guard
  // Inside pthread_getattr_np (hotpool's, entry_points.cpp), which holds
  // the thread's lock while it allocates: a sample's stack probe, which
  // calls it again for this thread, waits for a later sample.
  uint8_t in_getattr;
  // The thread's ThreadState::ordinal from its attach on, kept after its
  // teardown (0 before): a sampled block it frees in its last key
  // destructors is still its own, not another thread's.
  uint32_t ordinal;
};

extern __thread ThreadLocal tls __attribute__((tls_model("initial-exec")));

// While a ReentryGuard lives, every allocation this thread makes goes
// straight to the real allocator, unrecorded: dlsym, pthread_setspecific,
// pthread_atfork, snprintf... can then call malloc safely. Functions that must
// only run under the guard take it as a parameter.
// The pool opens again at the end (pool_state back to state) unless the
// guard was nested, or began while a pooled fast path had it closed (in a
// signal handler that interrupted the pop or the push, e.g. freeing a
// sampled block): the interrupted code reopens it.
class ReentryGuard {
 public:
  ReentryGuard()
      : was_set_(tls.in_hotpool),
        reopen_(!tls.in_hotpool && (tls.pool_state != nullptr || tls.state == nullptr)) {
    tls.in_hotpool = true;
    tls.pool_state = nullptr;
  }
  ~ReentryGuard() {
    tls.in_hotpool = was_set_;
    if (reopen_) tls.pool_state = tls.state;
  }
  ReentryGuard(const ReentryGuard&) = delete;
  ReentryGuard& operator=(const ReentryGuard&) = delete;

 private:
  bool was_set_;
  bool reopen_;
};

// All ThreadStates: the active ones (for reports), the free ones (for reuse)
// and the sums of the threads that have exited.
class ThreadRegistry {
 public:
  void init(unsigned class_count, const uint64_t* class_sizes, const ReentryGuard&);

  // A fresh state for the calling thread, linked into the active list;
  // nullptr if no memory.
  ThreadState* acquire(const ReentryGuard&);
  // Folds an exiting thread's counts into the retired sums, recycles the state.
  void retire(ThreadState* state, reporter::GlobalClassStats& global, const ReentryGuard&);

  // A thread whose first allocation comes in glibc's last round of key
  // destructors attaches, and is never told it exits (no round follows).
  // So each new thread looks at up to kReapChecks other active states of
  // its own process, in turn, and claims into dead[] those whose thread no
  // longer exists (tgkill(pid, tid, 0) says ESRCH; the system calls outside
  // the lock, errno kept) for `self` to retire (see shim::release_state);
  // returns how many. A claimed state stays active, its counts in the
  // reports, until it is retired. (tgkill to its own process is what raise() and abort() use:
  // sandboxes allow it. A task sharing memory without being a thread of
  // this process, clone() without CLONE_THREAD, has a pid of its own and
  // its state is never claimed here.)
  static constexpr unsigned kReapChecks = 2;
  unsigned claim_dead(const ThreadState* self, ThreadState** dead, const ReentryGuard&);

  // Threads that lost their state (exited, still allocating in late
  // destructors) count into one shared block under a lock. They have no
  // recursion guard to send a signal handler's calls around it: the lock
  // is held with signals blocked (see recycler::SignalsBlocked).
  SpinLock& fallback_lock() { return fallback_lock_; }
  bool has_fallback() const { return fallback_ != nullptr; }
  reporter::ThreadClassStats& fallback() { return fallback_->stats; }
  // record(fallback()) under the fallback lock, signals blocked (unless the
  // caller blocked them already); nothing without a fallback block.
  template <typename Record>
  void record_in_fallback(Record record, bool signals_blocked = false) {
    if (!fallback_) return;
    if (!signals_blocked) {
      const recycler::SignalsBlocked blocked;
      SpinLockGuard lock(fallback_lock_);
      return record(fallback_->stats);
    }
    SpinLockGuard lock(fallback_lock_);
    record(fallback_->stats);
  }

  // Calls `visit` for every state ever carved (active, free, the fallback),
  // without the registry's lock: the list only grows, at its head, and
  // states are never unmapped.
  template <typename Visit>
  void for_each_carved(Visit visit) {
    for (ThreadState* state = carved_.load(std::memory_order_acquire); state; state = state->next_carved) visit(*state);
  }
  // Calls `visit` for every active thread's state, under the registry's lock.
  void for_each_active(void (*visit)(ThreadState&), const ReentryGuard&);
  // Sums everything into *out (pool counters of the thread caches too).
  void snapshot(reporter::StatsSnapshot* out, reporter::GlobalClassStats& global, const ReentryGuard&);

  // fork: hold the locks across fork(); in the child, every state but the
  // forking thread's belongs to a thread that does not exist there.
  bool try_lock_for_fork() { return lock_.try_lock_for_fork() && fallback_lock_.try_lock_for_fork(); }
  void unlock_after_fork_parent() { fallback_lock_.unlock_after_fork_parent(); lock_.unlock_after_fork_parent(); }
  void reset_after_fork_child(ThreadState* survivor, reporter::GlobalClassStats& global,
                              void (*on_dead_thread)(ThreadState&));

 private:
  ThreadState* carve_locked();
  void retire_locked(ThreadState* state, reporter::GlobalClassStats& global);

  SpinLock lock_;
  SpinLock fallback_lock_;
  ThreadState* active_ = nullptr;
  ThreadState* reap_next_ = nullptr;  // the active state claim_dead looks at next (null: the list's head)
  ThreadState* free_ = nullptr;
  ThreadState* fallback_ = nullptr;
  std::atomic<ThreadState*> carved_{nullptr};
  char* carve_next_ = nullptr;   // unused part of the last mmap'd chunk
  char* carve_end_ = nullptr;
  uint64_t active_count_ = 0;
  uint32_t next_ordinal_ = 0;
  reporter::StatsSnapshot retired_{};
  reporter::PoolClassTotals retired_pools_[reporter::kMaxClasses]{};
};

// Adds the counters of one thread cache's bins to pool totals.
void add_cache_counters(const recycler::ThreadCache& cache, unsigned classes, reporter::PoolClassTotals* totals);

}  // namespace hotpool::shim
