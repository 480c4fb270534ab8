#include "unwinder.h"

#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>

#include <cstring>

namespace hotpool::reporter {

namespace {

struct RangeQuery {
  uintptr_t address;
  const char* name;
  uintptr_t* range;
  bool found;
};

int find_module(dl_phdr_info* info, size_t, void* data) {
  auto* query = static_cast<RangeQuery*>(data);
  if (query->name && !(info->dlpi_name && std::strstr(info->dlpi_name, query->name))) return 0;
  uintptr_t low = ~uintptr_t{0}, high = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& header = info->dlpi_phdr[i];
    if (header.p_type != PT_LOAD || !(header.p_flags & PF_X)) continue;
    const uintptr_t start = info->dlpi_addr + header.p_vaddr;
    if (start < low) low = start;
    if (start + header.p_memsz > high) high = start + header.p_memsz;
  }
  if (low >= high) return 0;
  if (!query->name && (query->address < low || query->address >= high)) return 0;
  query->range[0] = low;
  query->range[1] = high;
  query->found = true;
  return 1;
}
}  // namespace

bool module_range_of(const void* address, uintptr_t range[2]) {
  RangeQuery query{reinterpret_cast<uintptr_t>(address), nullptr, range, false};
  dl_iterate_phdr(find_module, &query);
  return query.found;
}

bool module_range_named(const char* name, uintptr_t range[2]) {
  RangeQuery query{0, name, range, false};
  dl_iterate_phdr(find_module, &query);
  return query.found;
}

bool FrameTable::init() {
  if (ready()) return true;
  constexpr size_t kSmallBytes = (size_t{1} << kSmallLog2) * sizeof(uint64_t);
  constexpr size_t kLargeBytes = (size_t{1} << kLargeLog2) * sizeof(uint64_t);
  void* memory = mmap(nullptr, kSmallBytes + kLargeBytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) return false;
  small_ = static_cast<uint64_t*>(memory);
  large_ = small_ + (size_t{1} << kSmallLog2);
  current_.store(reinterpret_cast<uintptr_t>(small_) | (uint64_t{(1u << kSmallLog2) - 1} << 48), std::memory_order_release);
  return true;
}

