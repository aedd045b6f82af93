/*
 * tinyfleet int8 kernels: integer-only, NHWC (one image: HWC), CMSIS-NN / TFLite conventions.
 *
 * Every kernel checks its arguments on entry and returns a tf_status; none allocates memory.
 * Scratch memory, where a kernel needs some, is passed by the caller and sized by the
 * kernel's tf_<op>_get_buffer_size().
 *
 * Quantization (the Python executable specification is firmware/reference.py):
 *   real = scale * (q - zero_point); input_offset = -zero_point_in in [-127, 128],
 *   output_offset = zero_point_out in [-128, 127].
 *   acc (int32) = bias[c] + sum (q_in + input_offset) * w; padded elements add nothing.
 *   out = clamp(tf_requantize(acc, multiplier[c], shift[c]) + output_offset, act_min, act_max)
 *   tf_requantize = TFLite MultiplyByQuantizedMultiplier: acc * 2^max(shift,0) saturated to
 *   int32, SaturatingRoundingDoublingHighMul (ties up), RoundingDivideByPOT(max(-shift,0))
 *   (ties away from zero). multiplier Q31 in [2^30, 2^31) or 0, shift in [-31, 30].
 * Weights: conv OHWI (out, kh, kw, in), depthwise HWC (kh, kw, channel), fc (out, in).
 *
 * The DSP path (Cortex-M4/M7/M33, __ARM_FEATURE_DSP, unless TF_NO_DSP is defined) uses SMLAD
 * dual 16-bit MACs through ACLE intrinsics; integer sums do not depend on order, so its
 * results are bit-identical to the plain C path.
 */
#ifndef TINYFLEET_NN_H
#define TINYFLEET_NN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    TF_OK = 0,
    TF_ERR_NULL = 1,   /* a required pointer is NULL */
    TF_ERR_ARG = 2,    /* a scalar argument is out of its range */
    TF_ERR_SHAPE = 3,  /* shapes disagree (e.g. output dims not what the window gives) */
    TF_ERR_ALIAS = 4,  /* the in-place request cannot be honoured for these shapes */
    TF_ERR_IO = 5      /* reading an input failed (generated models) */
} tf_status;

/* One activation tensor of one image, HWC. */
typedef struct {
    int32_t h;
    int32_t w;
    int32_t c;
} tf_dims;

/* A sliding window: kernel, stride, zero padding (top, left, bottom, right). */
typedef struct {
    int32_t kh;
    int32_t kw;
    int32_t stride_h;
    int32_t stride_w;
    int32_t pad_top;
    int32_t pad_left;
    int32_t pad_bottom;
    int32_t pad_right;
} tf_window;

/* Requantization of a conv / depthwise / fc output; multiplier and shift per out channel. */
typedef struct {
    int32_t input_offset;
    int32_t output_offset;
    int32_t act_min;
    int32_t act_max;
    const int32_t *multiplier;
    const int32_t *shift;
} tf_conv_quant;

/* TFLite int8 add: v_x = rq((q_x + input_x_offset) << left_shift, m_x, s_x);
 * out = clamp(rq(v_1 + v_2, output_multiplier, output_shift) + output_offset). */
typedef struct {
    int32_t left_shift;
    int32_t input1_offset;
    int32_t input1_multiplier;
    int32_t input1_shift;
    int32_t input2_offset;
    int32_t input2_multiplier;
    int32_t input2_shift;
    int32_t output_offset;
    int32_t output_multiplier;
    int32_t output_shift;
    int32_t act_min;
    int32_t act_max;
} tf_add_quant;

/* 1 when this build uses the SMLAD path, 0 for the plain C path. */
int32_t tf_dsp_enabled(void);

/* TFLite MultiplyByQuantizedMultiplier on one int32 (see the top of this file). */
int32_t tf_requantize(int32_t acc, int32_t multiplier, int32_t shift);

/* Dense k x k conv with stride and padding. buffer: tf_conv2d_get_buffer_size() bytes
 * (two im2col columns of int16, one when the output has one pixel), 4-byte aligned. input
 * and output must not overlap. firmware/plan/kernels.py mirrors every get_buffer_size. */
size_t tf_conv2d_get_buffer_size(const tf_dims *in, const tf_window *win);
tf_status tf_conv2d_s8(const tf_dims *in, const int8_t *input, const tf_window *win,
                       const tf_dims *out, const int8_t *weights, const int32_t *bias,
                       const tf_conv_quant *q, int8_t *output, int16_t *buffer);

