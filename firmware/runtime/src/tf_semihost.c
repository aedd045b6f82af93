/* Cortex-M platform services over Arm semihosting (QEMU: -semihosting-config enable=on). */
#include <string.h>

#include "tinyfleet_platform.h"

enum {
    SYS_OPEN = 0x01,
    SYS_CLOSE = 0x02,
    SYS_WRITE = 0x05,
    SYS_READ = 0x06,
    SYS_SEEK = 0x0A,
    SYS_FLEN = 0x0C,
    SYS_EXIT = 0x18,
    SYS_EXIT_EXTENDED = 0x20,
    ADP_STOPPED_APPLICATION_EXIT = 0x20026,
    MODE_RB = 1,
    MODE_RPB = 3,
    MODE_WB = 5
};

#define TF_PAINT 0xA5A5A5A5u

static int32_t tf_semihost(int32_t op, const void *arg)
{
    register int32_t r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

static int32_t tf_open(const char *path, int32_t mode)
{
    const uint32_t args[3] = {(uint32_t)path, (uint32_t)mode, (uint32_t)strlen(path)};
    return tf_semihost(SYS_OPEN, args);
}

static void tf_close(int32_t fd)
{
    const uint32_t args[1] = {(uint32_t)fd};
    (void)tf_semihost(SYS_CLOSE, args);
}

int32_t tf_io_read(const char *path, void *buf, uint32_t nbytes)
{
    return tf_io_read_at(path, 0, buf, nbytes);
}

int32_t tf_io_read_at(const char *path, uint32_t offset, void *buf, uint32_t nbytes)
{
    const int32_t fd = tf_open(path, MODE_RB);
    if (fd < 0) {
        return -1;
    }
    const uint32_t seek_args[2] = {(uint32_t)fd, offset};
    if (offset != 0 && tf_semihost(SYS_SEEK, seek_args) != 0) {
        tf_close(fd);
        return -1;
    }
    const uint32_t args[3] = {(uint32_t)fd, (uint32_t)buf, nbytes};
    const int32_t left = tf_semihost(SYS_READ, args); /* bytes NOT read */
    tf_close(fd);
    return left < 0 ? -1 : (int32_t)(nbytes - (uint32_t)left);
}

static int32_t tf_put(const char *path, int32_t mode, const void *buf, uint32_t nbytes)
{
    const int32_t fd = tf_open(path, mode);
    if (fd < 0) {
        return -1;
    }
    if (mode == MODE_RPB) {
        /* QEMU 7.2 writes "ab" files at offset 0: open for update and seek to the end. */
        const uint32_t len_args[1] = {(uint32_t)fd};
        const int32_t len = tf_semihost(SYS_FLEN, len_args);
        const uint32_t seek_args[2] = {(uint32_t)fd, (uint32_t)len};
        if (len < 0 || tf_semihost(SYS_SEEK, seek_args) != 0) {
            tf_close(fd);
            return -1;
        }
    }
    const uint32_t args[3] = {(uint32_t)fd, (uint32_t)buf, nbytes};
    const int32_t left = tf_semihost(SYS_WRITE, args);
    tf_close(fd);
    return left == 0 ? 0 : -1;
}

int32_t tf_io_write(const char *path, const void *buf, uint32_t nbytes)
{
    return tf_put(path, MODE_WB, buf, nbytes);
}

int32_t tf_io_append(const char *path, const void *buf, uint32_t nbytes)
{
    return tf_put(path, MODE_RPB, buf, nbytes);
}

void tf_exit(int32_t code)
{
    const uint32_t args[2] = {ADP_STOPPED_APPLICATION_EXIT, (uint32_t)code};
    (void)tf_semihost(SYS_EXIT_EXTENDED, args);
    /* Only reached where the host ignores the extended call. */
    (void)tf_semihost(SYS_EXIT, (const void *)ADP_STOPPED_APPLICATION_EXIT);
    for (;;) {
    }
}

uint32_t tf_painted_high_water(const void *region, uint32_t nbytes)
{
    const uint8_t *p = (const uint8_t *)region;
    uint32_t n = nbytes;
    while (n > 0 && p[n - 1] == (uint8_t)TF_PAINT) {
        n--;
    }
    return n;
}
