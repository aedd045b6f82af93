/*
 * Test driver: runs a batch of kernel cases encoded by tests/firmware/kernel_cases.py and
 * writes each case's status and output. Linked into the host shared library (ctypes) and
 * into a QEMU image (kernel_runner_main.c), so both run exactly the same calls.
 */
#include <stdint.h>
#include <string.h>

#include "tinyfleet_nn.h"

enum { OP_CONV = 1, OP_CONV1X1, OP_CONV1X1_ADD, OP_DW, OP_FC, OP_ADD, OP_AVGPOOL, OP_GAP,
       OP_PATCH_LOAD, OP_PATCH_STORE, OP_REQUANT, OP_MAXPOOL };

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
    int ok;
} tf_reader;

static int32_t rd_i32(tf_reader *r)
{
    int32_t v = 0;
    if (r->p + 4 > r->end) {
        r->ok = 0;
        return 0;
    }
    memcpy(&v, r->p, 4);
    r->p += 4;
    return v;
}

/* An array: u32 byte length, then the bytes padded to 4. */
static const void *rd_arr(tf_reader *r, uint32_t *nbytes)
{
    const uint32_t n = (uint32_t)rd_i32(r);
    const void *data = r->p;
    const uint32_t padded = (n + 3u) & ~3u;
    if (!r->ok || r->p + padded > r->end) {
        r->ok = 0;
        return NULL;
    }
    r->p += padded;
    if (nbytes != NULL) {
        *nbytes = n;
    }
    return data;
}

static void rd_add(tf_reader *r, tf_add_quant *a)
{
    a->left_shift = rd_i32(r);
    a->input1_offset = rd_i32(r);
    a->input1_multiplier = rd_i32(r);
    a->input1_shift = rd_i32(r);
    a->input2_offset = rd_i32(r);
    a->input2_multiplier = rd_i32(r);
    a->input2_shift = rd_i32(r);
    a->output_offset = rd_i32(r);
    a->output_multiplier = rd_i32(r);
    a->output_shift = rd_i32(r);
    a->act_min = rd_i32(r);
    a->act_max = rd_i32(r);
}

static void rd_window(tf_reader *r, tf_window *w)
{
    w->kh = rd_i32(r);
    w->kw = rd_i32(r);
    w->stride_h = rd_i32(r);
    w->stride_w = rd_i32(r);
    w->pad_top = rd_i32(r);
    w->pad_left = rd_i32(r);
    w->pad_bottom = rd_i32(r);
    w->pad_right = rd_i32(r);
}

static void rd_quant(tf_reader *r, tf_conv_quant *q)
{
    q->input_offset = rd_i32(r);
    q->output_offset = rd_i32(r);
    q->act_min = rd_i32(r);
    q->act_max = rd_i32(r);
}

