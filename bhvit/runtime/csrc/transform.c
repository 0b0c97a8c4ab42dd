/*
 * transform.c -- the output transform of a binary layer (LCE's OutputTransform, here
 * bhv_transform): scale and shift of the popcount dot products, the shortcut, RPReLU and
 * LayerScale, written as floats or straight into the packed signs of the next binary
 * layer; and the fused binary linear layer (XNOR GEMM + transform in one pass).
 */
#include "core.h"

#if BHV_X86
/* Means of 8 consecutive floats, n8 groups of 64 (8 means each): an 8x8 transpose,
 * then the rows summed in order t = 0..7 -- the same additions as the scalar loop
 * (zero_first: ((0 + x0) + x1) + ..., the order of the shortcut's means in epi_row_impl,
 * which differs from x0 + x1 + ... in the sign of a zero sum). */
GLUE_FAST_ATTR static void pool8_avx2(const float *v, int64_t n8, float inv, float *out, int zero_first)
{
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int64_t g = 0; g < n8; ++g) {
        const float *p = v + g * 64;
        __m256 r[8], t[8];
        for (int i = 0; i < 8; ++i)
            r[i] = _mm256_loadu_ps(p + 8 * i); /* r[i] = group i's 8 values */
        for (int i = 0; i < 8; i += 2) {
            t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
            t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
        }
        for (int i = 0; i < 8; i += 4) {
            r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
            r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
            r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
            r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
        }
        /* r[0..3]: elements 0,1,2,3 (low lanes: groups 0-3 | high: 4-7) of groups 0-3,
         * r[4..7] the same for groups 4-7 */
        __m256 e[8];
        for (int i = 0; i < 4; ++i) {
            e[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);     /* element i of groups 0-7 */
            e[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31); /* element i + 4 */
        }
        __m256 acc = zero_first ? _mm256_add_ps(_mm256_setzero_ps(), e[0]) : e[0];
        for (int i = 1; i < 8; ++i)
            acc = _mm256_add_ps(acc, e[i]);
        _mm256_storeu_ps(out + 8 * g, _mm256_mul_ps(acc, vinv));
    }
}

/* The same for 16 groups of 8 a step on AVX-512 (n16 blocks of 128 floats): each vector holds
 * group i in its low and group i + 8 in its high 256 bits, so the in-lane steps of pool8_avx2
 * transpose both halves at once, and one two-source permute per pair replaces the 128-bit
 * swaps.  The sums run in the same order. */
GLUE_AVX512_ATTR static void pool8_avx512(const float *v, int64_t n16, float inv, float *out, int zero_first)
{
    const __m512 vinv = _mm512_set1_ps(inv);
    /* [a.l0, b.l0, a.l2, b.l2] and [a.l1, b.l1, a.l3, b.l3] by 128-bit lanes of 4 floats */
    const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
    const __m512i hi = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int64_t g = 0; g < n16; ++g) {
        const float *p = v + g * 128;
        __m512 r[8], t[8];
        for (int i = 0; i < 8; ++i)
            r[i] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(p + 8 * i)),
                                      _mm256_loadu_ps(p + 64 + 8 * i), 1);
        for (int i = 0; i < 8; i += 2) {
            t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
        }
        for (int i = 0; i < 8; i += 4) {
            r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
            r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
            r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
            r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
        }
        __m512 e[8];
        for (int i = 0; i < 4; ++i) {
            e[i] = _mm512_permutex2var_ps(r[i], lo, r[i + 4]);     /* element i of groups 0-15 */
            e[i + 4] = _mm512_permutex2var_ps(r[i], hi, r[i + 4]); /* element i + 4 */
        }
        __m512 acc = zero_first ? _mm512_add_ps(_mm512_setzero_ps(), e[0]) : e[0];
        for (int i = 1; i < 8; ++i)
            acc = _mm512_add_ps(acc, e[i]);
        _mm512_storeu_ps(out + 16 * g, _mm512_mul_ps(acc, vinv));
    }
}

