#include "reporter/sites.h"
#include "reporter/pages.h"
#include "reporter/unwinder.h"
#include "frame_pointer_frames.h"

#include <gtest/gtest.h>

#include <alloca.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>

#include <atomic>
#include <cmath>
#include <chrono>
#include <memory>
#include <string>
#include <set>
#include <thread>
#include <vector>

namespace hotpool::reporter {
namespace {

TEST(Lifetimes, BucketsArePowersOfFourFrom256ns) {
  EXPECT_EQ(lifetime_bucket(0), 0u);
  EXPECT_EQ(lifetime_bucket(255), 0u);
  EXPECT_EQ(lifetime_bucket(256), 1u);
  EXPECT_EQ(lifetime_bucket(1023), 1u);
  EXPECT_EQ(lifetime_bucket(1024), 2u);
  EXPECT_EQ(lifetime_bucket(1000000000ull), kLifetimeBuckets - 2);  // [256 ms, 1.07 s)
  EXPECT_EQ(lifetime_bucket(~0ull), kLifetimeBuckets - 1);
  for (unsigned b = 1; b < kLifetimeBuckets; ++b) {
    EXPECT_EQ(lifetime_bucket(lifetime_bucket_low(b)), b);
    EXPECT_EQ(lifetime_bucket(lifetime_bucket_low(b) - 1), b - 1);
  }
}

TEST(Lifetimes, MedianInterpolatesInsideItsBucket) {
  uint64_t counts[kLifetimeBuckets] = {};
  EXPECT_EQ(histogram_median(counts, kLifetimeBuckets), 0u);
  counts[2] = 10;  // all in [1024, 4096)
  const uint64_t median = histogram_median(counts, kLifetimeBuckets);
  EXPECT_GE(median, 1024u);
  EXPECT_LT(median, 4096u);
  counts[0] = 100;  // now most below 256 ns
  EXPECT_LT(histogram_median(counts, kLifetimeBuckets), 256u);
}

TEST(Lifetimes, MedianIsGeometricInsideItsBucketAndNeverAboveTheRun) {
  uint64_t counts[kLifetimeBuckets] = {};
  counts[2] = 1;  // one lifetime in [1024, 4096): the bucket's geometric middle
  EXPECT_NEAR(static_cast<double>(histogram_median(counts, kLifetimeBuckets)), 2048.0, 1.0);
  counts[2] = 0;
  counts[kLifetimeBuckets - 1] = 1;  // the open last bucket, from about 1.07 s
  const uint64_t low = lifetime_bucket_low(kLifetimeBuckets - 1);
  EXPECT_GE(histogram_median(counts, kLifetimeBuckets), low);
  const uint64_t run = low + low / 20;  // a run barely longer than the bucket's start
  EXPECT_EQ(histogram_median(counts, kLifetimeBuckets, run), run) << "no block lived longer than the run";
  // The last bucket has no upper end but the run: in a minute's run, a
  // median there can read beyond 4 times the bucket's start.
  const uint64_t minute = 60000000000ull;
  const uint64_t late = histogram_median(counts, kLifetimeBuckets, minute);
  EXPECT_GT(late, 4 * low);
  EXPECT_LT(late, minute);
}

TEST(Lifetimes, AddCountsEveryClassification) {
  auto stats = std::make_unique<LifetimeStats>();
  stats->add(100, true, true, true, Escape::FrameLocal, 0);
  stats->add(5000000, false, false, false, Escape::CrossThread, 0);
  stats->add(300, true, true, false, Escape::ThreadLocal, 7);
  stats->add(9000000, false, true, false, Escape::ThreadLocal, 70);
  EXPECT_EQ(stats->frees.load(), 4u);
  EXPECT_EQ(stats->short_lived.load(), 2u);
  EXPECT_EQ(stats->recycled.load(), 3u);
  EXPECT_EQ(pool_worthy(*stats), 3u);
  EXPECT_EQ(stats->temporary.load(), 1u);
  EXPECT_EQ(stats->escapes[0].load(), 1u);
  EXPECT_EQ(stats->escapes[1].load(), 2u);
  EXPECT_EQ(stats->escapes[2].load(), 1u);
  EXPECT_EQ(stats->calls_between.load(), 77u);
  EXPECT_EQ(stats->histogram[0].load(), 1u);
  EXPECT_EQ(stats->histogram[1].load(), 1u);
}

TEST(Sampling, NaturalLogAgreesWithLibm) {
  // The uniform variates of the sampler lie in (0, 1); also beyond, and
  // around 1, where the result is near zero.
  uint64_t x = 88172645463325252ull;
  for (int i = 0; i < 200000; ++i) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    const double uniform = (static_cast<double>(x >> 11) + 0.5) / 9007199254740992.0;
    for (double value : {uniform, uniform * 1e6, 1 - uniform * 1e-9, 1 + uniform * 1e-9, uniform * 1e-300}) {
      const double want = std::log(value);
      const double got = natural_log(value);
      ASSERT_LE(std::fabs(got - want), 4e-16 * std::fabs(want) + 1e-300) << value;
    }
  }
  EXPECT_EQ(natural_log(1.0), 0.0);
  EXPECT_TRUE(std::isinf(natural_log(0.0)) && natural_log(0.0) < 0);
  EXPECT_TRUE(std::isnan(natural_log(-1.0)));
  EXPECT_NEAR(natural_log(4.9406564584124654e-324), std::log(4.9406564584124654e-324), 1e-12);  // subnormal
}

TEST(Sampling, OneMinusExpNegAgreesWithLibm) {
  // The chance that sampling by bytes samples an allocation: s / mean from
  // 1e-9 (a byte, a large mean) to beyond 45 (certain), relative error
  // small also where 1 - e^-y is tiny.
  uint64_t x = 88172645463325252ull;
  for (int i = 0; i < 200000; ++i) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    const double uniform = (static_cast<double>(x >> 11) + 0.5) / 9007199254740992.0;
    for (double y : {uniform * 1e-9, uniform * 0.05, uniform, uniform * 10, uniform * 60}) {
      const double want = -std::expm1(-y);
      const double got = one_minus_exp_neg(y);
      ASSERT_LE(std::fabs(got - want), 1e-14 * want) << y;
    }
  }
  EXPECT_EQ(one_minus_exp_neg(0.0), 0.0);
  EXPECT_EQ(one_minus_exp_neg(-1.0), 0.0);
  EXPECT_EQ(one_minus_exp_neg(100.0), 1.0);
}

TEST(StackDepot, DeduplicatesAndKeepsStacks) {
  auto depot = std::make_unique<StackDepot>();
  ASSERT_TRUE(depot->init(kMaxDepth));
  const uintptr_t a[] = {0x1000, 0x2000, 0x3000};
  const uintptr_t b[] = {0x1000, 0x2000, 0x3001};
  const uint32_t id_a = depot->insert(a, 3);
  const uint32_t id_b = depot->insert(b, 3);
  EXPECT_NE(id_a, 0u);
  EXPECT_NE(id_b, 0u);
  EXPECT_NE(id_a, id_b);
  EXPECT_EQ(depot->insert(a, 3), id_a);
  EXPECT_NE(depot->insert(a, 2), id_a) << "a prefix is another stack";
  const uintptr_t* ips = nullptr;
  ASSERT_EQ(depot->stack(id_b, &ips), 3u);
  EXPECT_EQ(ips[2], 0x3001u);
  EXPECT_EQ(depot->insert(a, 0), 0u);
  EXPECT_EQ(depot->stack(0, &ips), 0u);
}

