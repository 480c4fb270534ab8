#include "options.h"

#include <cstring>
#include <initializer_list>

namespace hotpool::shim {
namespace {

constexpr char kPrefix[] = "HOTPOOL_";
constexpr size_t kPrefixLen = sizeof(kPrefix) - 1;

const OptionInfo kOptionInfo[] = {
#define HOTPOOL_OPTION(field, Type, name, def, desc) {"HOTPOOL_" name, Type##TypeName, def, desc},
#define ModeTypeName "mode"
#define UnwinderTypeName "unwinder"
#define SwitchTypeName "switch"
#define PathTypeName "path"
#define BoolTypeName "bool"
#define SizeTypeName "size"
#define SizeListTypeName "size list"
#define DurationTypeName "duration"
#define ShareTypeName "share"
#include "options.inc"
#undef DurationTypeName
#undef ShareTypeName
#undef ModeTypeName
#undef UnwinderTypeName
#undef SwitchTypeName
#undef PathTypeName
#undef BoolTypeName
#undef SizeTypeName
#undef SizeListTypeName
#undef HOTPOOL_OPTION
};
constexpr unsigned kOptionCount = sizeof(kOptionInfo) / sizeof(kOptionInfo[0]);

char lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

bool equals_ignoring_case(const char* a, size_t a_len, const char* b) {
  size_t i = 0;
  for (; i < a_len && b[i]; ++i)
    if (lower(a[i]) != lower(b[i])) return false;
  return i == a_len && b[i] == '\0';
}

// Trims ASCII blanks at both ends; returns the length of what remains.
const char* trim(const char* text, size_t* len) {
  size_t n = std::strlen(text);
  while (n && (*text == ' ' || *text == '\t')) ++text, --n;
  while (n && (text[n - 1] == ' ' || text[n - 1] == '\t' || text[n - 1] == '\n')) --n;
  *len = n;
  return text;
}

// Parses a size from [text, text+len). Accepts an optional suffix K, M, G
// (also k/m/g, KB, KiB...), all binary multiples.
bool parse_size_span(const char* text, size_t len, size_t* out) {
  size_t i = 0;
  unsigned long long value = 0;
  if (len == 0) return false;
  for (; i < len && text[i] >= '0' && text[i] <= '9'; ++i) {
    const unsigned digit = static_cast<unsigned>(text[i] - '0');
    if (value > (~0ULL - digit) / 10) return false;  // overflow
    value = value * 10 + digit;
  }
  if (i == 0) return false;
  const char* suffix = text + i;
  const size_t suffix_len = len - i;
  unsigned shift = 0;
  if (suffix_len == 0 || equals_ignoring_case(suffix, suffix_len, "b")) shift = 0;
  else if (equals_ignoring_case(suffix, 1, "k") && (suffix_len == 1 || equals_ignoring_case(suffix + 1, suffix_len - 1, "b") || equals_ignoring_case(suffix + 1, suffix_len - 1, "ib"))) shift = 10;
  else if (equals_ignoring_case(suffix, 1, "m") && (suffix_len == 1 || equals_ignoring_case(suffix + 1, suffix_len - 1, "b") || equals_ignoring_case(suffix + 1, suffix_len - 1, "ib"))) shift = 20;
  else if (equals_ignoring_case(suffix, 1, "g") && (suffix_len == 1 || equals_ignoring_case(suffix + 1, suffix_len - 1, "b") || equals_ignoring_case(suffix + 1, suffix_len - 1, "ib"))) shift = 30;
  else return false;
  if (shift && value > (~0ULL >> shift)) return false;
  *out = static_cast<size_t>(value << shift);
  return true;
}

struct Warner {
  WarningSink sink;
  void* context;
  unsigned count = 0;

