/* Specialized dense conv of an RGB input layer: 3x3 window, 3 input channels, any stride
 * and padding (the "stem" of MobileNet-like networks), DSP path.
 *
 * k = 27 taps suit neither the 4-deep SMLAD steps nor LDRD (tf_conv2d_fast_s8 runs them with
 * a scalar tail of 3), and the generic im2col pays a bounds check and a memset per tap. Here:
 * - the weights are expanded once per call into the buffer as int16 pairs, doubled (so SMLAD
 *   sums 2 * acc, which SMMULR takes directly, as in tf_pw_fast.c) and padded with a zero
 *   tap to 28, in the order the columns are built; the requantization constants of each
 *   channel (2 * bias, multiplier, 2^(right-1) + output_offset * 2^right, right) sit beside
 *   them, 144 bytes per pair of channels;
 * - a column is 14 words built straight from the input, no per-tap test: each of the
 *   window's 3 rows is 9 contiguous bytes, two words of which SXTAB16 (with the input offset)
 *   turns into 4 int16 pairs; the 9th bytes of the 3 rows and the zero tap make the last 2
 *   words. A row outside the image reads a row of -input_offset (0 once offset), a row cut
 *   by the left or right border a 9-byte copy padded the same way;
 * - two pixels x two channels run 7 fully unrolled 4-deep steps: per step two LDRD for the
 *   columns, two for the weights and eight SMLAD (12 instructions per 16 MACs), the biases
 *   entering as the first step's accumulators; where the clamp is all of int8 the
 *   requantization and the stores follow in the same asm block (28 instructions per 4
 *   outputs). An odd pixel count ends with a pair overlapping the one before, an odd
 *   channel count with one channel in C;
 * - the requantization is tf_pw_fast.c's folded one: exact when every accumulator stays under
 *   2^30 in magnitude (|bias| + 255 * 128 * 27) and every shift is a right shift of 1..22,
 *   checked once per call. Otherwise (or on the plain C path, for another shape, one output
 *   pixel or channel, or an unaligned buffer) tf_conv2d_s8 runs. Same results.
 */
#include "tf_internal.h"

#define TF_CF_TAPS 27 /* 3 x 3 window x 3 channels */
#define TF_CF_COL_WORDS 14 /* 28 int16: the taps and a zero one */
/* Per pair of output channels: 8 int32 (2 * bias, m, h, right of each) and 2 x 28 int16. */
#define TF_CF_PAIR_WORDS (8 + TF_CF_COL_WORDS * 2)

static int tf_cf_shape(const tf_dims *in, const tf_window *win)
{
    return in->c == 3 && win->kh == 3 && win->kw == 3;
}

size_t tf_conv2d_rgb_get_buffer_size(const tf_dims *in, const tf_window *win, int32_t out_c)
{
    if (in == NULL || win == NULL || out_c <= 0) {
        return 0;
    }
    const size_t generic = tf_conv2d_get_buffer_size(in, win);
    if (!tf_cf_shape(in, win)) {
        return generic;
    }
    const size_t fast = (2u * TF_CF_COL_WORDS + (size_t)(out_c + 1) / 2u * TF_CF_PAIR_WORDS) *
                        sizeof(int32_t);
    return fast > generic ? fast : generic;
}

#if TF_USE_DSP
/* The buffer as words (it is declared int16_t). */
typedef uint32_t __attribute__((may_alias)) tf_cf_u32;
typedef int32_t __attribute__((may_alias)) tf_cf_i32;

static inline __attribute__((always_inline)) uint32_t tf_cf_read(const int8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) uint32_t tf_cf_ror8(uint32_t v)
{
    return (v >> 8) | (v << 24);
}

/* SXTAB16 of a word rotated by 8 (bytes 1 and 3), in one instruction. */
static inline __attribute__((always_inline)) uint32_t tf_cf_odd(uint32_t off2, uint32_t v)
{
    uint32_t r;
    __asm__("sxtab16 %0, %1, %2, ror #8" : "=r"(r) : "r"(off2), "r"(v));
    return r;
}

/* One column in the buffer (for asm operands that write it). */
typedef struct {
    uint32_t w[TF_CF_COL_WORDS];
} __attribute__((may_alias)) tf_cf_colv;

/* Words `off` / 4 and the next of the column at col, in one STRD (GCC stores a uint64 as
 * two STR, or STRD through a pointer per offset that it keeps on the stack). */
