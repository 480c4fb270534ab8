// The real-binary workloads: for each Debian program, the input files it
// needs (generated deterministically, so that every run sees the same
// bytes), the commands run in order in one working directory, and checks
// that a run really did the work (a sorted file is sorted, a gzip round
// trip gives the input back).
#pragma once

#include <filesystem>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace hotpool::test {

struct Command {
  explicit Command(std::vector<std::string> arguments) : argv(std::move(arguments)) {}
  Command& input(std::string file) { return stdin_file = std::move(file), *this; }
  Command& save_output(std::string file) { return save_stdout_as = std::move(file), *this; }
  Command& exits_with(int status) { return expected_exit = status, *this; }

  std::vector<std::string> argv;  // argv[0]: absolute path of a Debian binary
  std::string stdin_file;         // relative to the working directory; empty: /dev/null
  std::string save_stdout_as;     // if set, stdout is also written there for later commands
  int expected_exit = 0;          // what the program exits with when all is well
};

struct Workload {
  std::string name;                      // part of the test name: python, sort, ...
  std::string program;                   // the binary under test, for messages
  std::vector<std::string> environment;  // NAME=VALUE added to the common environment
  std::function<void(const std::filesystem::path& work)> prepare;  // writes the inputs
  std::vector<Command> commands;
  // GoogleTest expectations on one run: outputs[i] is command i's stdout.
  std::function<void(const std::filesystem::path& work, const std::vector<std::string>& outputs)> check;
};

const std::vector<Workload>& real_workloads();
const Workload* find_workload(const std::string& name);

}  // namespace hotpool::test
