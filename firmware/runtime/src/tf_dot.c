/* The dot-product core: int16 columns times int8 weights, plain C or SMLAD (DSP). */
#include "tf_internal.h"

int32_t tf_dsp_enabled(void)
{
    return TF_USE_DSP;
}

int32_t tf_requantize(int32_t acc, int32_t multiplier, int32_t shift)
{
    return tf_rq(acc, multiplier, shift);
}

#if TF_USE_DSP
static inline uint32_t tf_read_u32(const void *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v); /* an unaligned LDR on M4/M7 */
    return v;
}

static inline int16x2_t tf_even(uint32_t w)
{
    return __sxtb16((int8x4_t)w);
}

/* SXTB16 with its ROR #8 operand: ACLE has no intrinsic for the rotated form, and without
 * it gcc spends a separate ROR on every weight word of the inner loop. */
static inline int16x2_t tf_odd(uint32_t w)
{
    int16x2_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(w));
    return r;
}
#endif

void tf_expand_s8(const int8_t *src, int16_t *dst, int32_t n, int32_t offset)
{
    int32_t i = 0;
#if TF_USE_DSP
    const int16x2_t off2 = (int16x2_t)(((uint32_t)(uint16_t)offset << 16) | (uint16_t)offset);
    for (; i + 4 <= n; i += 4) {
        const uint32_t in = tf_read_u32(src + i);
        const int16x2_t even = __sxtab16(off2, (int8x4_t)in);
        const int16x2_t odd = __sxtab16(off2, (int8x4_t)((in >> 8) | (in << 24)));
        memcpy(dst + i, &even, 4);
        memcpy(dst + i + 2, &odd, 4);
    }
#endif
    for (; i < n; i++) {
        dst[i] = (int16_t)(src[i] + offset);
    }
}

void tf_reorder_column(int16_t *col, int32_t n)
{
#if TF_USE_DSP
    for (int32_t i = 0; i + 4 <= n; i += 4) {
        const int16_t t = col[i + 1];
        col[i + 1] = col[i + 2];
        col[i + 2] = t;
    }
#else
    (void)col;
    (void)n;
#endif
}

/* Inlined into the matrix loop: a call per 2x2 block costs more than the block's tail. */
static inline __attribute__((always_inline)) void
tf_dot_2x2_inline(const int16_t *col0, const int16_t *col1, const int8_t *w0,
                  const int8_t *w1, int32_t n, int32_t acc[4])
{
    int32_t a00 = acc[0], a01 = acc[1], a10 = acc[2], a11 = acc[3];
    int32_t i = 0;
#if TF_USE_DSP
    const int8_t *wa = w0;
    const int8_t *wb = w1;
    const int16_t *ca = col0;
    const int16_t *cb = col1;
    for (int32_t blocks = n >> 2; blocks > 0; blocks--) {
        /* 16 MACs: two columns x two output channels x four input channels. */
        const int16x2_t c0e = (int16x2_t)tf_read_u32(ca);
        const int16x2_t c0o = (int16x2_t)tf_read_u32(ca + 2);
        const int16x2_t c1e = (int16x2_t)tf_read_u32(cb);
        const int16x2_t c1o = (int16x2_t)tf_read_u32(cb + 2);
        ca += 4;
        cb += 4;
        uint32_t w = tf_read_u32(wa);
        wa += 4;
        int16x2_t we = tf_even(w), wo = tf_odd(w);
        a00 = __smlad(c0e, we, a00);
        a10 = __smlad(c1e, we, a10);
        a00 = __smlad(c0o, wo, a00);
        a10 = __smlad(c1o, wo, a10);
        w = tf_read_u32(wb);
        wb += 4;
        we = tf_even(w);
        wo = tf_odd(w);
        a01 = __smlad(c0e, we, a01);
        a11 = __smlad(c1e, we, a11);
        a01 = __smlad(c0o, wo, a01);
        a11 = __smlad(c1o, wo, a11);
    }
    i = n & ~3;
#endif
    for (; i < n; i++) {
        a00 += col0[i] * w0[i];
        a01 += col0[i] * w1[i];
        a10 += col1[i] * w0[i];
        a11 += col1[i] * w1[i];
    }
    acc[0] = a00;
    acc[1] = a01;
    acc[2] = a10;
    acc[3] = a11;
}

