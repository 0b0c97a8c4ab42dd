/*
 * glue.c -- the float layers of the BHViT forward pass that sit between the binary ones:
 * GELU, the shift branches of the MLP, LayerNorm and the small float dense layers.
 */
#include "core.h"

#include <math.h>

/* --- GELU -------------------------------------------------------------------- */
/* out = GELU(x) = 0.5 x (1 + erf(x / sqrt 2)), n values. */
EXPORT void bhv_gelu(const float *x, int64_t n, float *out, int threads)
{
    const int nt = bhvi_threads(threads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && n >= (1 << 16))
    for (int64_t i = 0; i < n; ++i)
        out[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}

/* --- shift branches ------------------------------------------------------- */
/*
 * The shift branches of a BHViT block, LayerScaled and added to out:
 *   out += sum_i sum_j (pb[3i+j] + y_ij * ps[3i+j])
 * for x: (B, H, W, C) and each size k_i:
 *   y_i0 = mean of x rolled by -k..k along H (cyclic), y_i1 the same along W,
 *   y_i2 = the four channel quarters rolled +k H, -k H, +k W, -k W
 * (torch.roll(x, s)[h] = x[h - s]).  The rolled sums run in the order of the definition,
 * ShiftBranches.forward_reference (training computes the same sum as two convolutions).
 */
typedef struct {
    const float *x;
    int64_t H, W, C;
    const int64_t *ks;
    int64_t nk;
    const float *ps, *pb;
    float *out;
} shift_args;

INLINE const float *shift_at(const shift_args *a, const float *xb, int64_t h, int64_t w)
{
    h %= a->H;
    w %= a->W;
    h += h < 0 ? a->H : 0;
    w += w < 0 ? a->W : 0;
    return xb + (h * a->W + w) * a->C;
}

INLINE void shift_row_impl(const shift_args *a, int64_t bh, float *t)
{
    const int64_t H = a->H, Wd = a->W, C = a->C, q = C / 4;
    const int64_t b = bh / H, h = bh % H;
    const float *xb = a->x + b * H * Wd * C;
    for (int64_t w = 0; w < Wd; ++w) {
        float *o = a->out + ((b * H + h) * Wd + w) * C;
        const float *xc = xb + (h * Wd + w) * C;
        for (int64_t i = 0; i < a->nk; ++i) {
            const int64_t k = a->ks[i];
            const float div = (float)(2 * k + 1);
            for (int axis = 0; axis < 2; ++axis) {
                const float *s0 = a->ps + (3 * i + axis) * C, *b0 = a->pb + (3 * i + axis) * C;
                for (int64_t c = 0; c < C; ++c)
                    t[c] = xc[c];
                for (int64_t s = 1; s <= k; ++s) {
                    const float *lo = axis == 0 ? shift_at(a, xb, h - s, w) : shift_at(a, xb, h, w - s);
                    const float *hi = axis == 0 ? shift_at(a, xb, h + s, w) : shift_at(a, xb, h, w + s);
                    for (int64_t c = 0; c < C; ++c)
                        t[c] = (t[c] + lo[c]) + hi[c];
                }
                for (int64_t c = 0; c < C; ++c)
                    o[c] += b0[c] + (t[c] / div) * s0[c];
            }
            const float *s2 = a->ps + (3 * i + 2) * C, *b2 = a->pb + (3 * i + 2) * C;
            const float *src[4] = {shift_at(a, xb, h - k, w), shift_at(a, xb, h + k, w),
                                   shift_at(a, xb, h, w - k), shift_at(a, xb, h, w + k)};
            for (int part = 0; part < 4; ++part) {
                const float *sp = src[part];
                for (int64_t c = part * q; c < (part + 1) * q; ++c)
                    o[c] += b2[c] + sp[c] * s2[c];
            }
        }
    }
}
GLUE_VARIANTS(shift_row, (const shift_args *a, int64_t bh, float *t), (a, bh, t))

EXPORT int bhv_shift_mix(const float *x, int64_t B, int64_t H, int64_t Wd, int64_t C,
                         const int64_t *ks, int64_t nk, const float *ps, const float *pb,
                         float *out, int threads)
{
    if (C % 4 != 0 || H < 1 || Wd < 1)
        return -2;
    const shift_args a = {x, H, Wd, C, ks, nk, ps, pb, out};
    void (*row)(const shift_args *, int64_t, float *) = glue_fast() ? shift_row_fast : shift_row_base;
    const int nt = bhvi_threads(threads);
    int failed = 0;
    (void)nt;
#pragma omp parallel num_threads(nt) if (nt > 1 && B * H * Wd * C >= (1 << 15)) reduction(| : failed)
    {
        float *t = (float *)malloc((size_t)max64(C, 1) * sizeof(float));
        if (t == NULL)
            failed = 1;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh)
            if (t != NULL)
                row(&a, bh, t);
        free(t);
    }
    return failed ? -1 : 0;
}