/* Means of 8 consecutive floats, n8 groups of 64: AVX-512 for pairs of groups where it runs. */
static void pool8(const float *v, int64_t n8, float inv, float *out, int zero_first)
{
    int64_t done = 0;
    if (bhvi_active->glue_avx512) {
        pool8_avx512(v, n8 / 2, inv, out, zero_first);
        done = n8 / 2 * 2;
    }
    pool8_avx2(v + done * 64, n8 - done, inv, out + done * 8, zero_first);
}

/* Means of 4 consecutive floats, n8 groups of 32 (8 means each): 4 x 4 transposes within the
 * 128-bit lanes (groups 0, 2, 4, 6 low, 1, 3, 5, 7 high), the rows summed in order t = 0..3
 * (zero_first as in pool8_avx2), then the means put back in group order. */
GLUE_FAST_ATTR static void pool4_avx2(const float *v, int64_t n8, float inv, float *out, int zero_first)
{
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t g = 0; g < n8; ++g) {
        const float *p = v + g * 32;
        const __m256 r0 = _mm256_loadu_ps(p), r1 = _mm256_loadu_ps(p + 8);
        const __m256 r2 = _mm256_loadu_ps(p + 16), r3 = _mm256_loadu_ps(p + 24);
        const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
        const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
        const __m256 e0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 e1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 e2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 e3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
        __m256 acc = zero_first ? _mm256_add_ps(_mm256_setzero_ps(), e0) : e0;
        acc = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc, e1), e2), e3);
        acc = _mm256_permutevar8x32_ps(_mm256_mul_ps(acc, vinv), order);
        _mm256_storeu_ps(out + 8 * g, acc);
    }
}
#else
static void pool4_avx2(const float *v, int64_t n8, float inv, float *out, int zero_first)
{
    (void)v, (void)n8, (void)inv, (void)out, (void)zero_first; /* never called: glue_fast() is 0 */
}
static void pool8(const float *v, int64_t n8, float inv, float *out, int zero_first)
{
    (void)v, (void)n8, (void)inv, (void)out, (void)zero_first; /* never called: glue_fast() is 0 */
}
#endif

/* --- fused epilogue of a binary layer -------------------------------------- */
/*
 * y[r, j] = post(act(dot[r, j] * scale[j] + shift[j] + shortcut(r, j)))
 *   shortcut: sc == NULL -> none; sc_c == n -> identity; sc_c < n -> the input
 *             tiled (sc[r, j % sc_c]); sc_c > n -> mean of sc_c / n consecutive
 *             channels (sc[r, j*k .. j*k+k-1]).
 *   act:      m1 == NULL -> identity; else RPReLU: y = v - m1; y = y < 0 ? y * slope :
 *             y; y + m2.  The move m1 is taken into the shift once per call, so v - m1 is
 *             computed as dot * scale + (shift - m1) + shortcut (one operation less per
 *             value; the numpy reference rounds the same way).
 *   post:     ps == NULL -> none; else a LayerScale y = pb + y * ps.
 * bhv_epilogue writes out = y, or out = res + y (res may be out itself).
 * bhv_epilogue_pack writes no floats: the packed signs of y + nb (the next binary
 * layer's input, its input bias folded in) and, optionally, the mean of each group
 * of pool_k consecutive channels of y (the next layer's channel-pool shortcut);
 * it returns 1 if a packed value y + nb was NaN (its bit is then 0), like bhv_pack_signs_f32.
 * One pass over the layer output instead of the half-dozen numpy passes.
 */
typedef struct {
    const int32_t *dot;
    int64_t n;
    const float *scale, *shift, *sc;
    int64_t sc_c, k;
    float inv_k;
    const float *m1, *slope, *m2, *ps, *pb, *res;
    float *shift_m1; /* shift - m1 (owned), the shift when there is an act */
    float *out;
    const float *nb;   /* epilogue_pack: next layer's input bias (or NULL) */
    uint64_t *bits;    /* epilogue_pack: rows x ceil(n/64) words */
    float *pool;       /* epilogue_pack: rows x n/pool_k means (or NULL) */
    int64_t pool_k;
    float pool_inv;
    pack_f32_fn pack;
    packb_fn packb;    /* the signs of v + nb in one pass */
    int fast;          /* AVX2 helpers allowed (glue_fast()) */
} epi_args;

