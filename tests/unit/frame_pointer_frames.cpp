// Compiled with -fno-omit-frame-pointer (CMakeLists.txt): every function
// here keeps %rbp as its frame pointer, as code of distributions built
// that way, Rust's standard library or Go does.
#include "frame_pointer_frames.h"

#include <alloca.h>

namespace unwinding {

namespace {
// The capture itself, from a frame of its own (fixed size): its caller's
// frame may vary.
__attribute__((noinline)) void capture_both(const hotpool::reporter::Unwinder& unwinder,
                                            hotpool::reporter::TraceCache& cache, unsigned frames, Captures& out) {
  for (int with_cache = 0; with_cache < 2; ++with_cache)
    unwinder.capture(frames, with_cache ? &out.cached : &out.full, with_cache ? &cache : nullptr);
  asm volatile("" ::: "memory");
}
}  // namespace

__attribute__((noinline)) unsigned frame_pointer_recurse_and_capture(const hotpool::reporter::Unwinder& unwinder,
                                                                     hotpool::reporter::TraceCache& cache,
                                                                     unsigned depth, size_t bytes, unsigned frames,
                                                                     Captures& out) {
  // A frame of `bytes` more each time it is called with another size.
  volatile char* buffer = static_cast<volatile char*>(alloca(bytes + 1));
  buffer[0] = 0;
  if (depth == 0) {
    capture_both(unwinder, cache, frames, out);
    return buffer[0];
  }
  const unsigned below = frame_pointer_recurse_and_capture(unwinder, cache, depth - 1, bytes, frames, out);
  asm volatile("" ::: "memory");
  return below + 1 + buffer[0];
}

}  // namespace unwinding
