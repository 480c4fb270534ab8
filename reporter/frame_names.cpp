#include "frame_names.h"

#include <cstring>

namespace hotpool::reporter {
namespace {

bool starts_with(const char* text, const char* prefix) { return std::strncmp(text, prefix, std::strlen(prefix)) == 0; }

bool is_identifier_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

// The operators spelled with brackets, longest first: after "operator"
// they are the name, not a template's or a parameter list's brackets.
constexpr const char* kBracketOperators[] = {"()", "[]", "<=>", "<<=", ">>=", "->*", "<<", ">>", "<=", ">=", "->", "<", ">"};
constexpr char kAnonymous[] = "(anonymous namespace)";
constexpr const char* kRuntimeModules[] = {"libc.so", "libm.so", "libstdc++.so", "libc++.so", "libc++abi.so", "libgcc_s.so"};

}  // namespace

size_t short_function_name(const char* name, char* out, size_t capacity) {
  if (capacity == 0) return 0;
  size_t length = 0;
  auto put = [&](const char* text, size_t n) {
    for (size_t i = 0; i < n && length + 1 < capacity; ++i) out[length++] = text[i];
  };
  unsigned depth = 0;  // inside template arguments or a parameter list
  bool lambda = false;  // inside "<lambda...>", whose '>' is kept
  const char* p = name;
  while (*p) {
    // The special names start with one of three characters: the others
    // (most of a name) cost a compare each.
    if (depth == 0 && (*p == '(' || *p == 'o' || *p == '<')) {
      if (starts_with(p, kAnonymous)) {
        put(p, sizeof kAnonymous - 1);
        p += sizeof kAnonymous - 1;
        continue;
      }
      if (starts_with(p, "operator") && (p == name || !is_identifier_char(p[-1])) && !is_identifier_char(p[8])) {
        put(p, 8);
        p += 8;
        if (*p == ' ') {  // operator new, operator delete[], a conversion (operator bool): its type's name
          put(p++, 1);
          while (is_identifier_char(*p) || *p == ':') put(p++, 1);
          if (starts_with(p, "[]")) {
            put(p, 2);
            p += 2;
          }
        } else {
          for (const char* symbol : kBracketOperators) {
            const size_t n = std::strlen(symbol);
            if (std::strncmp(p, symbol, n) != 0) continue;
            put(p, n);
            p += n;
            break;
          }
        }
        continue;
      }
      // A lambda's closure type as DWARF names it: "<lambda(int)>" is
      // "<lambda>" (its '>' where the group closes: never longer than the name).
      if (starts_with(p, "<lambda")) {
        put(p, 7);
        lambda = true;
      }
    }
    const char c = *p++;
    if (c == '<' || c == '(') {
      ++depth;
    } else if (c == '>' || c == ')') {
      if (depth && --depth == 0 && lambda && c == '>') {
        put(&c, 1);
        lambda = false;
      }
    } else if (depth == 0) {
      if (c != ' ') {
        put(&c, 1);
      } else if (starts_with(p, "const") || starts_with(p, "volatile") || *p == '&' || *p == '[') {
        break;  // qualifiers after the parameter list, or "[clone .isra.0]"
      } else if (*p == '<' || (*p == '(' && !starts_with(p, kAnonymous))) {
        // "operator<< <char>": the template arguments follow
      } else {
        length = 0;  // what came before was the return type
      }
    }
  }
  if (length == 0) put(name, std::strlen(name));
  out[length] = '\0';
  return length;
}

bool is_library_frame(const char* file, const char* module) {
  if (module) {
    for (const char* runtime : kRuntimeModules) {
      if (starts_with(module, runtime)) return true;
    }
  }
  return file && (starts_with(file, "/usr/include/") || std::strstr(file, "/include/c++/") ||
                  std::strstr(file, "libstdc++-v3/"));
}

}  // namespace hotpool::reporter
