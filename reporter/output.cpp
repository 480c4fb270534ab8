#include "output.h"

#include <cerrno>
#include <cstring>
#include <unistd.h>

namespace hotpool::reporter {

Output& Output::str(const char* text) { return str(text, std::strlen(text)); }

Output& Output::str(const char* text, size_t len) {
  while (len) {
    if (used_ == sizeof(buffer_)) {
      if (fd_ < 0) return *this;  // scratch buffers just truncate
      flush();
    }
    size_t take = sizeof(buffer_) - used_;
    if (take > len) take = len;
    std::memcpy(buffer_ + used_, text, take);
    used_ += take;
    text += take;
    len -= take;
  }
  return *this;
}

Output& Output::u64(uint64_t value) {
  char digits[24];
  int n = 0;
  do digits[n++] = static_cast<char>('0' + value % 10); while (value /= 10);
  char text[24];
  for (int i = 0; i < n; ++i) text[i] = digits[n - 1 - i];
  return str(text, static_cast<size_t>(n));
}

Output& Output::i64(int64_t value) {
  if (value < 0) return ch('-').u64(static_cast<uint64_t>(-(value + 1)) + 1);
  return u64(static_cast<uint64_t>(value));
}

Output& Output::fixed(uint64_t value, uint64_t divisor, unsigned decimals) {
  uint64_t scale = 1;
  for (unsigned i = 0; i < decimals; ++i) scale *= 10;
  // Round to nearest without overflowing for the magnitudes reports use.
  const unsigned __int128 scaled = (static_cast<unsigned __int128>(value) * scale + divisor / 2) / divisor;
  const uint64_t whole = static_cast<uint64_t>(scaled / scale);
  const uint64_t frac = static_cast<uint64_t>(scaled % scale);
  u64(whole);
  if (decimals) {
    ch('.');
    char text[24];
    uint64_t rest = frac;
    for (unsigned i = decimals; i > 0; --i) text[i - 1] = static_cast<char>('0' + rest % 10), rest /= 10;
    str(text, decimals);
  }
  return *this;
}

Output& Output::count(uint64_t value) {
  if (value < 1000) return u64(value);
  static const struct { uint64_t unit; char suffix; } units[] = {
      {1000000000000ULL, 'T'}, {1000000000ULL, 'G'}, {1000000ULL, 'M'}, {1000ULL, 'K'}};
  for (const auto& unit : units) {
    if (value >= unit.unit) {
      const unsigned decimals = value >= 100 * unit.unit ? 0 : value >= 10 * unit.unit ? 1 : 2;
      return fixed(value, unit.unit, decimals).ch(unit.suffix);
    }
  }
  return *this;
}

Output& Output::bytes(uint64_t value) {
  if (value < 1024) return u64(value).str(" B");
  static const struct { uint64_t unit; const char* suffix; } units[] = {
      {1ULL << 40, " TiB"}, {1ULL << 30, " GiB"}, {1ULL << 20, " MiB"}, {1ULL << 10, " KiB"}};
  for (const auto& unit : units) {
    if (value >= unit.unit) {
      const unsigned decimals = value >= 100 * unit.unit ? 0 : value >= 10 * unit.unit ? 1 : 2;
      return fixed(value, unit.unit, decimals).str(unit.suffix);
    }
  }
  return *this;
}

Output& Output::percent(uint64_t part, uint64_t whole) {
  if (whole == 0) return ch('-');
  const unsigned __int128 tenths = (static_cast<unsigned __int128>(part) * 1000 + whole / 2) / whole;
  return u64(static_cast<uint64_t>(tenths / 10)).ch('.').u64(static_cast<uint64_t>(tenths % 10)).ch('%');
}

Output& Output::json_string(const char* text) {
  ch('"');
  for (const unsigned char* p = reinterpret_cast<const unsigned char*>(text); *p; ++p) {
    // The run of characters that need no escape, copied at once (function
    // names and paths are nearly all of a report's JSON).
    const unsigned char* run = p;
    while (*p >= 0x20 && *p != '"' && *p != '\\') ++p;
    if (p != run) str(reinterpret_cast<const char*>(run), static_cast<size_t>(p - run));
    if (!*p) break;
    switch (*p) {
      case '"': str("\\\""); break;
      case '\\': str("\\\\"); break;
      case '\n': str("\\n"); break;
      case '\t': str("\\t"); break;
      case '\r': str("\\r"); break;
      default: {  // the other control characters (the run stops only at those)
        static const char hex[] = "0123456789abcdef";
        const char escape[] = {'\\', 'u', '0', '0', hex[*p >> 4], hex[*p & 15]};
        str(escape, sizeof(escape));
      }
    }
  }
  return ch('"');
}

void Output::flush() {
  if (fd_ < 0) return;
  size_t done = 0;
  while (done < used_) {
    const ssize_t n = ::write(fd_, buffer_ + done, used_ - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) { failed_ = true; break; }
    done += static_cast<size_t>(n);
  }
  used_ = 0;
}

}  // namespace hotpool::reporter