bool FrameTable::learn_in(View table, uintptr_t return_address, uint16_t words) {
  auto* const slots = const_cast<uint64_t*>(table.slots);  // the table's own: writable
  const uint64_t wanted = return_address | (static_cast<uint64_t>(words) << 48);
  const unsigned mask = table.mask;
  unsigned index = first_slot(return_address) & mask;
  for (unsigned probe = 0; probe < kProbes; ++probe, index = (index + 1) & mask) {
    uint64_t entry = load_slot(&slots[index]);
    if (entry == 0) {
      if (__atomic_compare_exchange_n(&slots[index], &entry, wanted, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        return true;
      // Another thread took the slot meanwhile: entry is what it stored.
    }
    if ((entry & kAddressMask) != return_address) continue;
    const uint16_t known = static_cast<uint16_t>(entry >> 48);
    // A second distance makes the address varying, for good; at a
    // frame-pointer site, the frame pointer alone is left (replayed from
    // its %rbp). What a walk saw of %rbp adds up.
    uint16_t merged = known;
    if (known == words || known == kVarying) {
      // nothing new
    } else if (frame_pointer(known) && frame_pointer(words)) {
      merged = kFramePointer;
    } else if (frame_pointer(known) || frame_pointer(words)) {
      // One walk saw the CFA at %rbp + 16 here, another did not. Where the
      // unwind tables compute the CFA from %rbp, every walk sees it there;
      // so the CFA is the stack pointer plus a constant at this call, and
      // %rbp holding CFA - 16 was a coincidence of its value (seen in
      // clang-format, in some runs: the address marked varying was walked
      // by libgcc at every capture through it). The fixed distance stays
      // when both saw the same one.
      const uint16_t plain = frame_pointer(known) ? words : known;
      const uint16_t pointer_distance = (frame_pointer(known) ? known : words) & kDistanceMask;  // 0: several seen
      merged = plain < kVarying && pointer_distance != 0 && (plain & kDistanceMask) == pointer_distance ? plain
                                                                                                       : kVarying;
    } else if (known != kOutermost && words != kOutermost &&
               (known & kDistanceMask) == (words & kDistanceMask)) {
      // The same distance, %rbp seen elsewhere: what was not seen takes
      // what is; two different places are none.
      const unsigned seen = rbp_at(words), had = rbp_at(known);
      const unsigned rbp = had == kRbpUnseen ? seen : seen == kRbpUnseen ? had : kRbpLost;
      merged = static_cast<uint16_t>((known & ~kRbpMask) | (rbp << kRbpShift));
    } else {
      merged = kVarying;
    }
    if (merged != known) __atomic_store_n(&slots[index], return_address | (uint64_t{merged} << 48), __ATOMIC_RELAXED);
    return false;
  }
  // Every probed slot is taken: not learned (libgcc walks such frames).
  return false;
}

void FrameTable::learn(uintptr_t return_address, uint16_t words) {
  if (return_address == 0 || (return_address & ~kAddressMask) || words == kUnknown) return;
  const View table = view();
  if (!table.slots) return;
  if (!learn_in(table, return_address, words)) return;
  // The insert that fills the small table to kGrowAt grows it (one thread).
  if (table.slots == small_ && used_.fetch_add(1, std::memory_order_relaxed) + 1 == kGrowAt) grow();
}

void FrameTable::grow() {
  // The small table's entries into the large one, which then replaces it.
  // What other threads learn in the small one meanwhile is lost (their
  // walks teach it again); a replay still reading the small one finds its
  // pages zero once they are given back: addresses unknown, walked.
  const View large{large_, (1u << kLargeLog2) - 1};
  for (unsigned i = 0; i < (1u << kSmallLog2); ++i) {
    const uint64_t entry = load_slot(&small_[i]);
    if (entry) learn_in(large, entry & kAddressMask, static_cast<uint16_t>(entry >> 48));
  }
  current_.store(reinterpret_cast<uintptr_t>(large_) | (uint64_t{large.mask} << 48), std::memory_order_release);
  madvise(small_, (size_t{1} << kSmallLog2) * sizeof(uint64_t), MADV_DONTNEED);
}

void FrameTable::clear() {
  const View table = view();
  if (table.slots)
    madvise(const_cast<uint64_t*>(table.slots), (size_t{table.mask} + 1) * sizeof(uint64_t), MADV_DONTNEED);  // reads as zero again
  if (table.slots == small_) used_.store(0, std::memory_order_relaxed);
}

unsigned FrameTable::size() const {
  const View table = view();
  unsigned used = 0;
  for (unsigned i = 0; table.slots && i <= table.mask; ++i) used += load_slot(&table.slots[i]) != 0;
  return used;
}

bool Unwinder::load(bool use_libunwind) {
  if (use_libunwind) {
    void* library = dlopen("libunwind.so.8", RTLD_NOW | RTLD_LOCAL);
    if (!library) return false;
    backtrace_ = dlsym(library, "unw_backtrace");
    ready_ = backtrace_ != nullptr;
    return ready_;
  }
  // libgcc_s is loaded already (libhotpool.so needs it).
  gcc_backtrace_ = dlsym(RTLD_DEFAULT, "_Unwind_Backtrace");
  gcc_get_ip_ = dlsym(RTLD_DEFAULT, "_Unwind_GetIP");
  gcc_get_cfa_ = dlsym(RTLD_DEFAULT, "_Unwind_GetCFA");
  gcc_get_ip_info_ = dlsym(RTLD_DEFAULT, "_Unwind_GetIPInfo");
  gcc_get_gr_ = dlsym(RTLD_DEFAULT, "_Unwind_GetGR");
  ready_ = gcc_backtrace_ && gcc_get_ip_;
  if (ready_ && gcc_get_cfa_ && gcc_get_ip_info_ && gcc_get_gr_) frames_.init();
  return ready_;
}

void Unwinder::set_skipped_ranges(const uintptr_t (*ranges)[2], unsigned count) {
  skip_count_ = count < 8 ? count : 8;
  for (unsigned i = 0; i < skip_count_; ++i) {
    skip_[i][0] = ranges[i][0];
    skip_[i][1] = ranges[i][1];
  }
}

bool Unwinder::skipped(uintptr_t ip) const {
  for (unsigned i = 0; i < skip_count_; ++i)
    if (ip >= skip_[i][0] && ip < skip_[i][1]) return true;
  return false;
}

namespace {
// x86-64's frame pointer: %rbp (DWARF register 6), the caller's %rbp saved
// at CFA - 16, just below the return address.
#if defined(__x86_64__)
constexpr bool kFramePointerAbi = true;
#else
constexpr bool kFramePointerAbi = false;
#endif

struct GccTrace {
  uintptr_t* frames;
  uintptr_t* cfas;
  int capacity;
  int count;
  uintptr_t (*get_ip)(void*);
  uintptr_t (*get_cfa)(void*);
  const TraceCache* cache;  // the previous capture, or null
  unsigned scan;            // cache->cfas()[scan] is the first not below this frame's
  int (*get_ip_info)(void*, int*);  // null: no signal-frame test
  uintptr_t (*get_gr)(void*, int);  // _Unwind_GetGR, for the frame pointer
  uintptr_t* rbps;          // with each frame, its %rbp (when table is set)
  FrameTable* table;        // signal frames are marked varying there
  bool outermost;           // the walk ended at the stack's end (not cut short)
  int walked;               // frames libgcc reported (the rest came from the cache)
};

// Where a capture meets the thread's previous one (frames listed outwards,
// CFAs rising: `scan` keeps one pass over the previous one): true when the
// frame at `count - 1` just recorded, (ip, cfa), is the previous capture's
// frame at the same place. Inlined: most frames are not.
// Given the previous capture's arrays and count (replay holds them in
// registers), not the cache.
inline bool meets(const uintptr_t* cached_cfas, const uintptr_t* cached_ips, unsigned cached_count, unsigned& scan,
                  uintptr_t ip, uintptr_t cfa) {
  while (scan < cached_count && cached_cfas[scan] < cfa) ++scan;
  return scan < cached_count && cached_cfas[scan] == cfa && cached_ips[scan] == ip;
}

// Where the capture meets the previous one at `at` (see meets), called
// from the same, unchanged frames, the rest of the stack is the previous
// capture's: copied after the `count` frames found so far; returns the
// new count, or -1 (the count is a value, not a reference: in replay's
// loop it then stays in a register). Unchanged: every return
// address of the previous capture from there out still in its slot on the
// thread's stack (its CFAs rose when it was taken; each is inside the
// stack, see TraceCache). The copy goes with the check, and counts only if
// all of it holds. A truncated previous capture serves only if it fills
// this one.
int rejoin_at(const TraceCache& cache, unsigned at, uintptr_t* frames, uintptr_t* cfas, int count, int capacity) {
  const unsigned outer = cache.count - at - 1;  // the previous capture's frames beyond `at`
  const unsigned room = static_cast<unsigned>(capacity - count);
  if (cache.truncated && outer < room) return -1;
  const unsigned n = outer < room ? outer : room;
  const uintptr_t* from_cfas = cache.cfas() + at + 1;
  const uintptr_t* from_ips = cache.ips() + at + 1;
  uintptr_t* to_cfas = cfas + count;
  uintptr_t* to_ips = frames + count;
  for (unsigned k = 0; k < n; ++k) {
    const uintptr_t frame_cfa = from_cfas[k];
    const uintptr_t ip = from_ips[k];
    if (*reinterpret_cast<const uintptr_t*>(frame_cfa - sizeof(uintptr_t)) != ip) return -1;
    to_cfas[k] = frame_cfa;
    to_ips[k] = ip;
  }
  return count + static_cast<int>(n);  // frames beyond the capacity are neither this capture's nor the next cache's
}

// _Unwind_Trace_Fn: one call per frame, innermost first.
int gcc_frame(void* context, void* arg) {
  auto* trace = static_cast<GccTrace*>(arg);
  if (trace->count == trace->capacity) return 5;  // _URC_END_OF_STACK
  const uintptr_t cfa = trace->get_cfa ? trace->get_cfa(context) : 0;
  const uintptr_t ip = trace->get_ip(context);
  if (ip == 0) {
    trace->outermost = true;
    return 5;  // the outermost frame's "return address": no frame
  }
  if (trace->table) {
    // This frame's %rbp (DWARF register 6), to tell frame-pointer frames.
    trace->rbps[trace->count] = trace->get_gr(context, 6);
    // A frame interrupted by a signal: its CFA is restored from the signal
    // frame's saved registers, at no fixed distance from the trampoline's.
    int before_instruction = 0;
    trace->get_ip_info(context, &before_instruction);
    if (before_instruction) {
      trace->table->learn(ip, FrameTable::kVarying);
      if (trace->count) trace->table->learn(trace->frames[trace->count - 1], FrameTable::kVarying);
    }
  }
  trace->cfas[trace->count] = cfa;
  trace->frames[trace->count++] = ip;
  if (const TraceCache* cache = trace->cache; cache && cfa) {
    if (meets(cache->cfas(), cache->ips(), cache->count, trace->scan, ip, cfa)) {
      const int rejoined = rejoin_at(*cache, trace->scan, trace->frames, trace->cfas, trace->count, trace->capacity);
      if (rejoined >= 0) {
        trace->walked = trace->count;
        trace->count = rejoined;
        return 5;
      }
    }
  }
  return 0;  // _URC_NO_REASON
}
}  // namespace

namespace {
// Where the %rbp of frame f of a replay (raw[f], whose callee's CFA is
// cfas[f]) at its call is, or null if not known: from its callee's table
// entry (`callee_words`, frame f - 1's): a callee with a frame pointer
// saved it just below its return address; one without says where it keeps
// it (a slot of its frame, or in place: then it is the callee's own, found
// the same way further down); frame 1's is the start frame's.
const uintptr_t* rbp_of(FrameTable::View table, const UnwindFrame& from, const uintptr_t* raw, const uintptr_t* cfas,
                        int f, uint16_t callee_words) {
  if (!kFramePointerAbi) return nullptr;
  for (;;) {
    if (f <= 1) return from.rbp_known ? &from.rbp : nullptr;
    if (FrameTable::frame_pointer(callee_words))
      return reinterpret_cast<const uintptr_t*>(cfas[f] - 2 * sizeof(uintptr_t));
    const unsigned at = FrameTable::rbp_at(callee_words);
    if (at >= FrameTable::kRbpFirstSlot && at <= FrameTable::kRbpLastSlot)
      return reinterpret_cast<const uintptr_t*>(cfas[f] - at * sizeof(uintptr_t));
    if (at != FrameTable::kRbpKept) return nullptr;
    --f;  // the callee's own, as it left it in place
    callee_words = f > 1 ? FrameTable::lookup(table, raw[f - 1]) : 0;
  }
}
}  // namespace

int Unwinder::replay(const Frame& from, uintptr_t* raw, uintptr_t* cfas, int capacity, const TraceCache& cache) const {
  uintptr_t cfa = from.cfa;
  if (!replay_ok_.load(std::memory_order_relaxed) || !first_frame_.load(std::memory_order_relaxed)) return -1;
  // Frame 0 is capture() itself, as in libgcc's walks: the same address
  // as theirs (where capture() calls it).
  // The first CFA inside the thread's stack too, as each next one (a
  // capture on another stack, a signal handler's, is libgcc's to walk).
  const uintptr_t stack_low = cache.stack_low, stack_high = cache.stack_high;
  if (cfa < stack_low + sizeof(uintptr_t) || cfa > stack_high) return -1;
  raw[0] = first_frame_.load(std::memory_order_relaxed);
  cfas[0] = 0;
  // The previous capture and the table, held in registers: the loop's
  // stores (into the cache's other buffer) would otherwise make the
  // compiler read them again at every frame.
  const uintptr_t* const cached_cfas = cache.cfas();
  const uintptr_t* const cached_ips = cache.ips();
  const unsigned cached_count = cache.count;
  const FrameTable::View table = frames_.view();
  int count = 1;
  uintptr_t ip = from.return_address;
  unsigned scan = 0;  // meets()'s one pass over the previous capture's CFAs
  // The table entry of the frame walked before (the callee of the one
  // being walked): where the latter's %rbp is, looked at only at a
  // frame-pointer site (see rbp_of), so that other frames pay nothing.
  uint16_t callee_words = 0;
  for (;;) {
    if (count == capacity) return count;
    raw[count] = ip;
    cfas[count++] = cfa;
    // Where the stack rejoins the thread's previous capture, the rest is
    // that capture's: a compare per frame instead of a lookup.
    if (meets(cached_cfas, cached_ips, cached_count, scan, ip, cfa)) {
      const int rejoined = rejoin_at(cache, scan, raw, cfas, count, capacity);
      if (rejoined >= 0) return rejoined;
    }
    const uint16_t words = FrameTable::lookup(table, ip);
    if (words == FrameTable::kOutermost) return count;
    if (words == FrameTable::kUnknown || words == FrameTable::kVarying) return -1;
    // (A site without a frame pointer has a distance of at least a word.)
    const uintptr_t distance = static_cast<uintptr_t>(words & FrameTable::kDistanceMask) * sizeof(uintptr_t);
    uintptr_t next_cfa = cfa + distance;
    if (__builtin_expect(words & FrameTable::kFramePointer, 0)) {  // kOutermost and kVarying are out
      // The frame's CFA is its %rbp + 16, whatever its size; a distance
      // learned too must agree (else the frame's size varies, and libgcc
      // sees what it is now). Without the %rbp, libgcc walks it.
      const uintptr_t* const rbp_at = rbp_of(table, from, raw, cfas, count - 1, callee_words);
      if (!rbp_at) return -1;
      const uintptr_t at_rbp = *rbp_at + 2 * sizeof(uintptr_t);
      if ((distance && at_rbp != next_cfa) || (at_rbp & (sizeof(uintptr_t) - 1)) || at_rbp <= cfa) return -1;
      next_cfa = at_rbp;
    }
    // The caller's return address (and a frame pointer's saved %rbp, below
    // it) are read from the thread's own stack, above the current frame,
    // or not at all.
    if (next_cfa > stack_high || next_cfa - 2 * sizeof(uintptr_t) < stack_low) return -1;
    callee_words = words;
    ip = *reinterpret_cast<const uintptr_t*>(next_cfa - sizeof(uintptr_t));
    cfa = next_cfa;
    // A null return address ends libgcc's walks, which then mark the frame
    // before it outermost: met here, the distance was wrong.
    if (ip == 0) return -1;
  }
}

void Unwinder::learn(const uintptr_t* raw, const uintptr_t* cfas, const uintptr_t* rbps, int walked, int got,
                     bool outermost_reached, uintptr_t return_address, uintptr_t cfa) const {
  // Frame 1 is capture()'s caller, as replay() starts from it.
  if (got < 2) return;  // libgcc gave up at once: nothing to learn
  if (raw[1] != return_address || cfas[1] != cfa) {
    replay_ok_.store(false, std::memory_order_relaxed);
    return;
  }
  first_frame_.store(raw[0], std::memory_order_relaxed);
  // The frames libgcc walked (those taken from the trace cache were
  // learned when they were walked).
  for (int i = 1; i < walked && i + 1 < got; ++i) {
    const uintptr_t ip = raw[i];
    const uintptr_t distance = cfas[i + 1] - cfas[i];
    // A frame with a frame pointer (its CFA 16 bytes above %rbp): marked
    // so, with its distance. Code built without frame pointers sets one up
    // when the frame's size varies (alloca, variable arrays): the next walk
    // with another size leaves the frame pointer alone (see FrameTable).
    bool frame_pointer =
        kFramePointerAbi && cfas[i] && cfas[i + 1] > cfas[i] && cfas[i + 1] == rbps[i] + 2 * sizeof(uintptr_t);
    // Its caller's %rbp where a replay reads it (below the return address),
    // as libgcc restored it from the unwind tables (checked where libgcc
    // walked the caller). A function that keeps a frame pointer saved it
    // there (libgcc restores it from that very slot); when the slot holds
    // something else, %rbp equal to CFA - 16 was a coincidence of its value
    // (hotpool's operator new, which leaves its caller's %rbp alone: one
    // run of clang-format in 16 then marked its call site varying and
    // walked 49,640 stacks with libgcc instead of 450), and the frame is
    // learned as one without it.
    if (frame_pointer && i + 1 < walked &&
        *reinterpret_cast<const uintptr_t*>(cfas[i + 1] - 2 * sizeof(uintptr_t)) != rbps[i + 1])
      frame_pointer = false;
    const bool usable = cfas[i] && cfas[i + 1] > cfas[i] && distance % sizeof(uintptr_t) == 0 &&
                        distance / sizeof(uintptr_t) <= FrameTable::kMaxDistance;
    const uint16_t words = usable ? static_cast<uint16_t>(distance / sizeof(uintptr_t)) : 0;
    // Without a frame pointer: where the caller's %rbp is at this call (as
    // libgcc restored it, where it walked the caller): still in %rbp, or in
    // one slot below the return address, inside the frame (where the
    // function saved it, so also while it has not changed it yet). A value
    // found in two slots (small integers in registers used as variables
    // are common) tells nothing; found nowhere, it is elsewhere.
    unsigned rbp_seen = FrameTable::kRbpUnseen;
    if (kFramePointerAbi && !frame_pointer && usable && i + 1 < walked) {
      const uintptr_t caller_rbp = rbps[i + 1];
      unsigned found = 0, slot_k = 0;
      for (unsigned k = FrameTable::kRbpFirstSlot; k <= FrameTable::kRbpLastSlot; ++k) {
        const uintptr_t slot = cfas[i + 1] - k * sizeof(uintptr_t);
        if (slot < cfas[i]) break;
        if (*reinterpret_cast<const uintptr_t*>(slot) == caller_rbp) ++found, slot_k = k;
      }
      if (found == 1) rbp_seen = slot_k;
      else if (found == 0) rbp_seen = rbps[i] == caller_rbp ? FrameTable::kRbpKept : FrameTable::kRbpLost;
    }
    frames_.learn(ip, frame_pointer ? static_cast<uint16_t>(FrameTable::kFramePointer | words)
                      : usable      ? static_cast<uint16_t>(words | (rbp_seen << FrameTable::kRbpShift))
                                    : FrameTable::kVarying);
  }
  if (outermost_reached && walked == got) frames_.learn(raw[got - 1], FrameTable::kOutermost);
}

void StackMemo::reset(unsigned depth) {
  stride = depth ? depth + kLeadingFrames : 0;
  if (stride > kMaxFrames) stride = kMaxFrames;
  for (Entry& entry : entries) entry.ip = 0;
}

int Unwinder::recall(StackMemo& memo, const Frame& start) const {
  const unsigned set = StackMemo::set_of(start.return_address, start.cfa);
  const uint32_t generation = generation_.load(std::memory_order_relaxed);
  for (unsigned way = 0; way < StackMemo::kWays; ++way) {
    const unsigned index = set * StackMemo::kWays + way;
    StackMemo::Entry& entry = memo.entries[index];
    if (entry.ip != start.return_address || entry.cfa != start.cfa || entry.site == 0 ||
        entry.generation != generation)
      continue;
    // Each return address still in its slot (above the start frame, on
    // this thread's stack: see StackMemo).
    const StackMemo::Frame* frame = memo.frames + index * memo.stride;
    const StackMemo::Frame* const end = frame + entry.frames;
    while (frame != end && *reinterpret_cast<const uintptr_t*>(frame->cfa - sizeof(uintptr_t)) == frame->ip) ++frame;
    if (frame != end) continue;
    // And each frame pointer's %rbp the same (its slot is in a frame
    // checked above, or the start frame's %rbp is given).
    unsigned same = 0;
    for (; same < entry.pointers; ++same) {
      const uintptr_t at = entry.rbp_at[same];
      if (at ? *reinterpret_cast<const uintptr_t*>(at) != entry.rbp[same]
             : !start.rbp_known || start.rbp != entry.rbp[same])
        break;
    }
    if (same != entry.pointers) continue;
    entry.stamp = ++memo.clock;
    TraceCache::bump(memo.recalled);
    return static_cast<int>(index);
  }
  return -1;
}

int Unwinder::remember(StackMemo& memo, const Frame& start, const uintptr_t* raw, const uintptr_t* cfas, int got,
                       int first, unsigned reported, unsigned depth, uintptr_t allocating_cfa) const {
  // The frames the result came from: to the last one it reports, and the
  // one after the allocating function's (its CFA comes with it).
  const int last = first + static_cast<int>(reported);
  const int end = last > first + 2 ? last : first + 2;
  if (!memo.on() || allocating_cfa == 0 || end > got || static_cast<unsigned>(end - 2) > memo.stride) return -1;
  const FrameTable::View table = frames_.view();
  // A result with fewer frames than asked for ended with the stack (its
  // last frame the outermost), or another time it could be longer.
  if (reported < depth && FrameTable::lookup(table, raw[got - 1]) != FrameTable::kOutermost) return -1;
  // Every frame up to the last of a fixed size, or with a frame pointer
  // and its %rbp where the replay finds it (see StackMemo).
  uintptr_t rbp_at[StackMemo::kMaxPointers], rbp[StackMemo::kMaxPointers];
  unsigned pointers = 0;
  for (int i = 1; i + 1 < end; ++i) {
    const uint16_t words = FrameTable::lookup(table, raw[i]);
    if (words == FrameTable::kUnknown || words >= FrameTable::kVarying) return -1;
    if (!FrameTable::frame_pointer(words)) continue;
    if (pointers == StackMemo::kMaxPointers) return -1;
    const uint16_t callee_words = i > 1 ? FrameTable::lookup(table, raw[i - 1]) : 0;
    const uintptr_t* const at = rbp_of(table, start, raw, cfas, i, callee_words);
    if (!at || *at + 2 * sizeof(uintptr_t) != cfas[i + 1]) return -1;
    rbp_at[pointers] = at == &start.rbp ? 0 : reinterpret_cast<uintptr_t>(at);
    rbp[pointers++] = *at;
  }
  // The set's empty or least recently used entry.
  const unsigned set = StackMemo::set_of(raw[1], cfas[1]);
  unsigned index = set * StackMemo::kWays;
  for (unsigned way = 0; way < StackMemo::kWays; ++way) {
    const unsigned candidate = set * StackMemo::kWays + way;
    if (memo.entries[candidate].ip == 0) {
      index = candidate;
      break;
    }
    if (static_cast<int32_t>(memo.entries[candidate].stamp - memo.entries[index].stamp) < 0) index = candidate;
  }
  StackMemo::Entry& entry = memo.entries[index];
  StackMemo::Frame* frame = memo.frames + index * memo.stride;
  for (int i = 2; i < end; ++i) *frame++ = {raw[i], cfas[i]};
  entry.ip = raw[1];
  entry.cfa = cfas[1];
  entry.allocating_cfa = allocating_cfa;
  entry.site = 0;
  entry.stamp = ++memo.clock;
  entry.generation = generation_.load(std::memory_order_relaxed);
  entry.frames = static_cast<uint16_t>(end - 2);
  entry.pointers = static_cast<uint16_t>(pointers);
  for (unsigned p = 0; p < pointers; ++p) {
    entry.rbp_at[p] = rbp_at[p];
    entry.rbp[p] = rbp[p];
  }
  return static_cast<int>(index);
}

// Not inlined: replay() starts from this function's own return address and
// CFA, which are libgcc's second frame.
__attribute__((noinline)) bool Unwinder::capture(unsigned depth, CapturedStack* out, TraceCache* cache,
                                                  const Frame& start, StackMemo* memo) const {
  out->depth = 0;
  out->cfa = 0;
  out->memo_entry = -1;
  if (!ready_) return false;
  if (depth > kMaxDepth) depth = kMaxDepth;
  constexpr unsigned kLeading = kLeadingFrames;
  uintptr_t own_raw[kMaxDepth + kLeading];
  uintptr_t own_cfas[kMaxDepth + kLeading];
  uintptr_t* raw = own_raw;
  uintptr_t* cfas = own_cfas;  // filled up to got
  int got;
  bool memorable = false;  // replayed from the start frame (raw[1])
  if (backtrace_) {
    using Backtrace = int (*)(void**, int);
    void* frames[kMaxDepth + kLeading];
    got = reinterpret_cast<Backtrace>(backtrace_)(frames, static_cast<int>(depth + kLeading));
    for (int i = 0; i < got; ++i) {
      raw[i] = reinterpret_cast<uintptr_t>(frames[i]);
      cfas[i] = 0;  // unknown
    }
  } else {
    // A stack of at least two words: where the cache's CFAs lie (see
    // TraceCache) is then a range.
    const bool cached = cache && gcc_get_cfa_ && cache->stack_high >= cache->stack_low + 2 * sizeof(uintptr_t);
    const int capacity = static_cast<int>(cached ? kMaxDepth + kLeading : depth + kLeading);
    static_assert(TraceCache::kFrames == kMaxDepth + kLeading, "a capture fills a cache buffer");
    const unsigned next = cached ? (cache->current + 1) & 1 : 0;
    if (cached) {  // straight into the cache's other buffer (see TraceCache)
      raw = cache->ips_[next];
      cfas = cache->cfas_[next];
    }
    const uintptr_t own_return = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
    const uintptr_t own_cfa = reinterpret_cast<uintptr_t>(__builtin_dwarf_cfa());
    // The replay too goes to the capacity (the whole stack, with a cache):
    // a libgcc walk that rejoins a truncated capture cannot take its frames.
    // From the caller's start frame if it gave one (its frame lies above
    // this one on the stack), else from this function's caller.
    const bool from_start = start.return_address && start.cfa > own_cfa;
    const Frame own{own_return, own_cfa};
    got = cached ? replay(from_start ? start : own, raw, cfas, capacity, *cache) : -1;
    int cache_count = got;  // what the cache keeps of this capture
    if (got >= 0) {
      TraceCache::bump(cache->replayed);
      memorable = memo && from_start && got >= 2;
    } else {
      // With a cache the whole stack is kept (up to kMaxDepth frames), not
      // only what this capture reports: a later capture that rejoins it
      // deeper down than this one did can still take its outer frames.
      uintptr_t rbps[kMaxDepth + kLeading];
      const bool learning = cached && frames_.ready();
      GccTrace trace{raw,
                     cfas,
                     capacity,
                     0,
                     reinterpret_cast<uintptr_t (*)(void*)>(gcc_get_ip_),
                     reinterpret_cast<uintptr_t (*)(void*)>(gcc_get_cfa_),
                     cached && cache->count ? cache : nullptr,
                     0,
                     reinterpret_cast<int (*)(void*, int*)>(gcc_get_ip_info_),
                     reinterpret_cast<uintptr_t (*)(void*, int)>(gcc_get_gr_),
                     rbps,
                     learning ? &frames_ : nullptr,
                     false,
                     0};
      using Backtrace = int (*)(int (*)(void*, void*), void*);
      const int status = reinterpret_cast<Backtrace>(gcc_backtrace_)(gcc_frame, &trace);
      got = trace.count;
      if (!trace.walked) trace.walked = got;
      if (cached) TraceCache::bump(cache->walked);
      // _URC_END_OF_STACK: libgcc found no caller beyond the last frame.
      if (learning) learn(raw, cfas, rbps, trace.walked, got, trace.outermost || status == 5, own_return, own_cfa);
      // The cache ends before the first frame libgcc found outside the
      // thread's stack (a signal handler's alternate stack), see TraceCache;
      // the frames it rejoined came from the cache.
      cache_count = got;
      for (int i = 1; cached && i < trace.walked && i < got; ++i) {
        if (cfas[i] < cache->stack_low + sizeof(uintptr_t) || cfas[i] > cache->stack_high) {
          cache_count = i;
          break;
        }
      }
    }
    if (cached) {
      cache->count = static_cast<unsigned>(cache_count);
      cache->truncated = cache_count < got || got == capacity;
      cache->current = next;
    }
  }
  int first = 0;
  while (first < got && skipped(raw[first])) ++first;
  // libgcc reports with each return address the canonical frame address of
  // the frame it returns from (the address above the slot that holds it):
  // the allocating function's own is the one that comes with its caller's.
  if (first + 1 < got) out->cfa = cfas[first + 1];
  const unsigned frames = first < got ? static_cast<unsigned>(got - first) : 0;
  out->depth = frames < depth ? frames : depth;
  std::memcpy(out->ips, raw + first, out->depth * sizeof(uintptr_t));
  if (memorable) out->memo_entry = remember(*memo, start, raw, cfas, got, first, out->depth, depth, out->cfa);
  return out->depth > 0;
}

bool allocating_frame_active(const uintptr_t* allocation, unsigned allocation_depth, const CapturedStack& now) {
  if (allocation_depth < 2) return false;
  // Find the frame of now that returns where the allocating function was
  // called from (allocation.ips[1]), and check the callers beyond agree.
  for (unsigned j = 1; j < now.depth; ++j) {
    if (now.ips[j] != allocation[1]) continue;
    bool same = true;
    for (unsigned k = 2; k < allocation_depth && j + k - 1 < now.depth && same; ++k)
      same = now.ips[j + k - 1] == allocation[k];
    if (same) return true;
  }
  return false;
}

}  // namespace hotpool::reporter
