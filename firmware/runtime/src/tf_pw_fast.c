/* Specialized 1x1 conv (stride 1, no padding), fused 1x1 + add and dense conv, DSP path.
 *
 * The generic 1x1 (tf_conv2d_1x1_s8) pays, per output, a requantization that re-derives its
 * rounding constants and checks the accumulator's range; on thin layers (16 -> 96: 16 MACs
 * per output) that costs as much as the MACs. Here the layer is checked once per call:
 * when every accumulator provably stays under 2^30 in magnitude (|bias| + 255 * 128 * k)
 * and every shift is a right shift of 1..22 bits, each column is expanded to
 * 2 * (x + input_offset) (int16), the bias doubled, so SMLAD sums 2 * acc, which SMMULR takes
 * directly (= SaturatingRoundingDoublingHighMul); the rounding constant of
 * RoundingDivideByPOT and the output offset are one per-channel addend, and the clamp is one
 * SSAT where the activation range is all of int8. 1x1 layers need k % 4 == 0 and two
 * pixels or more (their two columns are interleaved and read with LDRD). Where the clamp is
 * SSAT the whole channel-pair loop of a column pair is one asm block (k = 8 and 16 with
 * their steps unrolled), and a fused add runs over rows of the conv's outputs afterwards.
 * Otherwise (or on the plain C path) the generic kernel runs. Same buffer, same results.
 */
#include "tf_internal.h"

#if TF_USE_DSP
static inline __attribute__((always_inline)) uint32_t tf_pwf_read(const void *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) int16x2_t tf_pwf_odd(uint32_t w)
{
    int16x2_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(w));
    return r;
}

