/* Specialized depthwise conv: square 3x3 / 5x5 / 7x7 windows, stride 1 or 2.
 *
 * TinyEngine's in-place scheme: one channel at a time is copied into a zero-point-padded
 * plane, then every output of that channel is computed from the plane and written over the
 * input (the channel is saved whole before any of its outputs is written). Kernel size and
 * stride are compile-time constants of each instantiation, so the tap loops unroll. On the
 * DSP path two horizontally adjacent outputs share every loaded word: four input bytes give
 * the pairs (x0, x2) and (x1, x3) by SXTB16, which SMLAD multiplies with weight pairs
 * (w0, w2), (w1, w3) precomputed per channel (taps past the kernel have weight 0). The
 * requantization is folded into the output loop with the channel's multiplier, shift and
 * rounding constant in registers: SMMULR of 2 * acc (= SaturatingRoundingDoublingHighMul
 * while |acc| < 2^30, checked per channel from its bias and the largest sum of |weights|),
 * then the rounding shift. A channel outside that bound (or with a left shift) takes the
 * exact generic path. A channel's set-up (weight pairs, bias, constants) is unrolled per
 * window. Output planes of at most 16 pixels (MCUNet's 2x2 / 3x3 layers, where the padded
 * plane and per-channel set-up cost more than the MACs) skip the plane: tf_dwf_small.
 * The results are bit-identical to tf_depthwise_conv2d_s8 and firmware.int8.reference.
 */
#include "tf_internal.h"

/* Bytes read past the last padded row by the last (discarded) outputs of a group of four:
 * at most 4 * groups + 11 - k (stride 2), 14 for these kernels. */
#define TF_DWF_SLACK 16
#define TF_DWF_MAX_K 7

static size_t tf_dwf_plane_bytes(const tf_dims *in, const tf_window *win)
{
    return (size_t)(in->h + win->pad_top + win->pad_bottom) *
           (size_t)(in->w + win->pad_left + win->pad_right);
}

int32_t tf_depthwise_conv2d_fast_supported(const tf_window *win)
{
    if (win == NULL) {
        return 0;
    }
    const int32_t k = win->kh;
    const int32_t s = win->stride_h;
    return win->kw == k && (k == 3 || k == 5 || k == 7) && win->stride_w == s &&
           (s == 1 || s == 2);
}

size_t tf_depthwise_conv2d_fast_get_buffer_size(const tf_dims *in, const tf_window *win)
{
    if (in == NULL || win == NULL) {
        return 0;
    }
    return tf_dwf_plane_bytes(in, win) + TF_DWF_SLACK;
}

/* One channel's constants. */
typedef struct {
    int32_t acc0;  /* bias + input_offset * sum(w): the plane holds raw int8 values */
    int32_t m;     /* Q31 multiplier */
    int32_t shift; /* as in tf_conv_quant */
    int32_t right; /* -shift, >= 1 on the fast path */
    int32_t half;  /* 2^(right - 1) + output_offset * 2^right: the offset folded in */
} tf_dwf_ch;

typedef struct {
    int32_t out_off;
    int32_t lo;
    int32_t hi;
} tf_dwf_clamp;

/* tf_rq_right + output_offset for |acc| < 2^30 and 1 <= right <= 22: adding the offset
 * times 2^right before the arithmetic shift adds it after, and nothing overflows. */
static inline __attribute__((always_inline)) int32_t tf_dwf_scale2(int32_t acc2,
                                                                   const tf_dwf_ch *ch)
{
    int32_t x; /* acc2 = 2 * acc */
#if TF_USE_DSP
    __asm__("smmulr %0, %1, %2" : "=r"(x) : "r"(acc2), "r"(ch->m));
#else
    x = (int32_t)(((int64_t)acc2 * ch->m + ((int64_t)1 << 31)) >> 32);
#endif
    return (x + ch->half + (x >> 31)) >> ch->right;
}

static inline __attribute__((always_inline)) int32_t tf_dwf_scale(int32_t acc,
                                                                  const tf_dwf_ch *ch)
{
    return tf_dwf_scale2(acc * 2, ch);
}

static inline __attribute__((always_inline)) int8_t tf_dwf_out(int32_t acc, const tf_dwf_ch *ch,
                                                               const tf_dwf_clamp *cl, int fast)
{
    int32_t v = fast ? tf_dwf_scale(acc, ch) : tf_rq(acc, ch->m, ch->shift) + cl->out_off;
    v = v < cl->lo ? cl->lo : v;
    v = v > cl->hi ? cl->hi : v;
    return (int8_t)v;
}

