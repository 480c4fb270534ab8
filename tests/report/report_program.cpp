// A program with a known allocation pattern, run under LD_PRELOAD by
// report_test.cpp. Its modes:
//   known        777 blocks of 5000 bytes, all live at once, then 333 freed;
//                returns from main
//   exit-thread  four threads allocate without end; one of them calls
//                exit(3) while the others are still allocating
//   on-demand    like known, then hotpool_report(), then more allocations
//   known-then-chdir DIR  known, then changes to DIR before it returns
//   echo ARGS    prints its arguments (for output comparisons)
//   slow-class   200,000 quick pairs of 32 bytes (the auto policy's windows
//                are then at their longest), then 400 rounds, 1 ms apart,
//                of 8 blocks of 64 KiB allocated, written and freed
//   fast-then-slow  400,000 quick pairs over the 16 classes of 16 to 256
//                bytes, then about 2 s of 4 pairs of 1 KiB every 250 us
//                and, every 16th time, one pair of one of those classes
//   getattr      the main thread, then 8 threads one after another, each
//                calls pthread_getattr_np on itself first (glibc allocates
//                in there with the thread's lock held), then allocates;
//                prints the stack sizes it found nonzero
#include <alloca.h>
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

void known_pattern() {
  std::vector<void*> blocks(777);
  for (void*& block : blocks) {
    block = std::malloc(5000);
    std::memset(block, 1, 5000);
  }
  for (int i = 0; i < 333; ++i) std::free(blocks[static_cast<size_t>(i)]);
  std::printf("known pattern done\n");
}

std::atomic<unsigned long> g_rounds{0};

void* allocate_forever(void* arg) {
  const bool exits = arg != nullptr;
  for (unsigned long i = 0;; ++i) {
    void* block = std::malloc(16 + i % 2000);
    std::memset(block, 0, 16);
    std::free(block);
    if (exits && g_rounds.fetch_add(1) > 200000) {
      std::fflush(stdout);
      std::exit(3);
    }
  }
  return nullptr;
}

void slow_class() {
  for (int i = 0; i < 200000; ++i) {
    void* block = std::malloc(32);
    std::memset(block, 0, 32);
    std::free(block);
  }
  for (int round = 0; round < 400; ++round) {
    void* blocks[8];
    for (void*& block : blocks) {
      block = std::malloc(64 * 1024);
      std::memset(block, 1, 64 * 1024);
    }
    for (void* block : blocks) std::free(block);
    usleep(1000);
  }
  std::printf("slow class done\n");
}

void pair_of_class(int i) {
  const size_t size = 16 * static_cast<size_t>(1 + i % 16);
  void* block = std::malloc(size);
  std::memset(block, 0, size);
  std::free(block);
}

void fast_then_slow() {
  for (int i = 0; i < 400000; ++i) pair_of_class(i);
  for (int i = 0; i < 8000; ++i) {
    for (int j = 0; j < 4; ++j) {
      void* block = std::malloc(1024);
      std::memset(block, 0, 1024);
      std::free(block);
    }
    if (i % 16 == 0) pair_of_class(i / 16);
    usleep(250);
  }
  std::printf("fast then slow done\n");
}

// pthread_getattr_np on the calling thread, then a few allocations: true
// when it found the thread's stack.
bool stack_then_allocate() {
  pthread_attr_t attr;
  if (pthread_getattr_np(pthread_self(), &attr) != 0) return false;
  void* low = nullptr;
  size_t size = 0;
  const bool found = pthread_attr_getstack(&attr, &low, &size) == 0 && low && size;
  pthread_attr_destroy(&attr);
  for (int i = 0; i < 100; ++i) std::free(std::malloc(48));
  return found;
}

char g_found;  // a thread's non-null result

void* stack_then_allocate_thread(void*) { return stack_then_allocate() ? &g_found : nullptr; }

