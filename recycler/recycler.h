// The recycler: thread-local caches in front of the per-class depots of
// pool.h, the pooling decision per class, and the hardening checks.
//
// Layering: recycler/ knows nothing of the shim or the reporter. The shim
// owns one Recycler and one ThreadCache per thread, and feeds the auto
// policy the per-class counts the reporter keeps.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "pool.h"
#include "size_classes.h"


namespace hotpool::recycler {

// 63: a bin is then 512 bytes, and the fast paths find it with one shift.
inline constexpr unsigned kBinSlots = 63;

struct RecyclerConfig {
  size_t region_bytes;      // address space reserved for pools
  size_t cache_bytes;       // per thread, per class (2 to kBinSlots blocks)
  uint64_t decay_ns;        // wholly free slabs idle this long go back to the OS
  size_t keep_empty_bytes;  // per class: wholly free slabs kept beyond that go back at once
  bool checks;              // double-free and invalid-pointer checks
  // Per thread: what its bins may hold together beyond their cache_bytes
  // once grown (see Recycler::note_trip). 0: bins never grow.
  size_t cache_grow_bytes = 0;
};

// One class's cache in one thread: a LIFO array of block pointers, out of
// band (nothing is written into cached blocks but the free marker). The
// fast paths touch the count's cache line and the top slot's.
struct alignas(64) Bin {
  uint32_t count;
  uint32_t capacity;  // 0 until the bin is first used
  void* slots[kBinSlots];
};
static_assert(sizeof(Bin) == 512, "a bin is found by a shift");

// Counters of one class's bin, written only by the owning thread (slow
// paths), read by reports.
struct BinCounters {
  std::atomic<uint64_t> refills;  // trips to the depot for blocks
  std::atomic<uint64_t> drains;   // trips to the depot with blocks
  std::atomic<uint64_t> misses;   // pooled-class requests the pool could not serve
  // Blocks the slow paths put into the bin (refills) minus those they took
  // out (drains, flushes). The bin's count minus this is the fast paths'
  // pushes minus their pops: a thread's pooled frees follow from its pooled
  // allocations, and the free fast path counts nothing (pushes_minus_pops).
  std::atomic<int64_t> moved;
  // The bin's last trip to the depot (slow paths only): a refill after a
  // drain, or a drain after a refill, says the class's working set is
  // larger than the bin, which then grows (Recycler::note_trip).
  uint8_t last_trip;
  // Refills since the bin was sized, up to kRampSteps: the first ones bring
  // fewer blocks (Recycler::allocate_slow).
  uint8_t fills;
};

struct ThreadCache {
  Bin bins[kMaxClasses];
  BinCounters counters[kMaxClasses];
  // A bit per class whose bin is sized (capacity set): the classes this
  // cache has been used for since it was last flushed. Set where a bin
  // gets its capacity (the first refill or push), cleared by the flushes.
  uint64_t sized[(kMaxClasses + 63) / 64];
  // Bytes of capacity the bins have grown by (note_trip), at most
  // RecyclerConfig::cache_grow_bytes; back to 0 with the flushes.
  size_t grown_bytes;
};

// The owner's add to a counter others only read (a load and a store).
template <typename T>
inline void bump_counter(std::atomic<T>& counter, T by = 1) {
  counter.store(counter.load(std::memory_order_relaxed) + by, std::memory_order_relaxed);
}

// Whether any bin in `cache` is sized (none in mode profile).
inline bool any_sized_bin(const ThreadCache& cache) {
  uint64_t sized = 0;
  for (const uint64_t word : cache.sized) sized |= word;
  return sized != 0;
}

// Calls visit(c) for every class whose bin in `cache` is sized (used since
// the cache was last flushed).
template <typename Visit>
inline void for_each_sized_bin(const ThreadCache& cache, Visit visit) {
  for (unsigned word = 0; word < sizeof(cache.sized) / sizeof(uint64_t); ++word)
    for (uint64_t bits = cache.sized[word]; bits; bits &= bits - 1)
      visit(word * 64 + static_cast<unsigned>(__builtin_ctzll(bits)));
}

class Recycler {
 public:
  // Reserves the region (no memory committed). False: nothing can pool.
  bool init(const SizeClassTable& classes, const RecyclerConfig& config, uint64_t key);
  bool ready() const { return region_.ready(); }

