#include "pool.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace hotpool::recycler {

namespace {
constexpr uint8_t kNone = 0, kPartial = 1, kEmpty = 2;
// A decay check moves at most this many idle blocks off a transfer stack
// (about 0.1 ms under the depot's lock).
constexpr uint32_t kIdleFlushBlocks = 16 * 1024;
// ... and gives its stack's pages back when at least this many are unused.
constexpr uintptr_t kStackPagesReleased = 16;
constexpr size_t kMinSlabBytes = 64 * 1024;
constexpr unsigned kBlocksPerSlabAtLeast = 8;

void* map_noreserve(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

}  // namespace

size_t page_bytes() {
  // From the auxiliary vector (no system call), once: start-up asks for
  // every class of both regions, and glibc's sysconf is a switch of some
  // fifty instructions.
  // (No function-local static: its guard is the C++ runtime's. Threads
  // racing here store the same value.)
  static std::atomic<size_t> cached{0};
  size_t page = cached.load(std::memory_order_relaxed);
  if (page == 0) {
    const long bytes = sysconf(_SC_PAGESIZE);
    page = bytes > 0 ? static_cast<size_t>(bytes) : 4096;
    cached.store(page, std::memory_order_relaxed);
  }
  return page;
}

namespace {
unsigned log2_ceil(size_t value) {
  unsigned shift = 0;
  while ((size_t{1} << shift) < value) ++shift;
  return shift;
}

void raise_atomic(std::atomic<uint64_t>& peak, uint64_t value) {
  uint64_t seen = peak.load(std::memory_order_relaxed);
  while (value > seen && !peak.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
  }
}
}  // namespace

void warn_once(std::atomic<bool>& warned, const char* line) {
  if (warned.exchange(true, std::memory_order_relaxed)) return;
  ssize_t ignored = write(STDERR_FILENO, line, std::strlen(line));
  (void)ignored;
}

void fatal_pointer_error(const char* what, const void* block) {
  char line[256];
  size_t used = 0;
  auto put = [&](const char* text) {
    while (*text && used + 1 < sizeof(line)) line[used++] = *text++;
  };
  put("hotpool: ");
  put(what);
  put(" (pointer 0x");
  uintptr_t value = reinterpret_cast<uintptr_t>(block);
  for (int shift = 60; shift >= 0; shift -= 4) line[used++] = "0123456789abcdef"[(value >> shift) & 15];
  put("); aborting\n");
  ssize_t ignored = write(STDERR_FILENO, line, used);
  (void)ignored;
  abort();
}

// is_block_start reads one cache line of the depot.
static_assert(sizeof(ClassDepot) % 64 == 0 && alignof(ClassDepot) == 64, "depots start on a cache line");

void ClassGeometry::init(uint32_t block_size, size_t page_bytes) {
  size = block_size;
  // At least 64 KiB and 16 pages: a slab is a whole number of blocks, not
  // of pages, and only its whole pages can go back to the OS.
  size_t slab = kMinSlabBytes > 16 * page_bytes ? kMinSlabBytes : 16 * page_bytes;
  if (slab < size_t{block_size} * kBlocksPerSlabAtLeast) slab = size_t{block_size} * kBlocksPerSlabAtLeast;
  slab_shift = log2_ceil(slab);
  blocks = static_cast<uint32_t>((size_t{1} << slab_shift) / block_size);
  bitmap_words = (blocks + 63) / 64;
  reciprocal = static_cast<uint64_t>(((static_cast<unsigned __int128>(1) << 64) / block_size) + 1);
  slab_reciprocal = static_cast<uint64_t>(((static_cast<unsigned __int128>(1) << 64) / slab_bytes()) + 1);
  twos = static_cast<uint32_t>(__builtin_ctz(block_size));
  const uint64_t odd = block_size >> twos;
  uint64_t inverse = odd;  // correct to 3 bits (odd * odd = 1 mod 8); each step doubles them
  for (int i = 0; i < 5; ++i) inverse *= 2 - odd * inverse;
  inverse_of_odd = inverse;
  multiple_limit = ~uint64_t{0} / block_size;
}

bool ClassDepot::init(uint32_t block_size, char* area, size_t area_bytes, uint64_t marker_key, char* meta) {
  marker_key_ = marker_key;
  // The transfer stack's tags, also with the checks off (marker_key 0): a
  // key of its own, never the marker key (a free block's marker is never
  // its tag), never zero (a zeroed word is never a tag).
  const uint64_t seed = marker_key ? marker_key : reinterpret_cast<uintptr_t>(area) * 0x9e3779b97f4a7c15ull;
  transfer_key_ = ((seed << 32) | (seed >> 32)) ^ 0x5bd1e9955bd1e995ull;
  if (transfer_key_ == marker_key_ || transfer_key_ == 0) transfer_key_ ^= 0x8000000000000001ull;
  page_bytes_ = page_bytes();
  geometry_.init(block_size, page_bytes_);
  area_ = area;
  check_.area = area;
  check_.inverse_of_odd = geometry_.inverse_of_odd;
  check_.twos = geometry_.twos;
  max_slabs_ = area_bytes / geometry_.slab_bytes();
  if (max_slabs_ == 0 || !meta) return false;
  slabs_ = reinterpret_cast<Slab*>(meta);
  bitmaps_ = reinterpret_cast<uint64_t*>(meta + slab_meta_bytes(max_slabs_));
  return true;
}

size_t ClassDepot::meta_bytes(uint32_t block_size, size_t area_bytes) {
  ClassGeometry geometry;
  geometry.init(block_size, page_bytes());
  const size_t slabs = area_bytes / geometry.slab_bytes();
  const size_t bitmap_bytes = slabs * geometry.bitmap_words * sizeof(uint64_t);
  return (slab_meta_bytes(slabs) + bitmap_bytes + 63) & ~size_t{63};
}

void ClassDepot::unlink(Slab* slab) {
  Slab*& head = slab->list == kPartial ? partial_ : empty_;
  if (slab->list == kNone) return;
  if (slab->prev) slab->prev->next = slab->next; else head = slab->next;
  if (slab->next) slab->next->prev = slab->prev;
  if (slab->list == kEmpty && !slab->released) empty_bytes_ -= geometry_.slab_bytes();
  slab->prev = slab->next = nullptr;
  slab->list = kNone;
}

void ClassDepot::push(Slab*& list, Slab* slab, uint8_t which) {
  slab->prev = nullptr;
  slab->next = list;
  if (list) list->prev = slab;
  list = slab;
  slab->list = which;
  if (which == kEmpty && !slab->released) empty_bytes_ += geometry_.slab_bytes();
}

void ClassDepot::mark_free_blocks(Slab* slab) {
  if (!marker_key_) return;
  char* memory = slab_memory(slab);
  const uint64_t* bits = bitmap(slab);
  for (uint32_t i = 0; i < geometry_.blocks; ++i) {
    if (!(bits[i / 64] & (uint64_t{1} << (i % 64)))) continue;
    char* block = memory + size_t{i} * geometry_.size;
    marker_word(block) = marker_key_ ^ reinterpret_cast<uintptr_t>(block);
  }
}

Slab* ClassDepot::carve_slab() {
  const size_t index = carved_slabs_.load(std::memory_order_relaxed);
  if (index == max_slabs_) return nullptr;
  Slab* slab = &slabs_[index];
  uint64_t* bits = bitmap(slab);
  for (uint32_t w = 0; w < geometry_.bitmap_words; ++w) {
    const uint32_t first = w * 64;
    const uint32_t in_word = geometry_.blocks - first >= 64 ? 64 : geometry_.blocks - first;
    bits[w] = in_word == 64 ? ~uint64_t{0} : (uint64_t{1} << in_word) - 1;
  }
  slab->free_blocks = geometry_.blocks;
  slab->list = kNone;
  slab->released = 0;
  // No block is written here: a block's page is touched when the block is
  // first handed out (refill_locked), which also moves the frontier that
  // tells blocks handed out from the rest (check_.handed_out).
  carved_slabs_.store(index + 1, std::memory_order_release);
  const uint64_t committed = counters_.committed_bytes.fetch_add(geometry_.slab_bytes(), std::memory_order_relaxed) +
                             geometry_.slab_bytes();
  raise_atomic(counters_.peak_committed_bytes, committed);
  counters_.depot_free_bytes.fetch_add(uint64_t{geometry_.blocks} * geometry_.size, std::memory_order_relaxed);
  return slab;
}

unsigned ClassDepot::refill(void** out, unsigned want, uint64_t now_ns) {
  SpinLockGuard guard(lock_, kNoCancellationPoint);
  return refill_locked(out, want, now_ns);
}

unsigned ClassDepot::refill_locked(void** out, unsigned want, uint64_t now_ns) {
  (void)now_ns;
  unsigned taken = 0;
  while (taken < want) {
    // Fuller slabs first: a partial slab before an empty one, so that empty
    // slabs stay empty long enough to be given back.
    Slab* slab = partial_ ? partial_ : empty_ ? empty_ : carve_slab();
    if (!slab) break;
    unlink(slab);
    if (slab->released) {
      slab->released = 0;  // its pages fault back in, zero-filled: mark them again
      mark_free_blocks(slab);
      const uint64_t committed =
          counters_.committed_bytes.fetch_add(geometry_.slab_bytes(), std::memory_order_relaxed) +
          geometry_.slab_bytes();
      raise_atomic(counters_.peak_committed_bytes, committed);
      counters_.depot_free_bytes.fetch_add(uint64_t{geometry_.blocks} * geometry_.size, std::memory_order_relaxed);
    }
    uint64_t* bits = bitmap(slab);
    char* memory = slab_memory(slab);
    // Lowest blocks first: in the newest slab, every block below the
    // frontier has been handed out before, none above it has.
    size_t frontier = check_.handed_out.load(std::memory_order_relaxed);
    const size_t frontier_before = frontier;
    const size_t first_number = static_cast<size_t>(slab - slabs_) * geometry_.blocks;
    const size_t size = geometry_.size;
    const uint64_t key = marker_key_;  // a local: the stores below could alias the member
    for (uint32_t w = 0; w < geometry_.bitmap_words && taken < want; ++w) {
      uint64_t word = bits[w];
      if (!word) continue;
      char* word_memory = memory + size_t{w} * 64 * size;
      const size_t word_number = first_number + size_t{w} * 64;
      const unsigned first = taken;
      // Lowest blocks first: those handed out before (below the frontier),
      // their addresses, nothing else; then those never handed out (a slab
      // being carved), each of which goes into a thread cache still free,
      // so it gets its free marker now (its first write), and the frontier
      // moves past the last of them.
      const size_t below = frontier > word_number ? frontier - word_number : 0;
      const uint64_t old_mask = below >= 64 ? ~uint64_t{0} : (uint64_t{1} << below) - 1;
      uint64_t old_bits = word & old_mask, new_bits = word & ~old_mask;
      while (old_bits && taken < want) {
        const unsigned bit = static_cast<unsigned>(__builtin_ctzll(old_bits));
        old_bits &= old_bits - 1;
        out[taken++] = word_memory + size_t{bit} * size;
      }
      if (new_bits && taken < want) {
        unsigned bit;
        do {
          bit = static_cast<unsigned>(__builtin_ctzll(new_bits));
          new_bits &= new_bits - 1;
          char* block = word_memory + size_t{bit} * size;
          out[taken++] = block;
          if (key) marker_word(block) = key ^ reinterpret_cast<uintptr_t>(block);
        } while (new_bits && taken < want);
        frontier = word_number + bit + 1;
      }
      word = old_bits | new_bits;
      bits[w] = word;
      slab->free_blocks -= taken - first;
    }
    // Before the blocks leave the lock: a free() of one checks the frontier.
    if (frontier != frontier_before) check_.handed_out.store(frontier, std::memory_order_release);
    if (slab->free_blocks) push(partial_, slab, kPartial);
  }
  counters_.depot_free_bytes.fetch_sub(uint64_t{taken} * geometry_.size, std::memory_order_relaxed);
  return taken;
}

void ClassDepot::drain(void* const* blocks, unsigned count, uint64_t now_ns) {
  SpinLockGuard guard(lock_, kNoCancellationPoint);
  drain_locked(blocks, count, now_ns);
}

void ClassDepot::drain_locked(void* const* blocks, unsigned count, uint64_t now_ns) {
  for (unsigned i = 0; i < count; ++i) {
    // On the transfer stack (its tag says so; the scan confirms): freed
    // twice, once each way.
    if (transfer_count_ && HOTPOOL_RECYCLER_UNLIKELY(in_transfer(blocks[i])))
      fatal_pointer_error("double free: the block is already free in the pool", blocks[i]);
    const size_t offset = expect_handed_out(blocks[i]);
    uint32_t index;
    Slab* slab = slab_at(offset, &index);
    uint64_t& word = bitmap(slab)[index / 64];
    const uint64_t bit = uint64_t{1} << (index % 64);
    if (word & bit) fatal_pointer_error("double free: the block is already free in the pool", blocks[i]);
    word |= bit;
    if (++slab->free_blocks == geometry_.blocks) {
      unlink(slab);
      slab->empty_since_ns = now_ns;
      push(empty_, slab, kEmpty);
    } else if (slab->list == kNone) {
      push(partial_, slab, kPartial);
    }
  }
  counters_.depot_free_bytes.fetch_add(uint64_t{count} * geometry_.size, std::memory_order_relaxed);
}

bool ClassDepot::holds_free(const void* block) {
  SpinLockGuard guard(lock_, kNoCancellationPoint);
  return holds_free_locked(block);
}

bool ClassDepot::holds_free_locked(const void* block) const { return free_in_bitmap(block) || in_transfer(block); }

size_t ClassDepot::transfer_slots() const {
  const size_t area_blocks = max_slabs_ * geometry_.blocks;
  return slabs_ == nullptr ? 0 : area_blocks < kTransferSlots ? area_blocks : kTransferSlots;
}

bool ClassDepot::on_stack(const void* block) const {
  return std::find(transfer_, transfer_ + transfer_count_, block) != transfer_ + transfer_count_;
}

namespace {
std::atomic<bool> g_warned_transfer_quarantine{false};
}  // namespace

void ClassDepot::give_locked(void* const* blocks, unsigned count, uint64_t now_ns) {
  const unsigned room = transfer_capacity_ - transfer_count_;
  const unsigned given = count < room ? count : room;
  void** const stack = transfer_ + transfer_count_;
  for (unsigned i = 0; i < given; ++i) {
    void* block = blocks[i];
    expect_handed_out(block);
    uint64_t& tag = transfer_tag_word(block);
    const uint64_t mine = transfer_tag(block);
    // A block already free in the depot was freed twice: in a bitmap (a
    // thread's exit, or a free without a cache, gave it there), or on the
    // stack, below or earlier in this batch (its tag says so, a scan
    // confirms; the free path's check let it through because its marker
    // was written over meanwhile).
    if (HOTPOOL_RECYCLER_UNLIKELY(free_in_bitmap(block)) ||
        (HOTPOOL_RECYCLER_UNLIKELY(tag == mine) && (on_stack(block) || std::find(stack, stack + i, block) != stack + i)))
      fatal_pointer_error("double free: the block is already free in the pool", block);
    tag = mine;
    stack[i] = block;
  }
  transfer_count_ += given;
  if (transfer_count_ > transfer_high_) transfer_high_ = transfer_count_;
  if (given) counters_.depot_free_bytes.fetch_add(uint64_t{given} * geometry_.size, std::memory_order_relaxed);
  if (given < count) drain_locked(blocks + given, count - given, now_ns);
}

unsigned ClassDepot::untag(void** blocks, unsigned count) {
  unsigned kept = 0;
  const uint64_t key = transfer_key_;  // a local: the stores below could alias the member
  for (unsigned i = 0; i < count; ++i) {
    void* block = blocks[i];
    uint64_t& tag = transfer_tag_word(block);
    // Tag gone: written after its free, or a second copy of a block taken
    // before (whose tag that take cleared). Either way, never handed out
    // again (quarantined).
    if (HOTPOOL_RECYCLER_UNLIKELY(tag != tag_of(key, block))) continue;
    tag = 0;  // a second copy of the block further on reads 0, not its tag
    blocks[kept++] = block;
  }
  const unsigned quarantined = count - kept;
  counters_.depot_free_bytes.fetch_sub(uint64_t{count} * geometry_.size, std::memory_order_relaxed);
  if (HOTPOOL_RECYCLER_UNLIKELY(quarantined != 0)) {
    counters_.quarantined_blocks.fetch_add(quarantined, std::memory_order_relaxed);
    warn_once(g_warned_transfer_quarantine,
              "hotpool: a free pooled block was written after its free (or freed twice); it is quarantined (never reused)\n");
  }
  return kept;
}

unsigned ClassDepot::take_transfer(void** out, unsigned want) {
  unsigned taken = 0;
  while (taken < want && transfer_count_) {
    // The top of the stack, most recent last (it ends on the bin's top).
    const unsigned n = want - taken < transfer_count_ ? want - taken : transfer_count_;
    transfer_count_ -= n;
    std::memcpy(out + taken, transfer_ + transfer_count_, n * sizeof(void*));
    taken += untag(out + taken, n);  // fewer if some were quarantined: take more
  }
  if (transfer_count_ < transfer_low_) transfer_low_ = transfer_count_;
  return taken;
}

unsigned ClassDepot::take_locked(void** out, unsigned want, uint64_t now_ns) {
  unsigned taken = take_transfer(out, want);
  if (taken < want) {
    // The bitmaps hand out lowest addresses first; a cache pops from its
    // top: reversed, the thread's next allocations go up in address.
    const unsigned got = refill_locked(out + taken, want - taken, now_ns);
    std::reverse(out + taken, out + taken + got);
    taken += got;
  }
  return taken;
}

void ClassDepot::give(void* const* blocks, unsigned count, uint64_t now_ns) {
  SpinLockGuard guard(lock_, kNoCancellationPoint);
  give_locked(blocks, count, now_ns);
}

unsigned ClassDepot::take(void** out, unsigned want, uint64_t now_ns) {
  SpinLockGuard guard(lock_, kNoCancellationPoint);
  return take_locked(out, want, now_ns);
}

size_t ClassDepot::release_empty(uint64_t now_ns, uint64_t idle_ns, size_t keep_bytes, bool whole_transfer) {
  SpinLockGuard guard(lock_, kNoCancellationPoint);
  // First the transfer stack's idle blocks into the bitmaps, so that a slab
  // whose blocks wait there counts as wholly free (from now on): those
  // below the low-water mark, at most kIdleFlushBlocks per check (the lock
  // is held meanwhile; the rest are below the mark next time), or all of
  // them (malloc_trim). The others keep going back and forth between caches.
  uint32_t idle_blocks = whole_transfer ? transfer_count_ : transfer_low_;
  if (!whole_transfer && idle_blocks > kIdleFlushBlocks) idle_blocks = kIdleFlushBlocks;
  if (idle_blocks) {
    // The bottom of the stack into the bitmaps (untagged in place; free
    // bytes: out, then in again), then the rest down.
    drain_locked(transfer_, untag(transfer_, idle_blocks), now_ns);
    transfer_count_ -= idle_blocks;
    std::memmove(transfer_, transfer_ + idle_blocks, transfer_count_ * sizeof(void*));
  }
  transfer_low_ = transfer_count_;
  // The stack's own pages above its depth back to the OS (1 MiB of
  // pointers for a class whose stack was deep once), when they are a few:
  // whole pages only, and only this class's (the stacks of all classes lie
  // end to end in one mapping).
  const uintptr_t page_mask = page_bytes_ - 1;
  const uintptr_t in_use = (reinterpret_cast<uintptr_t>(transfer_ + transfer_count_) + page_mask) & ~page_mask;
  uintptr_t written = (reinterpret_cast<uintptr_t>(transfer_ + transfer_high_) + page_mask) & ~page_mask;
  const uintptr_t slice_end = reinterpret_cast<uintptr_t>(transfer_ + transfer_capacity_) & ~page_mask;
  if (written > slice_end) written = slice_end;
  if (written >= in_use + kStackPagesReleased * page_bytes_ || (whole_transfer && written > in_use))
    madvise(reinterpret_cast<void*>(in_use), written - in_use, MADV_DONTNEED);
  transfer_high_ = transfer_count_;
  size_t released = 0;
  uint64_t released_slabs = 0;
  // The list is newest first: walk it and release from the oldest end by
  // keeping the first keep_bytes of young slabs.
  size_t kept = 0;
  for (Slab* slab = empty_; slab; slab = slab->next) {
    if (slab->released) continue;
    const bool idle = now_ns - slab->empty_since_ns >= idle_ns;
    if (!idle && kept + geometry_.slab_bytes() <= keep_bytes) {
      kept += geometry_.slab_bytes();
      continue;
    }
    // The whole pages of the slab (a slab need not start or end on a page:
    // the pages it shares with its neighbours stay). Slabs span 16 pages or
    // more, so that is most of it.
    const uintptr_t page = page_bytes_;
    const uintptr_t start = (reinterpret_cast<uintptr_t>(slab_memory(slab)) + page - 1) & ~(page - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(slab_memory(slab)) + geometry_.slab_bytes()) & ~(page - 1);
    if (end > start) {
      madvise(reinterpret_cast<void*>(start), end - start, MADV_DONTNEED);
      released += end - start;
    }
    slab->released = 1;
    empty_bytes_ -= geometry_.slab_bytes();
    ++released_slabs;
  }
  if (released_slabs) {
    // A released slab's blocks stay free in its bitmap but hold no memory:
    // they count again when the slab is reused. Committed bytes count
    // slabs; released bytes what went back to the OS.
    counters_.depot_free_bytes.fetch_sub(released_slabs * geometry_.blocks * geometry_.size, std::memory_order_relaxed);
    counters_.committed_bytes.fetch_sub(released_slabs * geometry_.slab_bytes(), std::memory_order_relaxed);
    counters_.released_bytes.fetch_add(released, std::memory_order_relaxed);
  }
  return released;
}

const char* ClassDepot::check_block(const void* block) const {
  const size_t offset = static_cast<size_t>(static_cast<const char*>(block) - area_);
  if (offset >= check_.handed_out.load(std::memory_order_acquire) * geometry_.size)
    return "free() of a pointer into pool memory that was never handed out";
  if (!geometry_.multiple_of_size(offset))
    return "free() of a pointer into the middle of a pooled block (interior or misaligned)";
  return nullptr;
}

size_t PoolRegion::area_colour(unsigned c, uint32_t block_size, unsigned shift) {
  const size_t page = page_bytes();
  ClassGeometry geometry;
  geometry.init(block_size, page);
  // An area that holds few slabs keeps them all (a colour costs the area
  // up to one slab: at most 1 in 32 here).
  if ((size_t{1} << shift) / geometry.slab_bytes() < 32) return 0;
  return geometry.slab_bytes() % page != 0 ? (size_t{c} * 37 * 64) % (64 * 1024) : (size_t{c} * 37 % 16) * page;
}

bool PoolRegion::init(const SizeClassTable& classes, size_t region_bytes, uint64_t marker_key) {
  const unsigned sized = classes.count() - 1;
  if (sized == 0) return false;
  // Every class's area must hold at least a few slabs of its largest class.
  ClassGeometry largest;
  largest.init(static_cast<uint32_t>(classes.max_class_size()), page_bytes());
  const unsigned min_shift = largest.slab_shift + 2;
  unsigned shift = 0;
  while ((size_t{sized} << (shift + 1)) <= region_bytes) ++shift;
  if (shift < min_shift) shift = min_shift;
  // Halve the areas until the reservation succeeds (RLIMIT_AS, small VMs).
  for (; shift >= min_shift; --shift) {
    base_ = static_cast<char*>(map_noreserve(size_t{sized} << shift));
    if (base_) break;
  }
  if (!base_) return false;
  area_shift_ = shift;
  class_count_ = sized;
  // Every depot's metadata in one mapping (one system call, one VMA).
  size_t colours[kMaxClasses];
  size_t meta_bytes = 0;
  for (unsigned c = 0; c < sized; ++c) {
    const auto size = static_cast<uint32_t>(classes.class_size(c));
    colours[c] = area_colour(c, size, shift);
    meta_bytes += ClassDepot::meta_bytes(size, (size_t{1} << shift) - colours[c]);
  }
  char* meta = static_cast<char*>(map_noreserve(meta_bytes));
  if (!meta) return false;
  for (unsigned c = 0; c < sized; ++c) {
    const auto size = static_cast<uint32_t>(classes.class_size(c));
    const size_t room = (size_t{1} << shift) - colours[c];
    if (!depots_[c].init(size, base_ + (size_t{c} << shift) + colours[c], room, marker_key, meta)) return false;
    meta += ClassDepot::meta_bytes(size, room);
  }
  bytes_ = size_t{sized} << shift;  // published last: contains() is false until now
  return true;
}

bool PoolRegion::start_transfers() {
  size_t slots = 0;
  for (unsigned c = 0; c < class_count_; ++c) slots += depots_[c].transfer_slots();
  auto* stacks = static_cast<void**>(map_noreserve(slots * sizeof(void*)));
  if (!stacks) return false;
  for (unsigned c = 0; c < class_count_; ++c) {
    depots_[c].start_transfer(stacks);
    stacks += depots_[c].transfer_slots();
  }
  return true;
}

size_t PoolRegion::trim(uint64_t now_ns) {
  size_t released = 0;
  for (unsigned c = 0; c < class_count_; ++c) {
    if (depots_[c].ready()) released += depots_[c].release_empty(now_ns, 0, 0, /*whole_transfer=*/true);
  }
  return released;
}

}  // namespace hotpool::recycler