#if TF_USE_DSP
/* tf_dwf_out's exact path, out of line: rare, and tf_rq is long. */
static __attribute__((noinline)) int8_t tf_dwf_out_exact(int32_t acc, const tf_dwf_ch *ch,
                                                         const tf_dwf_clamp *cl)
{
    return tf_dwf_out(acc, ch, cl, 0);
}

static inline __attribute__((always_inline)) int8_t tf_dwf_out_any(int32_t acc,
                                                                   const tf_dwf_ch *ch,
                                                                   const tf_dwf_clamp *cl,
                                                                   int fast)
{
    return fast ? tf_dwf_out(acc, ch, cl, 1) : tf_dwf_out_exact(acc, ch, cl);
}

static inline __attribute__((always_inline)) uint32_t tf_dwf_read(const int8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v); /* an unaligned LDR on M4/M7/M33 */
    return v;
}

static inline __attribute__((always_inline)) int16x2_t tf_dwf_odd(uint32_t b)
{
    int16x2_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(b));
    return r;
}

#define TF_DWF_GROUPS(k) (((k) + 3) / 4)

/* Four adjacent outputs per step; wq holds, per kernel row r and group g of four taps,
 * (w[4g], w[4g+2]) and (w[4g+1], w[4g+3]) as int16 pairs. Output i's window starts at
 * x[i * s]: stride 1 reads the words at x0, x2, x4 of each group (five SXTB16 give (x0, x2),
 * (x1, x3), (x2, x4), (x3, x5), (x4, x6)), stride 2 the words at x0, x2, x4, x6. */
static inline __attribute__((always_inline)) void
tf_dwf_quad(const int8_t *p, int32_t wp, const int32_t k, const int32_t s,
            const uint32_t *wq, int32_t acc0, int32_t *acc)
{
    const int32_t groups = TF_DWF_GROUPS(k);
    /* Opaque to the optimizer: the weights are then loaded (LDRD) where they are used
     * instead of being hoisted out of the output loop into registers it does not have. */
    __asm__("" : "+r"(wq));
    int32_t a0 = acc0, a1 = acc0, a2 = acc0, a3 = acc0;
#pragma GCC unroll 8
    for (int32_t r = 0; r < k; r++) {
        const int8_t *x = p + (size_t)r * (size_t)wp;
#pragma GCC unroll 2
        for (int32_t g = 0; g < groups; g++) {
            uint64_t wpair; /* one LDRD */
            memcpy(&wpair, wq + (r * groups + g) * 2, sizeof wpair);
            const int16x2_t w02 = (int16x2_t)(uint32_t)wpair;
            const int16x2_t w13 = (int16x2_t)(uint32_t)(wpair >> 32);
            const uint32_t v0 = tf_dwf_read(x + 4 * g);
            const uint32_t v2 = tf_dwf_read(x + 4 * g + 2);
            const uint32_t v4 = tf_dwf_read(x + 4 * g + 4);
            const int16x2_t e0 = __sxtb16((int8x4_t)v0), o0 = tf_dwf_odd(v0);
            const int16x2_t e2 = __sxtb16((int8x4_t)v2), o2 = tf_dwf_odd(v2);
            const int16x2_t e4 = __sxtb16((int8x4_t)v4);
            a0 = __smlad(e0, w02, a0);
            a0 = __smlad(o0, w13, a0);
            if (s == 1) {
                a1 = __smlad(o0, w02, a1);
                a1 = __smlad(e2, w13, a1);
                a2 = __smlad(e2, w02, a2);
                a2 = __smlad(o2, w13, a2);
                a3 = __smlad(o2, w02, a3);
                a3 = __smlad(e4, w13, a3);
            } else {
                const uint32_t v6 = tf_dwf_read(x + 4 * g + 6);
                a1 = __smlad(e2, w02, a1);
                a1 = __smlad(o2, w13, a1);
                a2 = __smlad(e4, w02, a2);
                a2 = __smlad(tf_dwf_odd(v4), w13, a2);
                a3 = __smlad(__sxtb16((int8x4_t)v6), w02, a3);
                a3 = __smlad(tf_dwf_odd(v6), w13, a3);
            }
        }
    }
    acc[0] = a0;
    acc[1] = a1;
    acc[2] = a2;
    acc[3] = a3;
}

