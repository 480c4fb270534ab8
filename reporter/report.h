// The exit report: a text table for people and JSON for tools, both from
// one StatsSnapshot. The JSON schema is documented in docs/report-schema.md;
// bump kJsonSchemaVersion on any incompatible change.
#pragma once

#include <cstdint>

#include "class_stats.h"
#include "output.h"
#include "sites.h"
#include "symbolize.h"

namespace hotpool::reporter {

inline constexpr int kJsonSchemaVersion = 2;
// Sites shown per list in the text report, at most (HOTPOOL_TOP).
inline constexpr unsigned kMaxTop = 64;

// What sampling found, for the report's site, lifetime and advice sections.
struct SamplingView {
  uint64_t rate;            // mean allocations per sample (1: every allocation; 0: by bytes)
  uint64_t mean_bytes;      // by bytes: mean bytes per sample (HOTPOOL_SAMPLE_BYTES), else 0
  uint64_t short_ns;        // the short-lived threshold
  uint64_t recycle_calls;   // the recycled threshold (the freeing thread's allocator calls)
  uint64_t unsited;         // sampled allocations without a site: no stack, or the stack depot full
  // Stacks captured through a thread's trace cache (libgcc's unwinder):
  // replayed from the frame table, or walked by libgcc; and sampled stacks
  // recalled from a thread's stack memo (dense rates: see StackMemo).
  uint64_t stacks_replayed, stacks_walked, stacks_recalled;
  unsigned top;             // sites shown per list (0 to kMaxTop)
  unsigned frames;          // frames shown per site
  uint64_t longest_ns;      // no lifetime is longer: the run's duration (medians never read above it)
  const StackDepot* depot;
  const LifetimeStats* class_lifetimes;  // [class_count], by block class
  const Symbol* (*symbolize)(uintptr_t return_address);  // valid until the next call
  bool sites = true;        // stacks are captured (HOTPOOL_SITES); else every sample is unsited
};

struct ReportContext {
  int pid;
  int parent_pid;          // getppid()
  int forked_from;         // pid of the process this one was forked from, 0 if none
  const char* program;     // argv[0] as the program saw it
  const char* mode;        // effective HOTPOOL_MODE
  const char* reason;      // "exit" or "on-demand"
  const char* note;        // a sentence for the reader, or nullptr
  uint64_t duration_ns;    // since hotpool started in this process
  uint64_t peak_error_bytes;  // bound on how low a class's peak may be
  unsigned option_count;
  const char* const* option_names;
  const char* const* option_values;
  const SamplingView* sampling;  // nullptr: sampling off
  bool explicit_classes;   // the class table is HOTPOOL_CLASSES' list, not the default one
  uint32_t hot_share_ppm = 10000;  // HOTPOOL_HOT, parts per million: the tune line's share
};

void write_text_report(const StatsSnapshot& stats, const ReportContext& context, Output& out);
void write_json_report(const StatsSnapshot& stats, const ReportContext& context, Output& out);

}  // namespace hotpool::reporter
