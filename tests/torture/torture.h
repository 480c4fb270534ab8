// Shared helpers of the torture suites (signals, processes, loader,
// hardening), on top of the preload suites' support (mode, reports,
// watchdog, children).
//
// Many torture cases can hang or kill the process that runs them, so they
// run as *scenarios*: a function of the test binary that run_scenario()
// executes in a fresh process of its own (the binary re-executed with
// TORTURE_SCENARIO=<name>), with or without LD_PRELOAD, under a deadline
// that kills the whole process group. The parent test sees how it ended
// ("exit 0", "signal 6 (Aborted)", a timeout) and everything it wrote, and
// can run the same scenario on plain glibc first to tell hotpool's failures
// from the C library's.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "support.h"

namespace torture {

using preload_test::mode_records;
using preload_test::mode_under_test;
using preload_test::opaque;
using preload_test::wait_for_child;

// True in the modes where pooled classes exist (fixed, auto).
bool mode_pools();

// ---------------------------------------------------------------------------
// Scenarios

using ScenarioFunction = int (*)();

// Registers `function` under `name` (static initialisation); main() runs it
// instead of the tests when TORTURE_SCENARIO names it, and exits with what
// it returns.
struct ScenarioRegistration {
  ScenarioRegistration(const char* name, ScenarioFunction function);
};

#define TORTURE_SCENARIO(name)                                                              \
  int name##_scenario();                                                                    \
  const ::torture::ScenarioRegistration name##_registration(#name, name##_scenario);        \
  int name##_scenario()

enum class Preload { Yes, No };

struct ScenarioRun {
  pid_t pid = 0;
  std::string status;     // as wait_for_child describes it, or "timed out ..."
  bool timed_out = false; // the deadline passed: the process group was killed
  std::string output;     // stdout and stderr, interleaved
  double seconds = 0;

  // The value of the last "key=value" the scenario said (say()); "" if none.
  std::string value(const std::string& key) const;
  uint64_t number(const std::string& key) const;  // value() as a number, 0 if none
  bool said(const std::string& text) const { return output.find(text) != std::string::npos; }
};

// Runs scenario `name` in a fresh process: this binary re-executed with this
// process's environment, minus LD_PRELOAD for Preload::No, plus
// `environment` ("NAME=value", replacing an inherited NAME). Past
// `deadline_seconds` the scenario's process group is killed (SIGKILL).
ScenarioRun run_scenario(const char* name, Preload preload, const std::vector<std::string>& environment = {},
                         double deadline_seconds = 10);

// How a failed run is described in an assertion message.
std::string describe(const ScenarioRun& run);

// In a scenario: writes one line to stdout, unbuffered and without malloc
// (safe in signal handlers and after fork). Used for "key=value" lines.
void say(const char* format, ...) __attribute__((format(printf, 1, 2)));

// ---------------------------------------------------------------------------
// Blocks

using preload_test::fill_pattern;
using preload_test::pattern_intact;

// The number of pointers that appear more than once in `blocks` (a block
// handed out twice while live).
size_t count_duplicates(std::vector<void*> blocks);

// malloc_usable_size of a fresh block of `size` (the block is freed).
size_t usable_of(size_t size);

// Whether requests of `size` are served by a pool right now: pooled blocks
// report exactly their class size as usable size; glibc's usable size of
// the sizes the suites probe with (48, 264, 520...) is never that.
bool served_by_pool(size_t size, size_t class_size);

// Mode auto pools a class once its policy has seen it hot and short-lived
// (a few thousand allocations): malloc+free batches of `size` until
// requests of it are pooled, at most `max_allocations` of them. Returns
// served_by_pool() at the end. In mode fixed the class is pooled already.
bool warm_until_pooled(size_t size, size_t class_size, uint64_t max_allocations = 400000);

// A block of `size` from the pool of class `class_size` (after
// warm_until_pooled), or nullptr. Pooled blocks come from slabs of
// class_size-byte blocks: among a few blocks allocated in a row, the one
// returned has a neighbour exactly class_size bytes away, which neither
// glibc's blocks (16 bytes of header apart) nor sampled blocks (hotpool's
// sampler puts a 64-byte header in front of them) can have. The others of
// the row are freed, so the thread cache's state is not a known one.
void* pooled_block(size_t size, size_t class_size);

// The death of a process by `signal`, as wait_for_child() describes it.
std::string killed_by(int signal);

}  // namespace torture