/* n adjacent outputs of a row from p, in groups of four: n not a multiple of 4 computes up
 * to 3 outputs more (reading past the row, into the next row or the slack) and drops them;
 * acc has room for them. */
static inline __attribute__((always_inline)) void
tf_dwf_macs(const int8_t *p, int32_t wp, int32_t n, const int32_t k, const int32_t s,
            const uint32_t *wq, int32_t acc0, int32_t *acc)
{
    for (int32_t j = 0; j < n; j += 4) {
        tf_dwf_quad(p, wp, k, s, wq, acc0, acc + j);
        p += 4 * s;
    }
}

/* Outputs per chunk, a multiple of 4: fewer for larger windows, whose MACs per output make
 * the chunk's overhead small, so that their deeper MAC loops (more spills) keep the stack
 * of the deepest chain (tf_depthwise_conv2d_7x7s2_s8) about where it was. */
#define TF_DWF_CHUNK(k) ((k) == 3 ? 28 : (k) == 5 ? 20 : 12)

static inline __attribute__((always_inline)) void
tf_dwf_dsp(const int8_t *plane, int32_t wp, int32_t oh, int32_t ow, const int32_t k,
           const int32_t s, const uint32_t *wq, const tf_dwf_ch *ch, const tf_dwf_clamp *cl,
           int8_t *dst, size_t step, int32_t *acc)
{
    const tf_dwf_ch c = *ch;
    const int full = cl->lo == -128 && cl->hi == 127; /* the clamp is the int8 saturation */
    for (int32_t oy = 0; oy < oh; oy++) {
        const int8_t *p = plane + (size_t)(oy * s) * (size_t)wp;
        for (int32_t ox = 0; ox < ow; ox += TF_DWF_CHUNK(k)) {
            const int32_t n = ow - ox < TF_DWF_CHUNK(k) ? ow - ox : TF_DWF_CHUNK(k);
            tf_dwf_macs(p, wp, n, k, s, wq, c.acc0 * 2, acc);
            p += n * s;
            if (full) {
                for (int32_t j = 0; j < n; j++) {
                    *dst = (int8_t)__ssat(tf_dwf_scale2(acc[j], &c), 8);
                    dst += step;
                }
            } else {
                for (int32_t j = 0; j < n; j++) {
                    int32_t v = tf_dwf_scale2(acc[j], &c);
                    v = v < cl->lo ? cl->lo : v;
                    *dst = (int8_t)(v > cl->hi ? cl->hi : v);
                    dst += step;
                }
            }
        }
    }
}

/* One channel's outputs for each window, out of line: inlined into the channel loop, next
 * to the inlined set-up, the MAC loop spills more. */
#define TF_DWF_DSP(K, S)                                                                   \
    static __attribute__((noinline)) void tf_dwf_dsp_##K##s##S(                            \
        const int8_t *plane, int32_t wp, int32_t oh, int32_t ow, const uint32_t *wq,       \
        const tf_dwf_ch *ch, const tf_dwf_clamp *cl, int8_t *dst, size_t step)             \
    {                                                                                      \
        int32_t acc[TF_DWF_CHUNK(K)];                                                      \
        tf_dwf_dsp(plane, wp, oh, ow, K, S, wq, ch, cl, dst, step, acc);                   \
    }
TF_DWF_DSP(3, 1)
TF_DWF_DSP(3, 2)
TF_DWF_DSP(5, 1)
TF_DWF_DSP(5, 2)
TF_DWF_DSP(7, 1)
TF_DWF_DSP(7, 2)
#endif

#if TF_USE_DSP
/* Channel c of the HWC input into the interior of the padded plane (its margins keep the
 * zero point). Shared by every kernel size. */
static __attribute__((noinline)) void tf_dwf_load(const tf_dims *in, const int8_t *input,
                                                  int32_t c, int32_t wp, int8_t *row)
{
    const size_t cs = (size_t)in->c;
    const int32_t ih = in->h, iw = in->w;
    const int8_t *src = input + c;
    for (int32_t y = 0; y < ih; y++) {
        int32_t x = 0;
        for (; x + 4 <= iw; x += 4) { /* four bytes, one (unaligned) word store */
            const uint32_t b0 = (uint8_t)src[0], b1 = (uint8_t)src[cs];
            const uint32_t b2 = (uint8_t)src[2 * cs], b3 = (uint8_t)src[3 * cs];
            const uint32_t word = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24);
            memcpy(row + x, &word, sizeof word);
            src += 4 * cs;
        }
        for (; x < iw; x++) {
            row[x] = *src;
            src += cs;
        }
        row += wp;
    }
}

