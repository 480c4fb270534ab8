// Exact per-size-class statistics.
//
// Layering: reporter/ knows nothing of the shim or the recycler; the shim
// tells it the class index of each block.
//
// Each thread counts into its own ThreadClassStats (no atomic read-modify-
// write, no shared cache line on the malloc path). The counters are relaxed
// atomics written only by their owner, so a report may read them while the
// thread runs: on x86-64 a relaxed load + store is a plain add.
//
// Live bytes and their peak need a global view. Each thread keeps an
// unflushed delta per class and publishes it to GlobalClassStats when it
// exceeds kFlushBytes. At every allocation the thread computes its view of
// the current live bytes (published global + own delta) and keeps the
// maximum it has seen. For a single thread that view is exact; with T
// threads the peak is off by at most the others' unflushed deltas,
// (T-1) * kFlushBytes per class, a bound the report states.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace hotpool::reporter {

inline constexpr unsigned kMaxClasses = 128;
inline constexpr int64_t kFlushBytes = 256 * 1024;

using Counter = std::atomic<uint64_t>;

// Zeroes what is not zero already: a thread state's counters of classes it
// never used lie on pages never written, which a blanket store would make
// resident (slow paths only).
inline void clear(Counter& counter) {
  if (counter.load(std::memory_order_relaxed) != 0) counter.store(0, std::memory_order_relaxed);
}
inline void clear(int64_t& value) {
  if (value != 0) value = 0;
}

// Adds to a counter that only its thread writes and reports read. On
// x86-64 one `add` to memory (an aligned 8-byte store is never seen torn),
// instead of the load, add and store of a relaxed atomic read-modify-write
// written out, which compilers do not fuse. Not a lock-prefixed add: no
// other thread writes the counter.
inline void bump(Counter& counter, uint64_t by) {
#if defined(__x86_64__)
  static_assert(sizeof(Counter) == sizeof(uint64_t) && alignof(Counter) == 8, "a counter is one aligned word");
  asm volatile("addq %1, %0" : "+m"(*reinterpret_cast<uint64_t*>(&counter)) : "er"(by));
#else
  counter.store(counter.load(std::memory_order_relaxed) + by, std::memory_order_relaxed);
#endif
}
// Frees of blocks allocated before hotpool counted (or by the C library on
// its own behalf) can make a view negative: such a view is no peak.
// A peak never exceeds INT64_MAX, so one signed compare covers both.
inline void raise_to(Counter& counter, int64_t value) {
  if (value > static_cast<int64_t>(counter.load(std::memory_order_relaxed)))
    counter.store(static_cast<uint64_t>(value), std::memory_order_relaxed);
}

// Published live bytes, shared by all threads. Written on flushes only.
struct GlobalClassStats {
  std::atomic<int64_t> live[kMaxClasses];
  std::atomic<int64_t> total_live;
  std::atomic<uint64_t> peak[kMaxClasses];
  std::atomic<uint64_t> total_peak;
};

// One class's counters in one thread: exactly one cache line, so recording an
// allocation or a free touches a single line of the thread's memory besides
// the first (calls and totals). The pooled frees, which no fast path counts,
// live apart (ThreadClassStats::pooled_frees).
// Blocks served by a pool have the class size as usable size: their bytes
// follow from their counts, so the pooled fast paths bump fewer counters.
// A pooled allocation is one add: its count and its requested bytes share
// a word (pooled_packed: the count from bit kPackedCountShift up, the bytes
// below), which the owner folds into wide counters long before either part
// can overflow (fold_packed_if_due, at every tick).
inline constexpr unsigned kPackedCountShift = 40;
inline constexpr uint64_t kPackedBytesMask = (uint64_t{1} << kPackedCountShift) - 1;
// Either part half full: 2^23 allocations, or 512 GiB requested. A tick
// comes every 256 allocations, which add at most 256 times the largest
// class (a few MiB).
inline constexpr uint64_t kPackedFoldDue = (uint64_t{1} << 63) | (uint64_t{1} << (kPackedCountShift - 1));
struct alignas(64) ClassCounters {
  Counter allocs;           // blocks from the real allocator
  Counter frees;
  Counter pooled_packed;    // blocks served by a pool, and their requested bytes, since the last fold
  Counter requested_bytes;  // what the program asked for (both kinds; pooled: up to the last fold)
  Counter usable_bytes;     // what it got from the real allocator (malloc_usable_size)
  Counter freed_bytes;      // usable bytes given back to the real allocator
  int64_t live_delta;       // unpublished change of live bytes (both kinds)
  Counter peak_seen;        // this thread's view of the class's peak live bytes
};
static_assert(sizeof(ClassCounters) == 64, "one cache line per class");

