// Signals under libhotpool.so: a handler that allocates, run every ~50 µs
// by an interval timer while the interrupted thread allocates too (also a
// thread that hotpool has let go, in its last key destructor round); and
// fork() from a handler that interrupted malloc (glibc's tst-mallocfork2),
// also while a second thread holds pooled blocks in its thread cache or
// forks too.
//
// malloc is not async-signal-safe, but glibc's own tests and real programs
// (profilers, crash handlers, servers that fork from SIGCHLD/SIGUSR1) do
// this. The requirement is relative: no deadlock and no crash under hotpool
// where there is none without it. So every single-threaded scenario runs
// first on plain glibc, in a process of its own; if glibc itself fails it,
// the test is skipped. Then the same scenario runs under hotpool, bounded
// by a deadline that kills it (a deadlock shows as "timed out"). The
// scenarios with a second thread run in the pooling modes only (see there).
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "torture.h"

namespace {

using torture::describe;
using torture::mode_pools;
using torture::mode_under_test;
using torture::opaque;
using torture::Preload;
using torture::run_scenario;
using torture::say;
using torture::ScenarioRun;

double now_seconds() {
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<double>(now.tv_sec) + static_cast<double>(now.tv_nsec) * 1e-9;
}

// The sizes are chosen so that the handler and the interrupted code share
// hotpool's classes (320 and 640 in both HOTPOOL_CLASSES of mode fixed and
// the default table of mode auto) but not glibc's tcache bins (16-byte
// granular): on glibc the handler's balanced malloc/free pairs are served
// by tcache bins that the main loop never touches, which is what lets glibc
// pass; under hotpool they meet the main loop in the same thread cache.
constexpr size_t kMainSizes[] = {300, 610, 40, 3000};  // classes 320, 640, 48, 4K (3072 in auto)
constexpr size_t kHandlerSizes[] = {296, 600, 24};     // classes 320, 640, 32
constexpr size_t kMainBatch = 256;

// Whether the classes the handler and main share are pooled now.
void say_pooled() {
  say("pooled=%d", torture::served_by_pool(300, 320) && torture::served_by_pool(600, 640) ? 1 : 0);
}

// Warms the main loop's classes (mode auto pools them after a few thousand
// allocations) and primes the handler's sizes outside the handler, so that
// glibc serves the handler from tcache from the first signal on.
void warm_up() {
  static void* blocks[kMainBatch];
  for (int round = 0; round < 120; ++round) {
    for (size_t i = 0; i < kMainBatch; ++i) blocks[i] = malloc(opaque(kMainSizes[i % 4]));
    for (size_t i = 0; i < kMainBatch; ++i) free(blocks[i]);
  }
  torture::warm_until_pooled(300, 320);
  torture::warm_until_pooled(610, 640);
  for (size_t size : kHandlerSizes) free(malloc(opaque(size)));
}

// One batch of the main loop: kMainBatch blocks of the main sizes, each
// filled, then checked and freed. Returns the number of corrupted blocks.
// The batches make the thread cache refill from and drain to the depots
// all the time: the slow paths that take hotpool's locks.
unsigned main_batch(uint64_t round, bool full_fill) {
  static unsigned char* blocks[kMainBatch];
  static size_t sizes[kMainBatch];
  unsigned corrupted = 0;
  for (size_t i = 0; i < kMainBatch; ++i) {
    sizes[i] = kMainSizes[(i + round) % 4];
    blocks[i] = static_cast<unsigned char*>(malloc(opaque(sizes[i])));
    if (!blocks[i]) continue;
    std::memset(blocks[i], static_cast<int>(i & 0xff), full_fill ? sizes[i] : 16);
  }
  for (size_t i = 0; i < kMainBatch; ++i) {
    if (!blocks[i]) {
      ++corrupted;
      continue;
    }
    const size_t checked = full_fill ? sizes[i] : 16;
    for (size_t k = 0; k < checked; k += 7) {
      if (blocks[i][k] != (i & 0xff)) {
        ++corrupted;
        break;
      }
    }
    free(blocks[i]);
  }
  return corrupted;
}

// How long a scenario's loop runs: at least `seconds`, and on until
// `wanted` signals were handled, but never past kLongestSeconds. A loaded
// machine handles fewer signals per second: it gets more time for them, up
// to that bound, and the assertions ask only for a few (10) of them (not
// for a rate).
constexpr double kLongestSeconds = 3.0;

bool keep_running(double start, double seconds, long handled, long wanted) {
  const double elapsed = now_seconds() - start;
  return elapsed < kLongestSeconds && (elapsed < seconds || handled < wanted);
}

// The scenarios stop after a bounded time. The deadline only tells a hang
// from a slow run: hotpool's run gets twice glibc's time and 10 s more
// (a loaded machine may slow one run and not the other).
double hotpool_deadline(const ScenarioRun& glibc, double slack = 10.0) { return 2 * glibc.seconds + slack; }

// How the scenarios that plain glibc survives are judged: `scenario` runs
// on glibc first (the test is skipped if glibc fails it; `counted`, what
// shows the handler ran, must reach 10), then under hotpool with
// `environment`, which must exit 0 before its deadline, count 10 too and,
// in the pooling modes, say `pooled_key`=1 (unless it is empty).
struct GlibcFirst {
  const char* scenario;
  const char* counted;
  const char* pooled_key = "pooled";
  std::vector<std::string> environment = {};
  double glibc_deadline = kLongestSeconds + 4;
  double slack = 10.0;  // see hotpool_deadline
};

void expect_hotpool_survives_as_glibc_does(const GlibcFirst& run) {
  const ScenarioRun glibc = run_scenario(run.scenario, Preload::No, {}, run.glibc_deadline);
  if (glibc.status != "exit 0") {
    GTEST_SKIP() << "plain glibc fails this scenario itself: " << describe(glibc);
  }
  ASSERT_GE(glibc.number(run.counted), 10u) << "too few signals were handled: " << describe(glibc);

  const ScenarioRun hotpool =
      run_scenario(run.scenario, Preload::Yes, run.environment, hotpool_deadline(glibc, run.slack));
  EXPECT_EQ(hotpool.status, "exit 0") << (hotpool.timed_out ? "hotpool deadlocked where glibc did not. " : "")
                                      << describe(hotpool);
  if (mode_pools() && *run.pooled_key) {
    EXPECT_EQ(hotpool.value(run.pooled_key), "1")
        << "the classes the handler meets must be pooled for this test to mean anything: " << describe(hotpool);
  }
  if (hotpool.status == "exit 0") {
    EXPECT_GE(hotpool.number(run.counted), 10u) << describe(hotpool);
  }
}

// ---------------------------------------------------------------------------
// An interval timer whose handler allocates

// Lock-free atomics: async-signal-safe.
std::atomic<long> g_ticks{0};
std::atomic<long> g_handler_corrupted{0};

void allocating_handler(int) {
  const int saved_errno = errno;
  unsigned char* blocks[3];
  for (int i = 0; i < 3; ++i) {
    blocks[i] = static_cast<unsigned char*>(malloc(opaque(kHandlerSizes[i])));
    if (blocks[i]) std::memset(blocks[i], 0xa5, kHandlerSizes[i]);
  }
  for (int i = 2; i >= 0; --i) {
    if (!blocks[i] || blocks[i][0] != 0xa5 || blocks[i][kHandlerSizes[i] - 1] != 0xa5) ++g_handler_corrupted;
    free(blocks[i]);
  }
  ++g_ticks;
  errno = saved_errno;
}

constexpr double kTimerSeconds = 0.4;
constexpr long kWantedTicks = 2000;

// SIGALRM runs `handler` every 50 µs from now on (until stop_timer).
void start_timer(void (*handler)(int)) {
  struct sigaction action = {};
  action.sa_handler = handler;
  action.sa_flags = SA_RESTART;
  sigaction(SIGALRM, &action, nullptr);
  const itimerval every_50us = {{0, 50}, {0, 50}};
  setitimer(ITIMER_REAL, &every_50us, nullptr);
  say("timer=started");
}
void stop_timer() {
  const itimerval stop = {};
  setitimer(ITIMER_REAL, &stop, nullptr);
}

TORTURE_SCENARIO(itimer_malloc) {
  warm_up();
  say_pooled();
  start_timer(allocating_handler);
  const double start = now_seconds();
  uint64_t rounds = 0, corrupted = 0;
  while (keep_running(start, kTimerSeconds, g_ticks, kWantedTicks)) corrupted += main_batch(rounds++, true);
  stop_timer();
  say("ticks=%ld rounds=%llu corrupted=%llu handler_corrupted=%ld", g_ticks.load(),
      static_cast<unsigned long long>(rounds), static_cast<unsigned long long>(corrupted),
      g_handler_corrupted.load());
  return corrupted || g_handler_corrupted ? 3 : 0;
}

TEST(SignalHandler, ItimerHandlerThatMallocsEvery50usNeverHangsOrCorruptsTheLoopItInterrupts) {
  expect_hotpool_survives_as_glibc_does({.scenario = "itimer_malloc", .counted = "ticks"});
}

// ---------------------------------------------------------------------------
// The same handler on a thread hotpool has already let go of: in glibc's
// last round of key destructors (hotpool's own ran earlier in that round),
// the thread frees pooled blocks it allocated before and allocates more.
// Such a thread has no state of its own: it counts in a shared block under
// a lock, and its frees of pooled blocks go straight to the depot, under
// the depot's lock. A handler that allocates, or frees one of the blocks
// set aside for it, takes the same locks; interrupting its own thread
// inside one of them, it would wait for itself forever.

// Sizes in hotpool's class 320 (pooled in modes fixed and auto), each in a
// glibc tcache bin of its own: 300 (chunk 320) for the thread's blocks,
// 316 (chunk 336) for the handler's, apart from the handler's 296 (304).
// So on glibc the thread's loop never leaves its tcache (each free of a
// block is followed by a malloc of the same size), and the handler's
// frees beyond its tcache take an arena lock the thread never holds.
constexpr size_t kLateBlocks = 16384;   // pooled blocks the destructor frees
constexpr size_t kHandlerBlocks = 8192; // pooled blocks the handler frees, one per tick
constexpr size_t kLateSize = 300;
constexpr size_t kHandlerFreeSize = 316;
void* g_late_blocks[kLateBlocks];
void* g_handler_blocks[kHandlerBlocks];
std::atomic<size_t> g_handler_next{0};
std::atomic<long> g_late_ticks{0};
pthread_key_t g_late_key;
uint64_t g_late_rounds = 0;

void late_handler(int) {
  const int saved_errno = errno;
  allocating_handler(0);
  const size_t next = g_handler_next.fetch_add(1);
  if (next < kHandlerBlocks) free(g_handler_blocks[next]);
  ++g_late_ticks;
  errno = saved_errno;
}

void late_destructor(void* value) {
  // Glibc calls a key's destructor again in the next round when it sets
  // the key again: round 4 of 4 is where hotpool has let the thread go.
  const uintptr_t round = reinterpret_cast<uintptr_t>(value);
  if (round < PTHREAD_DESTRUCTOR_ITERATIONS) {
    pthread_setspecific(g_late_key, reinterpret_cast<void*>(round + 1));
    return;
  }
  sigset_t alarm;
  sigemptyset(&alarm);
  sigaddset(&alarm, SIGALRM);
  pthread_sigmask(SIG_UNBLOCK, &alarm, nullptr);
  const double start = now_seconds();
  size_t next_late = 0;
  while (keep_running(start, kTimerSeconds, g_late_ticks, kWantedTicks)) {
    // Under hotpool: the pooled blocks go back to the depot, the rest of
    // the calls count in the shared block; one lock or the other each.
    for (int i = 0; i < 16; ++i, next_late = (next_late + 1) % kLateBlocks) {
      free(g_late_blocks[next_late]);
      g_late_blocks[next_late] = malloc(opaque(kLateSize));
    }
    for (int i = 0; i < 16; ++i) free(malloc(opaque(40)));
    ++g_late_rounds;
  }
  pthread_sigmask(SIG_BLOCK, &alarm, nullptr);
}

void* late_thread(void*) {
  sigset_t alarm;
  sigemptyset(&alarm);
  sigaddset(&alarm, SIGALRM);
  pthread_sigmask(SIG_BLOCK, &alarm, nullptr);  // until the destructor's loop
  warm_up();
  for (void*& block : g_late_blocks) block = malloc(opaque(kLateSize));
  for (void*& block : g_handler_blocks) block = malloc(opaque(kHandlerFreeSize));
  say("late_blocks_pooled=%d", torture::served_by_pool(kLateSize, 320) && torture::served_by_pool(kHandlerFreeSize, 320) ? 1 : 0);
  pthread_setspecific(g_late_key, reinterpret_cast<void*>(uintptr_t{1}));
  return nullptr;
}

TORTURE_SCENARIO(itimer_malloc_after_teardown) {
  // The timer's signal goes to the one thread that does not block it: the
  // late thread, in its destructor's loop.
  sigset_t alarm;
  sigemptyset(&alarm);
  sigaddset(&alarm, SIGALRM);
  pthread_sigmask(SIG_BLOCK, &alarm, nullptr);
  if (pthread_key_create(&g_late_key, late_destructor) != 0) return 2;
  start_timer(late_handler);
  pthread_t thread;
  if (pthread_create(&thread, nullptr, late_thread, nullptr) != 0) return 2;
  pthread_join(thread, nullptr);
  stop_timer();
  say("ticks=%ld rounds=%llu handler_corrupted=%ld", g_late_ticks.load(),
      static_cast<unsigned long long>(g_late_rounds), g_handler_corrupted.load());
  return g_handler_corrupted ? 3 : 0;
}

// Without sampling: a sampled late block goes back to hotpool's sample
// region, not to glibc's tcache, so the thread's next malloc (glibc's, the
// thread being let go) takes glibc's arena lock, which the handler's frees
// beyond their tcache take too: glibc deadlocking on itself (its malloc is
// not async-signal-safe), 2 runs in 12 in mode profile, before and after
// this session's changes. A let-go thread's frees of sampled blocks take
// the same locks, with signals blocked the same way (record_in_fallback,
// sampled_release_to_depot), but this scenario no longer makes them.
TEST(SignalHandler, ItimerHandlerThatMallocsOnAThreadHotpoolLetGoNeverHangs) {
  expect_hotpool_survives_as_glibc_does({.scenario = "itimer_malloc_after_teardown",
                                         .counted = "ticks",
                                         .pooled_key = "late_blocks_pooled",
                                         .environment = {"HOTPOOL_SAMPLE=0"}});
}

// ---------------------------------------------------------------------------
// A handler that frees pooled blocks allocated earlier, run over and over
// on a thread while it exits (a timer of its own, every 10 µs, from its
// third round of key destructors on): hotpool hands the thread's cached blocks back
// to the depots then, under their locks, and the handler's frees go to the
// same depots (found in review).
//
// glibc's mmap threshold is lowered to 4 KiB (mallopt) while the handler's
// blocks are allocated: on glibc they are mmapped chunks, whose free takes
// no lock, so glibc itself survives a handler in its thread-exit path. In
// hotpool's default table the sizes are the classes 5K, 6K, 7K and 9K
// (mode fixed gets them as HOTPOOL_CLASSES); each signal frees one block.
// The threads fill their caches (HOTPOOL_CACHE=256K: up to 51 blocks of a
// class; HOTPOOL_CACHE_GROW=0 keeps it at that) so that handing them back
// takes a while.

constexpr size_t kExitSizes[] = {5000, 6000, 7000, 9000};
constexpr size_t kExitClasses[] = {5 << 10, 6 << 10, 7 << 10, 9 << 10};
constexpr size_t kExitHandlerBlocks = 16384;
constexpr int kExitThreads = 1000;
void* g_exit_blocks[kExitHandlerBlocks];
std::atomic<size_t> g_exit_next{0};
std::atomic<long> g_exit_signals{0};
timer_t g_exit_timer;
bool g_exit_timer_failed = false;
pthread_key_t g_exit_key;

// Once every block is freed, the handler disarms the timer (timer_settime
// is async-signal-safe): a signal every 10 µs can take nearly all of a
// thread's time on a virtual machine, and a thread still exiting then
// crawled through glibc's own exit code for tens of seconds, with or
// without hotpool (seen: 1 run in 10 of each timed out after 40 s).
void exit_handler(int) {
  const int saved_errno = errno;
  const size_t next = g_exit_next.fetch_add(1);
  if (next < kExitHandlerBlocks) {
    free(g_exit_blocks[next]);
  } else {
    const itimerspec disarmed = {};
    timer_settime(g_exit_timer, 0, &disarmed, nullptr);
  }
  ++g_exit_signals;
  errno = saved_errno;
}

// The timer starts in glibc's third round of key destructors, just
// before the last, where hotpool lets the thread go (its key, created
// first, runs first in each round).
void exit_destructor(void* value) {
  const uintptr_t round = reinterpret_cast<uintptr_t>(value);
  if (round < PTHREAD_DESTRUCTOR_ITERATIONS - 1) {
    pthread_setspecific(g_exit_key, reinterpret_cast<void*>(round + 1));
    return;
  }
  // A timer of the thread's own, every 10 µs, from here on (the main
  // thread deletes it after the join).
  sigevent event = {};
  event.sigev_notify = SIGEV_THREAD_ID;
  event.sigev_signo = SIGALRM;
  event._sigev_un._tid = gettid();
  if (timer_create(CLOCK_MONOTONIC, &event, &g_exit_timer) != 0) {
    g_exit_timer_failed = true;
    return;
  }
  const itimerspec every_10us = {{0, 10000}, {0, 1000}};  // the first after 1 µs
  timer_settime(g_exit_timer, 0, &every_10us, nullptr);
}

void* exiting_thread(void*) {
  // Blocks of every size in the thread's cache when it exits.
  void* mine[4][64];
  for (int s = 0; s < 4; ++s)
    for (void*& block : mine[s]) block = malloc(opaque(kExitSizes[s]));
  for (int s = 0; s < 4; ++s)
    for (void* block : mine[s]) free(block);
  pthread_setspecific(g_exit_key, reinterpret_cast<void*>(uintptr_t{1}));
  return nullptr;
}

TORTURE_SCENARIO(signals_at_thread_exit) {
  bool pooled = true;
  for (int s = 0; s < 4; ++s) pooled = torture::warm_until_pooled(kExitSizes[s], kExitClasses[s]) && pooled;
  say("pooled=%d", pooled ? 1 : 0);
  mallopt(M_MMAP_THRESHOLD, 4096);  // the handler's blocks: mmapped chunks on glibc
  for (size_t i = 0; i < kExitHandlerBlocks; ++i) {
    g_exit_blocks[i] = malloc(opaque(kExitSizes[i % 4]));
    if (!g_exit_blocks[i]) return 2;
  }
  mallopt(M_MMAP_THRESHOLD, 128 << 10);  // the threads' blocks: glibc's heap again
  struct sigaction action = {};
  action.sa_handler = exit_handler;
  action.sa_flags = SA_RESTART;
  sigaction(SIGALRM, &action, nullptr);
  sigset_t alarm;
  sigemptyset(&alarm);
  sigaddset(&alarm, SIGALRM);
  pthread_sigmask(SIG_BLOCK, &alarm, nullptr);  // the main thread never takes it
  if (pthread_key_create(&g_exit_key, exit_destructor) != 0) return 2;
  int threads = 0;
  for (; threads < kExitThreads && g_exit_next.load() < kExitHandlerBlocks; ++threads) {
    pthread_sigmask(SIG_UNBLOCK, &alarm, nullptr);  // for the new thread's mask
    pthread_t thread;
    const bool created = pthread_create(&thread, nullptr, exiting_thread, nullptr) == 0;
    pthread_sigmask(SIG_BLOCK, &alarm, nullptr);
    if (!created) return 2;
    pthread_join(thread, nullptr);
    if (g_exit_timer_failed) return 4;
    timer_delete(g_exit_timer);
  }
  const size_t freed = std::min(g_exit_next.load(), kExitHandlerBlocks);
  for (size_t i = freed; i < kExitHandlerBlocks; ++i) free(g_exit_blocks[i]);
  say("threads=%d signals=%ld handler_frees=%zu", threads, g_exit_signals.load(), freed);
  return 0;
}

TEST(SignalHandler, HandlerThatFreesPooledBlocksWhileItsThreadExitsNeverHangs) {
  std::vector<std::string> environment = {"HOTPOOL_CACHE=256K", "HOTPOOL_CACHE_GROW=0"};
  if (mode_under_test() == "fixed") environment.push_back("HOTPOOL_CLASSES=5K,6K,7K,9K");
  expect_hotpool_survives_as_glibc_does({.scenario = "signals_at_thread_exit",
                                         .counted = "handler_frees",
                                         .environment = environment,
                                         .glibc_deadline = 30,
                                         .slack = 20});
}

// ---------------------------------------------------------------------------
// A handler that frees blocks allocated earlier, while the thread it
// interrupts allocates and frees blocks of the same size, every one of them
// sampled (HOTPOOL_SAMPLE=1): sampled blocks come from a region of their
// own, through a per-thread stash and, past it, a depot under a lock,
// which the interrupted code may hold.
//
// 132 KiB: on glibc the handler's blocks, allocated first, are mmapped
// chunks, whose free takes no lock (the loop's, once glibc raised its
// mmap threshold, come from the heap); under hotpool the stash of that
// class holds a single block, so the loop goes to the depot at nearly
// every call.

constexpr size_t kBigSize = 132 << 10;
constexpr size_t kBigHandlerBlocks = 1024;
void* g_big_blocks[kBigHandlerBlocks];
std::atomic<size_t> g_big_next{0};
std::atomic<long> g_big_ticks{0};

void freeing_handler(int) {
  const int saved_errno = errno;
  const size_t next = g_big_next.fetch_add(1);
  if (next < kBigHandlerBlocks) free(g_big_blocks[next]);
  ++g_big_ticks;
  errno = saved_errno;
}

TORTURE_SCENARIO(itimer_free_sampled) {
  for (void*& block : g_big_blocks) {
    block = malloc(opaque(kBigSize));
    if (!block) return 2;
    static_cast<char*>(block)[0] = 1;
  }
  start_timer(freeing_handler);
  const double start = now_seconds();
  uint64_t rounds = 0, corrupted = 0;
  while (keep_running(start, kTimerSeconds, g_big_next, static_cast<long>(kBigHandlerBlocks))) {
    unsigned char* blocks[4];
    for (unsigned i = 0; i < 4; ++i) {
      blocks[i] = static_cast<unsigned char*>(malloc(opaque(kBigSize)));
      if (blocks[i]) blocks[i][0] = blocks[i][kBigSize - 1] = static_cast<unsigned char>(i + rounds);
    }
    for (unsigned i = 0; i < 4; ++i) {
      if (!blocks[i] || blocks[i][0] != static_cast<unsigned char>(i + rounds) ||
          blocks[i][kBigSize - 1] != static_cast<unsigned char>(i + rounds))
        ++corrupted;
      free(blocks[i]);
    }
    ++rounds;
  }
  stop_timer();
  const size_t freed = std::min(g_big_next.load(), kBigHandlerBlocks);
  for (size_t i = freed; i < kBigHandlerBlocks; ++i) free(g_big_blocks[i]);
  say("ticks=%ld handler_frees=%zu rounds=%llu corrupted=%llu", g_big_ticks.load(), freed,
      static_cast<unsigned long long>(rounds), static_cast<unsigned long long>(corrupted));
  return corrupted ? 3 : 0;
}

TEST(SignalHandler, ItimerHandlerThatFreesSampledBlocksNeverHangs) {
  expect_hotpool_survives_as_glibc_does({.scenario = "itimer_free_sampled",
                                         .counted = "handler_frees",
                                         .pooled_key = "",
                                         .environment = {"HOTPOOL_SAMPLE=1"}});
}

// ---------------------------------------------------------------------------
// fork() from a handler that interrupted malloc (glibc's tst-mallocfork2):
// a sender process sends SIGUSR1 over and over; the handler forks, the
// child _exits at once, the handler waits for it. fork() runs hotpool's
// atfork handlers, which take its locks: the interrupted malloc may hold one.

std::atomic<long> g_forks{0};
std::atomic<long> g_fork_failures{0};
// The handler's acknowledgement to the sender, which sends the next signal
// only after it (and a pause): signals sent at a fixed rate would come
// faster than a loaded machine forks, and the interrupted loop, never
// resumed between two handlers, would starve (a livelock, with glibc too).
int g_ack[2] = {-1, -1};

void forking_handler(int) {
  const int saved_errno = errno;
  const pid_t child = fork();
  if (child == 0) _exit(0);
  if (child < 0) {
    ++g_fork_failures;
  } else {
    int status = 0;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) ++g_fork_failures;
  }
  ++g_forks;
  while (write(g_ack[1], "a", 1) < 0 && errno == EINTR) {
  }
  errno = saved_errno;
}

