#include "reporter/report.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <iterator>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "reporter/class_stats.h"
#include "reporter/sites.h"
#include "reporter/unwinder.h"

namespace hotpool::reporter {
namespace {

// Captures what an Output writes, through a memfd.
template <typename Write>
std::string capture(Write write) {
  const int fd = memfd_create("report", 0);
  EXPECT_GE(fd, 0);
  {
    Output out(fd);
    write(out);
  }
  std::string text(static_cast<size_t>(lseek(fd, 0, SEEK_END)), '\0');
  EXPECT_EQ(pread(fd, text.data(), text.size(), 0), static_cast<ssize_t>(text.size()));
  close(fd);
  return text;
}

TEST(ClassStats, APooledAllocationsCountAndBytesShareOneWordAndFoldWithoutLoss) {
  auto stats = std::make_unique<ThreadClassStats>();
  stats->add_pooled_alloc(3, 100);
  stats->add_pooled_alloc(3, 28);
  EXPECT_EQ(stats->pooled_allocs(3), 2u);
  EXPECT_EQ(stats->requested_bytes(3), 128u);
  stats->fold_packed_if_due(3);  // neither part half full: nothing moves
  EXPECT_EQ(stats->pooled_allocs_folded[3].load(), 0u);
  // The count part at 2^23 - 1: one more allocation makes it due.
  stats->classes[3].pooled_packed.store((((uint64_t{1} << 23) - 3) << kPackedCountShift) +
                                        stats->classes[3].pooled_packed.load());
  stats->add_pooled_alloc(3, 64);
  EXPECT_EQ(stats->pooled_allocs(3), uint64_t{1} << 23);
  EXPECT_EQ(stats->requested_bytes(3), 192u);
  stats->fold_packed_if_due(3);
  EXPECT_EQ(stats->classes[3].pooled_packed.load(), 0u);
  EXPECT_EQ(stats->pooled_allocs(3), uint64_t{1} << 23) << "the fold loses no allocation";
  EXPECT_EQ(stats->requested_bytes(3), 192u) << "nor a byte";
  // The bytes part at half its width (2^39): due too.
  stats->add_pooled_alloc(3, (uint64_t{1} << 39) - 1);
  stats->add_pooled_alloc(3, 1);
  stats->fold_packed_if_due(3);
  EXPECT_EQ(stats->classes[3].pooled_packed.load(), 0u);
  EXPECT_EQ(stats->pooled_allocs(3), (uint64_t{1} << 23) + 2);
  EXPECT_EQ(stats->requested_bytes(3), 192u + (uint64_t{1} << 39));
  stats->reset();
  EXPECT_EQ(stats->pooled_allocs(3), 0u);
  EXPECT_EQ(stats->requested_bytes(3), 0u);
}

TEST(Output, NumberFormats) {
  EXPECT_EQ(capture([](Output& o) { o.u64(0).ch(' ').u64(18446744073709551615ull); }), "0 18446744073709551615");
  EXPECT_EQ(capture([](Output& o) { o.i64(-42).ch(' ').i64(INT64_MIN); }), "-42 -9223372036854775808");
  EXPECT_EQ(capture([](Output& o) { o.count(999).ch(' ').count(1234).ch(' ').count(51234567).ch(' ').count(123456789); }),
            "999 1.23K 51.2M 123M");
  EXPECT_EQ(capture([](Output& o) { o.bytes(512).ch(' ').bytes(1536).ch(' ').bytes(160ull << 20); }),
            "512 B 1.50 KiB 160 MiB");
  EXPECT_EQ(capture([](Output& o) { o.percent(1, 3).ch(' ').percent(0, 0).ch(' ').percent(5, 5); }),
            "33.3% - 100.0%");
  EXPECT_EQ(capture([](Output& o) { o.fixed(2999, 1000, 2).ch(' ').fixed(1, 3, 0); }), "3.00 0");
  EXPECT_EQ(capture([](Output& o) { o.padded(6, [](Output& p) { p.u64(42); }).ch('|'); }), "    42|");
}

TEST(Output, JsonStringsAreEscaped) {
  EXPECT_EQ(capture([](Output& o) { o.json_string("a\"b\\c\nd\x01"); }), R"("a\"b\\c\nd\u0001")");
}

TEST(Output, LongOutputIsFlushedWhole) {
  const std::string text = capture([](Output& o) {
    for (int i = 0; i < 10000; ++i) o.str("0123456789");
  });
  EXPECT_EQ(text.size(), 100000u);
}

class ReportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    global_ = std::make_unique<GlobalClassStats>();
    sizes_ = {16, 32, 48, 0};
  }
  ThreadClassStats* new_thread() {
    threads_.push_back(std::make_unique<ThreadClassStats>());
    return threads_.back().get();
  }
  StatsSnapshot snapshot() {
    StatsSnapshot snap;
    snap.clear(static_cast<unsigned>(sizes_.size()), sizes_.data());
    for (auto& thread : threads_) snap.add(*thread);
    snap.threads_at_once = threads_.size();
    snap.finish(*global_);
    return snap;
  }
  ReportContext context() {
    static const char* names[] = {"HOTPOOL_MODE"};
    static const char* values[] = {"profile"};
    return ReportContext{1234, 1, 0, "/usr/bin/prog \"quoted\"", "profile", "exit", nullptr, 1500000000, 0,
                         1, names, values, nullptr, false};
  }

