#ifndef GLUE_LANES
/*
 * glue.c -- the float layers of the BHViT forward pass that sit between the binary ones:
 * GELU, the shift branches of the MLP, LayerNorm and the small float dense layers.
 *
 * Each kernel has a scalar form and a vector body written once on GCC vector types of
 * GLUE_LANES floats; this file includes itself to compile the body for 4, 8 and 16 lanes
 * (one SSE / NEON, AVX2 or AVX-512 register: wider types than the target's registers
 * would live in memory).  GLUE_COPIES makes the baseline copy of 4 lanes, the AVX2 copy
 * of 8 and the AVX-512 copy of 16, and GLUE_PICK (core.h) runs the one of the active
 * variant.  All arithmetic is element-wise in one fixed order per output (no
 * reassociation, no FMA: the build uses -ffp-contract=off), so every copy, every lane
 * count and the scalar tails round identically.
 */
#include "core.h"

#include <math.h>

#define GLUE_CAT2(a, b) a##_v##b
#define GLUE_CAT(a, b) GLUE_CAT2(a, b)

/* --- GELU (scalar) ---------------------------------------------------------------- */
/* The erf approximation on [-4, 4]: z P(z^2) / Q(z^2) (the rational form of Eigen and XLA,
 * |error| < 5e-7; erf(+-4) is +-1 in float).  Coefficients highest power first. */
#define ERF_P0 -2.72614225801306e-10f
#define ERF_P1 2.77068142495902e-08f
#define ERF_P2 -2.10102402082508e-06f
#define ERF_P3 -5.69250639462346e-05f
#define ERF_P4 -7.34990630326855e-04f
#define ERF_P5 -2.95459980854025e-03f
#define ERF_P6 -1.60960333262415e-02f
#define ERF_Q0 -1.45660718464996e-05f
#define ERF_Q1 -2.13374055278905e-04f
#define ERF_Q2 -1.68282697438203e-03f
#define ERF_Q3 -7.37332916720468e-03f
#define ERF_Q4 -1.42647390514189e-02f

/* GELU(x) = x h, h = (1 + erf(x / sqrt 2)) / 2 with z = x / sqrt 2 clamped to [-4, 4] and erf
 * to [-1, 1]; h = 0 gives -0 (also for x = -inf: the limit).  The clamps keep a NaN (z > 4 is
 * false for NaN), so NaN propagates.  The vector body (gelu_vec) does the same operations. */
INLINE float gelu1(float x)
{
    float z = x * 0.70710678118654752f;
    z = z > 4.0f ? 4.0f : z;
    z = z < -4.0f ? -4.0f : z;
    const float z2 = z * z;
    const float p = (((((ERF_P0 * z2 + ERF_P1) * z2 + ERF_P2) * z2 + ERF_P3) * z2 + ERF_P4) * z2 + ERF_P5) * z2
                    + ERF_P6;
    const float q = (((ERF_Q0 * z2 + ERF_Q1) * z2 + ERF_Q2) * z2 + ERF_Q3) * z2 + ERF_Q4;
    float e = (z * p) / q;
    e = e > 1.0f ? 1.0f : e;
    e = e < -1.0f ? -1.0f : e;
    const float h = 0.5f * (1.0f + e);
    return h == 0.0f ? -0.0f : x * h;
}

/* --- shift branches (scalar parts) -------------------------------------------------- */
/*
 * The shift branches of a BHViT block, LayerScaled and added to out:
 *   out += sum_i sum_j (pb[3i+j] + y_ij * ps[3i+j])
 * for x: (B, H, W, C) and each size k_i:
 *   y_i0 = mean of x rolled by -k..k along H (cyclic), y_i1 the same along W,
 *   y_i2 = the four channel quarters rolled +k H, -k H, +k W, -k W
 * (torch.roll(x, s)[h] = x[h - s]).  The rolled sums run in the order of the definition,
 * ShiftBranches.forward_reference: t = x, then t = (t + x[h - s]) + x[h + s] for s = 1..k;
 * the mean is t * (float)(1 / (2k + 1)) (kernels._roll_mean computes the same).  Each branch
 * adds out = out + (pb + y * ps), in the order i = 0.., j = 0, 1, 2.
 */
