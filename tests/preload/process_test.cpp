// Processes and threads under libhotpool.so: blocks handed between threads,
// fork from a multi-threaded parent, exec of a preloaded helper, the very
// first allocator call of a process, dlopen/dlclose of an allocating
// library, allocation in thread-exit destructors after hotpool's own
// teardown, thread churn, and allocation when the address space runs out.
//
// Children are bounded with alarm() (a deadlock kills the child, the parent
// sees the signal) and every test has the suite's watchdog deadline.
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <new>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "support.h"

extern char** environ;

namespace {

using preload_test::class_allocations;
using preload_test::class_for_usable;
using preload_test::class_frees;
using preload_test::class_pool_field;
using preload_test::Json;
using preload_test::mode_records;
using preload_test::mode_under_test;
using preload_test::opaque;
using preload_test::read_report;
using preload_test::report_now;
using preload_test::wait_for_child;

using preload_test::fill_pattern;
using preload_test::pattern_intact;

uint64_t totals_field(const Json& report, const char* key) { return report["totals"][key].get<uint64_t>(); }

// In a forked child, where gtest assertions cannot be used: report a
// failed check on stderr and remember it; the child's exit status says.
int g_child_failures = 0;
#define CHILD_CHECK(condition)                                                              \
  do {                                                                                      \
    if (!(condition)) {                                                                     \
      fprintf(stderr, "child %d: %s:%d: check failed: %s (errno %d)\n", (int)getpid(),      \
              __FILE__, __LINE__, #condition, errno);                                       \
      ++g_child_failures;                                                                   \
    }                                                                                       \
  } while (0)

// A mix of allocator calls over assorted sizes, each block checked before
// it is freed; returns the number of corrupted blocks.
int churn_allocations(std::mt19937& random, int operations) {
  struct Slot {
    void* block = nullptr;
    size_t size = 0;
    uint64_t seed = 0;
  };
  Slot slots[64];
  int corrupted = 0;
  for (int op = 0; op < operations; ++op) {
    Slot& slot = slots[random() % 64];
    if (slot.block) {
      if (!pattern_intact(slot.block, slot.size, slot.seed)) ++corrupted;
      if (random() % 4 == 0) {
        const size_t grown = 1 + random() % 20000;
        void* moved = realloc(slot.block, grown);
        if (!moved) continue;
        if (!pattern_intact(moved, std::min(grown, slot.size), slot.seed)) ++corrupted;
        slot.block = moved;
        slot.size = grown;
        fill_pattern(moved, grown, slot.seed);
        continue;
      }
      free(slot.block);
      slot.block = nullptr;
      continue;
    }
    const size_t size = random() % 8 == 0 ? 1 + random() % 200000 : 1 + random() % 2000;
    switch (random() % 4) {
      case 0: slot.block = malloc(size); break;
      case 1: slot.block = calloc(1, size); break;
      case 2: slot.block = memalign(64, size); break;
      default: slot.block = ::operator new(size, std::nothrow); break;  // freed with free: libstdc++'s new is malloc
    }
    if (!slot.block) continue;
    slot.size = size;
    slot.seed = random();
    fill_pattern(slot.block, size, slot.seed);
  }
  for (Slot& slot : slots) {
    if (slot.block && !pattern_intact(slot.block, slot.size, slot.seed)) ++corrupted;
    free(slot.block);
  }
  return corrupted;
}

// ---------------------------------------------------------------------------

TEST(PreloadProcess, RunsUnderHotpoolInTheModeCTestAsked) {
  using ModeFunction = const char* (*)();
  auto* mode_function = reinterpret_cast<ModeFunction>(dlsym(RTLD_DEFAULT, "hotpool_mode"));
  ASSERT_NE(mode_function, nullptr) << "hotpool_mode not found: libhotpool.so is not preloaded";
  const char* wanted = getenv("HOTPOOL_MODE");
  ASSERT_NE(wanted, nullptr);
  EXPECT_STREQ(mode_function(), wanted);
  Dl_info info{};
  ASSERT_NE(dladdr(dlsym(RTLD_DEFAULT, "malloc"), &info), 0);
  EXPECT_NE(std::strstr(info.dli_fname, "libhotpool"), nullptr) << "malloc resolves to " << info.dli_fname;
}

// ---------------------------------------------------------------------------
// Threads

struct Message {
  unsigned char* data;
  size_t size;
  uint64_t seed;
};

TEST(CrossThread, BlocksAllocatedByProducersAreCheckedAndFreedByConsumers) {
  constexpr unsigned kProducers = 2, kConsumers = 2;
  constexpr uint64_t kPerProducer = 15000;
  constexpr size_t kQueueBound = 512;
  std::mutex mutex;
  std::condition_variable changed;
  std::deque<Message> queue;
  unsigned producers_left = kProducers;
  std::atomic<uint64_t> consumed{0}, corrupted{0}, failed_allocations{0};
  const std::optional<Json> before = report_now();

  std::vector<std::thread> threads;
  for (unsigned p = 0; p < kProducers; ++p) {
    threads.emplace_back([&, p] {
      for (uint64_t seq = 0; seq < kPerProducer; ++seq) {
        const uint64_t seed = p * kPerProducer + seq;
        const size_t size = seq % 97 == 0 ? 70000 + seq % 1000 : 1 + (seq * 7919 + p * 104729) % 3000;
        void* block = nullptr;
        switch (seq % 4) {
          case 0: block = malloc(size); break;
          case 1: block = calloc(size, 1); break;
          case 2: block = aligned_alloc(64, size); break;
          default: block = realloc(nullptr, size); break;
        }
        if (!block) {
          ++failed_allocations;
          continue;
        }
        fill_pattern(block, size, seed);
        std::unique_lock lock(mutex);
        changed.wait(lock, [&] { return queue.size() < kQueueBound; });
        queue.push_back({static_cast<unsigned char*>(block), size, seed});
        changed.notify_all();
      }
      std::lock_guard lock(mutex);
      --producers_left;
      changed.notify_all();
    });
  }
  for (unsigned c = 0; c < kConsumers; ++c) {
    threads.emplace_back([&, c] {
      for (uint64_t handled = 0;; ++handled) {
        Message message;
        {
          std::unique_lock lock(mutex);
          changed.wait(lock, [&] { return !queue.empty() || producers_left == 0; });
          if (queue.empty()) return;
          message = queue.front();
          queue.pop_front();
          changed.notify_all();
        }
        if (!pattern_intact(message.data, message.size, message.seed)) ++corrupted;
        if ((handled + c) % 5 == 0) {
          // Resize another thread's block before freeing it.
          void* moved = realloc(message.data, message.size + 100);
          if (moved && !pattern_intact(moved, message.size, message.seed)) ++corrupted;
          free(moved ? moved : message.data);
        } else {
          free(message.data);
        }
        ++consumed;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(failed_allocations.load(), 0u);
  EXPECT_EQ(corrupted.load(), 0u) << "a block changed on its way between threads";
  EXPECT_EQ(consumed.load(), kProducers * kPerProducer);

  const std::optional<Json> after = report_now();
  if (!mode_records()) return;
  ASSERT_TRUE(before && after);
  EXPECT_GE(totals_field(*after, "allocations") - totals_field(*before, "allocations"), kProducers * kPerProducer);
  EXPECT_GE(totals_field(*after, "frees") - totals_field(*before, "frees"), kProducers * kPerProducer)
      << "frees in consumer threads must be counted";
  EXPECT_GE(totals_field(*after, "threads_seen") - totals_field(*before, "threads_seen"), kProducers);
}

TEST(CrossThread, ThreadThatOnlyFreesReleasesBlocksOthersAllocated) {
  constexpr size_t kSize = 5000;
  constexpr uint64_t kCount = 4000;
  std::vector<void*> blocks;
  for (uint64_t i = 0; i < kCount; ++i) {
    blocks.push_back(malloc(opaque(kSize)));
    ASSERT_NE(blocks.back(), nullptr);
    fill_pattern(blocks.back(), kSize, i);
  }
  const size_t usable = malloc_usable_size(blocks.front());
  const std::optional<Json> before = report_now();
  uint64_t corrupted = 0;
  // The thread's body makes no allocator call but free.
  std::thread freeing_thread([&] {
    for (uint64_t i = 0; i < kCount; ++i) {
      if (!pattern_intact(blocks[i], kSize, i)) ++corrupted;
      free(blocks[i]);
    }
  });
  freeing_thread.join();
  EXPECT_EQ(corrupted, 0u);
  const std::optional<Json> after = report_now();
  if (!mode_records()) return;
  ASSERT_TRUE(before && after);
  const uint64_t size_class = class_for_usable(*after, usable);
  EXPECT_GE(class_frees(*after, size_class) - class_frees(*before, size_class), kCount)
      << "frees by a thread that never allocated must be counted";
  // Pooled: the thread gets a cache of its own at its first free, as at a
  // first allocation, so its frees reach the depot in batches (its cache's
  // drains, at most kBinSlots blocks each), not one at a time under the
  // depot's lock.
  const std::optional<uint64_t> drains_before = class_pool_field(*before, size_class, "drains");
  const std::optional<uint64_t> drains_after = class_pool_field(*after, size_class, "drains");
  if (drains_before && drains_after) {
    EXPECT_GE(*drains_after - *drains_before, kCount / 64)
        << "a thread that only frees pooled blocks must free them into a thread cache";
  }
}

// Destructors that run at thread exit: thread_local objects first, then
// pthread keys in up to PTHREAD_DESTRUCTOR_ITERATIONS rounds. hotpool tears
// its thread state down in the last round; keys created after its own (as
// here) run after that and must still be able to allocate.
constexpr size_t kDestructorBlockSize = 9000;  // a class nothing else here uses
std::atomic<int> g_destructor_failures{0};
std::atomic<int> g_destructor_allocations{0};
std::atomic<int> g_final_rounds{0};

struct AllocatesWhenDestroyed {
  std::string name = std::string(100, 'n');  // a heap string, freed after the body
  ~AllocatesWhenDestroyed() {
    void* block = malloc(kDestructorBlockSize);
    if (!block) {
      ++g_destructor_failures;
      return;
    }
    fill_pattern(block, kDestructorBlockSize, 77);
    if (!pattern_intact(block, kDestructorBlockSize, 77)) ++g_destructor_failures;
    free(block);
    ++g_destructor_allocations;
  }
};
thread_local AllocatesWhenDestroyed t_allocates_when_destroyed;

struct KeyValue {
  pthread_key_t key;
  int rounds;
};

void key_destructor(void* value) {
  auto* state = static_cast<KeyValue*>(value);
  ++state->rounds;
  void* block = malloc(kDestructorBlockSize);
  std::string* text = new (std::nothrow) std::string(500, 'k');
  if (!block || !text) {
    ++g_destructor_failures;
  } else {
    fill_pattern(block, kDestructorBlockSize, state->rounds);
    if (!pattern_intact(block, kDestructorBlockSize, state->rounds) || text->size() != 500) ++g_destructor_failures;
    ++g_destructor_allocations;
  }
  free(block);
  delete text;
  if (state->rounds < PTHREAD_DESTRUCTOR_ITERATIONS) {
    pthread_setspecific(state->key, state);  // come back next round
  } else {
    ++g_final_rounds;
    free(state);
  }
}

TEST(ThreadExit, DestructorsAllocateAndFreeAfterHotpoolsOwnTeardown) {
  constexpr int kThreads = 16, kKeys = 3;
  pthread_key_t keys[kKeys];
  for (pthread_key_t& key : keys) ASSERT_EQ(pthread_key_create(&key, key_destructor), 0);
  g_destructor_failures = 0;
  g_destructor_allocations = 0;
  g_final_rounds = 0;
  const std::optional<Json> before = report_now();

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&keys] {
      t_allocates_when_destroyed.name += "x";  // construct the thread_local
      for (pthread_key_t key : keys) {
        auto* value = static_cast<KeyValue*>(malloc(sizeof(KeyValue)));
        *value = {key, 0};
        pthread_setspecific(key, value);
      }
      void* block = malloc(100);
      free(block);
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (pthread_key_t key : keys) pthread_key_delete(key);

  EXPECT_EQ(g_destructor_failures.load(), 0);
  EXPECT_EQ(g_final_rounds.load(), kThreads * kKeys) << "every key destructor must reach the last round";
  const int expected_allocations = kThreads * (1 + kKeys * PTHREAD_DESTRUCTOR_ITERATIONS);
  EXPECT_EQ(g_destructor_allocations.load(), expected_allocations);

  const std::optional<Json> after = report_now();
  if (!mode_records()) return;
  ASSERT_TRUE(before && after);
  void* probe = malloc(kDestructorBlockSize);
  const uint64_t size_class = class_for_usable(*after, malloc_usable_size(probe));
  free(probe);
  EXPECT_GE(class_allocations(*after, size_class) - class_allocations(*before, size_class),
            static_cast<uint64_t>(expected_allocations))
      << "allocations made in thread-exit destructors (also after hotpool's teardown) must be counted";
  EXPECT_GE(class_frees(*after, size_class) - class_frees(*before, size_class),
            static_cast<uint64_t>(expected_allocations));
}

TEST(ThreadChurn, TwoThousandShortLivedThreadsLeaveResidentMemoryBounded) {
  auto run_threads = [](int count, std::atomic<int>& corrupted) {
    constexpr int kAtOnce = 4;
    for (int started = 0; started < count; started += kAtOnce) {
      std::thread batch[kAtOnce];
      for (std::thread& thread : batch) {
        thread = std::thread([&corrupted] {
          void* blocks[17];
          for (int i = 0; i < 16; ++i) {
            const size_t size = 16u << (i % 9);  // 16 B .. 4 KiB
            blocks[i] = malloc(size);
            fill_pattern(blocks[i], size, i);
          }
          blocks[16] = malloc(256 * 1024);  // mmapped
          memset(blocks[16], 1, 256 * 1024);
          std::string text(300, 't');
          for (int i = 0; i < 16; ++i)
            if (!pattern_intact(blocks[i], 16u << (i % 9), i)) ++corrupted;
          for (void* block : blocks) free(block);
        });
      }
      for (std::thread& thread : batch) thread.join();
    }
  };
  std::atomic<int> corrupted{0};
  run_threads(200, corrupted);  // warm up: arenas, the stack cache, hotpool's states
  malloc_trim(0);
  const std::optional<Json> before = report_now();
  const size_t resident_before = preload_test::resident_bytes();
  ASSERT_GT(resident_before, 0u);

  constexpr int kThreads = 2000;
  run_threads(kThreads, corrupted);
  malloc_trim(0);
  const size_t resident_after = preload_test::resident_bytes();
  EXPECT_EQ(corrupted.load(), 0);
  // Per-thread state that were never reused would cost several MiB here
  // (thousands of threads times kilobytes of counters each).
  constexpr size_t kBound = 4u << 20;
  EXPECT_LE(resident_after, resident_before + kBound)
      << "resident memory grew by " << (resident_after - resident_before) / 1024 << " KiB over " << kThreads
      << " threads";

  const std::optional<Json> after = report_now();
  if (!mode_records()) return;
  ASSERT_TRUE(before && after);
  EXPECT_GE(totals_field(*after, "threads_seen") - totals_field(*before, "threads_seen"), uint64_t{kThreads});
  EXPECT_LE(totals_field(*after, "threads_at_once"), 64u)
      << "states of exited threads must be retired (no test here runs more than ~20 threads at once)";
}

// ---------------------------------------------------------------------------
// fork (glibc's tst-malloc-fork-deadlock pattern)

TEST(Fork, ChildOfMultiThreadedParentAllocatesAndWritesItsOwnReport) {
  constexpr int kBackgroundThreads = 3, kForks = 20;
  std::atomic<bool> stop{false};
  std::atomic<int> background_corrupted{0};
  std::vector<std::thread> background;
  for (int t = 0; t < kBackgroundThreads; ++t) {
    background.emplace_back([&, t] {
      std::mt19937 random(t + 1);
      while (!stop.load(std::memory_order_relaxed)) background_corrupted += churn_allocations(random, 2000);
    });
  }

  std::vector<pid_t> children;
  for (int i = 0; i < kForks; ++i) {
    fflush(nullptr);
    const pid_t child = fork();
    ASSERT_GE(child, 0) << strerror(errno);
    if (child == 0) {
      preload_test::arm_child_deadline(10);
      std::mt19937 random(1000 + i);
      CHILD_CHECK(churn_allocations(random, 3000) == 0);
      // A thread started in the child allocates too.
      std::thread child_thread([&] {
        std::mt19937 thread_random(2000 + i);
        CHILD_CHECK(churn_allocations(thread_random, 1000) == 0);
      });
      child_thread.join();
      if (g_child_failures) _exit(3);
      exit(0);  // exit, not _exit: hotpool writes the child's exit report
    }
    children.push_back(child);
    EXPECT_EQ(wait_for_child(child), "exit 0") << "child " << i << " (pid " << child << ")";
  }
  stop = true;
  for (std::thread& thread : background) thread.join();
  EXPECT_EQ(background_corrupted.load(), 0);

  for (pid_t child : children) {
    const std::optional<Json> report = read_report(child);
    if (!mode_records()) {
      EXPECT_FALSE(report) << "mode off: child " << child << " wrote " << preload_test::report_path(child);
      continue;
    }
    ASSERT_TRUE(report) << "the forked child wrote no " << preload_test::report_path(child);
    EXPECT_EQ(report->value("pid", 0), child);
    EXPECT_EQ(report->value("parent_pid", 0), getpid());
    ASSERT_TRUE(report->contains("forked_from"));
    EXPECT_EQ((*report)["forked_from"], Json(getpid())) << "forked_from must name the parent";
    EXPECT_EQ(report->value("reason", ""), "exit");
    EXPECT_EQ(report->value("mode", ""), mode_under_test());
    EXPECT_GE(totals_field(*report, "allocations"), 1000u);
  }
}

// ---------------------------------------------------------------------------
// exec of a preloaded helper

struct HelperRun {
  pid_t pid = 0;
  std::string output;
  std::string status;
};

// Forks and execs preload_exec_helper with `args`, with this process's
// environment (LD_PRELOAD included unless `preloaded` is false) plus
// `extra_environment` ("NAME=value" entries).
HelperRun run_helper(const std::vector<std::string>& args, bool preloaded = true,
                     const std::vector<std::string>& extra_environment = {}) {
  std::vector<std::string> environment = extra_environment;
  for (char** entry = environ; *entry; ++entry)
    if (preloaded || std::strncmp(*entry, "LD_PRELOAD=", 11) != 0) environment.emplace_back(*entry);
  std::vector<char*> envp, argv;
  for (std::string& entry : environment) envp.push_back(entry.data());
  envp.push_back(nullptr);
  std::string program = HOTPOOL_EXEC_HELPER;
  argv.push_back(program.data());
  std::vector<std::string> arguments = args;
  for (std::string& arg : arguments) argv.push_back(arg.data());
  argv.push_back(nullptr);

  HelperRun run;
  int pipe_fds[2];
  if (pipe(pipe_fds) != 0) return run.status = "pipe failed", run;
  fflush(nullptr);
  run.pid = fork();
  if (run.pid < 0) {
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    return run.status = "fork failed", run;
  }
  if (run.pid == 0) {
    preload_test::arm_child_deadline(10);  // survives exec
    dup2(pipe_fds[1], STDOUT_FILENO);
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  close(pipe_fds[1]);
  char buffer[512];
  for (ssize_t got; (got = read(pipe_fds[0], buffer, sizeof(buffer))) != 0;) {
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) break;
    run.output.append(buffer, static_cast<size_t>(got));
  }
  close(pipe_fds[0]);
  run.status = wait_for_child(run.pid);
  return run;
}

// The value of `key` in a helper's "key=value key=value" line.
std::string field(const std::string& line, const std::string& key) {
  const std::string needle = key + "=";
  size_t at = line.find(needle);
  while (at != std::string::npos && at != 0 && line[at - 1] != ' ') at = line.find(needle, at + 1);
  if (at == std::string::npos) return "";
  const size_t start = at + needle.size();
  return line.substr(start, line.find_first_of(" \n", start) - start);
}

TEST(Exec, HelperRunsPreloadedAndWritesItsOwnReport) {
  constexpr uint64_t kCount = 1234;
  const HelperRun run = run_helper({"report", std::to_string(kCount), "777"});
  ASSERT_EQ(run.status, "exit 0") << run.output;
  EXPECT_EQ(field(run.output, "mode"), mode_under_test()) << "the exec'd program must run under hotpool";
  EXPECT_EQ(field(run.output, "pid"), std::to_string(run.pid)) << run.output;

  const std::optional<Json> report = read_report(run.pid);
  if (!mode_records()) {
    EXPECT_FALSE(report) << "mode off wrote " << preload_test::report_path(run.pid);
    return;
  }
  ASSERT_TRUE(report) << "the exec'd helper wrote no " << preload_test::report_path(run.pid);
  EXPECT_EQ(report->value("pid", 0), run.pid);
  EXPECT_EQ(report->value("parent_pid", 0), getpid());
  EXPECT_EQ(report->value("reason", ""), "exit");
  EXPECT_EQ(report->value("mode", ""), mode_under_test());
  EXPECT_NE(report->value("program", "").find("preload_exec_helper"), std::string::npos) << (*report)["program"];
  const uint64_t size_class = class_for_usable(*report, std::stoul(field(run.output, "usable")));
  EXPECT_GE(class_allocations(*report, size_class), kCount);
  EXPECT_GE(class_frees(*report, size_class), kCount);
}

TEST(Exec, ExitReportReplacesTheOnDemandReportAtExit) {
  constexpr uint64_t kCount = 300;
  const HelperRun run = run_helper({"on-demand-then-exit", std::to_string(kCount), "20000"});
  ASSERT_EQ(run.status, "exit 0") << run.output;
  EXPECT_EQ(field(run.output, "mode"), mode_under_test());
  const std::string path = preload_test::report_path(run.pid);
  if (!mode_records()) {
    EXPECT_EQ(field(run.output, "on_demand_saved"), "0") << "mode off: hotpool_report() wrote " << path;
    EXPECT_FALSE(read_report(run.pid));
    return;
  }
  ASSERT_EQ(field(run.output, "on_demand_saved"), "1") << "hotpool_report() wrote no " << path;
  std::ifstream on_demand_file(path + ".on-demand");
  Json on_demand;
  ASSERT_NO_THROW(on_demand = Json::parse(on_demand_file));
  const std::optional<Json> at_exit = read_report(run.pid);
  ASSERT_TRUE(at_exit) << "no exit report at " << path;
  EXPECT_EQ(on_demand.value("reason", ""), "on-demand");
  EXPECT_EQ(at_exit->value("reason", ""), "exit");
  const uint64_t size_class = class_for_usable(*at_exit, std::stoul(field(run.output, "usable")));
  EXPECT_GE(class_allocations(on_demand, size_class), kCount);
  EXPECT_GE(class_allocations(*at_exit, size_class), class_allocations(on_demand, size_class) + kCount)
      << "the exit report must include what was allocated after the on-demand report";
}

// The on-demand report a helper run saved aside (see exec_helper.c); none
// when hotpool does not record, and then the helper must have saved none.
// A report that should be there and is not fails the test.
std::optional<Json> saved_on_demand_report(const HelperRun& run) {
  if (!mode_records()) {
    EXPECT_EQ(field(run.output, "on_demand_saved"), "0");
    return std::nullopt;
  }
  EXPECT_EQ(field(run.output, "on_demand_saved"), "1") << run.output;
  std::ifstream file(preload_test::report_path(run.pid) + ".on-demand");
  try {
    return Json::parse(file);
  } catch (const std::exception& error) {
    ADD_FAILURE() << "no on-demand report for pid " << run.pid << ": " << error.what();
    return std::nullopt;
  }
}

TEST(Exec, AThreadFirstAllocatingInTheLastDestructorRoundIsRetiredOnceGone) {
  // Each of 64 threads, one after another, allocates for the first time in
  // glibc's last round of key destructors: it attaches then, and no round
  // follows to retire it. The threads after it retire its state once it
  // is gone: the registry never holds more than a few at once (it held 65
  // before they did).
  constexpr int kThreads = 64;
  const HelperRun run = run_helper({"late-first-allocation", std::to_string(kThreads), "9000"});
  ASSERT_EQ(run.status, "exit 0") << run.output;
  EXPECT_EQ(field(run.output, "failures"), "0");
  // A key below 32 is set without an allocation (glibc's first level of
  // keys): the thread's first allocation is the destructor's.
  ASSERT_LT(std::stoul(field(run.output, "key")), 32u) << run.output;
  const std::optional<Json> saved = saved_on_demand_report(run);
  if (!saved) return;
  const Json& report = *saved;
  const Json& totals = report["totals"];
  EXPECT_GE(totals["threads_seen"].get<uint64_t>(), uint64_t{kThreads}) << totals;
  EXPECT_GE(totals["allocations"].get<uint64_t>(), uint64_t{kThreads}) << totals;
  // The late blocks' class, the smallest of at least 9000 B: every
  // thread's allocation and free still counted after its state retired.
  const Json* late = nullptr;
  for (const Json& row : report["classes"])
    if (!late && row["size"].get<uint64_t>() >= 9000) late = &row;
  ASSERT_NE(late, nullptr) << "no class of 9000 B or more in the report";
  EXPECT_GE((*late)["allocations"].get<uint64_t>(), uint64_t{kThreads}) << *late;
  EXPECT_GE((*late)["frees"].get<uint64_t>(), uint64_t{kThreads}) << *late;
  // A thread just joined may still exist for a moment (its id is cleared
  // before the kernel lets it go): its state goes with a later check.
  EXPECT_LE(totals["threads_at_once"].get<uint64_t>(), 8u)
      << "the states of threads gone before the next one attached were retired: " << totals;
}

TEST(Exec, PeakLiveBytesOfAFreshProcessIsNeverBelowItsLiveBytes) {
  // A fresh single-threaded process: the report states a peak error of 0,
  // so every class's peak of live bytes must be at least its live bytes,
  // pooled classes (mode auto pools this hot, short-lived one) included.
  const HelperRun run = run_helper({"hot-then-live", "2000", "48"});
  ASSERT_EQ(run.status, "exit 0") << run.output;
  const std::optional<Json> saved = saved_on_demand_report(run);
  if (!saved) return;
  const Json& report = *saved;
  const Json& totals = report["totals"];
  const uint64_t peak_error = totals.value("peak_error_bytes", uint64_t{0});
  EXPECT_GE(totals["peak_live_bytes"].get<uint64_t>() + peak_error, totals["live_bytes"].get<uint64_t>())
      << "totals: " << totals;
  for (const Json& row : report["classes"]) {
    EXPECT_GE(row["peak_live_bytes"].get<uint64_t>() + peak_error, row["live_bytes"].get<uint64_t>())
        << "class row " << row;
  }
  // A block counts in the class of its usable size: the real allocator's
  // blocks (before auto pools the class) and pooled ones may land in
  // neighbouring classes, so the exact count is checked on the totals.
  const uint64_t size_class = class_for_usable(report, std::stoul(field(run.output, "usable")));
  EXPECT_GE(class_allocations(report, size_class), 2000u);
  EXPECT_GE(totals["allocations"].get<uint64_t>(), 2000u * 101);
}

TEST(Exec, ProgramThatCallsExitFromASecondThreadGetsItsExitReport) {
  constexpr uint64_t kCount = 500;
  const HelperRun run = run_helper({"exit-from-thread", std::to_string(kCount), "6000"});
  ASSERT_EQ(run.status, "exit 0") << run.output;
  EXPECT_EQ(field(run.output, "mode"), mode_under_test());
  const std::optional<Json> report = read_report(run.pid);
  if (!mode_records()) {
    EXPECT_FALSE(report);
    return;
  }
  ASSERT_TRUE(report) << "no exit report for a program that exits from a second thread";
  EXPECT_EQ(report->value("reason", ""), "exit");
  const uint64_t size_class = class_for_usable(*report, std::stoul(field(run.output, "usable")));
  EXPECT_GE(class_allocations(*report, size_class), kCount);
  EXPECT_EQ(class_frees(*report, size_class), 0u) << "the blocks were live at exit";
}

// The first allocator call of a process may come from a library
// constructor that the loader runs before libhotpool.so's own (libstdc++'s
// emergency exception pool does this): hotpool is still booting then, and
// its answer must still be glibc's. preload_exec_helper depends on
// libpreload_first_call.so, whose constructor makes the call named by
// PRELOAD_TEST_FIRST_CALL; the helper is run with and without LD_PRELOAD
// and must print the same outcome.
struct FirstCall {
  const char* name;
  const char* call;  // "<function> [a] [b]"
};

void PrintTo(const FirstCall& first_call, std::ostream* out) { *out << '"' << first_call.call << '"'; }

class FirstAllocatorCall : public testing::TestWithParam<FirstCall> {};

TEST_P(FirstAllocatorCall, FromALibraryConstructorBehavesExactlyAsGlibcDoes) {
  const std::vector<std::string> environment = {std::string("PRELOAD_TEST_FIRST_CALL=") + GetParam().call};
  const HelperRun glibc = run_helper({"first"}, /*preloaded=*/false, environment);
  const HelperRun hotpool = run_helper({"first"}, /*preloaded=*/true, environment);
  ASSERT_EQ(glibc.status, "exit 0") << glibc.output;
  ASSERT_EQ(hotpool.status, "exit 0") << hotpool.output;
  ASSERT_NE(glibc.output.find("errno="), std::string::npos) << "the call was not made: " << glibc.output;
  EXPECT_EQ(hotpool.output, glibc.output) << GetParam().call << " as the first allocator call under hotpool";
}

INSTANTIATE_TEST_SUITE_P(
    EveryEntryPoint, FirstAllocatorCall,
    testing::Values(FirstCall{"malloc_100", "malloc 100"}, FirstCall{"malloc_0", "malloc 0"},
                    FirstCall{"malloc_SIZE_MAX", "malloc SIZE_MAX"}, FirstCall{"calloc_10_10", "calloc 10 10"},
                    FirstCall{"calloc_overflow", "calloc SIZE_MAX 2"},
                    FirstCall{"realloc_NULL_100", "realloc 100"},
                    FirstCall{"realloc_NULL_SIZE_MAX", "realloc SIZE_MAX"},
                    FirstCall{"reallocarray_overflow", "reallocarray SIZE_MAX 2"},
                    FirstCall{"aligned_alloc_64", "aligned_alloc 64 100"},
                    FirstCall{"aligned_alloc_4096", "aligned_alloc 4096 100"},
                    FirstCall{"aligned_alloc_0", "aligned_alloc 0 100"},
                    FirstCall{"aligned_alloc_3", "aligned_alloc 3 100"},
                    FirstCall{"aligned_alloc_24", "aligned_alloc 24 100"},
                    FirstCall{"aligned_alloc_huge_alignment", "aligned_alloc SIZE_MAX/2+2 100"},
                    FirstCall{"memalign_64", "memalign 64 100"}, FirstCall{"memalign_0", "memalign 0 100"},
                    FirstCall{"memalign_3", "memalign 3 100"}, FirstCall{"memalign_24", "memalign 24 100"},
                    FirstCall{"memalign_huge_alignment", "memalign SIZE_MAX/2+2 100"},
                    FirstCall{"memalign_huge_size", "memalign 64 SIZE_MAX"},
                    FirstCall{"posix_memalign_64", "posix_memalign 64 100"},
                    FirstCall{"posix_memalign_0", "posix_memalign 0 100"},
                    FirstCall{"posix_memalign_4", "posix_memalign 4 100"},
                    FirstCall{"posix_memalign_24", "posix_memalign 24 100"},
                    FirstCall{"posix_memalign_huge_size", "posix_memalign 64 SIZE_MAX"},
                    FirstCall{"valloc_100", "valloc 100"}, FirstCall{"pvalloc_100", "pvalloc 100"},
                    FirstCall{"pvalloc_SIZE_MAX", "pvalloc SIZE_MAX"}, FirstCall{"free_NULL", "free"},
                    FirstCall{"malloc_usable_size_NULL", "malloc_usable_size"}),
    [](const testing::TestParamInfo<FirstCall>& param_info) { return std::string(param_info.param.name); });

// ---------------------------------------------------------------------------
// dlopen / dlclose

TEST(Dlopen, LibraryThatAllocatesInConstructorAndFreesInDestructorLoadsAndUnloadsRepeatedly) {
  constexpr int kRounds = 150;
  // Another thread allocates all along: the loader's lock and the
  // allocator's must not deadlock each other.
  std::atomic<bool> stop{false};
  std::atomic<int> corrupted{0};
  std::thread allocating([&] {
    std::mt19937 random(99);
    while (!stop.load(std::memory_order_relaxed)) corrupted += churn_allocations(random, 500);
  });
  const std::optional<Json> before = report_now();
  size_t constructor_usable = 0;
  for (int round = 0; round < kRounds; ++round) {
    void* library = dlopen(HOTPOOL_DL_HELPER, RTLD_NOW | RTLD_LOCAL);
    ASSERT_NE(library, nullptr) << dlerror();
    auto* intact = reinterpret_cast<int (*)()>(dlsym(library, "dl_helper_constructor_block_intact"));
    auto* usable = reinterpret_cast<size_t (*)()>(dlsym(library, "dl_helper_constructor_block_usable"));
    auto* work = reinterpret_cast<unsigned (*)(unsigned)>(dlsym(library, "dl_helper_work"));
    ASSERT_TRUE(intact && usable && work);
    EXPECT_EQ(intact(), 1) << "round " << round;
    EXPECT_EQ(work(200), 200u) << "round " << round;
    constructor_usable = usable();
    ASSERT_EQ(dlclose(library), 0) << dlerror();
    ASSERT_EQ(dlopen(HOTPOOL_DL_HELPER, RTLD_NOW | RTLD_NOLOAD), nullptr)
        << "the helper stayed loaded: its constructor would not run again";
  }
  const std::optional<Json> after = report_now();
  stop = true;
  allocating.join();
  EXPECT_EQ(corrupted.load(), 0);
  if (!mode_records()) return;
  ASSERT_TRUE(before && after);
  const uint64_t size_class = class_for_usable(*after, constructor_usable);
  EXPECT_GE(class_allocations(*after, size_class) - class_allocations(*before, size_class), uint64_t{kRounds})
      << "allocations of a dlopen'ed library's constructor must be counted";
  EXPECT_GE(class_frees(*after, size_class) - class_frees(*before, size_class), uint64_t{kRounds})
      << "frees of a dlclose'd library's destructor must be counted";
}

// ---------------------------------------------------------------------------
// C++ operator new and delete: hotpool's own, in every mode; a request
// that fails is the C++ runtime's again (its new_handler loop, then
// std::bad_alloc or nullptr), as without hotpool.

// True when operator new(size) throws std::bad_alloc.
bool new_throws_bad_alloc(size_t size) {
  try {
    ::operator delete(::operator new(opaque(size)));
  } catch (const std::bad_alloc&) {
    return true;
  }
  return false;
}

int g_new_handler_calls = 0;

void give_up_on_second_call() {
  if (++g_new_handler_calls == 2) std::set_new_handler(nullptr);
}

TEST(CppOperators, AreHotpoolsAndAFailedNewRunsTheProgramsNewHandler) {
  for (const char* name : {"_Znwm", "_Znam", "_ZnwmRKSt9nothrow_t", "_ZdlPv", "_ZdlPvm", "_ZdaPvm"}) {
    Dl_info where{};
    void* symbol = dlsym(RTLD_DEFAULT, name);
    ASSERT_NE(symbol, nullptr) << name;
    ASSERT_NE(dladdr(symbol, &where), 0) << name;
    EXPECT_NE(std::string(where.dli_fname).find("libhotpool"), std::string::npos)
        << name << " is " << where.dli_fname << "'s";
  }
  constexpr size_t kImpossible = size_t{1} << 62;
  std::set_new_handler(give_up_on_second_call);
  EXPECT_TRUE(new_throws_bad_alloc(kImpossible));
  EXPECT_EQ(g_new_handler_calls, 2) << "the handler runs until it gives up";
  g_new_handler_calls = 0;
  std::set_new_handler(give_up_on_second_call);
  EXPECT_EQ(::operator new[](opaque(kImpossible), std::nothrow), nullptr);
  EXPECT_EQ(g_new_handler_calls, 2);
  // And the ordinary requests after them.
  auto* numbers = new int[1000];
  for (int i = 0; i < 1000; ++i) numbers[i] = i;
  EXPECT_EQ(numbers[999], 999);
  ::operator delete[](numbers, 1000 * sizeof(int));
}

// ---------------------------------------------------------------------------
// Address space exhausted (RLIMIT_AS), in a forked child

TEST(AddressSpaceLimit, AllocationsFailCleanlyWithEnomemAndTheHeapStaysUsable) {
  fflush(nullptr);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    preload_test::arm_child_deadline(20);
    // Room for a little more than what is mapped now.
    const rlim_t limit = preload_test::virtual_bytes() + (48u << 20);
    const rlimit address_space = {limit, limit};
    CHILD_CHECK(setrlimit(RLIMIT_AS, &address_space) == 0);
    constexpr size_t kBig = size_t{512} << 20;  // over the limit

    void* small = malloc(100);
    CHILD_CHECK(small != nullptr);
    if (small) fill_pattern(small, 100, 1);
    errno = 0;
    CHILD_CHECK(malloc(opaque(kBig)) == nullptr && errno == ENOMEM);
    errno = 0;
    CHILD_CHECK(calloc(1, opaque(kBig)) == nullptr && errno == ENOMEM);
    errno = 0;
    CHILD_CHECK(calloc(opaque(kBig / 16), 16) == nullptr && errno == ENOMEM);
    errno = 0;
    CHILD_CHECK(realloc(opaque(small), opaque(kBig)) == nullptr && errno == ENOMEM);
    CHILD_CHECK(small && pattern_intact(small, 100, 1));
    errno = 0;
    CHILD_CHECK(reallocarray(opaque(small), opaque(kBig / 8), 8) == nullptr && errno == ENOMEM);
    void* const sentinel = &errno;
    void* result = sentinel;
    CHILD_CHECK(posix_memalign(&result, 4096, opaque(kBig)) == ENOMEM && result == sentinel);
    errno = 0;
    CHILD_CHECK(aligned_alloc(64, opaque(kBig)) == nullptr && errno == ENOMEM);
    errno = 0;
    CHILD_CHECK(memalign(4096, opaque(kBig)) == nullptr && errno == ENOMEM);
    errno = 0;
    CHILD_CHECK(valloc(opaque(kBig)) == nullptr && errno == ENOMEM);
    errno = 0;
    CHILD_CHECK(pvalloc(opaque(kBig)) == nullptr && errno == ENOMEM);
    CHILD_CHECK(::operator new(opaque(kBig), std::nothrow) == nullptr);
    CHILD_CHECK(new_throws_bad_alloc(kBig));

    // Use the address space up with blocks too large for any pool (pools
    // live in a region reserved up front, which RLIMIT_AS does not shrink),
    // until a request fails: the failure must be a clean ENOMEM. The blocks
    // are not touched, so this costs address space, not memory.
    constexpr size_t kUnpooled = size_t{2} << 20;  // above every class (max 1 MiB)
    std::vector<void*>* held = new std::vector<void*>;
    held->reserve(4096);
    for (int i = 0; i < 4096; ++i) {
      errno = 0;
      void* block = malloc(opaque(kUnpooled));
      if (!block) {
        CHILD_CHECK(errno == ENOMEM);
        break;
      }
      held->push_back(block);
    }
    CHILD_CHECK(held->size() < 4096);  // the limit was reached
    errno = 0;
    CHILD_CHECK(malloc(opaque(kUnpooled)) == nullptr && errno == ENOMEM);
    errno = 0;
    CHILD_CHECK(calloc(1, opaque(kUnpooled)) == nullptr && errno == ENOMEM);
    for (void* block : *held) free(block);
    delete held;
    // Address space given back is usable again.
    void* again = malloc(opaque(kUnpooled));
    CHILD_CHECK(again != nullptr);
    free(again);
    CHILD_CHECK(small && pattern_intact(small, 100, 1));
    free(small);
    _exit(g_child_failures ? 3 : 0);
  }
  EXPECT_EQ(wait_for_child(child), "exit 0") << "see the child's checks on stderr";
}

}  // namespace

int main(int argc, char** argv) { return preload_test::run_all_tests(argc, argv, 30); }
