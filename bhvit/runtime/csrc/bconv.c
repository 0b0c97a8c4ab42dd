/*
 * bconv.c -- grouped / dilated / strided 2-D convolution of +-1 maps with zero padding,
 * as an implicit binary GEMM (bgemm.c) over bit-dense im2col rows.
 */
#include "core.h"

/* OR the first nbits bits of src into dst (row of dst_words words) at bit
 * offset bitpos.  Bits of src beyond nbits are ignored. */
static inline void bits_append(uint64_t *dst, int64_t dst_words, int64_t bitpos,
                               const uint64_t *src, int64_t nbits)
{
    const int64_t wi = bitpos >> 6;
    const int sh = (int)(bitpos & 63);
    const int64_t nw = cdiv(nbits, 64);
    const int tail = (int)(nbits & 63);
    for (int64_t j = 0; j < nw; ++j) {
        uint64_t v = src[j];
        if (j == nw - 1 && tail)
            v &= (~(uint64_t)0) >> (64 - tail);
        dst[wi + j] |= v << sh;
        if (sh && wi + j + 1 < dst_words)
            dst[wi + j + 1] |= v >> (64 - sh);
    }
}

/*
 * x:   B x H x Wd x G x Wg words (channels of group g packed in Wg words)
 * w:   Cout x KH x KW x Wg words  (output channel o reads group o / (Cout / G))
 * out: B x Ho x Wo x Cout int32
 *
 * Implicit GEMM per chunk of output positions and group: the chunk's taps are
 * gathered (im2col) into bit-dense rows -- tap t's cpg bits at bit offset
 * t * cpg, so KH*KW*cpg bits in ceil(KH*KW*cpg / 64) words (cpg = 16 needs 3
 * words for a 3x3 kernel, not 9) -- with zeros for taps in the padding, and
 * multiplied with the group's weights packed the same way, giving
 * KH*KW*cpg - 2 * popcount over all taps.  A tap in the padding must add 0
 * rather than cpg - 2 * popcount(w_tap), so rows with such taps are corrected
 * afterwards by - cpg + 2 * popcount(w_tap) per padded tap.  Padding bits of
 * x and w beyond cpg are ignored.
 */
EXPORT void bhv_conv_free(bhv_conv *c)
{
    if (c != NULL) {
        free(c->Bp);
        free(c->pwt);
        c->Bp = NULL;
        c->pwt = NULL;
        c->variant = NULL;
    }
}

/* Pack the weights w (Cout x KH x KW x Wg words, cpg bits per tap) once: bit-dense rows per
 * output channel in panels per group, and 2 * popcount of every tap for the padding
 * correction.  0 = ok, -1 = out of memory, -2 = bad shape. */
EXPORT int bhv_conv_prepare(bhv_conv *c, const uint64_t *w, int64_t G, int64_t Wg, int64_t Cout, int64_t KH,
                            int64_t KW, int64_t cpg)
{
    const variant_t *v = bhvi_active;
    memset(c, 0, sizeof(*c));
    if (G <= 0 || Cout <= 0 || Cout % G != 0 || KH <= 0 || KW <= 0 || cpg <= 0 || Wg < cdiv(cpg, 64))
        return -2;
    const int64_t cpo = Cout / G;
    const int64_t KK = KH * KW;
    const int64_t Kw = cdiv(KK * cpg, 64); /* words per bit-dense im2col row */
    const int64_t nr = v->nr;
    const int64_t npg = cdiv(cpo, nr); /* panels per group */
    uint64_t *Bp = (uint64_t *)malloc((size_t)max64(1, G * npg * Kw * nr) * sizeof(uint64_t));
    uint64_t *wd = (uint64_t *)calloc((size_t)max64(1, Cout * Kw), sizeof(uint64_t));
    int32_t *pwt = (int32_t *)malloc((size_t)max64(1, Cout * KK) * sizeof(int32_t));
    if (!Bp || !wd || !pwt) {
        free(Bp);
        free(wd);
        free(pwt);
        return -1;
    }
    for (int64_t o = 0; o < Cout; ++o)
        for (int64_t t = 0; t < KK; ++t) {
            const uint64_t *wt = w + (o * KK + t) * Wg;
            bits_append(wd + o * Kw, Kw, t * cpg, wt, cpg);
            int32_t s = 0;
            for (int64_t j = 0; j < Wg; ++j) {
                uint64_t wv = wt[j];
                if (j == Wg - 1 && (cpg & 63))
                    wv &= (~(uint64_t)0) >> (64 - (cpg & 63));
                s += __builtin_popcountll(wv);
            }
            pwt[t * Cout + o] = 2 * s; /* 2 * popcount of each tap's weights, tap-major */
        }
    for (int64_t g = 0; g < G; ++g)
        bhvi_pack_panels(wd + g * cpo * Kw, Kw, cpo, Kw, (int)nr, Bp + g * npg * Kw * nr);
    free(wd);
    c->variant = v;
    c->Bp = Bp;
    c->pwt = pwt;
    c->G = G;
    c->Wg = Wg;
    c->Cout = Cout;
    c->KH = KH;
    c->KW = KW;
    c->cpg = cpg;
    return 0;
}

