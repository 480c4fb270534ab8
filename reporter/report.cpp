#include "report.h"

#include <cstring>

#include "frame_names.h"
#include "unwinder.h"  // kMaxDepth

namespace hotpool::reporter {
namespace {

struct Totals {
  uint64_t allocs = 0, frees = 0, requested = 0, usable = 0, freed = 0;
};

Totals sum(const StatsSnapshot& stats) {
  Totals t;
  for (unsigned c = 0; c < stats.class_count; ++c) {
    const ClassTotals& row = stats.classes[c];
    t.allocs += row.allocs;
    t.frees += row.frees;
    t.requested += row.requested_bytes;
    t.usable += row.usable_bytes;
    t.freed += row.freed_bytes;
  }
  return t;
}

bool is_large(const StatsSnapshot& stats, unsigned c) { return c + 1 == stats.class_count; }

// Counters of running threads are read without stopping them, so two of
// them may be a few operations apart: differences saturate at zero.
uint64_t minus(uint64_t a, uint64_t b) { return a > b ? a - b : 0; }

uint64_t live_bytes(const ClassTotals& row) { return minus(row.usable_bytes, row.freed_bytes); }

uint64_t load(const AtomicCounter& counter) { return counter.load(std::memory_order_relaxed); }

// A site's sampled figures, read once.
struct SiteRow {
  uint32_t id;
  uint64_t allocs, bytes, frees, short_lived, recycled, temporary, escapes[3], calls, min_size, max_size, median_ns;
  uint64_t histogram[kLifetimeBuckets];
  double weight;            // the allocations the samples stand for
  uint64_t weighted_bytes;  // and their bytes
  uint64_t live() const { return allocs > frees ? allocs - frees : 0; }
  // The site's count of `samples` of its allocations (its frees, its
  // short-lived ones...) scaled to the allocations they stand for: by the
  // site's mean weight (by count, the rate; by bytes, nearly the same for
  // the samples of one site when its sizes are alike).
  double scaled(uint64_t samples) const {
    return allocs ? static_cast<double>(samples) * weight / static_cast<double>(allocs) : 0;
  }
  uint64_t estimate(uint64_t samples) const {
    const double value = scaled(samples) + 0.5;
    return value < 1.8e19 ? static_cast<uint64_t>(value) : ~uint64_t{0};  // saturated
  }
};

// Loads site `id`'s figures into `row`: false when it has no samples.
bool load_row(const SamplingView& view, uint32_t id, SiteRow& row) {
  const SiteStats& site = view.depot->site(id);
  const uint64_t allocs = load(site.allocs);
  if (allocs == 0) return false;
  row.id = id;
  row.allocs = allocs;
  row.bytes = load(site.bytes);
  row.min_size = load(site.min_size);
  row.max_size = load(site.max_size);
  // By count every sample weighs the rate; by bytes the site kept its sum.
  row.weight = view.mean_bytes ? static_cast<double>(load(site.weight)) / static_cast<double>(uint64_t{1} << kWeightShift)
                               : static_cast<double>(allocs) * static_cast<double>(view.rate);
  row.weighted_bytes = view.mean_bytes ? load(site.weighted_bytes) : row.bytes * view.rate;
  const LifetimeStats& life = site.lifetimes;
  row.frees = load(life.frees);
  row.short_lived = load(life.short_lived);
  row.recycled = load(life.recycled);
  row.temporary = load(life.temporary);
  for (unsigned e = 0; e < 3; ++e) row.escapes[e] = load(life.escapes[e]);
  row.calls = load(life.calls_between);
  for (unsigned b = 0; b < kLifetimeBuckets; ++b) row.histogram[b] = load(life.histogram[b]);
  row.median_ns = histogram_median(row.histogram, kLifetimeBuckets, view.longest_ns);
  return true;
}

// Calls visit(row) for every site with samples, in the order of their ids;
// returns how many there are. Rows are not kept: a run can fill the whole
// depot (StackDepot::kIds - 1 sites), and a report needs only its top lists.
template <typename Visit>
unsigned for_each_site(const SamplingView& view, Visit visit) {
  unsigned count = 0;
  const uint32_t ids = view.depot->id_limit();
  SiteRow row;
  for (uint32_t id = 1; id < ids; ++id) {
    if (!load_row(view, id, row)) continue;
    ++count;
    visit(static_cast<const SiteRow&>(row));
  }
  return count;
}

// The `capacity` sites with the largest key (those of key 0 left out),
// best first, from the rows offered one by one; of equal keys, the first
// offered ranks first. Rows are copied into `storage` (capacity rows) and
// ranked by index, so an offer moves indices, never rows.
template <typename Key>
class TopRows {
 public:
  TopRows(SiteRow* storage, unsigned* order, unsigned capacity, Key key)
      : rows_(storage), order_(order), capacity_(capacity), key_(key) {}
  void offer(const SiteRow& row) {
    const auto key = key_(row);
    if (capacity_ == 0 || key == 0) return;  // HOTPOOL_TOP=0: no list
    unsigned pos = count_;
    unsigned slot = count_;
    if (count_ == capacity_) {
      if (key <= key_(rows_[order_[capacity_ - 1]])) return;
      pos = capacity_ - 1;
      slot = order_[pos];  // the last one's storage
    } else {
      ++count_;
    }
    while (pos > 0 && key_(rows_[order_[pos - 1]]) < key) {
      order_[pos] = order_[pos - 1];
      --pos;
    }
    rows_[slot] = row;
    order_[pos] = slot;
  }
  unsigned size() const { return count_; }
  const SiteRow& operator[](unsigned rank) const { return rows_[order_[rank]]; }

