// Pool memory: hotpool's own reserved virtual region, one area per size
// class, carved into slabs; and the central depot of each class, which
// holds the free blocks that no thread cache holds.
//
// Layering: recycler/ knows nothing of the shim or the reporter.
//
// Ownership is an address-range check (never a header in front of a foreign
// pointer): region_base <= p < region_end. The class of a pooled block is
// (p - base) >> area_shift. A class's slabs lie end to end in its area,
// from a small offset (its colour, see PoolRegion::area_colour) on, each a
// whole number of blocks (no gaps): the blocks of an area are one array,
// and a pointer is a block start exactly when its offset from the array's
// start is a multiple of the block size (the free path's check, see
// is_block_start).
//
// Everything about free blocks lives out of band, in a metadata mapping:
// per slab a bitmap (bit set = the block is free in the depot) and a count.
// Freed memory holds at most the free marker (see marker_word) and, in the
// depot's transfer stack, its tag (see transfer_tag_word), so a write after
// free corrupts no allocator state.
//
// In front of the bitmaps, each depot keeps a transfer stack: the blocks
// that thread caches drained, handed out again first to the caches that
// refill (tcmalloc's transfer cache, in spirit). The traffic between caches
// and the depot is mostly such batches going back and forth; through the
// stack a batch costs a copy of its pointers instead of a bitmap update per
// block (a division and a slab list change). Only what the stack cannot
// hold, thread exits (flush) and the OS's share (release_empty, which
// first moves the blocks that sat on the stack unused since its previous
// call into the bitmaps) go through the bitmaps.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "size_classes.h"
#include "spin_lock.h"

#define HOTPOOL_RECYCLER_UNLIKELY(x) __builtin_expect(!!(x), 0)

namespace hotpool::recycler {

// The free marker (hardening key ^ block address) of a free pooled block
// lives in its second word, as glibc's tcache key does: the word programs
// write last before a free is most often the first (a header, a string's
// first bytes), and a narrower store there followed by the free path's
// 8-byte load of the same bytes would stall on store forwarding (measured:
// 1.6 ns per pooled malloc+free pair when the program writes one byte).
// Every class is at least 16 bytes.
inline constexpr size_t kMarkerOffset = 8;
inline uint64_t& marker_word(void* block) {
  return *reinterpret_cast<uint64_t*>(static_cast<char*>(block) + kMarkerOffset);
}
// A block in a depot's transfer stack carries its tag (the depot's
// transfer key ^ its address) in its first word: a block given to the stack
// a second time is recognised by it (a double free; confirmed by a scan of
// the stack), and a block whose tag is gone when it leaves the stack was
// written after its free (or freed twice and handed out since): it is
// quarantined. Free memory: the program's word, no longer its.
inline uint64_t& transfer_tag_word(void* block) { return *static_cast<uint64_t*>(block); }

// The OS's page size (sysconf).
size_t page_bytes();

// Why hotpool aborts: one line on stderr, then abort(). Never returns.
[[noreturn]] void fatal_pointer_error(const char* what, const void* block);
// `line` (a whole line, newline included) on stderr, the first time only:
// `warned` says whether it was written.
void warn_once(std::atomic<bool>& warned, const char* line);

struct ClassGeometry {
  uint32_t size = 0;          // block size
  uint32_t blocks = 0;        // blocks per slab: a slab is blocks * size bytes
  uint32_t slab_shift = 0;    // log2 of the slab size, rounded up (the area holds at least four)
  uint32_t bitmap_words = 0;  // 64-bit words of free bitmap per slab
  uint64_t reciprocal = 0;    // floor(2^64 / size) + 1: offset / size by multiply-high
  uint64_t slab_reciprocal = 0;  // the same for the slab size
  // size = odd * 2^twos. An offset is a multiple of size exactly when
  // rotr(offset * inverse_of_odd, twos) <= multiple_limit (Granlund and
  // Montgomery's divisibility test, as compilers emit for x % constant == 0):
  // a multiply and a rotate, for the free path's block-start check.
  uint64_t inverse_of_odd = 0;  // odd^-1 modulo 2^64
  uint32_t twos = 0;
  uint64_t multiple_limit = 0;  // (2^64 - 1) / size

