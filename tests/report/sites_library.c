/* sites_library: a library sites_program loads with dlopen(). Built
 * stripped: the report names its functions from the dynamic symbols. Each
 * call allocates `count` blocks, frees all but one (kept: live at exit). */
#include <stdlib.h>

void* volatile sites_library_sink;

__attribute__((noinline)) void sites_library_allocate(int count) {
  for (int i = 0; i < count; ++i) {
    void* block = malloc(56);
    sites_library_sink = block;
    if (i + 1 < count) free(block);
  }
}