/* Channel c's constants and, on the fast path, its doubled weight pairs; returns fast.
 * Inlined with k a constant, so the tap loops unroll into straight loads and packs. */
static inline __attribute__((always_inline)) int
tf_dwf_prepare(const int8_t *weights, const int32_t *bias, const tf_conv_quant *q, int32_t c,
               int32_t channels, const int32_t k, uint32_t *wq, tf_dwf_ch *ch)
{
    const size_t cs = (size_t)channels;
    const int8_t *w = weights + c; /* tap t at w[t * cs] */
    int32_t wsum = 0;
#pragma GCC unroll 49
    for (int32_t i = 0; i < k * k; i++) {
        wsum += w[(size_t)i * cs];
    }
    /* Opaque: the taps are loaded again below, not kept live (and spilled) across the check. */
    __asm__("" : "+r"(w));
    const int32_t m = q->multiplier[c], shift = q->shift[c];
    const int64_t acc0 = (int64_t)bias[c] + (int64_t)q->input_offset * wsum;
    *ch = (tf_dwf_ch){(int32_t)acc0, m, shift, -shift, 0};
    /* |acc| <= |acc0| + 128 * sum |w| <= |acc0| + 128 * 128 * k * k: under 2^30, the fast
     * requantization applies (a looser bound than sum |w|, one channel in billions more on
     * the exact path, and no second pass over the taps). */
    const int64_t room = ((int64_t)1 << 30) - 128 * 128 * k * k;
    if (acc0 >= room || acc0 <= -room || shift > -1 || shift < -22 || m == INT32_MIN) {
        return 0;
    }
    ch->half = (int32_t)(1u << (ch->right - 1)) + q->output_offset * (1 << ch->right);
    const int32_t groups = TF_DWF_GROUPS(k);
#pragma GCC unroll 7
    for (int32_t r = 0; r < k; r++) {
#pragma GCC unroll 2
        for (int32_t g = 0; g < groups; g++) {
            int32_t t4[4];
#pragma GCC unroll 4
            for (int32_t j = 0; j < 4; j++) {
                const int32_t col = 4 * g + j;
                /* read again rather than kept: a k * k array would cost stack */
                t4[j] = col < k ? 2 * w[(size_t)(r * k + col) * cs] : 0; /* sums 2 * acc */
            }
            wq[(r * groups + g) * 2] =
                (uint32_t)(uint16_t)t4[0] | ((uint32_t)(uint16_t)t4[2] << 16);
            wq[(r * groups + g) * 2 + 1] =
                (uint32_t)(uint16_t)t4[1] | ((uint32_t)(uint16_t)t4[3] << 16);
        }
    }
    return 1;
}

/* Each window's set-up, out of line and shared by both strides. */
#define TF_DWF_PREPARE(K)                                                                  \
    static __attribute__((noinline)) int tf_dwf_prepare_##K(                               \
        const int8_t *weights, const int32_t *bias, const tf_conv_quant *q, int32_t c,     \
        int32_t channels, uint32_t *wq, tf_dwf_ch *ch)                                     \
    {                                                                                      \
        return tf_dwf_prepare(weights, bias, q, c, channels, K, wq, ch);                   \
    }
TF_DWF_PREPARE(3)
TF_DWF_PREPARE(5)
TF_DWF_PREPARE(7)

/* A channel outside the fast requantization: plain C, exact tf_rq. Shared by every size;
 * w: the channel's taps at stride `step` (HWC weights). */