  std::unique_ptr<GlobalClassStats> global_;
  std::vector<uint64_t> sizes_;
  std::vector<std::unique_ptr<ThreadClassStats>> threads_;
};

TEST_F(ReportTest, CountsAndPeakOfOneThreadAreExact) {
  ThreadClassStats* t = new_thread();
  // 10 blocks of 24 usable bytes (class 32) requested as 20 bytes, live together.
  for (int i = 0; i < 10; ++i) t->record_alloc(*global_, 1, 20, 24);
  for (int i = 0; i < 10; ++i) t->record_free(*global_, 1, 24);
  for (int i = 0; i < 3; ++i) t->record_alloc(*global_, 1, 20, 24);  // 3 left live
  t->record_alloc(*global_, 3, 5 << 20, (5 << 20) + 8);                // one large block, freed
  t->record_free(*global_, 3, (5 << 20) + 8);
  const StatsSnapshot snap = snapshot();
  EXPECT_EQ(snap.classes[1].allocs, 13u);
  EXPECT_EQ(snap.classes[1].frees, 10u);
  EXPECT_EQ(snap.classes[1].requested_bytes, 260u);
  EXPECT_EQ(snap.classes[1].usable_bytes, 312u);
  EXPECT_EQ(snap.classes[1].peak_live_bytes, 240u);
  EXPECT_EQ(snap.classes[3].peak_live_bytes, (5u << 20) + 8);
  // The total peak: 240 bytes of class 32 then 72 + the large block.
  EXPECT_EQ(snap.total_peak_live_bytes, 72u + (5u << 20) + 8);
  EXPECT_EQ(snap.threads_seen, 1u);
  EXPECT_EQ(snap.classes[1].threads, 1u);
  EXPECT_EQ(snap.classes[0].allocs, 0u);
}

TEST_F(ReportTest, ThreadsAreSummedAndPeaksStayWithinTheStatedBound) {
  constexpr int kThreads = 4;
  constexpr int kBlocks = 50000;
  std::vector<ThreadClassStats*> stats;
  for (int i = 0; i < kThreads; ++i) stats.push_back(new_thread());
  std::vector<std::thread> workers;
  for (int i = 0; i < kThreads; ++i) {
    workers.emplace_back([&, i] {
      for (int k = 0; k < kBlocks; ++k) stats[i]->record_alloc(*global_, 2, 40, 40);
      for (int k = 0; k < kBlocks; ++k) stats[i]->record_free(*global_, 2, 40);
    });
  }
  for (auto& worker : workers) worker.join();
  const StatsSnapshot snap = snapshot();
  EXPECT_EQ(snap.classes[2].allocs, uint64_t{kThreads} * kBlocks);
  EXPECT_EQ(snap.classes[2].frees, uint64_t{kThreads} * kBlocks);
  EXPECT_EQ(snap.classes[2].threads, uint64_t{kThreads});
  // Each thread alone held kBlocks * 40 bytes; the true peak lies between
  // that and kThreads times it. Never above the truth, never below it by
  // more than (threads - 1) * kFlushBytes.
  const uint64_t one = uint64_t{kBlocks} * 40;
  EXPECT_GE(snap.classes[2].peak_live_bytes, one);
  EXPECT_LE(snap.classes[2].peak_live_bytes, kThreads * one);
}

TEST_F(ReportTest, PublishAllAndResetKeepGlobalLiveBytesRight) {
  ThreadClassStats* t = new_thread();
  for (int i = 0; i < 100; ++i) t->record_alloc(*global_, 0, 16, 16);
  t->publish_all(*global_);
  EXPECT_EQ(global_->live[0].load(), 1600);
  EXPECT_EQ(global_->peak[0].load(), 1600u);
  t->reset();
  EXPECT_EQ(t->classes[0].allocs.load(), 0u);
  EXPECT_EQ(t->classes[0].live_delta, 0);
}