int getattr_threads() {
  int found = stack_then_allocate() ? 1 : 0;
  for (int i = 0; i < 8; ++i) {
    pthread_t thread;
    void* result = nullptr;
    if (pthread_create(&thread, nullptr, stack_then_allocate_thread, nullptr) != 0) return 2;
    pthread_join(thread, &result);
    found += result != nullptr;
  }
  std::printf("%d of 9 stacks found\n", found);
  return 0;
}

// A frame whose size changes from call to call (alloca, by its rounding of
// 16 bytes) that calls malloc itself: replayed from the %rbp the
// allocator's entry passes on (no distance fits every call).
__attribute__((noinline)) unsigned long allocate_below_alloca(unsigned words) {
  auto* scratch = static_cast<volatile unsigned long*>(alloca(words * sizeof(unsigned long)));
  for (unsigned i = 0; i < words; ++i) scratch[i] = i;
  void* block = std::malloc(64);
  std::memset(block, 0, 64);
  std::free(block);
  return scratch[words - 1];
}

// Frames of fixed sizes (the program is built without frame pointers):
// replayed from what the first walks taught.
__attribute__((noinline)) unsigned long allocate_in_fixed_frames(unsigned i) {
  void* block = std::malloc(64 + i % 64);
  std::memset(block, 0, 64);
  std::free(block);
  return i;
}

// Allocations in a signal handler on an alternate signal stack: stacks
// outside the thread's own are walked by libgcc, every one.
void allocate_in_handler(int) {
  void* block = std::malloc(48);
  std::memset(block, 0, 48);
  std::free(block);
}

int allocate_on_alternate_stack(unsigned signals) {
  static char alternate[1 << 16];
  stack_t stack = {};
  stack.ss_sp = alternate;
  stack.ss_size = sizeof(alternate);
  if (sigaltstack(&stack, nullptr) != 0) return 1;
  struct sigaction action = {};
  action.sa_handler = allocate_in_handler;
  action.sa_flags = SA_ONSTACK;
  if (sigaction(SIGUSR1, &action, nullptr) != 0) return 1;
  for (unsigned i = 0; i < signals; ++i) raise(SIGUSR1);
  std::printf("%u signals\n", signals);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "known";
  if (std::strcmp(mode, "known") == 0) {
    known_pattern();
    return 0;
  }
  if (std::strcmp(mode, "on-demand") == 0) {
    known_pattern();
    auto report = reinterpret_cast<void (*)()>(dlsym(RTLD_DEFAULT, "hotpool_report"));
    if (!report) return 2;
    report();
    for (int i = 0; i < 100; ++i) std::free(std::malloc(5000));
    return 0;
  }
  if (std::strcmp(mode, "exit-thread") == 0) {
    pthread_t threads[4];
    for (int i = 0; i < 4; ++i) pthread_create(&threads[i], nullptr, allocate_forever, i == 3 ? &threads : nullptr);
    for (;;) pause();
  }
  if (std::strcmp(mode, "known-then-chdir") == 0 && argc > 2) {
    known_pattern();
    return chdir(argv[2]) == 0 ? 0 : 3;  // the report is written after this
  }
  if (std::strcmp(mode, "fast-then-slow") == 0) {
    fast_then_slow();
    return 0;
  }
  if (std::strcmp(mode, "slow-class") == 0) {
    slow_class();
    return 0;
  }
  if (std::strcmp(mode, "getattr") == 0) return getattr_threads();
  if (std::strcmp(mode, "alloca") == 0 || std::strcmp(mode, "fixed-frames") == 0) {
    const bool varying = std::strcmp(mode, "alloca") == 0;
    unsigned long sum = 0;
    for (unsigned i = 0; i < 5000; ++i)
      sum += varying ? allocate_below_alloca(2 * (1 + i % 37)) : allocate_in_fixed_frames(i);
    std::printf("%lu\n", sum);
    return 0;
  }
  if (std::strcmp(mode, "signal-stack") == 0) return allocate_on_alternate_stack(3000);
  if (std::strcmp(mode, "echo") == 0) {
    for (int i = 2; i < argc; ++i) std::printf("%s\n", argv[i]);
    return 0;
  }
  return 2;
}
