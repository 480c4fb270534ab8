#include "child_process.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <thread>

namespace hotpool::test {
namespace {

using Clock = std::chrono::steady_clock;

class FileDescriptor {
 public:
  FileDescriptor() = default;
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() { reset(); }
  int get() const { return fd_; }
  void reset(int fd = -1) {
    if (fd_ >= 0) close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

std::string errno_text(const char* what, int error) {
  return std::string(what) + ": " + std::strerror(error);
}

int milliseconds_left(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return left.count() <= 0 ? 0 : static_cast<int>(left.count());
}

// Everything the child does between fork and exec is async-signal-safe:
// the strings were prepared by the parent.
[[noreturn]] void exec_in_child(const ChildSpec& spec, char* const argv[], char* const envp[],
                                int stdin_fd, int stdout_fd, int stderr_fd, int report_fd) {
  // A process group of its own, so that a timeout kills its children too.
  setpgid(0, 0);
  if (chdir(spec.working_directory.c_str()) == 0 && dup2(stdin_fd, STDIN_FILENO) >= 0 &&
      dup2(stdout_fd, STDOUT_FILENO) >= 0 && dup2(stderr_fd, STDERR_FILENO) >= 0) {
    execve(argv[0], argv, envp);
  }
  const int error = errno;
  ssize_t ignored = write(report_fd, &error, sizeof(error));
  (void)ignored;
  _exit(127);
}

}  // namespace

ChildResult run_child(const ChildSpec& spec) {
  ChildResult result;
  if (spec.argv.empty()) {
    result.failure = "no program to run";
    return result;
  }
  std::vector<char*> argv, envp;
  for (const std::string& arg : spec.argv) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  for (const std::string& var : spec.environment) envp.push_back(const_cast<char*>(var.c_str()));
  envp.push_back(nullptr);

  const char* stdin_name = spec.stdin_path.empty() ? "/dev/null" : spec.stdin_path.c_str();
  FileDescriptor stdin_fd(open(stdin_name, O_RDONLY | O_CLOEXEC));
  if (stdin_fd.get() < 0) {
    result.failure = errno_text(stdin_name, errno);
    return result;
  }
  FileDescriptor stderr_fd(open(spec.stderr_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
  if (stderr_fd.get() < 0) {
    result.failure = errno_text(spec.stderr_path.c_str(), errno);
    return result;
  }
  int out_pipe[2], exec_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0) {
    result.failure = errno_text("pipe2", errno);
    return result;
  }
  FileDescriptor out_read(out_pipe[0]), out_write(out_pipe[1]);
  if (pipe2(exec_pipe, O_CLOEXEC) != 0) {
    result.failure = errno_text("pipe2", errno);
    return result;
  }
  FileDescriptor exec_read(exec_pipe[0]), exec_write(exec_pipe[1]);

  const pid_t pid = fork();
  if (pid < 0) {
    result.failure = errno_text("fork", errno);
    return result;
  }
  if (pid == 0) {
    exec_in_child(spec, argv.data(), envp.data(), stdin_fd.get(), out_write.get(), stderr_fd.get(),
                  exec_write.get());
  }
  result.pid = pid;
  setpgid(pid, pid);  // also here, so that the group exists before any kill below
  out_write.reset();
  exec_write.reset();

  // exec closes the error pipe (O_CLOEXEC) without writing to it.
  int exec_error = 0;
  ssize_t got;
  do got = read(exec_read.get(), &exec_error, sizeof(exec_error)); while (got < 0 && errno == EINTR);
  if (got == static_cast<ssize_t>(sizeof(exec_error))) {
    result.failure = errno_text(("cannot run " + spec.argv[0]).c_str(), exec_error);
  }

  // Read stdout until every writer (the child and anything it left behind
  // holding the pipe) has closed it.
  char buffer[1 << 16];
  for (;;) {
    pollfd ready{out_read.get(), POLLIN, 0};
    const int left = milliseconds_left(spec.deadline);
    const int polled = left > 0 ? poll(&ready, 1, left) : 0;
    if (polled < 0 && errno == EINTR) continue;
    if (polled <= 0) {
      result.timed_out = true;
      break;
    }
    const ssize_t n = read(out_read.get(), buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    result.stdout_text.append(buffer, static_cast<size_t>(n));
  }

  if (result.timed_out) kill(-pid, SIGKILL);
  // The child may close stdout before it exits: give it until the deadline.
  for (;;) {
    const pid_t waited = waitpid(pid, &result.wait_status, result.timed_out ? 0 : WNOHANG);
    if (waited == pid) break;
    if (waited < 0 && errno == EINTR) continue;
    if (waited < 0) {
      result.failure = errno_text("waitpid", errno);
      break;
    }
    if (milliseconds_left(spec.deadline) == 0) {
      result.timed_out = true;
      kill(-pid, SIGKILL);
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  return result;
}

std::string describe_wait_status(int wait_status) {
  if (WIFEXITED(wait_status)) return "exit " + std::to_string(WEXITSTATUS(wait_status));
  if (WIFSIGNALED(wait_status)) {
    const int sig = WTERMSIG(wait_status);
    return "killed by signal " + std::to_string(sig) + " (" + strsignal(sig) + ")" +
           (WCOREDUMP(wait_status) ? ", core dumped" : "");
  }
  return "wait status " + std::to_string(wait_status);
}

}  // namespace hotpool::test
