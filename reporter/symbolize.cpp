// Boost.Stacktrace's libbacktrace backend: header-only over a static
// libbacktrace, or its shared library (see CMakeLists.txt).
#ifndef HOTPOOL_STATIC_BACKTRACE
#define BOOST_STACKTRACE_LINK
#endif
#define BOOST_STACKTRACE_USE_BACKTRACE
#include "symbolize.h"

#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <boost/core/demangle.hpp>
#include <boost/stacktrace/frame.hpp>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

// Two ways to a name, chosen per module, because their costs differ by
// orders of magnitude:
//  - a module with something to read beyond its dynamic symbols (a .symtab,
//    DWARF, or a separate debug file, e.g. a Debian -dbgsym package) goes
//    to Boost.Stacktrace: function, file and line from libbacktrace;
//  - a stripped module (every Debian binary without its -dbgsym package)
//    has only its dynamic symbols, which are all Boost could find too, via
//    dladdr(). dladdr() scans the whole symbol table on each call (30,000
//    symbols for libclang-cpp.so.14), and Boost's libbacktrace, once
//    started, reads and sorts the symbol tables of every loaded module:
//    together a billion instructions for a report of 256 sites of
//    clang-format. Here the module's .dynsym is sorted once and searched.
namespace hotpool::reporter {

namespace {
void copy(char* out, size_t size, const char* text) {
  size_t n = std::strlen(text);
  if (n >= size) n = size - 1;
  std::memcpy(out, text, n);
  out[n] = '\0';
}

const char* base_name(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

bool file_exists(const std::string& path) {
  struct stat status;
  return stat(path.c_str(), &status) == 0 && S_ISREG(status.st_mode);
}

// A read-only view of an ELF file's section headers.
class ElfFile {
 public:
  explicit ElfFile(const char* path) {
    const int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    struct stat status;
    if (fstat(fd, &status) == 0 && status.st_size >= static_cast<off_t>(sizeof(ElfW(Ehdr)))) {
      void* map = mmap(nullptr, static_cast<size_t>(status.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
      if (map != MAP_FAILED) {
        data_ = static_cast<const char*>(map);
        size_ = static_cast<size_t>(status.st_size);
      }
    }
    close(fd);
    if (!data_) return;
    const auto* header = reinterpret_cast<const ElfW(Ehdr)*>(data_);
    if (std::memcmp(header->e_ident, ELFMAG, SELFMAG) != 0 || header->e_ident[EI_CLASS] != (__ELF_NATIVE_CLASS == 64 ? ELFCLASS64 : ELFCLASS32) ||
        header->e_shentsize != sizeof(ElfW(Shdr)) || header->e_shoff == 0 ||
        header->e_shoff + header->e_shnum * sizeof(ElfW(Shdr)) > size_ || header->e_shstrndx >= header->e_shnum)
      return;
    sections_ = reinterpret_cast<const ElfW(Shdr)*>(data_ + header->e_shoff);
    count_ = header->e_shnum;
    names_ = &sections_[header->e_shstrndx];
    if (names_->sh_offset + names_->sh_size > size_) sections_ = nullptr;
  }
  ~ElfFile() {
    if (data_) munmap(const_cast<char*>(data_), size_);
  }
  ElfFile(const ElfFile&) = delete;
  ElfFile& operator=(const ElfFile&) = delete;

  bool valid() const { return sections_ != nullptr; }
  const ElfW(Shdr)* section(const char* name) const {
    for (unsigned i = 0; valid() && i < count_; ++i) {
      if (sections_[i].sh_name >= names_->sh_size) continue;
      if (std::strcmp(data_ + names_->sh_offset + sections_[i].sh_name, name) == 0) return &sections_[i];
    }
    return nullptr;
  }
  const ElfW(Shdr)* section(unsigned index) const { return index < count_ ? &sections_[index] : nullptr; }
  // The bytes of a section, or null if it lies outside the file.
  const char* contents(const ElfW(Shdr)* section) const {
    if (!section || section->sh_type == SHT_NOBITS || section->sh_offset + section->sh_size > size_) return nullptr;
    return data_ + section->sh_offset;
  }

 private:
  const char* data_ = nullptr;
  size_t size_ = 0;
  const ElfW(Shdr)* sections_ = nullptr;
  const ElfW(Shdr)* names_ = nullptr;
  unsigned count_ = 0;
};

struct DynamicSymbol {
  uintptr_t start;  // link-time address
  uintptr_t size;
  uint32_t name;    // offset in the module's .dynstr
};

struct Module {
  uintptr_t low = 0, high = 0;  // text, run-time addresses
  uintptr_t base = 0;           // dlpi_addr
  std::string path;
  std::string build_id;         // hex
  bool examined = false;
  bool embedded = false;        // its own .symtab or DWARF
  bool debug_file = false;      // a separate debug file exists
  bool rich = false;            // symbolized by Boost, else from .dynsym
  bool indexed = false;
  std::vector<DynamicSymbol> symbols;
  // The module's file stays mapped once indexed: names are read from its
  // .dynstr in place (a large library has tens of thousands of them, a
  // report names a few).
  std::unique_ptr<ElfFile> file;
  const char* names = nullptr;
  size_t names_size = 0;
};

std::vector<Module>* g_modules = nullptr;
unsigned g_known_modules = ~0u;  // the first so many modules of the loader's list
uintptr_t g_caller = 0;  // an address in libhotpool.so

std::string hex(const unsigned char* bytes, size_t count) {
  std::string out;
  for (size_t i = 0; i < count; ++i) {
    out.push_back("0123456789abcdef"[bytes[i] >> 4]);
    out.push_back("0123456789abcdef"[bytes[i] & 15]);
  }
  return out;
}

struct ModuleList {
  std::vector<Module>* modules;
  unsigned seen;
};

int add_module(dl_phdr_info* info, size_t, void* data) {
  auto* list = static_cast<ModuleList*>(data);
  if (list->seen++ >= g_known_modules) return 1;
  std::vector<Module>* modules = list->modules;
  Module module;
  module.base = info->dlpi_addr;
  module.low = ~uintptr_t{0};
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& header = info->dlpi_phdr[i];
    if (header.p_type == PT_LOAD && (header.p_flags & PF_X)) {
      module.low = std::min<uintptr_t>(module.low, info->dlpi_addr + header.p_vaddr);
      module.high = std::max<uintptr_t>(module.high, info->dlpi_addr + header.p_vaddr + header.p_memsz);
    } else if (header.p_type == PT_NOTE) {
      // The GNU build-id note names the separate debug file.
      const char* note = reinterpret_cast<const char*>(info->dlpi_addr + header.p_vaddr);
      const char* end = note + header.p_memsz;
      while (note + sizeof(ElfW(Nhdr)) <= end) {
        const auto* n = reinterpret_cast<const ElfW(Nhdr)*>(note);
        const char* name = note + sizeof(ElfW(Nhdr));
        const char* desc = name + ((n->n_namesz + 3) & ~3u);
        if (n->n_type == NT_GNU_BUILD_ID && n->n_namesz == 4 && std::memcmp(name, "GNU", 4) == 0 &&
            desc + n->n_descsz <= end)
          module.build_id = hex(reinterpret_cast<const unsigned char*>(desc), n->n_descsz);
        note = desc + ((n->n_descsz + 3) & ~3u);
      }
    }
  }
  if (module.low >= module.high) return 0;
  if (info->dlpi_name && info->dlpi_name[0]) {
    module.path = info->dlpi_name;
  } else {
    char path[4096];
    const ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
    if (n <= 0) return 0;  // the main program, unreadable: Boost alone
    module.path.assign(path, static_cast<size_t>(n));
  }
  modules->push_back(std::move(module));
  return 0;
}

void examine_all(std::vector<Module>& modules);

Module* module_of(uintptr_t address) {
  if (!g_modules) {
    g_modules = new std::vector<Module>;
    ModuleList list{g_modules, 0};
    dl_iterate_phdr(add_module, &list);
    examine_all(*g_modules);
  }
  for (Module& module : *g_modules)
    if (address >= module.low && address < module.high) return &module;
  return nullptr;
}

// Where libbacktrace (and gdb) look for a separate debug file.
bool has_debug_file(const Module& module, const ElfFile& file) {
  if (module.build_id.size() > 2 &&
      file_exists("/usr/lib/debug/.build-id/" + module.build_id.substr(0, 2) + "/" + module.build_id.substr(2) + ".debug"))
    return true;
  const ElfW(Shdr)* link = file.section(".gnu_debuglink");
  const char* name = file.contents(link);
  if (!name || !memchr(name, '\0', link->sh_size)) return false;
  const std::string directory = module.path.substr(0, module.path.rfind('/') + 1);
  if (directory + name != module.path && file_exists(directory + name)) return true;
  return file_exists(directory + ".debug/" + name) || file_exists("/usr/lib/debug" + directory + name);
}

// What a module offers beyond its dynamic symbols, from its section
// headers (the file is mapped, not read).
void examine(Module& module) {
  module.examined = true;
  const ElfFile file(module.path.c_str());
  if (!file.valid()) return;  // no file (the vDSO) or not ELF: nothing for Boost to read either
  module.embedded = file.section(".symtab") || file.section(".debug_info") || file.section(".gnu_debugdata");
  module.debug_file = !module.embedded && has_debug_file(module, file);
}

// The module's function symbols from its .dynsym, sorted by address.
void index_dynamic_symbols(Module& module) {
  module.indexed = true;
  auto file = std::make_unique<ElfFile>(module.path.c_str());
  const ElfW(Shdr)* dynsym = file->section(".dynsym");
  const char* symbols = file->contents(dynsym);
  const ElfW(Shdr)* strings = dynsym ? file->section(dynsym->sh_link) : nullptr;
  const char* names = file->contents(strings);
  if (!symbols || !names || dynsym->sh_entsize != sizeof(ElfW(Sym))) return;
  const size_t count = dynsym->sh_size / sizeof(ElfW(Sym));
  module.symbols.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    ElfW(Sym) symbol;
    std::memcpy(&symbol, symbols + i * sizeof(symbol), sizeof(symbol));
    const unsigned type = ELF64_ST_TYPE(symbol.st_info);
    if ((type != STT_FUNC && type != STT_GNU_IFUNC) || symbol.st_shndx == SHN_UNDEF || symbol.st_name >= strings->sh_size)
      continue;
    module.symbols.push_back({symbol.st_value, symbol.st_size, static_cast<uint32_t>(symbol.st_name)});
  }
  std::sort(module.symbols.begin(), module.symbols.end(),
            [](const DynamicSymbol& a, const DynamicSymbol& b) { return a.start < b.start; });
  module.names = names;
  module.names_size = strings->sh_size;
  module.file = std::move(file);
}

// Boost (libbacktrace) reads every module once it starts, so it starts
// only if a module carries its own symbols or DWARF (the user's builds:
// Debian's binaries are stripped). Then modules with a separate debug file
// (installed -dbgsym packages) go to it too; otherwise their dynamic
// symbols are enough for the program's stack above them.
// hotpool's own modules do not count: their frames are never reported.
void examine_all(std::vector<Module>& modules) {
  const auto own = [](const Module& module) {
    const uintptr_t self = reinterpret_cast<uintptr_t>(&examine_all);
    return (self >= module.low && self < module.high) ||
           (g_caller >= module.low && g_caller < module.high);
  };
  bool boost = false;
  for (Module& module : modules) {
    examine(module);
    boost = boost || (module.embedded && !own(module));
  }
  for (Module& module : modules) module.rich = module.embedded || (boost && module.debug_file);
}

// The dynamic symbol containing `offset` (a link-time address), or null.
const char* dynamic_symbol(const Module& module, uintptr_t offset) {
  auto after = std::upper_bound(module.symbols.begin(), module.symbols.end(), offset,
                                [](uintptr_t value, const DynamicSymbol& symbol) { return value < symbol.start; });
  if (after == module.symbols.begin()) return nullptr;
  const DynamicSymbol& symbol = *(after - 1);
  if (offset >= symbol.start + (symbol.size ? symbol.size : 1)) return nullptr;
  // A name that runs off the end of .dynstr is no name.
  const char* name = module.names + symbol.name;
  return memchr(name, '\0', module.names_size - symbol.name) ? name : nullptr;
}

// Symbolizing is slow: each address once per process, in a table of our
// own memory.
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

// The functions inlined at `call`, innermost first, into `out` (room for
// Symbol::kMaxInlined + 1: the outermost level is written there too);
// how many there are, at most Symbol::kMaxInlined. libbacktrace reports each
// level of DWARF's inlining records at an address, innermost first, the
// function they were all inlined into last: that last one is Boost's
// frame (its name and line), so the levels before it are the inlined
// ones. Boost.Stacktrace keeps the last level only; this asks the same
// libbacktrace state (Boost's, per thread) for all of them.
#ifdef HOTPOOL_STATIC_BACKTRACE
struct InlineLevels {
  InlinedFrame* out;
  unsigned count;  // levels seen, the outermost included
};

int collect_level(void* data, uintptr_t, const char* file, int line, const char* function) {
  auto& levels = *static_cast<InlineLevels*>(data);
  // One more than kept: the outermost is the frame itself, not kept here.
  if (levels.count < Symbol::kMaxInlined + 1) {
    InlinedFrame& frame = levels.out[levels.count];
    copy(frame.function, sizeof(frame.function), function ? boost::core::demangle(function).c_str() : "??");
    copy(frame.file, sizeof(frame.file), file ? file : "");
    frame.line = line > 0 ? static_cast<unsigned>(line) : 0;
  }
  ++levels.count;
  return 0;  // go on to the next level
}

void ignore_error(void*, const char*, int) {}

unsigned inlined_at(uintptr_t call, InlinedFrame* out) {
  const boost::stacktrace::detail::program_location program;
  backtrace_state* state = boost::stacktrace::detail::construct_state(program);
  if (!state) return 0;
  InlineLevels collected = {out, 0};
  backtrace_pcinfo(state, call, collect_level, ignore_error, &collected);
  return collected.count < 2 ? 0 : std::min(collected.count - 1, Symbol::kMaxInlined);
}
#else
// Boost's shared library keeps its libbacktrace to itself: no inlined frames.
unsigned inlined_at(uintptr_t, InlinedFrame*) { return 0; }
#endif

// Inlined frames of cached symbols live as long as the cache: in chunks of
// our own memory, never freed. inlined_room() is where the next symbol's
// go (room for Symbol::kMaxInlined + 1, as inlined_at writes; null without
// memory), keep_inlined(count) keeps the first `count` of them there.
constexpr size_t kInlinedRoom = (Symbol::kMaxInlined + 1) * sizeof(InlinedFrame);
char* g_inlined_next = nullptr;
size_t g_inlined_left = 0;

InlinedFrame* inlined_room() {
  constexpr size_t kChunk = 256 << 10;
  if (g_inlined_left < kInlinedRoom) {
    void* memory = mmap(nullptr, kChunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) return nullptr;
    g_inlined_next = static_cast<char*>(memory);
    g_inlined_left = kChunk;
  }
  return reinterpret_cast<InlinedFrame*>(g_inlined_next);
}

void keep_inlined(unsigned count) {
  g_inlined_next += count * sizeof(InlinedFrame);
  g_inlined_left -= count * sizeof(InlinedFrame);
}

// `inlined`: where the inlined frames go when the symbol is not cached
// (room for Symbol::kMaxInlined + 1); else straight into inlined_room().
void symbolize_uncached(uintptr_t return_address, Symbol* out, InlinedFrame* inlined) {
  *out = Symbol{};
  const uintptr_t call = return_address - 1;
  Module* module = module_of(call);
  if (!module) {
    copy(out->function, sizeof(out->function), "??");  // unloaded since, or unreadable
    return;
  }
  copy(out->module, sizeof(out->module), base_name(module->path.c_str()));
  out->offset = call - module->base;
  if (!module->rich) {
    if (!module->indexed) index_dynamic_symbols(*module);
    const char* name = dynamic_symbol(*module, out->offset);
    copy(out->function, sizeof(out->function), name ? boost::core::demangle(name).c_str() : "??");
    return;
  }
  const boost::stacktrace::frame frame(reinterpret_cast<boost::stacktrace::frame::native_frame_ptr_t>(call));
  const std::string name = frame.name();
  copy(out->function, sizeof(out->function), name.empty() ? "??" : name.c_str());
  const std::string file = frame.source_file();
  copy(out->file, sizeof(out->file), file.c_str());
  out->line = static_cast<unsigned>(frame.source_line());
  InlinedFrame* const room = inlined ? inlined : inlined_room();
  if (!room) return;
  const unsigned count = inlined_at(call, room);
  if (count == 0) return;
  if (!inlined) keep_inlined(count);
  out->inlined = room;
  out->inlined_count = count;
}
}  // namespace

const Symbol* symbolize_cached(uintptr_t return_address) {
  CacheEntry* entry = cache_slot(return_address);
  if (entry && entry->address == return_address) return &entry->symbol;
  static Symbol uncached;  // when the cache is full here (or has no memory)
  static InlinedFrame uncached_inlined[Symbol::kMaxInlined + 1];
  Symbol* out = entry ? &entry->symbol : &uncached;
  symbolize_uncached(return_address, out, entry ? nullptr : uncached_inlined);
  if (entry) entry->address = return_address;
  return out;
}

}  // namespace hotpool::reporter

// The entry point of libhotpool-symbolize.so, which libhotpool.so loads
// with dlopen() at its first report (see shim/symbolizer_loader.cpp).
// How many modules of the loader's list existed before this module was
// loaded: only those can hold captured frames.
extern "C" __attribute__((visibility("default"))) void hotpool_symbolize_known_modules(unsigned count) {
  hotpool::reporter::g_known_modules = count;
}

extern "C" __attribute__((visibility("default"))) const hotpool::reporter::Symbol* hotpool_symbolize_address(
    uintptr_t return_address) {
  if (!hotpool::reporter::g_caller)
    hotpool::reporter::g_caller = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  return hotpool::reporter::symbolize_cached(return_address);
}
