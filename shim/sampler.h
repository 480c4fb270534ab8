// Sampling: which allocations are followed from malloc to free, and where
// their blocks live.
//
// A sampled block comes from a region of its own (a second pool region, no
// thread caches), with a 32-byte header in front of what the program gets:
// the site, the thread, the time. (An aligned one may start further into
// its region block: see sampler.cpp.) free() recognises
// such a block by its address, like a pooled one, without a lookup, and
// reading the header is safe because the memory is hotpool's.
#pragma once

#include <cstddef>
#include <cstdint>

#include "recycler/pool.h"
#include "reporter/clock.h"
#include "reporter/sites.h"
#include "reporter/unwinder.h"
#include "runtime.h"

namespace hotpool::shim {

struct SampleHeader {
  uint32_t site;             // StackDepot id (0: the stack could not be captured or kept)
  uint32_t usable;           // the usable size it shows: what its request gets unsampled (below 4 GiB)
  uint64_t alloc_ns;         // monotonic time of the allocation
  // The thread's allocator calls, this one included, in the low 48 bits
  // (differences are taken modulo 2^48); in the top 16, whether it is live
  // or freed, and whether `site` holds the low half of the return address
  // below instead (a sample the depot had no room for: see sampler.cpp).
  uint64_t ops_state;
  uint32_t thread;           // ThreadState::ordinal of the allocating thread
  // The allocating function's frame (its CFA) as bytes below the top of
  // the thread's stack; 0 if unknown. Its return address, which stays in
  // the slot below that CFA while it is active, is the second frame of
  // the site's stack (in the depot).
  uint32_t frame_below_top;
};
// 32 bytes: blocks stay 16-byte aligned, and a 16-byte request (24 usable
// bytes on glibc) takes a 64-byte block, not 80 as with the 48-byte header
// this replaces (python3 with HOTPOOL_SAMPLE=1: peak RSS 1.79 x that
// without hotpool, then).
static_assert(sizeof(SampleHeader) == 32, "the header keeps blocks 16-byte aligned");

// Sampling by bytes (HOTPOOL_SAMPLE_BYTES): every allocation ends the
// countdown, and the events' entry points look at its size (by_bytes_skip).
extern bool g_sampling_by_bytes;
extern recycler::PoolRegion g_sample_region;
extern reporter::StackDepot g_stack_depot;
extern reporter::LifetimeStats g_class_lifetimes[reporter::kMaxClasses];

// Start-up (under the guard): the region, the depot, libunwind. False:
// nothing is sampled.
bool start_sampling(const ReentryGuard&);
// The bounds of the calling thread's stack into state (under the guard).
void find_thread_stack(ThreadState& state);
bool sampling_active();
// Sampled allocations get their call stacks (HOTPOOL_SITES, resolved at
// start-up): false, no sites, and frame-local is not told from thread-local.
bool sampling_sites();
// Samples are few: fewer than 1 in 16 allocations, or by bytes fewer
// than 1 in 4 KiB (thread-local sample buffers are then kept small).
// False before sampling starts.
bool sampling_sparse();
uint64_t sampling_rate();  // 0 when sampling by bytes
uint64_t sampling_mean_bytes();  // HOTPOOL_SAMPLE_BYTES: 0 when sampling by count
uint64_t sampling_short_ns();
uint64_t sampling_recycle_calls();
// Sampled allocations without a site: no stack was captured (every one
// without sampling_sites()), or the stack depot had no id (or no free slot
// within its probes) left.
uint64_t sampling_unsited();
// Stacks captured through the threads' trace caches (libgcc's unwinder), of
// every thread ever attached: replayed from the frame table, walked by
// libgcc; and sampled stacks recalled from the threads' stack memos.
void sampling_stack_counts(uint64_t* replayed, uint64_t* walked, uint64_t* recalled);
// Now, by the clock of sampled lifetimes (the time-stamp counter where the
// kernel trusts it: no system call), in ns.
uint64_t lifetime_clock_ns();

// The bytes an allocation counts for by bytes: a malloc(0) counts as 1.
inline uint64_t sampled_bytes_of(size_t size) { return size + (size == 0); }

// By bytes, the allocation that ended the countdown when it is neither
// sampled nor ticks (the common case): counted as take_event would, the
// bytes to the next sample lowered, and true; else false (take_event then,
// and sampled_allocate decides). Inline: every allocation comes here.
inline bool by_bytes_skip(ThreadState& state, size_t size) {
  const uint64_t bytes = sampled_bytes_of(size);
  // bytes_left 0: not drawn yet. A window other than 1: one counted before sampling began.
  if (bytes >= state.bytes_left || state.tick_left <= 1 || state.window != 1) return false;
  state.bytes_left -= bytes;
  // take_event's work for a window of 1 without a sample or a tick: the
  // window and sample_left stay 1.
  ++state.alloc_base;
  --state.tick_left;
  state.countdown = 1;
  return true;
}

// The next interval: geometric with the configured mean (1 for SAMPLE=1,
// "never" for SAMPLE=0; 1 by bytes, where sampled_allocate decides).
uint64_t next_sample_interval(ThreadState& state);

// A sampled allocation: nullptr when it cannot be sampled (too large, the
// region full); the caller then allocates as usual.
// `entry`: the allocator's entry frame, where the stack capture may start
// (see reporter::Unwinder::capture); {0, 0} for capture()'s caller.
void* sampled_allocate(ThreadState& state, size_t size, reporter::Unwinder::Frame entry = {0, 0});
// The same, aligned (memalign & co.): `alignment` a power of two, up to a
// page (else nullptr); `min_usable`: bytes the block must hold beyond the
// `size` asked for (pvalloc's whole pages).
void* sampled_allocate_aligned(ThreadState& state, size_t size, reporter::Unwinder::Frame entry, size_t alignment,
                               size_t min_usable);
inline bool is_sampled(const void* block) { return g_sample_region.contains(block); }
void sampled_free(void* block);
// realloc's two halves of sampled_free (see sampler.cpp).
void sampled_free_record(void* block);
void sampled_free_release(void* block);
// The second half straight to the depot: a thread without a state, or a
// deferred free at thread exit.
void sampled_release_to_depot(void* block);
// A thread's stashed sampled blocks back to their depots: at thread exit,
// and in a fork child for the threads that are gone (under the guard).
void flush_sample_stash(ThreadState& state, bool after_fork);
// After a dlclose(): what the unwinder learned of code addresses goes.
void forget_unwound_frames();
// A sampled block that realloc allocated before it freed the old block:
// count its thread's calls from after that free.
void sampled_restamp(void* block);
// A realloc that failed after sampled_free_record(): the block is live again.
void sampled_revive(void* block);
size_t sampled_usable_size(const void* block);

// fork: no thread may be unwinding across it (libunwind and libgcc's
// unwinder keep locks of their own), and the sample region's depot locks
// are held. In the prepare handler: begin_fork_samples() once, then
// try_lock_samples() (false: a lock stayed busy, unlock_samples() releases
// the others); in the parent handler unlock_samples() and
// end_fork_samples(); in the child reset_sample_locks().
void begin_fork_samples();
bool try_lock_samples();
void unlock_samples();
void end_fork_samples();
void reset_sample_locks();

}  // namespace hotpool::shim
