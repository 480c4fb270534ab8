// Stack captures from code built with frame pointers
// (-fno-omit-frame-pointer, frame_pointer_frames.cpp), for the unwinder's
// tests in sites_test.cpp.
#pragma once

#include "reporter/unwinder.h"

#include <cstddef>
#include <cstdint>

namespace unwinding {

// One stack captured twice: without the trace cache (libgcc's full walk)
// and with it (replayed when the frame table knows it), from a start frame
// as the allocator's entry gives one: `start` is its return address (into
// the function that called the entry).
struct Captures {
  hotpool::reporter::CapturedStack full, cached;
  uintptr_t start = 0;
};

// Built with frame pointers: a recursion of `depth` calls, each frame
// `bytes` bytes larger (alloca) than a plain one, whose innermost frame
// calls an entry function that captures. The entry gives the capture its
// caller's %rbp when `give_rbp` (as hotpool's allocator entry does), else
// only its return address and CFA.
unsigned frame_pointer_recurse_and_capture(const hotpool::reporter::Unwinder& unwinder,
                                           hotpool::reporter::TraceCache& cache, unsigned depth, size_t bytes,
                                           unsigned frames, bool give_rbp, Captures& out);

}  // namespace unwinding