void tf_dot_2x2(const int16_t *col0, const int16_t *col1, const int8_t *w0, const int8_t *w1,
                int32_t n, int32_t acc[4])
{
    tf_dot_2x2_inline(col0, col1, w0, w1, n, acc);
}

void tf_dot_2x1(const int16_t *col0, const int16_t *col1, const int8_t *w, int32_t n,
                int32_t acc[2])
{
    int32_t a0 = acc[0], a1 = acc[1];
    int32_t i = 0;
#if TF_USE_DSP
    for (; i + 4 <= n; i += 4) {
        const uint32_t wa = tf_read_u32(w + i);
        const int16x2_t we = tf_even(wa), wo = tf_odd(wa);
        a0 = __smlad((int16x2_t)tf_read_u32(col0 + i), we, a0);
        a0 = __smlad((int16x2_t)tf_read_u32(col0 + i + 2), wo, a0);
        a1 = __smlad((int16x2_t)tf_read_u32(col1 + i), we, a1);
        a1 = __smlad((int16x2_t)tf_read_u32(col1 + i + 2), wo, a1);
    }
#endif
    for (; i < n; i++) {
        a0 += col0[i] * w[i];
        a1 += col1[i] * w[i];
    }
    acc[0] = a0;
    acc[1] = a1;
}

void tf_dot_1x2(const int16_t *col, const int8_t *w0, const int8_t *w1, int32_t n,
                int32_t acc[2])
{
    int32_t a0 = acc[0], a1 = acc[1];
    int32_t i = 0;
#if TF_USE_DSP
    for (; i + 4 <= n; i += 4) {
        const uint32_t wa = tf_read_u32(w0 + i);
        const uint32_t wb = tf_read_u32(w1 + i);
        const int16x2_t ce = (int16x2_t)tf_read_u32(col + i);
        const int16x2_t co = (int16x2_t)tf_read_u32(col + i + 2);
        a0 = __smlad(ce, tf_even(wa), a0);
        a0 = __smlad(co, tf_odd(wa), a0);
        a1 = __smlad(ce, tf_even(wb), a1);
        a1 = __smlad(co, tf_odd(wb), a1);
    }
#endif
    for (; i < n; i++) {
        a0 += col[i] * w0[i];
        a1 += col[i] * w1[i];
    }
    acc[0] = a0;
    acc[1] = a1;
}

int32_t tf_dot_1x1(const int16_t *col, const int8_t *w, int32_t n)
{
    int32_t a = 0;
    int32_t i = 0;
#if TF_USE_DSP
    for (; i + 4 <= n; i += 4) {
        const uint32_t wa = tf_read_u32(w + i);
        a = __smlad((int16x2_t)tf_read_u32(col + i), tf_even(wa), a);
        a = __smlad((int16x2_t)tf_read_u32(col + i + 2), tf_odd(wa), a);
    }
#endif
    for (; i < n; i++) {
        a += col[i] * w[i];
    }
    return a;
}

/* The requantization of one layer in locals: int8 stores may alias anything, so reading
 * these through the tf_conv_quant pointer would reload them after every output. */
typedef struct {
    const int32_t *multiplier;
    const int32_t *shift;
    int32_t output_offset;
    int32_t act_min;
    int32_t act_max;
} tf_rq_locals;

/* One output: requantize, clamp, and (fused residual) add into what dst holds. */
static inline __attribute__((always_inline)) void
tf_put(int8_t *dst, int32_t acc, int32_t m, int32_t sh, const tf_rq_locals *r,
       const tf_add_quant *add)
{
    const int8_t y = tf_clamp8(tf_rq(acc, m, sh) + r->output_offset, r->act_min, r->act_max);
    *dst = add != NULL ? tf_add_one(y, *dst, add) : y;
}

static inline __attribute__((always_inline)) void
tf_put_fast(int8_t *dst, int32_t acc, int32_t m, int32_t right, const tf_rq_locals *r)
{
    *dst = tf_clamp8(tf_rq_right(acc, m, right) + r->output_offset, r->act_min, r->act_max);
}