  bool contains(const void* p) const { return region_.contains(p); }
  size_t region_offset(const void* p) const { return region_.offset_of(p); }
  size_t region_bytes() const { return region_.bytes(); }
  size_t class_of_offset(size_t offset) const { return region_.class_of_offset(offset); }
  bool pooled(unsigned size_class) const { return pooled_[size_class].load(std::memory_order_relaxed); }
  // FAST PATH of the entry points: for a request of `size` bytes within the
  // direct class table (SizeClassTable::direct), its class plus one when
  // that class is pooled, else 0: one load instead of the class lookup and
  // the pooled flag's.
  unsigned pooled_class_plus_one(size_t size) const {
    return pooled_by_size_[(size + kClassAlignment - 1) / kClassAlignment].load(std::memory_order_relaxed);
  }
  void set_pooled(unsigned size_class, bool on);
  size_t class_size(unsigned size_class) const { return class_size_[size_class]; }
  unsigned class_of_block(const void* p) const { return region_.class_of_block(p); }

  // FAST PATH: pop from the thread's bin (a load, a compare, a load, a
  // store, and a store to clear the free marker); the unlikely branch
  // refills from the depot. nullptr when the pool cannot serve (the caller
  // uses the real allocator).
  void* allocate(ThreadCache& cache, unsigned size_class) {
    void* block = pop(cache, size_class);
    if (HOTPOOL_RECYCLER_UNLIKELY(block == nullptr)) return allocate_slow(cache, size_class);
    return block;
  }

  // FAST PATH: validate and mark, push onto the thread's bin; the unlikely
  // branches check fully (abort or quarantine) or drain the older half of a
  // full bin to the depot.
  void deallocate(ThreadCache& cache, void* block) {
    const unsigned size_class = region_.class_of_block(block);
    if (HOTPOOL_RECYCLER_UNLIKELY(!validate_and_mark(size_class, block)))
      return deallocate_unmarked(cache, size_class, block);
    if (HOTPOOL_RECYCLER_UNLIKELY(!push(cache, size_class, block))) return drain_and_push(cache, size_class, block);
  }

  static Bin& bin_of(ThreadCache& cache, size_t size_class) { return cache.bins[size_class]; }
  // The owner, or a report (a racing read is off by the operations in flight).
  static int64_t pushes_minus_pops(const ThreadCache& cache, unsigned size_class) {
    return static_cast<int64_t>(cache.bins[size_class].count) -
           cache.counters[size_class].moved.load(std::memory_order_relaxed);
  }
  // The fast paths' addressing: with line = class * 64 in one register,
  // the class's bin is at bins + line * 8 (one addressing mode), and so is
  // a row of 64 bytes per class elsewhere at rows + line (the shim's
  // counters): one shift for both. line_of hides line's origin from the
  // compiler, which would otherwise compute each address from the class.
  static size_t line_of(size_t size_class) {
    size_t line = size_class * 64;
    asm("" : "+r"(line));
    return line;
  }
  static Bin& bin_at_line(ThreadCache& cache, size_t line) {
    return *reinterpret_cast<Bin*>(reinterpret_cast<char*>(cache.bins) + line * (sizeof(Bin) / 64));
  }

