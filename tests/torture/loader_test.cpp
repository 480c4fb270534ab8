// The dynamic loader under libhotpool.so: a library that allocates in its
// constructor and its functions loaded and unloaded hundreds of times while
// two threads allocate all along (the loader's lock and hotpool's must not
// deadlock, blocks must cross the library boundary in both directions and
// outlive the library); and libraries opened with RTLD_DEEPBIND, whose
// malloc/free must pair up with the program's: with their dependencies,
// lazily bound, opened by a deep-bound library, by dlmopen, by bare name;
// and one that never allocates.
#include <dlfcn.h>
#include <malloc.h>

#include <atomic>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "torture.h"

namespace {

using torture::describe;
using torture::fill_pattern;
using torture::mode_pools;
using torture::opaque;
using torture::pattern_intact;
using torture::Preload;
using torture::run_scenario;
using torture::say;
using torture::ScenarioRun;

// Allocates and frees assorted sizes (pooled classes among them) until
// `stop`, checking every block; counts corrupted blocks.
void allocate_until(const std::atomic<bool>& stop, unsigned seed, std::atomic<int>& corrupted) {
  std::mt19937 random(seed);
  struct Slot {
    void* block = nullptr;
    size_t size = 0;
    uint64_t seed = 0;
  };
  Slot slots[128];
  while (!stop.load(std::memory_order_relaxed)) {
    for (int op = 0; op < 256; ++op) {
      Slot& slot = slots[random() % 128];
      if (slot.block) {
        if (!pattern_intact(slot.block, slot.size, slot.seed)) ++corrupted;
        free(slot.block);
        slot.block = nullptr;
        continue;
      }
      static constexpr size_t kSizes[] = {24, 48, 48, 64, 300, 600, 1000, 5000, 70000};
      slot.size = random() % 4 ? kSizes[random() % 9] : 1 + random() % 3000;
      slot.seed = random();
      slot.block = malloc(opaque(slot.size));
      if (!slot.block) {
        ++corrupted;
        continue;
      }
      fill_pattern(slot.block, slot.size, slot.seed);
    }
  }
  for (Slot& slot : slots) {
    if (slot.block && !pattern_intact(slot.block, slot.size, slot.seed)) ++corrupted;
    free(slot.block);
  }
}

TEST(Dlopen, ThreeHundredLoadsOfAnAllocatingLibraryWhileTwoThreadsAllocate) {
  constexpr int kRounds = 300;
  std::atomic<bool> stop{false};
  std::atomic<int> corrupted{0};
  std::thread first([&] { allocate_until(stop, 1, corrupted); });
  std::thread second([&] { allocate_until(stop, 2, corrupted); });

  struct Kept {
    void* block;
    size_t size;
    int byte;
  };
  std::vector<Kept> outliving;  // blocks the library made, freed after it is gone
  outliving.reserve(kRounds);
  int failed_rounds = 0;
  for (int round = 0; round < kRounds && failed_rounds < 5; ++round) {
    void* library = dlopen(TORTURE_DL_HELPER, RTLD_NOW | RTLD_LOCAL);
    ASSERT_NE(library, nullptr) << dlerror();
    auto* intact = reinterpret_cast<int (*)()>(dlsym(library, "torture_dl_constructor_blocks_intact"));
    auto* work = reinterpret_cast<unsigned (*)(unsigned)>(dlsym(library, "torture_dl_work"));
    auto* make_block = reinterpret_cast<void* (*)(size_t, int)>(dlsym(library, "torture_dl_make_block"));
    auto* free_block = reinterpret_cast<void (*)(void*)>(dlsym(library, "torture_dl_free_block"));
    ASSERT_TRUE(intact && work && make_block && free_block);
    bool good = true;
    EXPECT_EQ(intact(), 1) << "round " << round;
    good &= intact() == 1;
    EXPECT_EQ(work(40), 40u) << "round " << round;
    good &= work(40) == 40u;
    const size_t size = round % 2 ? 48 : 320;
    const int byte = round & 0xff;
    void* made = make_block(size, byte);
    EXPECT_NE(made, nullptr);
    if (made) outliving.push_back({made, size, byte});
    void* ours = malloc(opaque(size));
    ASSERT_NE(ours, nullptr);
    std::memset(ours, 0x11, size);
    free_block(ours);  // the library frees the program's block
    ASSERT_EQ(dlclose(library), 0) << dlerror();
    ASSERT_EQ(dlopen(TORTURE_DL_HELPER, RTLD_NOW | RTLD_NOLOAD), nullptr)
        << "the helper stayed loaded: its constructor would not run again";
    if (!good) ++failed_rounds;
  }
  for (const Kept& kept : outliving) {
    const auto* bytes = static_cast<const unsigned char*>(kept.block);
    bool same = true;
    for (size_t i = 0; i < kept.size; ++i) same &= bytes[i] == kept.byte;
    EXPECT_TRUE(same) << "a block the unloaded library made changed";
    free(kept.block);
  }
  stop = true;
  first.join();
  second.join();
  EXPECT_EQ(corrupted.load(), 0) << "blocks of the allocating threads were corrupted";
}

// ---------------------------------------------------------------------------
// RTLD_DEEPBIND
//
// Scenarios, each in a process of its own: what a deep-bound library's
// malloc family resolves to depends on what was loaded before.

namespace deepbind {

using Malloc = void* (*)(size_t);
using Calloc = void* (*)(size_t, size_t);
using Realloc = void* (*)(void*, size_t);
using Free = void (*)(void*);
using UsableSize = size_t (*)(void*);
using FileName = const char* (*)();
using Open = void* (*)(const char*, int);

template <typename Function>
Function find(void* library, const char* name) {
  return reinterpret_cast<Function>(dlsym(library, name));
}

// The program's malloc, as dladdr names its file.
const char* program_malloc_file() {
  Dl_info ours{};
  dladdr(reinterpret_cast<void*>(dlsym(RTLD_DEFAULT, "malloc")), &ours);
  return ours.dli_fname ? ours.dli_fname : "?";
}

constexpr size_t kSizes[] = {48, 320, 5000};

// Blocks of the program (pooled ones among them where hotpool pools)
// freed by the library's `library_free`.
int library_frees(const char* what, Free library_free) {
  for (size_t size : kSizes) {
    say("step=program-allocates-%s-frees size=%zu", what, size);
    void* block = malloc(opaque(size));
    if (!block) return 1;
    fill_pattern(block, size, 4);
    library_free(block);
  }
  return 0;
}

// Blocks of the library (`make(size)`) freed by the program.
template <typename Make>
int program_frees(const char* what, Make make) {
  int failures = 0;
  for (size_t size : kSizes) {
    say("step=%s-allocates-program-frees size=%zu", what, size);
    void* block = make(size);
    if (!block) return 1;
    fill_pattern(block, size, 5);
    if (!pattern_intact(block, size, 5)) ++failures;
    free(block);
  }
  return failures;
}

}  // namespace deepbind

TORTURE_SCENARIO(deepbind) {
  using namespace deepbind;
  if (mode_pools()) say("pooled=%d", torture::warm_until_pooled(48, 48) ? 1 : 0);
  void* library = dlopen(TORTURE_DEEPBIND_HELPER, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  if (!library) {
    say("dlopen failed: %s", dlerror());
    return 2;
  }
  auto lib_malloc = find<Malloc>(library, "deepbind_malloc");
  auto lib_calloc = find<Calloc>(library, "deepbind_calloc");
  auto lib_realloc = find<Realloc>(library, "deepbind_realloc");
  auto lib_free = find<Free>(library, "deepbind_free");
  auto lib_usable = find<UsableSize>(library, "deepbind_usable_size");
  auto lib_malloc_file = find<FileName>(library, "deepbind_malloc_file");
  auto dependency_free = find<Free>(library, "deepbind_free_in_dependency");
  auto dependency_file = find<FileName>(library, "deepbind_dependency_file");
  auto lib_open = find<Open>(library, "deepbind_open");
  if (!lib_malloc || !lib_calloc || !lib_realloc || !lib_free || !lib_usable || !lib_malloc_file ||
      !dependency_free || !dependency_file || !lib_open)
    return 2;
  say("library_malloc=%s program_malloc=%s", lib_malloc_file(), program_malloc_file());
  say("dependency_malloc=%s", dependency_file());
  int failures = 0;

  for (size_t size : kSizes) {
    say("step=program-allocates-library-frees size=%zu", size);
    void* block = malloc(opaque(size));
    if (!block) return 2;
    fill_pattern(block, size, 1);
    if (lib_usable(block) != malloc_usable_size(block)) {
      say("usable sizes differ: program %zu, library %zu", malloc_usable_size(block), lib_usable(block));
      ++failures;
    }
    lib_free(block);

    say("step=library-allocates-program-frees size=%zu", size);
    block = lib_malloc(size);
    if (!block) return 2;
    fill_pattern(block, size, 2);
    if (lib_usable(block) != malloc_usable_size(block)) {
      say("usable sizes differ: program %zu, library %zu", malloc_usable_size(block), lib_usable(block));
      ++failures;
    }
    free(block);

    say("step=program-allocates-library-reallocs size=%zu", size);
    block = malloc(opaque(size));
    if (!block) return 2;
    fill_pattern(block, size, 3);
    void* grown = lib_realloc(block, size * 3);
    if (!grown || !pattern_intact(grown, size, 3)) ++failures;
    free(grown);

    say("step=library-callocs-program-reallocs size=%zu", size);
    block = lib_calloc(1, size);
    if (!block) return 2;
    grown = realloc(block, size * 3);
    if (!grown) return 2;
    lib_free(grown);
  }

  // The library's dependency, loaded by the same dlopen, is deep-bound too.
  failures += library_frees("dependency", dependency_free);

  // A library the deep-bound library opens with RTLD_DEEPBIND itself: its
  // dlopen is libc's too, unless hotpool pointed it at its own.
  void* nested = lib_open(TORTURE_DL_HELPER, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  say("nested=%d", nested ? 1 : 0);
  if (!nested) return 2;
  auto nested_make = find<void* (*)(size_t, int)>(nested, "torture_dl_make_block");
  auto nested_free = find<Free>(nested, "torture_dl_free_block");
  if (!nested_make || !nested_free) return 2;
  failures += library_frees("nested", nested_free);
  failures += program_frees("nested", [&](size_t size) { return nested_make(size, 7); });
  dlclose(nested);
  dlclose(library);

  // Bare names are searched as dlopen searches them for this program; a
  // missing library fails as it does without hotpool, dlerror() intact.
  void* by_name = dlopen("libm.so.6", RTLD_NOW | RTLD_DEEPBIND);
  say("bare_name=%d", by_name ? 1 : 0);
  if (!by_name) ++failures;
  else dlclose(by_name);
  dlerror();
  void* missing = dlopen("libhotpool-no-such-library.so", RTLD_NOW | RTLD_DEEPBIND);
  const char* error = dlerror();
  say("missing=%d error=%s", missing ? 1 : 0, error ? error : "(none)");
  if (missing || !error || !std::strstr(error, "libhotpool-no-such-library.so")) ++failures;
  say("error_after=%d", dlerror() ? 1 : 0);
  say("done failures=%d", failures);
  return failures ? 3 : 0;
}

// Opened lazily: the library's free is resolved on its first call, after
// the dlopen returned.
TORTURE_SCENARIO(deepbind_lazy) {
  using namespace deepbind;
  if (mode_pools()) say("pooled=%d", torture::warm_until_pooled(48, 48) ? 1 : 0);
  void* library = dlopen(TORTURE_DEEPBIND_HELPER, RTLD_LAZY | RTLD_LOCAL | RTLD_DEEPBIND);
  if (!library) {
    say("dlopen failed: %s", dlerror());
    return 2;
  }
  auto lib_malloc = find<Malloc>(library, "deepbind_malloc");
  auto lib_free = find<Free>(library, "deepbind_free");
  auto lib_malloc_file = find<FileName>(library, "deepbind_malloc_file");
  if (!lib_malloc || !lib_free || !lib_malloc_file) return 2;
  int failures = library_frees("library", lib_free);
  failures += program_frees("library", lib_malloc);
  say("library_malloc=%s", lib_malloc_file());
  dlclose(library);
  say("done failures=%d", failures);
  return failures ? 3 : 0;
}

// A deep-bound library that never allocates, opened, used and closed
// twice, then the program allocates on.
TORTURE_SCENARIO(deepbind_plain) {
  int sum = 0;
  for (int mode : {RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND, RTLD_LAZY | RTLD_GLOBAL | RTLD_DEEPBIND}) {
    void* library = dlopen(TORTURE_DEEPBIND_PLAIN, mode);
    if (!library) {
      say("dlopen failed: %s", dlerror());
      return 2;
    }
    auto add = deepbind::find<int (*)(int, int)>(library, "deepbind_plain_add");
    if (!add) return 2;
    sum += add(2, 3);
    if (dlclose(library) != 0) return 2;
  }
  say("sum=%d", sum);
  int failures = 0;
  for (size_t size : {size_t{48}, size_t{320}, size_t{5000}}) {
    void* block = malloc(opaque(size));
    if (!block) return 2;
    fill_pattern(block, size, 6);
    if (!pattern_intact(block, size, 6)) ++failures;
    free(block);
  }
  say("done failures=%d", failures);
  return failures ? 3 : 0;
}

// dlmopen into the base namespace is a dlopen there.
TORTURE_SCENARIO(deepbind_dlmopen) {
  using namespace deepbind;
  if (mode_pools()) say("pooled=%d", torture::warm_until_pooled(48, 48) ? 1 : 0);
  void* library = dlmopen(LM_ID_BASE, TORTURE_DEEPBIND_HELPER, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  if (!library) {
    say("dlmopen failed: %s", dlerror());
    return 2;
  }
  auto lib_malloc = find<Malloc>(library, "deepbind_malloc");
  auto lib_free = find<Free>(library, "deepbind_free");
  auto lib_malloc_file = find<FileName>(library, "deepbind_malloc_file");
  if (!lib_malloc || !lib_free || !lib_malloc_file) return 2;
  say("library_malloc=%s", lib_malloc_file());
  int failures = library_frees("library", lib_free);
  failures += program_frees("library", lib_malloc);
  dlclose(library);
  say("done failures=%d", failures);
  return failures ? 3 : 0;
}

// Two threads load, use and unload deep-bound libraries at the same time:
// one thread's walk over the loaded objects meets the other's dlopen in
// the middle of relocating its library.
TORTURE_SCENARIO(deepbind_threads) {
  using namespace deepbind;
  if (mode_pools()) say("pooled=%d", torture::warm_until_pooled(48, 48) ? 1 : 0);
  constexpr int kRounds = 150;
  std::atomic<int> failures{0};
  auto rounds = [&](const char* path, int mode, const char* free_name, const char* what) {
    for (int round = 0; round < kRounds; ++round) {
      void* library = dlopen(path, mode);
      if (!library) {
        say("dlopen failed: %s", dlerror());
        ++failures;
        return;
      }
      auto lib_free = find<Free>(library, free_name);
      if (!lib_free || library_frees(what, lib_free) != 0) ++failures;
      if (dlclose(library) != 0) ++failures;
    }
  };
  std::thread first(rounds, TORTURE_DEEPBIND_HELPER, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND, "deepbind_free",
                    "helper");
  std::thread second(rounds, TORTURE_DL_HELPER, RTLD_LAZY | RTLD_LOCAL | RTLD_DEEPBIND, "torture_dl_free_block",
                     "dl-helper");
  first.join();
  second.join();
  say("done failures=%d", failures.load());
  return failures ? 3 : 0;
}

// Bare names: found through this program's RUNPATH (dlopen searches the
// caller's), deep-bound or not, and through ld.so.cache; $ORIGIN: this
// program's directory.
TORTURE_SCENARIO(deepbind_search) {
  void* plain = dlopen(TORTURE_DEEPBIND_PLAIN_NAME, RTLD_NOW | RTLD_LOCAL);
  say("plain_by_runpath=%d", plain ? 1 : 0);
  void* deep = dlopen(TORTURE_DEEPBIND_HELPER_NAME, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  say("deep_by_runpath=%d", deep ? 1 : 0);
  if (!deep) say("error=%s", dlerror());
  void* cached = dlopen("libresolv.so.2", RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  say("deep_by_cache=%d", cached ? 1 : 0);
  // $ORIGIN is this program's directory, where the helpers are built.
  void* by_origin = dlopen("$ORIGIN/" TORTURE_DEEPBIND_PLAIN_NAME, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  say("deep_by_origin=%d", by_origin ? 1 : 0);
  if (!by_origin) say("error=%s", dlerror());
  if (deep) {
    auto lib_free = deepbind::find<deepbind::Free>(deep, "deepbind_free");
    if (!lib_free || deepbind::library_frees("library", lib_free) != 0) return 3;
  }
  for (void* library : {plain, deep, cached, by_origin})
    if (library) dlclose(library);
  say("done");
  return plain && deep && cached && by_origin ? 0 : 3;
}

TEST(Deepbind, BlocksCrossTheBoundaryOfADeepboundLibraryInBothDirections) {
  const ScenarioRun run = run_scenario("deepbind", Preload::Yes, {}, 10);
  if (mode_pools()) {
    ASSERT_EQ(run.value("pooled"), "1") << describe(run);
  }
  EXPECT_EQ(run.value("nested"), "1") << describe(run);
  EXPECT_EQ(run.value("bare_name"), "1") << describe(run);
  EXPECT_EQ(run.value("missing"), "0") << describe(run);
  EXPECT_NE(run.value("error").find("libhotpool-no-such-library.so"), std::string::npos) << describe(run);
  EXPECT_EQ(run.value("error_after"), "0") << "dlerror() reports an error once" << describe(run);
  EXPECT_EQ(run.status, "exit 0")
      << "a library opened with RTLD_DEEPBIND binds malloc/free to " << run.value("library_malloc")
      << " while the program's are " << run.value("program_malloc") << "; the last step it started was "
      << run.value("step") << " (size " << run.value("size") << "). " << describe(run);
}

TEST(Deepbind, TheDeepboundLibrarysMallocIsHotpools) {
  const ScenarioRun run = run_scenario("deepbind", Preload::Yes, {}, 10);
  ASSERT_EQ(run.status, "exit 0") << describe(run);
  EXPECT_NE(run.value("program_malloc").find("libhotpool"), std::string::npos) << describe(run);
  if (torture::mode_records()) {
    // Its malloc family is hotpool's, and so is its dependency's; its
    // other symbols stay deep-bound.
    EXPECT_NE(run.value("library_malloc").find("libhotpool"), std::string::npos) << describe(run);
    EXPECT_NE(run.value("dependency_malloc").find("libhotpool"), std::string::npos) << describe(run);
  } else {
    // Mode off hands out no block of its own: nothing is rebound.
    EXPECT_NE(run.value("library_malloc").find("libc.so"), std::string::npos) << describe(run);
  }
}

TEST(Deepbind, ALazilyBoundLibraryGetsHotpoolsFreeAtItsFirstCall) {
  const ScenarioRun run = run_scenario("deepbind_lazy", Preload::Yes, {"LD_BIND_NOW="}, 10);
  if (mode_pools()) {
    ASSERT_EQ(run.value("pooled"), "1") << describe(run);
  }
  EXPECT_EQ(run.status, "exit 0") << "the last step it started was " << run.value("step") << " (size "
                                  << run.value("size") << "). " << describe(run);
  if (torture::mode_records()) {
    EXPECT_NE(run.value("library_malloc").find("libhotpool"), std::string::npos) << describe(run);
  }
}

TEST(Deepbind, ADeepboundLibraryThatNeverAllocatesWorks) {
  const ScenarioRun run = run_scenario("deepbind_plain", Preload::Yes, {}, 10);
  EXPECT_EQ(run.status, "exit 0") << describe(run);
  EXPECT_EQ(run.value("sum"), "10") << describe(run);
}

TEST(Deepbind, DlmopenIntoTheBaseNamespaceIsADlopen) {
  const ScenarioRun run = run_scenario("deepbind_dlmopen", Preload::Yes, {}, 10);
  if (mode_pools()) {
    ASSERT_EQ(run.value("pooled"), "1") << describe(run);
  }
  EXPECT_EQ(run.status, "exit 0") << "the last step it started was " << run.value("step") << " (size "
                                  << run.value("size") << "). " << describe(run);
  if (torture::mode_records()) {
    EXPECT_NE(run.value("library_malloc").find("libhotpool"), std::string::npos) << describe(run);
  }
}

TEST(Deepbind, TwoThreadsLoadAndUnloadDeepboundLibrariesAtOnce) {
  const ScenarioRun run = run_scenario("deepbind_threads", Preload::Yes, {"LD_BIND_NOW="}, 30);
  if (mode_pools()) {
    ASSERT_EQ(run.value("pooled"), "1") << describe(run);
  }
  EXPECT_EQ(run.status, "exit 0") << describe(run);
}

TEST(Deepbind, FileNamesAreResolvedAsDlopenResolvesThemForItsCaller) {
  const ScenarioRun glibc = run_scenario("deepbind_search", Preload::No, {}, 10);
  ASSERT_EQ(glibc.status, "exit 0") << "without hotpool: " << describe(glibc);
  const ScenarioRun run = run_scenario("deepbind_search", Preload::Yes, {}, 10);
  EXPECT_EQ(run.value("plain_by_runpath"), "1") << describe(run);
  EXPECT_EQ(run.value("deep_by_runpath"), "1") << describe(run);
  EXPECT_EQ(run.value("deep_by_cache"), "1") << describe(run);
  EXPECT_EQ(run.value("deep_by_origin"), "1") << describe(run);
  EXPECT_EQ(run.status, "exit 0") << describe(run);
}

}  // namespace
