/* Helpers shared by the kernels: requantization, argument checks, the dot-product core. */
#ifndef TF_INTERNAL_H
#define TF_INTERNAL_H

#include <stdint.h>
#include <string.h>

#include "tinyfleet_nn.h"

#if defined(__ARM_FEATURE_DSP) && !defined(TF_NO_DSP)
#define TF_USE_DSP 1
#include <arm_acle.h>
#else
#define TF_USE_DSP 0
#endif

/* gemmlowp SaturatingRoundingDoublingHighMul: (a*b + nudge) / 2^31 truncated toward zero. */
static inline int32_t tf_srdhm(int32_t a, int32_t b)
{
    if (a == INT32_MIN && b == INT32_MIN) {
        return INT32_MAX;
    }
    const int64_t ab = (int64_t)a * (int64_t)b;
    int64_t v = ab + (ab >= 0 ? ((int64_t)1 << 30) : (1 - ((int64_t)1 << 30)));
    /* Truncation toward zero without a 64-bit division (a library call on Cortex-M). */
    if (v < 0) {
        v += ((int64_t)1 << 31) - 1;
    }
    return (int32_t)(v >> 31);
}

/* gemmlowp RoundingDivideByPOT: x / 2^e, ties away from zero, e in [0, 31]. */
static inline int32_t tf_rdbpot(int32_t x, int32_t e)
{
    const int32_t mask = (int32_t)((1u << e) - 1u);
    const int32_t remainder = x & mask;
    const int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return (x >> e) + (remainder > threshold ? 1 : 0);
}

static inline int32_t tf_rq(int32_t acc, int32_t multiplier, int32_t shift)
{
    if (shift <= 0) { /* the usual case: scale < 1, no left shift to saturate */
        return tf_rdbpot(tf_srdhm(acc, multiplier), -shift);
    }
    int64_t x = (int64_t)acc * ((int64_t)1 << shift);
    if (x > INT32_MAX) {
        x = INT32_MAX;
    } else if (x < INT32_MIN) {
        x = INT32_MIN;
    }
    return tf_srdhm((int32_t)x, multiplier);
}

/* tf_rq for shift <= 0 and multiplier != INT32_MIN (checked once per layer): no left shift
 * to saturate and no saturating case in the high multiply, so no branches. Same result. */
static inline __attribute__((always_inline)) int32_t tf_rq_right(int32_t acc, int32_t m,
                                                                 int32_t right)
{
    if (__builtin_expect((uint32_t)acc + 0x40000000u < 0x80000000u, 1)) {
        /* |acc| < 2^30 (any int8 conv of sane size): SaturatingRoundingDoublingHighMul(acc, m)
         * is floor((2 acc m + 2^31) / 2^32), i.e. SMMULR(2 acc, m), and |x| < 2^30 leaves
         * room for RoundingDivideByPOT as (x + half - (x < 0)) >> right. Same integers. */
        int32_t x;
#if TF_USE_DSP
        __asm__("smmulr %0, %1, %2" : "=r"(x) : "r"(acc * 2), "r"(m));
#else
        x = (int32_t)(((int64_t)(acc * 2) * m + ((int64_t)1 << 31)) >> 32);
#endif
        const int32_t half = (int32_t)((1u << right) >> 1);
        return (x + half - ((x < 0) & (right > 0))) >> right;
    }
    const int64_t ab = (int64_t)acc * (int64_t)m;
    int64_t v = ab + (ab >= 0 ? ((int64_t)1 << 30) : (1 - ((int64_t)1 << 30)));
    v += (v < 0) ? ((int64_t)1 << 31) - 1 : 0;
    return tf_rdbpot((int32_t)(v >> 31), right);
}

static inline int8_t tf_clamp8(int32_t v, int32_t lo, int32_t hi)
{
    return (int8_t)(v < lo ? lo : (v > hi ? hi : v));
}

