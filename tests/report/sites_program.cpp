// sites_program: allocation patterns whose escape classes are known exactly,
// run under LD_PRELOAD with HOTPOOL_SAMPLE=1 by sites_test.cpp. Each pattern
// lives in a function of its own; the line of each malloc is marked with a
// SITE comment that the test looks for.
//   sites_program patterns N   every pattern N times
//   sites_program shares N     0.01 N, 0.29 N and 0.7 N allocations from three sites
//   sites_program threads T N  T threads alive at once, N allocations each
//   sites_program recursion D N  N allocations at the bottom of a D-deep recursion
//   sites_program dlopen LIB1 LIB2 N  N allocations in LIB1's function
//                              (kept loaded) and in LIB2's (unloaded before exit)
//   sites_program many_stacks L  2^L allocations, each from a stack of its
//                              own, freed in the allocating frame
//   sites_program exit_free N  a thread's N allocations, freed by the same
//                              thread in its last round of key destructors
//   sites_program sizes N      N blocks of each of a few sizes, kept, then
//                              freed; prints each size's malloc_usable_size
//   sites_program realloc_shares N  N/2 rounds of realloc_share (a malloc,
//                              its realloc, the free) and N/2 of large_share
//   sites_program bytes N      N rounds of one 256 KiB block, one of 2 MiB
//                              (too large to sample), four of 8 KiB, 1000 of
//                              32 bytes and 500 calloc'ed ones, each freed at once
//   sites_program bytes_sites N  N rounds of the 512 stacks of many_stacks
//                              (blocks of 3000 and 8 bytes), and every 8th
//                              round one 256 KiB block
//   sites_program aligned N    N rounds of one block from each aligned call
//                              (memalign, aligned_alloc, posix_memalign,
//                              valloc, C++'s aligned new), each checked for
//                              its alignment and freed in its frame; exits 1
//                              if one was not aligned
//   sites_program library_path N  N vectors each grown by push_back to 64
//                              elements: allocations through the standard
//                              library's inlined code, then freed
//   sites_program aligned_edges N  N rounds of memalign(A, 0) for every
//                              alignment A from 32 B to a page, and of
//                              pvalloc(100) (a whole page usable); exits 1
//                              if one was not aligned or too small
#include <dlfcn.h>
#include <limits.h>  // PTHREAD_DESTRUCTOR_ITERATIONS
#include <pthread.h>

#include <malloc.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#define NOINLINE __attribute__((noinline))

