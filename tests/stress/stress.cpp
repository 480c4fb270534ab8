// stress: a deterministic multi-threaded torture of the malloc API, run
// under LD_PRELOAD=libhotpool.so by CTest in every mode. Every block carries
// a pattern derived from (thread, slot, size) that is checked before it is
// freed or grown, so a block handed out twice, a lost byte or a stray write
// is caught. One allocation in 8 is aligned (memalign, aligned_alloc,
// posix_memalign; 32 B to a page), its alignment checked. Exits non-zero,
// with a line saying what went wrong.
//
//   stress [--smoke] [--threads N] [--ops N] [--seed N] [--parts random,pairs,churn,fork]
#include <malloc.h>
#include <pthread.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

std::atomic<bool> g_failed{false};

void fail(const char* what, size_t detail) {
  std::fprintf(stderr, "stress: FAILED: %s (%zu)\n", what, detail);
  g_failed = true;
}

struct Random {
  uint64_t state;
  uint64_t next() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  }
  size_t below(size_t n) { return static_cast<size_t>(next() % n); }
};

// Mostly small sizes, some medium, a few large (past the mmap threshold).
size_t random_size(Random& random) {
  const size_t pick = random.below(100);
  if (pick < 70) return random.below(256) + 1;
  if (pick < 95) return random.below(16384) + 1;
  if (pick < 99) return random.below(262144) + 1;
  return random.below(2 << 20) + 1;
}

unsigned char pattern(uint64_t tag, size_t i) { return static_cast<unsigned char>((tag * 131 + i * 7) >> 3); }

void fill(void* block, size_t size, uint64_t tag) {
  auto* bytes = static_cast<unsigned char*>(block);
  // Every byte for small blocks; a sample of positions for large ones.
  const size_t step = size > 4096 ? 61 : 1;
  for (size_t i = 0; i < size; i += step) bytes[i] = pattern(tag, i);
  bytes[size - 1] = pattern(tag, size - 1);
}

bool intact(const void* block, size_t size, uint64_t tag) {
  const auto* bytes = static_cast<const unsigned char*>(block);
  const size_t step = size > 4096 ? 61 : 1;
  for (size_t i = 0; i < size; i += step)
    if (bytes[i] != pattern(tag, i)) return false;
  return bytes[size - 1] == pattern(tag, size - 1);
}

struct Slot {
  void* block = nullptr;
  size_t size = 0;
  uint64_t tag = 0;
};

// An aligned allocation by one of the aligned calls (32 B to a page), its
// alignment checked; nullptr (after fail) if it failed or is misaligned.
void* aligned_block(Random& random, size_t size) {
  const size_t alignment = size_t{32} << random.below(8);  // 32 ... 4096
  void* block = nullptr;
  switch (random.below(3)) {
    case 0: block = memalign(alignment, size); break;
    case 1: block = aligned_alloc(alignment, size); break;
    default:
      if (posix_memalign(&block, alignment, size) != 0) block = nullptr;
  }
  if (!block) return fail("aligned allocation failed", size), nullptr;
  if (reinterpret_cast<uintptr_t>(block) % alignment) return fail("block not aligned as asked", alignment), nullptr;
  if (malloc_usable_size(block) < size) return fail("aligned block smaller than asked", size), nullptr;
  return block;
}

