// The core behind the entry points: start-up, the recording fast paths,
// thread attach/teardown, fork and the report. entry_points.cpp holds only
// the extern "C" functions, each a few lines into this.
#pragma once

#include <dlfcn.h>

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

// The entry points test `phase > Off` for Recording: nothing comes after it.
static_assert(Phase::Booting < Phase::Off && Phase::Off < Phase::Recording);
extern std::atomic<Phase> g_phase;

// A countdown that never reaches zero (sampling or the policy switched off).
inline constexpr uint64_t kNever = ~uint64_t{0};
// Allocations (of the countdown's kinds) of a thread between two ticks.
inline constexpr uint64_t kTickAllocs = 256;
extern RealAllocator g_real;
extern recycler::SizeClassTable g_classes;
extern reporter::GlobalClassStats g_global;
extern ThreadRegistry g_registry;
extern recycler::Recycler g_recycler;
// Requests up to this size may be pooled; 0 when nothing pools (modes off
// and profile, or no region).
extern size_t g_pool_limit;

// The usable size the real allocator gives a request, as hotpool reckons it
// without a block to ask about: glibc's chunk arithmetic (the request plus
// an 8-byte header, rounded up to 16, at least 32, less the header; from
// its default mmap threshold, 128 KiB, a mapping of whole pages less 16);
// for another allocator, the request rounded up to 16 (at least 16).
// (glibc raises the threshold as a program frees mapped blocks: past that,
// its blocks of 128 KiB or more come from the heap, a page or less smaller
// than reckoned here.)
inline size_t real_usable_estimate(size_t request) {
  if (!g_real.glibc_chunk_headers) return request <= 16 ? 16 : (request + 15) & ~size_t{15};
  const size_t chunk = (request + 8 + 15) & ~size_t{15};
  if (request >= (size_t{128} << 10)) {
    const size_t page = recycler::page_bytes();
    return ((chunk + 8 + page - 1) & ~(page - 1)) - 16;
  }
  return (chunk < 32 ? 32 : chunk) - 8;
}
// The entry points' view of g_pool_limit and of the phase, set once
// start-up has chosen phase Recording.
struct PoolGate {
  // min(g_pool_limit, the direct class table's limit) + 1: a request below
  // it finds whether it pools with one table load, before any phase test.
  // 0 while closed: not even malloc(0) passes (mode fixed fills the table
  // before start-up knows it will record).
  size_t direct_end;
  // Requests in [large_first, large_first + large_span) may pool too (the
  // classes above the direct table): one subtraction and one compare.
  // Every request until start-up has chosen phase Recording, and in mode
  // off (large_first 0, large_span all ones): malloc's way to the phase
  // test; none in Recording without pools (large_span 0).
  size_t large_first;
  size_t large_span;
};
extern PoolGate g_pool_gate;

// Start-up: resolve the real allocator, parse options, build the class
// table. Idempotent; the first caller does the work, others return at once.
HOTPOOL_NOINLINE void boot();
// Allocation while Booting: dlsym's own requests, or another thread's while
// boot() runs. The real allocator once resolved, else the static buffer.
HOTPOOL_NOINLINE void* allocate_while_booting(size_t size, size_t alignment, bool zero);

HOTPOOL_NOINLINE void record_alloc_slow(unsigned size_class, size_t requested, size_t usable);
// Every kTickAllocs allocations of a thread: its pooled blocks' live bytes
// go into its deltas (published when due), the policy's window advances
// (mode auto: evaluate_policy when it is over).
HOTPOOL_NOINLINE void tick(ThreadState& state);

