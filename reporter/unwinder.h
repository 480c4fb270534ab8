// Stack capture with libunwind, for sampled allocations only.
//
// libunwind.so.8 is loaded with dlopen(RTLD_LOCAL) at start-up instead of
// being linked: linked into a preloaded library, its _Unwind_* and
// backtrace() symbols would enter the program's global scope and replace
// libgcc's exception unwinder and glibc's backtrace() for the whole program.
// Never called with a hotpool lock held: libunwind walks the loaded modules
// under the loader's lock, and the loader may be inside malloc.
#pragma once

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
// those slots stay inside [stack_low, stack_high), the thread's stack.
struct TraceCache {
  unsigned count;
  bool truncated;  // the stack went on beyond ips[count - 1]
  uintptr_t stack_low, stack_high;
  uintptr_t ips[kMaxDepth + kLeadingFrames];
  uintptr_t cfas[kMaxDepth + kLeadingFrames];  // with ips[i]: the address above the slot holding it
};

struct CapturedStack {
  unsigned depth;            // frames in ips, outermost last
  uintptr_t cfa;             // the allocating function's canonical frame address, 0 if unknown
  uintptr_t ips[kMaxDepth];  // return addresses (the first: inside the allocating function)
};

// True when the function that made an allocation (whose stack was
// `allocation`) is still active in `now`, a stack captured later on the
// same thread: the allocating function's callers, allocation[1..], are the
// outer end of `now` below some frame. Return addresses name call sites, so the same
// function called again from the same site in between reads as the same
// activation: the one case this cannot tell apart.
bool allocating_frame_active(const uintptr_t* allocation, unsigned allocation_depth, const CapturedStack& now);

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

  // Captures up to `depth` frames above the allocator, with libunwind's
  // unw_backtrace (its per-thread trace cache: no lock, no signal mask
  // change). Returns false when nothing was captured.
  // `cache` (libgcc only, may be null): the thread's previous capture,
  // used and then replaced; never shared between threads or with a signal
  // handler that interrupts the capture.
  bool capture(unsigned depth, CapturedStack* out, TraceCache* cache = nullptr) const;

 private:
  bool skipped(uintptr_t ip) const;

  bool ready_ = false;
  void* backtrace_ = nullptr;  // unw_backtrace, or null for libgcc
  void* gcc_backtrace_ = nullptr;
  void* gcc_get_ip_ = nullptr;
  void* gcc_get_cfa_ = nullptr;
  uintptr_t skip_[8][2] = {};
  unsigned skip_count_ = 0;
};

// The [low, high) text range of the loaded module containing `address`.
bool module_range_of(const void* address, uintptr_t range[2]);
// The same for the first loaded module whose path contains `name`.
bool module_range_named(const char* name, uintptr_t range[2]);

}  // namespace hotpool::reporter
