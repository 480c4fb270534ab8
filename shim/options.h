// Options: every HOTPOOL_* environment variable, declared once in options.inc.
//
// Values are parsed forgivingly (1/true/yes/on, K/M/G suffixes) and loudly:
// a bad value or an unknown HOTPOOL_ name gets one "hotpool:" warning line
// and the default. Parsing never allocates; it writes into fixed buffers.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hotpool::shim {

enum class Mode : uint8_t { Off, Profile, Fixed, Auto };
const char* mode_name(Mode mode);
enum class Unwinder : uint8_t { Libgcc, Libunwind };
const char* unwinder_name(Unwinder unwinder);
// on, off, or auto: as another option decides (see options.inc).
enum class Switch : uint8_t { Auto, On, Off };
const char* switch_name(Switch value);

inline constexpr unsigned kMaxListedClasses = 126;
inline constexpr size_t kMaxPath = 512;

struct SizeList {
  size_t values[kMaxListedClasses];
  unsigned count;
};

struct Options {
#define HOTPOOL_OPTION(field, Type, name, def, desc) Type##Value field;
  using ModeValue = Mode;
  using UnwinderValue = Unwinder;
  using SwitchValue = Switch;
  using PathValue = char[kMaxPath];
  using BoolValue = bool;
  using SizeValue = size_t;
  using SizeListValue = SizeList;
  using DurationValue = uint64_t;  // nanoseconds
  using ShareValue = uint32_t;     // parts per million
#include "options.inc"
#undef HOTPOOL_OPTION
};

// Receives each complete warning line (without the trailing newline).
using WarningSink = void (*)(const char* line, void* context);

// Fills *out with the defaults, then applies every HOTPOOL_* entry of envp
// (a NULL-terminated "NAME=value" array, as environ). Returns the number of
// warnings issued.
unsigned parse_options(const char* const* envp, Options* out, WarningSink warn, void* context);

// Single-value parsers, exposed for tests. Each returns false on a malformed
// value and leaves *out untouched.
bool parse_bool(const char* text, bool* out);
bool parse_size(const char* text, size_t* out);         // 64, 4K, 1M, 2G, 1KiB…
bool parse_size_list(const char* text, SizeList* out);  // comma-separated sizes
bool parse_mode(const char* text, Mode* out);
bool parse_unwinder(const char* text, Unwinder* out);
bool parse_switch(const char* text, Switch* out);  // auto, or a boolean
bool parse_duration(const char* text, uint64_t* out_ns);  // 250ns, 10us, 5ms, 2s; bare = ms
bool parse_share(const char* text, uint32_t* out_ppm);   // 1%, 0.25%, 2.5 (bare = %), 0 to 100%

// Introspection of the table, for help text, verbose output, the JSON
// report and the README.
struct OptionInfo {
  const char* name;         // "HOTPOOL_MODE"
  const char* type;         // "mode", "unwinder", "switch", "bool", "size", "size list", "path", "duration", "share"
  const char* default_text;
  const char* description;
};
unsigned option_count();
const OptionInfo& option_info(unsigned index);
// Writes the current value of option `index` of `options` into buf.
void format_option_value(const Options& options, unsigned index, char* buf, size_t len);

}  // namespace hotpool::shim
