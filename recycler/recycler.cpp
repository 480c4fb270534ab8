#include "recycler.h"

#include <algorithm>

#include <time.h>
#include <unistd.h>

#include <cstring>

namespace hotpool::recycler {

namespace {
uint64_t monotonic_ns() {
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);  // vDSO, slow paths only
  return static_cast<uint64_t>(now.tv_sec) * 1000000000u + static_cast<uint64_t>(now.tv_nsec);
}
}  // namespace

bool Recycler::init(const SizeClassTable& classes, const RecyclerConfig& config, uint64_t key) {
  config_ = config;
  key_ = key | 1;  // never zero: a zeroed marker word is never a marker
  for (unsigned c = 0; c + 1 < classes.count(); ++c) class_size_[c] = classes.class_size(c);
  for (auto& entry : pooled_by_size_) entry.store(0, std::memory_order_relaxed);
  if (!region_.init(classes, config.region_bytes, config.checks ? key_ : 0)) return false;
  // Thread caches trade blocks with the depots through transfer stacks
  // (without them, their mapping refused, through the bitmaps alone).
  region_.start_transfers();
  return true;
}

void Recycler::set_pooled(unsigned size_class, bool on) {
  if (size_class >= region_.class_count() || !region_.depot(size_class).ready()) return;
  pooled_[size_class].store(on, std::memory_order_relaxed);
  static_assert(kMaxClasses < 255, "class + 1 fits a byte");
  // A request belongs to the smallest class that holds it: the class's
  // entries are those of the sizes above the class before it, up to its own
  // (class sizes are multiples of kClassAlignment; entry 0 is a request of 0).
  const size_t first = size_class ? class_size_[size_class - 1] / kClassAlignment + 1 : 0;
  const size_t last = std::min(class_size_[size_class], kDirectLookupLimit) / kClassAlignment;
  for (size_t i = first; i <= last; ++i)
    pooled_by_size_[i].store(on ? static_cast<uint8_t>(size_class + 1) : 0, std::memory_order_relaxed);
}

uint32_t Recycler::capacity_for(unsigned size_class) const {
  // HOTPOOL_CACHE bytes' worth of blocks, at most kBinSlots; at least 4 for
  // classes up to 256 KiB (a refill then brings 2), 2 above.
  const size_t size = class_size_[size_class];
  size_t blocks = config_.cache_bytes / size;
  const size_t floor = size <= (size_t{256} << 10) ? 4 : 2;
  if (blocks < floor) blocks = floor;
  if (blocks > kBinSlots) blocks = kBinSlots;
  return static_cast<uint32_t>(blocks);
}

void* Recycler::allocate_slow(ThreadCache& cache, unsigned size_class) {
  const CancellationOff cancellation_off(kNoCancellationPoint);  // the bin and the depot change together
  Bin& bin = cache.bins[size_class];
  if (bin.count) return pop(cache, size_class);
  if (bin.capacity == 0) size_bin(cache, size_class);
  else note_trip(cache, size_class, kRefillTrip);
  // Refill half the bin: the other half is room for frees before a drain.
  // Slow start: a bin's first refills bring 4, 8, 16, ... blocks, so that a
  // thread that uses a class little holds few of its blocks idle (100
  // threads using 25 classes each held 18 MiB of free blocks with refills
  // of 31 from the start); one that uses it much is at half the bin after
  // a few trips.
  uint8_t& fills = cache.counters[size_class].fills;
  const unsigned ramp = kFirstRefill << fills;
  if (fills < kRampSteps) ++fills;
  unsigned want = bin.capacity / 2 ? bin.capacity / 2 : 1;
  if (want > ramp) want = ramp;
  ClassDepot& depot = region_.depot(size_class);
  unsigned got;
  {
    SpinLockGuard guard(depot.lock(), kNoCancellationPoint);  // the bin's count with the depot (see refill_locked)
    got = depot.take_locked(bin.slots, want, 0);
    bin.count = got;
    bump_counter(cache.counters[size_class].moved, int64_t{got});  // with the count: a report reading both sees them agree
  }
  bump_counter(cache.counters[size_class].refills);
  if (got == 0) {
    bump_counter(cache.counters[size_class].misses);
    return nullptr;
  }
  return pop(cache, size_class);
}

void Recycler::deallocate_unmarked(ThreadCache& cache, unsigned size_class, void* block) {
  ClassDepot& depot = region_.depot(size_class);
  if (!depot.is_block_start(block)) fatal_pointer_error(depot.check_block(block), block);
  confirm_double_free(cache, size_class, block);  // it carries its free marker
}

