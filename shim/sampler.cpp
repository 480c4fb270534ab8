#include "sampler.h"

#include "reporter/report.h"

#include <pthread.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>
#include <time.h>

#include <atomic>

#include <cstring>

namespace hotpool::shim {

constinit recycler::PoolRegion g_sample_region{};
constinit reporter::StackDepot g_stack_depot{};
constinit reporter::LifetimeStats g_class_lifetimes[reporter::kMaxClasses]{};
// The sample region's size classes (see start_sampling).
constinit recycler::SizeClassTable g_sample_classes{};  // constant-initialized: start-up may run before dynamic initializers

namespace {

// SampleHeader::ops_state: the calls in the low 48 bits; above them the
// mark, live or freed, and kNoSite: `site` holds no site but the low half
// of the allocating function's return address (a sample the depot had no
// room for: its frame can still be told active at the free).
constexpr uint64_t kOpsMask = (uint64_t{1} << 48) - 1;
constexpr uint64_t kNoSite = uint64_t{1} << 48;
constexpr uint64_t kLive = uint64_t{0x6870} << 48;   // "ph" (kNoSite's bit clear)
constexpr uint64_t kFreed = uint64_t{0x7266} << 48;  // "fr"
constexpr uint64_t kStateMask = ~kOpsMask;
constexpr uint64_t kMarkMask = kStateMask & ~kNoSite;
// The site of a sampled block's header, 0 if none (also for an id out of
// the depot's range: a header the program overwrote).
uint32_t header_site(const SampleHeader& header) {
  return (header.ops_state & kNoSite) || header.site >= reporter::StackDepot::kIds ? 0 : header.site;
}
// The usable size a sampled block shows the program and is counted with:
// what the same request would get unsampled (its pooled class's size, or
// the real allocator's as hotpool reckons it), so that sampling moves no
// block into another class (a block belongs to the smallest class that
// holds its usable size) and realloc and malloc_usable_size see the same.
HOTPOOL_ALWAYS_INLINE size_t sibling_usable(size_t requested, bool pooled) {
  return pooled ? g_classes.class_size(g_classes.class_of(requested)) : real_usable_estimate(requested);
}
constexpr size_t kHeader = sizeof(SampleHeader);

// Aligned samples (memalign & co., sampled_allocate_aligned): region
// blocks are 16-byte aligned, so a block aligned to A > 16 bytes starts up
// to A - 16 bytes further into its region block than kHeader, its header
// still right in front of it. When it does not start at kHeader (then it
// starts at least kHeader + 16 in: offsets are multiples of 16), the
// region block's first word says where it starts: the aligned key ^ its
// address. A free that is not kHeader past a block start must find that
// word (aligned_region_block), else it aborts as any interior pointer's.
constexpr size_t kMaxSampledAlignment = 4096;
constinit uint64_t g_aligned_key = 0;

constinit reporter::Unwinder g_unwinder{};
constinit uintptr_t g_unwinder_range[2] = {0, 0};  // libunwind's text, for pipe2

// The fork gate. libunwind keeps locks of its own; a fork() while another
// thread is inside it would leave them held forever in the child. So
// before a fork no thread may be unwinding: each capture announces itself,
// and the forking thread waits until none is in progress (sequentially
// consistent, Dekker-style: one of the two always sees the other).
constinit std::atomic<int> g_unwinding{0};
// fork() calls between the start of their prepare handler and the end of
// their parent (or child) handler, in any thread.
constinit std::atomic<int> g_fork_pending{0};
// Sampled allocations without a site (no stack captured, or none of the
// depot's ids or probes left): the report says how many. In a cache line
// of its own, written only then: the samples' shared reads (the fork gate
// above) stay in theirs.
struct alignas(64) UnsitedCount {
  std::atomic<uint64_t> value{0};
};
static_assert(sizeof(UnsitedCount) == 64, "a line of its own");
constinit UnsitedCount g_unsited;
__thread bool tls_unwinding __attribute__((tls_model("initial-exec")));
// This thread's captures in g_unwinding, or about to be: more than one when
// a signal handler's capture interrupted another.
__thread unsigned tls_counted __attribute__((tls_model("initial-exec")));
constinit bool g_active = false;
// Sampled allocations get their call stack captured (HOTPOOL_SITES): their
// site, and the allocating frame that tells frame-local from thread-local.
constinit bool g_sites = false;
constinit uint64_t g_rate = 0;  // by count: mean allocations per sample; 0 by bytes
constinit uint64_t g_mean_bytes = 0;  // by bytes: mean bytes per sample; 0 by count
}  // namespace
constinit bool g_sampling_by_bytes = false;
namespace {
constinit double g_log_keep = 0;  // ln(1 - 1/g_rate): the geometric intervals' scale
constinit unsigned g_depth = 0;
// A thread's stack memo keeps this many frames (0: no memo): dense rates
// with libgcc's unwinder only (see reporter::StackMemo).
constinit unsigned g_memo_depth = 0;
constinit uint64_t g_short_ns = 0;
constinit uint64_t g_recycle_calls = 0;
constinit size_t g_limit = 0;  // largest request that can be sampled

// Both counters are set to 0 in a fork child (only the forking thread is
// left), which may still be inside a capture or a fork() that counted
// itself before: its decrement then stops at 0.
void decrement_to_zero(std::atomic<int>& counter) {
  int seen = counter.load(std::memory_order_seq_cst);
  while (seen > 0 && !counter.compare_exchange_weak(seen, seen - 1, std::memory_order_seq_cst)) {
  }
}

// Sampled lifetimes: the time-stamp counter where the kernel trusts it.
constinit reporter::LifetimeClock g_clock{};
uint64_t now_ns() { return g_clock.now_ns(); }

// Blocks a thread keeps per sample-region class: up to 64 KiB of them
// when samples are dense (1 in 16 allocations or more, or by bytes 1 in
// 4 KiB or more), where a trip to the depot per sample would show
// (SampleStash::kSlots blocks at most, one at least); none otherwise:
// a sparse sample then takes its block from the depot and gives it back
// there (a lock and a bitmap search each way, some 300 instructions per
// sample: under 1 per allocation at 1 in 512), so that the region holds
// about the live samples. A stash of 4 KiB per
// class and thread (refilled by halves) kept 3.6 MiB of the region
// resident for 12 live samples in a program of 100 threads at 1 in 512.
// Computed once (start_sampling): a sample's allocation and its free each
// ask, and a division per ask was 1% of a sample's instructions.
constinit uint8_t g_stash_capacity[reporter::kMaxClasses] = {};
static_assert(SampleStash::kSlots <= UINT8_MAX, "a stash's capacity fits a byte");
void init_stash_capacities() {
  const bool dense = !sampling_sparse();
  constexpr size_t kDenseBytes = size_t{64} << 10;
  for (unsigned c = 0; c < g_sample_classes.count() && c < reporter::kMaxClasses; ++c) {
    const size_t size = g_sample_classes.class_size(c);
    const size_t blocks = size ? kDenseBytes / size : 1;
    g_stash_capacity[c] =
        dense ? static_cast<uint8_t>(blocks >= SampleStash::kSlots ? SampleStash::kSlots : blocks ? blocks : 1) : 0;
  }
}
unsigned stash_capacity(unsigned region_class) { return g_stash_capacity[region_class]; }

// The stack of this call, above hotpool, the C++ runtime and libc; empty
// while a fork is pending (see the fork gate).
void capture_stack(reporter::CapturedStack* stack,
                   const reporter::Unwinder::Frame& start = reporter::Unwinder::Frame{},
                   reporter::StackMemo* memo = nullptr) {
  // libunwind may read files: read() is a cancellation point, and malloc
  // is not; and a thread cancelled while counted as unwinding would hold
  // every fork back. So cancellation waits until the capture is done
  // (libgcc's walk reaches no cancellation point: only while the program
  // uses cancellation, against an asynchronous one).
  const recycler::CancellationOff cancellation_off(g_unwinder.uses_libunwind());
  stack->depth = 0;
  stack->cfa = 0;
  stack->memo_entry = -1;
  ThreadState* const state = tls.state;
  // The fork gate: this thread counts itself as unwinding, then looks for a
  // pending fork; the forking thread announces itself, then waits for the
  // count to fall. With asymmetric fences the count is this thread's own
  // (plain stores and a compiler barrier; the forker's membarrier does the
  // rest), else the shared one (two lock-prefixed operations).
  const bool own_count = state && reporter::asymmetric_fences();
  if (own_count) {
    // Nested captures (a signal handler's) count on: the count stays up
    // until the outermost is done.
    state->unwinding.store(state->unwinding.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    reporter::light_fence();
  } else {
    // Marked before it counts: a fork() from a signal handler arriving in
    // between must not wait for this thread (see begin_fork_samples).
    ++tls_counted;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    g_unwinding.fetch_add(1, std::memory_order_seq_cst);
  }
  if (g_fork_pending.load(own_count ? std::memory_order_relaxed : std::memory_order_seq_cst) == 0) {
    ReentryGuard guard;
    // The thread's trace cache, unless this capture interrupted another
    // one on this thread (a signal handler that allocates).
    reporter::TraceCache* cache = state && !tls_unwinding ? &state->trace_cache : nullptr;
    const bool nested = tls_unwinding;
    tls_unwinding = true;
    g_unwinder.capture(g_depth, stack, cache, start, memo);
    tls_unwinding = nested;
  }
  if (own_count) {
    reporter::light_fence();
    state->unwinding.store(state->unwinding.load(std::memory_order_relaxed) - 1, std::memory_order_release);
  } else {
    decrement_to_zero(g_unwinding);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    --tls_counted;
  }
}

// Whether the function that made a sampled allocation is still active on
// this thread, from its frame alone, without unwinding: while it is, its
// frame lies above ours on this stack and the slot below its canonical
// frame address still holds its return address; once it has returned,
// the slot is below us or holds something else (the same function called
// again from the same call site, at the same depth, reads as the same
// activation: so it does in allocating_frame_active too). -1: cannot tell
// this way (no frame address; the allocation or this free on another stack
// than the thread's own, e.g. a signal stack or a coroutine's).
int frame_still_active(const ThreadState& state, const SampleHeader& header) {
#if defined(__x86_64__)
  if (!header.frame_below_top || !state.stack_high) return -1;
  // The return address: the second frame of the site's stack, or its low
  // half kept in the header.
  uintptr_t caller_return, compared = ~uintptr_t{0};
  if (header.ops_state & kNoSite) {
    caller_return = header.site;
    compared = 0xffffffffu;
  } else {
    const uintptr_t* allocation = nullptr;
    if (g_stack_depot.known_stack(header.site, &allocation) < 2) return -1;
    caller_return = allocation[1];
  }
  const uintptr_t cfa = state.stack_high - header.frame_below_top;
  const auto here = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
  if (here < state.stack_low || here >= state.stack_high || cfa <= state.stack_low) return -1;
  const uintptr_t slot = cfa - sizeof(uintptr_t);  // the return address, pushed by the call
  if (slot <= here) return 0;                       // popped: the function returned
  return (*reinterpret_cast<const uintptr_t*>(slot) & compared) == caller_return ? 1 : 0;
#else
  (void)state;
  (void)header;
  return -1;
#endif
}

// The allocating function's canonical frame address when the unwinder gave
// return addresses only (libunwind): the stack is read upwards from `from`
// (above this call's own copies of the addresses) for the slot of the
// allocating function's call into the allocator (ips[0]), then for the
// slot above it that holds its own return address (ips[1]): the word
// below its CFA. Reads stay on the thread's stack; 0 if not found within
// 128 KiB.
uintptr_t find_frame_cfa(const reporter::CapturedStack& stack, const ThreadState& state, uintptr_t from) {
#if defined(__x86_64__)
  if (stack.depth < 2 || !state.stack_high || from < state.stack_low || from >= state.stack_high) return 0;
  const auto* word = reinterpret_cast<const uintptr_t*>((from + 7) & ~uintptr_t{7});
  const auto* end = reinterpret_cast<const uintptr_t*>(state.stack_high);
  constexpr ptrdiff_t kWords = 16384;
  if (end - word > kWords) end = word + kWords;
  while (word < end && *word != stack.ips[0]) ++word;
  for (++word; word < end; ++word)
    if (*word == stack.ips[1]) return reinterpret_cast<uintptr_t>(word) + sizeof(uintptr_t);
#else
  (void)stack;
  (void)state;
  (void)from;
#endif
  return 0;
}

}  // namespace

uint64_t lifetime_clock_ns() { return now_ns(); }

void find_thread_stack(ThreadState& state) {
  // Under the recursion guard (sampled_allocate): for the main thread,
  // glibc reads /proc/self/maps with stdio.
  pthread_attr_t attr;
  if (pthread_getattr_np(pthread_self(), &attr) != 0) return;
  void* low = nullptr;
  size_t size = 0;
  if (pthread_attr_getstack(&attr, &low, &size) == 0 && low && size) {
    state.stack_low = reinterpret_cast<uintptr_t>(low);
    state.stack_high = state.stack_low + size;
  }
  state.trace_cache.count = 0;
  state.trace_cache.stack_low = state.stack_low;
  state.trace_cache.stack_high = state.stack_high;
  pthread_attr_destroy(&attr);
}

bool start_sampling(const ReentryGuard&) {
  const Options& options = current_options();
  // By bytes when asked: every allocation then ends the countdown
  // (next_sample_interval gives 1) and sampled_allocate draws.
  g_mean_bytes = options.sample_bytes;
  g_rate = g_mean_bytes ? 0 : options.sample;
  if (g_rate == 0 && g_mean_bytes == 0) return false;
  // ln(1 - p): for small p from its series (1 - p would round away p's low
  // bits), else directly.
  const double p = g_rate ? 1.0 / static_cast<double>(g_rate) : 1.0;
  if (p < 1e-3) {
    g_log_keep = -(p + p * p / 2 + p * p * p / 3 + p * p * p * p / 4);
  } else if (p < 1) {
    g_log_keep = reporter::natural_log(1 - p);
  }
  g_depth = static_cast<unsigned>(options.depth < reporter::kMaxDepth ? options.depth : reporter::kMaxDepth);
  if (g_depth == 0) g_depth = 1;
  if (g_depth != options.depth) {
    reporter::Output(STDERR_FILENO).str("hotpool: HOTPOOL_DEPTH=").u64(options.depth).str(": ").u64(g_depth)
        .str(g_depth == 1 ? " frame" : " frames").str(" captured (1 to ").u64(reporter::kMaxDepth).str(")\n");
  }
  if (options.top > reporter::kMaxTop) {
    reporter::Output(STDERR_FILENO).str("hotpool: HOTPOOL_TOP=").u64(options.top).str(": ").u64(reporter::kMaxTop)
        .str(" sites shown per list (at most ").u64(reporter::kMaxTop).str("; the JSON report lists up to 256 by allocations and 64 by bytes)\n");
  }
  g_short_ns = options.short_lived;
  g_recycle_calls = options.recycle_calls;
  const bool use_libunwind = options.unwinder == Unwinder::Libunwind;
  g_sites = options.sites == Switch::On || (options.sites == Switch::Auto && options.report);
  if (g_sites && !g_unwinder.load(use_libunwind)) {
    write_warning(use_libunwind
                      ? "hotpool: libunwind.so.8 could not be loaded: no allocation sites or lifetimes (apt-get install libunwind8)"
                      : "hotpool: libgcc's unwinder is missing: no allocation sites or lifetimes");
    return false;
  }
  // Leading frames in hotpool, the C++ runtime and libc are the allocator's.
  uintptr_t ranges[3][2];
  unsigned count = 0;
  if (reporter::module_range_of(reinterpret_cast<void*>(&start_sampling), ranges[count])) ++count;
  if (reporter::module_range_named("libstdc++", ranges[count])) ++count;
  if (reporter::module_range_named("libc.so", ranges[count])) ++count;
  g_unwinder.set_skipped_ranges(ranges, count);
  // Before the first capture: libunwind opens its pipe as it initializes.
  reporter::module_range_named("libunwind.so", g_unwinder_range);
  // The sample region's classes: the table's, and one more that holds the
  // largest class's blocks after their header, so that a sampled request
  // shows its class's usable size up to the largest class (unless the
  // table is full: then the largest pooled requests show a little less).
  size_t sizes[recycler::kMaxClasses];
  unsigned listed = 0;
  for (unsigned c = 0; c + 1 < g_classes.count(); ++c) sizes[listed++] = g_classes.class_size(c);
  sizes[listed++] = g_classes.max_class_size() + kHeader;
  if (!g_sample_classes.build_from_list(sizes, listed)) g_sample_classes = g_classes;
  if (!g_stack_depot.init(g_depth) || !g_sample_region.init(g_sample_classes, sample_region_bytes())) {
    write_warning("hotpool: no memory for sampling; no allocation sites or lifetimes");
    return false;
  }
  init_stash_capacities();
  g_memo_depth = g_sites && !sampling_sparse() && !use_libunwind ? g_depth : 0;
  g_limit = g_sample_classes.max_class_size() - kHeader;
  if (g_limit > UINT32_MAX) g_limit = UINT32_MAX;  // SampleHeader::usable
  g_clock.init();
  g_aligned_key = process_key(0x2545f4914f6cdd1dull);
  // For the pending sample counts (PendingSamples) and the fork gate.
  reporter::init_asymmetric_fences();
  g_active = true;
  g_sampling_by_bytes = g_mean_bytes != 0;
  return true;
}

int real_pipe2(int fds[2], int flags) {
  static std::atomic<int (*)(int*, int)> next{nullptr};
  const auto missing = [](int*, int) { return errno = ENOSYS, -1; };
  return next_definition(next, "pipe2", +missing)(fds, flags);
}

bool called_from_unwinder(const void* return_address) {
  const auto address = reinterpret_cast<uintptr_t>(return_address);
  return address >= g_unwinder_range[0] && address < g_unwinder_range[1];
}

void move_to_high_descriptors(int fds[2]) {
  rlimit limit{};
  int floor = 1000;
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY && limit.rlim_cur > 64)
    floor = static_cast<int>(limit.rlim_cur) - 32;
  for (int i = 0; i < 2; ++i) {
    const int high = fcntl(fds[i], F_DUPFD_CLOEXEC, floor);
    if (high < 0) continue;  // keep the low one rather than none
    close(fds[i]);
    fds[i] = high;
  }
}

bool sampling_active() { return g_active; }
bool sampling_sites() { return g_sites; }
bool sampling_sparse() { return g_rate ? g_rate > 16 : g_mean_bytes > 4096; }
uint64_t sampling_rate() { return g_rate; }
uint64_t sampling_mean_bytes() { return g_mean_bytes; }
uint64_t sampling_short_ns() { return g_short_ns; }
uint64_t sampling_recycle_calls() { return g_recycle_calls; }
uint64_t sampling_unsited() { return g_unsited.value.load(std::memory_order_relaxed); }
void sampling_stack_counts(uint64_t* replayed, uint64_t* walked, uint64_t* recalled) {
  *replayed = *walked = *recalled = 0;
  // A state's counters go on when another thread takes it over: the sum
  // covers every thread that ever ran.
  g_registry.for_each_carved([&](ThreadState& state) {
    *replayed += __atomic_load_n(&state.trace_cache.replayed, __ATOMIC_RELAXED);
    *walked += __atomic_load_n(&state.trace_cache.walked, __ATOMIC_RELAXED);
    *recalled += __atomic_load_n(&state.stack_memo.recalled, __ATOMIC_RELAXED);
  });
}

namespace {
// Uniform in (0, 1): xorshift64*, seeded from the thread's ordinal (runs
// are repeatable).
double next_uniform(ThreadState& state) {
  if (state.sample_random == 0) state.sample_random = 0x9e3779b97f4a7c15ull * (state.ordinal + 1);
  uint64_t x = state.sample_random;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  state.sample_random = x;
  return (static_cast<double>((x * 0x2545f4914f6cdd1dull) >> 11) + 0.5) / 9007199254740992.0;
}

// By bytes: the bytes to the next sample, ceil of an exponential with mean
// g_mean_bytes (at least 1). Then P(interval > s) = e^(-s/mean) for every
// whole s, and memoryless: whatever went before, an allocation of s bytes
// ends it (and is sampled) with probability 1 - e^(-s/mean).
uint64_t next_byte_interval(ThreadState& state) {
  const double bytes = -reporter::natural_log(next_uniform(state)) * static_cast<double>(g_mean_bytes);
  if (!(bytes < 4e18)) return uint64_t{1} << 62;
  uint64_t whole = static_cast<uint64_t>(bytes);
  if (static_cast<double>(whole) < bytes) ++whole;
  return whole ? whole : 1;
}

// By bytes: true when this allocation of `size` bytes (0 counts as 1) is
// to be sampled, with its weight (the inverse of that probability).
HOTPOOL_NOINLINE bool bytes_due(ThreadState& state, size_t size, reporter::SampleWeight* weight) {
  const uint64_t bytes = sampled_bytes_of(size);
  if (state.bytes_left == 0) state.bytes_left = next_byte_interval(state);
  if (bytes < state.bytes_left) {
    state.bytes_left -= bytes;
    return false;
  }
  state.bytes_left = next_byte_interval(state);
  const double inverse =
      1.0 / reporter::one_minus_exp_neg(static_cast<double>(bytes) / static_cast<double>(g_mean_bytes));
  // Saturated: a mean of 2^46 bytes and more would overflow a 1-byte sample's weight.
  constexpr double kMost = 4e18;
  const double allocs = inverse * (uint64_t{1} << reporter::kWeightShift) + 0.5;
  const double bytes_weighted = inverse * static_cast<double>(size) + 0.5;
  weight->allocs = allocs < kMost ? static_cast<uint64_t>(allocs) : static_cast<uint64_t>(kMost);
  weight->bytes = bytes_weighted < kMost ? static_cast<uint64_t>(bytes_weighted) : static_cast<uint64_t>(kMost);
  return true;
}
}  // namespace

uint64_t next_sample_interval(ThreadState& state) {
  if (!g_active) return kNever;
  if (g_rate <= 1) return 1;  // every allocation, or by bytes
  // The geometric interval with mean g_rate: each allocation is sampled
  // with probability 1/g_rate, independently, so samples x g_rate
  // estimates counts without bias.
  return 1 + static_cast<uint64_t>(reporter::natural_log(next_uniform(state)) / g_log_keep);
}

namespace {

// A sample's stack and its site: recalled from the stack memo when it
// holds the same stack, else captured, named by the site memo and
// remembered. The memos are this thread's, and changed in steps: a signal
// handler's sample meanwhile (memo_busy) uses neither. 0 when the stack
// could not be captured or kept (stack->depth tells which).
HOTPOOL_ALWAYS_INLINE uint32_t sample_site(ThreadState& state, const reporter::Unwinder::Frame& entry,
                                           reporter::CapturedStack* stack) {
  uint32_t site;
  const bool own_memos = !state.memo_busy;
  if (HOTPOOL_LIKELY(own_memos)) {
    state.memo_busy = true;
    asm volatile("" ::: "memory");
  }
  reporter::StackMemo* const memo =
      own_memos && g_memo_depth && state.stack_probed && state.stack_memo.on() ? &state.stack_memo : nullptr;
  const int recalled = memo ? g_unwinder.recall(*memo, entry) : -1;
  if (recalled >= 0) {
    site = memo->entries[recalled].site;  // never 0
    stack->cfa = memo->entries[recalled].allocating_cfa;
    stack->depth = 0;  // (the frames are read only for a sample without a site)
  } else {
    capture_stack(stack, entry, memo);
    if (!stack->cfa) stack->cfa = find_frame_cfa(*stack, state, reinterpret_cast<uintptr_t>(stack + 1));
    if (HOTPOOL_LIKELY(own_memos)) {
      site = state.site_memo.site_of(g_stack_depot, stack->ips, stack->depth);
      if (site && stack->memo_entry >= 0) memo->name(stack->memo_entry, site);
    } else {
      site = g_stack_depot.insert(stack->ips, stack->depth);
    }
  }
  if (HOTPOOL_LIKELY(own_memos)) {
    asm volatile("" ::: "memory");
    state.memo_busy = false;
  }
  return site;
}

// sampled_allocate, and sampled_allocate_aligned with kAligned: a copy of
// its own each, so that malloc's samples do none of the alignment's work.
template <bool kAligned>
HOTPOOL_ALWAYS_INLINE void* allocate_sampled(ThreadState& state, size_t size, reporter::Unwinder::Frame entry,
                                             size_t alignment, size_t min_usable) {
  if (!g_active) return nullptr;
  // By bytes every allocation that by_bytes_skip did not take comes here:
  // sampled or not, and if so, what it stands for. Before the size limit:
  // a block too large to sample ends its interval as any other (the sample
  // is lost), else the next allocation would end a short remainder, far
  // more often than its weight says.
  reporter::SampleWeight weight;  // written and read by bytes only
  if (g_mean_bytes && !bytes_due(state, size, &weight)) return nullptr;
  // Aligned: the most the alignment moves the block into its region block,
  // and the least the block holds (at least a byte, so that even an
  // aligned malloc(0)'s block lies inside its region block).
  size_t lead = 0, least = size;
  if (kAligned) {
    if (alignment > kMaxSampledAlignment) return nullptr;
    lead = alignment > 16 ? alignment - 16 : 0;
    if (least < min_usable) least = min_usable;
    if (least == 0) least = 1;
  }
  if (least > g_limit || lead > g_limit - least) return nullptr;
  if (HOTPOOL_UNLIKELY(!state.stack_probed) && g_sites && tls.in_getattr == 0) {
    // The thread's stack bounds, at its first sample rather than when it
    // attaches: a thread that attaches in a signal handler or a thread-exit
    // destructor (its first allocator call a free) then does not look them
    // up there (for the main thread glibc reads /proc/self/maps). Not
    // inside the program's pthread_getattr_np, which holds the lock the
    // probe's own call would wait for: a later sample probes (this one
    // goes without the bounds, as on a stack they do not cover). Only the
    // captured stacks need them (HOTPOOL_SITES).
    ReentryGuard guard;
    state.stack_probed = true;
    find_thread_stack(state);
    if (g_memo_depth) state.stack_memo.reset(g_memo_depth);  // a former thread's entries out
  }
  // What the request would get unsampled (malloc(0) too gets usable bytes),
  // and room for it after the header.
  const unsigned request_class = g_classes.class_of(size);
  // (An aligned request is never pooled: the real allocator's memalign serves it.)
  const bool pooled = !kAligned && g_pool_limit && request_class + 1 < g_classes.count() &&
                      g_recycler.pooled(request_class);
  // Near the largest class (its own pooled requests, or glibc's reckoning
  // past it), what the region's largest block holds after the header.
  size_t usable = sibling_usable(least, pooled);
  if (usable > g_limit - lead) usable = g_limit - lead;  // least <= g_limit - lead (above)
  const unsigned region_class = g_sample_classes.class_of(usable + kHeader + lead);
  recycler::ClassDepot& depot = g_sample_region.depot(region_class);
  void* raw = nullptr;
  {
    ReentryGuard guard;  // the depot's lock: see pooled_malloc_refill
    SampleStash& stash = state.sample_stash[region_class];
    if (HOTPOOL_LIKELY(stash.count != 0)) {
      raw = stash.slots[stash.count - 1];
      asm volatile("" ::: "memory");
      --stash.count;
    } else {
      if (!depot.ready()) return nullptr;
      const unsigned capacity = stash_capacity(region_class);
      recycler::SpinLockGuard lock(depot.lock(), recycler::kNoCancellationPoint);
      if (capacity == 0) {
        // No stash (sparse samples): a block of the depot's (the stash's
        // count was only read: its page stays untouched).
        if (depot.refill_locked(&raw, 1, 0) == 0) return nullptr;
      } else {
        // Half the stash's room (at least one block), the stash's count
        // with the depot under its lock (a fork() then sees both or neither).
        stash.count = depot.refill_locked(stash.slots, capacity / 2 + 1, 0);
        if (stash.count == 0) return nullptr;
        raw = stash.slots[stash.count - 1];
        asm volatile("" ::: "memory");
        --stash.count;
      }
    }
  }
  reporter::CapturedStack stack;
  stack.cfa = 0;
  stack.depth = 0;
  const uint32_t site = g_sites ? sample_site(state, entry, &stack) : 0;
  const unsigned size_class = g_classes.class_of(usable);
  state.stats.record_alloc(g_global, size_class, size, usable);
  char* block = static_cast<char*>(raw) + kHeader;
  if (kAligned && lead) {
    const uintptr_t at = (reinterpret_cast<uintptr_t>(block) + alignment - 1) & ~(alignment - 1);
    if (at != reinterpret_cast<uintptr_t>(block)) {
      block = reinterpret_cast<char*>(at);
      *static_cast<uint64_t*>(raw) = g_aligned_key ^ at;  // see kMaxSampledAlignment
    }
  }
  auto* header = reinterpret_cast<SampleHeader*>(block - kHeader);
  header->site = site;
  header->thread = state.ordinal;
  header->usable = static_cast<uint32_t>(usable);  // below the largest class
  header->alloc_ns = now_ns();
  uint64_t mark = kLive;
  if (HOTPOOL_UNLIKELY(!site)) {
    g_unsited.value.fetch_add(1, std::memory_order_relaxed);
    if (stack.depth > 1) {  // the return address's low half, for the frame's test at the free
      header->site = static_cast<uint32_t>(stack.ips[1]);
      mark |= kNoSite;
    }
  }
  header->ops_state = (thread_ops(state) & kOpsMask) | mark;
  // The frame, where it lies on the thread's own stack within 4 GiB of its
  // top (a frame on a signal stack or a coroutine's is not known this way).
  const uintptr_t below_top = state.stack_high - stack.cfa;
  header->frame_below_top = stack.cfa > state.stack_low && stack.cfa < state.stack_high && below_top <= UINT32_MAX
                                ? static_cast<uint32_t>(below_top)
                                : 0;
  if (site) {
    // By bytes, with what the sample stands for (by count: the rate, known to the report).
    if (HOTPOOL_LIKELY(state.pending.begin())) {
      if (HOTPOOL_LIKELY(!g_mean_bytes)) state.pending.add_alloc(site, size);
      else state.pending.add_weighted_alloc(site, size, weight);
      state.pending.end();
    } else {  // a report is merging this thread's counts, or this is a signal handler's sample
      g_stack_depot.site(site).add_allocs(1, size, size, size, g_mean_bytes ? weight : reporter::SampleWeight{});
    }
  }
  return block;
}

}  // namespace

void* sampled_allocate(ThreadState& state, size_t size, reporter::Unwinder::Frame entry) {
  return allocate_sampled<false>(state, size, entry, 0, 0);
}

void* sampled_allocate_aligned(ThreadState& state, size_t size, reporter::Unwinder::Frame entry, size_t alignment,
                               size_t min_usable) {
  return allocate_sampled<true>(state, size, entry, alignment, min_usable);
}

namespace {

// The region block of a sampled block whose header does not start one: an
// aligned block's (see kMaxSampledAlignment), else the free aborts.
HOTPOOL_NOINLINE char* aligned_region_block(const recycler::ClassDepot& depot, void* block) {
  char* start = depot.block_start_of(block);
  const auto address = reinterpret_cast<uintptr_t>(block);
  if (start && static_cast<size_t>(static_cast<char*>(block) - start) >= kHeader + 16 && address % 32 == 0 &&
      *reinterpret_cast<const uint64_t*>(start) == (g_aligned_key ^ address))
    return start;
  const char* why = depot.check_block(static_cast<char*>(block) - kHeader);
  recycler::fatal_pointer_error(why ? why : "free() of a pointer into the middle of a pooled block (interior or misaligned)",
                                block);
}

// A sampled block's block of the sample region: where it starts, and its class.
struct RegionBlock {
  char* start;
  unsigned region_class;
};

// The start of an aligned block's region block, for a block accepted before
// (aligned_region_block): a division.
HOTPOOL_NOINLINE char* aligned_block_start(const recycler::ClassDepot& depot, void* block) {
  char* start = depot.block_start_of(block);
  return start ? start : static_cast<char*>(block) - kHeader;
}

// The region block of a sampled block. kChecked: a free's, which aborts
// unless the block is one (aligned_region_block); else a block that such a
// free accepted (or any pointer into the region, for malloc_usable_size:
// then within it).
template <bool kChecked = false>
HOTPOOL_ALWAYS_INLINE RegionBlock region_block_of(void* block) {
  char* raw = static_cast<char*>(block) - kHeader;
  const unsigned region_class = g_sample_region.class_of_block(block);
  const recycler::ClassDepot& depot = g_sample_region.depot(region_class);
  if (HOTPOOL_LIKELY(depot.is_block_start(raw))) return {raw, region_class};
  return {kChecked ? aligned_region_block(depot, block) : aligned_block_start(depot, block), region_class};
}

// The usable size it shows: never past the block's room, whatever a write
// before the block left in its header.
size_t usable_in(const void* block, RegionBlock region_block) {
  const auto* header = reinterpret_cast<const SampleHeader*>(static_cast<const char*>(block) - kHeader);
  const size_t offset = static_cast<size_t>(static_cast<const char*>(block) - region_block.start);
  const size_t size = g_sample_classes.class_size(region_block.region_class);
  const size_t room = size > offset ? size - offset : 0;
  return header->usable < room ? header->usable : room;
}

// The free of a sampled block, in two steps: the bookkeeping (lifetime,
// escape class, counts), then giving the memory back (release_sampled).
// realloc does the first before it allocates the new block (a realloc is a
// free, then an allocation, as heaptrack counts it too) and the second
// after the copy. The first returns the region block it checked, for the second.
RegionBlock record_sampled_free(void* block) {
  const RegionBlock region_block = region_block_of</*kChecked=*/true>(block);  // or abort
  auto* header = reinterpret_cast<SampleHeader*>(static_cast<char*>(block) - kHeader);
  if ((header->ops_state & kMarkMask) != kLive) recycler::fatal_pointer_error("double free of a sampled block", block);
  header->ops_state = (header->ops_state & ~kMarkMask) | kFreed;
  const uint32_t site = header_site(*header);
  const uint64_t now = now_ns();
  ThreadState* state = tls.state;
  // The allocating thread's free, also after hotpool let it go (its last
  // key destructors): then without its calls or its stack, so neither
  // temporary, recycled nor frame-local can be told (same_thread is false).
  const bool own_block = header->thread == (state ? state->ordinal : tls.ordinal);
  const bool same_thread = state && own_block;
  const uint64_t ops = state ? thread_ops(*state) : 0;
  // Frame-local: the allocating function is still active, i.e. its callers
  // (the site's stack beyond its first frame) are the outer end of ours.
  bool frame_local = false;
  const int active = same_thread ? frame_still_active(*state, *header) : 0;
  if (active >= 0) {
    frame_local = active;
  } else if (same_thread && site) {
    const uintptr_t* allocation = nullptr;
    const unsigned depth = g_stack_depot.known_stack(site, &allocation);
    reporter::CapturedStack current;
    capture_stack(&current);
    frame_local = reporter::allocating_frame_active(allocation, depth, current);
  }
  const reporter::Escape escape = !own_block ? reporter::Escape::CrossThread
                                  : frame_local ? reporter::Escape::FrameLocal
                                                : reporter::Escape::ThreadLocal;
  const uint64_t lifetime = now - header->alloc_ns;
  const bool is_short = lifetime <= g_short_ns;
  const uint64_t calls = same_thread ? (ops - header->ops_state) & kOpsMask : 0;
  const bool temporary = same_thread && calls == 0;
  const bool recycled = same_thread && calls <= g_recycle_calls;
  const size_t usable = usable_in(block, region_block);
  const unsigned size_class = g_classes.class_of(usable);
  if (HOTPOOL_LIKELY(state != nullptr) && HOTPOOL_LIKELY(state->pending.begin())) {
    state->pending.add_free(site, size_class, lifetime, is_short, recycled, temporary, escape, calls);
    state->pending.end();
  } else {
    if (site) g_stack_depot.site(site).lifetimes.add(lifetime, is_short, recycled, temporary, escape, calls);
    g_class_lifetimes[size_class].add(lifetime, is_short, recycled, temporary, escape, calls);
  }
  if (state) {
    state->stats.record_free(g_global, size_class, usable);
    count_call(*state);
  } else {
    g_registry.record_in_fallback(
        [&](reporter::ThreadClassStats& stats) { stats.record_free(g_global, size_class, usable); });
  }
  return region_block;
}

}  // namespace

size_t sampled_usable_size(const void* block) {
  return usable_in(block, region_block_of(const_cast<void*>(block)));
}

void sampled_free_record(void* block) { record_sampled_free(block); }

void sampled_release_to_depot(void* block) {
  const RegionBlock region_block = region_block_of(block);
  void* raw = region_block.start;
  g_sample_region.depot(region_block.region_class).drain(&raw, 1, now_ns());
}

namespace {

// The second step, given the block's region block.
void release_sampled(void* block, RegionBlock region_block) {
  void* raw = region_block.start;
  const unsigned region_class = region_block.region_class;
  // Into this thread's stash when its slot is free, unless this free runs
  // inside another hotpool call (a signal handler's): that call may be
  // changing the stash, or hold the depot's lock. The block then waits
  // until the thread is out (free_deferred), as a pooled block does.
  const bool nested = tls.in_hotpool;
  ReentryGuard guard;
  ThreadState* state = tls.state;
  if (!state) {
    // A thread without a state: the depot's lock with signals blocked
    // (see recycler::SignalsBlocked).
    const recycler::SignalsBlocked blocked;
    return sampled_release_to_depot(block);
  }
  if (nested) return defer_free(*state, block);
  SampleStash& stash = state->sample_stash[region_class];
  const unsigned capacity = stash_capacity(region_class);
  if (stash.count >= capacity) {
    recycler::ClassDepot& depot = g_sample_region.depot(region_class);
    recycler::SpinLockGuard lock(depot.lock(), recycler::kNoCancellationPoint);
    // No stash (sparse samples): straight back to the depot.
    if (capacity == 0) return depot.drain_locked(&raw, 1, now_ns());
    // Full: the older blocks back to the depot, with the count (as a refill).
    const unsigned keep = capacity / 2;
    depot.drain_locked(stash.slots, stash.count - keep, now_ns());
    for (unsigned i = 0; i < keep; ++i) stash.slots[i] = stash.slots[stash.count - keep + i];
    stash.count = keep;
  }
  stash.slots[stash.count] = raw;
  asm volatile("" ::: "memory");
  ++stash.count;
}

}  // namespace

void sampled_free_release(void* block) { release_sampled(block, region_block_of(block)); }

void forget_unwound_frames() {
  if (g_active && g_sites) g_unwinder.forget_frames();
}

void flush_sample_stash(ThreadState& state, bool after_fork) {
  for (unsigned c = 0; c < reporter::kMaxClasses; ++c) {
    SampleStash& stash = state.sample_stash[c];
    if (stash.count == 0) continue;
    const unsigned count = stash.count < SampleStash::kSlots ? stash.count : SampleStash::kSlots;
    recycler::ClassDepot& depot = g_sample_region.depot(c);
    // In a fork child, a depot the forking thread held before the fork is
    // the interrupted code's: the blocks are left out (lost to the child).
    if (!(after_fork && depot.lock().held_before_this_fork())) depot.drain(stash.slots, count, now_ns());
    stash.count = 0;
  }
}

void sampled_free(void* block) { release_sampled(block, record_sampled_free(block)); }

void sampled_revive(void* block) {
  auto* header = reinterpret_cast<SampleHeader*>(static_cast<char*>(block) - kHeader);
  header->ops_state = (header->ops_state & ~kMarkMask) | kLive;
}

void sampled_restamp(void* block) {
  auto* header = reinterpret_cast<SampleHeader*>(static_cast<char*>(block) - kHeader);
  if (ThreadState* state = tls.state) header->ops_state = (thread_ops(*state) & kOpsMask) | (header->ops_state & kStateMask);
}

void begin_fork_samples() {
  // No thread inside libunwind during the fork (but this one, if a signal
  // handler that forks interrupted its own capture). Waited for before any
  // lock is taken: a capturing thread whose signal handler forks must get
  // the locks to finish.
  g_fork_pending.fetch_add(1, std::memory_order_seq_cst);
  const int own = static_cast<int>(tls_counted);
  for (unsigned spins = 0; g_unwinding.load(std::memory_order_seq_cst) > own; ++spins) {
    if (spins < 64) __builtin_ia32_pause(); else sched_yield();
  }
  if (!reporter::asymmetric_fences()) return;
  // Every thread's own count (this thread's own is its interrupted capture's,
  // if any: not waited for). The heavy fence pairs with the light one in
  // capture_stack: after it, a thread either shows its count here or sees
  // the pending fork there. Should the kernel refuse it, a full fence here
  // leaves a capture starting at this very moment unseen: the wait below
  // still catches every capture already counted.
  if (!reporter::heavy_fence()) std::atomic_thread_fence(std::memory_order_seq_cst);
  const ThreadState* self = tls.state;
  g_registry.for_each_carved([self](ThreadState& state) {
    if (&state == self) return;
    for (unsigned spins = 0; state.unwinding.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < 64) __builtin_ia32_pause(); else sched_yield();
    }
  });
}
bool try_lock_samples() {
  for (unsigned c = 0; c < g_sample_region.class_count(); ++c) {
    if (!g_sample_region.depot(c).lock().try_lock_for_fork()) return false;
  }
  return true;
}
void unlock_samples() {
  for (unsigned c = g_sample_region.class_count(); c-- > 0;) g_sample_region.depot(c).lock().unlock_after_fork_parent();
}
void end_fork_samples() {
  // A count, not a flag: other threads' fork() calls may be pending too,
  // and so may an outer fork() of this thread that this one's signal
  // handler interrupted.
  decrement_to_zero(g_fork_pending);
}
void reset_sample_locks() {
  // The other threads' counts: they do not exist here (one may have been
  // counted, past the gate, when the fork came). This thread's own stays:
  // an interrupted capture of its own uncounts itself.
  const ThreadState* self = tls.state;
  g_registry.for_each_carved([self](ThreadState& state) {
    if (&state != self) state.unwinding.store(0, std::memory_order_relaxed);
  });
  // membarrier's registration belongs to the parent's address space.
  if (g_active) reporter::init_asymmetric_fences();
  // Only this thread is left, and no capture or fork() of it needs
  // waiting for here: a capture or an outer fork() that its handler
  // interrupted goes on and uncounts itself (decrement_to_zero).
  g_unwinding.store(0, std::memory_order_seq_cst);
  g_fork_pending.store(0, std::memory_order_seq_cst);
  for (unsigned c = 0; c < g_sample_region.class_count(); ++c) g_sample_region.depot(c).lock().reset_after_fork();
}

}  // namespace hotpool::shim
