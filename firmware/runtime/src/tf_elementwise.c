/* Add, average pooling, global average pooling. */
#include "tf_internal.h"

size_t tf_add_get_buffer_size(void)
{
    return 0;
}

tf_status tf_add_s8(int32_t n, const int8_t *input1, const int8_t *input2,
                    const tf_add_quant *q, int8_t *output)
{
    tf_status st;
    if (input1 == NULL || input2 == NULL || output == NULL) {
        return TF_ERR_NULL;
    }
    if ((st = tf_check_add_quant(q)) != TF_OK) {
        return st;
    }
    if (n <= 0) {
        return TF_ERR_ARG;
    }
    for (int32_t i = 0; i < n; i++) {
        output[i] = tf_add_one(input1[i], input2[i], q);
    }
    return TF_OK;
}

/* TFLite's rounding of an average: half away from zero. */
static inline int32_t tf_div_round(int32_t sum, int32_t count)
{
    return sum >= 0 ? (sum + count / 2) / count : -((-sum + count / 2) / count);
}

size_t tf_avg_pool_get_buffer_size(void)
{
    return 0;
}

size_t tf_max_pool_get_buffer_size(void)
{
    return 0;
}

static tf_status tf_check_pool(const tf_dims *in, const int8_t *input, const tf_window *win,
                               const tf_dims *out, int32_t act_min, int32_t act_max,
                               const int8_t *output)
{
    tf_status st;
    if (input == NULL || output == NULL) {
        return TF_ERR_NULL;
    }
    if ((st = tf_check_dims(in)) != TF_OK || (st = tf_check_dims(out)) != TF_OK ||
        (st = tf_check_window(win)) != TF_OK) {
        return st;
    }
    if (act_min < -128 || act_max > 127 || act_min > act_max) {
        return TF_ERR_ARG;
    }
    if (out->c != in->c ||
        out->h != tf_window_out(in->h, win->kh, win->stride_h, win->pad_top, win->pad_bottom) ||
        out->w != tf_window_out(in->w, win->kw, win->stride_w, win->pad_left, win->pad_right)) {
        return TF_ERR_SHAPE;
    }
    return TF_OK;
}

/* Pools one window; `is_max` picks max over in-bounds elements, else the offset sum. */
static int32_t tf_pool_window(const tf_dims *in, const int8_t *input, int32_t y0, int32_t x0,
                              const tf_window *win, int32_t c, int32_t offset, int is_max)
{
    const int32_t ya = y0 < 0 ? 0 : y0;
    const int32_t yb = y0 + win->kh > in->h ? in->h : y0 + win->kh;
    const int32_t xa = x0 < 0 ? 0 : x0;
    const int32_t xb = x0 + win->kw > in->w ? in->w : x0 + win->kw;
    int32_t acc = is_max ? -128 : 0;
    for (int32_t y = ya; y < yb; y++) {
        const int8_t *row = input + (size_t)y * (size_t)in->w * (size_t)in->c + (size_t)c;
        for (int32_t x = xa; x < xb; x++) {
            const int32_t v = row[(size_t)x * (size_t)in->c];
            if (is_max) {
                acc = v > acc ? v : acc;
            } else {
                acc += v + offset;
            }
        }
    }
    return acc;
}

static void tf_pool(const tf_dims *in, const int8_t *input, const tf_window *win,
                    const tf_dims *out, int32_t input_offset, int32_t output_offset,
                    int32_t act_min, int32_t act_max, int8_t *output, int is_max)
{
    const int32_t count = win->kh * win->kw;
    for (int32_t oy = 0; oy < out->h; oy++) {
        for (int32_t ox = 0; ox < out->w; ox++) {
            int8_t *dst = output + ((size_t)oy * (size_t)out->w + (size_t)ox) * (size_t)in->c;
            for (int32_t c = 0; c < in->c; c++) {
                const int32_t v = tf_pool_window(in, input, oy * win->stride_h - win->pad_top,
                                                 ox * win->stride_w - win->pad_left, win, c,
                                                 input_offset, is_max);
                dst[c] = tf_clamp8(is_max ? v : tf_div_round(v, count) + output_offset,
                                   act_min, act_max);
            }
        }
    }
}

tf_status tf_avg_pool_s8(const tf_dims *in, const int8_t *input, const tf_window *win,
                         const tf_dims *out, int32_t input_offset, int32_t output_offset,
                         int32_t act_min, int32_t act_max, int8_t *output)
{
    const tf_status st = tf_check_pool(in, input, win, out, act_min, act_max, output);
    if (st != TF_OK) {
        return st;
    }
    if (input_offset < -127 || input_offset > 128 || output_offset < -128 ||
        output_offset > 127) {
        return TF_ERR_ARG;
    }
    tf_pool(in, input, win, out, input_offset, output_offset, act_min, act_max, output, 0);
    return TF_OK;
}

tf_status tf_max_pool_s8(const tf_dims *in, const int8_t *input, const tf_window *win,
                         const tf_dims *out, int32_t act_min, int32_t act_max,
                         int8_t *output)
{
    const tf_status st = tf_check_pool(in, input, win, out, act_min, act_max, output);
    if (st != TF_OK) {
        return st;
    }
    tf_pool(in, input, win, out, 0, 0, act_min, act_max, output, 1);
    return TF_OK;
}

size_t tf_global_avg_pool_get_buffer_size(void)
{
    return 0;
}

tf_status tf_global_avg_pool_s8(const tf_dims *in, const int8_t *input, int32_t input_offset,
                                int32_t output_offset, int8_t *output)
{
    tf_status st;
    if (input == NULL || output == NULL) {
        return TF_ERR_NULL;
    }
    if ((st = tf_check_dims(in)) != TF_OK) {
        return st;
    }
    if (input_offset < -127 || input_offset > 128 || output_offset < -128 ||
        output_offset > 127) {
        return TF_ERR_ARG;
    }
    const int32_t count = in->h * in->w;
    /* Channel c of the output overwrites pixel 0's channel c only after channel c is summed,
     * so the output may alias the input. */
    for (int32_t c = 0; c < in->c; c++) {
        int32_t sum = 0;
        for (int32_t p = 0; p < count; p++) {
            sum += input[(size_t)p * (size_t)in->c + (size_t)c] + input_offset;
        }
        output[c] = tf_clamp8(tf_div_round(sum, count) + output_offset, -128, 127);
    }
    return TF_OK;
}
