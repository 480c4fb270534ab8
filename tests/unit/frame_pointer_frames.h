// Stack captures from code built with frame pointers
// (-fno-omit-frame-pointer, frame_pointer_frames.cpp), for the unwinder's
// tests in sites_test.cpp.
#pragma once

#include "reporter/unwinder.h"

#include <cstddef>

namespace unwinding {

// One stack captured twice from one call site: without the trace cache
// (libgcc's full walk) and with it (replayed when the frame table knows it).
struct Captures {
  hotpool::reporter::CapturedStack full, cached;
};

// Built with frame pointers: a recursion of `depth` calls, each frame
// `bytes` bytes larger (alloca) than a plain one, that captures at its
// bottom (from a function with a frame pointer of its own, for `bytes` > 0
// one of varying size too).
unsigned frame_pointer_recurse_and_capture(const hotpool::reporter::Unwinder& unwinder,
                                           hotpool::reporter::TraceCache& cache, unsigned depth, size_t bytes,
                                           unsigned frames, Captures& out);

}  // namespace unwinding
