#include "runtime.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <sys/auxv.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cstring>

#include "reporter/output.h"
#include "reporter/pages.h"
#include "reporter/report.h"
#include "reporter/symbolize.h"
#include "symbolizer_loader.h"
#include "sampler.h"

extern char** environ;
extern char* program_invocation_name;

namespace hotpool::shim {

constinit std::atomic<Phase> g_phase{Phase::Booting};
constinit RealAllocator g_real{};
constinit recycler::SizeClassTable g_classes{};
constinit reporter::GlobalClassStats g_global{};
constinit ThreadRegistry g_registry{};
constinit recycler::Recycler g_recycler{};
constinit size_t g_pool_limit = 0;
constinit PoolGate g_pool_gate = {0, 0, ~size_t{0}};  // closed, and malloc's every request to the phase test

static void pooled_free_uncached(void* block);

namespace {

constinit std::atomic<bool> g_boot_started{false};
constinit Options g_options{};
constinit bool g_secure = false;         // AT_SECURE: setuid and friends
constinit pthread_key_t g_thread_key{};
constinit uint64_t g_start_ns = 0;
constinit int g_forked_from = 0;
constinit int g_pid_before_fork = 0;
constinit SpinLock g_report_lock{};
constinit reporter::StatsSnapshot g_snapshot{};  // only under g_report_lock
constinit recycler::AutoPolicy g_policy{};
constinit const char* g_pool_note = nullptr;     // why nothing pools, for the report

constexpr uint64_t kFirstPolicyWindow = 4096;    // allocations; doubles up to:
constexpr uint64_t kLongestPolicyWindow = 65536;
// ... or ends, at a tick, once it has lasted this long: a class allocated
// slowly (blocks of 64 KiB and more, each an mmap and a munmap in glibc,
// a few microseconds apiece) would otherwise wait up to two windows of
// 65536 allocations, seconds, before it pools. Such a window can only heat
// classes up (AutoPolicy::evaluate, cut_short).
constexpr uint64_t kLongestPolicyWindowNs = 50000000;

uint64_t monotonic_ns() {
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);  // vDSO: no syscall
  return static_cast<uint64_t>(now.tv_sec) * 1000000000u + static_cast<uint64_t>(now.tv_nsec);
}

void write_stderr_line(const char* line, void* = nullptr) {
  reporter::Output out(STDERR_FILENO);
  out.str(line).ch('\n');
}

// The state of this thread while on_thread_exit hands it back (tls.state
// is null by then): a fork() from a signal handler that interrupted that
// must not take it for a state of a thread that is gone (see
// after_fork_child).
__thread ThreadState* tls_exiting_state __attribute__((tls_model("initial-exec")));

// What a thread leaves: its cached blocks back to the depots, its pending
// sample counts and its counts into the shared ones, its state to the
// registry. The thread's own exit, or (claimed by another thread, see
// ThreadRegistry::claim_dead) a thread that is gone.
void release_state(ThreadState& state, const ReentryGuard& guard) {
  // Frees a signal handler deferred and no slow path took since (under
  // this guard free_deferred would do nothing): straight to the depots, as
  // the frees of a thread without a state.
  while (state.deferred_count) {
    void* block = state.deferred_frees[--state.deferred_count];
    if (is_sampled(block)) sampled_release_to_depot(block);
    else pooled_free_uncached(block);
  }
  if (g_recycler.ready()) g_recycler.flush(state.cache);
  flush_sample_stash(state, false);
  state.pending.flush();
  g_registry.retire(&state, g_global, guard);
}

void on_thread_exit(void* arg) {
  auto* state = static_cast<ThreadState*>(arg);
  ReentryGuard guard;
  // Other keys' destructors may still allocate after ours: stay attached
  // until glibc's last destructor round, as scudo's TSD does.
  if (++state->destructor_rounds < PTHREAD_DESTRUCTOR_ITERATIONS) {
    pthread_setspecific(g_thread_key, state);
    return;
  }
  // From here on the thread has no state: a signal handler's free of a
  // pooled block would go straight to a depot whose lock the hand-back
  // below may hold (see recycler::SignalsBlocked). Two system calls per
  // thread exit.
  const recycler::SignalsBlocked blocked;
  tls_exiting_state = state;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  tls.state = nullptr;
  tls.pool_state = nullptr;
  tls.status = ThreadStatus::TornDown;
  release_state(*state, guard);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  tls_exiting_state = nullptr;
}

void flush_dead_thread_cache(ThreadState& state) {
  flush_sample_stash(state, true);
  // The thread may have been inside its pending counts: they stay as they
  // were (perhaps one event short), and go to the shared ones now.
  state.pending.reset_after_fork();
  state.pending.flush();
  if (g_recycler.ready()) g_recycler.flush_after_fork(state.cache);
}

// Every hotpool lock across fork(), but those this thread holds already: a
// fork() from a signal handler may have interrupted it in a slow path (or
// in another fork()); see SpinLock::try_lock_for_fork. All or none: when a
// lock stays busy, what this prepare took goes back and it starts again
// (another thread's fork() may hold the others and wait for the one this
// thread holds).
bool lock_everything_for_fork() {
  return g_report_lock.try_lock_for_fork() && g_registry.try_lock_for_fork() && g_recycler.try_lock_all() &&
         try_lock_samples();
}

// What this fork's prepare took, and only that (locks held before it stay).
void unlock_everything_after_fork() {
  unlock_samples();
  g_recycler.unlock_all();
  g_registry.unlock_after_fork_parent();
  g_report_lock.unlock_after_fork_parent();
}

void before_fork() {
  ++recycler::tls_fork_depth;
  g_pid_before_fork = static_cast<int>(getpid());
  begin_fork_samples();
  while (!lock_everything_for_fork()) {
    unlock_everything_after_fork();
    sched_yield();
  }
}

void after_fork_parent() {
  unlock_everything_after_fork();
  end_fork_samples();
  --recycler::tls_fork_depth;
}

void after_fork_child() {
  g_forked_from = g_pid_before_fork;
  g_recycler.reset_locks_after_fork();
  reset_sample_locks();
  // The other threads do not exist here: their cached blocks go back to
  // the depots, their counts to the retired sums. This thread's state is
  // its own even while it exits (the handler that forked interrupted
  // on_thread_exit, which goes on in the child).
  ThreadState* survivor = tls.state ? tls.state : tls_exiting_state;
  if (survivor) {  // the child's own ids
    survivor->tgid = static_cast<int32_t>(getpid());
    survivor->tid = static_cast<int32_t>(syscall(SYS_gettid));
  }
  g_registry.reset_after_fork_child(survivor, g_global, flush_dead_thread_cache);
  g_report_lock.reset_after_fork();
  --recycler::tls_fork_depth;
}

// Address space is what a program with RLIMIT_AS runs out of first: take
// at most an eighth of its limit for each region, so that it keeps the rest.
size_t region_bytes() {
  size_t region = g_options.region;
  rlimit address_space{};
  if (getrlimit(RLIMIT_AS, &address_space) == 0 && address_space.rlim_cur != RLIM_INFINITY &&
      region > address_space.rlim_cur / 8) {
    region = address_space.rlim_cur / 8;
  }
  return region;
}

// True when HOTPOOL_CLASSES gave the class table (mode fixed pools exactly those).
static bool g_explicit_classes = false;

// Modes fixed and auto: reserve the region and decide what pools first.
void start_recycler() {
  const recycler::RecyclerConfig config{region_bytes(),      g_options.cache_bytes, g_options.decay,
                                        g_options.keep_empty, g_options.checks,      g_options.cache_grow};
  if (!g_recycler.init(g_classes, config, process_key(0x9e3779b97f4a7c15ull))) {
    g_pool_note = "the pool region could not be reserved (see HOTPOOL_REGION): nothing was pooled";
    write_stderr_line("hotpool: the pool region could not be reserved (HOTPOOL_REGION); nothing will be pooled");
    return;
  }
  if (g_options.mode == Mode::Fixed) {
    if (g_options.classes.count == 0) {
      g_pool_note = "mode fixed without HOTPOOL_CLASSES: nothing was pooled";
      write_stderr_line("hotpool: mode fixed needs HOTPOOL_CLASSES (e.g. 48,64,1K); nothing will be pooled");
    } else if (!g_explicit_classes) {
      g_pool_note = "mode fixed: no size of HOTPOOL_CLASSES can be pooled: nothing was pooled";
    }
    for (unsigned c = 0; g_explicit_classes && c + 1 < g_classes.count(); ++c) g_recycler.set_pooled(c, true);
  }
  g_pool_limit = g_classes.max_class_size();
  // The auto policy counts blocks by their usable size: tell it which block
  // class the largest request of each class lands in with the real allocator.
  uint8_t block_class_of[reporter::kMaxClasses];
  const unsigned sized = g_classes.count() - 1;
  for (unsigned q = 0; q < sized; ++q) {
    block_class_of[q] = static_cast<uint8_t>(g_classes.class_of(real_usable_estimate(g_classes.class_size(q))));
  }
  g_policy.init(block_class_of, sized);
  g_policy.set_min_share(static_cast<double>(g_options.hot_share) / 1e6);
}

void print_help() {
  reporter::Output out(STDERR_FILENO);
  out.str("hotpool: options (environment variables):\n");
  for (unsigned i = 0; i < option_count(); ++i) {
    const OptionInfo& info = option_info(i);
    out.str("  ").str(info.name).str(" (").str(info.type).str(", default '").str(info.default_text)
        .str("')\n      ").str(info.description).ch('\n');
  }
}

void print_options() {
  reporter::Output out(STDERR_FILENO);
  char value[kMaxPath + 64];
  for (unsigned i = 0; i < option_count(); ++i) {
    format_option_value(g_options, i, value, sizeof(value));
    out.str("hotpool: ").str(option_info(i).name).ch('=').str(value).ch('\n');
  }
  out.str("hotpool: size classes:");
  for (unsigned c = 0; c + 1 < g_classes.count(); ++c) out.ch(' ').u64(g_classes.class_size(c));
  out.str(" (then 'large')\n");
}

void build_class_table() {
  const SizeList& list = g_options.classes;
  g_explicit_classes = list.count && g_classes.build_from_list(list.values, list.count);
  unsigned too_large = 0;
  for (unsigned i = 0; i < list.count; ++i) too_large += list.values[i] > recycler::kLargestClassLimit;
  if (too_large) {
    reporter::Output out(STDERR_FILENO);
    out.str("hotpool: HOTPOOL_CLASSES: ").u64(too_large).str(too_large == 1 ? " size" : " sizes")
        .str(" above 1 GiB (the largest class) ignored");
    if (!g_explicit_classes) out.str("; none left: the default table is used, and mode fixed pools nothing");
    out.ch('\n');
  }
  if (!g_explicit_classes) g_classes.build_default(g_options.max_class);
}

// Start-up at load time too, so that options are checked and a report is
// written even for a program that never calls malloc.
void boot_at_load() __attribute__((constructor));
void boot_at_load() {
  boot();
  // Sampling starts here, not in boot(): it dlopen()s libunwind, which is
  // safe from a constructor but not from whatever first called malloc.
  if (g_phase.load(std::memory_order_acquire) != Phase::Recording || (g_options.sample == 0 && g_options.sample_bytes == 0))
    return;
  ReentryGuard guard;
  if (start_sampling(guard) && tls.state) {
    // This thread attached before sampling began: its pending counts take
    // the protocol sampling set up (no other thread uses them yet).
    tls.state->pending.attach(&g_stack_depot, g_class_lifetimes, reporter::asymmetric_fences(), sampling_sparse());
    tls.state->sample_left = next_sample_interval(*tls.state);
    arm_countdown(*tls.state);
    tls.state->stack_probed = false;
  }
}

void exit_report() __attribute__((destructor));
void exit_report() {
  if (g_phase.load(std::memory_order_acquire) != Phase::Recording || !g_options.report) return;
  write_report("exit");
}

// The working directory at start-up, when HOTPOOL_OUTPUT is a relative name
// (empty otherwise, or if it did not fit): the report goes where the user
// started the program, though the program changed directory since (git,
// make -C, shells).
char g_start_dir[PATH_MAX];

void remember_start_dir() {
  g_start_dir[0] = '\0';
  if (g_options.output[0] == '\0' || g_options.output[0] == '/') return;
  if (!getcwd(g_start_dir, sizeof(g_start_dir)) || g_start_dir[0] != '/') g_start_dir[0] = '\0';  // a system call
}

// Expands %p (pid) and %% in the output name, after the start directory
// for a relative name (unless in_start_dir is false). False if it does not fit.
bool expand_output_name(const char* pattern, char* out, size_t size, bool in_start_dir = true) {
  size_t used = 0;
  auto put = [&](char c) { if (used + 1 < size) out[used++] = c; else used = size; };
  if (in_start_dir && pattern[0] != '/' && g_start_dir[0]) {
    for (const char* d = g_start_dir; *d; ++d) put(*d);
    if (used && out[used - 1] != '/') put('/');
  }
  for (const char* p = pattern; *p && used < size; ++p) {
    if (p[0] == '%' && p[1] == 'p') {
      char digits[16];
      int n = 0;
      for (unsigned pid = static_cast<unsigned>(getpid()); pid; pid /= 10) digits[n++] = static_cast<char>('0' + pid % 10);
      while (n) put(digits[--n]);
      ++p;
    } else if (p[0] == '%' && p[1] == '%') {
      put('%');
      ++p;
    } else {
      put(*p);
    }
  }
  if (used >= size) return false;
  out[used] = '\0';
  return true;
}

bool ends_with(const char* text, const char* suffix) {
  const size_t n = std::strlen(text), m = std::strlen(suffix);
  return n >= m && std::strcmp(text + n - m, suffix) == 0;
}

}  // namespace

