#define BOOST_STACKTRACE_LINK
#define BOOST_STACKTRACE_USE_BACKTRACE
#include "symbolize.h"

#include <dlfcn.h>
#include <sys/mman.h>

#include <boost/stacktrace/frame.hpp>
#include <cstring>
#include <string>

namespace hotpool::reporter {

namespace {
void copy(char* out, size_t size, const char* text) {
  size_t n = std::strlen(text);
  if (n >= size) n = size - 1;
  std::memcpy(out, text, n);
  out[n] = '\0';
}
}  // namespace

namespace {
// Symbolizing is slow (libbacktrace reads DWARF): each address once per
// process, in a table of our own memory.
constexpr size_t kCacheSlots = 8192;
struct CacheEntry {
  uintptr_t address;
  Symbol symbol;
};
CacheEntry* g_cache = nullptr;

CacheEntry* cache_slot(uintptr_t address) {
  if (!g_cache) {
    void* memory = mmap(nullptr, kCacheSlots * sizeof(CacheEntry), PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED) return nullptr;
    g_cache = static_cast<CacheEntry*>(memory);
  }
  size_t index = (address * 0x9e3779b97f4a7c15ull) >> 51;  // 13 bits
  for (size_t probe = 0; probe < 16; ++probe, index = (index + 1) % kCacheSlots) {
    CacheEntry& entry = g_cache[index];
    if (entry.address == address || entry.address == 0) return &entry;
  }
  return nullptr;  // full here: symbolize without caching
}

void symbolize_uncached(uintptr_t return_address, Symbol* out);
}  // namespace

void symbolize_cached(uintptr_t return_address, Symbol* out) {
  CacheEntry* entry = cache_slot(return_address);
  if (entry && entry->address == return_address) {
    *out = entry->symbol;
    return;
  }
  symbolize_uncached(return_address, out);
  if (entry) {
    entry->symbol = *out;
    entry->address = return_address;
  }
}

namespace {
void symbolize_uncached(uintptr_t return_address, Symbol* out) {
  *out = Symbol{};
  const uintptr_t call = return_address - 1;
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(call), &info) && info.dli_fname) {
    const char* slash = std::strrchr(info.dli_fname, '/');
    copy(out->module, sizeof(out->module), slash ? slash + 1 : info.dli_fname);
    out->offset = call - reinterpret_cast<uintptr_t>(info.dli_fbase);
  }
  const boost::stacktrace::frame frame(reinterpret_cast<boost::stacktrace::frame::native_frame_ptr_t>(call));
  const std::string name = frame.name();
  copy(out->function, sizeof(out->function), name.empty() ? "??" : name.c_str());
  const std::string file = frame.source_file();
  copy(out->file, sizeof(out->file), file.c_str());
  out->line = static_cast<unsigned>(frame.source_line());
}
}  // namespace

}  // namespace hotpool::reporter

// The entry point of libhotpool-symbolize.so, which libhotpool.so loads
// with dlopen() at its first report (see shim/symbolizer_loader.cpp).
extern "C" __attribute__((visibility("default"))) void hotpool_symbolize_address(uintptr_t return_address,
                                                                                  hotpool::reporter::Symbol* out) {
  hotpool::reporter::symbolize_cached(return_address, out);
}