static __attribute__((noinline)) void tf_dwf_exact(const int8_t *plane, int32_t wp, int32_t oh,
                                                   int32_t ow, int32_t k, int32_t s,
                                                   const int8_t *w, const tf_dwf_ch *ch,
                                                   const tf_dwf_clamp *cl, int8_t *dst,
                                                   size_t step)
{
    for (int32_t oy = 0; oy < oh; oy++) {
        const int8_t *row = plane + (size_t)(oy * s) * (size_t)wp;
        for (int32_t ox = 0; ox < ow; ox++) {
            const int8_t *p = row + ox * s;
            int32_t acc = ch->acc0;
            for (int32_t i = 0; i < k; i++) {
                for (int32_t j = 0; j < k; j++) {
                    acc += p[(size_t)i * (size_t)wp + (size_t)j] * w[(size_t)(i * k + j) * step];
                }
            }
            *dst = tf_dwf_out_exact(acc, ch, cl);
            dst += step;
        }
    }
}

/* Output planes of at most this many pixels take tf_dwf_small. */
#define TF_DWF_SMALL 16

/* One channel's requantization constants; returns whether the fast path applies to every
 * accumulator bias + sum over at most k * k taps of (x + input_offset) * w, |x + offset|
 * <= 255: |acc| <= |bias| + 255 * 128 * k * k < 2^30. */
static int tf_dwf_small_ch(const int32_t *bias, const tf_conv_quant *q, int32_t c, int32_t k,
                           tf_dwf_ch *ch)
{
    const int32_t b = bias[c], shift = q->shift[c], room = (1 << 30) - 255 * 128 * k * k;
    *ch = (tf_dwf_ch){b, q->multiplier[c], shift, -shift, 0};
    if (b >= room || b <= -room || shift > -1 || shift < -22 || ch->m == INT32_MIN) {
        return 0;
    }
    ch->half = (int32_t)(1u << (ch->right - 1)) + q->output_offset * (1 << ch->right);
    return 1;
}

/* A small output plane (MCUNet's 2x2 and 3x3 layers, where most taps fall in the padding and
 * a padded plane, its set-up and its rows cost more than the MACs): no plane, each output
 * sums only the taps inside the input, straight from HWC, four channels per word: SXTB16
 * gives the channel pairs (c0, c2), (c1, c3) of the input (plus the offset, SADD16) and of
 * the weights, SMLABB / SMLATT one MAC each. A group of channels keeps its outputs until all
 * are computed, so in place needs no scratch. The last in->c % 4 channels go one at a time
 * (a word would read past the tensors). Shared by every window (k, s at run time). */
static __attribute__((noinline)) tf_status
tf_dwf_small(const tf_dims *in, const int8_t *input, const tf_window *win, const tf_dims *out,
             const int8_t *weights, const int32_t *bias, const tf_conv_quant *q, int8_t *output)
{
    const int32_t ih = in->h, iw = in->w, oh = out->h, ow = out->w, k = win->kh;
    const int32_t s = win->stride_h, off = q->input_offset, channels = in->c;
    const size_t cs = (size_t)channels;
    const tf_dwf_clamp cl = {q->output_offset, q->act_min, q->act_max};
    const int16x2_t off2 = (int16x2_t)(((uint32_t)(uint16_t)off) * 0x10001u);
    for (int32_t c = 0; c < channels;) {
        const int32_t g = channels - c >= 4 ? 4 : 1; /* channels in this pass */
        tf_dwf_ch ch[4];
        int fast[4];
        for (int32_t j = 0; j < g; j++) {
            fast[j] = tf_dwf_small_ch(bias, q, c + j, k, &ch[j]);
        }
        int8_t res[TF_DWF_SMALL * 4];
        int8_t *r = res;
        for (int32_t oy = 0; oy < oh; oy++) {
            const int32_t y0 = oy * s - win->pad_top;
            const int32_t i0 = y0 < 0 ? -y0 : 0, i1 = ih - y0 < k ? ih - y0 : k;
            for (int32_t ox = 0; ox < ow; ox++) {
                const int32_t x0 = ox * s - win->pad_left;
                const int32_t j0 = x0 < 0 ? -x0 : 0, j1 = iw - x0 < k ? iw - x0 : k;
                const size_t span = (size_t)(j1 - j0) * cs;
                int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
                for (int32_t i = i0; i < i1; i++) {
                    const int8_t *px = input + ((size_t)(y0 + i) * (size_t)iw +
                                                (size_t)(x0 + j0)) * cs + (size_t)c;
                    const int8_t *pw = weights + (size_t)(i * k + j0) * cs + (size_t)c;
                    if (g == 4) {
                        for (size_t o = 0; o < span; o += cs) {
                            const uint32_t xv = tf_dwf_read(px + o), wv = tf_dwf_read(pw + o);
                            const int16x2_t xe = __sadd16(__sxtb16((int8x4_t)xv), off2);
                            const int16x2_t xo = __sadd16(tf_dwf_odd(xv), off2);
                            const int16x2_t we = __sxtb16((int8x4_t)wv), wo = tf_dwf_odd(wv);
                            a0 = __smlabb(xe, we, a0);
                            a2 = __smlatt(xe, we, a2);
                            a1 = __smlabb(xo, wo, a1);
                            a3 = __smlatt(xo, wo, a3);
                        }
                    } else {
                        for (size_t o = 0; o < span; o += cs) {
                            a0 += (px[o] + off) * pw[o];
                        }
                    }
                }
                const int32_t sums[4] = {a0, a1, a2, a3};
                for (int32_t j = 0; j < g; j++) {
                    r[j] = tf_dwf_out_any(sums[j] + ch[j].acc0, &ch[j], &cl, fast[j]);
                }
                r += g;
            }
        }
        for (int32_t p = 0; p < oh * ow; p++) {
            memcpy(output + (size_t)p * cs + (size_t)c, res + p * g, (size_t)g);
        }
        c += g;
    }
    return TF_OK;
}