// Every id holds a stack of the deepest kind asked for, and the hash table
// never runs out of probes first: stacks alike but for one deep frame (as
// a program's are) fill all kIds - 1 ids; the next stack gets none, and
// the first ones are still found.
TEST(StackDepot, FillsEveryIdWithStacksOfTheMaximumDepth) {
  constexpr unsigned kDepth = 24;
  auto depot = std::make_unique<StackDepot>();
  ASSERT_TRUE(depot->init(kDepth));
  uintptr_t ips[kDepth];
  auto stack = [&](uint32_t n) {
    for (unsigned f = 0; f < kDepth; ++f) ips[f] = 0x400000 + f * 0x40;
    ips[kDepth / 2] += n * 16;  // return addresses 16 bytes apart
    return ips;
  };
  uint32_t failed = 0;
  for (uint32_t n = 1; n < StackDepot::kIds; ++n)
    if (depot->insert(stack(n), kDepth) != n) ++failed;
  EXPECT_EQ(failed, 0u);
  EXPECT_EQ(depot->id_limit(), StackDepot::kIds);
  EXPECT_EQ(depot->insert(stack(StackDepot::kIds), kDepth), 0u) << "full";
  // Still found, in every generation's table.
  for (uint32_t n : {1u, StackDepot::kFirstId[1] - 1, StackDepot::kFirstId[1], StackDepot::kFirstId[2] - 1,
                     StackDepot::kFirstId[2], StackDepot::kIds - 1})
    EXPECT_EQ(depot->insert(stack(n), kDepth), n);
  const uintptr_t* stored = nullptr;
  ASSERT_EQ(depot->stack(StackDepot::kIds - 1, &stored), kDepth);
  EXPECT_EQ(stored[kDepth / 2], 0x400000 + kDepth / 2 * 0x40 + (StackDepot::kIds - 1) * 16u);
}

// Within a generation (4 threads claim at most 2,000 ids here, all in the
// first), threads inserting the same stacks at once agree on every id.
TEST(StackDepot, ConcurrentInsertsAgreeOnIds) {
  auto depot = std::make_unique<StackDepot>();
  ASSERT_TRUE(depot->init(kMaxDepth));
  constexpr int kStacks = 500;
  static_assert(4 * kStacks < StackDepot::kFirstId[1]);
  std::vector<std::vector<uint32_t>> ids(4, std::vector<uint32_t>(kStacks));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kStacks; ++i) {
        const uintptr_t stack[] = {static_cast<uintptr_t>(i) * 16 + 1, 0x77, static_cast<uintptr_t>(i)};
        ids[t][i] = depot->insert(stack, 3);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  std::set<uint32_t> distinct;
  for (int i = 0; i < kStacks; ++i) {
    ASSERT_NE(ids[0][i], 0u);
    for (int t = 1; t < 4; ++t) ASSERT_EQ(ids[t][i], ids[0][i]) << "stack " << i;
    distinct.insert(ids[0][i]);
  }
  EXPECT_EQ(distinct.size(), static_cast<size_t>(kStacks));
}

// Stack number i, two frames deep; and the depot filled in order with the
// stacks numbered from n up to end (each must get its number as id).
void two_frames(uint32_t i, uintptr_t* stack) {
  stack[0] = uintptr_t{i} * 16 + 1;
  stack[1] = 0x77;
}

bool fill_depot(StackDepot& depot, uint32_t& n, uint32_t end) {
  uintptr_t stack[2];
  for (; n < end; ++n) {
    two_frames(n, stack);
    if (depot.insert(stack, 2) != n) return false;
  }
  return true;
}

// Inserters of one new stack whose ids fall on both sides of a
// generation's end (interleaved here as racing threads would): published
// in order, all of them get the earlier generation's id, the one who met
// another's slot in the later generation too. When the later one publishes
// first (the earlier one stopped between its claim and its publish), it
// keeps its own, and the stack is found under the earlier generation's id
// from then on. publish() takes only an id claimed for that very stack.
TEST(StackDepot, InsertersPastAGenerationsEndTakeTheEarlierId) {
  auto depot = std::make_unique<StackDepot>();
  ASSERT_TRUE(depot->init(kMaxDepth));
  uintptr_t stack[2];
  uint32_t n = 1;
  auto fill_to = [&](uint32_t end) { return fill_depot(*depot, n, end); };
  ASSERT_TRUE(fill_to(StackDepot::kFirstId[1] - 1));
  two_frames(1000000, stack);
  const uint32_t first = depot->claim(stack, 2), second = depot->claim(stack, 2), third = depot->claim(stack, 2);
  ASSERT_EQ(first, StackDepot::kFirstId[1] - 1);
  ASSERT_EQ(second, StackDepot::kFirstId[1]);
  EXPECT_EQ(depot->publish(first, stack, 2), first);
  EXPECT_EQ(depot->publish(second, stack, 2), first);
  EXPECT_EQ(depot->publish(third, stack, 2), first) << "met the second's slot";
  EXPECT_EQ(depot->publish(second, stack, 2), first) << "again";
  EXPECT_EQ(depot->insert(stack, 2), first);

  n = third + 1;
  ASSERT_TRUE(fill_to(StackDepot::kFirstId[2] - 1));
  two_frames(2000000, stack);
  const uint32_t stopped = depot->claim(stack, 2), passing = depot->claim(stack, 2);
  ASSERT_EQ(stopped, StackDepot::kFirstId[2] - 1);
  EXPECT_EQ(depot->publish(passing, stack, 2), passing);
  EXPECT_EQ(depot->publish(stopped, stack, 2), stopped);
  EXPECT_EQ(depot->insert(stack, 2), stopped);

  // Not claimed, or claimed for another stack: refused, and nothing changes.
  uintptr_t other[2];
  two_frames(3000000, other);
  EXPECT_EQ(depot->publish(depot->id_limit(), other, 2), 0u);
  EXPECT_EQ(depot->publish(StackDepot::kIds - 1, other, 2), 0u);
  EXPECT_EQ(depot->publish(stopped, other, 2), 0u);
  const uint32_t other_id = depot->insert(other, 2);
  EXPECT_EQ(other_id, passing + 1);
  EXPECT_EQ(depot->insert(stack, 2), stopped);
}

// An inserter delayed between its lookup (which missed) and its claim, while
// another inserts the same stack and any number of ids pass: its publish,
// however far into a later generation, returns the earliest id.
TEST(StackDepot, ALateClaimFarIntoALaterGenerationTakesTheEarliestId) {
  auto depot = std::make_unique<StackDepot>();
  ASSERT_TRUE(depot->init(kMaxDepth));
  uint32_t n = 1;
  auto fill_to = [&](uint32_t end) { return fill_depot(*depot, n, end); };
  ASSERT_TRUE(fill_to(StackDepot::kFirstId[1] - 1));
  uintptr_t delayed[2];
  two_frames(1000000, delayed);
  const uint32_t early = depot->insert(delayed, 2);
  ASSERT_EQ(early, StackDepot::kFirstId[1] - 1);
  n = early + 1;
  ASSERT_TRUE(fill_to(StackDepot::kFirstId[1] + 1000));
  const uint32_t late = depot->claim(delayed, 2);
  ASSERT_EQ(late, StackDepot::kFirstId[1] + 1000);
  EXPECT_EQ(depot->publish(late, delayed, 2), early);
  n = late + 1;
  ASSERT_TRUE(fill_to(StackDepot::kFirstId[2] + 3000));
  const uint32_t later = depot->claim(delayed, 2);
  ASSERT_EQ(later, StackDepot::kFirstId[2] + 3000);
  EXPECT_EQ(depot->publish(later, delayed, 2), early);
  EXPECT_EQ(depot->insert(delayed, 2), early);
}

