// libhotpool-bench-floor.so: the floor of suite micro's pair and batch
// benchmarks, preloaded like the allocators it is shown beside. Not an
// allocator anyone should use: per thread, a LIFO stack of pointers to
// blocks of 256 KiB (every size the suite asks for fits one), and nothing
// else: no size classes, no counters, no checks, no memory ever given back.
// A malloc is a load, a compare and a pop; a free a range check and a push.
// What a pair costs under it is what the benchmark loop costs (two calls
// through the PLT, the write of one byte, the loop) plus the least that
// any thread-cache allocator does, so no allocator can be expected below
// it on the same machine: the suite's ns figures read against it.
//
// A thread's blocks come from a slice of its own (2048 blocks, carved as
// needed: the benchmark library keeps some of them for good). Anything it
// cannot serve goes to glibc: requests above 256 KiB, calloc and the
// aligned functions (glibc's, not interposed), threads beyond 64 at once, a
// thread whose slice is used up (blocks freed by other threads stay in
// those threads' stacks: producer/consumer is not a floor here, and the
// suite runs only pair and batch under it). A thread that exits leaves its
// stack and the rest of its slice to the next thread that starts: Google
// Benchmark starts new threads for every run of a multi-threaded benchmark.
#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>

extern "C" {
void* __libc_malloc(size_t size);
void __libc_free(void* block);
void* __libc_realloc(void* block, size_t size);
}

namespace {

constexpr size_t kBlockBytes = size_t{256} << 10;
// A thread's slice: its blocks are carved one by one as needed (the
// benchmark library keeps some for good: its results, its strings), and a
// freed block goes onto the thread's stack for the next malloc.
constexpr size_t kBlocksPerThread = 2048;
constexpr unsigned kStackSlots = 512;
constexpr unsigned kMaxThreads = 64;
constexpr size_t kSliceBytes = kBlockBytes * kBlocksPerThread;  // 512 MiB of address space a thread
constexpr size_t kRegionBytes = kSliceBytes * kMaxThreads;      // 32 GiB, committed as touched

std::atomic<char*> g_region{nullptr};
std::atomic<unsigned> g_next_slice{0};

struct ThreadStack {
  unsigned count;
  bool started;
  char* next;  // the slice's next block never handed out
  char* end;
  void* slots[kStackSlots];
};
__thread ThreadStack t_stack __attribute__((tls_model("initial-exec")));

// The stacks (and the rest of the slices) of exited threads, for the next
// ones (under g_orphans_lock).
ThreadStack g_orphans[kMaxThreads];
unsigned g_orphan_count;
std::atomic_flag g_orphans_lock = ATOMIC_FLAG_INIT;
pthread_key_t g_exit_key;
pthread_once_t g_exit_key_once = PTHREAD_ONCE_INIT;

void lock_orphans() {
  while (g_orphans_lock.test_and_set(std::memory_order_acquire)) {
  }
}
void unlock_orphans() { g_orphans_lock.clear(std::memory_order_release); }

void leave_stack(void*) {
  lock_orphans();
  if (g_orphan_count < kMaxThreads) g_orphans[g_orphan_count++] = t_stack;
  unlock_orphans();
  t_stack.count = 0;  // a later free in this thread's last destructors pushes, but nothing pops
  t_stack.next = t_stack.end = nullptr;
}
void make_exit_key() { pthread_key_create(&g_exit_key, leave_stack); }

bool owned(const void* block) {
  char* region = g_region.load(std::memory_order_relaxed);
  return region != nullptr &&
         static_cast<size_t>(static_cast<const char*>(block) - region) < kRegionBytes;
}

// The thread's first call: adopt an exited thread's stack and slice, or
// reserve the region (the first thread) and take a slice of it.
__attribute__((noinline)) void start_thread() {
  ThreadStack& stack = t_stack;
  stack.started = true;
  pthread_once(&g_exit_key_once, make_exit_key);
  pthread_setspecific(g_exit_key, &stack);  // any non-null value: leave_stack runs at exit
  lock_orphans();
  const bool adopted = g_orphan_count != 0;
  if (adopted) stack = g_orphans[--g_orphan_count];
  unlock_orphans();
  if (adopted) return;
  char* region = g_region.load(std::memory_order_acquire);
  if (region == nullptr) {
    void* mapped = mmap(nullptr, kRegionBytes, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapped == MAP_FAILED) return;
    char* expected = nullptr;
    if (g_region.compare_exchange_strong(expected, static_cast<char*>(mapped))) {
      region = static_cast<char*>(mapped);
    } else {
      munmap(mapped, kRegionBytes);
      region = expected;
    }
  }
  const unsigned slice = g_next_slice.fetch_add(1);
  if (slice >= kMaxThreads) return;
  stack.next = region + slice * kSliceBytes;
  stack.end = stack.next + kSliceBytes;
}

// An empty stack: a new block of the slice, or null (glibc's turn).
__attribute__((noinline)) void* carve(size_t size) {
  ThreadStack& stack = t_stack;
  if (size > kBlockBytes) return nullptr;
  if (!stack.started) {
    start_thread();
    if (stack.count != 0) return stack.slots[--stack.count];
  }
  if (stack.next == stack.end) return nullptr;
  void* block = stack.next;
  stack.next += kBlockBytes;
  return block;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) void* malloc(size_t size) {
  ThreadStack& stack = t_stack;
  if (__builtin_expect(size <= kBlockBytes && stack.count != 0, 1)) return stack.slots[--stack.count];
  if (void* block = carve(size)) return block;
  return __libc_malloc(size);
}

__attribute__((visibility("default"))) void free(void* block) {
  if (__builtin_expect(owned(block), 1)) {
    ThreadStack& stack = t_stack;
    if (stack.count < kStackSlots) stack.slots[stack.count++] = block;  // else: kept by no one
    return;
  }
  __libc_free(block);
}

__attribute__((visibility("default"))) void* realloc(void* block, size_t size) {
  if (!owned(block)) return __libc_realloc(block, size);
  void* moved = malloc(size);
  if (moved != nullptr) {
    std::memcpy(moved, block, size < kBlockBytes ? size : kBlockBytes);
    free(block);
  }
  return moved;
}

__attribute__((visibility("default"))) size_t malloc_usable_size(void* block) {
  if (owned(block)) return kBlockBytes;
  using UsableSize = size_t (*)(void*);
  static std::atomic<UsableSize> next{nullptr};  // glibc's
  UsableSize call = next.load(std::memory_order_acquire);
  if (call == nullptr) {
    call = reinterpret_cast<UsableSize>(dlsym(RTLD_NEXT, "malloc_usable_size"));
    next.store(call, std::memory_order_release);
  }
  return block != nullptr && call != nullptr ? call(block) : 0;
}

}  // extern "C"
