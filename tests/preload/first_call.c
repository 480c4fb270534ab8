/* libpreload_first_call.so: makes the first allocator call of a process
 * from a library constructor, the way libstdc++'s emergency exception pool
 * or any C library's initialiser does. preload_exec_helper depends on this
 * library and hotpool does not, so the loader runs this constructor before
 * libhotpool.so's own: the call reaches hotpool while it is still booting.
 *
 * The call is named by PRELOAD_TEST_FIRST_CALL="<function> [a] [b]"
 * (numbers, or SIZE_MAX, SIZE_MAX/2+1, SIZE_MAX/2+2); without it the
 * constructor does nothing. The outcome is described in terms that do not
 * depend on addresses, so a run with and one without hotpool compare equal
 * exactly when hotpool answered as glibc does. */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char g_outcome[256] = "no call";

static size_t parse_size(const char* text) {
  if (strcmp(text, "SIZE_MAX") == 0) return SIZE_MAX;
  if (strcmp(text, "SIZE_MAX/2+1") == 0) return SIZE_MAX / 2 + 1;
  if (strcmp(text, "SIZE_MAX/2+2") == 0) return SIZE_MAX / 2 + 2;
  return (size_t)strtoull(text, NULL, 0);
}

__attribute__((constructor)) static void make_first_call(void) {
  const char* spec = getenv("PRELOAD_TEST_FIRST_CALL");
  if (!spec) return;
  /* Split "<function> [a] [b]" without allocating. */
  char words[3][64] = {"", "0", "0"};
  int count = 0;
  for (const char* p = spec; *p && count < 3;) {
    while (*p == ' ') ++p;
    size_t n = strcspn(p, " ");
    if (n == 0) break;
    if (n > 63) n = 63;
    memcpy(words[count], p, n);
    words[count][n] = '\0';
    ++count;
    p += n;
  }
  const char* function = words[0];
  const size_t a = parse_size(words[1]);
  const size_t b = parse_size(words[2]);
  void* const sentinel = (void*)(uintptr_t)0x5e471e0;
  void* result = NULL;
  int status = -1;
  size_t alignment = 16, usable_needed = 0;

  errno = 0;
  if (strcmp(function, "malloc") == 0) {
    result = malloc(a);
    usable_needed = a;
  } else if (strcmp(function, "calloc") == 0) {
    result = calloc(a, b);
    usable_needed = a * b;
  } else if (strcmp(function, "realloc") == 0) {
    result = realloc(NULL, a);
    usable_needed = a;
  } else if (strcmp(function, "reallocarray") == 0) {
    result = reallocarray(NULL, a, b);
    usable_needed = a * b;
  } else if (strcmp(function, "aligned_alloc") == 0) {
    result = aligned_alloc(a, b);
    alignment = a;
    usable_needed = b;
  } else if (strcmp(function, "memalign") == 0) {
    result = memalign(a, b);
    alignment = a;
    usable_needed = b;
  } else if (strcmp(function, "posix_memalign") == 0) {
    result = sentinel;
    status = posix_memalign(&result, a, b);
    alignment = a;
    usable_needed = b;
  } else if (strcmp(function, "valloc") == 0) {
    result = valloc(a);
    alignment = (size_t)sysconf(_SC_PAGESIZE);
    usable_needed = a;
  } else if (strcmp(function, "pvalloc") == 0) {
    result = pvalloc(a);
    alignment = (size_t)sysconf(_SC_PAGESIZE);
    usable_needed = a;
  } else if (strcmp(function, "free") == 0) {
    free(NULL);
  } else if (strcmp(function, "malloc_usable_size") == 0) {
    status = (int)malloc_usable_size(NULL);
  } else {
    snprintf(g_outcome, sizeof(g_outcome), "unknown function %s", function);
    return;
  }
  const int saved_errno = errno;

  int used = 0;
  if (status >= 0 || strcmp(function, "posix_memalign") == 0)
    used = snprintf(g_outcome, sizeof(g_outcome), "status=%d ", status);
  if (result == sentinel) {
    used += snprintf(g_outcome + used, sizeof(g_outcome) - used, "result=untouched ");
    result = NULL;
  } else if (result) {
    /* glibc rounds a memalign alignment up to a power of two. */
    size_t needed = 16;
    while (needed < alignment && needed <= SIZE_MAX / 4) needed *= 2;
    used += snprintf(g_outcome + used, sizeof(g_outcome) - used, "result=block aligned=%d usable_ok=%d ",
                     (uintptr_t)result % needed == 0, malloc_usable_size(result) >= usable_needed);
  } else {
    used += snprintf(g_outcome + used, sizeof(g_outcome) - used, "result=null ");
  }
  snprintf(g_outcome + used, sizeof(g_outcome) - used, "errno=%d", saved_errno);
  free(result);
}

__attribute__((visibility("default"))) const char* first_call_outcome(void) { return g_outcome; }