EXPORT int bhv_conv_current(const bhv_conv *c) { return c->Bp != NULL && c->variant == (const void *)bhvi_active; }

/* What the gather of one chunk of output positions needs (bhv_xnor_conv2d_pp). */
typedef struct {
    const uint64_t *x, *zero; /* zero: G * Wg zero words, the source of a tap in the padding */
    int64_t H, Wd, G, Wg, KH, KW, cpg, stride, pad, dil, Ho, Wo, Kw, gstride;
    uint64_t lastmask;
    const int64_t *off; /* KH * KW: a tap's words from its position's top-left tap */
} gather_args;

#if BHV_X86
/* gather_w1 for 4 groups of whole-word taps (G == 4, 64 % cpg == 0, Kw <= 8) with AVX2: a tap's
 * four group words are one vector, shifted into place and ORed into its word's vector, and each
 * block of 4 x 4 words is transposed to the four groups' rows, stored 4 words at a time (words
 * past Kw are 0 and land where the next row, written later, or the block's slack begins). */
GLUE_FAST_ATTR static void gather4_avx2(const gather_args *a, const uint64_t *base, const uint64_t *const *tapsrc,
                                        uint64_t *row)
{
    const int64_t KK = a->KH * a->KW, cpg = a->cpg, per = 64 / cpg, gs = a->gstride;
    const __m256i mask = _mm256_set1_epi64x((long long)a->lastmask);
    for (int64_t w0 = 0; w0 < a->Kw; w0 += 4) {
        __m256i w[4];
        for (int64_t i = 0; i < 4; ++i) {
            __m256i acc = _mm256_setzero_si256();
            for (int64_t tap = (w0 + i) * per, sh = 0; tap < min64(KK, (w0 + i + 1) * per); ++tap, sh += cpg) {
                const uint64_t *src = base != NULL ? base + a->off[tap] : tapsrc[tap];
                const __m256i v = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)src), mask);
                acc = _mm256_or_si256(acc, _mm256_sll_epi64(v, _mm_cvtsi64_si128(sh)));
            }
            w[i] = acc;
        }
        const __m256i t0 = _mm256_unpacklo_epi64(w[0], w[1]), t1 = _mm256_unpackhi_epi64(w[0], w[1]);
        const __m256i t2 = _mm256_unpacklo_epi64(w[2], w[3]), t3 = _mm256_unpackhi_epi64(w[2], w[3]);
        _mm256_storeu_si256((__m256i *)(row + w0), _mm256_permute2x128_si256(t0, t2, 0x20));
        _mm256_storeu_si256((__m256i *)(row + gs + w0), _mm256_permute2x128_si256(t1, t3, 0x20));
        _mm256_storeu_si256((__m256i *)(row + 2 * gs + w0), _mm256_permute2x128_si256(t0, t2, 0x31));
        _mm256_storeu_si256((__m256i *)(row + 3 * gs + w0), _mm256_permute2x128_si256(t1, t3, 0x31));
    }
}
#else
static void gather4_avx2(const gather_args *a, const uint64_t *base, const uint64_t *const *tapsrc, uint64_t *row)
{
    (void)a, (void)base, (void)tapsrc, (void)row; /* never called: glue_fast() is 0 */
}
#endif

/* One position's rows when Wg == 1, for all groups at once, so the loop over the groups is
 * straight-line vector code (G a constant in the common case).  When cpg divides 64 each
 * word collects whole taps in registers (per group: taps t0.. of word w, shifted into place);
 * otherwise word w of group g is built in acc[w * G + g] (a tap may straddle two words).
 * Then the words go to the group's row (buf + g * gstride). */