TEST_F(ReportTest, FreesOfUncountedBlocksNeverMakeAPeak) {
  ThreadClassStats* t = new_thread();
  t->record_free(*global_, 0, 16);  // a block allocated before hotpool counted
  t->record_alloc(*global_, 0, 16, 16);
  const StatsSnapshot snap = snapshot();
  EXPECT_EQ(snap.classes[0].peak_live_bytes, 0u);
}

TEST_F(ReportTest, JsonCarriesEveryFigure) {
  ThreadClassStats* t = new_thread();
  for (int i = 0; i < 7; ++i) t->record_alloc(*global_, 2, 33, 40);
  t->record_free(*global_, 2, 40);
  const StatsSnapshot snap = snapshot();
  const ReportContext ctx = context();
  const std::string text = capture([&](Output& o) { write_json_report(snap, ctx, o); });
  const nlohmann::json report = nlohmann::json::parse(text);
  EXPECT_EQ(report["schema"], "hotpool-report");
  EXPECT_EQ(report["version"], kJsonSchemaVersion);
  EXPECT_EQ(report["pid"], 1234);
  EXPECT_EQ(report["program"], "/usr/bin/prog \"quoted\"");
  EXPECT_TRUE(report["forked_from"].is_null());
  EXPECT_EQ(report["options"]["HOTPOOL_MODE"], "profile");
  EXPECT_EQ(report["totals"]["allocations"], 7);
  EXPECT_EQ(report["totals"]["frees"], 1);
  EXPECT_EQ(report["totals"]["requested_bytes"], 231);
  EXPECT_EQ(report["totals"]["rounding_bytes"], 49);
  EXPECT_EQ(report["totals"]["live_bytes"], 240);
  ASSERT_EQ(report["classes"].size(), 1u);
  const auto& row = report["classes"][0];
  EXPECT_EQ(row["size"], 48);
  EXPECT_EQ(row["allocations"], 7);
  EXPECT_EQ(row["peak_live_bytes"], 280);
  EXPECT_EQ(row["threads"], 1);
}

TEST_F(ReportTest, EmptyReportIsValidJson) {
  const StatsSnapshot snap = snapshot();
  const ReportContext ctx = context();
  const nlohmann::json report = nlohmann::json::parse(capture([&](Output& o) { write_json_report(snap, ctx, o); }));
  EXPECT_TRUE(report["classes"].empty());
}

TEST_F(ReportTest, TextTableShowsOnlyUsedClassesAndTheLargeRow) {
  ThreadClassStats* t = new_thread();
  t->record_alloc(*global_, 0, 10, 16);
  t->record_alloc(*global_, 3, 100000, 100008);
  const StatsSnapshot snap = snapshot();
  const ReportContext ctx = context();
  const std::string text = capture([&](Output& o) { write_text_report(snap, ctx, o); });
  EXPECT_EQ(text.rfind("hotpool: pid 1234 ", 0), 0u) << text;
  EXPECT_NE(text.find("        16 B          1"), std::string::npos) << text;
  EXPECT_NE(text.find("       large          1"), std::string::npos) << text;
  EXPECT_EQ(text.find("        32 B"), std::string::npos) << text;
  EXPECT_NE(text.find("       total          2"), std::string::npos) << text;
}

// A symbolizer for made-up return addresses: address k * 0x1000 is "fk"
// (x.cpp, line k), with kInlined[k] functions inlined there, "fk_in0"
// innermost (h.h, lines 100, 101, ...).
constexpr unsigned kInlined[] = {0, 10, 0, 3, 0, 0, 0, 0, 2};
const Symbol* made_up_symbolize(uintptr_t address) {
  static Symbol symbol;
  static InlinedFrame inlined[Symbol::kMaxInlined];
  const unsigned k = static_cast<unsigned>(address >> 12);
  symbol = Symbol{};
  std::snprintf(symbol.function, sizeof symbol.function, "f%u", k);
  std::snprintf(symbol.file, sizeof symbol.file, "/src/x.cpp");
  symbol.line = k;
  std::snprintf(symbol.module, sizeof symbol.module, "prog");
  symbol.offset = address;
  symbol.inlined_count = k < std::size(kInlined) ? kInlined[k] : 0;
  for (unsigned i = 0; i < symbol.inlined_count; ++i) {
    inlined[i] = InlinedFrame{};
    std::snprintf(inlined[i].function, sizeof inlined[i].function, "f%u_in%u", k, i);
    std::snprintf(inlined[i].file, sizeof inlined[i].file, "/src/h.h");
    inlined[i].line = 100 + i;
  }
  symbol.inlined = inlined;
  return &symbol;
}

