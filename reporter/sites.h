// Allocation sites and lifetimes, from sampled allocations.
//
// A sampled allocation's stack goes into the StackDepot (deduplicated,
// preallocated, lock-free: no malloc, no lock), which gives it a site id
// (ids are handed out in order, from 1). At the block's free its lifetime
// and escape class are added to its site's and its size class's
// statistics. Everything here is touched only for sampled allocations.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "class_stats.h"
#include "fence.h"

namespace hotpool::reporter {

// Lifetimes in buckets of powers of 4 from 256 ns: [0, 256 ns), [256 ns,
// 1 µs), [1, 4 µs) ... [256 ms, 1 s), [1 s, inf).
inline constexpr unsigned kLifetimeBuckets = 13;
// Bucket b >= 1 holds [256 * 4^(b-1), 256 * 4^b): from the top bit's
// position, without a loop (one per sampled free).
inline unsigned lifetime_bucket(uint64_t ns) {
  if (ns < 256) return 0;
  const unsigned bucket = (63 - static_cast<unsigned>(__builtin_clzll(ns)) - 8) / 2 + 1;
  return bucket < kLifetimeBuckets ? bucket : kLifetimeBuckets - 1;
}
uint64_t lifetime_bucket_low(unsigned bucket);  // lower bound in ns
// The median of a lifetime histogram, interpolated inside its bucket
// (geometrically but in the first, [0, 256 ns)); never above at_most (the
// run's duration: no block lived longer).
uint64_t histogram_median(const uint64_t* counts, unsigned buckets, uint64_t at_most = ~uint64_t{0});

// ln(x) for x > 0, to within a few units in the last place, without libm:
// the sampler's one use of it (geometric intervals) would otherwise load
// libm into C programs and make its pages resident.
double natural_log(double x);
// 1 - e^(-y) for y >= 0 (0 for y <= 0), to a few units in the last place
// also for small y, without libm: the probability that sampling by bytes
// samples an allocation.
double one_minus_exp_neg(double y);

// The run-time escape analysis of a freed sampled block (DESIGN §4).
enum class Escape : uint8_t {
  FrameLocal,   // freed by its thread while the allocating function was active
  ThreadLocal,  // freed by its thread after that function returned
  CrossThread,  // freed by another thread
};

using AtomicCounter = std::atomic<uint64_t>;

// One thread's lifetime counts, not yet merged into a LifetimeStats (see
// PendingSamples): plain words.
struct LifetimeCounts {
  uint64_t frees, short_lived, recycled, temporary, escapes[3], calls_between, histogram[kLifetimeBuckets];

  void add(uint64_t lifetime_ns, bool is_short, bool is_recycled, bool is_temporary, Escape escape, uint64_t calls) {
    add_to_bucket(lifetime_bucket(lifetime_ns), is_short, is_recycled, is_temporary, escape, calls);
  }
  // The same, given the lifetime's bucket (FAST PATH: every sampled free).
  void add_to_bucket(unsigned bucket, bool is_short, bool is_recycled, bool is_temporary, Escape escape,
                     uint64_t calls) {
    ++frees;
    short_lived += is_short;
    recycled += is_recycled;
    temporary += is_temporary;
    ++escapes[static_cast<unsigned>(escape)];
    calls_between += calls;
    ++histogram[bucket];
  }
};

struct LifetimeStats {
  AtomicCounter frees;       // sampled blocks freed
  AtomicCounter short_lived; // lifetime <= the short threshold
  AtomicCounter recycled;    // freed by its thread within the recycle threshold's allocator calls
  AtomicCounter temporary;   // freed before the thread's next allocator call
  AtomicCounter escapes[3];  // by Escape
  AtomicCounter calls_between;  // sum of the thread's allocator calls between malloc and free
  AtomicCounter histogram[kLifetimeBuckets];

