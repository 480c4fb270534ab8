// RTLD_DEEPBIND: a library opened with it looks symbols up in itself and
// its own dependencies before the global scope, so its malloc, free, ...
// bind to libc's, not to the preloaded libhotpool.so. A block hotpool
// handed out (from a pool, or a sampled one) that such a library frees
// would then reach glibc's free, which aborts. So after a dlopen with
// RTLD_DEEPBIND, every GOT slot of the malloc family that the loader bound
// to libc's definition is pointed at the function the global scope
// defines (hotpool's), the binding a normal dlopen gives; the library's
// other symbols keep their deep binding. dlopen and dlmopen are among the
// names, so that a deep-bound library's own deep-bound dlopen comes here
// too.
//
// Every object of the base namespace is looked at, not only what this
// dlopen loaded: a slot is rewritten only when it holds libc's definition
// (or, for a lazily bound JUMP_SLOT, still its PLT stub), so the walk is
// idempotent, catches objects deep-bound before (while hotpool booted,
// through a path hotpool does not see), and leaves alone objects that a
// concurrent dlopen in another thread is still relocating
// (_dl_find_object knows an object only once it is relocated).
//
// dlopen looks at its caller to search the caller's RPATH and RUNPATH and
// to expand $ORIGIN: as hotpool's dlopen calls the real one, a bare file
// name opened with RTLD_DEEPBIND that is not loaded yet is first searched
// for in the directories of the caller's search path that hotpool's own
// lacks (dlinfo RTLD_DI_SERINFO) and opened by its path, and $ORIGIN is
// expanded here to the caller's directory. Every other dlopen goes
// straight to the real one, by a tail call that leaves its caller as it
// was.
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <gnu/lib-names.h>
#include <link.h>
#include <malloc.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <cstring>

#include "runtime.h"

// glibc's own names for its allocator, which hotpool exports as aliases
// (entry_points.cpp); no header declares them.
extern "C" {
void* __libc_malloc(size_t size);
void __libc_free(void* block);
void* __libc_calloc(size_t count, size_t size);
void* __libc_realloc(void* block, size_t size);
void* __libc_memalign(size_t alignment, size_t size);
void* __libc_valloc(size_t size);
void* __libc_pvalloc(size_t size);
}