// Across the generations' ends, with threads: every stack is found under
// one id, whatever id a thread got names that stack, and few stacks (only
// those of an inserter preempted between its claim and its publish: each
// thread has one insert at a time, and there are two ends) have two ids.
TEST(StackDepot, ConcurrentInsertsAcrossGenerations) {
  constexpr int kThreads = 4, kStacks = 20000;
  static_assert(kStacks > static_cast<int>(StackDepot::kFirstId[2]));
  auto stack_of = [](int i, uintptr_t* stack) {
    stack[0] = static_cast<uintptr_t>(i) * 16 + 1;
    stack[1] = 0x77;
    stack[2] = static_cast<uintptr_t>(i);
  };
  auto depot = std::make_unique<StackDepot>();
  ASSERT_TRUE(depot->init(kMaxDepth));
  std::vector<std::vector<uint32_t>> ids(kThreads, std::vector<uint32_t>(kStacks));
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      uintptr_t stack[3];
      for (int i = 0; i < kStacks; ++i) {
        stack_of(i, stack);
        ids[t][i] = depot->insert(stack, 3);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  std::set<uint32_t> distinct;
  int split = 0;
  for (int i = 0; i < kStacks; ++i) {
    uintptr_t stack[3];
    stack_of(i, stack);
    const uint32_t id = depot->insert(stack, 3);
    ASSERT_NE(id, 0u);
    distinct.insert(id);
    bool all = true;
    for (int t = 0; t < kThreads; ++t) {
      const uintptr_t* stored = nullptr;
      ASSERT_EQ(depot->stack(ids[t][i], &stored), 3u);
      EXPECT_EQ(stored[2], stack[2]);
      all = all && ids[t][i] == id;
    }
    split += !all;
  }
  EXPECT_EQ(distinct.size(), static_cast<size_t>(kStacks));
  EXPECT_LE(split, 2 * kThreads) << "stacks with two ids";
}

// A thread's pending sampled counts: what reaches the shared statistics
// through PendingSamples equals what direct adds give, whatever evicts
// entries (more sites than entries), and whoever merges (the owner, a
// flush from another thread, the automatic merge every kFlushEvents).
struct Event {
  uint32_t site;
  unsigned size_class;
  uint64_t size, lifetime, calls;
  bool is_short, recycled, temporary;
  Escape escape;
};

std::vector<Event> make_events(unsigned count, uint32_t sites, uint64_t seed) {
  std::vector<Event> events;
  uint64_t x = seed | 1;
  for (unsigned i = 0; i < count; ++i) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    events.push_back({static_cast<uint32_t>(x % sites), static_cast<unsigned>((x >> 20) % 40),
                      16 + (x >> 8) % 4000, (x >> 12) % 5000000000ull, (x >> 40) % 9, ((x >> 50) & 1) != 0,
                      ((x >> 55) & 1) != 0, ((x >> 51) & 3) == 0, static_cast<Escape>((x >> 53) % 3)});
  }
  return events;
}

void expect_same(const LifetimeStats& a, const LifetimeStats& b, const std::string& what) {
  EXPECT_EQ(a.frees.load(), b.frees.load()) << what;
  EXPECT_EQ(a.short_lived.load(), b.short_lived.load()) << what;
  EXPECT_EQ(a.recycled.load(), b.recycled.load()) << what;
  EXPECT_EQ(a.temporary.load(), b.temporary.load()) << what;
  for (unsigned e = 0; e < 3; ++e) EXPECT_EQ(a.escapes[e].load(), b.escapes[e].load()) << what;
  EXPECT_EQ(a.calls_between.load(), b.calls_between.load()) << what;
  for (unsigned h = 0; h < kLifetimeBuckets; ++h) EXPECT_EQ(a.histogram[h].load(), b.histogram[h].load()) << what;
}

void expect_same_sites(const StackDepot& a, const StackDepot& b, uint32_t sites) {
  for (uint32_t site = 1; site < sites; ++site) {
    const SiteStats& x = a.site(site);
    const SiteStats& y = b.site(site);
    const std::string what = "site " + std::to_string(site);
    EXPECT_EQ(x.allocs.load(), y.allocs.load()) << what;
    EXPECT_EQ(x.bytes.load(), y.bytes.load()) << what;
    EXPECT_EQ(x.min_size.load(), y.min_size.load()) << what;
    EXPECT_EQ(x.max_size.load(), y.max_size.load()) << what;
    EXPECT_EQ(x.weight.load(), y.weight.load()) << what;
    EXPECT_EQ(x.weighted_bytes.load(), y.weighted_bytes.load()) << what;
    expect_same(x.lifetimes, y.lifetimes, what);
  }
}

// A weight that differs between events (as by bytes), from the event's size
// (odd sizes: the events sampled by bytes; even: by count, without weight).
SampleWeight weight_of(const Event& e) {
  const uint64_t allocs = (uint64_t{1} << kWeightShift) * 8192 / e.size;
  return {allocs, (allocs * e.size) >> kWeightShift};
}

void add_directly(StackDepot& depot, LifetimeStats* classes, const Event& e) {
  if (e.site) {
    SiteStats& stats = depot.site(e.site);
    stats.allocs += 1;
    stats.bytes += e.size;
    if (e.size % 2) {
      stats.weight += weight_of(e).allocs;
      stats.weighted_bytes += weight_of(e).bytes;
    }
    // As the sampler's direct path: compare-and-swap loops (a flush may race).
    uint64_t seen = stats.min_size.load();
    while ((seen == 0 || e.size < seen) && !stats.min_size.compare_exchange_weak(seen, e.size)) {
    }
    seen = stats.max_size.load();
    while (e.size > seen && !stats.max_size.compare_exchange_weak(seen, e.size)) {
    }
    stats.lifetimes.add(e.lifetime, e.is_short, e.recycled, e.temporary, e.escape, e.calls);
  }
  classes[e.size_class].add(e.lifetime, e.is_short, e.recycled, e.temporary, e.escape, e.calls);
}

void add_pending(PendingSamples& pending, const Event& e) {
  if (e.site) {
    if (e.size % 2) pending.add_weighted_alloc(e.site, e.size, weight_of(e));  // by bytes
    else pending.add_alloc(e.site, e.size);  // by count: no weight kept
  }
  pending.add_free(e.site, e.size_class, e.lifetime, e.is_short, e.recycled, e.temporary, e.escape, e.calls);
}

// Each test runs with both protocols: the asymmetric handshake (membarrier)
// and the try-lock hotpool falls back to without it.
class PendingSamplesTest : public ::testing::TestWithParam<bool> {
 protected:
  // Two sets of shared statistics: one fed directly (the reference), one
  // through the pending counts.
  void SetUp() override {
    if (GetParam() && !init_asymmetric_fences()) GTEST_SKIP() << "membarrier(2) is not available here";
    direct = std::make_unique<StackDepot>();
    merged = std::make_unique<StackDepot>();
    ASSERT_TRUE(direct->init(kMaxDepth) && merged->init(kMaxDepth));
    direct_classes = std::make_unique<LifetimeStats[]>(kMaxClasses);
    merged_classes = std::make_unique<LifetimeStats[]>(kMaxClasses);
    pending = std::make_unique<PendingSamples>();
    pending->attach(merged.get(), merged_classes.get(), GetParam());
  }
  void expect_merged_equal_direct(uint32_t sites) {
    expect_same_sites(*direct, *merged, sites);
    for (unsigned c = 0; c < kMaxClasses; ++c)
      expect_same(direct_classes[c], merged_classes[c], "class " + std::to_string(c));
  }
  std::unique_ptr<StackDepot> direct, merged;
  std::unique_ptr<LifetimeStats[]> direct_classes, merged_classes;
  std::unique_ptr<PendingSamples> pending;
};