  void add(uint64_t lifetime_ns, bool short_lived, bool recycled, bool temporary, Escape escape, uint64_t calls);
  // Adds a thread's pending counts (a read-modify-write per non-zero field).
  void merge(const LifetimeCounts& counts);
};

// Of a class's (or site's) sampled frees, those that make it worth a pool:
// the short-lived ones or the recycled ones, whichever are more (a block
// may be both). Their share is the class's short-lived share for mode
// auto's policy and the report's recommendation.
inline uint64_t pool_worthy(uint64_t short_lived, uint64_t recycled) {
  return short_lived > recycled ? short_lived : recycled;
}
inline uint64_t pool_worthy(const LifetimeStats& life) {
  return pool_worthy(life.short_lived.load(std::memory_order_relaxed), life.recycled.load(std::memory_order_relaxed));
}

// A sample's weight when sampling by bytes: the allocations it stands for,
// 1 / P(it was sampled), in units of 2^-kWeightShift (a sample of a block
// much larger than the mean interval stands for a little more than one),
// and the bytes it stands for (requested bytes times that weight). By count
// every sample weighs the rate, and no weight is kept.
inline constexpr unsigned kWeightShift = 16;
struct SampleWeight {
  uint64_t allocs;  // fixed point, 2^-kWeightShift units
  uint64_t bytes;
};

struct SiteStats {
  AtomicCounter allocs;  // sampled allocations
  AtomicCounter bytes;   // their requested bytes
  AtomicCounter min_size, max_size;
  AtomicCounter weight;          // by bytes: the allocations they stand for (sum of SampleWeight::allocs)
  AtomicCounter weighted_bytes;  // by bytes: the bytes they stand for (sum of SampleWeight::bytes)
  LifetimeStats lifetimes;

  // `count` allocations of `bytes` in all, sizes from `min` to `max`,
  // standing for `weight` (summed).
  void add_allocs(uint64_t count, uint64_t bytes, uint64_t min, uint64_t max, SampleWeight weight);
};

class StackDepot {
 public:
  // Site ids are below kIds, handed out in order. The hash table that
  // finds a stack's id grows in generations: the ids of generation g,
  // [kFirstId[g], kFirstId[g + 1]), have a table of their own of
  // 2^kTableLog2[g] slots, at least twice as many, so that it is at most
  // half full and an insert's probes (at most 64) find a free slot. A
  // program with a few hundred sites touches only the first table's 32
  // KiB (its slots are touched at random); one with 200,000 also the
  // others' 4.3 MiB.
  static constexpr uint32_t kIds = 1u << 18;
  static constexpr unsigned kGenerations = 3;
  static constexpr uint32_t kFirstId[kGenerations + 1] = {1, 2048, 18432, kIds};
  static constexpr unsigned kTableLog2[kGenerations] = {12, 15, 19};
  static constexpr uint32_t kTableStart[kGenerations + 1] = {
      0, 1u << kTableLog2[0], (1u << kTableLog2[0]) + (1u << kTableLog2[1]),
      (1u << kTableLog2[0]) + (1u << kTableLog2[1]) + (1u << kTableLog2[2])};
  static constexpr unsigned generation_of(uint32_t id) {
    return id < kFirstId[1] ? 0 : id < kFirstId[2] ? 1 : 2;
  }

  // mmap'd, untouched until used; room for kIds - 1 stacks of up to
  // max_depth frames (HOTPOOL_DEPTH).
  bool init(unsigned max_depth);
  bool ready() const { return slots_ != nullptr; }
  // The site of a stack: an id in [1, kIds), or 0 when the depot is full.
  // Ids are handed out in order, so that the sites' statistics fill their
  // array from its start (a page per site would be resident otherwise).
  uint32_t insert(const uintptr_t* ips, unsigned depth);
  // insert()'s two steps for a stack not found, for tests that interleave
  // them as racing threads would: claim stores the stack under a new id
  // (0: the depot is full); publish makes it findable in the id's
  // generation, and returns the id to use: the one found in the earliest
  // generation holding the stack when it looks (0 if no slot was free, or
  // if `id` was not claimed for this stack).
  uint32_t claim(const uintptr_t* ips, unsigned depth);
  uint32_t publish(uint32_t id, const uintptr_t* ips, unsigned depth);
  // The stack of a site (depth; *ips set), 0 for an unknown id. For a
  // report, which reads the ids below id_limit(): that counts ids claimed
  // whose trace may not be stored yet, so the offset is read with acquire
  // (the trace was stored before it, with release).
  unsigned stack(uint32_t id, const uintptr_t** ips) const {
    if (!slots_ || id == 0 || id >= id_limit()) return 0;
    return trace_at(__atomic_load_n(&offsets_[id], __ATOMIC_ACQUIRE), ips);
  }
  // The same for an id the caller got from insert(), or read from a
  // sampled block's header (which the program may have overwritten):
  // checked against kIds instead of id_limit(), so that a
  // sampled allocation or free reads no cache line that every insert
  // writes (next_id_). An id never handed out has no offset: 0.
  unsigned known_stack(uint32_t id, const uintptr_t** ips) const {
    if (!offsets_ || id == 0 || id >= kIds) return 0;
    // Relaxed (a plain load on x86): an id from insert() came with its
    // trace (insert's acquire), a header's with its block (the program's
    // own hand-over, or this thread's). Atomic all the same, since an
    // overwritten header can name an id another thread is storing.
    return trace_at(__atomic_load_n(&offsets_[id], __ATOMIC_RELAXED), ips);
  }
  SiteStats& site(uint32_t id) { return sites_[id]; }
  const SiteStats& site(uint32_t id) const { return sites_[id]; }
  // Every id handed out is below this (some, lost in races, name no stack).
  uint32_t id_limit() const {
    const uint32_t next = next_id_.load(std::memory_order_acquire);
    return next < kIds ? next : kIds;
  }