namespace hotpool::shim {

namespace {

using DlopenFunction = void* (*)(const char*, int);
using DlmopenFunction = void* (*)(Lmid_t, const char*, int);

void* missing_dlopen(const char*, int) { return nullptr; }
void* missing_dlmopen(Lmid_t, const char*, int) { return nullptr; }

#if defined(__x86_64__)
constexpr bool kPatchable = true;
constexpr unsigned kJumpSlot = R_X86_64_JUMP_SLOT;
constexpr unsigned kGlobDat = R_X86_64_GLOB_DAT;
constexpr unsigned kAbsolute64 = R_X86_64_64;
constexpr unsigned kMachine = EM_X86_64;
#else
// Other architectures: no relocation types known here, nothing patched.
constexpr bool kPatchable = false;
constexpr unsigned kJumpSlot = ~0u, kGlobDat = ~0u, kAbsolute64 = ~0u;
constexpr unsigned kMachine = EM_NONE;
#endif

// The names whose slots are rewritten. Taking the address of these
// functions here goes through libhotpool.so's own GOT, so it yields what
// the global scope defines: hotpool's functions (or a definition that
// comes before hotpool's in the global scope, which is then what every
// normally bound object uses too).
constexpr unsigned kTargets = 21;
const char* const kTargetNames[kTargets] = {
    "malloc",         "free",           "calloc",         "realloc",        "reallocarray",
    "posix_memalign", "aligned_alloc",  "memalign",       "valloc",         "pvalloc",
    "malloc_usable_size", "malloc_trim", "__libc_malloc", "__libc_free",   "__libc_calloc",
    "__libc_realloc", "__libc_memalign", "__libc_valloc", "__libc_pvalloc", "dlopen",
    "dlmopen",
};

void* global_definition(unsigned target) {
  static void* const definitions[kTargets] = {
      reinterpret_cast<void*>(&::malloc),          reinterpret_cast<void*>(&::free),
      reinterpret_cast<void*>(&::calloc),          reinterpret_cast<void*>(&::realloc),
      reinterpret_cast<void*>(&::reallocarray),    reinterpret_cast<void*>(&::posix_memalign),
      reinterpret_cast<void*>(&::aligned_alloc),   reinterpret_cast<void*>(&::memalign),
      reinterpret_cast<void*>(&::valloc),          reinterpret_cast<void*>(&::pvalloc),
      reinterpret_cast<void*>(&::malloc_usable_size), reinterpret_cast<void*>(&::malloc_trim),
      reinterpret_cast<void*>(&::__libc_malloc),   reinterpret_cast<void*>(&::__libc_free),
      reinterpret_cast<void*>(&::__libc_calloc),   reinterpret_cast<void*>(&::__libc_realloc),
      reinterpret_cast<void*>(&::__libc_memalign), reinterpret_cast<void*>(&::__libc_valloc),
      reinterpret_cast<void*>(&::__libc_pvalloc),  reinterpret_cast<void*>(&::dlopen),
      reinterpret_cast<void*>(&::dlmopen),
  };
  return definitions[target];
}

// libc's definitions of the names (the base namespace's libc), resolved
// once: what a deep-bound slot holds. glibc has one address per name
// (dlopen@GLIBC_2.2.5 and dlopen@@GLIBC_2.34 are the same function).
constinit std::atomic<bool> g_libc_ready{false};
constinit std::atomic<void*> g_libc_definitions[kTargets]{};

bool resolve_libc_definitions() {
  if (g_libc_ready.load(std::memory_order_acquire)) return true;
  ReentryGuard guard;  // the loader allocates
  void* libc = real_dlopen()(LIBC_SO, RTLD_LAZY | RTLD_NOLOAD);
  if (!libc) return false;
  // Threads racing here store the same addresses.
  for (unsigned i = 0; i < kTargets; ++i)
    g_libc_definitions[i].store(dlsym(libc, kTargetNames[i]), std::memory_order_relaxed);
  dlclose(libc);
  g_libc_ready.store(true, std::memory_order_release);
  return true;
}

int target_of(const char* name) {
  for (unsigned i = 0; i < kTargets; ++i)
    if (name[0] == kTargetNames[i][0] && std::strcmp(name, kTargetNames[i]) == 0) return static_cast<int>(i);
  return -1;
}

struct PatchWalk {
  uintptr_t own;          // an address in libhotpool.so
  uintptr_t libc;         // an address in libc (its malloc)
  uintptr_t loader_base;  // the dynamic loader's (AT_BASE)
  uintptr_t libc_low;     // the lowest and highest of libc's definitions
  uintptr_t libc_high;
  unsigned patched;
};

bool contains(const dl_phdr_info* info, uintptr_t address) {
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& header = info->dlpi_phdr[i];
    if (header.p_type != PT_LOAD) continue;
    const uintptr_t start = info->dlpi_addr + header.p_vaddr;
    if (address >= start && address < start + header.p_memsz) return true;
  }
  return false;
}

// Entries of the dynamic section hold addresses that the loader has
// relocated in place, except where the section is read-only (the vDSO).
uintptr_t dynamic_address(uintptr_t base, ElfW(Addr) value) { return value < base ? base + value : value; }

// Writes a slot. Its page may be read-only: under PT_GNU_RELRO (the loader
// protected the whole pages of it, rounding its end down), or in a
// segment without write permission. Such a page is made writable for the
// write and given its protection back. dl_iterate_phdr holds the loader's
// list lock across the walk, so two walks never toggle a page at once.
void write_slot(const dl_phdr_info* info, uintptr_t slot, void* function) {
  const uintptr_t page_size = static_cast<uintptr_t>(getpagesize());
  const uintptr_t page = slot & ~(page_size - 1);
  bool read_only = false;
  int protection = PROT_READ;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& header = info->dlpi_phdr[i];
    const uintptr_t start = info->dlpi_addr + header.p_vaddr;
    if (header.p_type == PT_GNU_RELRO) {
      const uintptr_t first = start & ~(page_size - 1);
      const uintptr_t end = (start + header.p_memsz) & ~(page_size - 1);
      if (page >= first && page < end) read_only = true;
    } else if (header.p_type == PT_LOAD && slot >= start && slot < start + header.p_memsz &&
               !(header.p_flags & PF_W)) {
      read_only = true;
      protection = ((header.p_flags & PF_R) ? PROT_READ : 0) | ((header.p_flags & PF_X) ? PROT_EXEC : 0);
    }
  }
  void* address = reinterpret_cast<void*>(page);
  if (read_only && mprotect(address, page_size, PROT_READ | PROT_WRITE) != 0) return;
  __atomic_store_n(reinterpret_cast<void**>(slot), function, __ATOMIC_RELEASE);
  if (read_only) mprotect(address, page_size, protection);
}