namespace {

void* volatile g_sink;

NOINLINE void frame_local_site(size_t size) {
  char* block = static_cast<char*>(std::malloc(size));  // SITE: frame_local
  std::memset(block, 1, size);
  g_sink = block;
  std::free(std::malloc(8));  // another allocator call in between: not temporary
  std::free(block);           // freed in its own frame
}

NOINLINE void temporary_site() {
  void* block = std::malloc(500);  // SITE: temporary
  std::free(block);                // no allocator call in between
}

NOINLINE void* make_block() {
  return std::malloc(200);  // SITE: thread_local
}

NOINLINE void thread_local_site() {
  void* first = make_block();
  void* second = make_block();  // the same function, called again before the free
  std::free(first);
  std::free(second);
}

// The same escape classes through C++'s operators, which hotpool defines
// itself (a failed new goes to the C++ runtime's): attributed to the
// function that calls new, not to an operator.
struct Node {
  Node* next;
  char payload[56];
};

NOINLINE void cpp_new_in_frame() {
  auto* node = new Node;  // SITE: new_frame_local
  g_sink = node;
  std::free(std::malloc(8));  // another allocator call in between: not temporary
  delete node;          // freed in its own frame (plain delete)
}

NOINLINE char* make_array() {
  return new char[120];  // SITE: new_thread_local
}

NOINLINE void cpp_new_returned() {
  char* first = make_array();
  char* second = make_array();
  ::operator delete[](first, 120);  // sized delete[]
  delete[] second;
}

NOINLINE void cpp_nothrow_new_freed_at_once() {
  void* block = ::operator new(24, std::nothrow);  // SITE: new_nothrow
  ::operator delete(block, std::nothrow);
}

std::vector<void*> g_leaks;

NOINLINE void leak_site() {
  g_leaks.push_back(std::malloc(400));  // SITE: leak
}

struct Handoff {
  pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
  pthread_cond_t ready = PTHREAD_COND_INITIALIZER;
  std::vector<void*> blocks;
  bool done = false;
};

NOINLINE void* produce() {
  return std::malloc(300);  // SITE: cross_thread
}

void* consumer(void* arg) {
  auto* handoff = static_cast<Handoff*>(arg);
  pthread_mutex_lock(&handoff->mutex);
  for (;;) {
    while (handoff->blocks.empty() && !handoff->done) pthread_cond_wait(&handoff->ready, &handoff->mutex);
    if (handoff->blocks.empty()) break;
    void* block = handoff->blocks.back();
    handoff->blocks.pop_back();
    pthread_mutex_unlock(&handoff->mutex);
    std::free(block);
    pthread_mutex_lock(&handoff->mutex);
  }
  pthread_mutex_unlock(&handoff->mutex);
  return nullptr;
}

NOINLINE void cross_thread_sites(int count) {
  Handoff handoff;
  handoff.blocks.reserve(static_cast<size_t>(count));
  pthread_t thread;
  pthread_create(&thread, nullptr, consumer, &handoff);
  for (int i = 0; i < count; ++i) {
    void* block = produce();
    pthread_mutex_lock(&handoff.mutex);
    handoff.blocks.push_back(block);
    pthread_cond_signal(&handoff.ready);
    pthread_mutex_unlock(&handoff.mutex);
  }
  pthread_mutex_lock(&handoff.mutex);
  handoff.done = true;
  pthread_cond_signal(&handoff.ready);
  pthread_mutex_unlock(&handoff.mutex);
  pthread_join(thread, nullptr);
}

NOINLINE void realloc_site() {
  char* block = static_cast<char*>(std::malloc(32));  // SITE: realloc_from
  block[0] = 1;
  block = static_cast<char*>(std::realloc(block, 5000));  // SITE: realloc_to
  block[0] = 2;
  std::free(block);
}

NOINLINE void rare_share() {
  void* block = std::malloc(96);  // SITE: share1
  g_sink = block;
  std::free(block);
}

NOINLINE void small_share() {
  void* block = std::malloc(64);  // SITE: share29
  g_sink = block;
  std::free(block);
}

NOINLINE void large_share() {
  void* block = std::malloc(80);  // SITE: share70
  g_sink = block;
  std::free(block);
}

// A buffer grown by realloc, as strings and vectors of C programs are:
// the grown block is an allocation of its own (realloc_share_to).
NOINLINE void realloc_share() {
  char* block = static_cast<char*>(std::malloc(40));  // SITE: realloc_share_from
  block[0] = 1;
  block = static_cast<char*>(std::realloc(block, 400));  // SITE: realloc_share_to
  g_sink = block;
  std::free(block);
}

NOINLINE void big_bytes() {
  void* block = std::malloc(256 << 10);  // SITE: big_bytes
  g_sink = block;
  std::free(block);
}

NOINLINE void small_bytes() {
  void* block = std::malloc(32);  // SITE: small_bytes
  g_sink = block;
  std::free(block);
}

NOINLINE void calloc_bytes() {
  void* block = std::calloc(2, 16);  // SITE: calloc_bytes
  g_sink = block;
  std::free(block);
}

NOINLINE void medium_bytes() {
  void* block = std::malloc(8 << 10);  // SITE: medium_bytes
  g_sink = block;
  std::free(block);
}

NOINLINE void huge_bytes() {
  void* block = std::malloc(2 << 20);  // above the largest class: never sampled
  g_sink = block;
  std::free(block);
}

NOINLINE void thread_site() {
  void* block = std::malloc(48);  // SITE: thread_site
  g_sink = block;
  std::free(block);
}

struct ThreadsRun {
  pthread_barrier_t all_started;
  int count;
};

void* thread_body(void* arg) {
  auto* run = static_cast<ThreadsRun*>(arg);
  thread_site();
  pthread_barrier_wait(&run->all_started);  // every thread alive (and allocating) at once
  for (int i = 1; i < run->count; ++i) thread_site();
  return nullptr;
}

int run_threads(int threads, int count) {
  ThreadsRun run;
  run.count = count;
  pthread_barrier_init(&run.all_started, nullptr, static_cast<unsigned>(threads));
  std::vector<pthread_t> ids(static_cast<size_t>(threads));
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 256 * 1024);
  for (pthread_t& id : ids)
    if (pthread_create(&id, &attr, thread_body, &run) != 0) return 1;
  for (pthread_t& id : ids) pthread_join(id, nullptr);
  pthread_attr_destroy(&attr);
  pthread_barrier_destroy(&run.all_started);
  return 0;
}