#define TF_CF_PUT2(col, off, lo, hi)                                                       \
    __asm__("strd %1, %2, [%3, #" #off "]"                                                 \
            : "=m"(*(tf_cf_colv *)(col))                                                   \
            : "r"(lo), "r"(hi), "r"(col))

/* The column of a window whose rows start at r0, r1, r2 (9 bytes each): x + offset, where
 * off2 holds the offset in both halves. The zero tap's half of the last word is left as
 * it comes (its weight is 0). */
static inline __attribute__((always_inline)) void
tf_cf_column(const int8_t *r0, const int8_t *r1, const int8_t *r2, uint32_t off2,
             tf_cf_u32 *col)
{
    uint32_t a = tf_cf_read(r0), b = tf_cf_read(r0 + 4);
    TF_CF_PUT2(col, 0, __sxtab16((int16x2_t)off2, (int8x4_t)a), tf_cf_odd(off2, a));
    TF_CF_PUT2(col, 8, __sxtab16((int16x2_t)off2, (int8x4_t)b), tf_cf_odd(off2, b));
    a = tf_cf_read(r1);
    b = tf_cf_read(r1 + 4);
    TF_CF_PUT2(col, 16, __sxtab16((int16x2_t)off2, (int8x4_t)a), tf_cf_odd(off2, a));
    TF_CF_PUT2(col, 24, __sxtab16((int16x2_t)off2, (int8x4_t)b), tf_cf_odd(off2, b));
    a = tf_cf_read(r2);
    b = tf_cf_read(r2 + 4);
    TF_CF_PUT2(col, 32, __sxtab16((int16x2_t)off2, (int8x4_t)a), tf_cf_odd(off2, a));
    TF_CF_PUT2(col, 40, __sxtab16((int16x2_t)off2, (int8x4_t)b), tf_cf_odd(off2, b));
    const uint32_t s01 = (uint32_t)(uint8_t)r0[8] | ((uint32_t)(uint8_t)r1[8] << 16);
    TF_CF_PUT2(col, 48, __sxtab16((int16x2_t)off2, (int8x4_t)s01),
               __sxtab16((int16x2_t)off2, (int8x4_t)(uint32_t)(uint8_t)r2[8]));
}

/* The image and the window's walk over it. */
typedef struct {
    const int8_t *input;
    int32_t h, w;
    int32_t row;        /* bytes per input row: 3 * w */
    int32_t sh, sw;     /* stride */
    int32_t top, left;  /* padding */
    int32_t out_w;
    uint32_t off2;      /* the input offset in both int16 halves */
} tf_cf_conv;

/* Output pixel (oy, ox)'s window: its top-left corner (y0, x0), maybe outside the image. */
typedef struct {
    int32_t ox, y0, x0;
    int rows_in; /* the window's 3 rows lie inside the image */
} tf_cf_pos;

static inline __attribute__((always_inline)) void tf_cf_seek(const tf_cf_conv *cv, int32_t pixel,
                                                              tf_cf_pos *at)
{
    const int32_t oy = pixel / cv->out_w; /* once per call: the last pair of an odd count */
    at->ox = pixel - oy * cv->out_w;
    at->y0 = oy * cv->sh - cv->top;
    at->x0 = at->ox * cv->sw - cv->left;
    at->rows_in = at->y0 >= 0 && at->y0 + 3 <= cv->h;
}

/* The column of the window at `at`, then `at` moved to the next output pixel. Rows outside
 * the image read `pad` (9 bytes of -offset: 0 once offset); rows cut by the left or right
 * border are copied into `edge` (3 x 9 bytes) with the same padding. */
