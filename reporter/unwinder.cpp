#include "unwinder.h"

#include <dlfcn.h>
#include <link.h>

#include <cstring>

namespace hotpool::reporter {

namespace {

struct RangeQuery {
  uintptr_t address;
  const char* name;
  uintptr_t* range;
  bool found;
};

int find_module(dl_phdr_info* info, size_t, void* data) {
  auto* query = static_cast<RangeQuery*>(data);
  if (query->name && !(info->dlpi_name && std::strstr(info->dlpi_name, query->name))) return 0;
  uintptr_t low = ~uintptr_t{0}, high = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& header = info->dlpi_phdr[i];
    if (header.p_type != PT_LOAD || !(header.p_flags & PF_X)) continue;
    const uintptr_t start = info->dlpi_addr + header.p_vaddr;
    if (start < low) low = start;
    if (start + header.p_memsz > high) high = start + header.p_memsz;
  }
  if (low >= high) return 0;
  if (!query->name && (query->address < low || query->address >= high)) return 0;
  query->range[0] = low;
  query->range[1] = high;
  query->found = true;
  return 1;
}
}  // namespace

bool module_range_of(const void* address, uintptr_t range[2]) {
  RangeQuery query{reinterpret_cast<uintptr_t>(address), nullptr, range, false};
  dl_iterate_phdr(find_module, &query);
  return query.found;
}

bool module_range_named(const char* name, uintptr_t range[2]) {
  RangeQuery query{0, name, range, false};
  dl_iterate_phdr(find_module, &query);
  return query.found;
}

bool Unwinder::load(bool use_libunwind) {
  if (use_libunwind) {
    void* library = dlopen("libunwind.so.8", RTLD_NOW | RTLD_LOCAL);
    if (!library) return false;
    backtrace_ = dlsym(library, "unw_backtrace");
    ready_ = backtrace_ != nullptr;
    return ready_;
  }
  // libgcc_s is loaded already (libhotpool.so needs it).
  gcc_backtrace_ = dlsym(RTLD_DEFAULT, "_Unwind_Backtrace");
  gcc_get_ip_ = dlsym(RTLD_DEFAULT, "_Unwind_GetIP");
  gcc_get_cfa_ = dlsym(RTLD_DEFAULT, "_Unwind_GetCFA");
  ready_ = gcc_backtrace_ && gcc_get_ip_;
  return ready_;
}

void Unwinder::set_skipped_ranges(const uintptr_t (*ranges)[2], unsigned count) {
  skip_count_ = count < 8 ? count : 8;
  for (unsigned i = 0; i < skip_count_; ++i) {
    skip_[i][0] = ranges[i][0];
    skip_[i][1] = ranges[i][1];
  }
}

bool Unwinder::skipped(uintptr_t ip) const {
  for (unsigned i = 0; i < skip_count_; ++i)
    if (ip >= skip_[i][0] && ip < skip_[i][1]) return true;
  return false;
}

namespace {
struct GccTrace {
  void** frames;
  uintptr_t* cfas;
  int capacity;
  int count;
  uintptr_t (*get_ip)(void*);
  uintptr_t (*get_cfa)(void*);
  const TraceCache* cache;  // the previous capture, or null
  unsigned scan;            // cache->cfas[scan] is the first not below this frame's
};

// Whether the previous capture's frames from `at` outwards are still
// this thread's: every return address still in its slot, every slot on
// the thread's stack above `floor`, in order.
bool cached_frames_intact(const TraceCache& cache, unsigned at, uintptr_t floor) {
  for (unsigned j = at; j < cache.count; ++j) {
    const uintptr_t cfa = cache.cfas[j];
    if (cfa <= floor || cfa > cache.stack_high || cfa - sizeof(uintptr_t) < cache.stack_low) return false;
    if (*reinterpret_cast<const uintptr_t*>(cfa - sizeof(uintptr_t)) != cache.ips[j]) return false;
    floor = cfa;
  }
  return true;
}

// _Unwind_Trace_Fn: one call per frame, innermost first.
int gcc_frame(void* context, void* arg) {
  auto* trace = static_cast<GccTrace*>(arg);
  if (trace->count == trace->capacity) return 5;  // _URC_END_OF_STACK
  const uintptr_t cfa = trace->get_cfa ? trace->get_cfa(context) : 0;
  const uintptr_t ip = trace->get_ip(context);
  if (ip == 0) return 5;  // the outermost frame's "return address": no frame
  trace->cfas[trace->count] = cfa;
  trace->frames[trace->count++] = reinterpret_cast<void*>(ip);
  if (const TraceCache* cache = trace->cache; cache && cfa) {
    // Both captures list frames outwards, CFAs rising: one pass over the
    // previous one finds where this frame would be in it.
    while (trace->scan < cache->count && cache->cfas[trace->scan] < cfa) ++trace->scan;
    const unsigned at = trace->scan;
    // A truncated previous capture serves only if it fills this one.
    const bool long_enough =
        !cache->truncated || trace->count + (cache->count - at - 1) >= static_cast<unsigned>(trace->capacity);
    if (at < cache->count && cache->cfas[at] == cfa && cache->ips[at] == ip && long_enough &&
        cached_frames_intact(*cache, at + 1, cfa)) {
      // The same frame, called from the same, unchanged frames: the rest
      // of the stack is the previous capture's.
      for (unsigned j = at + 1; j < cache->count && trace->count < trace->capacity; ++j) {
        trace->cfas[trace->count] = cache->cfas[j];
        trace->frames[trace->count++] = reinterpret_cast<void*>(cache->ips[j]);
      }
      return 5;
    }
  }
  return 0;  // _URC_NO_REASON
}
}  // namespace

