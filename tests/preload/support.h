// Shared helpers of the preload suites: the mode under test, the report
// files hotpool writes (HOTPOOL_OUTPUT, %p = pid), per-test deadlines and a
// main() that refuses to run unless libhotpool.so is really preloaded, so no
// suite can pass vacuously.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace preload_test {

using Json = nlohmann::json;

// HOTPOOL_MODE as the test's environment sets it (CTest: one run per mode).
std::string mode_under_test();
// True in profile, fixed and auto: allocations are counted and reports written.
bool mode_records();

// HOTPOOL_OUTPUT with %p expanded to `pid` (and %% to %).
std::string report_path(pid_t pid);
// The report file hotpool wrote for `pid`, parsed; nullopt when there is no
// file. A file that is not valid JSON is a test failure (and nullopt).
std::optional<Json> read_report(pid_t pid);
// Calls hotpool_report() and reads this process's report back. nullopt in
// mode off (hotpool writes nothing there).
std::optional<Json> report_now();

// A row of the report's "classes" array is identified by its size; the
// large class (size null) by kLargeClass.
inline constexpr uint64_t kLargeClass = 0;
// The class a block of `usable` bytes (malloc_usable_size) is counted in,
// as `report` lists it: the smallest listed sized class >= usable, else the
// large class. Only meaningful on a report that counted such a block.
uint64_t class_for_usable(const Json& report, size_t usable);
// allocations / frees of the class `size` (kLargeClass for large) in
// `report`; 0 when the report does not list it.
uint64_t class_allocations(const Json& report, uint64_t size);
uint64_t class_frees(const Json& report, uint64_t size);
// A field of the class's "pool" object (refills, drains, hits...), when
// the class is pooled in `report`; nothing otherwise.
std::optional<uint64_t> class_pool_field(const Json& report, uint64_t size, const char* key);

// Prevents the optimiser from folding a value it could otherwise see (a
// huge constant size that it would warn about, or a malloc/free pair).
template <typename T>
inline T opaque(T value) {
  asm volatile("" : "+r"(value));
  return value;
}

// A pattern that differs per position and per seed, so that a block that
// moved, overlapped another or was handed out twice is noticed.
void fill_pattern(void* block, size_t size, uint64_t seed);
// The first byte that differs from the pattern; SIZE_MAX when none does.
size_t first_pattern_mismatch(const void* block, size_t size, uint64_t seed);
inline bool pattern_intact(const void* block, size_t size, uint64_t seed) {
  return first_pattern_mismatch(block, size, seed) == SIZE_MAX;
}

// In a forked child: SIGALRM back to its default action (the parent's
// watchdog handler is inherited) and an alarm, so a deadlock kills the
// child instead of hanging the suite.
void arm_child_deadline(unsigned seconds);

// Waits for `pid` and describes how it ended: "exit 0", "exit 3",
// "signal 14 (Alarm clock)".
std::string wait_for_child(pid_t pid);

// Resident set size of this process in bytes (/proc/self/statm).
size_t resident_bytes();
// Virtual size of this process in bytes (/proc/self/statm).
size_t virtual_bytes();

// The shared main of both suites: checks the process runs under
// libhotpool.so in the mode HOTPOOL_MODE names (else exits 1), removes the
// report files an earlier run left in the report directory, installs a
// watchdog that ends a test running longer than `per_test_seconds`, runs
// the tests.
int run_all_tests(int argc, char** argv, unsigned per_test_seconds);

}  // namespace preload_test
