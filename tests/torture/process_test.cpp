// Processes and threads under libhotpool.so, the rough way: posix_spawn and
// vfork+exec from several threads while others allocate; pthread_cancel of
// threads busy in malloc/free loops (deferred, and asynchronous in a
// process of its own), after which the process allocates on and exits
// cleanly; a thread that only frees blocks others allocated, pooled and not.
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <spawn.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "torture.h"

extern char** environ;

namespace {

using torture::count_duplicates;
using torture::describe;
using torture::fill_pattern;
using torture::mode_pools;
using torture::mode_records;
using torture::opaque;
using torture::pattern_intact;
using torture::Preload;
using torture::run_scenario;
using torture::say;
using torture::ScenarioRun;
using torture::wait_for_child;

// Sizes of pooled classes (mode fixed's HOTPOOL_CLASSES, and hot enough for
// mode auto) and of unpooled ones (70000 is above fixed's largest class).
constexpr size_t kMixedSizes[] = {24, 48, 48, 64, 300, 600, 1000, 5000, 70000};

// In a forked child, where gtest assertions cannot be used: report a
// failed check on stderr and remember it; the exit status says.
int g_child_failures = 0;
#define CHILD_CHECK(condition)                                                                          \
  do {                                                                                                  \
    if (!(condition)) {                                                                                 \
      fprintf(stderr, "child %d: %s:%d: check failed: %s\n", (int)getpid(), __FILE__, __LINE__, #condition); \
      ++g_child_failures;                                                                               \
    }                                                                                                   \
  } while (0)

// Allocates, fills, checks and frees assorted sizes until `stop`.
void allocate_until(const std::atomic<bool>& stop, unsigned seed, std::atomic<int>& corrupted) {
  std::mt19937 random(seed);
  struct Slot {
    void* block = nullptr;
    size_t size = 0;
    uint64_t seed = 0;
  } slots[96];
  while (!stop.load(std::memory_order_relaxed)) {
    for (int op = 0; op < 256; ++op) {
      Slot& slot = slots[random() % 96];
      if (slot.block) {
        if (!pattern_intact(slot.block, slot.size, slot.seed)) ++corrupted;
        free(slot.block);
        slot.block = nullptr;
        continue;
      }
      slot.size = kMixedSizes[random() % 9];
      slot.seed = random();
      slot.block = malloc(opaque(slot.size));
      if (slot.block) fill_pattern(slot.block, slot.size, slot.seed);
      else ++corrupted;
    }
  }
  for (Slot& slot : slots) {
    if (slot.block && !pattern_intact(slot.block, slot.size, slot.seed)) ++corrupted;
    free(slot.block);
  }
}

// ---------------------------------------------------------------------------
// posix_spawn and vfork+exec from several threads

// vfork's child shares this thread's stack and memory until it execs: it
// must do nothing but execve and _exit (no allocation, no return), so it
// lives in a function of its own whose frame outlives the child.
__attribute__((noinline)) pid_t vfork_exec(const char* path, char* const argv[], char* const envp[]) {
  const pid_t child = vfork();
  if (child == 0) {
    execve(path, argv, envp);
    _exit(127);
  }
  return child;
}

TEST(Spawn, PosixSpawnAndVforkExecFromThreeThreadsWhileTwoOthersAllocate) {
  constexpr int kSpawners = 3, kSpawnsEach = 16;
  std::atomic<bool> stop{false};
  std::atomic<int> corrupted{0};
  std::vector<std::thread> allocating;
  for (unsigned t = 0; t < 2; ++t) allocating.emplace_back([&, t] { allocate_until(stop, 10 + t, corrupted); });

  std::atomic<int> spawned{0};
  std::vector<std::string> failures[kSpawners];
  std::vector<std::thread> spawners;
  for (int s = 0; s < kSpawners; ++s) {
    spawners.emplace_back([&, s] {
      char program[] = "/bin/true";
      char* argv[] = {program, nullptr};
      for (int i = 0; i < kSpawnsEach; ++i) {
        // The spawning thread allocates between spawns too.
        void* block = malloc(opaque(kMixedSizes[(s + i) % 9]));
        pid_t child = -1;
        const bool use_vfork = (s + i) % 2 == 1;
        if (use_vfork) {
          child = vfork_exec(program, argv, environ);
        } else {
          const int error = posix_spawn(&child, program, nullptr, nullptr, argv, environ);
          if (error != 0) child = -1;
        }
        free(block);
        if (child < 0) {
          failures[s].push_back(std::string(use_vfork ? "vfork" : "posix_spawn") + " failed");
          continue;
        }
        const std::string status = wait_for_child(child);
        if (status != "exit 0")
          failures[s].push_back(std::string(use_vfork ? "vfork+exec" : "posix_spawn") + " of /bin/true: " + status);
        ++spawned;
      }
    });
  }
  for (std::thread& thread : spawners) thread.join();
  stop = true;
  for (std::thread& thread : allocating) thread.join();
  for (const auto& list : failures)
    for (const std::string& failure : list) ADD_FAILURE() << failure;
  EXPECT_EQ(spawned.load(), kSpawners * kSpawnsEach);
  EXPECT_EQ(corrupted.load(), 0);
}

// ---------------------------------------------------------------------------
// pthread_cancel

struct LoopState {
  std::atomic<uint64_t> rounds{0};
  void* live[16] = {};  // the thread's live blocks, freed by its cleanup handler
  size_t sizes[16] = {};
};

void free_live_blocks(void* arg) {
  auto* state = static_cast<LoopState*>(arg);
  for (void*& block : state->live) {
    free(block);
    block = nullptr;
  }
}

// A malloc/free loop with one cancellation point per round.
void* cancellable_loop(void* arg) {
  auto* state = static_cast<LoopState*>(arg);
  pthread_cleanup_push(free_live_blocks, state);
  for (uint64_t round = 0;; ++round) {
    for (unsigned i = 0; i < 16; ++i) {
      const unsigned slot = static_cast<unsigned>((round * 7 + i) % 16);
      free(state->live[slot]);
      state->live[slot] = nullptr;  // no window where the handler could free it twice
      state->sizes[slot] = kMixedSizes[(round + i) % 9];
      state->live[slot] = malloc(opaque(state->sizes[slot]));
      if (state->live[slot])
        std::memset(state->live[slot], static_cast<int>(i), state->sizes[slot] < 64 ? state->sizes[slot] : 64);
    }
    state->rounds.store(round + 1, std::memory_order_relaxed);
    pthread_testcancel();
  }
  pthread_cleanup_pop(1);
  return nullptr;
}

// After threads were cancelled: the process allocates on (main and a new
// thread), never gets a block twice, and its blocks stay intact.
int allocate_after_cancellation() {
  int problems = 0;
  std::vector<void*> blocks;
  for (int i = 0; i < 6000; ++i) {
    const size_t size = kMixedSizes[i % 9];
    void* block = malloc(opaque(size));
    if (!block) {
      ++problems;
      continue;
    }
    fill_pattern(block, size, static_cast<uint64_t>(i));
    blocks.push_back(block);
  }
  std::vector<void*> from_thread;
  std::thread fresh([&] {
    for (int i = 0; i < 3000; ++i) from_thread.push_back(malloc(opaque(kMixedSizes[i % 9])));
  });
  fresh.join();
  for (size_t i = 0; i < blocks.size(); ++i)
    if (!pattern_intact(blocks[i], kMixedSizes[i % 9], i)) ++problems;
  std::vector<void*> all = blocks;
  all.insert(all.end(), from_thread.begin(), from_thread.end());
  if (count_duplicates(all) != 0) {
    fprintf(stderr, "%zu blocks handed out twice after the cancellations\n", count_duplicates(all));
    ++problems;
  }
  for (void* block : all) free(block);
  return problems;
}

// Waves of threads in malloc/free loops, cancelled (deferred) at the
// loop's cancellation point; after each wave the process allocates on. The
// scenario returns from main: exit(), atexit handlers and hotpool's exit
// report run.
TORTURE_SCENARIO(deferred_cancel) {
  constexpr int kThreads = 4;
  for (int wave = 0; wave < 3; ++wave) {
    LoopState states[kThreads];
    pthread_t threads[kThreads];
    for (int t = 0; t < kThreads; ++t)
      CHILD_CHECK(pthread_create(&threads[t], nullptr, cancellable_loop, &states[t]) == 0);
    // Let every thread get going (past its first refills) before cancelling.
    for (int t = 0; t < kThreads; ++t)
      while (states[t].rounds.load(std::memory_order_relaxed) < 50) sched_yield();
    for (int t = 0; t < kThreads; ++t) CHILD_CHECK(pthread_cancel(threads[t]) == 0);
    for (int t = 0; t < kThreads; ++t) {
      void* result = nullptr;
      CHILD_CHECK(pthread_join(threads[t], &result) == 0);
      CHILD_CHECK(result == PTHREAD_CANCELED);
      for (void* block : states[t].live) CHILD_CHECK(block == nullptr);  // the cleanup handler ran
    }
    CHILD_CHECK(allocate_after_cancellation() == 0);
    say("wave=%d", wave);
  }
  return g_child_failures ? 3 : 0;
}

void expect_deferred_cancellation_survived(const std::vector<std::string>& environment) {
  const ScenarioRun run = run_scenario("deferred_cancel", Preload::Yes, environment, 20);
  EXPECT_EQ(run.status, "exit 0")
      << (run.said("terminate called without an active exception")
              ? "A cancellation was acted on inside malloc or free, which are not cancellation points: glibc "
                "declares them noexcept, so the forced unwind ended this C++ program. "
              : "")
      << "Last wave completed: " << run.value("wave") << ". " << describe(run);
  const std::optional<preload_test::Json> report = preload_test::read_report(run.pid);
  if (!mode_records()) {
    EXPECT_FALSE(report);
  } else if (run.status == "exit 0") {
    ASSERT_TRUE(report) << "the scenario wrote no exit report at " << preload_test::report_path(run.pid);
    EXPECT_EQ(report->value("reason", ""), "exit");
  }
}

TEST(Cancel, DeferredCancellationOfThreadsInMallocLoopsThenMoreAllocationAndACleanExit) {
  expect_deferred_cancellation_survived({});
}

// The same with every allocation sampled (HOTPOOL_SAMPLE=1): the sampled
// path (stack capture) must not be a cancellation point either.
TEST(Cancel, DeferredCancellationWithEveryAllocationSampled) {
  if (!mode_records()) {
    GTEST_SKIP() << "mode off samples nothing";
  }
  expect_deferred_cancellation_survived({"HOTPOOL_SAMPLE=1"});
}

// Asynchronous cancellation: a thread may be stopped at any instruction,
// inside malloc or free. malloc is not async-cancel-safe, so the
// requirement is relative again: whatever plain glibc survives, hotpool
// must survive. The loop is malloc/free pairs of two small sizes: glibc
// serves them from its thread cache (tcache) without taking a lock once
// the thread is warm, which is what makes glibc survive; under hotpool
// they are pooled in modes fixed and auto.
void* async_cancellable_loop(void* arg) {
  auto* state = static_cast<LoopState*>(arg);
  pthread_setcanceltype(PTHREAD_CANCEL_ASYNCHRONOUS, nullptr);
  for (uint64_t round = 0;; ++round) {
    for (unsigned i = 0; i < 16; ++i) {
      void* small = malloc(opaque(size_t{48}));
      void* medium = malloc(opaque(size_t{300}));
      free(medium);
      free(small);
    }
    state->rounds.store(round + 1, std::memory_order_relaxed);
  }
  return nullptr;
}

TORTURE_SCENARIO(async_cancel) {
  constexpr int kThreads = 3, kWaves = 12;
  int problems = 0;
  for (int wave = 0; wave < kWaves; ++wave) {
    LoopState states[kThreads];
    pthread_t threads[kThreads];
    for (int t = 0; t < kThreads; ++t) pthread_create(&threads[t], nullptr, async_cancellable_loop, &states[t]);
    const uint64_t warm_rounds = 20 + static_cast<uint64_t>(wave * 13 % 50);  // vary where the cancel lands
    for (int t = 0; t < kThreads; ++t)
      while (states[t].rounds.load(std::memory_order_relaxed) < warm_rounds) sched_yield();
    for (int t = 0; t < kThreads; ++t) pthread_cancel(threads[t]);
    for (int t = 0; t < kThreads; ++t) {
      void* result = nullptr;
      pthread_join(threads[t], &result);
      // The loop never returns: a joined thread was cancelled. hotpool
      // defers a cancellation that arrives while it holds a lock or moves
      // blocks (pthread_setcancelstate); glibc 2.36 then acts on it when
      // the state is restored but leaves the thread's result NULL instead
      // of PTHREAD_CANCELED (a plain C program that disables and re-enables
      // cancellation shows the same).
      if (result != PTHREAD_CANCELED && result != nullptr) ++problems;
    }
    say("wave=%d", wave);
  }
  problems += allocate_after_cancellation();
  say("problems=%d", problems);
  return problems ? 3 : 0;  // returning from main: exit(), hotpool's exit report
}

TEST(Cancel, AsynchronousCancellationOfAllocatingThreadsIsSurvivedWhereGlibcSurvivesIt) {
  const ScenarioRun glibc = run_scenario("async_cancel", Preload::No, {}, 8);
  if (glibc.status != "exit 0") {
    GTEST_SKIP() << "plain glibc fails this scenario itself: " << describe(glibc);
  }
  // Default sampling, then every allocation sampled (the sampled path's
  // locks and stack capture are where a cancelled thread is most likely
  // to stop); mode off samples nothing.
  std::vector<std::vector<std::string>> environments = {{}};
  if (mode_records()) environments.push_back({"HOTPOOL_SAMPLE=1"});
  for (const std::vector<std::string>& environment : environments) {
    const ScenarioRun hotpool = run_scenario("async_cancel", Preload::Yes, environment, 2 * glibc.seconds + 1.5);
    EXPECT_EQ(hotpool.status, "exit 0")
        << (environment.empty() ? "" : "With " + environment[0] + ": ")
        << (hotpool.timed_out ? "hotpool deadlocked where glibc did not. " : "")
        << "Last wave completed: " << hotpool.value("wave") << ". " << describe(hotpool);
  }
}

// ---------------------------------------------------------------------------
// A thread that only frees

TEST(CrossThread, ThreadThatOnlyFreesPooledAndUnpooledBlocksOfOthers) {
  constexpr int kCount = 6000;
  if (mode_pools()) {
    ASSERT_TRUE(torture::warm_until_pooled(48, 48)) << "class 48 is not pooled";
  }
  struct Block {
    void* pointer;
    size_t size;
  };
  std::vector<Block> blocks;
  blocks.reserve(kCount);
  // Two producers: this thread and another one (whose blocks then outlive it).
  for (int i = 0; i < kCount / 2; ++i) blocks.push_back({malloc(opaque(kMixedSizes[i % 9])), kMixedSizes[i % 9]});
  std::thread producer([&] {
    for (int i = kCount / 2; i < kCount; ++i)
      blocks.push_back({malloc(opaque(kMixedSizes[i % 9])), kMixedSizes[i % 9]});
  });
  producer.join();
  for (size_t i = 0; i < blocks.size(); ++i) {
    ASSERT_NE(blocks[i].pointer, nullptr);
    fill_pattern(blocks[i].pointer, blocks[i].size, i);
  }
  // The freeing thread's very first allocator calls are frees of pooled
  // blocks (before any unpooled one), then everything else, in an order
  // unrelated to the allocation order.
  int corrupted = 0;
  std::thread freeing([&] {
    for (int pass = 0; pass < 2; ++pass) {
      for (size_t k = 0; k < blocks.size(); ++k) {
        const size_t i = (k * 7919) % blocks.size();
        if (!blocks[i].pointer) continue;
        const bool small = blocks[i].size <= 1000;
        if (pass == 0 && !small) continue;
        if (!pattern_intact(blocks[i].pointer, blocks[i].size, i)) ++corrupted;
        free(blocks[i].pointer);
        blocks[i].pointer = nullptr;
      }
    }
  });
  freeing.join();
  EXPECT_EQ(corrupted, 0);

  // The freed blocks went back to the pools and the real allocator exactly
  // once: allocating them all again, from two threads, gives distinct blocks.
  std::vector<void*> again;
  for (int i = 0; i < kCount; ++i) again.push_back(malloc(opaque(kMixedSizes[i % 9])));
  std::vector<void*> from_thread;
  std::thread other([&] {
    for (int i = 0; i < kCount; ++i) from_thread.push_back(malloc(opaque(kMixedSizes[i % 9])));
  });
  other.join();
  again.insert(again.end(), from_thread.begin(), from_thread.end());
  EXPECT_EQ(count_duplicates(again), 0u) << "blocks freed by a thread that only frees were handed out twice";
  for (void* block : again) free(block);
}

}  // namespace
