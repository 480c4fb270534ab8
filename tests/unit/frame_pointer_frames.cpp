// Compiled with -fno-omit-frame-pointer (CMakeLists.txt): every function
// here keeps %rbp as its frame pointer, as code of distributions built
// that way, Rust's standard library or Go does.
#include "frame_pointer_frames.h"

#include <alloca.h>

namespace unwinding {

namespace {
// The entry (as the allocator's): both captures, from here. Its caller's
// %rbp is the one its own prologue saved, at its frame pointer.
__attribute__((noinline)) void capture_at_entry(const hotpool::reporter::Unwinder& unwinder,
                                                hotpool::reporter::TraceCache& cache, unsigned frames, bool give_rbp,
                                                Captures& out) {
  hotpool::reporter::UnwindFrame start{reinterpret_cast<uintptr_t>(__builtin_return_address(0)),
                                       reinterpret_cast<uintptr_t>(__builtin_dwarf_cfa())};
  if (give_rbp) {
    start.rbp = *static_cast<const uintptr_t*>(__builtin_frame_address(0));
    start.rbp_known = true;
  }
  unwinder.capture(frames, &out.full, nullptr);
  unwinder.capture(frames, &out.cached, &cache, start);
  out.start = start.return_address;
  asm volatile("" ::: "memory");
}
}  // namespace

__attribute__((noinline)) unsigned frame_pointer_recurse_and_capture(const hotpool::reporter::Unwinder& unwinder,
                                                                     hotpool::reporter::TraceCache& cache,
                                                                     unsigned depth, size_t bytes, unsigned frames,
                                                                     bool give_rbp, Captures& out) {
  // A frame of `bytes` more each time it is called with another size.
  volatile char* buffer = static_cast<volatile char*>(alloca(bytes + 1));
  buffer[0] = 0;
  if (depth == 0) {
    capture_at_entry(unwinder, cache, frames, give_rbp, out);
    return buffer[0];
  }
  const unsigned below = frame_pointer_recurse_and_capture(unwinder, cache, depth - 1, bytes, frames, give_rbp, out);
  asm volatile("" ::: "memory");
  return below + 1 + buffer[0];
}

}  // namespace unwinding