typedef struct {
    const float *x;
    int64_t H, W, C;
    const int64_t *ks;
    int64_t nk;
    const float *ps, *pb;
    float *out;
    const float *inv; /* (float)(1 / (2 k_i + 1)) */
} shift_args;

/* v mod n in [0, n), without a division in the common in-range case. */
INLINE int64_t shift_wrap(int64_t v, int64_t n)
{
    if (v >= 0 && v < n)
        return v;
    v %= n;
    return v < 0 ? v + n : v;
}

/* Length of the source table of one position: per size k, 2k pixels for the H rolls
 * (x[h - s], x[h + s] for s = 1..k), 2k for the W rolls, 4 for the channel quarters. */
static int64_t shift_table_len(const int64_t *ks, int64_t nk)
{
    int64_t n = 0;
    for (int64_t i = 0; i < nk; ++i)
        n += 4 * ks[i] + 4;
    return n;
}

/* The sources of position (h, w) in table order, as offsets from x[h, w] (in floats); wrap_w = 0
 * assumes the column rolls stay inside the row (k <= w < W - k), the case of most positions, for
 * which the table of a row holds for every w. */
INLINE void shift_fill(const shift_args *a, int64_t h, int64_t w, int wrap_w, int64_t *tab)
{
    const int64_t H = a->H, Wd = a->W, C = a->C;
#define ROW_OFF(s) ((shift_wrap(h + (s), H) - h) * Wd * C)
#define COL_OFF(s) ((wrap_w ? shift_wrap(w + (s), Wd) - w : (s)) * C)
    for (int64_t i = 0; i < a->nk; ++i) {
        const int64_t k = a->ks[i];
        for (int64_t s = 1; s <= k; ++s) {
            *tab++ = ROW_OFF(-s);
            *tab++ = ROW_OFF(s);
        }
        for (int64_t s = 1; s <= k; ++s) {
            *tab++ = COL_OFF(-s);
            *tab++ = COL_OFF(s);
        }
        *tab++ = ROW_OFF(-k);
        *tab++ = ROW_OFF(k);
        *tab++ = COL_OFF(-k);
        *tab++ = COL_OFF(k);
    }
#undef ROW_OFF
#undef COL_OFF
}

/* Channel c of one position (xc: its input, tab: its sources), all branches, scalar: the
 * channels past the last full vector. */
INLINE void shift_one(const shift_args *a, const float *xc, const int64_t *tab, int64_t c, float *o)
{
    const int64_t C = a->C;
    float acc = o[c];
    for (int64_t i = 0; i < a->nk; ++i) {
        const int64_t k = a->ks[i];
        const float inv = a->inv[i];
        for (int axis = 0; axis < 2; ++axis) {
            float t = xc[c];
            for (int64_t s = 0; s < 2 * k; s += 2)
                t = (t + xc[tab[s] + c]) + xc[tab[s + 1] + c];
            tab += 2 * k;
            acc = acc + (a->pb[(3 * i + axis) * C + c] + (t * inv) * a->ps[(3 * i + axis) * C + c]);
        }
        acc = acc + (a->pb[(3 * i + 2) * C + c] + xc[tab[c / (C / 4)] + c] * a->ps[(3 * i + 2) * C + c]);
        tab += 4;
    }
    o[c] = acc;
}

/* --- LayerNorm (scalar parts) ------------------------------------------------------ */
/*
 * out[r] = (x[r] - mu) * inv * w + b with mu = mean, inv = 1 / sqrt(var + eps).  The sums of x
 * and of (x - mu)^2 run in double in LN_LANES partial sums (lane l takes j = l mod LN_LANES, in
 * order of j), reduced pairwise by ln_reduce: one order in every copy, and independent chains
 * instead of one.
 */
