// Size classes: the table that maps a request size to the class that serves it.
//
// Layering: recycler/ knows nothing of the shim or the reporter. The shim
// builds one table at start-up from the options and hands the class sizes
// to the reporter, so both speak of the same classes.
//
// Classes are multiples of 16 bytes (every malloc result is 16-byte aligned,
// so a pooled block of a class must be too). The table ends with one
// catch-all "large" class for everything above the largest class.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hotpool::recycler {

inline constexpr unsigned kMaxClasses = 128;        // including the large class
inline constexpr size_t kClassAlignment = 16;
inline constexpr size_t kLargestClassLimit = size_t{1} << 30;  // 1 GiB
inline constexpr size_t kDefaultMaxClass = size_t{1} << 20;    // 1 MiB
// Sizes up to this bound are looked up in a direct table (one load);
// larger ones by a binary search over the few classes above it.
inline constexpr size_t kDirectLookupLimit = 64 * 1024;

class SizeClassTable {
 public:
  // The default geometric table: 16-byte steps up to 256 B, then eight classes
  // per power of two (288, 320, 352, ..., 512, 576, ...) up to max_class, which is
  // rounded up to the nearest class of that progression.
  void build_default(size_t max_class);

  // An explicit list (HOTPOOL_CLASSES). Sizes are rounded up to multiples of
  // 16, sorted and de-duplicated; at most kMaxClasses - 1 are kept. Returns
  // false (and leaves the table empty) when nothing usable remains.
  bool build_from_list(const size_t* sizes, unsigned count);

  // Number of classes including the large class.
  unsigned count() const { return count_; }
  unsigned large_class() const { return count_ - 1; }
  // Byte size of class c; 0 for the large class.
  size_t class_size(unsigned c) const { return c < count_ - 1 ? sizes_[c] : 0; }
  size_t max_class_size() const { return sizes_[count_ - 2]; }
  const uint32_t* sizes() const { return sizes_; }  // [count() - 1]: the sized classes

  // FAST PATH: the smallest class whose size is >= size; the large class when
  // none is. One compare and one table load for sizes up to 64 KiB.
  // The direct table's part of class_of, for fast paths that test the
  // limit themselves (and go elsewhere beyond it).
  static bool direct(size_t size) { return size <= kDirectLookupLimit; }
  unsigned class_of_direct(size_t size) const { return direct_[(size + kClassAlignment - 1) / kClassAlignment]; }
  unsigned class_of(size_t size) const {
    if (__builtin_expect(size <= kDirectLookupLimit, 1))
      return direct_[(size + kClassAlignment - 1) / kClassAlignment];
    return class_of_large(size);
  }

 private:
  void finish();
  unsigned class_of_large(size_t size) const;

  uint32_t sizes_[kMaxClasses] = {};
  unsigned count_ = 0;
  // direct_[i]: class of a request of i*16 bytes (and of everything between
  // (i-1)*16+1 and i*16). uint8_t suffices: kMaxClasses <= 255.
  uint8_t direct_[kDirectLookupLimit / kClassAlignment + 1] = {};
};

}  // namespace hotpool::recycler
