/*
 * Test driver: runs a batch of kernel cases encoded by tests/firmware/kernel_cases.py and
 * writes each case's status and output. Linked into the host shared library (ctypes) and
 * into a QEMU image (kernel_runner_main.c), so both run exactly the same calls.
 */
#include <stdint.h>
#include <string.h>

#include "tinyfleet_nn.h"

enum { OP_CONV = 1, OP_CONV1X1, OP_CONV1X1_ADD, OP_DW, OP_FC, OP_ADD, OP_AVGPOOL, OP_GAP,
       OP_PATCH_LOAD, OP_PATCH_STORE, OP_REQUANT, OP_MAXPOOL, OP_DW_FAST,
       OP_CONV1X1_FAST, OP_CONV1X1_ADD_FAST, OP_CONV_FAST, OP_CONV_RGB };

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

/* Where a case writes: the output buffer, its capacity, the bytes written; scratch. */
typedef struct {
    uint8_t *out;
    uint32_t cap;
    uint32_t bytes;
    int16_t *scratch16;
    int8_t *scratch8;
} tf_sink;

static void rd_dims(tf_reader *r, tf_dims *d)
{
    d->h = rd_i32(r);
    d->w = rd_i32(r);
    d->c = rd_i32(r);
}

/* Conv, depthwise (optionally in place), average and max pooling. */
static int32_t run_window_op(int32_t op, tf_reader *r, tf_sink *k)
{
    tf_dims in, out;
    tf_window win;
    tf_conv_quant q;
    uint32_t n = 0;
    rd_dims(r, &in);
    rd_dims(r, &out);
    rd_window(r, &win);
    k->bytes = (uint32_t)(out.h * out.w * out.c);
    int8_t *dst = (int8_t *)k->out;
    if (op == OP_AVGPOOL || op == OP_MAXPOOL) {
        const int32_t in_off = rd_i32(r), out_off = rd_i32(r);
        const int32_t amin = rd_i32(r), amax = rd_i32(r);
        const int8_t *x = rd_arr(r, NULL);
        if (!r->ok || k->bytes > k->cap) {
            return -1;
        }
        return op == OP_MAXPOOL
                   ? tf_max_pool_s8(&in, x, &win, &out, amin, amax, dst)
                   : tf_avg_pool_s8(&in, x, &win, &out, in_off, out_off, amin, amax, dst);
    }
    rd_quant(r, &q);
    const int32_t in_place = rd_i32(r);
    const int8_t *x = rd_arr(r, &n);
    const int8_t *w = rd_arr(r, NULL);
    const int32_t *b = rd_arr(r, NULL);
    q.multiplier = rd_arr(r, NULL);
    q.shift = rd_arr(r, NULL);
    if (!r->ok || k->bytes > k->cap || n > k->cap) {
        return -1;
    }
    if (op == OP_CONV) {
        return tf_conv2d_s8(&in, x, &win, &out, w, b, &q, dst, k->scratch16);
    }
    if (op == OP_CONV_FAST) {
        return tf_conv2d_fast_s8(&in, x, &win, &out, w, b, &q, dst, k->scratch16);
    }
    if (op == OP_CONV_RGB) {
        return tf_conv2d_rgb_s8(&in, x, &win, &out, w, b, &q, dst, k->scratch16);
    }
    if (in_place) {
        memcpy(dst, x, n);
        x = dst;
    }
    if (op == OP_DW_FAST) {
        return tf_depthwise_conv2d_fast_s8(&in, x, &win, &out, w, b, &q, dst, k->scratch8);
    }
    return tf_depthwise_conv2d_s8(&in, x, &win, &out, w, b, &q, dst, k->scratch8);
}

/* 1x1 conv, 1x1 conv accumulating into a residual, fully connected. */
static int32_t run_pointwise(int32_t op, tf_reader *r, tf_sink *k)
{
    tf_dims in;
    tf_conv_quant q;
    tf_add_quant add;
    rd_dims(r, &in);
    const int32_t cout = rd_i32(r);
    rd_quant(r, &q);
    if (op == OP_CONV1X1_ADD || op == OP_CONV1X1_ADD_FAST) {
        rd_add(r, &add);
    }
    const int8_t *x = rd_arr(r, NULL);
    const int8_t *w = rd_arr(r, NULL);
    const int32_t *b = rd_arr(r, NULL);
    q.multiplier = rd_arr(r, NULL);
    q.shift = rd_arr(r, NULL);
    k->bytes = (uint32_t)(in.h * in.w * cout);
    int8_t *dst = (int8_t *)k->out;
    if (op == OP_CONV1X1_ADD || op == OP_CONV1X1_ADD_FAST) {
        uint32_t n = 0;
        const int8_t *res = rd_arr(r, &n);
        if (!r->ok || n != k->bytes || n > k->cap) {
            return -1;
        }
        memcpy(dst, res, n);
        return op == OP_CONV1X1_ADD_FAST
                   ? tf_conv2d_1x1_add_fast_s8(&in, x, cout, w, b, &q, &add, dst, k->scratch16)
                   : tf_conv2d_1x1_add_s8(&in, x, cout, w, b, &q, &add, dst, k->scratch16);
    }
    if (!r->ok || k->bytes > k->cap) {
        return -1;
    }
    if (op == OP_CONV1X1_FAST) {
        return tf_conv2d_1x1_fast_s8(&in, x, cout, w, b, &q, dst, k->scratch16);
    }
    return op == OP_FC ? tf_fully_connected_s8(in.c, x, cout, w, b, &q, dst, k->scratch16)
                       : tf_conv2d_1x1_s8(&in, x, cout, w, b, &q, dst, k->scratch16);
}