NOINLINE void allocate_at_bottom() {
  void* block = std::malloc(72);  // SITE: recursion_bottom
  g_sink = block;
  std::free(block);
}

NOINLINE int recurse(int depth) {
  if (depth == 0) {
    allocate_at_bottom();  // SITE: recursion_leaf
    return 0;
  }
  const int below = recurse(depth - 1);  // SITE: recursion_call
  return below + 1;  // not a tail call
}

// An allocation in a function inlined into another inlined one, inlined
// into a function of its own frame (always_inline: at any optimization
// level): one return address, three functions.
__attribute__((always_inline)) inline void* inlined_allocate(size_t size) {
  return std::malloc(size);  // SITE: inlined_malloc
}
__attribute__((always_inline)) inline void inlined_middle(size_t size) {
  void* block = inlined_allocate(size);  // SITE: inlined_call
  g_sink = block;
  std::free(block);
}
NOINLINE void inlining_caller() {
  inlined_middle(88);  // SITE: inlined_into
}

// Allocations the program asks for through the standard library: each
// push_back that outgrows the vector's storage allocates in its
// _M_realloc_insert, through the allocator traits, down to operator new.
NOINLINE void grow_vector() {
  std::vector<int> values;
  for (int i = 0; i < 64; ++i) values.push_back(i);  // SITE: library_push_back
  g_sink = values.data();
}

using LibraryFunction = void (*)(int);

NOINLINE int call_library(const char* path, bool unload, int count) {
  void* library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!library) return std::fprintf(stderr, "%s\n", dlerror()), 1;
  auto function = reinterpret_cast<LibraryFunction>(dlsym(library, "sites_library_allocate"));
  if (!function) return 1;
  function(count);  // SITE: library_call
  if (unload) dlclose(library);
  return 0;
}

// 2^levels distinct stacks, each level calling one of two functions by a
// bit of the path: more than the stack depot's ids with 17 levels (and
// HOTPOOL_DEPTH deep enough), so that most of them are sampled without a
// site. Every block is still freed in its own frame (frame_local_site's
// blocks, of a size of their own).
NOINLINE int branch_a(unsigned path, int level);
NOINLINE int branch_b(unsigned path, int level);
NOINLINE int descend(unsigned path, int level) {
  if (level == 0) {
    frame_local_site(3000);
    return 0;
  }
  return ((path >> (level - 1)) & 1 ? branch_b(path, level - 1) : branch_a(path, level - 1)) + 1;
}
NOINLINE int branch_a(unsigned path, int level) { return descend(path, level) + 1; }  // not a tail call
NOINLINE int branch_b(unsigned path, int level) { return descend(path, level) + 2; }

// Aligned allocations: each written over its usable size (a sampled block
// must hold it) and checked for its alignment.
bool g_misaligned = false;