void random_worker(unsigned thread, size_t ops, uint64_t seed) {
  Random random{seed * 2654435761u + thread + 1};
  std::vector<Slot> slots(512);
  uint64_t next_tag = (uint64_t{thread} << 40) + 1;
  for (size_t op = 0; op < ops && !g_failed; ++op) {
    Slot& slot = slots[random.below(slots.size())];
    if (slot.block) {
      if (!intact(slot.block, slot.size, slot.tag)) return fail("block contents changed while it was live", slot.size);
      if (random.below(4) == 0) {  // grow or shrink, keeping the prefix
        const size_t size = random_size(random);
        void* moved = std::realloc(slot.block, size);
        if (!moved) return fail("realloc failed", size);
        const size_t kept = size < slot.size ? size : slot.size;
        if (!intact(moved, kept, slot.tag) && kept == slot.size) return fail("realloc lost the contents", kept);
        slot.block = moved;
        slot.size = size;
        slot.tag = next_tag++;
        fill(moved, size, slot.tag);
        continue;
      }
      std::free(slot.block);
      slot.block = nullptr;
      continue;
    }
    slot.size = random_size(random);
    slot.tag = next_tag++;
    if (random.below(5) == 0) {
      slot.block = std::calloc(1, slot.size);
      if (!slot.block) return fail("calloc failed", slot.size);
      const auto* bytes = static_cast<const unsigned char*>(slot.block);
      for (size_t i = 0; i < slot.size; i += (slot.size > 4096 ? 61 : 1))
        if (bytes[i]) return fail("calloc memory is not zero", slot.size);
    } else if (random.below(8) == 0) {
      slot.block = aligned_block(random, slot.size);
      if (!slot.block) return;
    } else {
      slot.block = std::malloc(slot.size);
      if (!slot.block) return fail("malloc failed", slot.size);
    }
    if (reinterpret_cast<uintptr_t>(slot.block) % 16) return fail("block not 16-byte aligned", slot.size);
    fill(slot.block, slot.size, slot.tag);
  }
  for (Slot& slot : slots) {
    if (slot.block && !intact(slot.block, slot.size, slot.tag)) fail("block contents changed", slot.size);
    std::free(slot.block);
  }
}

void run_random(unsigned threads, size_t ops, uint64_t seed) {
  std::vector<std::thread> workers;
  for (unsigned t = 0; t < threads; ++t) workers.emplace_back(random_worker, t, ops, seed);
  for (auto& worker : workers) worker.join();
}

// Producers allocate, consumers (other threads) check and free.
void run_pairs(unsigned pairs, size_t ops, uint64_t seed) {
  struct Queue {
    std::mutex mutex;
    std::condition_variable ready;
    std::deque<Slot> items;
    bool done = false;
  };
  std::vector<Queue> queues(pairs);
  std::vector<std::thread> threads;
  for (unsigned p = 0; p < pairs; ++p) {
    threads.emplace_back([&, p] {
      Random random{seed + p + 77};
      for (size_t i = 0; i < ops && !g_failed; ++i) {
        Slot slot;
        slot.size = random.below(100) < 90 ? random.below(512) + 1 : random.below(65536) + 1;
        slot.tag = (uint64_t{p} << 40) + i + 1;
        // One in 8 aligned: freed by the consumer as any other.
        slot.block = random.below(8) == 0 ? aligned_block(random, slot.size) : std::malloc(slot.size);
        if (!slot.block) return fail("malloc failed", slot.size);
        fill(slot.block, slot.size, slot.tag);
        std::unique_lock<std::mutex> lock(queues[p].mutex);
        queues[p].ready.wait(lock, [&] { return queues[p].items.size() < 4096; });
        queues[p].items.push_back(slot);
        queues[p].ready.notify_all();
      }
      std::lock_guard<std::mutex> lock(queues[p].mutex);
      queues[p].done = true;
      queues[p].ready.notify_all();
    });
    threads.emplace_back([&, p] {
      for (;;) {
        std::unique_lock<std::mutex> lock(queues[p].mutex);
        queues[p].ready.wait(lock, [&] { return !queues[p].items.empty() || queues[p].done; });
        if (queues[p].items.empty()) return;
        Slot slot = queues[p].items.front();
        queues[p].items.pop_front();
        queues[p].ready.notify_all();
        lock.unlock();
        if (!intact(slot.block, slot.size, slot.tag)) fail("block changed between producer and consumer", slot.size);
        std::free(slot.block);
      }
    });
  }
  for (auto& thread : threads) thread.join();
}

size_t rss_kib() {
  FILE* statm = std::fopen("/proc/self/statm", "r");
  if (!statm) return 0;
  unsigned long pages_total = 0, pages_resident = 0;
  if (std::fscanf(statm, "%lu %lu", &pages_total, &pages_resident) != 2) pages_resident = 0;
  std::fclose(statm);
  return pages_resident * static_cast<size_t>(sysconf(_SC_PAGESIZE)) / 1024;
}

