/*
 * The few services firmware needs from its platform: whole-file I/O, exit with a code,
 * an instruction clock, and the memory high-water marks measured by painting.
 * Cortex-M builds: tf_startup_cm.c + tf_semihost.c (semihosting, SysTick, painted RAM).
 * Host builds: tf_platform_host.c (stdio; the clock and the marks read 0).
 */
#ifndef TINYFLEET_PLATFORM_H
#define TINYFLEET_PLATFORM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__arm__) && !defined(__linux__)
/* Buffers that the reset handler paints instead of zeroing (the arena, scratch). */
#define TF_NOINIT __attribute__((section(".noinit"), aligned(8)))
#else
#define TF_NOINIT __attribute__((aligned(8)))
#endif

/* Reads up to nbytes of the file at path into buf; returns bytes read, -1 on error. */
int32_t tf_io_read(const char *path, void *buf, uint32_t nbytes);
/* Reads up to nbytes from byte `offset` of the file at path; bytes read, -1 on error. */
int32_t tf_io_read_at(const char *path, uint32_t offset, void *buf, uint32_t nbytes);
/* Creates (truncates) the file at path with nbytes of buf; returns 0, or -1 on error. */
int32_t tf_io_write(const char *path, const void *buf, uint32_t nbytes);
/* Appends nbytes of buf to the file at path; returns 0, or -1 on error. */
int32_t tf_io_append(const char *path, const void *buf, uint32_t nbytes);
/* Ends the program with an exit code (semihosting SYS_EXIT_EXTENDED on Cortex-M). */
void tf_exit(int32_t code) __attribute__((noreturn));
/* A free-running clock: SysTick ticks of the core clock (deterministic under QEMU -icount). */
uint64_t tf_clock_ticks(void);
/* Bytes of `region` (nbytes long) below its highest byte that differs from the paint. */
uint32_t tf_painted_high_water(const void *region, uint32_t nbytes);
/* Deepest stack use since reset, in bytes (0 where the stack is not painted). */
uint32_t tf_stack_high_water(void);

#ifdef __cplusplus
}
#endif

#endif /* TINYFLEET_PLATFORM_H */