  void init(uint32_t block_size, size_t page_bytes = 4096);
  bool multiple_of_size(size_t offset) const { return rotated_product(offset, inverse_of_odd, twos) <= multiple_limit; }
  // The same test, giving more: offset / size when offset is a multiple of
  // size, else a value above multiple_limit (so above any block number in
  // an area). One compare with a block count then asks "a block start, and
  // below that count" at once.
  static uint64_t rotated_product(size_t offset, uint64_t inverse_of_odd, unsigned twos) {
    const uint64_t product = offset * inverse_of_odd;
    return (product >> twos) | (product << ((64 - twos) & 63));  // a rotate (ror), also for twos = 0
  }
  size_t slab_bytes() const { return size_t{blocks} * size; }
  // Index of the block at `offset` in its slab (exact for offset < slab size).
  uint32_t index_of(size_t offset) const {
    return static_cast<uint32_t>((static_cast<unsigned __int128>(offset) * reciprocal) >> 64);
  }
  // The slab holding the byte at `offset` in the area (exact for offsets
  // below 2^64 / slab size).
  size_t slab_of(size_t offset) const {
    return static_cast<size_t>((static_cast<unsigned __int128>(offset) * slab_reciprocal) >> 64);
  }
};

struct Slab {
  Slab* prev;               // in the depot's partial or empty list
  Slab* next;
  uint32_t free_blocks;     // blocks free in the depot (bits set)
  uint8_t list;             // kNone, kPartial or kEmpty
  uint8_t released;         // pages given back to the OS since last use
  uint64_t empty_since_ns;  // when it last became wholly free
};

// Counters of one class's pool, readable while the program runs.
struct PoolCounters {
  std::atomic<uint64_t> committed_bytes{0};       // slabs carved and not released
  std::atomic<uint64_t> peak_committed_bytes{0};
  std::atomic<uint64_t> depot_free_bytes{0};      // free blocks in the depot's committed slabs
  std::atomic<uint64_t> released_bytes{0};        // given back to the OS, in total
  std::atomic<uint64_t> quarantined_blocks{0};    // left the transfer stack without their tag: never reused
};

// Blocks a depot's transfer stack holds at most: 1 MiB of pointers per
// class, reserved when the class's recycler starts and committed as used.
inline constexpr unsigned kTransferSlots = 128 * 1024;

// The central depot of one class: free blocks not in any thread cache.
class alignas(64) ClassDepot {
 public:
  // Sets up the class's area [area, area + area_bytes) and its metadata.
  // `marker_key`: when non-zero, a block gets its free marker (key ^
  // address, see marker_word) when it is first handed out (into a thread
  // cache, still free), and every free block of a released slab when the
  // slab is used again, so that a free() of a block nobody allocated is
  // recognised as a double free. (Blocks never handed out lie above the
  // frontier: a free() of one is refused as memory never handed out.)
  // `meta`: meta_bytes(block_size, area_bytes) of zeroed memory for the
  // slabs' records and bitmaps (false if null).
  bool init(uint32_t block_size, char* area, size_t area_bytes, uint64_t marker_key, char* meta);
  static size_t meta_bytes(uint32_t block_size, size_t area_bytes);
  // Blocks the depot's transfer stack would hold: as many as the area
  // holds, at most kTransferSlots.
  size_t transfer_slots() const;
  // Gives the depot its transfer stack, room for transfer_slots() pointers
  // (before any take or give; without one, every block goes through the
  // bitmaps).
  void start_transfer(void** stack) {
    transfer_ = stack;
    transfer_capacity_ = static_cast<uint32_t>(transfer_slots());
  }