/* Add, global average pool, requantization of raw int32 values. */
static int32_t run_elementwise(int32_t op, tf_reader *r, tf_sink *k)
{
    int8_t *dst = (int8_t *)k->out;
    if (op == OP_ADD) {
        tf_add_quant add;
        const int32_t count = rd_i32(r);
        rd_add(r, &add);
        const int8_t *a = rd_arr(r, NULL);
        const int8_t *b = rd_arr(r, NULL);
        k->bytes = (uint32_t)count;
        if (!r->ok || k->bytes > k->cap) {
            return -1;
        }
        return tf_add_s8(count, a, b, &add, dst);
    }
    if (op == OP_GAP) {
        tf_dims in;
        rd_dims(r, &in);
        const int32_t in_off = rd_i32(r), out_off = rd_i32(r);
        const int8_t *x = rd_arr(r, NULL);
        k->bytes = (uint32_t)in.c;
        if (!r->ok || k->bytes > k->cap) {
            return -1;
        }
        return tf_global_avg_pool_s8(&in, x, in_off, out_off, dst);
    }
    const int32_t count = rd_i32(r);
    const int32_t *acc = rd_arr(r, NULL);
    const int32_t *m = rd_arr(r, NULL);
    const int32_t *s = rd_arr(r, NULL);
    k->bytes = (uint32_t)count * 4u;
    if (!r->ok || k->bytes > k->cap) {
        return -1;
    }
    for (int32_t i = 0; i < count; i++) {
        const int32_t v = tf_requantize(acc[i], m[i], s[i]);
        memcpy(k->out + 4 * i, &v, 4);
    }
    return TF_OK;
}

/* Patch load (with border padding) and store. */
static int32_t run_patch(int32_t op, tf_reader *r, tf_sink *k)
{
    tf_dims src_dims, dst_dims;
    rd_dims(r, &src_dims);
    dst_dims.h = rd_i32(r);
    dst_dims.w = rd_i32(r);
    dst_dims.c = src_dims.c;
    const int32_t row0 = rd_i32(r), col0 = rd_i32(r), pad = rd_i32(r);
    const int8_t *src = rd_arr(r, NULL);
    int8_t *dst = (int8_t *)k->out;
    if (op == OP_PATCH_LOAD) {
        k->bytes = (uint32_t)(dst_dims.h * dst_dims.w * dst_dims.c);
        if (!r->ok || k->bytes > k->cap) {
            return -1;
        }
        return tf_patch_load_s8(&src_dims, src, row0, col0, &dst_dims, dst, (int8_t)pad);
    }
    uint32_t n = 0;
    const int8_t *before = rd_arr(r, &n);
    k->bytes = n;
    if (!r->ok || n > k->cap) {
        return -1;
    }
    memcpy(dst, before, n);
    return tf_patch_store_s8(&src_dims, src, &dst_dims, dst, row0, col0);
}

/* Runs one case; returns its tf_status (or -1 for a malformed case), sets k->bytes. */
static int32_t run_case(tf_reader *r, tf_sink *k)
{
    const int32_t op = rd_i32(r);
    k->bytes = 0;
    switch (op) {
    case OP_CONV:
    case OP_DW:
    case OP_DW_FAST:
    case OP_CONV_FAST:
    case OP_CONV_RGB:
    case OP_AVGPOOL:
    case OP_MAXPOOL:
        return run_window_op(op, r, k);
    case OP_CONV1X1:
    case OP_CONV1X1_FAST:
    case OP_CONV1X1_ADD_FAST:
    case OP_CONV1X1_ADD:
    case OP_FC:
        return run_pointwise(op, r, k);
    case OP_ADD:
    case OP_GAP:
    case OP_REQUANT:
        return run_elementwise(op, r, k);
    case OP_PATCH_LOAD:
    case OP_PATCH_STORE:
        return run_patch(op, r, k);
    default:
        return -1;
    }
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
        if (pos + 8u > cap) {
            return -1;
        }
        tf_sink sink = {out + pos + 8, cap - pos - 8, 0, scratch16, scratch8};
        const int32_t st = run_case(&r, &sink);
        const uint32_t nbytes = sink.bytes;
        if (st < 0) {
            return -1;
        }
        memcpy(out + pos, &st, 4);
        memcpy(out + pos + 4, &nbytes, 4);
        pos += 8u + ((nbytes + 3u) & ~3u);
    }
    return r.ok ? (int32_t)pos : -1;
}
