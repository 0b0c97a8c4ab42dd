/*
 * attention.c -- the binary attention core of BHViT's MSMHA: XNOR/popcount scores,
 * softmax, and the attention matrix in Quantization Decomposition planes multiplied with
 * sign(V) by AND/popcount.
 */
#include "core.h"

#include <math.h>

/* --- attention core ------------------------------------------------------- */
/*
 * The binary attention core of MSMHA for Bw windows x h heads:
 *   scores = sign(Q) sign(K)^T by XNOR/popcount (d - 2 popcount(q ^ k)),
 *   A = softmax(scores * scale) in float,
 *   QD: lv = clip(round(A * L / step + zp), 0, L) (round half to even), split into
 *   L 0/1 planes A^s = [lv >= s], each multiplied with the packed sign(V) by
 *   AND/popcount: A^s sign(V) = 2 popcount(A^s & V+) - popcount(A^s);
 *   out = step * sum_s A^s sign(V).
 * qb: (Bw, h, N, Wd), kb: (Bw, h, M, Wd) packed signs of Q, K (Wd = ceil(d/64));
 * vb: (Bw, h, d, Wm) bits of V >= 0 along the keys (Wm = ceil(M/64));
 * step, zp: per head; out: (Bw, N, h, d) float.
 * Scores are integers d - 2 pc, so exp(score * scale - max) = etab[pc - pc_min]
 * with etab[i] = exp(-2 i scale), computed once per call.
 */
typedef struct {
    const uint64_t *qb, *kb, *vb;
    int64_t heads, N, M, d, levels;
    const float *step, *zp, *etab;
    float *out;
    /* optional combine: out = RPReLU(((ctx * ns + nt) + q) + k) + v) */
    const float *ns, *nt, *q, *k, *v, *m1, *slope, *m2;
} attn_args;

INLINE void attn_bh_impl(const attn_args *a, int64_t bh, float *e, int32_t *pcs, uint64_t *planes)
{
    const int64_t heads = a->heads, N = a->N, M = a->M, d = a->d, levels = a->levels;
    const int64_t Wd = cdiv(d, 64), Wm = cdiv(M, 64);
    const int64_t b = bh / heads, hd = bh % heads;
    const uint64_t *Q = a->qb + bh * N * Wd, *Kp = a->kb + bh * M * Wd, *V = a->vb + bh * d * Wm;
    const float st = a->step[hd], z = a->zp[hd], L = (float)levels;
    for (int64_t n = 0; n < N; ++n) {
        const uint64_t *qr = Q + n * Wd;
        int32_t pmin = (int32_t)(64 * Wd);
        for (int64_t m = 0; m < M; ++m) {
            const uint64_t *kr = Kp + m * Wd;
            int32_t pc = 0;
            for (int64_t w = 0; w < Wd; ++w)
                pc += __builtin_popcountll(qr[w] ^ kr[w]);
            pcs[m] = pc;
            pmin = pc < pmin ? pc : pmin;
        }
        float sum = 0.0f;
        for (int64_t m = 0; m < M; ++m) {
            e[m] = a->etab[pcs[m] - pmin];
            sum += e[m];
        }
        int64_t ones = 0;
        for (int64_t m = 0; m < M; ++m) {
            float lv = rintf(e[m] / sum * L / st + z); /* half to even (default mode), inlined with SSE4.1 */
            /* clip to [0, L]; NaN (a NaN or infinite step or zero point) -> level 0, as in the
             * numpy backend (NaN >= s is false for every plane): never a NaN into the int cast */
            lv = lv > 0.0f ? (lv < L ? lv : L) : 0.0f;
            pcs[m] = (int32_t)lv; /* reuse: the level of key m */
            ones += pcs[m];
        }
        /* plane s = [level > s], built without data-dependent branches */
        for (int64_t s = 0; s < levels; ++s)
            for (int64_t w = 0; w < Wm; ++w) {
                const int64_t m0 = 64 * w, m1 = min64(M, m0 + 64);
                uint64_t word = 0;
                for (int64_t m = m0; m < m1; ++m)
                    word |= (uint64_t)(pcs[m] > s) << (m - m0);
                planes[s * Wm + w] = word;
            }
        const int64_t off = ((b * N + n) * heads + hd) * d; /* (Bw, N, C) with C = h * d */
        float *o = a->out + off;
        if (Wm == 1) { /* up to 64 keys (every window): one word per plane */
            for (int64_t j = 0; j < d; ++j) {
                const uint64_t vr = V[j];
                int64_t hits = 0;
                for (int64_t s = 0; s < levels; ++s)
                    hits += __builtin_popcountll(planes[s] & vr);
                o[j] = (float)(2 * hits - ones) * st;
            }
        } else {
            for (int64_t j = 0; j < d; ++j) {
                const uint64_t *vr = V + j * Wm;
                int64_t hits = 0;
                for (int64_t s = 0; s < levels; ++s)
                    for (int64_t w = 0; w < Wm; ++w)
                        hits += __builtin_popcountll(planes[s * Wm + w] & vr[w]);
                o[j] = (float)(2 * hits - ones) * st;
            }
        }
        if (a->ns != NULL) {
            const int64_t c0 = hd * d;
            const float *qq = a->q + off, *kk = a->k + off, *vv = a->v + off;
            for (int64_t j = 0; j < d; ++j) {
                const float x = (((o[j] * a->ns[c0 + j] + a->nt[c0 + j]) + qq[j]) + kk[j]) + vv[j];
                const float y = x - a->m1[c0 + j];
                const float pos = y < 0.0f ? 0.0f : y, neg = y < 0.0f ? y : 0.0f; /* as in epi_loop */
                o[j] = pos + neg * a->slope[c0 + j] + a->m2[c0 + j];
            }
        }
    }
}
GLUE_VARIANTS(attn_bh, (const attn_args *a, int64_t bh, float *e, int32_t *pcs, uint64_t *planes),
              (a, bh, e, pcs, planes))