INLINE void gather_w1(const gather_args *a, const uint64_t *const *tapsrc, const int64_t G, uint64_t *acc,
                      uint64_t *row)
{
    const int64_t KK = a->KH * a->KW, cpg = a->cpg, Kw = a->Kw, gs = a->gstride;
    if (64 % cpg == 0) {
        const int64_t per = 64 / cpg;
        for (int64_t w = 0; w < Kw; ++w) {
            uint64_t word[64];
            for (int64_t g = 0; g < G; ++g)
                word[g] = 0;
            for (int64_t tap = w * per, sh = 0; tap < min64(KK, (w + 1) * per); ++tap, sh += cpg) {
                const uint64_t *restrict src = tapsrc[tap];
                for (int64_t g = 0; g < G; ++g)
                    word[g] |= (src[g] & a->lastmask) << sh;
            }
            for (int64_t g = 0; g < G; ++g)
                row[g * gs + w] = word[g];
        }
        return;
    }
    for (int64_t i = 0; i < Kw * G; ++i)
        acc[i] = 0;
    for (int64_t tap = 0; tap < KK; ++tap) {
        const uint64_t *restrict src = tapsrc[tap];
        const int64_t bit = tap * cpg, sh = bit & 63;
        uint64_t *restrict lo = acc + (bit >> 6) * G;
        for (int64_t g = 0; g < G; ++g)
            lo[g] |= (src[g] & a->lastmask) << sh;
        if (sh + cpg > 64) /* the tap straddles two words */
            for (int64_t g = 0; g < G; ++g)
                lo[G + g] |= (src[g] & a->lastmask) >> (64 - sh);
    }
    for (int64_t g = 0; g < G; ++g)
        for (int64_t w = 0; w < Kw; ++w)
            row[g * gs + w] = acc[w * G + g];
}

/* im2col of output positions [q0, q1): tap t of group g at bit offset t * cpg of the group's
 * row (buf + g * gstride + (q - q0) * Kw), the taps in the padding marked in padmask and
 * counted in npadded.  A position whose taps all lie inside the map takes its sources from
 * the precomputed offsets; one with taps in the padding reads the zero row for them. */
INLINE void gather_impl(const gather_args *a, int64_t q0, int64_t q1, uint64_t *buf, unsigned char *padmask,
                        int64_t *npadded, const uint64_t **tapsrc)
{
    const int64_t G = a->G, Wg = a->Wg, KH = a->KH, KW = a->KW, KK = KH * KW, cpg = a->cpg, Kw = a->Kw;
    const int64_t H = a->H, Wd = a->Wd, st = a->stride, pad = a->pad, dil = a->dil;
    uint64_t acc[256]; /* Kw * G words when by_vector */
    const int by_vector = Wg == 1 && Kw * G <= 256 && G <= 64;
    const int by_avx2 = glue_fast() && Wg == 1 && G == 4 && 64 % cpg == 0 && Kw <= 8;
    if (!by_vector)
        for (int64_t g = 0; g < G; ++g)
            memset(buf + g * a->gstride, 0, (size_t)((q1 - q0) * Kw) * sizeof(uint64_t));
    int64_t bi = q0 / (a->Ho * a->Wo), oh = q0 % (a->Ho * a->Wo) / a->Wo, ow = q0 % a->Wo - 1;
    for (int64_t q = q0; q < q1; ++q) {
        if (++ow == a->Wo) { /* the next position: (bi, oh, ow) counted along, no divisions */
            ow = 0;
            if (++oh == a->Ho)
                oh = 0, ++bi;
        }
        const int64_t ih0 = oh * st - pad, iw0 = ow * st - pad;
        uint64_t *row = buf + (q - q0) * Kw;
        unsigned char *pm = padmask + (q - q0) * KK;
        int64_t npd = 0;
        if (ih0 >= 0 && ih0 + (KH - 1) * dil < H && iw0 >= 0 && iw0 + (KW - 1) * dil < Wd) {
            const uint64_t *base = a->x + ((bi * H + ih0) * Wd + iw0) * G * Wg;
            if (by_avx2) { /* inside the map: no padded taps (padmask is read only where npadded > 0) */
                npadded[q - q0] = 0;
                gather4_avx2(a, base, NULL, row);
                continue;
            }
            for (int64_t tap = 0; tap < KK; ++tap) {
                tapsrc[tap] = base + a->off[tap];
                pm[tap] = 0;
            }
        } else {
            for (int64_t kh = 0; kh < KH; ++kh)
                for (int64_t kw = 0; kw < KW; ++kw) {
                    const int64_t ih = ih0 + kh * dil, iw = iw0 + kw * dil, tap = kh * KW + kw;
                    const int out = ih < 0 || ih >= H || iw < 0 || iw >= Wd;
                    pm[tap] = (unsigned char)out;
                    tapsrc[tap] = out ? a->zero : a->x + ((bi * H + ih) * Wd + iw) * G * Wg;
                    npd += out;
                }
        }
        npadded[q - q0] = npd;
        if (by_avx2) {
            gather4_avx2(a, NULL, tapsrc, row);
        } else if (by_vector && G == 4) {
            gather_w1(a, tapsrc, 4, acc, row);
        } else if (by_vector) {
            gather_w1(a, tapsrc, G, acc, row);
        } else {
            for (int64_t tap = 0; tap < KK; ++tap) {
                if (pm[tap])
                    continue;
                const int64_t bitpos = tap * cpg;
                if ((cpg & 63) == 0) {
                    for (int64_t g = 0; g < G; ++g)
                        memcpy(row + g * a->gstride + (bitpos >> 6), tapsrc[tap] + g * Wg,
                               (size_t)Wg * sizeof(uint64_t));
                } else {
                    for (int64_t g = 0; g < G; ++g)
                        bits_append(row + g * a->gstride, Kw, bitpos, tapsrc[tap] + g * Wg, cpg);
                }
            }
        }
    }
}
GLUE_VARIANTS512(gather, (const gather_args *a, int64_t q0, int64_t q1, uint64_t *buf, unsigned char *padmask,
                          int64_t *npadded, const uint64_t **tapsrc),
                 (a, q0, q1, buf, padmask, npadded, tapsrc))

