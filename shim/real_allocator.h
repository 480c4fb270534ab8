// The real allocator: a typed table of the functions hotpool interposes,
// resolved with dlsym(RTLD_NEXT, ...) so hotpool stacks on whatever comes
// next (glibc, or jemalloc/tcmalloc preloaded after us).
//
// dlsym itself may allocate before the table is filled; those requests are
// served from a small static buffer that free, realloc and
// malloc_usable_size recognise by address and never hand back to the real
// allocator.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hotpool::shim {

struct RealAllocator {
  void* (*malloc)(size_t);
  void (*free)(void*);
  void* (*calloc)(size_t, size_t);
  void* (*realloc)(void*, size_t);
  int (*posix_memalign)(void**, size_t, size_t);
  void* (*aligned_alloc)(size_t, size_t);
  void* (*memalign)(size_t, size_t);
  void* (*valloc)(size_t);
  void* (*pvalloc)(size_t);
  size_t (*malloc_usable_size)(void*);
  int (*malloc_trim)(size_t);

  // True when the real allocator is glibc's and its chunk header gives the
  // usable size directly (checked against malloc_usable_size at start-up).
  bool glibc_chunk_headers;
  // What the real realloc(p, 0) does: frees p and returns NULL (glibc,
  // jemalloc), or returns a fresh block of its smallest size (mimalloc).
  // hotpool's own blocks (pooled, sampled) do the same. Probed at start-up.
  bool realloc_zero_frees = true;

  // Fills every entry; false (with the entries it could not find left null)
  // when the next object in the lookup order lacks a required function.
  bool resolve();

  // Sets glibc_chunk_headers. Allocates and frees a few probe blocks.
  bool probe_chunk_headers();
  // Sets realloc_zero_frees: one malloc(1), its realloc to 0, and a free.
  void probe_realloc_zero();

  // FAST PATH: the usable size of a live block. glibc keeps it in the word
  // before the block (size | flags; mmapped chunks carry a 16-byte header,
  // others 8), so reading it is 4 instructions instead of a call into
  // malloc_usable_size, which also checks the next chunk's in-use bit, a
  // check that a block being freed or just allocated passes by definition.
  size_t usable_size(void* block) const {
    if (__builtin_expect(glibc_chunk_headers, 1)) {
      const size_t header = static_cast<const size_t*>(block)[-1];
      return (header & ~size_t{7}) - ((header & 2) ? 16 : 8);
    }
    return malloc_usable_size(block);
  }
  // FAST PATH of the recording paths: the usable size of a block of
  // glibc's heap (4 instructions: mmapped chunks need no fast path, being
  // beyond the direct class table unless the program lowered
  // M_MMAP_THRESHOLD), or SIZE_MAX, which the caller sends to its generic
  // path (usable_size) with the other sizes beyond that table.
  size_t heap_usable_size(void* block) const {
    // The flag first: another real allocator (jemalloc, tcmalloc) may put a
    // block at the start of a page whose predecessor is not mapped.
    if (__builtin_expect(!glibc_chunk_headers, 0)) return ~size_t{0};
    const size_t header = static_cast<const size_t*>(block)[-1];
    if (__builtin_expect(header & 2, 0)) return ~size_t{0};
    return (header & ~size_t{7}) - 8;
  }
};

// The bootstrap buffer. Allocation is a lock-free bump; memory is never
// reused, so it is zero when handed out.
namespace bootstrap {
inline constexpr size_t kCapacity = 256 * 1024;
// The word before every block: glibc's IS_MMAPPED bit, so that
// RealAllocator::heap_usable_size says "not a heap chunk".
inline constexpr size_t kNotAHeapChunk = 2;
// Hidden: read PC-relative, not through the GOT, on every free.
extern char g_buffer[kCapacity] __attribute__((visibility("hidden")));

inline bool owns(const void* p) {
  return static_cast<uintptr_t>(static_cast<const char*>(p) - g_buffer) < kCapacity;
}
void* allocate(size_t size, size_t alignment);  // nullptr when exhausted
size_t usable_size(const void* p);
}  // namespace bootstrap

}  // namespace hotpool::shim