/* One fused pass over segments of the row (the whole row, or the repeats of a tiled
 * shortcut).  HAS is a compile-time mask (1 shortcut, 2 RPReLU, 4 LayerScale,
 * 8 residual): epi_fused dispatches to one specialised, vectorised loop per mask. */
INLINE void epi_loop(const int HAS, const int32_t *restrict d, const float *restrict scale,
                     const float *restrict shift, const float *restrict s, int64_t seg, int64_t n,
                     const float *restrict m1, const float *restrict slope, const float *restrict m2,
                     const float *restrict ps, const float *restrict pb, const float *rr, float *v)
{
    (void)m1; /* in shift (epi_init) */
    for (int64_t rep = 0; rep < n; rep += seg) {
        const int32_t *restrict dd = d + rep;
        const float *restrict sc = scale + rep, *restrict sh = shift + rep;
        const float *restrict a2 = slope + ((HAS & 2) ? rep : 0);
        const float *restrict a3 = m2 + ((HAS & 2) ? rep : 0);
        const float *restrict p1 = ps + ((HAS & 4) ? rep : 0), *restrict p2 = pb + ((HAS & 4) ? rep : 0);
        const float *r0 = rr + ((HAS & 8) ? rep : 0);
        float *vv = v + rep;
        for (int64_t j = 0; j < seg; ++j) {
            float x = (float)dd[j] * sc[j] + sh[j];
            if (HAS & 1)
                x += s[j];
            if (HAS & 2) {
                /* PReLU as F.prelu: y * slope where y < 0, else y (y = x: sh holds shift - m1).
                 * The product is taken for every lane and then selected (a blend): a multiply
                 * under the condition is not if-converted by the compiler (it could trap). */
                const float ys = x * a2[j];
                x = (x < 0.0f ? ys : x) + a3[j];
            }
            if (HAS & 4)
                x = p2[j] + x * p1[j];
            if (HAS & 8)
                x = r0[j] + x; /* r0 may alias vv: same index read, then written */
            vv[j] = x;
        }
    }
}

#define EPI_CASE(m)                                                                  \
    case m:                                                                          \
        epi_loop(m, d, scale, shift, s, seg, n, m1, slope, m2, ps, pb, rr, v);       \
        break;

INLINE void epi_fused(const int32_t *d, const float *scale, const float *shift, const float *s, int64_t seg,
                      int64_t n, const float *m1, const float *slope, const float *m2, const float *ps,
                      const float *pb, const float *rr, float *v)
{
    const int mask = (s != NULL) | (m1 != NULL) << 1 | (ps != NULL) << 2 | (rr != NULL) << 3;
    switch (mask) {
        EPI_CASE(0) EPI_CASE(1) EPI_CASE(2) EPI_CASE(3) EPI_CASE(4) EPI_CASE(5) EPI_CASE(6) EPI_CASE(7)
        EPI_CASE(8) EPI_CASE(9) EPI_CASE(10) EPI_CASE(11) EPI_CASE(12) EPI_CASE(13) EPI_CASE(14) EPI_CASE(15)
    }
}
#undef EPI_CASE

