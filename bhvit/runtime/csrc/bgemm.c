/*
 * bgemm.c -- binary GEMM: out[m, n] = K - 2 popcount(a[m] ^ b[n]) (XNOR) or
 * popcount(a[m] & b[n]) (AND) of packed rows, and the portable / POPCNT micro-kernels.
 *
 * Layout: B (N rows of W words) is re-packed into panels of NR rows, word-interleaved
 * (panel[w][c] = B[p*NR + c][w]), so one vector load gives word w of NR columns; each A
 * word is broadcast against it.  An MR x NR tile of accumulators stays in registers for
 * the whole K loop.  Work is blocked over row chunks x column blocks (a column block's
 * panels are sized to stay in L2) and the blocks are spread over OpenMP threads.
 */
#include "core.h"

/* Bp[(p * W + w) * nr + c] = B[(p * nr + c) * ldb + w], 0 for rows >= N. */
BHVI void bhvi_pack_panels(const uint64_t *B, int64_t ldb, int64_t N, int64_t W, int nr, uint64_t *Bp)
{
    const int64_t np = cdiv(N, nr);
    for (int64_t p = 0; p < np; ++p) {
        uint64_t *dst = Bp + p * W * nr;
        for (int c = 0; c < nr; ++c) {
            const int64_t r = p * nr + c;
            if (r < N) {
                const uint64_t *src = B + r * ldb;
                for (int64_t w = 0; w < W; ++w)
                    dst[w * nr + c] = src[w];
            } else {
                for (int64_t w = 0; w < W; ++w)
                    dst[w * nr + c] = 0;
            }
        }
    }
}

/* --- scalar micro-kernels (portable / POPCNT): MR = 4 rows x NR = 4 columns --- */

INLINE uint64_t bop(uint64_t a, uint64_t b, const int is_and)
{
    return is_and ? (a & b) : (a ^ b);
}

INLINE void scalar_tile4(const uint64_t *A, int64_t lda, const uint64_t *bp,
                         int64_t W, const int is_and, uint64_t acc[BHV_SCALAR_MR * BHV_SCALAR_NR])
{
    uint64_t c00 = 0, c01 = 0, c02 = 0, c03 = 0, c10 = 0, c11 = 0, c12 = 0, c13 = 0;
    uint64_t c20 = 0, c21 = 0, c22 = 0, c23 = 0, c30 = 0, c31 = 0, c32 = 0, c33 = 0;
    const uint64_t *a0 = A, *a1 = A + lda, *a2 = A + 2 * lda, *a3 = A + 3 * lda;
    for (int64_t w = 0; w < W; ++w) {
        const uint64_t b0 = bp[w * BHV_SCALAR_NR + 0], b1 = bp[w * BHV_SCALAR_NR + 1];
        const uint64_t b2 = bp[w * BHV_SCALAR_NR + 2], b3 = bp[w * BHV_SCALAR_NR + 3];
        uint64_t a;
        a = a0[w];
        c00 += __builtin_popcountll(bop(a, b0, is_and));
        c01 += __builtin_popcountll(bop(a, b1, is_and));
        c02 += __builtin_popcountll(bop(a, b2, is_and));
        c03 += __builtin_popcountll(bop(a, b3, is_and));
        a = a1[w];
        c10 += __builtin_popcountll(bop(a, b0, is_and));
        c11 += __builtin_popcountll(bop(a, b1, is_and));
        c12 += __builtin_popcountll(bop(a, b2, is_and));
        c13 += __builtin_popcountll(bop(a, b3, is_and));
        a = a2[w];
        c20 += __builtin_popcountll(bop(a, b0, is_and));
        c21 += __builtin_popcountll(bop(a, b1, is_and));
        c22 += __builtin_popcountll(bop(a, b2, is_and));
        c23 += __builtin_popcountll(bop(a, b3, is_and));
        a = a3[w];
        c30 += __builtin_popcountll(bop(a, b0, is_and));
        c31 += __builtin_popcountll(bop(a, b1, is_and));
        c32 += __builtin_popcountll(bop(a, b2, is_and));
        c33 += __builtin_popcountll(bop(a, b3, is_and));
    }
    acc[0] = c00;  acc[1] = c01;  acc[2] = c02;  acc[3] = c03;
    acc[4] = c10;  acc[5] = c11;  acc[6] = c12;  acc[7] = c13;
    acc[8] = c20;  acc[9] = c21;  acc[10] = c22; acc[11] = c23;
    acc[12] = c30; acc[13] = c31; acc[14] = c32; acc[15] = c33;
}

