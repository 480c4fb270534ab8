// The malloc API contract, checked through libhotpool.so: what a program
// preloaded with hotpool may rely on, in every mode. Modelled on glibc's
// malloc tests (tst-malloc, tst-calloc, tst-realloc, tst-reallocarray,
// tst-malloc-too-large, tst-memalign, tst-posix_memalign, tst-valloc,
// tst-pvalloc, tst-mallocalign1, tst-malloc-usable, tst-free-errno); where
// glibc's behaviour is version-specific, the expectation is glibc's own
// answer, asked of libc.so.6 directly.
//
// Also: C++ operator new/delete in all their variants, pointers crossing
// between hotpool and glibc's __libc_* functions, and the on-demand report
// (hotpool_report) with its JSON schema and exact per-class counts.
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <new>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "hotpool/hotpool.h"
#include "support.h"

// The documented way to call hotpool without depending on it.
#pragma weak hotpool_report

// glibc's own allocator, bypassing symbol interposition.
extern "C" {
void* __libc_malloc(size_t size);
void __libc_free(void* block);
void* __libc_calloc(size_t count, size_t size);
void* __libc_realloc(void* block, size_t size);
void* __libc_memalign(size_t alignment, size_t size);
}

namespace {

using preload_test::class_allocations;
using preload_test::class_for_usable;
using preload_test::class_frees;
using preload_test::Json;
using preload_test::kLargeClass;
using preload_test::mode_records;
using preload_test::opaque;
using preload_test::report_now;

const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));

// Sizes around every boundary that matters to glibc and to hotpool's class
// table: tiny, 16-byte steps, powers of two, the mmap threshold, large.
const std::vector<size_t> kSizes = {
    0,     1,     2,     7,     8,     15,    16,    17,    24,     31,     32,      33,
    48,    63,    64,    65,    100,   127,   128,   129,   255,    256,    257,     500,
    511,   512,   513,   1000,  1023,  1024,  1025,  4095,  4096,   4097,   8192,    16384,
    32768, 40000, 65535, 65536, 65537, 100000, 131072, 200000, 1 << 20, (1 << 20) + 1, 4 << 20};

// Requests no allocator can satisfy (tst-malloc-too-large).
const std::vector<size_t> kHugeSizes = {
    SIZE_MAX,
    SIZE_MAX - 1,
    SIZE_MAX - 16,
    SIZE_MAX - 4096,
    static_cast<size_t>(PTRDIFF_MAX) + 1,
    static_cast<size_t>(PTRDIFF_MAX),
    static_cast<size_t>(PTRDIFF_MAX) - 4096,
};

bool aligned_to(const void* p, size_t alignment) {
  return reinterpret_cast<uintptr_t>(p) % alignment == 0;
}

bool all_bytes_are(const void* p, size_t n, unsigned char value) {
  const auto* bytes = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i)
    if (bytes[i] != value) return false;
  return true;
}

using preload_test::fill_pattern;
using preload_test::first_pattern_mismatch;

