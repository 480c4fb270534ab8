#include "reporter/report.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <iterator>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "reporter/class_stats.h"
#include "reporter/frame_names.h"
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
// innermost (lines 100, 101, ...), in h.h: a system header's for k = 1
// and 8, the program's own else. Address 0x9000 is "f9" of libstdc++.so.6,
// without debug information.
constexpr unsigned kInlined[] = {0, 10, 0, 3, 0, 0, 0, 0, 2};
const Symbol* made_up_symbolize(uintptr_t address) {
  static Symbol symbol;
  static InlinedFrame inlined[Symbol::kMaxInlined];
  const unsigned k = static_cast<unsigned>(address >> 12);
  symbol = Symbol{};
  std::snprintf(symbol.function, sizeof symbol.function, "f%u", k);
  std::snprintf(symbol.file, sizeof symbol.file, "%s", k == 9 ? "" : "/src/x.cpp");
  symbol.line = k == 9 ? 0 : k;
  std::snprintf(symbol.module, sizeof symbol.module, "%s", k == 9 ? "libstdc++.so.6" : "prog");
  symbol.offset = address;
  symbol.inlined_count = k < std::size(kInlined) ? kInlined[k] : 0;
  for (unsigned i = 0; i < symbol.inlined_count; ++i) {
    inlined[i] = InlinedFrame{};
    std::snprintf(inlined[i].function, sizeof inlined[i].function, "f%u_in%u", k, i);
    std::snprintf(inlined[i].file, sizeof inlined[i].file, "%s",
                  k == 1 || k == 8 ? "/usr/include/c++/12/bits/h.h" : "/src/h.h");
    inlined[i].line = 100 + i;
  }
  symbol.inlined = inlined;
  return &symbol;
}

// A site's stack in the reports. Functions inlined at a return address are
// frames too. The text report shows 8 frames from the first one outside
// the system headers and the C and C++ runtime (the focus), folds 3 or more
// library frames in front of it into their count but for the last one,
// and any later run of 3 or more; with no focus, the first 8 frames. The
// JSON report lists every frame, inlined ones marked, with their address's
// offset, and the focus's index.
TEST_F(ReportTest, SitesStacksShowTheirOwnCodeWithLibraryFramesFolded) {
  auto depot = std::make_unique<StackDepot>();
  ASSERT_TRUE(depot->init(kMaxDepth));
  const std::vector<uintptr_t> stacks[] = {
      {0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000},  // 10 library frames inlined first
      {0x2000, 0x3000, 0x4000, 0x5000, 0x7000},          // 8 frames of the program's own
      {0x2000, 0x9000, 0x9000, 0x9000, 0x4000},          // 3 library frames inside the stack
      {0x5000, 0x9000, 0x9000, 0x6000},                  // 2 of them: shown
      {0x8000, 0x2000},                                  // 2 in front: shown
      {0x9000, 0x9000, 0x9000, 0x9000, 0x9000, 0x9000, 0x9000, 0x9000, 0x9000, 0x9000},  // no focus
  };
  uint64_t bytes = 6000;
  for (const auto& stack : stacks) {
    const uint32_t id = depot->insert(stack.data(), static_cast<unsigned>(stack.size()));
    ASSERT_NE(id, 0u);
    depot->site(id).add_allocs(1, bytes, bytes, bytes, SampleWeight{});
    bytes -= 1000;
  }
  const auto class_lifetimes = std::make_unique<LifetimeStats[]>(kMaxClasses);  // none sampled
  const SamplingView view{1, 0, 100000, 65536, 0, 0, 0, 0, 8, 4, 1000000000, depot.get(), class_lifetimes.get(),
                          made_up_symbolize};
  ReportContext ctx = context();
  ctx.sampling = &view;
  const StatsSnapshot snap = snapshot();
  const std::string text = capture([&](Output& o) { write_text_report(snap, ctx, o); });
  const std::string f9 = "f9 (libstdc++.so.6+0x9000)";
  const std::string eight_own = "f2 (x.cpp:2) <- f3_in0 (h.h:100) <- f3_in1 (h.h:101) <- f3_in2 (h.h:102) <- f3 (x.cpp:3)"
                                " <- f4 (x.cpp:4) <- f5 (x.cpp:5)";
  for (const std::string& line : std::vector<std::string>{
           "(+9 library frames) <- f1_in9 (h.h:109) <- f1 (x.cpp:1) <- f2 (x.cpp:2) <- f3_in0 (h.h:100) <- f3_in1 (h.h:101)"
           " <- f3_in2 (h.h:102) <- f3 (x.cpp:3) <- f4 (x.cpp:4) <- f5 (x.cpp:5) <- ...",
           eight_own + " <- f7 (x.cpp:7)",
           "f2 (x.cpp:2) <- (+3 library frames) <- f4 (x.cpp:4)",
           "f5 (x.cpp:5) <- " + f9 + " <- " + f9 + " <- f6 (x.cpp:6)",
           "f8_in0 (h.h:100) <- f8_in1 (h.h:101) <- f8 (x.cpp:8) <- f2 (x.cpp:2)",
           f9 + " <- " + f9 + " <- " + f9 + " <- " + f9 + " <- " + f9 + " <- " + f9 + " <- " + f9 + " <- " + f9 + " <- ...",
       }) {
    EXPECT_NE(text.find("\n       " + line + "\n"), std::string::npos) << line << "\n" << text;
  }

  const nlohmann::json report = nlohmann::json::parse(capture([&](Output& o) { write_json_report(snap, ctx, o); }));
  unsigned seen = 0;
  for (const auto& site : report["sites"]) {
    const auto& frames = site["frames"];
    ASSERT_FALSE(frames.empty()) << site;
    const std::string first = frames[0]["function"];
    if (first == "f1_in0") {
      ++seen;
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
      EXPECT_EQ(site["focus_frame"], 10) << site;
    } else if (first == "f8_in0") {
      ++seen;
      EXPECT_EQ(site["focus_frame"], 2) << site;
    } else if (first == "f9") {
      ++seen;
      EXPECT_TRUE(site["focus_frame"].is_null()) << site;
    } else if (first == "f2" && frames.size() == 8) {
      ++seen;
      EXPECT_EQ(site["focus_frame"], 0) << site;
    }
  }
  EXPECT_EQ(seen, 4u) << report["sites"];
}