  // Hands out up to `want` blocks (fewer when the area is exhausted).
  unsigned refill(void** out, unsigned want, uint64_t now_ns);
  // Takes blocks back. Aborts on a block that is already free in the depot,
  // or that it never handed out (see expect_handed_out).
  void drain(void* const* blocks, unsigned count, uint64_t now_ns);
  // The same with lock() held by the caller, which then updates what holds
  // the blocks on its side (a thread cache's bin) before it unlocks: a
  // fork() in between would give the child a bin that disagrees with the
  // depot (a block in both, or in neither).
  unsigned refill_locked(void** out, unsigned want, uint64_t now_ns);
  void drain_locked(void* const* blocks, unsigned count, uint64_t now_ns);
  // What thread caches use (lock() held, as above): give puts the blocks on
  // the transfer stack as far as it has room, the rest into the bitmaps;
  // take hands out the most recently given blocks first, then the bitmaps'.
  // give aborts on a block already on the stack or never handed out (as
  // drain); take quarantines a block
  // whose tag is gone (counted in quarantined_blocks, one warning line per
  // process).
  void give_locked(void* const* blocks, unsigned count, uint64_t now_ns);
  unsigned take_locked(void** out, unsigned want, uint64_t now_ns);
  // The same taking the lock (tests).
  void give(void* const* blocks, unsigned count, uint64_t now_ns);
  unsigned take(void** out, unsigned want, uint64_t now_ns);
  unsigned transfer_count() const { return transfer_count_; }
  // True when the depot holds `block` as free (under the lock).
  bool holds_free(const void* block);
  // Gives wholly free slabs back to the OS: those idle for at least
  // `idle_ns`, and beyond the first `keep_bytes` of empty slabs all of them.
  // First, the transfer stack's blocks that sat there since the previous
  // call go to the bitmaps (whole_transfer, as malloc_trim: all of them).
  size_t release_empty(uint64_t now_ns, uint64_t idle_ns, size_t keep_bytes, bool whole_transfer = false);

  // FAST PATH: true when `block` (a pointer into this class's area) is the
  // start of a block handed out before (below the frontier). A subtraction,
  // a multiply, a rotate and one compare: the rotated product is the block
  // number for a block start, and above every block count otherwise.
  bool is_block_start(const void* block) const {
    const size_t offset = static_cast<size_t>(static_cast<const char*>(block) - check_.area);
    const uint64_t number = ClassGeometry::rotated_product(offset, check_.inverse_of_odd, check_.twos);
    // Relaxed is enough: a block handed out happened-after its slab was
    // carved (depot lock), and the free happens-after the allocation.
    return number < check_.handed_out.load(std::memory_order_relaxed);
  }
  // What is wrong with a pointer that is not a block start; nullptr if fine.
  const char* check_block(const void* block) const;
  // The start of the block holding `p` (a pointer into this class's area)
  // when that block was handed out before (below the frontier), else
  // nullptr. A division: for the rare pointers that are not block starts
  // but may lie inside a block legitimately (a sampled aligned block's,
  // see shim/sampler.cpp).
  char* block_start_of(const void* p) const {
    if (geometry_.size == 0) return nullptr;  // a class not set up
    const size_t offset = static_cast<size_t>(static_cast<const char*>(p) - check_.area);  // huge below the area
    const size_t number = offset / geometry_.size;
    if (number >= check_.handed_out.load(std::memory_order_relaxed)) return nullptr;
    return check_.area + number * geometry_.size;
  }

  const ClassGeometry& geometry() const { return geometry_; }
  const char* area() const { return area_; }  // where its blocks start (see PoolRegion::area_colour)
  const PoolCounters& counters() const { return counters_; }
  SpinLock& lock() { return lock_; }
  bool ready() const { return slabs_ != nullptr; }