void patch_relocations(const dl_phdr_info* info, const ElfW(Rela)* table, size_t bytes, const ElfW(Sym)* symbols,
                       const char* strings, size_t strings_size, PatchWalk& walk) {
  if (!table || !symbols || !strings) return;
  for (size_t i = 0; i < bytes / sizeof(ElfW(Rela)); ++i) {
    const ElfW(Rela)& relocation = table[i];
    const unsigned type = static_cast<unsigned>(ELF64_R_TYPE(relocation.r_info));
    if (type != kJumpSlot && type != kGlobDat && type != kAbsolute64) continue;
    const uintptr_t slot = info->dlpi_addr + relocation.r_offset;
    if (slot % sizeof(void*) != 0) continue;  // a packed data word: left alone
    // The slot's value first: most point neither near libc's allocator nor
    // (lazily bound) into the object itself, and need no symbol lookup.
    void* const value = __atomic_load_n(reinterpret_cast<void**>(slot), __ATOMIC_RELAXED);
    const auto address = reinterpret_cast<uintptr_t>(value);
    const bool near_libc = address >= walk.libc_low && address <= walk.libc_high;
    // A lazily bound JUMP_SLOT not resolved yet points into the object's
    // own PLT; resolved later, a deep-bound one would go to libc.
    const bool unresolved = !near_libc && type == kJumpSlot && contains(info, address);
    if (!near_libc && !unresolved) continue;
    const size_t index = ELF64_R_SYM(relocation.r_info);
    if (index == 0) continue;
    const ElfW(Sym)& symbol = symbols[index];
    if (symbol.st_shndx != SHN_UNDEF || symbol.st_name >= strings_size) continue;  // its own definition
    const int target = target_of(strings + symbol.st_name);
    if (target < 0) continue;
    void* const ours = global_definition(static_cast<unsigned>(target));
    if (value == ours) continue;
    // Bound to libc's definition of this very name (an R_X86_64_64 only
    // without addend).
    const void* const libc = g_libc_definitions[target].load(std::memory_order_relaxed);
    const bool to_libc = near_libc && libc && value == libc && (type != kAbsolute64 || relocation.r_addend == 0);
    if (!to_libc && !unresolved) continue;
    write_slot(info, slot, ours);
    ++walk.patched;
  }
}