// The allocation countdown (ThreadState::countdown): malloc and calloc
// decrement it, and at zero take_event says what the allocation brings:
// a sample (the allocation is sampled), a tick (after it), or both. One
// decrement and one branch per allocation for both kinds of event.
enum : unsigned { kSampleEvent = 1, kTickEvent = 2 };
HOTPOOL_NOINLINE unsigned take_event(ThreadState& state);
// Sets the countdown to the nearer of sample_left and tick_left, folding
// in what the current one counted (attach; sampling starting late).
void arm_countdown(ThreadState& state);
// The thread's allocator calls so far (the countdown's allocations, this
// one included, its frees of pooled blocks and its other calls), for
// "temporary". A pooled free counts nowhere (one add less on the fast
// path): pooled_frees_of gives them, summed here over the thread's used
// bins (sampled allocations and frees only; none in mode profile). Inline
// up to the bins: a sampled allocation and its free each ask.
uint64_t pooled_frees_of_sized_bins(const ThreadState& state);
HOTPOOL_ALWAYS_INLINE uint64_t thread_ops(const ThreadState& state) {
  const uint64_t ops =
      state.stats.calls.load(std::memory_order_relaxed) + state.alloc_base + state.window - state.countdown;
  return recycler::any_sized_bin(state.cache) ? ops + pooled_frees_of_sized_bins(state) : ops;
}
// The owner's pooled class c after a slow path (refill, drain, tick,
// realloc in place): its pooled frees written out (pooled_frees_of), its
// pooled blocks' live bytes folded into its deltas, published when due.
void note_pooled(ThreadState& state, unsigned c);
// The calling thread's state, attaching it if this is its first recorded
// call; null inside hotpool, after teardown or without memory for a state.
HOTPOOL_NOINLINE ThreadState* attach_current_thread();

// Mode auto: at the end of each policy window (tick), the thread's counts
// are shown to the policy; cut_short: the window ended on time, before its
// count (see AutoPolicy::evaluate).
HOTPOOL_NOINLINE void evaluate_policy(ThreadState& state, bool cut_short = false);
// A recorded call that the countdown does not count (frees, aligned
// allocations, realloc...): one increment.
HOTPOOL_ALWAYS_INLINE void count_call(ThreadState& state, uint64_t calls = 1) {
  reporter::bump(state.stats.calls, calls);
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
  count_call(*state);
}

// The caller measures the block (malloc_usable_size) before it is released.
HOTPOOL_ALWAYS_INLINE void record_free(size_t usable) {
  const unsigned size_class = g_classes.class_of(usable);
  ThreadState* state = tls.state;
  if (HOTPOOL_UNLIKELY(!state)) return record_free_slow(size_class, usable);
  state->stats.record_free(g_global, size_class, usable);
  count_call(*state);
}

// FAST PATH: a block of the pool region back to the pool, whatever the
// guard says: validation (HOTPOOL_CHECKS) and the cache's push, no counter
// (see pooled_frees_of); without a thread state, straight to the depot.
HOTPOOL_NOINLINE void pooled_free(void* block);
// The rare ends of pooled_free_at, given the block alone (the thread's
// state and the class are found again): the fast path then keeps nothing
// alive across its checks for them, and saves no register.
// gated: pool_state is null (not attached yet: attach, then as any free;
// torn down: straight to the depot; or inside hotpool, or a signal handler
// that interrupted a pooled fast path of this thread: kept until the
// thread is out, free_deferred).
HOTPOOL_NOINLINE void pooled_free_gated(void* block);
// unmarked: the checks failed (an invalid or double free aborts there, or
// is quarantined); full: the bin is full (drain half, then push).
HOTPOOL_NOINLINE void pooled_free_unmarked(void* block);
HOTPOOL_NOINLINE void pooled_free_full(void* block);

