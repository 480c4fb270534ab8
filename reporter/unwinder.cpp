#include "unwinder.h"

#include <dlfcn.h>
#include <link.h>
#include <libunwind.h>

#include <cstring>

namespace hotpool::reporter {

namespace {
// libunwind's local-only entry points (what unw_* map to under
// UNW_LOCAL_ONLY), resolved from the dlopen()ed library.
using InitLocal = int (*)(unw_cursor_t*, unw_context_t*);
using Step = int (*)(unw_cursor_t*);
using GetReg = int (*)(unw_cursor_t*, unw_regnum_t, unw_word_t*);
using GetContext = int (*)(unw_context_t*);

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

bool Unwinder::load() {
  void* library = dlopen("libunwind.so.8", RTLD_NOW | RTLD_LOCAL);
  if (!library) return false;
  init_local_ = dlsym(library, "_ULx86_64_init_local");
  step_ = dlsym(library, "_ULx86_64_step");
  get_reg_ = dlsym(library, "_ULx86_64_get_reg");
  getcontext_ = dlsym(library, "_Ux86_64_getcontext");
  ready_ = init_local_ && step_ && get_reg_ && getcontext_;
  // Per-thread caches: the global cache is guarded by a lock that a fork()
  // in another thread could leave held forever in the child.
  using SetCachingPolicy = int (*)(unw_addr_space_t, unw_caching_policy_t);
  auto set_policy = reinterpret_cast<SetCachingPolicy>(dlsym(library, "_ULx86_64_set_caching_policy"));
  auto* address_space = static_cast<unw_addr_space_t*>(dlsym(library, "_ULx86_64_local_addr_space"));
  if (!set_policy || !address_space || set_policy(*address_space, UNW_CACHE_PER_THREAD) != 0) ready_ = false;
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

bool Unwinder::capture(unsigned depth, CapturedStack* out) const {
  out->depth = 0;
  out->anchor = FrameAnchor{0, 0};
  if (!ready_) return false;
  if (depth > kMaxDepth) depth = kMaxDepth;
  unw_context_t context;
  unw_cursor_t cursor;
  if (reinterpret_cast<GetContext>(getcontext_)(&context) != 0) return false;
  if (reinterpret_cast<InitLocal>(init_local_)(&cursor, &context) != 0) return false;
  const auto step = reinterpret_cast<Step>(step_);
  const auto get_reg = reinterpret_cast<GetReg>(get_reg_);
  // Leading frames in hotpool, the C++ runtime or libc: not the program's.
  bool leading = true;
  bool want_anchor = true;
  while (step(&cursor) > 0) {
    unw_word_t ip = 0, sp = 0;
    get_reg(&cursor, UNW_REG_IP, &ip);
    get_reg(&cursor, UNW_REG_SP, &sp);
    if (ip == 0) break;
    if (leading && skipped(ip)) continue;
    if (!leading && want_anchor) {
      // The level above the allocating function: its SP is the allocating
      // frame's CFA, its IP the allocating frame's return address.
      out->anchor = FrameAnchor{sp, ip};
      want_anchor = false;
    }
    leading = false;
    if (out->depth < depth) out->ips[out->depth++] = ip;
    else if (!want_anchor) break;
  }
  return out->depth > 0;
}

}  // namespace hotpool::reporter
