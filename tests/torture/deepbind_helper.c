/* torture_deepbind_helper: a library the loader suite opens with
 * RTLD_DEEPBIND, which makes the loader look symbols up in the library and
 * its own dependencies (libc) before the global scope, where the
 * preloaded libhotpool.so is. Its malloc/free must still pair up with the
 * program's: blocks cross the boundary in both directions, also through
 * its dependency (torture_deepbind_dependency) and through a library it
 * opens itself with RTLD_DEEPBIND. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>

void deepbind_dependency_free(void* block);
const char* deepbind_dependency_malloc_file(void);

#define EXPORT __attribute__((visibility("default")))

EXPORT void* deepbind_malloc(size_t size) { return malloc(size); }
EXPORT void* deepbind_calloc(size_t count, size_t size) { return calloc(count, size); }
EXPORT void* deepbind_realloc(void* block, size_t size) { return realloc(block, size); }
EXPORT void deepbind_free(void* block) { free(block); }
EXPORT size_t deepbind_usable_size(void* block) { return malloc_usable_size(block); }

/* The file of the malloc this library's calls reach. */
EXPORT const char* deepbind_malloc_file(void) {
  Dl_info info;
  void* (*target)(size_t) = malloc;
  if (!dladdr((void*)target, &info) || !info.dli_fname) return "?";
  return info.dli_fname;
}

/* Through the dependency the loader loaded with this library. */
EXPORT void deepbind_free_in_dependency(void* block) { deepbind_dependency_free(block); }
EXPORT const char* deepbind_dependency_file(void) { return deepbind_dependency_malloc_file(); }

/* This library's own dlopen (deep-bound to libc's, like its malloc). */
EXPORT void* deepbind_open(const char* file, int mode) { return dlopen(file, mode); }