// Thousands of short threads, each leaving blocks in its cache at exit:
// memory must stay bounded (exited threads' caches are returned).
void run_churn(unsigned rounds, unsigned per_round) {
  auto one_round = [&] {
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < per_round; ++t) {
      threads.emplace_back([t] {
        std::vector<void*> blocks;
        for (int i = 0; i < 64; ++i) blocks.push_back(std::malloc(16 + (t + i) % 2000));
        for (void* block : blocks) std::free(block);
        for (int i = 0; i < 64; ++i) std::free(std::malloc(48));
      });
    }
    for (auto& thread : threads) thread.join();
  };
  for (unsigned r = 0; r < 5; ++r) one_round();  // warm up: reach the steady state
  const size_t before = rss_kib();
  for (unsigned r = 0; r < rounds; ++r) one_round();
  const size_t after = rss_kib();
  std::printf("stress: churn of %u threads: RSS %zu KiB -> %zu KiB\n", rounds * per_round, before, after);
  if (after > before + 16 * 1024) fail("RSS grew by more than 16 MiB over the thread churn (KiB)", after - before);
}

// fork while other threads allocate; each child allocates, checks and exits.
void run_fork(unsigned children, size_t ops, uint64_t seed) {
  std::atomic<bool> stop{false};
  std::vector<std::thread> busy;
  for (unsigned t = 0; t < 2; ++t) {
    busy.emplace_back([&, t] {
      Random random{seed + t + 991};
      while (!stop) {
        void* block = std::malloc(random_size(random));
        std::free(block);
      }
    });
  }
  for (unsigned c = 0; c < children && !g_failed; ++c) {
    const pid_t child = fork();
    if (child < 0) { fail("fork failed", c); break; }
    if (child == 0) {
      alarm(60);  // a deadlock in the child fails instead of hanging
      random_worker(100 + c, ops, seed);
      std::vector<std::thread> threads;  // the child can start threads too
      for (unsigned t = 0; t < 2; ++t) threads.emplace_back(random_worker, 200 + t, ops / 4, seed);
      for (auto& thread : threads) thread.join();
      std::exit(g_failed ? 1 : 0);
    }
    int status = 0;
    waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) fail("a forked child failed (status)", static_cast<size_t>(status));
  }
  stop = true;
  for (auto& thread : busy) thread.join();
}

}  // namespace

int main(int argc, char** argv) {
  unsigned threads = 4;
  size_t ops = 400000;
  uint64_t seed = 1;
  std::string parts = "random,pairs,churn,fork";
  unsigned churn_rounds = 40, fork_children = 8;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--smoke") ops = 60000, churn_rounds = 10, fork_children = 4;
    else if (arg == "--threads" && i + 1 < argc) threads = static_cast<unsigned>(std::atoi(argv[++i]));
    else if (arg == "--ops" && i + 1 < argc) ops = static_cast<size_t>(std::atoll(argv[++i]));
    else if (arg == "--seed" && i + 1 < argc) seed = static_cast<uint64_t>(std::atoll(argv[++i]));
    else if (arg == "--parts" && i + 1 < argc) parts = argv[++i];
    else { std::fprintf(stderr, "usage: stress [--smoke] [--threads N] [--ops N] [--seed N] [--parts LIST]\n"); return 2; }
  }
  alarm(300);
  if (parts.find("random") != std::string::npos) run_random(threads, ops, seed);
  if (parts.find("pairs") != std::string::npos) run_pairs(2, ops / 2, seed);
  if (parts.find("churn") != std::string::npos) run_churn(churn_rounds, 100);
  if (parts.find("fork") != std::string::npos) run_fork(fork_children, ops / 10, seed);
  std::printf("stress: %s\n", g_failed ? "FAILED" : "all parts passed");
  return g_failed ? 1 : 0;
}
