// RTLD_DEEPBIND: a library opened with it looks symbols up in itself and
// its own dependencies before the global scope, so its malloc, free, ...
// bind to libc's, not to the preloaded libhotpool.so. A block hotpool
// handed out (from a pool, or a sampled one) that such a library frees
// would then reach glibc's free, which aborts. So after a dlopen with
// RTLD_DEEPBIND, the GOT slots of the malloc family in every object that
// dlopen loaded are pointed at hotpool's functions, the binding a normal
// dlopen gives; the library's other symbols keep their deep binding.
//
// dlopen looks at its caller to search the caller's RUNPATH (and to pick
// its namespace): as hotpool's dlopen calls the real one, a bare file name
// opened with RTLD_DEEPBIND is first searched for in the caller's search
// path (dlinfo RTLD_DI_SERINFO) and opened by its path. Every other dlopen
// goes straight to the real one, by a tail call that leaves its caller
// as it was.
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <malloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "runtime.h"

namespace hotpool::shim {

namespace {

using DlopenFunction = void* (*)(const char*, int);

void* missing_dlopen(const char*, int) { return nullptr; }

int count_object(dl_phdr_info*, size_t, void* data) {
  ++*static_cast<unsigned*>(data);
  return 0;
}

struct Replacement {
  const char* name;
  void* function;
};

struct PatchWalk {
  unsigned skip;        // objects loaded before the dlopen
  unsigned index;
  const Replacement* replacements;
  unsigned count;
  uintptr_t own_text;   // an address in libhotpool.so
  unsigned patched;
};

// Entries of the dynamic section hold addresses that the loader has
// relocated in place, except where the section is read-only (the vDSO).
uintptr_t dynamic_address(uintptr_t base, ElfW(Addr) value) { return value < base ? base + value : value; }

bool contains_text(const dl_phdr_info* info, uintptr_t address) {
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& header = info->dlpi_phdr[i];
    if (header.p_type != PT_LOAD) continue;
    const uintptr_t start = info->dlpi_addr + header.p_vaddr;
    if (address >= start && address < start + header.p_memsz) return true;
  }
  return false;
}

void write_slot(const dl_phdr_info* info, uintptr_t slot, void* function) {
  auto* word = reinterpret_cast<void**>(slot);
  if (__atomic_load_n(word, __ATOMIC_RELAXED) == function) return;
  // Slots under PT_GNU_RELRO were made read-only once relocated.
  bool relro = false;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& header = info->dlpi_phdr[i];
    const uintptr_t start = info->dlpi_addr + header.p_vaddr;
    if (header.p_type == PT_GNU_RELRO && slot >= start && slot < start + header.p_memsz) relro = true;
  }
  const uintptr_t page_size = static_cast<uintptr_t>(getpagesize());
  void* page = reinterpret_cast<void*>(slot & ~(page_size - 1));
  if (relro && mprotect(page, page_size, PROT_READ | PROT_WRITE) != 0) return;
  __atomic_store_n(word, function, __ATOMIC_RELEASE);
  if (relro) mprotect(page, page_size, PROT_READ);
}

void patch_relocations(const dl_phdr_info* info, const ElfW(Rela)* table, size_t bytes, const ElfW(Sym)* symbols,
                       const char* strings, size_t strings_size, PatchWalk& walk) {
  if (!table || !symbols || !strings) return;
  for (size_t i = 0; i < bytes / sizeof(ElfW(Rela)); ++i) {
    const ElfW(Rela)& relocation = table[i];
    const unsigned type = ELF64_R_TYPE(relocation.r_info);
    if (type != R_X86_64_JUMP_SLOT && type != R_X86_64_GLOB_DAT) continue;
    const ElfW(Sym)& symbol = symbols[ELF64_R_SYM(relocation.r_info)];
    if (symbol.st_shndx != SHN_UNDEF || symbol.st_name >= strings_size) continue;  // its own definition: not ours
    const char* name = strings + symbol.st_name;
    for (unsigned r = 0; r < walk.count; ++r) {
      if (std::strcmp(name, walk.replacements[r].name) != 0) continue;
      write_slot(info, info->dlpi_addr + relocation.r_offset, walk.replacements[r].function);
      ++walk.patched;
      break;
    }
  }
}

