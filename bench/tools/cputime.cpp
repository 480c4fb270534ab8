// hotpool-cputime: runs one program and prints what it cost, measured on
// the child alone (wait4's rusage): the benchmark scripts' stopwatch.
//
//   hotpool-cputime [--preload LIB] [--env NAME=VALUE]... [--stdin FILE] [--stdout FILE] -- PROGRAM ARGS...
//
// Prints one line on stdout:  cpu_us=N user_us=N sys_us=N wall_us=N maxrss_kb=N status=N
// (status: the exit code, or 128+signal). The child inherits our
// environment without LD_PRELOAD and HOTPOOL_* (so a caller's settings
// never leak into a baseline run), plus LD_PRELOAD=LIB and each --env.
// The runner itself is never preloaded: it measures, it is not measured.
#include <fcntl.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

extern char** environ;

namespace {

[[noreturn]] void usage(const char* message) {
  std::fprintf(stderr,
               "hotpool-cputime: %s\n"
               "usage: hotpool-cputime [--preload LIB] [--env NAME=VALUE]... [--stdin FILE] "
               "[--stdout FILE] -- PROGRAM ARGS...\n",
               message);
  std::exit(2);
}

long long microseconds(const timeval& tv) { return tv.tv_sec * 1000000LL + tv.tv_usec; }

long long monotonic_us() {
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return now.tv_sec * 1000000LL + now.tv_nsec / 1000;
}

bool is_ours(const char* entry) {
  return std::strncmp(entry, "LD_PRELOAD=", 11) == 0 || std::strncmp(entry, "HOTPOOL_", 8) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string preload, stdin_path = "/dev/null", stdout_path;
  std::vector<std::string> extra_env;
  int first = 1;
  for (; first < argc; ++first) {
    const std::string arg = argv[first];
    auto value = [&]() -> std::string {
      if (first + 1 >= argc) usage(("missing value after " + arg).c_str());
      return argv[++first];
    };
    if (arg == "--") { ++first; break; }
    if (arg == "--preload") preload = value();
    else if (arg == "--env") extra_env.push_back(value());
    else if (arg == "--stdin") stdin_path = value();
    else if (arg == "--stdout") stdout_path = value();
    else usage(("unknown option " + arg).c_str());
  }
  if (first >= argc) usage("no program given");

  std::vector<std::string> env_storage;
  for (char** entry = environ; *entry; ++entry)
    if (!is_ours(*entry)) env_storage.push_back(*entry);
  if (!preload.empty()) env_storage.push_back("LD_PRELOAD=" + preload);
  for (const std::string& entry : extra_env) {
    if (entry.find('=') == std::string::npos) usage(("--env needs NAME=VALUE, not " + entry).c_str());
    env_storage.push_back(entry);
  }
  std::vector<char*> envp;
  for (std::string& entry : env_storage) envp.push_back(entry.data());
  envp.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, stdin_path.c_str(), O_RDONLY, 0);
  if (!stdout_path.empty())
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, stdout_path.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);

  const long long start = monotonic_us();
  pid_t pid;
  const int spawned = posix_spawn(&pid, argv[first], &actions, nullptr, argv + first, envp.data());
  posix_spawn_file_actions_destroy(&actions);
  if (spawned != 0) {
    std::fprintf(stderr, "hotpool-cputime: cannot run %s: %s\n", argv[first], std::strerror(spawned));
    return 127;
  }
  int status = 0;
  rusage usage_of_child{};
  while (wait4(pid, &status, 0, &usage_of_child) < 0) {
    if (errno != EINTR) {
      std::perror("hotpool-cputime: wait4");
      return 127;
    }
  }
  const long long wall = monotonic_us() - start;
  const long long user = microseconds(usage_of_child.ru_utime);
  const long long sys = microseconds(usage_of_child.ru_stime);
  const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  std::printf("cpu_us=%lld user_us=%lld sys_us=%lld wall_us=%lld maxrss_kb=%ld status=%d\n", user + sys, user, sys,
              wall, usage_of_child.ru_maxrss, code);
  return 0;
}