void boot() {
  if (g_boot_started.exchange(true, std::memory_order_acq_rel)) return;
  ReentryGuard guard;
  const int saved_errno = errno;
  RealAllocator real{};
  const bool complete = real.resolve();
  if (!complete) {
    // Nothing to forward to: stay a pass-through to whatever was found, and
    // say so. Without malloc/free there is no program to run anyway.
    write_stderr_line("hotpool: the next allocator lacks part of the malloc API; hotpool is disabled");
  }
  g_real = real;  // before parsing options: they may not allocate, but be safe

  g_secure = getauxval(AT_SECURE) != 0;
  parse_options(environ, &g_options, write_stderr_line, nullptr);
  remember_start_dir();
  // Mode off never reads a block's size: it must not touch the heap at all.
  if (complete && g_options.mode != Mode::Off) {
    real.glibc_chunk_headers = real.probe_chunk_headers();
    real.probe_realloc_zero();
  }
  g_real = real;
  build_class_table();
  uint64_t sizes[reporter::kMaxClasses];
  for (unsigned c = 0; c < g_classes.count(); ++c) sizes[c] = g_classes.class_size(c);
  g_registry.init(g_classes.count(), sizes, guard);
  g_start_ns = monotonic_ns();
  if (g_options.mode == Mode::Fixed || g_options.mode == Mode::Auto) start_recycler();
  if (g_options.help) print_help();
  if (g_options.verbose) print_options();

  Phase phase = Phase::Off;
  if (complete && g_options.mode != Mode::Off &&
      pthread_key_create(&g_thread_key, on_thread_exit) == 0 &&
      pthread_atfork(before_fork, after_fork_parent, after_fork_child) == 0) {
    phase = Phase::Recording;
  }
  if (phase == Phase::Recording && g_pool_limit) {
    // Open the pooled entry paths (they test no phase: only Recording pools).
    const size_t direct = g_pool_limit < recycler::kDirectLookupLimit ? g_pool_limit : recycler::kDirectLookupLimit;
    g_pool_gate.large_first = direct + 1;
    g_pool_gate.large_span = g_pool_limit - direct;
    g_pool_gate.direct_end = direct + 1;
  } else if (phase == Phase::Recording) {
    // No pools: malloc goes straight to recording (a request that reads
    // the gate before the phase finds the phase test in recorded_malloc's
    // unattached path: no thread is attached before Recording).
    g_pool_gate.large_span = 0;
  }
  errno = saved_errno;
  g_phase.store(phase, std::memory_order_release);
}