INLINE void epi_row_impl(const epi_args *a, int64_t r, float *buf, int *bad)
{
    const int64_t n = a->n;
    const int32_t *d = a->dot + r * n;
    float *o = a->out != NULL ? a->out + r * n : NULL;
    float *v = o != NULL ? o : buf;
    const float *rr = (o != NULL && a->res != NULL) ? a->res + r * n : NULL;
    const float *s = a->sc != NULL ? a->sc + r * a->sc_c : NULL;
    if (s != NULL && a->sc_c > n) {
        /* channel-pool shortcut: the group means first, into the second half of buf:
         * ((0 + x0) + x1) + ... times 1/k, 8 x 8 transposed with AVX2 for groups of 8 (the MLP down-projection of an
         * expansion ratio 8), else looped so the j loop vectorises */
        float *restrict means = buf + n;
        const int64_t k = a->k;
        if (a->fast && k == 8 && n % 8 == 0) {
            pool8(s, n / 8, a->inv_k, means, 1);
        } else if (a->fast && k == 4 && n % 8 == 0) {
            pool4_avx2(s, n / 8, a->inv_k, means, 1);
        } else {
            const float *restrict sv = s;
            for (int64_t j = 0; j < n; ++j)
                means[j] = 0.0f + sv[j * k];
            for (int64_t t = 1; t < k; ++t)
                for (int64_t j = 0; j < n; ++j)
                    means[j] += sv[j * k + t];
            for (int64_t j = 0; j < n; ++j)
                means[j] *= a->inv_k;
        }
        epi_fused(d, a->scale, a->shift, means, n, n, a->m1, a->slope, a->m2, a->ps, a->pb, rr, v);
    } else if (s != NULL) {
        epi_fused(d, a->scale, a->shift, s, a->sc_c, n, a->m1, a->slope, a->m2, a->ps, a->pb, rr, v);
    } else {
        epi_fused(d, a->scale, a->shift, NULL, n, n, a->m1, a->slope, a->m2, a->ps, a->pb, rr, v);
    }
    if (o != NULL)
        return;
    if (a->pool != NULL && a->fast && a->pool_k == 8 && (n / 8) % 8 == 0) {
        pool8(v, n / 64, a->pool_inv, a->pool + r * (n / 8), 0);
    } else if (a->pool != NULL && a->fast && a->pool_k == 4 && (n / 4) % 8 == 0) {
        pool4_avx2(v, n / 32, a->pool_inv, a->pool + r * (n / 4), 0);
    } else if (a->pool != NULL) {
        /* x0 + x1 + ... (t = 0, 1, ...) times 1/k, looped so the j loop vectorises */
        const int64_t pc = n / a->pool_k, pk = a->pool_k;
        float *restrict pr = a->pool + r * pc;
        const float *restrict pv = v;
        for (int64_t j = 0; j < pc; ++j)
            pr[j] = pv[j * pk];
        for (int64_t t = 1; t < pk; ++t)
            for (int64_t j = 0; j < pc; ++j)
                pr[j] += pv[j * pk + t];
        for (int64_t j = 0; j < pc; ++j)
            pr[j] *= a->pool_inv;
    }
    /* NaN: reported, as by bhv_pack_signs_f32 */
    if (a->nb != NULL)
        *bad |= a->packb(v, NULL, NULL, a->nb, n, a->bits + r * cdiv(n, 64));
    else
        *bad |= a->pack(v, n, a->bits + r * cdiv(n, 64));
}
GLUE_VARIANTS512(epi_row, (const epi_args *a, int64_t r, float *buf, int *bad), (a, r, buf, bad))

static int epi_run(const epi_args *a, int64_t rows, int threads)
{
    const int nt = bhvi_threads(threads);
    void (*row)(const epi_args *, int64_t, float *, int *) = GLUE_PICK(epi_row);
    int failed = 0, bad = 0;
    (void)nt;
#pragma omp parallel num_threads(nt) if (nt > 1 && rows * a->n >= BHV_PAR_MIN_FLOATS) reduction(| : failed, bad)
    {
        float *buf = (float *)malloc((size_t)max64(2 * a->n, 1) * sizeof(float)); /* see epi_row_impl */
        if (buf == NULL)
            failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r)
            if (buf != NULL)
                row(a, r, buf, &bad);
        free(buf);
    }
    return failed ? -1 : bad; /* 1: a packed value was NaN (epilogue_pack) */
}

static int epi_init(epi_args *a, const int32_t *dot, int64_t n, const float *scale, const float *shift,
                    const float *sc, int64_t sc_c, const float *m1, const float *slope,
                    const float *m2, const float *ps, const float *pb)
{
    memset(a, 0, sizeof(*a));
    if (sc != NULL && !(sc_c == n || (sc_c < n && n % sc_c == 0) || (sc_c > n && sc_c % n == 0)))
        return -2;
    a->dot = dot;
    a->n = n;
    a->scale = scale;
    a->shift = shift;
    if (m1 != NULL) {
        a->shift_m1 = (float *)malloc((size_t)max64(n, 1) * sizeof(float));
        if (a->shift_m1 == NULL)
            return -1;
        for (int64_t j = 0; j < n; ++j)
            a->shift_m1[j] = shift[j] - m1[j];
        a->shift = a->shift_m1;
    }
    a->sc = sc;
    a->sc_c = sc_c;
    a->k = (sc != NULL && sc_c > n) ? sc_c / n : 1;
    a->inv_k = 1.0f / (float)a->k;
    a->m1 = m1;
    a->slope = slope;
    a->m2 = m2;
    a->ps = ps;
    a->pb = pb;
    a->pack = bhvi_active->pack_f32;
    a->packb = bhvi_packb();
    a->fast = glue_fast();
    return 0;
}

