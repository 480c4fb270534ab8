#include "torture.h"

#include <errno.h>
#include <malloc.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>

extern char** environ;

namespace torture {

bool mode_pools() {
  const std::string mode = mode_under_test();
  return mode == "fixed" || mode == "auto";
}

// ---------------------------------------------------------------------------
// Scenarios

namespace {

struct Scenario {
  const char* name;
  ScenarioFunction function;
};
// Filled by static constructors: a fixed array, no allocation.
Scenario g_scenarios[64];
unsigned g_scenario_count = 0;

double monotonic_seconds() {
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<double>(now.tv_sec) + static_cast<double>(now.tv_nsec) * 1e-9;
}

int run_named_scenario(const char* name) {
  for (unsigned i = 0; i < g_scenario_count; ++i) {
    if (std::strcmp(g_scenarios[i].name, name) == 0) return g_scenarios[i].function();
  }
  fprintf(stderr, "torture: no scenario named '%s' in this binary\n", name);
  return 125;
}

bool has_name(const std::string& entry, const std::string& name_equals) {
  return entry.compare(0, name_equals.size(), name_equals) == 0;
}

}  // namespace

ScenarioRegistration::ScenarioRegistration(const char* name, ScenarioFunction function) {
  if (g_scenario_count < sizeof(g_scenarios) / sizeof(g_scenarios[0]))
    g_scenarios[g_scenario_count++] = {name, function};
}

std::string ScenarioRun::value(const std::string& key) const {
  const std::string needle = key + "=";
  std::string found;
  for (size_t at = output.find(needle); at != std::string::npos; at = output.find(needle, at + 1)) {
    if (at != 0 && output[at - 1] != '\n' && output[at - 1] != ' ') continue;
    const size_t start = at + needle.size();
    found = output.substr(start, output.find_first_of(" \n", start) - start);
  }
  return found;
}

uint64_t ScenarioRun::number(const std::string& key) const {
  const std::string text = value(key);
  return text.empty() ? 0 : std::strtoull(text.c_str(), nullptr, 10);
}

ScenarioRun run_scenario(const char* name, Preload preload, const std::vector<std::string>& environment,
                         double deadline_seconds) {
  ScenarioRun run;
  // Everything the child needs is built before fork: the parent may have
  // threads, the child must not allocate.
  std::vector<std::string> entries = environment;
  entries.push_back(std::string("TORTURE_SCENARIO=") + name);
  for (char** entry = environ; *entry; ++entry) {
    const std::string inherited = *entry;
    if (preload == Preload::No && has_name(inherited, "LD_PRELOAD=")) continue;
    if (has_name(inherited, "TORTURE_SCENARIO=")) continue;
    bool replaced = false;
    for (const std::string& extra : environment) {
      const size_t equals = extra.find('=');
      if (equals != std::string::npos && has_name(inherited, extra.substr(0, equals + 1))) replaced = true;
    }
    if (!replaced) entries.push_back(inherited);
  }
  std::vector<char*> envp;
  for (std::string& entry : entries) envp.push_back(entry.data());
  envp.push_back(nullptr);
  char self[4096];
  const ssize_t length = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (length <= 0) return run.status = "readlink /proc/self/exe failed", run;
  self[length] = '\0';
  char* argv[] = {self, nullptr};

  int pipe_fds[2];
  if (pipe(pipe_fds) != 0) return run.status = "pipe failed", run;
  fflush(nullptr);
  const double start = monotonic_seconds();
  run.pid = fork();
  if (run.pid < 0) {
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    return run.status = "fork failed", run;
  }
  if (run.pid == 0) {
    setpgid(0, 0);  // a group of its own: the deadline kills its children too
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    signal(SIGALRM, SIG_DFL);
    alarm(0);
    dup2(pipe_fds[1], STDOUT_FILENO);
    dup2(pipe_fds[1], STDERR_FILENO);
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    execve(self, argv, envp.data());
    _exit(127);
  }
  setpgid(run.pid, run.pid);  // also here, so the group exists before any kill
  close(pipe_fds[1]);

  const double deadline = start + deadline_seconds;
  bool open = true;
  while (open) {
    const double left = deadline - monotonic_seconds();
    if (left <= 0) break;
    pollfd readable = {pipe_fds[0], POLLIN, 0};
    const int ready = poll(&readable, 1, static_cast<int>(left * 1000) + 1);
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) continue;
    char buffer[4096];
    const ssize_t got = read(pipe_fds[0], buffer, sizeof(buffer));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) open = false;
    else run.output.append(buffer, static_cast<size_t>(got));
  }
  // Output closed (or the deadline passed): wait for the exit within what
  // is left of the deadline.
  int status = 0;
  pid_t done = 0;
  while ((done = waitpid(run.pid, &status, WNOHANG)) == 0 && monotonic_seconds() < deadline) usleep(1000);
  if (done == 0) {
    run.timed_out = true;
    kill(-run.pid, SIGKILL);
    kill(run.pid, SIGKILL);
    waitpid(run.pid, &status, 0);
  }
  close(pipe_fds[0]);
  run.seconds = monotonic_seconds() - start;
  if (run.timed_out) {
    char text[128];
    snprintf(text, sizeof(text), "timed out after %.1f s (killed: deadlock or livelock?)", deadline_seconds);
    run.status = text;
  } else if (WIFEXITED(status)) {
    run.status = "exit " + std::to_string(WEXITSTATUS(status));
  } else if (WIFSIGNALED(status)) {
    run.status = killed_by(WTERMSIG(status));
  } else {
    run.status = "status " + std::to_string(status);
  }
  return run;
}