constexpr double kForkSeconds = 0.8;
constexpr long kWantedForks = 200;

// Installs forking_handler and starts the sender. SIGUSR1 is blocked while
// the sender is forked, so that no handler runs inside that fork() (that is
// another test), and stays blocked: the caller unblocks it once it is ready
// (threads it creates meanwhile inherit the mask and never take it).
pid_t start_usr1_sender() {
  if (pipe(g_ack) != 0) return -1;
  struct sigaction action = {};
  action.sa_handler = forking_handler;
  sigaction(SIGUSR1, &action, nullptr);
  sigset_t usr1;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  sigprocmask(SIG_BLOCK, &usr1, nullptr);
  const pid_t parent = getpid();
  const pid_t sender = fork();
  if (sender == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(0);
    for (;;) {
      if (kill(parent, SIGUSR1) != 0) _exit(0);
      char ack;
      ssize_t got;
      while ((got = read(g_ack[0], &ack, 1)) < 0 && errno == EINTR) {
      }
      if (got != 1) _exit(0);
      usleep(300);  // leaves the main loop time to run between handlers
    }
  }
  return sender;
}

void set_usr1_blocked(bool blocked) {
  sigset_t usr1;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  sigprocmask(blocked ? SIG_BLOCK : SIG_UNBLOCK, &usr1, nullptr);
}