EXPORT int bhv_epilogue(const int32_t *dot, int64_t rows, int64_t n, const float *scale,
                        const float *shift, const float *sc, int64_t sc_c, const float *m1,
                        const float *slope, const float *m2, const float *ps, const float *pb,
                        const float *res, float *out, int threads)
{
    epi_args a;
    const int rc = epi_init(&a, dot, n, scale, shift, sc, sc_c, m1, slope, m2, ps, pb);
    if (rc)
        return rc;
    a.res = res;
    a.out = out;
    const int rr = epi_run(&a, rows, threads);
    free(a.shift_m1);
    return rr;
}

EXPORT int bhv_epilogue_pack(const int32_t *dot, int64_t rows, int64_t n, const float *scale,
                             const float *shift, const float *sc, int64_t sc_c, const float *m1,
                             const float *slope, const float *m2, const float *nb, uint64_t *bits,
                             int64_t pool_k, float *pool, int threads)
{
    epi_args a;
    if (pool != NULL && (pool_k < 1 || n % pool_k != 0))
        return -2;
    const int rc = epi_init(&a, dot, n, scale, shift, sc, sc_c, m1, slope, m2, NULL, NULL);
    if (rc)
        return rc;
    a.nb = nb;
    a.bits = bits;
    a.pool = pool;
    a.pool_k = pool_k;
    a.pool_inv = 1.0f / (float)max64(pool_k, 1);
    const int rr = epi_run(&a, rows, threads);
    free(a.shift_m1);
    return rr;
}

/* --- element-wise float steps of the forward pass ------------------------- */
/* out[r, c] = x[r, c] * a[c] + b[c]: a folded BatchNorm (out may be x). */
INLINE void affine_impl(const float *x, int64_t rows, int64_t C, const float *a, const float *b, float *out)
{
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * C;
        float *o = out + r * C;
        for (int64_t c = 0; c < C; ++c)
            o[c] = xr[c] * a[c] + b[c];
    }
}
GLUE_VARIANTS512(affine, (const float *x, int64_t rows, int64_t C, const float *a, const float *b, float *out),
                 (x, rows, C, a, b, out))

EXPORT void bhv_affine(const float *x, int64_t rows, int64_t C, const float *a, const float *b, float *out,
                       int threads)
{
    void (*run)(const float *, int64_t, int64_t, const float *, const float *, float *) = GLUE_PICK(affine);
    const int nt = bhvi_threads(threads);
    const int64_t per = cdiv(rows, nt);
    (void)per;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && rows * C >= BHV_PAR_MIN_FLOATS)
    for (int t = 0; t < nt; ++t)
        if (t * per < rows)
            run(x + t * per * C, min64(per, rows - t * per), C, a, b, out + t * per * C);
}

/* out[i] = x[i] + y[i] for i < n, repeated over reps blocks of n (y shared): a position embedding
 * added to every image (out may be x). */
INLINE void add_impl(const float *x, const float *y, int64_t n, int64_t reps, float *out)
{
    for (int64_t k = 0; k < reps; ++k) {
        const float *xr = x + k * n;
        float *o = out + k * n;
        for (int64_t i = 0; i < n; ++i)
            o[i] = xr[i] + y[i];
    }
}
GLUE_VARIANTS512(add, (const float *x, const float *y, int64_t n, int64_t reps, float *out), (x, y, n, reps, out))

EXPORT void bhv_add(const float *x, const float *y, int64_t n, int64_t reps, float *out)
{
    GLUE_PICK(add)(x, y, n, reps, out);
}

