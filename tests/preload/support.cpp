#include "support.h"

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>

#include "hotpool/hotpool.h"

// The documented way to call hotpool without depending on it.
#pragma weak hotpool_report

namespace preload_test {

std::string mode_under_test() {
  const char* mode = getenv("HOTPOOL_MODE");
  return mode ? mode : "";
}

bool mode_records() { return mode_under_test() != "off"; }

namespace {

std::string output_pattern() {
  const char* output = getenv("HOTPOOL_OUTPUT");
  return output ? output : "";
}

std::string expand_pid(const std::string& pattern, pid_t pid) {
  std::string out;
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] == '%' && i + 1 < pattern.size() && pattern[i + 1] == 'p') {
      out += std::to_string(pid);
      ++i;
    } else if (pattern[i] == '%' && i + 1 < pattern.size() && pattern[i + 1] == '%') {
      out += '%';
      ++i;
    } else {
      out += pattern[i];
    }
  }
  return out;
}

const Json* find_class_row(const Json& report, uint64_t size) {
  if (!report.contains("classes") || !report["classes"].is_array()) return nullptr;
  for (const Json& row : report["classes"]) {
    const bool large = row["size"].is_null();
    if (size == kLargeClass ? large : !large && row["size"].get<uint64_t>() == size) return &row;
  }
  return nullptr;
}

// Removes the report files of an earlier run, so a file found later was
// written by this run. Only names of the form <prefix-of-%p>..., inside the
// directory HOTPOOL_OUTPUT names, are touched.
void remove_stale_reports() {
  const std::string pattern = output_pattern();
  const size_t slash = pattern.rfind('/');
  const size_t pid_at = pattern.find("%p");
  if (slash == std::string::npos || pid_at == std::string::npos || pid_at < slash) return;
  const std::string dir = pattern.substr(0, slash);
  const std::string prefix = pattern.substr(slash + 1, pid_at - slash - 1);
  if (prefix.empty()) return;
  mkdir(dir.c_str(), 0755);  // CMake creates it; a manual run may not have
  DIR* listing = opendir(dir.c_str());
  if (!listing) return;
  while (dirent* entry = readdir(listing)) {
    if (std::strncmp(entry->d_name, prefix.c_str(), prefix.size()) == 0)
      unlink((dir + "/" + entry->d_name).c_str());
  }
  closedir(listing);
}

// Watchdog: every test gets a deadline; SIGALRM names the test and ends the
// process (CTest reports the failure) instead of letting it hang.
char g_running_test[256];
unsigned g_per_test_seconds = 30;

void on_watchdog_alarm(int) {
  static const char head[] = "\npreload watchdog: test ";
  static const char tail[] = " exceeded its deadline (deadlock?)\n";
  ssize_t ignored = write(STDERR_FILENO, head, sizeof(head) - 1);
  ignored = write(STDERR_FILENO, g_running_test, strnlen(g_running_test, sizeof(g_running_test)));
  ignored = write(STDERR_FILENO, tail, sizeof(tail) - 1);
  (void)ignored;
  _exit(2);
}

class WatchdogListener : public testing::EmptyTestEventListener {
  void OnTestStart(const testing::TestInfo& info) override {
    snprintf(g_running_test, sizeof(g_running_test), "%s.%s", info.test_suite_name(), info.name());
    alarm(g_per_test_seconds);
  }
  void OnTestEnd(const testing::TestInfo&) override { alarm(0); }
};

// Reads a whole file into one buffer sized up front (a size above every
// class of the default table), so that reading a report allocates no blocks
// of the sizes the exact-count tests measure.
std::string read_file(const std::string& path, bool* found) {
  std::ifstream in(path, std::ios::binary);
  *found = static_cast<bool>(in);
  std::string text;
  if (!*found) return text;
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  in.seekg(0, std::ios::beg);
  text.reserve(size_t{2} << 20 > static_cast<size_t>(size) + 1 ? size_t{2} << 20 : static_cast<size_t>(size) + 1);
  text.resize(static_cast<size_t>(size));
  in.read(text.data(), size);
  return text;
}

unsigned char pattern_byte(size_t i, uint64_t seed) {
  return static_cast<unsigned char>((i * 131 + seed * 7 + 1) & 0xff);
}

size_t statm_field(int index) {
  FILE* statm = fopen("/proc/self/statm", "r");
  if (!statm) return 0;
  unsigned long fields[2] = {0, 0};
  const int read = fscanf(statm, "%lu %lu", &fields[0], &fields[1]);
  fclose(statm);
  if (read != 2) return 0;
  return fields[index] * static_cast<size_t>(sysconf(_SC_PAGESIZE));
}

}  // namespace

std::string report_path(pid_t pid) { return expand_pid(output_pattern(), pid); }