void stop_sender(pid_t sender) {
  set_usr1_blocked(true);
  kill(sender, SIGKILL);
  waitpid(sender, nullptr, 0);
}

TORTURE_SCENARIO(fork_in_handler) {
  warm_up();
  say_pooled();
  const pid_t sender = start_usr1_sender();
  if (sender < 0) return 2;
  set_usr1_blocked(false);
  say("sender=started");

  const double start = now_seconds();
  uint64_t rounds = 0, corrupted = 0;
  while (keep_running(start, kForkSeconds, g_forks, kWantedForks)) corrupted += main_batch(rounds++, false);
  stop_sender(sender);
  say("forks=%ld fork_failures=%ld rounds=%llu corrupted=%llu", g_forks.load(),
      g_fork_failures.load(), static_cast<unsigned long long>(rounds),
      static_cast<unsigned long long>(corrupted));
  return corrupted || g_fork_failures ? 3 : 0;
}

TEST(SignalHandler, ForkFromAHandlerThatInterruptedMallocNeverHangs) {
  expect_hotpool_survives_as_glibc_does({.scenario = "fork_in_handler", .counted = "forks"});
}

// The same, while the interrupted thread forks too: the handler's fork()
// may now interrupt the main thread's fork() between its atfork prepare
// and parent handlers, where hotpool holds all its locks.
TORTURE_SCENARIO(fork_in_handler_while_forking) {
  warm_up();
  const pid_t sender = start_usr1_sender();
  if (sender < 0) return 2;
  set_usr1_blocked(false);
  say("sender=started");
  const double start = now_seconds();
  uint64_t rounds = 0, corrupted = 0, own_forks = 0, own_failures = 0;
  while (keep_running(start, kForkSeconds, g_forks, kWantedForks)) {
    corrupted += main_batch(rounds++, false);
    const pid_t child = fork();
    if (child == 0) _exit(0);
    if (child < 0) {
      ++own_failures;
      continue;
    }
    int status = 0;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    ++own_forks;
  }
  stop_sender(sender);
  say("forks=%ld own_forks=%llu fork_failures=%ld corrupted=%llu", g_forks.load(),
      static_cast<unsigned long long>(own_forks), g_fork_failures.load() + static_cast<long>(own_failures),
      static_cast<unsigned long long>(corrupted));
  return corrupted || g_fork_failures || own_failures ? 3 : 0;
}