#define LN_LANES 16

/* ((l0 + l1) + (l2 + l3)) + ... over the LN_LANES lanes (overwritten). */
INLINE double ln_reduce(double *lane)
{
    for (int w = 1; w < LN_LANES; w *= 2)
        for (int l = 0; l < LN_LANES; l += 2 * w)
            lane[l] = lane[l] + lane[l + w];
    return lane[0];
}

/* --- dense (scalar part) ------------------------------------------------------------- */
/*
 * out[r] = x[r] @ wt + bias for x: rows x k, wt: k x n (the weight transposed), bias: n or NULL.
 * Every output is o = bias (or 0), then o = o + x[t] * wt[t] for t = 0..k-1 (a multiply, then an
 * add); the register tiles of the vector body only choose which outputs are computed together.
 */
INLINE float dense_one(const float *x, int64_t k, const float *wt, int64_t n, const float *bias, int64_t j)
{
    float acc = bias != NULL ? bias[j] : 0.0f;
    for (int64_t t = 0; t < k; ++t)
        acc = acc + x[t] * wt[t * n + j];
    return acc;
}

/* --- the vector bodies, for 4, 8 and 16 lanes ---------------------------------------- */
#define GLUE_LANES 4
#include "glue.c"
#undef GLUE_LANES
#if BHV_X86
#define GLUE_LANES 8
#include "glue.c"
#undef GLUE_LANES
#define GLUE_LANES 16
#include "glue.c"
#undef GLUE_LANES
#endif

/* The copies of a kernel: name##_base (4 lanes), name##_fast (AVX2, 8 lanes) and name##_avx512
 * (16 lanes) on x86; elsewhere the fast copy is the 4-lane body too. */
#if BHV_X86
#define GLUE_COPIES(name, params, args)                                        \
    static void name##_base params { name##_v4 args; }                         \
    GLUE_FAST_ATTR static void name##_fast params { name##_v8 args; }          \
    GLUE_AVX512_ATTR static void name##_avx512 params { name##_v16 args; }
#else
#define GLUE_COPIES(name, params, args)                                        \
    static void name##_base params { name##_v4 args; }                         \
    static void name##_fast params { name##_v4 args; }
#endif

/* --- GELU -------------------------------------------------------------------- */
GLUE_COPIES(gelu_rows, (const float *x, int64_t n, float *out), (x, n, out))

#define GELU_BLOCK 4096
/* out = GELU(x) = 0.5 x (1 + erf(x / sqrt 2)), n values (out may be x), in blocks across threads. */
EXPORT void bhv_gelu(const float *x, int64_t n, float *out, int threads)
{
    void (*fn)(const float *, int64_t, float *) = GLUE_PICK(gelu_rows);
    const int nt = bhvi_threads(threads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && n >= BHV_PAR_MIN_FLOATS)
    for (int64_t i = 0; i < n; i += GELU_BLOCK)
        fn(x + i, min64(GELU_BLOCK, n - i), out + i);
}

/* --- shift branches ------------------------------------------------------- */
GLUE_COPIES(shift_row, (const shift_args *a, int64_t bh, int64_t *tab), (a, bh, tab))

EXPORT int bhv_shift_mix(const float *x, int64_t B, int64_t H, int64_t Wd, int64_t C,
                         const int64_t *ks, int64_t nk, const float *ps, const float *pb,
                         float *out, int threads)
{
    if (C % 4 != 0 || H < 1 || Wd < 1)
        return -2;
    float *inv = (float *)malloc((size_t)max64(nk, 1) * sizeof(float));
    if (inv == NULL)
        return -1;
    for (int64_t i = 0; i < nk; ++i)
        inv[i] = (float)(1.0 / (double)(2 * ks[i] + 1));
    const shift_args a = {x, H, Wd, C, ks, nk, ps, pb, out, inv};
    void (*row)(const shift_args *, int64_t, int64_t *) = GLUE_PICK(shift_row);
    const int64_t tlen = 2 * max64(shift_table_len(ks, nk), 1);
    const int nt = bhvi_threads(threads);
    int failed = 0;
    (void)nt;
#pragma omp parallel num_threads(nt) if (nt > 1 && H > 1 && B * H * Wd * C >= BHV_PAR_MIN_FLOATS) reduction(| : failed)
    {
        int64_t *tab = (int64_t *)malloc((size_t)tlen * sizeof(*tab));
        if (tab == NULL)
            failed = 1;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh)
            if (tab != NULL)
                row(&a, bh, tab);
        free(tab);
    }
    free(inv);
    return failed ? -1 : 0;
}