/* Correct the rows of positions with taps in the padding: a padded tap counted
 * cpg - 2 popcount(0 ^ w) = cpg - 2 pw; it must add 0.  pwt: 2 pw, tap-major. */
INLINE void correct_impl(int32_t *out, int64_t rows, int64_t Cout, int64_t KK, int64_t cpg, const int64_t *npadded,
                         const unsigned char *padmask, const int32_t *pwt)
{
    for (int64_t q = 0; q < rows; ++q) {
        if (npadded[q] == 0)
            continue;
        const unsigned char *pm = padmask + q * KK;
        int32_t *restrict orow = out + q * Cout;
        const int32_t base = (int32_t)(npadded[q] * cpg);
        for (int64_t o = 0; o < Cout; ++o)
            orow[o] -= base;
        for (int64_t tap = 0; tap < KK; ++tap) {
            if (!pm[tap])
                continue;
            const int32_t *restrict pt = pwt + tap * Cout;
            for (int64_t o = 0; o < Cout; ++o)
                orow[o] += pt[o];
        }
    }
}
GLUE_VARIANTS512(correct, (int32_t *out, int64_t rows, int64_t Cout, int64_t KK, int64_t cpg,
                           const int64_t *npadded, const unsigned char *padmask, const int32_t *pwt),
                 (out, rows, Cout, KK, cpg, npadded, padmask, pwt))

/* x: B x H x Wd x G x Wg words; out: B x Ho x Wo x Cout int32 (see bhv_xnor_conv2d).
 * -3: prepared for another variant. */