INLINE void scalar_tile1(const uint64_t *a0, const uint64_t *bp, int64_t W,
                         const int is_and, uint64_t acc[BHV_SCALAR_NR])
{
    uint64_t c0 = 0, c1 = 0, c2 = 0, c3 = 0;
    for (int64_t w = 0; w < W; ++w) {
        const uint64_t a = a0[w];
        c0 += __builtin_popcountll(bop(a, bp[w * BHV_SCALAR_NR + 0], is_and));
        c1 += __builtin_popcountll(bop(a, bp[w * BHV_SCALAR_NR + 1], is_and));
        c2 += __builtin_popcountll(bop(a, bp[w * BHV_SCALAR_NR + 2], is_and));
        c3 += __builtin_popcountll(bop(a, bp[w * BHV_SCALAR_NR + 3], is_and));
    }
    acc[0] = c0; acc[1] = c1; acc[2] = c2; acc[3] = c3;
}

INLINE void scalar_block(const uint64_t *A, int64_t lda, int64_t mrows,
                         const uint64_t *Bp, int64_t p0, int64_t p1, int64_t N,
                         int64_t W, const int is_and, int64_t kconst,
                         int32_t *out, int64_t ldo)
{
    uint64_t acc[BHV_SCALAR_MR * BHV_SCALAR_NR];
    for (int64_t i = 0; i < mrows; i += BHV_SCALAR_MR) {
        const int mr = (int)min64(BHV_SCALAR_MR, mrows - i);
        for (int64_t p = p0; p < p1; ++p) {
            const uint64_t *bp = Bp + p * W * BHV_SCALAR_NR;
            const int64_t c0 = p * BHV_SCALAR_NR;
            const int nv = (int)min64(BHV_SCALAR_NR, N - c0);
            if (mr == BHV_SCALAR_MR)
                scalar_tile4(A + i * lda, lda, bp, W, is_and, acc);
            else
                for (int r = 0; r < mr; ++r)
                    scalar_tile1(A + (i + r) * lda, bp, W, is_and, acc + r * BHV_SCALAR_NR);
            store_tile_u64(acc, BHV_SCALAR_NR, mr, nv, is_and, kconst, out + i * ldo + c0, ldo);
        }
    }
}

BHV_BLOCK_FN(bhvi_block_portable, , scalar_block)

#if BHV_X86
/* POPCNT: the same kernels compiled for the popcnt instruction */
BHV_BLOCK_FN(bhvi_block_popcnt, __attribute__((target("popcnt"))), scalar_block)
#endif

static int64_t colblock_panels(const variant_t *v, int64_t W)
{
    return max64(1, BHV_COLBLOCK_BYTES / (int64_t)(v->nr * max64(W, 1) * 8));
}

/* Single-threaded: rows [0, M) of A against all panels of Bp (N columns). */
BHVI void bhvi_gemm_serial(const variant_t *v, const uint64_t *A, int64_t lda, int64_t M, const uint64_t *Bp,
                           int64_t N, int64_t W, int is_and, int64_t kconst, int32_t *out, int64_t ldo)
{
    const int64_t np = cdiv(N, v->nr);
    const int64_t cbp = colblock_panels(v, W);
    for (int64_t p0 = 0; p0 < np; p0 += cbp)
        v->block(A, lda, M, Bp, p0, min64(np, p0 + cbp), N, W, is_and, kconst, out, ldo);
}

/* --- pre-packed weight panels -------------------------------------------------- */