NOINLINE void use_aligned(void* block, size_t alignment, size_t size) {
  if (!block || reinterpret_cast<uintptr_t>(block) % alignment != 0 || malloc_usable_size(block) < size) {
    g_misaligned = true;
    return;
  }
  std::memset(block, 0x5a, malloc_usable_size(block));
  g_sink = block;
}

NOINLINE void memalign_site() {
  void* block = memalign(64, 200);  // SITE: memalign
  use_aligned(block, 64, 200);
  std::free(block);
}

NOINLINE void aligned_alloc_site() {
  void* block = aligned_alloc(256, 1000);  // SITE: aligned_alloc
  use_aligned(block, 256, 1000);
  std::free(block);
}

NOINLINE void posix_memalign_site() {
  void* block = nullptr;
  if (posix_memalign(&block, 32, 40) != 0) block = nullptr;  // SITE: posix_memalign
  use_aligned(block, 32, 40);
  std::free(block);
}

NOINLINE void valloc_site() {
  void* block = valloc(100);  // SITE: valloc
  use_aligned(block, 4096, 100);
  std::free(block);
}

struct alignas(128) Aligned128 {
  char bytes[300];
};

NOINLINE void aligned_new_site() {
  auto* object = new Aligned128;  // SITE: aligned_new
  use_aligned(object, 128, sizeof(Aligned128));
  delete object;
}

NOINLINE void pvalloc_site() {
  void* block = pvalloc(100);  // SITE: pvalloc
  use_aligned(block, 4096, 4096);
  std::free(block);
}

// A block of no bytes, as aligned as it gets: with a largest class of
// A - 16 bytes (HOTPOOL_CLASSES), a sampled one once started at the very
// end of its region block (the next one's start), and its free aborted.
NOINLINE void aligned_zero_sites() {
  for (size_t alignment = 32; alignment <= 4096; alignment *= 2) {
    void* block = memalign(alignment, 0);
    use_aligned(block, alignment, 0);
    std::free(block);
  }
}

// A site that allocates only after many_stacks' thousands of sites: the
// report must find it among all of them, whatever its id.
NOINLINE void late_site() {
  void* block = std::malloc(40);  // SITE: late
  g_sink = block;
  std::free(block);
}

// A thread's blocks freed by that thread at its very end: in the last
// round of pthread key destructors, after hotpool has let the thread go (a
// key created after hotpool's own runs after it in every round).
struct ExitFree {
  pthread_key_t key;
  int rounds = 0;
  std::vector<void*> blocks;
};

void free_in_the_last_round(void* value) {
  auto* state = static_cast<ExitFree*>(value);
  if (++state->rounds < PTHREAD_DESTRUCTOR_ITERATIONS) {
    pthread_setspecific(state->key, state);  // again next round
    return;
  }
  for (void* block : state->blocks) std::free(block);
  state->blocks.clear();
}

NOINLINE void* exit_free_block() {
  return std::malloc(700);  // SITE: freed_at_exit
}