/* Specialized dense conv: same arguments, buffer and results as tf_conv2d_s8 (which it runs
 * itself unless the folded requantization of tf_conv2d_1x1_fast_s8 applies). */
tf_status tf_conv2d_fast_s8(const tf_dims *in, const int8_t *input, const tf_window *win,
                            const tf_dims *out, const int8_t *weights, const int32_t *bias,
                            const tf_conv_quant *q, int8_t *output, int16_t *buffer);

/* Specialized dense conv of an RGB input layer (3x3 window, in->c == 3, any stride and
 * padding): same arguments and results as tf_conv2d_s8, which it runs itself on the plain C
 * path, for other shapes, one output pixel or channel, or unless the folded requantization
 * of tf_conv2d_1x1_fast_s8 applies (see tf_conv_fast.c). buffer:
 * tf_conv2d_rgb_get_buffer_size() bytes, 4-byte aligned: two int16 columns of 28 and, per
 * pair of output channels, 144 bytes of weights expanded per call and requantization
 * constants (at least tf_conv2d_get_buffer_size()). */
size_t tf_conv2d_rgb_get_buffer_size(const tf_dims *in, const tf_window *win, int32_t out_c);
tf_status tf_conv2d_rgb_s8(const tf_dims *in, const int8_t *input, const tf_window *win,
                           const tf_dims *out, const int8_t *weights, const int32_t *bias,
                           const tf_conv_quant *q, int8_t *output, int16_t *buffer);

/* 1x1 conv, stride 1, no padding: out is (in->h, in->w, out_c). */
size_t tf_conv2d_1x1_get_buffer_size(const tf_dims *in);
tf_status tf_conv2d_1x1_s8(const tf_dims *in, const int8_t *input, int32_t out_c,
                           const int8_t *weights, const int32_t *bias, const tf_conv_quant *q,
                           int8_t *output, int16_t *buffer);

/* Specialized 1x1 conv: same arguments, buffer and results as tf_conv2d_1x1_s8, which it
 * runs itself unless the DSP path applies and every channel's requantization can be folded
 * (doubled columns into SMMULR, rounding and output offset one addend; see tf_pw_fast.c). */
tf_status tf_conv2d_1x1_fast_s8(const tf_dims *in, const int8_t *input, int32_t out_c,
                                const int8_t *weights, const int32_t *bias,
                                const tf_conv_quant *q, int8_t *output, int16_t *buffer);
/* The same for tf_conv2d_1x1_add_s8 (the residual add's requantizations folded too). */
tf_status tf_conv2d_1x1_add_fast_s8(const tf_dims *in, const int8_t *input, int32_t out_c,
                                    const int8_t *weights, const int32_t *bias,
                                    const tf_conv_quant *q, const tf_add_quant *add,
                                    int8_t *residual, int16_t *buffer);

/* 1x1 conv whose int8 result y (requantized with q) is added to the residual tensor
 * (in->h, in->w, out_c) with `add` (input 1 = y, input 2 = residual) and written over the
 * residual: the fused projection + add of the `inplace` memory model. */
tf_status tf_conv2d_1x1_add_s8(const tf_dims *in, const int8_t *input, int32_t out_c,
                               const int8_t *weights, const int32_t *bias,
                               const tf_conv_quant *q, const tf_add_quant *add,
                               int8_t *residual, int16_t *buffer);

/* Depthwise conv, channel multiplier 1, kernel <= 16x16. output may equal input (in place).
 * The buffer (tf_depthwise_conv2d_get_buffer_size() bytes) is the smaller of a ring of kh
 * zero-point-padded input rows, which keeps the rows still needed, and one padded channel
 * plane (the kernel then runs channel by channel); TF_ERR_ALIAS if an input row would be
 * overwritten before it is saved. */
size_t tf_depthwise_conv2d_get_buffer_size(const tf_dims *in, const tf_window *win);
tf_status tf_depthwise_conv2d_s8(const tf_dims *in, const int8_t *input, const tf_window *win,
                                 const tf_dims *out, const int8_t *weights,
                                 const int32_t *bias, const tf_conv_quant *q, int8_t *output,
                                 int8_t *buffer);

