#include "real_allocator.h"

#include <dlfcn.h>

#include <atomic>

namespace hotpool::shim {

namespace bootstrap {

alignas(64) char g_buffer[kCapacity];
static std::atomic<size_t> g_used{0};

// Each block is preceded by a 16-byte header: its size, then a word with
// glibc's "mmapped" bit (2) set, where glibc's chunk header would be, so
// that the recording free path's chunk-header read sends the block to the
// generic path (see free), never taking it for a block of glibc's heap.
void* allocate(size_t size, size_t alignment) {
  if (alignment < 16) alignment = 16;
  if (size > kCapacity || alignment > kCapacity / 4) return nullptr;
  size_t used = g_used.load(std::memory_order_relaxed);
  for (;;) {
    const size_t start = (used + 16 + alignment - 1) & ~(alignment - 1);
    const size_t end = start + ((size + 15) & ~size_t{15});
    if (end > kCapacity) return nullptr;
    if (g_used.compare_exchange_weak(used, end, std::memory_order_relaxed)) {
      *reinterpret_cast<size_t*>(g_buffer + start - 16) = size;
      *reinterpret_cast<size_t*>(g_buffer + start - 8) = kNotAHeapChunk;
      return g_buffer + start;
    }
  }
}

size_t usable_size(const void* p) {
  return *reinterpret_cast<const size_t*>(static_cast<const char*>(p) - 16);
}

}  // namespace bootstrap

bool RealAllocator::resolve() {
  bool complete = true;
  auto find = [&complete](auto& entry, const char* name, bool required) {
    entry = reinterpret_cast<std::remove_reference_t<decltype(entry)>>(dlsym(RTLD_NEXT, name));
    if (!entry && required) complete = false;
  };
  find(malloc, "malloc", true);
  find(free, "free", true);
  find(calloc, "calloc", true);
  find(realloc, "realloc", true);
  find(posix_memalign, "posix_memalign", true);
  find(aligned_alloc, "aligned_alloc", true);
  find(memalign, "memalign", true);
  find(valloc, "valloc", true);
  find(pvalloc, "pvalloc", false);             // not every allocator has it
  find(malloc_usable_size, "malloc_usable_size", true);
  find(malloc_trim, "malloc_trim", false);     // glibc only
  glibc_chunk_headers = false;  // probe_chunk_headers() decides, when recording
  return complete;
}

bool RealAllocator::probe_chunk_headers() {
  // Only glibc's own malloc, not jemalloc or tcmalloc stacked after us.
  if (reinterpret_cast<void*>(malloc) != dlsym(RTLD_NEXT, "__libc_malloc")) return false;
  // And only if the header agrees with malloc_usable_size for every kind of
  // chunk: tiny, small, large (below the 128 KiB default mmap threshold) and
  // mmapped. The mmapped probe is above 32 MiB on purpose: glibc raises its
  // mmap threshold when it frees an mmapped chunk of up to 32 MiB, which
  // would change the program's memory behaviour; above that it does not.
  // The 64 MiB are reserved, never touched but for the header page.
  for (size_t size : {size_t{0}, size_t{1}, size_t{24}, size_t{25}, size_t{1000}, size_t{70000},
                      size_t{64} << 20}) {
    void* block = malloc(size);
    if (!block) return false;
    glibc_chunk_headers = true;
    const size_t from_header = usable_size(block);
    glibc_chunk_headers = false;
    const bool agrees = from_header == malloc_usable_size(block);
    free(block);
    if (!agrees) return false;
  }
  return true;
}

void RealAllocator::probe_realloc_zero() {
  void* block = malloc(1);
  if (!block) return;
  void* after = realloc(block, 0);
  realloc_zero_frees = after == nullptr;
  if (after) free(after);
}

}  // namespace hotpool::shim
