// The core behind the entry points: start-up, the recording fast paths,
// thread attach/teardown, fork and the report. entry_points.cpp holds only
// the extern "C" functions, each a few lines into this.
#pragma once

#include <atomic>
#include <cstddef>

#include "options.h"
#include "real_allocator.h"
#include "recycler/size_classes.h"
#include "reporter/class_stats.h"
#include "thread_state.h"

#define HOTPOOL_LIKELY(x) __builtin_expect(!!(x), 1)
#define HOTPOOL_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define HOTPOOL_NOINLINE __attribute__((noinline))
#define HOTPOOL_ALWAYS_INLINE inline __attribute__((always_inline))

namespace hotpool::shim {

// What every entry point looks at first.
enum class Phase : uint8_t {
  Booting = 0,  // real functions not resolved yet (zero-initialised state)
  Off,          // HOTPOOL_MODE=off: forward, record nothing
  Recording,    // profile / fixed / auto
};

extern std::atomic<Phase> g_phase;
extern RealAllocator g_real;
extern recycler::SizeClassTable g_classes;
extern reporter::GlobalClassStats g_global;
extern ThreadRegistry g_registry;
extern recycler::Recycler g_recycler;
// Requests up to this size may be pooled; 0 when nothing pools (modes off
// and profile, or no region).
extern size_t g_pool_limit;

// Start-up: resolve the real allocator, parse options, build the class
// table. Idempotent; the first caller does the work, others return at once.
HOTPOOL_NOINLINE void boot();
// Allocation while Booting: dlsym's own requests, or another thread's while
// boot() runs. The real allocator once resolved, else the static buffer.
HOTPOOL_NOINLINE void* allocate_while_booting(size_t size, size_t alignment, bool zero);

HOTPOOL_NOINLINE void record_alloc_slow(unsigned size_class, size_t requested, size_t usable);

// Mode auto: every policy window of a thread's allocations, its counts are
// shown to the policy (a countdown; in other modes it never reaches zero).
HOTPOOL_NOINLINE void evaluate_policy(ThreadState& state);
HOTPOOL_ALWAYS_INLINE void count_for_policy(ThreadState& state) {
  if (HOTPOOL_UNLIKELY(--state.policy_countdown == 0)) evaluate_policy(state);
}
HOTPOOL_NOINLINE void record_free_slow(unsigned size_class, size_t usable);

// FAST PATH (Recording): one usable-size query, one table lookup, a dozen
// plain loads and stores into this thread's counters; the unlikely branch
// goes to the slow path that attaches the thread (first allocation) or
// counts for a torn-down thread.
HOTPOOL_ALWAYS_INLINE void record_alloc(void* block, size_t requested) {
  const size_t usable = g_real.usable_size(block);
  const unsigned size_class = g_classes.class_of(usable);
  ThreadState* state = tls.state;
  if (HOTPOOL_UNLIKELY(!state)) return record_alloc_slow(size_class, requested, usable);
  state->stats.record_alloc(g_global, size_class, requested, usable);
  count_for_policy(*state);
}

// The caller measures the block (malloc_usable_size) before it is released.
HOTPOOL_ALWAYS_INLINE void record_free(size_t usable) {
  const unsigned size_class = g_classes.class_of(usable);
  ThreadState* state = tls.state;
  if (HOTPOOL_UNLIKELY(!state)) return record_free_slow(size_class, usable);
  state->stats.record_free(g_global, size_class, usable);
}

// The class a request's block is counted in: the class of the usable size
// the real allocator would give it (glibc: the chunk size less its 8-byte
// header, at least 24), so that a pooled block and a block from the real
// allocator land in the same class for the same request. Elsewhere: the
// class of the request.
HOTPOOL_ALWAYS_INLINE unsigned request_class(size_t size) {
  if (HOTPOOL_LIKELY(g_real.glibc_chunk_headers)) {
    const size_t chunk = (size + 8 + 15) & ~size_t{15};
    return g_classes.class_of((chunk < 32 ? 32 : chunk) - 8);
  }
  return g_classes.class_of(size);
}

// FAST PATH (pooled class): the thread cache's pop and the counters; the
// caller has checked the class is pooled. nullptr: not served by the pool
// (no thread state yet, inside hotpool, or the pool is out of memory).
HOTPOOL_ALWAYS_INLINE void* pooled_allocate(unsigned size_class, size_t size) {
  ThreadLocal& local = tls;
  ThreadState* state = local.state;
  if (HOTPOOL_UNLIKELY(state == nullptr || local.in_hotpool)) return nullptr;
  void* block = g_recycler.allocate(state->cache, size_class);
  if (HOTPOOL_LIKELY(block != nullptr)) {
    state->stats.record_pooled_alloc(g_global, size_class, size, g_recycler.class_size(size_class));
    count_for_policy(*state);
  }
  return block;
}

// A block of the pool region back to the pool (whatever the guard says):
// into the thread's cache, or straight to the depot for a thread that has
// no cache (not attached yet, or torn down).
HOTPOOL_NOINLINE void pooled_free_uncached(void* block);
HOTPOOL_ALWAYS_INLINE void pooled_free(void* block) {
  ThreadState* state = tls.state;
  if (HOTPOOL_UNLIKELY(state == nullptr)) return pooled_free_uncached(block);
  const unsigned size_class = g_recycler.class_of_block(block);
  g_recycler.deallocate(state->cache, block);  // aborts on a double or invalid free
  state->stats.record_free(g_global, size_class, g_recycler.class_size(size_class));
}

// True when a call made in `phase` should be recorded: hotpool is recording
// and the call does not come from inside hotpool.
HOTPOOL_ALWAYS_INLINE bool recording(Phase phase) {
  return phase == Phase::Recording && !tls.in_hotpool;
}

// A pointer that no malloc returned (not 16-byte aligned) passed to free or
// realloc: one line, then the real allocator's own verdict (glibc aborts).
HOTPOOL_NOINLINE void warn_invalid_pointer(const char* function, const void* block);
inline bool misaligned(const void* block) { return reinterpret_cast<uintptr_t>(block) & 15; }

// The effective mode (off when start-up could not enable recording).
Mode current_mode();

// Writes the report now ("exit" or "on-demand"). Never from a signal handler.
void write_report(const char* reason);

}  // namespace hotpool::shim