void* allocate_while_booting(size_t size, size_t alignment, bool zero) {
  if (g_real.malloc) {
    void* block = alignment <= 16 ? g_real.malloc(size) : g_real.memalign(alignment, size);
    if (block && zero) std::memset(block, 0, size);
    return block;
  }
  void* block = bootstrap::allocate(size, alignment);  // zero: never reused
  if (!block) errno = ENOMEM;
  return block;
}

// The classes whose per-thread counters, bin and sample counts a new
// thread's state has touched for writing at attach: those up to 1 KiB in
// the default table, where most programs' allocations are.
constexpr unsigned kTouchedClasses = 32;

// The parts of a thread's state its first allocations use, touched for
// writing before they read them (reporter/pages.h): a bin's count, a
// pending entry's key and a class's counters are read first, and in fresh
// memory each such page then cost a copy and a TLB flush of every CPU the
// process ran on. With 100 threads starting at once (bench/workloads/
// thread_crowd.cpp), the TLB flushes went from 2,783 to 150 in mode auto
// and from 1,020 to 150 in mode profile (glibc alone: 169), and mode
// auto's CPU time from 1.44 to 1.15 times glibc's, for 7 KiB more peak RSS
// per thread. A state taken over from an exited thread has most of these
// pages already: touching them again is a few locked stores.
static void touch_state_for_write(ThreadState& state, bool auto_mode) {
  using reporter::touch_pages_for_write;
  // The first kTouchedClasses elements of an array indexed by class.
  const auto touch_classes = [](const auto* per_class) {
    touch_pages_for_write(per_class, kTouchedClasses * sizeof(*per_class));
  };
  const reporter::ThreadClassStats& stats = state.stats;
  touch_pages_for_write(&stats, reinterpret_cast<const char*>(&stats.classes[kTouchedClasses]) -
                                    reinterpret_cast<const char*>(&stats));
  if (g_pool_limit) {
    touch_classes(state.cache.bins);
    touch_classes(state.cache.counters);
    touch_classes(stats.pooled_frees);
    touch_classes(stats.pooled_folded);
    touch_classes(stats.pooled_allocs_folded);
  }
  if (auto_mode) {
    touch_classes(state.policy_allocs);
    touch_classes(state.policy_frees);
  }
  if (sampling_active()) {
    state.pending.touch_for_write(kTouchedClasses, sampling_sparse());
    touch_pages_for_write(&state.site_memo, sizeof(state.site_memo));
    if (!sampling_sparse()) touch_classes(state.sample_stash);  // a sparse rate's stashes are only read
  }
}