int exit_free_thread(int count) {
  ExitFree state;
  if (pthread_key_create(&state.key, free_in_the_last_round) != 0) return 1;
  state.blocks.reserve(static_cast<size_t>(count));
  pthread_t thread;
  auto body = [](void* arg) -> void* {
    auto* exit_free = static_cast<ExitFree*>(arg);
    for (size_t i = 0; i < exit_free->blocks.capacity(); ++i) exit_free->blocks.push_back(exit_free_block());
    pthread_setspecific(exit_free->key, exit_free);
    return nullptr;
  };
  if (pthread_create(&thread, nullptr, body, &state) != 0) return 1;
  pthread_join(thread, nullptr);
  pthread_key_delete(state.key);
  return state.rounds == PTHREAD_DESTRUCTOR_ITERATIONS && state.blocks.empty() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const char* what = argc > 1 ? argv[1] : "patterns";
  const int count = argc > 2 ? std::atoi(argv[2]) : 1000;
  if (std::strcmp(what, "patterns") == 0) {
    g_leaks.reserve(static_cast<size_t>(count));
    for (int i = 0; i < count; ++i) {
      frame_local_site(100);
      temporary_site();
      thread_local_site();
      leak_site();
      realloc_site();
      cpp_new_in_frame();
      cpp_new_returned();
      cpp_nothrow_new_freed_at_once();
    }
    cross_thread_sites(count);
  } else if (std::strcmp(what, "threads") == 0) {
    if (run_threads(count, argc > 3 ? std::atoi(argv[3]) : 100) != 0) return 1;
  } else if (std::strcmp(what, "recursion") == 0) {
    const int repeat = argc > 3 ? std::atoi(argv[3]) : 100;
    for (int i = 0; i < repeat; ++i) recurse(count);
  } else if (std::strcmp(what, "sizes") == 0) {
    const size_t sizes[] = {0, 1, 24, 30, 100, 250, 900, 976, 1000, 4000, 5000, 70000, 200000};
    std::vector<void*> blocks;
    for (size_t size : sizes) {
      for (int i = 0; i < count; ++i) blocks.push_back(std::malloc(size));
      std::printf("%zu %zu\n", size, malloc_usable_size(blocks.back()));
    }
    for (void* block : blocks) std::free(block);
  } else if (std::strcmp(what, "many_stacks") == 0) {
    for (unsigned path = 0; path < (1u << count); ++path) descend(path, count);
  } else if (std::strcmp(what, "late_site") == 0) {
    for (unsigned path = 0; path < (1u << count); ++path) descend(path, count);
    const int repeat = argc > 3 ? std::atoi(argv[3]) : 1000;
    for (int i = 0; i < repeat; ++i) late_site();
  } else if (std::strcmp(what, "exit_free") == 0) {
    if (exit_free_thread(count) != 0) return 1;
  } else if (std::strcmp(what, "realloc_shares") == 0) {
    for (int i = 0; i < count; ++i) {
      if (i % 2 == 0) realloc_share();
      else large_share();
    }
  } else if (std::strcmp(what, "bytes") == 0) {
    for (int i = 0; i < count; ++i) {
      big_bytes();
      huge_bytes();
      for (int j = 0; j < 4; ++j) medium_bytes();
      for (int j = 0; j < 1000; ++j) small_bytes();
      for (int j = 0; j < 500; ++j) calloc_bytes();
    }
  } else if (std::strcmp(what, "bytes_sites") == 0) {
    for (int i = 0; i < count; ++i) {
      for (unsigned path = 0; path < 512; ++path) descend(path, 9);
      if (i % 8 == 0) big_bytes();
    }
  } else if (std::strcmp(what, "aligned") == 0) {
    for (int i = 0; i < count; ++i) {
      memalign_site();
      aligned_alloc_site();
      posix_memalign_site();
      valloc_site();
      aligned_new_site();
    }
    if (g_misaligned) return std::printf("misaligned\n"), 1;
  } else if (std::strcmp(what, "aligned_edges") == 0) {
    for (int i = 0; i < count; ++i) {
      aligned_zero_sites();
      pvalloc_site();
    }
    if (g_misaligned) return std::printf("misaligned\n"), 1;
  } else if (std::strcmp(what, "inlined") == 0) {
    for (int i = 0; i < count; ++i) inlining_caller();
  } else if (std::strcmp(what, "library_path") == 0) {
    for (int i = 0; i < count; ++i) grow_vector();
  } else if (std::strcmp(what, "dlopen") == 0) {
    const int repeat = argc > 4 ? std::atoi(argv[4]) : 100;
    if (argc < 4 || call_library(argv[2], false, repeat) != 0 || call_library(argv[3], true, repeat) != 0) return 1;
  } else {
    // A deterministic interleaving: of every 100 allocations, 1 from one
    // site, 29 from another, 70 from a third.
    for (int i = 0; i < count; ++i) {
      const int slot = i % 100;
      if (slot == 0) rare_share();
      else if (slot < 30) small_share();
      else large_share();
    }
  }
  std::printf("done\n");
  return 0;
}
