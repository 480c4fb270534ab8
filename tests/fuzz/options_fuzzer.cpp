// libFuzzer target for the option parser (shim/options.cpp).
//
// The input is a fake environment: NUL-separated entries, as the kernel lays
// out envp. The first byte of each entry says how it is dressed up, so the
// fuzzer reaches every option's parser instead of guessing "HOTPOOL_":
//   b % 4 == 0: the entry as it is (PATH=..., or anything)
//   b % 4 == 1: "HOTPOOL_" + the entry (unknown names, missing '=')
//   b % 4 == 2, 3: "HOTPOOL_<NAME>=" + the entry, NAME picked by b / 4
// The same bytes also go to every single-value parser.
//
// What must hold, whatever the bytes:
//   - nothing crashes, reads out of bounds or overflows (ASan, UBSan);
//   - every warning is one line (no '\n') starting with "hotpool: ", and
//     parse_options returns the number of warnings it issued;
//   - a parser that fails leaves its output untouched;
//   - a parsed size list has 1..126 entries (or none for an empty text),
//     none zero, each one what parse_size says of that item;
//   - sizes and durations survive a round trip through their decimal form,
//     and every parsed option, formatted with format_option_value and
//     parsed again, comes back the same without a warning.
#include "shim/options.h"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using namespace hotpool::shim;

[[noreturn]] void fail(const char* what, const std::string& detail) {
  std::fprintf(stderr, "options_fuzzer: %s: '%s'\n", what, detail.c_str());
  std::abort();
}

struct Warnings {
  unsigned count = 0;
};

void check_warning(const char* line, void* context) {
  ++static_cast<Warnings*>(context)->count;
  if (std::strncmp(line, "hotpool: ", 9) != 0) fail("warning does not start with 'hotpool: '", line);
  if (std::strchr(line, '\n')) fail("warning is more than one line", line);
  if (std::strlen(line) >= 512) fail("warning longer than its buffer", line);
}

unsigned parse_checked(const std::vector<std::string>& entries, Options* options) {
  std::vector<const char*> envp;
  for (const std::string& entry : entries) envp.push_back(entry.c_str());
  envp.push_back(nullptr);
  Warnings warnings;
  const unsigned count = parse_options(envp.data(), options, check_warning, &warnings);
  if (count != warnings.count) fail("returned count differs from warnings issued", std::to_string(count));
  // Without a sink the parser must behave the same.
  Options again;
  if (parse_options(envp.data(), &again, nullptr, nullptr) != count) fail("count differs without a sink", "");
  return count;
}

std::string decimal(uint64_t value) { return std::to_string(value); }

void check_single_value_parsers(const std::string& text) {
  const char* c = text.c_str();

  bool flag = true;
  if (!parse_bool(c, &flag) && flag != true) fail("parse_bool changed its output on failure", text);

  constexpr size_t kSentinel = 0x5a5a5a5a;
  size_t size = kSentinel;
  if (parse_size(c, &size)) {
    size_t back = 0;
    if (!parse_size(decimal(size).c_str(), &back) || back != size) fail("size does not round-trip", text);
  } else if (size != kSentinel) {
    fail("parse_size changed its output on failure", text);
  }

  uint64_t ns = kSentinel;
  if (parse_duration(c, &ns)) {
    uint64_t back = 0;
    if (!parse_duration((decimal(ns) + "ns").c_str(), &back) || back != ns) fail("duration does not round-trip", text);
  } else if (ns != kSentinel) {
    fail("parse_duration changed its output on failure", text);
  }

  Mode mode = Mode::Fixed;
  if (parse_mode(c, &mode)) {
    if (mode != Mode::Off && mode != Mode::Profile && mode != Mode::Fixed && mode != Mode::Auto)
      fail("parse_mode gave a value outside the enum", text);
  } else if (mode != Mode::Fixed) {
    fail("parse_mode changed its output on failure", text);
  }

  Switch value = Switch::On;
  if (parse_switch(c, &value)) {
    if (value != Switch::Auto && value != Switch::On && value != Switch::Off)
      fail("parse_switch gave a value outside the enum", text);
  } else if (value != Switch::On) {
    fail("parse_switch changed its output on failure", text);
  }

  SizeList list;
  list.count = 7777;
  if (parse_size_list(c, &list)) {
    if (list.count > kMaxListedClasses) fail("size list longer than 126", text);
    // Each item, as parse_size reads it on its own, is the listed value.
    std::vector<std::string> items;
    size_t start = 0;
    for (;;) {
      const size_t comma = text.find(',', start);
      items.push_back(text.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
    if (list.count == 0) {
      // Only a blank text is an empty list.
      for (char ch : text)
        if (ch != ' ' && ch != '\t' && ch != '\n') fail("non-blank text parsed as an empty list", text);
    } else {
      if (items.size() != list.count) fail("size list count differs from its items", text);
      for (unsigned k = 0; k < list.count; ++k) {
        size_t item = 0;
        if (list.values[k] == 0) fail("size list holds a zero", text);
        if (!parse_size(items[k].c_str(), &item) || item != list.values[k])
          fail("size list item differs from parse_size of it", items[k]);
      }
    }
  } else if (list.count != 7777) {
    fail("parse_size_list changed its output on failure", text);
  }
}

// Every option formatted and parsed again must come back the same.
void check_round_trip(const Options& options) {
  std::vector<std::string> entries;
  std::vector<std::string> formatted;
  char buf[8192];
  for (unsigned i = 0; i < option_count(); ++i) {
    format_option_value(options, i, buf, sizeof(buf));
    formatted.emplace_back(buf);
    entries.push_back(std::string(option_info(i).name) + "=" + buf);
  }
  Options reparsed;
  if (parse_checked(entries, &reparsed) != 0) {
    std::string all;
    for (const std::string& entry : entries) all += entry + " ";
    fail("formatted options do not parse back without a warning", all);
  }
  for (unsigned i = 0; i < option_count(); ++i) {
    format_option_value(reparsed, i, buf, sizeof(buf));
    if (formatted[i] != buf) fail("option changes on a round trip", std::string(option_info(i).name) + "=" + formatted[i]);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> raw;
  size_t start = 0;
  for (;;) {
    const size_t end = input.find('\0', start);
    raw.push_back(input.substr(start, end == std::string::npos ? std::string::npos : end - start));
    if (end == std::string::npos || raw.size() == 64) break;
    start = end + 1;
  }

  std::vector<std::string> entries;
  for (const std::string& piece : raw) {
    if (piece.empty()) continue;
    const unsigned char how = static_cast<unsigned char>(piece[0]);
    const std::string rest = piece.substr(1);
    switch (how % 4) {
      case 0: entries.push_back(rest); break;
      case 1: entries.push_back("HOTPOOL_" + rest); break;
      default: entries.push_back(std::string(option_info((how / 4) % option_count()).name) + "=" + rest); break;
    }
    check_single_value_parsers(rest);
  }

  Options options;
  parse_checked(entries, &options);
  check_round_trip(options);
  return 0;
}