void Recycler::drain_and_push(ThreadCache& cache, unsigned size_class, void* block) {
  const CancellationOff cancellation_off(kNoCancellationPoint);  // the bin and the depot change together
  Bin& bin = cache.bins[size_class];
  if (bin.capacity == 0) {
    size_bin(cache, size_class);
  } else if (note_trip(cache, size_class, kDrainTrip)) {
    // Grown: room for the block without a drain.
  } else {
    // Give the depot the older half; keep the recently freed, cache-warm half.
    const unsigned give = bin.count - bin.capacity / 2;
    const uint64_t now = monotonic_ns();
    {
      ClassDepot& depot = region_.depot(size_class);
      SpinLockGuard guard(depot.lock(), kNoCancellationPoint);  // the bin with the depot (see drain_locked)
      depot.give_locked(bin.slots, give, now);
      std::memmove(bin.slots, bin.slots + give, (bin.count - give) * sizeof(void*));
      bin.count -= give;
      bump_counter(cache.counters[size_class].moved, -static_cast<int64_t>(give));
    }
    bump_counter(cache.counters[size_class].drains);
    maybe_decay(size_class, now);
  }
  // push(): the slot stored before the count. Written as one statement, the
  // compiler stored the count first, and a fork() by another thread between
  // the two stores gave the child a bin counting a stale slot: a block the
  // drain above had just given to the depot (a double free in the child).
  if (HOTPOOL_RECYCLER_UNLIKELY(!push(cache, size_class, block)))
    region_.depot(size_class).drain(&block, 1, monotonic_ns());  // never: a drained or newly sized bin has room
}

void Recycler::maybe_decay(unsigned size_class, uint64_t now_ns) {
  // At most a few times per decay period per class.
  const uint64_t last = last_decay_ns_[size_class].load(std::memory_order_relaxed);
  if (now_ns - last < config_.decay_ns / 4) return;
  last_decay_ns_[size_class].store(now_ns, std::memory_order_relaxed);
  region_.depot(size_class).release_empty(now_ns, config_.decay_ns, config_.keep_empty_bytes);
}

void Recycler::deallocate_uncached(void* block) {
  const unsigned size_class = region_.class_of_block(block);
  ClassDepot& depot = region_.depot(size_class);
  if (config_.checks) {
    if (const char* problem = depot.check_block(block)) fatal_pointer_error(problem, block);
    uint64_t& word = marker_word(block);
    const uint64_t marker = key_ ^ reinterpret_cast<uintptr_t>(block);
    if (word == marker) {
      // Freed before: in the depot (drain aborts), or in some thread's cache.
      if (depot.holds_free(block)) fatal_pointer_error("double free of a pooled block (it is back in the pool's depot)", block);
      quarantine_once();
      return;
    }
    word = marker;
  }
  depot.drain(&block, 1, monotonic_ns());  // aborts on a block already free there
}

void Recycler::confirm_double_free(ThreadCache& cache, unsigned size_class, void* block) {
  // The marker word holds this block's free marker: it was freed before, or
  // the program stored exactly that 64-bit value there. Look for it.
  const Bin& bin = cache.bins[size_class];
  for (uint32_t i = 0; i < bin.count; ++i) {
    if (bin.slots[i] == block) fatal_pointer_error("double free of a pooled block (it is in this thread's cache)", block);
  }
  if (region_.depot(size_class).holds_free(block))
    fatal_pointer_error("double free of a pooled block (it is back in the pool's depot)", block);
  // Neither here nor in the depot: most likely it sits in another thread's
  // cache after a free there. Never hand it out twice: keep it out of every
  // cache (a leak of one block) and say so once.
  quarantine_once();
}

void Recycler::quarantine_once() {
  warn_once(warned_quarantine_,
            "hotpool: a pooled block was freed twice, probably by two threads; it is quarantined (never reused)\n");
}

void Recycler::flush(ThreadCache& cache) {
  const CancellationOff cancellation_off(kNoCancellationPoint);
  const uint64_t now = monotonic_ns();
  for (unsigned c = 0; c < region_.class_count(); ++c) {
    Bin& bin = cache.bins[c];
    if (bin.count == 0) continue;
    ClassDepot& depot = region_.depot(c);
    SpinLockGuard guard(depot.lock(), kNoCancellationPoint);  // the bin with the depot (see drain_locked)
    depot.drain_locked(bin.slots, bin.count, now);
    bump_counter(cache.counters[c].moved, -static_cast<int64_t>(bin.count));
    bin.count = 0;
  }
  unsize_bins(cache);
}

void Recycler::flush_after_fork(ThreadCache& cache) {
  const CancellationOff cancellation_off(kNoCancellationPoint);
  const uint64_t now = monotonic_ns();
  for (unsigned c = 0; c < region_.class_count(); ++c) {
    Bin& bin = cache.bins[c];
    if (bin.count == 0) continue;
    if (!region_.depot(c).lock().held_before_this_fork()) region_.depot(c).drain(bin.slots, bin.count, now);
    bump_counter(cache.counters[c].moved, -static_cast<int64_t>(bin.count));
    bin.count = 0;
  }
  unsize_bins(cache);
}

