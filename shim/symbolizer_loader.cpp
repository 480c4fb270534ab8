// Finds libhotpool-symbolize.so beside libhotpool.so and loads it at the
// first report (RTLD_LOCAL: nothing of Boost or the C++ runtime enters the
// program's scope). Without it, frames get the module and offset, and the
// function name when dladdr() knows it.
#include <dlfcn.h>
#include <limits.h>
#include <link.h>

#include <cstring>

#include "reporter/symbolize.h"
#include "symbolizer_loader.h"

namespace hotpool::shim {

namespace {
constinit reporter::SymbolizeFunction g_symbolize = nullptr;
constinit bool g_tried = false;

void copy(char* out, size_t size, const char* text) {
  size_t n = std::strlen(text);
  if (n >= size) n = size - 1;
  std::memcpy(out, text, n);
  out[n] = '\0';
}

const reporter::Symbol* symbolize_with_dladdr(uintptr_t return_address) {
  static reporter::Symbol symbol;
  reporter::Symbol* out = &symbol;
  *out = reporter::Symbol{};
  const uintptr_t call = return_address - 1;
  Dl_info info{};
  copy(out->function, sizeof(out->function), "??");
  if (dladdr(reinterpret_cast<void*>(call), &info) && info.dli_fname) {
    const char* slash = std::strrchr(info.dli_fname, '/');
    copy(out->module, sizeof(out->module), slash ? slash + 1 : info.dli_fname);
    out->offset = call - reinterpret_cast<uintptr_t>(info.dli_fbase);
    if (info.dli_sname) copy(out->function, sizeof(out->function), info.dli_sname);
  }
  return out;
}

int count_module(dl_phdr_info*, size_t, void* data) {
  ++*static_cast<unsigned*>(data);
  return 0;
}
}  // namespace

const reporter::Symbol* symbolize(uintptr_t return_address) {
  if (!g_tried) {
    g_tried = true;
    // The modules loaded now are those the captured stacks can point into
    // (but for unloaded ones); what the dlopen() below adds may take the
    // place of an unloaded library, and must not be named for its frames.
    // The loader appends new modules to the list it iterates.
    unsigned modules = 0;
    dl_iterate_phdr(count_module, &modules);
    Dl_info self{};
    char path[PATH_MAX];
    if (dladdr(reinterpret_cast<void*>(&symbolize), &self) && self.dli_fname) {
      copy(path, sizeof(path) - 32, self.dli_fname);
      char* slash = std::strrchr(path, '/');
      std::strcpy(slash ? slash + 1 : path, "libhotpool-symbolize.so");
      if (void* module = dlopen(path, RTLD_NOW | RTLD_LOCAL)) {
        auto known = reinterpret_cast<void (*)(unsigned)>(dlsym(module, "hotpool_symbolize_known_modules"));
        g_symbolize = reinterpret_cast<reporter::SymbolizeFunction>(dlsym(module, "hotpool_symbolize_address"));
        if (known) known(modules);
        else g_symbolize = nullptr;
      }
    }
  }
  return g_symbolize ? g_symbolize(return_address) : symbolize_with_dladdr(return_address);
}

}  // namespace hotpool::shim
