#include "thread_state.h"

#include <errno.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <new>
#include <type_traits>

namespace hotpool::shim {

__thread ThreadLocal tls __attribute__((tls_model("initial-exec")));

namespace {
constexpr size_t kStateSize = (sizeof(ThreadState) + 63) & ~size_t{63};
constexpr size_t kChunkStates = 16;
}  // namespace

void ThreadRegistry::init(unsigned class_count, const uint64_t* class_sizes, const ReentryGuard&) {
  SpinLockGuard lock(lock_);
  retired_.clear(class_count, class_sizes);
  fallback_ = carve_locked();  // no thread's own: never in the active list
}

ThreadState* ThreadRegistry::carve_locked() {
  if (ThreadState* state = free_) {
    free_ = state->next;
    return state;
  }
  if (carve_next_ == carve_end_) {
    // Slow path, once per 16 new threads: our own memory, never malloc.
    void* chunk = mmap(nullptr, kStateSize * kChunkStates, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (chunk == MAP_FAILED) return nullptr;
    carve_next_ = static_cast<char*>(chunk);
    carve_end_ = carve_next_ + kStateSize * kChunkStates;
  }
  // Not constructed: a ThreadState (an aggregate, trivially destructible)
  // starts all zero, and fresh mmap'd memory is zero already. Constructing
  // it would write all of its 144 KiB (the caches, sample stashes and
  // counters of every class) and make it resident; untouched, only the
  // classes the thread uses cost memory.
  static_assert(std::is_aggregate_v<ThreadState> && std::is_trivially_destructible_v<ThreadState>,
                "a ThreadState comes from zeroed memory");
  ThreadState* state = std::launder(reinterpret_cast<ThreadState*>(carve_next_));
  carve_next_ += kStateSize;
  // Published complete (a forking thread walks the list without the lock).
  state->next_carved = carved_.load(std::memory_order_relaxed);
  carved_.store(state, std::memory_order_release);
  return state;
}

ThreadState* ThreadRegistry::acquire(const ReentryGuard&) {
  const auto tgid = static_cast<int32_t>(getpid());
  const auto tid = static_cast<int32_t>(syscall(SYS_gettid));
  SpinLockGuard lock(lock_);
  ThreadState* state = carve_locked();
  if (!state) return nullptr;
  state->prev = nullptr;
  state->next = active_;
  state->destructor_rounds = 0;
  state->tgid = tgid;
  state->tid = tid;
  state->active = true;
  state->reaped_by = 0;
  // 0 means "none" to claim_dead (reaped_by): skipped when the count wraps.
  if (++next_ordinal_ == 0) ++next_ordinal_;
  state->ordinal = next_ordinal_;
  if (active_) active_->prev = state;
  active_ = state;
  if (++active_count_ > retired_.threads_at_once) retired_.threads_at_once = active_count_;
  return state;
}

void add_cache_counters(const recycler::ThreadCache& cache, unsigned classes, reporter::PoolClassTotals* totals) {
  for (unsigned c = 0; c < classes; ++c) {
    const recycler::BinCounters& counters = cache.counters[c];
    totals[c].refills += counters.refills.load(std::memory_order_relaxed);
    totals[c].drains += counters.drains.load(std::memory_order_relaxed);
    totals[c].misses += counters.misses.load(std::memory_order_relaxed);
    totals[c].cached_blocks += cache.bins[c].count;
  }
}

void ThreadRegistry::retire_locked(ThreadState* state, reporter::GlobalClassStats& global) {
  // Pooled frees are counted lazily (pooled_frees_of), and pooled blocks'
  // live bytes folded in lazily (see add_pooled_alloc).
  for (unsigned c = 0; c < retired_.class_count; ++c) state->stats.set_pooled_frees(c, pooled_frees_of(*state, c));
  state->stats.fold_pooled_all(retired_.class_size, retired_.class_count);
  state->stats.publish_all(global);
  retired_.add(state->stats);
  state->stats.reset();
  add_cache_counters(state->cache, retired_.class_count, retired_pools_);
  // Only what was written is written again (see reporter::clear): the
  // bins and rows of classes the thread never used stay untouched.
  for (unsigned c = 0; c < reporter::kMaxClasses; ++c) {
    recycler::Bin& bin = state->cache.bins[c];
    if (bin.count) bin.count = 0;
    if (bin.capacity) bin.capacity = 0;
    recycler::BinCounters& counters = state->cache.counters[c];
    for (auto* counter : {&counters.refills, &counters.drains, &counters.misses}) reporter::clear(*counter);
    if (counters.moved.load(std::memory_order_relaxed)) counters.moved.store(0, std::memory_order_relaxed);
    if (state->policy_allocs[c]) state->policy_allocs[c] = 0;
    if (state->policy_frees[c]) state->policy_frees[c] = 0;
  }
  state->policy_countdown = state->policy_window = 0;
  if (reap_next_ == state) reap_next_ = state->next;
  state->active = false;
  state->reaped_by = 0;
  if (state->prev) state->prev->next = state->next; else active_ = state->next;
  if (state->next) state->next->prev = state->prev;
  state->next = free_;
  free_ = state;
  --active_count_;
}

void ThreadRegistry::retire(ThreadState* state, reporter::GlobalClassStats& global, const ReentryGuard&) {
  SpinLockGuard lock(lock_);
  retire_locked(state, global);
}

unsigned ThreadRegistry::claim_dead(const ThreadState* self, ThreadState** dead, const ReentryGuard&) {
  struct Candidate {
    ThreadState* state;
    uint32_t ordinal;
    int32_t tid;
  } candidates[kReapChecks];
  unsigned count = 0;
  const int32_t tgid = self->tgid;  // this process's (acquire just took it)
  {
    SpinLockGuard lock(lock_);
    // Round-robin over the active list: each state is looked at once in
    // about active_count_ / kReapChecks new threads.
    ThreadState* state = reap_next_ ? reap_next_ : active_;
    for (uint64_t seen = 0; state && seen < active_count_ && count < kReapChecks; ++seen) {
      if (state != self && state->tgid == tgid && state->tid > 0 && state->reaped_by == 0)
        candidates[count++] = {state, state->ordinal, state->tid};
      state = state->next ? state->next : active_;
    }
    reap_next_ = state;
  }
  // The caller is a malloc or a free that succeeds: errno stays as it was.
  const int saved_errno = errno;
  unsigned claimed = 0;
  for (unsigned i = 0; i < count; ++i) {
    // Signal 0: whether the thread exists in this process. ESRCH: gone
    // for good (its id may name a new thread of this process later, which
    // only keeps the state a while longer). Anything else keeps it.
    if (syscall(SYS_tgkill, tgid, candidates[i].tid, 0) == 0 || errno != ESRCH) continue;
    SpinLockGuard lock(lock_);
    ThreadState* state = candidates[i].state;
    // Still the same attachment (not retired, nor carved again since).
    if (state->active && state->ordinal == candidates[i].ordinal && state->reaped_by == 0) {
      state->reaped_by = self->ordinal;
      dead[claimed++] = state;
    }
  }
  errno = saved_errno;
  return claimed;
}

void ThreadRegistry::for_each_active(void (*visit)(ThreadState&), const ReentryGuard&) {
  SpinLockGuard lock(lock_);
  for (ThreadState* state = active_; state; state = state->next) visit(*state);
}

void ThreadRegistry::snapshot(reporter::StatsSnapshot* out, reporter::GlobalClassStats& global,
                              const ReentryGuard&) {
  SpinLockGuard lock(lock_);
  out->clear(retired_.class_count, retired_.class_size);
  for (ThreadState* state = active_; state; state = state->next) {
    uint64_t pooled_frees[reporter::kMaxClasses];
    for (unsigned c = 0; c < out->class_count; ++c) pooled_frees[c] = pooled_frees_of(*state, c);
    out->add(state->stats, /*is_thread=*/true, pooled_frees);
    add_cache_counters(state->cache, out->class_count, out->pools);
  }
  out->add(retired_);
  for (unsigned c = 0; c < out->class_count; ++c) {
    out->pools[c].refills += retired_pools_[c].refills;
    out->pools[c].drains += retired_pools_[c].drains;
    out->pools[c].misses += retired_pools_[c].misses;
  }
  if (fallback_) {
    // Late allocations of exited threads: their counts, but no extra thread.
    SpinLockGuard fallback_guard(fallback_lock_);
    out->add(fallback_->stats, /*is_thread=*/false);
  }
  out->finish(global);
}

void ThreadRegistry::reset_after_fork_child(ThreadState* survivor, reporter::GlobalClassStats& global,
                                            void (*on_dead_thread)(ThreadState&)) {
  // Called with both locks held: taken by this fork's prepare handler, or
  // held before it by the code a signal handler that forked interrupted
  // (a thread starting or exiting, a report). Then the lists may be
  // halfway through a change that code finishes when the handler returns:
  // they stay as they are, and the states of the threads that are gone
  // here stay in the active list (their counts still add up in the report,
  // their cached blocks are not reused).
  if (lock_.held_before_this_fork()) {
    fallback_lock_.reset_after_fork();
    lock_.reset_after_fork();
    return;
  }
  for (ThreadState* state = active_; state;) {
    ThreadState* next = state->next;
    // A dead thread's state the survivor was retiring (a signal handler's
    // fork() interrupted it): the survivor finishes that when it returns.
    const bool survivor_retires = survivor && state->reaped_by == survivor->ordinal;
    if (state != survivor && !survivor_retires) {
      on_dead_thread(*state);
      retire_locked(state, global);
    }
    state = next;
  }
  fallback_lock_.reset_after_fork();
  lock_.reset_after_fork();
}

}  // namespace hotpool::shim
