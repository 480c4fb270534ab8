/* preload_exec_helper: a small C program the process suite forks and execs
 * with LD_PRELOAD inherited, to see hotpool start afresh in a new image.
 * Plain C on purpose: no C++ runtime allocates behind the test's back.
 *
 *   report <count> <size>               allocate count blocks, print the mode
 *                                       hotpool_mode() gives ("none" when not
 *                                       preloaded), the pid and a block's usable
 *                                       size, free them, exit(0)
 *   on-demand-then-exit <count> <size>  allocate count blocks, hotpool_report(),
 *                                       move that report aside to
 *                                       <report>.on-demand, allocate count more,
 *                                       exit(0) (the exit report then takes the
 *                                       report's name)
 *   hot-then-live <count> <size>        malloc+free a block of size 100 times count
 *                                       times (a hot, short-lived class: what mode
 *                                       auto pools), then keep count blocks live,
 *                                       hotpool_report(), move that report aside
 *                                       to <report>.on-demand, exit(0)
 *   exit-from-thread <count> <size>     a second thread allocates count blocks
 *                                       and calls exit(0) while main waits
 *   late-first-allocation <count> <size>
 *                                       count threads, one after another, each
 *                                       of which allocates for the first time
 *                                       in glibc's last round of pthread key
 *                                       destructors (its key's destructor sets
 *                                       the key again until then), a block of
 *                                       size; then hotpool_report(), moved
 *                                       aside to <report>.on-demand, exit(0)
 *   first                               print what the first allocator call of the
 *                                       process returned: the call named by
 *                                       PRELOAD_TEST_FIRST_CALL, made by the
 *                                       constructor of libpreload_first_call.so
 *
 * Every command prints one line of key=value pairs; exit status 0 on success.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char* hotpool_mode_or_none(void) {
  const char* (*mode)(void) = (const char* (*)(void))dlsym(RTLD_DEFAULT, "hotpool_mode");
  return mode ? mode() : "none";
}

static size_t parse_size(const char* text) { return (size_t)strtoull(text, NULL, 0); }

/* Allocates count blocks of size, each filled; returns them (or exits 3). */
static void** allocate_blocks(size_t count, size_t size) {
  void** blocks = calloc(count, sizeof(void*));
  if (!blocks) exit(3);
  for (size_t i = 0; i < count; ++i) {
    blocks[i] = malloc(size);
    if (!blocks[i]) exit(3);
    memset(blocks[i], (int)(i & 0xff), size);
  }
  return blocks;
}

static void free_blocks(void** blocks, size_t count, size_t size) {
  for (size_t i = 0; i < count; ++i) {
    const unsigned char* bytes = blocks[i];
    if (bytes[0] != (i & 0xff) || bytes[size - 1] != (i & 0xff)) exit(4);
    free(blocks[i]);
  }
  free(blocks);
}

/* HOTPOOL_OUTPUT with %p expanded to this pid (the one form the tests use). */
static int own_report_path(char* out, size_t size) {
  const char* pattern = getenv("HOTPOOL_OUTPUT");
  const char* pid_at = pattern ? strstr(pattern, "%p") : NULL;
  if (!pid_at) return 0;
  const int written = snprintf(out, size, "%.*s%d%s", (int)(pid_at - pattern), pattern, (int)getpid(), pid_at + 2);
  return written > 0 && (size_t)written < size;
}

/* hotpool_report(), then the report moved aside to <report>.on-demand so
 * the exit report does not replace it. 1 if there was a report to move. */
static int save_on_demand_report(void) {
  void (*report)(void) = (void (*)(void))dlsym(RTLD_DEFAULT, "hotpool_report");
  if (report) report();
  char path[4096], aside[4200];
  if (!own_report_path(path, sizeof(path))) return 0;
  snprintf(aside, sizeof(aside), "%s.on-demand", path);
  return rename(path, aside) == 0;
}

static size_t g_thread_count, g_thread_size;

static void* allocate_then_exit(void* unused) {
  (void)unused;
  void** blocks = allocate_blocks(g_thread_count, g_thread_size);
  printf("mode=%s pid=%d usable=%zu\n", hotpool_mode_or_none(), (int)getpid(), malloc_usable_size(blocks[0]));
  fflush(stdout);
  exit(0); /* from this thread, with the blocks still live */
}

