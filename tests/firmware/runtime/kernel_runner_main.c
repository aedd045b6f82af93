/* QEMU entry of the kernel test driver: cases.bin in, results.bin out (semihosting). */
#include <stdint.h>

#include "tinyfleet_platform.h"

int32_t tf_test_run_cases(const uint8_t *in, uint32_t in_bytes, uint8_t *out, uint32_t cap,
                          int16_t *scratch16, int8_t *scratch8);

#define IN_CAP (512u * 1024u)
#define OUT_CAP (512u * 1024u)
#define SCRATCH_CAP (64u * 1024u)

static uint8_t cases[IN_CAP] TF_NOINIT;
static uint8_t results[OUT_CAP] TF_NOINIT;
static int16_t scratch16[SCRATCH_CAP / 2] TF_NOINIT;
static int8_t scratch8[SCRATCH_CAP] TF_NOINIT;

int main(void)
{
    const int32_t n = tf_io_read("cases.bin", cases, IN_CAP);
    if (n <= 0) {
        return 2;
    }
    const uint64_t t0 = tf_clock_ticks();
    const int32_t written = tf_test_run_cases(cases, (uint32_t)n, results, OUT_CAP, scratch16,
                                              scratch8);
    const uint64_t ticks = tf_clock_ticks() - t0;
    if (written < 0) {
        return 3;
    }
    if (tf_io_write("results.bin", results, (uint32_t)written) != 0 ||
        tf_io_append("results.bin", &ticks, sizeof ticks) != 0) {
        return 4;
    }
    return 0;
}
