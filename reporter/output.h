// Output: a fixed-buffer writer onto a file descriptor, with the number
// formats the reports use. It never allocates (the report runs inside the
// allocator, possibly while other threads allocate) and uses write(2) only.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hotpool::reporter {

class Output {
 public:
  explicit Output(int fd) : fd_(fd) {}
  ~Output() { flush(); }
  Output(const Output&) = delete;
  Output& operator=(const Output&) = delete;

  Output& str(const char* text);
  Output& str(const char* text, size_t len);
  // Inline: reports write most of their bytes one or a few at a time.
  Output& ch(char c) {
    if (__builtin_expect(used_ < sizeof(buffer_), 1)) {
      buffer_[used_++] = c;
      return *this;
    }
    return str(&c, 1);
  }
  Output& u64(uint64_t value);
  Output& i64(int64_t value);
  // value / divisor with `decimals` digits after the point, rounded.
  Output& fixed(uint64_t value, uint64_t divisor, unsigned decimals);
  // Right-aligns whatever `emit` writes in a field of `width` characters.
  template <typename Emit>
  Output& padded(unsigned width, Emit emit) {
    Output scratch(-1);
    emit(scratch);
    for (size_t i = scratch.used_; i < width; ++i) ch(' ');
    return str(scratch.buffer_, scratch.used_);
  }
  // 999, 12.3K, 51.2M, 1.20G
  Output& count(uint64_t value);
  // 512 B, 12.0 KiB, 3.20 MiB, 1.20 GiB
  Output& bytes(uint64_t value);
  // part/whole as "93.1%" ("-" when whole is 0)
  Output& percent(uint64_t part, uint64_t whole);
  // A JSON string literal with escapes.
  Output& json_string(const char* text);

  void flush();
  bool failed() const { return failed_; }

 private:
  int fd_;
  bool failed_ = false;
  size_t used_ = 0;
  char buffer_[4096];
};

}  // namespace hotpool::reporter
