// Allocation sites, lifetimes and escape classes, checked against programs
// whose patterns are known exactly (sites_program.cpp).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

extern char** environ;

namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// The line of `// SITE: name` in sites_program.cpp.
unsigned site_line(const std::string& name) {
  std::istringstream source(slurp(HOTPOOL_SITES_SOURCE));
  std::string line;
  for (unsigned number = 1; std::getline(source, line); ++number)
    if (line.find("// SITE: " + name) != std::string::npos) return number;
  return 0;
}

class SitesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("hotpool-sites-test-" + std::to_string(getpid()) + "-" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }

  // Runs sites_program with `args` under LD_PRELOAD, with `options` for
  // hotpool and stdout into dir_/stdout; its pid, and its status in *status.
  pid_t spawn(const std::vector<std::string>& args, const std::vector<std::string>& options, int* status) {
    std::vector<std::string> env;
    for (char** entry = environ; *entry; ++entry)
      if (std::strncmp(*entry, "HOTPOOL_", 8) != 0 && std::strncmp(*entry, "LD_PRELOAD=", 11) != 0) env.push_back(*entry);
    env.push_back("LD_PRELOAD=" HOTPOOL_LIBRARY);
    for (const std::string& option : options) env.push_back(option);
    std::vector<std::string> argv = {HOTPOOL_SITES_PROGRAM};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<char*> envp, argp;
    for (std::string& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    for (std::string& a : argv) argp.push_back(a.data());
    argp.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, (dir_ / "stdout").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    pid_t pid = -1;
    EXPECT_EQ(posix_spawn(&pid, argp[0], &actions, nullptr, argp.data(), envp.data()), 0);
    posix_spawn_file_actions_destroy(&actions);
    waitpid(pid, status, 0);
    return pid;
  }

  // The program's text report (HOTPOOL_OUTPUT to a .txt file), and its exit status.
  std::string run_text(const std::vector<std::string>& args, std::vector<std::string> options, int* status) {
    const fs::path text_report = dir_ / "text.txt";
    options.push_back("HOTPOOL_OUTPUT=" + text_report.string());
    spawn(args, options, status);
    return fs::exists(text_report) ? slurp(text_report) : std::string();
  }

  // The program's JSON report; the program must exit with 0.
  Json run(const std::vector<std::string>& args, const std::vector<std::string>& options) {
    std::vector<std::string> with_output = {"HOTPOOL_OUTPUT=" + (dir_ / "r.%p.json").string()};
    with_output.insert(with_output.end(), options.begin(), options.end());
    int status = 0;
    const pid_t pid = spawn(args, with_output, &status);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    return Json::parse(slurp(dir_ / ("r." + std::to_string(pid) + ".json")));
  }

  // Sums the figures of the sites whose first frame is `function` at the
  // line of the SITE marker `marker`.
  static std::map<std::string, uint64_t> site(const Json& report, const std::string& function,
                                               const std::string& marker) {
    std::map<std::string, uint64_t> sum;
    const unsigned line = site_line(marker);
    for (const Json& row : report["sites"]) {
      const Json& frame = row["frames"][0];
      if (frame["function"].get<std::string>().find(function) == std::string::npos) continue;
      if (frame["line"].get<unsigned>() != line) continue;  // another allocation in the same function
      EXPECT_NE(frame["file"].get<std::string>().find("sites_program.cpp"), std::string::npos);
      for (const char* key : {"sampled_allocations", "estimated_allocations", "sampled_bytes", "estimated_bytes",
                              "sampled_frees", "temporary",
                              "frame_local", "thread_local", "cross_thread", "live_at_exit", "short_lived",
                              "recycled"})
        sum[key] += row[key].get<uint64_t>();
      sum["sites"] += 1;
    }
    EXPECT_GE(sum["sites"], 1u) << "no site in " << function << " at sites_program.cpp:" << line;
    return sum;
  }

  fs::path dir_;
};

constexpr uint64_t kCount = 2000;