EXPORT int bhv_xnor_conv2d_pp(const uint64_t *x, const bhv_conv *c, int64_t B, int64_t H, int64_t Wd,
                              int64_t stride, int64_t pad, int64_t dil, int64_t Ho, int64_t Wo, int32_t *out,
                              int threads)
{
    const variant_t *v = bhvi_active;
    if (B <= 0 || Ho <= 0 || Wo <= 0)
        return 0;
    if (stride <= 0 || dil <= 0)
        return -2;
    if (c->variant != (const void *)v)
        return -3;
    const int64_t G = c->G, Wg = c->Wg, Cout = c->Cout, KH = c->KH, KW = c->KW, cpg = c->cpg;
    const int64_t cpo = Cout / G, KK = KH * KW, Kw = cdiv(KK * cpg, 64), nr = v->nr, npg = cdiv(cpo, nr);
    const int64_t P = B * Ho * Wo;
    const uint64_t *Bp = c->Bp;
    const int32_t *pwt = c->pwt;
    int nt = bhvi_threads(threads);
    if (P * Cout * max64(Kw, 1) < BHV_PAR_MIN_WORK)
        nt = 1;
    /* chunks of output positions (all groups at once): up to 64, a few per thread */
    int64_t mc = 64;
    if (nt > 1)
        mc = min64(mc, max64(8, cdiv(P, 4 * (int64_t)nt)));
    const int64_t nchunk = cdiv(P, mc);
    const int64_t kconst = KK * cpg;
    const uint64_t lastmask = (cpg & 63) ? (~(uint64_t)0) >> (64 - (cpg & 63)) : ~(uint64_t)0;
    /* words between the groups' im2col blocks; 4 more so that gather4_avx2's 4-word row stores
     * never reach the next block */
    const int64_t gstride = mc * Kw + 4;
    uint64_t *zero = (uint64_t *)calloc((size_t)max64(1, G * Wg), sizeof(uint64_t));
    int64_t *off = (int64_t *)malloc((size_t)KK * sizeof(int64_t));
    if (zero == NULL || off == NULL) {
        free(zero);
        free(off);
        return -1;
    }
    for (int64_t kh = 0; kh < KH; ++kh)
        for (int64_t kw = 0; kw < KW; ++kw)
            off[kh * KW + kw] = (kh * dil * Wd + kw * dil) * G * Wg;
    const gather_args ga = {x, zero, H, Wd, G, Wg, KH, KW, cpg, stride, pad, dil, Ho, Wo, Kw, gstride, lastmask,
                            off};
    void (*gather)(const gather_args *, int64_t, int64_t, uint64_t *, unsigned char *, int64_t *,
                   const uint64_t **) = GLUE_PICK(gather);
    void (*correct)(int32_t *, int64_t, int64_t, int64_t, int64_t, const int64_t *, const unsigned char *,
                    const int32_t *) = GLUE_PICK(correct);
    int failed = 0;

#pragma omp parallel num_threads(nt) if (nt > 1 && nchunk > 1) reduction(| : failed)
    {
        uint64_t *buf = (uint64_t *)malloc((size_t)max64(1, G * gstride) * sizeof(uint64_t));
        unsigned char *padmask = (unsigned char *)malloc((size_t)max64(1, mc * KK));
        int64_t *npadded = (int64_t *)malloc((size_t)mc * sizeof(int64_t));
        const uint64_t **tapsrc = (const uint64_t **)malloc((size_t)max64(1, KK) * sizeof(uint64_t *));
        if (!buf || !padmask || !npadded || !tapsrc)
            failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < nchunk; ++c) {
            if (failed)
                continue;
            const int64_t q0 = c * mc, q1 = min64(P, q0 + mc);
            gather(&ga, q0, q1, buf, padmask, npadded, tapsrc);
            /* multiply, per group */
            for (int64_t g = 0; g < G; ++g)
                bhvi_gemm_serial(v, buf + g * gstride, Kw, q1 - q0, Bp + g * npg * Kw * nr, cpo, Kw, 0,
                            kconst, out + q0 * Cout + g * cpo, Cout);
            correct(out + q0 * Cout, q1 - q0, Cout, KK, cpg, npadded, padmask, pwt);
        }
        free(buf);
        free(padmask);
        free(npadded);
        free(tapsrc);
    }
    free(zero);
    free(off);
    return failed ? -1 : 0;
}

EXPORT int bhv_xnor_conv2d(const uint64_t *x, const uint64_t *w, int64_t B, int64_t H,
                           int64_t Wd, int64_t G, int64_t Wg, int64_t Cout, int64_t KH,
                           int64_t KW, int64_t cpg, int64_t stride, int64_t pad,
                           int64_t dil, int64_t Ho, int64_t Wo, int32_t *out, int threads)
{
    if (B <= 0 || Ho <= 0 || Wo <= 0 || Cout <= 0)
        return 0;
    if (G <= 0 || Cout % G != 0 || stride <= 0 || dil <= 0)
        return -2;
    bhv_conv c;
    const int rc = bhv_conv_prepare(&c, w, G, Wg, Cout, KH, KW, cpg);
    if (rc)
        return rc;
    const int rr = bhv_xnor_conv2d_pp(x, &c, B, H, Wd, stride, pad, dil, Ho, Wo, out, threads);
    bhv_conv_free(&c);
    return rr;
}