/* The common case (no fused add, every shift <= 0): four outputs per 2x2 block. */
static void tf_matmul_pair_fast(int32_t p, int32_t k, int32_t out_c, const int8_t *weights,
                                const int32_t *bias, tf_rq_locals r, int8_t *output,
                                const int16_t *c0, const int16_t *c1)
{
    int8_t *out0 = output + (size_t)p * (size_t)out_c;
    int8_t *out1 = out0 + out_c;
    const int8_t *w0 = weights;
    int32_t o = 0;
    for (; o + 2 <= out_c; o += 2) {
        int32_t acc[4] = {bias[o], bias[o + 1], bias[o], bias[o + 1]};
        tf_dot_2x2_inline(c0, c1, w0, w0 + k, k, acc);
        w0 += 2 * k;
        const int32_t m0 = r.multiplier[o], s0 = -r.shift[o];
        const int32_t m1 = r.multiplier[o + 1], s1 = -r.shift[o + 1];
        tf_put_fast(out0 + o, acc[0], m0, s0, &r);
        tf_put_fast(out0 + o + 1, acc[1], m1, s1, &r);
        tf_put_fast(out1 + o, acc[2], m0, s0, &r);
        tf_put_fast(out1 + o + 1, acc[3], m1, s1, &r);
    }
    if (o < out_c) {
        int32_t acc[2] = {bias[o], bias[o]};
        tf_dot_2x1(c0, c1, w0, k, acc);
        tf_put_fast(out0 + o, acc[0], r.multiplier[o], -r.shift[o], &r);
        tf_put_fast(out1 + o, acc[1], r.multiplier[o], -r.shift[o], &r);
    }
}

/* Two pixels at a time, two output channels at a time: 16 MACs per 4-deep step. */
static void tf_matmul_pair(int32_t p, int32_t k, int32_t out_c, const int8_t *weights,
                           const int32_t *bias, tf_rq_locals r, const tf_add_quant *add,
                           int8_t *output, const int16_t *c0, const int16_t *c1)
{
    int8_t *out0 = output + (size_t)p * (size_t)out_c;
    int8_t *out1 = out0 + out_c;
    const int8_t *w0 = weights;
    int32_t o = 0;
    for (; o + 2 <= out_c; o += 2) {
        int32_t acc[4] = {bias[o], bias[o + 1], bias[o], bias[o + 1]};
        tf_dot_2x2_inline(c0, c1, w0, w0 + k, k, acc);
        w0 += 2 * k;
        const int32_t m0 = r.multiplier[o], s0 = r.shift[o];
        const int32_t m1 = r.multiplier[o + 1], s1 = r.shift[o + 1];
        tf_put(out0 + o, acc[0], m0, s0, &r, add);
        tf_put(out0 + o + 1, acc[1], m1, s1, &r, add);
        tf_put(out1 + o, acc[2], m0, s0, &r, add);
        tf_put(out1 + o + 1, acc[3], m1, s1, &r, add);
    }
    if (o < out_c) {
        int32_t acc[2] = {bias[o], bias[o]};
        tf_dot_2x1(c0, c1, w0, k, acc);
        tf_put(out0 + o, acc[0], r.multiplier[o], r.shift[o], &r, add);
        tf_put(out1 + o, acc[1], r.multiplier[o], r.shift[o], &r, add);
    }
}

static void tf_matmul_single(int32_t p, int32_t k, int32_t out_c, const int8_t *weights,
                             const int32_t *bias, tf_rq_locals r, const tf_add_quant *add,
                             int8_t *output, const int16_t *c0)
{
    int8_t *out0 = output + (size_t)p * (size_t)out_c;
    int32_t o = 0;
    for (; o + 2 <= out_c; o += 2) {
        const int8_t *w0 = weights + (size_t)o * (size_t)k;
        int32_t acc[2] = {bias[o], bias[o + 1]};
        tf_dot_1x2(c0, w0, w0 + k, k, acc);
        tf_put(out0 + o, acc[0], r.multiplier[o], r.shift[o], &r, add);
        tf_put(out0 + o + 1, acc[1], r.multiplier[o + 1], r.shift[o + 1], &r, add);
    }
    if (o < out_c) {
        const int32_t acc = bias[o] + tf_dot_1x1(c0, weights + (size_t)o * (size_t)k, k);
        tf_put(out0 + o, acc, r.multiplier[o], r.shift[o], &r, add);
    }
}