TEST(SignalHandler, ForkFromAHandlerThatInterruptedForkNeverHangs) {
  expect_hotpool_survives_as_glibc_does(
      {.scenario = "fork_in_handler_while_forking", .counted = "forks", .pooled_key = ""});
}

// The same with a second thread whose thread cache holds pooled blocks of
// the main loop's classes. In the child of the handler's fork() that thread
// is gone and its cached blocks go back to the depots; the handler may have
// interrupted the main loop inside one of those depots (a refill or a
// drain, its lock held), and that depot must wait until the interrupted
// code, which goes on in the child too, is done with it.
//
// Modes fixed and auto only: a process with a second thread makes glibc's
// fork() take malloc's arena locks, and a handler that interrupted glibc's
// own malloc then deadlocks in glibc (fork() is not async-signal-safe in
// POSIX.1-2008 TC2; glibc 2.34's _Fork is). With the main loop's classes
// pooled, the loop never enters glibc's malloc, so the only locks at stake
// are hotpool's. There is no plain-glibc run to compare with, for the same
// reason.

int g_park[2] = {-1, -1};

void* cache_filler(void*) {
  // Enough blocks of each class that every bin keeps some after its last
  // drain; SIGUSR1 stays blocked here (inherited).
  constexpr int kBlocks = 4 * 48;
  static void* blocks[kBlocks];
  for (int i = 0; i < kBlocks; ++i) blocks[i] = malloc(opaque(kMainSizes[i % 4]));
  for (int i = 0; i < kBlocks; ++i) free(blocks[i]);
  char byte;
  while (read(g_park[0], &byte, 1) < 0 && errno == EINTR) {
  }
  return nullptr;
}