static inline int8_t tf_add_one(int32_t a, int32_t b, const tf_add_quant *q)
{
    const int32_t a1 = (a + q->input1_offset) * (1 << q->left_shift);
    const int32_t b1 = (b + q->input2_offset) * (1 << q->left_shift);
    const int32_t sum = tf_rq(a1, q->input1_multiplier, q->input1_shift) +
                        tf_rq(b1, q->input2_multiplier, q->input2_shift);
    return tf_clamp8(tf_rq(sum, q->output_multiplier, q->output_shift) + q->output_offset,
                     q->act_min, q->act_max);
}

tf_status tf_check_dims(const tf_dims *d);
tf_status tf_check_window(const tf_window *w);
/* Offsets and clamp in range; per channel multiplier >= 0 and shift in [-31, 30]. */
tf_status tf_check_conv_quant(const tf_conv_quant *q, int32_t channels);
tf_status tf_check_add_quant(const tf_add_quant *q);
/* Output extent of a window along one axis, as torch: floor((n + pads - k) / s) + 1. */
int32_t tf_window_out(int32_t n, int32_t k, int32_t s, int32_t pad_before, int32_t pad_after);

/* int8 -> int16 + offset for n elements; on the DSP path every group of 4 is stored as
 * (x0, x2, x1, x3), the order in which tf_dot_* pair it with SXTB16-expanded weights. */
void tf_expand_s8(const int8_t *src, int16_t *dst, int32_t n, int32_t offset);
/* Reorder a natural-order int16 column for the DSP path (no-op on the plain path). */
void tf_reorder_column(int16_t *col, int32_t n);

/* acc[p * 2 + o] += dot(column p, weights of channel o) for two columns and two channels. */
void tf_dot_2x2(const int16_t *col0, const int16_t *col1, const int8_t *w0, const int8_t *w1,
                int32_t n, int32_t acc[4]);
/* acc[p] += dot(column p, weights) for two columns, one channel. */
void tf_dot_2x1(const int16_t *col0, const int16_t *col1, const int8_t *w, int32_t n,
                int32_t acc[2]);
/* acc[o] += dot(column, weights of channel o) for one column, two channels. */
void tf_dot_1x2(const int16_t *col, const int8_t *w0, const int8_t *w1, int32_t n,
                int32_t acc[2]);
/* One column, one channel. */
int32_t tf_dot_1x1(const int16_t *col, const int8_t *w, int32_t n);

/* Output of one (pixel, channel): bias + acc, requantized and clamped. */
static inline int8_t tf_finish(int32_t acc, const tf_conv_quant *q, int32_t ch)
{
    return tf_clamp8(tf_rq(acc, q->multiplier[ch], q->shift[ch]) + q->output_offset,
                     q->act_min, q->act_max);
}

/* The matrix core shared by conv, 1x1 conv and fc: for columns built by `fill`, compute
 * every output channel. `residual`/`add` non-NULL fuses the residual add. */
typedef void (*tf_fill_fn)(const void *ctx, int32_t pixel, int16_t *col);
/* 1 when every shift is <= 0 and no multiplier is INT32_MIN: tf_rq_right applies. */
int tf_right_shifts_only(const int32_t *multiplier, const int32_t *shift, int32_t n);

void tf_matmul_columns(int32_t pixels, int32_t k, int32_t out_c, const int8_t *weights,
                       const int32_t *bias, const tf_conv_quant *q, const tf_add_quant *add,
                       int8_t *output, int16_t *buffer, tf_fill_fn fill, const void *ctx);

#if TF_USE_DSP
/* tf_fully_connected_s8's DSP path (tf_fc_fast.c), arguments already checked: 1 when it ran,
 * 0 when it does not apply (the caller runs the generic kernel). */
int tf_fully_connected_fast(int32_t k, const int8_t *input, int32_t out_c,
                            const int8_t *weights, const int32_t *bias, const tf_conv_quant *q,
                            int8_t *output, int16_t *buffer);
#endif

#endif /* TF_INTERNAL_H */
