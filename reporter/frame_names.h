// How the text report names a site's frames, so that a person sees the
// code that asked for the memory rather than the library path it took:
// functions without their template arguments, parameter lists and return
// types (pprof's simplified names), and the frames of system headers and
// the C and C++ runtime libraries told apart (the text report folds them
// when they come first: a std::vector's push_back, its allocator traits,
// std::__new_allocator::allocate...). The JSON report keeps the full names.
//
// Layering: no knowledge of the shim; no allocation.
#pragma once

#include <cstddef>

namespace hotpool::reporter {

// `name` (as demangled) without template arguments, parameter lists,
// qualifiers after them (const, &, [clone .isra.0]) and a return type in
// front: "std::vector<int, std::allocator<int> >::push_back(int const&)"
// is "std::vector::push_back". Kept whole: operator names ("operator()",
// "operator<<", "operator new"), "(anonymous namespace)", "<lambda>",
// "{lambda()#1}" as "{lambda#1}". A name cut short (unbalanced brackets)
// keeps what precedes the open bracket. Writes at most `capacity` bytes,
// the terminating NUL included, and returns the length; `name` itself
// when nothing would be left.
size_t short_function_name(const char* name, char* out, size_t capacity);

// A frame of the C or C++ runtime or of a system header: its module (a
// file name) libc, libm, libstdc++, libc++, libc++abi or libgcc_s, or its
// source file under /usr/include/, under any include/c++/ directory, or in
// libstdc++'s own sources (an inlined std::vector::push_back).
bool is_library_frame(const char* file, const char* module);

}  // namespace hotpool::reporter
