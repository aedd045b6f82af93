/* Fully connected, DSP path: one input column, every weight used once.
 *
 * tf_fully_connected_s8 runs this when it applies (else the generic 1x1 matmul). The input
 * is expanded once to 2 * (x + input_offset) as int16 in the (x0, x2, x1, x3) order that
 * SXTB16 gives the weights, so that SMLAD sums 2 * acc, SMMULR's operand (as in
 * tf_pw_fast.c); four output channels per pass share each column load (one LDRD of four
 * inputs, per channel one LDR of four weights, two SXTB16, two SMLAD: 23 instructions per
 * 16 MACs with the loop's). Requantization folds the rounding constant and output offset into one addend.
 * Applies when in_features % 4 == 0, the buffer is word-aligned, every accumulator provably
 * stays under 2^30 (|bias| + 255 * 128 * k) and every shift is a right shift of 1..22 bits.
 */
#include "tf_internal.h"

#if TF_USE_DSP
static inline __attribute__((always_inline)) uint32_t tf_fcf_read(const void *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) int16x2_t tf_fcf_odd(uint32_t w)
{
    int16x2_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(w));
    return r;
}

static int tf_fcf_applies(int32_t k, int32_t out_c, const int32_t *bias,
                          const tf_conv_quant *q, const int16_t *buffer)
{
    const int64_t room = ((int64_t)1 << 30) - (int64_t)255 * 128 * k;
    if (k % 4 != 0 || ((uintptr_t)buffer & 3u) != 0 || room <= 0) {
        return 0;
    }
    for (int32_t o = 0; o < out_c; o++) {
        const int64_t b = bias[o];
        const int32_t right = -q->shift[o];
        if ((b < 0 ? -b : b) >= room || right < 1 || right > 22 ||
            q->multiplier[o] == INT32_MIN) {
            return 0;
        }
    }
    return 1;
}

static inline __attribute__((always_inline)) int8_t tf_fcf_out(int32_t acc2, int32_t m,
                                                               int32_t right, int32_t off_out,
                                                               int32_t lo, int32_t hi)
{
    int32_t x;
    __asm__("smmulr %0, %1, %2" : "=r"(x) : "r"(acc2), "r"(m));
    const int32_t addend = (int32_t)(1u << (right - 1)) + off_out * (1 << right);
    const int32_t v = (x + addend + (x >> 31)) >> right;
    return (int8_t)(v < lo ? lo : (v > hi ? hi : v));
}

/* One 4-deep step for one channel: its four weights against the column pair (ce, co). */
#define TF_FCF_CH(acc, q)                                                                  \
    "ldr %[w], [%[" q "]], #4\n\t"                                                          \
    "sxtb16 %[t], %[w]\n\t"                                                                \
    "sxtb16 %[w], %[w], ror #8\n\t"                                                        \
    "smlad %[" acc "], %[ce], %[t], %[" acc "]\n\t"                                       \
    "smlad %[" acc "], %[co], %[w], %[" acc "]\n\t"

/* Four channels over the column: per 4-deep step one LDRD of the column and per channel
 * one LDR, two SXTB16, two SMLAD (21 instructions per 16 MACs, + 2 per step for the loop);
 * `steps` = k / 4 >= 1. Not inlined: its 14 registers are all the caller could give it. */
static __attribute__((noinline)) void
tf_fcf_four(const int16_t *col, const int8_t *wa, const int8_t *wb, const int8_t *wc,
            const int8_t *wd, int32_t steps, int32_t acc[4])
{
    int32_t a = acc[0], b = acc[1], c = acc[2], d = acc[3];
    uint32_t ce, co, w, t;
    __asm__("1:\n\t"
            "ldrd %[ce], %[co], [%[p]], #8\n\t"
            TF_FCF_CH("a", "qa") TF_FCF_CH("b", "qb") TF_FCF_CH("c", "qc") TF_FCF_CH("d", "qd")
            "subs %[n], %[n], #1\n\t"
            "bne 1b"
            : [a] "+r"(a), [b] "+r"(b), [c] "+r"(c), [d] "+r"(d), [p] "+r"(col),
              [qa] "+r"(wa), [qb] "+r"(wb), [qc] "+r"(wc), [qd] "+r"(wd), [n] "+r"(steps),
              [ce] "=&r"(ce), [co] "=&r"(co), [w] "=&r"(w), [t] "=&r"(t)
            :
            : "cc", "memory");
    acc[0] = a;
    acc[1] = b;
    acc[2] = c;
    acc[3] = d;
}
#undef TF_FCF_CH

int tf_fully_connected_fast(int32_t k, const int8_t *input, int32_t out_c,
                            const int8_t *weights, const int32_t *bias, const tf_conv_quant *q,
                            int8_t *output, int16_t *buffer)
{
    if (!tf_fcf_applies(k, out_c, bias, q, buffer)) {
        return 0;
    }
    const int32_t offset = q->input_offset;
    const int16x2_t off2 = (int16x2_t)(((uint32_t)(uint16_t)offset << 16) | (uint16_t)offset);
    for (int32_t i = 0; i < k; i += 4) {
        const uint32_t in = tf_fcf_read(input + i);
        int16x2_t even = __sxtab16(off2, (int8x4_t)in);
        int16x2_t odd = __sxtab16(off2, (int8x4_t)((in >> 8) | (in << 24)));
        even = __sadd16(even, even);
        odd = __sadd16(odd, odd);
        memcpy(buffer + i, &even, 4);
        memcpy(buffer + i + 2, &odd, 4);
    }
    const int32_t off_out = q->output_offset, lo = q->act_min, hi = q->act_max;
    const int32_t *mult = q->multiplier, *shift = q->shift;
    const int32_t steps = k >> 2;
    for (int32_t o = 0; o < out_c; o += 4) {
        /* fewer than four channels left: the last one's row stands in (results dropped) */
        const int32_t n = out_c - o < 4 ? out_c - o : 4;
        const int8_t *row[4];
        int32_t acc[4];
        for (int32_t j = 0; j < 4; j++) {
            const int32_t c = o + (j < n ? j : n - 1);
            row[j] = weights + (size_t)c * (size_t)k;
            acc[j] = 2 * bias[c];
        }
        tf_fcf_four(buffer, row[0], row[1], row[2], row[3], steps, acc);
        for (int32_t j = 0; j < n; j++) {
            output[o + j] = tf_fcf_out(acc[j], mult[o + j], -shift[o + j], off_out, lo, hi);
        }
    }
    return 1;
}
#endif /* TF_USE_DSP */