size_t round_up(size_t value, size_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// libc.so.6's own definition of `name`, even though hotpool interposes it.
template <typename Function>
Function* glibc_function(const char* name) {
  void* libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
  if (!libc) return nullptr;
  auto* function = reinterpret_cast<Function*>(dlsym(libc, name));
  dlclose(libc);
  return function;
}

// ---------------------------------------------------------------------------
// The suite runs preloaded (first test: everything below depends on it).

TEST(PreloadContract, RunsUnderHotpoolInTheModeCTestAsked) {
  using ModeFunction = const char* (*)();
  auto* mode_function = reinterpret_cast<ModeFunction>(dlsym(RTLD_DEFAULT, "hotpool_mode"));
  ASSERT_NE(mode_function, nullptr) << "hotpool_mode not found: libhotpool.so is not preloaded";
  const char* wanted = getenv("HOTPOOL_MODE");
  ASSERT_NE(wanted, nullptr);
  EXPECT_STREQ(mode_function(), wanted);

  // The malloc and free this program binds to are hotpool's.
  for (const char* name : {"malloc", "free", "calloc", "realloc", "posix_memalign", "aligned_alloc",
                           "memalign", "valloc", "pvalloc", "malloc_usable_size", "reallocarray"}) {
    Dl_info info{};
    void* symbol = dlsym(RTLD_DEFAULT, name);
    ASSERT_NE(symbol, nullptr) << name;
    ASSERT_NE(dladdr(symbol, &info), 0) << name;
    EXPECT_NE(std::strstr(info.dli_fname, "libhotpool"), nullptr)
        << name << " resolves to " << info.dli_fname << ", not to libhotpool.so";
  }
}

// ---------------------------------------------------------------------------
// calloc (tst-calloc)

TEST(Calloc, ReturnsZeroedMemoryForEverySize) {
  for (size_t size : kSizes) {
    for (auto [count, each] : {std::pair{size, size_t{1}}, std::pair{size_t{1}, size}}) {
      void* p = calloc(opaque(count), opaque(each));
      ASSERT_NE(p, nullptr) << "calloc(" << count << ", " << each << ")";
      EXPECT_TRUE(aligned_to(p, 16));
      EXPECT_TRUE(all_bytes_are(p, size, 0)) << "calloc(" << count << ", " << each << ") not zeroed";
      free(p);
    }
  }
  // count * size with both factors above one.
  auto* table = static_cast<uint64_t*>(calloc(opaque(size_t{5000}), sizeof(uint64_t)));
  ASSERT_NE(table, nullptr);
  EXPECT_TRUE(all_bytes_are(table, 5000 * sizeof(uint64_t), 0));
  free(table);
}

TEST(Calloc, ZeroesMemoryThatWasDirtiedAndFreedBefore) {
  // Dirty many blocks of each size, free them (glibc's tcache and bins, or a
  // pool, keep them for reuse), then calloc the same sizes: reused memory
  // must come back zeroed.
  for (int round = 0; round < 3; ++round) {
    std::vector<void*> blocks;
    for (size_t size : kSizes) {
      for (int copies = 0; copies < 8; ++copies) {
        void* p = malloc(opaque(size));
        ASSERT_NE(p, nullptr);
        memset(p, 0xa5, malloc_usable_size(p));
        blocks.push_back(p);
      }
    }
    for (void* p : blocks) free(p);
    blocks.clear();
    for (size_t size : kSizes) {
      for (int copies = 0; copies < 8; ++copies) {
        void* p = copies % 2 ? calloc(opaque(size), 1) : calloc(1, opaque(size));
        ASSERT_NE(p, nullptr);
        EXPECT_TRUE(all_bytes_are(p, size, 0)) << "reused calloc block of " << size << " bytes is dirty";
        blocks.push_back(p);
      }
    }
    for (void* p : blocks) free(p);
  }
}

TEST(Calloc, OverflowingCountTimesSizeFailsWithEnomem) {
  const std::pair<size_t, size_t> overflowing[] = {
      {SIZE_MAX, 2},          {2, SIZE_MAX},          {SIZE_MAX / 2 + 1, 2}, {size_t{1} << 32, size_t{1} << 32},
      {SIZE_MAX, SIZE_MAX},   {(SIZE_MAX / 3) + 1, 3}, {65537, SIZE_MAX / 65536},
  };
  for (auto [count, size] : overflowing) {
    errno = 0;
    void* p = calloc(opaque(count), opaque(size));
    EXPECT_EQ(p, nullptr) << "calloc(" << count << ", " << size << ") overflows and must fail";
    EXPECT_EQ(errno, ENOMEM) << "calloc(" << count << ", " << size << ")";
    free(p);
  }
}

// ---------------------------------------------------------------------------
// reallocarray (tst-reallocarray)

TEST(Reallocarray, OverflowFailsWithEnomemAndLeavesTheBlockIntact) {
  void* block = malloc(100);
  ASSERT_NE(block, nullptr);
  fill_pattern(block, 100, 1);
  const std::pair<size_t, size_t> overflowing[] = {{SIZE_MAX / 2 + 1, 2}, {2, SIZE_MAX}, {SIZE_MAX, SIZE_MAX}};
  for (auto [count, size] : overflowing) {
    errno = 0;
    // opaque(): the compiler must not assume a failed reallocarray freed it.
    void* moved = reallocarray(opaque(block), opaque(count), opaque(size));
    EXPECT_EQ(moved, nullptr) << "reallocarray(p, " << count << ", " << size << ")";
    EXPECT_EQ(errno, ENOMEM);
    EXPECT_EQ(first_pattern_mismatch(block, 100, 1), SIZE_MAX) << "failed reallocarray changed the block";
    errno = 0;
    EXPECT_EQ(reallocarray(nullptr, opaque(count), opaque(size)), nullptr);
    EXPECT_EQ(errno, ENOMEM);
  }
  free(block);
}

TEST(Reallocarray, ResizesLikeReallocKeepingContents) {
  auto* numbers = static_cast<uint32_t*>(reallocarray(nullptr, opaque(size_t{10}), sizeof(uint32_t)));
  ASSERT_NE(numbers, nullptr);
  for (uint32_t i = 0; i < 10; ++i) numbers[i] = i * 2654435761u;
  size_t count = 10;
  for (size_t grown : {size_t{100}, size_t{5000}, size_t{300000}, size_t{7}, size_t{1}}) {
    auto* moved = static_cast<uint32_t*>(reallocarray(numbers, opaque(grown), sizeof(uint32_t)));
    ASSERT_NE(moved, nullptr) << grown;
    numbers = moved;
    for (uint32_t i = 0; i < std::min(count, grown); ++i) ASSERT_EQ(numbers[i], i * 2654435761u) << "element " << i;
    for (size_t i = count; i < grown; ++i) numbers[i] = static_cast<uint32_t>(i) * 2654435761u;
    count = grown;
  }
  // A zero product behaves as realloc(p, 0): glibc frees the block.
  EXPECT_EQ(reallocarray(numbers, opaque(size_t{0}), sizeof(uint32_t)), nullptr);
}

// ---------------------------------------------------------------------------
// realloc (tst-realloc)

TEST(Realloc, NullPointerAllocatesLikeMalloc) {
  for (size_t size : kSizes) {
    void* p = realloc(nullptr, opaque(size));
    ASSERT_NE(p, nullptr) << "realloc(NULL, " << size << ")";
    EXPECT_TRUE(aligned_to(p, 16));
    EXPECT_GE(malloc_usable_size(p), size);
    memset(p, 0x5a, size);
    free(p);
  }
}

TEST(Realloc, ZeroSizeFreesTheBlockAndReturnsNull) {
  // glibc (REALLOC_ZERO_BYTES_FREES): realloc(p, 0) frees p, returns NULL.
  constexpr int kBlocks = 64;
  constexpr size_t kDistinctiveSize = 23456;  // a class nothing else here uses
  const std::optional<Json> before = report_now();
  size_t usable = 0;
  for (int i = 0; i < kBlocks; ++i) {
    void* p = malloc(opaque(kDistinctiveSize));
    ASSERT_NE(p, nullptr);
    usable = malloc_usable_size(p);
    EXPECT_EQ(realloc(p, opaque(size_t{0})), nullptr);
  }
  for (size_t size : {size_t{1}, size_t{100}, size_t{1} << 20}) {
    void* p = malloc(opaque(size));
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(realloc(p, opaque(size_t{0})), nullptr) << size;
  }
  const std::optional<Json> after = report_now();
  if (!mode_records()) return;  // report_now() checked that mode off wrote nothing
  ASSERT_TRUE(before && after);
  const uint64_t size_class = class_for_usable(*after, usable);
  EXPECT_GE(class_frees(*after, size_class) - class_frees(*before, size_class), uint64_t{kBlocks})
      << "realloc(p, 0) frees the block: each must count as a free";
}

TEST(Realloc, GrowingAndShrinkingKeepsContents) {
  const size_t steps[] = {1,      16,     17,     100,    1000,     4096,   5000,  70000,
                          140000, 200000, 2 << 20, 3 << 20, 100000, 3000,   50,    8,
                          1,      64 << 10, 24,   (1 << 20) + 3, 33};
  for (unsigned seed = 0; seed < 3; ++seed) {
    size_t size = 0;
    void* block = nullptr;
    for (size_t next : steps) {
      void* moved = realloc(block, opaque(next));
      ASSERT_NE(moved, nullptr) << "realloc to " << next;
      EXPECT_TRUE(aligned_to(moved, 16));
      EXPECT_GE(malloc_usable_size(moved), next);
      const size_t kept = std::min(size, next);
      ASSERT_EQ(first_pattern_mismatch(moved, kept, seed), SIZE_MAX)
          << "realloc from " << size << " to " << next << " bytes lost contents";
      fill_pattern(moved, next, seed);
      block = moved;
      size = next;
    }
    free(block);
  }
}

TEST(Realloc, HugeRequestFailsWithEnomemAndLeavesTheBlockIntact) {
  for (size_t size : {size_t{100}, size_t{1} << 20}) {  // a heap block and an mmapped one
    void* block = malloc(opaque(size));
    ASSERT_NE(block, nullptr);
    fill_pattern(block, size, 9);
    for (size_t huge : kHugeSizes) {
      errno = 0;
      void* moved = realloc(opaque(block), opaque(huge));
      EXPECT_EQ(moved, nullptr) << "realloc(p, " << huge << ")";
      EXPECT_EQ(errno, ENOMEM) << "realloc(p, " << huge << ")";
      ASSERT_EQ(first_pattern_mismatch(block, size, 9), SIZE_MAX) << "failed realloc damaged the block";
    }
    EXPECT_GE(malloc_usable_size(block), size);
    free(block);
  }
}

// ---------------------------------------------------------------------------
// malloc, free (tst-malloc, tst-free-errno)

TEST(Malloc, ZeroBytesReturnsUniqueFreeablePointers) {
  std::set<void*> seen;
  std::vector<void*> blocks;
  for (int i = 0; i < 200; ++i) {
    void* p = malloc(opaque(size_t{0}));
    ASSERT_NE(p, nullptr) << "glibc's malloc(0) returns a unique pointer";
    EXPECT_TRUE(aligned_to(p, 16));
    EXPECT_TRUE(seen.insert(p).second) << "malloc(0) returned a live pointer twice";
    blocks.push_back(p);
  }
  for (void* p : blocks) free(p);
}

TEST(Free, NullPointerIsANoOpThatKeepsErrno) {
  for (int i = 0; i < 100; ++i) {
    errno = 4242;
    free(opaque<void*>(nullptr));
    ASSERT_EQ(errno, 4242);
  }
}

TEST(Free, PreservesErrnoForEveryKindOfBlock) {
  // glibc >= 2.33 promises free() never changes errno (tst-free-errno):
  // heap blocks, mmapped blocks, aligned ones.
  for (size_t size : kSizes) {
    void* plain = malloc(opaque(size));
    void* aligned = memalign(4096, opaque(size));
    void* zeroed = calloc(1, opaque(size));
    ASSERT_TRUE(plain && aligned && zeroed);
    for (void* p : {plain, aligned, zeroed}) {
      errno = 9876;
      free(p);
      EXPECT_EQ(errno, 9876) << "free() of a " << size << "-byte block changed errno";
    }
  }
  // The first allocator call of a new thread may be a free: hotpool attaches
  // the thread then, and errno must still be untouched.
  void* handed_over = malloc(48);
  int errno_after_free = 0;
  std::thread freeing_thread([&] {
    errno = 5555;
    free(handed_over);
    errno_after_free = errno;
  });
  freeing_thread.join();
  EXPECT_EQ(errno_after_free, 5555) << "a new thread's first free changed errno";
}

TEST(Alignment, EveryAllocationFunctionReturns16ByteAlignedBlocks) {
  for (size_t size : kSizes) {
    std::vector<std::pair<const char*, void*>> blocks = {
        {"malloc", malloc(opaque(size))},
        {"calloc", calloc(1, opaque(size))},
        {"realloc", realloc(nullptr, opaque(size))},
        {"reallocarray", reallocarray(nullptr, 1, opaque(size))},
        {"memalign(8)", memalign(8, opaque(size))},
        {"aligned_alloc(8)", aligned_alloc(8, opaque(size))},
        {"valloc", valloc(opaque(size))},
        {"pvalloc", pvalloc(opaque(size))},
    };
    void* posix = nullptr;
    ASSERT_EQ(posix_memalign(&posix, 8, opaque(size)), 0);
    blocks.emplace_back("posix_memalign(8)", posix);
    for (auto [name, p] : blocks) {
      ASSERT_NE(p, nullptr) << name << "(" << size << ")";
      EXPECT_TRUE(aligned_to(p, 16)) << name << "(" << size << ") = " << p;
      EXPECT_GE(malloc_usable_size(p), size) << name;
      free(p);
    }
  }
}

// ---------------------------------------------------------------------------
// memalign, aligned_alloc, posix_memalign (tst-memalign, tst-posix_memalign,
// tst-mallocalign1)

using AlignedFunction = std::function<void*(size_t alignment, size_t size)>;

void check_every_power_of_two_alignment(const char* name, size_t smallest, const AlignedFunction& allocate) {
  for (size_t alignment = smallest; alignment <= 64 * 1024; alignment *= 2) {
    for (size_t size : {size_t{0}, size_t{1}, size_t{24}, size_t{100}, alignment, alignment + 1, size_t{4000},
                        size_t{70000}, size_t{300000}}) {
      std::vector<void*> blocks;
      for (int copies = 0; copies < 3; ++copies) {
        errno = 0;
        void* p = allocate(alignment, size);
        ASSERT_NE(p, nullptr) << name << "(" << alignment << ", " << size << "): errno " << errno;
        EXPECT_TRUE(aligned_to(p, std::max<size_t>(alignment, 16)))
            << name << "(" << alignment << ", " << size << ") = " << p;
        EXPECT_GE(malloc_usable_size(p), size);
        memset(p, 0xc3, size);
        blocks.push_back(p);
      }
      for (void* p : blocks) free(p);
    }
  }
}

TEST(AlignedAllocation, MemalignHonoursEveryPowerOfTwoAlignmentUpTo64K) {
  check_every_power_of_two_alignment("memalign", 1, [](size_t a, size_t s) { return memalign(opaque(a), opaque(s)); });
}

TEST(AlignedAllocation, AlignedAllocHonoursEveryPowerOfTwoAlignmentUpTo64K) {
  check_every_power_of_two_alignment("aligned_alloc", 1,
                                     [](size_t a, size_t s) { return aligned_alloc(opaque(a), opaque(s)); });
}

TEST(AlignedAllocation, PosixMemalignHonoursEveryPowerOfTwoAlignmentUpTo64K) {
  check_every_power_of_two_alignment("posix_memalign", sizeof(void*), [](size_t a, size_t s) -> void* {
    void* p = nullptr;
    return posix_memalign(&p, opaque(a), opaque(s)) == 0 ? p : nullptr;
  });
}

TEST(AlignedAllocation, PosixMemalignRejectsInvalidAlignmentsAndLeavesResultUntouched) {
  // EINVAL: not a power of two, or not a multiple of sizeof(void*).
  void* const sentinel = reinterpret_cast<void*>(uintptr_t{0xdeadbeef0});
  for (size_t alignment : {size_t{0}, size_t{1}, size_t{2}, size_t{4}, size_t{3}, size_t{12}, size_t{24}, size_t{40},
                           size_t{48}, size_t{96}, size_t{1000}, size_t{4097}, SIZE_MAX / 2 + 2, SIZE_MAX}) {
    for (size_t size : {size_t{0}, size_t{100}, size_t{1} << 20}) {
      void* result = sentinel;
      EXPECT_EQ(posix_memalign(&result, opaque(alignment), opaque(size)), EINVAL)
          << "posix_memalign(&p, " << alignment << ", " << size << ")";
      EXPECT_EQ(result, sentinel) << "posix_memalign wrote *memptr on error, alignment " << alignment;
    }
  }
  // A valid but unsatisfiable alignment: ENOMEM, *memptr untouched.
  void* result = sentinel;
  EXPECT_EQ(posix_memalign(&result, opaque(SIZE_MAX / 2 + 1), 100), ENOMEM);
  EXPECT_EQ(result, sentinel);
  result = sentinel;
  EXPECT_EQ(posix_memalign(&result, 64, opaque(SIZE_MAX - 100)), ENOMEM);
  EXPECT_EQ(result, sentinel);
}

// memalign and aligned_alloc of an alignment that is zero, not a power of
// two, or absurd: hotpool must answer what glibc itself answers (glibc
// rounds memalign's alignment up to a power of two; whether aligned_alloc
// rejects a non-power-of-two depends on the glibc version).
void check_matches_glibc_for_odd_alignments(const char* name, void* (*hotpool_version)(size_t, size_t),
                                            void* (*glibc_version)(size_t, size_t)) {
  ASSERT_NE(glibc_version, nullptr) << "libc.so.6 has no " << name;
  const size_t odd_alignments[] = {0,    1,    2,    3,    5,    8,    12,   24,   48,
                                   96,   100,  1000, 3000, 5000, 65535, SIZE_MAX / 2 + 1,
                                   SIZE_MAX / 2 + 2, SIZE_MAX - 1, SIZE_MAX};
  for (size_t alignment : odd_alignments) {
    for (size_t size : {size_t{0}, size_t{100}, size_t{10000}}) {
      errno = 0;
      void* expected = glibc_version(opaque(alignment), opaque(size));
      const int expected_errno = errno;
      errno = 0;
      void* actual = hotpool_version(opaque(alignment), opaque(size));
      const int actual_errno = errno;
      EXPECT_EQ(actual != nullptr, expected != nullptr)
          << name << "(" << alignment << ", " << size << "): glibc returns " << expected << " (errno "
          << expected_errno << "), hotpool " << actual << " (errno " << actual_errno << ")";
      if (!expected && !actual) {
        EXPECT_EQ(actual_errno, expected_errno) << name << "(" << alignment << ", " << size << ")";
      }
      if (actual && alignment > 1 && alignment <= SIZE_MAX / 2 + 1) {
        EXPECT_TRUE(aligned_to(actual, std::bit_ceil(alignment))) << name << "(" << alignment << ") = " << actual;
      }
      free(expected);
      free(actual);
    }
  }
}

TEST(AlignedAllocation, MemalignTreatsOddAlignmentsExactlyAsGlibcDoes) {
  check_matches_glibc_for_odd_alignments("memalign", memalign, glibc_function<void*(size_t, size_t)>("memalign"));
  // Documented glibc behaviour, whatever the version.
  errno = 0;
  EXPECT_EQ(memalign(opaque(SIZE_MAX / 2 + 2), 100), nullptr);
  EXPECT_EQ(errno, EINVAL);
}

TEST(AlignedAllocation, AlignedAllocTreatsOddAlignmentsExactlyAsGlibcDoes) {
  check_matches_glibc_for_odd_alignments("aligned_alloc", aligned_alloc,
                                         glibc_function<void*(size_t, size_t)>("aligned_alloc"));
}

// ---------------------------------------------------------------------------
// valloc, pvalloc (tst-valloc, tst-pvalloc)

TEST(Valloc, ReturnsPageAlignedBlocksCoveringTheRequest) {
  for (size_t size : kSizes) {
    void* p = valloc(opaque(size));
    ASSERT_NE(p, nullptr) << "valloc(" << size << ")";
    EXPECT_TRUE(aligned_to(p, kPage)) << "valloc(" << size << ") = " << p;
    EXPECT_GE(malloc_usable_size(p), size);
    memset(p, 0x11, size);
    free(p);
  }
}

TEST(Pvalloc, ReturnsPageAlignedBlocksRoundedUpToWholePages) {
  for (size_t size : {size_t{1}, size_t{32}, size_t{100}, kPage - 1, kPage, kPage + 1, 3 * kPage + 5,
                      size_t{200000}, size_t{1} << 20}) {
    void* p = pvalloc(opaque(size));
    ASSERT_NE(p, nullptr) << "pvalloc(" << size << ")";
    EXPECT_TRUE(aligned_to(p, kPage)) << "pvalloc(" << size << ") = " << p;
    const size_t whole_pages = round_up(size, kPage);
    EXPECT_GE(malloc_usable_size(p), whole_pages) << "pvalloc(" << size << ") must give whole pages";
    memset(p, 0x22, whole_pages);  // every byte of the rounded size is the program's
    free(p);
  }
  void* p = pvalloc(opaque(size_t{0}));
  ASSERT_NE(p, nullptr);
  EXPECT_TRUE(aligned_to(p, kPage));
  free(p);
}

// ---------------------------------------------------------------------------
// malloc_usable_size (tst-malloc-usable)

TEST(MallocUsableSize, CoversTheRequestAndEveryUsableByteIsWritable) {
  EXPECT_EQ(malloc_usable_size(nullptr), 0u);
  std::vector<size_t> sizes;
  for (size_t size = 0; size <= 1100; ++size) sizes.push_back(size);
  sizes.insert(sizes.end(), kSizes.begin(), kSizes.end());
  for (size_t size : sizes) {
    void* p = malloc(opaque(size));
    ASSERT_NE(p, nullptr);
    const size_t usable = malloc_usable_size(p);
    ASSERT_GE(usable, size) << "malloc(" << size << ")";
    memset(p, 0x7e, usable);
    // realloc within the usable size keeps every byte written.
    void* same = realloc(p, opaque(usable));
    ASSERT_NE(same, nullptr);
    EXPECT_TRUE(all_bytes_are(same, usable, 0x7e)) << "malloc(" << size << ") usable " << usable;
    free(same);
  }
}

// ---------------------------------------------------------------------------
// Requests no allocator can satisfy (tst-malloc-too-large)

TEST(HugeRequests, FailWithEnomemInEveryAllocationFunction) {
  void* block = malloc(64);
  ASSERT_NE(block, nullptr);
  fill_pattern(block, 64, 3);
  for (size_t huge : kHugeSizes) {
    const std::vector<std::pair<const char*, std::function<void*()>>> calls = {
        {"malloc", [&] { return malloc(opaque(huge)); }},
        {"calloc(1, n)", [&] { return calloc(1, opaque(huge)); }},
        {"calloc(n, 1)", [&] { return calloc(opaque(huge), 1); }},
        {"realloc(NULL, n)", [&] { return realloc(nullptr, opaque(huge)); }},
        {"realloc(p, n)", [&] { return realloc(opaque(block), opaque(huge)); }},
        {"reallocarray(NULL, 1, n)", [&] { return reallocarray(nullptr, 1, opaque(huge)); }},
        {"reallocarray(p, n, 1)", [&] { return reallocarray(opaque(block), opaque(huge), 1); }},
        {"memalign(16, n)", [&] { return memalign(16, opaque(huge)); }},
        {"memalign(64, n)", [&] { return memalign(64, opaque(huge)); }},
        {"memalign(page, n)", [&] { return memalign(kPage, opaque(huge)); }},
        {"aligned_alloc(16, n)", [&] { return aligned_alloc(16, opaque(huge)); }},
        {"aligned_alloc(4096, n)", [&] { return aligned_alloc(4096, opaque(huge)); }},
        {"valloc", [&] { return valloc(opaque(huge)); }},
        {"pvalloc", [&] { return pvalloc(opaque(huge)); }},
    };
    for (const auto& [name, call] : calls) {
      errno = 0;
      void* p = call();
      EXPECT_EQ(p, nullptr) << name << " of " << huge << " bytes succeeded";
      EXPECT_EQ(errno, ENOMEM) << name << " of " << huge << " bytes";
      if (p && p != block) free(p);
    }
    void* const sentinel = &huge;
    void* result = sentinel;
    EXPECT_EQ(posix_memalign(&result, 64, opaque(huge)), ENOMEM) << "posix_memalign of " << huge;
    EXPECT_EQ(result, sentinel);
  }
  EXPECT_EQ(first_pattern_mismatch(block, 64, 3), SIZE_MAX) << "a failed realloc damaged the block";
  free(block);
}

// ---------------------------------------------------------------------------
// Blocks crossing between hotpool and glibc's own entry points

TEST(LibcCrossing, BlocksFromLibcFunctionsCanBeFreedWithFree) {
  for (size_t size : kSizes) {
    void* plain = __libc_malloc(opaque(size));
    void* zeroed = __libc_calloc(1, opaque(size));
    void* aligned = __libc_memalign(256, opaque(size));
    ASSERT_TRUE(plain && zeroed && aligned) << size;
    EXPECT_TRUE(all_bytes_are(zeroed, size, 0));
    EXPECT_TRUE(aligned_to(aligned, 256));
    for (void* p : {plain, zeroed, aligned}) {
      EXPECT_GE(malloc_usable_size(p), size);
      memset(p, 0x33, size);
      free(p);
    }
  }
}

TEST(LibcCrossing, ReallocOfLibcMallocBlocksKeepsContents) {
  for (size_t size : {size_t{10}, size_t{1000}, size_t{100000}, size_t{1} << 20}) {
    // glibc's block, grown and shrunk by hotpool's realloc, freed by free.
    void* block = __libc_malloc(opaque(size));
    ASSERT_NE(block, nullptr);
    fill_pattern(block, size, 5);
    void* grown = realloc(block, opaque(size * 3));
    ASSERT_NE(grown, nullptr);
    EXPECT_EQ(first_pattern_mismatch(grown, size, 5), SIZE_MAX);
    void* shrunk = realloc(grown, opaque(size / 2 + 1));
    ASSERT_NE(shrunk, nullptr);
    EXPECT_EQ(first_pattern_mismatch(shrunk, size / 2 + 1, 5), SIZE_MAX);
    free(shrunk);
  }
}

// The other direction hands hotpool's blocks to glibc's own functions: a
// block hotpool served from its pools would make glibc abort, which would
// take the whole suite down, so these run in a forked child and report
// through its exit status (0: every check passed; a signal: glibc aborted).
std::string run_in_child(const std::function<int()>& body) {
  fflush(nullptr);
  const pid_t child = fork();
  if (child < 0) return "fork failed";
  if (child == 0) {
    preload_test::arm_child_deadline(10);
    _exit(body());
  }
  return preload_test::wait_for_child(child);
}

TEST(LibcCrossing, BlocksFromMallocCanBeFreedWithLibcFree) {
  const std::string outcome = run_in_child([] {
    for (size_t size : kSizes) {
      void* plain = malloc(opaque(size));
      void* zeroed = calloc(1, opaque(size));
      void* aligned = aligned_alloc(128, opaque(size));
      if (!plain || !zeroed || !aligned) return 3;
      for (void* p : {plain, zeroed, aligned}) {
        memset(p, 0x44, size);
        __libc_free(p);
      }
    }
    return 0;
  });
  EXPECT_EQ(outcome, "exit 0") << "__libc_free() of blocks from malloc, calloc and aligned_alloc";
}

TEST(LibcCrossing, LibcReallocOfMallocBlocksKeepsContents) {
  const std::string outcome = run_in_child([] {
    for (size_t size : {size_t{10}, size_t{48}, size_t{1000}, size_t{100000}, size_t{1} << 20}) {
      void* block = malloc(opaque(size));
      if (!block) return 3;
      fill_pattern(block, size, 6);
      void* grown = __libc_realloc(block, opaque(size * 2));
      if (!grown) return 4;
      if (first_pattern_mismatch(grown, size, 6) != SIZE_MAX) return 5;
      __libc_free(grown);
    }
    return 0;
  });
  EXPECT_EQ(outcome, "exit 0") << "__libc_realloc() of blocks from malloc (exit 5: contents lost)";
}

// ---------------------------------------------------------------------------
// C++ operators new and delete

struct NewVariant {
  const char* name;
  size_t alignment;  // 0: the default (__STDCPP_DEFAULT_NEW_ALIGNMENT__)
  void* (*allocate)(size_t size, size_t alignment);
  void (*release)(void* p, size_t size, size_t alignment);
};

// Each allocating variant is paired with a different deallocating one, so
// every operator delete is exercised too.
const NewVariant kNewVariants[] = {
    {"new / delete", 0, [](size_t s, size_t) { return ::operator new(s); },
     [](void* p, size_t, size_t) { ::operator delete(p); }},
    {"new / sized delete", 0, [](size_t s, size_t) { return ::operator new(s); },
     [](void* p, size_t s, size_t) { ::operator delete(p, s); }},
    {"new[] / delete[]", 0, [](size_t s, size_t) { return ::operator new[](s); },
     [](void* p, size_t, size_t) { ::operator delete[](p); }},
    {"new[] / sized delete[]", 0, [](size_t s, size_t) { return ::operator new[](s); },
     [](void* p, size_t s, size_t) { ::operator delete[](p, s); }},
    {"nothrow new / nothrow delete", 0, [](size_t s, size_t) { return ::operator new(s, std::nothrow); },
     [](void* p, size_t, size_t) { ::operator delete(p, std::nothrow); }},
    {"nothrow new[] / nothrow delete[]", 0, [](size_t s, size_t) { return ::operator new[](s, std::nothrow); },
     [](void* p, size_t, size_t) { ::operator delete[](p, std::nothrow); }},
    {"aligned new / aligned delete", 64,
     [](size_t s, size_t a) { return ::operator new(s, std::align_val_t{a}); },
     [](void* p, size_t, size_t a) { ::operator delete(p, std::align_val_t{a}); }},
    {"aligned new / sized aligned delete", 256,
     [](size_t s, size_t a) { return ::operator new(s, std::align_val_t{a}); },
     [](void* p, size_t s, size_t a) { ::operator delete(p, s, std::align_val_t{a}); }},
    {"aligned new[] / aligned delete[]", 128,
     [](size_t s, size_t a) { return ::operator new[](s, std::align_val_t{a}); },
     [](void* p, size_t, size_t a) { ::operator delete[](p, std::align_val_t{a}); }},
    {"aligned new[] / sized aligned delete[]", 4096,
     [](size_t s, size_t a) { return ::operator new[](s, std::align_val_t{a}); },
     [](void* p, size_t s, size_t a) { ::operator delete[](p, s, std::align_val_t{a}); }},
    {"aligned nothrow new / aligned nothrow delete", 32,
     [](size_t s, size_t a) { return ::operator new(s, std::align_val_t{a}, std::nothrow); },
     [](void* p, size_t, size_t a) { ::operator delete(p, std::align_val_t{a}, std::nothrow); }},
    {"aligned nothrow new[] / aligned nothrow delete[]", 512,
     [](size_t s, size_t a) { return ::operator new[](s, std::align_val_t{a}, std::nothrow); },
     [](void* p, size_t, size_t a) { ::operator delete[](p, std::align_val_t{a}, std::nothrow); }},
};

TEST(CxxOperators, EveryNewAndDeleteVariantWorksAndHonoursAlignment) {
  for (const NewVariant& variant : kNewVariants) {
    for (size_t size : kSizes) {
      std::vector<void*> blocks;
      for (int copies = 0; copies < 4; ++copies) {
        void* p = variant.allocate(opaque(size), variant.alignment);
        ASSERT_NE(p, nullptr) << variant.name << " of " << size;
        EXPECT_TRUE(aligned_to(p, std::max<size_t>(variant.alignment, __STDCPP_DEFAULT_NEW_ALIGNMENT__)))
            << variant.name << " of " << size << " = " << p;
        memset(p, 0x5c, size);
        blocks.push_back(p);
      }
      for (void* p : blocks) variant.release(p, size, variant.alignment);
    }
  }
}

struct alignas(64) CacheLine {
  char bytes[72];
};
struct alignas(4096) PageAligned {
  char bytes[100];
};

TEST(CxxOperators, NewExpressionsOfOverAlignedTypesHonourTheirAlignment) {
  for (int i = 0; i < 100; ++i) {
    auto* line = new CacheLine{};
    auto* lines = new CacheLine[7]{};
    auto* page = new PageAligned{};
    auto* pages = new PageAligned[3]{};
    EXPECT_TRUE(aligned_to(line, 64));
    EXPECT_TRUE(aligned_to(lines, 64));
    EXPECT_TRUE(aligned_to(page, 4096));
    EXPECT_TRUE(aligned_to(pages, 4096));
    EXPECT_TRUE(all_bytes_are(lines, sizeof(CacheLine) * 7, 0));
    memset(pages, 0x66, sizeof(PageAligned) * 3);
    delete line;
    delete[] lines;
    delete page;
    delete[] pages;
  }
}

TEST(CxxOperators, HugeRequestsThrowBadAllocOrReturnNullWhenNothrow) {
  // Sizes for which rounding up to the alignment does not wrap around.
  for (size_t huge : {static_cast<size_t>(PTRDIFF_MAX) + 1, SIZE_MAX - 65536, static_cast<size_t>(PTRDIFF_MAX)}) {
    EXPECT_THROW(::operator delete(::operator new(opaque(huge))), std::bad_alloc) << huge;
    EXPECT_THROW(::operator delete[](::operator new[](opaque(huge))), std::bad_alloc) << huge;
    EXPECT_THROW(::operator delete(::operator new(opaque(huge), std::align_val_t{64}), std::align_val_t{64}),
                 std::bad_alloc)
        << huge;
    EXPECT_EQ(::operator new(opaque(huge), std::nothrow), nullptr) << huge;
    EXPECT_EQ(::operator new[](opaque(huge), std::nothrow), nullptr) << huge;
    EXPECT_EQ(::operator new(opaque(huge), std::align_val_t{256}, std::nothrow), nullptr) << huge;
    EXPECT_EQ(::operator new[](opaque(huge), std::align_val_t{256}, std::nothrow), nullptr) << huge;
  }
}

// Allocates `count` blocks of `size` with `variant`, checks the on-demand
// report counted them as allocations of their classes, deletes them and
// checks the frees were counted too. Aligned blocks of one size need not
// have one usable size (glibc carves them where the alignment falls), so
// the expectation is a histogram over classes.
void check_variant_is_accounted(const NewVariant& variant, size_t size, uint64_t count) {
  SCOPED_TRACE(std::string(variant.name) + " of " + std::to_string(size) + " bytes");
  const std::optional<Json> before = report_now();
  std::vector<void*> blocks;
  blocks.reserve(count);
  for (uint64_t i = 0; i < count; ++i) blocks.push_back(variant.allocate(opaque(size), variant.alignment));
  std::vector<size_t> usable_sizes;
  for (void* p : blocks) usable_sizes.push_back(malloc_usable_size(p));
  const std::optional<Json> allocated = report_now();
  for (void* p : blocks) variant.release(p, size, variant.alignment);
  const std::optional<Json> released = report_now();
  if (!mode_records()) return;  // report_now() checked mode off wrote nothing
  ASSERT_TRUE(before && allocated && released);
  std::map<uint64_t, uint64_t> expected;  // class -> blocks of ours in it
  for (size_t usable : usable_sizes) ++expected[class_for_usable(*allocated, usable)];
  for (auto [size_class, blocks_in_class] : expected) {
    EXPECT_GE(class_allocations(*allocated, size_class) - class_allocations(*before, size_class), blocks_in_class)
        << "allocations of class " << size_class;
    EXPECT_GE(class_frees(*released, size_class) - class_frees(*allocated, size_class), blocks_in_class)
        << "frees of class " << size_class;
  }
}

TEST(CxxOperators, ThousandsOfOperatorNewsAreCountedInTheReport) {
  check_variant_is_accounted(kNewVariants[0], 40000, 3000);
  const NewVariant aligned_64 = {"aligned new(72, align 64)", 64,
                                 [](size_t s, size_t a) { return ::operator new(s, std::align_val_t{a}); },
                                 [](void* p, size_t, size_t a) { ::operator delete(p, std::align_val_t{a}); }};
  check_variant_is_accounted(aligned_64, 72, 2000);
}

TEST(CxxOperators, EveryNewAndDeleteVariantIsCountedInTheReport) {
  for (const NewVariant& variant : kNewVariants) check_variant_is_accounted(variant, 3000, 500);
}

// ---------------------------------------------------------------------------
// The on-demand report (hotpool_report)

TEST(OnDemandReport, DescribesThisProcessInTheDocumentedJsonSchema) {
  if (!mode_records()) GTEST_SKIP() << "mode off writes no report (OnDemandReport.ModeOffWritesNoReportFile)";
  std::vector<void*> blocks;  // what this test allocates, whatever ran before
  for (int i = 0; i < 1500; ++i) blocks.push_back(malloc(opaque(size_t(i % 300 + 1))));
  for (void* p : blocks) free(p);
  void* kept = malloc(1000);  // at least one live block
  std::thread([] { free(opaque(malloc(100))); }).join();  // a second thread that allocated
  const std::optional<Json> report = report_now();
  free(kept);
  ASSERT_TRUE(report);
  const Json& r = *report;
  EXPECT_EQ(r.value("schema", ""), "hotpool-report");
  EXPECT_EQ(r.value("version", 0), 2);
  EXPECT_EQ(r.value("pid", 0), getpid());
  EXPECT_EQ(r.value("parent_pid", 0), getppid());
  ASSERT_TRUE(r.contains("forked_from"));
  EXPECT_TRUE(r["forked_from"].is_null()) << "this process was not forked by a hotpool process";
  EXPECT_NE(r.value("program", "").find("preload_contract_test"), std::string::npos) << r["program"];
  EXPECT_EQ(r.value("mode", ""), preload_test::mode_under_test());
  EXPECT_EQ(r.value("reason", ""), "on-demand");

  ASSERT_TRUE(r.contains("totals") && r["totals"].is_object());
  const Json& totals = r["totals"];
  for (const char* key : {"allocations", "frees", "requested_bytes", "usable_bytes", "live_bytes",
                          "peak_live_bytes", "threads_seen"})
    ASSERT_TRUE(totals.contains(key) && totals[key].is_number_unsigned()) << "totals." << key;
  EXPECT_GT(totals["allocations"].get<uint64_t>(), 1500u) << "this test alone made 1502 allocations";
  EXPECT_GE(totals["threads_seen"].get<uint64_t>(), 2u) << "the main thread and the one above allocated";
  EXPECT_GE(totals["usable_bytes"].get<uint64_t>(), totals["requested_bytes"].get<uint64_t>());
  // With several threads the peak may read low by the stated error bound.
  const uint64_t peak_error = totals.value("peak_error_bytes", uint64_t{0});
  EXPECT_GE(totals["peak_live_bytes"].get<uint64_t>() + peak_error, totals["live_bytes"].get<uint64_t>());

  ASSERT_TRUE(r.contains("classes") && r["classes"].is_array());
  ASSERT_FALSE(r["classes"].empty());
  uint64_t allocations = 0, frees = 0, requested = 0, usable = 0, previous_size = 0;
  bool large_seen = false;
  for (const Json& row : r["classes"]) {
    for (const char* key : {"size", "allocations", "frees", "requested_bytes", "usable_bytes", "live_bytes",
                            "peak_live_bytes", "threads"})
      ASSERT_TRUE(row.contains(key)) << "class row without " << key << ": " << row;
    EXPECT_FALSE(large_seen) << "the large class (size null) must come last";
    const uint64_t row_allocations = row["allocations"].get<uint64_t>();
    const uint64_t row_usable = row["usable_bytes"].get<uint64_t>();
    EXPECT_GE(row_usable, row["requested_bytes"].get<uint64_t>()) << row;
    EXPECT_LE(row["threads"].get<uint64_t>(), totals["threads_seen"].get<uint64_t>()) << row;
    if (row["size"].is_null()) {
      large_seen = true;
    } else {
      const uint64_t size = row["size"].get<uint64_t>();
      EXPECT_GT(size, previous_size) << "classes must be listed by increasing size";
      EXPECT_EQ(size % 16, 0u) << row;
      // Every block of a class fits in it.
      EXPECT_LE(row_usable, row_allocations * size) << row;
      previous_size = size;
    }
    allocations += row_allocations;
    frees += row["frees"].get<uint64_t>();
    requested += row["requested_bytes"].get<uint64_t>();
    usable += row_usable;
  }
  EXPECT_EQ(allocations, totals["allocations"].get<uint64_t>()) << "totals are the sum of the classes";
  EXPECT_EQ(frees, totals["frees"].get<uint64_t>());
  EXPECT_EQ(requested, totals["requested_bytes"].get<uint64_t>());
  EXPECT_EQ(usable, totals["usable_bytes"].get<uint64_t>());
}

TEST(OnDemandReport, PeakLiveBytesIsNeverBelowLiveBytesBeyondTheStatedError) {
  if (!mode_records()) GTEST_SKIP() << "mode off writes no report";
  // A hot, short-lived class first (what mode auto pools, and what
  // HOTPOOL_CLASSES pools in mode fixed), then blocks of it kept live: the
  // peak of live bytes can be no lower than the live bytes right now, give
  // or take the error the report itself states.
  for (int i = 0; i < 200000; ++i) free(opaque(malloc(opaque(size_t{48}))));
  std::vector<void*> kept;
  for (int i = 0; i < 2000; ++i) kept.push_back(malloc(opaque(size_t{48})));
  const std::optional<Json> report = report_now();
  for (void* p : kept) free(p);
  ASSERT_TRUE(report);
  const Json& totals = (*report)["totals"];
  const uint64_t peak_error = totals.value("peak_error_bytes", uint64_t{0});
  EXPECT_GE(totals["peak_live_bytes"].get<uint64_t>() + peak_error, totals["live_bytes"].get<uint64_t>())
      << "totals: " << totals;
  for (const Json& row : (*report)["classes"]) {
    EXPECT_GE(row["peak_live_bytes"].get<uint64_t>() + peak_error, row["live_bytes"].get<uint64_t>())
        << "class row " << row;
  }
}

TEST(OnDemandReport, ModeOffWritesNoReportFile) {
  if (mode_records()) GTEST_SKIP() << "only mode off writes nothing";
  for (int i = 0; i < 3; ++i) {
    hotpool_report();
    EXPECT_FALSE(preload_test::read_report(getpid())) << "mode off wrote " << preload_test::report_path(getpid());
  }
}

TEST(OnDemandReport, CountsOfKnownMallocsAndFreesAreExact) {
  if (!mode_records()) GTEST_SKIP() << "mode off counts nothing";
  // A size no other code in this window allocates (its class holds blocks
  // of ~180-230 KB; read_file() reads reports into one 2 MiB buffer): the
  // deltas must be exact, not merely at least.
  constexpr size_t kSize = 180000;
  constexpr uint64_t kCount = 250;
  const std::optional<Json> before = report_now();
  std::vector<void*> blocks;
  blocks.reserve(kCount);
  uint64_t usable_sum = 0;
  size_t largest_usable = 0;
  for (uint64_t i = 0; i < kCount; ++i) {
    blocks.push_back(malloc(opaque(kSize)));
    ASSERT_NE(blocks.back(), nullptr);
    usable_sum += malloc_usable_size(blocks.back());
    largest_usable = std::max(largest_usable, malloc_usable_size(blocks.back()));
  }
  const std::optional<Json> allocated = report_now();
  for (void* p : blocks) free(p);
  const std::optional<Json> released = report_now();
  ASSERT_TRUE(before && allocated && released);

  auto row = [](const Json& report, uint64_t size) -> Json {
    for (const Json& r : report["classes"])
      if (!r["size"].is_null() && r["size"].get<uint64_t>() == size) return r;
    return Json{{"allocations", 0}, {"frees", 0}, {"requested_bytes", 0}, {"usable_bytes", 0}, {"live_bytes", 0}};
  };
  const uint64_t klass = class_for_usable(*allocated, largest_usable);
  ASSERT_NE(klass, kLargeClass) << "the default table has classes up to 1 MiB";
  const Json row_before = row(*before, klass), row_allocated = row(*allocated, klass),
             row_released = row(*released, klass);
  auto delta = [](const Json& later, const Json& earlier, const char* key) {
    return later[key].get<uint64_t>() - earlier[key].get<uint64_t>();
  };
  EXPECT_EQ(delta(row_allocated, row_before, "allocations"), kCount);
  EXPECT_EQ(delta(row_allocated, row_before, "frees"), 0u);
  EXPECT_EQ(delta(row_allocated, row_before, "requested_bytes"), kCount * kSize);
  EXPECT_EQ(delta(row_allocated, row_before, "usable_bytes"), usable_sum);
  EXPECT_EQ(delta(row_allocated, row_before, "live_bytes"), usable_sum);
  EXPECT_EQ(delta(row_released, row_allocated, "allocations"), 0u);
  EXPECT_EQ(delta(row_released, row_allocated, "frees"), kCount);
  EXPECT_EQ(row_released["live_bytes"].get<uint64_t>(), row_before["live_bytes"].get<uint64_t>());
  EXPECT_GE(row_allocated["peak_live_bytes"].get<uint64_t>() +
                (*allocated)["totals"].value("peak_error_bytes", uint64_t{0}),
            usable_sum)
      << "the peak may read low only by the error the report states";
}

TEST(OnDemandReport, FreesAreExactThroughReallocsInPlaceAndAThreadStillRunning) {
  if (!mode_records()) GTEST_SKIP() << "mode off counts nothing";
  // 40000 and 39000 bytes share a class that nothing else here uses, in the
  // default table (40 KiB) and in the fixed runs' (64 KiB, pooled: the
  // realloc stays in place). Pooled frees are counted from the thread
  // caches, for a thread still running at the report too.
  constexpr size_t kSize = 40000, kSmaller = 39000;
  constexpr uint64_t kCount = 200;
  const std::optional<Json> before = report_now();
  std::vector<void*> blocks;
  for (uint64_t i = 0; i < kCount; ++i) blocks.push_back(malloc(opaque(kSize)));
  const size_t usable = malloc_usable_size(blocks.front());
  for (void*& p : blocks) {
    p = realloc(p, opaque(kSmaller));
    ASSERT_NE(p, nullptr);
  }
  for (uint64_t i = 0; i < kCount / 2; ++i) free(blocks[i]);
  std::atomic<int> stage{0};
  std::thread other([&] {
    for (uint64_t i = kCount / 2; i < kCount; ++i) free(blocks[i]);
    stage.store(1);
    while (stage.load() != 2) std::this_thread::yield();  // still running at the report
  });
  while (stage.load() != 1) std::this_thread::yield();
  const std::optional<Json> after = report_now();
  stage.store(2);
  other.join();
  ASSERT_TRUE(before && after);
  const uint64_t size_class = class_for_usable(*after, usable);
  constexpr uint64_t kHarness = 2;  // parsing the first report may use a block of the class
  const uint64_t allocs = class_allocations(*after, size_class) - class_allocations(*before, size_class);
  const uint64_t frees = class_frees(*after, size_class) - class_frees(*before, size_class);
  EXPECT_GE(allocs, 2 * kCount) << "a malloc and a realloc per block";
  EXPECT_LE(allocs, 2 * kCount + kHarness);
  EXPECT_EQ(frees, allocs) << "a realloc frees, then every block was freed, half by the other thread";
}

TEST(OnDemandReport, ReallocCountsAsAFreeOfTheOldClassAndAnAllocationOfTheNew) {
  if (!mode_records()) GTEST_SKIP() << "mode off counts nothing";
  // Classes nothing else here uses, in the default table and in the fixed
  // runs' (HOTPOOL_PRELOAD_FIXED_CLASSES) alike.
  constexpr size_t kFrom = 40000, kTo = 150000;
  constexpr uint64_t kCount = 100;
  const std::optional<Json> before = report_now();
  std::vector<void*> blocks;
  for (uint64_t i = 0; i < kCount; ++i) blocks.push_back(malloc(opaque(kFrom)));
  const size_t usable_from = malloc_usable_size(blocks.front());
  for (void*& p : blocks) {
    p = realloc(p, opaque(kTo));
    ASSERT_NE(p, nullptr);
  }
  const size_t usable_to = malloc_usable_size(blocks.front());
  const std::optional<Json> after = report_now();
  for (void* p : blocks) free(p);
  ASSERT_TRUE(before && after);
  const uint64_t from_class = class_for_usable(*after, usable_from);
  const uint64_t to_class = class_for_usable(*after, usable_to);
  ASSERT_NE(from_class, to_class);
  // Parsing the first report (sites and frames make it large) may itself
  // allocate and free a block or two of these sizes: allow that much.
  constexpr uint64_t kHarness = 2;
  const uint64_t from_allocs = class_allocations(*after, from_class) - class_allocations(*before, from_class);
  const uint64_t from_frees = class_frees(*after, from_class) - class_frees(*before, from_class);
  const uint64_t to_allocs = class_allocations(*after, to_class) - class_allocations(*before, to_class);
  const uint64_t to_frees = class_frees(*after, to_class) - class_frees(*before, to_class);
  EXPECT_GE(from_allocs, kCount);
  EXPECT_LE(from_allocs, kCount + kHarness);
  EXPECT_EQ(from_frees, from_allocs) << "every block of the old class was freed by realloc";
  EXPECT_GE(to_allocs, kCount);
  EXPECT_LE(to_allocs, kCount + kHarness);
  EXPECT_EQ(to_frees, to_allocs - kCount) << "no block of the new class was freed yet";
}

}  // namespace

int main(int argc, char** argv) { return preload_test::run_all_tests(argc, argv, 30); }