 private:
  void unlink(Slab* slab);
  void push(Slab*& list, Slab* slab, uint8_t which);
  Slab* carve_slab();
  void mark_free_blocks(Slab* slab);
  static size_t slab_meta_bytes(size_t slabs) { return (slabs * sizeof(Slab) + 63) & ~size_t{63}; }
  // A block's tag on the stack (see transfer_tag_word). The loops that
  // write into blocks pass the key from a local (the stores could alias
  // the member).
  static uint64_t tag_of(uint64_t key, const void* block) { return key ^ reinterpret_cast<uintptr_t>(block); }
  uint64_t transfer_tag(const void* block) const { return tag_of(transfer_key_, block); }
  // On the transfer stack: its tag says whether to look (inline: give and
  // drain ask for every block), a scan of the stack confirms.
  bool in_transfer(const void* block) const {
    return transfer_tag_word(const_cast<void*>(block)) == transfer_tag(block) && on_stack(block);
  }
  bool on_stack(const void* block) const;
  // The offset of a block this depot handed out (above its colour, below
  // its frontier); anything else aborts with the checks' message. Every
  // block coming back passes here under the lock: with the checks off
  // (HOTPOOL_CHECKS=0) nothing before stops a bad pointer, which would
  // otherwise read and set bits far outside the bitmaps.
  size_t expect_handed_out(const void* block) const {
    const size_t offset = static_cast<size_t>(static_cast<const char*>(block) - area_);
    if (HOTPOOL_RECYCLER_UNLIKELY(offset >= check_.handed_out.load(std::memory_order_relaxed) * geometry_.size))
      fatal_pointer_error(check_block(block), block);
    return offset;
  }
  // True when the block's bit is set: free in its slab's bitmap.
  // (By the slab's number: no round trip through its record's address.)
  bool free_in_bitmap(const void* block) const {
    const size_t offset = static_cast<size_t>(static_cast<const char*>(block) - area_);
    const size_t slab = geometry_.slab_of(offset);
    const uint32_t index = geometry_.index_of(offset - slab * geometry_.slab_bytes());
    return (bitmaps_[slab * geometry_.bitmap_words + index / 64] >> (index % 64)) & 1;
  }
  // Pops up to `want` blocks off the transfer stack into `out`, each
  // checked and untagged; returns how many (quarantined ones not counted).
  unsigned take_transfer(void** out, unsigned want);
  // Checks and untags blocks leaving the stack, keeping in place (in order)
  // those whose tag was intact; quarantines the others. Returns the kept.
  unsigned untag(void** blocks, unsigned count);
  bool holds_free_locked(const void* block) const;
  uint64_t* bitmap(const Slab* slab) const { return bitmaps_ + (slab - slabs_) * geometry_.bitmap_words; }
  char* slab_memory(const Slab* slab) const {
    return area_ + static_cast<size_t>(slab - slabs_) * geometry_.slab_bytes();
  }
  // The slab of the block at `offset` in the area, and the block's index in it.
  Slab* slab_at(size_t offset, uint32_t* index) const {
    const size_t slab = geometry_.slab_of(offset);
    *index = geometry_.index_of(offset - slab * geometry_.slab_bytes());
    return &slabs_[slab];
  }