// The thread's first recorded call: a ThreadState of its own.
static ThreadState* attach_thread(const ReentryGuard& guard) {
  ThreadState* state = g_registry.acquire(guard);
  if (!state) return nullptr;
  const bool auto_mode = g_options.mode == Mode::Auto && g_pool_limit != 0;
  touch_state_for_write(*state, auto_mode);
  state->sample_random = 0;
  state->deferred_count = 0;
  state->stack_low = state->stack_high = 0;
  state->trace_cache.count = 0;
  state->trace_cache.stack_low = state->trace_cache.stack_high = 0;
  for (SampleStash& stash : state->sample_stash)
    if (stash.count) stash.count = 0;  // emptied when the state was given back (written only if not: see reporter::clear)
  state->pending.attach(&g_stack_depot, g_class_lifetimes, reporter::asymmetric_fences(), sampling_sparse());
  state->memo_busy = false;  // the memo's sites stay valid: a stack's site is the same in every thread
  state->stack_probed = false;  // looked for at the first sample
  state->countdown = state->window = state->alloc_base = 0;
  state->sample_left = next_sample_interval(*state);
  state->tick_left = kTickAllocs;
  arm_countdown(*state);
  state->policy_window = kFirstPolicyWindow;
  state->policy_countdown = auto_mode ? kFirstPolicyWindow : kNever;
  state->policy_started_ns = auto_mode ? lifetime_clock_ns() : 0;
  tls.state = state;
  tls.status = ThreadStatus::Attached;
  tls.ordinal = state->ordinal;
  pthread_setspecific(g_thread_key, state);
  // A thread that attached in glibc's last round of key destructors never
  // retires itself: new threads retire such states once their thread is
  // gone (a system call or two, once per thread).
  ThreadState* dead[ThreadRegistry::kReapChecks];
  const unsigned claimed = g_registry.claim_dead(state, dead, guard);
  for (unsigned i = 0; i < claimed; ++i) release_state(*dead[i], guard);
  return state;  // pool_state follows when the guard is released
}