/* --- binary linear layer: XNOR GEMM fused with its epilogue ----------------- */
/*
 * out = epilogue(K - 2 popcount(a ^ b)) for a: M x W packed inputs, b: N x W packed
 * weights, processed in chunks of rows so the int32 dot products of a chunk stay in
 * cache for the epilogue (bhv_epilogue's arguments; with bits != NULL the
 * bhv_epilogue_pack form: packed signs of the output + nb and optional pooled means).
 */
#define BHV_LINEAR_ROWS 32

EXPORT int bhv_binary_linear_pp(const uint64_t *a, int64_t M, int64_t k, const bhv_panels *pp,
                                const bhv_transform *t, int threads)
{
    const int64_t N = pp->N, W = pp->W;
    if ((t->out == NULL) == (t->bits == NULL))
        return -2;
    if (t->pool != NULL && (t->bits == NULL || t->pool_k < 1 || N % t->pool_k != 0))
        return -2;
    epi_args base;
    const int rc = epi_init(&base, NULL, N, t->scale, t->shift, t->sc, t->sc_c, t->m1, t->slope, t->m2, t->ps,
                            t->pb);
    const variant_t *v = bhvi_active;
    if (rc || M <= 0 || N <= 0 || pp->variant != (const void *)v) {
        free(base.shift_m1);
        return rc ? rc : (M <= 0 || N <= 0) ? 0 : -3;
    }
    base.res = t->res;
    base.out = t->out;
    base.nb = t->nb;
    base.bits = t->bits;
    base.pool = t->pool;
    base.pool_k = t->pool_k;
    base.pool_inv = 1.0f / (float)max64(t->pool_k, 1);
    const uint64_t *Bp = pp->Bp;
    void (*row)(const epi_args *, int64_t, float *, int *) = GLUE_PICK(epi_row);
    int nt = bhvi_threads(threads);
    if (M * N * max64(W, 1) < BHV_PAR_MIN_WORK)
        nt = 1;
    /* chunks of rows: BHV_LINEAR_ROWS, or fewer so that every thread gets a few (batch 1 at
     * 7 x 7 tokens is 49 rows) */
    int64_t mc = BHV_LINEAR_ROWS;
    if (nt > 1)
        mc = min64(mc, max64(4, cdiv(cdiv(M, 3 * (int64_t)nt), 4) * 4));
    const int64_t nchunks = cdiv(M, mc), Wn = cdiv(N, 64);
    const int64_t pc = t->pool != NULL ? N / t->pool_k : 0;
    int failed = 0, bad = 0;
    (void)nt;
#pragma omp parallel num_threads(nt) if (nt > 1 && nchunks > 1) reduction(| : failed, bad)
    {
        int32_t *dot = (int32_t *)malloc((size_t)(mc * N) * sizeof(int32_t));
        float *buf = (float *)malloc((size_t)(2 * N) * sizeof(float)); /* see epi_row_impl */
        if (dot == NULL || buf == NULL)
            failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t ch = 0; ch < nchunks; ++ch) {
            if (dot == NULL || buf == NULL)
                continue;
            const int64_t r0 = ch * mc, rows = min64(M, r0 + mc) - r0;
            bhvi_gemm_serial(v, a + r0 * W, W, rows, Bp, N, W, 0, k, dot, N);
            epi_args c = base; /* this chunk's rows */
            c.dot = dot;
            c.sc = t->sc != NULL ? t->sc + r0 * t->sc_c : NULL;
            c.res = t->res != NULL ? t->res + r0 * N : NULL;
            c.out = t->out != NULL ? t->out + r0 * N : NULL;
            c.bits = t->bits != NULL ? t->bits + r0 * Wn : NULL;
            c.pool = t->pool != NULL ? t->pool + r0 * pc : NULL;
            for (int64_t r = 0; r < rows; ++r)
                row(&c, r, buf, &bad);
        }
        free(dot);
        free(buf);
    }
    free(base.shift_m1);
    return failed ? -1 : bad; /* 1: a packed value was NaN (bits != NULL) */
}