  // The pieces of the two paths above, for callers that build frameless
  // fast paths of their own (no call but tail calls to the slow parts).
  // pop: nullptr when the bin is empty (then allocate_slow refills).
  void* pop(ThreadCache& cache, size_t size_class) { return pop(bin_of(cache, size_class)); }
  void* pop(Bin& bin) {
    if (HOTPOOL_RECYCLER_UNLIKELY(bin.count == 0)) return nullptr;
    void* block = bin.slots[--bin.count];
    marker_word(block) = 0;  // clear the free marker
    return block;
  }
  // True when the block passes the cheap checks (HOTPOOL_CHECKS: the start
  // of a block in a carved slab, no free marker yet), which then marks it
  // freed. False: deallocate_unmarked must look closer (it aborts or
  // quarantines the block).
  bool validate_and_mark(size_t size_class, void* block) {
    if (HOTPOOL_RECYCLER_UNLIKELY(!config_.checks)) return true;  // on by default: the checks are the fall-through
    // The block start first: only then is the marker word an aligned word of the block.
    // The depot's address in a register (as line_of): GCC would address the
    // frontier's atomic load from the region's base again.
    const ClassDepot* depot = &region_.depot(size_class);
    asm("" : "+r"(depot));
    if (HOTPOOL_RECYCLER_UNLIKELY(!depot->is_block_start(block))) return false;
    uint64_t& word = marker_word(block);
    const uint64_t marker = key_ ^ reinterpret_cast<uintptr_t>(block);
    if (HOTPOOL_RECYCLER_UNLIKELY(word == marker)) return false;
    word = marker;
    return true;
  }
  // False when the bin is full (then drain_and_push).
  bool push(ThreadCache& cache, size_t size_class, void* block) { return push(bin_of(cache, size_class), block); }
  bool push(Bin& bin, void* block) {
    if (HOTPOOL_RECYCLER_UNLIKELY(bin.count >= bin.capacity)) return false;
    // The slot before the count: an asynchronous cancellation between the
    // two stores must not leave a stale slot counted in (pop's order is
    // safe as it is: stopped between its steps, a block is only lost).
    bin.slots[bin.count] = block;
    asm volatile("" ::: "memory");
    ++bin.count;
    return true;
  }
  void* allocate_slow(ThreadCache& cache, unsigned size_class) __attribute__((noinline));
  // After a failed validate_and_mark(): abort with what is wrong, or
  // quarantine the block (a double free by two threads). Never caches it.
  void deallocate_unmarked(ThreadCache& cache, unsigned size_class, void* block) __attribute__((noinline));
  // After a failed push(): give the depot the older half of the bin (or
  // size a bin used for the first time), then push.
  void drain_and_push(ThreadCache& cache, unsigned size_class, void* block) __attribute__((noinline));
  // Marks class c's bin used (sized) if it is not yet, without a block:
  // the owner's pooled counts of a class are then among its sized bins'.
  void ensure_sized(ThreadCache& cache, unsigned size_class) {
    if (cache.bins[size_class].capacity == 0) size_bin(cache, size_class);
  }

  // For threads without a cache (not attached, or torn down): a free goes
  // straight to the depot (their allocations go to the real allocator).
  void deallocate_uncached(void* block);

  // Thread exit: every cached block back to its depot.
  void flush(ThreadCache& cache);
  // Fork child, for a thread that does not exist there: the same, but for
  // the classes whose depot the forking thread held before the fork (a
  // signal handler's fork() that interrupted a refill or a drain): those
  // blocks are left out (the depot is the interrupted code's until it is
  // done; waiting for it would deadlock), and so lost to the child.
  void flush_after_fork(ThreadCache& cache);
  // malloc_trim: every wholly free slab back to the OS. Returns bytes.
  size_t trim();

  // fork: hold every depot lock across fork() (false: one stayed busy;
  // unlock_all() then releases those that were taken, see
  // SpinLock::try_lock_for_fork).
  bool try_lock_all();
  void unlock_all();
  void reset_locks_after_fork();

  PoolRegion& region() { return region_; }
  const RecyclerConfig& config() const { return config_; }

  // The slow start of refills (allocate_slow): kFirstRefill blocks, doubling
  // with each refill for kRampSteps refills (past half of the largest bin),
  // never more than half the bin.
  static constexpr unsigned kFirstRefill = 4;
  static constexpr uint8_t kRampSteps = 4;

