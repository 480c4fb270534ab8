// Runs one program the way a shell would, for the real-binary tests: a
// chosen environment and working directory, stdin from a file, stdout
// captured through a pipe, stderr to a file, and a deadline after which
// the child's whole process group is killed.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

namespace hotpool::test {

struct ChildSpec {
  std::vector<std::string> argv;           // argv[0]: the absolute path executed
  std::vector<std::string> environment;    // NAME=VALUE: the child's whole environment
  std::filesystem::path working_directory;
  std::filesystem::path stdin_path;        // empty: /dev/null
  std::filesystem::path stderr_path;       // created or appended to
  std::chrono::steady_clock::time_point deadline;
};

struct ChildResult {
  pid_t pid = -1;
  int wait_status = 0;     // as waitpid reports it: exit code or signal
  bool timed_out = false;  // killed at the deadline
  std::string stdout_text; // everything written to stdout, byte for byte
  std::string failure;     // why the program could not be started, if it could not
};

ChildResult run_child(const ChildSpec& spec);

// "exit 3", "killed by signal 11 (Segmentation fault)", ...
std::string describe_wait_status(int wait_status);

}  // namespace hotpool::test
