/* Dense convolutions and fully connected: im2col columns (int16) times OHWI weights. */
#include "tf_internal.h"

typedef struct {
    const tf_dims *in;
    const int8_t *input;
    const tf_window *win;
    int32_t out_w;
    int32_t offset;
} tf_conv_ctx;

/* Column of output pixel `pixel`: (kh, kw, cin) taps plus offset; padding taps are 0. */
static void tf_fill_im2col(const void *vctx, int32_t pixel, int16_t *col)
{
    const tf_conv_ctx *ctx = (const tf_conv_ctx *)vctx;
    const tf_dims *in = ctx->in;
    const tf_window *win = ctx->win;
    const int32_t oy = pixel / ctx->out_w;
    const int32_t ox = pixel % ctx->out_w;
    const int32_t y0 = oy * win->stride_h - win->pad_top;
    const int32_t x0 = ox * win->stride_w - win->pad_left;
    int16_t *dst = col;
    for (int32_t i = 0; i < win->kh; i++) {
        const int32_t y = y0 + i;
        for (int32_t j = 0; j < win->kw; j++) {
            const int32_t x = x0 + j;
            if (y < 0 || y >= in->h || x < 0 || x >= in->w) {
                memset(dst, 0, (size_t)in->c * sizeof(int16_t));
            } else {
                const int8_t *src = ctx->input + ((size_t)y * (size_t)in->w + (size_t)x) *
                                                     (size_t)in->c;
                for (int32_t c = 0; c < in->c; c++) {
                    dst[c] = (int16_t)(src[c] + ctx->offset);
                }
            }
            dst += in->c;
        }
    }
    tf_reorder_column(col, win->kh * win->kw * in->c);
}

/* Column of a 1x1 conv: the pixel's channels plus offset. */
static void tf_fill_pixel(const void *vctx, int32_t pixel, int16_t *col)
{
    const tf_conv_ctx *ctx = (const tf_conv_ctx *)vctx;
    tf_expand_s8(ctx->input + (size_t)pixel * (size_t)ctx->in->c, col, ctx->in->c,
                 ctx->offset);
}

/* im2col columns tf_matmul_columns fills: two output pixels per pass, one if there is one. */
static size_t tf_columns(int32_t out_pixels)
{
    return out_pixels >= 2 ? 2u : 1u;
}

size_t tf_conv2d_get_buffer_size(const tf_dims *in, const tf_window *win)
{
    if (in == NULL || win == NULL) {
        return 0;
    }
    const int32_t out_h = tf_window_out(in->h, win->kh, win->stride_h, win->pad_top,
                                        win->pad_bottom);
    const int32_t out_w = tf_window_out(in->w, win->kw, win->stride_w, win->pad_left,
                                        win->pad_right);
    return tf_columns(out_h * out_w) * (size_t)win->kh * (size_t)win->kw * (size_t)in->c *
           sizeof(int16_t);
}

tf_status tf_conv2d_s8(const tf_dims *in, const int8_t *input, const tf_window *win,
                       const tf_dims *out, const int8_t *weights, const int32_t *bias,
                       const tf_conv_quant *q, int8_t *output, int16_t *buffer)
{
    tf_status st;
    if (input == NULL || weights == NULL || bias == NULL || output == NULL || buffer == NULL) {
        return TF_ERR_NULL;
    }
    if ((st = tf_check_dims(in)) != TF_OK || (st = tf_check_dims(out)) != TF_OK ||
        (st = tf_check_window(win)) != TF_OK ||
        (st = tf_check_conv_quant(q, out->c)) != TF_OK) {
        return st;
    }
    if (out->h != tf_window_out(in->h, win->kh, win->stride_h, win->pad_top, win->pad_bottom) ||
        out->w != tf_window_out(in->w, win->kw, win->stride_w, win->pad_left, win->pad_right)) {
        return TF_ERR_SHAPE;
    }
    const tf_conv_ctx ctx = {in, input, win, out->w, q->input_offset};
    tf_matmul_columns(out->h * out->w, win->kh * win->kw * in->c, out->c, weights, bias, q,
                      NULL, output, buffer, tf_fill_im2col, &ctx);
    return TF_OK;
}

size_t tf_conv2d_1x1_get_buffer_size(const tf_dims *in)
{
    return in == NULL ? 0 : tf_columns(in->h * in->w) * (size_t)in->c * sizeof(int16_t);
}

static tf_status tf_conv1x1(const tf_dims *in, const int8_t *input, int32_t out_c,
                            const int8_t *weights, const int32_t *bias, const tf_conv_quant *q,
                            const tf_add_quant *add, int8_t *output, int16_t *buffer)
{
    tf_status st;
    if (input == NULL || weights == NULL || bias == NULL || output == NULL || buffer == NULL) {
        return TF_ERR_NULL;
    }
    if (out_c <= 0 || out_c > 65535) {
        return TF_ERR_ARG;
    }
    if ((st = tf_check_dims(in)) != TF_OK || (st = tf_check_conv_quant(q, out_c)) != TF_OK) {
        return st;
    }
    if (add != NULL && (st = tf_check_add_quant(add)) != TF_OK) {
        return st;
    }
    const tf_window one = {1, 1, 1, 1, 0, 0, 0, 0};
    const tf_conv_ctx ctx = {in, input, &one, in->w, q->input_offset};
    tf_matmul_columns(in->h * in->w, in->c, out_c, weights, bias, q, add, output, buffer,
                      tf_fill_pixel, &ctx);
    return TF_OK;
}

tf_status tf_conv2d_1x1_s8(const tf_dims *in, const int8_t *input, int32_t out_c,
                           const int8_t *weights, const int32_t *bias, const tf_conv_quant *q,
                           int8_t *output, int16_t *buffer)
{
    return tf_conv1x1(in, input, out_c, weights, bias, q, NULL, output, buffer);
}

tf_status tf_conv2d_1x1_add_s8(const tf_dims *in, const int8_t *input, int32_t out_c,
                               const int8_t *weights, const int32_t *bias,
                               const tf_conv_quant *q, const tf_add_quant *add,
                               int8_t *residual, int16_t *buffer)
{
    if (add == NULL) {
        return TF_ERR_NULL;
    }
    return tf_conv1x1(in, input, out_c, weights, bias, q, add, residual, buffer);
}

size_t tf_fully_connected_get_buffer_size(int32_t in_features)
{
    /* one output pixel: one column */
    return in_features <= 0 ? 0 : (size_t)in_features * sizeof(int16_t);
}

tf_status tf_fully_connected_s8(int32_t in_features, const int8_t *input, int32_t out_features,
                                const int8_t *weights, const int32_t *bias,
                                const tf_conv_quant *q, int8_t *output, int16_t *buffer)
{
    const tf_dims in = {1, 1, in_features};
#if TF_USE_DSP
    if (input != NULL && weights != NULL && bias != NULL && output != NULL && buffer != NULL &&
        out_features > 0 && out_features <= 65535 && tf_check_dims(&in) == TF_OK &&
        tf_check_conv_quant(q, out_features) == TF_OK &&
        tf_fully_connected_fast(in_features, input, out_features, weights, bias, q, output,
                                buffer)) {
        return TF_OK;
    }
#endif
    return tf_conv1x1(&in, input, out_features, weights, bias, q, NULL, output, buffer);
}
