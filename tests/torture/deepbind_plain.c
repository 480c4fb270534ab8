/* torture_deepbind_plain: a library that never allocates, opened with
 * RTLD_DEEPBIND: it has no malloc-family slot for hotpool to point
 * anywhere, and must load and work as it does without hotpool. */
#define EXPORT __attribute__((visibility("default")))

EXPORT int deepbind_plain_add(int a, int b) { return a + b; }
