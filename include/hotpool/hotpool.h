/* hotpool: the small C API of libhotpool.so.
 *
 * A program that wants an on-demand report without depending on hotpool
 * declares the functions weak and checks them:
 *
 *   #include <hotpool/hotpool.h>
 *   #pragma weak hotpool_report
 *   ...
 *   if (hotpool_report) hotpool_report();
 */
#ifndef HOTPOOL_HOTPOOL_H
#define HOTPOOL_HOTPOOL_H

#ifdef __cplusplus
extern "C" {
#endif

/* Writes a report now, to the configured output (HOTPOOL_OUTPUT: stderr, or
 * the file, which then holds the latest report). Thread-safe; never call it
 * from a signal handler. Does nothing in mode off. */
void hotpool_report(void);

/* The effective HOTPOOL_MODE: "off", "profile", "fixed" or "auto". */
const char* hotpool_mode(void);

#ifdef __cplusplus
}
#endif

#endif /* HOTPOOL_HOTPOOL_H */