struct ThreadClassStats {
  // What every allocation and free touches besides its class's line, in
  // one cache line, the first.
  // This thread's allocator calls that the shim's allocation countdown does
  // not count (frees, aligned allocations...): with that countdown's count,
  // the thread's calls, for "temporary" (see shim::thread_ops).
  alignas(64) Counter calls;
  int64_t total_live_delta;
  Counter total_peak_seen;
  ClassCounters classes[kMaxClasses];
  Counter pooled_frees[kMaxClasses];  // blocks given back to a pool (see set_pooled_frees)
  int64_t pooled_folded[kMaxClasses];  // pooled_allocs - pooled_frees already in live_delta
  Counter pooled_allocs_folded[kMaxClasses];  // pooled allocations folded out of pooled_packed

  // Class c's pooled allocations and requested bytes (both kinds), from
  // any thread: a read racing with a fold (one every 2^23 allocations of
  // the class at most) may count the folded part twice, or miss it.
  uint64_t pooled_allocs(unsigned c) const {
    return pooled_allocs_folded[c].load(std::memory_order_relaxed) +
           (classes[c].pooled_packed.load(std::memory_order_relaxed) >> kPackedCountShift);
  }
  uint64_t requested_bytes(unsigned c) const {
    return classes[c].requested_bytes.load(std::memory_order_relaxed) +
           (classes[c].pooled_packed.load(std::memory_order_relaxed) & kPackedBytesMask);
  }
  // The owner: pooled_packed into the wide counters when a part is half full.
  void fold_packed_if_due(unsigned c) {
    const uint64_t packed = classes[c].pooled_packed.load(std::memory_order_relaxed);
    if (__builtin_expect((packed & kPackedFoldDue) == 0, 1)) return;
    bump(pooled_allocs_folded[c], packed >> kPackedCountShift);
    bump(classes[c].requested_bytes, packed & kPackedBytesMask);
    classes[c].pooled_packed.store(0, std::memory_order_relaxed);  // only the owner adds to it
  }

  // Class c's row, its address computed once: the counters' adds (asm
  // memory operands) would otherwise each make the compiler compute it anew.
  __attribute__((always_inline)) ClassCounters& row_of(unsigned c) {
    ClassCounters* row = &classes[c];
    asm("" : "+r"(row));
    return *row;
  }

  // FAST PATH (real allocator): the class's line plus two read-mostly
  // global loads for the peak view. True when class c is due to be
  // published: the caller does so out of line (publish), so that its own
  // fast path needs no call and no stack frame.
  __attribute__((always_inline)) bool add_alloc(const GlobalClassStats& global, unsigned c, size_t requested,
                                                size_t usable) {
    ClassCounters& row = row_of(c);
    bump(row.allocs, 1);
    bump(row.requested_bytes, requested);
    bump(row.usable_bytes, usable);
    const int64_t delta = row.live_delta += static_cast<int64_t>(usable);
    const int64_t total_delta = total_live_delta += static_cast<int64_t>(usable);
    raise_to(row.peak_seen, global.live[c].load(std::memory_order_relaxed) + delta);
    raise_to(total_peak_seen, global.total_live.load(std::memory_order_relaxed) + total_delta);
    return delta > kFlushBytes || total_delta > kFlushBytes;
  }
  void record_alloc(GlobalClassStats& global, unsigned c, size_t requested, size_t usable) {
    if (__builtin_expect(add_alloc(global, c, requested, usable), 0)) publish(global, c);
  }

  // FAST PATH (real allocator): one cache line; true when class c is due
  // to be published (as add_alloc).
  __attribute__((always_inline)) bool add_free(unsigned c, size_t usable) {
    ClassCounters& row = row_of(c);
    bump(row.frees, 1);
    bump(row.freed_bytes, usable);
    const int64_t delta = row.live_delta -= static_cast<int64_t>(usable);
    const int64_t total_delta = total_live_delta -= static_cast<int64_t>(usable);
    return delta < -kFlushBytes || total_delta < -kFlushBytes;
  }
  void record_free(GlobalClassStats& global, unsigned c, size_t usable) {
    if (__builtin_expect(add_free(c, usable), 0)) publish(global, c);
  }

