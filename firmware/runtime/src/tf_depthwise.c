/* Depthwise conv (channel multiplier 1), in place through a ring of kh input rows. */
#include "tf_internal.h"

/* The ring holds the kh rows of the current window, padded left and right with the zero
 * point; a row above or below the image is a slot of zero points. Every window is then
 * complete and the inner loops need no bounds checks (a padded tap adds (zp - zp) * w = 0).
 * Row y lives in slot y mod kh: the kh rows of a window never share a slot. */
static size_t tf_dw_ring_bytes(const tf_dims *in, const tf_window *win)
{
    return (size_t)win->kh * (size_t)(in->w + win->pad_left + win->pad_right) * (size_t)in->c;
}

/* The other way, where it is smaller (small images, many channels): one channel at a time
 * through a zero-point-padded plane of (h + pads) x (w + pads) bytes. */
static size_t tf_dw_plane_bytes(const tf_dims *in, const tf_window *win)
{
    return (size_t)(in->h + win->pad_top + win->pad_bottom) *
           (size_t)(in->w + win->pad_left + win->pad_right);
}

size_t tf_depthwise_conv2d_get_buffer_size(const tf_dims *in, const tf_window *win)
{
    if (in == NULL || win == NULL) {
        return 0;
    }
    const size_t ring = tf_dw_ring_bytes(in, win);
    const size_t plane = tf_dw_plane_bytes(in, win);
    return plane <= ring ? plane : ring;
}

static inline size_t tf_dw_slot(int32_t y, int32_t kh)
{
    return (size_t)(((y % kh) + kh) % kh);
}

#define TF_DW_MAX_KH 16

/* Requantization of one layer in locals (int8 stores may alias the tf_conv_quant). */
typedef struct {
    const int32_t *multiplier;
    const int32_t *shift;
    int32_t input_offset;
    int32_t output_offset;
    int32_t act_min;
    int32_t act_max;
    int right_only; /* tf_right_shifts_only: the branch-free requantization applies */
} tf_dw_quant;

static inline __attribute__((always_inline)) int8_t tf_dw_out(int32_t acc, const tf_dw_quant *q,
                                                         int32_t c)
{
    const int32_t y = q->right_only ? tf_rq_right(acc, q->multiplier[c], -q->shift[c])
                                    : tf_rq(acc, q->multiplier[c], q->shift[c]);
    return tf_clamp8(y + q->output_offset, q->act_min, q->act_max);
}