TEST_F(SitesTest, EveryPatternIsClassifiedAndAttributedToItsFunctionAndLine) {
  const Json report = run({"patterns", std::to_string(kCount)}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile"});
  EXPECT_EQ(report["sampling"]["rate"], 1);

  auto frame_local = site(report, "frame_local_site", "frame_local");
  EXPECT_EQ(frame_local["sampled_allocations"], kCount);
  EXPECT_EQ(frame_local["frame_local"], kCount);
  EXPECT_EQ(frame_local["temporary"], 0u) << "another allocation came in between";
  EXPECT_EQ(frame_local["recycled"], kCount) << "freed by its thread two calls later";

  auto temporary = site(report, "temporary_site", "temporary");
  EXPECT_EQ(temporary["sampled_allocations"], kCount);
  EXPECT_EQ(temporary["temporary"], kCount);
  EXPECT_EQ(temporary["frame_local"], kCount);

  auto thread_local_ = site(report, "make_block", "thread_local");
  EXPECT_EQ(thread_local_["sites"], 2u) << "two call sites of make_block";
  EXPECT_EQ(thread_local_["sampled_allocations"], 2 * kCount);
  EXPECT_EQ(thread_local_["thread_local"], 2 * kCount);
  EXPECT_EQ(thread_local_["frame_local"], 0u);
  EXPECT_EQ(thread_local_["cross_thread"], 0u);
  EXPECT_EQ(thread_local_["recycled"], 2 * kCount);

  auto cross = site(report, "produce", "cross_thread");
  EXPECT_EQ(cross["sampled_allocations"], kCount);
  EXPECT_EQ(cross["cross_thread"], kCount);
  EXPECT_EQ(cross["recycled"], 0u) << "recycled means freed by the allocating thread";

  // realloc frees, then allocates (as heaptrack counts it): both blocks are
  // temporary, freed before their thread's next allocator call.
  auto realloc_from = site(report, "realloc_site", "realloc_from");
  auto realloc_to = site(report, "realloc_site", "realloc_to");
  EXPECT_EQ(realloc_from["sampled_allocations"], kCount);
  EXPECT_EQ(realloc_from["temporary"], kCount);
  EXPECT_EQ(realloc_to["sampled_allocations"], kCount);
  EXPECT_EQ(realloc_to["temporary"], kCount);

  auto leak = site(report, "leak_site", "leak");
  EXPECT_EQ(leak["sampled_allocations"], kCount);
  EXPECT_EQ(leak["live_at_exit"], kCount);
  EXPECT_EQ(leak["sampled_frees"], 0u);

  // C++'s new and delete (hotpool's own operators): the same classes, at
  // the line that calls new.
  auto new_frame_local = site(report, "cpp_new_in_frame", "new_frame_local");
  EXPECT_EQ(new_frame_local["sites"], 1u);
  EXPECT_EQ(new_frame_local["sampled_allocations"], kCount);
  EXPECT_EQ(new_frame_local["frame_local"], kCount);
  EXPECT_EQ(new_frame_local["temporary"], 0u);
  auto new_thread_local = site(report, "make_array", "new_thread_local");
  EXPECT_EQ(new_thread_local["sites"], 2u) << "two call sites of make_array";
  EXPECT_EQ(new_thread_local["sampled_allocations"], 2 * kCount);
  EXPECT_EQ(new_thread_local["thread_local"], 2 * kCount);
  EXPECT_EQ(new_thread_local["frame_local"], 0u);
  auto new_nothrow = site(report, "cpp_nothrow_new_freed_at_once", "new_nothrow");
  EXPECT_EQ(new_nothrow["sampled_allocations"], kCount);
  EXPECT_EQ(new_nothrow["temporary"], kCount);
  EXPECT_EQ(new_nothrow["frame_local"], kCount);
}

// Aligned allocations (memalign, aligned_alloc, posix_memalign, valloc and
// C++'s aligned new, alignments 32 B to a page) are sampled as malloc's
// are: with HOTPOOL_SAMPLE=1 each one is a sample of its own function and
// line, freed in its frame. The program checks every block's alignment and
// usable size, and writes all of it.
const std::tuple<const char*, const char*> kAlignedSites[] = {
    {"memalign_site", "memalign"}, {"aligned_alloc_site", "aligned_alloc"}, {"posix_memalign_site", "posix_memalign"},
    {"valloc_site", "valloc"},     {"aligned_new_site", "aligned_new"}};

TEST_F(SitesTest, AlignedAllocationsAreSampledAtTheirOwnSites) {
  const Json report = run({"aligned", std::to_string(kCount)}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile"});
  EXPECT_EQ(slurp(dir_ / "stdout"), "done\n");
  EXPECT_EQ(report["sampling"]["unsited"], 0);
  for (auto [function, marker] : kAlignedSites) {
    auto figures = site(report, function, marker);
    EXPECT_EQ(figures["sites"], 1u) << marker;
    EXPECT_EQ(figures["sampled_allocations"], kCount) << marker;
    EXPECT_EQ(figures["sampled_frees"], kCount) << marker;
    EXPECT_EQ(figures["frame_local"], kCount) << marker;
  }
}

// At the default rate, in mode auto (pools on), each aligned site is
// estimated within 5% (~3,900 samples of 2M: a standard error of 1.6%).
TEST_F(SitesTest, AlignedAllocationsAreEstimatedAtTheDefaultRate) {
  constexpr uint64_t kRounds = 2000000;
  const Json report = run({"aligned", std::to_string(kRounds)}, {"HOTPOOL_MODE=auto"});
  EXPECT_EQ(slurp(dir_ / "stdout"), "done\n");
  EXPECT_EQ(report["sampling"]["rate"].get<uint64_t>(), 512u);
  for (auto [function, marker] : kAlignedSites) {
    auto figures = site(report, function, marker);
    const double estimate = static_cast<double>(figures["estimated_allocations"]);
    EXPECT_NEAR(estimate / kRounds, 1.0, 0.05) << marker << ": " << estimate << " estimated";
    EXPECT_EQ(figures["frame_local"], figures["sampled_frees"]) << marker;
  }
}

// Aligned blocks of no bytes, sampled, with every largest class that is
// an alignment minus 16 (HOTPOOL_CLASSES): each still lies inside its
// region block, and its free is accepted. pvalloc's sampled blocks hold a
// whole page, while its requests count as what the program asked for.
TEST_F(SitesTest, AlignedEdgeCasesAreSampledSafely) {
  for (size_t largest = 16; largest <= 4080; largest = largest * 2 + 16) {
    const Json report = run({"aligned_edges", "10"}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile",
                                                      "HOTPOOL_CLASSES=" + std::to_string(largest)});
    EXPECT_EQ(slurp(dir_ / "stdout"), "done\n") << "largest class " << largest;
  }
  const Json report = run({"aligned_edges", std::to_string(kCount)}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile"});
  EXPECT_EQ(slurp(dir_ / "stdout"), "done\n");
  auto figures = site(report, "pvalloc_site", "pvalloc");
  EXPECT_EQ(figures["sampled_allocations"], kCount);
  EXPECT_EQ(figures["sampled_bytes"], 100 * kCount) << "the bytes asked for, not the page they got";
}

TEST_F(SitesTest, RecycledCountsTheAllocatingThreadsCallsBetweenMallocAndFree) {
  // HOTPOOL_RECYCLE=0: only a block freed before its thread's next
  // allocator call (temporary) is recycled.
  const Json report =
      run({"patterns", std::to_string(kCount)}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile", "HOTPOOL_RECYCLE=0"});
  EXPECT_EQ(report["sampling"]["recycle_calls"], 0);
  EXPECT_EQ(site(report, "temporary_site", "temporary")["recycled"], kCount);
  EXPECT_EQ(site(report, "frame_local_site", "frame_local")["recycled"], 0u);
  EXPECT_EQ(site(report, "make_block", "thread_local")["recycled"], 0u);
  // The class lifetimes count them too: the classes from 500 B to 1 KiB
  // hold the temporary blocks (and vector buffers whose growth depends on
  // the threads' timing, recycled or not).
  uint64_t recycled = 0, freed = 0;
  for (const Json& row : report["class_lifetimes"]) {
    if (row["size"].is_null() || row["size"].get<uint64_t>() < 500 || row["size"].get<uint64_t>() >= 1024) continue;
    recycled += row["recycled"].get<uint64_t>();
    freed += row["sampled_frees"].get<uint64_t>();
  }
  EXPECT_GE(recycled, kCount);
  EXPECT_LE(recycled, freed);
}

// The program is built with frame pointers (as code of distributions built
// with -fno-omit-frame-pointer, Rust's standard library or Go): its stacks
// are replayed from the frame table once libgcc has walked each call site,
// not walked at every sample.
TEST_F(SitesTest, StacksOfCodeWithFramePointersAreReplayedNotWalked) {
  const Json report = run({"patterns", std::to_string(kCount)}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile"});
  const Json& stacks = report["sampling"]["stacks"];
  const uint64_t replayed = stacks["replayed"], walked = stacks["walked"], recalled = stacks["recalled"];
  uint64_t sampled = 0;
  for (const Json& row : report["sites"]) sampled += row["sampled_allocations"].get<uint64_t>();
  EXPECT_GE(replayed + walked + recalled, sampled) << stacks;  // a stack per sampled allocation
  EXPECT_GT(walked, 0u) << stacks;                             // each call site's first
  EXPECT_LT(walked * 100, replayed + recalled) << stacks;
}

TEST_F(SitesTest, EverySampledCountEqualsTheExactCount) {
  // HOTPOOL_SAMPLE=1: the sites' sampled allocations add up to the exact
  // per-class counts of those classes' allocations from the patterns.
  const Json report = run({"patterns", std::to_string(kCount)}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile"});
  uint64_t sampled = 0;
  for (const Json& row : report["sites"]) sampled += row["sampled_allocations"].get<uint64_t>();
  // Missing are only allocations too large to sample (above the largest
  // class) and the few the process made before hotpool's constructor ran.
  uint64_t large = 0;
  for (const Json& row : report["classes"])
    if (row["large"].get<bool>()) large = row["allocations"].get<uint64_t>();
  const uint64_t total = report["totals"]["allocations"].get<uint64_t>();
  EXPECT_LE(sampled + large, total);
  EXPECT_LE(total - (sampled + large), 8u);
}

// At the default rate, a site with 1% of the allocations is estimated
// within 5%: that takes enough samples of it (100M allocations, 1 in 512
// sampled: ~1950 of that site, a standard error of 2.3%). The program and
// the sampler's seed are fixed, so the run is repeatable.
TEST_F(SitesTest, EstimatesAtTheDefaultRateAreWithinFivePercentForSitesOfOnePercent) {
  constexpr uint64_t kAllocations = 100000000;
  const Json report = run({"shares", std::to_string(kAllocations)}, {"HOTPOOL_MODE=profile"});
  EXPECT_EQ(report["sampling"]["rate"].get<uint64_t>(), 512u);
  for (auto [function, marker, share] : {std::tuple{"rare_share", "share1", 0.01}, std::tuple{"small_share", "share29", 0.29},
                                         std::tuple{"large_share", "share70", 0.7}}) {
    auto figures = site(report, function, marker);
    const double exact = share * kAllocations;
    const double estimate = static_cast<double>(figures["estimated_allocations"]);
    EXPECT_NEAR(estimate / exact, 1.0, 0.05) << function << ": " << estimate << " estimated, " << exact << " exact";
  }
}

// A realloc that moves or grows a block is an allocation (and a free), and
// is sampled as one: at the default rate, a site of reallocs of unsampled
// blocks is estimated as any other (within 5%: ~1,950 samples of 1M), and
// so are the temporary allocations (every block here is freed before its
// thread's next call). When only malloc and calloc were sampled, the
// realloc site had no samples, and the temporary share of the sampled
// frees read 50% where it is 100% of the reallocs' blocks (sqlite3's
// temporaries were estimated 7-13% high).
TEST_F(SitesTest, ReallocsAreSampledAsAllocationsAtTheDefaultRate) {
  constexpr uint64_t kRounds = 2000000;
  const Json report = run({"realloc_shares", std::to_string(kRounds)}, {"HOTPOOL_MODE=profile"});
  EXPECT_EQ(report["sampling"]["rate"].get<uint64_t>(), 512u);
  for (auto [function, marker] : {std::tuple{"realloc_share", "realloc_share_from"},
                                  std::tuple{"realloc_share", "realloc_share_to"},
                                  std::tuple{"large_share", "share70"}}) {
    auto figures = site(report, function, marker);
    const double estimate = static_cast<double>(figures["estimated_allocations"]);
    EXPECT_NEAR(estimate / (kRounds / 2), 1.0, 0.05) << marker << ": " << estimate << " estimated";
    EXPECT_EQ(figures["temporary"], figures["sampled_frees"]) << marker;
  }
  // Every allocation's block was temporary; the sampled ones too.
  uint64_t temporary = 0, sampled_frees = 0;
  for (const Json& row : report["class_lifetimes"]) {
    temporary += row["temporary"].get<uint64_t>();
    sampled_frees += row["sampled_frees"].get<uint64_t>();
  }
  EXPECT_GT(sampled_frees, 3 * kRounds / 2 / 512 * 9 / 10);
  EXPECT_GE(temporary, sampled_frees * 99 / 100);
}

// By bytes (HOTPOOL_SAMPLE_BYTES=16K), a site of rare large blocks is
// sampled almost every time and one of many small blocks about once in 500:
// each sample weighs the inverse of its chance, and the sites' allocations
// and bytes are estimated within 5% (the malloc'ed small site's ~7,800
// samples: a standard error of 1.1%; the calloc'ed one's ~3,900: 1.6%; the
// large one's 4,000 blocks are sampled with probability 1 - e^-16). By
// count at the default rate, the large site would have about 8 samples.
// Fixed program and seed: repeatable.
TEST_F(SitesTest, SamplingByBytesEstimatesRareLargeAndFrequentSmallSites) {
  constexpr uint64_t kRounds = 4000, kSmallPerRound = 1000, kCallocPerRound = 500;
  const Json report = run({"bytes", std::to_string(kRounds)}, {"HOTPOOL_MODE=profile", "HOTPOOL_SAMPLE_BYTES=16K"});
  EXPECT_EQ(report["version"].get<int>(), 2);
  EXPECT_EQ(report["sampling"]["by"], "bytes");
  EXPECT_EQ(report["sampling"]["mean_bytes"].get<uint64_t>(), 16384u);
  EXPECT_EQ(report["sampling"]["rate"].get<uint64_t>(), 0u);
  for (auto [function, marker, count, size] :
       {std::tuple{"big_bytes", "big_bytes", kRounds, uint64_t{256} << 10},
        std::tuple{"small_bytes", "small_bytes", kRounds * kSmallPerRound, uint64_t{32}},
        std::tuple{"medium_bytes", "medium_bytes", kRounds * 4, uint64_t{8} << 10},
        std::tuple{"calloc_bytes", "calloc_bytes", kRounds * kCallocPerRound, uint64_t{32}}}) {
    auto figures = site(report, function, marker);
    const double allocations = static_cast<double>(figures["estimated_allocations"]);
    EXPECT_NEAR(allocations / static_cast<double>(count), 1.0, 0.05) << function << ": " << allocations << " estimated";
    const double bytes = static_cast<double>(figures["estimated_bytes"]);
    EXPECT_NEAR(bytes / static_cast<double>(count * size), 1.0, 0.05) << function << ": " << bytes << " bytes estimated";
  }
  // Large blocks: all but a few sampled; small ones: about 1 in 512.
  EXPECT_GE(site(report, "big_bytes", "big_bytes")["sampled_allocations"], kRounds * 99 / 100);
  const uint64_t small_samples = site(report, "small_bytes", "small_bytes")["sampled_allocations"];
  EXPECT_GT(small_samples, kRounds * kSmallPerRound / 1000);
  EXPECT_LT(small_samples, kRounds * kSmallPerRound / 250);
}

// Blocks too large to sample (here all but the 32-byte ones: the largest
// class is 4 KiB) end their byte intervals as any other: the small sites'
// estimates stay within 5%. (When they left their intervals' remainders to
// the next block, the malloc'ed small site was estimated 35% high.)
TEST_F(SitesTest, ByBytesBlocksTooLargeToSampleBiasNoOtherSite) {
  constexpr uint64_t kRounds = 4000;
  const Json report = run({"bytes", std::to_string(kRounds)},
                          {"HOTPOOL_MODE=profile", "HOTPOOL_SAMPLE_BYTES=16K", "HOTPOOL_MAX_CLASS=4K"});
  for (auto [function, count] : {std::tuple{"small_bytes", kRounds * 1000}, std::tuple{"calloc_bytes", kRounds * 500}}) {
    const double allocations = static_cast<double>(site(report, function, function)["estimated_allocations"]);
    EXPECT_NEAR(allocations / static_cast<double>(count), 1.0, 0.05) << function << ": " << allocations << " estimated";
  }
  for (const Json& row : report["sites"]) {
    const std::string function = row["frames"].empty() ? "" : row["frames"][0]["function"].get<std::string>();
    EXPECT_EQ(function.find("big_bytes"), std::string::npos) << "a block above the largest class was sampled";
    EXPECT_EQ(function.find("medium_bytes"), std::string::npos) << "a block above the largest class was sampled";
  }
}

// By bytes a site of rare large blocks has few estimated allocations: the
// JSON report keeps it among the sites with the most bytes, beyond the 256
// with the most allocations. Here some 640 sampled sites of 3000- and
// 8-byte blocks (600 each) outnumber the one of 75 blocks of 256 KiB, which
// has the most bytes.
TEST_F(SitesTest, ByBytesTheJsonReportKeepsTheSitesWithTheMostBytes) {
  const Json report = run({"bytes_sites", "600"}, {"HOTPOOL_MODE=profile", "HOTPOOL_SAMPLE_BYTES=16K"});
  EXPECT_GT(report["sites_total"].get<uint64_t>(), 256u);
  EXPECT_LE(report["sites"].size(), 256u + 64u);
  auto big = site(report, "big_bytes", "big_bytes");
  EXPECT_NEAR(static_cast<double>(big["estimated_allocations"]) / 75.0, 1.0, 0.05);
  uint64_t most = 0;
  for (const Json& row : report["sites"]) most = std::max(most, row["estimated_bytes"].get<uint64_t>());
  EXPECT_EQ(big["estimated_bytes"], most);
}

TEST_F(SitesTest, TextReportShowsSitesLifetimesAndTheTuneLine) {
  run({"patterns", "500"}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile"});  // JSON, to check it ran
  // The same run as text, every pattern's site listed: "patterns" has more
  // sites than the default top 8, several of them tied in count and
  // short-lived share, which the cut would then choose among.
  int status = -1;
  const std::string text =
      run_text({"patterns", "500"}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile", "HOTPOOL_TOP=32"}, &status);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_NE(text.find("  lifetimes from "), std::string::npos) << text;
  EXPECT_NE(text.find("  hot sites, short-lived first"), std::string::npos);
  EXPECT_NE(text.find("frame_local_site"), std::string::npos);
  EXPECT_NE(text.find("sites_program.cpp:" + std::to_string(site_line("frame_local"))), std::string::npos);
  EXPECT_NE(text.find("a stack or small-buffer candidate"), std::string::npos);
  EXPECT_NE(text.find("  live at exit"), std::string::npos);
  EXPECT_NE(text.find("leak_site"), std::string::npos);
  EXPECT_NE(text.find("  tune: export HOTPOOL_CLASSES="), std::string::npos);
}

TEST_F(SitesTest, ATuneLineChosenAmongAnExplicitClassListSaysSo) {
  int status = -1;
  const std::string own =
      run_text({"patterns", "500"}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile", "HOTPOOL_CLASSES=64,512,8K"}, &status);
  EXPECT_NE(own.find("  tune: export HOTPOOL_CLASSES="), std::string::npos) << own;
  EXPECT_NE(own.find("(chosen among this run's HOTPOOL_CLASSES"), std::string::npos) << own;
  const std::string default_table = run_text({"patterns", "500"}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile"}, &status);
  EXPECT_NE(default_table.find("  tune: export HOTPOOL_CLASSES="), std::string::npos) << default_table;
  EXPECT_EQ(default_table.find("chosen among"), std::string::npos) << default_table;
}

TEST_F(SitesTest, TopZeroLeavesTheSiteListsOutOfTheTextReport) {
  int status = -1;
  const std::string text =
      run_text({"patterns", "500"}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile", "HOTPOOL_TOP=0"}, &status);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status << "\n" << text;
  EXPECT_NE(text.find("  lifetimes from "), std::string::npos) << text;
  EXPECT_EQ(text.find("  hot sites"), std::string::npos) << text;
  EXPECT_EQ(text.find("  sites by bytes"), std::string::npos) << text;
  EXPECT_EQ(text.find("frame_local_site"), std::string::npos) << text;
  EXPECT_NE(text.find("  tune: export HOTPOOL_CLASSES="), std::string::npos) << text;
}

// Hundreds of threads alive at once, each allocating from the same site:
// one site, every allocation counted, each freed in its frame.
TEST_F(SitesTest, HundredsOfThreadsAddUpToOneSiteWithExactCounts) {
  constexpr uint64_t kThreads = 300, kEach = 100;
  const Json report = run({"threads", std::to_string(kThreads), std::to_string(kEach)},
                          {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile"});
  EXPECT_GE(report["totals"]["threads_seen"].get<uint64_t>(), kThreads + 1);
  EXPECT_GE(report["totals"]["threads_at_once"].get<uint64_t>(), kThreads);
  auto figures = site(report, "thread_site", "thread_site");
  EXPECT_EQ(figures["sampled_allocations"], kThreads * kEach);
  EXPECT_EQ(figures["frame_local"], kThreads * kEach);
  EXPECT_EQ(figures["temporary"], kThreads * kEach);
  EXPECT_EQ(figures["cross_thread"], 0u);
}

// A thread frees its own blocks in its last round of key destructors,
// after hotpool has let it go: the same thread, so thread-local, not
// cross-thread (what the lifetime in the thread's calls would need, it no
// longer has: neither temporary nor recycled).
TEST_F(SitesTest, BlocksAThreadFreesAfterHotpoolLetItGoAreItsOwn) {
  const Json report = run({"exit_free", std::to_string(kCount)}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile"});
  auto figures = site(report, "exit_free_block", "freed_at_exit");
  EXPECT_EQ(figures["sampled_allocations"], kCount);
  EXPECT_EQ(figures["sampled_frees"], kCount);
  EXPECT_EQ(figures["thread_local"], kCount);
  EXPECT_EQ(figures["cross_thread"], 0u);
  EXPECT_EQ(figures["live_at_exit"], 0u);
}

// More stacks than the stack depot has ids: the samples it has no site for
// are still told frame-local (their frame's return address kept in the
// header), in the class lifetimes.
TEST_F(SitesTest, SamplesWithoutASiteAreStillToldFrameLocal) {
  constexpr int kLevels = 18;  // 262,144 stacks (and as many of malloc(8))
  const Json report = run({"many_stacks", std::to_string(kLevels)},
                          {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile", "HOTPOOL_DEPTH=64", "HOTPOOL_TOP=1"});
  uint64_t frees = 0, frame_local = 0, thread_local_frees = 0;
  for (const Json& row : report["class_lifetimes"]) {
    if (row["size"].is_null() || row["size"].get<uint64_t>() < 3000 || row["size"].get<uint64_t>() >= 3600) continue;
    frees += row["sampled_frees"].get<uint64_t>();
    frame_local += row["frame_local"].get<uint64_t>();
    thread_local_frees += row["thread_local"].get<uint64_t>();
  }
  EXPECT_EQ(frees, uint64_t{1} << kLevels);
  EXPECT_EQ(frame_local, uint64_t{1} << kLevels);
  EXPECT_EQ(thread_local_frees, 0u);
  // The depot did run out, with every one of its 262,143 ids used (stacks
  // of 40 frames and more; one thread, so no id lost to a race), and the
  // report says how many samples have no site. Every stack here is
  // distinct (2^kLevels of each of frame_local_site's two allocations), so
  // it holds one sample each: the samples without a site are at least the
  // stacks left over.
  const uint64_t sites = report["sites_total"].get<uint64_t>();
  const uint64_t unsited = report["sampling"]["unsited"].get<uint64_t>();
  EXPECT_EQ(sites, 262143u);
  EXPECT_GE(sites + unsited, uint64_t{2} << kLevels);
  EXPECT_LE(sites + unsited, report["totals"]["allocations"].get<uint64_t>());
  int status = 0;
  const std::string text = run_text({"many_stacks", std::to_string(kLevels)},
                                    {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile", "HOTPOOL_DEPTH=64", "HOTPOOL_TOP=1"}, &status);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_NE(text.find(" of them have no site (no stack captured, or all 262143 sites of the stack depot taken)"),
            std::string::npos) << text;
}

// Sites are ranked among all of the depot's, not its first few thousand:
// a site whose allocations all come after 8,192 others is the hottest of
// both reports, with every allocation counted.
TEST_F(SitesTest, ASiteAfterThousandsOfOthersIsStillRanked) {
  constexpr int kLevels = 13;  // 8,192 stacks of one allocation (and as many of malloc(8))
  constexpr uint64_t kLate = 5000;
  const std::vector<std::string> args = {"late_site", std::to_string(kLevels), std::to_string(kLate)};
  const std::vector<std::string> options = {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile", "HOTPOOL_DEPTH=64"};
  const Json report = run(args, options);
  EXPECT_GT(report["sites_total"].get<uint64_t>(), uint64_t{1} << kLevels);
  auto late = site(report, "late_site", "late");
  EXPECT_EQ(late["sampled_allocations"], kLate);
  EXPECT_EQ(late["frame_local"], kLate);
  ASSERT_FALSE(report["sites"].empty());
  EXPECT_NE(report["sites"][0]["frames"][0]["function"].get<std::string>().find("late_site"), std::string::npos);
  // The list by allocations is full, ranked, and names each site once.
  ASSERT_GE(report["sites"].size(), 256u);
  std::set<uint64_t> ids;
  for (size_t i = 0; i < report["sites"].size(); ++i) {
    const Json& row = report["sites"][i];
    EXPECT_TRUE(ids.insert(row["id"].get<uint64_t>()).second) << "site " << row["id"] << " twice";
    if (i > 0 && i < 256) {
      EXPECT_LE(row["estimated_allocations"].get<uint64_t>(), report["sites"][i - 1]["estimated_allocations"].get<uint64_t>());
    }
  }

  int status = 0;
  std::vector<std::string> text_options = options;
  text_options.push_back("HOTPOOL_TOP=1");
  const std::string text = run_text(args, text_options, &status);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  const size_t hot = text.find("  hot sites, short-lived first\n   #1  5.00K x 40 B");
  ASSERT_NE(hot, std::string::npos) << text;
  EXPECT_NE(text.find("late_site", hot), std::string::npos) << text;
}

// Sampling moves no block into another class: a sampled block shows the
// program, and is counted with, the usable size its request gets unsampled
// (the real allocator's, or its pooled class's, also in a sparse table).
TEST_F(SitesTest, EverySampledAllocationIsCountedInTheClassItWouldHaveUnsampled) {
  auto class_rows = [](const Json& report) {
    std::map<std::string, std::pair<uint64_t, uint64_t>> rows;  // size: allocations, usable bytes
    for (const Json& row : report["classes"])
      rows[row["size"].dump()] = {row["allocations"].get<uint64_t>(), row["usable_bytes"].get<uint64_t>()};
    return rows;
  };
  for (const std::vector<std::string>& mode :
       {std::vector<std::string>{"HOTPOOL_MODE=profile"},
        std::vector<std::string>{"HOTPOOL_MODE=fixed", "HOTPOOL_CLASSES=32,64,96,128,176,256,1024"}}) {
    std::vector<std::string> unsampled = mode, sampled = mode;
    unsampled.push_back("HOTPOOL_SAMPLE=0");
    sampled.push_back("HOTPOOL_SAMPLE=1");
    const Json plain = run({"sizes", "200"}, unsampled);
    const std::string plain_out = slurp(dir_ / "stdout");
    const Json every = run({"sizes", "200"}, sampled);
    EXPECT_EQ(slurp(dir_ / "stdout"), plain_out) << "malloc_usable_size of sampled blocks, " << mode[0];
    EXPECT_EQ(every["sampling"]["rate"], 1);
    // The program's own blocks, 200 of each size, in the same classes with
    // the same usable bytes; the C library's few (stdio's buffer, a realloc
    // glibc does in place and a sampled block never does) may move one.
    const auto plain_rows = class_rows(plain), every_rows = class_rows(every);
    for (const auto& [size, figures] : plain_rows) {
      ASSERT_TRUE(every_rows.count(size)) << "class " << size << ", " << mode[0];
      const auto& [allocations, usable] = every_rows.at(size);
      EXPECT_NEAR(static_cast<double>(allocations), static_cast<double>(figures.first), 1.0)
          << "class " << size << ", " << mode[0];
      EXPECT_NEAR(static_cast<double>(usable), static_cast<double>(figures.second), 64.0)
          << "class " << size << ", " << mode[0];
    }
    EXPECT_EQ(every_rows.size(), plain_rows.size()) << mode[0];
    // And every block up to the largest class was sampled, its own class's
    // pooled blocks too.
    std::map<std::string, uint64_t> sampled_frees;
    for (const Json& row : every["class_lifetimes"]) sampled_frees[row["size"].dump()] = row["sampled_frees"].get<uint64_t>();
    for (const Json& row : every["classes"]) {
      if (row["size"].is_null() || row["frees"].get<uint64_t>() < 200) continue;  // the program's own sizes
      EXPECT_GE(sampled_frees[row["size"].dump()] + 2, row["frees"].get<uint64_t>())
          << "class " << row["size"] << ", " << mode[0];
    }
  }
}

// A recursion much deeper than HOTPOOL_DEPTH: the stack is cut at that
// many frames, innermost first, and the escape analysis still works on it.
TEST_F(SitesTest, ARecursionDeeperThanTheDepthOptionKeepsItsInnermostFrames) {
  constexpr unsigned kDepth = 6, kRecursion = 400;
  constexpr uint64_t kRepeat = 50;
  const Json report = run({"recursion", std::to_string(kRecursion), std::to_string(kRepeat)},
                          {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile", "HOTPOOL_DEPTH=" + std::to_string(kDepth)});
  auto figures = site(report, "allocate_at_bottom", "recursion_bottom");
  EXPECT_EQ(figures["sites"], 1u) << "every recursion has the same innermost frames";
  EXPECT_EQ(figures["sampled_allocations"], kRepeat);
  EXPECT_EQ(figures["frame_local"], kRepeat);
  for (const Json& row : report["sites"]) {
    const Json& frames = row["frames"];
    if (frames[0]["function"].get<std::string>().find("allocate_at_bottom") == std::string::npos) continue;
    ASSERT_EQ(frames.size(), kDepth);
    for (unsigned f = 1; f < kDepth; ++f) {
      EXPECT_NE(frames[f]["function"].get<std::string>().find("recurse"), std::string::npos) << frames[f];
      EXPECT_EQ(frames[f]["line"].get<unsigned>(), site_line(f == 1 ? "recursion_leaf" : "recursion_call"))
          << frames[f];
    }
  }
}

// An allocation inside functions the compiler inlined: the report names
// each of them, innermost first, with its line, marked inlined, then the
// function they were inlined into (the return address's own), with the
// line where they were. The text report shows the same chain.
TEST_F(SitesTest, InlinedFunctionsAreNamedWithTheirLines) {
  constexpr uint64_t kRepeat = 300;
  const Json report = run({"inlined", std::to_string(kRepeat)}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile"});
  const struct {
    const char* function;
    const char* marker;
    bool inlined;
  } expected[] = {{"inlined_allocate", "inlined_malloc", true},
                  {"inlined_middle", "inlined_call", true},
                  {"inlining_caller", "inlined_into", false}};
  unsigned found = 0;
  for (const Json& row : report["sites"]) {
    const Json& frames = row["frames"];
    if (frames.empty() || frames[0]["function"].get<std::string>().find("inlined_allocate") == std::string::npos)
      continue;
    ++found;
    EXPECT_EQ(row["sampled_allocations"].get<uint64_t>(), kRepeat) << row;
    EXPECT_EQ(row["frame_local"].get<uint64_t>(), kRepeat) << "freed by inlined_middle, in inlining_caller's frame";
    ASSERT_GE(frames.size(), 4u) << row;
    for (unsigned f = 0; f < 3; ++f) {
      EXPECT_NE(frames[f]["function"].get<std::string>().find(expected[f].function), std::string::npos) << frames[f];
      EXPECT_EQ(frames[f]["line"].get<unsigned>(), site_line(expected[f].marker)) << frames[f];
      EXPECT_NE(frames[f]["file"].get<std::string>().find("sites_program.cpp"), std::string::npos) << frames[f];
      EXPECT_EQ(frames[f]["inlined"].get<bool>(), expected[f].inlined) << frames[f];
      // One return address: the same module and offset for all three.
      EXPECT_EQ(frames[f]["offset"], frames[2]["offset"]) << frames[f];
      EXPECT_EQ(frames[f]["module"], frames[2]["module"]) << frames[f];
    }
    EXPECT_NE(frames[3]["function"].get<std::string>().find("main"), std::string::npos) << frames[3];
    EXPECT_FALSE(frames[3]["inlined"].get<bool>()) << frames[3];
    EXPECT_NE(frames[3]["offset"], frames[2]["offset"]);
  }
  EXPECT_EQ(found, 1u);

  int status = 0;
  const std::string text = run_text({"inlined", std::to_string(kRepeat)}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile"}, &status);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  const size_t at = text.find("(sites_program.cpp:" + std::to_string(site_line("inlined_malloc")) + ")");
  ASSERT_NE(at, std::string::npos) << text;
  const size_t middle = text.find("(sites_program.cpp:" + std::to_string(site_line("inlined_call")) + ")", at);
  const size_t caller = text.find("(sites_program.cpp:" + std::to_string(site_line("inlined_into")) + ")", at);
  EXPECT_NE(middle, std::string::npos) << text;
  EXPECT_NE(caller, std::string::npos) << text;
  EXPECT_LT(middle, caller) << text;
  EXPECT_NE(text.find("inlining_caller", middle), std::string::npos) << text;
}

// Allocations a function asks for through the standard library (a
// vector's push_back, inlined): the JSON report's focus_frame is that
// function's frame, after the library's (new_allocator.h, allocator.h ...
// stl_vector.h); the text report folds those into their count but for the
// push_back, and names functions without their template arguments.
TEST_F(SitesTest, LibraryFramesInFrontOfTheProgramsOwnAreFolded) {
  constexpr uint64_t kRepeat = 100;
  const Json report = run({"library_path", std::to_string(kRepeat)}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile"});
  unsigned found = 0, folded = 0;
  for (const Json& row : report["sites"]) {
    const Json& frames = row["frames"];
    if (!row["focus_frame"].is_number()) continue;
    const unsigned focus = row["focus_frame"].get<unsigned>();
    ASSERT_LT(focus, frames.size()) << row;
    if (frames[focus]["function"].get<std::string>().find("grow_vector") == std::string::npos) continue;
    ++found;
    EXPECT_EQ(row["sampled_allocations"].get<uint64_t>(), 7 * kRepeat) << "storage for 1, 2, 4 ... 64 ints";
    EXPECT_EQ(frames[focus]["line"].get<unsigned>(), site_line("library_push_back")) << frames[focus];
    EXPECT_NE(frames[focus]["file"].get<std::string>().find("sites_program.cpp"), std::string::npos);
    // At least the allocator, its traits and the push_back in front.
    ASSERT_GE(focus, 3u) << row;
    for (unsigned f = 0; f < focus; ++f)
      EXPECT_NE(frames[f]["file"].get<std::string>().find("/include/c++/"), std::string::npos) << frames[f];
    EXPECT_NE(frames[focus - 1]["function"].get<std::string>().find("push_back"), std::string::npos);
    folded = focus - 1;
  }
  ASSERT_EQ(found, 1u);

  int status = 0;
  const std::string text =
      run_text({"library_path", std::to_string(kRepeat)}, {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile"}, &status);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  const size_t at = text.find("       (+" + std::to_string(folded) + " library frames) <- ");
  ASSERT_NE(at, std::string::npos) << text;
  const std::string line = text.substr(at, text.find('\n', at) - at);
  const size_t push_back = line.find("push_back (stl_vector.h:");
  const size_t own = line.find("grow_vector (sites_program.cpp:" + std::to_string(site_line("library_push_back")) + ")");
  EXPECT_NE(push_back, std::string::npos) << line;
  EXPECT_NE(own, std::string::npos) << line;
  EXPECT_LT(push_back, own) << line;
  EXPECT_EQ(line.find("<int"), std::string::npos) << "no template arguments: " << line;
  EXPECT_EQ(line.find("const&"), std::string::npos) << "no parameter lists: " << line;
}

// Code loaded with dlopen(): a stripped library's function is named from
// its dynamic symbols, with its module; a library unloaded before the
// report leaves frames that cannot be named, and the report is still whole.
TEST_F(SitesTest, DlopenedCodeIsNamedAndUnloadedCodeDoesNotBreakTheReport) {
  constexpr uint64_t kRepeat = 200;
  const Json report = run({"dlopen", HOTPOOL_SITES_LIBRARY_LOADED, HOTPOOL_SITES_LIBRARY_UNLOADED, std::to_string(kRepeat)},
                          {"HOTPOOL_SAMPLE=1", "HOTPOOL_MODE=profile"});
  const std::string loaded = fs::path(HOTPOOL_SITES_LIBRARY_LOADED).filename();
  bool named = false, unloaded = false;
  for (const Json& row : report["sites"]) {
    const Json& frames = row["frames"];
    if (frames.size() < 2 || frames[1]["function"].get<std::string>().find("call_library") == std::string::npos) continue;
    // Frame 0 is inside the library, frame 1 the call in sites_program.
    EXPECT_EQ(frames[1]["line"].get<unsigned>(), site_line("library_call")) << frames[1];
    EXPECT_EQ(row["sampled_allocations"].get<uint64_t>(), kRepeat) << row;
    EXPECT_EQ(row["live_at_exit"].get<uint64_t>(), 1u) << row;
    if (frames[0]["module"] == loaded) {
      named = true;
      EXPECT_EQ(frames[0]["function"], "sites_library_allocate") << frames[0];
      EXPECT_EQ(frames[0]["file"], "") << "the library is stripped";
      EXPECT_GT(frames[0]["offset"].get<uint64_t>(), 0u);
    } else {
      unloaded = true;
      EXPECT_EQ(frames[0]["function"], "??") << frames[0];
    }
  }
  EXPECT_TRUE(named) << "no site in " << loaded;
  EXPECT_TRUE(unloaded) << "no site in the unloaded library";
}

}  // namespace

