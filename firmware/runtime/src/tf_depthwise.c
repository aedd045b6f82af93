/* Depthwise conv (channel multiplier 1), in place through a ring of kh input rows. */
#include "tf_internal.h"

size_t tf_depthwise_conv2d_get_buffer_size(const tf_dims *in, const tf_window *win)
{
    if (in == NULL || win == NULL) {
        return 0;
    }
    return (size_t)win->kh * (size_t)in->w * (size_t)in->c;
}

/* One output row from the rows held in the ring (row r lives in slot r % kh). */
static void tf_dw_row(const tf_dims *in, const tf_window *win, const tf_dims *out,
                      const int8_t *ring, int32_t oy, const int8_t *weights,
                      const int32_t *bias, const tf_conv_quant *q, int8_t *dst)
{
    const size_t row_bytes = (size_t)in->w * (size_t)in->c;
    const int32_t y0 = oy * win->stride_h - win->pad_top;
    const int32_t i0 = y0 < 0 ? -y0 : 0;
    const int32_t i1 = (y0 + win->kh > in->h) ? in->h - y0 : win->kh;
    for (int32_t ox = 0; ox < out->w; ox++) {
        const int32_t x0 = ox * win->stride_w - win->pad_left;
        const int32_t j0 = x0 < 0 ? -x0 : 0;
        const int32_t j1 = (x0 + win->kw > in->w) ? in->w - x0 : win->kw;
        for (int32_t c = 0; c < in->c; c++) {
            int32_t acc = bias[c];
            for (int32_t i = i0; i < i1; i++) {
                const int8_t *row = ring + (size_t)((y0 + i) % win->kh) * row_bytes;
                const int8_t *w = weights + (size_t)(i * win->kw) * (size_t)in->c + (size_t)c;
                for (int32_t j = j0; j < j1; j++) {
                    const int32_t v = row[(size_t)(x0 + j) * (size_t)in->c + (size_t)c];
                    acc += (v + q->input_offset) * w[(size_t)j * (size_t)in->c];
                }
            }
            dst[(size_t)ox * (size_t)in->c + (size_t)c] = tf_finish(acc, q, c);
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
    if (out->c != in->c ||
        out->h != tf_window_out(in->h, win->kh, win->stride_h, win->pad_top, win->pad_bottom) ||
        out->w != tf_window_out(in->w, win->kw, win->stride_w, win->pad_left, win->pad_right)) {
        return TF_ERR_SHAPE;
    }
    const int in_place = (const int8_t *)output == input;
    const size_t row_bytes = (size_t)in->w * (size_t)in->c;
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
            memcpy(buffer + (size_t)(r % win->kh) * row_bytes, input + (size_t)r * row_bytes,
                   row_bytes);
        }
        if (last + 1 > next_row) {
            next_row = last + 1;
        }
        tf_dw_row(in, win, out, buffer, oy, weights, bias, q,
                  output + (size_t)oy * out_row_bytes);
    }
    return TF_OK;
}