int patch_object(dl_phdr_info* info, size_t, void* data) {
  auto& walk = *static_cast<PatchWalk*>(data);
  // Not hotpool, libc (whose own calls of malloc already come to hotpool)
  // nor the loader.
  if (walk.loader_base && info->dlpi_addr == walk.loader_base) return 0;
  if (contains(info, walk.own) || contains(info, walk.libc)) return 0;
  const ElfW(Dyn)* dynamic = nullptr;
  uintptr_t first_load = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& header = info->dlpi_phdr[i];
    if (header.p_type == PT_DYNAMIC) dynamic = reinterpret_cast<const ElfW(Dyn)*>(info->dlpi_addr + header.p_vaddr);
    if (header.p_type == PT_LOAD && !first_load) first_load = info->dlpi_addr + header.p_vaddr;
  }
  if (!dynamic || !first_load) return 0;
  // Only objects the loader has finished relocating (another thread may be
  // in the middle of a dlopen; its relocations and RELRO are its own).
  dl_find_object found;
  if (_dl_find_object(reinterpret_cast<void*>(first_load), &found) != 0 || !found.dlfo_link_map ||
      found.dlfo_link_map->l_addr != info->dlpi_addr)
    return 0;
  const uintptr_t base = info->dlpi_addr;
  const ElfW(Sym)* symbols = nullptr;
  const char* strings = nullptr;
  size_t strings_size = 0, rela_bytes = 0, plt_bytes = 0, relative_count = 0;
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
      case DT_RELACOUNT: relative_count = entry->d_un.d_val; break;
      case DT_JMPREL: plt = reinterpret_cast<const ElfW(Rela)*>(dynamic_address(base, entry->d_un.d_ptr)); break;
      case DT_PLTRELSZ: plt_bytes = entry->d_un.d_val; break;
      case DT_PLTREL: plt_is_rela = entry->d_un.d_val == DT_RELA; break;
      default: break;
    }
  }
  // DT_RELACOUNT: the table starts with that many relative relocations
  // (most of a large library's), which name no symbol.
  if (rela && relative_count * sizeof(ElfW(Rela)) <= rela_bytes) {
    rela += relative_count;
    rela_bytes -= relative_count * sizeof(ElfW(Rela));
  }
  patch_relocations(info, rela, rela_bytes, symbols, strings, strings_size, walk);
  if (plt_is_rela) patch_relocations(info, plt, plt_bytes, symbols, strings, strings_size, walk);
  return 0;
}

// Points the deep-bound malloc-family slots of every object at the global
// definitions. Allocates nothing.
void patch_deep_bound_slots() {
  if (!kPatchable || !g_libc_ready.load(std::memory_order_acquire)) return;
  PatchWalk walk{reinterpret_cast<uintptr_t>(&patch_deep_bound_slots),
                 reinterpret_cast<uintptr_t>(g_libc_definitions[0].load(std::memory_order_relaxed)),
                 static_cast<uintptr_t>(getauxval(AT_BASE)), ~uintptr_t{0}, 0, 0};
  if (!walk.libc) return;
  for (const std::atomic<void*>& definition : g_libc_definitions) {
    const auto address = reinterpret_cast<uintptr_t>(definition.load(std::memory_order_relaxed));
    if (!address) continue;
    if (address < walk.libc_low) walk.libc_low = address;
    if (address > walk.libc_high) walk.libc_high = address;
  }
  // A cancellation in the middle would leave a RELRO page writable.
  recycler::CancellationOff cancellation_off;
  dl_iterate_phdr(patch_object, &walk);
}

// Search paths ----------------------------------------------------------

// The search path dlopen uses for a bare name called from `map`, in a
// malloc'd block (under the guard: the real allocator's), or null.
Dl_serinfo* search_path(void* map, const ReentryGuard&) {
  Dl_serinfo probe;
  if (dlinfo(map, RTLD_DI_SERINFOSIZE, &probe) != 0 || probe.dls_size < sizeof(Dl_serinfo)) return nullptr;
  auto* paths = static_cast<Dl_serinfo*>(std::malloc(probe.dls_size));
  if (!paths) return nullptr;
  paths->dls_size = probe.dls_size;
  paths->dls_cnt = probe.dls_cnt;
  if (dlinfo(map, RTLD_DI_SERINFOSIZE, paths) != 0 || dlinfo(map, RTLD_DI_SERINFO, paths) != 0) {
    std::free(paths);
    return nullptr;
  }
  return paths;
}

