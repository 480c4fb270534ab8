// Symbolization of return addresses, once, at report time: Boost.Stacktrace
// (function, and file:line where debug information exists), else the
// module and offset from dladdr. Allocates: call it under the recursion
// guard only.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hotpool::reporter {

// A function the compiler inlined at a return address's call: its name
// and the line in it (innermost first, see Symbol).
struct InlinedFrame {
  char function[192];
  char file[192];  // empty when unknown
  unsigned line;   // 0 when unknown
};

struct Symbol {
  char function[192];
  char file[192];   // empty when unknown
  unsigned line;    // 0 when unknown
  char module[128]; // the module's file name
  uintptr_t offset; // in the module
  // The functions inlined at this call, innermost first, from DWARF's
  // inlining records: the call was made from inlined[0], which was
  // inlined into inlined[1], ..., the last one into `function` (whose
  // `line` is then where that one was inlined). Empty without debug
  // information; at most kMaxInlined (the innermost ones).
  static constexpr unsigned kMaxInlined = 16;
  const InlinedFrame* inlined;
  unsigned inlined_count;
};

// `return_address` as captured: the symbol is looked up at the call
// instruction (return_address - 1). Results are cached per address and
// returned in place (a Symbol is over 500 bytes, and a report looks up
// tens of thousands of frames, most of them repeats): the pointer stays
// valid until the next call. The report's lock serializes calls. Lives in
// libhotpool-symbolize.so (Boost and the C++ runtime are loaded only when a
// report needs them).
const Symbol* symbolize_cached(uintptr_t return_address);

extern "C" {
using SymbolizeFunction = const Symbol* (*)(uintptr_t);
}

}  // namespace hotpool::reporter
