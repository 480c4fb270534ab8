/* torture_dl_helper: a library the loader suite loads and unloads hundreds
 * of times while other threads allocate. Its constructor allocates blocks
 * of pooled classes (48, 320) and of an unpooled size, a function
 * allocates and frees and hands blocks to the caller, its destructor frees
 * what the constructor allocated. */
#include <malloc.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

static const size_t kConstructorSizes[] = {48, 300, 70000};
#define CONSTRUCTOR_BLOCKS 3
static unsigned char* g_blocks[CONSTRUCTOR_BLOCKS];

__attribute__((constructor)) static void on_load(void) {
  for (int i = 0; i < CONSTRUCTOR_BLOCKS; ++i) {
    g_blocks[i] = malloc(kConstructorSizes[i]);
    if (g_blocks[i]) memset(g_blocks[i], 0x40 + i, kConstructorSizes[i]);
  }
}

__attribute__((destructor)) static void on_unload(void) {
  for (int i = 0; i < CONSTRUCTOR_BLOCKS; ++i) {
    free(g_blocks[i]);
    g_blocks[i] = NULL;
  }
}

/* 1 if every constructor block exists and is unchanged. */
EXPORT int torture_dl_constructor_blocks_intact(void) {
  for (int i = 0; i < CONSTRUCTOR_BLOCKS; ++i) {
    if (!g_blocks[i]) return 0;
    for (size_t k = 0; k < kConstructorSizes[i]; k += 13)
      if (g_blocks[i][k] != 0x40 + i) return 0;
  }
  return 1;
}

/* Allocates `count` blocks of assorted sizes (malloc, calloc, realloc),
 * checks and frees them; returns how many checked out. */
EXPORT unsigned torture_dl_work(unsigned count) {
  unsigned char* blocks[64];
  unsigned good = 0;
  if (count > 64) count = 64;
  for (unsigned i = 0; i < count; ++i) {
    const size_t size = i % 4 == 0 ? 48 : 1 + (i * 37u) % 700u;
    blocks[i] = i % 3 ? malloc(size) : calloc(1, size);
    if (blocks[i]) memset(blocks[i], (int)(i & 0xff), size);
  }
  for (unsigned i = 0; i < count; ++i) {
    const size_t size = i % 4 == 0 ? 48 : 1 + (i * 37u) % 700u;
    unsigned char* grown = blocks[i] ? realloc(blocks[i], size + 64) : NULL;
    if (grown && grown[0] == (i & 0xff) && grown[size - 1] == (i & 0xff)) ++good;
    free(grown ? grown : blocks[i]);
  }
  return good;
}

/* A block the caller frees (after the library is gone). */
EXPORT void* torture_dl_make_block(size_t size, int byte) {
  void* block = malloc(size);
  if (block) memset(block, byte, size);
  return block;
}

/* Frees a block the caller allocated. */
EXPORT void torture_dl_free_block(void* block) { free(block); }
