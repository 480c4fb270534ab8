// Stack capture with libunwind, for sampled allocations only.
//
// libunwind.so.8 is loaded with dlopen(RTLD_LOCAL) at start-up instead of
// being linked: linked into a preloaded library, its _Unwind_* and
// backtrace() symbols would enter the program's global scope and replace
// libgcc's exception unwinder and glibc's backtrace() for the whole program.
// Never called with a hotpool lock held: libunwind walks the loaded modules
// under the loader's lock, and the loader may be inside malloc.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace hotpool::reporter {

inline constexpr unsigned kMaxDepth = 64;

// Room in a capture for the allocator's own leading frames, which are dropped.
inline constexpr unsigned kLeadingFrames = 12;

// A thread's previous capture (libgcc's unwinder), kept so that the next
// one can stop where it rejoins it: the frames outside the one where the
// two stacks meet are the same when each of their return addresses is
// still in its slot (the word below the CFA that comes with it). Reads of
// those slots stay inside [stack_low, stack_high), the thread's stack:
// every CFA the cache holds past its first frame lies in
// [stack_low + 8, stack_high] (checked as captures are made, so that a
// rejoin reads the slots without a check per frame).
struct TraceCache {
  static constexpr unsigned kFrames = kMaxDepth + kLeadingFrames;
  // Captures through this cache replayed from the frame table, and walked
  // by libgcc (per thread: shared counters would bounce between CPUs).
  // Written by the owning thread only, as relaxed atomics: a report reads
  // them from another (see bump()).
  uint64_t replayed, walked;
  static void bump(uint64_t& counter) { __atomic_store_n(&counter, counter + 1, __ATOMIC_RELAXED); }
  unsigned count;
  bool truncated;  // the stack went on beyond ips()[count - 1]
  uintptr_t stack_low, stack_high;
  // Two buffers: a capture is written straight into the one the previous
  // capture is not in (rejoining copies that one's outer frames), then
  // becomes the cache. No copy of the whole stack per capture.
  unsigned current;
  uintptr_t ips_[2][kFrames];
  uintptr_t cfas_[2][kFrames];  // with ips_[b][i]: the address above the slot holding it

  const uintptr_t* ips() const { return ips_[current & 1]; }
  const uintptr_t* cfas() const { return cfas_[current & 1]; }
};

struct CapturedStack {
  unsigned depth;            // frames in ips, outermost last
  uintptr_t cfa;             // the allocating function's canonical frame address, 0 if unknown
  int memo_entry;            // the StackMemo entry that remembers this capture, -1 if none
  uintptr_t ips[kMaxDepth];  // return addresses (the first: inside the allocating function)
};

// A thread's recent captures from a start frame (the allocator's entry,
// see Unwinder::capture), each with the site its caller named for it, so
// that the same stack again costs a check of its return addresses instead
// of a replay and a site lookup. Keyed by the start frame (its return
// address and CFA), four entries a key hash, the least recently used one
// replaced; one start frame has several outer stacks (the same function
// called from several callers at the same depth). With every allocation
// sampled, the stack was found in 128 entries for 94% of clang-format's
// samples (32 entries: 88%; the last stack alone: 21%), 99% of sqlite3's
// (32: 72%) and 98% of python3's.
//
// An entry holds the frames after the start frame up to the last one the
// capture's result (and the allocating function's CFA) came from, each
// with its CFA; it is remembered only when the stack ended there or went
// on beyond the result, and every frame but the last was replayed from the
// frame table: one of a fixed size (its distance), or one that keeps a
// frame pointer (its CFA is its %rbp + 16, whatever its size), with its
// %rbp where the replay found it (a slot of a frame below it, or the
// allocator's entry's). Then the stack is the same exactly when each
// return address is still in its slot and each such %rbp is the same:
// from the start frame's CFA, each next CFA is then where it was, and so
// is each slot (a frame whose size changed could leave a stale return
// address where its slot was). A check reads only the thread's own stack
// above the start frame. Emptied when the thread's first sample looks up
// its stack (a state is reused by later threads), and void when libraries
// are unloaded (forget_frames: other code may then be at the same address).
// Only the owning thread uses it, outside a capture (a signal handler's
// sample does not, see sampled_allocate in the shim).
struct StackMemo {
  static constexpr unsigned kWays = 4;
  static constexpr unsigned kSetBits = 5;
  static constexpr unsigned kSets = 1u << kSetBits;
  static constexpr unsigned kEntries = kWays * kSets;
  static constexpr unsigned kMaxFrames = kMaxDepth + kLeadingFrames;
  // Frames with a frame pointer per entry at most (a stack with more is
  // not remembered).
  static constexpr unsigned kMaxPointers = 8;
  struct Frame {
    uintptr_t ip, cfa;
  };
  struct Entry {
    uintptr_t ip, cfa;         // the start frame; ip 0: empty
    uintptr_t allocating_cfa;  // CapturedStack::cfa
    uint32_t site;             // 0 until the caller names it
    uint32_t stamp;            // when last used (the least recent is replaced)
    uint32_t generation;       // Unwinder's when remembered
    uint16_t frames;           // in the entry's frames, checked in order
    uint16_t pointers;         // frame-pointer frames' %rbp, checked after them
    // Where each such %rbp is (0: the start frame's, which the allocator's
    // entry gives), and its value.
    uintptr_t rbp_at[kMaxPointers];
    uintptr_t rbp[kMaxPointers];
  };
  // Frames kept per entry (0: off): HOTPOOL_DEPTH and the leading frames.
  // Set once the thread's stack is known; empties every entry.
  void reset(unsigned depth);
  bool on() const { return stride != 0; }
  static unsigned set_of(uintptr_t ip, uintptr_t cfa) {
    return static_cast<unsigned>(((ip ^ (cfa << 7)) * 0x9e3779b97f4a7c15ull) >> (64 - kSetBits));
  }
  void name(int entry, uint32_t site) { entries[entry].site = site; }
  // Stacks recalled (as TraceCache's counters: the owner writes, a report reads).
  uint64_t recalled;
  unsigned stride;
  uint32_t clock;
  Entry entries[kEntries];
  // Entry e's from e * stride on: with the default HOTPOOL_DEPTH, 72 KiB
  // when every entry is used (the rest of the 152 KiB is never touched);
  // the entries themselves, 21 KiB.
  Frame frames[kEntries * kMaxFrames];
};

