/* Depthwise conv (channel multiplier 1), in place through a ring of kh input rows. */
#include "tf_internal.h"

/* The ring holds kh input rows padded left and right with the zero point, plus one row of
 * zero points for the padding above and below: every window is then complete, and the
 * inner loops need no bounds checks (a padded tap adds (zp - zp) * w = 0). */
size_t tf_depthwise_conv2d_get_buffer_size(const tf_dims *in, const tf_window *win)
{
    if (in == NULL || win == NULL) {
        return 0;
    }
    const size_t padded_w = (size_t)(in->w + win->pad_left + win->pad_right);
    return ((size_t)win->kh + 1u) * padded_w * (size_t)in->c;
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
} tf_dw_quant;

static inline int8_t tf_dw_out(int32_t acc, const tf_dw_quant *q, int32_t c)
{
    const int32_t shift = q->shift[c];
    /* shift <= 0 is the usual case; tf_rq's branch on it is taken once per output. */
    const int32_t y = shift <= 0 ? tf_rdbpot(tf_srdhm(acc, q->multiplier[c]), -shift)
                                 : tf_rq(acc, q->multiplier[c], shift);
    return tf_clamp8(y + q->output_offset, q->act_min, q->act_max);
}

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
    /* One pointer per kernel row: every tap is then [pointer + 0 / cs / 2cs]. */
    const int8_t *w0 = weights;
    const int8_t *w1 = weights + 3 * cs;
    const int8_t *w2 = weights + 6 * cs;
    const int32_t off = q->input_offset;
    for (int32_t c = 0; c < channels; c++) {
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

/* One output row from the ring (input row r in slot r % kh; slot kh = zero points). */
static void tf_dw_row(const tf_dims *in, const tf_window *win, const tf_dims *out,
                      const int8_t *ring, int32_t oy, const int8_t *weights,
                      const int32_t *bias, const tf_dw_quant *q, int8_t *dst)
{
    const size_t slot = (size_t)(in->w + win->pad_left + win->pad_right) * (size_t)in->c;
    const int32_t y0 = oy * win->stride_h - win->pad_top;
    const int8_t *rows[TF_DW_MAX_KH];
    for (int32_t i = 0; i < win->kh; i++) {
        const int32_t y = y0 + i;
        rows[i] = ring + (y >= 0 && y < in->h ? (size_t)(y % win->kh) : (size_t)win->kh) * slot;
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
        (st = tf_check_window(win)) != TF_OK || (st = tf_check_conv_quant(q)) != TF_OK) {
        return st;
    }
    if (win->kh > TF_DW_MAX_KH) {
        return TF_ERR_ARG;
    }
    if (out->c != in->c ||
        out->h != tf_window_out(in->h, win->kh, win->stride_h, win->pad_top, win->pad_bottom) ||
        out->w != tf_window_out(in->w, win->kw, win->stride_w, win->pad_left, win->pad_right)) {
        return TF_ERR_SHAPE;
    }
    const tf_dw_quant ql = {q->multiplier,   q->shift,   q->input_offset,
                            q->output_offset, q->act_min, q->act_max};
    const int in_place = (const int8_t *)output == input;
    const size_t row_bytes = (size_t)in->w * (size_t)in->c;
    const size_t left = (size_t)win->pad_left * (size_t)in->c;
    const size_t right = (size_t)win->pad_right * (size_t)in->c;
    const size_t slot = left + row_bytes + right;
    const int8_t zero_point = (int8_t)(-q->input_offset);
    for (int32_t i = 0; i < win->kh; i++) { /* the margins; rows go between them */
        memset(buffer + (size_t)i * slot, zero_point, left);
        memset(buffer + (size_t)i * slot + left + row_bytes, zero_point, right);
    }
    memset(buffer + (size_t)win->kh * slot, zero_point, slot);
    const size_t out_row_bytes = (size_t)out->w * (size_t)out->c;
    int32_t next_row = 0; /* first input row not yet saved in the ring */
    for (int32_t oy = 0; oy < out->h; oy++) {
        const int32_t first = oy * win->stride_h - win->pad_top;
        int32_t last = first + win->kh - 1;
        if (last > in->h - 1) {
            last = in->h - 1;
        }
        for (int32_t r = first > next_row ? first : next_row; r <= last; r++) {
            /* In place, output rows 0..oy-1 already cover the first oy*out_row_bytes. */
            if (in_place && (size_t)r * row_bytes < (size_t)oy * out_row_bytes) {
                return TF_ERR_ALIAS;
            }
            memcpy(buffer + (size_t)(r % win->kh) * slot + left, input + (size_t)r * row_bytes,
                   row_bytes);
        }
        if (last + 1 > next_row) {
            next_row = last + 1;
        }
        tf_dw_row(in, win, out, buffer, oy, weights, bias, &ql,
                  output + (size_t)oy * out_row_bytes);
    }
    return TF_OK;
}
