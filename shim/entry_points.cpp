// The extern "C" entry points: the whole malloc API and C++'s operator
// new/delete, each a few lines into the core (runtime.h). Nothing else in
// libhotpool.so is exported.
//
// C++ operator new and delete (plain, array, sized and nothrow) are here
// too, as malloc and free with the C++ runtime's answer to a failure (see
// below); the aligned variants are the runtime's, which call aligned_alloc
// and free through the PLT and so arrive here. A test checks every variant
// is counted.
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "hotpool/hotpool.h"
#include "runtime.h"
#include "sampler.h"

#define HOTPOOL_EXPORT extern "C" __attribute__((visibility("default")))

using namespace hotpool::shim;

namespace {

// Start-up, out of line: the first call of the process lands here, and so
// do dlsym's own allocations while the real allocator is being resolved.
// Once booted, `again` repeats the call through the normal path; while
// still booting, the static buffer serves (any alignment up to a page).
template <typename Again>
HOTPOOL_NOINLINE void* allocate_booting(Again again, size_t size, size_t alignment, bool zero) {
  boot();
  if (g_phase.load(std::memory_order_acquire) != Phase::Booting) return again();
  if (alignment > 4096) return errno = EINVAL, nullptr;
  size_t rounded = 16;
  while (rounded < alignment) rounded *= 2;
  return allocate_while_booting(size, rounded, zero);
}

// malloc's start-up (see PoolGate).
HOTPOOL_NOINLINE void* malloc_booting(size_t size) {
  return allocate_booting([=] { return malloc(size); }, size, 0, false);
}

bool is_power_of_two(size_t value) { return value && !(value & (value - 1)); }

// realloc of a block from the bootstrap buffer: it never goes back to the
// real allocator, so move it out by copy.
void* realloc_from_bootstrap(void* block, size_t size) {
  void* moved = malloc(size);
  if (moved) {
    const size_t old_size = bootstrap::usable_size(block);
    std::memcpy(moved, block, old_size < size ? old_size : size);
  }
  return moved;
}

// The recording halves of the hottest entry points live in functions of
// their own, entered by a tail jump: the entry point itself then needs no
// stack frame, and in mode off it is the pool gate's compare (malloc and
// calloc), a load, a compare and a jump to the real allocator.
//
// The generic path: any thread, attached or not, inside hotpool or not;
// an allocation that the countdown did not count.
HOTPOOL_NOINLINE void* unsampled_malloc(size_t size) {
  void* block = g_real.malloc(size);
  if (HOTPOOL_LIKELY(block != nullptr) && !tls.in_hotpool) record_alloc(block, size);
  return block;
}

HOTPOOL_NOINLINE void* pooled_malloc_refill(unsigned size_class, size_t size);

// The pooled half of malloc once the countdown is passed: the thread
// cache's pop and one add (count and bytes, packed); an empty bin is a
// tail call to the refill.
// class_plus_one: the class plus one, as the direct table gives it (the
// minus one folds into the addresses of the class's bin and counters).
HOTPOOL_ALWAYS_INLINE void* pooled_pop(ThreadLocal& local, ThreadState* state, size_t size, unsigned class_plus_one) {
  // The class plus one, times 64 (line_of): the minus one folds into the
  // displacements of the bin's and the counters' addresses.
  const size_t line_plus_64 = hotpool::recycler::Recycler::line_of(class_plus_one);
  const size_t line = line_plus_64 - 64;
  // The pop reads the bin's count, then its slot, then writes the count: a
  // signal handler that allocates or frees in between would see the bin
  // half-changed. While pool_state is null it goes to the real allocator
  // (and defers its frees of pooled blocks) instead: two TLS stores.
  local.pool_state = nullptr;
  asm volatile("" ::: "memory");
  void* block = g_recycler.pop(hotpool::recycler::Recycler::bin_at_line(state->cache, line));
  asm volatile("" ::: "memory");
  local.pool_state = state;
  if (HOTPOOL_UNLIKELY(block == nullptr)) return pooled_malloc_refill(class_plus_one - 1, size);
  hotpool::reporter::ThreadClassStats::add_pooled_alloc(state->stats.row_at_line(line), size);
  return block;
}

HOTPOOL_NOINLINE void* recorded_malloc_publish(ThreadState* state, void* block, unsigned size_class) {
  state->stats.publish(g_global, size_class);
  return block;
}
HOTPOOL_NOINLINE void* recorded_malloc_generic(void* block, size_t size) {
  // The thread is attached: tls.state is the fast path's state. The
  // countdown counted the allocation already.
  const size_t usable = g_real.usable_size(block);
  tls.state->stats.record_alloc(g_global, g_classes.class_of(usable), size, usable);
  return block;
}

// The recording half of malloc once the countdown is passed: the real
// call, then the block's usable size from glibc's chunk header, its class
// from the direct table and the class's counters. Everything rare (a
// class beyond the direct table, another real allocator, a publish) is a
// tail call, so the caller saves only what lives across the real call.
HOTPOOL_ALWAYS_INLINE void* record_real_block(ThreadState* state, void* block, size_t size);
HOTPOOL_ALWAYS_INLINE void* recorded_real_malloc(ThreadState* state, size_t size) {
  void* block = g_real.malloc(size);
  if (HOTPOOL_UNLIKELY(block == nullptr)) return block;
  return record_real_block(state, block, size);
}
// The recording of a block the real allocator just gave an attached
// thread outside hotpool (`state` is tls.state), for an allocation the
// countdown counted.
HOTPOOL_ALWAYS_INLINE void* record_real_block(ThreadState* state, void* block, size_t size) {
  const size_t usable = g_real.heap_usable_size(block);
  if (HOTPOOL_UNLIKELY(!g_classes.direct(usable))) return recorded_malloc_generic(block, size);
  const unsigned size_class = g_classes.class_of_direct(usable);
  if (HOTPOOL_UNLIKELY(state->stats.add_alloc(g_global, size_class, size, usable)))
    return recorded_malloc_publish(state, block, size_class);
  return block;
}
// The same for calloc: a block from the real calloc means count * size did
// not overflow.
HOTPOOL_ALWAYS_INLINE void* recorded_real_calloc(ThreadState* state, size_t count, size_t size) {
  void* block = g_real.calloc(count, size);
  if (HOTPOOL_UNLIKELY(block == nullptr)) return block;
  return record_real_block(state, block, count * size);
}

// The frame of the function calling this one, for a sampled stack's
// capture to start from (see reporter::Unwinder::capture): as built, malloc
// and recorded_malloc reach event_malloc by tail jumps, so its return
// address is the program's call into malloc, and hotpool's frames between
// the capture and there are not walked. Where a compiler makes calls of
// them instead, the capture walks those frames as any others. With the
// %rbp that frame had at its call when known (`caller_rbp`, see
// kEventTrampolines): a frame-pointer frame is replayed only from it.
#define HOTPOOL_CALLER_FRAME_WITH(rbp, rbp_known)                                                     \
  (hotpool::reporter::UnwindFrame{reinterpret_cast<uintptr_t>(__builtin_return_address(0)),           \
                                  reinterpret_cast<uintptr_t>(__builtin_dwarf_cfa()), rbp, rbp_known})
#define HOTPOOL_CALLER_FRAME() HOTPOOL_CALLER_FRAME_WITH(caller_rbp, kEventTrampolines)

// The event functions below (event_malloc, event_calloc, event_realloc)
// are entered through a trampoline of two instructions that passes them,
// as a fourth argument, %rbp as it is at their entry: when they are
// reached by tail jumps from the program's call, the calling function's
// %rbp at its call (the ABI has every function that jumps on restore the
// callee-saved registers first), else that of hotpool's function that
// called (which the replay then carries up only through frames whose table
// entry says where they keep their caller's, see FrameTable). A
// compiled function cannot read it reliably: its prologue may have put
// something else in %rbp first.
#if defined(__x86_64__)
constexpr bool kEventTrampolines = true;
#define HOTPOOL_EVENT_TRAMPOLINE(name)     \
  asm(".pushsection .text\n"               \
      ".p2align 4\n"                       \
      ".globl " #name "\n"                 \
      ".hidden " #name "\n"                \
      ".type " #name ", @function\n"       \
      #name ":\n"                          \
      ".cfi_startproc\n"                   \
      "  movq %rbp, %rcx\n"                \
      "  jmp " #name "_from\n"             \
      ".cfi_endproc\n"                     \
      ".size " #name ", .-" #name "\n"     \
      ".popsection\n")
// The trampoline (declared outside the anonymous namespace: it is defined
// in assembly), then the function it enters.
#define HOTPOOL_EVENT_FUNCTION(name, ...)                                                       \
  }                                                                                             \
  void* name(__VA_ARGS__) asm("hotpool_" #name);                                                \
  namespace {                                                                                   \
  __attribute__((used)) HOTPOOL_NOINLINE void* name##_from(__VA_ARGS__, uintptr_t caller_rbp) \
      asm("hotpool_" #name "_from");                                                            \
  HOTPOOL_EVENT_TRAMPOLINE(hotpool_##name);
#else
constexpr bool kEventTrampolines = false;
#define HOTPOOL_EVENT_FUNCTION(name, ...) HOTPOOL_NOINLINE void* name##_from(__VA_ARGS__, uintptr_t caller_rbp);
#endif
HOTPOOL_EVENT_FUNCTION(event_malloc, ThreadState* state, size_t size, unsigned class_plus_one)
HOTPOOL_EVENT_FUNCTION(event_calloc, ThreadState* state, size_t count, size_t size)
HOTPOOL_EVENT_FUNCTION(event_realloc, ThreadState* state, void* block, size_t size)
#if !defined(__x86_64__)
HOTPOOL_ALWAYS_INLINE void* event_malloc(ThreadState* state, size_t size, unsigned class_plus_one) {
  return event_malloc_from(state, size, class_plus_one, 0);
}
HOTPOOL_ALWAYS_INLINE void* event_calloc(ThreadState* state, size_t count, size_t size) {
  return event_calloc_from(state, count, size, 0);
}
HOTPOOL_ALWAYS_INLINE void* event_realloc(ThreadState* state, void* block, size_t size) {
  return event_realloc_from(state, block, size, 0);
}
#endif

// The allocation that brought the countdown to zero (class_plus_one: its
// pooled class plus one, or 0): sampled if a sample is due, else served as
// any other; then the tick if one is due.
void* event_malloc_from(ThreadState* state, size_t size, unsigned class_plus_one, uintptr_t caller_rbp) {
  if (g_sampling_by_bytes && by_bytes_skip(*state, size)) {  // by bytes, every allocation comes here
    if (class_plus_one) return pooled_pop(tls, state, size, class_plus_one);
    return recorded_real_malloc(state, size);
  }
  const unsigned event = take_event(*state);
  void* block = (event & kSampleEvent) ? sampled_allocate(*state, size, HOTPOOL_CALLER_FRAME()) : nullptr;
  if (block == nullptr) {
    if (class_plus_one) block = pooled_pop(tls, state, size, class_plus_one);
    else block = recorded_real_malloc(state, size);
  }
  if (event & kTickEvent) tick(*state);
  return block;
}

HOTPOOL_NOINLINE void* recorded_malloc_unattached(size_t size) {
  // A request that raced with start-up may come here while booting: no
  // thread is attached before the phase is Recording (see malloc).
  const Phase phase = g_phase.load(std::memory_order_relaxed);
  if (HOTPOOL_UNLIKELY(phase != Phase::Recording)) {
    if (phase == Phase::Off) return g_real.malloc(size);
    return malloc_booting(size);
  }
  // A thread's first allocation attaches it first, so that it can be
  // sampled too (HOTPOOL_SAMPLE=1: every allocation is).
  ThreadState* state = attach_current_thread();
  if (state == nullptr) return unsampled_malloc(size);
  if (HOTPOOL_UNLIKELY(--state->countdown == 0)) return event_malloc(state, size, 0);
  return recorded_real_malloc(state, size);
}

// FAST PATH (Recording, not pooled): the thread state, the countdown, then
// recorded_real_malloc.
// pool_state is non-null only outside hotpool (the guard nulls it), so the
// block is the program's and is recorded.
HOTPOOL_NOINLINE void* recorded_malloc(size_t size) {
  ThreadState* state = tls.pool_state;
  if (HOTPOOL_UNLIKELY(state == nullptr)) return recorded_malloc_unattached(size);
  if (HOTPOOL_UNLIKELY(--state->countdown == 0)) return event_malloc(state, size, 0);
  return recorded_real_malloc(state, size);
}

// The generic path of free: any thread, inside hotpool or not.
HOTPOOL_NOINLINE void recorded_free_generic(void* block) {
  if (HOTPOOL_UNLIKELY(bootstrap::owns(block))) return;  // static memory, never reused (see free)
  if (HOTPOOL_LIKELY(block != nullptr) && !tls.in_hotpool) {
    if (HOTPOOL_UNLIKELY(misaligned(block))) warn_invalid_pointer("free", block);
    else record_free(g_real.usable_size(block));
  }
  g_real.free(block);
}

HOTPOOL_NOINLINE void recorded_free_publish(ThreadState* state, void* block, unsigned size_class) {
  state->stats.publish(g_global, size_class);
  g_real.free(block);
}

// FAST PATH (Recording, a block of the real allocator): as recorded_malloc,
// without a stack frame at all: the counters, then a tail jump to the real
// free. An attached thread outside hotpool, an aligned block of glibc's
// heap in the direct table; anything else takes the generic path.
HOTPOOL_NOINLINE void recorded_free(void* block) {
  ThreadState* state = tls.pool_state;
  if (HOTPOOL_UNLIKELY(state == nullptr || block == nullptr || misaligned(block))) return recorded_free_generic(block);
  const size_t usable = g_real.heap_usable_size(block);
  if (HOTPOOL_UNLIKELY(!g_classes.direct(usable))) return recorded_free_generic(block);
  const unsigned size_class = g_classes.class_of_direct(usable);
  count_call(*state);
  if (HOTPOOL_UNLIKELY(state->stats.add_free(size_class, usable)))
    return recorded_free_publish(state, block, size_class);
  g_real.free(block);
}

// The calloc that brought the countdown to zero: as event_malloc.
void* event_calloc_from(ThreadState* state, size_t count, size_t size, uintptr_t caller_rbp) {
  size_t bytes;
  const bool overflow = __builtin_mul_overflow(count, size, &bytes);
  if (g_sampling_by_bytes && !overflow && by_bytes_skip(*state, bytes))  // as event_malloc
    return recorded_real_calloc(state, count, size);
  const unsigned event = take_event(*state);
  void* block = nullptr;
  if (overflow) {
    errno = ENOMEM;
  } else {
    if (event & kSampleEvent) block = sampled_allocate(*state, bytes, HOTPOOL_CALLER_FRAME());
    if (block) std::memset(block, 0, bytes);
    else block = recorded_real_calloc(state, count, size);
  }
  if (event & kTickEvent) tick(*state);
  return block;
}

HOTPOOL_NOINLINE void* recorded_calloc_unattached(size_t count, size_t size) {
  ThreadState* state = attach_current_thread();  // a first allocation attaches the thread
  if (state != nullptr && HOTPOOL_UNLIKELY(--state->countdown == 0)) return event_calloc(state, count, size);
  void* block = g_real.calloc(count, size);
  if (HOTPOOL_LIKELY(block != nullptr) && !tls.in_hotpool) {
    if (state != nullptr) return record_real_block(state, block, count * size);  // the countdown counted it
    record_alloc(block, count * size);
  }
  return block;
}

// FAST PATH (Recording, not pooled): as recorded_malloc.
HOTPOOL_NOINLINE void* recorded_calloc(size_t count, size_t size) {
  ThreadState* state = tls.pool_state;
  if (HOTPOOL_UNLIKELY(state == nullptr)) return recorded_calloc_unattached(count, size);
  if (HOTPOOL_UNLIKELY(--state->countdown == 0)) return event_calloc(state, count, size);
  return recorded_real_calloc(state, count, size);
}

// The aligned allocations (memalign & co.) run the countdown as malloc's
// do, so that they are sampled as often (a sampled one is aligned in the
// sample region, up to a page); they are never pooled: `real`, the real
// function's call, serves every one that is not sampled. `alignment`: the
// block's, a power of two, or 0 when the request's alignment is invalid
// (the real function says what then) and no sample can be taken.
template <typename Real>
HOTPOOL_ALWAYS_INLINE void* recorded_real_aligned(ThreadState* state, size_t size, Real real) {
  void* block = real();
  if (HOTPOOL_UNLIKELY(block == nullptr)) return block;
  return record_real_block(state, block, size);  // as malloc's (glibc's memalign gives heap chunks too)
}

// The aligned allocation that brought the countdown to zero: as event_malloc.
template <typename Real>
HOTPOOL_NOINLINE void* event_aligned(ThreadState* state, size_t alignment, size_t size, size_t min_usable, Real real) {
  if (g_sampling_by_bytes && by_bytes_skip(*state, size)) return recorded_real_aligned(state, size, real);
  const unsigned event = take_event(*state);
  void* block = nullptr;
  if ((event & kSampleEvent) && alignment)
    // (No trampoline for the template: the frame's %rbp is not known.)
    block = sampled_allocate_aligned(*state, size, HOTPOOL_CALLER_FRAME_WITH(0, false), alignment, min_usable);
  if (block == nullptr) block = recorded_real_aligned(state, size, real);
  if (event & kTickEvent) tick(*state);
  return block;
}

template <typename Real>
HOTPOOL_NOINLINE void* recorded_aligned_unattached(size_t alignment, size_t size, size_t min_usable, Real real) {
  ThreadState* state = attach_current_thread();  // a first allocation attaches the thread
  if (state != nullptr) {
    if (HOTPOOL_UNLIKELY(--state->countdown == 0)) return event_aligned(state, alignment, size, min_usable, real);
    return recorded_real_aligned(state, size, real);
  }
  // Inside hotpool, torn down, or a signal handler inside a pooled path.
  void* block = real();
  if (HOTPOOL_LIKELY(block != nullptr) && !tls.in_hotpool) record_alloc(block, size);
  return block;
}

// Recording (the phase checked by the caller). `min_usable`: what a
// sampled block must hold beyond `size` (pvalloc's whole pages).
template <typename Real>
HOTPOOL_ALWAYS_INLINE void* recorded_aligned(size_t alignment, size_t size, Real real, size_t min_usable = 0) {
  ThreadState* state = tls.pool_state;
  if (HOTPOOL_UNLIKELY(state == nullptr)) return recorded_aligned_unattached(alignment, size, min_usable, real);
  if (HOTPOOL_UNLIKELY(--state->countdown == 0)) return event_aligned(state, alignment, size, min_usable, real);
  return recorded_real_aligned(state, size, real);
}

// The pooled class's bin was empty: a refill from the depot.
HOTPOOL_NOINLINE void* pooled_malloc_refill(unsigned size_class, size_t size) {
  ThreadState* state = tls.pool_state;
  void* block;
  {
    // The depot's lock is held in there: a signal handler that allocates
    // meanwhile must not come back into the pool, but go to the real allocator.
    // The counts too: note_pooled folds counters that a handler's pooled
    // allocation would add to.
    ReentryGuard guard;
    block = g_recycler.allocate_slow(state->cache, size_class);
    if (block) {
      state->stats.add_pooled_alloc(size_class, size);
      note_pooled(*state, size_class);
      // The pooled paths keep no per-operation peak view; a refill is where a
      // class's live bytes grow (the cache ran dry), so the peak is sampled
      // here, within half a cache of blocks of the truth for this thread.
      state->stats.note_peak(g_global, size_class);
    }
  }
  if (HOTPOOL_UNLIKELY(state->deferred_count)) free_deferred(*state);
  if (!block) return recorded_real_malloc(state, size);  // the pool is out of memory
  return block;
}

// FAST PATH (pooled class, checked by the caller): a TLS load, the
// countdown, the thread cache's pop and one counter add, without a call:
// every slow part (refill, an event, no thread state) is a tail call, so
// the function needs no stack frame. Inlined into malloc (no jump between
// them); the other callers call pooled_malloc.
HOTPOOL_ALWAYS_INLINE void* pooled_malloc_inline(size_t size, unsigned class_plus_one) {
  ThreadLocal& local = tls;
  ThreadState* state = local.pool_state;
  if (HOTPOOL_UNLIKELY(state == nullptr)) return unsampled_malloc(size);
  if (HOTPOOL_UNLIKELY(--state->countdown == 0)) return event_malloc(state, size, class_plus_one);
  return pooled_pop(local, state, size, class_plus_one);
}

HOTPOOL_NOINLINE void* pooled_malloc(size_t size, unsigned class_plus_one) {
  return pooled_malloc_inline(size, class_plus_one);
}

HOTPOOL_NOINLINE void* pooled_calloc(size_t size, unsigned class_plus_one) {
  void* block = pooled_malloc(size, class_plus_one);  // pooled, or the real malloc's
  return block ? std::memset(block, 0, size) : nullptr;
}

// A request above the direct class table, within the pool limit: its class
// plus one when that class is pooled, else 0.
HOTPOOL_ALWAYS_INLINE unsigned pooled_class_plus_one_beyond_direct(size_t size) {
  const unsigned size_class = g_classes.class_of(size);
  return g_recycler.pooled(size_class) ? size_class + 1 : 0;
}
// A request above the direct table when pools run: pooled if its class is.
HOTPOOL_NOINLINE void* malloc_large(size_t size) {
  if (const unsigned class_plus_one = pooled_class_plus_one_beyond_direct(size)) return pooled_malloc(size, class_plus_one);
  return recorded_malloc(size);
}
// Past the pool gate's second test: a request above the direct table
// when pools run, or any request before start-up chose phase Recording, and
// in mode off (see PoolGate).
HOTPOOL_NOINLINE void* malloc_beyond_direct(size_t size) {
  const Phase phase = g_phase.load(std::memory_order_relaxed);
  if (phase == Phase::Off) return g_real.malloc(size);
  if (HOTPOOL_UNLIKELY(phase != Phase::Recording)) return malloc_booting(size);
  return malloc_large(size);  // a call of its own: this function needs no stack frame
}
HOTPOOL_ALWAYS_INLINE bool beyond_direct(size_t size) {
  return HOTPOOL_UNLIKELY(size - g_pool_gate.large_first < g_pool_gate.large_span);
}

// realloc(p, 0) of a block of hotpool's own (pooled, sampled): as the real
// allocator's does (RealAllocator::realloc_zero_frees): glibc frees p and
// returns NULL; mimalloc, stacked under hotpool, gives a block of its
// smallest size.
void* realloc_to_zero(void* block) {
  free(block);
  return g_real.realloc_zero_frees ? nullptr : malloc(0);
}

// realloc of a pooled block: in place when the new size needs the same
// class, else a move (to a pooled or a real block) and a free.
void* realloc_pooled(void* block, size_t size) {
  const unsigned size_class = g_recycler.class_of_block(block);
  if (g_recycler.config().checks) {
    if (const char* problem = g_recycler.region().depot(size_class).check_block(block))
      hotpool::recycler::fatal_pointer_error(problem, block);
  }
  if (size == 0) return realloc_to_zero(block);
  const size_t old_size = g_recycler.class_size(size_class);
  if (size <= g_pool_limit && g_classes.class_of(size) == size_class) {
    if (ThreadState* state = tls.state) {
      {
        // A free and an allocation: the free counts through pooled_frees_of,
        // among the thread's used bins (thread_ops). Under the guard, as
        // pooled_malloc_refill.
        ReentryGuard guard;
        g_recycler.ensure_sized(state->cache, size_class);
        state->stats.add_pooled_alloc(size_class, size);
        note_pooled(*state, size_class);
        count_call(*state);  // the allocation's call; the free's is in pooled_frees_of
      }
      if (HOTPOOL_UNLIKELY(state->deferred_count)) free_deferred(*state);
    }
    return block;
  }
  void* moved = malloc(size);
  if (!moved) return nullptr;  // errno is ENOMEM; the old block stays valid
  std::memcpy(moved, block, old_size < size ? old_size : size);
  free(block);
  if (is_sampled(moved)) sampled_restamp(moved);  // allocated, as counted, after the free
  return moved;
}

// realloc of a sampled block: always a move, so that the free side of the
// sample (lifetime, escape) is recorded.
void* realloc_sampled(void* block, size_t size) {
  if (size == 0) return realloc_to_zero(block);
  // The old block's free is recorded first (a realloc frees, then
  // allocates), its memory released after the copy.
  sampled_free_record(block);
  void* moved = malloc(size);
  if (!moved) {
    sampled_revive(block);  // ENOMEM: the old block stays valid (its free was counted once)
    return nullptr;
  }
  const size_t old_size = sampled_usable_size(block);
  std::memcpy(moved, block, old_size < size ? old_size : size);
  sampled_free_release(block);
  return moved;
}

// realloc of a block of the real allocator, by the real realloc; the
// countdown counted it when `counted` (the thread's state) is given.
HOTPOOL_ALWAYS_INLINE void* realloc_real(ThreadState* counted, void* block, size_t size) {
  const size_t old_usable = g_real.usable_size(block);
  void* moved = g_real.realloc(block, size);
  if (moved) {
    record_free(old_usable);
    if (counted != nullptr) return record_real_block(counted, moved, size);
    record_alloc(moved, size);
  } else if (size == 0) {
    record_free(old_usable);  // glibc's realloc(p, 0) frees p and returns NULL
  }
  return moved;
}

// The realloc of a real block that brought the countdown to zero (size is
// not 0): as event_malloc. A sample moves the block into a sampled one (as
// realloc_sampled: the free of the old block is recorded before the new
// block's allocation); else the real realloc.
void* event_realloc_from(ThreadState* state, void* block, size_t size, uintptr_t caller_rbp) {
  if (g_sampling_by_bytes && by_bytes_skip(*state, size)) return realloc_real(state, block, size);
  const unsigned event = take_event(*state);
  void* moved = (event & kSampleEvent) ? sampled_allocate(*state, size, HOTPOOL_CALLER_FRAME()) : nullptr;
  if (moved != nullptr) {
    const size_t old_usable = g_real.usable_size(block);
    std::memcpy(moved, block, old_usable < size ? old_usable : size);
    record_free(old_usable);
    g_real.free(block);
    sampled_restamp(moved);  // allocated, as counted, after that free
  } else {
    moved = realloc_real(state, block, size);
  }
  if (event & kTickEvent) tick(*state);
  return moved;
}

}  // namespace

// FAST PATH of every entry point: one relaxed load of the phase, then
// Recording: the real call and record_alloc / record_free; Off: the real
// call alone; Booting (first call of the process): start-up.
// malloc and calloc ask the pool gate first (a compare and a table load
// serve a pooled request, which is then in phase Recording). malloc tests
// no phase: the gate's second compare sends every request to
// malloc_beyond_direct until start-up has chosen Recording, and in mode
// off (PoolGate), so that mode profile's malloc is two compares and a jump
// to recorded_malloc; mode off's, three compares and two jumps.
HOTPOOL_ALWAYS_INLINE void* malloc_entry(size_t size) {
  if (HOTPOOL_LIKELY(size < g_pool_gate.direct_end)) {
    if (const unsigned class_plus_one = g_recycler.pooled_class_plus_one(size))
      return pooled_malloc_inline(size, class_plus_one);
  }
  if (beyond_direct(size)) return malloc_beyond_direct(size);
  return recorded_malloc(size);
}

HOTPOOL_EXPORT void* malloc(size_t size) { return malloc_entry(size); }

HOTPOOL_EXPORT void free(void* block) {
  // A pooled block first, in any phase: the region is empty until the
  // recycler starts (never in modes off and profile), and holds no bootstrap
  // memory.
  const size_t region_offset = g_recycler.region_offset(block);
  if (region_offset < g_recycler.region_bytes()) return pooled_free_at(block, region_offset);
  const Phase phase = g_phase.load(std::memory_order_relaxed);
  if (HOTPOOL_LIKELY(phase == Phase::Recording)) {
    if (HOTPOOL_UNLIKELY(is_sampled(block))) return sampled_free(block);
    // A block of the bootstrap buffer has the mmapped bit in the word
    // before it (bootstrap::allocate): recorded_free's fast path, which
    // reads glibc's chunk header there, sends it to the generic path,
    // which knows it. The common free is spared that range check.
    return recorded_free(block);
  }
  if (HOTPOOL_UNLIKELY(bootstrap::owns(block))) return;  // static memory, never reused
  if (phase == Phase::Off) return g_real.free(block);
  boot();
  if (g_real.free) g_real.free(block);  // else nothing to give it back to yet
}

HOTPOOL_EXPORT void* calloc(size_t count, size_t size) {
  size_t bytes;
  const bool overflow = __builtin_mul_overflow(count, size, &bytes);
  if (HOTPOOL_LIKELY(bytes < g_pool_gate.direct_end) && !overflow) {
    if (const unsigned class_plus_one = g_recycler.pooled_class_plus_one(bytes))
      return pooled_calloc(bytes, class_plus_one);
  }
  const Phase phase = g_phase.load(std::memory_order_relaxed);
  if (HOTPOOL_LIKELY(phase == Phase::Recording)) {
    if (beyond_direct(bytes) && !overflow) {
      if (const unsigned class_plus_one = pooled_class_plus_one_beyond_direct(bytes))
        return pooled_calloc(bytes, class_plus_one);
    }
    return recorded_calloc(count, size);
  }
  if (phase == Phase::Off) return g_real.calloc(count, size);
  if (overflow) return errno = ENOMEM, nullptr;
  return allocate_booting([=] { return calloc(count, size); }, bytes, 0, true);
}

HOTPOOL_EXPORT void* realloc(void* block, size_t size) {
  if (HOTPOOL_UNLIKELY(bootstrap::owns(block))) return realloc_from_bootstrap(block, size);
  if (g_recycler.contains(block)) return realloc_pooled(block, size);
  if (HOTPOOL_UNLIKELY(is_sampled(block))) return realloc_sampled(block, size);
  const Phase phase = g_phase.load(std::memory_order_relaxed);
  if (HOTPOOL_UNLIKELY(phase == Phase::Booting)) {
    boot();
    if (!block) return allocate_booting([=] { return malloc(size); }, size, 0, false);
    if (!g_real.realloc) return errno = ENOMEM, nullptr;
  }
  if (!recording(phase)) return g_real.realloc(block, size);
  if (!block) return malloc(size);  // may be pooled
  if (HOTPOOL_UNLIKELY(misaligned(block))) {
    warn_invalid_pointer("realloc", block);
    return g_real.realloc(block, size);
  }
  // realloc is a free of the old block and an allocation of the new one:
  // the countdown counts it as an allocation (an attached thread outside
  // hotpool; realloc(p, 0) only frees), and samples it as one.
  ThreadState* const counted = size != 0 ? tls.pool_state : nullptr;
  if (counted != nullptr && HOTPOOL_UNLIKELY(--counted->countdown == 0)) return event_realloc(counted, block, size);
  return realloc_real(counted, block, size);
}

HOTPOOL_EXPORT void* reallocarray(void* block, size_t count, size_t size) {
  size_t bytes;
  if (__builtin_mul_overflow(count, size, &bytes)) return errno = ENOMEM, nullptr;
  return realloc(block, bytes);
}

HOTPOOL_EXPORT int posix_memalign(void** result, size_t alignment, size_t size) {
  const Phase phase = g_phase.load(std::memory_order_relaxed);
  if (HOTPOOL_UNLIKELY(phase == Phase::Booting)) {
    if (!is_power_of_two(alignment) || alignment % sizeof(void*)) return EINVAL;
    void* block = allocate_booting([=] { return memalign(alignment, size); }, size, alignment, false);
    if (!block) return ENOMEM;
    *result = block;
    return 0;
  }
  if (phase == Phase::Recording && is_power_of_two(alignment) && alignment % sizeof(void*) == 0) {
    int status = 0;
    void* block = recorded_aligned(alignment, size, [&]() -> void* {
      void* real_block = nullptr;
      status = g_real.posix_memalign(&real_block, alignment, size);
      return status == 0 ? real_block : nullptr;
    });
    if (block == nullptr) return status ? status : ENOMEM;
    *result = block;
    return 0;
  }
  // Off, or an alignment the real function refuses (EINVAL).
  return g_real.posix_memalign(result, alignment, size);
}

HOTPOOL_EXPORT void* aligned_alloc(size_t alignment, size_t size) {
  const Phase phase = g_phase.load(std::memory_order_relaxed);
  if (HOTPOOL_UNLIKELY(phase == Phase::Booting))
    return allocate_booting([=] { return aligned_alloc(alignment, size); }, size, alignment, false);
  if (phase == Phase::Recording)
    return recorded_aligned(is_power_of_two(alignment) ? alignment : 0, size,
                            [=] { return g_real.aligned_alloc(alignment, size); });
  return g_real.aligned_alloc(alignment, size);
}

HOTPOOL_EXPORT void* memalign(size_t alignment, size_t size) {
  const Phase phase = g_phase.load(std::memory_order_relaxed);
  if (HOTPOOL_UNLIKELY(phase == Phase::Booting))
    return allocate_booting([=] { return memalign(alignment, size); }, size, alignment, false);
  if (phase == Phase::Recording)
    return recorded_aligned(is_power_of_two(alignment) ? alignment : 0, size,
                            [=] { return g_real.memalign(alignment, size); });
  return g_real.memalign(alignment, size);
}

HOTPOOL_EXPORT void* valloc(size_t size) {
  const Phase phase = g_phase.load(std::memory_order_relaxed);
  if (HOTPOOL_UNLIKELY(phase == Phase::Booting))
    return allocate_booting([=] { return valloc(size); }, size, static_cast<size_t>(sysconf(_SC_PAGESIZE)), false);
  if (phase == Phase::Recording)
    return recorded_aligned(static_cast<size_t>(sysconf(_SC_PAGESIZE)), size, [=] { return g_real.valloc(size); });
  return g_real.valloc(size);
}

HOTPOOL_EXPORT void* pvalloc(size_t size) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const Phase phase = g_phase.load(std::memory_order_relaxed);
  if (HOTPOOL_UNLIKELY(phase == Phase::Booting) || !g_real.pvalloc) {
    // pvalloc is valloc of the size rounded up to whole pages.
    size_t rounded;
    if (__builtin_add_overflow(size ? size : 1, page - 1, &rounded)) return errno = ENOMEM, nullptr;
    rounded &= ~(page - 1);
    if (phase == Phase::Booting) return allocate_booting([=] { return pvalloc(size); }, rounded, page, false);
    return memalign(page, rounded);
  }
  if (phase == Phase::Recording) {
    // A sampled block holds whole pages, as the real one rounds the request.
    size_t rounded;
    if (__builtin_add_overflow(size ? size : 1, page - 1, &rounded)) return g_real.pvalloc(size);
    rounded &= ~(page - 1);
    return recorded_aligned(page, size, [=] { return g_real.pvalloc(size); }, rounded);
  }
  return g_real.pvalloc(size);
}

HOTPOOL_EXPORT size_t malloc_usable_size(void* block) {
  if (HOTPOOL_UNLIKELY(bootstrap::owns(block))) return bootstrap::usable_size(block);
  if (g_recycler.contains(block)) return g_recycler.class_size(g_recycler.class_of_block(block));
  if (is_sampled(block)) return sampled_usable_size(block);
  if (HOTPOOL_UNLIKELY(g_phase.load(std::memory_order_relaxed) == Phase::Booting)) {
    boot();
    if (!g_real.malloc_usable_size) return 0;
  }
  return g_real.malloc_usable_size(block);
}

HOTPOOL_EXPORT int malloc_trim(size_t pad) {
  if (HOTPOOL_UNLIKELY(g_phase.load(std::memory_order_relaxed) == Phase::Booting)) boot();
  const bool pools_released = g_recycler.trim() != 0;
  const int real_released = g_real.malloc_trim ? g_real.malloc_trim(pad) : 0;
  return pools_released || real_released;
}

// glibc's own names for its allocator, which some programs call directly
// (pairing __libc_malloc with free, or malloc with __libc_free). They are
// the same functions as ours: a pooled block then never reaches glibc.
#define HOTPOOL_ALIAS(name) __attribute__((alias(#name), visibility("default")))
// glibc's declarations of malloc & co. carry attributes (malloc, nothrow...)
// that the aliases need not repeat.
#pragma GCC diagnostic ignored "-Wmissing-attributes"
extern "C" {
void* __libc_malloc(size_t size) HOTPOOL_ALIAS(malloc);
void __libc_free(void* block) HOTPOOL_ALIAS(free);
void* __libc_calloc(size_t count, size_t size) HOTPOOL_ALIAS(calloc);
void* __libc_realloc(void* block, size_t size) HOTPOOL_ALIAS(realloc);
void* __libc_memalign(size_t alignment, size_t size) HOTPOOL_ALIAS(memalign);
void* __libc_valloc(size_t size) HOTPOOL_ALIAS(valloc);
void* __libc_pvalloc(size_t size) HOTPOOL_ALIAS(pvalloc);
}

// C++ operator new and delete. The C++ runtime's (libstdc++'s, libc++'s)
// would call malloc and free through the PLT and arrive here anyway; here,
// a new+delete pair is spared the runtime's wrappers: a call through the
// PLT each way, and new's stack frame and test (measured with callgrind:
// about 13 instructions per allocation on clang-format in mode auto). A program
// that defines its own operators keeps them: the executable comes before
// preloaded libraries in the loader's search order.
//
// A request that fails goes to the runtime's own operator, the next
// definition after hotpool's (RTLD_NEXT): its malloc, hotpool's again, then
// the new_handler loop and std::bad_alloc (or nullptr for nothrow), exactly
// as without hotpool. Without one (a C++ program always has one; hotpool
// does not link the C++ runtime), nothrow new returns nullptr and new
// aborts with a hotpool: line, as an uncaught std::bad_alloc would.
namespace {

enum class NewKind : unsigned { Scalar, Array, ScalarNothrow, ArrayNothrow };

// `tag`: the nothrow variants' std::nothrow argument, passed on.
HOTPOOL_NOINLINE void* new_failed(NewKind kind, size_t size, const void* tag) {
  using New = void* (*)(size_t);
  using NothrowNew = void* (*)(size_t, const void*);
  static std::atomic<New> runtime_new[2];
  static std::atomic<NothrowNew> runtime_nothrow_new[2];
  const New no_new = [](size_t) -> void* {
    write_warning("hotpool: operator new: out of memory, and no C++ runtime's operator new to throw std::bad_alloc");
    abort();
  };
  const NothrowNew no_nothrow_new = [](size_t, const void*) -> void* { return nullptr; };
  switch (kind) {
    case NewKind::Scalar: return next_definition(runtime_new[0], "_Znwm", no_new)(size);
    case NewKind::Array: return next_definition(runtime_new[1], "_Znam", no_new)(size);
    case NewKind::ScalarNothrow:
      return next_definition(runtime_nothrow_new[0], "_ZnwmRKSt9nothrow_t", no_nothrow_new)(size, tag);
    case NewKind::ArrayNothrow:
      return next_definition(runtime_nothrow_new[1], "_ZnamRKSt9nothrow_t", no_nothrow_new)(size, tag);
  }
  return nullptr;
}

HOTPOOL_ALWAYS_INLINE void* new_entry(NewKind kind, size_t size, const void* tag = nullptr) {
  void* block = malloc_entry(size);
  if (HOTPOOL_LIKELY(block != nullptr)) return block;
  return new_failed(kind, size, tag);
}

}  // namespace

// Their mangled names: the operators' declarations in <new> would make
// these definitions replacements, which a -fno-exceptions library cannot
// declare with their exception specifications.
HOTPOOL_EXPORT void* _Znwm(size_t size) { return new_entry(NewKind::Scalar, size); }
HOTPOOL_EXPORT void* _Znam(size_t size) { return new_entry(NewKind::Array, size); }
HOTPOOL_EXPORT void* _ZnwmRKSt9nothrow_t(size_t size, const void* tag) {
  return new_entry(NewKind::ScalarNothrow, size, tag);
}
HOTPOOL_EXPORT void* _ZnamRKSt9nothrow_t(size_t size, const void* tag) {
  return new_entry(NewKind::ArrayNothrow, size, tag);
}
// Every delete is free. The sized ones' size and the nothrow ones' tag
// are second arguments, which free does not read (in the x86-64 and
// AArch64 calling conventions the first argument's register is the same
// with or without them): declared with the block alone, as free.
extern "C" {
void _ZdlPv(void* block) HOTPOOL_ALIAS(free);
void _ZdaPv(void* block) HOTPOOL_ALIAS(free);
void _ZdlPvm(void* block) HOTPOOL_ALIAS(free);                 // operator delete(void*, size_t)
void _ZdaPvm(void* block) HOTPOOL_ALIAS(free);                 // operator delete[](void*, size_t)
void _ZdlPvRKSt9nothrow_t(void* block) HOTPOOL_ALIAS(free);    // operator delete(void*, const std::nothrow_t&)
void _ZdaPvRKSt9nothrow_t(void* block) HOTPOOL_ALIAS(free);    // operator delete[](void*, const std::nothrow_t&)
}

// dlopen and dlmopen: only a deep-bound open into the base namespace needs
// hotpool (deepbind.cpp), and only while it records; every other call goes
// to the real function by a tail call, so that it sees its real caller
// (whose RPATH and RUNPATH it searches, whose namespace it uses). The
// optimize attribute keeps that tail call in an unoptimized build too.
#define HOTPOOL_TAIL_CALLS __attribute__((optimize("O2")))

namespace {

bool deep_bound_open(int mode) {
  if (HOTPOOL_LIKELY((mode & RTLD_DEEPBIND) == 0)) return false;
  if (HOTPOOL_UNLIKELY(g_phase.load(std::memory_order_acquire) == Phase::Booting)) boot();
  return g_phase.load(std::memory_order_acquire) == Phase::Recording;
}

}  // namespace

HOTPOOL_EXPORT HOTPOOL_TAIL_CALLS void* dlopen(const char* file, int mode) {
  if (HOTPOOL_UNLIKELY(deep_bound_open(mode))) return dlopen_deepbind(file, mode, __builtin_return_address(0));
  return real_dlopen()(file, mode);
}

HOTPOOL_EXPORT HOTPOOL_TAIL_CALLS void* dlmopen(Lmid_t namespace_id, const char* file, int mode) {
  if (HOTPOOL_UNLIKELY(namespace_id == LM_ID_BASE && deep_bound_open(mode)))
    return dlmopen_deepbind(file, mode, __builtin_return_address(0));
  return real_dlmopen()(namespace_id, file, mode);
}

// dlclose: the frame table's entries for the unloaded code go, before
// other code can be loaded at its addresses (see FrameTable).
// Only when code was unloaded: most calls just drop a reference (hotpool's
// own RTLD_NOLOAD lookups among them).
HOTPOOL_EXPORT int dlclose(void* handle) {
  static std::atomic<int (*)(void*)> next{nullptr};
  const auto missing = [](void*) { return -1; };
  const uint64_t unloaded_before = objects_unloaded();
  const int status = next_definition(next, "dlclose", +missing)(handle);
  if (status == 0 && objects_unloaded() != unloaded_before) forget_unwound_frames();
  return status;
}

// pthread_cancel and pthread_setcanceltype: hotpool's hot locked sections
// (pool refills and drains, libgcc's stack walks) turn cancellation off
// only once the program may cancel a thread (see
// recycler::g_cancellation_used); these note that it may, before any
// cancellation can be requested or made asynchronous.
namespace {
std::atomic<int (*)(int, int*)> g_next_setcanceltype{nullptr};
int (*real_setcanceltype())(int, int*) {
  const auto missing = [](int, int*) { return ENOSYS; };
  return next_definition(g_next_setcanceltype, "pthread_setcanceltype", +missing);
}
}  // namespace

HOTPOOL_EXPORT int pthread_cancel(pthread_t thread) {
  hotpool::recycler::g_cancellation_used.store(true, std::memory_order_seq_cst);
  // Looked up here, in the program's call: hotpool's own calls come from
  // its slow paths, which then do not reach the loader.
  real_setcanceltype();
  static std::atomic<int (*)(pthread_t)> next{nullptr};
  const auto missing = [](pthread_t) { return ENOSYS; };
  return next_definition(next, "pthread_cancel", +missing)(thread);
}

HOTPOOL_EXPORT int pthread_setcanceltype(int type, int* old_type) {
  if (type == PTHREAD_CANCEL_ASYNCHRONOUS) hotpool::recycler::g_cancellation_used.store(true, std::memory_order_seq_cst);
  return real_setcanceltype()(type, old_type);
}

// pthread_getattr_np holds the thread's lock while it allocates (glibc
// 2.36: the affinity mask, by realloc, for every thread; for the main
// thread also stdio's buffers, reading /proc/self/maps). Were one of those
// allocations the thread's first sample, the sample's stack probe
// (find_thread_stack) would call it again for the same thread and wait
// for that lock forever: so the probe waits for a later sample while the
// thread is in here (ThreadLocal::in_getattr).
HOTPOOL_EXPORT int pthread_getattr_np(pthread_t thread, pthread_attr_t* attr) {
  static std::atomic<int (*)(pthread_t, pthread_attr_t*)> next{nullptr};
  const auto missing = [](pthread_t, pthread_attr_t*) { return ENOSYS; };
  ++tls.in_getattr;
  const int status = next_definition(next, "pthread_getattr_np", +missing)(thread, attr);
  --tls.in_getattr;
  return status;
}

// pipe2, for libunwind's sake only. libunwind 1.6 keeps a pipe to validate
// addresses while it unwinds, opened on the lowest free descriptors, and
// reopens it whenever it finds it closed. Descriptors 3 and 4 the program
// did not open are visible to it (subprocess's pass_fds checks, a close(0)
// then pipe...), and a program that closes them and opens a file there
// would get libunwind's validation bytes in its file. So the pipe libunwind
// asks for is moved to the top of the descriptor range. Every other caller
// gets the real pipe2, after one compare of the return address.
HOTPOOL_EXPORT int pipe2(int fds[2], int flags) {
  const int status = real_pipe2(fds, flags);
  if (status == 0 && called_from_unwinder(__builtin_return_address(0))) move_to_high_descriptors(fds);
  return status;
}

HOTPOOL_EXPORT void hotpool_report(void) { write_report("on-demand"); }

HOTPOOL_EXPORT const char* hotpool_mode(void) {
  if (g_phase.load(std::memory_order_acquire) == Phase::Booting) boot();
  return mode_name(current_mode());
}