// True when the function that made an allocation (whose stack was
// `allocation`) is still active in `now`, a stack captured later on the
// same thread: the allocating function's callers, allocation[1..], are the
// outer end of `now` below some frame. Return addresses name call sites, so the same
// function called again from the same site in between reads as the same
// activation: the one case this cannot tell apart.
bool allocating_frame_active(const uintptr_t* allocation, unsigned allocation_depth, const CapturedStack& now);

// What libgcc's walks taught about each return address: how far above
// the stack pointer of its frame (after the call returned) that frame's
// CFA lies, i.e. where the caller's return address is. Most call sites
// have one such distance for good (the CFA is the stack pointer plus a
// constant there); a frame that allocates on the stack (alloca, variable
// arrays, realignment) or a signal frame has several, and is marked so,
// when a walk sees a second one. A call site in a function that keeps a
// frame pointer (%rbp = its CFA - 16 there: code built with
// -fno-omit-frame-pointer, as Rust's standard library, Go and whole
// distributions are; in other code, the functions whose frame size varies)
// is marked so, with its distance while it has one; its CFA is taken from
// its %rbp, never from the distance alone (a frame of varying size seen
// once has one distance; replayed with it, a larger frame would read a
// stale return address). The replay knows a frame's %rbp when the frame
// below it keeps a frame pointer too (its prologue saved the caller's just
// below its return address), when the start frame gives it (the
// allocator's entry), or when the function below keeps no frame pointer
// but is marked with what it does with its caller's %rbp at that call:
// leaves it in place, or saved it in one of the slots below its return
// address (learned from the %rbp libgcc restored for the caller). A
// capture whose every return address is known so is replayed from the
// table: a hash lookup and a load or two per frame, instead of libgcc's
// search and interpretation of the unwind tables (some 1,000-2,000
// instructions per frame, and a lock shared by every thread on the way).
// One table per
// process, lock-free (one 64-bit word per address), in its own mmap'd
// memory, never freed; emptied when a library is unloaded (hotpool's
// dlclose), as other code may then be loaded at the same addresses.
// It starts small and grows once: a hash table spreads its entries over
// all its pages, and the large one made 372 KiB resident in sqlite3 for
// some 1,500 addresses; most programs stay in the small one.
class FrameTable {
 public:
  static constexpr unsigned kSmallLog2 = 12;  // 4,096 slots, 32 KiB
  static constexpr unsigned kLargeLog2 = 16;  // 65,536 slots, 512 KiB
  // The small table is replaced by the large one when it is this full:
  // past half, probes grow long and inserts start failing.
  static constexpr unsigned kGrowAt = (1u << kSmallLog2) / 2;
  static constexpr uint64_t kAddressMask = (uint64_t{1} << 48) - 1;
  static constexpr uint16_t kUnknown = 0;      // not in the table
  static constexpr uint16_t kOutermost = 0xffff;  // libgcc's walk ended with this frame
  static constexpr uint16_t kVarying = 0xfffe;    // more than one distance seen
  // A frame-pointer call site: this bit, with its distance in the bits
  // below (up to kMaxDistance), or none (0: more than one seen).
  static constexpr uint16_t kFramePointer = 0x8000;
  // Any other call site: its distance in the low bits (up to
  // kMaxDistance: a larger frame is kVarying), and in kRbpMask where the
  // caller's %rbp is at that call: kRbpUnseen (no walk told yet), kRbpKept
  // (still in %rbp), k from kRbpFirstSlot to kRbpLastSlot (saved at
  // CFA - 8 * k), kRbpLost (elsewhere, or walks disagreed: for good).
  static constexpr uint16_t kDistanceMask = 0x0fff;  // 32 KiB
  static constexpr uint16_t kMaxDistance = 0x0fff;
  static constexpr unsigned kRbpShift = 12;
  static constexpr uint16_t kRbpMask = 0x7000;
  static constexpr unsigned kRbpUnseen = 0, kRbpKept = 1, kRbpLost = 7, kRbpFirstSlot = 2, kRbpLastSlot = 6;
  static constexpr bool frame_pointer(uint16_t words) { return (words & kFramePointer) && words < kVarying; }
  static constexpr unsigned rbp_at(uint16_t words) { return (words & kRbpMask) >> kRbpShift; }

