#include "sites.h"

#include "pages.h"

#include <sched.h>
#include <sys/mman.h>

#include <cstring>

namespace hotpool::reporter {

uint64_t lifetime_bucket_low(unsigned bucket) {
  if (bucket == 0) return 0;
  uint64_t low = 256;
  for (unsigned b = 1; b < bucket; ++b) low *= 4;
  return low;
}

namespace {
// e^y for y >= 0, without libm (libhotpool.so links none): halved until
// y <= 1/2, the series there (16 terms leave < 1e-16), squared back.
double exp_of(double y) {
  unsigned halvings = 0;
  while (y > 0.5 && halvings < 64) {
    y *= 0.5;
    ++halvings;
  }
  double term = 1, sum = 1;
  for (int n = 1; n < 16; ++n) {
    term *= y / n;
    sum += term;
  }
  while (halvings--) sum *= sum;
  return sum;
}
}  // namespace

uint64_t histogram_median(const uint64_t* counts, unsigned buckets, uint64_t at_most) {
  uint64_t total = 0;
  for (unsigned b = 0; b < buckets; ++b) total += counts[b];
  if (total == 0) return 0;
  uint64_t seen = 0;
  for (unsigned b = 0; b < buckets; ++b) {
    if ((seen + counts[b]) * 2 >= total) {
      // Inside the bucket on its own scale: linear in the first, [0, 256 ns);
      // geometric in the others, [low, 4 low), and in the last, which has no
      // upper end, [low, at_most) when the run lasted longer than 4 low.
      const double fraction = (static_cast<double>(total) / 2 - static_cast<double>(seen)) / static_cast<double>(counts[b]);
      if (b == 0) return static_cast<uint64_t>(fraction * 256.0) < at_most ? static_cast<uint64_t>(fraction * 256.0) : at_most;
      const double low = static_cast<double>(lifetime_bucket_low(b));
      double ratio = 4;  // high / low
      if (b + 1 == buckets && static_cast<double>(at_most) > 4 * low) ratio = static_cast<double>(at_most) / low;
      const uint64_t estimate = static_cast<uint64_t>(low * exp_of(fraction * natural_log(ratio)));
      return estimate < at_most ? estimate : at_most;  // no block lived longer than the run
    }
    seen += counts[b];
  }
  return 0;
}

void LifetimeStats::add(uint64_t lifetime_ns, bool is_short, bool is_recycled, bool is_temporary, Escape escape,
                        uint64_t calls) {
  frees.fetch_add(1, std::memory_order_relaxed);
  if (is_short) short_lived.fetch_add(1, std::memory_order_relaxed);
  if (is_recycled) recycled.fetch_add(1, std::memory_order_relaxed);
  if (is_temporary) temporary.fetch_add(1, std::memory_order_relaxed);
  escapes[static_cast<unsigned>(escape)].fetch_add(1, std::memory_order_relaxed);
  calls_between.fetch_add(calls, std::memory_order_relaxed);
  histogram[lifetime_bucket(lifetime_ns)].fetch_add(1, std::memory_order_relaxed);
}

double natural_log(double x) {
  if (!(x > 0)) return x == 0 ? -__builtin_huge_val() : __builtin_nan("");
  // x = m * 2^e with m in [sqrt(1/2), sqrt(2)): ln x = e ln 2 + ln m, and
  // ln m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...) with s = (m-1)/(m+1),
  // |s| < 0.172: s^2 < 0.0295, so eleven terms leave < 1e-17.
  uint64_t bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  int exponent = static_cast<int>((bits >> 52) & 0x7ff);
  if (exponent == 0) {  // subnormal: scale into the normal range first
    return natural_log(x * 18014398509481984.0) - 54 * 0.6931471805599453;  // 2^54
  }
  exponent -= 1023;
  bits = (bits & ((uint64_t{1} << 52) - 1)) | (uint64_t{1023} << 52);  // m in [1, 2)
  double m;
  __builtin_memcpy(&m, &bits, sizeof(m));
  if (m > 1.4142135623730951) {
    m *= 0.5;
    ++exponent;
  }
  const double s = (m - 1) / (m + 1);
  const double s2 = s * s;
  double series = 1.0 / 23;
  for (int k = 21; k >= 1; k -= 2) series = 1.0 / k + s2 * series;
  constexpr double kLn2High = 0.6931471803691238;   // ln 2 split in two parts
  constexpr double kLn2Low = 1.9082149292705877e-10;  // for an exact e * high
  return exponent * kLn2High + (2 * s * series + exponent * kLn2Low);
}

double one_minus_exp_neg(double y) {
  if (!(y > 0)) return 0;
  // y < 1: the series of 1 - e^-y itself, y - y^2/2! + y^3/3! - ...
  // (1 - e^-y computed as such would lose y's low bits when y is small);
  // the sum is at least 0.63 y, the terms left out below y^23/23! < 4e-23.
  if (y < 1) {
    double term = y, sum = y;
    for (int n = 2; n <= 22; ++n) {
      term *= -y / n;
      sum += term;
    }
    return sum;
  }
  if (y > 45) return 1;  // e^-45 < 2^-64
  // y = k ln 2 + r with r in [0, ln 2): e^-y = 2^-k e^-r, e^-r from its
  // series (r^20/20! < 1e-20).
  constexpr double kLn2 = 0.6931471805599453;
  const int k = static_cast<int>(y / kLn2);
  const double r = y - k * kLn2;
  double term = 1, sum = 1;
  for (int n = 1; n <= 20; ++n) {
    term *= -r / n;
    sum += term;
  }
  for (int i = 0; i < k; ++i) sum *= 0.5;
  return 1 - sum;
}

void LifetimeStats::merge(const LifetimeCounts& counts) {
  if (counts.frees == 0) return;
  frees.fetch_add(counts.frees, std::memory_order_relaxed);
  if (counts.short_lived) short_lived.fetch_add(counts.short_lived, std::memory_order_relaxed);
  if (counts.recycled) recycled.fetch_add(counts.recycled, std::memory_order_relaxed);
  if (counts.temporary) temporary.fetch_add(counts.temporary, std::memory_order_relaxed);
  for (unsigned e = 0; e < 3; ++e)
    if (counts.escapes[e]) escapes[e].fetch_add(counts.escapes[e], std::memory_order_relaxed);
  if (counts.calls_between) calls_between.fetch_add(counts.calls_between, std::memory_order_relaxed);
  for (unsigned b = 0; b < kLifetimeBuckets; ++b)
    if (counts.histogram[b]) histogram[b].fetch_add(counts.histogram[b], std::memory_order_relaxed);
}

namespace {
void raise(AtomicCounter& counter, uint64_t value) {
  uint64_t seen = counter.load(std::memory_order_relaxed);
  while (value > seen && !counter.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
  }
}

void lower(AtomicCounter& counter, uint64_t value) {
  uint64_t seen = counter.load(std::memory_order_relaxed);
  while ((seen == 0 || value < seen) && !counter.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
  }
}
}  // namespace

void SiteStats::add_allocs(uint64_t count, uint64_t total_bytes, uint64_t min, uint64_t max, SampleWeight sum) {
  allocs.fetch_add(count, std::memory_order_relaxed);
  bytes.fetch_add(total_bytes, std::memory_order_relaxed);
  weight.fetch_add(sum.allocs, std::memory_order_relaxed);
  weighted_bytes.fetch_add(sum.bytes, std::memory_order_relaxed);
  lower(min_size, min);
  raise(max_size, max);
}

void PendingSamples::attach(StackDepot* depot, LifetimeStats* class_lifetimes, bool asymmetric, bool sparse) {
  shift_ = 32 - (sparse ? kSparseEntriesLog2 : kEntriesLog2);
  depot_ = depot;
  class_lifetimes_ = class_lifetimes;
  asymmetric_ = asymmetric;
}

void PendingSamples::touch_for_write(unsigned classes, bool sparse) const {
  touch_pages_for_write(class_life_, (classes < kMaxClasses ? classes : kMaxClasses) * sizeof(LifetimeCounts));
  touch_pages_for_write(entries_, (size_t{1} << (sparse ? kSparseEntriesLog2 : kEntriesLog2)) * sizeof(Entry));
}

PendingSamples::Entry& PendingSamples::entry(uint32_t key) {
  Entry& slot = entries_[slot_of(key)];
  if (__builtin_expect(slot.key != key, 0)) {
    merge(slot);
    slot.key = key;
  }
  return slot;
}

// FAST PATH (every sample): a leaf up to the flush. The entry held
// another key: merged out of line, then here again.
void PendingSamples::add_alloc(uint32_t site, uint64_t size) {
  Entry& slot = entries_[slot_of(site)];
  if (__builtin_expect(slot.key != site, 0)) return add_alloc_to_new(site, size);
  const uint64_t min_size = slot.min_size, max_size = slot.max_size;
  ++slot.allocs;
  slot.bytes += size;
  slot.min_size = min_size == 0 || size < min_size ? size : min_size;
  slot.max_size = size > max_size ? size : max_size;
  after_event();
}

void PendingSamples::add_alloc_to_new(uint32_t site, uint64_t size) {
  entry(site);  // merges what the entry held
  add_alloc(site, size);
}

void PendingSamples::add_weighted_alloc(uint32_t site, uint64_t size, SampleWeight weight) {
  Entry& slot = entry(site);
  slot.weight.allocs += weight.allocs;
  slot.weight.bytes += weight.bytes;
  add_alloc(site, size);
}

void PendingSamples::add_free(uint32_t site, unsigned size_class, uint64_t lifetime_ns, bool is_short,
                              bool is_recycled, bool is_temporary, Escape escape, uint64_t calls) {
  const unsigned bucket = lifetime_bucket(lifetime_ns);  // once for both
  if (site) entry(site).life.add_to_bucket(bucket, is_short, is_recycled, is_temporary, escape, calls);
  if (size_class < kMaxClasses) {
    class_life_[size_class].add_to_bucket(bucket, is_short, is_recycled, is_temporary, escape, calls);
    class_touched_[size_class / 64] |= uint64_t{1} << (size_class % 64);
  }
  after_event();
}

void PendingSamples::merge(Entry& slot) {
  if (slot.key == 0) return;
  if (depot_) {
    SiteStats& stats = depot_->site(slot.key);
    if (slot.allocs) stats.add_allocs(slot.allocs, slot.bytes, slot.min_size, slot.max_size, slot.weight);
    stats.lifetimes.merge(slot.life);
  }
  slot = Entry{};  // empty (key 0)
}

void PendingSamples::flush_locked() {
  events_ = 0;
  for (unsigned i = 0, used = 1u << (32 - shift_); i < used; ++i) merge(entries_[i]);
  for (unsigned word = 0; word < kMaxClasses / 64; ++word) {
    for (uint64_t bits = class_touched_[word]; bits; bits &= bits - 1) {
      const unsigned c = word * 64 + static_cast<unsigned>(__builtin_ctzll(bits));
      if (class_lifetimes_) class_lifetimes_[c].merge(class_life_[c]);
      class_life_[c] = LifetimeCounts{};
    }
    class_touched_[word] = 0;
  }
}

bool PendingSamples::flush() {
  // One flusher at a time (a report and the owner's exit may meet here).
  for (unsigned spins = 0; flusher_.exchange(true, std::memory_order_acquire); ++spins) {
    if (spins >= 256) return false;
    if (spins >= 64) sched_yield();
  }
  bool in = false;
  if (!asymmetric_) {
    // The owner holds the lock for a few dozen instructions; a report
    // waits a little for a thread preempted in there, then leaves its
    // counts out (merged later, at the latest when it exits).
    for (unsigned spins = 0; !(in = begin()) && spins < 256; ++spins)
      if (spins >= 64) sched_yield();
    if (in) {
      flush_locked();
      end();
    }
  } else {
    flush_requested_.store(true, std::memory_order_relaxed);
    if (heavy_fence()) {
      for (unsigned spins = 0; !(in = !busy_.load(std::memory_order_acquire)) && spins < 256; ++spins)
        if (spins >= 64) sched_yield();
    }
    if (in) flush_locked();
    flush_requested_.store(false, std::memory_order_release);
  }
  flusher_.store(false, std::memory_order_release);
  return in;
}

void PendingSamples::reset_after_fork() {
  locked_.store(false, std::memory_order_relaxed);
  busy_.store(false, std::memory_order_relaxed);
  flush_requested_.store(false, std::memory_order_relaxed);
  flusher_.store(false, std::memory_order_relaxed);
}

namespace {
void* map_noreserve(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

// Four independent lanes (a multiply's latency per four frames instead of
// per frame), then a full mix (the finalizer of MurmurHash3).
uint64_t hash_stack(const uintptr_t* ips, unsigned depth) {
  constexpr uint64_t kMultiplier = 0x9e3779b97f4a7c15ull;
  uint64_t lane[4] = {0xcbf29ce484222325ull ^ depth, 0x84222325cbf29ce4ull, 0x243f6a8885a308d3ull,
                      0x13198a2e03707344ull};
  unsigned i = 0;
  for (; i + 4 <= depth; i += 4) {
    for (unsigned k = 0; k < 4; ++k) lane[k] = (lane[k] ^ ips[i + k]) * kMultiplier;
  }
  for (unsigned k = 0; i < depth; ++i, ++k) lane[k] = (lane[k] ^ ips[i]) * kMultiplier;
  uint64_t hash = lane[0] ^ ((lane[1] << 16) | (lane[1] >> 48)) ^ ((lane[2] << 32) | (lane[2] >> 32)) ^
                  ((lane[3] << 48) | (lane[3] >> 16));
  hash ^= hash >> 33;
  hash *= 0xff51afd7ed558ccdull;
  hash ^= hash >> 33;
  hash *= 0xc4ceb9fe1a85ec53ull;
  hash ^= hash >> 33;
  return hash;
}
}  // namespace

// Every generation's table at most half full; the ids fit a slot's low half.
static_assert(2 * (StackDepot::kFirstId[1] - StackDepot::kFirstId[0]) <= (1u << StackDepot::kTableLog2[0]));
static_assert(2 * (StackDepot::kFirstId[2] - StackDepot::kFirstId[1]) <= (1u << StackDepot::kTableLog2[1]));
static_assert(2 * (StackDepot::kFirstId[3] - StackDepot::kFirstId[2]) <= (1u << StackDepot::kTableLog2[2]));
static_assert(StackDepot::kGenerations == 3 && StackDepot::generation_of(StackDepot::kIds - 1) == 2);
static_assert(StackDepot::kTableLog2[2] <= 32, "the index uses a hash's low half, the tag its high half");

bool StackDepot::init(unsigned max_depth) {
  arena_words_ = size_t{kIds} * (max_depth + 1);  // each trace is [depth][ips...]
  slots_ = static_cast<std::atomic<uint64_t>*>(map_noreserve(kTableStart[kGenerations] * sizeof(uint64_t)));
  offsets_ = static_cast<uint32_t*>(map_noreserve(kIds * sizeof(uint32_t)));
  sites_ = static_cast<SiteStats*>(map_noreserve(kIds * sizeof(SiteStats)));
  arena_ = static_cast<uintptr_t*>(map_noreserve(arena_words_ * sizeof(uintptr_t)));
  if (!slots_ || !offsets_ || !sites_ || !arena_) slots_ = nullptr;
  return slots_ != nullptr;
}

bool StackDepot::same_stack(uint32_t id, const uintptr_t* ips, unsigned depth) const {
  const uintptr_t* stored = arena_ + (offsets_[id] - 1);  // published before the id's slot (acquire)
  return stored[0] == depth && std::memcmp(stored + 1, ips, depth * sizeof(uintptr_t)) == 0;
}

__attribute__((always_inline)) inline uint32_t StackDepot::find(unsigned g, uint64_t hash, const uintptr_t* ips,
                                                                unsigned depth) const {
  const std::atomic<uint64_t>* table = slots_ + kTableStart[g];
  const uint64_t mask = (uint64_t{1} << kTableLog2[g]) - 1;
  const uint64_t tag = (hash >> 32) << 32;
  for (uint32_t probe = 0; probe < 64; ++probe) {
    const uint64_t slot = table[(hash + probe) & mask].load(std::memory_order_acquire);
    if (slot == 0) return 0;  // inserts fill the first free slot of the probes: not in this table
    const uint32_t id = static_cast<uint32_t>(slot);
    if ((slot >> 32 << 32) == tag && same_stack(id, ips, depth)) return id;
  }
  return 0;
}

uint32_t StackDepot::insert(const uintptr_t* ips, unsigned depth) {
  if (!slots_ || depth == 0) return 0;
  const uint64_t hash = hash_stack(ips, depth);
  // Known already: in the table of a generation with ids handed out (the
  // first ones first: a program's most frequent stacks are seen early).
  const uint32_t next = next_id_.load(std::memory_order_acquire);
  const unsigned used = generation_of(next < kIds ? next : kIds - 1);
  for (unsigned g = 0; g <= used; ++g) {
    if (const uint32_t id = find(g, hash, ips, depth)) return id;
  }
  const uint32_t id = claim(ips, depth);
  return id ? publish(id, hash, ips, depth) : 0;
}

// New stacks: claim space and an id for the trace, then publish it in the
// id's generation with a CAS at the first free slot of its probes. Threads
// inserting the same stack at once each claim an id: in the same
// generation they meet at that slot, and all but one id stay unused. With
// ids on both sides of a generation's end, each generation gets its own;
// so a publish in a later generation (its own id, or the one it met there)
// looks again in the earlier ones, and returns the id it finds there.
// Only an inserter stopped between its claim and its publish (preempted,
// or interrupted by a signal handler) while another, with an id in a later
// generation, publishes the same stack can leave one of them with another
// id than the others' (the earliest generation's is found from then on).
uint32_t StackDepot::claim(const uintptr_t* ips, unsigned depth) {
  if (!slots_ || depth == 0) return 0;
  const size_t offset = arena_used_.fetch_add(depth + 1, std::memory_order_relaxed);
  if (offset + depth + 1 > arena_words_) return 0;
  const uint32_t id = next_id_.fetch_add(1, std::memory_order_relaxed);
  if (id >= kIds) return 0;
  arena_[offset] = depth;
  for (unsigned i = 0; i < depth; ++i) arena_[offset + 1 + i] = ips[i];
  __atomic_store_n(&offsets_[id], static_cast<uint32_t>(offset + 1), __ATOMIC_RELEASE);  // see known_stack
  return id;
}

uint32_t StackDepot::publish(uint32_t id, const uintptr_t* ips, unsigned depth) {
  // Only an id claimed for this very stack: its slot's tag, and what the
  // table's lookups compare, are that stack's.
  if (!slots_ || id == 0 || id >= kIds || depth == 0) return 0;
  if (__atomic_load_n(&offsets_[id], __ATOMIC_ACQUIRE) == 0 || !same_stack(id, ips, depth)) return 0;
  return publish(id, hash_stack(ips, depth), ips, depth);
}

uint32_t StackDepot::oldest(unsigned g, uint64_t hash, const uintptr_t* ips, unsigned depth, uint32_t id) const {
  // An earlier generation holds the stack if its inserter claimed an id
  // there before this id's inserter looked. How long before is unbounded (an
  // inserter delayed between its lookup and its claim, by preemption or a
  // page fault, while other threads claim any number of ids), so every
  // earlier generation is searched. Cheap: only new stacks publish, and
  // there are at most two earlier generations.
  for (unsigned older = 0; older < g; ++older) {
    if (const uint32_t first = find(older, hash, ips, depth)) return first;
  }
  return id;
}

uint32_t StackDepot::publish(uint32_t id, uint64_t hash, const uintptr_t* ips, unsigned depth) {
  const unsigned g = generation_of(id);
  std::atomic<uint64_t>* table = slots_ + kTableStart[g];
  const uint64_t mask = (uint64_t{1} << kTableLog2[g]) - 1;
  const uint64_t tag = (hash >> 32) << 32;
  for (uint32_t probe = 0; probe < 64; ++probe) {
    std::atomic<uint64_t>& slot = table[(hash + probe) & mask];
    uint64_t seen = slot.load(std::memory_order_acquire);
    if (seen == 0) {
      if (slot.compare_exchange_strong(seen, tag | id, std::memory_order_acq_rel)) return oldest(g, hash, ips, depth, id);
      // Someone else filled the slot: seen is theirs.
    }
    const uint32_t theirs = static_cast<uint32_t>(seen);
    if ((seen >> 32 << 32) == tag && same_stack(theirs, ips, depth)) return oldest(g, hash, ips, depth, theirs);
  }
  return 0;
}

uint32_t SiteMemo::site_of(StackDepot& depot, const uintptr_t* ips, unsigned depth) {
  if (depth == 0) return 0;
  // The key: the depth and the innermost six frames (where most stacks
  // differ), each with its own multiplier (no chain of multiplies).
  uint64_t key = (ips[0] * 0x9e3779b97f4a7c15ull) ^ depth;
  if (depth > 1) key ^= ips[1] * 0xff51afd7ed558ccdull;
  if (depth > 2) key ^= ips[2] * 0xc4ceb9fe1a85ec53ull;
  if (depth > 3) key ^= ips[3] * 0x2545f4914f6cdd1dull;
  if (depth > 4) key ^= ips[4] * 0xd6e8feb86659fd93ull;
  if (depth > 5) key ^= ips[5] * 0xa0761d6478bd642full;
  key = (key ^ (key >> 31)) * 0x9e3779b97f4a7c15ull;
  uint32_t& entry = sites_[key >> (64 - kEntriesLog2)];
  if (const uint32_t site = entry) {
    const uintptr_t* stored = nullptr;
    if (depot.known_stack(site, &stored) == depth && std::memcmp(stored, ips, depth * sizeof(uintptr_t)) == 0) {
      ++hits_;
      return site;
    }
  }
  const uint32_t site = depot.insert(ips, depth);
  if (site) entry = site;
  return site;
}

}  // namespace hotpool::reporter