std::optional<Json> read_report(pid_t pid) {
  const std::string path = report_path(pid);
  bool found = false;
  const std::string text = read_file(path, &found);
  if (!found) return std::nullopt;
  try {
    return Json::parse(text);
  } catch (const std::exception& error) {
    ADD_FAILURE() << path << " is not valid JSON (" << error.what() << "):\n" << text;
    return std::nullopt;
  }
}

std::optional<Json> report_now() {
  if (!hotpool_report) {
    ADD_FAILURE() << "hotpool_report is not resolved: not running under libhotpool.so";
    return std::nullopt;
  }
  hotpool_report();
  std::optional<Json> report = read_report(getpid());
  if (mode_records() && !report) ADD_FAILURE() << "hotpool_report() wrote no " << report_path(getpid());
  if (!mode_records() && report) ADD_FAILURE() << "mode off wrote a report: " << report_path(getpid());
  return mode_records() ? report : std::nullopt;
}

uint64_t class_for_usable(const Json& report, size_t usable) {
  uint64_t best = kLargeClass;
  if (!report.contains("classes")) return best;
  for (const Json& row : report["classes"]) {
    if (row["size"].is_null()) continue;
    const uint64_t size = row["size"].get<uint64_t>();
    if (size >= usable && (best == kLargeClass || size < best)) best = size;
  }
  return best;
}

uint64_t class_allocations(const Json& report, uint64_t size) {
  const Json* row = find_class_row(report, size);
  return row ? (*row)["allocations"].get<uint64_t>() : 0;
}

uint64_t class_frees(const Json& report, uint64_t size) {
  const Json* row = find_class_row(report, size);
  return row ? (*row)["frees"].get<uint64_t>() : 0;
}

std::optional<uint64_t> class_pool_field(const Json& report, uint64_t size, const char* key) {
  const Json* row = find_class_row(report, size);
  if (!row || !row->contains("pool")) return std::nullopt;
  const Json& pool = (*row)["pool"];
  if (!pool.value("pooled", false)) return std::nullopt;
  return pool[key].get<uint64_t>();
}

void arm_child_deadline(unsigned seconds) {
  signal(SIGALRM, SIG_DFL);
  alarm(seconds);
}

std::string wait_for_child(pid_t pid) {
  int status = 0;
  pid_t done;
  do {
    done = waitpid(pid, &status, 0);
  } while (done < 0 && errno == EINTR);
  if (done != pid) return std::string("waitpid failed: ") + strerror(errno);
  if (WIFEXITED(status)) return "exit " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return "signal " + std::to_string(WTERMSIG(status)) + " (" + strsignal(WTERMSIG(status)) + ")";
  return "status " + std::to_string(status);
}

size_t resident_bytes() { return statm_field(1); }
size_t virtual_bytes() { return statm_field(0); }

int run_all_tests(int argc, char** argv, unsigned per_test_seconds) {
  // Before anything else: a suite that is not preloaded would test glibc.
  using ModeFunction = const char* (*)();
  auto* mode_function = reinterpret_cast<ModeFunction>(dlsym(RTLD_DEFAULT, "hotpool_mode"));
  const char* wanted = getenv("HOTPOOL_MODE");
  if (!mode_function || !wanted || std::strcmp(mode_function(), wanted) != 0) {
    fprintf(stderr,
            "%s: must run under LD_PRELOAD=libhotpool.so with HOTPOOL_MODE and HOTPOOL_OUTPUT set "
            "(hotpool_mode %s, HOTPOOL_MODE=%s); run it through ctest\n",
            argv[0], mode_function ? mode_function() : "not found", wanted ? wanted : "(unset)");
    return 1;
  }
  if (output_pattern().find("%p") == std::string::npos) {
    fprintf(stderr, "%s: HOTPOOL_OUTPUT must name a file with %%p in it\n", argv[0]);
    return 1;
  }
  remove_stale_reports();

  testing::InitGoogleTest(&argc, argv);
  g_per_test_seconds = per_test_seconds;
  struct sigaction action = {};
  action.sa_handler = on_watchdog_alarm;
  sigaction(SIGALRM, &action, nullptr);
  testing::UnitTest::GetInstance()->listeners().Append(new WatchdogListener);
  return RUN_ALL_TESTS();
}

void fill_pattern(void* block, size_t size, uint64_t seed) {
  auto* bytes = static_cast<unsigned char*>(block);
  for (size_t i = 0; i < size; ++i) bytes[i] = pattern_byte(i, seed);
}

size_t first_pattern_mismatch(const void* block, size_t size, uint64_t seed) {
  const auto* bytes = static_cast<const unsigned char*>(block);
  for (size_t i = 0; i < size; ++i)
    if (bytes[i] != pattern_byte(i, seed)) return i;
  return SIZE_MAX;
}

}  // namespace preload_test