  bool init();  // false without memory (every lookup then says kUnknown)
  bool ready() const { return current_.load(std::memory_order_relaxed) != 0; }
  static constexpr unsigned kProbes = 8;
  // The table in use: its slots and the mask of their indices (their count
  // - 1), read together (one word: a reader never pairs the large table's
  // size with the small table's slots).
  struct View {
    const uint64_t* slots;
    unsigned mask;
  };
  // Given view(): a loop that stores through other pointers keeps the
  // table's address and mask in registers.
  View view() const {
    const uint64_t word = current_.load(std::memory_order_acquire);
    return {reinterpret_cast<const uint64_t*>(word & kAddressMask), static_cast<unsigned>(word >> 48)};
  }
  // The hash's top 16 bits (Fibonacci hashing), for either table: the
  // small one takes their low ones (a fixed shift: a variable one cost
  // replay() 3.5% more instructions, in spills).
  static unsigned first_slot(uintptr_t address) {
    return static_cast<unsigned>((address * 0x9e3779b97f4a7c15ull) >> (64 - kLargeLog2));
  }
  // The distance in 8-byte words, or one of the markers above. Inline: a
  // replay looks up every frame it walks.
  static uint16_t lookup(View table, uintptr_t return_address) {
    if (!table.slots || (return_address & ~kAddressMask)) return kUnknown;
    const unsigned mask = table.mask;
    unsigned index = first_slot(return_address) & mask;
    for (unsigned probe = 0; probe < kProbes; ++probe, index = (index + 1) & mask) {
      const uint64_t entry = load_slot(&table.slots[index]);
      if (entry == 0) return kUnknown;
      if ((entry & kAddressMask) == return_address) return static_cast<uint16_t>(entry >> 48);
    }
    return kUnknown;
  }
  // Records what a walk saw (a distance in words with kFramePointer, or
  // with what it saw of %rbp, kOutermost or kVarying). A second distance
  // makes a frame-pointer site kFramePointer alone, any other kVarying. A
  // site seen both with and without the frame pointer keeps the plain
  // entry when both saw the same distance (kVarying otherwise): a walk
  // without it proves the CFA is not computed from %rbp there.
  void learn(uintptr_t return_address, uint16_t words);
  // Forgets everything (dlclose: other code may be loaded where the
  // unloaded code was). The memory goes back to the OS; a walk running
  // meanwhile finds addresses unknown, or loses what it learns.
  void clear();
  // Entries in use, and the slots, for tests.
  unsigned size() const;
  unsigned slots() const { return view().mask + 1; }

 private:
  static uint64_t load_slot(const uint64_t* slot) { return __atomic_load_n(slot, __ATOMIC_RELAXED); }
  // Inserts or merges; true when it took an empty slot.
  static bool learn_in(View table, uintptr_t return_address, uint16_t words);
  void grow();
  uint64_t* small_ = nullptr;  // both tables, mapped at init (untouched memory costs nothing)
  uint64_t* large_ = nullptr;
  // The table in use: its address, with its mask in the top 16 bits.
  std::atomic<uint64_t> current_{0};
  std::atomic<unsigned> used_{0};  // slots taken in the small table (grows at kGrowAt)
};

