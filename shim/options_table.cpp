// hotpool-options: prints the option table generated from options.inc, as
// Markdown (--markdown, for the README) or as plain text.
#include <cstdio>
#include <cstring>

#include "options.h"

using namespace hotpool::shim;

int main(int argc, char** argv) {
  const bool markdown = argc > 1 && std::strcmp(argv[1], "--markdown") == 0;
  if (markdown) {
    std::printf("| variable | type | default | description |\n|---|---|---|---|\n");
  }
  for (unsigned i = 0; i < option_count(); ++i) {
    const OptionInfo& info = option_info(i);
    if (markdown) {
      if (info.default_text[0]) std::printf("| `%s` | %s | `%s` | ", info.name, info.type, info.default_text);
      else std::printf("| `%s` | %s | (empty) | ", info.name, info.type);
      for (const char* p = info.description; *p; ++p) {
        if (*p == '|') std::fputs("\\|", stdout); else std::putchar(*p);
      }
      std::printf(" |\n");
    } else {
      std::printf("%s (%s, default '%s')\n    %s\n", info.name, info.type, info.default_text, info.description);
    }
  }
  return 0;
}
