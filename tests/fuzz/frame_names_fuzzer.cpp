// libFuzzer target for the text report's function names and library test
// (reporter/frame_names.cpp), which run in the program's process at exit
// on whatever the symbolizer found: any bytes as a demangled name, a file
// and a module.
//
// What must hold, whatever the bytes:
//   - nothing crashes, reads out of bounds or overflows (ASan, UBSan);
//   - the short name is NUL-terminated, of the length returned, within the
//     capacity given (from 1 byte up), and never longer than the name;
//   - a name of identifier characters and "::" alone is its own short name;
//   - the short name of a short name is itself, when the first kept no
//     bracket or space (a name that still has one, an unbalanced one cut
//     short or an operator's, may be read otherwise the second time).
#include "reporter/frame_names.h"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

[[noreturn]] void fail(const char* what, const std::string& detail) {
  std::fprintf(stderr, "frame_names_fuzzer: %s: '%s'\n", what, detail.c_str());
  std::abort();
}

bool plain(const std::string& name) {
  for (char c : name) {
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == ':'))
      return false;
  }
  return !name.empty();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string name(reinterpret_cast<const char*>(data), size);
  const char* text = name.c_str();  // up to its first NUL
  const size_t length = std::strlen(text);
  for (size_t capacity : {size_t{1}, size_t{2}, size_t{8}, size_t{192}, length + 1}) {
    std::string out(capacity + 16, '\x7f');
    const size_t got = hotpool::reporter::short_function_name(text, out.data(), capacity);
    if (got >= capacity) fail("short name does not fit its capacity", name);
    if (out[got] != '\0' || std::strlen(out.c_str()) != got) fail("short name's length is not the one returned", name);
    for (size_t i = capacity; i < out.size(); ++i)
      if (out[i] != '\x7f') fail("short name written past its capacity", name);
    if (got > length) fail("short name longer than the name", name);
  }
  std::string out(length + 1, '\0');
  hotpool::reporter::short_function_name(text, out.data(), out.size());
  const std::string once(out.c_str());
  if (plain(std::string(text)) && once != text) fail("a plain name changed", name);
  if (once.find_first_of("<>() ") == std::string::npos) {
    std::string twice(once.size() + 1, '\0');
    hotpool::reporter::short_function_name(once.c_str(), twice.data(), twice.size());
    if (std::string(twice.c_str()) != once) fail("the short name of a short name changed", name);
  }
  // The library test on the same bytes as a file and as a module name.
  (void)hotpool::reporter::is_library_frame(text, text);
  (void)hotpool::reporter::is_library_frame(text, nullptr);
  (void)hotpool::reporter::is_library_frame("", text);
  return 0;
}