// The text report's names: pprof's simplified names, without template
// arguments, parameter lists, qualifiers and return types.
TEST(FrameNames, ShortNamesKeepTheFunctionsName) {
  const std::pair<const char*, const char*> cases[] = {
      {"std::__new_allocator<char>::allocate(unsigned long, void const*)", "std::__new_allocator::allocate"},
      {"std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> >::substr(unsigned long, "
       "unsigned long) const",
       "std::__cxx11::basic_string::substr"},
      {"void std::vector<int, std::allocator<int> >::_M_realloc_insert<int const&>(__gnu_cxx::__normal_iterator<int*, "
       "std::vector<int, std::allocator<int> > >, int const&)",
       "std::vector::_M_realloc_insert"},
      {"std::__detail::_MakeUniq<char []>::__array std::make_unique<char []>(unsigned long)", "std::make_unique"},
      {"std::thread::_State_impl<std::thread::_Invoker<std::tuple<main::{lambda()#1}> > >::_M_run()",
       "std::thread::_State_impl::_M_run"},
      {"main::{lambda()#1}::operator()() const", "main::{lambda#1}::operator()"},
      {"__invoke_impl<void, main(int, char**)::<lambda()> >", "__invoke_impl"},
      {"main(int, char**)::<lambda()>", "main::<lambda>"},
      {"main(int, char**)::<lambda(int, char", "main::<lambda"},  // cut short: never longer than the name
      {"(anonymous namespace)::grow_vector()", "(anonymous namespace)::grow_vector"},
      {"int* (anonymous namespace)::find<int>(int*, int*)", "(anonymous namespace)::find"},
      {"std::operator<< <std::char_traits<char> >(std::basic_ostream<char>&, char const*)", "std::operator<<"},
      {"Matrix::operator<(Matrix const&) const", "Matrix::operator<"},
      {"Handle::operator->() &&", "Handle::operator->"},
      {"operator new(unsigned long)", "operator new"},
      {"operator delete[](void*)", "operator delete[]"},
      {"Value::operator bool() const", "Value::operator bool"},
      {"parse_header(char const*) [clone .isra.0]", "parse_header"},
      {"unsigned long hash<std::string>(std::string const&)", "hash"},
      {"PyUnicode_Substring", "PyUnicode_Substring"},
      {"??", "??"},
      {"std::vector<std::pair<int, std::basic_string<char, std::char_traits<char>, std::alloc", "std::vector"},  // cut short
      {"", ""},
  };
  for (const auto& [name, expected] : cases) {
    char out[192];
    EXPECT_EQ(short_function_name(name, out, sizeof out), std::strlen(expected)) << name;
    EXPECT_STREQ(out, expected) << name;
  }
  char small[8];
  EXPECT_EQ(short_function_name("std::vector<int>::push_back(int const&)", small, sizeof small), 7u);
  EXPECT_STREQ(small, "std::ve");
}

TEST(FrameNames, LibraryFramesAreSystemHeadersAndTheRuntime) {
  EXPECT_TRUE(is_library_frame("/usr/include/c++/12/bits/stl_vector.h", "prog"));
  EXPECT_TRUE(is_library_frame("/usr/include/x86_64-linux-gnu/bits/string_fortified.h", "prog"));
  EXPECT_TRUE(is_library_frame("/opt/gcc-13/include/c++/13/bits/new_allocator.h", "prog"));
  EXPECT_TRUE(is_library_frame("../../../../src/libstdc++-v3/libsupc++/new_op.cc", "libstdc++.so.6"));
  EXPECT_TRUE(is_library_frame("./nptl/pthread_create.c", "libc.so.6"));
  EXPECT_TRUE(is_library_frame("", "libstdc++.so.6"));
  EXPECT_TRUE(is_library_frame("", "libc++abi.so.1"));
  EXPECT_FALSE(is_library_frame("/home/me/server/parse.cpp", "server"));
  EXPECT_FALSE(is_library_frame("", "python3.11"));
  EXPECT_FALSE(is_library_frame("", "libsqlite3.so.0"));
  EXPECT_FALSE(is_library_frame("", "libcurl.so.4"));  // not the C runtime
  EXPECT_FALSE(is_library_frame("", ""));
}

}  // namespace
}  // namespace hotpool::reporter