void tf_matmul_columns(int32_t pixels, int32_t k, int32_t out_c, const int8_t *weights,
                       const int32_t *bias, const tf_conv_quant *q, const tf_add_quant *add,
                       int8_t *output, int16_t *buffer, tf_fill_fn fill, const void *ctx)
{
    int16_t *c0 = buffer;
    int16_t *c1 = buffer + k;
    const tf_rq_locals r = {q->multiplier, q->shift, q->output_offset, q->act_min, q->act_max};
    tf_add_quant add_copy;
    if (add != NULL) {
        add_copy = *add; /* a local copy, for the same aliasing reason as tf_rq_locals */
        add = &add_copy;
    }
    const int fast = add == NULL && tf_right_shifts_only(r.multiplier, r.shift, out_c);
    int32_t p = 0;
    for (; p + 2 <= pixels; p += 2) {
        fill(ctx, p, c0);
        fill(ctx, p + 1, c1);
        if (fast) {
            tf_matmul_pair_fast(p, k, out_c, weights, bias, r, output, c0, c1);
        } else {
            tf_matmul_pair(p, k, out_c, weights, bias, r, add, output, c0, c1);
        }
    }
    if (p < pixels) {
        fill(ctx, p, c0);
        tf_matmul_single(p, k, out_c, weights, bias, r, add, output, c0);
    }
}

int tf_right_shifts_only(const int32_t *multiplier, const int32_t *shift, int32_t n)
{
    for (int32_t i = 0; i < n; i++) {
        if (shift[i] > 0 || multiplier[i] == INT32_MIN) {
            return 0;
        }
    }
    return 1;
}

tf_status tf_check_dims(const tf_dims *d)
{
    if (d == NULL) {
        return TF_ERR_NULL;
    }
    if (d->h <= 0 || d->w <= 0 || d->c <= 0 || d->h > 32767 || d->w > 32767 || d->c > 65535) {
        return TF_ERR_ARG;
    }
    return TF_OK;
}

tf_status tf_check_window(const tf_window *w)
{
    if (w == NULL) {
        return TF_ERR_NULL;
    }
    if (w->kh <= 0 || w->kw <= 0 || w->stride_h <= 0 || w->stride_w <= 0 || w->pad_top < 0 ||
        w->pad_left < 0 || w->pad_bottom < 0 || w->pad_right < 0 || w->pad_top >= w->kh ||
        w->pad_bottom >= w->kh || w->pad_left >= w->kw || w->pad_right >= w->kw) {
        return TF_ERR_ARG;
    }
    return TF_OK;
}

tf_status tf_check_conv_quant(const tf_conv_quant *q, int32_t channels)
{
    if (q == NULL || q->multiplier == NULL || q->shift == NULL) {
        return TF_ERR_NULL;
    }
    if (q->input_offset < -127 || q->input_offset > 128 || q->output_offset < -128 ||
        q->output_offset > 127 || q->act_min < -128 || q->act_max > 127 ||
        q->act_min > q->act_max) {
        return TF_ERR_ARG;
    }
    for (int32_t c = 0; c < channels; c++) {
        if (q->multiplier[c] < 0 || q->shift[c] < -31 || q->shift[c] > 30) {
            return TF_ERR_ARG;
        }
    }
    return TF_OK;
}

tf_status tf_check_add_quant(const tf_add_quant *q)
{
    if (q == NULL) {
        return TF_ERR_NULL;
    }
    if (q->left_shift < 0 || q->left_shift > 22 || q->input1_offset < -128 ||
        q->input1_offset > 128 || q->input2_offset < -128 || q->input2_offset > 128 ||
        q->output_offset < -128 || q->output_offset > 127 || q->act_min < -128 ||
        q->act_max > 127 || q->act_min > q->act_max || q->input1_multiplier < 0 ||
        q->input2_multiplier < 0 || q->output_multiplier < 0 || q->input1_shift > 30 ||
        q->input2_shift > 30 || q->output_shift > 30 || q->input1_shift < -31 ||
        q->input2_shift < -31 || q->output_shift < -31) {
        return TF_ERR_ARG;
    }
    return TF_OK;
}

int32_t tf_window_out(int32_t n, int32_t k, int32_t s, int32_t pad_before, int32_t pad_after)
{
    return (n + pad_before + pad_after - k) / s + 1;
}