int patch_object(dl_phdr_info* info, size_t, void* data) {
  auto& walk = *static_cast<PatchWalk*>(data);
  if (walk.index++ < walk.skip) return 0;
  if (contains_text(info, walk.own_text)) return 0;
  const ElfW(Dyn)* dynamic = nullptr;
  for (int i = 0; i < info->dlpi_phnum; ++i)
    if (info->dlpi_phdr[i].p_type == PT_DYNAMIC)
      dynamic = reinterpret_cast<const ElfW(Dyn)*>(info->dlpi_addr + info->dlpi_phdr[i].p_vaddr);
  if (!dynamic) return 0;
  const uintptr_t base = info->dlpi_addr;
  const ElfW(Sym)* symbols = nullptr;
  const char* strings = nullptr;
  size_t strings_size = 0, rela_bytes = 0, plt_bytes = 0;
  const ElfW(Rela)* rela = nullptr;
  const ElfW(Rela)* plt = nullptr;
  bool plt_is_rela = true;
  for (const ElfW(Dyn)* entry = dynamic; entry->d_tag != DT_NULL; ++entry) {
    switch (entry->d_tag) {
      case DT_SYMTAB: symbols = reinterpret_cast<const ElfW(Sym)*>(dynamic_address(base, entry->d_un.d_ptr)); break;
      case DT_STRTAB: strings = reinterpret_cast<const char*>(dynamic_address(base, entry->d_un.d_ptr)); break;
      case DT_STRSZ: strings_size = entry->d_un.d_val; break;
      case DT_RELA: rela = reinterpret_cast<const ElfW(Rela)*>(dynamic_address(base, entry->d_un.d_ptr)); break;
      case DT_RELASZ: rela_bytes = entry->d_un.d_val; break;
      case DT_JMPREL: plt = reinterpret_cast<const ElfW(Rela)*>(dynamic_address(base, entry->d_un.d_ptr)); break;
      case DT_PLTRELSZ: plt_bytes = entry->d_un.d_val; break;
      case DT_PLTREL: plt_is_rela = entry->d_un.d_val == DT_RELA; break;
      default: break;
    }
  }
  patch_relocations(info, rela, rela_bytes, symbols, strings, strings_size, walk);
  if (plt_is_rela) patch_relocations(info, plt, plt_bytes, symbols, strings, strings_size, walk);
  return 0;
}

// The caller's search path for a bare file name, as dlopen would search
// it for that caller; the path found, into `out`, or false.
bool find_for_caller(const void* caller, const char* file, char* out, size_t size) {
  Dl_info info;
  void* map = nullptr;
  if (!dladdr1(caller, &info, &map, RTLD_DL_LINKMAP) || !map) return false;
  Dl_serinfo probe;
  if (dlinfo(map, RTLD_DI_SERINFOSIZE, &probe) != 0 || probe.dls_size < sizeof(Dl_serinfo)) return false;
  auto* paths = static_cast<Dl_serinfo*>(std::malloc(probe.dls_size));  // under the guard: the real malloc
  if (!paths) return false;
  bool found = false;
  paths->dls_size = probe.dls_size;
  paths->dls_cnt = probe.dls_cnt;
  if (dlinfo(map, RTLD_DI_SERINFOSIZE, paths) == 0 && dlinfo(map, RTLD_DI_SERINFO, paths) == 0) {
    for (unsigned i = 0; i < paths->dls_cnt && !found; ++i) {
      const char* directory = paths->dls_serpath[i].dls_name;
      const size_t length = std::strlen(directory);
      if (length + 1 + std::strlen(file) + 1 > size) continue;
      std::memcpy(out, directory, length);
      out[length] = '/';
      std::strcpy(out + length + 1, file);
      found = access(out, F_OK) == 0;
    }
  }
  std::free(paths);
  return found;
}

}  // namespace

DlopenFunction real_dlopen() {
  // Resolved on first use: the program may call dlopen before hotpool boots.
  static std::atomic<DlopenFunction> next{nullptr};
  DlopenFunction call = next.load(std::memory_order_acquire);
  if (!call) {
    call = reinterpret_cast<DlopenFunction>(dlsym(RTLD_NEXT, "dlopen"));
    if (!call) call = missing_dlopen;
    next.store(call, std::memory_order_release);
  }
  return call;
}

void* dlopen_deepbind(const char* file, int mode, const void* caller) {
  DlopenFunction real = real_dlopen();
  static const Replacement replacements[] = {
      {"malloc", reinterpret_cast<void*>(&::malloc)},
      {"free", reinterpret_cast<void*>(&::free)},
      {"calloc", reinterpret_cast<void*>(&::calloc)},
      {"realloc", reinterpret_cast<void*>(&::realloc)},
      {"reallocarray", reinterpret_cast<void*>(&::reallocarray)},
      {"posix_memalign", reinterpret_cast<void*>(&::posix_memalign)},
      {"aligned_alloc", reinterpret_cast<void*>(&::aligned_alloc)},
      {"memalign", reinterpret_cast<void*>(&::memalign)},
      {"valloc", reinterpret_cast<void*>(&::valloc)},
      {"pvalloc", reinterpret_cast<void*>(&::pvalloc)},
      {"malloc_usable_size", reinterpret_cast<void*>(&::malloc_usable_size)},
      {"malloc_trim", reinterpret_cast<void*>(&::malloc_trim)},
  };
  char path[4096];
  const char* name = file;
  unsigned before = 0;
  {
    ReentryGuard guard;  // dlinfo and the search allocate
    if (file && !std::strchr(file, '/') && find_for_caller(caller, file, path, sizeof(path))) name = path;
    dl_iterate_phdr(count_object, &before);
  }
  void* handle = real(name, mode);
  if (!handle) return nullptr;
  // The loader appends what it loads to the list it iterates: the objects
  // after the first `before` are this dlopen's.
  PatchWalk walk{before, 0, replacements, sizeof(replacements) / sizeof(replacements[0]),
                 reinterpret_cast<uintptr_t>(&dlopen_deepbind), 0};
  dl_iterate_phdr(patch_object, &walk);
  return handle;
}

}  // namespace hotpool::shim