 private:
  // A block carrying its free marker: abort if this thread's cache or the
  // depot holds it; else quarantine it (never cached again).
  void confirm_double_free(ThreadCache& cache, unsigned size_class, void* block);
  void quarantine_once();
  uint32_t capacity_for(unsigned size_class) const;
  // At a trip to the depot in the other direction than the bin's last one
  // (the program holds more blocks of the class at once than the bin, then
  // frees them): the bin doubles, up to kBinSlots and within the thread's
  // cache_grow_bytes. True when it grew.
  enum Trip : uint8_t { kNoTrip = 0, kRefillTrip, kDrainTrip };
  bool note_trip(ThreadCache& cache, unsigned size_class, Trip trip);
  // Gives a bin its capacity and marks it sized; the flushes undo both.
  void size_bin(ThreadCache& cache, unsigned size_class);
  void unsize_bins(ThreadCache& cache);
  void maybe_decay(unsigned size_class, uint64_t now_ns);

  PoolRegion region_;
  RecyclerConfig config_{};
  uint64_t key_ = 0;
  size_t class_size_[kMaxClasses] = {};
  std::atomic<uint8_t> pooled_[kMaxClasses] = {};
  // Per 16 bytes of request, up to the direct table's limit: while the
  // request's class is pooled, the class plus one.
  std::atomic<uint8_t> pooled_by_size_[kDirectLookupLimit / kClassAlignment + 1] = {};
  std::atomic<uint64_t> last_decay_ns_[kMaxClasses] = {};
  std::atomic<bool> warned_quarantine_{false};
};

// The auto policy: which classes are hot and short-lived enough to pool.
// Each thread reports a window of its own activity (per class allocations
// and frees since its last report); the policy keeps a heat score per class
// with hysteresis.
//   hot and short-lived: the class's short-lived allocations alone, its
//          window's allocations times its short-lived share (see
//          evaluate), are at least set_min_share()'s share of the window's
//          allocations (HOTPOOL_HOT) and at least kMinCount.
// Such a class gains 2; one that the thread used but that is not loses 1;
// classes the thread did not use don't move.
//
// The counts come per *block* class: for blocks of the real allocator the
// class of their usable size, which may be one above the class of the
// request (glibc adds 8 bytes of header and rounds to 16). So a request
// class q turns pooled when q or the block class of q's largest request
// (`block_class_of[q]`) reaches kHeatOn, and back when both are at 0.
class AutoPolicy {
 public:
  static constexpr double kDefaultMinShare = 0.01;
  static constexpr uint64_t kMinCount = 64;
  static constexpr double kMinChurn = 0.75;
  static constexpr uint64_t kMinSamples = 16;
  static constexpr int kHeatOn = 4;
  static constexpr int kHeatMax = 16;

  // block_class_of[q] for every sized class q; identity if not given.
  void init(const uint8_t* block_class_of, unsigned classes);
  // The short-lived share of a class's blocks, in 1/kShareOne: what its
  // sampled frees say; kShareUnknown when too few were sampled.
  static constexpr int kShareOne = 1024;
  static constexpr int kShareUnknown = -1;
  // A class is hot when its short-lived allocations alone are: at least
  // kMinCount in the window and this share of all the window's allocations
  // (HOTPOOL_HOT; kDefaultMinShare until set).
  void set_min_share(double share) { min_share_ = share; }
  // A pooled class serves its other blocks too, as fast; its short-lived
  // ones are what make the pool pay (the blocks come back at once).
  // short_share[c]: class c's short-lived share (nullptr: none sampled);
  // unknown: all of the window's allocations when its frees keep up
  // (kMinChurn), none otherwise.
  // cut_short: the window ended on time, before its count (a thread that
  // allocates slowly): the count a class needs is kMinCount scaled to the
  // window's allocations as to one of kMinCountWindow (at least 4), and
  // classes only heat up: cooling stays with the windows of full length,
  // so that quiet spells do not unpool what a busy one pooled.
  static constexpr uint64_t kMinCountWindow = 4096;
  void evaluate(const uint64_t* allocs, const uint64_t* frees, unsigned classes, Recycler& recycler,
                const int16_t* short_share = nullptr, bool cut_short = false);
  int heat(unsigned size_class) const { return heat_[size_class].load(std::memory_order_relaxed); }

 private:
  std::atomic<int> heat_[kMaxClasses] = {};
  double min_share_ = kDefaultMinShare;
  uint8_t block_class_of_[kMaxClasses] = {};
  bool mapped_ = false;
};

}  // namespace hotpool::recycler