 private:
  SiteRow* rows_;
  unsigned* order_;
  unsigned capacity_, count_ = 0;
  Key key_;
};

// Storage for the top lists of one report (the reports run under their
// lock, one at a time): the JSON report's two lists, or the text report's
// three of at most kMaxTop each.
constexpr unsigned kJsonSites = 256, kJsonBytesSites = 64;
static_assert(3 * kMaxTop <= kJsonSites + kJsonBytesSites, "the text report's lists fit");
constinit SiteRow g_rows[kJsonSites + kJsonBytesSites];
constinit unsigned g_order[kJsonSites + kJsonBytesSites];

// What a person can do about a site, from its escape classes.
const char* advice(const SiteRow& row) {
  const uint64_t freed = row.frees;
  if (row.live() * 2 > row.allocs) return "mostly live at exit: long-lived by design, or a leak";
  if (freed == 0) return "";
  if (row.escapes[static_cast<unsigned>(Escape::FrameLocal)] * 2 > freed)
    return "freed in its own frame: a stack or small-buffer candidate";
  if (row.escapes[static_cast<unsigned>(Escape::ThreadLocal)] * 2 > freed) {
    if (row.short_lived * 2 > freed) return "short-lived, freed by its thread: a pool candidate";
    if (row.recycled * 2 > freed) return "recycled by its thread: a pool candidate";
  }
  if (row.escapes[static_cast<unsigned>(Escape::CrossThread)] * 2 > freed)
    return "freed by another thread: pooled through the depot, or keep it per thread";
  return "";
}

// One frame of the text report: "function (file:line)", or "function
// (module+0xoffset)" without debug information; the function by its short
// name (frame_names.h).
void write_frame(Output& out, const char* function, const char* file, unsigned line, const Symbol& symbol) {
  char name[sizeof symbol.function];
  short_function_name(function, name, sizeof name);
  out.str(name);
  if (file[0]) {
    const char* slash = std::strrchr(file, '/');
    out.str(" (").str(slash ? slash + 1 : file).ch(':').u64(line).ch(')');
  } else if (symbol.module[0]) {
    out.str(" (").str(symbol.module).str("+0x");
    char hex[17];
    int n = 0;
    uintptr_t value = symbol.offset;
    do hex[n++] = "0123456789abcdef"[value & 15]; while (value >>= 4);
    while (n) out.ch(hex[--n]);
    out.ch(')');
  }
}

// The frames of a site's stack, innermost first: each return address's
// inlined functions (innermost first), then its own function. `visit`
// gets the frame's function, file and line and its address's symbol, and
// returns false to stop. Symbols are cached: a second walk looks nothing up again.
template <typename Visit>
void for_each_frame(const SamplingView& view, const uintptr_t* ips, unsigned depth, Visit visit) {
  for (unsigned f = 0; f < depth; ++f) {
    const Symbol& symbol = *view.symbolize(ips[f]);
    for (unsigned i = 0; i <= symbol.inlined_count; ++i) {
      const bool inlined = i < symbol.inlined_count;
      const InlinedFrame* frame = inlined ? &symbol.inlined[i] : nullptr;
      if (!visit(frame ? frame->function : symbol.function, frame ? frame->file : symbol.file,
                 frame ? frame->line : symbol.line, inlined, symbol))
        return;
    }
  }
}

// A site's stack in the text report, innermost first, from its focus, the
// first frame outside the C and C++ runtime and system headers
// (is_library_frame), the code that asked for the memory: the library
// frames in front of it folded into their count when they are 3 or more,
// but for the last one, the library function the focus called (a
// push_back, a string's append); then 2 * view.frames items, a frame or a
// run of 3 or more library frames folded into their count (a thread's
// start, the standard library's invoke). With no focus, the first
// 2 * view.frames frames as they are.
void write_frames(const SamplingView& view, uint32_t id, Output& out, const char* indent) {
  const uintptr_t* ips = nullptr;
  const unsigned depth = view.depot->stack(id, &ips);
  static bool library[kMaxDepth * (Symbol::kMaxInlined + 1)];
  unsigned count = 0;
  for_each_frame(view, ips, depth, [&](const char*, const char* file, unsigned, bool, const Symbol& symbol) {
    library[count++] = is_library_frame(file, symbol.module);
    return true;
  });
  unsigned focus = 0;
  while (focus < count && library[focus]) ++focus;
  const bool fold = focus < count;
  if (!fold) focus = 0;
  constexpr unsigned kFoldAt = 3;
  // The items to show: a frame (folded 0) or a run of library frames.
  struct Item {
    unsigned first, folded;
  };
  constexpr unsigned kMaxItems = 64;
  Item items[kMaxItems];
  unsigned item_count = 0, frame = 0, from_focus = 0;
  if (fold && focus >= kFoldAt) {
    items[item_count++] = {0, focus - 1};
    frame = focus - 1;
  }
  const unsigned budget = 2 * view.frames;
  while (frame < count && item_count < kMaxItems && !(frame >= focus && from_focus == budget)) {
    unsigned run = 0;
    if (fold && frame > focus)
      while (frame + run < count && library[frame + run]) ++run;
    if (run >= kFoldAt) {
      items[item_count++] = {frame, run};
      frame += run;
    } else {
      items[item_count++] = {frame++, 0};
    }
    if (items[item_count - 1].first >= focus) ++from_focus;
  }
  const bool more = frame < count;
  out.str(indent);
  unsigned next = 0, at = 0;
  for_each_frame(view, ips, depth, [&](const char* function, const char* file, unsigned line, bool, const Symbol& symbol) {
    if (next == item_count) return false;
    const Item& item = items[next];
    if (at++ != item.first) return true;
    if (next++) out.str(" <- ");
    if (item.folded) out.str("(+").u64(item.folded).str(" library frames)");
    else write_frame(out, function, file, line, symbol);
    return true;
  });
  if (more) out.str(" <- ...");
  out.ch('\n');
}

// The tune line: mode auto's rule on the whole run, the classes whose
// short-lived (or recycled: pool_worthy) allocations alone carry at least
// HOTPOOL_HOT (1%) of all allocations, 1000 at least. The share comes from the sampled frees (8 at
// least), else from the frees keeping up with the allocations. The
// expected hit rate is the share of all allocations the chosen classes
// carry (a pooled class serves all its blocks), the rounding waste the
// bytes the chosen classes add to what was requested.
struct Recommendation {
  unsigned count;
  uint64_t sizes[kMaxClasses];
  double hit_rate, rounding_waste;
};

Recommendation recommend(const StatsSnapshot& stats, const SamplingView* view, uint32_t hot_share_ppm) {
  Recommendation result{};
  uint64_t total = 0, hits = 0, class_bytes = 0, requested = 0;
  for (unsigned c = 0; c < stats.class_count; ++c) total += stats.classes[c].allocs;
  for (unsigned c = 0; c + 1 < stats.class_count && total; ++c) {
    const ClassTotals& row = stats.classes[c];
    if (row.allocs == 0) continue;
    double short_share = row.frees >= row.allocs * 3 / 4 ? 1.0 : 0.0;
    if (view && view->class_lifetimes) {
      const LifetimeStats& life = view->class_lifetimes[c];
      const uint64_t freed = load(life.frees);
      if (freed >= 8) short_share = static_cast<double>(pool_worthy(life)) / static_cast<double>(freed);
    }
    const double short_allocs = static_cast<double>(row.allocs) * short_share;
    if (short_allocs * 1e6 < static_cast<double>(total) * hot_share_ppm || short_allocs < 1000) continue;
    result.sizes[result.count++] = stats.class_size[c];
    hits += row.allocs;
    class_bytes += stats.class_size[c] * row.allocs;
    requested += row.requested_bytes;
  }
  result.hit_rate = total ? static_cast<double>(hits) / static_cast<double>(total) : 0;
  result.rounding_waste = class_bytes ? static_cast<double>(minus(class_bytes, requested)) / static_cast<double>(class_bytes) : 0;
  return result;
}

void write_percent(Output& out, double share) {
  out.fixed(static_cast<uint64_t>(share * 1000 + 0.5), 10, 1).ch('%');
}

void write_duration(Output& out, uint64_t ns) {
  if (ns < 1000) out.u64(ns).str(" ns");
  else if (ns < 1000000) out.fixed(ns, 1000, ns < 10000 ? 1 : 0).str(" us");
  else if (ns < 1000000000) out.fixed(ns, 1000000, ns < 10000000 ? 1 : 0).str(" ms");
  else out.fixed(ns, 1000000000, 1).str(" s");
}

void write_text_sampling(const StatsSnapshot& stats, const SamplingView& view, Output& out) {
  // One pass over the sites: the samples in all, and the three lists.
  // Ranked by estimates: by bytes, a sample of a small block stands for more.
  const unsigned top = view.top < kMaxTop ? view.top : kMaxTop;
  TopRows hot(g_rows, g_order, top, [](const SiteRow& r) { return r.scaled(r.short_lived); });
  TopRows heavy(g_rows + kMaxTop, g_order + kMaxTop, top, [](const SiteRow& r) { return r.weighted_bytes; });
  TopRows live(g_rows + 2 * kMaxTop, g_order + 2 * kMaxTop, top, [](const SiteRow& r) { return r.scaled(r.live()); });
  uint64_t samples = 0;
  for_each_site(view, [&](const SiteRow& row) {
    samples += row.allocs;
    hot.offer(row);
    heavy.offer(row);
    live.offer(row);
  });
  if (samples + view.unsited == 0) return;
  const bool estimated = view.rate != 1;
  out.str("  lifetimes from ").count(samples + view.unsited).str(" sampled allocations");
  if (view.mean_bytes) {
    out.str(" (by bytes: one per ").bytes(view.mean_bytes)
        .str(" on average; figures marked ~ are estimates: each sample counts 1 / its chance of being sampled)");
  } else if (estimated) {
    out.str(" (1 in ").u64(view.rate).str(" on average; figures marked ~ are estimates: samples x ").u64(view.rate).ch(')');
  } else {
    out.str(" (every allocation)");
  }
  out.str(", short-lived = at most ");
  write_duration(out, view.short_ns);
  out.str(", recycled = freed by its thread within ").u64(view.recycle_calls).str(" of its calls\n");
  if (!view.sites) {
    out.str("  call stacks not recorded (HOTPOOL_SITES=off, or HOTPOOL_REPORT=off without HOTPOOL_SITES=on):"
            " no sites, and frame-local is not told from thread-local\n");
  } else if (view.unsited) {
    out.str("  ").count(view.unsited).str(" of them have no site (no stack captured, or all ")
        .u64(StackDepot::kIds - 1).str(" sites of the stack depot taken): the size classes count them, the sites do not\n");
  }
  // Where libgcc walked many of the stacks, sampling cost more than it
  // does once the frame table knows the program's frames: said, with why.
  if (const uint64_t stacks = view.stacks_replayed + view.stacks_walked + view.stacks_recalled;
      view.stacks_walked >= 100 && view.stacks_walked * 10 >= stacks) {
    out.str("  ").percent(view.stacks_walked, stacks)
        .str(" of the sampled stacks were walked by libgcc (some 1,000-2,000 instructions a frame), the rest"
             " replayed from what earlier walks learned or recalled; walked are stacks other than the threads' own (signal"
             " handlers' alternate stacks, coroutines), signal frames, code without unwind tables, and frames of"
             " changing size (alloca) whose frame pointer the replay cannot find\n");
  }
  out.str("  size class  short-lived  recycled  median life  temporary  frame-local  thread-local  cross-thread\n");
  for (unsigned c = 0; c < stats.class_count; ++c) {
    const LifetimeStats& life = view.class_lifetimes[c];
    const uint64_t freed = load(life.frees);
    if (freed == 0) continue;
    uint64_t histogram[kLifetimeBuckets];
    for (unsigned b = 0; b < kLifetimeBuckets; ++b) histogram[b] = load(life.histogram[b]);
    if (c + 1 == stats.class_count) out.str("       large");
    else out.padded(10, [&](Output& o) { o.u64(stats.class_size[c]); }).str(" B");
    out.padded(13, [&](Output& o) { o.percent(load(life.short_lived), freed); })
        .padded(10, [&](Output& o) { o.percent(load(life.recycled), freed); })
        .padded(13, [&](Output& o) { write_duration(o, histogram_median(histogram, kLifetimeBuckets, view.longest_ns)); })
        .padded(11, [&](Output& o) { o.percent(load(life.temporary), freed); })
        .padded(13, [&](Output& o) { view.sites ? o.percent(load(life.escapes[0]), freed) : o.ch('-'); })
        .padded(14, [&](Output& o) { view.sites ? o.percent(load(life.escapes[1]), freed) : o.ch('-'); })
        .padded(14, [&](Output& o) { o.percent(load(life.escapes[2]), freed); })
        .ch('\n');
  }
  auto site_line = [&](const SiteRow& row, unsigned rank) {
    out.str("   #").u64(rank).str("  ").str(estimated ? "~" : "").count(row.estimate(row.allocs)).str(" x ");
    if (row.min_size == row.max_size) out.bytes(row.min_size);
    else out.bytes(row.min_size).str("..").bytes(row.max_size);
    if (row.frees) {
      out.str(", ").percent(row.short_lived, row.frees).str(" short-lived (median ");
      write_duration(out, row.median_ns);
      out.str("), ").percent(row.escapes[0], row.frees).str(" frame-local, ")
          .percent(row.escapes[2], row.frees).str(" cross-thread");
    }
    if (row.live()) out.str(", ").str(estimated ? "~" : "").count(row.estimate(row.live())).str(" live at exit");
    const char* what = advice(row);
    if (what[0]) out.str(" -> ").str(what);
    out.ch('\n');
    write_frames(view, row.id, out, "       ");
  };
  auto list = [&](const auto& rows, const char* title) {
    if (rows.size()) out.str(title);
    for (unsigned i = 0; i < rows.size(); ++i) site_line(rows[i], i + 1);
  };
  list(hot, "  hot sites, short-lived first\n");
  list(heavy, "  sites by bytes allocated\n");
  list(live, "  live at exit (leaks, or long-lived by design)\n");
}

void write_tune_line(const StatsSnapshot& stats, const SamplingView* view, bool explicit_classes, uint32_t hot_share_ppm,
                     Output& out) {
  const Recommendation advice_line = recommend(stats, view, hot_share_ppm);
  if (advice_line.count == 0) return;
  out.str("  tune: export HOTPOOL_CLASSES=");
  for (unsigned i = 0; i < advice_line.count; ++i) out.str(i ? "," : "").u64(advice_line.sizes[i]);
  out.str("   # expected pool hit rate ");
  write_percent(out, advice_line.hit_rate);
  out.str(", rounding waste ");
  write_percent(out, advice_line.rounding_waste);
  // It can only pick among the run's classes: a sparse list's waste is its own.
  if (explicit_classes) out.str(" (chosen among this run's HOTPOOL_CLASSES; a run without it chooses among finer ones)");
  out.ch('\n');
}

void write_json_histogram(Output& out, const uint64_t* histogram) {
  out.ch('[');
  for (unsigned b = 0; b < kLifetimeBuckets; ++b) out.str(b ? ", " : "").u64(histogram[b]);
  out.ch(']');
}

void write_json_sampling(const StatsSnapshot& stats, const SamplingView* view, uint32_t hot_share_ppm, Output& out) {
  const Recommendation tune = recommend(stats, view, hot_share_ppm);
  out.str(",\n  \"recommendation\": {\"classes\": [");
  for (unsigned i = 0; i < tune.count; ++i) out.str(i ? ", " : "").u64(tune.sizes[i]);
  out.str("], \"expected_hit_rate\": ").fixed(static_cast<uint64_t>(tune.hit_rate * 10000 + 0.5), 10000, 4)
      .str(", \"rounding_waste\": ").fixed(static_cast<uint64_t>(tune.rounding_waste * 10000 + 0.5), 10000, 4)
      .str(", \"export\": ");
  if (tune.count) {
    out.str("\"export HOTPOOL_CLASSES=");
    for (unsigned i = 0; i < tune.count; ++i) out.str(i ? "," : "").u64(tune.sizes[i]);
    out.ch('"');
  } else {
    out.str("null");
  }
  out.ch('}');
  if (!view) {
    out.str(",\n  \"sampling\": null");
    return;
  }
  out.str(",\n  \"sampling\": {\"rate\": ").u64(view->rate)
      .str(", \"by\": ").str(view->mean_bytes ? "\"bytes\"" : "\"allocations\"")
      .str(", \"mean_bytes\": ").u64(view->mean_bytes).str(", \"short_ns\": ").u64(view->short_ns)
      .str(", \"recycle_calls\": ").u64(view->recycle_calls)
      .str(", \"unsited\": ").u64(view->unsited)
      .str(", \"sites_recorded\": ").str(view->sites ? "true" : "false")
      .str(", \"stacks\": {\"replayed\": ").u64(view->stacks_replayed)
      .str(", \"walked\": ").u64(view->stacks_walked)
      .str(", \"recalled\": ").u64(view->stacks_recalled).ch('}')
      .str(", \"lifetime_bucket_bounds_ns\": [");
  for (unsigned b = 1; b < kLifetimeBuckets; ++b) out.str(b > 1 ? ", " : "").u64(lifetime_bucket_low(b));
  out.str("]},\n  \"class_lifetimes\": [");
  bool first = true;
  for (unsigned c = 0; c < stats.class_count; ++c) {
    const LifetimeStats& life = view->class_lifetimes[c];
    if (load(life.frees) == 0) continue;
    uint64_t histogram[kLifetimeBuckets];
    for (unsigned b = 0; b < kLifetimeBuckets; ++b) histogram[b] = load(life.histogram[b]);
    out.str(first ? "\n" : ",\n").str("    {\"size\": ");
    first = false;
    if (c + 1 == stats.class_count) out.str("null"); else out.u64(stats.class_size[c]);
    out.str(", \"sampled_frees\": ").u64(load(life.frees)).str(", \"short_lived\": ").u64(load(life.short_lived))
        .str(", \"recycled\": ").u64(load(life.recycled))
        .str(", \"temporary\": ").u64(load(life.temporary))
        .str(", \"frame_local\": ").u64(load(life.escapes[0]))
        .str(", \"thread_local\": ").u64(load(life.escapes[1]))
        .str(", \"cross_thread\": ").u64(load(life.escapes[2]))
        .str(", \"median_lifetime_ns\": ").u64(histogram_median(histogram, kLifetimeBuckets, view->longest_ns))
        .str(", \"lifetime_histogram\": ");
    write_json_histogram(out, histogram);
    out.ch('}');
  }
  out.str(first ? "]" : "\n  ]");
  // The sites with the most (estimated) allocations, at most kJsonSites of
  // them, and those of the kJsonBytesSites with the most bytes that are not
  // among them (by bytes, a site of rare large blocks ranks low by count);
  // at most kJsonFrames frames each: symbolizing costs milliseconds a frame.
  constexpr unsigned kJsonFrames = 16;
  TopRows by_count(g_rows, g_order, kJsonSites, [](const SiteRow& r) { return r.weight; });
  TopRows by_bytes(g_rows + kJsonSites, g_order + kJsonSites, kJsonBytesSites,
                   [](const SiteRow& r) { return r.weighted_bytes; });
  const unsigned count = for_each_site(*view, [&](const SiteRow& row) {
    by_count.offer(row);
    by_bytes.offer(row);
  });
  static const SiteRow* shown_rows[kJsonSites + kJsonBytesSites];
  unsigned shown = 0;
  for (unsigned i = 0; i < by_count.size(); ++i) shown_rows[shown++] = &by_count[i];
  for (unsigned i = 0; i < by_bytes.size(); ++i) {
    bool listed = false;
    for (unsigned j = 0; j < by_count.size() && !listed; ++j) listed = by_count[j].id == by_bytes[i].id;
    if (!listed) shown_rows[shown++] = &by_bytes[i];
  }
  out.str(",\n  \"sites_total\": ").u64(count).str(",\n  \"sites\": [");
  for (unsigned i = 0; i < shown; ++i) {
    const SiteRow& row = *shown_rows[i];
    out.str(i ? ",\n" : "\n").str("    {\"id\": ").u64(row.id)
        .str(", \"sampled_allocations\": ").u64(row.allocs)
        .str(", \"estimated_allocations\": ").u64(row.estimate(row.allocs))
        .str(", \"sampled_bytes\": ").u64(row.bytes)
        .str(", \"estimated_bytes\": ").u64(row.weighted_bytes)
        .str(", \"min_size\": ").u64(row.min_size).str(", \"max_size\": ").u64(row.max_size)
        .str(", \"sampled_frees\": ").u64(row.frees)
        .str(", \"short_lived\": ").u64(row.short_lived)
        .str(", \"recycled\": ").u64(row.recycled)
        .str(", \"temporary\": ").u64(row.temporary)
        .str(", \"frame_local\": ").u64(row.escapes[0])
        .str(", \"thread_local\": ").u64(row.escapes[1])
        .str(", \"cross_thread\": ").u64(row.escapes[2])
        .str(", \"live_at_exit\": ").u64(row.live())
        .str(", \"mean_calls_between\": ").u64(row.frees ? row.calls / row.frees : 0)
        .str(", \"median_lifetime_ns\": ").u64(row.median_ns)
        .str(", \"lifetime_histogram\": ");
    write_json_histogram(out, row.histogram);
    out.str(", \"advice\": ").json_string(advice(row)).str(", \"frames\": [");
    const uintptr_t* ips = nullptr;
    unsigned depth = view->depot->stack(row.id, &ips);
    if (depth > kJsonFrames) depth = kJsonFrames;
    // The functions inlined at each address first (innermost first), each
    // marked inlined, then the address's own function.
    unsigned frame = 0, focus = 0;
    bool focused = false;  // the focus (see write_frames) found
    for_each_frame(*view, ips, depth, [&](const char* function, const char* file, unsigned line, bool inlined,
                                          const Symbol& symbol) {
      if (!focused) {
        focused = !is_library_frame(file, symbol.module);
        if (!focused) ++focus;
      }
      char short_name[sizeof symbol.function];
      short_function_name(function, short_name, sizeof short_name);
      out.str(frame++ ? ", " : "").str("{\"function\": ").json_string(function)
          .str(", \"short_function\": ").json_string(short_name)
          .str(", \"file\": ").json_string(file)
          .str(", \"line\": ").u64(line)
          .str(", \"inlined\": ").str(inlined ? "true" : "false")
          .str(", \"module\": ").json_string(symbol.module).str(", \"offset\": ").u64(symbol.offset).ch('}');
      return true;
    });
    out.str("], \"focus_frame\": ");
    if (focused) out.u64(focus);
    else out.str("null");
    out.ch('}');
  }
  out.str(shown ? "\n  ]" : "]");
}

}  // namespace

void write_text_report(const StatsSnapshot& stats, const ReportContext& context, Output& out) {
  const Totals total = sum(stats);
  out.str("hotpool: pid ").i64(context.pid).ch(' ').str(context.program);
  if (context.forked_from) out.str(" (forked from pid ").i64(context.forked_from).ch(')');
  out.str(", mode ").str(context.mode).str(" - ").count(total.allocs).str(" allocations, ")
      .count(total.frees).str(" frees, ").bytes(total.requested).str(" requested, peak ")
      .bytes(stats.total_peak_live_bytes).str(" live, ").u64(stats.threads_seen)
      .str(stats.threads_seen == 1 ? " thread" : " threads").str(" allocating, ")
      .fixed(context.duration_ns, 1000000000, 2).str(" s");
  if (context.reason[0] != 'e') out.str(" (").str(context.reason).ch(')');
  out.ch('\n');
  if (context.note) out.str("hotpool: ").str(context.note).ch('\n');

  const bool pools = stats.pools_active;
  out.str("  size class     allocs      frees   requested   rounding   peak live  live now  threads");
  out.str(pools ? "  pooled  pool hits\n" : "\n");
  for (unsigned c = 0; c < stats.class_count; ++c) {
    const ClassTotals& row = stats.classes[c];
    if (row.allocs == 0 && row.frees == 0) continue;
    if (is_large(stats, c)) {
      out.str("       large");
    } else {
      out.padded(10, [&](Output& o) { o.u64(stats.class_size[c]); }).str(" B");
    }
    out.padded(11, [&](Output& o) { o.count(row.allocs); })
        .padded(11, [&](Output& o) { o.count(row.frees); })
        .padded(12, [&](Output& o) { o.bytes(row.requested_bytes); })
        .padded(11, [&](Output& o) { o.percent(minus(row.usable_bytes, row.requested_bytes), row.usable_bytes); })
        .padded(12, [&](Output& o) { o.bytes(row.peak_live_bytes); })
        .padded(10, [&](Output& o) { o.bytes(live_bytes(row)); })
        .padded(9, [&](Output& o) { o.u64(row.threads); });
    if (pools) {
      const PoolClassTotals& pool = stats.pools[c];
      out.str(pool.pooled ? "     yes" : "      no")
          .padded(11, [&](Output& o) { if (row.pooled_allocs) o.percent(row.pooled_allocs, row.allocs); else o.ch('-'); });
    }
    out.ch('\n');
  }
  out.str("       total")
      .padded(11, [&](Output& o) { o.count(total.allocs); })
      .padded(11, [&](Output& o) { o.count(total.frees); })
      .padded(12, [&](Output& o) { o.bytes(total.requested); })
      .padded(11, [&](Output& o) { o.percent(minus(total.usable, total.requested), total.usable); })
      .padded(12, [&](Output& o) { o.bytes(stats.total_peak_live_bytes); })
      .padded(10, [&](Output& o) { o.bytes(minus(total.usable, total.freed)); })
      .padded(9, [&](Output& o) { o.u64(stats.threads_seen); })
      .ch('\n');
  if (pools) {
    uint64_t hits = 0, refills = 0, drains = 0, misses = 0, committed = 0, peak = 0, free_bytes = 0, pooled = 0,
             quarantined = 0;
    for (unsigned c = 0; c < stats.class_count; ++c) {
      const PoolClassTotals& pool = stats.pools[c];
      hits += stats.classes[c].pooled_allocs;
      refills += pool.refills;
      drains += pool.drains;
      misses += pool.misses;
      committed += pool.committed_bytes;
      peak += pool.peak_committed_bytes;
      free_bytes += pool.depot_free_bytes + pool.cached_blocks * stats.class_size[c];
      pooled += pool.pooled;
      quarantined += pool.quarantined_blocks;
    }
    out.str("  recycler: ").count(hits).str(" of ").count(total.allocs).str(" allocations served from pools (")
        .percent(hits, total.allocs).str("), ").u64(pooled).str(pooled == 1 ? " class" : " classes")
        .str(" pooled; ").count(refills).str(" refills, ").count(drains).str(" drains");
    if (misses) out.str(", ").count(misses).str(" misses (pool full)");
    if (quarantined) out.str(", ").count(quarantined).str(" blocks quarantined (written after their free)");
    out.str("; pool memory ").bytes(committed).str(" (peak ").bytes(peak).str("), ").bytes(free_bytes)
        .str(" of it free\n");
  }
  if (context.sampling) write_text_sampling(stats, *context.sampling, out);
  write_tune_line(stats, context.sampling, context.explicit_classes, context.hot_share_ppm, out);
  out.str("  counts are exact; a block belongs to the smallest class >= its usable size; "
          "rounding = usable bytes the program did not ask for; pooled = at exit, pool hits = over the whole run");
  if (context.peak_error_bytes)
    out.str("; peak live may read low by up to ").bytes(context.peak_error_bytes)
        .str(" per class (").u64(stats.threads_at_once).str(stats.threads_at_once == 1 ? " thread" : " threads")
        .str(" at once)");
  out.ch('\n');
}

void write_json_report(const StatsSnapshot& stats, const ReportContext& context, Output& out) {
  const Totals total = sum(stats);
  out.str("{\n  \"schema\": \"hotpool-report\",\n  \"version\": ").i64(kJsonSchemaVersion);
  out.str(",\n  \"pid\": ").i64(context.pid).str(",\n  \"parent_pid\": ").i64(context.parent_pid);
  out.str(",\n  \"forked_from\": ");
  if (context.forked_from) out.i64(context.forked_from); else out.str("null");
  out.str(",\n  \"program\": ").json_string(context.program);
  out.str(",\n  \"mode\": ").json_string(context.mode);
  out.str(",\n  \"reason\": ").json_string(context.reason);
  out.str(",\n  \"note\": ");
  if (context.note) out.json_string(context.note); else out.str("null");
  out.str(",\n  \"duration_ns\": ").u64(context.duration_ns);
  out.str(",\n  \"options\": {");
  for (unsigned i = 0; i < context.option_count; ++i) {
    out.str(i ? ", " : "").json_string(context.option_names[i]).str(": ").json_string(context.option_values[i]);
  }
  out.str("},\n  \"totals\": {\"allocations\": ").u64(total.allocs)
      .str(", \"frees\": ").u64(total.frees)
      .str(", \"requested_bytes\": ").u64(total.requested)
      .str(", \"usable_bytes\": ").u64(total.usable)
      .str(", \"rounding_bytes\": ").u64(minus(total.usable, total.requested))
      .str(", \"live_bytes\": ").u64(minus(total.usable, total.freed))
      .str(", \"peak_live_bytes\": ").u64(stats.total_peak_live_bytes)
      .str(", \"threads_seen\": ").u64(stats.threads_seen)
      .str(", \"threads_at_once\": ").u64(stats.threads_at_once)
      .str(", \"peak_error_bytes\": ").u64(context.peak_error_bytes);
  if (stats.pools_active) {
    uint64_t hits = 0, committed = 0, peak = 0;
    for (unsigned c = 0; c < stats.class_count; ++c) {
      hits += stats.classes[c].pooled_allocs;
      committed += stats.pools[c].committed_bytes;
      peak += stats.pools[c].peak_committed_bytes;
    }
    out.str(", \"pool_hits\": ").u64(hits).str(", \"pool_committed_bytes\": ").u64(committed)
        .str(", \"pool_peak_committed_bytes\": ").u64(peak);
  }
  out.str("},\n  \"classes\": [");
  bool first = true;
  for (unsigned c = 0; c < stats.class_count; ++c) {
    const ClassTotals& row = stats.classes[c];
    if (row.allocs == 0 && row.frees == 0) continue;
    out.str(first ? "\n" : ",\n").str("    {\"size\": ");
    first = false;
    if (is_large(stats, c)) out.str("null, \"large\": true"); else out.u64(stats.class_size[c]).str(", \"large\": false");
    out.str(", \"allocations\": ").u64(row.allocs)
        .str(", \"frees\": ").u64(row.frees)
        .str(", \"requested_bytes\": ").u64(row.requested_bytes)
        .str(", \"usable_bytes\": ").u64(row.usable_bytes)
        .str(", \"rounding_bytes\": ").u64(minus(row.usable_bytes, row.requested_bytes))
        .str(", \"freed_bytes\": ").u64(row.freed_bytes)
        .str(", \"live_bytes\": ").u64(live_bytes(row))
        .str(", \"peak_live_bytes\": ").u64(row.peak_live_bytes)
        .str(", \"threads\": ").u64(row.threads);
    if (stats.pools_active && !is_large(stats, c)) {
      const PoolClassTotals& pool = stats.pools[c];
      out.str(", \"pool\": {\"pooled\": ").str(pool.pooled ? "true" : "false")
          .str(", \"hits\": ").u64(row.pooled_allocs).str(", \"refills\": ").u64(pool.refills)
          .str(", \"drains\": ").u64(pool.drains).str(", \"misses\": ").u64(pool.misses)
          .str(", \"free_bytes\": ").u64(pool.depot_free_bytes + pool.cached_blocks * stats.class_size[c])
          .str(", \"committed_bytes\": ").u64(pool.committed_bytes)
          .str(", \"peak_committed_bytes\": ").u64(pool.peak_committed_bytes)
          .str(", \"quarantined_blocks\": ").u64(pool.quarantined_blocks).ch('}');
    }
    out.ch('}');
  }
  out.str(first ? "]" : "\n  ]");
  write_json_sampling(stats, context.sampling, context.hot_share_ppm, out);
  out.str("\n}\n");
}

}  // namespace hotpool::reporter