  // FAST PATH (pool): counts only, no live bytes: a pooled block's bytes
  // are its class's size, so the live bytes of pooled blocks follow from
  // the counts. fold_pooled() brings them into the live deltas; the caller
  // does so every so many pooled operations, at each refill (where the
  // peak is taken) and before publishing all. A thread with a cache counts
  // no pooled free at all (see set_pooled_frees); the shared block of
  // threads without one does (record_pooled_free).
  __attribute__((always_inline)) void add_pooled_alloc(size_t c, size_t requested) {
    add_pooled_alloc(classes[c], requested);
  }
  static void add_pooled_alloc(ClassCounters& row, size_t requested) {
    bump(row.pooled_packed, (uint64_t{1} << kPackedCountShift) + requested);
  }
  // A thread with a cache counts its pooled frees lazily (the shim's
  // pooled_frees_of): its owner writes the count here.
  void set_pooled_frees(unsigned c, uint64_t value) {
    if (pooled_frees[c].load(std::memory_order_relaxed) != value)
      pooled_frees[c].store(value, std::memory_order_relaxed);
  }
  // Class c's row given line = c * 64 (see recycler::Recycler::line_of).
  ClassCounters& row_at_line(size_t line) {
    return *reinterpret_cast<ClassCounters*>(reinterpret_cast<char*>(classes) + line);
  }
  // Class c's pooled blocks (of `size` bytes) counted since the last fold,
  // into its live delta and the total's.
  void fold_pooled(unsigned c, uint64_t size) {
    ClassCounters& row = classes[c];
    const int64_t net = static_cast<int64_t>(pooled_allocs(c) - pooled_frees[c].load(std::memory_order_relaxed));
    if (net == pooled_folded[c]) return;  // nothing to fold: no write (an unused class's page stays untouched)
    const int64_t change = (net - pooled_folded[c]) * static_cast<int64_t>(size);
    pooled_folded[c] = net;
    row.live_delta += change;
    total_live_delta += change;
  }
  // The same for classes [0, count) with sizes[c] bytes.
  template <typename Size>
  void fold_pooled_all(const Size* sizes, unsigned count) {
    for (unsigned c = 0; c < count && c < kMaxClasses; ++c) fold_pooled(c, sizes[c]);
  }
  void record_pooled_free(GlobalClassStats& global, unsigned c, size_t size) {
    bump(pooled_frees[c], 1);
    fold_pooled(c, size);
    publish_if_due(global, c);
  }
  // Raises this thread's view of class c's peak (and the total's) to the
  // live bytes now: published plus this thread's unpublished delta.
  void note_peak(GlobalClassStats& global, unsigned c) {
    raise_to(classes[c].peak_seen, global.live[c].load(std::memory_order_relaxed) + classes[c].live_delta);
    raise_to(total_peak_seen, global.total_live.load(std::memory_order_relaxed) + total_live_delta);
  }
  // Publishes class c if its deltas are beyond kFlushBytes either way.
  void publish_if_due(GlobalClassStats& global, unsigned c) {
    const int64_t delta = classes[c].live_delta;
    if (delta > kFlushBytes || delta < -kFlushBytes || total_live_delta > kFlushBytes ||
        total_live_delta < -kFlushBytes)
      publish(global, c);
  }

  // Publishes class c's delta and the total delta (slow path).
  void publish(GlobalClassStats& global, unsigned c) __attribute__((noinline));
  // Publishes every delta: at thread exit and before a report.
  void publish_all(GlobalClassStats& global);
  // Back to zero, for reuse by another thread.
  void reset();
};

// One row of a report: the sum over all threads, live and exited.
struct ClassTotals {
  uint64_t allocs, frees;                // all blocks
  uint64_t pooled_allocs, pooled_frees;  // of which served by / returned to a pool
  uint64_t requested_bytes, usable_bytes, freed_bytes, peak_live_bytes, threads;
};

// One class's pool, summed over threads (filled by whoever owns the pools).
struct PoolClassTotals {
  bool pooled;                 // pooled when the report was taken
  uint64_t refills, drains;    // thread cache <-> depot trips
  uint64_t misses;             // pooled-class requests the pool could not serve
  uint64_t cached_blocks;      // free blocks in thread caches
  uint64_t depot_free_bytes;   // free bytes in the depot
  uint64_t committed_bytes;    // pool memory in use or held (not given back)
  uint64_t peak_committed_bytes;
  uint64_t quarantined_blocks;  // free blocks written after their free (or freed twice): never reused
};

struct StatsSnapshot {
  unsigned class_count;
  uint64_t class_size[kMaxClasses];  // 0 for the large class (the last one)
  ClassTotals classes[kMaxClasses];
  uint64_t total_peak_live_bytes;
  uint64_t threads_seen;     // threads that made at least one allocation
  uint64_t threads_at_once;  // most threads registered at the same time
  bool pools_active;         // a recycler ran (modes fixed and auto)
  PoolClassTotals pools[kMaxClasses];

  void clear(unsigned count, const uint64_t* sizes);
  // Adds one thread's counters (pooled blocks' bytes from their counts and
  // the class size); is_thread counts it in threads_seen and in
  // the per-class thread counts (false for the shared late-allocation block).
  // pooled_frees: the thread's pooled frees per class when its counters
  // do not have them (a running thread's, counted lazily), else nullptr.
  void add(const ThreadClassStats& stats, bool is_thread = true, const uint64_t* pooled_frees = nullptr);
  // Adds another snapshot (the retired threads' sums).
  void add(const StatsSnapshot& other);
  // Takes the published peaks into account; call after all add()s.
  void finish(const GlobalClassStats& global);
};

}  // namespace hotpool::reporter