/* All channels with kernel k and stride s (constants after inlining). */
static inline __attribute__((always_inline)) void
tf_dwf_run(const tf_dims *in, const int8_t *input, const tf_window *win, const tf_dims *out,
           const int8_t *weights, const int32_t *bias, const tf_conv_quant *q, int8_t *output,
           int8_t *plane, const int32_t k, const int32_t s)
{
    const int32_t wp = in->w + win->pad_left + win->pad_right;
    const tf_dwf_clamp cl = {q->output_offset, q->act_min, q->act_max};
    const int32_t oh = out->h, ow = out->w;
    uint32_t wq[TF_DWF_MAX_K * TF_DWF_GROUPS(TF_DWF_MAX_K) * 2] __attribute__((aligned(8)));
    memset(plane, (int8_t)(-q->input_offset), tf_dwf_plane_bytes(in, win) + TF_DWF_SLACK);
    int8_t *interior = plane + (size_t)win->pad_top * (size_t)wp + (size_t)win->pad_left;
    for (int32_t c = 0; c < in->c; c++) {
        tf_dwf_load(in, input, c, wp, interior);
        tf_dwf_ch ch;
        /* k is a constant here: the choice folds to one call. */
        const int fast = k == 3   ? tf_dwf_prepare_3(weights, bias, q, c, in->c, wq, &ch)
                         : k == 5 ? tf_dwf_prepare_5(weights, bias, q, c, in->c, wq, &ch)
                                  : tf_dwf_prepare_7(weights, bias, q, c, in->c, wq, &ch);
        if (fast) {
            /* k and s are constants here: the chain folds to one call. */
            void (*dsp)(const int8_t *, int32_t, int32_t, int32_t, const uint32_t *,
                        const tf_dwf_ch *, const tf_dwf_clamp *, int8_t *, size_t) =
                k == 3 ? (s == 1 ? tf_dwf_dsp_3s1 : tf_dwf_dsp_3s2)
                : k == 5 ? (s == 1 ? tf_dwf_dsp_5s1 : tf_dwf_dsp_5s2)
                         : (s == 1 ? tf_dwf_dsp_7s1 : tf_dwf_dsp_7s2);
            dsp(plane, wp, oh, ow, wq, &ch, &cl, output + c, (size_t)in->c);
        } else {
            tf_dwf_exact(plane, wp, oh, ow, k, s, weights + c, &ch, &cl, output + c,
                         (size_t)in->c);
        }
    }
}

/* Each window's plane path, out of line: an entry point that takes tf_dwf_small does not
 * hold its frame (the stack bound is the deepest chain). */
#define TF_DWF_RUN(K, S)                                                                   \
    static __attribute__((noinline)) tf_status tf_dwf_run_##K##s##S(                       \
        const tf_dims *in, const int8_t *input, const tf_window *win, const tf_dims *out,  \
        const int8_t *weights, const int32_t *bias, const tf_conv_quant *q, int8_t *output, \
        int8_t *plane)                                                                     \
    {                                                                                      \
        tf_dwf_run(in, input, win, out, weights, bias, q, output, plane, K, S);            \
        return TF_OK;                                                                      \
    }
