/* Platform services for host (Linux, macOS) builds: stdio; no painting, no clock. */
#include <stdio.h>
#include <stdlib.h>

#include "tinyfleet_platform.h"

int32_t tf_io_read(const char *path, void *buf, uint32_t nbytes)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return -1;
    }
    const size_t n = fread(buf, 1, nbytes, f);
    fclose(f);
    return (int32_t)n;
}

int32_t tf_io_read_at(const char *path, uint32_t offset, void *buf, uint32_t nbytes)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return -1;
    }
    if (fseek(f, (long)offset, SEEK_SET) != 0) {
        fclose(f);
        return -1;
    }
    const size_t n = fread(buf, 1, nbytes, f);
    fclose(f);
    return (int32_t)n;
}

static int32_t tf_put(const char *path, const char *mode, const void *buf, uint32_t nbytes)
{
    FILE *f = fopen(path, mode);
    if (f == NULL) {
        return -1;
    }
    const size_t n = fwrite(buf, 1, nbytes, f);
    return (fclose(f) == 0 && n == nbytes) ? 0 : -1;
}

int32_t tf_io_append(const char *path, const void *buf, uint32_t nbytes)
{
    return tf_put(path, "ab", buf, nbytes);
}

int32_t tf_io_write(const char *path, const void *buf, uint32_t nbytes)
{
    return tf_put(path, "wb", buf, nbytes);
}

void tf_exit(int32_t code)
{
    exit((int)code);
}

uint64_t tf_clock_ticks(void)
{
    return 0;
}

uint32_t tf_painted_high_water(const void *region, uint32_t nbytes)
{
    (void)region;
    (void)nbytes;
    return 0;
}

uint32_t tf_stack_high_water(void)
{
    return 0;
}