/* SXTAB16 with the operand rotated by 8: the odd bytes, offset added, in one instruction. */
static inline __attribute__((always_inline)) int16x2_t tf_pwf_sxtab16_odd(int16x2_t a,
                                                                          uint32_t b)
{
    int16x2_t r;
    __asm__("sxtab16 %0, %1, %2, ror #8" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

/* 2 * (x + offset) as int16 for two pixels into one interleaved buffer (k % 4 == 0): per
 * group of four input channels, pixel 0's (x0, x2, x1, x3) then pixel 1's, the order in
 * which the asm loops pair them with SXTB16-expanded weights, so one pointer and two LDRD
 * read both columns. 15 instructions per group (two loads, four SXTAB16, four SADD16, two
 * STRD, the loop). */
static void tf_pwf_fill2(const int8_t *src0, const int8_t *src1, int16_t *dst, int32_t n,
                         int32_t offset)
{
    const int16x2_t off2 =
        (int16x2_t)(((uint32_t)(uint16_t)offset << 16) | (uint16_t)offset);
    uint32_t *d = (uint32_t *)(void *)dst; /* callers check the buffer is word-aligned */
    for (int32_t i = n >> 2; i > 0; i--) {
        const uint32_t in0 = tf_pwf_read(src0);
        const uint32_t in1 = tf_pwf_read(src1);
        src0 += 4;
        src1 += 4;
        int16x2_t e0 = __sxtab16(off2, (int8x4_t)in0), o0 = tf_pwf_sxtab16_odd(off2, in0);
        int16x2_t e1 = __sxtab16(off2, (int8x4_t)in1), o1 = tf_pwf_sxtab16_odd(off2, in1);
        d[0] = (uint32_t)__sadd16(e0, e0);
        d[1] = (uint32_t)__sadd16(o0, o0);
        d[2] = (uint32_t)__sadd16(e1, e1);
        d[3] = (uint32_t)__sadd16(o1, o1);
        d += 4;
    }
}

/* One 4-deep step over an interleaved column pair (tf_pwf_2x2_il1, tf_pwf_pairs_full):
 * two LDRD, two LDR, four SXTB16 and eight SMLAD (16 MACs). */
#define TF_PWF_IL_STEP                                                                     \
    "ldrd %[c0e], %[c0o], [%[p]], #8\n\t"                                                   \
    "ldrd %[c1e], %[c1o], [%[p]], #8\n\t"                                                   \
    "ldr %[w], [%[qa]], #4\n\t"                                                             \
    "sxtb16 %[t], %[w]\n\t"                                                                 \
    "sxtb16 %[w], %[w], ror #8\n\t"                                                         \
    "smlad %[x00], %[c0e], %[t], %[x00]\n\t"                                                \
    "smlad %[x10], %[c1e], %[t], %[x10]\n\t"                                                \
    "smlad %[x00], %[c0o], %[w], %[x00]\n\t"                                                \
    "smlad %[x10], %[c1o], %[w], %[x10]\n\t"                                                \
    "ldr %[w], [%[qb]], #4\n\t"                                                             \
    "sxtb16 %[t], %[w]\n\t"                                                                 \
    "sxtb16 %[w], %[w], ror #8\n\t"                                                         \
    "smlad %[x01], %[c0e], %[t], %[x01]\n\t"                                                \
    "smlad %[x11], %[c1e], %[t], %[x11]\n\t"                                                \
    "smlad %[x01], %[c0o], %[w], %[x01]\n\t"                                                \
    "smlad %[x11], %[c1o], %[w], %[x11]\n\t"

/* 2 pixels x 2 channels over an interleaved column pair, one step per branch (18
 * instructions per 16 MACs), for the rare odd channel and odd pixel; `steps` = k / 4 >= 1. */
static inline __attribute__((always_inline)) void
tf_pwf_2x2_il1(const int16_t *col, const int8_t *wa, const int8_t *wb, int32_t steps,
               int32_t *a00, int32_t *a01, int32_t *a10, int32_t *a11)
{
    int32_t x00 = *a00, x01 = *a01, x10 = *a10, x11 = *a11;
    uint32_t c0e, c0o, c1e, c1o, w, t;
    __asm__("1:\n\t"
            TF_PWF_IL_STEP
            "subs %[n], %[n], #1\n\t"
            "bne 1b"
            : [x00] "+r"(x00), [x01] "+r"(x01), [x10] "+r"(x10), [x11] "+r"(x11),
              [p] "+r"(col), [qa] "+r"(wa), [qb] "+r"(wb), [n] "+r"(steps),
              [c0e] "=&r"(c0e), [c0o] "=&r"(c0o), [c1e] "=&r"(c1e), [c1o] "=&r"(c1o),
              [w] "=&r"(w), [t] "=&r"(t)
            :
            : "cc", "memory");
    *a00 = x00;
    *a01 = x01;
    *a10 = x10;
    *a11 = x11;
}

typedef struct {
    int32_t lo;
    int32_t hi;
    int full; /* lo == -128 && hi == 127: the clamp is SSAT */
} tf_pwf_clamp;

/* acc2 = 2 * acc; addend = 2^(right-1) + output_offset * 2^right. */
static inline __attribute__((always_inline)) int8_t tf_pwf_out(int32_t acc2, int32_t m,
                                                               int32_t right, int32_t addend,
                                                               const tf_pwf_clamp *cl)
{
    int32_t x;
    __asm__("smmulr %0, %1, %2" : "=r"(x) : "r"(acc2), "r"(m));
    int32_t v = (x + addend + (x >> 31)) >> right;
    if (cl->full) {
        return (int8_t)__ssat(v, 8);
    }
    v = v < cl->lo ? cl->lo : v;
    return (int8_t)(v > cl->hi ? cl->hi : v);
}

/* The fused residual add (tf_add_one) with its three requantizations folded like the
 * conv's: every operand stays under 2^30 when left_shift <= 21, so SMMULR applies. */
typedef struct {
    int32_t off1, off2, ls1; /* ls1 = left_shift + 1: the operands enter doubled */
    int32_t m1, r1, h1, n1; /* n: -1 where right > 0 (the negative-value nudge), else 0 */
    int32_t m2, r2, h2, n2;
    int32_t mo, ro, ho; /* ho = 2^(ro-1) + output_offset * 2^ro */
    tf_pwf_clamp cl;
} tf_pwf_add;

static inline __attribute__((always_inline)) int32_t tf_pwf_rq2(int32_t v2, int32_t m,
                                                                int32_t right, int32_t h)
{
    int32_t x;
    __asm__("smmulr %0, %1, %2" : "=r"(x) : "r"(v2), "r"(m));
    return (x + h + (x >> 31)) >> right;
}

/* The same for right >= 0 (an input at the larger scale has shift 0). */
static inline __attribute__((always_inline)) int32_t tf_pwf_rq2n(int32_t v2, int32_t m,
                                                                 int32_t right, int32_t h,
                                                                 int32_t n)
{
    int32_t x;
    __asm__("smmulr %0, %1, %2" : "=r"(x) : "r"(v2), "r"(m));
    return (x + h + ((x >> 31) & n)) >> right;
}

static inline __attribute__((always_inline)) int8_t tf_pwf_add_one(int32_t y, int32_t res,
                                                                   const tf_pwf_add *a)
{
    const int32_t sum =
        tf_pwf_rq2n((y + a->off1) * (1 << a->ls1), a->m1, a->r1, a->h1, a->n1) +
        tf_pwf_rq2n((res + a->off2) * (1 << a->ls1), a->m2, a->r2, a->h2, a->n2);
    const int32_t v = tf_pwf_rq2(sum * 2, a->mo, a->ro, a->ho);
    if (a->cl.full) {
        return (int8_t)__ssat(v, 8);
    }
    return (int8_t)(v < a->cl.lo ? a->cl.lo : (v > a->cl.hi ? a->cl.hi : v));
}

static int tf_pwf_add_applies(const tf_add_quant *q, tf_pwf_add *a)
{
    const int32_t r1 = -q->input1_shift, r2 = -q->input2_shift, ro = -q->output_shift;
    if (q->left_shift > 21 || r1 < 0 || r1 > 30 || r2 < 0 || r2 > 30 || ro < 1 || ro > 22 ||
        q->input1_multiplier == INT32_MIN || q->input2_multiplier == INT32_MIN ||
        q->output_multiplier == INT32_MIN) {
        return 0;
    }
    *a = (tf_pwf_add){q->input1_offset, q->input2_offset, q->left_shift + 1,
                      q->input1_multiplier, r1, (int32_t)((1u << r1) >> 1), r1 > 0 ? -1 : 0,
                      q->input2_multiplier, r2, (int32_t)((1u << r2) >> 1), r2 > 0 ? -1 : 0,
                      q->output_multiplier, ro,
                      (int32_t)(1u << (ro - 1)) + q->output_offset * (1 << ro),
                      {q->act_min, q->act_max, q->act_min == -128 && q->act_max == 127}};
    return 1;
}

/* Two int16 pairs of a column in one LDRD (columns are 4-byte aligned where k is even). */
typedef uint64_t __attribute__((may_alias, aligned(4))) tf_pwf_u64;

/* Two pixels x two channels: 16 MACs per 4-deep step (two LDRD for the columns, two LDR
 * for the weights, four SXTB16, eight SMLAD), unrolled twice. */
static inline __attribute__((always_inline)) void
tf_pwf_2x2(const int16_t *ca, const int16_t *cb, const int8_t *wa, const int8_t *wb,
           int32_t n, int32_t *a00, int32_t *a01, int32_t *a10, int32_t *a11)
{
    int32_t x00 = *a00, x01 = *a01, x10 = *a10, x11 = *a11;
    int32_t i = 0;
    if ((n & 1) == 0) {
        const tf_pwf_u64 *pa = (const tf_pwf_u64 *)ca;
        const tf_pwf_u64 *pb = (const tf_pwf_u64 *)cb;
        const int8_t *qa = wa, *qb = wb;
#define TF_PWF_STEP()                                                                    \
    do {                                                                                 \
        const uint64_t c0 = *pa++, c1 = *pb++;                                           \
        const int16x2_t c0e = (int16x2_t)(uint32_t)c0, c0o = (int16x2_t)(c0 >> 32);      \
        const int16x2_t c1e = (int16x2_t)(uint32_t)c1, c1o = (int16x2_t)(c1 >> 32);      \
        uint32_t w = tf_pwf_read(qa);                                                    \
        qa += 4;                                                                         \
        int16x2_t we = __sxtb16((int8x4_t)w), wo = tf_pwf_odd(w);                       \
        x00 = __smlad(c0e, we, x00);                                                     \
        x10 = __smlad(c1e, we, x10);                                                     \
        x00 = __smlad(c0o, wo, x00);                                                     \
        x10 = __smlad(c1o, wo, x10);                                                     \
        w = tf_pwf_read(qb);                                                             \
        qb += 4;                                                                         \
        we = __sxtb16((int8x4_t)w);                                                      \
        wo = tf_pwf_odd(w);                                                              \
        x01 = __smlad(c0e, we, x01);                                                     \
        x11 = __smlad(c1e, we, x11);                                                     \
        x01 = __smlad(c0o, wo, x01);                                                     \
        x11 = __smlad(c1o, wo, x11);                                                     \
    } while (0)
        int32_t steps = n >> 2;
        for (; steps >= 2; steps -= 2) {
            TF_PWF_STEP();
            TF_PWF_STEP();
        }
        if (steps) {
            TF_PWF_STEP();
        }
#undef TF_PWF_STEP
        i = n & ~3;
    } else {
        for (; i + 4 <= n; i += 4) {
            const int16x2_t c0e = (int16x2_t)tf_pwf_read(ca + i);
            const int16x2_t c0o = (int16x2_t)tf_pwf_read(ca + i + 2);
            const int16x2_t c1e = (int16x2_t)tf_pwf_read(cb + i);
            const int16x2_t c1o = (int16x2_t)tf_pwf_read(cb + i + 2);
            uint32_t w = tf_pwf_read(wa + i);
            int16x2_t we = __sxtb16((int8x4_t)w), wo = tf_pwf_odd(w);
            x00 = __smlad(c0e, we, x00);
            x10 = __smlad(c1e, we, x10);
            x00 = __smlad(c0o, wo, x00);
            x10 = __smlad(c1o, wo, x10);
            w = tf_pwf_read(wb + i);
            we = __sxtb16((int8x4_t)w);
            wo = tf_pwf_odd(w);
            x01 = __smlad(c0e, we, x01);
            x11 = __smlad(c1e, we, x11);
            x01 = __smlad(c0o, wo, x01);
            x11 = __smlad(c1o, wo, x11);
        }
    }
    for (; i < n; i++) {
        x00 += ca[i] * wa[i];
        x01 += ca[i] * wb[i];
        x10 += cb[i] * wa[i];
        x11 += cb[i] * wb[i];
    }
    *a00 = x00;
    *a01 = x01;
    *a10 = x10;
    *a11 = x11;
}

/* The per-call check: the fast requantization is exact for every channel. */
static __attribute__((noinline)) int tf_pwf_applies(int32_t k, int32_t out_c, const int32_t *bias, const tf_conv_quant *q)
{
    /* |acc| <= |bias| + 255 * 128 * k must stay under 2^30. */
    const int64_t room = ((int64_t)1 << 30) - (int64_t)255 * 128 * k;
    if (room <= 0) {
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

/* A dense k x k conv's im2col source (the same body runs it with these columns). */
typedef struct {
    const tf_dims *in;
    const int8_t *input;
    const tf_window *win;
    int32_t out_w;
    int32_t offset;
} tf_pwf_conv;

/* Column of output pixel `pixel`: 2 * (x + offset) per (kh, kw, cin) tap, 0 for padding,
 * then in the DSP pairing order (tf_reorder_column). */
static void tf_pwf_im2col(const tf_pwf_conv *cv, int32_t pixel, int16_t *col)
{
    const tf_dims *in = cv->in;
    const tf_window *win = cv->win;
    const int32_t c_n = in->c;
    const int32_t oy = pixel / cv->out_w, ox = pixel % cv->out_w;
    const int32_t y0 = oy * win->stride_h - win->pad_top;
    const int32_t x0 = ox * win->stride_w - win->pad_left;
    const int32_t off2 = 2 * cv->offset;
    int16_t *dst = col;
    for (int32_t i = 0; i < win->kh; i++) {
        const int32_t y = y0 + i;
        for (int32_t j = 0; j < win->kw; j++) {
            const int32_t x = x0 + j;
            if (y < 0 || y >= in->h || x < 0 || x >= in->w) {
                memset(dst, 0, (size_t)c_n * sizeof(int16_t));
            } else {
                const int8_t *src = cv->input + ((size_t)y * (size_t)in->w + (size_t)x) *
                                                    (size_t)c_n;
                if (c_n == 3) { /* an RGB input layer: no loop */
                    dst[0] = (int16_t)(2 * src[0] + off2);
                    dst[1] = (int16_t)(2 * src[1] + off2);
                    dst[2] = (int16_t)(2 * src[2] + off2);
                } else {
                    for (int32_t c = 0; c < c_n; c++) {
                        dst[c] = (int16_t)(2 * src[c] + off2);
                    }
                }
            }
            dst += c_n;
        }
    }
    tf_reorder_column(col, win->kh * win->kw * c_n);
}

/* One output: the conv's int8 result, or that added into the residual it replaces. */
#define TF_PWF_PUT(dst, y)                                                                 \
    do {                                                                                   \
        const int8_t y_ = (y);                                                             \
        (dst) = ad != NULL ? tf_pwf_add_one(y_, (dst), ad) : y_;                           \
    } while (0)

/* A dense conv over its im2col columns, filled one by one (tf_pwf_2x2 reads them). */
static inline __attribute__((always_inline)) void
tf_pwf_body(int32_t pixels, int32_t k, int32_t out_c, const int8_t *weights,
            const int32_t *bias, const tf_conv_quant *q, int8_t *output, int16_t *buffer,
            const tf_pwf_conv *cv)
{
    const int32_t *mult = q->multiplier;
    const int32_t *shift = q->shift;
    const int32_t off_out = q->output_offset;
    const tf_pwf_clamp cl = {q->act_min, q->act_max, q->act_min == -128 && q->act_max == 127};
    const tf_pwf_add *const ad = NULL;
    int16_t *c0 = buffer;
    int16_t *c1 = buffer + k;
    int32_t p = 0;
    for (; p + 2 <= pixels; p += 2) {
        tf_pwf_im2col(cv, p, c0);
        tf_pwf_im2col(cv, p + 1, c1);
        int8_t *out0 = output + (size_t)p * (size_t)out_c;
        int8_t *out1 = out0 + out_c;
        const int8_t *w = weights;
        int32_t o = 0;
        for (; o + 2 <= out_c; o += 2) {
            int32_t a00 = 2 * bias[o], a01 = 2 * bias[o + 1];
            int32_t a10 = a00, a11 = a01;
            tf_pwf_2x2(c0, c1, w, w + k, k, &a00, &a01, &a10, &a11);
            w += 2 * k;
            const int32_t r0 = -shift[o], r1 = -shift[o + 1];
            const int32_t h0 = (int32_t)(1u << (r0 - 1)) + off_out * (1 << r0);
            const int32_t h1 = (int32_t)(1u << (r1 - 1)) + off_out * (1 << r1);
            const int32_t m0 = mult[o], m1 = mult[o + 1];
            TF_PWF_PUT(out0[o], tf_pwf_out(a00, m0, r0, h0, &cl));
            TF_PWF_PUT(out0[o + 1], tf_pwf_out(a01, m1, r1, h1, &cl));
            TF_PWF_PUT(out1[o], tf_pwf_out(a10, m0, r0, h0, &cl));
            TF_PWF_PUT(out1[o + 1], tf_pwf_out(a11, m1, r1, h1, &cl));
        }
        if (o < out_c) {
            int32_t a00 = 2 * bias[o], a10 = a00, u0 = 0, u1 = 0; /* u: a second channel */
            tf_pwf_2x2(c0, c1, w, w, k, &a00, &u0, &a10, &u1);
            const int32_t r0 = -shift[o];
            const int32_t h0 = (int32_t)(1u << (r0 - 1)) + off_out * (1 << r0);
            TF_PWF_PUT(out0[o], tf_pwf_out(a00, mult[o], r0, h0, &cl));
            TF_PWF_PUT(out1[o], tf_pwf_out(a10, mult[o], r0, h0, &cl));
        }
    }
    if (p < pixels) { /* the last odd pixel: its column twice */
        tf_pwf_im2col(cv, p, c0);
        int8_t *out0 = output + (size_t)p * (size_t)out_c;
        for (int32_t o = 0; o < out_c; o++) {
            int32_t a = 2 * bias[o], u = 0, v = 0, z = 0;
            const int8_t *wo = weights + (size_t)o * (size_t)k;
            tf_pwf_2x2(c0, c0, wo, wo, k, &a, &u, &v, &z);
            const int32_t r0 = -shift[o];
            const int32_t h0 = (int32_t)(1u << (r0 - 1)) + off_out * (1 << r0);
            TF_PWF_PUT(out0[o], tf_pwf_out(a, mult[o], r0, h0, &cl));
        }
    }
}

/* Requantizes accumulator `x` (2 * acc) with multiplier `m`, addend p, right shift `r`
 * into int8 (SSAT: the full-range clamp); t is scratch. */
#define TF_PWF_RQ_SSAT(x, m, r)                                                            \
    "smmulr %[" x "], %[" x "], %[" m "]\n\t"                                                \
    "add %[t], %[p], %[" x "], asr #31\n\t"                                                  \
    "add %[" x "], %[" x "], %[t]\n\t"                                                       \
    "asr %[" x "], %[" x "], %[" r "]\n\t"                                                   \
    "ssat %[" x "], #8, %[" x "]\n\t"

/* Channel `s`'s addend c2 << ~shift into p and right shift -shift into `r` (w holds c2). */
#define TF_PWF_RQ_CONST(s, r)                                                              \
    "mvn %[t], %[" s "]\n\t"                                                                 \
    "lsl %[p], %[w], %[t]\n\t"                                                               \
    "rsb %[" r "], %[" s "], #0\n\t"

/* The full-range, unfused 1x1 over one column pair, the whole channel-pair loop as one asm
 * block: gcc's loop kept bias, multiplier, shift and output pointers on the stack and
 * re-derived each block's constants around the 14-register MAC loop (~80 instructions per
 * block of four outputs); here its state sits in a 40-byte frame the block pushes (gcc's
 * frame size does not see it: firmware.toolchain.stack.ASM_FRAME_BYTES adds it), ~58
 * instructions per block besides the MACs. `pairs` = out_c / 2 >= 1, k % 4 == 0. */
static __attribute__((noinline)) void
tf_pwf_pairs_full(const int16_t *col, const int8_t *weights, int32_t k, int32_t pairs,
                  const int32_t *bias, const int32_t *mult, const int32_t *shift, int32_t c2,
                  int8_t *out0, int32_t out_c)
{
    /* Initial values: the frame's slots (see the STRDs); names: the registers' roles in
     * the loops. */
    uint32_t x00 = (uint32_t)bias, x01 = (uint32_t)mult, x10 = (uint32_t)shift;
    uint32_t x11 = (uint32_t)out0, p = (uint32_t)col, qb = (uint32_t)k;
    uint32_t n = (uint32_t)(k >> 2), c0e = (uint32_t)pairs, c0o = (uint32_t)c2;
    uint32_t c1e = (uint32_t)out_c, qa = (uint32_t)weights;
    uint32_t c1o, w, t;
    __asm__ volatile(
        "sub sp, sp, #40\n\t"
        "strd %[x00], %[x01], [sp]\n\t"      /* 0: bias, 4: multiplier */
        "strd %[x10], %[x11], [sp, #8]\n\t"  /* 8: shift, 12: out0 */
        "strd %[p], %[qb], [sp, #16]\n\t"    /* 16: column pair, 20: k */
        "strd %[n], %[c0e], [sp, #24]\n\t"   /* 24: k / 4, 28: pairs left */
        "strd %[c0o], %[c1e], [sp, #32]\n"   /* 32: c2, 36: out_c */
        "1:\n\t"
        "ldr %[t], [sp]\n\t"
        "ldrd %[x00], %[x01], [%[t]], #8\n\t"
        "str %[t], [sp]\n\t"
        "add %[x00], %[x00], %[x00]\n\t"
        "add %[x01], %[x01], %[x01]\n\t"
        "mov %[x10], %[x00]\n\t"
        "mov %[x11], %[x01]\n\t"
        "ldrd %[p], %[w], [sp, #16]\n\t"
        "add %[qb], %[qa], %[w]\n\t"
        "ldr %[n], [sp, #24]\n\t"
        "tst %[n], #1\n\t"
        "beq 2f\n\t"
        TF_PWF_IL_STEP
        "subs %[n], %[n], #1\n\t"
        "beq 3f\n"
        "2:\n\t"
        TF_PWF_IL_STEP
        TF_PWF_IL_STEP
        "subs %[n], %[n], #2\n\t"
        "bne 2b\n"
        "3:\n\t"
        "mov %[qa], %[qb]\n\t"
        "ldr %[t], [sp, #4]\n\t"
        "ldrd %[c0e], %[c0o], [%[t]], #8\n\t" /* m0, m1 */
        "str %[t], [sp, #4]\n\t"
        "ldr %[t], [sp, #8]\n\t"
        "ldrd %[c1e], %[c1o], [%[t]], #8\n\t" /* shift0, shift1 */
        "str %[t], [sp, #8]\n\t"
        "ldr %[w], [sp, #32]\n\t"
        TF_PWF_RQ_CONST("c1e", "n")
        TF_PWF_RQ_SSAT("x00", "c0e", "n")
        TF_PWF_RQ_SSAT("x10", "c0e", "n")
        TF_PWF_RQ_CONST("c1o", "n")
        TF_PWF_RQ_SSAT("x01", "c0o", "n")
        TF_PWF_RQ_SSAT("x11", "c0o", "n")
        "ldr %[t], [sp, #12]\n\t"
        "ldr %[w], [sp, #36]\n\t"
        "strb %[x01], [%[t], #1]\n\t"
        "strb %[x00], [%[t]], #2\n\t"
        "str %[t], [sp, #12]\n\t"
        "add %[t], %[t], %[w]\n\t"
        "strb %[x10], [%[t], #-2]\n\t"
        "strb %[x11], [%[t], #-1]\n\t"
        "ldr %[t], [sp, #28]\n\t"
        "subs %[t], %[t], #1\n\t"
        "str %[t], [sp, #28]\n\t"
        "bne 1b\n\t"
        "add sp, sp, #40"
        : [x00] "+r"(x00), [x01] "+r"(x01), [x10] "+r"(x10), [x11] "+r"(x11),
          [p] "+r"(p), [qa] "+r"(qa), [qb] "+r"(qb), [n] "+r"(n),
          [c0e] "+r"(c0e), [c0o] "+r"(c0o), [c1e] "+r"(c1e), [c1o] "=&r"(c1o),
          [w] "=&r"(w), [t] "=&r"(t)
        :
        : "cc", "memory");
}
/* One 4-deep step of a k-specialized block: columns at byte `c` of the pair, weights at
 * `a` (channel 0) and `b` (channel 1) from qa; no pointer moves. */
#define TF_PWF_K_STEP(c, a, b)                                                             \
    "ldrd %[c0e], %[c0o], [%[p], #" c "]\n\t"                                                \
    "ldrd %[c1e], %[c1o], [%[p], #" c "+8]\n\t"                                              \
    "ldr %[w], [%[qa], #" a "]\n\t"                                                          \
    "sxtb16 %[t], %[w]\n\t"                                                                  \
    "sxtb16 %[w], %[w], ror #8\n\t"                                                          \
    "smlad %[x00], %[c0e], %[t], %[x00]\n\t"                                                 \
    "smlad %[x10], %[c1e], %[t], %[x10]\n\t"                                                 \
    "smlad %[x00], %[c0o], %[w], %[x00]\n\t"                                                 \
    "smlad %[x10], %[c1o], %[w], %[x10]\n\t"                                                 \
    "ldr %[w], [%[qa], #" b "]\n\t"                                                          \
    "sxtb16 %[t], %[w]\n\t"                                                                  \
    "sxtb16 %[w], %[w], ror #8\n\t"                                                          \
    "smlad %[x01], %[c0e], %[t], %[x01]\n\t"                                                 \
    "smlad %[x11], %[c1e], %[t], %[x11]\n\t"                                                 \
    "smlad %[x01], %[c0o], %[w], %[x01]\n\t"                                                 \
    "smlad %[x11], %[c1o], %[w], %[x11]\n\t"

/* tf_pwf_pairs_full for a k known here (8 or 16: the thin layers, where the per-block
 * overhead outweighs the MACs): the steps unrolled with immediate offsets, so no step
 * counter and no second weight pointer; bias and output pointers stay in registers and
 * the multiplier and shift are read at fixed distances from the bias (a 24-byte frame,
 * in ASM_FRAME_BYTES too).
 * ~48 instructions per block of four outputs besides the MACs. */
#define TF_PWF_PAIRS_K(name, two_k, steps)                                                 \
    static __attribute__((noinline)) void name(                                            \
        const int16_t *col, const int8_t *weights, int32_t pairs, const int32_t *bias,     \
        const int32_t *mult, const int32_t *shift, int32_t c2, int8_t *out0, int32_t out_c) \
    {                                                                                      \
        uint32_t x00 = (uint32_t)mult - (uint32_t)bias;                                    \
        uint32_t x01 = (uint32_t)shift - (uint32_t)bias, x10 = (uint32_t)c2;               \
        uint32_t x11 = (uint32_t)out_c, c0e = (uint32_t)(bias + 2 * pairs);                \
        uint32_t p = (uint32_t)col, qa = (uint32_t)weights, bp = (uint32_t)bias;           \
        uint32_t op = (uint32_t)out0;                                                      \
        uint32_t c0o, c1e, c1o, w, t;                                                      \
        __asm__ volatile(                                                                  \
            "sub sp, sp, #24\n\t"                                                          \
            "strd %[x00], %[x01], [sp]\n\t"   /* 0: mult - bias, 4: shift - bias */      \
            "strd %[x10], %[x11], [sp, #8]\n\t" /* 8: c2, 12: out_c */                  \
            "strd %[c0e], %[p], [sp, #16]\n"  /* 16: bias end, 20: column pair */        \
            "1:\n\t"                                                                       \
            "ldr %[p], [sp, #20]\n\t"                                                      \
            "ldrd %[x00], %[x01], [%[bp]], #8\n\t"                                         \
            "add %[x00], %[x00], %[x00]\n\t"                                               \
            "add %[x01], %[x01], %[x01]\n\t"                                               \
            "mov %[x10], %[x00]\n\t"                                                       \
            "mov %[x11], %[x01]\n\t"                                                       \
            steps                                                                          \
            "add %[qa], %[qa], #" two_k "\n\t"                                             \
            "ldr %[t], [sp]\n\t"                                                           \
            "add %[t], %[t], %[bp]\n\t"                                                    \
            "ldrd %[c0e], %[c0o], [%[t], #-8]\n\t" /* m0, m1 */                          \
            "ldr %[t], [sp, #4]\n\t"                                                       \
            "add %[t], %[t], %[bp]\n\t"                                                    \
            "ldrd %[c1e], %[c1o], [%[t], #-8]\n\t" /* shift0, shift1 */                  \
            "ldr %[w], [sp, #8]\n\t"                                                       \
            TF_PWF_RQ_CONST("c1e", "c1e")                                                  \
            TF_PWF_RQ_SSAT("x00", "c0e", "c1e")                                            \
            TF_PWF_RQ_SSAT("x10", "c0e", "c1e")                                            \
            TF_PWF_RQ_CONST("c1o", "c1o")                                                  \
            TF_PWF_RQ_SSAT("x01", "c0o", "c1o")                                            \
            TF_PWF_RQ_SSAT("x11", "c0o", "c1o")                                            \
            "ldr %[t], [sp, #12]\n\t"                                                      \
            "strb %[x01], [%[op], #1]\n\t"                                                 \
            "strb %[x00], [%[op]], #2\n\t"                                                 \
            "add %[t], %[t], %[op]\n\t"                                                    \
            "strb %[x10], [%[t], #-2]\n\t"                                                 \
            "strb %[x11], [%[t], #-1]\n\t"                                                 \
            "ldr %[t], [sp, #16]\n\t"                                                      \
            "cmp %[bp], %[t]\n\t"                                                          \
            "bne 1b\n\t"                                                                   \
            "add sp, sp, #24"                                                              \
            : [x00] "+r"(x00), [x01] "+r"(x01), [x10] "+r"(x10), [x11] "+r"(x11),         \
              [p] "+r"(p), [qa] "+r"(qa), [bp] "+r"(bp), [op] "+r"(op),                   \
              [c0e] "+r"(c0e), [c0o] "=&r"(c0o), [c1e] "=&r"(c1e), [c1o] "=&r"(c1o),      \
              [w] "=&r"(w), [t] "=&r"(t)                                                   \
            :                                                                              \
            : "cc", "memory");                                                             \
    }

TF_PWF_PAIRS_K(tf_pwf_pairs_k8, "16",
               TF_PWF_K_STEP("0", "0", "8") TF_PWF_K_STEP("16", "4", "12"))
TF_PWF_PAIRS_K(tf_pwf_pairs_k16, "32",
               TF_PWF_K_STEP("0", "0", "16") TF_PWF_K_STEP("16", "4", "20")
               TF_PWF_K_STEP("32", "8", "24") TF_PWF_K_STEP("48", "12", "28"))
#undef TF_PWF_PAIRS_K
#undef TF_PWF_K_STEP

/* The full-range conv over one column pair, `pairs` >= 1 channel pairs (k % 4 == 0). */
static inline __attribute__((always_inline)) void
tf_pwf_pairs(const int16_t *col, const int8_t *weights, int32_t k, int32_t pairs,
             const int32_t *bias, const int32_t *mult, const int32_t *shift, int32_t c2,
             int8_t *out0, int32_t out_c)
{
    if (k == 8) {
        tf_pwf_pairs_k8(col, weights, pairs, bias, mult, shift, c2, out0, out_c);
    } else if (k == 16) {
        tf_pwf_pairs_k16(col, weights, pairs, bias, mult, shift, c2, out0, out_c);
    } else {
        tf_pwf_pairs_full(col, weights, k, pairs, bias, mult, shift, c2, out0, out_c);
    }
}
#undef TF_PWF_RQ_SSAT
#undef TF_PWF_RQ_CONST
#undef TF_PWF_IL_STEP

/* Clamps n int8 values (already SSAT'd to int8) to [lo, hi], four per word (SSUB8 sets
 * the GE flags per byte, SEL picks), so a non-full activation range costs ~1.5
 * instructions per output after the asm loop. */
static __attribute__((noinline)) void tf_pwf_clamp_row(int8_t *v, int32_t n, int32_t lo,
                                                       int32_t hi)
{
    const uint32_t lo4 = (uint32_t)(uint8_t)lo * 0x01010101u;
    const uint32_t hi4 = (uint32_t)(uint8_t)hi * 0x01010101u;
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) {
        uint32_t x = tf_pwf_read(v + i), t;
        __asm__("ssub8 %[t], %[x], %[lo]\n\t"
                "sel %[x], %[x], %[lo]\n\t"
                "ssub8 %[t], %[hi], %[x]\n\t"
                "sel %[x], %[x], %[hi]"
                : [x] "+r"(x), [t] "=&r"(t)
                : [lo] "r"(lo4), [hi] "r"(hi4)
                : "cc");
        memcpy(v + i, &x, sizeof x);
    }
    for (; i < n; i++) {
        v[i] = (int8_t)(v[i] < lo ? lo : (v[i] > hi ? hi : v[i]));
    }
}

/* Channel pairs per conv pass of the fused 1x1 + add (two 64-byte stack rows). */
#define TF_PWF_CHUNK 32

/* res[i] = add(y[i], res[i]) over one row of the fused layer. */
static __attribute__((noinline)) void tf_pwf_add_row(const int8_t *y, int8_t *res, int32_t n,
                                                     const tf_pwf_add *ad)
{
    tf_pwf_add a = *ad;
    if (a.cl.full) { /* the clamp's branch out of the loop */
        a.cl.full = 1;
        for (int32_t i = 0; i < n; i++) {
            res[i] = tf_pwf_add_one(y[i], res[i], &a);
        }
        return;
    }
    a.cl.full = 0;
    for (int32_t i = 0; i < n; i++) {
        res[i] = tf_pwf_add_one(y[i], res[i], &a);
    }
}

/* One output of a 1x1 layer: c2 = 2 * output_offset + 1, so the rounding constant plus the
 * offset, 2^(right-1) + output_offset * 2^right, is c2 << (right - 1) = c2 << ~shift. */
static inline __attribute__((always_inline)) int8_t tf_pwf_q(int32_t acc2, int32_t m,
                                                             int32_t shift, int32_t c2,
                                                             const tf_pwf_clamp *cl)
{
    return tf_pwf_out(acc2, m, -shift, (int32_t)((uint32_t)c2 << ~shift), cl);
}

/* A 1x1 layer over one interleaved column pair (pixels p and p + 1): two channels at a
 * time, the next pair's weights where the asm loop left them. */
static inline __attribute__((always_inline)) void
tf_pwf_pixel_pair(const int16_t *col, int32_t k, int32_t out_c, const int8_t *weights,
                  const int32_t *bias, const int32_t *mult, const int32_t *shift, int32_t c2,
                  const tf_pwf_clamp *clp, int8_t *out0, const tf_pwf_add *ad)
{
    const tf_pwf_clamp cl = *clp;
    int8_t *out1 = out0 + out_c;
    const int8_t *w = weights;
    const int32_t steps = k >> 2;
    int32_t o = 0;
    if (ad == NULL && out_c >= 2) {
        tf_pwf_pairs(col, w, k, out_c >> 1, bias, mult, shift, c2, out0, out_c);
        o = out_c & ~1;
        w += (size_t)o * (size_t)k;
        if (!cl.full) { /* both pixels' rows: out1 follows out0 */
            tf_pwf_clamp_row(out0, out_c + o, cl.lo, cl.hi);
        }
    } else if (out_c >= 2) {
        /* Fused add: the conv's outputs of up to TF_PWF_CHUNK channel pairs into a stack
         * row per pixel, then the add over each row (its constants stay in registers). */
        int8_t y[2][2 * TF_PWF_CHUNK];
        for (; o + 2 <= out_c;) {
            const int32_t n = out_c - o >= 2 * TF_PWF_CHUNK ? 2 * TF_PWF_CHUNK
                                                             : (out_c - o) & ~1;
            tf_pwf_pairs(col, w, k, n >> 1, bias + o, mult + o, shift + o, c2, y[0],
                         2 * TF_PWF_CHUNK);
            w += (size_t)n * (size_t)k;
            if (!cl.full) {
                tf_pwf_clamp_row(y[0], n, cl.lo, cl.hi);
                tf_pwf_clamp_row(y[1], n, cl.lo, cl.hi);
            }
            tf_pwf_add_row(y[0], out0 + o, n, ad);
            tf_pwf_add_row(y[1], out1 + o, n, ad);
            o += n;
        }
    }
    if (o < out_c) {
        int32_t a00 = 2 * bias[o], a10 = a00, u0 = 0, u1 = 0; /* u: a second channel */
        tf_pwf_2x2_il1(col, w, w, steps, &a00, &u0, &a10, &u1);
        TF_PWF_PUT(out0[o], tf_pwf_q(a00, mult[o], shift[o], c2, &cl));
        TF_PWF_PUT(out1[o], tf_pwf_q(a10, mult[o], shift[o], c2, &cl));
    }
}

/* A 1x1 layer (k % 4 == 0, two pixels or more, a word-aligned buffer: callers check). */
static inline __attribute__((always_inline)) void
tf_pwf_body_1x1(int32_t pixels, int32_t k, int32_t out_c, const int8_t *input,
                const int8_t *weights, const int32_t *bias, const tf_conv_quant *q,
                int8_t *output, int16_t *buffer, const tf_pwf_add *ad)
{
    const int32_t *mult = q->multiplier;
    const int32_t *shift = q->shift;
    const int32_t off_in = q->input_offset, c2 = 2 * q->output_offset + 1;
    const tf_pwf_clamp cl = {q->act_min, q->act_max, q->act_min == -128 && q->act_max == 127};
    int32_t p = 0;
    for (; p + 2 <= pixels; p += 2) {
        const int8_t *x0 = input + (size_t)p * (size_t)k;
        tf_pwf_fill2(x0, x0 + k, buffer, k, off_in);
        tf_pwf_pixel_pair(buffer, k, out_c, weights, bias, mult, shift, c2, &cl,
                          output + (size_t)p * (size_t)out_c, ad);
    }
    if (p < pixels) { /* the last odd pixel: the interleaved layout with its column twice */
        const int8_t *x0 = input + (size_t)p * (size_t)k;
        tf_pwf_fill2(x0, x0, buffer, k, off_in);
        int8_t *out0 = output + (size_t)p * (size_t)out_c;
        for (int32_t o = 0; o < out_c; o++) {
            int32_t a = 2 * bias[o], u = 0, v = 0, z = 0;
            const int8_t *wo = weights + (size_t)o * (size_t)k;
            tf_pwf_2x2_il1(buffer, wo, wo, k >> 2, &a, &u, &v, &z);
            TF_PWF_PUT(out0[o], tf_pwf_q(a, mult[o], shift[o], c2, &cl));
        }
    }
}

static __attribute__((noinline)) void tf_pwf_run(int32_t pixels, int32_t k, int32_t out_c,
                                                 const int8_t *input, const int8_t *weights,
                                                 const int32_t *bias, const tf_conv_quant *q,
                                                 int8_t *output, int16_t *buffer)
{
    tf_pwf_body_1x1(pixels, k, out_c, input, weights, bias, q, output, buffer, NULL);
}

/* The dense conv: its columns come from tf_pwf_im2col (so the interleaved path and its
 * loop are not compiled in). */
static __attribute__((noinline)) void tf_pwf_run_conv(const tf_pwf_conv *cv, int32_t pixels,
                                                      int32_t k, int32_t out_c,
                                                      const int8_t *weights,
                                                      const int32_t *bias,
                                                      const tf_conv_quant *q, int8_t *output,
                                                      int16_t *buffer)
{
    tf_pwf_body(pixels, k, out_c, weights, bias, q, output, buffer, cv);
}

/* Runs the fused layer and returns 1 where the folded requantizations apply (its frame is
 * gone before the caller falls back to the generic kernel). */
static __attribute__((noinline)) int tf_pwf_run_add(int32_t pixels, int32_t k, int32_t out_c,
                                                    const int8_t *input,
                                                    const int8_t *weights,
                                                    const int32_t *bias,
                                                    const tf_conv_quant *q,
                                                    const tf_add_quant *add, int8_t *residual,
                                                    int16_t *buffer)
{
    tf_pwf_add ad;
    if ((k & 3) != 0 || ((uintptr_t)buffer & 3) != 0 || pixels < 2 ||
        !tf_pwf_applies(k, out_c, bias, q) ||
        !tf_pwf_add_applies(add, &ad)) {
        return 0;
    }
    tf_pwf_body_1x1(pixels, k, out_c, input, weights, bias, q, residual, buffer, &ad);
    return 1;
}
#endif

tf_status tf_conv2d_fast_s8(const tf_dims *in, const int8_t *input, const tf_window *win,
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
    const int32_t k = win->kh * win->kw * in->c;
    if (tf_pwf_applies(k, out->c, bias, q)) {
        const tf_pwf_conv cv = {in, input, win, out->w, q->input_offset};
        tf_pwf_run_conv(&cv, out->h * out->w, k, out->c, weights, bias, q, output, buffer);
        return TF_OK;
    }
#endif
    return tf_conv2d_s8(in, input, win, out, weights, bias, q, output, buffer);
}

tf_status tf_conv2d_1x1_add_fast_s8(const tf_dims *in, const int8_t *input, int32_t out_c,
                                    const int8_t *weights, const int32_t *bias,
                                    const tf_conv_quant *q, const tf_add_quant *add,
                                    int8_t *residual, int16_t *buffer)
{
#if TF_USE_DSP
    tf_status st;
    if (input == NULL || weights == NULL || bias == NULL || residual == NULL ||
        buffer == NULL || add == NULL) {
        return TF_ERR_NULL;
    }
    if (out_c <= 0 || out_c > 65535) {
        return TF_ERR_ARG;
    }
    if ((st = tf_check_dims(in)) != TF_OK || (st = tf_check_conv_quant(q, out_c)) != TF_OK ||
        (st = tf_check_add_quant(add)) != TF_OK) {
        return st;
    }
    if (tf_pwf_run_add(in->h * in->w, in->c, out_c, input, weights, bias, q, add, residual,
                       buffer)) {
        return TF_OK;
    }
#endif
    return tf_conv2d_1x1_add_s8(in, input, out_c, weights, bias, q, add, residual, buffer);
}

tf_status tf_conv2d_1x1_fast_s8(const tf_dims *in, const int8_t *input, int32_t out_c,
                                const int8_t *weights, const int32_t *bias,
                                const tf_conv_quant *q, int8_t *output, int16_t *buffer)
{
#if TF_USE_DSP
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
    /* One pixel: the buffer holds one column, the interleaved layout needs two. */
    if ((in->c & 3) == 0 && ((uintptr_t)buffer & 3) == 0 && in->h * in->w >= 2 &&
        tf_pwf_applies(in->c, out_c, bias, q)) {
        tf_pwf_run(in->h * in->w, in->c, out_c, input, weights, bias, q, output, buffer);
        return TF_OK;
    }
#endif
    return tf_conv2d_1x1_s8(in, input, out_c, weights, bias, q, output, buffer);
}
