// Allocation sites and lifetimes, from sampled allocations.
//
// A sampled allocation's stack goes into the StackDepot (deduplicated,
// preallocated, lock-free: no malloc, no lock); the depot's slot index is
// the site id. At the block's free its lifetime and escape class are added
// to its site's and its size class's statistics. Everything here is touched
// only for sampled allocations.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "class_stats.h"

namespace hotpool::reporter {

// Lifetimes in buckets of powers of 4 from 256 ns: [0, 256 ns), [256 ns,
// 1 µs), [1, 4 µs) ... [256 ms, 1 s), [1 s, inf).
inline constexpr unsigned kLifetimeBuckets = 13;
unsigned lifetime_bucket(uint64_t ns);
uint64_t lifetime_bucket_low(unsigned bucket);  // lower bound in ns
// The median of a histogram, interpolated geometrically inside its bucket.
uint64_t histogram_median(const uint64_t* counts, unsigned buckets);

// The run-time escape analysis of a freed sampled block (DESIGN §4).
enum class Escape : uint8_t {
  FrameLocal,   // freed by its thread while the allocating function was active
  ThreadLocal,  // freed by its thread after that function returned
  CrossThread,  // freed by another thread
};

using AtomicCounter = std::atomic<uint64_t>;

struct LifetimeStats {
  AtomicCounter frees;       // sampled blocks freed
  AtomicCounter short_lived; // lifetime <= the short threshold
  AtomicCounter temporary;   // freed before the thread's next allocator call
  AtomicCounter escapes[3];  // by Escape
  AtomicCounter calls_between;  // sum of the thread's allocator calls between malloc and free
  AtomicCounter histogram[kLifetimeBuckets];

  void add(uint64_t lifetime_ns, bool short_lived, bool temporary, Escape escape, uint64_t calls);
};

struct SiteStats {
  AtomicCounter allocs;  // sampled allocations
  AtomicCounter bytes;   // their requested bytes
  AtomicCounter min_size, max_size;
  LifetimeStats lifetimes;
};

class StackDepot {
 public:
  static constexpr unsigned kSlotsLog2 = 16;
  static constexpr uint32_t kSlots = 1u << kSlotsLog2;

  bool init();  // mmap'd, untouched until used
  bool ready() const { return slots_ != nullptr; }
  // The site of a stack: an id in [1, kSlots), or 0 when the depot is full.
  uint32_t insert(const uintptr_t* ips, unsigned depth);
  // The stack of a site (depth; *ips set), 0 for an unknown id.
  unsigned stack(uint32_t id, const uintptr_t** ips) const;
  SiteStats& site(uint32_t id) { return sites_[id]; }
  const SiteStats& site(uint32_t id) const { return sites_[id]; }

 private:
  std::atomic<uint64_t>* slots_ = nullptr;  // 0: empty; else 1 + offset of the trace in arena_
  SiteStats* sites_ = nullptr;
  uintptr_t* arena_ = nullptr;  // traces: [hash << 32 | depth][ips...]
  std::atomic<size_t> arena_used_{0};
  size_t arena_words_ = 0;
};

}  // namespace hotpool::reporter
