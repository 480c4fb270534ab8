// Touching fresh memory for writing, before anything reads it.
//
// The first access to a page of private anonymous memory (mmap'd, never
// written) decides its fault: a write gets a zeroed page of its own; a
// read maps the kernel's shared zero page, and the first write after that
// copies it and flushes the page's stale translation from every CPU the
// process runs on (an inter-processor interrupt each; in a virtual
// machine, an exit to the hypervisor). Code whose first access to a field
// is a read (a count compared with zero, a key looked up) pays the second
// kind; touching its pages for writing first turns it into the first.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hotpool::reporter {

// Every page of [begin, begin + bytes): an atomic OR of zero into one byte
// (a write that changes nothing, also where another thread writes the
// same byte meanwhile). 4 KiB steps: larger pages are touched more than
// once, to no harm.
inline void touch_pages_for_write(const void* begin, size_t bytes) {
  if (bytes == 0) return;
  constexpr uintptr_t kStep = 4096;
  const auto first = reinterpret_cast<uintptr_t>(begin);
  const uintptr_t end = first + bytes;
  for (uintptr_t page = first & ~(kStep - 1); page < end; page += kStep) {
    // The page's first byte inside the range (the range may start mid-page).
    auto* byte = reinterpret_cast<unsigned char*>(page < first ? first : page);
    __atomic_fetch_or(byte, static_cast<unsigned char>(0), __ATOMIC_RELAXED);
  }
}

}  // namespace hotpool::reporter