TEST_P(PendingSamplesTest, MergedCountsEqualDirectAddsThroughEvictionsAndFlushes) {
  // 300 sites through PendingSamples::kEntries entries (and 40 classes):
  // evictions all along; more events than kFlushEvents: automatic merges too.
  const std::vector<Event> events = make_events(3 * PendingSamples::kFlushEvents + 77, 300, 42);
  for (const Event& e : events) {
    add_directly(*direct, direct_classes.get(), e);
    ASSERT_TRUE(pending->begin());
    add_pending(*pending, e);
    pending->end();
  }
  // Before the last flush, some counts are still pending.
  uint64_t merged_frees = 0;
  for (unsigned c = 0; c < kMaxClasses; ++c) merged_frees += merged_classes[c].frees.load();
  EXPECT_LT(merged_frees, events.size());
  EXPECT_GE(merged_frees, 3 * PendingSamples::kFlushEvents - PendingSamples::kFlushEvents);
  ASSERT_TRUE(pending->flush());
  expect_merged_equal_direct(300);
  // Flushed: a second flush adds nothing.
  ASSERT_TRUE(pending->flush());
  expect_merged_equal_direct(300);
}

TEST_P(PendingSamplesTest, TheOwnersSectionKeepsOutFlushesAndNestedSections) {
  StackDepot* depot = merged.get();
  ASSERT_TRUE(pending->begin());
  pending->add_weighted_alloc(5, 100, {uint64_t{3} << kWeightShift, 300});
  EXPECT_FALSE(pending->begin());  // as a signal handler inside the section finds it
  bool flushed = true;
  std::thread other([&] { flushed = pending->flush(); });  // waits a little, then gives up
  other.join();
  EXPECT_FALSE(flushed);
  EXPECT_EQ(depot->site(5).allocs.load(), 0u);
  pending->end();
  EXPECT_TRUE(pending->try_flush());
  EXPECT_EQ(depot->site(5).allocs.load(), 1u);
  EXPECT_EQ(depot->site(5).bytes.load(), 100u);
  EXPECT_EQ(depot->site(5).weight.load(), uint64_t{3} << kWeightShift);
  EXPECT_EQ(depot->site(5).weighted_bytes.load(), 300u);
  // After a flush (given up or done) the owner gets in again.
  EXPECT_TRUE(pending->begin());
  pending->end();
}

TEST_P(PendingSamplesTest, AnotherThreadsFlushesWhileTheOwnerCountsLoseNothing) {
  const std::vector<Event> events = make_events(20000, 90, 7);
  std::atomic<bool> done{false};
  std::atomic<uint64_t> flushes{0};
  std::thread reporter([&] {
    // Flushes with pauses between them, as reports are: a flush in a tight
    // loop keeps the owner out (its counts then all go direct, still exact).
    while (!done.load()) {
      flushes += pending->flush();
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  });
  while (flushes.load() == 0) std::this_thread::yield();  // the reporter runs before the owner starts
  // The owner as the sampler does it: into its pending counts when it gets
  // in, else straight into the shared ones.
  uint64_t direct_adds = 0;
  for (const Event& e : events) {
    add_directly(*direct, direct_classes.get(), e);
    if (pending->begin()) {
      add_pending(*pending, e);
      pending->end();
    } else {
      add_directly(*merged, merged_classes.get(), e);
      ++direct_adds;
    }
  }
  done = true;
  reporter.join();
  ASSERT_TRUE(pending->flush());
  expect_merged_equal_direct(90);
  EXPECT_GT(flushes.load(), 0u);
  EXPECT_LT(direct_adds, events.size());
}

INSTANTIATE_TEST_SUITE_P(Protocols, PendingSamplesTest, ::testing::Values(true, false),
                         [](const ::testing::TestParamInfo<bool>& param_info) {
                           return param_info.param ? "AsymmetricFences" : "TryLock";
                         });

TEST(SiteMemo, GivesTheDepotsSitesAndSparesItsLookups) {
  auto depot = std::make_unique<StackDepot>();
  ASSERT_TRUE(depot->init(kMaxDepth));
  auto memo = std::make_unique<SiteMemo>();
  // 40 stacks, shallow and deep (to kMaxDepth). Their innermost six
  // frames and depth, the memo's key, are shared by groups of four (i % 10):
  // the stacks of a group differ only further out, and compete for one
  // entry (a hit must be the same whole stack).
  std::vector<std::vector<uintptr_t>> stacks;
  for (uintptr_t i = 0; i < 40; ++i) {
    const unsigned depth = i % 2 ? kMaxDepth : 7;
    std::vector<uintptr_t> stack(depth);
    for (unsigned f = 0; f < depth; ++f) stack[f] = 0x400000 + (f < 6 ? (i % 10) * 64 + f : i * 4096 + f);
    stacks.push_back(stack);
  }
  uint64_t rounds = 0;
  for (unsigned round = 0; round < 50; ++round) {
    for (unsigned pick = 0; pick < 40; ++pick) {
      // Runs of one stack, as an allocation loop makes them.
      const auto& stack = stacks[(pick * 7 + round) % 40];
      for (int again = 0; again < 3; ++again, ++rounds) {
        const uint32_t site = memo->site_of(*depot, stack.data(), static_cast<unsigned>(stack.size()));
        ASSERT_NE(site, 0u);
        ASSERT_EQ(site, depot->insert(stack.data(), static_cast<unsigned>(stack.size())));
        const uintptr_t* stored = nullptr;
        ASSERT_EQ(depot->stack(site, &stored), stack.size());
        for (size_t f = 0; f < stack.size(); ++f) ASSERT_EQ(stored[f], stack[f]);
      }
    }
  }
  // The repeats within a run hit (two of three); the first of a run
  // misses when another stack of its group took the entry meanwhile, as it
  // did in most runs: a group's four stacks come round in turn (a run's
  // first lookup hits only where a round ends and the next begins with
  // the same stack of a group).
  const uint64_t runs = rounds / 3;
  EXPECT_GE(memo->hits(), 2 * runs);
  EXPECT_LT(memo->hits(), 2 * runs + runs / 4);
  EXPECT_EQ(memo->site_of(*depot, stacks[0].data(), 0), 0u);  // no stack, no site
}

TEST(FrameActivity, TheAllocatingFunctionIsActiveWhileItsCallersAreTheOuterStack) {
  // Allocation in F (returns to 0xf1), F called from C at 0xc1, C from main at 0xa1.
  const uintptr_t allocation[] = {0xf1, 0xc1, 0xa1};
  CapturedStack free_in_f{};  // free called from F (0xf2), F still called from C at 0xc1
  free_in_f.depth = 3;
  free_in_f.ips[0] = 0xf2, free_in_f.ips[1] = 0xc1, free_in_f.ips[2] = 0xa1;
  EXPECT_TRUE(allocating_frame_active(allocation, 3, free_in_f));

  CapturedStack deeper{};  // F -> G -> free
  deeper.depth = 4;
  deeper.ips[0] = 0x91, deeper.ips[1] = 0xf3, deeper.ips[2] = 0xc1, deeper.ips[3] = 0xa1;
  EXPECT_TRUE(allocating_frame_active(allocation, 3, deeper));

  CapturedStack in_caller{};  // F returned; C frees (called from C at 0xc2)
  in_caller.depth = 2;
  in_caller.ips[0] = 0xc2, in_caller.ips[1] = 0xa1;
  EXPECT_FALSE(allocating_frame_active(allocation, 3, in_caller));

  CapturedStack other_path{};  // the same return address into C, but C called from elsewhere
  other_path.depth = 3;
  other_path.ips[0] = 0xf2, other_path.ips[1] = 0xc1, other_path.ips[2] = 0xb1;
  EXPECT_FALSE(allocating_frame_active(allocation, 3, other_path));

  EXPECT_FALSE(allocating_frame_active(allocation, 1, free_in_f)) << "no callers known";
}

}  // namespace
}  // namespace hotpool::reporter