  // What is_block_start reads: the depot's first cache line (static_assert
  // in pool.cpp); the lock, which every refill and drain writes, is in
  // another, so frees in other threads don't miss on it.
  struct BlockCheck {
    char* area = nullptr;
    uint64_t inverse_of_odd = 0;
    uint32_t twos = 0;
    // The frontier: the number of the highest block ever handed out, plus
    // one. Blocks are handed out lowest first and a slab is carved only
    // when the others have none free, so every block below it was handed
    // out at least once (a free() of one above it is of memory never
    // allocated), and the pages above it were never touched (a carved slab
    // costs no RSS until its blocks are used). Written rarely (under the
    // lock).
    std::atomic<size_t> handed_out{0};
  } check_;
  alignas(64) SpinLock lock_;
  ClassGeometry geometry_;
  char* area_ = nullptr;
  size_t max_slabs_ = 0;
  uintptr_t page_bytes_ = 4096;  // madvise's unit
  std::atomic<size_t> carved_slabs_{0};
  uint64_t marker_key_ = 0;
  Slab* slabs_ = nullptr;       // metadata, [max_slabs_]
  uint64_t* bitmaps_ = nullptr; // [max_slabs_ * bitmap_words]
  Slab* partial_ = nullptr;     // some blocks free
  Slab* empty_ = nullptr;       // every block free
  size_t empty_bytes_ = 0;
  PoolCounters counters_;
  // The transfer stack (under the lock): transfer_[0, transfer_count_),
  // the most recently given on top.
  uint32_t transfer_count_ = 0;
  uint32_t transfer_capacity_ = 0;
  // The least transfer_count_ since the last release_empty: the blocks
  // below it sat on the stack untouched all that time (tcmalloc's low-water
  // mark); release_empty moves those into the bitmaps, where their slabs
  // can become wholly free.
  uint32_t transfer_low_ = 0;
  // The greatest transfer_count_ since the last release_empty: the stack's
  // pages above the count, up to there, were written and may go back.
  uint32_t transfer_high_ = 0;
  uint64_t transfer_key_ = 0;
  void** transfer_ = nullptr;  // [transfer_capacity_], its own mapping
};

// The whole region: one ClassDepot per sized class of the table.
class PoolRegion {
 public:
  // Reserves `region_bytes` of address space (rounded so that every class
  // gets a power-of-two area) without committing memory. False if the
  // reservation fails; nothing is pooled then.
  bool init(const SizeClassTable& classes, size_t region_bytes, uint64_t marker_key = 0);

  bool contains(const void* p) const {
    return static_cast<uintptr_t>(static_cast<const char*>(p) - base_) < bytes_;
  }
  unsigned class_of_block(const void* p) const { return static_cast<unsigned>(class_of_offset(offset_of(p))); }
  // p's offset from the region's start, and its class given that offset
  // (for a p that contains() accepts: offset_of(p) < bytes()).
  size_t offset_of(const void* p) const { return static_cast<size_t>(static_cast<const char*>(p) - base_); }
  size_t bytes() const { return bytes_; }
  size_t class_of_offset(size_t offset) const { return offset >> area_shift_; }
  ClassDepot& depot(unsigned size_class) { return depots_[size_class]; }
  unsigned class_count() const { return class_count_; }
  bool ready() const { return base_ != nullptr; }
  size_t area_bytes() const { return size_t{1} << area_shift_; }
  // Where class c's blocks start in its area (of 2^shift bytes): every area
  // starts at a power of two, so without an offset the first blocks of
  // every class (the ones a LIFO cache hands out again and again) would
  // share their cache sets in L1, L2 and L3, and evict each other. Classes
  // whose slabs are not whole pages (their slab edges share pages already)
  // start 37 cache lines apart, modulo 64 KiB: a different L1 set for each
  // of 64 classes, and L2 sets apart; classes of whole-page slabs start
  // whole pages apart (16 colours), so that trim still gives back all of a
  // free slab. Areas that hold fewer than 32 slabs of their class keep
  // them all (no colour). cachegrind, mode auto: sqlite3 12% and
  // demo_server 83% fewer L1 data misses.
  static size_t area_colour(unsigned c, uint32_t block_size, unsigned shift);

  // Releases every wholly free slab of every class (malloc_trim).
  size_t trim(uint64_t now_ns);
  // Gives every depot a transfer stack, all in one mapping (reserved, and
  // committed as used). False if it cannot be mapped: the depots then go
  // through their bitmaps alone.
  bool start_transfers();

 private:
  char* base_ = nullptr;
  size_t bytes_ = 0;
  unsigned area_shift_ = 0;
  unsigned class_count_ = 0;
  ClassDepot depots_[kMaxClasses];
};

}  // namespace hotpool::recycler