/* --- LayerNorm over the last dim -------------------------------------------- */
GLUE_COPIES(ln_row, (const float *x, int64_t C, const float *w, const float *b, float eps, float *o),
            (x, C, w, b, eps, o))

EXPORT void bhv_layer_norm(const float *x, int64_t rows, int64_t C, const float *w, const float *b,
                           float eps, float *out, int threads)
{
    void (*row)(const float *, int64_t, const float *, const float *, float, float *) = GLUE_PICK(ln_row);
    const int nt = bhvi_threads(threads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && rows > 1 && rows * C >= BHV_PAR_MIN_FLOATS)
    for (int64_t r = 0; r < rows; ++r)
        row(x + r * C, C, w, b, eps, out + r * C);
}

/* --- small float dense layer ---------------------------------------------- */
/* The runtime's few float matmuls (stem, head, full-precision downsampling) use it instead of a
 * BLAS, so they run on the runtime's own threads.  Tiles of 4 rows x 2 vectors (8 registers of
 * accumulators) in the baseline and AVX2 copies, 4 x 4 (16 of the 32) in the AVX-512 one. */
#define DENSE_PARAMS \
    (const float *x, int64_t rows, int64_t k, const float *wt, int64_t n, const float *bias, float *o)
static void dense_rows_base DENSE_PARAMS { dense_rows_v4(x, rows, k, wt, n, bias, o, 4, 2); }
#if BHV_X86
GLUE_FAST_ATTR static void dense_rows_fast DENSE_PARAMS { dense_rows_v8(x, rows, k, wt, n, bias, o, 4, 2); }
GLUE_AVX512_ATTR static void dense_rows_avx512 DENSE_PARAMS { dense_rows_v16(x, rows, k, wt, n, bias, o, 4, 4); }
#else
static void dense_rows_fast DENSE_PARAMS { dense_rows_v4(x, rows, k, wt, n, bias, o, 4, 2); }
#endif

#define DENSE_ROWS 16
EXPORT void bhv_dense(const float *x, int64_t rows, int64_t k, const float *wt, int64_t n,
                      const float *bias, float *out, int threads)
{
    void (*fn) DENSE_PARAMS = GLUE_PICK(dense_rows);
    const int nt = bhvi_threads(threads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && rows > 1 && rows * k * n >= (1 << 18))
    for (int64_t r = 0; r < rows; r += DENSE_ROWS)
        fn(x + r * k, min64(DENSE_ROWS, rows - r), k, wt, n, bias, out + r * n);
}

#else /* GLUE_LANES: the vector bodies on vectors of L = GLUE_LANES floats, names suffixed _vL */

#define L GLUE_LANES
#define VF GLUE_CAT(vf, GLUE_LANES)
#define VI GLUE_CAT(vi, GLUE_LANES)
#define VH GLUE_CAT(vh, GLUE_LANES)
#define VD GLUE_CAT(vd, GLUE_LANES)
#define FN(name) GLUE_CAT(name, GLUE_LANES)
typedef float VF __attribute__((vector_size(4 * L)));
typedef int32_t VI __attribute__((vector_size(4 * L)));
typedef float VH __attribute__((vector_size(2 * L)));  /* half a vector of floats ... */
typedef double VD __attribute__((vector_size(4 * L))); /* ... as doubles */