EXPORT int bhv_panels_pack(bhv_panels *p, const uint64_t *b, int64_t N, int64_t W)
{
    const variant_t *v = bhvi_active;
    const int64_t np = cdiv(max64(N, 1), v->nr);
    uint64_t *Bp = (uint64_t *)malloc((size_t)max64(1, np * max64(W, 1) * v->nr) * sizeof(uint64_t));
    if (!Bp)
        return -1;
    if (N > 0)
        bhvi_pack_panels(b, W, N, W, v->nr, Bp);
    p->variant = v;
    p->N = N;
    p->W = W;
    p->Bp = Bp;
    return 0;
}

EXPORT void bhv_panels_free(bhv_panels *p)
{
    if (p != NULL) {
        free(p->Bp);
        p->Bp = NULL;
        p->variant = NULL;
    }
}

EXPORT int bhv_panels_current(const bhv_panels *p) { return p->Bp != NULL && p->variant == (const void *)bhvi_active; }

/* out[m, n] = kconst - 2 * popcount(a[m] ^ b[n])  (is_and = 0)
 *           = popcount(a[m] & b[n])                (is_and = 1)
 * a: M x W (row-major, contiguous), panels of b: N x W, out: M x N. 0 = ok, -3 = the panels were
 * packed for another variant. */
static int gemm_pp(const uint64_t *a, const bhv_panels *pp, int64_t M, int is_and, int64_t kconst,
                   int32_t *out, int threads)
{
    const variant_t *v = bhvi_active;
    const int64_t N = pp->N, W = pp->W;
    if (M <= 0 || N <= 0)
        return 0;
    if (pp->variant != (const void *)v)
        return -3;
    const uint64_t *Bp = pp->Bp;
    const int64_t mr = v->mr;
    const int64_t np = cdiv(N, v->nr);
    int nt = bhvi_threads(threads);
    if (M * N * max64(W, 1) < BHV_PAR_MIN_WORK)
        nt = 1;
    const int64_t cbp = colblock_panels(v, W);
    const int64_t ncb = cdiv(np, cbp);
    /* Row chunks: up to 64 rows, small enough to give every thread a few tasks. */
    int64_t mc = 64;
    if (nt > 1) {
        const int64_t want = cdiv(M * ncb, 4 * (int64_t)nt); /* rows x colblocks per task */
        mc = min64(mc, max64(mr, cdiv(want, mr) * mr));
    }
    mc = max64(mr, (mc / mr) * mr);
    const int64_t nrb = cdiv(M, mc);
    const int64_t ntask = nrb * ncb;
    (void)ntask;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1 && ntask > 1)
    for (int64_t t = 0; t < ntask; ++t) {
        const int64_t rb = t / ncb, cb = t % ncb;
        const int64_t r0 = rb * mc, r1 = min64(M, r0 + mc);
        const int64_t p0 = cb * cbp, p1 = min64(np, p0 + cbp);
        v->block(a + r0 * W, W, r1 - r0, Bp, p0, p1, N, W, is_and, kconst, out + r0 * N, N);
    }
    return 0;
}

static int gemm(const uint64_t *a, const uint64_t *b, int64_t M, int64_t N, int64_t W,
                int is_and, int64_t kconst, int32_t *out, int threads)
{
    if (M <= 0 || N <= 0)
        return 0;
    bhv_panels pp;
    if (bhv_panels_pack(&pp, b, N, W))
        return -1;
    const int rc = gemm_pp(a, &pp, M, is_and, kconst, out, threads);
    bhv_panels_free(&pp);
    return rc;
}

EXPORT int bhv_xnor_gemm_pp(const uint64_t *a, const bhv_panels *pp, int64_t M, int64_t k, int32_t *out,
                            int threads)
{
    return gemm_pp(a, pp, M, 0, k, out, threads);
}

EXPORT int bhv_xnor_gemm(const uint64_t *a, const uint64_t *b, int64_t M, int64_t N, int64_t W,
                         int64_t k, int32_t *out, int threads)
{
    return gemm(a, b, M, N, W, 0, k, out, threads);
}

EXPORT int bhv_and_gemm(const uint64_t *a, const uint64_t *b, int64_t M, int64_t N, int64_t W,
                        int32_t *out, int threads)
{
    return gemm(a, b, M, N, W, 1, 0, out, threads);
}
