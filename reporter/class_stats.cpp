#include "class_stats.h"

namespace hotpool::reporter {

namespace {
uint64_t load(const Counter& counter) { return counter.load(std::memory_order_relaxed); }

void raise_atomic(std::atomic<uint64_t>& peak, uint64_t value) {
  uint64_t seen = peak.load(std::memory_order_relaxed);
  while (value > seen && !peak.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
  }
}
}  // namespace

void ThreadClassStats::publish(GlobalClassStats& global, unsigned c) {
  int64_t& delta = classes[c].live_delta;
  const int64_t live = global.live[c].fetch_add(delta, std::memory_order_relaxed) + delta;
  if (live > 0) raise_atomic(global.peak[c], static_cast<uint64_t>(live));
  raise_to(classes[c].peak_seen, live);
  delta = 0;
  const int64_t total = global.total_live.fetch_add(total_live_delta, std::memory_order_relaxed) + total_live_delta;
  if (total > 0) raise_atomic(global.total_peak, static_cast<uint64_t>(total));
  total_live_delta = 0;
}

void ThreadClassStats::publish_all(GlobalClassStats& global) {
  for (unsigned c = 0; c < kMaxClasses; ++c) {
    ClassCounters& row = classes[c];
    if (row.live_delta != 0) global.live[c].fetch_add(row.live_delta, std::memory_order_relaxed);
    clear(row.live_delta);
    raise_atomic(global.peak[c], load(row.peak_seen));
  }
  global.total_live.fetch_add(total_live_delta, std::memory_order_relaxed);
  total_live_delta = 0;
  raise_atomic(global.total_peak, load(total_peak_seen));
}

void ThreadClassStats::reset() {
  for (unsigned c = 0; c < kMaxClasses; ++c) {
    ClassCounters& row = classes[c];
    for (Counter* counter : {&row.allocs, &row.frees, &row.pooled_packed, &pooled_frees[c], &row.requested_bytes,
                             &row.usable_bytes, &row.freed_bytes, &row.peak_seen, &pooled_allocs_folded[c]})
      clear(*counter);
    clear(row.live_delta);
    clear(pooled_folded[c]);
  }
  total_peak_seen.store(0, std::memory_order_relaxed);
  total_live_delta = 0;
  clear(calls);
}

void StatsSnapshot::clear(unsigned count, const uint64_t* sizes) {
  class_count = count;
  for (unsigned c = 0; c < kMaxClasses; ++c) {
    class_size[c] = c < count ? sizes[c] : 0;
    classes[c] = ClassTotals{};
    pools[c] = PoolClassTotals{};
  }
  pools_active = false;
  total_peak_live_bytes = 0;
  threads_seen = 0;
  threads_at_once = 0;
}

void StatsSnapshot::add(const ThreadClassStats& stats, bool is_thread, const uint64_t* pooled_frees_given) {
  bool allocated = false;
  for (unsigned c = 0; c < class_count; ++c) {
    ClassTotals& row = classes[c];
    const ClassCounters& counters = stats.classes[c];
    const uint64_t pooled_allocs = stats.pooled_allocs(c);
    const uint64_t pooled_frees = pooled_frees_given ? pooled_frees_given[c] : load(stats.pooled_frees[c]);
    const uint64_t allocs = load(counters.allocs) + pooled_allocs;
    row.allocs += allocs;
    row.frees += load(counters.frees) + pooled_frees;
    row.pooled_allocs += pooled_allocs;
    row.pooled_frees += pooled_frees;
    row.requested_bytes += stats.requested_bytes(c);
    row.usable_bytes += load(counters.usable_bytes) + pooled_allocs * class_size[c];
    row.freed_bytes += load(counters.freed_bytes) + pooled_frees * class_size[c];
    const uint64_t peak = load(counters.peak_seen);
    if (peak > row.peak_live_bytes) row.peak_live_bytes = peak;
    if (allocs && is_thread) row.threads += 1, allocated = true;
  }
  if (load(stats.total_peak_seen) > total_peak_live_bytes) total_peak_live_bytes = load(stats.total_peak_seen);
  if (allocated) threads_seen += 1;
}

void StatsSnapshot::add(const StatsSnapshot& other) {
  for (unsigned c = 0; c < class_count; ++c) {
    ClassTotals& row = classes[c];
    const ClassTotals& more = other.classes[c];
    row.allocs += more.allocs;
    row.frees += more.frees;
    row.pooled_allocs += more.pooled_allocs;
    row.pooled_frees += more.pooled_frees;
    row.requested_bytes += more.requested_bytes;
    row.usable_bytes += more.usable_bytes;
    row.freed_bytes += more.freed_bytes;
    if (more.peak_live_bytes > row.peak_live_bytes) row.peak_live_bytes = more.peak_live_bytes;
    row.threads += more.threads;
  }
  if (other.total_peak_live_bytes > total_peak_live_bytes) total_peak_live_bytes = other.total_peak_live_bytes;
  threads_seen += other.threads_seen;
  if (other.threads_at_once > threads_at_once) threads_at_once = other.threads_at_once;
}

void StatsSnapshot::finish(const GlobalClassStats& global) {
  uint64_t total_live = 0;
  for (unsigned c = 0; c < class_count; ++c) {
    ClassTotals& row = classes[c];
    const uint64_t published = global.peak[c].load(std::memory_order_relaxed);
    if (published > row.peak_live_bytes) row.peak_live_bytes = published;
    // What is live now was live at some point: a peak is never below it.
    const uint64_t live = row.usable_bytes > row.freed_bytes ? row.usable_bytes - row.freed_bytes : 0;
    if (live > row.peak_live_bytes) row.peak_live_bytes = live;
    total_live += live;
  }
  const uint64_t total = global.total_peak.load(std::memory_order_relaxed);
  if (total > total_peak_live_bytes) total_peak_live_bytes = total;
  if (total_live > total_peak_live_bytes) total_peak_live_bytes = total_live;
}

}  // namespace hotpool::reporter