/* Specialized depthwise conv for square 3x3 / 5x5 / 7x7 windows with stride 1 or 2
 * (tf_depthwise_conv2d_fast_supported; TF_ERR_ARG otherwise): on the DSP path one
 * zero-point-padded channel plane at a time, kernel size and stride compiled in, four outputs
 * per group of loaded words; output planes of at most 16 pixels straight from HWC, four
 * channels a word, without the plane (the plain C path runs tf_depthwise_conv2d_s8). Same
 * results as tf_depthwise_conv2d_s8; output may equal input. buffer:
 * tf_depthwise_conv2d_fast_get_buffer_size() bytes, (h + pads) * (w + pads) + 16. */
int32_t tf_depthwise_conv2d_fast_supported(const tf_window *win);
size_t tf_depthwise_conv2d_fast_get_buffer_size(const tf_dims *in, const tf_window *win);
tf_status tf_depthwise_conv2d_fast_s8(const tf_dims *in, const int8_t *input,
                                      const tf_window *win, const tf_dims *out,
                                      const int8_t *weights, const int32_t *bias,
                                      const tf_conv_quant *q, int8_t *output, int8_t *buffer);
/* The same for one window each (TF_ERR_ARG for another): generated code calls these, so a
 * model links only the sizes it uses. */
#define TF_DW_FAST_DECL(name)                                                              \
    tf_status name(const tf_dims *in, const int8_t *input, const tf_window *win,           \
                   const tf_dims *out, const int8_t *weights, const int32_t *bias,         \
                   const tf_conv_quant *q, int8_t *output, int8_t *buffer)
TF_DW_FAST_DECL(tf_depthwise_conv2d_3x3s1_s8);
TF_DW_FAST_DECL(tf_depthwise_conv2d_3x3s2_s8);
TF_DW_FAST_DECL(tf_depthwise_conv2d_5x5s1_s8);
TF_DW_FAST_DECL(tf_depthwise_conv2d_5x5s2_s8);
TF_DW_FAST_DECL(tf_depthwise_conv2d_7x7s1_s8);
TF_DW_FAST_DECL(tf_depthwise_conv2d_7x7s2_s8);
#undef TF_DW_FAST_DECL

/* Fully connected: (in_features) -> (out_features), weights (out, in); buffer: one column. */
size_t tf_fully_connected_get_buffer_size(int32_t in_features);
tf_status tf_fully_connected_s8(int32_t in_features, const int8_t *input, int32_t out_features,
                                const int8_t *weights, const int32_t *bias,
                                const tf_conv_quant *q, int8_t *output, int16_t *buffer);

/* Elementwise add of n int8 values; output may equal input1 or input2. */
size_t tf_add_get_buffer_size(void);
tf_status tf_add_s8(int32_t n, const int8_t *input1, const int8_t *input2,
                    const tf_add_quant *q, int8_t *output);

/* Average pool, same scale in and out, torch's count_include_pad: out = clamp(output_offset
 * + div(sum over the window of (q + input_offset), kh * kw)); padded elements add 0 and
 * count in the divisor; div rounds half away from zero. */
size_t tf_avg_pool_get_buffer_size(void);
tf_status tf_avg_pool_s8(const tf_dims *in, const int8_t *input, const tf_window *win,
                         const tf_dims *out, int32_t input_offset, int32_t output_offset,
                         int32_t act_min, int32_t act_max, int8_t *output);

/* Max pool over the in-bounds part of each window (padding never wins). */
size_t tf_max_pool_get_buffer_size(void);
tf_status tf_max_pool_s8(const tf_dims *in, const int8_t *input, const tf_window *win,
                         const tf_dims *out, int32_t act_min, int32_t act_max,
                         int8_t *output);

/* Global average pool (H, W, C) -> (C): output_offset + div(sum (q + input_offset), H*W),
 * rounding half away from zero; output may equal input. */
size_t tf_global_avg_pool_get_buffer_size(void);
tf_status tf_global_avg_pool_s8(const tf_dims *in, const int8_t *input, int32_t input_offset,
                                int32_t output_offset, int8_t *output);

/* Copy the region of src starting at (row0, col0) with dst's height and width into dst;
 * elements outside src (the image border) are set to pad_value (the zero point). */
tf_status tf_patch_load_s8(const tf_dims *src_dims, const int8_t *src, int32_t row0,
                           int32_t col0, const tf_dims *dst_dims, int8_t *dst,
                           int8_t pad_value);

/* Copy all of src into dst at (row0, col0); the region must lie inside dst. */
tf_status tf_patch_store_s8(const tf_dims *src_dims, const int8_t *src,
                            const tf_dims *dst_dims, int8_t *dst, int32_t row0, int32_t col0);

#ifdef __cplusplus
}
#endif

#endif /* TINYFLEET_NN_H */