// Whether `path` is a file the loader would take (an ELF object of this
// machine and class); it skips others and searches on.
bool loadable(const char* path) {
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  ElfW(Ehdr) header;
  const bool read_all = read(fd, &header, sizeof(header)) == static_cast<ssize_t>(sizeof(header));
  close(fd);
  return read_all && std::memcmp(header.e_ident, ELFMAG, SELFMAG) == 0 &&
         header.e_ident[EI_CLASS] == (sizeof(void*) == 8 ? ELFCLASS64 : ELFCLASS32) && header.e_machine == kMachine;
}

// For a bare file name: the path dlopen would open for `caller`, looked for
// in the directories of the caller's search path that hotpool's lacks (the
// caller's RPATH or RUNPATH, and the LD_LIBRARY_PATH before a RUNPATH).
// The directories both paths end with (the system ones) are left to the
// real dlopen, which reads ld.so.cache before them. False if not found.
bool find_for_caller(const void* caller, const char* file, char* out, size_t size, const ReentryGuard& guard) {
  Dl_info info;
  void* caller_map = nullptr;
  void* own_map = nullptr;
  if (!dladdr1(caller, &info, &caller_map, RTLD_DL_LINKMAP) || !caller_map) return false;
  if (!dladdr1(reinterpret_cast<void*>(&patch_deep_bound_slots), &info, &own_map, RTLD_DL_LINKMAP) || !own_map ||
      own_map == caller_map)
    return false;
  Dl_serinfo* theirs = search_path(caller_map, guard);
  Dl_serinfo* ours = search_path(own_map, guard);
  bool found = false;
  if (theirs && ours) {
    unsigned common = 0;
    while (common < theirs->dls_cnt && common < ours->dls_cnt &&
           std::strcmp(theirs->dls_serpath[theirs->dls_cnt - 1 - common].dls_name,
                       ours->dls_serpath[ours->dls_cnt - 1 - common].dls_name) == 0)
      ++common;
    const size_t file_length = std::strlen(file);
    for (unsigned i = 0; i + common < theirs->dls_cnt && !found; ++i) {
      const char* directory = theirs->dls_serpath[i].dls_name;
      const size_t length = std::strlen(directory);
      if (length + 1 + file_length + 1 > size) continue;
      std::memcpy(out, directory, length);
      out[length] = '/';
      std::memcpy(out + length + 1, file, file_length + 1);
      found = loadable(out);
    }
  }
  std::free(theirs);
  std::free(ours);
  return found;
}

// The caller's directory, as the loader takes it for $ORIGIN: that of the
// file the object was loaded from, the program's from /proc/self/exe.
bool origin_of(const void* caller, char* out, size_t size) {
  Dl_info info;
  link_map* map = nullptr;
  if (!dladdr1(caller, &info, reinterpret_cast<void**>(&map), RTLD_DL_LINKMAP) || !map) return false;
  if (map->l_name && map->l_name[0]) {
    size_t length = 0;
    if (map->l_name[0] != '/') {  // relative to the working directory
      if (!getcwd(out, size)) return false;
      length = std::strlen(out);
      out[length++] = '/';
    }
    const size_t name_length = std::strlen(map->l_name);
    if (length + name_length + 1 > size) return false;
    std::memcpy(out + length, map->l_name, name_length + 1);
  } else {
    const ssize_t length = readlink("/proc/self/exe", out, size - 1);
    if (length <= 0) return false;
    out[length] = '\0';
  }
  char* slash = std::strrchr(out, '/');
  if (!slash) return false;
  slash[slash == out ? 1 : 0] = '\0';
  return true;
}

