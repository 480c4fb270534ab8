#include "recycler/size_classes.h"

#include <gtest/gtest.h>

#include <vector>

namespace hotpool::recycler {
namespace {

// The definition, by brute force: the smallest class >= size.
unsigned reference_class_of(const SizeClassTable& table, size_t size) {
  for (unsigned c = 0; c + 1 < table.count(); ++c)
    if (table.class_size(c) >= size) return c;
  return table.large_class();
}

void expect_lookup_matches_definition(const SizeClassTable& table) {
  for (size_t size = 0; size <= 70000; ++size)
    ASSERT_EQ(table.class_of(size), reference_class_of(table, size)) << "size " << size;
  for (size_t size = 70000; size < (size_t{1} << 31); size = size * 9 / 8 + 1) {
    ASSERT_EQ(table.class_of(size), reference_class_of(table, size)) << "size " << size;
    ASSERT_EQ(table.class_of(size + 1), reference_class_of(table, size + 1)) << "size " << size + 1;
  }
  ASSERT_EQ(table.class_of(~size_t{0}), table.large_class());
}

TEST(SizeClasses, DefaultTableIsGeometric) {
  SizeClassTable table;
  table.build_default(kDefaultMaxClass);
  ASSERT_EQ(table.count(), 16u + 8u * 12u + 1u);  // 16 B steps to 256, 8 per doubling to 1 MiB, large
  for (unsigned c = 0; c < 16; ++c) EXPECT_EQ(table.class_size(c), 16u * (c + 1));
  const std::vector<size_t> next = {288, 320, 352, 384, 416, 448, 480, 512, 576, 640, 704, 768, 832, 896, 960, 1024};
  for (unsigned i = 0; i < next.size(); ++i) EXPECT_EQ(table.class_size(16 + i), next[i]);
  EXPECT_EQ(table.max_class_size(), size_t{1} << 20);
  EXPECT_EQ(table.class_size(table.large_class()), 0u);
  for (unsigned c = 0; c + 1 < table.count(); ++c) {
    EXPECT_EQ(table.class_size(c) % kClassAlignment, 0u);
    if (c > 16) {
      // Rounding waste is bounded: each class at most 12.5% above the one below.
      EXPECT_LE(table.class_size(c) * 8, table.class_size(c - 1) * 9);
    }
  }
  expect_lookup_matches_definition(table);
}

TEST(SizeClasses, DefaultMaximumIsRoundedAndClamped) {
  SizeClassTable table;
  table.build_default(100000);
  EXPECT_EQ(table.max_class_size(), 106496u);  // 64K * 1.625, first class >= 100000
  table.build_default(1);
  EXPECT_EQ(table.max_class_size(), 256u);
  table.build_default(~size_t{0});
  EXPECT_LE(table.max_class_size(), kLargestClassLimit);
  EXPECT_LE(table.count(), kMaxClasses);
  expect_lookup_matches_definition(table);
}

TEST(SizeClasses, ExplicitListIsRoundedSortedAndDeduplicated) {
  SizeClassTable table;
  const size_t sizes[] = {1024, 48, 50, 64, 48, 100000};
  ASSERT_TRUE(table.build_from_list(sizes, 6));
  const std::vector<size_t> expected = {48, 64, 1024, 100000};
  ASSERT_EQ(table.count(), expected.size() + 1);
  for (unsigned c = 0; c < expected.size(); ++c) EXPECT_EQ(table.class_size(c), expected[c]);
  EXPECT_EQ(table.class_of(1), 0u);
  EXPECT_EQ(table.class_of(49), 1u);
  EXPECT_EQ(table.class_of(65), 2u);
  EXPECT_EQ(table.class_of(1025), 3u);
  EXPECT_EQ(table.class_of(100001), table.large_class());
  expect_lookup_matches_definition(table);
}

TEST(SizeClasses, ExplicitListWithNothingUsableFails) {
  SizeClassTable table;
  const size_t sizes[] = {0, kLargestClassLimit + 1};
  EXPECT_FALSE(table.build_from_list(sizes, 2));
  EXPECT_FALSE(table.build_from_list(sizes, 0));
}

TEST(SizeClasses, ExplicitListIsCappedAtTheClassLimit) {
  std::vector<size_t> sizes;
  for (size_t i = 1; i <= 300; ++i) sizes.push_back(i * 16);
  SizeClassTable table;
  ASSERT_TRUE(table.build_from_list(sizes.data(), static_cast<unsigned>(sizes.size())));
  EXPECT_EQ(table.count(), kMaxClasses);
  expect_lookup_matches_definition(table);
}

}  // namespace
}  // namespace hotpool::recycler