/* Unaligned loads and stores of whole vectors (memcpy compiles to vector moves). */
#define LDV(v, p) memcpy(&(v), (p), sizeof(v))
#define STV(p, v) memcpy((p), &(v), sizeof(v))
/* m ? a : b for a lane mask m (all ones or zero), bitwise. */
#define SELV(m, a, b) ((VF)(((m) & (VI)(a)) | (~(m) & (VI)(b))))

/* n values of out = gelu1(x) (out may be x): L at a time with the same operations as gelu1, the
 * selects as bit masks. */
INLINE void FN(gelu_rows)(const float *x, int64_t n, float *out)
{
    int64_t i = 0;
    for (; i + L <= n; i += L) {
        VF xv, z;
        LDV(xv, x + i);
        z = xv * 0.70710678118654752f;
        z = SELV(z > 4.0f, (VF){} + 4.0f, z);
        z = SELV(z < -4.0f, (VF){} - 4.0f, z);
        const VF z2 = z * z;
        const VF p = (((((ERF_P0 * z2 + ERF_P1) * z2 + ERF_P2) * z2 + ERF_P3) * z2 + ERF_P4) * z2 + ERF_P5) * z2
                     + ERF_P6;
        const VF q = (((ERF_Q0 * z2 + ERF_Q1) * z2 + ERF_Q2) * z2 + ERF_Q3) * z2 + ERF_Q4;
        VF e = (z * p) / q;
        e = SELV(e > 1.0f, (VF){} + 1.0f, e);
        e = SELV(e < -1.0f, (VF){} - 1.0f, e);
        const VF h = 0.5f * (1.0f + e);
        const VF y = SELV(h == 0.0f, -(VF){}, xv * h); /* -(+0) = -0 */
        STV(out + i, y);
    }
    for (; i < n; ++i)
        out[i] = gelu1(x[i]);
}

/* Channels [c0, c0 + U L) of one position (U <= 4 vectors, a constant after inlining), all branches,
 * the sums kept in registers: lane l does shift_one's operations for its channel.  part[u]: the
 * channel quarter of vector u; whole: each vector lies in its quarter.  The rolled sum of a size k
 * goes on from the one of the size before when that is not larger (the same additions, in the same
 * order). */
INLINE void FN(shift_chunk)(const shift_args *a, const float *xc, const int64_t *tab, int64_t c0,
                            const int64_t *part, int whole, float *o, const int U)
{
    const int64_t C = a->C, q = C / 4;
    const float *ps = a->ps + c0, *pb = a->pb + c0;
    VF acc[4], tH[4], tW[4], x0[4], u, s, b;
    int64_t kdone = 0; /* steps already in tH, tW */
    _Pragma("GCC unroll 4")
    for (int v = 0; v < U; ++v) {
        LDV(acc[v], o + c0 + v * L);
        LDV(x0[v], xc + c0 + v * L);
        tH[v] = tW[v] = x0[v];
    }
    for (int64_t i = 0; i < a->nk; ++i, ps += 3 * C, pb += 3 * C) {
        const int64_t k = a->ks[i];
        const float inv = a->inv[i];
        if (k < kdone)
            kdone = 0;
        if (kdone == 0)
            _Pragma("GCC unroll 4")
            for (int v = 0; v < U; ++v)
                tH[v] = tW[v] = x0[v];
        for (int64_t j = 2 * kdone; j < 2 * k; j += 2)
            _Pragma("GCC unroll 4")
            for (int v = 0; v < U; ++v) {
                LDV(u, xc + tab[j] + c0 + v * L);
                tH[v] = tH[v] + u;
                LDV(u, xc + tab[j + 1] + c0 + v * L);
                tH[v] = tH[v] + u;
            }
        _Pragma("GCC unroll 4")
        for (int v = 0; v < U; ++v) {
            LDV(s, ps + v * L);
            LDV(b, pb + v * L);
            acc[v] = acc[v] + (b + (tH[v] * inv) * s);
        }
        tab += 2 * k;
        for (int64_t j = 2 * kdone; j < 2 * k; j += 2)
            _Pragma("GCC unroll 4")
            for (int v = 0; v < U; ++v) {
                LDV(u, xc + tab[j] + c0 + v * L);
                tW[v] = tW[v] + u;
                LDV(u, xc + tab[j + 1] + c0 + v * L);
                tW[v] = tW[v] + u;
            }
        _Pragma("GCC unroll 4")
        for (int v = 0; v < U; ++v) {
            LDV(s, ps + C + v * L);
            LDV(b, pb + C + v * L);
            acc[v] = acc[v] + (b + (tW[v] * inv) * s);
        }
        tab += 2 * k;
        kdone = k;
        _Pragma("GCC unroll 4")
        for (int v = 0; v < U; ++v) {
            if (whole) {
                LDV(u, xc + tab[part[v]] + c0 + v * L);
            } else { /* the vector spans two or more channel quarters (C / 4 not a multiple of L) */
                float tmp[L];
                for (int l = 0; l < L; ++l)
                    tmp[l] = xc[tab[(c0 + v * L + l) / q] + c0 + v * L + l];
                LDV(u, tmp);
            }
            LDV(s, ps + 2 * C + v * L);
            LDV(b, pb + 2 * C + v * L);
            acc[v] = acc[v] + (b + u * s);
        }
        tab += 4;
    }
    _Pragma("GCC unroll 4")
    for (int v = 0; v < U; ++v)
        STV(o + c0 + v * L, acc[v]);
}

