// The dynamic loader under libhotpool.so: a library that allocates in its
// constructor and its functions loaded and unloaded hundreds of times while
// two threads allocate all along (the loader's lock and hotpool's must not
// deadlock, blocks must cross the library boundary in both directions and
// outlive the library); and a library opened with RTLD_DEEPBIND, whose
// malloc/free must pair up with the program's.
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

TORTURE_SCENARIO(deepbind) {
  if (mode_pools()) say("pooled=%d", torture::warm_until_pooled(48, 48) ? 1 : 0);
  void* library = dlopen(TORTURE_DEEPBIND_HELPER, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  if (!library) {
    say("dlopen failed: %s", dlerror());
    return 2;
  }
  auto* lib_malloc = reinterpret_cast<void* (*)(size_t)>(dlsym(library, "deepbind_malloc"));
  auto* lib_calloc = reinterpret_cast<void* (*)(size_t, size_t)>(dlsym(library, "deepbind_calloc"));
  auto* lib_realloc = reinterpret_cast<void* (*)(void*, size_t)>(dlsym(library, "deepbind_realloc"));
  auto* lib_free = reinterpret_cast<void (*)(void*)>(dlsym(library, "deepbind_free"));
  auto* lib_usable = reinterpret_cast<size_t (*)(void*)>(dlsym(library, "deepbind_usable_size"));
  auto* lib_malloc_file = reinterpret_cast<const char* (*)()>(dlsym(library, "deepbind_malloc_file"));
  if (!lib_malloc || !lib_calloc || !lib_realloc || !lib_free || !lib_usable || !lib_malloc_file) return 2;
  Dl_info ours{};
  dladdr(reinterpret_cast<void*>(dlsym(RTLD_DEFAULT, "malloc")), &ours);
  say("library_malloc=%s program_malloc=%s", lib_malloc_file(), ours.dli_fname ? ours.dli_fname : "?");
  int failures = 0;

  for (size_t size : {size_t{48}, size_t{320}, size_t{5000}}) {
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
  dlclose(library);

  // Bare names are searched as dlopen searches them for this program; a
  // missing library fails as it does without hotpool.
  void* by_name = dlopen("libm.so.6", RTLD_NOW | RTLD_DEEPBIND);
  say("bare_name=%d", by_name ? 1 : 0);
  if (!by_name) ++failures;
  else dlclose(by_name);
  dlerror();
  void* missing = dlopen("libhotpool-no-such-library.so", RTLD_NOW | RTLD_DEEPBIND);
  const char* error = dlerror();
  say("missing=%d error=%d", missing ? 1 : 0, error ? 1 : 0);
  if (missing || !error) ++failures;
  say("done failures=%d", failures);
  return failures ? 3 : 0;
}

TEST(Deepbind, BlocksCrossTheBoundaryOfADeepboundLibraryInBothDirections) {
  const ScenarioRun run = run_scenario("deepbind", Preload::Yes, {}, 10);
  if (mode_pools()) {
    ASSERT_EQ(run.value("pooled"), "1") << describe(run);
  }
  const char* mode = std::getenv("HOTPOOL_MODE");
  if (mode && std::string(mode) != "off") {
    // Where hotpool hands out blocks of its own, the library's malloc
    // family is hotpool's (its other symbols stay deep-bound).
    EXPECT_NE(run.value("library_malloc").find("libhotpool"), std::string::npos) << describe(run);
  }
  EXPECT_EQ(run.value("bare_name"), "1") << describe(run);
  EXPECT_EQ(run.value("missing"), "0") << describe(run);
  EXPECT_EQ(run.status, "exit 0")
      << "a library opened with RTLD_DEEPBIND binds malloc/free to " << run.value("library_malloc")
      << " while the program's are " << run.value("program_malloc") << "; the last step it started was "
      << run.value("step") << " (size " << run.value("size") << "). " << describe(run);
}

}  // namespace
