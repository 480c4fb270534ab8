// thread_crowd: many threads, each using many size classes a little: what
// an allocator's per-thread state and caches cost in memory (suite threads).
//
//   thread_crowd [THREADS = 100] [REPLACEMENTS = 20000]
//
// Each thread keeps 64 blocks of 16 to 527 bytes (25 size classes of 16
// bytes and more), replacing a random one REPLACEMENTS times (free, then
// malloc of a new random size, filled). Then every thread waits at a
// barrier with its 64 blocks held, so that all of them are alive at once
// (the peak), frees them and exits. Deterministic: prints the thread count
// and a checksum of the blocks' sizes, the same for every allocator.
#include <pthread.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr int kHeld = 64;
pthread_barrier_t g_all_held;
long g_replacements = 20000;

struct Worker {
  pthread_t thread;
  unsigned seed;
  uint64_t checksum;
};

void* work(void* arg) {
  auto* worker = static_cast<Worker*>(arg);
  unsigned state = worker->seed;
  void* held[kHeld] = {};
  uint64_t checksum = 0;
  for (long i = 0; i < g_replacements; ++i) {
    state = state * 1103515245u + 12345u;
    const size_t size = 16 + (state >> 16) % 512;
    const unsigned k = (state >> 8) % kHeld;
    std::free(held[k]);
    held[k] = std::malloc(size);
    if (held[k] == nullptr) std::abort();
    std::memset(held[k], static_cast<int>(i & 0xff), size);
    checksum = checksum * 31 + size;
  }
  pthread_barrier_wait(&g_all_held);
  for (void* block : held) std::free(block);
  worker->checksum = checksum;
  return nullptr;
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 100;
  if (argc > 2) g_replacements = std::atol(argv[2]);
  if (threads < 1 || threads > 4096 || g_replacements < 0) {
    std::fprintf(stderr, "usage: thread_crowd [THREADS (1-4096)] [REPLACEMENTS]\n");
    return 2;
  }
  pthread_barrier_init(&g_all_held, nullptr, static_cast<unsigned>(threads));
  std::vector<Worker> workers(static_cast<size_t>(threads));
  for (int i = 0; i < threads; ++i) {
    workers[i].seed = static_cast<unsigned>(i) * 2654435761u + 1;
    if (pthread_create(&workers[i].thread, nullptr, work, &workers[i]) != 0) {
      std::fprintf(stderr, "thread_crowd: pthread_create failed\n");
      return 1;
    }
  }
  uint64_t checksum = 0;
  for (Worker& worker : workers) {
    pthread_join(worker.thread, nullptr);
    checksum ^= worker.checksum;
  }
  std::printf("thread_crowd: %d threads, %ld replacements each, checksum %016llx\n", threads, g_replacements,
              static_cast<unsigned long long>(checksum));
  return 0;
}