/* --- LayerNorm over the last dim -------------------------------------------- */
/* out[r] = (x[r] - mean) / sqrt(var + eps) * w + b, statistics accumulated in double. */
INLINE void ln_row_impl(const float *x, int64_t C, const float *w, const float *b, float eps, float *o)
{
    double s = 0.0;
    for (int64_t j = 0; j < C; ++j)
        s += x[j];
    const float mu = (float)(s / (double)C);
    double q = 0.0;
    for (int64_t j = 0; j < C; ++j) {
        const double dlt = (double)(x[j] - mu);
        q += dlt * dlt;
    }
    const float inv = (float)(1.0 / sqrt(q / (double)C + (double)eps));
    for (int64_t j = 0; j < C; ++j)
        o[j] = (x[j] - mu) * inv * w[j] + b[j];
}
GLUE_VARIANTS(ln_row, (const float *x, int64_t C, const float *w, const float *b, float eps, float *o),
              (x, C, w, b, eps, o))

EXPORT void bhv_layer_norm(const float *x, int64_t rows, int64_t C, const float *w, const float *b,
                           float eps, float *out, int threads)
{
    void (*row)(const float *, int64_t, const float *, const float *, float, float *) =
        glue_fast() ? ln_row_fast : ln_row_base;
    const int nt = bhvi_threads(threads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && rows * C >= (1 << 16))
    for (int64_t r = 0; r < rows; ++r)
        row(x + r * C, C, w, b, eps, out + r * C);
}

/* --- small float dense layer ---------------------------------------------- */
/* out[r] = x[r] @ wt + bias for x: rows x k, wt: k x n (the weight transposed), bias: n
 * or NULL.  The runtime's few float matmuls (stem, head, full-precision downsampling)
 * use it instead of a BLAS, so they run on the runtime's own threads. */
INLINE void dense_row_impl(const float *x, int64_t k, const float *wt, int64_t n, const float *bias,
                           float *o)
{
    for (int64_t j = 0; j < n; ++j)
        o[j] = bias != NULL ? bias[j] : 0.0f;
    for (int64_t t = 0; t < k; ++t) {
        const float xv = x[t];
        const float *restrict w = wt + t * n;
        float *restrict oo = o;
        for (int64_t j = 0; j < n; ++j)
            oo[j] += xv * w[j];
    }
}
GLUE_VARIANTS(dense_row, (const float *x, int64_t k, const float *wt, int64_t n, const float *bias, float *o),
              (x, k, wt, n, bias, o))

EXPORT void bhv_dense(const float *x, int64_t rows, int64_t k, const float *wt, int64_t n,
                      const float *bias, float *out, int threads)
{
    void (*row)(const float *, int64_t, const float *, int64_t, const float *, float *) =
        glue_fast() ? dense_row_fast : dense_row_base;
    const int nt = bhvi_threads(threads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && rows > 1 && rows * k * n >= (1 << 18))
    for (int64_t r = 0; r < rows; ++r)
        row(x + r * k, k, wt, n, bias, out + r * n);
}