// pooled_free, given the block's offset in the pool region (free() has it
// from its ownership test), inlined into free(): no jump between them.
HOTPOOL_ALWAYS_INLINE void pooled_free_at(void* block, size_t region_offset) {
  ThreadLocal& local = tls;
  ThreadState* state = local.pool_state;
  if (HOTPOOL_UNLIKELY(state == nullptr)) return pooled_free_gated(block);
  const size_t size_class = g_recycler.class_of_offset(region_offset);
  if (HOTPOOL_UNLIKELY(!g_recycler.validate_and_mark(size_class, block)))
    return pooled_free_unmarked(block);
  const size_t line = recycler::Recycler::line_of(size_class);  // one shift for the bin and the counters
  // Nothing counted: the frees follow from the bin (pooled_frees_of).
  // The push as the pop in pooled_malloc: out of a signal handler's reach.
  local.pool_state = nullptr;
  asm volatile("" ::: "memory");
  const bool pushed = g_recycler.push(recycler::Recycler::bin_at_line(state->cache, line), block);
  asm volatile("" ::: "memory");
  local.pool_state = state;
  if (HOTPOOL_UNLIKELY(!pushed)) return pooled_free_full(block);
}
// A free that cannot be done now (a signal handler's, while its thread is
// inside hotpool): a pooled block, or a sampled one whose free is recorded
// already, kept until free_deferred (16 at most; more leak).
HOTPOOL_NOINLINE void defer_free(ThreadState& state, void* block);
// Frees deferred while the thread was inside hotpool, done now.
void free_deferred(ThreadState& state);

// True when a call made in `phase` should be recorded: hotpool is recording
// and the call does not come from inside hotpool.
HOTPOOL_ALWAYS_INLINE bool recording(Phase phase) {
  return phase == Phase::Recording && !tls.in_hotpool;
}

// A pointer that no malloc returned (not even 8-byte aligned: jemalloc
// gives 8-byte alignment to blocks of 8 bytes or less) passed to free or
// realloc: one line, then the real allocator's own verdict (glibc aborts).
HOTPOOL_NOINLINE void warn_invalid_pointer(const char* function, const void* block);
inline bool misaligned(const void* block) { return reinterpret_cast<uintptr_t>(block) & 7; }

// The effective mode (off when start-up could not enable recording).
Mode current_mode();
const Options& current_options();
// Address space for the sample region (HOTPOOL_REGION, within RLIMIT_AS).
size_t sample_region_bytes();
// A secret of this process for hardening keys, different for each `salt`:
// from AT_RANDOM (16 random bytes the kernel gives every process, no
// system call) and an address (ASLR); never 0.
uint64_t process_key(uint64_t salt);
// One line on stderr.
void write_warning(const char* line);

// dlopen, and dlmopen into the base namespace, with RTLD_DEEPBIND, for
// `caller` (deepbind.cpp); the real dlopen and dlmopen.
void* dlopen_deepbind(const char* file, int mode, const void* caller);
void* dlmopen_deepbind(const char* file, int mode, const void* caller);
void* (*real_dlopen())(const char*, int);
void* (*real_dlmopen())(long, const char*, int);

// The next definition of `name` after libhotpool.so (RTLD_NEXT), looked up
// on first use and kept in `slot` (the program may call it before hotpool
// boots); `missing` when there is none.
template <typename Function>
Function next_definition(std::atomic<Function>& slot, const char* name, Function missing) {
  Function call = slot.load(std::memory_order_acquire);
  if (HOTPOOL_UNLIKELY(!call)) {
    call = reinterpret_cast<Function>(dlsym(RTLD_NEXT, name));
    if (!call) call = missing;
    slot.store(call, std::memory_order_release);
  }
  return call;
}

// How many objects the loader has unloaded so far (dl_phdr_info's
// dlpi_subs): dlclose() tells an unload from a dropped reference by it.
uint64_t objects_unloaded();

// The pipe2 interposed for libunwind (see entry_points.cpp).
int real_pipe2(int fds[2], int flags);
bool called_from_unwinder(const void* return_address);
void move_to_high_descriptors(int fds[2]);

// Writes the report now ("exit" or "on-demand"). Never from a signal handler.
void write_report(const char* reason);

}  // namespace hotpool::shim
