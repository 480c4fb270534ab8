// The exit report, seen from outside: programs run under LD_PRELOAD with
// chosen HOTPOOL_* variables; the test reads what they wrote.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace {

namespace fs = std::filesystem;

struct RunResult {
  int status = -1;  // exit status, or 128 + signal
  std::string out, err;
};

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Runs argv with extra environment entries; stdout and stderr go to files.
// A run that takes longer than 60 s is killed and fails the test.
// Runs argv with stdout and stderr into files in `dir`; in `cwd` if given.
RunResult run(const std::vector<std::string>& argv, const std::vector<std::string>& extra_env, const fs::path& dir,
              const fs::path& cwd = {}) {
  std::vector<std::string> env_storage;
  for (char** entry = environ; *entry; ++entry) {
    if (std::strncmp(*entry, "HOTPOOL_", 8) != 0 && std::strncmp(*entry, "LD_PRELOAD=", 11) != 0)
      env_storage.push_back(*entry);
  }
  for (const std::string& entry : extra_env) env_storage.push_back(entry);
  std::vector<char*> envp, args;
  for (std::string& entry : env_storage) envp.push_back(entry.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_storage = argv;
  for (std::string& arg : argv_storage) args.push_back(arg.data());
  args.push_back(nullptr);

  const fs::path out_path = dir / "stdout", err_path = dir / "stderr";
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (!cwd.empty()) posix_spawn_file_actions_addchdir_np(&actions, cwd.c_str());
  pid_t pid;
  RunResult result;
  if (posix_spawn(&pid, args[0], &actions, nullptr, args.data(), envp.data()) != 0) return result;
  posix_spawn_file_actions_destroy(&actions);
  int status = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      ADD_FAILURE() << argv[0] << " did not finish in 60 s (deadlock?)";
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  result.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  result.out = slurp(out_path);
  result.err = slurp(err_path);
  return result;
}

class ReportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("hotpool-report-test-" + std::to_string(getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }
  RunResult run_program(std::vector<std::string> args, std::vector<std::string> env) {
    args.insert(args.begin(), HOTPOOL_REPORT_PROGRAM);
    env.push_back("LD_PRELOAD=" HOTPOOL_LIBRARY);
    return run(args, env, dir_);
  }
  // `echo x` under these options with a JSON report: its status and stdout
  // must be those of the same run without hotpool.
  RunResult run_echo_as_without_hotpool(std::vector<std::string> options) {
    const RunResult plain = run({HOTPOOL_REPORT_PROGRAM, "echo", "x"}, {}, dir_);
    options.push_back("HOTPOOL_OUTPUT=" + (dir_ / "r.%p.json").string());
    RunResult result = run_program({"echo", "x"}, options);
    EXPECT_EQ(result.status, plain.status);
    EXPECT_EQ(result.out, plain.out);
    return result;
  }
  // The report files the run left, by name.
  std::vector<fs::path> reports() const {
    std::vector<fs::path> found;
    for (const auto& entry : fs::directory_iterator(dir_))
      if (entry.path().filename().string().rfind("r.", 0) == 0) found.push_back(entry.path());
    return found;
  }
  nlohmann::json only_json_report() const {
    const std::vector<fs::path> found = reports();
    EXPECT_EQ(found.size(), 1u);
    if (found.empty()) return {};
    return nlohmann::json::parse(slurp(found[0]));
  }
  // The JSON report of `mode` of the test program under mode auto, which
  // must exit 0 and print `out`.
  nlohmann::json auto_report_of(const char* mode, const std::string& out) {
    const RunResult result =
        run_program({mode}, {"HOTPOOL_MODE=auto", "HOTPOOL_OUTPUT=" + (dir_ / "r.%p.json").string()});
    EXPECT_EQ(result.status, 0) << result.err;
    EXPECT_EQ(result.out, out);
    return only_json_report();
  }
  // Whether the class of `size` bytes was pooled at exit (a failure if the
  // report has no such class or no pool record for it).
  static bool pooled_at_exit(const nlohmann::json& report, uint64_t size) {
    const nlohmann::json* row = class_row(report, size);
    EXPECT_NE(row, nullptr) << size;
    if (row == nullptr || !row->contains("pool")) {
      ADD_FAILURE() << "no pool record for class " << size;
      return false;
    }
    return (*row)["pool"]["pooled"].get<bool>();
  }
  static const nlohmann::json* class_row(const nlohmann::json& report, uint64_t size) {
    for (const auto& row : report["classes"])
      if (!row["size"].is_null() && row["size"] == size) return &row;
    return nullptr;
  }

  fs::path dir_;
};

// HOTPOOL_CLASSES isolates the test's 5000-byte blocks (usable size 5000 in
// glibc) in a class of their own, 5008, so its counts are exactly theirs.
const std::string kIsolatingClasses = "HOTPOOL_CLASSES=16,32,64,128,256,512,1K,2K,4K,4992,5008,8K,64K";

TEST_F(ReportTest, KnownPatternIsCountedExactly) {
  const RunResult result = run_program({"known"}, {"HOTPOOL_MODE=profile", "HOTPOOL_OUTPUT=" + (dir_ / "r.%p.json").string(),
                                             kIsolatingClasses});
  ASSERT_EQ(result.status, 0) << result.err;
  EXPECT_EQ(result.out, "known pattern done\n");
  EXPECT_EQ(result.err, "");
  const nlohmann::json report = only_json_report();
  EXPECT_EQ(report["schema"], "hotpool-report");
  EXPECT_EQ(report["reason"], "exit");
  EXPECT_EQ(report["mode"], "profile");
  const nlohmann::json* row = class_row(report, 5008);
  ASSERT_NE(row, nullptr) << report.dump(1);
  EXPECT_EQ((*row)["allocations"], 777);
  EXPECT_EQ((*row)["frees"], 333);
  EXPECT_EQ((*row)["requested_bytes"], 777 * 5000);
  EXPECT_EQ((*row)["live_bytes"], 444 * 5000);
  EXPECT_EQ((*row)["peak_live_bytes"], 777 * 5000);  // one thread: exact
  EXPECT_EQ((*row)["threads"], 1);
  EXPECT_GE(report["totals"]["allocations"].get<uint64_t>(), 777u);
  EXPECT_GE(report["totals"]["peak_live_bytes"].get<uint64_t>(), 777u * 5000);
  EXPECT_EQ(report["options"]["HOTPOOL_MODE"], "profile");
}

TEST_F(ReportTest, ExitFromAThreadWhileOthersAllocateWritesTheReport) {
  const RunResult result = run_program({"exit-thread"}, {"HOTPOOL_MODE=profile", "HOTPOOL_OUTPUT=" + (dir_ / "r.%p.json").string()});
  EXPECT_EQ(result.status, 3) << result.err;
  const nlohmann::json report = only_json_report();
  EXPECT_EQ(report["reason"], "exit");
  EXPECT_GE(report["totals"]["allocations"].get<uint64_t>(), 200000u);
  EXPECT_GE(report["totals"]["threads_seen"].get<uint64_t>(), 4u);
}

// glibc's pthread_getattr_np allocates while it holds the thread's lock;
// with every allocation sampled, that is each thread's first sample, whose
// stack probe calls pthread_getattr_np for the thread again. It must not
// wait for the lock (a hang until the deadline); the program's own calls
// still find every stack, and every sample gets its site.
TEST_F(ReportTest, PthreadGetattrNpOnItselfAsAThreadsFirstSampleNeverHangs) {
  for (const char* mode : {"HOTPOOL_MODE=profile", "HOTPOOL_MODE=auto"}) {
    for (const fs::path& previous : reports()) fs::remove(previous);
    const RunResult result =
        run_program({"getattr"}, {mode, "HOTPOOL_SAMPLE=1", "HOTPOOL_OUTPUT=" + (dir_ / "r.%p.json").string()});
    ASSERT_EQ(result.status, 0) << mode << ": " << result.err;
    EXPECT_EQ(result.out, "9 of 9 stacks found\n") << mode;
    const nlohmann::json report = only_json_report();
    ASSERT_FALSE(report.is_null()) << mode;
    EXPECT_GE(report["totals"]["threads_seen"].get<uint64_t>(), 9u) << mode;
    EXPECT_EQ(report["sampling"]["unsited"], 0) << mode;
    uint64_t sampled = 0;
    for (const nlohmann::json& site : report["sites"]) sampled += site["sampled_allocations"].get<uint64_t>();
    EXPECT_GE(sampled, 9u * 100) << mode << ": each thread's 100 blocks of 48 bytes, sampled";
  }
}

// Every sampled stack is captured through the thread's trace cache or
// recalled from its stack memo: the report says how many were replayed
// from the frame table, how many libgcc walked, and how many were recalled. Frames of fixed size are replayed once walked, and so is
// a frame of changing size (alloca) that calls malloc itself (from the
// %rbp the allocator's entry passes on); stacks on an alternate signal
// stack are walked every time, and the text report then says so.
TEST_F(ReportTest, TheReportCountsStacksReplayedAndWalkedAndSaysWhenWalksDominate) {
  const std::string json = "HOTPOOL_OUTPUT=" + (dir_ / "r.%p.json").string();
  for (const char* mode : {"fixed-frames", "alloca"}) {
    const RunResult result = run_program({mode}, {"HOTPOOL_MODE=profile", "HOTPOOL_SAMPLE=1", json});
    ASSERT_EQ(result.status, 0) << result.err;
    const nlohmann::json report = only_json_report();
    const nlohmann::json stacks = report["sampling"]["stacks"];
    const uint64_t replayed = stacks["replayed"], walked = stacks["walked"], recalled = stacks["recalled"];
    EXPECT_GE(replayed + walked + recalled, 5000u) << mode << " " << stacks;  // a stack per sampled allocation
    EXPECT_GT(walked, 0u) << mode << " " << stacks;                           // each call site's first
    EXPECT_LT(walked * 100, replayed + recalled) << mode << " " << stacks;
    // And every replayed stack is the right one: all 5000 allocations of
    // the allocating function are one site, called from main (a stack
    // replayed at a wrong place would be another site).
    const char* allocating = std::strcmp(mode, "alloca") == 0 ? "allocate_below_alloca" : "allocate_in_fixed_frames";
    uint64_t from_main = 0, elsewhere = 0;
    for (const auto& site : report["sites"]) {
      const nlohmann::json& frames = site["frames"];
      if (frames.empty() || frames[0]["function"].get<std::string>().find(allocating) == std::string::npos) continue;
      const bool called_from_main = frames.size() > 1 && frames[1]["function"] == "main";
      (called_from_main ? from_main : elsewhere) += site["sampled_allocations"].get<uint64_t>();
    }
    EXPECT_EQ(from_main, 5000u) << mode;
    EXPECT_EQ(elsewhere, 0u) << mode;
    for (const fs::path& path : reports()) fs::remove(path);
  }
  {
    const RunResult result = run_program({"signal-stack"}, {"HOTPOOL_MODE=profile", "HOTPOOL_SAMPLE=1", json});
    ASSERT_EQ(result.status, 0) << result.err;
    EXPECT_EQ(result.out, "3000 signals\n");
    const nlohmann::json stacks = only_json_report()["sampling"]["stacks"];
    EXPECT_GE(stacks["walked"].get<uint64_t>(), 3000u) << stacks;
    for (const fs::path& report : reports()) fs::remove(report);
  }
  for (const char* mode : {"signal-stack", "alloca", "fixed-frames"}) {
    const RunResult result = run_program(
        {mode}, {"HOTPOOL_MODE=profile", "HOTPOOL_SAMPLE=1", "HOTPOOL_OUTPUT=" + (dir_ / "r.%p.txt").string()});
    ASSERT_EQ(result.status, 0) << result.err;
    ASSERT_EQ(reports().size(), 1u);
    const std::string text = slurp(reports()[0]);
    EXPECT_EQ(text.find("of the sampled stacks were walked by libgcc") != std::string::npos,
              std::strcmp(mode, "signal-stack") == 0)
        << mode << "\n" << text;
    for (const fs::path& report : reports()) fs::remove(report);
  }
}

TEST_F(ReportTest, OnDemandReportThenExitReport) {
  const RunResult result = run_program({"on-demand"}, {"HOTPOOL_MODE=auto", "HOTPOOL_OUTPUT=" + (dir_ / "r.%p.txt").string(),
                                                 kIsolatingClasses});
  ASSERT_EQ(result.status, 0) << result.err;
  const std::vector<fs::path> found = reports();
  ASSERT_EQ(found.size(), 1u);
  // The file holds the latest report: the exit one, with the 100 extra blocks.
  const std::string text = slurp(found[0]);
  EXPECT_EQ(text.rfind("hotpool: pid ", 0), 0u) << text;
  EXPECT_NE(text.find("      5008 B        877        433"), std::string::npos) << text;
  EXPECT_NE(text.find("mode auto"), std::string::npos);
  EXPECT_NE(text.find("  recycler: "), std::string::npos) << "auto reports its pools";
}

// HOTPOOL_SITES=auto captures sampled call stacks unless HOTPOOL_REPORT=off:
// then only an on-demand report could show them, and it has none unless
// HOTPOOL_SITES=on. Without stacks the lifetimes per class are all there,
// every sample counted as one without a site.
TEST_F(ReportTest, SampledStacksAreCapturedWhenAReportCanShowThem) {
  for (const auto& [settings, recorded] : std::vector<std::pair<std::vector<std::string>, bool>>{
           {{}, true}, {{"HOTPOOL_REPORT=off"}, false}, {{"HOTPOOL_REPORT=off", "HOTPOOL_SITES=on"}, true},
           {{"HOTPOOL_SITES=off"}, false}}) {
    std::vector<std::string> options = {"HOTPOOL_MODE=profile", "HOTPOOL_SAMPLE=1",
                                        "HOTPOOL_OUTPUT=" + (dir_ / "r.%p.json").string()};
    options.insert(options.end(), settings.begin(), settings.end());
    const RunResult result = run_program({"on-demand"}, options);
    ASSERT_EQ(result.status, 0) << result.err;
    const nlohmann::json report = only_json_report();
    const std::string what = ::testing::PrintToString(settings);
    const nlohmann::json& sampling = report["sampling"];
    EXPECT_EQ(sampling["sites_recorded"], recorded) << what;
    EXPECT_EQ(report["sites"].empty(), !recorded) << what;
    uint64_t sampled = sampling["unsited"].get<uint64_t>(), freed = 0;
    for (const auto& site : report["sites"]) sampled += site["sampled_allocations"].get<uint64_t>();
    for (const auto& life : report["class_lifetimes"]) freed += life["sampled_frees"].get<uint64_t>();
    // Every allocation but the process's first (made before sampling starts).
    const uint64_t total = report["totals"]["allocations"].get<uint64_t>();
    EXPECT_TRUE(sampled <= total && total - sampled <= 1) << what << ": " << sampled << " of " << total << " sampled";
    EXPECT_GT(freed, 0u) << what;
    if (!recorded) {
      EXPECT_EQ(sampling["stacks"]["replayed"].get<uint64_t>() + sampling["stacks"]["walked"].get<uint64_t>(), 0u)
          << what;
    }
    for (const fs::path& found : reports()) fs::remove(found);
  }
}

TEST_F(ReportTest, ReportGoesToStderrByDefaultAndStdoutIsUntouched) {
  const RunResult plain = run({HOTPOOL_REPORT_PROGRAM, "echo", "a", "b"}, {}, dir_);
  const RunResult preloaded = run_program({"echo", "a", "b"}, {"HOTPOOL_MODE=profile"});
  EXPECT_EQ(plain.status, 0);
  EXPECT_EQ(preloaded.status, 0);
  EXPECT_EQ(plain.out, preloaded.out);
  EXPECT_EQ(plain.err, "");
  EXPECT_EQ(preloaded.err.rfind("hotpool: pid ", 0), 0u) << preloaded.err;
  EXPECT_NE(preloaded.err.find("       total "), std::string::npos);
}

TEST_F(ReportTest, ModeOffAndReportOffWriteNothing) {
  for (const char* setting : {"HOTPOOL_MODE=off", "HOTPOOL_REPORT=off"}) {
    const RunResult result = run_program({"known"}, {setting, "HOTPOOL_OUTPUT=" + (dir_ / "r.%p.json").string()});
    EXPECT_EQ(result.status, 0);
    EXPECT_EQ(result.err, "") << setting;
    EXPECT_TRUE(reports().empty()) << setting;
  }
}

TEST_F(ReportTest, MalformedOptionsWarnOnceEachAndChangeNothingElse) {
  const RunResult result =
      run_echo_as_without_hotpool({"HOTPOOL_MODE=turbo", "HOTPOOL_BOGUS=1", "HOTPOOL_MAX_CLASS=12Q"});
  EXPECT_EQ(result.err,
            "hotpool: HOTPOOL_MODE='turbo' is not one of off, profile, fixed, auto; using the default 'auto'\n"
            "hotpool: unknown option HOTPOOL_BOGUS ignored (HOTPOOL_HELP=1 lists the options)\n"
            "hotpool: HOTPOOL_MAX_CLASS='12Q' is not a size (a number with an optional K, M or G suffix); using the default '1M'\n");
  EXPECT_EQ(only_json_report()["mode"], "auto");
}

TEST_F(ReportTest, OutOfRangeOptionsSayWhatIsUsedInstead) {
  const RunResult result = run_echo_as_without_hotpool(
      {"HOTPOOL_MODE=fixed", "HOTPOOL_CLASSES=48,10G", "HOTPOOL_DEPTH=1000", "HOTPOOL_TOP=500"});
  EXPECT_EQ(result.err,
            "hotpool: HOTPOOL_CLASSES: 1 size above 1 GiB (the largest class) ignored\n"
            "hotpool: HOTPOOL_DEPTH=1000: 64 frames captured (1 to 64)\n"
            "hotpool: HOTPOOL_TOP=500: 64 sites shown per list (at most 64; the JSON report lists up to 256 by allocations and 64 by bytes)\n");
  // The table is the usable part of the list.
  const RunResult verbose = run_program({"echo", "x"}, {"HOTPOOL_MODE=fixed", "HOTPOOL_CLASSES=48,10G",
                                                        "HOTPOOL_VERBOSE=1", "HOTPOOL_REPORT=off"});
  EXPECT_NE(verbose.err.find("hotpool: size classes: 48 (then 'large')\n"), std::string::npos) << verbose.err;
}

TEST_F(ReportTest, AClassListWithNoUsableSizeMakesModeFixedPoolNothing) {
  const RunResult result = run_program({"known"}, {"HOTPOOL_MODE=fixed", "HOTPOOL_CLASSES=10G",
                                                   "HOTPOOL_OUTPUT=" + (dir_ / "r.%p.json").string()});
  EXPECT_EQ(result.status, 0);
  EXPECT_EQ(result.err,
            "hotpool: HOTPOOL_CLASSES: 1 size above 1 GiB (the largest class) ignored; none left: the default table "
            "is used, and mode fixed pools nothing\n");
  const nlohmann::json report = only_json_report();
  for (const auto& row : report["classes"])
    EXPECT_FALSE(row.contains("pool") && row["pool"]["pooled"].get<bool>()) << row;
  EXPECT_NE(report["note"].get<std::string>().find("nothing was pooled"), std::string::npos) << report["note"];
}

TEST_F(ReportTest, HelpAndVerboseListEveryOption) {
  const RunResult result = run_program({"echo"}, {"HOTPOOL_HELP=1", "HOTPOOL_VERBOSE=1", "HOTPOOL_REPORT=0"});
  EXPECT_EQ(result.status, 0);
  for (const char* name : {"HOTPOOL_MODE", "HOTPOOL_OUTPUT", "HOTPOOL_REPORT", "HOTPOOL_VERBOSE", "HOTPOOL_HELP",
                           "HOTPOOL_CLASSES", "HOTPOOL_MAX_CLASS"}) {
    EXPECT_NE(result.err.find(std::string("  ") + name + " ("), std::string::npos) << name;  // help
    EXPECT_NE(result.err.find(std::string("hotpool: ") + name + "="), std::string::npos) << name;  // verbose
  }
  EXPECT_NE(result.err.find("hotpool: size classes: 16 32 48"), std::string::npos);
}

TEST_F(ReportTest, OutputNameExpandsPidAndPercent) {
  const RunResult result = run_program({"known"}, {"HOTPOOL_MODE=profile", "HOTPOOL_OUTPUT=" + (dir_ / "r.%%.%p.json").string()});
  ASSERT_EQ(result.status, 0);
  const std::vector<fs::path> found = reports();
  ASSERT_EQ(found.size(), 1u);
  const nlohmann::json report = nlohmann::json::parse(slurp(found[0]));
  EXPECT_EQ(found[0].filename().string(), "r.%." + std::to_string(report["pid"].get<int>()) + ".json");
}

TEST_F(ReportTest, ARelativeOutputNameIsRelativeToTheDirectoryTheProcessStartedIn) {
  // git, make -C, shells: programs change directory; the report still goes
  // where the user ran them.
  const fs::path elsewhere = dir_ / "elsewhere";
  fs::create_directories(elsewhere);
  const RunResult result =
      run({HOTPOOL_REPORT_PROGRAM, "known-then-chdir", elsewhere.string()},
          {"LD_PRELOAD=" HOTPOOL_LIBRARY, "HOTPOOL_MODE=profile", "HOTPOOL_OUTPUT=r.%p.json"}, dir_, dir_);
  EXPECT_EQ(result.status, 0);
  EXPECT_EQ(result.err, "");
  EXPECT_EQ(reports().size(), 1u) << "the report belongs in the start directory";
  EXPECT_TRUE(fs::is_empty(elsewhere)) << "not where the program went";
}

TEST_F(ReportTest, SymlinkedOutputIsNotFollowed) {
  const fs::path target = dir_ / "precious";
  std::ofstream(target) << "keep me\n";
  fs::create_symlink(target, dir_ / "r.link.json");
  const RunResult result = run_program({"known"}, {"HOTPOOL_MODE=profile", "HOTPOOL_OUTPUT=" + (dir_ / "r.link.json").string()});
  EXPECT_EQ(result.status, 0);
  EXPECT_EQ(slurp(target), "keep me\n");
  EXPECT_NE(result.err.find("hotpool: cannot open report file"), std::string::npos) << result.err;
  EXPECT_NE(result.err.find("hotpool: pid "), std::string::npos) << "the report falls back to stderr";
}

// The report carries hotpool's own options and nothing else of the
// environment: not in JSON, not in text, not with HOTPOOL_VERBOSE, not even
// an unknown HOTPOOL_ name's value beyond its one warning line.
TEST_F(ReportTest, NoEnvironmentContentsButHotpoolOptionsReachTheReport) {
  const std::string canary = "c4n4ry-s3cr3t-7f1d";
  const std::vector<std::string> secrets = {"SECRET_TOKEN=" + canary, "DATABASE_URL=postgres://user:" + canary + "@host/db"};
  for (const char* format : {"json", "txt"}) {
    std::vector<std::string> env = secrets;
    env.push_back("HOTPOOL_MODE=auto");
    env.push_back("HOTPOOL_SAMPLE=1");
    env.push_back("HOTPOOL_VERBOSE=on");
    env.push_back(std::string("HOTPOOL_OUTPUT=") + (dir_ / (std::string("r.report.") + format)).string());
    const RunResult result = run_program({"known"}, env);
    ASSERT_EQ(result.status, 0) << result.err;
    const std::vector<fs::path> found = reports();
    ASSERT_FALSE(found.empty());
    for (const fs::path& report : found) {
      const std::string text = slurp(report);
      EXPECT_FALSE(text.empty()) << report;
      EXPECT_EQ(text.find(canary), std::string::npos) << report << " carries the environment";
      EXPECT_EQ(text.find("SECRET_TOKEN"), std::string::npos) << report;
      EXPECT_EQ(text.find("DATABASE_URL"), std::string::npos) << report;
    }
    EXPECT_EQ(result.err.find(canary), std::string::npos) << result.err;
    EXPECT_EQ(result.out.find(canary), std::string::npos);
    for (const fs::path& report : found) fs::remove(report);
  }
}

// A class allocated slowly in a thread that allocated much before (its
// policy windows at their longest, 65536 allocations): 3,200 blocks over
// at least 0.4 s never fill a window, but windows also end after 50 ms, so
// the class pools all the same.
TEST_F(ReportTest, AutoPoolsAClassAllocatedSlowlyLateInAThreadsLife) {
  const nlohmann::json report = auto_report_of("slow-class", "slow class done\n");
  EXPECT_TRUE(pooled_at_exit(report, 65536));
  const nlohmann::json* row = class_row(report, 65536);
  ASSERT_NE(row, nullptr);
  EXPECT_GT((*row)["pool"]["hits"].get<uint64_t>(), 1000u) << *row;
}

// The other side of the same: a thread that pooled its classes while
// busy, then allocates slowly and mostly something else (windows cut
// short by time, where each of those classes is far below 1%) keeps them
// pooled: only windows of full length cool a class.
TEST_F(ReportTest, AutoKeepsItsClassesPooledThroughASlowSpell) {
  const nlohmann::json report = auto_report_of("fast-then-slow", "fast then slow done\n");
  for (uint64_t size = 32; size <= 256; size += 16)  // 16 B requests are glibc's 24 usable bytes: class 32
    EXPECT_TRUE(pooled_at_exit(report, size)) << size;
}

TEST_F(ReportTest, UnwritableOutputFallsBackToStderr) {
  const RunResult result = run_program({"known"}, {"HOTPOOL_MODE=profile", "HOTPOOL_OUTPUT=/nonexistent-dir/r.json"});
  EXPECT_EQ(result.status, 0);
  EXPECT_EQ(result.out, "known pattern done\n");
  EXPECT_NE(result.err.find("hotpool: cannot open report file /nonexistent-dir/r.json"), std::string::npos);
  EXPECT_NE(result.err.find("       total "), std::string::npos);
}

TEST_F(ReportTest, LauncherSetsTheEnvironmentAndPassesTheExitStatusThrough) {
  const RunResult result = run({HOTPOOL_LAUNCHER, "--library", HOTPOOL_LIBRARY, "--mode", "profile", "--output",
                          (dir_ / "r.%p.json").string(), "--", HOTPOOL_REPORT_PROGRAM, "exit-thread"},
                         {}, dir_);
  EXPECT_EQ(result.status, 3) << result.err;
  EXPECT_EQ(only_json_report()["mode"], "profile");
  const RunResult missing = run({HOTPOOL_LAUNCHER, "--library", HOTPOOL_LIBRARY, "--", "no-such-program-here"}, {}, dir_);
  EXPECT_EQ(missing.status, 127);
  const RunResult usage = run({HOTPOOL_LAUNCHER}, {}, dir_);
  EXPECT_EQ(usage.status, 2);
}

}  // namespace