static pthread_key_t g_late_key;
static int g_late_failures;

/* Rounds 1 .. PTHREAD_DESTRUCTOR_ITERATIONS - 1 set the key again; the
 * last one makes the thread's first allocation, which glibc follows with
 * no further round. */
static void late_destructor(void* value) {
  const size_t round = (size_t)value;
  if (round < PTHREAD_DESTRUCTOR_ITERATIONS) {
    pthread_setspecific(g_late_key, (void*)(round + 1));
    return;
  }
  /* A malloc and a free that succeed leave errno alone, whatever hotpool
   * does in them (this thread's attach retires states of threads gone). */
  errno = EBADMSG;
  unsigned char* block = malloc(g_thread_size);
  if (!block || errno != EBADMSG) {
    __atomic_add_fetch(&g_late_failures, 1, __ATOMIC_RELAXED);
    free(block);
    return;
  }
  memset(block, 0x5a, g_thread_size);
  if (block[g_thread_size - 1] != 0x5a) __atomic_add_fetch(&g_late_failures, 1, __ATOMIC_RELAXED);
  free(block);
  if (errno != EBADMSG) __atomic_add_fetch(&g_late_failures, 1, __ATOMIC_RELAXED);
}

static void* set_late_key(void* unused) {
  (void)unused;
  /* No allocation before: a key below 32 takes no memory to set. */
  pthread_setspecific(g_late_key, (void*)(size_t)1);
  return NULL;
}

/* From libpreload_first_call.so: what its constructor's call returned. */
const char* first_call_outcome(void);

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const char* command = argv[1];
  if (strcmp(command, "first") == 0) {
    printf("%s\n", first_call_outcome());
    return 0;
  }
  if (argc < 4) return 2;
  const size_t count = parse_size(argv[2]);
  const size_t size = parse_size(argv[3]);
  if (count == 0 || size == 0) return 2;

  if (strcmp(command, "report") == 0) {
    void** blocks = allocate_blocks(count, size);
    printf("mode=%s pid=%d usable=%zu\n", hotpool_mode_or_none(), (int)getpid(), malloc_usable_size(blocks[0]));
    free_blocks(blocks, count, size);
    return 0;
  }
  if (strcmp(command, "on-demand-then-exit") == 0) {
    void** first = allocate_blocks(count, size);
    const int saved = save_on_demand_report();
    void** second = allocate_blocks(count, size);
    printf("mode=%s pid=%d usable=%zu on_demand_saved=%d\n", hotpool_mode_or_none(), (int)getpid(),
           malloc_usable_size(first[0]), saved);
    free_blocks(first, count, size);
    (void)second; /* live at exit */
    exit(0);
  }
  if (strcmp(command, "hot-then-live") == 0) {
    for (size_t i = 0; i < 100 * count; ++i) {
      void* volatile block = malloc(size);
      free(block);
    }
    void** live = allocate_blocks(count, size);
    int saved = save_on_demand_report();
    printf("mode=%s pid=%d usable=%zu on_demand_saved=%d\n", hotpool_mode_or_none(), (int)getpid(),
           malloc_usable_size(live[0]), saved);
    free_blocks(live, count, size);
    return 0;
  }
  if (strcmp(command, "late-first-allocation") == 0) {
    g_thread_size = size;
    if (pthread_key_create(&g_late_key, late_destructor) != 0) return 5;
    for (size_t i = 0; i < count; ++i) {
      pthread_t thread;
      if (pthread_create(&thread, NULL, set_late_key, NULL) != 0) return 5;
      pthread_join(thread, NULL);
    }
    const int saved = save_on_demand_report();
    printf("mode=%s pid=%d key=%u failures=%d on_demand_saved=%d\n", hotpool_mode_or_none(), (int)getpid(),
           (unsigned)g_late_key, g_late_failures, saved);
    return 0;
  }
  if (strcmp(command, "exit-from-thread") == 0) {
    g_thread_count = count;
    g_thread_size = size;
    pthread_t thread;
    if (pthread_create(&thread, NULL, allocate_then_exit, NULL) != 0) return 5;
    pthread_join(thread, NULL); /* never returns: the thread exits the process */
    return 6;
  }
  return 2;
}