void evaluate_policy(ThreadState& state, bool cut_short) {
  uint64_t allocs[reporter::kMaxClasses], frees[reporter::kMaxClasses];
  const unsigned classes = g_classes.count() - 1;  // the large class never pools
  for (unsigned c = 0; c < classes; ++c) {
    const reporter::ClassCounters& row = state.stats.classes[c];
    const uint64_t now_allocs = row.allocs.load(std::memory_order_relaxed) + state.stats.pooled_allocs(c);
    const uint64_t now_frees = row.frees.load(std::memory_order_relaxed) + pooled_frees_of(state, c);
    allocs[c] = now_allocs - state.policy_allocs[c];
    frees[c] = now_frees - state.policy_frees[c];
    state.policy_allocs[c] = now_allocs;
    state.policy_frees[c] = now_frees;
  }
  // How short-lived is each class? The sampled lifetimes say when enough
  // of its blocks were sampled: the share of them short-lived (HOTPOOL_SHORT)
  // or recycled (freed by their thread within HOTPOOL_RECYCLE of its calls:
  // a block that lives milliseconds in a program allocating millions a
  // second comes back to the cache as surely as one living microseconds).
  // Otherwise the policy looks at this thread's frees, unless the blocks
  // leave this thread (a producer frees nothing): then the class's live
  // bytes across all threads staying below a quarter of what this window
  // allocated says its blocks come back.
  // This thread's own sampled lifetimes first (other threads merge theirs
  // every PendingSamples::kFlushEvents samples, and at their policy turns).
  // A sampled block counts, lifetime included, in the class of the usable
  // size its request would get unsampled (sibling_usable): where the counts
  // of its unsampled siblings are.
  state.pending.try_flush();
  using recycler::AutoPolicy;
  uint64_t sampled_frees[reporter::kMaxClasses] = {}, worthy[reporter::kMaxClasses] = {};
  for (unsigned c = 0; c < classes; ++c) {
    const reporter::LifetimeStats& life = g_class_lifetimes[c];
    sampled_frees[c] = life.frees.load(std::memory_order_relaxed);
    if (sampled_frees[c]) worthy[c] = reporter::pool_worthy(life);
  }
  int16_t share[reporter::kMaxClasses];
  for (unsigned c = 0; c < classes; ++c) {
    if (sampled_frees[c] >= AutoPolicy::kMinSamples) {
      share[c] = static_cast<int16_t>(worthy[c] * AutoPolicy::kShareOne / sampled_frees[c]);
    } else if (frees[c] * 4 < allocs[c] * 3 && allocs[c]) {
      const int64_t live = g_global.live[c].load(std::memory_order_relaxed) + state.stats.classes[c].live_delta;
      const uint64_t window_bytes = allocs[c] * g_classes.class_size(c);
      share[c] = live >= 0 && static_cast<uint64_t>(live) * 4 < window_bytes ? AutoPolicy::kShareOne
                                                                               : AutoPolicy::kShareUnknown;
    } else {
      share[c] = AutoPolicy::kShareUnknown;
    }
  }
  g_policy.evaluate(allocs, frees, classes, g_recycler, share, cut_short);
  if (state.policy_window < kLongestPolicyWindow) state.policy_window *= 2;
  state.policy_countdown = state.policy_window;
  state.policy_started_ns = lifetime_clock_ns();
}

