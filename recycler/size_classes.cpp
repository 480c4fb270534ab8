#include "size_classes.h"

namespace hotpool::recycler {

static_assert(kMaxClasses <= 255, "direct lookup table stores class indices in a byte");

static size_t round_up_to_alignment(size_t size) {
  return (size + kClassAlignment - 1) & ~(kClassAlignment - 1);
}

void SizeClassTable::build_default(size_t max_class) {
  if (max_class < 256) max_class = 256;
  if (max_class > kLargestClassLimit) max_class = kLargestClassLimit;
  count_ = 0;
  for (size_t size = 16; size <= 256; size += 16) sizes_[count_++] = static_cast<uint32_t>(size);
  // Eight classes per power of two: 2^k * {1.125, 1.25, ..., 2}: at most
  // 12.5% rounding (four per power of two left a program whose requests sit
  // just above a power of two, as sqlite3's 1 KiB pages do, 25%).
  for (size_t base = 256; sizes_[count_ - 1] < max_class && count_ < kMaxClasses - 1; base *= 2) {
    for (size_t eighth = 9; eighth <= 16 && count_ < kMaxClasses - 1; ++eighth) {
      sizes_[count_++] = static_cast<uint32_t>(base / 8 * eighth);
      if (sizes_[count_ - 1] >= max_class) break;
    }
  }
  finish();
}

bool SizeClassTable::build_from_list(const size_t* sizes, unsigned count) {
  count_ = 0;
  for (unsigned i = 0; i < count; ++i) {
    if (sizes[i] == 0 || sizes[i] > kLargestClassLimit) continue;
    const auto size = static_cast<uint32_t>(round_up_to_alignment(sizes[i]));
    // Insertion into the sorted prefix, skipping duplicates; searched from
    // its end, so that a list in order (the usual case) costs one
    // comparison per size.
    unsigned pos = count_;
    while (pos > 0 && sizes_[pos - 1] >= size) --pos;
    if (pos < count_ && sizes_[pos] == size) continue;
    if (count_ == kMaxClasses - 1) break;
    for (unsigned j = count_; j > pos; --j) sizes_[j] = sizes_[j - 1];
    sizes_[pos] = size;
    ++count_;
  }
  if (count_ == 0) return false;
  finish();
  return true;
}

void SizeClassTable::finish() {
  // count_ so far counts the sized classes; the large class comes last.
  const unsigned sized = count_;
  count_ = sized + 1;
  unsigned c = 0;
  for (size_t i = 0; i <= kDirectLookupLimit / kClassAlignment; ++i) {
    const size_t size = i * kClassAlignment;
    while (c < sized && sizes_[c] < size) ++c;
    direct_[i] = static_cast<uint8_t>(c);  // c == sized is the large class
  }
}

unsigned SizeClassTable::class_of_large(size_t size) const {
  unsigned lo = 0, hi = count_ - 1;  // answer in [lo, hi]; hi is the large class
  while (lo < hi) {
    const unsigned mid = (lo + hi) / 2;
    if (sizes_[mid] >= size) hi = mid; else lo = mid + 1;
  }
  return lo;
}

}  // namespace hotpool::recycler