/* Row bh = b * H + h of out: 4 vectors of channels at a time when the quarters are whole vectors,
 * then one, then single channels.  tab: two source tables (shift_fill), the row's for the inner
 * positions and one for a position near the left or right edge. */
INLINE void FN(shift_row)(const shift_args *a, int64_t bh, int64_t *tab)
{
    const int64_t H = a->H, Wd = a->W, C = a->C, q = C / 4, len = shift_table_len(a->ks, a->nk);
    const int64_t h = bh % H;
    int64_t kmax = 0;
    for (int64_t i = 0; i < a->nk; ++i)
        kmax = max64(kmax, a->ks[i]);
    shift_fill(a, h, 0, 0, tab);
    for (int64_t w = 0; w < Wd; ++w) {
        float *o = a->out + (bh * Wd + w) * C;
        const float *xc = a->x + (bh * Wd + w) * C;
        const int64_t *tw = tab;
        if (w < kmax || w >= Wd - kmax) {
            shift_fill(a, h, w, 1, tab + len);
            tw = tab + len;
        }
        int64_t c = 0, p = 0, part[4]; /* p: the quarter of channel c (no division) */
        if (q % L == 0)
            for (; c + 4 * L <= C; c += 4 * L)
                for (int v = 0; v < 4; ++v) {
                    p += c + v * L >= (p + 1) * q;
                    part[v] = p;
                    if (v == 3)
                        FN(shift_chunk)(a, xc, tw, c, part, 1, o, 4);
                }
        for (; c + L <= C; c += L) {
            while (c >= (p + 1) * q)
                ++p;
            part[0] = p;
            FN(shift_chunk)(a, xc, tw, c, part, c + L <= (p + 1) * q, o, 1);
        }
        for (; c < C; ++c)
            shift_one(a, xc, tw, c, o);
    }
}

/* One LayerNorm row: the LN_LANES partial sums as LN_LANES / (L / 2) vectors of doubles (half a
 * vector of floats converted at a time), the tail added to its lane, then ln_reduce. */