static inline __attribute__((always_inline)) void
tf_cf_im2col(const tf_cf_conv *cv, tf_cf_pos *at, tf_cf_u32 *col, const int8_t *pad,
             int8_t *edge)
{
    const int32_t y0 = at->y0, x0 = at->x0;
    const int8_t *rows[3];
    if (x0 >= 0 && x0 + 3 <= cv->w) {
        if (at->rows_in) {
            const int8_t *src = cv->input + y0 * cv->row + 3 * x0;
            rows[0] = src;
            rows[1] = src + cv->row;
            rows[2] = src + 2 * cv->row;
        } else {
            for (int32_t i = 0; i < 3; i++) {
                const int32_t y = y0 + i;
                rows[i] = y >= 0 && y < cv->h ? cv->input + y * cv->row + 3 * x0 : pad;
            }
        }
    } else {
        for (int32_t i = 0; i < 3; i++) {
            const int32_t y = y0 + i;
            rows[i] = pad;
            if (y < 0 || y >= cv->h) {
                continue;
            }
            int8_t *e = edge + 9 * i;
            for (int32_t j = 0; j < 3; j++) {
                const int32_t x = x0 + j;
                const int8_t *src = x >= 0 && x < cv->w ? cv->input + y * cv->row + 3 * x : pad;
                e[3 * j] = src[0];
                e[3 * j + 1] = src[1];
                e[3 * j + 2] = src[2];
            }
            rows[i] = e;
        }
    }
    tf_cf_column(rows[0], rows[1], rows[2], cv->off2, col);
    at->x0 += cv->sw;
    if (++at->ox == cv->out_w) {
        at->ox = 0;
        at->x0 = -cv->left;
        at->y0 += cv->sh;
        at->rows_in = at->y0 >= 0 && at->y0 + 3 <= cv->h;
    }
}

/* 2 * (w0, w2) and 2 * (w1, w3) of four weights: their int16 pairs for the column words
 * SXTAB16 makes of the same four input bytes. */
static inline __attribute__((always_inline)) void tf_cf_pair_up(tf_cf_i32 *dst, uint32_t w)
{
    const int16x2_t even = __sxtb16((int8x4_t)w), odd = __sxtb16((int8x4_t)tf_cf_ror8(w));
    dst[0] = (int32_t)__sadd16(even, even);
    dst[1] = (int32_t)__sadd16(odd, odd);
}

/* The weights and requantization constants of every pair of output channels (the last
 * pair of an odd count padded with a channel of zeros). Per 4-deep step g (column words
 * 2g, 2g + 1) the first channel's two weight words, then the second's. */
static void tf_cf_pack(int32_t out_c, const int8_t *weights, const int32_t *bias,
                       const tf_conv_quant *q, tf_cf_i32 *blk)
{
    for (int32_t o = 0; o < out_c; o += 2, blk += TF_CF_PAIR_WORDS) {
        for (int32_t j = 0; j < 2; j++) {
            const int32_t ch = o + j;
            tf_cf_i32 *ww = blk + 8 + 2 * j;
            if (ch == out_c) {
                blk[j] = 0;
                blk[2 + j] = 0;
                blk[4 + j] = 1;
                blk[6 + j] = 1;
                for (int32_t g = 0; g < TF_CF_COL_WORDS / 2; g++) {
                    ww[4 * g] = 0;
                    ww[4 * g + 1] = 0;
                }
                continue;
            }
            const int32_t right = -q->shift[ch];
            blk[j] = 2 * bias[ch];
            blk[2 + j] = q->multiplier[ch];
            blk[4 + j] = (int32_t)(1u << (right - 1)) + q->output_offset * (1 << right);
            blk[6 + j] = right;
            const int8_t *w = weights + (size_t)ch * TF_CF_TAPS;
            for (int32_t i = 0; i < 3; i++) { /* window row i: column words 4i .. 4i + 3 */
                tf_cf_pair_up(ww + 8 * i, tf_cf_read(w + 9 * i));
                tf_cf_pair_up(ww + 8 * i + 4, tf_cf_read(w + 9 * i + 4));
            }
            ww[24] = (int32_t)((uint32_t)(uint16_t)(2 * w[8]) | ((uint32_t)(2 * w[17]) << 16));
            ww[25] = (uint16_t)(2 * w[26]); /* the zero tap's weight: 0 */
        }
    }
}

