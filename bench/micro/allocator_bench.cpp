// hotpool-micro: malloc/free micro benchmarks (Google Benchmark), run once
// per allocator by scripts/bench (suite micro) with LD_PRELOAD set to the
// allocator under test. The program links no allocator of its own: every
// malloc and free below goes to whatever the dynamic linker resolved.
//
//   hotpool-micro [--min-time=SECONDS] [--sizes=16,32,1K,...] [benchmark flags...]
//
// Families (SIZE in bytes; one iteration = one "pair" unless said):
//   pair/SIZE/threads:T         malloc, write one byte, free; T = 1 or 2
//                               threads doing the same, each on its own
//   batch/SIZE/threads:T        32 mallocs, then the 32 frees in allocation
//                               order; an iteration is 32 pairs (the counter
//                               pairs_per_iteration says so in the JSON)
//   producer_consumer/SIZE/cpus:C
//                               one thread mallocs and hands each block
//                               through a bounded lock-free queue to a
//                               second thread that frees it; CPU time of
//                               the whole process (both threads). C = 1:
//                               both threads pinned to one CPU (they take
//                               turns); C = 2: pinned to two CPUs (they run
//                               at once). Three repetitions each.
//
// The file is compiled with -fno-builtin, so the compiler cannot pair up
// and remove a malloc and its free; benchmark::DoNotOptimize on the
// pointer keeps the block's address (and the byte written) observable.
#include <benchmark/benchmark.h>
#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#define HOTPOOL_UNLIKELY(x) __builtin_expect(!!(x), 0)

namespace {

constexpr int kBatch = 32;

// malloc and touch: a program writes to what it allocates, and an
// allocator that hands out fresh pages every time must pay for the fault.
inline void* allocate(size_t size) {
  auto* block = static_cast<unsigned char*>(std::malloc(size));
  if (block == nullptr) std::abort();
  block[0] = 1;
  benchmark::DoNotOptimize(block);
  return block;
}

void BM_pair(benchmark::State& state) {
  const auto size = static_cast<size_t>(state.range(0));
  for (auto _ : state) {
    void* block = allocate(size);
    std::free(block);
    benchmark::ClobberMemory();
  }
  state.counters["pairs_per_iteration"] = benchmark::Counter(1, benchmark::Counter::kAvgThreads);
}

void BM_batch(benchmark::State& state) {
  const auto size = static_cast<size_t>(state.range(0));
  void* blocks[kBatch];
  for (auto _ : state) {
    for (void*& block : blocks) block = allocate(size);
    for (void* block : blocks) std::free(block);
    benchmark::ClobberMemory();
  }
  state.counters["pairs_per_iteration"] = benchmark::Counter(kBatch, benchmark::Counter::kAvgThreads);
}

// A single-producer single-consumer ring of block pointers. The producer
// publishes blocks in groups of kGroup, the consumer frees whatever was
// published and hands the slots back in one store: the queue's own cost is
// spread over a group, so what remains per pair is mostly the allocator's
// (a malloc in one thread, a free of that block in another). A side that
// must wait sleeps in std::atomic::wait (a futex after a short spin) and
// so costs no CPU time: on a two-core machine shared with other work, a
// busy-waiting side would measure the scheduler, not the allocator.
class BlockQueue {
 public:
  // Producer side.
  void push(void* block) {
    if (HOTPOOL_UNLIKELY(next_tail_ - head_seen_ == kSlots)) wait_for_room();
    slots_[next_tail_ % kSlots] = block;
    if (++next_tail_ % kGroup == 0) publish();
  }
  void publish() {
    tail_.store(next_tail_, std::memory_order_release);
    tail_.notify_one();
  }

  // Consumer side: frees blocks until the end marker (nullptr).
  void free_all() {
    size_t head = 0;
    for (;;) {
      size_t tail;
      while ((tail = tail_.load(std::memory_order_acquire)) == head) tail_.wait(head, std::memory_order_acquire);
      for (; head != tail; ++head) {
        void* block = slots_[head % kSlots];
        if (block == nullptr) return;
        std::free(block);
      }
      head_.store(head, std::memory_order_release);
      head_.notify_one();
    }
  }

 private:
  // kSlots is a multiple of kGroup, so the ring is only ever full right
  // after a publish: the producer never waits on blocks it has not handed over.
  static constexpr size_t kSlots = 256;
  static constexpr size_t kGroup = 32;

  void wait_for_room() {
    for (;;) {
      const size_t head = head_.load(std::memory_order_acquire);
      if (next_tail_ - head < kSlots) {
        head_seen_ = head;
        return;
      }
      head_.wait(head, std::memory_order_acquire);
    }
  }