#if TF_USE_DSP
static inline uint32_t tf_dw_read(const int8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* SXTAB16 with its ROR #8 operand (no ACLE intrinsic for the rotated form). */
static inline int16x2_t tf_sxtab16_ror8(int16x2_t a, uint32_t b)
{
    int16x2_t r;
    __asm__("sxtab16 %0, %1, %2, ror #8" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

static inline int16x2_t tf_sxtb16_ror8(uint32_t b)
{
    int16x2_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(b));
    return r;
}

/* Four channels of one tap: (x + offset) * w in 16-bit lanes, SMLABB / SMLATT per lane. */
#define TF_DW_TAP4(xp, wp)                                              \
    do {                                                                \
        const uint32_t x4 = tf_dw_read(xp);                             \
        const uint32_t w4 = tf_dw_read(wp);                             \
        const int16x2_t xe = __sxtab16(off2, (int8x4_t)x4);             \
        const int16x2_t xo = tf_sxtab16_ror8(off2, x4);                 \
        const int16x2_t we = __sxtb16((int8x4_t)w4);                    \
        const int16x2_t wo = tf_sxtb16_ror8(w4);                        \
        acc0 = __smlabb(xe, we, acc0);                                  \
        acc2 = __smlatt(xe, we, acc2);                                  \
        acc1 = __smlabb(xo, wo, acc1);                                  \
        acc3 = __smlatt(xo, wo, acc3);                                  \
    } while (0)

/* 3x3 over four channels at a time with SMLABB/SMLATT: returns the channels done. */
static int32_t tf_dw_3x3_dsp(const int8_t *a, const int8_t *b, const int8_t *e,
                             int32_t channels, const int8_t *weights, const int32_t *bias,
                             const tf_dw_quant *q, int8_t *dst)
{
    const size_t cs = (size_t)channels;
    const int16x2_t off2 =
        (int16x2_t)(((uint32_t)(uint16_t)q->input_offset << 16) | (uint16_t)q->input_offset);
    int32_t c = 0;
    for (; c + 4 <= channels; c += 4) {
        int32_t acc0 = bias[c], acc1 = bias[c + 1], acc2 = bias[c + 2], acc3 = bias[c + 3];
        const int8_t *w = weights + c;
        TF_DW_TAP4(a + c, w);
        TF_DW_TAP4(a + c + cs, w + cs);
        TF_DW_TAP4(a + c + 2 * cs, w + 2 * cs);
        TF_DW_TAP4(b + c, w + 3 * cs);
        TF_DW_TAP4(b + c + cs, w + 4 * cs);
        TF_DW_TAP4(b + c + 2 * cs, w + 5 * cs);
        TF_DW_TAP4(e + c, w + 6 * cs);
        TF_DW_TAP4(e + c + cs, w + 7 * cs);
        TF_DW_TAP4(e + c + 2 * cs, w + 8 * cs);
        dst[c] = tf_dw_out(acc0, q, c);
        dst[c + 1] = tf_dw_out(acc1, q, c + 1);
        dst[c + 2] = tf_dw_out(acc2, q, c + 2);
        dst[c + 3] = tf_dw_out(acc3, q, c + 3);
    }
    return c;
}
#endif

/* A 3x3 window: nine taps per channel. rows[] point at padded rows, x0 in padded columns. */
static void tf_dw_3x3(const int8_t *const rows[3], int32_t x0, int32_t channels,
                      const int8_t *weights, const int32_t *bias, const tf_dw_quant *q,
                      int8_t *dst)
{
    const size_t cs = (size_t)channels;
    const size_t cs2 = 2 * cs;
    const int8_t *a = rows[0] + (size_t)x0 * cs;
    const int8_t *b = rows[1] + (size_t)x0 * cs;
    const int8_t *e = rows[2] + (size_t)x0 * cs;
    int32_t c = 0;
#if TF_USE_DSP
    c = tf_dw_3x3_dsp(a, b, e, channels, weights, bias, q, dst);
    a += c;
    b += c;
    e += c;
#endif
    /* One pointer per kernel row: every tap is then [pointer + 0 / cs / 2cs]. */
    const int8_t *w0 = weights + c;
    const int8_t *w1 = weights + 3 * cs + c;
    const int8_t *w2 = weights + 6 * cs + c;
    const int32_t off = q->input_offset;
    for (; c < channels; c++) {
        int32_t acc = bias[c];
        acc += (a[0] + off) * w0[0] + (a[cs] + off) * w0[cs] + (a[cs2] + off) * w0[cs2];
        acc += (b[0] + off) * w1[0] + (b[cs] + off) * w1[cs] + (b[cs2] + off) * w1[cs2];
        acc += (e[0] + off) * w2[0] + (e[cs] + off) * w2[cs] + (e[cs2] + off) * w2[cs2];
        dst[c] = tf_dw_out(acc, q, c);
        a++;
        b++;
        e++;
        w0++;
        w1++;
        w2++;
    }
}

/* Any kh x kw window over padded rows. */
static void tf_dw_generic(const int8_t *const *rows, const tf_window *win, int32_t x0,
                          int32_t channels, const int8_t *weights, const int32_t *bias,
                          const tf_dw_quant *q, int8_t *dst)
{
    const size_t cs = (size_t)channels;
    for (int32_t c = 0; c < channels; c++) {
        int32_t acc = bias[c];
        for (int32_t i = 0; i < win->kh; i++) {
            const int8_t *x = rows[i] + (size_t)x0 * cs + (size_t)c;
            const int8_t *w = weights + (size_t)(i * win->kw) * cs + (size_t)c;
            for (int32_t j = 0; j < win->kw; j++) {
                acc += (x[(size_t)j * cs] + q->input_offset) * w[(size_t)j * cs];
            }
        }
        dst[c] = tf_dw_out(acc, q, c);
    }
}

/* One output row from the ring (row y of the window in slot y mod kh). */
static void tf_dw_row(const tf_dims *in, const tf_window *win, const tf_dims *out,
                      const int8_t *ring, int32_t oy, const int8_t *weights,
                      const int32_t *bias, const tf_dw_quant *q, int8_t *dst)
{
    const size_t slot = (size_t)(in->w + win->pad_left + win->pad_right) * (size_t)in->c;
    const int32_t y0 = oy * win->stride_h - win->pad_top;
    const int8_t *rows[TF_DW_MAX_KH];
    for (int32_t i = 0; i < win->kh; i++) {
        rows[i] = ring + tf_dw_slot(y0 + i, win->kh) * slot;
    }
    const int three = win->kh == 3 && win->kw == 3;
    for (int32_t ox = 0; ox < out->w; ox++) {
        const int32_t x0 = ox * win->stride_w; /* in padded columns */
        int8_t *d = dst + (size_t)ox * (size_t)in->c;
        if (three) {
            tf_dw_3x3(rows, x0, in->c, weights, bias, q, d);
        } else {
            tf_dw_generic(rows, win, x0, in->c, weights, bias, q, d);
        }
    }
}

/* One channel over the padded plane: out = bias + off * sum(w) + sum x * w, the same
 * integers as sum (x + off) * w (a padded tap holds zp, so it adds (zp + off) * w = 0). */
static void tf_dw_plane_channel(const int8_t *plane, int32_t wp, const tf_window *win,
                                const tf_dims *out, const int8_t *w, int32_t acc0,
                                const tf_dw_quant *q, int32_t c, int8_t *dst)
{
    const size_t step = (size_t)out->c;
    if (win->kh == 3 && win->kw == 3) {
        const int32_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5],
                      w6 = w[6], w7 = w[7], w8 = w[8];
        for (int32_t oy = 0; oy < out->h; oy++) {
            const int8_t *r0 = plane + (size_t)(oy * win->stride_h) * (size_t)wp;
            const int8_t *r1 = r0 + wp;
            const int8_t *r2 = r1 + wp;
            const int32_t sw = win->stride_w;
            int8_t *d = dst + (size_t)(oy * out->w) * step;
            for (int32_t ox = 0; ox < out->w; ox++) {
                int32_t acc = acc0 + r0[0] * w0 + r0[1] * w1 + r0[2] * w2;
                acc += r1[0] * w3 + r1[1] * w4 + r1[2] * w5;
                acc += r2[0] * w6 + r2[1] * w7 + r2[2] * w8;
                *d = tf_dw_out(acc, q, c);
                d += step;
                r0 += sw;
                r1 += sw;
                r2 += sw;
            }
        }
        return;
    }
    for (int32_t oy = 0; oy < out->h; oy++) {
        for (int32_t ox = 0; ox < out->w; ox++) {
            const int8_t *p = plane + (size_t)(oy * win->stride_h) * (size_t)wp +
                              (size_t)(ox * win->stride_w);
            int32_t acc = acc0;
            for (int32_t i = 0; i < win->kh; i++) {
                for (int32_t j = 0; j < win->kw; j++) {
                    acc += p[(size_t)i * (size_t)wp + (size_t)j] * w[i * win->kw + j];
                }
            }
            dst[(size_t)(oy * out->w + ox) * step] = tf_dw_out(acc, q, c);
        }
    }
}

static void tf_dw_by_plane(const tf_dims *in, const int8_t *input, const tf_window *win,
                           const tf_dims *out, const int8_t *weights, const int32_t *bias,
                           const tf_dw_quant *q, int8_t *output, int8_t *plane)
{
    const int32_t wp = in->w + win->pad_left + win->pad_right;
    const int32_t taps = win->kh * win->kw;
    const size_t cs = (size_t)in->c;
    int8_t w[TF_DW_MAX_KH * TF_DW_MAX_KH];
    memset(plane, (int8_t)(-q->input_offset), tf_dw_plane_bytes(in, win));
    for (int32_t c = 0; c < in->c; c++) {
        /* Channel c is saved whole before any of its outputs is written: in place is safe. */
        for (int32_t y = 0; y < in->h; y++) {
            const int8_t *src = input + (size_t)(y * in->w) * cs + (size_t)c;
            int8_t *row = plane + (size_t)(y + win->pad_top) * (size_t)wp + win->pad_left;
            for (int32_t x = 0; x < in->w; x++) {
                row[x] = src[(size_t)x * cs];
            }
        }
        int32_t wsum = 0;
        for (int32_t k = 0; k < taps; k++) {
            w[k] = weights[(size_t)k * cs + (size_t)c];
            wsum += w[k];
        }
        tf_dw_plane_channel(plane, wp, win, out, w, bias[c] + q->input_offset * wsum, q, c,
                            output + c);
    }
}

/* The row-ring way: rows are saved as the windows reach them; TF_ERR_ALIAS when, in place,
 * a row would be overwritten by earlier output rows before it is saved. */
static tf_status tf_dw_by_ring(const tf_dims *in, const int8_t *input, const tf_window *win,
                               const tf_dims *out, const int8_t *weights, const int32_t *bias,
                               const tf_dw_quant *ql, int8_t *output, int8_t *buffer)
{
    const int in_place = (const int8_t *)output == input;
    const size_t row_bytes = (size_t)in->w * (size_t)in->c;
    const size_t left = (size_t)win->pad_left * (size_t)in->c;
    const size_t right = (size_t)win->pad_right * (size_t)in->c;
    const size_t slot = left + row_bytes + right;
    const int8_t zero_point = (int8_t)(-ql->input_offset);
    int32_t held[TF_DW_MAX_KH]; /* the row each slot holds */
    for (int32_t i = 0; i < win->kh; i++) { /* the margins; rows go between them */
        memset(buffer + (size_t)i * slot, zero_point, left);
        memset(buffer + (size_t)i * slot + left + row_bytes, zero_point, right);
        held[i] = INT32_MIN;
    }
    const size_t out_row_bytes = (size_t)out->w * (size_t)out->c;
    for (int32_t oy = 0; oy < out->h; oy++) {
        const int32_t first = oy * win->stride_h - win->pad_top;
        for (int32_t y = first; y < first + win->kh; y++) {
            const size_t k = tf_dw_slot(y, win->kh);
            if (held[k] == y) {
                continue;
            }
            int8_t *dst = buffer + k * slot;
            if (y < 0 || y >= in->h) {
                memset(dst, zero_point, slot);
            } else {
                /* In place, output rows 0..oy-1 already cover the first oy*out_row_bytes. */
                if (in_place && (size_t)y * row_bytes < (size_t)oy * out_row_bytes) {
                    return TF_ERR_ALIAS;
                }
                memcpy(dst + left, input + (size_t)y * row_bytes, row_bytes);
            }
            held[k] = y;
        }
        tf_dw_row(in, win, out, buffer, oy, weights, bias, ql,
                  output + (size_t)oy * out_row_bytes);
    }
    return TF_OK;
}

tf_status tf_depthwise_conv2d_s8(const tf_dims *in, const int8_t *input, const tf_window *win,
                                 const tf_dims *out, const int8_t *weights,
                                 const int32_t *bias, const tf_conv_quant *q, int8_t *output,
                                 int8_t *buffer)
{
    tf_status st;
    if (input == NULL || weights == NULL || bias == NULL || output == NULL || buffer == NULL) {
        return TF_ERR_NULL;
    }
    if ((st = tf_check_dims(in)) != TF_OK || (st = tf_check_dims(out)) != TF_OK ||
        (st = tf_check_window(win)) != TF_OK ||
        (st = tf_check_conv_quant(q, in->c)) != TF_OK) {
        return st;
    }
    if (win->kh > TF_DW_MAX_KH || win->kw > TF_DW_MAX_KH) {
        return TF_ERR_ARG;
    }
    if (out->c != in->c ||
        out->h != tf_window_out(in->h, win->kh, win->stride_h, win->pad_top, win->pad_bottom) ||
        out->w != tf_window_out(in->w, win->kw, win->stride_w, win->pad_left, win->pad_right)) {
        return TF_ERR_SHAPE;
    }
    const tf_dw_quant ql = {q->multiplier,   q->shift,   q->input_offset,
                            q->output_offset, q->act_min, q->act_max,
                            tf_right_shifts_only(q->multiplier, q->shift, in->c)};
    const int in_place = (const int8_t *)output == input;
    if (tf_dw_plane_bytes(in, win) <= tf_dw_ring_bytes(in, win)) {
        if (in_place && out->h * out->w > in->h * in->w) {
            return TF_ERR_ALIAS;
        }
        tf_dw_by_plane(in, input, win, out, weights, bias, &ql, output, buffer);
        return TF_OK;
    }
    return tf_dw_by_ring(in, input, win, out, weights, bias, &ql, output, buffer);
}
