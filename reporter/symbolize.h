// Symbolization of return addresses, once, at report time: Boost.Stacktrace
// (function, and file:line where debug information exists), else the
// module and offset from dladdr. Allocates: call it under the recursion
// guard only.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hotpool::reporter {

struct Symbol {
  char function[192];
  char file[192];   // empty when unknown
  unsigned line;    // 0 when unknown
  char module[128]; // the module's file name
  uintptr_t offset; // in the module
};

// `return_address` as captured: the symbol is looked up at the call
// instruction (return_address - 1). Results are cached per address; the
// report's lock serializes calls. Lives in libhotpool-symbolize.so (Boost
// and the C++ runtime are loaded only when a report needs them).
void symbolize_cached(uintptr_t return_address, Symbol* out);

extern "C" {
using SymbolizeFunction = void (*)(uintptr_t, Symbol*);
}

}  // namespace hotpool::reporter