// The slow parts of pooled_free, each entered by a tail call.
static HOTPOOL_NOINLINE void pooled_free_uncached(void* block) {
  // Not attached yet, or torn down: straight to the depot, counted in the
  // shared block. Both locks with signals blocked: a handler's free of a
  // pooled block on this thread would come here too (no recursion guard
  // sends it around: the thread has no state to defer it to).
  const recycler::SignalsBlocked blocked;
  const unsigned size_class = g_recycler.class_of_block(block);
  g_recycler.deallocate_uncached(block);
  g_registry.record_in_fallback(
      [&](reporter::ThreadClassStats& stats) {
        stats.record_pooled_free(g_global, size_class, g_recycler.class_size(size_class));
      },
      /*signals_blocked=*/true);
}

static HOTPOOL_NOINLINE void pooled_free_full_bin(ThreadState* state, unsigned size_class, void* block) {
  {
    ReentryGuard guard;  // a depot lock is held in there (see pooled_malloc_refill)
    g_recycler.drain_and_push(state->cache, size_class, block);
    note_pooled(*state, size_class);
  }
  free_deferred(*state);
}

HOTPOOL_NOINLINE void defer_free(ThreadState& state, void* block) {
  // The slot before the count (as the thread cache's push): a handler that
  // interrupts this one, or a fork() child, never sees a stale slot counted.
  const unsigned count = state.deferred_count;
  if (count >= ThreadState::kDeferredFrees) return;
  state.deferred_frees[count] = block;
  asm volatile("" ::: "memory");
  state.deferred_count = count + 1;
}

void free_deferred(ThreadState& state) {
  // Only with the pool open: pooled_free would defer the block again.
  ThreadLocal& local = tls;
  while (state.deferred_count && local.pool_state == &state) {
    // Taken with the pool closed, as the fast paths' pop: a signal handler
    // that came in between and went through a slow path would free the
    // same entry (free_deferred there too). The count is read again once
    // the pool is closed (a handler between the loop's test and here may
    // have emptied the list), and lowered after its slot is read (a
    // handler's defer_free in between then costs one lost block, never a
    // block freed twice).
    local.pool_state = nullptr;
    asm volatile("" ::: "memory");
    const unsigned count = state.deferred_count;
    if (count == 0) {
      local.pool_state = &state;
      break;
    }
    void* block = state.deferred_frees[count - 1];
    asm volatile("" ::: "memory");
    state.deferred_count = count - 1;
    asm volatile("" ::: "memory");
    local.pool_state = &state;
    if (is_sampled(block)) sampled_free_release(block);  // its free was recorded when it came
    else pooled_free(block);
  }
}

static void tick_locked(ThreadState& state);

void tick(ThreadState& state) {
  {
    ReentryGuard guard;  // a signal handler's allocations meanwhile: the real allocator
    tick_locked(state);
  }
  if (HOTPOOL_UNLIKELY(state.deferred_count)) free_deferred(state);
}

void note_pooled(ThreadState& state, unsigned c) {
  reporter::ThreadClassStats& stats = state.stats;
  stats.set_pooled_frees(c, pooled_frees_of(state, c));
  stats.fold_packed_if_due(c);
  stats.fold_pooled(c, g_recycler.class_size(c));
  stats.publish_if_due(g_global, c);
}

uint64_t pooled_frees_of_sized_bins(const ThreadState& state) {
  // The classes whose bins this thread used (a pooled free or allocation
  // sizes its bin first; a realloc in place sizes it too): none in mode
  // profile, nor where every allocation is sampled.
  uint64_t frees = 0;
  recycler::for_each_sized_bin(state.cache, [&](unsigned c) { frees += pooled_frees_of(state, c); });
  return frees;
}

// The countdown's next window: to the nearer of the next sample and tick.
static void restart_window(ThreadState& state) {
  state.window = state.sample_left < state.tick_left ? state.sample_left : state.tick_left;
  state.countdown = state.window;
}

unsigned take_event(ThreadState& state) {
  // The allocation that brought the countdown to zero is the window's last.
  const uint64_t elapsed = state.window;
  state.alloc_base += elapsed;
  unsigned event = 0;
  if (state.sample_left != kNever && (state.sample_left -= elapsed) == 0) {
    event |= kSampleEvent;
    state.sample_left = next_sample_interval(state);
  }
  if ((state.tick_left -= elapsed) == 0) {
    event |= kTickEvent;
    state.tick_left = kTickAllocs;
  }
  restart_window(state);
  return event;
}

void arm_countdown(ThreadState& state) {
  const uint64_t elapsed = state.window - state.countdown;
  state.alloc_base += elapsed;
  state.tick_left = state.tick_left > elapsed ? state.tick_left - elapsed : 1;
  restart_window(state);
}

