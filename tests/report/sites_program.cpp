// sites_program: allocation patterns whose escape classes are known exactly,
// run under LD_PRELOAD with HOTPOOL_SAMPLE=1 by sites_test.cpp. Each pattern
// lives in a function of its own; the line of each malloc is marked with a
// SITE comment that the test looks for.
//   sites_program patterns N   every pattern N times
//   sites_program shares N     0.3 N and 0.7 N allocations from two sites
#include <pthread.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define NOINLINE __attribute__((noinline))

namespace {

void* volatile g_sink;

NOINLINE void frame_local_site() {
  char* block = static_cast<char*>(std::malloc(100));  // SITE: frame_local
  std::memset(block, 1, 100);
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

NOINLINE void small_share() {
  void* block = std::malloc(64);  // SITE: share30
  g_sink = block;
  std::free(block);
}

NOINLINE void large_share() {
  void* block = std::malloc(80);  // SITE: share70
  g_sink = block;
  std::free(block);
}

}  // namespace

int main(int argc, char** argv) {
  const char* what = argc > 1 ? argv[1] : "patterns";
  const int count = argc > 2 ? std::atoi(argv[2]) : 1000;
  if (std::strcmp(what, "patterns") == 0) {
    g_leaks.reserve(static_cast<size_t>(count));
    for (int i = 0; i < count; ++i) {
      frame_local_site();
      temporary_site();
      thread_local_site();
      leak_site();
      realloc_site();
    }
    cross_thread_sites(count);
  } else {
    // A deterministic interleaving: 3 of every 10 allocations from one site.
    for (int i = 0; i < count; ++i) (i % 10 < 3) ? small_share() : large_share();
  }
  std::printf("done\n");
  return 0;
}