  // One line: "hotpool: <a><b><c>". Fixed buffer, truncated if needed.
  void warn(std::initializer_list<const char*> parts) {
    char line[512] = "hotpool: ";
    size_t used = std::strlen(line);
    // What the environment holds is echoed, so control characters become
    // '?': a warning stays one line whatever the value.
    for (const char* part : parts) {
      for (; *part && used + 1 < sizeof(line); ++part)
        line[used++] = static_cast<unsigned char>(*part) < 0x20 || *part == 0x7f ? '?' : *part;
    }
    line[used] = '\0';
    ++count;
    if (sink) sink(line, context);
  }
};

bool parse_path(const char* text, char (&out)[kMaxPath]) {
  const size_t len = std::strlen(text);
  if (len >= kMaxPath) return false;
  std::memcpy(out, text, len + 1);
  return true;
}

// Typed setters used by the X-macro: parse `text` into `field`, or warn and
// keep the default.
template <typename T, typename Parser>
void apply(const char* name, const char* text, const char* def, const char* expected, T* field,
           Parser parse, Warner& warner) {
  if (!parse(text, field))
    warner.warn({name, "='", text, "' is not ", expected, "; using the default '", def, "'"});
}

}  // namespace

const char* mode_name(Mode mode) {
  switch (mode) {
    case Mode::Off: return "off";
    case Mode::Profile: return "profile";
    case Mode::Fixed: return "fixed";
    case Mode::Auto: return "auto";
  }
  return "?";
}

bool parse_bool(const char* text, bool* out) {
  size_t len;
  text = trim(text, &len);
  for (const char* yes : {"1", "true", "yes", "on", "y", "enable", "enabled"})
    if (equals_ignoring_case(text, len, yes)) return *out = true, true;
  for (const char* no : {"0", "false", "no", "off", "n", "disable", "disabled"})
    if (equals_ignoring_case(text, len, no)) return *out = false, true;
  return false;
}

bool parse_size(const char* text, size_t* out) {
  size_t len;
  text = trim(text, &len);
  return parse_size_span(text, len, out);
}

bool parse_size_list(const char* text, SizeList* out) {
  SizeList list{};
  size_t len;
  text = trim(text, &len);
  size_t start = 0;
  while (start <= len && len > 0) {
    size_t end = start;
    while (end < len && text[end] != ',') ++end;
    size_t item_start = start, item_end = end;
    while (item_start < item_end && text[item_start] == ' ') ++item_start;
    while (item_end > item_start && text[item_end - 1] == ' ') --item_end;
    size_t value;
    if (!parse_size_span(text + item_start, item_end - item_start, &value) || value == 0) return false;
    if (list.count == kMaxListedClasses) return false;
    list.values[list.count++] = value;
    start = end + 1;
  }
  *out = list;  // an empty text is a valid, empty list
  return true;
}

bool parse_duration(const char* text, uint64_t* out_ns) {
  size_t len;
  text = trim(text, &len);
  size_t i = 0;
  unsigned long long value = 0;
  for (; i < len && text[i] >= '0' && text[i] <= '9'; ++i) {
    const unsigned digit = static_cast<unsigned>(text[i] - '0');
    if (value > (~0ULL - digit) / 10) return false;
    value = value * 10 + digit;
  }
  if (i == 0) return false;
  const char* suffix = text + i;
  const size_t suffix_len = len - i;
  unsigned long long unit;
  if (suffix_len == 0 || equals_ignoring_case(suffix, suffix_len, "ms")) unit = 1000000ULL;
  else if (equals_ignoring_case(suffix, suffix_len, "ns")) unit = 1ULL;
  else if (equals_ignoring_case(suffix, suffix_len, "us") || equals_ignoring_case(suffix, suffix_len, "\xc2\xb5s")) unit = 1000ULL;
  else if (equals_ignoring_case(suffix, suffix_len, "s")) unit = 1000000000ULL;
  else return false;
  if (value > ~0ULL / unit) return false;
  *out_ns = value * unit;
  return true;
}

bool parse_share(const char* text, uint32_t* out_ppm) {
  // A decimal number of percent, with an optional '%': up to four
  // decimals (parts per million), no exponent, no locale.
  size_t len;
  text = trim(text, &len);
  if (len && text[len - 1] == '%') --len;
  while (len && text[len - 1] == ' ') --len;
  size_t i = 0;
  uint64_t ppm = 0;
  for (; i < len && text[i] >= '0' && text[i] <= '9'; ++i) {
    ppm = ppm * 10 + static_cast<unsigned>(text[i] - '0');
    if (ppm > 100) return false;
  }
  const size_t whole_digits = i;
  ppm *= 10000;
  uint64_t scale = 10000;  // ppm per unit of the next digit: 1000 for the first decimal
  if (i < len && text[i] == '.') {
    for (++i; i < len && text[i] >= '0' && text[i] <= '9'; ++i) {
      if (scale == 1) return false;  // a fifth decimal: finer than a part per million
      scale /= 10;
      ppm += static_cast<unsigned>(text[i] - '0') * scale;
    }
  }
  if (i != len || (whole_digits == 0 && scale == 10000) || ppm > 1000000) return false;
  *out_ppm = static_cast<uint32_t>(ppm);
  return true;
}

const char* unwinder_name(Unwinder unwinder) { return unwinder == Unwinder::Libgcc ? "libgcc" : "libunwind"; }

bool parse_unwinder(const char* text, Unwinder* out) {
  size_t len;
  text = trim(text, &len);
  for (Unwinder unwinder : {Unwinder::Libgcc, Unwinder::Libunwind})
    if (equals_ignoring_case(text, len, unwinder_name(unwinder))) return *out = unwinder, true;
  return false;
}

const char* switch_name(Switch value) {
  return value == Switch::Auto ? "auto" : value == Switch::On ? "on" : "off";
}

bool parse_switch(const char* text, Switch* out) {
  size_t len;
  const char* trimmed = trim(text, &len);
  if (equals_ignoring_case(trimmed, len, "auto")) return *out = Switch::Auto, true;
  bool on;
  if (!parse_bool(text, &on)) return false;
  *out = on ? Switch::On : Switch::Off;
  return true;
}

bool parse_mode(const char* text, Mode* out) {
  size_t len;
  text = trim(text, &len);
  for (Mode mode : {Mode::Off, Mode::Profile, Mode::Fixed, Mode::Auto})
    if (equals_ignoring_case(text, len, mode_name(mode))) return *out = mode, true;
  return false;
}

unsigned option_count() { return kOptionCount; }
const OptionInfo& option_info(unsigned index) { return kOptionInfo[index]; }

unsigned parse_options(const char* const* envp, Options* out, WarningSink sink, void* context) {
  Warner warner{sink, context};
  auto parse_path_value = [](const char* text, char (*field)[kMaxPath]) { return parse_path(text, *field); };
  auto parse_mode_value = [](const char* text, Mode* field) { return parse_mode(text, field); };
  auto parse_unwinder_value = [](const char* text, Unwinder* field) { return parse_unwinder(text, field); };
  auto parse_switch_value = [](const char* text, Switch* field) { return parse_switch(text, field); };
  auto parse_bool_value = [](const char* text, bool* field) { return parse_bool(text, field); };
  auto parse_size_value = [](const char* text, size_t* field) { return parse_size(text, field); };
  auto parse_list_value = [](const char* text, SizeList* field) { return parse_size_list(text, field); };
  auto parse_duration_value = [](const char* text, uint64_t* field) { return parse_duration(text, field); };
  auto parse_share_value = [](const char* text, uint32_t* field) { return parse_share(text, field); };

  // Defaults, through the same parsers (a test checks every default parses).
  *out = Options{};
#define HOTPOOL_OPTION(field, Type, name, def, desc) \
  (void)parse_##Type##_default(def, &out->field);
#define parse_Mode_default parse_mode_value
#define parse_Unwinder_default parse_unwinder_value
#define parse_Switch_default parse_switch_value
#define parse_Path_default parse_path_value
#define parse_Bool_default parse_bool_value
#define parse_Size_default parse_size_value
#define parse_SizeList_default parse_list_value
#define parse_Duration_default parse_duration_value
#define parse_Share_default parse_share_value
#include "options.inc"
#undef HOTPOOL_OPTION

  const char* expected_Mode = "one of off, profile, fixed, auto";
  const char* expected_Unwinder = "libgcc or libunwind";
  const char* expected_Switch = "auto, or a boolean (1/0, true/false, yes/no, on/off)";
  const char* expected_Path = "a path shorter than 512 bytes";
  const char* expected_Bool = "a boolean (1/0, true/false, yes/no, on/off)";
  const char* expected_Size = "a size (a number with an optional K, M or G suffix)";
  const char* expected_SizeList = "a comma-separated list of non-zero sizes (at most 126)";
  const char* expected_Duration = "a duration (a number with an optional ns, us, ms or s suffix; bare = ms)";
  const char* expected_Share = "a share from 0 to 100% (a number of percent, up to four decimals, with an optional %)";

  for (const char* const* entry = envp; entry && *entry; ++entry) {
    const char* var = *entry;
    if (std::strncmp(var, kPrefix, kPrefixLen) != 0) continue;
    const char* equals = std::strchr(var, '=');
    if (!equals) continue;
    const char* value = equals + 1;
    const size_t name_len = static_cast<size_t>(equals - var);
    bool known = false;
#define HOTPOOL_OPTION(field, Type, name, def, desc)                                            \
    if (!known && name_len == kPrefixLen + sizeof(name) - 1 &&                                  \
        std::memcmp(var + kPrefixLen, name, sizeof(name) - 1) == 0) {                           \
      known = true;                                                                             \
      apply("HOTPOOL_" name, value, def, expected_##Type, &out->field, parse_##Type##_default, warner); \
    }
#include "options.inc"
#undef HOTPOOL_OPTION
    if (!known) {
      char name[128];
      const size_t copy = name_len < sizeof(name) - 1 ? name_len : sizeof(name) - 1;
      std::memcpy(name, var, copy);
      name[copy] = '\0';
      warner.warn({"unknown option ", name, " ignored (HOTPOOL_HELP=1 lists the options)"});
    }
  }
#undef parse_Mode_default
#undef parse_Unwinder_default
#undef parse_Switch_default
#undef parse_Path_default
#undef parse_Bool_default
#undef parse_Size_default
#undef parse_SizeList_default
#undef parse_Duration_default
#undef parse_Share_default
  return warner.count;
}

void format_option_value(const Options& options, unsigned index, char* buf, size_t len) {
  if (len == 0) return;
  buf[0] = '\0';
  unsigned i = 0;
  auto put = [&](const char* text) {
    size_t used = std::strlen(buf);
    for (; *text && used + 1 < len; ++text) buf[used++] = *text;
    buf[used] = '\0';
  };
  auto put_number = [&](uint64_t value) {
    char digits[24];
    int n = 0;
    do digits[n++] = static_cast<char>('0' + value % 10); while (value /= 10);
    char text[24];
    int t = 0;
    while (n) text[t++] = digits[--n];
    text[t] = '\0';
    put(text);
  };
  // A number in the largest unit that divides it exactly: 64K, 2s.
  struct Unit {
    uint64_t factor;
    const char* suffix;
  };
  auto put_scaled = [&](uint64_t value, std::initializer_list<Unit> units, const char* base_suffix) {
    const char* suffix = base_suffix;
    for (const Unit& unit : units) {
      if (value && value % unit.factor == 0) {
        value /= unit.factor;
        suffix = unit.suffix;
        break;
      }
    }
    put_number(value);
    put(suffix);
  };
  auto put_size = [&](size_t value) { put_scaled(value, {{1u << 30, "G"}, {1u << 20, "M"}, {1u << 10, "K"}}, ""); };
  auto format_Mode = [&](Mode mode) { put(mode_name(mode)); };
  auto format_Unwinder = [&](Unwinder unwinder) { put(unwinder_name(unwinder)); };
  auto format_Switch = [&](Switch value) { put(switch_name(value)); };
  auto format_Path = [&](const char* path) { put(path); };
  auto format_Bool = [&](bool value) { put(value ? "on" : "off"); };
  auto format_Size = [&](size_t value) { put_size(value); };
  auto format_Duration = [&](uint64_t ns) {
    put_scaled(ns, {{1000000000u, "s"}, {1000000u, "ms"}, {1000u, "us"}}, "ns");
  };
  auto format_Share = [&](uint32_t ppm) {
    put_number(ppm / 10000);
    if (uint32_t rest = ppm % 10000) {  // up to four decimals, no trailing zero
      char decimals[6] = ".";
      int t = 1;
      for (uint32_t scale = 1000; rest; scale /= 10) {
        decimals[t++] = static_cast<char>('0' + rest / scale);
        rest %= scale;
      }
      decimals[t] = '\0';
      put(decimals);
    }
    put("%");
  };
  auto format_SizeList = [&](const SizeList& list) {
    for (unsigned k = 0; k < list.count; ++k) {
      if (k) put(",");
      put_size(list.values[k]);
    }
  };
#define HOTPOOL_OPTION(field, Type, name, def, desc) \
  if (i++ == index) return format_##Type(options.field);
#include "options.inc"
#undef HOTPOOL_OPTION
}

}  // namespace hotpool::shim