/* Runs one case with output at out (capacity cap); returns status, sets *out_bytes. */
static int32_t run_case(tf_reader *r, uint8_t *out, uint32_t cap, uint32_t *out_bytes,
                        int16_t *scratch16, int8_t *scratch8)
{
    const int32_t op = rd_i32(r);
    tf_dims in = {0, 0, 0}, outd = {0, 0, 0};
    tf_window win;
    tf_conv_quant q;
    tf_add_quant add;
    uint32_t n = 0;
    int32_t st = -1;
    *out_bytes = 0;
    if (op == OP_CONV || op == OP_DW || op == OP_AVGPOOL || op == OP_MAXPOOL) {
        in.h = rd_i32(r);
        in.w = rd_i32(r);
        in.c = rd_i32(r);
        outd.h = rd_i32(r);
        outd.w = rd_i32(r);
        outd.c = rd_i32(r);
        rd_window(r, &win);
        *out_bytes = (uint32_t)(outd.h * outd.w * outd.c);
    }
    if (op == OP_CONV || op == OP_DW) {
        rd_quant(r, &q);
        const int32_t in_place = rd_i32(r);
        const int8_t *x = rd_arr(r, &n);
        const int8_t *w = rd_arr(r, NULL);
        const int32_t *b = rd_arr(r, NULL);
        q.multiplier = rd_arr(r, NULL);
        q.shift = rd_arr(r, NULL);
        if (!r->ok || *out_bytes > cap || n > cap) {
            return -1;
        }
        if (op == OP_CONV) {
            st = tf_conv2d_s8(&in, x, &win, &outd, w, b, &q, (int8_t *)out, scratch16);
        } else {
            int8_t *dst = (int8_t *)out;
            if (in_place) {
                memcpy(out, x, n);
                x = dst;
            }
            st = tf_depthwise_conv2d_s8(&in, x, &win, &outd, w, b, &q, dst, scratch8);
        }
    } else if (op == OP_AVGPOOL || op == OP_MAXPOOL) {
        const int32_t in_off = rd_i32(r), out_off = rd_i32(r);
        const int32_t amin = rd_i32(r), amax = rd_i32(r);
        const int8_t *x = rd_arr(r, NULL);
        if (!r->ok || *out_bytes > cap) {
            return -1;
        }
        st = op == OP_MAXPOOL
                 ? tf_max_pool_s8(&in, x, &win, &outd, amin, amax, (int8_t *)out)
                 : tf_avg_pool_s8(&in, x, &win, &outd, in_off, out_off, amin, amax,
                                  (int8_t *)out);
    } else if (op == OP_CONV1X1 || op == OP_CONV1X1_ADD || op == OP_FC) {
        in.h = rd_i32(r);
        in.w = rd_i32(r);
        in.c = rd_i32(r);
        const int32_t cout = rd_i32(r);
        rd_quant(r, &q);
        if (op == OP_CONV1X1_ADD) {
            rd_add(r, &add);
        }
        const int8_t *x = rd_arr(r, NULL);
        const int8_t *w = rd_arr(r, NULL);
        const int32_t *b = rd_arr(r, NULL);
        q.multiplier = rd_arr(r, NULL);
        q.shift = rd_arr(r, NULL);
        *out_bytes = (uint32_t)(in.h * in.w * cout);
        if (op == OP_CONV1X1_ADD) {
            const int8_t *res = rd_arr(r, &n);
            if (!r->ok || n != *out_bytes || n > cap) {
                return -1;
            }
            memcpy(out, res, n);
            return tf_conv2d_1x1_add_s8(&in, x, cout, w, b, &q, &add, (int8_t *)out,
                                        scratch16);
        }
        if (!r->ok || *out_bytes > cap) {
            return -1;
        }
        st = op == OP_FC ? tf_fully_connected_s8(in.c, x, cout, w, b, &q, (int8_t *)out,
                                                 scratch16)
                         : tf_conv2d_1x1_s8(&in, x, cout, w, b, &q, (int8_t *)out, scratch16);
    } else if (op == OP_ADD) {
        const int32_t count = rd_i32(r);
        rd_add(r, &add);
        const int8_t *a = rd_arr(r, NULL);
        const int8_t *b = rd_arr(r, NULL);
        *out_bytes = (uint32_t)count;
        if (!r->ok || *out_bytes > cap) {
            return -1;
        }
        st = tf_add_s8(count, a, b, &add, (int8_t *)out);
    } else if (op == OP_GAP) {
        in.h = rd_i32(r);
        in.w = rd_i32(r);
        in.c = rd_i32(r);
        const int32_t in_off = rd_i32(r), out_off = rd_i32(r);
        const int8_t *x = rd_arr(r, NULL);
        *out_bytes = (uint32_t)in.c;
        if (!r->ok || *out_bytes > cap) {
            return -1;
        }
        st = tf_global_avg_pool_s8(&in, x, in_off, out_off, (int8_t *)out);
    } else if (op == OP_PATCH_LOAD || op == OP_PATCH_STORE) {
        in.h = rd_i32(r);
        in.w = rd_i32(r);
        in.c = rd_i32(r);
        outd.h = rd_i32(r);
        outd.w = rd_i32(r);
        outd.c = in.c;
        const int32_t row0 = rd_i32(r), col0 = rd_i32(r), pad = rd_i32(r);
        const int8_t *src = rd_arr(r, NULL);
        if (op == OP_PATCH_LOAD) {
            *out_bytes = (uint32_t)(outd.h * outd.w * outd.c);
            if (!r->ok || *out_bytes > cap) {
                return -1;
            }
            st = tf_patch_load_s8(&in, src, row0, col0, &outd, (int8_t *)out, (int8_t)pad);
        } else {
            const int8_t *dst = rd_arr(r, &n);
            *out_bytes = n;
            if (!r->ok || n > cap) {
                return -1;
            }
            memcpy(out, dst, n);
            st = tf_patch_store_s8(&in, src, &outd, (int8_t *)out, row0, col0);
        }
    } else if (op == OP_REQUANT) {
        const int32_t count = rd_i32(r);
        const int32_t *acc = rd_arr(r, NULL);
        const int32_t *m = rd_arr(r, NULL);
        const int32_t *s = rd_arr(r, NULL);
        *out_bytes = (uint32_t)count * 4u;
        if (!r->ok || *out_bytes > cap) {
            return -1;
        }
        for (int32_t i = 0; i < count; i++) {
            const int32_t v = tf_requantize(acc[i], m[i], s[i]);
            memcpy(out + 4 * i, &v, 4);
        }
        st = TF_OK;
    }
    return st;
}

/* Runs every case of `in`; writes (status, nbytes, bytes padded to 4) per case to `out`.
 * Returns the bytes written, or -1 if the input is malformed or `out` too small. */
int32_t tf_test_run_cases(const uint8_t *in, uint32_t in_bytes, uint8_t *out, uint32_t cap,
                          int16_t *scratch16, int8_t *scratch8)
{
    tf_reader r = {in, in + in_bytes, 1};
    const int32_t count = rd_i32(&r);
    uint32_t pos = 0;
    for (int32_t i = 0; i < count && r.ok; i++) {
        uint32_t nbytes = 0;
        if (pos + 8u > cap) {
            return -1;
        }
        const int32_t st = run_case(&r, out + pos + 8, cap - pos - 8, &nbytes, scratch16,
                                    scratch8);
        if (st < 0) {
            return -1;
        }
        memcpy(out + pos, &st, 4);
        memcpy(out + pos + 4, &nbytes, 4);
        pos += 8u + ((nbytes + 3u) & ~3u);
    }
    return r.ok ? (int32_t)pos : -1;
}
