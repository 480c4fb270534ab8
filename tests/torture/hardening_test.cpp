// Hardening under libhotpool.so: what happens to a program that frees a
// pooled block twice, or frees a pointer that is not a block, and what a
// write into a freed pooled block can do.
//
// A cache in front of glibc switches glibc's own checks off for the sizes it
// serves, so hotpool must replace them (DESIGN.md §5): a double free or an
// invalid free of a pooled block ends the process with one "hotpool: ..."
// line and abort(); a double free from two threads that hotpool cannot
// pin on either is quarantined (one warning line, the process goes on) and
// the block is never handed out twice. Pooled blocks exist in modes fixed
// (class 48 is in its HOTPOOL_CLASSES) and auto (once the class is warm);
// in modes off and profile glibc's own double-free abort is checked.
//
// Cases that need a known thread-cache state run as scenarios in fresh
// processes (torture.h); the others are gtest death tests.
#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "torture.h"

namespace {

using torture::count_duplicates;
using torture::describe;
using torture::fill_pattern;
using torture::killed_by;
using torture::mode_pools;
using torture::mode_under_test;
using torture::opaque;
using torture::pattern_intact;
using torture::Preload;
using torture::run_scenario;
using torture::say;
using torture::ScenarioRun;

constexpr size_t kClass = 48;  // pooled in modes fixed and auto (warm)

// A pooled block of class 48, or nullptr when the class cannot be pooled
// (the scenario then says pooled=0 and the test fails on that).
void* pooled_block() { return torture::pooled_block(kClass, kClass); }

// A "step" handshake between a scenario's threads.
class Steps {
 public:
  void reach(int step) {
    std::lock_guard lock(mutex_);
    step_ = step;
    changed_.notify_all();
  }
  void wait_for(int step) {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return step_ >= step; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  int step_ = 0;
};

// After a suspicious free: allocates `count` blocks of the class in this
// thread and says how many of them (and of `also_live`) are the same block.
size_t duplicates_after(size_t count, std::vector<void*> also_live = {}) {
  for (size_t i = 0; i < count; ++i) {
    void* block = malloc(opaque(kClass));
    if (block) fill_pattern(block, kClass, i);
    also_live.push_back(block);
  }
  return count_duplicates(also_live);
}

// A death: killed by SIGABRT, having said `message`.
void expect_abort_saying(const ScenarioRun& run, const std::string& message) {
  EXPECT_EQ(run.status, killed_by(SIGABRT)) << describe(run);
  EXPECT_TRUE(run.said(message)) << "expected \"" << message << "\"; " << describe(run);
  EXPECT_FALSE(run.said("continued=1")) << "the process went on after the bad free: " << describe(run);
}

#define SKIP_UNLESS_POOLING()                                               \
  do {                                                                      \
    if (!mode_pools()) {                                                    \
      GTEST_SKIP() << "no pooled blocks in mode " << mode_under_test();     \
    }                                                                       \
  } while (0)

// ---------------------------------------------------------------------------
// Double free in one thread: HOTPOOL_CACHE=96 gives class 48 a thread cache
// of exactly two blocks, refilled one block at a time, so "empty" and
// "full" are known states (HOTPOOL_CACHE_GROW=0: the bin never grows past
// them); HOTPOOL_SAMPLE=0 keeps sampled blocks out, so a block of usable
// size 48 is a pooled one.

const std::vector<std::string> kTwoBlockCache = {"HOTPOOL_CACHE=96", "HOTPOOL_CACHE_GROW=0", "HOTPOOL_SAMPLE=0"};

// Three blocks of the class, the last of which leaves the thread cache
// empty: the cache held at most two blocks, and every allocation after it
// ran dry refilled one block and handed it out.
bool three_pooled_blocks_last_empties_the_cache(void* blocks[3]) {
  if (!torture::warm_until_pooled(kClass, kClass)) return false;
  for (int i = 0; i < 3; ++i) blocks[i] = malloc(opaque(kClass));
  for (int i = 0; i < 3; ++i)
    if (!blocks[i] || malloc_usable_size(blocks[i]) != kClass) return false;
  return true;
}

TORTURE_SCENARIO(double_free_cache_empty) {
  void* blocks[3];
  const bool pooled = three_pooled_blocks_last_empties_the_cache(blocks);
  say("pooled=%d", pooled ? 1 : 0);
  if (!pooled) return 2;
  free(blocks[2]);  // the cache now holds just this block
  free(blocks[2]);
  say("continued=1");
  return 0;
}

TORTURE_SCENARIO(double_free_cache_full) {
  void* blocks[3];
  const bool pooled = three_pooled_blocks_last_empties_the_cache(blocks);
  say("pooled=%d", pooled ? 1 : 0);
  if (!pooled) return 2;
  free(blocks[0]);
  free(blocks[1]);  // the cache is full (two blocks)
  free(blocks[2]);  // drains the older one to the depot, keeps this one
  free(blocks[2]);
  say("continued=1");
  return 0;
}

TEST(DoubleFree, SameThreadWithItsCacheEmptyAborts) {
  SKIP_UNLESS_POOLING();
  const ScenarioRun run = run_scenario("double_free_cache_empty", Preload::Yes, kTwoBlockCache);
  ASSERT_EQ(run.value("pooled"), "1") << describe(run);
  expect_abort_saying(run, "hotpool: double free of a pooled block (it is in this thread's cache)");
}

TEST(DoubleFree, SameThreadWithItsCacheFullAborts) {
  SKIP_UNLESS_POOLING();
  const ScenarioRun run = run_scenario("double_free_cache_full", Preload::Yes, kTwoBlockCache);
  ASSERT_EQ(run.value("pooled"), "1") << describe(run);
  expect_abort_saying(run, "hotpool: double free of a pooled block (it is in this thread's cache)");
}

// The block left the thread cache for the depot before the second free:
// freeing many blocks after it drains the cache (default cache size).
TORTURE_SCENARIO(double_free_after_drain) {
  void* block = pooled_block();
  say("pooled=%d", block ? 1 : 0);
  if (!block) return 2;
  std::vector<void*> others;
  for (int i = 0; i < 300; ++i) others.push_back(malloc(opaque(kClass)));
  free(block);
  for (void* other : others) free(other);  // the oldest cached blocks go to the depot
  free(block);
  say("continued=1");
  return 0;
}

TEST(DoubleFree, AfterTheBlockWentBackToTheDepotAborts) {
  SKIP_UNLESS_POOLING();
  const ScenarioRun run = run_scenario("double_free_after_drain", Preload::Yes);
  ASSERT_EQ(run.value("pooled"), "1") << describe(run);
  expect_abort_saying(run, "hotpool: double free of a pooled block (it is back in the pool's depot)");
}

// The first free came from a thread that has exited since (its cache went
// back to the depot).
TORTURE_SCENARIO(double_free_after_thread_exit) {
  void* block = pooled_block();
  say("pooled=%d", block ? 1 : 0);
  if (!block) return 2;
  std::thread([block] {
    free(malloc(opaque(kClass)));  // an attached thread with a cache of its own
    free(block);
  }).join();
  free(block);
  say("continued=1");
  return 0;
}

TEST(DoubleFree, AfterTheFreeingThreadExitedAborts) {
  SKIP_UNLESS_POOLING();
  const ScenarioRun run = run_scenario("double_free_after_thread_exit", Preload::Yes);
  ASSERT_EQ(run.value("pooled"), "1") << describe(run);
  expect_abort_saying(run, "hotpool: double free of a pooled block");
}

// Freed in thread A, which keeps it in its cache and stays alive, then again
// in thread B: B cannot find it in its own cache nor in the depot. Expected:
// the one-line quarantine warning, the process goes on, and the block is
// never handed out twice (A, B and main then allocate thousands of blocks
// and keep them all live).
int cross_thread_double_free(bool freer_is_fresh) {
  void* block = pooled_block();
  say("pooled=%d", block ? 1 : 0);
  if (!block) return 2;
  Steps steps;
  std::vector<void*> from_a, from_b;
  std::thread a([&] {
    free(malloc(opaque(kClass)));
    free(block);  // into A's cache
    steps.reach(1);
    steps.wait_for(2);
    for (int i = 0; i < 3000; ++i) from_a.push_back(malloc(opaque(kClass)));  // A's cache first
    steps.reach(3);
    steps.wait_for(4);  // A stays alive until everything was counted
  });
  steps.wait_for(1);
  std::thread b([&] {
    // A fresh thread's first allocator call is this free; an attached one
    // has allocated before.
    if (!freer_is_fresh) free(malloc(opaque(kClass)));
    free(block);
    say("continued=1");
    for (int i = 0; i < 3000; ++i) from_b.push_back(malloc(opaque(kClass)));
  });
  b.join();
  steps.reach(2);
  steps.wait_for(3);
  std::vector<void*> live = from_a;
  live.insert(live.end(), from_b.begin(), from_b.end());
  const size_t duplicates = duplicates_after(3000, live);
  say("duplicates=%zu", duplicates);
  steps.reach(4);
  a.join();
  return 0;  // the blocks stay allocated: freeing a duplicate twice would abort
}

TORTURE_SCENARIO(cross_thread_double_free_attached) { return cross_thread_double_free(false); }
TORTURE_SCENARIO(cross_thread_double_free_fresh) { return cross_thread_double_free(true); }

constexpr char kQuarantineWarning[] =
    "hotpool: a pooled block was freed twice, probably by two threads; it is quarantined";

TEST(DoubleFree, CrossThreadIsQuarantinedWithOneWarningAndNeverHandedOutTwice) {
  SKIP_UNLESS_POOLING();
  const ScenarioRun run = run_scenario("cross_thread_double_free_attached", Preload::Yes);
  ASSERT_EQ(run.value("pooled"), "1") << describe(run);
  EXPECT_EQ(run.status, "exit 0") << describe(run);
  EXPECT_TRUE(run.said(kQuarantineWarning)) << describe(run);
  EXPECT_EQ(run.value("duplicates"), "0") << "a block was handed out twice after the double free. " << describe(run);
}

TEST(DoubleFree, CrossThreadFromAThreadWhoseFirstCallIsTheFreeIsQuarantinedToo) {
  SKIP_UNLESS_POOLING();
  const ScenarioRun run = run_scenario("cross_thread_double_free_fresh", Preload::Yes);
  ASSERT_EQ(run.value("pooled"), "1") << describe(run);
  // Either outcome of DESIGN.md is acceptable here (an abort naming the
  // double free, or the quarantine warning), but never silence, and never
  // the same block handed out twice.
  const bool aborted = run.status == killed_by(SIGABRT) && run.said("hotpool: ");
  if (!aborted) {
    EXPECT_EQ(run.status, "exit 0") << describe(run);
    EXPECT_TRUE(run.said(kQuarantineWarning))
        << "the second free, the first allocator call of its thread, passed silently. " << describe(run);
    EXPECT_EQ(run.value("duplicates"), "0") << "a block was handed out twice after the double free. "
                                            << describe(run);
  }
}

// ---------------------------------------------------------------------------
// Invalid frees (death tests in this process: the state does not matter)

class InvalidFree : public testing::Test {
 protected:
  void SetUp() override {
    SKIP_UNLESS_POOLING();
    block_ = static_cast<char*>(pooled_block());
    ASSERT_NE(block_, nullptr) << "class 48 is not pooled";
  }
  void TearDown() override { free(block_); }
  char* block_ = nullptr;
};

TEST_F(InvalidFree, InteriorPointerPlus16OfAPooledBlockAborts) {
  EXPECT_EXIT(free(opaque(block_ + 16)), testing::KilledBySignal(SIGABRT),
              "hotpool: free\\(\\) of a pointer into the middle of a pooled block");
}

TEST_F(InvalidFree, MisalignedPointerPlus1OfAPooledBlockAborts) {
  EXPECT_EXIT(free(opaque(block_ + 1)), testing::KilledBySignal(SIGABRT),
              "hotpool: free\\(\\) of a pointer into the middle of a pooled block");
}

TEST_F(InvalidFree, InteriorPointerPassedToReallocAborts) {
  EXPECT_EXIT(free(realloc(opaque(block_ + 16), 100)), testing::KilledBySignal(SIGABRT),
              "hotpool: free\\(\\) of a pointer into the middle of a pooled block");
}

TEST_F(InvalidFree, PointerIntoThePoolRegionBeyondAnythingHandedOutAborts) {
  // 16 MiB past a block of the class, inside the class's area (at least
  // 1 GiB) but far past the slabs carved so far, at a block boundary.
  char* never = block_ + (size_t{16} << 20) / kClass * kClass;
  EXPECT_EXIT(free(opaque(never)), testing::KilledBySignal(SIGABRT),
              "hotpool: free\\(\\) of a pointer into pool memory that was never handed out");
}

// A block start inside a carved slab that was never handed out (it sits free
// in the depot): nothing in it says "freed", so only the depot knows.
TORTURE_SCENARIO(free_never_handed_out_block) {
  char* block = static_cast<char*>(pooled_block());
  say("pooled=%d", block ? 1 : 0);
  if (!block) return 2;
  // A fresh process has handed out a few dozen blocks of the class at most
  // (warming recycles the same ones); 200 blocks on is in the same 64 KiB
  // slab and was never handed out.
  char* never = block + 200 * kClass;
  free(never);
  say("continued=1");
  // If it was accepted, it is now free twice over (in this thread's cache
  // and in the depot): allocate enough to get both.
  say("duplicates=%zu", duplicates_after(4000));
  return 0;
}

TEST(InvalidFreeOfABlockStart, NeverHandedOutBlockInACarvedSlabAborts) {
  SKIP_UNLESS_POOLING();
  const ScenarioRun run = run_scenario("free_never_handed_out_block", Preload::Yes);
  ASSERT_EQ(run.value("pooled"), "1") << describe(run);
  EXPECT_EQ(run.status, killed_by(SIGABRT))
      << "free() of a pool block that was never allocated must not pass silently"
      << (run.number("duplicates") ? " (it did, and the block was then handed out twice)" : "") << ". "
      << describe(run);
  EXPECT_TRUE(run.said("hotpool: ")) << describe(run);
}

// ---------------------------------------------------------------------------
// Sampled blocks (HOTPOOL_SAMPLE=1: every allocation is one, in every mode
// but off) come from a region of their own, with checks of their own: a
// double free, or a free of a pointer inside one, aborts as a pooled
// block's does. An aligned one (memalign & co.) may start further into its
// region block than a malloc'ed one, so pointers around it are checked too.

TORTURE_SCENARIO(sampled_bad_free) {
  const char* what = getenv("SAMPLED_BAD_FREE");
  if (!what) return 2;
  char* plain = static_cast<char*>(malloc(opaque(size_t{100})));
  char* aligned = static_cast<char*>(memalign(opaque(size_t{256}), opaque(size_t{100})));
  if (!plain || !aligned || reinterpret_cast<uintptr_t>(aligned) % 256 != 0) return 3;
  const std::string bad = what;
  if (bad == "plain_double") {
    free(plain);
    free(opaque(plain));
  } else if (bad == "aligned_double") {
    free(aligned);
    free(opaque(aligned));
  } else if (bad == "aligned_double_after_reuse_as_plain") {
    // Its region block goes to the next malloc of its region class: one of
    // these sizes (kept, so each takes another block).
    free(aligned);
    bool reused = false;
    for (size_t size = 100; size <= 1024 && !reused; size += 8) {
      char* block = static_cast<char*>(malloc(opaque(size)));
      if (block == aligned) {  // it started where a malloc'ed one starts: a valid block again
        say("same_start=1");
        return 0;
      }
      reused = block && aligned > block && aligned < block + malloc_usable_size(block);
    }
    say("reused=%d", reused ? 1 : 0);
    if (!reused) return 4;
    free(opaque(aligned));
  } else if (bad == "plain_interior") {
    free(opaque(plain + 16));
  } else if (bad == "aligned_interior") {
    free(opaque(aligned + 32));
  } else if (bad == "aligned_before") {
    free(opaque(aligned - 16));
  } else if (bad == "aligned_interior_realloc") {
    free(realloc(opaque(aligned + 64), 10));
  } else {
    return 2;
  }
  say("continued=1");
  return 0;
}

class SampledBadFree : public testing::TestWithParam<std::tuple<const char*, const char*>> {};

TEST_P(SampledBadFree, Aborts) {
  if (mode_under_test() == "off") GTEST_SKIP() << "nothing is sampled in mode off";
  const auto [what, message] = GetParam();
  const ScenarioRun run =
      run_scenario("sampled_bad_free", Preload::Yes, {"HOTPOOL_SAMPLE=1", std::string("SAMPLED_BAD_FREE=") + what});
  if (run.value("same_start") == "1") GTEST_SKIP() << "the aligned block started where a malloc'ed one starts";
  expect_abort_saying(run, message);
}

constexpr const char* kSampledDoubleFree = "hotpool: double free of a sampled block";
constexpr const char* kSampledInterior = "hotpool: free() of a pointer into the middle of a pooled block";
INSTANTIATE_TEST_SUITE_P(
    Cases, SampledBadFree,
    testing::Values(std::tuple{"plain_double", kSampledDoubleFree}, std::tuple{"aligned_double", kSampledDoubleFree},
                    // The block is a malloc'ed sample's again: the stale pointer is inside it.
                    std::tuple{"aligned_double_after_reuse_as_plain", kSampledInterior},
                    std::tuple{"plain_interior", kSampledInterior}, std::tuple{"aligned_interior", kSampledInterior},
                    std::tuple{"aligned_before", kSampledInterior},
                    std::tuple{"aligned_interior_realloc", kSampledInterior}),
    [](const testing::TestParamInfo<SampledBadFree::ParamType>& param) { return std::string(std::get<0>(param.param)); });

// A stack pointer is outside the pool region: glibc's free() gets it and
// aborts. Every mode: the process dies with a message, never goes on.
TEST(InvalidFreeAnyMode, StackPointerKillsTheProcessWithAMessage) {
  EXPECT_EXIT(
      {
        alignas(16) char on_stack[128] = {};
        free(opaque(on_stack + 32));
        fprintf(stderr, "continued=1\n");
        _exit(0);
      },
      testing::KilledBySignal(SIGABRT), "free\\(\\)|hotpool: ");
}

// Modes off and profile hand frees to glibc, whose tcache catches a double
// free; hotpool must not hide that.
TEST(DoubleFreeWithoutPools, GlibcStillAbortsOnADoubleFree) {
  if (mode_pools()) {
    GTEST_SKIP() << "mode " << mode_under_test() << " pools class 48: see DoubleFree.*";
  }
  EXPECT_EXIT(
      {
        void* block = malloc(opaque(kClass));
        free(block);
        free(opaque(block));
        fprintf(stderr, "continued=1\n");
        _exit(0);
      },
      testing::KilledBySignal(SIGABRT), "double free");
}

// ---------------------------------------------------------------------------
// Write after free: a pooled cache keeps nothing in freed memory but a
// marker word, so scribbling over a freed block (even with pointers to live
// blocks, as an attacker forging a free list would) corrupts nothing else.

void expect_scribble_harmless(void* freed, const std::vector<void*>& live_before) {
  // Pointer-like garbage: the addresses of live blocks, then 0xff.
  auto* words = static_cast<void**>(freed);
  for (size_t i = 0; i < kClass / sizeof(void*); ++i) words[i] = live_before[i % live_before.size()];
  std::memset(static_cast<char*>(freed) + kClass / 2, 0xff, kClass / 2);

  constexpr size_t kCount = 5000;
  std::vector<void*> blocks;
  for (size_t i = 0; i < kCount; ++i) {
    void* block = malloc(opaque(kClass));
    ASSERT_NE(block, nullptr);
    fill_pattern(block, kClass, i);
    blocks.push_back(block);
  }
  std::vector<void*> other_thread;
  std::thread([&] {
    for (size_t i = 0; i < kCount; ++i) {
      void* block = malloc(opaque(kClass));
      if (block) fill_pattern(block, kClass, kCount + i);
      other_thread.push_back(block);
    }
  }).join();
  size_t corrupted = 0;
  for (size_t i = 0; i < kCount; ++i) corrupted += !pattern_intact(blocks[i], kClass, i);
  for (size_t i = 0; i < kCount; ++i)
    corrupted += !other_thread[i] || !pattern_intact(other_thread[i], kClass, kCount + i);
  for (size_t i = 0; i < live_before.size(); ++i) corrupted += !pattern_intact(live_before[i], kClass, 1000000 + i);
  EXPECT_EQ(corrupted, 0u) << "blocks changed after a write into a freed pooled block";
  std::vector<void*> all = blocks;
  all.insert(all.end(), other_thread.begin(), other_thread.end());
  all.insert(all.end(), live_before.begin(), live_before.end());
  EXPECT_EQ(count_duplicates(all), 0u) << "a block was handed out twice after a write into a freed pooled block";
  for (void* block : all) free(block);
}

std::vector<void*> live_blocks(size_t count) {
  std::vector<void*> live;
  for (size_t i = 0; i < count; ++i) {
    live.push_back(malloc(opaque(kClass)));
    fill_pattern(live.back(), kClass, 1000000 + i);
  }
  return live;
}

TEST(WriteAfterFree, ScribblingOverAPooledBlockInTheThreadCacheCorruptsNothingElse) {
  SKIP_UNLESS_POOLING();
  void* block = pooled_block();
  ASSERT_NE(block, nullptr) << "class 48 is not pooled";
  const std::vector<void*> live = live_blocks(8);
  free(block);  // in this thread's cache
  expect_scribble_harmless(block, live);
}

TEST(WriteAfterFree, ScribblingOverAPooledBlockBackInTheDepotCorruptsNothingElse) {
  SKIP_UNLESS_POOLING();
  void* block = pooled_block();
  ASSERT_NE(block, nullptr) << "class 48 is not pooled";
  const std::vector<void*> live = live_blocks(8);
  std::vector<void*> others;
  for (int i = 0; i < 300; ++i) others.push_back(malloc(opaque(kClass)));
  free(block);
  for (void* other : others) free(other);  // `block` drains to the depot
  expect_scribble_harmless(block, live);
}

TEST(WriteAfterFree, ScribblingOverAPooledBlockFreedByAThreadThatExitedCorruptsNothingElse) {
  SKIP_UNLESS_POOLING();
  void* block = pooled_block();
  ASSERT_NE(block, nullptr) << "class 48 is not pooled";
  const std::vector<void*> live = live_blocks(8);
  std::thread([block] { free(block); }).join();
  expect_scribble_harmless(block, live);
}

}  // namespace