std::string describe(const ScenarioRun& run) {
  std::string text = "scenario process " + std::to_string(run.pid) + ": " + run.status;
  char seconds[32];
  snprintf(seconds, sizeof(seconds), " after %.2f s", run.seconds);
  text += seconds;
  text += "; its output:\n";
  // The tail: the end says how it ended.
  text += run.output.size() > 6000 ? "...\n" + run.output.substr(run.output.size() - 6000) : run.output;
  return text;
}

void say(const char* format, ...) {
  char line[512];
  va_list args;
  va_start(args, format);
  int length = vsnprintf(line, sizeof(line) - 1, format, args);
  va_end(args);
  if (length < 0) return;
  if (length > static_cast<int>(sizeof(line)) - 2) length = sizeof(line) - 2;
  line[length++] = '\n';
  for (int written = 0; written < length;) {
    const ssize_t n = write(STDOUT_FILENO, line + written, static_cast<size_t>(length - written));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    written += static_cast<int>(n);
  }
}

// ---------------------------------------------------------------------------
// Blocks


size_t count_duplicates(std::vector<void*> blocks) {
  std::sort(blocks.begin(), blocks.end());
  size_t duplicates = 0;
  for (size_t i = 1; i < blocks.size(); ++i) duplicates += blocks[i] != nullptr && blocks[i] == blocks[i - 1];
  return duplicates;
}

size_t usable_of(size_t size) {
  void* block = malloc(opaque(size));
  const size_t usable = block ? malloc_usable_size(block) : 0;
  free(block);
  return usable;
}

bool served_by_pool(size_t size, size_t class_size) {
  // Four blocks at once, three of which must say so: one of them may be a
  // sampled block (hotpool's sampler serves about one allocation in 512
  // from a region of its own), whose usable size may be anything.
  void* probes[4];
  int pooled = 0;
  for (void*& probe : probes) {
    probe = malloc(opaque(size));
    pooled += probe && malloc_usable_size(probe) == class_size;
  }
  for (void* probe : probes) free(probe);
  return pooled >= 3;
}

void* pooled_block(size_t size, size_t class_size) {
  if (!warm_until_pooled(size, class_size)) return nullptr;
  for (int attempt = 0; attempt < 16; ++attempt) {
    constexpr int kRow = 8;
    char* row[kRow];
    for (char*& block : row) block = static_cast<char*>(malloc(opaque(size)));
    int found = -1;
    for (int i = 0; i < kRow && found < 0; ++i) {
      if (!row[i] || malloc_usable_size(row[i]) != class_size) continue;
      for (int j = 0; j < kRow; ++j) {
        if (row[j] && (row[j] == row[i] + class_size || row[j] + class_size == row[i])) found = i;
      }
    }
    for (int i = 0; i < kRow; ++i)
      if (i != found) free(row[i]);
    if (found >= 0) return row[found];
  }
  return nullptr;
}

bool warm_until_pooled(size_t size, size_t class_size, uint64_t max_allocations) {
  constexpr int kBatch = 32;
  void* batch[kBatch];
  for (uint64_t done = 0; done < max_allocations && !served_by_pool(size, class_size); done += kBatch) {
    for (void*& block : batch) block = malloc(opaque(size));
    for (void* block : batch) free(block);
  }
  return served_by_pool(size, class_size);
}

std::string killed_by(int signal) {
  return "signal " + std::to_string(signal) + " (" + strsignal(signal) + ")";
}

}  // namespace torture

// Scenario processes run their scenario and nothing else; everything else
// is a gtest binary under LD_PRELOAD (support.cpp checks that).
int main(int argc, char** argv) {
  if (const char* scenario = getenv("TORTURE_SCENARIO")) return torture::run_named_scenario(scenario);
  return preload_test::run_all_tests(argc, argv, 30);
}