TORTURE_SCENARIO(fork_in_handler_with_a_thread) {
  warm_up();
  say_pooled();
  if (pipe(g_park) != 0) return 2;
  const pid_t sender = start_usr1_sender();
  if (sender < 0) return 2;
  pthread_t filler;
  if (pthread_create(&filler, nullptr, cache_filler, nullptr) != 0) return 2;
  set_usr1_blocked(false);
  say("sender=started");

  const double start = now_seconds();
  uint64_t rounds = 0, corrupted = 0;
  while (keep_running(start, kForkSeconds, g_forks, kWantedForks)) corrupted += main_batch(rounds++, false);
  stop_sender(sender);
  const ssize_t woken = write(g_park[1], "x", 1);
  pthread_join(filler, nullptr);
  say("forks=%ld fork_failures=%ld rounds=%llu corrupted=%llu", g_forks.load(), g_fork_failures.load(),
      static_cast<unsigned long long>(rounds), static_cast<unsigned long long>(corrupted));
  return corrupted || g_fork_failures || woken != 1 ? 3 : 0;
}

TEST(SignalHandler, ForkFromAHandlerThatInterruptedMallocWhileAnotherThreadCachesBlocksNeverHangs) {
  if (!mode_pools()) {
    GTEST_SKIP() << "mode " << torture::mode_under_test()
                 << ": every allocation is glibc's, whose fork() deadlocks by itself when a handler interrupted "
                    "its malloc in a process with threads";
  }
  // A deadline well beyond the scenario's longest run: only a hang reaches it.
  const ScenarioRun hotpool = run_scenario("fork_in_handler_with_a_thread", Preload::Yes, {}, kLongestSeconds + 20);
  EXPECT_EQ(hotpool.status, "exit 0") << (hotpool.timed_out ? "hotpool deadlocked. " : "") << describe(hotpool);
  EXPECT_EQ(hotpool.value("pooled"), "1") << describe(hotpool);
  if (hotpool.status == "exit 0") {
    EXPECT_GE(hotpool.number("forks"), 10u) << describe(hotpool);
  }
}