 private:
  unsigned trace_at(uint32_t offset, const uintptr_t** ips) const {
    if (offset == 0) return 0;  // no trace (yet)
    const uintptr_t* stored = arena_ + (offset - 1);
    *ips = stored + 1;
    return static_cast<unsigned>(stored[0]);
  }
  // The id of the stack with this hash in generation g's table, 0 if none.
  uint32_t find(unsigned g, uint64_t hash, const uintptr_t* ips, unsigned depth) const;
  uint32_t publish(uint32_t id, uint64_t hash, const uintptr_t* ips, unsigned depth);
  // The stack's id in a generation before g if it has one, else id.
  uint32_t oldest(unsigned g, uint64_t hash, const uintptr_t* ips, unsigned depth, uint32_t id) const;
  bool same_stack(uint32_t id, const uintptr_t* ips, unsigned depth) const;

  // The generations' hash tables, one after the other (generation g's at
  // kTableStart[g]): 0 empty, else (hash >> 32) << 32 | id.
  std::atomic<uint64_t>* slots_ = nullptr;
  uint32_t* offsets_ = nullptr;  // per id: 1 + the offset of its trace in arena_ (0: none)
  SiteStats* sites_ = nullptr;   // per id
  uintptr_t* arena_ = nullptr;   // traces: [depth][ips...]
  std::atomic<size_t> arena_used_{0};
  size_t arena_words_ = 0;
  std::atomic<uint32_t> next_id_{1};
};

// A thread's sampled counts for the sites it used last (a hash table of
// 128 entries, 28 KiB) and for every size class (an array, 21 KiB, its
// pages touched only for the classes used), merged into the shared
// statistics (atomic read-modify-writes): a site's when its entry is
// evicted; all every kFlushEvents events, and by flush(): at thread exit,
// before a report (by the reporting thread, for every thread), before the
// auto policy reads the class lifetimes. A sampled allocation or free then
// costs no lock-prefixed instruction at all instead of up to twelve to
// shared counters. sqlite3's sites evicted one another from 64 entries,
// and from 128 while classes had entries there too (with HOTPOOL_SAMPLE=1,
// about 100 instructions of merges per sample each time).
//
// The owner's section (begin() ... end()) excludes the flushes of other
// threads by an asymmetric handshake (fence.h): the owner raises `busy`
// and checks `flush_requested` (compiler barriers only); a flusher raises
// `flush_requested`, runs a heavy fence and waits for `busy` to fall. A
// signal handler that interrupts the owner inside its section finds `busy`
// up. Whoever does not get in adds to the shared statistics directly.
// Without asymmetric fences, the section is a try-lock (a compare-and-swap).
class PendingSamples {
 public:
  static constexpr unsigned kEntriesLog2 = 7;
  static constexpr unsigned kEntries = 1u << kEntriesLog2;
  // Sparse samples (see attach) use the first entries only: a site's
  // entry is evicted more often then, rarely enough not to show.
  static constexpr unsigned kSparseEntriesLog2 = 4;
  static constexpr uint32_t kFlushEvents = 8192;

  struct Entry {
    uint32_t key;  // 0: empty, or a site id
    uint64_t allocs, bytes, min_size, max_size;
    SampleWeight weight;                         // by bytes: summed
    LifetimeCounts life;
  };

  // The shared statistics the counts go to (null: none), and the protocol
  // (asymmetric: fence.h's handshake, set up already; else a try-lock).
  // sparse: samples are few (fewer than 1 in 16 allocations), and the table
  // uses 1 << kSparseEntriesLog2 entries, 4 KiB: the whole table, hashed
  // into by site, made every page of a thread's 28 KiB resident. Only
  // while the table is empty (a thread attaching, or before its first sample).
  void attach(StackDepot* depot, LifetimeStats* class_lifetimes, bool asymmetric, bool sparse = false);
  // The pages of the first `classes` classes' counts and of the entries a
  // table attached with `sparse` uses, touched for writing (see pages.h):
  // a new thread's state, before anything reads them.
  void touch_for_write(unsigned classes, bool sparse) const;

