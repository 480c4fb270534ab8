#include "report.h"

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
    uint64_t hits = 0, refills = 0, drains = 0, misses = 0, committed = 0, peak = 0, free_bytes = 0, pooled = 0;
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
    }
    out.str("  recycler: ").count(hits).str(" of ").count(total.allocs).str(" allocations served from pools (")
        .percent(hits, total.allocs).str("), ").u64(pooled).str(pooled == 1 ? " class" : " classes")
        .str(" pooled; ").count(refills).str(" refills, ").count(drains).str(" drains");
    if (misses) out.str(", ").count(misses).str(" misses (pool full)");
    out.str("; pool memory ").bytes(committed).str(" (peak ").bytes(peak).str("), ").bytes(free_bytes)
        .str(" of it free\n");
  }
  out.str("  counts are exact; a block belongs to the smallest class >= its usable size; "
          "rounding = usable bytes the program did not ask for");
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
          .str(", \"peak_committed_bytes\": ").u64(pool.peak_committed_bytes).ch('}');
    }
    out.ch('}');
  }
  out.str(first ? "]\n}\n" : "\n  ]\n}\n");
}

}  // namespace hotpool::reporter