// A frame of the calling thread outside Unwinder::capture()'s own, given as
// the return address in it and the CFA that comes with it (the callee's);
// `rbp`, when `rbp_known`: the %rbp of the frame `return_address` returns
// into, as it was at that call (the allocator's entry reads it there).
struct UnwindFrame {
  uintptr_t return_address, cfa;
  uintptr_t rbp = 0;
  bool rbp_known = false;
};

class Unwinder {
 public:
  // use_libunwind: dlopen()s libunwind (unw_backtrace); else libgcc's
  // _Unwind_Backtrace, which the C++ runtime's exceptions use. False (and a
  // disabled unwinder) if the one asked for is missing.
  // `skip_low`..`skip_high` ranges: leading frames inside them (hotpool
  // itself, the C++ runtime's operator new, libc's malloc wrappers) are
  // not part of the allocation's stack.
  bool load(bool use_libunwind);
  void set_skipped_ranges(const uintptr_t (*ranges)[2], unsigned count);
  bool ready() const { return ready_; }
  // libunwind may read files (cancellation points); libgcc's walk never does.
  bool uses_libunwind() const { return backtrace_ != nullptr; }

  // Captures up to `depth` frames above the allocator, with libunwind's
  // unw_backtrace (its per-thread trace cache: no lock, no signal mask
  // change). Returns false when nothing was captured.
  // `cache` (libgcc only, may be null): the thread's previous capture,
  // used and then replaced; never shared between threads or with a signal
  // handler that interrupts the capture.
  // With a cache, libgcc's walks are replayed from the frame table when it
  // knows every frame (see FrameTable).
  // `start` (optional, with a cache): a frame of the calling thread outside
  // capture()'s own, e.g. the allocator's entry point, given as the return
  // address in it and its CFA: the replay starts there instead of at
  // capture()'s caller, and the frames in between (hotpool's, skipped
  // anyway) are not walked. A walk by libgcc still starts at capture().
  // `memo` (with a cache and a start frame): a replayed capture is
  // remembered there when it can be (out->memo_entry; the caller names its
  // site, see StackMemo).
  using Frame = UnwindFrame;
  bool capture(unsigned depth, CapturedStack* out, TraceCache* cache = nullptr, const Frame& start = Frame{},
               StackMemo* memo = nullptr) const;
  // The entry of `memo` that remembers the stack from `start` on with its
  // site named, still the same (every return address in its slot), or -1.
  int recall(StackMemo& memo, const Frame& start) const;
  const FrameTable& frame_table() const { return frames_; }
  void forget_frames() const {
    frames_.clear();
    generation_.fetch_add(1, std::memory_order_relaxed);
  }

 private:
  bool skipped(uintptr_t ip) const;
  // A replayed capture from `start` (raw[1]) into the memo: its entry, or -1.
  // `reported` frames of the `depth` asked for, from raw[first] on.
  int remember(StackMemo& memo, const Frame& start, const uintptr_t* raw, const uintptr_t* cfas, int got, int first,
               unsigned reported, unsigned depth, uintptr_t allocating_cfa) const;
  // The walk outwards from (return_address, cfa), capture()'s caller or
  // the start frame it was given, from the frame table: frames in raw[1..],
  // their CFAs in cfas[1..]; -1 when the table does not know a frame, the
  // first CFA is outside the thread's stack (or replaying is off).
  int replay(const Frame& from, uintptr_t* raw, uintptr_t* cfas, int capacity, const TraceCache& cache) const;
  void learn(const uintptr_t* raw, const uintptr_t* cfas, const uintptr_t* rbps, int walked, int got,
             bool outermost_reached, uintptr_t return_address, uintptr_t cfa) const;

  bool ready_ = false;
  void* backtrace_ = nullptr;  // unw_backtrace, or null for libgcc
  void* gcc_backtrace_ = nullptr;
  void* gcc_get_ip_ = nullptr;
  void* gcc_get_cfa_ = nullptr;
  void* gcc_get_ip_info_ = nullptr;
  void* gcc_get_gr_ = nullptr;
  mutable FrameTable frames_;
  // Off for good when a walk's first frames disagree with what capture()
  // sees of its own frame (the replay would start from the wrong place).
  mutable std::atomic<bool> replay_ok_{true};
  mutable std::atomic<uintptr_t> first_frame_{0};  // libgcc's frame 0: where capture() calls it
  mutable std::atomic<uint32_t> generation_{0};     // forget_frames() calls: older memo entries are void
  uintptr_t skip_[8][2] = {};
  unsigned skip_count_ = 0;
};

// The [low, high) text range of the loaded module containing `address`.
bool module_range_of(const void* address, uintptr_t range[2]);
// The same for the first loaded module whose path contains `name`.
bool module_range_named(const char* name, uintptr_t range[2]);

}  // namespace hotpool::reporter