static void tick_locked(ThreadState& state) {
  // The classes this thread's cache is used for (its sized bins), not the
  // whole table: a hundred classes every 256 allocations cost about 1 ns
  // per pooled malloc+free in mode auto.
  recycler::for_each_sized_bin(state.cache, [&](unsigned c) { note_pooled(state, c); });
  if (state.policy_countdown != kNever) {
    if (state.policy_countdown <= kTickAllocs) {
      evaluate_policy(state);
    } else {
      state.policy_countdown -= kTickAllocs;
      // One clock read per tick (256 allocations): a counter read, or the
      // vDSO's clock_gettime. Signed: a counter read on another CPU may be
      // a little behind the window's start.
      const int64_t lasted = static_cast<int64_t>(lifetime_clock_ns() - state.policy_started_ns);
      if (lasted >= static_cast<int64_t>(kLongestPolicyWindowNs)) evaluate_policy(state, true);
    }
  }
}

// The slow ends of pooled_free_at (runtime.h says when each is taken).
void pooled_free_gated(void* block) {
  ThreadState* state = tls.state;
  if (state == nullptr) {
    // A thread that frees pooled blocks before it ever allocates (a
    // consumer) attaches as one that allocates does, and gets a cache:
    // else each of its frees would take the depot's lock.
    if (attach_current_thread() != nullptr) return pooled_free(block);
    return pooled_free_uncached(block);
  }
  defer_free(*state, block);
}

void pooled_free_unmarked(void* block) {
  // An invalid or double free aborts there, or is quarantined (not counted).
  g_recycler.deallocate_unmarked(tls.pool_state->cache, g_recycler.class_of_block(block), block);
}
void pooled_free_full(void* block) {
  pooled_free_full_bin(tls.pool_state, g_recycler.class_of_block(block), block);
}

void pooled_free(void* block) { pooled_free_at(block, g_recycler.region_offset(block)); }

void record_alloc_slow(unsigned size_class, size_t requested, size_t usable) {
  ThreadLocal& local = tls;
  if (local.status == ThreadStatus::NotAttached) {
    ReentryGuard guard;
    if (ThreadState* state = attach_thread(guard)) {
      state->stats.record_alloc(g_global, size_class, requested, usable);
      return count_call(*state);
    }
    local.status = ThreadStatus::TornDown;  // no memory for a state: share the fallback
  }
  // Without a fallback block (start-up found no memory at all), nothing counts.
  g_registry.record_in_fallback(
      [&](reporter::ThreadClassStats& stats) { stats.record_alloc(g_global, size_class, requested, usable); });
}

ThreadState* attach_current_thread() {
  ThreadLocal& local = tls;
  if (local.status != ThreadStatus::NotAttached || local.in_hotpool ||
      g_phase.load(std::memory_order_relaxed) != Phase::Recording)
    return nullptr;
  {
    ReentryGuard guard;
    if (!attach_thread(guard)) local.status = ThreadStatus::TornDown;  // no memory for a state: the fallback
  }
  return local.pool_state;
}

void record_free_slow(unsigned size_class, size_t usable) {
  // A thread that frees before it ever allocates attaches like one that
  // allocates: it is a thread of the program all the same.
  ThreadLocal& local = tls;
  if (local.status == ThreadStatus::NotAttached) {
    ReentryGuard guard;
    if (ThreadState* state = attach_thread(guard)) {
      state->stats.record_free(g_global, size_class, usable);
      return count_call(*state);
    }
    local.status = ThreadStatus::TornDown;
  }
  g_registry.record_in_fallback(
      [&](reporter::ThreadClassStats& stats) { stats.record_free(g_global, size_class, usable); });
}

void warn_invalid_pointer(const char* function, const void* block) {
  reporter::Output out(STDERR_FILENO);
  out.str("hotpool: ").str(function).str("() of a pointer that no malloc returned (0x");
  char hex[16];
  uintptr_t value = reinterpret_cast<uintptr_t>(block);
  for (int i = 15; i >= 0; --i, value >>= 4) hex[i] = "0123456789abcdef"[value & 15];
  out.str(hex, 16).str(", not 8-byte aligned)\n");
}

const Options& current_options() { return g_options; }
size_t sample_region_bytes() { return region_bytes(); }

uint64_t process_key(uint64_t salt) {
  uint64_t key = salt;
  if (const auto* random = reinterpret_cast<const uint64_t*>(getauxval(AT_RANDOM))) key ^= random[0] ^ random[1];
  key ^= reinterpret_cast<uintptr_t>(&key);
  return key ? key : salt | 1;
}
void write_warning(const char* line) { write_stderr_line(line); }

Mode current_mode() {
  return g_phase.load(std::memory_order_acquire) == Phase::Recording ? g_options.mode : Mode::Off;
}

