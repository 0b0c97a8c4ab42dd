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
    const int64_t gstride = mc * Kw; /* words between the groups' im2col blocks */
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
            if (Wg != 1)
                for (int64_t g = 0; g < G; ++g)
                    memset(buf + g * gstride, 0, (size_t)((q1 - q0) * Kw) * sizeof(uint64_t));
            /* gather: tap t of group g at bit offset t * cpg of the group's row */
            for (int64_t q = q0; q < q1; ++q) {
                const int64_t bi = q / (Ho * Wo), rem = q % (Ho * Wo);
                const int64_t oh = rem / Wo, ow = rem % Wo;
                uint64_t *row = buf + (q - q0) * Kw;
                unsigned char *pm = padmask + (q - q0) * KK;
                int64_t npd = 0;
                for (int64_t kh = 0; kh < KH; ++kh) {
                    const int64_t ih = oh * stride - pad + kh * dil;
                    for (int64_t kw = 0; kw < KW; ++kw) {
                        const int64_t iw = ow * stride - pad + kw * dil;
                        const int64_t tap = kh * KW + kw;
                        if (ih < 0 || ih >= H || iw < 0 || iw >= Wd) {
                            pm[tap] = 1;
                            tapsrc[tap] = NULL;
                            ++npd;
                        } else {
                            pm[tap] = 0;
                            tapsrc[tap] = x + ((bi * H + ih) * Wd + iw) * G * Wg;
                        }
                    }
                }
                npadded[q - q0] = npd;
                if (Wg == 1) {
                    /* cpg <= 64: stream the taps' bits through one register word */
                    for (int64_t g = 0; g < G; ++g) {
                        uint64_t *dst = row + g * gstride;
                        uint64_t cur = 0;
                        int64_t fill = 0;
                        for (int64_t tap = 0; tap < KK; ++tap) {
                            const uint64_t vv = tapsrc[tap] ? tapsrc[tap][g] & lastmask : 0;
                            cur |= vv << fill;
                            fill += cpg;
                            if (fill >= 64) {
                                *dst++ = cur;
                                fill -= 64;
                                cur = fill ? vv >> (cpg - fill) : 0;
                            }
                        }
                        if (fill)
                            *dst = cur;
                    }
                } else {
                    for (int64_t tap = 0; tap < KK; ++tap) {
                        if (!tapsrc[tap])
                            continue;
                        const int64_t bitpos = tap * cpg;
                        if ((cpg & 63) == 0) {
                            for (int64_t g = 0; g < G; ++g)
                                memcpy(row + g * gstride + (bitpos >> 6), tapsrc[tap] + g * Wg,
                                       (size_t)Wg * sizeof(uint64_t));
                        } else {
                            for (int64_t g = 0; g < G; ++g)
                                bits_append(row + g * gstride, Kw, bitpos, tapsrc[tap] + g * Wg, cpg);
                        }
                    }
                }
            }
            /* multiply, per group */
            for (int64_t g = 0; g < G; ++g)
                bhvi_gemm_serial(v, buf + g * gstride, Kw, q1 - q0, Bp + g * npg * Kw * nr, cpo, Kw, 0,
                            kconst, out + q0 * Cout + g * cpo, Cout);
            /* correct rows that have taps in the padding: a padded tap counted
             * cpg - 2 popcount(0 ^ w) = cpg - 2 pw; it must add 0 */
            for (int64_t q = q0; q < q1; ++q) {
                const int64_t npd = npadded[q - q0];
                if (npd == 0)
                    continue;
                const unsigned char *pm = padmask + (q - q0) * KK;
                int32_t *restrict orow = out + q * Cout;
                const int32_t base = (int32_t)(npd * cpg);
                for (int64_t o = 0; o < Cout; ++o)
                    orow[o] -= base;
                for (int64_t tap = 0; tap < KK; ++tap) {
                    if (!pm[tap])
                        continue;
                    const int32_t *restrict pt = pwt + tap * Cout; /* 2 pw, tap-major */
                    for (int64_t o = 0; o < Cout; ++o)
                        orow[o] += pt[o];
                }
            }
        }
        free(buf);
        free(padmask);
        free(npadded);
        free(tapsrc);
    }
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