bool Recycler::note_trip(ThreadCache& cache, unsigned size_class, Trip trip) {
  uint8_t& last = cache.counters[size_class].last_trip;
  const bool turned = last != kNoTrip && last != trip;
  last = trip;
  Bin& bin = cache.bins[size_class];
  if (!turned || bin.capacity >= kBinSlots) return false;
  // A program that keeps more blocks of the class than the bin holds, and
  // frees them all again (a batch, a buffer pool of its own), sends every
  // half bin through the depot's lock: twice the room, until the batch
  // fits, within the thread's budget.
  const size_t size = class_size_[size_class];
  const size_t budget_left = config_.cache_grow_bytes - cache.grown_bytes;  // grown_bytes never exceeds the budget
  size_t more = std::min<size_t>(bin.capacity, kBinSlots - bin.capacity);
  more = std::min(more, budget_left / size);
  if (more == 0) return false;
  bin.capacity += static_cast<uint32_t>(more);
  cache.grown_bytes += more * size;
  return true;
}

void Recycler::size_bin(ThreadCache& cache, unsigned size_class) {
  cache.bins[size_class].capacity = capacity_for(size_class);
  cache.sized[size_class / 64] |= uint64_t{1} << (size_class % 64);
}

void Recycler::unsize_bins(ThreadCache& cache) {
  // The cache's next thread sizes each bin again on first use, as a new
  // cache does (and so marks it sized). Only the sized bins are written:
  // the bins of classes never used stay untouched.
  for_each_sized_bin(cache, [&](unsigned c) {
    cache.bins[c].capacity = 0;
    cache.counters[c].last_trip = kNoTrip;
    cache.counters[c].fills = 0;
  });
  if (cache.grown_bytes) cache.grown_bytes = 0;
  for (uint64_t& word : cache.sized)
    if (word) word = 0;
}

size_t Recycler::trim() { return region_.ready() ? region_.trim(monotonic_ns()) : 0; }

bool Recycler::try_lock_all() {
  for (unsigned c = 0; c < region_.class_count(); ++c) {
    if (!region_.depot(c).lock().try_lock_for_fork()) return false;
  }
  return true;
}

void Recycler::unlock_all() {
  for (unsigned c = region_.class_count(); c-- > 0;) region_.depot(c).lock().unlock_after_fork_parent();
}

void Recycler::reset_locks_after_fork() {
  for (unsigned c = 0; c < region_.class_count(); ++c) region_.depot(c).lock().reset_after_fork();
}

void AutoPolicy::init(const uint8_t* block_class_of, unsigned classes) {
  for (unsigned c = 0; c < kMaxClasses; ++c)
    block_class_of_[c] = static_cast<uint8_t>(block_class_of && c < classes ? block_class_of[c] : c);
  mapped_ = block_class_of != nullptr;
}

void AutoPolicy::evaluate(const uint64_t* allocs, const uint64_t* frees, unsigned classes, Recycler& recycler,
                          const int16_t* short_share, bool cut_short) {
  if (!mapped_) init(nullptr, 0);
  uint64_t total = 0;
  for (unsigned c = 0; c < classes; ++c) total += allocs[c];
  if (total == 0) return;
  double min_count = static_cast<double>(kMinCount);
  if (cut_short && total < kMinCountWindow)
    min_count = std::max(4.0, min_count * static_cast<double>(total) / static_cast<double>(kMinCountWindow));
  for (unsigned c = 0; c < classes; ++c) {
    if (allocs[c] == 0) continue;  // this thread has no say on a class it did not use
    // Sampled lifetimes when there are enough (they see blocks freed by
    // other threads too); else this thread's frees keeping up.
    int share = short_share ? short_share[c] : kShareUnknown;
    if (share < 0)
      share = static_cast<double>(frees[c]) >= kMinChurn * static_cast<double>(allocs[c]) ? kShareOne : 0;
    const double short_allocs = static_cast<double>(allocs[c]) * share / kShareOne;
    const bool hot_short = short_allocs >= min_count && short_allocs >= min_share_ * static_cast<double>(total);
    const int heat = heat_[c].load(std::memory_order_relaxed);
    if (!hot_short && cut_short) continue;  // only windows of full length cool a class
    int next = hot_short ? heat + 2 : heat - 1;
    if (next > kHeatMax) next = kHeatMax;
    if (next < 0) next = 0;
    heat_[c].store(next, std::memory_order_relaxed);  // racing updates only blur the score
  }
  for (unsigned q = 0; q < classes && q < recycler.region().class_count(); ++q) {
    const int own = heat_[q].load(std::memory_order_relaxed);
    const int blocks = block_class_of_[q] < classes ? heat_[block_class_of_[q]].load(std::memory_order_relaxed) : 0;
    const int heat = own > blocks ? own : blocks;
    if (heat >= kHeatOn && !recycler.pooled(q)) recycler.set_pooled(q, true);
    else if (heat == 0 && recycler.pooled(q)) recycler.set_pooled(q, false);
  }
}

}  // namespace hotpool::recycler
