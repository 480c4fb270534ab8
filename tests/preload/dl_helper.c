/* preload_dl_helper: a shared library the process suite loads and unloads
 * in a loop. It allocates in its constructor, in a function and frees in
 * its destructor, as plug-ins do. Plain C: no unique symbols, so dlclose
 * really unloads it and the constructor runs again on every dlopen. */
#include <stdlib.h>
#include <string.h>
#include <malloc.h>

#define EXPORT __attribute__((visibility("default")))

/* A size no other code in the test uses, so the report's class is known. */
#define CONSTRUCTOR_BLOCK_SIZE 12345
#define CONSTRUCTOR_BYTE 0x3c

static unsigned char* g_constructor_block;

__attribute__((constructor)) static void on_load(void) {
  g_constructor_block = malloc(CONSTRUCTOR_BLOCK_SIZE);
  if (g_constructor_block) memset(g_constructor_block, CONSTRUCTOR_BYTE, CONSTRUCTOR_BLOCK_SIZE);
}

__attribute__((destructor)) static void on_unload(void) {
  free(g_constructor_block);
  g_constructor_block = NULL;
}

/* 1 if the constructor's block exists and is unchanged. */
EXPORT int dl_helper_constructor_block_intact(void) {
  if (!g_constructor_block) return 0;
  for (size_t i = 0; i < CONSTRUCTOR_BLOCK_SIZE; ++i)
    if (g_constructor_block[i] != CONSTRUCTOR_BYTE) return 0;
  return 1;
}

EXPORT size_t dl_helper_constructor_block_usable(void) {
  return g_constructor_block ? malloc_usable_size(g_constructor_block) : 0;
}

/* Allocates `count` blocks of assorted sizes (malloc, calloc, realloc),
 * checks their contents and frees them; returns how many checked out. */
EXPORT unsigned dl_helper_work(unsigned count) {
  unsigned char** blocks = calloc(count, sizeof(*blocks));
  if (!blocks) return 0;
  for (unsigned i = 0; i < count; ++i) {
    const size_t size = 1 + (i * 37u) % 5000u;
    blocks[i] = i % 3 ? malloc(size) : calloc(1, size);
    if (blocks[i]) memset(blocks[i], (int)(i & 0xff), size);
  }
  unsigned good = 0;
  for (unsigned i = 0; i < count; ++i) {
    const size_t size = 1 + (i * 37u) % 5000u;
    unsigned char* grown = blocks[i] ? realloc(blocks[i], size * 2) : NULL;
    if (grown && grown[0] == (i & 0xff) && grown[size - 1] == (i & 0xff)) ++good;
    free(grown ? grown : blocks[i]);
  }
  free(blocks);
  return good;
}