// The same while the second thread forks too, over and over: its fork()
// takes hotpool's locks one by one in the prepare handler and may be
// waiting for the depot lock the interrupted main loop holds, while the
// handler's fork() waits for a lock that thread took first.

std::atomic<bool> g_stop_forking{false};
std::atomic<long> g_thread_forks{0};
std::atomic<long> g_thread_fork_failures{0};

void* forking_thread(void*) {
  while (!g_stop_forking.load()) {
    const pid_t child = fork();
    if (child == 0) _exit(0);
    if (child < 0) {
      ++g_thread_fork_failures;
      continue;
    }
    int status = 0;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) ++g_thread_fork_failures;
    ++g_thread_forks;
  }
  return nullptr;
}

TORTURE_SCENARIO(fork_in_handler_while_a_thread_forks) {
  warm_up();
  say_pooled();
  const pid_t sender = start_usr1_sender();
  if (sender < 0) return 2;
  pthread_t forker;
  if (pthread_create(&forker, nullptr, forking_thread, nullptr) != 0) return 2;
  set_usr1_blocked(false);
  say("sender=started");

  const double start = now_seconds();
  uint64_t rounds = 0, corrupted = 0;
  while (keep_running(start, kForkSeconds, g_forks, kWantedForks)) corrupted += main_batch(rounds++, false);
  stop_sender(sender);
  g_stop_forking = true;
  pthread_join(forker, nullptr);
  say("forks=%ld thread_forks=%ld fork_failures=%ld rounds=%llu corrupted=%llu", g_forks.load(),
      g_thread_forks.load(), g_fork_failures.load() + g_thread_fork_failures.load(),
      static_cast<unsigned long long>(rounds), static_cast<unsigned long long>(corrupted));
  return corrupted || g_fork_failures || g_thread_fork_failures ? 3 : 0;
}

TEST(SignalHandler, ForkFromAHandlerThatInterruptedMallocWhileAnotherThreadForksNeverHangs) {
  if (!mode_pools()) {
    GTEST_SKIP() << "mode " << torture::mode_under_test()
                 << ": every allocation is glibc's, whose fork() deadlocks by itself when a handler interrupted "
                    "its malloc in a process with threads";
  }
  const ScenarioRun hotpool = run_scenario("fork_in_handler_while_a_thread_forks", Preload::Yes, {}, kLongestSeconds + 20);
  EXPECT_EQ(hotpool.status, "exit 0") << (hotpool.timed_out ? "hotpool deadlocked. " : "") << describe(hotpool);
  EXPECT_EQ(hotpool.value("pooled"), "1") << describe(hotpool);
  if (hotpool.status == "exit 0") {
    EXPECT_GE(hotpool.number("forks"), 10u) << describe(hotpool);
    EXPECT_GE(hotpool.number("thread_forks"), 1u) << describe(hotpool);
  }
}

}  // namespace
