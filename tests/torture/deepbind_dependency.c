/* torture_deepbind_dependency: a library the deep-bound helper needs, so
 * that the loader loads it in the same deep-bound dlopen: its malloc/free
 * bind to libc's as the helper's do, and must pair up with the program's
 * all the same. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>

#define EXPORT __attribute__((visibility("default")))

EXPORT void deepbind_dependency_free(void* block) { free(block); }

/* The file of the malloc this library's calls reach. */
EXPORT const char* deepbind_dependency_malloc_file(void) {
  Dl_info info;
  void* (*target)(size_t) = malloc;
  if (!dladdr((void*)target, &info) || !info.dli_fname) return "?";
  return info.dli_fname;
}