TF_DWF_RUN(3, 1)
TF_DWF_RUN(3, 2)
TF_DWF_RUN(5, 1)
TF_DWF_RUN(5, 2)
TF_DWF_RUN(7, 1)
TF_DWF_RUN(7, 2)
#endif

/* The checks of every entry point. */
static __attribute__((noinline)) tf_status
tf_dwf_check(const tf_dims *in, const int8_t *input, const tf_window *win, const tf_dims *out,
             const int8_t *weights, const int32_t *bias, const tf_conv_quant *q,
             const int8_t *output, const int8_t *buffer, int32_t k, int32_t s)
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
    if (win->kh != k || win->kw != k || win->stride_h != s || win->stride_w != s) {
        return TF_ERR_ARG;
    }
    if (out->c != in->c ||
        out->h != tf_window_out(in->h, win->kh, win->stride_h, win->pad_top, win->pad_bottom) ||
        out->w != tf_window_out(in->w, win->kw, win->stride_w, win->pad_left, win->pad_right)) {
        return TF_ERR_SHAPE;
    }
    if (output == input && out->h * out->w > in->h * in->w) {
        return TF_ERR_ALIAS;
    }
    return TF_OK;
}

/* One exported entry point per size (the code generator calls the one a layer needs, so a
 * model links only those). The plain C path runs the generic kernel: the buffer is at least
 * the padded plane, which is at least what tf_depthwise_conv2d_s8 asks for. */
#if TF_USE_DSP
#define TF_DWF_BODY(K, S)                                                                  \
    if (out->h * out->w <= TF_DWF_SMALL) {                                                 \
        return tf_dwf_small(in, input, win, out, weights, bias, q, output);                \
    }                                                                                      \
    return tf_dwf_run_##K##s##S(in, input, win, out, weights, bias, q, output, buffer);
#else
#define TF_DWF_BODY(K, S)                                                                  \
    return tf_depthwise_conv2d_s8(in, input, win, out, weights, bias, q, output, buffer);
#endif
#define TF_DWF_ENTRY(K, S)                                                                 \
    tf_status tf_depthwise_conv2d_##K##x##K##s##S##_s8(                                    \
        const tf_dims *in, const int8_t *input, const tf_window *win, const tf_dims *out,  \
        const int8_t *weights, const int32_t *bias, const tf_conv_quant *q, int8_t *output, \
        int8_t *buffer)                                                                    \
    {                                                                                      \
        const tf_status st =                                                               \
            tf_dwf_check(in, input, win, out, weights, bias, q, output, buffer, K, S);     \
        if (st != TF_OK) {                                                                 \
            return st;                                                                     \
        }                                                                                  \
        TF_DWF_BODY(K, S)                                                                  \
    }

TF_DWF_ENTRY(3, 1)
TF_DWF_ENTRY(3, 2)
TF_DWF_ENTRY(5, 1)
TF_DWF_ENTRY(5, 2)
TF_DWF_ENTRY(7, 1)
TF_DWF_ENTRY(7, 2)

tf_status tf_depthwise_conv2d_fast_s8(const tf_dims *in, const int8_t *input,
                                      const tf_window *win, const tf_dims *out,
                                      const int8_t *weights, const int32_t *bias,
                                      const tf_conv_quant *q, int8_t *output, int8_t *buffer)
{
    if (win == NULL) {
        return TF_ERR_NULL;
    }
    if (!tf_depthwise_conv2d_fast_supported(win)) {
        return TF_ERR_ARG;
    }
    switch (win->kh * 10 + win->stride_h) {
    case 31: return tf_depthwise_conv2d_3x3s1_s8(in, input, win, out, weights, bias, q, output, buffer);
    case 32: return tf_depthwise_conv2d_3x3s2_s8(in, input, win, out, weights, bias, q, output, buffer);
    case 51: return tf_depthwise_conv2d_5x5s1_s8(in, input, win, out, weights, bias, q, output, buffer);
    case 52: return tf_depthwise_conv2d_5x5s2_s8(in, input, win, out, weights, bias, q, output, buffer);
    case 71: return tf_depthwise_conv2d_7x7s1_s8(in, input, win, out, weights, bias, q, output, buffer);
    default: return tf_depthwise_conv2d_7x7s2_s8(in, input, win, out, weights, bias, q, output, buffer);
    }
}