void write_report(const char* reason) {
  boot();
  if (g_phase.load(std::memory_order_acquire) != Phase::Recording) return;
  ReentryGuard guard;
  const int saved_errno = errno;
  SpinLockGuard lock(g_report_lock);
  if (sampling_active()) g_registry.for_each_active([](ThreadState& state) { state.pending.flush(); }, guard);
  g_registry.snapshot(&g_snapshot, g_global, guard);

  const char* note = g_pool_note;
  g_snapshot.pools_active = g_recycler.ready();
  for (unsigned c = 0; g_recycler.ready() && c < g_recycler.region().class_count(); ++c) {
    reporter::PoolClassTotals& pool = g_snapshot.pools[c];
    const recycler::PoolCounters& counters = g_recycler.region().depot(c).counters();
    pool.pooled = g_recycler.pooled(c);
    pool.depot_free_bytes = counters.depot_free_bytes.load(std::memory_order_relaxed);
    pool.committed_bytes = counters.committed_bytes.load(std::memory_order_relaxed);
    pool.peak_committed_bytes = counters.peak_committed_bytes.load(std::memory_order_relaxed);
    pool.quarantined_blocks = counters.quarantined_blocks.load(std::memory_order_relaxed);
  }

  int fd = STDERR_FILENO;
  bool json = false;
  char path[PATH_MAX + kMaxPath + 32];
  if (g_options.output[0]) {
    if (g_secure) {
      write_stderr_line("hotpool: secure-execution process: report goes to stderr, not to HOTPOOL_OUTPUT");
    } else if (!expand_output_name(g_options.output, path, sizeof(path)) &&
               !expand_output_name(g_options.output, path, sizeof(path), /*in_start_dir=*/false)) {
      write_stderr_line("hotpool: HOTPOOL_OUTPUT is too long once expanded; report goes to stderr");
    } else {
      // O_NOFOLLOW: never write through a symlink someone planted there.
      const int file = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
      if (file >= 0) {
        fd = file;
        json = ends_with(path, ".json");
      } else {
        reporter::Output out(STDERR_FILENO);
        out.str("hotpool: cannot open report file ").str(path).str(" (").str(strerror(errno))
            .str("); report goes to stderr\n");
      }
    }
  }

  constexpr unsigned kMaxOptions = 32;
  static char values[kMaxOptions][kMaxPath + 64];
  static const char* names[kMaxOptions];
  static const char* value_ptrs[kMaxOptions];
  const unsigned count = option_count() < kMaxOptions ? option_count() : kMaxOptions;
  for (unsigned i = 0; i < count; ++i) {
    names[i] = option_info(i).name;
    format_option_value(g_options, i, values[i], sizeof(values[i]));
    value_ptrs[i] = values[i];
  }
  reporter::ReportContext context{};
  context.pid = static_cast<int>(getpid());
  context.parent_pid = static_cast<int>(getppid());
  context.forked_from = g_forked_from;
  context.program = program_invocation_name ? program_invocation_name : "?";
  context.mode = mode_name(current_mode());
  context.reason = reason;
  context.note = note;
  context.duration_ns = monotonic_ns() - g_start_ns;
  context.explicit_classes = g_explicit_classes;
  context.hot_share_ppm = g_options.hot_share;
  // Peaks lag by the unpublished deltas: other threads' on the real
  // allocator's path, every thread's (this one's too) on the pooled path.
  uint64_t pooled_allocs = 0;
  for (unsigned c = 0; c < g_snapshot.class_count; ++c) pooled_allocs += g_snapshot.classes[c].pooled_allocs;
  const uint64_t lagging_threads = pooled_allocs ? g_snapshot.threads_at_once
                                                 : (g_snapshot.threads_at_once > 1 ? g_snapshot.threads_at_once - 1 : 0);
  context.peak_error_bytes = static_cast<uint64_t>(reporter::kFlushBytes) * lagging_threads;
  context.option_count = count;
  context.option_names = names;
  context.option_values = value_ptrs;
  reporter::SamplingView sampling{};
  if (sampling_active()) {
    sampling.rate = sampling_rate();
    sampling.mean_bytes = sampling_mean_bytes();
    sampling.short_ns = sampling_short_ns();
    sampling.recycle_calls = sampling_recycle_calls();
    sampling.unsited = sampling_unsited();
    sampling.sites = sampling_sites();
    sampling_stack_counts(&sampling.stacks_replayed, &sampling.stacks_walked, &sampling.stacks_recalled);
    sampling.top = static_cast<unsigned>(g_options.top < reporter::kMaxTop ? g_options.top : reporter::kMaxTop);
    sampling.frames = 4;
    sampling.longest_ns = context.duration_ns;
    sampling.depot = &g_stack_depot;
    sampling.class_lifetimes = g_class_lifetimes;
    sampling.symbolize = symbolize;
    context.sampling = &sampling;
  }
  {
    reporter::Output out(fd);
    if (json) reporter::write_json_report(g_snapshot, context, out);
    else reporter::write_text_report(g_snapshot, context, out);
  }
  if (fd != STDERR_FILENO) close(fd);
  errno = saved_errno;
}

}  // namespace hotpool::shim