/* The per-call check: the folded requantization is exact for every channel. */
static int tf_cf_applies(int32_t out_c, const int32_t *bias, const tf_conv_quant *q)
{
    const int64_t room = ((int64_t)1 << 30) - (int64_t)255 * 128 * TF_CF_TAPS;
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

/* tf_pw_fast.c's tf_pwf_out in one instruction fewer: acc2 = 2 * acc,
 * h = 2^(right-1) + output_offset * 2^right added by SMMLAR, and the negative-value nudge of
 * RoundingDivideByPOT taken from acc2's sign rather than the product's: with m >= 0 they
 * differ only where the product rounds to 0, and (h - 1) >> right == h >> right there.
 * Saturated to int8. */
static inline __attribute__((always_inline)) int32_t tf_cf_rq(int32_t acc2, int32_t m,
                                                              int32_t h, int32_t right)
{
    int32_t x;
    __asm__("smmlar %0, %1, %2, %3" : "=r"(x) : "r"(acc2), "r"(m), "r"(h));
    return __ssat((x + (acc2 >> 31)) >> right, 8);
}

static inline __attribute__((always_inline)) int8_t tf_cf_clamp(int32_t v, int32_t lo,
                                                                int32_t hi)
{
    return (int8_t)(v < lo ? lo : (v > hi ? hi : v));
}

/* One 4-deep step g: columns c0 (at col) and c1 (col + 56) against channels a and b of the
 * block at t (their int16 at 32 + 16 g and 40 + 16 g). */
#define TF_CF_STEP(c0, c1, wa, wb)                                                         \
    "ldrd %[c0e], %[c0o], [%[col], #" #c0 "]\n\t"                                          \
    "ldrd %[c1e], %[c1o], [%[col], #" #c1 "]\n\t"                                          \
    "ldrd %[w0], %[w1], [%[t], #" #wa "]\n\t"                                              \
    "smlad %[x00], %[c0e], %[w0], %[x00]\n\t"                                              \
    "smlad %[x00], %[c0o], %[w1], %[x00]\n\t"                                              \
    "smlad %[x10], %[c1e], %[w0], %[x10]\n\t"                                              \
    "smlad %[x10], %[c1o], %[w1], %[x10]\n\t"                                              \
    "ldrd %[w0], %[w1], [%[t], #" #wb "]\n\t"                                              \
    "smlad %[x01], %[c0e], %[w0], %[x01]\n\t"                                              \
    "smlad %[x01], %[c0o], %[w1], %[x01]\n\t"                                              \
    "smlad %[x11], %[c1e], %[w0], %[x11]\n\t"                                              \
    "smlad %[x11], %[c1o], %[w1], %[x11]\n\t"

/* Two pixels x two channels over all 28 taps: the block's doubled biases into x00 and x01,
 * the first step taking pixel 1's sums (x10, x11) from them before pixel 0's move on. */
#define TF_CF_MACS                                                                         \
    "ldrd %[x00], %[x01], [%[t]]\n\t"                                                      \
    "ldrd %[c0e], %[c0o], [%[col], #0]\n\t"                                                \
    "ldrd %[c1e], %[c1o], [%[col], #56]\n\t"                                               \
    "ldrd %[w0], %[w1], [%[t], #32]\n\t"                                                   \
    "smlad %[x10], %[c1e], %[w0], %[x00]\n\t"                                              \
    "smlad %[x00], %[c0e], %[w0], %[x00]\n\t"                                              \
    "smlad %[x00], %[c0o], %[w1], %[x00]\n\t"                                              \
    "smlad %[x10], %[c1o], %[w1], %[x10]\n\t"                                              \
    "ldrd %[w0], %[w1], [%[t], #40]\n\t"                                                   \
    "smlad %[x11], %[c1e], %[w0], %[x01]\n\t"                                              \
    "smlad %[x01], %[c0e], %[w0], %[x01]\n\t"                                              \
    "smlad %[x01], %[c0o], %[w1], %[x01]\n\t"                                              \
    "smlad %[x11], %[c1o], %[w1], %[x11]\n\t"                                              \
    TF_CF_STEP(8, 64, 48, 56)                                                              \
    TF_CF_STEP(16, 72, 64, 72)                                                             \
    TF_CF_STEP(24, 80, 80, 88)                                                             \
    TF_CF_STEP(32, 88, 96, 104)                                                            \
    TF_CF_STEP(40, 96, 112, 120)                                                           \
    TF_CF_STEP(48, 104, 128, 136)

#define TF_CF_MAC_OUTPUTS                                                                  \
    [x00] "=&r"(x00), [x01] "=&r"(x01), [x10] "=&r"(x10), [x11] "=&r"(x11),               \
        [c0e] "=&r"(c0e), [c0o] "=&r"(c0o), [c1e] "=&r"(c1e), [c1o] "=&r"(c1o),           \
        [w0] "=&r"(w0), [w1] "=&r"(w1)

/* The sums of the block at t: x[0], x[1] pixel 0's (channels a, b), x[2], x[3] pixel 1's. */
static inline __attribute__((always_inline)) void tf_cf_2x2(const tf_cf_u32 *col,
                                                             const tf_cf_i32 *t, int32_t x[4])
{
    int32_t x00, x01, x10, x11;
    uint32_t c0e, c0o, c1e, c1o, w0, w1;
    __asm__(TF_CF_MACS : TF_CF_MAC_OUTPUTS : [col] "r"(col), [t] "r"(t) : "memory");
    x[0] = x00;
    x[1] = x01;
    x[2] = x10;
    x[3] = x11;
}

/* The same, requantized as tf_cf_rq (h plus the sign nudge added first, then SMMLAR) and
 * saturated to int8 in the same block, the outputs stored at d0[0..1] and d1[0..1] and the
 * pointers moved on by 2: the clamp is all of int8. */
static inline __attribute__((always_inline)) void tf_cf_2x2_out(const tf_cf_u32 *col,
                                                                 const tf_cf_i32 *t,
                                                                 int8_t **d0, int8_t **d1)
{
    int32_t x00, x01, x10, x11;
    uint32_t c0e, c0o, c1e, c1o, w0, w1;
    int8_t *p0 = *d0, *p1 = *d1;
    /* volatile: its stores are what it is for (the last pair's pointers go unused) */
    __asm__ volatile(TF_CF_MACS
            "ldrd %[c0e], %[c0o], [%[t], #8]\n\t"  /* multipliers */
            "ldrd %[c1e], %[c1o], [%[t], #16]\n\t" /* 2^(right-1) + output_offset * 2^right */
            "add %[w0], %[c1e], %[x00], asr #31\n\t"
            "smmlar %[x00], %[x00], %[c0e], %[w0]\n\t"
            "add %[w0], %[c1e], %[x10], asr #31\n\t"
            "smmlar %[x10], %[x10], %[c0e], %[w0]\n\t"
            "add %[w0], %[c1o], %[x01], asr #31\n\t"
            "smmlar %[x01], %[x01], %[c0o], %[w0]\n\t"
            "add %[w0], %[c1o], %[x11], asr #31\n\t"
            "smmlar %[x11], %[x11], %[c0o], %[w0]\n\t"
            "ldrd %[c0e], %[c0o], [%[t], #24]\n\t" /* right shifts */
            "asr %[x00], %[x00], %[c0e]\n\t"
            "asr %[x10], %[x10], %[c0e]\n\t"
            "asr %[x01], %[x01], %[c0o]\n\t"
            "asr %[x11], %[x11], %[c0o]\n\t"
            "ssat %[x00], #8, %[x00]\n\t"
            "ssat %[x10], #8, %[x10]\n\t"
            "ssat %[x01], #8, %[x01]\n\t"
            "ssat %[x11], #8, %[x11]\n\t"
            "strb %[x01], [%[p0], #1]\n\t"
            "strb %[x00], [%[p0]], #2\n\t"
            "strb %[x11], [%[p1], #1]\n\t"
            "strb %[x10], [%[p1]], #2\n\t"
            : TF_CF_MAC_OUTPUTS, [p0] "+r"(p0), [p1] "+r"(p1)
            : [col] "r"(col), [t] "r"(t)
            : "memory");
    *d0 = p0;
    *d1 = p1;
}
#undef TF_CF_MAC_OUTPUTS
#undef TF_CF_MACS
#undef TF_CF_STEP

/* Every pair of channels of two pixels (outputs at d0 and d1; there is a pair or more);
 * `full`: the clamp is all of int8 (compiled in, so that its test leaves the loop). */
static inline __attribute__((always_inline)) void
tf_cf_channels(const tf_cf_u32 *col, const tf_cf_i32 *t, const tf_cf_i32 *t_end, int8_t *d0,
               int8_t *d1, int full, int32_t lo, int32_t hi)
{
    if (full) {
        do {
            tf_cf_2x2_out(col, t, &d0, &d1);
            t += TF_CF_PAIR_WORDS;
        } while (t != t_end);
        return;
    }
    do {
        int32_t x[4];
        tf_cf_2x2(col, t, x);
        const int32_t v00 = tf_cf_rq(x[0], t[2], t[4], t[6]);
        const int32_t v01 = tf_cf_rq(x[1], t[3], t[5], t[7]);
        const int32_t v10 = tf_cf_rq(x[2], t[2], t[4], t[6]);
        const int32_t v11 = tf_cf_rq(x[3], t[3], t[5], t[7]);
        d0[0] = tf_cf_clamp(v00, lo, hi);
        d0[1] = tf_cf_clamp(v01, lo, hi);
        d1[0] = tf_cf_clamp(v10, lo, hi);
        d1[1] = tf_cf_clamp(v11, lo, hi);
        t += TF_CF_PAIR_WORDS;
        d0 += 2;
        d1 += 2;
    } while (t != t_end);
}

/* The last channel of an odd count (channel a of the last block), both pixels. */
static void tf_cf_last(const tf_cf_u32 *col, const tf_cf_i32 *t, int8_t *d0, int8_t *d1,
                       int32_t lo, int32_t hi)
{
    int32_t a = t[0], b = t[0];
    for (int32_t g = 0; g < TF_CF_COL_WORDS / 2; g++) {
        const int16x2_t w0 = (int16x2_t)t[8 + 4 * g], w1 = (int16x2_t)t[9 + 4 * g];
        a = __smlad((int16x2_t)col[2 * g], w0, a);
        a = __smlad((int16x2_t)col[2 * g + 1], w1, a);
        b = __smlad((int16x2_t)col[TF_CF_COL_WORDS + 2 * g], w0, b);
        b = __smlad((int16x2_t)col[TF_CF_COL_WORDS + 2 * g + 1], w1, b);
    }
    *d0 = tf_cf_clamp(tf_cf_rq(a, t[2], t[4], t[6]), lo, hi);
    *d1 = tf_cf_clamp(tf_cf_rq(b, t[2], t[4], t[6]), lo, hi);
}

/* pixels >= 2, out_c >= 2: two pixels at a time, the last pair of an odd count overlapping
 * the one before. */
static __attribute__((noinline)) void tf_cf_run(const tf_cf_conv cv_, int32_t pixels,
                                                int32_t out_c, const tf_conv_quant *q,
                                                int8_t *output, tf_cf_u32 *buffer)
{
    const tf_cf_conv *cv = &cv_; /* a copy: the buffer's stores cannot alias it */
    tf_cf_u32 *col = buffer; /* two columns, then the channel pairs' blocks */
    const tf_cf_i32 *blocks = (const tf_cf_i32 *)(buffer + 2 * TF_CF_COL_WORDS);
    const tf_cf_i32 *pairs_end = blocks + (out_c >> 1) * TF_CF_PAIR_WORDS;
    const int32_t lo = q->act_min, hi = q->act_max;
    int8_t pad[9], edge[TF_CF_TAPS];
    for (int32_t i = 0; i < 9; i++) {
        pad[i] = (int8_t)-(int16_t)cv->off2;
    }
    tf_cf_pos at;
    tf_cf_seek(cv, 0, &at);
    for (int32_t p = 0; p < pixels; p += 2) {
        if (p + 1 == pixels) {
            p--;
            tf_cf_seek(cv, p, &at);
        }
        tf_cf_im2col(cv, &at, col, pad, edge);
        tf_cf_im2col(cv, &at, col + TF_CF_COL_WORDS, pad, edge);
        int8_t *d0 = output + (size_t)p * (size_t)out_c;
        if (lo == -128 && hi == 127) {
            tf_cf_channels(col, blocks, pairs_end, d0, d0 + out_c, 1, lo, hi);
        } else {
            tf_cf_channels(col, blocks, pairs_end, d0, d0 + out_c, 0, lo, hi);
        }
        if (out_c & 1) {
            tf_cf_last(col, pairs_end, d0 + out_c - 1, d0 + 2 * out_c - 1, lo, hi);
        }
    }
}
#endif

tf_status tf_conv2d_rgb_s8(const tf_dims *in, const int8_t *input, const tf_window *win,
                           const tf_dims *out, const int8_t *weights, const int32_t *bias,
                           const tf_conv_quant *q, int8_t *output, int16_t *buffer)
{
#if TF_USE_DSP
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
    if (tf_cf_shape(in, win) && ((uintptr_t)buffer & 3) == 0 && out->h * out->w >= 2 &&
        out->c >= 2 && tf_cf_applies(out->c, bias, q)) {
        tf_cf_u32 *buf = (tf_cf_u32 *)(void *)buffer;
        tf_cf_pack(out->c, weights, bias, q, (tf_cf_i32 *)(buf + 2 * TF_CF_COL_WORDS));
        const uint32_t off = (uint16_t)q->input_offset;
        const tf_cf_conv cv = {input, in->h, in->w, 3 * in->w, win->stride_h, win->stride_w,
                               win->pad_top, win->pad_left, out->w, off | (off << 16)};
        tf_cf_run(cv, out->h * out->w, out->c, q, output, buf);
        return TF_OK;
    }
#endif
    return tf_conv2d_s8(in, input, win, out, weights, bias, q, output, buffer);
}