bool Unwinder::capture(unsigned depth, CapturedStack* out, TraceCache* cache) const {
  out->depth = 0;
  out->cfa = 0;
  if (!ready_) return false;
  if (depth > kMaxDepth) depth = kMaxDepth;
  constexpr unsigned kLeading = kLeadingFrames;
  void* raw[kMaxDepth + kLeading];
  uintptr_t cfas[kMaxDepth + kLeading] = {};
  int got;
  if (backtrace_) {
    using Backtrace = int (*)(void**, int);
    got = reinterpret_cast<Backtrace>(backtrace_)(raw, static_cast<int>(depth + kLeading));
  } else {
    const bool cached = cache && gcc_get_cfa_ && cache->stack_high;
    // With a cache the whole stack is kept (up to kMaxDepth frames), not
    // only what this capture reports: a later capture that rejoins it
    // deeper down than this one did can still take its outer frames.
    GccTrace trace{raw,
                   cfas,
                   static_cast<int>(cached ? kMaxDepth + kLeading : depth + kLeading),
                   0,
                   reinterpret_cast<uintptr_t (*)(void*)>(gcc_get_ip_),
                   reinterpret_cast<uintptr_t (*)(void*)>(gcc_get_cfa_),
                   cached && cache->count ? cache : nullptr,
                   0};
    using Backtrace = int (*)(int (*)(void*, void*), void*);
    reinterpret_cast<Backtrace>(gcc_backtrace_)(gcc_frame, &trace);
    got = trace.count;
    if (cached) {
      cache->count = static_cast<unsigned>(got);
      cache->truncated = got == trace.capacity;
      for (int i = 0; i < got; ++i) {
        cache->ips[i] = reinterpret_cast<uintptr_t>(raw[i]);
        cache->cfas[i] = cfas[i];
      }
    }
  }
  int first = 0;
  while (first < got && skipped(reinterpret_cast<uintptr_t>(raw[first]))) ++first;
  // libgcc reports with each return address the canonical frame address of
  // the frame it returns from (the address above the slot that holds it):
  // the allocating function's own is the one that comes with its caller's.
  if (first + 1 < got) out->cfa = cfas[first + 1];
  for (int i = first; i < got && out->depth < depth; ++i) out->ips[out->depth++] = reinterpret_cast<uintptr_t>(raw[i]);
  return out->depth > 0;
}

bool allocating_frame_active(const uintptr_t* allocation, unsigned allocation_depth, const CapturedStack& now) {
  if (allocation_depth < 2) return false;
  // Find the frame of now that returns where the allocating function was
  // called from (allocation.ips[1]), and check the callers beyond agree.
  for (unsigned j = 1; j < now.depth; ++j) {
    if (now.ips[j] != allocation[1]) continue;
    bool same = true;
    for (unsigned k = 2; k < allocation_depth && j + k - 1 < now.depth && same; ++k)
      same = now.ips[j + k - 1] == allocation[k];
    if (same) return true;
  }
  return false;
}

}  // namespace hotpool::reporter