// Functions inlined at a return address are frames of the stack: the text
// report shows a site's first 4 addresses, each with its inlined functions,
// at most 8 frames in all but every one of the first address's; the JSON
// report lists them all, marked inlined, with their address's offset.
TEST_F(ReportTest, InlinedFunctionsAreFramesOfTheirSitesStack) {
  auto depot = std::make_unique<StackDepot>();
  ASSERT_TRUE(depot->init(kMaxDepth));
  const uintptr_t many_first[] = {0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000};  // 10 inlined at the first
  const uintptr_t four_fit[] = {0x2000, 0x3000, 0x4000, 0x5000, 0x7000};           // 7 frames in 4 addresses
  const uintptr_t cut_inside[] = {0x2000, 0x3000, 0x4000, 0x8000};                 // the 4th address's own is the 9th
  for (const auto& [stack, depth, bytes] : {std::tuple{many_first, 6u, 3000u}, std::tuple{four_fit, 5u, 2000u},
                                            std::tuple{cut_inside, 4u, 1000u}}) {
    const uint32_t id = depot->insert(stack, depth);
    ASSERT_NE(id, 0u);
    depot->site(id).add_allocs(1, bytes, bytes, bytes, SampleWeight{});
  }
  const auto class_lifetimes = std::make_unique<LifetimeStats[]>(kMaxClasses);  // none sampled
  const SamplingView view{1, 0, 100000, 65536, 0, 0, 0, 0, 8, 4, 1000000000, depot.get(), class_lifetimes.get(),
                          made_up_symbolize};
  ReportContext ctx = context();
  ctx.sampling = &view;
  const StatsSnapshot snap = snapshot();
  const std::string text = capture([&](Output& o) { write_text_report(snap, ctx, o); });
  std::string all_ten;
  for (unsigned i = 0; i < 10; ++i) all_ten += "f1_in" + std::to_string(i) + " (h.h:" + std::to_string(100 + i) + ") <- ";
  EXPECT_NE(text.find("       " + all_ten + "f1 (x.cpp:1) <- ...\n"), std::string::npos) << text;
  EXPECT_NE(text.find("       f2 (x.cpp:2) <- f3_in0 (h.h:100) <- f3_in1 (h.h:101) <- f3_in2 (h.h:102) <- f3 (x.cpp:3)"
                      " <- f4 (x.cpp:4) <- f5 (x.cpp:5) <- ...\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("       f2 (x.cpp:2) <- f3_in0 (h.h:100) <- f3_in1 (h.h:101) <- f3_in2 (h.h:102) <- f3 (x.cpp:3)"
                      " <- f4 (x.cpp:4) <- f8_in0 (h.h:100) <- f8_in1 (h.h:101) <- ...\n"),
            std::string::npos)
      << text;

  const nlohmann::json report = nlohmann::json::parse(capture([&](Output& o) { write_json_report(snap, ctx, o); }));
  bool seen = false;
  for (const auto& site : report["sites"]) {
    const auto& frames = site["frames"];
    if (frames.empty() || frames[0]["function"] != "f1_in0") continue;
    seen = true;
    ASSERT_EQ(frames.size(), 10u + 6u + 3u) << site;
    for (unsigned i = 0; i < 10; ++i) {
      EXPECT_EQ(frames[i]["function"], "f1_in" + std::to_string(i));
      EXPECT_EQ(frames[i]["line"], 100 + i);
      EXPECT_EQ(frames[i]["inlined"], true);
      EXPECT_EQ(frames[i]["offset"], 0x1000);
    }
    EXPECT_EQ(frames[10]["function"], "f1");
    EXPECT_EQ(frames[10]["inlined"], false);
    EXPECT_EQ(frames[12]["function"], "f3_in0");
    EXPECT_EQ(frames[12]["offset"], 0x3000);
    EXPECT_EQ(frames[15]["function"], "f3");
    EXPECT_EQ(frames[15]["inlined"], false);
    EXPECT_EQ(frames[18]["function"], "f6");
  }
  EXPECT_TRUE(seen) << report["sites"];
}

}  // namespace
}  // namespace hotpool::reporter