  alignas(64) std::atomic<size_t> head_{0};  // written by the consumer
  alignas(64) std::atomic<size_t> tail_{0};  // written by the producer
  alignas(64) size_t next_tail_ = 0;         // producer only
  size_t head_seen_ = 0;                     // producer only
  void* slots_[kSlots];
};

// The CPUs this process may run on, in order.
std::vector<int> allowed_cpus() {
  cpu_set_t set;
  std::vector<int> cpus;
  if (sched_getaffinity(0, sizeof set, &set) != 0) return cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu)
    if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
  return cpus;
}

bool pin_thread(pthread_t thread, int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(thread, sizeof set, &set) == 0;
}

// Arguments: size, CPUs (1: producer and consumer pinned to the same CPU,
// taking turns; 2: pinned to two CPUs, running at once whenever both are
// runnable). Left to the scheduler, the pair would sometimes share a core
// and sometimes not, and the cost per pair changes several-fold between
// the two (cache lines of blocks and of the allocator's metadata move
// between cores, locks are contended), so each case is measured on purpose.
void BM_producer_consumer(benchmark::State& state) {
  const auto size = static_cast<size_t>(state.range(0));
  const auto cpu_count = static_cast<size_t>(state.range(1));
  const std::vector<int> cpus = allowed_cpus();
  if (cpus.size() < cpu_count) {
    state.SkipWithError("not enough CPUs");
    for (auto _ : state) {}
    return;
  }
  cpu_set_t saved;
  const bool restore = pthread_getaffinity_np(pthread_self(), sizeof saved, &saved) == 0;
  auto queue = std::make_unique<BlockQueue>();
  std::thread consumer([&queue] { queue->free_all(); });
  if (!pin_thread(pthread_self(), cpus[0]) || !pin_thread(consumer.native_handle(), cpus[cpu_count - 1]))
    state.SkipWithError("cannot set the CPU affinity");
  for (auto _ : state) queue->push(allocate(size));
  queue->push(nullptr);  // after the timed loop: the end marker
  queue->publish();
  consumer.join();
  if (restore) pthread_setaffinity_np(pthread_self(), sizeof saved, &saved);
  state.counters["pairs_per_iteration"] = benchmark::Counter(1);
}

size_t parse_size(const std::string& text) {
  char* end = nullptr;
  size_t value = std::strtoull(text.c_str(), &end, 10);
  if (end == text.c_str()) return 0;
  if (*end == 'K' || *end == 'k') value <<= 10, ++end;
  else if (*end == 'M' || *end == 'm') value <<= 20, ++end;
  return *end == '\0' ? value : 0;
}

std::vector<size_t> parse_sizes(const std::string& list) {
  std::vector<size_t> sizes;
  size_t start = 0;
  while (start <= list.size()) {
    size_t comma = list.find(',', start);
    if (comma == std::string::npos) comma = list.size();
    const size_t size = parse_size(list.substr(start, comma - start));
    if (size == 0) {
      std::fprintf(stderr, "hotpool-micro: bad size list '%s'\n", list.c_str());
      std::exit(2);
    }
    sizes.push_back(size);
    start = comma + 1;
  }
  return sizes;
}

}  // namespace

int main(int argc, char** argv) {
  // Our own flags first (the rest goes to Google Benchmark). The minimum
  // time is set per benchmark rather than by --benchmark_min_time, whose
  // syntax changed between benchmark 1.7 ("0.1") and 1.8 ("0.1s").
  double min_time = 0.2;
  std::vector<size_t> sizes = parse_sizes("16,32,64,128,256,512,1K,4K,16K,32K,64K,256K");
  std::vector<char*> rest{argv[0]};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--min-time=", 0) == 0) min_time = std::atof(arg.c_str() + 11);
    else if (arg.rfind("--sizes=", 0) == 0) sizes = parse_sizes(arg.substr(8));
    else rest.push_back(argv[i]);
  }
  if (!(min_time > 0)) {
    std::fprintf(stderr, "hotpool-micro: --min-time needs a positive number of seconds\n");
    return 2;
  }

  for (const size_t size : sizes) {
    for (const int threads : {1, 2}) {
      benchmark::RegisterBenchmark("pair", BM_pair)->Arg(static_cast<int64_t>(size))->Threads(threads)
          ->MinTime(min_time);
    }
  }
  for (const size_t size : sizes) {
    for (const int threads : {1, 2}) {
      benchmark::RegisterBenchmark("batch", BM_batch)->Arg(static_cast<int64_t>(size))->Threads(threads)
          ->MinTime(min_time);
    }
  }
  for (const int cpus : {1, 2}) {
    for (const size_t size : sizes) {
      benchmark::RegisterBenchmark("producer_consumer", BM_producer_consumer)
          ->Args({static_cast<int64_t>(size), cpus})->ArgNames({"", "cpus"})
          ->MeasureProcessCPUTime()->MinTime(min_time)->Repetitions(3);
    }
  }

  int rest_count = static_cast<int>(rest.size());
  rest.push_back(nullptr);
  benchmark::Initialize(&rest_count, rest.data());
  if (benchmark::ReportUnrecognizedArguments(rest_count, rest.data())) return 2;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