EXPORT int bhv_attention(const uint64_t *qb, const uint64_t *kb, const uint64_t *vb, int64_t Bw,
                         int64_t heads, int64_t N, int64_t M, int64_t d, const float *step,
                         const float *zp, int64_t levels, float scale, const float *cs,
                         const float *ct, const float *q, const float *k, const float *v,
                         const float *m1, const float *slope, const float *m2, float *out,
                         int threads)
{
    if (levels < 1 || levels > 64 || d < 1 || M < 1 || heads < 1)
        return -2;
    if (cs != NULL && (N != M || !ct || !q || !k || !v || !m1 || !slope || !m2))
        return -2;
    const int64_t Wm = cdiv(M, 64), ntab = 64 * cdiv(d, 64) + 1;
    float *etab = (float *)malloc((size_t)ntab * sizeof(float));
    if (etab == NULL)
        return -1;
    for (int64_t i = 0; i < ntab; ++i)
        etab[i] = expf(-2.0f * (float)i * scale);
    const attn_args a = {qb, kb, vb, heads, N, M, d, levels, step, zp, etab, out,
                         cs, ct, q, k, v, m1, slope, m2};
    void (*run)(const attn_args *, int64_t, float *, int32_t *, uint64_t *) =
        glue_fast() ? attn_bh_fast : attn_bh_base;
    const int nt = bhvi_threads(threads);
    int failed = 0;
    (void)nt;
#pragma omp parallel num_threads(nt) if (nt > 1 && Bw * heads > 1) reduction(| : failed)
    {
        float *e = (float *)malloc((size_t)M * sizeof(float));
        int32_t *pcs = (int32_t *)malloc((size_t)M * sizeof(int32_t));
        uint64_t *planes = (uint64_t *)malloc((size_t)(levels * Wm) * sizeof(uint64_t));
        if (e == NULL || pcs == NULL || planes == NULL)
            failed = 1;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < Bw * heads; ++bh)
            if (!(e == NULL || pcs == NULL || planes == NULL))
                run(&a, bh, e, pcs, planes);
        free(e);
        free(pcs);
        free(planes);
    }
    free(etab);
    return failed ? -1 : 0;
}