  // The owner's section: false when it cannot count here now (a flush is
  // running, or this is a signal handler inside the owner's own section).
  bool begin() {
    if (!asymmetric_) {
      bool expected = false;
      return !locked_.load(std::memory_order_relaxed) &&
             locked_.compare_exchange_strong(expected, true, std::memory_order_acquire);
    }
    if (busy_.load(std::memory_order_relaxed)) return false;
    busy_.store(true, std::memory_order_relaxed);
    light_fence();
    if (__builtin_expect(flush_requested_.load(std::memory_order_acquire), 0)) {
      busy_.store(false, std::memory_order_relaxed);
      return false;
    }
    return true;
  }
  void end() {
    if (!asymmetric_) return locked_.store(false, std::memory_order_release);
    busy_.store(false, std::memory_order_release);
  }
  // A fork child's view of a thread that no longer exists (its counts may
  // be halfway through an update; they stay approximate).
  void reset_after_fork();

  // Inside the section.
  // An allocation sampled by count (every sample weighs the rate: the
  // weights are not kept), or by bytes, with its weight.
  void add_alloc(uint32_t site, uint64_t size);
  void add_weighted_alloc(uint32_t site, uint64_t size, SampleWeight weight);
  void add_free(uint32_t site, unsigned size_class, uint64_t lifetime_ns, bool short_lived, bool recycled,
                bool temporary, Escape escape, uint64_t calls);

  // Merges everything, from any thread (the owner outside its section);
  // waits a little for the owner's section; false if it stayed busy (then
  // nothing is merged).
  bool flush();
  // The owner, without waiting: false (nothing merged) if it cannot now.
  bool try_flush() {
    if (!begin()) return false;
    flush_locked();
    end();
    return true;
  }

 private:
  // Fibonacci hashing: consecutive site ids spread out.
  unsigned slot_of(uint32_t key) const { return (key * 0x9e3779b1u) >> shift_; }
  Entry& entry(uint32_t key);
  __attribute__((noinline)) void add_alloc_to_new(uint32_t site, uint64_t size);
  // Adds an entry to the shared statistics and empties it (an empty one is
  // left unwritten: its page stays untouched).
  void merge(Entry& entry);
  void flush_locked();
  void after_event() {
    if (__builtin_expect(++events_ >= kFlushEvents, 0)) flush_locked();
  }

  // Each size class's sampled frees, by class: no key, no hashing, and no
  // class entry evicting a site's (a sampled free counts for both).
  // class_touched_: the classes to merge at the next flush.
  LifetimeCounts class_life_[kMaxClasses] = {};
  static_assert(kMaxClasses % 64 == 0, "class_touched_ has a bit for every class");
  uint64_t class_touched_[kMaxClasses / 64] = {};

  bool asymmetric_ = false;
  std::atomic<bool> locked_{false};           // the try-lock (no asymmetric fences)
  std::atomic<bool> busy_{false};             // the owner is in its section
  std::atomic<bool> flush_requested_{false};  // a flusher wants in
  std::atomic<bool> flusher_{false};          // one flusher at a time
  uint32_t events_ = 0;
  unsigned shift_ = 32 - kEntriesLog2;  // slot_of's: 32 - log2 of the entries in use
  StackDepot* depot_ = nullptr;
  LifetimeStats* class_lifetimes_ = nullptr;
  Entry entries_[kEntries] = {};
};

// The sites of a thread's recently sampled stacks: most sampled
// allocations come from a stack the thread sampled a moment ago. An entry
// is a site id, chosen by the stack's depth and innermost six frames; a
// hit is checked against the depot's own copy of the site's stack (one
// compare), with no hash of the whole stack and no probe of the depot's
// shared table (a cache miss or two). 512 entries, 2 KiB per thread: with
// HOTPOOL_SAMPLE=1, 95% of python3's and 96% of clang-format's sampled
// stacks hit (a memo of the last 16 whole stacks, 4 KiB, held 56% and 66%).
class SiteMemo {
 public:
  static constexpr unsigned kEntriesLog2 = 9;

  // The site of the stack (as StackDepot::insert), from the memo when it
  // holds the same stack.
  uint32_t site_of(StackDepot& depot, const uintptr_t* ips, unsigned depth);
  uint64_t hits() const { return hits_; }

 private:
  // 0: empty. One 32-bit word each: a fork() copying a memo that its
  // owner is changing finds an entry's old site or its new one.
  uint32_t sites_[1u << kEntriesLog2] = {};
  uint64_t hits_ = 0;
};

}  // namespace hotpool::reporter
