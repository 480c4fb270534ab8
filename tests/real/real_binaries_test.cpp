// Unmodified Debian programs, run once without hotpool and once under
// LD_PRELOAD=libhotpool.so in one mode: every command must write the same
// stdout and stderr, byte for byte, and exit the same way. In every mode
// but off, each process must leave a valid JSON report (HOTPOOL_OUTPUT with
// %p), the top-level ones with allocations counted; in off, none at all.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "child_process.h"
#include "workloads.h"

namespace hotpool::test {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// One configuration's run of a workload must finish well inside the CTest
// TIMEOUT (tests/real/CMakeLists.txt); in practice it takes about a second.
constexpr auto kRunDeadline = std::chrono::seconds(45);

std::vector<std::string> test_modes() {
  std::vector<std::string> modes;
  std::stringstream list(HOTPOOL_TEST_MODES);
  for (std::string mode; std::getline(list, mode, ',');) modes.push_back(mode);
  return modes;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string command_line(const Command& command) {
  std::string line;
  for (const std::string& arg : command.argv) line += (line.empty() ? "" : " ") + arg;
  if (!command.stdin_file.empty()) line += " < " + command.stdin_file;
  return line;
}

// Where two outputs first differ, with a little context: full multi-MB
// outputs would drown the message.
std::string first_difference(const std::string& expected, const std::string& actual) {
  const size_t common = std::min(expected.size(), actual.size());
  size_t at = 0;
  while (at < common && expected[at] == actual[at]) ++at;
  const size_t line = 1 + static_cast<size_t>(std::count(expected.begin(), expected.begin() + at, '\n'));
  const size_t from = at < 40 ? 0 : at - 40;
  std::ostringstream out;
  out << "sizes " << expected.size() << " (without hotpool) and " << actual.size()
      << " (with); first difference at byte " << at << ", line " << line << "\n  without: \""
      << expected.substr(from, 80) << "\"\n  with:    \"" << actual.substr(from, 80) << "\"";
  return out.str();
}

// A fresh temporary directory, removed at the end unless the test failed
// or HOTPOOL_REAL_KEEP is set in the test's environment.
class ScratchDirectory {
 public:
  ScratchDirectory() {
    std::string pattern = (fs::temp_directory_path() / "hotpool-real-XXXXXX").string();
    if (mkdtemp(pattern.data())) path_ = pattern;
  }
  ScratchDirectory(const ScratchDirectory&) = delete;
  ScratchDirectory& operator=(const ScratchDirectory&) = delete;
  ~ScratchDirectory() {
    if (path_.empty()) return;
    if (::testing::Test::HasFailure() || getenv("HOTPOOL_REAL_KEEP")) {
      std::cerr << "[ real     ] kept " << path_ << " for inspection\n";
    } else {
      std::error_code ignored;
      fs::remove_all(path_, ignored);
    }
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

struct CommandOutcome {
  ChildResult child;
  std::string stderr_text;
};

struct RunOutcome {
  std::vector<CommandOutcome> commands;
  fs::path work;
  fs::path reports;
};

// Runs every command of the workload in a fresh directory under `root`,
// with the common environment plus `extra` (LD_PRELOAD and HOTPOOL_*).
RunOutcome run_workload(const Workload& workload, const fs::path& root,
                        const std::vector<std::string>& extra) {
  RunOutcome outcome;
  outcome.work = root / "work";
  outcome.reports = root / "reports";
  fs::create_directories(outcome.work);
  fs::create_directories(outcome.reports);
  fs::create_directories(root / "tmp");
  workload.prepare(outcome.work);

  // Nothing from the test's own environment leaks in: no HOTPOOL_*, no
  // pyenv shims, no locale.
  std::vector<std::string> environment = {"PATH=/usr/bin:/bin", "HOME=" + outcome.work.string(),
                                          "TMPDIR=" + (root / "tmp").string(), "LC_ALL=C", "LANG=C",
                                          "TZ=UTC"};
  environment.insert(environment.end(), workload.environment.begin(), workload.environment.end());
  environment.insert(environment.end(), extra.begin(), extra.end());

  const auto deadline = Clock::now() + kRunDeadline;
  for (size_t i = 0; i < workload.commands.size(); ++i) {
    const Command& command = workload.commands[i];
    ChildSpec spec;
    spec.argv = command.argv;
    spec.environment = environment;
    spec.working_directory = outcome.work;
    if (!command.stdin_file.empty()) spec.stdin_path = outcome.work / command.stdin_file;
    spec.stderr_path = root / ("stderr-" + std::to_string(i) + ".txt");
    spec.deadline = deadline;
    CommandOutcome result{run_child(spec), {}};
    result.stderr_text = read_file(spec.stderr_path);
    if (!command.save_stdout_as.empty()) {
      std::ofstream(outcome.work / command.save_stdout_as, std::ios::binary) << result.child.stdout_text;
    }
    const bool usable = result.child.failure.empty() && !result.child.timed_out;
    outcome.commands.push_back(std::move(result));
    if (!usable) break;  // later commands depend on this one
  }
  return outcome;
}

// Each run must stand on its own: the program ran and did what it does.
void expect_ran(const Workload& workload, const RunOutcome& run, const char* which) {
  ASSERT_EQ(run.commands.size(), workload.commands.size()) << which << ": a command could not be run";
  for (size_t i = 0; i < run.commands.size(); ++i) {
    const ChildResult& child = run.commands[i].child;
    const std::string line = command_line(workload.commands[i]);
    ASSERT_TRUE(child.failure.empty()) << which << ": " << line << ": " << child.failure;
    ASSERT_FALSE(child.timed_out) << which << ": " << line << " did not finish in time";
  }
}

using Json = nlohmann::json;

uint64_t sum_over_classes(const Json& classes, const char* field) {
  uint64_t sum = 0;
  for (const Json& size_class : classes) sum += size_class.at(field).get<uint64_t>();
  return sum;
}

// In off mode nothing is written; otherwise every process of the run wrote
// report-<pid>.json (children of git too), each a valid hotpool report, and
// at least one of them counted allocations.
void expect_reports(const Workload& workload, const RunOutcome& run, const std::string& mode) {
  std::map<long, Json> reports;
  for (const fs::directory_entry& entry : fs::directory_iterator(run.reports)) {
    const std::string name = entry.path().filename().string();
    if (mode == "off") {
      ADD_FAILURE() << "mode off wrote a report: " << entry.path();
      continue;
    }
    long pid = 0;
    char tail = 0;
    if (std::sscanf(name.c_str(), "report-%ld.jso%c", &pid, &tail) != 2 || tail != 'n' ||
        name != "report-" + std::to_string(pid) + ".json") {
      ADD_FAILURE() << "unexpected file in the report directory: " << name;
      continue;
    }
    const std::string text = read_file(entry.path());
    Json report = Json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (report.is_discarded()) {
      ADD_FAILURE() << entry.path() << " is not valid JSON:\n" << text.substr(0, 2000);
      continue;
    }
    SCOPED_TRACE(entry.path().string());
    try {
      EXPECT_EQ(report.at("schema"), "hotpool-report");
      EXPECT_EQ(report.at("version"), 2);
      EXPECT_EQ(report.at("pid"), pid);
      EXPECT_EQ(report.at("mode"), mode);
      const Json& totals = report.at("totals");
      const Json& classes = report.at("classes");
      ASSERT_TRUE(classes.is_array());
      const uint64_t allocations = totals.at("allocations").get<uint64_t>();
      const uint64_t frees = totals.at("frees").get<uint64_t>();
      // Counts per class are exact, so they add up to the totals.
      EXPECT_EQ(sum_over_classes(classes, "allocations"), allocations);
      EXPECT_EQ(sum_over_classes(classes, "frees"), frees);
      if (report.at("forked_from").is_null()) {
        EXPECT_LE(frees, allocations) << "a process freed more blocks than it allocated";
      }
    } catch (const Json::exception& error) {
      ADD_FAILURE() << "report lacks a field: " << error.what() << "\n" << text.substr(0, 2000);
      continue;
    }
    reports.emplace(pid, std::move(report));
  }
  if (mode == "off") return;

  ASSERT_FALSE(reports.empty()) << "no report in " << run.reports;
  for (size_t i = 0; i < run.commands.size(); ++i) {
    const pid_t pid = run.commands[i].child.pid;
    const auto found = reports.find(pid);
    if (found == reports.end()) {
      ADD_FAILURE() << "no report-" << pid << ".json for " << command_line(workload.commands[i]);
      continue;
    }
    EXPECT_EQ(found->second.value("program", ""), workload.commands[i].argv[0]) << "pid " << pid;
  }
  // Some processes genuinely never allocate (gzip compresses from static
  // buffers), but every run has one that does.
  uint64_t most = 0;
  for (const auto& [pid, report] : reports) most = std::max(most, report.at("totals").value("allocations", uint64_t{0}));
  EXPECT_GT(most, 0u) << "no report of the run counted an allocation";
}

// The real-binary check, with hotpool preloaded before `underneath` (an
// allocator to stack hotpool on: its real allocator) when that is given.
void check_same_output_status_and_reports(const std::string& workload_name, const std::string& mode,
                                          const std::string& underneath = "") {
  const Workload* workload = find_workload(workload_name);
  ASSERT_NE(workload, nullptr);
  ASSERT_EQ(access(workload->program.c_str(), X_OK), 0)
      << workload->program << " is missing (scripts/test installs it from Debian)";
  ASSERT_EQ(access(HOTPOOL_LIBRARY, R_OK), 0) << HOTPOOL_LIBRARY << " is not built";

  ScratchDirectory scratch;
  ASSERT_FALSE(scratch.path().empty()) << "mkdtemp failed";

  const RunOutcome baseline = run_workload(*workload, scratch.path() / "without", {});
  ASSERT_NO_FATAL_FAILURE(expect_ran(*workload, baseline, "without hotpool"));
  for (size_t i = 0; i < baseline.commands.size(); ++i) {
    const int status = baseline.commands[i].child.wait_status;
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == workload->commands[i].expected_exit)
        << command_line(workload->commands[i]) << " without hotpool: " << describe_wait_status(status)
        << "\n" << baseline.commands[i].stderr_text;
  }
  std::vector<std::string> baseline_outputs;
  for (const CommandOutcome& command : baseline.commands) baseline_outputs.push_back(command.child.stdout_text);
  ASSERT_NO_FATAL_FAILURE(workload->check(baseline.work, baseline_outputs));

  if (!underneath.empty()) {
    ASSERT_EQ(access(underneath.c_str(), R_OK), 0) << underneath << " is missing (scripts/test installs it)";
  }
  std::vector<std::string> hotpool = {
      std::string("LD_PRELOAD=") + HOTPOOL_LIBRARY + (underneath.empty() ? "" : ":" + underneath),
      "HOTPOOL_MODE=" + mode,
      "HOTPOOL_OUTPUT=" + (scratch.path() / "with" / "reports" / "report-%p.json").string()};
  if (mode == "fixed") hotpool.push_back("HOTPOOL_CLASSES=32,48,64,128,1K");
  const RunOutcome with = run_workload(*workload, scratch.path() / "with", hotpool);
  ASSERT_NO_FATAL_FAILURE(expect_ran(*workload, with, "with hotpool"));

  for (size_t i = 0; i < with.commands.size(); ++i) {
    const CommandOutcome& expected = baseline.commands[i];
    const CommandOutcome& actual = with.commands[i];
    SCOPED_TRACE(command_line(workload->commands[i]));
    EXPECT_EQ(describe_wait_status(actual.child.wait_status), describe_wait_status(expected.child.wait_status))
        << "stderr with hotpool:\n" << actual.stderr_text;
    EXPECT_TRUE(actual.child.stdout_text == expected.child.stdout_text)
        << "stdout differs: " << first_difference(expected.child.stdout_text, actual.child.stdout_text);
    EXPECT_TRUE(actual.stderr_text == expected.stderr_text)
        << "stderr differs: " << first_difference(expected.stderr_text, actual.stderr_text);
  }
  std::vector<std::string> outputs;
  for (const CommandOutcome& command : with.commands) outputs.push_back(command.child.stdout_text);
  workload->check(with.work, outputs);
  expect_reports(*workload, with, mode);
}

class RealBinaryTest : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(RealBinaryTest, SameOutputStatusAndReports) {
  const auto& [workload_name, mode] = GetParam();
  check_same_output_status_and_reports(workload_name, mode);
}

// hotpool stacked on jemalloc (LD_PRELOAD=libhotpool.so:libjemalloc.so.2):
// hotpool's real allocator is then jemalloc, whose blocks carry no glibc
// chunk header (a block may start a page whose predecessor is unmapped).
constexpr const char* kJemalloc = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
class StackedOnJemallocTest : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(StackedOnJemallocTest, SameOutputStatusAndReports) {
  const auto& [workload_name, mode] = GetParam();
  check_same_output_status_and_reports(workload_name, mode, kJemalloc);
}

// realloc(p, 0) of a block hotpool serves itself (pooled, sampled) answers
// as the allocator underneath does: glibc and jemalloc free p and return
// NULL, mimalloc returns a block of its smallest size. python3 (ctypes)
// prints each answer, without hotpool and with it in front.
constexpr const char* kMimalloc = "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2";
constexpr const char* kReallocToZero = R"(import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.realloc.restype = ctypes.c_void_p
libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
for size in (24, 100, 5000):
    block = libc.realloc(libc.malloc(size), 0)
    print(size, "NULL" if block is None else "a block")
    if block is not None:
        libc.free(block)
)";

TEST(StackedAllocator, ReallocToZeroOfHotpoolsBlocksAnswersAsTheAllocatorUnderneath) {
  ScratchDirectory scratch;
  const auto run = [&](const std::string& preload, std::vector<std::string> options) {
    ChildSpec spec;
    spec.argv = {"/usr/bin/python3", "-c", kReallocToZero};
    spec.environment = std::move(options);
    spec.environment.push_back("LANG=C");
    spec.environment.push_back("LD_PRELOAD=" + preload);
    spec.working_directory = scratch.path();
    spec.stderr_path = scratch.path() / "stderr";
    spec.deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    const ChildResult child = run_child(spec);
    EXPECT_TRUE(WIFEXITED(child.wait_status) && WEXITSTATUS(child.wait_status) == 0)
        << preload << ": " << describe_wait_status(child.wait_status) << child.failure;
    return child.stdout_text;
  };
  for (const std::string& underneath : {std::string(), std::string(kMimalloc), std::string(kJemalloc)}) {
    ASSERT_TRUE(underneath.empty() || access(underneath.c_str(), R_OK) == 0) << underneath << " is not installed";
    const std::string alone = run(underneath, {});
    EXPECT_EQ(alone.find("24 "), 0u) << alone;
    const std::string stacked = std::string(HOTPOOL_LIBRARY) + (underneath.empty() ? "" : ":" + underneath);
    // Pooled from the first call (mode fixed), then every block sampled.
    EXPECT_EQ(run(stacked, {"HOTPOOL_MODE=fixed", "HOTPOOL_CLASSES=32,112,5008", "HOTPOOL_REPORT=off"}), alone)
        << "pooled, on " << (underneath.empty() ? "glibc" : underneath);
    EXPECT_EQ(run(stacked, {"HOTPOOL_MODE=profile", "HOTPOOL_SAMPLE=1", "HOTPOOL_REPORT=off", "HOTPOOL_SITES=on"}),
              alone)
        << "sampled, on " << (underneath.empty() ? "glibc" : underneath);
  }
}

std::vector<std::string> workload_names() {
  std::vector<std::string> names;
  for (const Workload& workload : real_workloads()) names.push_back(workload.name);
  return names;
}

// python_off, sort_profile, ...
std::string test_name(const ::testing::TestParamInfo<RealBinaryTest::ParamType>& param_info) {
  return std::get<0>(param_info.param) + "_" + std::get<1>(param_info.param);
}

INSTANTIATE_TEST_SUITE_P(Debian, RealBinaryTest,
                         ::testing::Combine(::testing::ValuesIn(workload_names()), ::testing::ValuesIn(test_modes())),
                         test_name);

// The recording modes; python and sqlite3, the workloads that allocate most.
INSTANTIATE_TEST_SUITE_P(Debian, StackedOnJemallocTest,
                         ::testing::Combine(::testing::Values("python", "sqlite3"),
                                            ::testing::Values("profile", "auto")),
                         test_name);

}  // namespace
}  // namespace hotpool::test