namespace unwinding {

using hotpool::reporter::CapturedStack;
using hotpool::reporter::FrameTable;
using hotpool::reporter::StackMemo;
using hotpool::reporter::TraceCache;
using hotpool::reporter::Unwinder;


// Captures the stack twice, without and with the trace cache, at the
// bottom of a recursion of `depth` calls (noinline, not tail calls).
__attribute__((noinline)) unsigned recurse_and_capture(const Unwinder& unwinder, TraceCache& cache, unsigned depth,
                                                       unsigned frames, Captures& out) {
  if (depth == 0) {
    // From one call site, so that both stacks are the same.
    for (int with_cache = 0; with_cache < 2; ++with_cache)
      unwinder.capture(frames, with_cache ? &out.cached : &out.full, with_cache ? &cache : nullptr);
    return 0;
  }
  const unsigned below = recurse_and_capture(unwinder, cache, depth - 1, frames, out);
  asm volatile("" ::: "memory");
  return below + 1;
}

// The ASan build (CMakeLists.txt) keeps frame pointers everywhere: a frame
// with one is replayed only from its %rbp, which a capture without a start
// frame giving it (these tests' own frames calling capture()) does not
// know, so those captures are walked by libgcc there, and only their
// equality with a full unwind is checked.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kBuiltWithFramePointers = true;
#else
constexpr bool kBuiltWithFramePointers = false;
#endif

// Frames 0 and 1 are inside Unwinder::capture and at its call (the
// compiler may duplicate either): the stacks are compared from frame 2.
void expect_same(const CapturedStack& a, const CapturedStack& b, unsigned depth) {
  ASSERT_EQ(a.depth, b.depth) << "recursion " << depth;
  for (unsigned i = 2; i < a.depth; ++i) EXPECT_EQ(a.ips[i], b.ips[i]) << "frame " << i << ", recursion " << depth;
}

// An empty trace cache for the calling thread's stack.
std::unique_ptr<TraceCache> thread_cache() {
  pthread_attr_t attr;
  EXPECT_EQ(pthread_getattr_np(pthread_self(), &attr), 0);
  void* low = nullptr;
  size_t size = 0;
  EXPECT_EQ(pthread_attr_getstack(&attr, &low, &size), 0);
  pthread_attr_destroy(&attr);
  auto cache = std::make_unique<TraceCache>();
  cache->count = 0;
  cache->stack_low = reinterpret_cast<uintptr_t>(low);
  cache->stack_high = cache->stack_low + size;
  return cache;
}

// The cache takes the outer frames of the previous capture where the new
// one rejoins it: the result must be what a full unwind gives, whether the
// stack got deeper, shallower, or deeper than what a capture keeps.
TEST(TraceCache, CachedCapturesEqualFullUnwinds) {
  Unwinder unwinder;
  ASSERT_TRUE(unwinder.load(false));
  auto cache = thread_cache();
  for (unsigned frames : {4u, 24u}) {
    for (unsigned depth : {0u, 3u, 10u, 3u, 40u, 100u, 1u, 100u, 99u, 0u}) {
      Captures captures;
      recurse_and_capture(unwinder, *cache, depth, frames, captures);
      expect_same(captures.full, captures.cached, depth);
      EXPECT_GE(captures.full.depth, frames < depth ? frames : depth);
    }
  }
}

// A frame whose size depends on its argument (alloca): its caller's return
// address lies at a different distance each time.
__attribute__((noinline)) unsigned alloca_and_capture(const Unwinder& unwinder, TraceCache& cache, size_t bytes,
                                                      unsigned frames, Captures& out) {
  volatile char* buffer = static_cast<volatile char*>(alloca(bytes));
  for (size_t i = 0; i < bytes; i += 64) buffer[i] = 0;  // as a variable array would be: all of it written
  const unsigned below = recurse_and_capture(unwinder, cache, 3, frames, out);
  asm volatile("" ::: "memory");
  return below + buffer[0];
}


// touch_pages_for_write: every page of the range is then the process's own
// (present and exclusively mapped, /proc/self/pagemap bits 63 and 56), not
// the shared zero page a first read maps; nothing in it changes, nothing
// outside it is touched.
TEST(Pages, TouchingForWriteGivesEachPageItsOwnCopyAndChangesNothing) {
  const size_t page = 4096;
  auto* memory = static_cast<unsigned char*>(
      mmap(nullptr, 8 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(memory, MAP_FAILED);
  const int fd = open("/proc/self/pagemap", O_RDONLY);
  if (fd < 0) {
    munmap(memory, 8 * page);
    GTEST_SKIP() << "no /proc/self/pagemap";
  }
  const auto entry = [&](const void* address) {
    uint64_t value = 0;
    const off_t at = static_cast<off_t>(reinterpret_cast<uintptr_t>(address) / page * sizeof(value));
    EXPECT_EQ(pread(fd, &value, sizeof(value), at), static_cast<ssize_t>(sizeof(value)));
    return value;
  };
  constexpr uint64_t kPresent = uint64_t{1} << 63, kExclusive = uint64_t{1} << 56;
  memory[page + 7] = 42;  // page 1: written before
  volatile unsigned char read = memory[5 * page];  // page 5: read first (the zero page)
  (void)read;
  // Pages 1 to 3, from the middle of page 1 to the middle of page 3.
  hotpool::reporter::touch_pages_for_write(memory + page + 100, 2 * page);
  for (int i : {1, 2, 3}) {
    EXPECT_EQ(entry(memory + i * page) & (kPresent | kExclusive), kPresent | kExclusive) << "page " << i;
  }
  EXPECT_EQ(entry(memory) & kPresent, 0u) << "page 0, before the range, untouched";
  EXPECT_EQ(entry(memory + 4 * page) & kPresent, 0u) << "page 4, after it, untouched";
  // A page read first is mapped, shared: the case the touch avoids.
  if (entry(memory + 5 * page) & kPresent) {
    EXPECT_EQ(entry(memory + 5 * page) & kExclusive, 0u);
  }
  // (Read last: reading maps the pages left untouched.)
  EXPECT_EQ(memory[page + 7], 42) << "nothing written changes";
  for (size_t i = 0; i < 8 * page; ++i) {
    if (i != page + 7) {
      ASSERT_EQ(memory[i], 0) << "at " << i;
    }
  }
  close(fd);
  munmap(memory, 8 * page);
}

// The frame table starts small (a hash table makes every page it spreads
// over resident) and grows once, when half full, keeping what it learned;
// a dlclose's clear empties it.
TEST(FrameTable, StartsSmallAndGrowsOnceKeepingWhatItLearned) {
  FrameTable table;
  ASSERT_TRUE(table.init());
  EXPECT_EQ(table.slots(), 1u << FrameTable::kSmallLog2);
  std::vector<std::pair<uintptr_t, uint16_t>> learned;
  uintptr_t address = 0x401000;
  // Distinct return addresses until the table grows (an insert whose
  // probes all find other addresses is not learned, nor counted).
  for (unsigned i = 0; table.slots() == 1u << FrameTable::kSmallLog2 && i < 4 * FrameTable::kGrowAt; ++i) {
    address += 13 + i % 29;
    const auto words = static_cast<uint16_t>(1 + i % 700);
    table.learn(address, words);
    if (table.slots() == 1u << FrameTable::kSmallLog2 && FrameTable::lookup(table.view(), address) == words)
      learned.emplace_back(address, words);
  }
  ASSERT_EQ(table.slots(), 1u << FrameTable::kLargeLog2) << "grown when half full";
  EXPECT_GE(learned.size(), FrameTable::kGrowAt - 1);
  unsigned kept = 0;
  for (const auto& [at, words] : learned) kept += FrameTable::lookup(table.view(), at) == words;
  EXPECT_EQ(kept, learned.size()) << "every address learned in the small table is in the large one";
  EXPECT_GE(table.size(), learned.size());
  // Learning goes on in the large table; a second distance still makes an
  // address varying.
  table.learn(0x7f0000001000, 5);
  EXPECT_EQ(FrameTable::lookup(table.view(), 0x7f0000001000), 5);
  table.learn(learned.front().first, static_cast<uint16_t>(learned.front().second + 1));
  EXPECT_EQ(FrameTable::lookup(table.view(), learned.front().first), FrameTable::kVarying);
  table.clear();
  EXPECT_EQ(table.size(), 0u);
  EXPECT_EQ(FrameTable::lookup(table.view(), 0x7f0000001000), FrameTable::kUnknown);
}

// What walks that disagree leave in the table. A site seen with and
// without the frame pointer at the same distance keeps the plain entry (a
// walk without it proves the CFA is not computed from %rbp there; %rbp
// equal to CFA - 16 was a coincidence, and marking the site varying made
// every later capture through it a libgcc walk); anything else that
// disagrees is varying, two frame-pointer distances are the frame pointer
// alone.
TEST(FrameTable, DisagreeingWalksMergeByWhatTheyProve) {
  FrameTable table;
  ASSERT_TRUE(table.init());
  using T = FrameTable;
  const auto plain = [](uint16_t distance, unsigned rbp_slot) {
    return static_cast<uint16_t>(distance | (rbp_slot << T::kRbpShift));
  };
  const auto pointer = [](uint16_t distance) { return static_cast<uint16_t>(T::kFramePointer | distance); };
  uintptr_t address = 0x401000;
  const auto after = [&](std::initializer_list<uint16_t> walks) {
    address += 0x40;
    for (uint16_t words : walks) table.learn(address, words);
    return T::lookup(table.view(), address);
  };
  EXPECT_EQ(after({plain(6, 2), pointer(6)}), plain(6, 2)) << "the plain walk first";
  EXPECT_EQ(after({pointer(6), plain(6, 2)}), plain(6, 2)) << "the frame-pointer walk first";
  EXPECT_EQ(after({plain(6, 2), pointer(6), pointer(6), plain(6, 2)}), plain(6, 2)) << "for good";
  EXPECT_EQ(after({plain(6, 2), pointer(7)}), T::kVarying) << "another distance";
  EXPECT_EQ(after({pointer(7), plain(6, 2)}), T::kVarying);
  EXPECT_EQ(after({pointer(6), pointer(9), plain(6, 2)}), T::kVarying) << "the frame's size varied";
  EXPECT_EQ(after({pointer(6), pointer(9)}), T::kFramePointer);
  EXPECT_EQ(after({T::kOutermost, pointer(6)}), T::kVarying);
  EXPECT_EQ(after({pointer(6), T::kVarying}), T::kVarying);
  EXPECT_EQ(after({plain(6, 2), plain(7, 2)}), T::kVarying);
  EXPECT_EQ(after({plain(6, 0), plain(6, 2)}), plain(6, 2)) << "%rbp seen once adds up";
}

// Once libgcc has walked a stack, the same stack is replayed from the frame
// table: the result must be what a full unwind gives, for stacks seen before
// and new ones, deeper than a capture keeps, through a frame of varying
// size (alloca), and on another thread (the table is shared).
TEST(FrameTable, ReplayedCapturesEqualFullUnwinds) {
  Unwinder unwinder;
  ASSERT_TRUE(unwinder.load(false));
  auto cache = thread_cache();
  for (int round = 0; round < 3; ++round) {
    for (unsigned depth : {0u, 3u, 10u, 3u, 40u, 100u, 1u, 100u, 99u, 0u}) {
      Captures captures;
      cache->count = 0;  // no rejoining the previous capture: replayed or walked in full
      recurse_and_capture(unwinder, *cache, depth, 24, captures);
      expect_same(captures.full, captures.cached, depth);
    }
    for (size_t bytes : {16u, 4096u, 64u, 100000u, 16u, 2000u}) {
      Captures captures;
      cache->count = 0;
      alloca_and_capture(unwinder, *cache, bytes, 24, captures);
      expect_same(captures.full, captures.cached, static_cast<unsigned>(bytes));
    }
  }
  if (!kBuiltWithFramePointers) {
    EXPECT_GT(cache->replayed, 20u) << "walked " << cache->walked;
  }
  EXPECT_GT(cache->walked, 0u);
  EXPECT_GT(unwinder.frame_table().size(), 5u);

  // dlclose() empties the table: the next capture is walked by libgcc again.
  unwinder.forget_frames();
  EXPECT_EQ(unwinder.frame_table().size(), 0u);
  {
    const uint64_t replayed_before_clear = cache->replayed;
    Captures captures;
    cache->count = 0;
    recurse_and_capture(unwinder, *cache, 7, 24, captures);
    expect_same(captures.full, captures.cached, 7);
    EXPECT_EQ(cache->replayed, replayed_before_clear);  // walked, not replayed
    EXPECT_GT(unwinder.frame_table().size(), 5u);
  }

  uint64_t replayed_there = 0;
  std::thread other([&] {
    auto own = thread_cache();
    for (unsigned depth : {5u, 5u, 60u, 60u}) {
      Captures captures;
      own->count = 0;
      recurse_and_capture(unwinder, *own, depth, 24, captures);
      expect_same(captures.full, captures.cached, depth);
    }
    replayed_there = own->replayed;
  });
  other.join();
  if (!kBuiltWithFramePointers) {
    EXPECT_GT(replayed_there, 0u);  // the table learned on this thread serves that one
  }
}

// From the start frame on (the return address into the entry's caller),
// the cached capture is what libgcc's full walk gives.
void expect_same_from_start(const Captures& captures, const std::string& what) {
  unsigned in_full = 0, in_cached = 0;
  while (in_full < captures.full.depth && captures.full.ips[in_full] != captures.start) ++in_full;
  while (in_cached < captures.cached.depth && captures.cached.ips[in_cached] != captures.start) ++in_cached;
  ASSERT_LT(in_full, captures.full.depth) << what;
  ASSERT_LT(in_cached, captures.cached.depth) << what;
  const unsigned compared = std::min(captures.full.depth - in_full, captures.cached.depth - in_cached);
  EXPECT_GE(compared, 8u) << what;
  for (unsigned i = 0; i < compared; ++i)
    ASSERT_EQ(captures.cached.ips[in_cached + i], captures.full.ips[in_full + i]) << "frame " << i << ", " << what;
}

// Code built with frame pointers: its frames are replayed too, also those
// whose size varies (alloca), from the %rbp each one's callee saved, and
// the first from the %rbp the start frame gives (as the allocator's entry
// does). Every capture equals a full unwind; once the table has seen a
// frame of each kind, none is walked by libgcc any more.
TEST(FrameTable, FramePointerFramesAreReplayedWhateverTheirSize) {
  Unwinder unwinder;
  ASSERT_TRUE(unwinder.load(false));
  auto cache = thread_cache();
  unsigned captures_in_last_round = 0;
  uint64_t replayed_before_last_round = 0;
  for (int round = 0; round < 3; ++round) {
    if (round == 2) replayed_before_last_round = cache->replayed;
    for (unsigned depth : {2u, 10u, 40u}) {
      for (size_t bytes : {0u, 16u, 4096u, 100u, 0u, 2000u, 48u}) {
        Captures captures;
        cache->count = 0;  // no rejoining the previous capture: replayed or walked in full
        frame_pointer_recurse_and_capture(unwinder, *cache, depth, bytes, 24, /*give_rbp=*/true, captures);
        expect_same_from_start(captures, std::to_string(depth) + " deep, " + std::to_string(bytes) + " bytes");
        captures_in_last_round += round == 2;
      }
    }
  }
#if defined(__x86_64__)
  EXPECT_EQ(cache->replayed - replayed_before_last_round, captures_in_last_round) << "walked " << cache->walked;
#endif
}

// A frame of varying size whose %rbp the replay does not know (its callee
// keeps no frame pointer and the start frame does not give it) is walked by
// libgcc at every size, never replayed with a distance seen before: at
// another size, that distance points into the frame's stack buffer, where
// a stale return address may lie (the stack would be a wrong one).
TEST(FrameTable, AFrameOfVaryingSizeWhoseRbpIsNotKnownIsWalkedNeverReplayedAtAStaleDistance) {
  Unwinder unwinder;
  ASSERT_TRUE(unwinder.load(false));
  auto cache = thread_cache();
  for (int round = 0; round < 3; ++round) {
    for (size_t bytes : {16u, 624u, 16u, 4096u, 48u}) {
      Captures captures;
      cache->count = 0;
      const uint64_t walked_before = cache->walked;
      frame_pointer_recurse_and_capture(unwinder, *cache, 3, bytes, 24, /*give_rbp=*/false, captures);
      expect_same_from_start(captures, std::to_string(bytes) + " bytes, round " + std::to_string(round));
#if defined(__x86_64__)
      EXPECT_EQ(cache->walked, walked_before + 1) << bytes << " bytes, round " << round;
#endif
    }
  }
}

// The stack memo. memo_leaf's start frame is its own (as the allocator's
// entry gives its own): it captures, remembering the stack, or recalls it;
// memo_last_start is that start frame. memo_via<0> and memo_via<1> reach
// the same start frame (the same call site in memo_middle, at the same
// depth: their frames and memo_outer's have the same size) through
// different outer stacks. memo_leaf keeps a frame pointer: its caller's
// %rbp is then the one its prologue saved (the allocator's entry passes it
// on in the start frame too). noipa: no two of these are folded into one.
Unwinder::Frame memo_last_start;
__attribute__((noipa, optimize("no-omit-frame-pointer"))) int memo_leaf(const Unwinder& unwinder, TraceCache& cache,
                                                                       StackMemo& memo, bool capture) {
  const Unwinder::Frame start{reinterpret_cast<uintptr_t>(__builtin_return_address(0)),
                              reinterpret_cast<uintptr_t>(__builtin_dwarf_cfa()),
                              *static_cast<const uintptr_t*>(__builtin_frame_address(0)), true};
  memo_last_start = start;
  int entry;
  if (capture) {
    CapturedStack out;
    unwinder.capture(4, &out, &cache, start, &memo);
    entry = out.memo_entry;
  } else {
    entry = unwinder.recall(memo, start);
  }
  asm volatile("" ::: "memory");
  return entry;
}
__attribute__((noipa)) int memo_middle(const Unwinder& unwinder, TraceCache& cache, StackMemo& memo, bool capture) {
  const int entry = memo_leaf(unwinder, cache, memo, capture);
  asm volatile("" ::: "memory");
  return entry;
}
template <int kWhich>
__attribute__((noipa)) int memo_outer(const Unwinder& unwinder, TraceCache& cache, StackMemo& memo, bool capture) {
  const int entry = memo_middle(unwinder, cache, memo, capture);
  asm volatile("" ::: "memory");
  return entry;
}
// One call site each for the test's calls: a capture of 4 frames (none
// skipped here) checks the frames up to the one returning into these.
template <int kWhich>
__attribute__((noipa)) int memo_via(const Unwinder& unwinder, TraceCache& cache, StackMemo& memo, bool capture) {
  const int entry = memo_outer<kWhich>(unwinder, cache, memo, capture);
  asm volatile("" ::: "memory");
  return entry;
}
// Through a frame of varying size (alloca: it keeps a frame pointer),
// whose %rbp the start frame gives.
__attribute__((noipa)) int memo_below_alloca(const Unwinder& unwinder, TraceCache& cache, StackMemo& memo,
                                                size_t bytes, bool capture) {
  auto* buffer = static_cast<volatile char*>(alloca(bytes));
  buffer[0] = 1;
  const int entry = memo_leaf(unwinder, cache, memo, capture);
  asm volatile("" ::: "memory");
  return entry + buffer[0] - 1;
}
__attribute__((noipa)) int memo_above_alloca(const Unwinder& unwinder, TraceCache& cache, StackMemo& memo,
                                                size_t bytes, bool capture) {
  const int entry = memo_below_alloca(unwinder, cache, memo, bytes, capture);
  asm volatile("" ::: "memory");
  return entry;
}
__attribute__((noipa)) int memo_via_alloca(const Unwinder& unwinder, TraceCache& cache, StackMemo& memo,
                                              size_t bytes, bool capture) {
  const int entry = memo_above_alloca(unwinder, cache, memo, bytes, capture);
  asm volatile("" ::: "memory");
  return entry;
}

// A stack is recalled from the memo where it was remembered and its site
// named, from the same stack only: not through another outer stack, not
// once libraries were unloaded (forget_frames) or the memo reset. A stack
// through a frame of varying size (a frame pointer's) is recalled at the
// same size, its %rbp checked.
TEST(StackMemo, RecallsTheSameStackOnly) {
  Unwinder unwinder;
  ASSERT_TRUE(unwinder.load(false));
  auto cache = thread_cache();
  auto memo = std::make_unique<StackMemo>();
  memo->reset(4);
  // The first capture is walked by libgcc (nothing to remember), the next
  // replayed and remembered.
  int entry = -1;
  for (int i = 0; i < 4 && entry < 0; ++i) entry = memo_via<0>(unwinder, *cache, *memo, true);
  ASSERT_GE(entry, 0) << "walked " << cache->walked << ", replayed " << cache->replayed;
  EXPECT_EQ(memo_via<0>(unwinder, *cache, *memo, false), -1) << "no site named yet";
  memo->name(entry, 42);
  EXPECT_EQ(memo_via<0>(unwinder, *cache, *memo, false), entry);
  EXPECT_EQ(memo_via<0>(unwinder, *cache, *memo, false), entry);
  EXPECT_EQ(memo->recalled, 2u);
  EXPECT_EQ(memo->entries[entry].site, 42u);
  const Unwinder::Frame start_a = memo_last_start;
  EXPECT_EQ(memo_via<1>(unwinder, *cache, *memo, false), -1) << "another outer stack";
  // (From the same start frame: only the frames beyond it tell the stacks apart.)
  EXPECT_EQ(memo_last_start.return_address, start_a.return_address);
  EXPECT_EQ(memo_last_start.cfa, start_a.cfa);
  EXPECT_EQ(memo_via<0>(unwinder, *cache, *memo, false), entry) << "and the first one still";
  unwinder.forget_frames();
  EXPECT_EQ(memo_via<0>(unwinder, *cache, *memo, false), -1) << "void after forget_frames";
  // Remembered again once replayed, then reset.
  entry = -1;
  for (int i = 0; i < 4 && entry < 0; ++i) entry = memo_via<0>(unwinder, *cache, *memo, true);
  ASSERT_GE(entry, 0);
  memo->name(entry, 43);
  EXPECT_EQ(memo_via<0>(unwinder, *cache, *memo, false), entry);
  memo->reset(4);
  EXPECT_EQ(memo_via<0>(unwinder, *cache, *memo, false), -1) << "void after reset";
  for (size_t bytes : {64u, 4000u}) {
    entry = -1;
    for (int i = 0; i < 4 && entry < 0; ++i) entry = memo_via_alloca(unwinder, *cache, *memo, bytes, true);
    ASSERT_GE(entry, 0) << bytes << " bytes";
    EXPECT_GE(memo->entries[entry].pointers, 1u) << "the alloca frame's %rbp, checked";
    memo->name(entry, static_cast<uint32_t>(bytes));
    EXPECT_EQ(memo_via_alloca(unwinder, *cache, *memo, bytes, false), entry) << bytes << " bytes";
    EXPECT_EQ(memo_via_alloca(unwinder, *cache, *memo, bytes + 16, false), -1) << "another size: another start frame";
  }
  // A frame pointer's %rbp changed (as by another frame size at the same
  // place): not recalled.
  entry = memo_via_alloca(unwinder, *cache, *memo, 64, false);
  ASSERT_GE(entry, 0);
  memo->entries[entry].rbp[0] ^= 16;
  EXPECT_EQ(memo_via_alloca(unwinder, *cache, *memo, 64, false), -1);
  memo->reset(0);
  EXPECT_FALSE(memo->on());
  EXPECT_EQ(memo_via<0>(unwinder, *cache, *memo, true), -1) << "off: nothing remembered";
}

// A capture may start at a frame above its caller's (the allocator's entry
// point): a replayed capture leaves out the frames in between (hotpool's,
// which are skipped anyway); one that libgcc walks has them. From the
// start frame on, either is what a full unwind gives.
__attribute__((noinline)) uintptr_t capture_from_here(const Unwinder& unwinder, TraceCache& cache, unsigned frames,
                                                      Captures& out) {
  const Unwinder::Frame here{reinterpret_cast<uintptr_t>(__builtin_return_address(0)),
                             reinterpret_cast<uintptr_t>(__builtin_dwarf_cfa())};
  unwinder.capture(frames, &out.full, nullptr);
  unwinder.capture(frames, &out.cached, &cache, here);
  asm volatile("" ::: "memory");
  return here.return_address;
}

__attribute__((noinline)) uintptr_t recurse_and_capture_from_start(const Unwinder& unwinder, TraceCache& cache,
                                                                   unsigned depth, unsigned frames, Captures& out) {
  if (depth == 0) return capture_from_here(unwinder, cache, frames, out);
  const uintptr_t start = recurse_and_capture_from_start(unwinder, cache, depth - 1, frames, out);
  asm volatile("" ::: "memory");
  return start;
}

unsigned index_of(const CapturedStack& stack, uintptr_t ip) {
  for (unsigned i = 0; i < stack.depth; ++i)
    if (stack.ips[i] == ip) return i;
  return stack.depth;
}

TEST(TraceCache, ACaptureFromAStartFrameEqualsAFullUnwindFromThere) {
  Unwinder unwinder;
  ASSERT_TRUE(unwinder.load(false));
  auto cache = thread_cache();
  unsigned from_start = 0;
  for (int round = 0; round < 3; ++round) {  // walked by libgcc first, then replayed
    for (unsigned depth : {0u, 5u, 40u, 5u, 100u, 0u}) {
      const uint64_t replayed_before = cache->replayed;
      Captures captures;
      const uintptr_t start = recurse_and_capture_from_start(unwinder, *cache, depth, 24, captures);
      const unsigned in_full = index_of(captures.full, start);
      const unsigned in_cached = index_of(captures.cached, start);
      ASSERT_EQ(in_full, 2u) << "capture(), the call in capture_from_here, then the start frame";
      ASSERT_LT(in_cached, captures.cached.depth) << "recursion " << depth;
      if (cache->replayed > replayed_before) {
        EXPECT_EQ(in_cached, 1u) << "a replay starts at the start frame";
        from_start += in_cached == 1;
      }
      const unsigned compared = std::min(captures.full.depth - in_full, captures.cached.depth - in_cached);
      EXPECT_GE(compared, std::min(depth + 1, 20u)) << "recursion " << depth;
      for (unsigned i = 0; i < compared; ++i)
        EXPECT_EQ(captures.cached.ips[in_cached + i], captures.full.ips[in_full + i])
            << "frame " << i << " from the start, recursion " << depth;
    }
  }
  if (!kBuiltWithFramePointers) {
    EXPECT_GT(from_start, 0u);
  }
}

// A capture in a signal handler on an alternate stack: libgcc walks it
// (the replay keeps to the thread's stack), and the trace cache keeps none
// of the frames outside the thread's stack, which a later capture's rejoin
// reads without a check (see TraceCache).
struct AltStackRun {
  const Unwinder* unwinder;
  TraceCache* cache;
  Captures captures;
  bool ran;
};
AltStackRun* g_alt_run = nullptr;

void capture_on_alternate_stack(int) {
  recurse_and_capture(*g_alt_run->unwinder, *g_alt_run->cache, 6, 24, g_alt_run->captures);
  g_alt_run->ran = true;
}

void expect_cache_inside_its_stack(const TraceCache& cache) {
  for (unsigned i = 1; i < cache.count; ++i) {
    EXPECT_GE(cache.cfas()[i], cache.stack_low + sizeof(uintptr_t)) << "frame " << i;
    EXPECT_LE(cache.cfas()[i], cache.stack_high) << "frame " << i;
  }
}

TEST(TraceCache, KeepsNoFrameOfASignalHandlersAlternateStack) {
  Unwinder unwinder;
  ASSERT_TRUE(unwinder.load(false));
  auto cache = thread_cache();
  {
    Captures captures;  // a capture on the thread's stack, for the handler's to meet
    recurse_and_capture(unwinder, *cache, 6, 24, captures);
    expect_cache_inside_its_stack(*cache);
  }
  std::vector<char> alternate(1 << 16);
  stack_t stack = {};
  stack.ss_sp = alternate.data();
  stack.ss_size = alternate.size();
  stack_t previous_stack;
  ASSERT_EQ(sigaltstack(&stack, &previous_stack), 0);
  struct sigaction action = {}, previous_action;
  action.sa_handler = capture_on_alternate_stack;
  action.sa_flags = SA_ONSTACK;
  ASSERT_EQ(sigaction(SIGUSR2, &action, &previous_action), 0);
  AltStackRun run{&unwinder, cache.get(), {}, false};
  g_alt_run = &run;
  raise(SIGUSR2);
  sigaction(SIGUSR2, &previous_action, nullptr);
  sigaltstack(&previous_stack, nullptr);
  g_alt_run = nullptr;
  ASSERT_TRUE(run.ran);
  expect_same(run.captures.full, run.captures.cached, 6);
  EXPECT_GT(run.captures.cached.depth, 8u) << "the walk went past the handler's frames";
  expect_cache_inside_its_stack(*cache);
  for (unsigned depth : {3u, 9u}) {  // and on the thread's stack again
    Captures captures;
    recurse_and_capture(unwinder, *cache, depth, 24, captures);
    expect_same(captures.full, captures.cached, depth);
    expect_cache_inside_its_stack(*cache);
  }
}

}  // namespace unwinding