// A file name with a slash may hold $ORIGIN or ${ORIGIN}, which dlopen
// expands to its caller's directory: `file` with them expanded into `out`.
// False if there is none (or it does not fit). $LIB and $PLATFORM do not
// depend on the caller: the real dlopen expands them.
bool expand_origin(const void* caller, const char* file, char* out, size_t size) {
  char origin[4096];
  bool expanded = false;
  size_t used = 0;
  for (const char* at = file; *at;) {
    size_t token = 0;
    if (at[0] == '$') {
      const char next = at[7];
      const bool name_goes_on = (next >= 'A' && next <= 'Z') || (next >= 'a' && next <= 'z') ||
                                (next >= '0' && next <= '9') || next == '_';
      if (std::strncmp(at + 1, "ORIGIN", 6) == 0 && !name_goes_on) token = 7;
      else if (std::strncmp(at + 1, "{ORIGIN}", 8) == 0) token = 9;
    }
    if (!token) {
      if (used + 1 >= size) return false;
      out[used++] = *at++;
      continue;
    }
    if (!expanded && !origin_of(caller, origin, sizeof(origin))) return false;
    expanded = true;
    const size_t length = std::strlen(origin);
    if (used + length >= size) return false;
    std::memcpy(out + used, origin, length);
    used += length;
    at += token;
  }
  out[used] = '\0';
  return expanded;
}

// The deep-bound open itself: by `dlopen`, or by `dlmopen` into the base
// namespace when `by_dlmopen`.
void* open_deep_bound(const char* file, int mode, const void* caller, bool by_dlmopen) {
  if (!resolve_libc_definitions()) return by_dlmopen ? real_dlmopen()(LM_ID_BASE, file, mode) : real_dlopen()(file, mode);
  char path[4096];
  const char* name = file;
  if (file && !std::strchr(file, '/')) {
    ReentryGuard guard;  // dlopen, dlinfo and the search allocate
    // A name already loaded is matched before any search, whoever asks.
    if (void* loaded = real_dlopen()(file, RTLD_LAZY | RTLD_NOLOAD)) dlclose(loaded);
    else if (find_for_caller(caller, file, path, sizeof(path), guard)) name = path;
  } else if (file && std::strchr(file, '$') && !getauxval(AT_SECURE)) {
    // (A secure process gets the real dlopen's checks of $ORIGIN instead.)
    ReentryGuard guard;
    if (expand_origin(caller, file, path, sizeof(path))) name = path;
  }
  void* handle = by_dlmopen ? real_dlmopen()(LM_ID_BASE, name, mode) : real_dlopen()(name, mode);
  if (!handle) return nullptr;  // dlerror() tells why, as the real call left it
  patch_deep_bound_slots();
  return handle;
}

}  // namespace

DlopenFunction real_dlopen() {
  static std::atomic<DlopenFunction> next{nullptr};
  return next_definition(next, "dlopen", &missing_dlopen);
}

DlmopenFunction real_dlmopen() {
  static std::atomic<DlmopenFunction> next{nullptr};
  return next_definition(next, "dlmopen", &missing_dlmopen);
}

uint64_t objects_unloaded() {
  uint64_t unloaded = 0;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t size, void* out) {
        // Every object reports the loader's totals: the first one is enough.
        if (size >= offsetof(dl_phdr_info, dlpi_subs) + sizeof(info->dlpi_subs))
          *static_cast<uint64_t*>(out) = info->dlpi_subs;
        return 1;
      },
      &unloaded);
  return unloaded;
}

void* dlopen_deepbind(const char* file, int mode, const void* caller) {
  return open_deep_bound(file, mode, caller, false);
}

void* dlmopen_deepbind(const char* file, int mode, const void* caller) {
  return open_deep_bound(file, mode, caller, true);
}

}  // namespace hotpool::shim