INLINE void FN(ln_row)(const float *x, int64_t C, const float *w, const float *b, float eps, float *o)
{
    enum { NV = LN_LANES / (L / 2) };
    const int64_t Cm = C - C % LN_LANES;
    double lane[LN_LANES];
    VD s[NV], d;
    VH v;
    for (int i = 0; i < NV; ++i)
        s[i] = (VD){};
    for (int64_t j = 0; j < Cm; j += LN_LANES)
        for (int i = 0; i < NV; ++i) {
            LDV(v, x + j + i * (L / 2));
            s[i] = s[i] + __builtin_convertvector(v, VD);
        }
    memcpy(lane, s, sizeof lane);
    for (int64_t j = Cm; j < C; ++j)
        lane[j % LN_LANES] = lane[j % LN_LANES] + (double)x[j];
    const float mu = (float)(ln_reduce(lane) / (double)C);
    for (int i = 0; i < NV; ++i)
        s[i] = (VD){};
    for (int64_t j = 0; j < Cm; j += LN_LANES)
        for (int i = 0; i < NV; ++i) {
            LDV(v, x + j + i * (L / 2));
            d = __builtin_convertvector(v - mu, VD);
            s[i] = s[i] + d * d;
        }
    memcpy(lane, s, sizeof lane);
    for (int64_t j = Cm; j < C; ++j) {
        const double dj = (double)(x[j] - mu);
        lane[j % LN_LANES] = lane[j % LN_LANES] + dj * dj;
    }
    const float inv = (float)(1.0 / sqrt(ln_reduce(lane) / (double)C + (double)eps));
    for (int64_t j = 0; j < C; ++j)
        o[j] = (x[j] - mu) * inv * w[j] + b[j];
}

/* Rows [0, RB) x columns [j0, j0 + L CV) of the dense layer: RB x CV accumulator vectors
 * (RB, CV <= 4, constants after inlining). */
INLINE void FN(dense_tile)(const float *x, int64_t k, const float *wt, int64_t n, const float *bias, float *o,
                           int64_t j0, const int RB, const int CV)
{
    VF acc[4][4], wv[4];
    for (int c = 0; c < CV; ++c) {
        if (bias != NULL)
            LDV(acc[0][c], bias + j0 + L * c);
        else
            acc[0][c] = (VF){};
        for (int r = 1; r < RB; ++r)
            acc[r][c] = acc[0][c];
    }
    for (int64_t t = 0; t < k; ++t) {
        for (int c = 0; c < CV; ++c)
            LDV(wv[c], wt + t * n + j0 + L * c);
        for (int r = 0; r < RB; ++r) {
            const float xv = x[r * k + t];
            for (int c = 0; c < CV; ++c)
                acc[r][c] = acc[r][c] + xv * wv[c];
        }
    }
    for (int r = 0; r < RB; ++r)
        for (int c = 0; c < CV; ++c)
            STV(o + r * n + j0 + L * c, acc[r][c]);
}

/* Rows [0, RB) of the dense layer: tiles of CV vectors of columns, then of one, then single columns. */
INLINE void FN(dense_band)(const float *x, int64_t k, const float *wt, int64_t n, const float *bias, float *o,
                           const int RB, const int CV)
{
    int64_t j = 0;
    for (; j + L * CV <= n; j += L * CV)
        FN(dense_tile)(x, k, wt, n, bias, o, j, RB, CV);
    for (; j + L <= n; j += L)
        FN(dense_tile)(x, k, wt, n, bias, o, j, RB, 1);
    for (; j < n; ++j)
        for (int r = 0; r < RB; ++r)
            o[r * n + j] = dense_one(x + r * k, k, wt, n, bias, j);
}

/* rows rows of the dense layer: bands of RB rows, then single rows. */
INLINE void FN(dense_rows)(const float *x, int64_t rows, int64_t k, const float *wt, int64_t n,
                           const float *bias, float *o, const int RB, const int CV)
{
    int64_t r = 0;
    for (; r + RB <= rows; r += RB)
        FN(dense_band)(x + r * k, k, wt, n, bias, o + r * n, RB, CV);
    for (; r < rows; ++r)
        FN(dense_band)(x + r * k, k, wt, n, bias, o + r * n, 1, CV);
}

#undef L
#undef VF
#undef VI
#undef VH
#undef VD
#undef FN
#undef LDV
#undef STV
#undef SELV
#endif /* GLUE_LANES */
