/*
 * kernels.c -- the bit-packed binary kernels of libbhvit, the BHViT inference runtime.
 *
 * Plain C (no Python headers): used by the plan (model.c), and through ctypes by
 * bhvit/runtime/kernels.py.
 *
 * Conventions (see kernels.py):
 *   sign(x) = +1 if x >= 0 (-0.0 included) else -1; bit = 1 for +1.
 *   Bits are packed little-endian into uint64 words along the last axis:
 *   element k -> word k / 64, bit k % 64; padding bits of the last word are 0.
 *   Binary dot of two packed +-1 vectors of true length K: K - 2 * popcount(a ^ b).
 *
 * Implementations (picked at run time, see bhv_select):
 *   c-portable          __builtin_popcountll, no ISA extension assumed
 *   c-popcnt            the same code compiled for the POPCNT instruction   (x86-64)
 *   c-avx2              AVX2 nibble-lookup popcount (vpshufb + vpsadbw)     (x86-64)
 *   c-avx512-vpopcntdq  AVX-512F + VPOPCNTDQ                                (x86-64)
 *   c-neon              NEON vcntq_u8 byte popcounts                        (AArch64)
 *
 * GEMM layout: B (N rows of W words) is re-packed into panels of NR rows,
 * word-interleaved (panel[w][c] = B[p*NR + c][w]), so one vector load gives
 * word w of NR columns; each A word is broadcast against it.  An MR x NR tile
 * of accumulators stays in registers for the whole K loop.  Work is blocked
 * over row chunks x column blocks (a column block's panels are sized to stay
 * in L2) and the blocks are spread over OpenMP threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

#if defined(__x86_64__)
#define BHV_X86 1
#include <immintrin.h>
#else
#define BHV_X86 0
#endif

#define BHV_ABI_VERSION 5
#define INLINE static inline __attribute__((always_inline))

/* Bytes of packed B panels per column block (kept in L2 while A rows stream). */
#define BHV_COLBLOCK_BYTES (128 * 1024)
/* Below this many word-ops (M * N * W) a GEMM runs on one thread. */
#define BHV_PAR_MIN_WORK (1 << 15)

typedef void (*block_fn)(const uint64_t *A, int64_t lda, int64_t mrows,
                         const uint64_t *Bp, int64_t p0, int64_t p1, int64_t N,
                         int64_t W, int is_and, int64_t kconst, int32_t *out,
                         int64_t ldo);
typedef int (*pack_f32_fn)(const float *x, int64_t k, uint64_t *out);
typedef void (*pack_u8_fn)(const uint8_t *x, int64_t k, uint64_t *out);

typedef struct {
    const char *name;
    int nr; /* panel width (columns per micro-tile) */
    int mr; /* rows per micro-tile */
    block_fn block;
    pack_f32_fn pack_f32;
    pack_u8_fn pack_u8;
    int (*supported)(void);
} variant_t;

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

static int resolve_threads(int threads)
{
#ifdef _OPENMP
    return threads > 0 ? threads : omp_get_max_threads();
#else
    (void)threads;
    return 1;
#endif
}

/* ------------------------------------------------------------------------ */
/* Packing of signs / bits (scalar, auto-vectorisable)                       */
/* ------------------------------------------------------------------------ */

INLINE int pack_f32_scalar(const float *x, int64_t k, uint64_t *out)
{
    int bad = 0;
    const int64_t W = cdiv(k, 64);
    for (int64_t wi = 0; wi < W; ++wi) {
        const int64_t j0 = wi * 64;
        const int n = (int)min64(64, k - j0);
        uint64_t word = 0;
        for (int j = 0; j < n; ++j) {
            const float v = x[j0 + j];
            word |= (uint64_t)(v >= 0.0f) << j;
            bad |= (v != v);
        }
        out[wi] = word;
    }
    return bad;
}

INLINE void pack_u8_scalar(const uint8_t *x, int64_t k, uint64_t *out)
{
    const int64_t W = cdiv(k, 64);
    for (int64_t wi = 0; wi < W; ++wi) {
        const int64_t j0 = wi * 64;
        const int n = (int)min64(64, k - j0);
        uint64_t word = 0;
        for (int j = 0; j < n; ++j)
            word |= (uint64_t)(x[j0 + j] != 0) << j;
        out[wi] = word;
    }
}

static int pack_f32_portable(const float *x, int64_t k, uint64_t *out)
{
    return pack_f32_scalar(x, k, out);
}

static void pack_u8_portable(const uint8_t *x, int64_t k, uint64_t *out)
{
    pack_u8_scalar(x, k, out);
}

static int pack_f64_row(const double *x, int64_t k, uint64_t *out)
{
    int bad = 0;
    const int64_t W = cdiv(k, 64);
    for (int64_t wi = 0; wi < W; ++wi) {
        const int64_t j0 = wi * 64;
        const int n = (int)min64(64, k - j0);
        uint64_t word = 0;
        for (int j = 0; j < n; ++j) {
            const double v = x[j0 + j];
            word |= (uint64_t)(v >= 0.0) << j;
            bad |= (v != v);
        }
        out[wi] = word;
    }
    return bad;
}

/* ------------------------------------------------------------------------ */
/* Panel packing of B                                                         */
/* ------------------------------------------------------------------------ */

/* Bp[(p * W + w) * nr + c] = B[(p * nr + c) * ldb + w], 0 for rows >= N. */
static void pack_panels(const uint64_t *B, int64_t ldb, int64_t N, int64_t W,
                        int nr, uint64_t *Bp)
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

/* Write one finished tile: out = kconst - 2 * P (xnor) or P (and). */
INLINE void store_tile_u64(const uint64_t *acc, int acc_ld, int mr, int nv,
                           int is_and, int64_t kconst, int32_t *out,
                           int64_t ldo)
{
    for (int r = 0; r < mr; ++r)
        for (int c = 0; c < nv; ++c) {
            const int64_t P = (int64_t)acc[r * acc_ld + c];
            out[r * ldo + c] = (int32_t)(is_and ? P : kconst - 2 * P);
        }
}

/* ------------------------------------------------------------------------ */
/* Scalar kernels (portable / POPCNT): MR = 4 rows x NR = 4 columns           */
/* ------------------------------------------------------------------------ */

#define S_MR 4
#define S_NR 4

INLINE uint64_t bop(uint64_t a, uint64_t b, const int is_and)
{
    return is_and ? (a & b) : (a ^ b);
}

INLINE void scalar_tile4(const uint64_t *A, int64_t lda, const uint64_t *bp,
                         int64_t W, const int is_and, uint64_t acc[S_MR * S_NR])
{
    uint64_t c00 = 0, c01 = 0, c02 = 0, c03 = 0, c10 = 0, c11 = 0, c12 = 0, c13 = 0;
    uint64_t c20 = 0, c21 = 0, c22 = 0, c23 = 0, c30 = 0, c31 = 0, c32 = 0, c33 = 0;
    const uint64_t *a0 = A, *a1 = A + lda, *a2 = A + 2 * lda, *a3 = A + 3 * lda;
    for (int64_t w = 0; w < W; ++w) {
        const uint64_t b0 = bp[w * S_NR + 0], b1 = bp[w * S_NR + 1];
        const uint64_t b2 = bp[w * S_NR + 2], b3 = bp[w * S_NR + 3];
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
                         const int is_and, uint64_t acc[S_NR])
{
    uint64_t c0 = 0, c1 = 0, c2 = 0, c3 = 0;
    for (int64_t w = 0; w < W; ++w) {
        const uint64_t a = a0[w];
        c0 += __builtin_popcountll(bop(a, bp[w * S_NR + 0], is_and));
        c1 += __builtin_popcountll(bop(a, bp[w * S_NR + 1], is_and));
        c2 += __builtin_popcountll(bop(a, bp[w * S_NR + 2], is_and));
        c3 += __builtin_popcountll(bop(a, bp[w * S_NR + 3], is_and));
    }
    acc[0] = c0; acc[1] = c1; acc[2] = c2; acc[3] = c3;
}

INLINE void scalar_block(const uint64_t *A, int64_t lda, int64_t mrows,
                         const uint64_t *Bp, int64_t p0, int64_t p1, int64_t N,
                         int64_t W, const int is_and, int64_t kconst,
                         int32_t *out, int64_t ldo)
{
    uint64_t acc[S_MR * S_NR];
    for (int64_t i = 0; i < mrows; i += S_MR) {
        const int mr = (int)min64(S_MR, mrows - i);
        for (int64_t p = p0; p < p1; ++p) {
            const uint64_t *bp = Bp + p * W * S_NR;
            const int64_t c0 = p * S_NR;
            const int nv = (int)min64(S_NR, N - c0);
            if (mr == S_MR)
                scalar_tile4(A + i * lda, lda, bp, W, is_and, acc);
            else
                for (int r = 0; r < mr; ++r)
                    scalar_tile1(A + (i + r) * lda, bp, W, is_and, acc + r * S_NR);
            store_tile_u64(acc, S_NR, mr, nv, is_and, kconst, out + i * ldo + c0, ldo);
        }
    }
}

static void block_portable(const uint64_t *A, int64_t lda, int64_t mrows,
                           const uint64_t *Bp, int64_t p0, int64_t p1, int64_t N,
                           int64_t W, int is_and, int64_t kconst, int32_t *out,
                           int64_t ldo)
{
    if (is_and)
        scalar_block(A, lda, mrows, Bp, p0, p1, N, W, 1, kconst, out, ldo);
    else
        scalar_block(A, lda, mrows, Bp, p0, p1, N, W, 0, kconst, out, ldo);
}

static int supported_always(void) { return 1; }

#if BHV_X86

/* ------------------------------------------------------------------------ */
/* POPCNT: the scalar kernels compiled for the popcnt instruction             */
/* ------------------------------------------------------------------------ */

#define POPCNT_ATTR __attribute__((target("popcnt")))

POPCNT_ATTR static void block_popcnt(const uint64_t *A, int64_t lda, int64_t mrows,
                                     const uint64_t *Bp, int64_t p0, int64_t p1,
                                     int64_t N, int64_t W, int is_and,
                                     int64_t kconst, int32_t *out, int64_t ldo)
{
    if (is_and)
        scalar_block(A, lda, mrows, Bp, p0, p1, N, W, 1, kconst, out, ldo);
    else
        scalar_block(A, lda, mrows, Bp, p0, p1, N, W, 0, kconst, out, ldo);
}

static int supported_popcnt(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("popcnt");
}

/* ------------------------------------------------------------------------ */
/* AVX2: nibble-lookup popcount, MR = 4 rows x NR = 4 columns                 */
/* ------------------------------------------------------------------------ */

#define AVX2_ATTR __attribute__((target("avx2,popcnt")))
#define A2_MR 4
#define A2_NR 4
/* Byte counters hold at most 8 per word; flush them every 31 words. */
#define A2_FLUSH 31

AVX2_ATTR INLINE __m256i a2_popcnt_bytes(__m256i x, __m256i lut, __m256i m4)
{
    const __m256i lo = _mm256_and_si256(x, m4);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

AVX2_ATTR INLINE __m256i a2_op(__m256i a, __m256i b, const int is_and)
{
    return is_and ? _mm256_and_si256(a, b) : _mm256_xor_si256(a, b);
}

/* acc[r] lanes c = popcount sum of row r against panel column c. */
AVX2_ATTR INLINE void a2_tile(const uint64_t *A, int64_t lda, const int R,
                              const uint64_t *bp, int64_t W, const int is_and,
                              __m256i acc[A2_MR])
{
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i zero = _mm256_setzero_si256();
    for (int r = 0; r < R; ++r)
        acc[r] = zero;
    for (int64_t w0 = 0; w0 < W; w0 += A2_FLUSH) {
        const int64_t w1 = min64(W, w0 + A2_FLUSH);
        __m256i s[A2_MR];
        for (int r = 0; r < R; ++r)
            s[r] = zero;
        for (int64_t w = w0; w < w1; ++w) {
            const __m256i vb = _mm256_loadu_si256((const __m256i *)(bp + w * A2_NR));
            for (int r = 0; r < R; ++r) {
                const __m256i va = _mm256_set1_epi64x((long long)A[r * lda + w]);
                s[r] = _mm256_add_epi8(s[r], a2_popcnt_bytes(a2_op(va, vb, is_and), lut, m4));
            }
        }
        for (int r = 0; r < R; ++r)
            acc[r] = _mm256_add_epi64(acc[r], _mm256_sad_epu8(s[r], zero));
    }
}

AVX2_ATTR INLINE void a2_block(const uint64_t *A, int64_t lda, int64_t mrows,
                               const uint64_t *Bp, int64_t p0, int64_t p1,
                               int64_t N, int64_t W, const int is_and,
                               int64_t kconst, int32_t *out, int64_t ldo)
{
    __m256i acc[A2_MR];
    uint64_t tmp[A2_MR * A2_NR];
    const __m256i kv = _mm256_set1_epi64x((long long)kconst);
    const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    for (int64_t i = 0; i < mrows; i += A2_MR) {
        const int mr = (int)min64(A2_MR, mrows - i);
        for (int64_t p = p0; p < p1; ++p) {
            const uint64_t *bp = Bp + p * W * A2_NR;
            const int64_t c0 = p * A2_NR;
            const int nv = (int)min64(A2_NR, N - c0);
            if (mr == A2_MR) {
                a2_tile(A + i * lda, lda, A2_MR, bp, W, is_and, acc);
            } else {
                for (int r = 0; r < mr; ++r)
                    a2_tile(A + (i + r) * lda, lda, 1, bp, W, is_and, acc + r);
            }
            int32_t *o = out + i * ldo + c0;
            if (nv == A2_NR) {
                for (int r = 0; r < mr; ++r) {
                    const __m256i res = is_and ? acc[r] : _mm256_sub_epi64(kv, _mm256_slli_epi64(acc[r], 1));
                    /* low 32 bits of the 4 lanes -> 4 int32 */
                    const __m256i lo = _mm256_permutevar8x32_epi32(res, idx);
                    _mm_storeu_si128((__m128i *)(o + r * ldo), _mm256_castsi256_si128(lo));
                }
            } else {
                for (int r = 0; r < mr; ++r)
                    _mm256_storeu_si256((__m256i *)(tmp + r * A2_NR), acc[r]);
                store_tile_u64(tmp, A2_NR, mr, nv, is_and, kconst, o, ldo);
            }
        }
    }
}

AVX2_ATTR static void block_avx2(const uint64_t *A, int64_t lda, int64_t mrows,
                                 const uint64_t *Bp, int64_t p0, int64_t p1,
                                 int64_t N, int64_t W, int is_and, int64_t kconst,
                                 int32_t *out, int64_t ldo)
{
    if (is_and)
        a2_block(A, lda, mrows, Bp, p0, p1, N, W, 1, kconst, out, ldo);
    else
        a2_block(A, lda, mrows, Bp, p0, p1, N, W, 0, kconst, out, ldo);
}

AVX2_ATTR static int pack_f32_avx2(const float *x, int64_t k, uint64_t *out)
{
    const int64_t W = cdiv(k, 64);
    const int64_t Wfull = k / 64;
    const __m256 zero = _mm256_setzero_ps();
    __m256 nan = _mm256_setzero_ps();
    for (int64_t wi = 0; wi < Wfull; ++wi) {
        const float *xp = x + wi * 64;
        uint64_t word = 0;
        for (int q = 0; q < 8; ++q) {
            const __m256 v = _mm256_loadu_ps(xp + 8 * q);
            const unsigned m = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GE_OQ));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            word |= (uint64_t)m << (8 * q);
        }
        out[wi] = word;
    }
    int bad = _mm256_movemask_ps(nan) != 0;
    if (W > Wfull)
        bad |= pack_f32_scalar(x + Wfull * 64, k - Wfull * 64, out + Wfull);
    return bad;
}

AVX2_ATTR static void pack_u8_avx2(const uint8_t *x, int64_t k, uint64_t *out)
{
    const int64_t W = cdiv(k, 64);
    const int64_t Wfull = k / 64;
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t wi = 0; wi < Wfull; ++wi) {
        const uint8_t *xp = x + wi * 64;
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)xp);
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(xp + 32));
        const uint32_t z0 = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(v0, zero));
        const uint32_t z1 = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(v1, zero));
        out[wi] = ~((uint64_t)z0 | ((uint64_t)z1 << 32));
    }
    if (W > Wfull)
        pack_u8_scalar(x + Wfull * 64, k - Wfull * 64, out + Wfull);
}

/* Means of 8 consecutive floats, n8 groups of 64 (8 means each): an 8x8 transpose,
 * then the rows summed in order t = 0..7 -- the same additions as the scalar loop. */
AVX2_ATTR static void pool8_avx2(const float *v, int64_t n8, float inv, float *out)
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
        __m256 acc = e[0];
        for (int i = 1; i < 8; ++i)
            acc = _mm256_add_ps(acc, e[i]);
        _mm256_storeu_ps(out + 8 * g, _mm256_mul_ps(acc, vinv));
    }
}

static int supported_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
}

/* ------------------------------------------------------------------------ */
/* AVX-512 VPOPCNTDQ: MR = 8 rows x NR = 8 columns                            */
/* ------------------------------------------------------------------------ */

#define AVX512_ATTR __attribute__((target("avx512f,avx512vpopcntdq,avx2,popcnt")))
#define A5_MR 8
#define A5_NR 8

AVX512_ATTR INLINE __m512i a5_op(__m512i a, __m512i b, const int is_and)
{
    return is_and ? _mm512_and_si512(a, b) : _mm512_xor_si512(a, b);
}

AVX512_ATTR INLINE void a5_tile(const uint64_t *A, int64_t lda, const int R,
                                const uint64_t *bp, int64_t W, const int is_and,
                                __m512i acc[A5_MR])
{
    for (int r = 0; r < R; ++r)
        acc[r] = _mm512_setzero_si512();
    for (int64_t w = 0; w < W; ++w) {
        const __m512i vb = _mm512_loadu_si512((const void *)(bp + w * A5_NR));
        for (int r = 0; r < R; ++r) {
            const __m512i va = _mm512_set1_epi64((long long)A[r * lda + w]);
            acc[r] = _mm512_add_epi64(acc[r], _mm512_popcnt_epi64(a5_op(va, vb, is_and)));
        }
    }
}

AVX512_ATTR INLINE void a5_block(const uint64_t *A, int64_t lda, int64_t mrows,
                                 const uint64_t *Bp, int64_t p0, int64_t p1,
                                 int64_t N, int64_t W, const int is_and,
                                 int64_t kconst, int32_t *out, int64_t ldo)
{
    __m512i acc[A5_MR];
    uint64_t tmp[A5_MR * A5_NR];
    const __m512i kv = _mm512_set1_epi64((long long)kconst);
    for (int64_t i = 0; i < mrows; i += A5_MR) {
        const int mr = (int)min64(A5_MR, mrows - i);
        for (int64_t p = p0; p < p1; ++p) {
            const uint64_t *bp = Bp + p * W * A5_NR;
            const int64_t c0 = p * A5_NR;
            const int nv = (int)min64(A5_NR, N - c0);
            if (mr == A5_MR) {
                a5_tile(A + i * lda, lda, A5_MR, bp, W, is_and, acc);
            } else {
                for (int r = 0; r < mr; ++r)
                    a5_tile(A + (i + r) * lda, lda, 1, bp, W, is_and, acc + r);
            }
            int32_t *o = out + i * ldo + c0;
            if (nv == A5_NR) {
                for (int r = 0; r < mr; ++r) {
                    const __m512i res = is_and ? acc[r]
                                               : _mm512_sub_epi64(kv, _mm512_slli_epi64(acc[r], 1));
                    _mm256_storeu_si256((__m256i *)(o + r * ldo), _mm512_cvtepi64_epi32(res));
                }
            } else {
                for (int r = 0; r < mr; ++r)
                    _mm512_storeu_si512((void *)(tmp + r * A5_NR), acc[r]);
                store_tile_u64(tmp, A5_NR, mr, nv, is_and, kconst, o, ldo);
            }
        }
    }
}

AVX512_ATTR static void block_avx512(const uint64_t *A, int64_t lda, int64_t mrows,
                                     const uint64_t *Bp, int64_t p0, int64_t p1,
                                     int64_t N, int64_t W, int is_and,
                                     int64_t kconst, int32_t *out, int64_t ldo)
{
    if (is_and)
        a5_block(A, lda, mrows, Bp, p0, p1, N, W, 1, kconst, out, ldo);
    else
        a5_block(A, lda, mrows, Bp, p0, p1, N, W, 0, kconst, out, ldo);
}

static int supported_avx512(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
}

#endif /* BHV_X86 */

#if defined(__aarch64__)
/* ------------------------------------------------------------------------ */
/* NEON (AArch64): vcntq_u8 byte popcounts, MR = 4 rows x NR = 4 columns      */
/* ------------------------------------------------------------------------ */
#include <arm_neon.h>

#define NE_MR 4
#define NE_NR 4
/* Byte counters hold at most 8 per word; flush them every 31 words. */
#define NE_FLUSH 31

INLINE uint8x16_t ne_op(uint64x2_t a, uint64x2_t b, const int is_and)
{
    return vreinterpretq_u8_u64(is_and ? vandq_u64(a, b) : veorq_u64(a, b));
}

/* acc[r][h] lanes = popcount sums of row r against panel columns 2h, 2h + 1. */
INLINE void ne_tile(const uint64_t *A, int64_t lda, const int R, const uint64_t *bp, int64_t W,
                    const int is_and, uint64x2_t acc[NE_MR][2])
{
    for (int r = 0; r < R; ++r)
        acc[r][0] = acc[r][1] = vdupq_n_u64(0);
    for (int64_t w0 = 0; w0 < W; w0 += NE_FLUSH) {
        const int64_t w1 = min64(W, w0 + NE_FLUSH);
        uint8x16_t s[NE_MR][2];
        for (int r = 0; r < R; ++r)
            s[r][0] = s[r][1] = vdupq_n_u8(0);
        for (int64_t w = w0; w < w1; ++w) {
            const uint64x2_t b0 = vld1q_u64(bp + w * NE_NR), b1 = vld1q_u64(bp + w * NE_NR + 2);
            for (int r = 0; r < R; ++r) {
                const uint64x2_t a = vdupq_n_u64(A[r * lda + w]);
                s[r][0] = vaddq_u8(s[r][0], vcntq_u8(ne_op(a, b0, is_and)));
                s[r][1] = vaddq_u8(s[r][1], vcntq_u8(ne_op(a, b1, is_and)));
            }
        }
        for (int r = 0; r < R; ++r)
            for (int h = 0; h < 2; ++h)
                acc[r][h] = vpadalq_u32(acc[r][h], vpaddlq_u16(vpaddlq_u8(s[r][h])));
    }
}

INLINE void ne_block(const uint64_t *A, int64_t lda, int64_t mrows, const uint64_t *Bp, int64_t p0, int64_t p1,
                     int64_t N, int64_t W, const int is_and, int64_t kconst, int32_t *out, int64_t ldo)
{
    uint64x2_t acc[NE_MR][2];
    uint64_t tmp[NE_MR * NE_NR];
    for (int64_t i = 0; i < mrows; i += NE_MR) {
        const int mr = (int)min64(NE_MR, mrows - i);
        for (int64_t p = p0; p < p1; ++p) {
            const uint64_t *bp = Bp + p * W * NE_NR;
            const int64_t c0 = p * NE_NR;
            const int nv = (int)min64(NE_NR, N - c0);
            if (mr == NE_MR)
                ne_tile(A + i * lda, lda, NE_MR, bp, W, is_and, acc);
            else
                for (int r = 0; r < mr; ++r)
                    ne_tile(A + (i + r) * lda, lda, 1, bp, W, is_and, acc + r);
            for (int r = 0; r < mr; ++r) {
                vst1q_u64(tmp + r * NE_NR, acc[r][0]);
                vst1q_u64(tmp + r * NE_NR + 2, acc[r][1]);
            }
            store_tile_u64(tmp, NE_NR, mr, nv, is_and, kconst, out + i * ldo + c0, ldo);
        }
    }
}

static void block_neon(const uint64_t *A, int64_t lda, int64_t mrows, const uint64_t *Bp, int64_t p0, int64_t p1,
                       int64_t N, int64_t W, int is_and, int64_t kconst, int32_t *out, int64_t ldo)
{
    if (is_and)
        ne_block(A, lda, mrows, Bp, p0, p1, N, W, 1, kconst, out, ldo);
    else
        ne_block(A, lda, mrows, Bp, p0, p1, N, W, 0, kconst, out, ldo);
}
#endif /* __aarch64__ */

/* ------------------------------------------------------------------------ */
/* Dispatch                                                                   */
/* ------------------------------------------------------------------------ */

/* Ordered from least to most preferred. */
static const variant_t VARIANTS[] = {
    {"c-portable", S_NR, S_MR, block_portable, pack_f32_portable, pack_u8_portable, supported_always},
#if BHV_X86
    {"c-popcnt", S_NR, S_MR, block_popcnt, pack_f32_portable, pack_u8_portable, supported_popcnt},
    {"c-avx2", A2_NR, A2_MR, block_avx2, pack_f32_avx2, pack_u8_avx2, supported_avx2},
    {"c-avx512-vpopcntdq", A5_NR, A5_MR, block_avx512, pack_f32_avx2, pack_u8_avx2, supported_avx512},
#endif
#if defined(__aarch64__)
    {"c-neon", NE_NR, NE_MR, block_neon, pack_f32_portable, pack_u8_portable, supported_always},
#endif
};
#define N_VARIANTS ((int)(sizeof(VARIANTS) / sizeof(VARIANTS[0])))

static const variant_t *g_variant = &VARIANTS[0];

static const variant_t *best_variant(void)
{
    for (int i = N_VARIANTS - 1; i > 0; --i)
        if (VARIANTS[i].supported())
            return &VARIANTS[i];
    return &VARIANTS[0];
}

__attribute__((constructor)) static void bhv_init(void) { g_variant = best_variant(); }

EXPORT int bhv_abi_version(void) { return BHV_ABI_VERSION; }
EXPORT int bhv_num_variants(void) { return N_VARIANTS; }

EXPORT const char *bhv_variant_name(int i)
{
    return (i >= 0 && i < N_VARIANTS) ? VARIANTS[i].name : NULL;
}

EXPORT int bhv_variant_supported(int i)
{
    return (i >= 0 && i < N_VARIANTS) ? VARIANTS[i].supported() : 0;
}

EXPORT const char *bhv_backend(void) { return g_variant->name; }

/* name: a variant name or "auto". 0 = ok, -1 = unknown name, -2 = not supported here. */
EXPORT int bhv_select(const char *name)
{
    if (name == NULL || strcmp(name, "auto") == 0) {
        g_variant = best_variant();
        return 0;
    }
    for (int i = 0; i < N_VARIANTS; ++i)
        if (strcmp(name, VARIANTS[i].name) == 0) {
            if (!VARIANTS[i].supported())
                return -2;
            g_variant = &VARIANTS[i];
            return 0;
        }
    return -1;
}

EXPORT int bhv_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

EXPORT int bhv_max_threads(void) { return resolve_threads(0); }

/* ------------------------------------------------------------------------ */
/* Packing                                                                    */
/* ------------------------------------------------------------------------ */

/* x: rows x k floats -> out: rows x ceil(k/64) words. Returns 1 if any NaN. */
EXPORT int bhv_pack_signs_f32(const float *x, int64_t rows, int64_t k, uint64_t *out, int threads)
{
    const variant_t *v = g_variant;
    const int64_t W = cdiv(k, 64);
    int bad = 0;
    const int nt = resolve_threads(threads);
    (void)nt;
#pragma omp parallel for schedule(static) reduction(| : bad) num_threads(nt) if (nt > 1 && rows > 1 && rows * k >= (1 << 18))
    for (int64_t r = 0; r < rows; ++r)
        bad |= v->pack_f32(x + r * k, k, out + r * W);
    return bad;
}

EXPORT int bhv_pack_signs_f64(const double *x, int64_t rows, int64_t k, uint64_t *out, int threads)
{
    const int64_t W = cdiv(k, 64);
    int bad = 0;
    const int nt = resolve_threads(threads);
    (void)nt;
#pragma omp parallel for schedule(static) reduction(| : bad) num_threads(nt) if (nt > 1 && rows > 1 && rows * k >= (1 << 18))
    for (int64_t r = 0; r < rows; ++r)
        bad |= pack_f64_row(x + r * k, k, out + r * W);
    return bad;
}

/* b: rows x k bytes (nonzero = 1) -> out: rows x ceil(k/64) words. */
EXPORT void bhv_pack_bits_u8(const uint8_t *b, int64_t rows, int64_t k, uint64_t *out, int threads)
{
    const variant_t *v = g_variant;
    const int64_t W = cdiv(k, 64);
    const int nt = resolve_threads(threads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && rows > 1 && rows * k >= (1 << 19))
    for (int64_t r = 0; r < rows; ++r)
        v->pack_u8(b + r * k, k, out + r * W);
}

/* ------------------------------------------------------------------------ */
/* GEMM                                                                       */
/* ------------------------------------------------------------------------ */

static int64_t colblock_panels(const variant_t *v, int64_t W)
{
    return max64(1, BHV_COLBLOCK_BYTES / (int64_t)(v->nr * max64(W, 1) * 8));
}

/* Single-threaded: rows [0, M) of A against all panels of Bp (N columns). */
static void gemm_serial(const variant_t *v, const uint64_t *A, int64_t lda, int64_t M,
                        const uint64_t *Bp, int64_t N, int64_t W, int is_and,
                        int64_t kconst, int32_t *out, int64_t ldo)
{
    const int64_t np = cdiv(N, v->nr);
    const int64_t cbp = colblock_panels(v, W);
    for (int64_t p0 = 0; p0 < np; p0 += cbp)
        v->block(A, lda, M, Bp, p0, min64(np, p0 + cbp), N, W, is_and, kconst, out, ldo);
}

/* --- pre-packed weight panels -------------------------------------------------- */

EXPORT int bhv_panels_pack(bhv_panels *p, const uint64_t *b, int64_t N, int64_t W)
{
    const variant_t *v = g_variant;
    const int64_t np = cdiv(max64(N, 1), v->nr);
    uint64_t *Bp = (uint64_t *)malloc((size_t)max64(1, np * max64(W, 1) * v->nr) * sizeof(uint64_t));
    if (!Bp)
        return -1;
    if (N > 0)
        pack_panels(b, W, N, W, v->nr, Bp);
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

EXPORT int bhv_panels_current(const bhv_panels *p) { return p->Bp != NULL && p->variant == (const void *)g_variant; }

/* out[m, n] = kconst - 2 * popcount(a[m] ^ b[n])  (is_and = 0)
 *           = popcount(a[m] & b[n])                (is_and = 1)
 * a: M x W (row-major, contiguous), panels of b: N x W, out: M x N. 0 = ok, -3 = the panels were
 * packed for another variant. */
static int gemm_pp(const uint64_t *a, const bhv_panels *pp, int64_t M, int is_and, int64_t kconst,
                   int32_t *out, int threads)
{
    const variant_t *v = g_variant;
    const int64_t N = pp->N, W = pp->W;
    if (M <= 0 || N <= 0)
        return 0;
    if (pp->variant != (const void *)v)
        return -3;
    const uint64_t *Bp = pp->Bp;
    const int64_t mr = v->mr;
    const int64_t np = cdiv(N, v->nr);
    int nt = resolve_threads(threads);
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

/* ------------------------------------------------------------------------ */
/* Grouped / dilated / strided 2-D convolution of +-1 maps (zero padding)    */
/* ------------------------------------------------------------------------ */

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
    const variant_t *v = g_variant;
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
        pack_panels(wd + g * cpo * Kw, Kw, cpo, Kw, (int)nr, Bp + g * npg * Kw * nr);
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

EXPORT int bhv_conv_current(const bhv_conv *c) { return c->Bp != NULL && c->variant == (const void *)g_variant; }

/* x: B x H x Wd x G x Wg words; out: B x Ho x Wo x Cout int32 (see bhv_xnor_conv2d).
 * -3: prepared for another variant. */
EXPORT int bhv_xnor_conv2d_pp(const uint64_t *x, const bhv_conv *c, int64_t B, int64_t H, int64_t Wd,
                              int64_t stride, int64_t pad, int64_t dil, int64_t Ho, int64_t Wo, int32_t *out,
                              int threads)
{
    const variant_t *v = g_variant;
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
    int nt = resolve_threads(threads);
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
                gemm_serial(v, buf + g * gstride, Kw, q1 - q0, Bp + g * npg * Kw * nr, cpo, Kw, 0,
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

/* ------------------------------------------------------------------------ */
/* Float glue of the BHViT forward pass                                      */
/* ------------------------------------------------------------------------ */
/*
 * Each glue kernel is an always-inline per-row worker compiled twice: for the
 * baseline target and with AVX2 (+POPCNT).  The AVX2 copy runs whenever an AVX2
 * or AVX-512 GEMM variant is selected (they share pack_f32_avx2).  The build uses
 * -ffp-contract=off and no fast-math, so both copies round identically.
 */
#if BHV_X86
#define GLUE_FAST_ATTR __attribute__((target("avx2,popcnt")))
static int glue_fast(void) { return g_variant->pack_f32 == pack_f32_avx2; }
#else
#define GLUE_FAST_ATTR
static int glue_fast(void) { return 0; }
static void pool8_avx2(const float *v, int64_t n8, float inv, float *out)
{
    (void)v, (void)n8, (void)inv, (void)out; /* never called: glue_fast() is 0 */
}
#endif

#define GLUE_VARIANTS(name, params, args)                                          \
    static void name##_base params { name##_impl args; }                           \
    GLUE_FAST_ATTR static void name##_fast params { name##_impl args; }

/* --- fused epilogue of a binary layer -------------------------------------- */
/*
 * y[r, j] = post(act(dot[r, j] * scale[j] + shift[j] + shortcut(r, j)))
 *   shortcut: sc == NULL -> none; sc_c == n -> identity; sc_c < n -> the input
 *             tiled (sc[r, j % sc_c]); sc_c > n -> mean of sc_c / n consecutive
 *             channels (sc[r, j*k .. j*k+k-1]).
 *   act:      m1 == NULL -> identity; else RPReLU: y = v - m1; y = y >= 0 ? y :
 *             y * slope; y + m2.
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
    float *out;
    const float *nb;   /* epilogue_pack: next layer's input bias (or NULL) */
    uint64_t *bits;    /* epilogue_pack: rows x ceil(n/64) words */
    float *pool;       /* epilogue_pack: rows x n/pool_k means (or NULL) */
    int64_t pool_k;
    float pool_inv;
    pack_f32_fn pack;
    int fast;          /* AVX2 helpers allowed (glue_fast()) */
} epi_args;

INLINE float group_mean(const float *x, int64_t k, float inv_k)
{
    float acc = 0.0f;
    for (int64_t t = 0; t < k; ++t)
        acc += x[t];
    return acc * inv_k;
}

/* One fused pass over segments of the row (the whole row, or the repeats of a tiled
 * shortcut).  HAS is a compile-time mask (1 shortcut, 2 RPReLU, 4 LayerScale,
 * 8 residual): epi_fused dispatches to one specialised, vectorised loop per mask. */
INLINE void epi_loop(const int HAS, const int32_t *restrict d, const float *restrict scale,
                     const float *restrict shift, const float *restrict s, int64_t seg, int64_t n,
                     const float *restrict m1, const float *restrict slope, const float *restrict m2,
                     const float *restrict ps, const float *restrict pb, const float *rr, float *v)
{
    for (int64_t rep = 0; rep < n; rep += seg) {
        const int32_t *restrict dd = d + rep;
        const float *restrict sc = scale + rep, *restrict sh = shift + rep;
        const float *restrict a1 = m1 + ((HAS & 2) ? rep : 0), *restrict a2 = slope + ((HAS & 2) ? rep : 0);
        const float *restrict a3 = m2 + ((HAS & 2) ? rep : 0);
        const float *restrict p1 = ps + ((HAS & 4) ? rep : 0), *restrict p2 = pb + ((HAS & 4) ? rep : 0);
        const float *r0 = rr + ((HAS & 8) ? rep : 0);
        float *vv = v + rep;
        for (int64_t j = 0; j < seg; ++j) {
            float x = (float)dd[j] * sc[j] + sh[j];
            if (HAS & 1)
                x += s[j];
            if (HAS & 2) {
                /* PReLU as numpy's max(y, 0) + min(y, 0) * slope (compare + blend, vectorised);
                 * NaN stays NaN and +-inf give +-inf like numpy (0.5 (y - |y|) made inf NaN) */
                const float y = x - a1[j];
                const float pos = y < 0.0f ? 0.0f : y, neg = y < 0.0f ? y : 0.0f;
                x = pos + neg * a2[j] + a3[j];
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
        /* channel-pool shortcut: the group means first, into the second half of buf */
        float *means = buf + n;
        for (int64_t j = 0; j < n; ++j)
            means[j] = group_mean(s + j * a->k, a->k, a->inv_k);
        epi_fused(d, a->scale, a->shift, means, n, n, a->m1, a->slope, a->m2, a->ps, a->pb, rr, v);
    } else if (s != NULL) {
        epi_fused(d, a->scale, a->shift, s, a->sc_c, n, a->m1, a->slope, a->m2, a->ps, a->pb, rr, v);
    } else {
        epi_fused(d, a->scale, a->shift, NULL, n, n, a->m1, a->slope, a->m2, a->ps, a->pb, rr, v);
    }
    if (o != NULL)
        return;
    if (a->pool != NULL && a->fast && a->pool_k == 8 && (n / 8) % 8 == 0) {
        pool8_avx2(v, n / 64, a->pool_inv, a->pool + r * (n / 8));
    } else if (a->pool != NULL) {
        /* group_mean's order (t = 0, 1, ...), looped so the j loop vectorises */
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
    if (a->nb != NULL)
        for (int64_t j = 0; j < n; ++j)
            v[j] += a->nb[j];
    *bad |= a->pack(v, n, a->bits + r * cdiv(n, 64)); /* NaN: reported, as by bhv_pack_signs_f32 */
}
GLUE_VARIANTS(epi_row, (const epi_args *a, int64_t r, float *buf, int *bad), (a, r, buf, bad))

static int epi_run(const epi_args *a, int64_t rows, int threads)
{
    const int nt = resolve_threads(threads);
    void (*row)(const epi_args *, int64_t, float *, int *) = glue_fast() ? epi_row_fast : epi_row_base;
    int failed = 0, bad = 0;
    (void)nt;
#pragma omp parallel num_threads(nt) if (nt > 1 && rows * a->n >= (1 << 16)) reduction(| : failed, bad)
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
    if (sc != NULL && !(sc_c == n || (sc_c < n && n % sc_c == 0) || (sc_c > n && sc_c % n == 0)))
        return -2;
    memset(a, 0, sizeof(*a));
    a->dot = dot;
    a->n = n;
    a->scale = scale;
    a->shift = shift;
    a->sc = sc;
    a->sc_c = sc_c;
    a->k = (sc != NULL && sc_c > n) ? sc_c / n : 1;
    a->inv_k = 1.0f / (float)a->k;
    a->m1 = m1;
    a->slope = slope;
    a->m2 = m2;
    a->ps = ps;
    a->pb = pb;
    a->pack = g_variant->pack_f32;
    a->fast = glue_fast();
    return 0;
}

EXPORT int bhv_epilogue(const int32_t *dot, int64_t rows, int64_t n, const float *scale,
                        const float *shift, const float *sc, int64_t sc_c, const float *m1,
                        const float *slope, const float *m2, const float *ps, const float *pb,
                        const float *res, float *out, int threads)
{
    epi_args a;
    if (epi_init(&a, dot, n, scale, shift, sc, sc_c, m1, slope, m2, ps, pb))
        return -2;
    a.res = res;
    a.out = out;
    return epi_run(&a, rows, threads);
}

EXPORT int bhv_epilogue_pack(const int32_t *dot, int64_t rows, int64_t n, const float *scale,
                             const float *shift, const float *sc, int64_t sc_c, const float *m1,
                             const float *slope, const float *m2, const float *nb, uint64_t *bits,
                             int64_t pool_k, float *pool, int threads)
{
    epi_args a;
    if (epi_init(&a, dot, n, scale, shift, sc, sc_c, m1, slope, m2, NULL, NULL))
        return -2;
    if (pool != NULL && (pool_k < 1 || n % pool_k != 0))
        return -2;
    a.nb = nb;
    a.bits = bits;
    a.pool = pool;
    a.pool_k = pool_k;
    a.pool_inv = 1.0f / (float)max64(pool_k, 1);
    return epi_run(&a, rows, threads);
}

/* --- input bias + sign packing -------------------------------------------- */
/* sign bits of ((x * scale + shift) + bias) per row: a folded norm and the input bias
 * of a binary layer fused into its packing (scale/shift may be NULL: x + bias).
 * x: rows x k; scale, shift, bias: prow x k, row r uses row r % prow (channel groups
 * or heads packed separately).  Returns 1 if any NaN, -1 out of memory. */
INLINE void packb_row_impl(const float *x, const float *sc, const float *sh, const float *b, int64_t k,
                           float *buf, pack_f32_fn pack, uint64_t *out, int *bad)
{
    if (sc != NULL) {
        for (int64_t j = 0; j < k; ++j)
            buf[j] = (x[j] * sc[j] + sh[j]) + b[j];
    } else {
        for (int64_t j = 0; j < k; ++j)
            buf[j] = x[j] + b[j];
    }
    *bad |= pack(buf, k, out);
}
GLUE_VARIANTS(packb_row, (const float *x, const float *sc, const float *sh, const float *b, int64_t k,
                          float *buf, pack_f32_fn pack, uint64_t *out, int *bad),
              (x, sc, sh, b, k, buf, pack, out, bad))

EXPORT int bhv_pack_signs_bias_f32(const float *x, int64_t rows, int64_t k, const float *scale,
                                   const float *shift, const float *bias, int64_t prow,
                                   uint64_t *out, int threads)
{
    const pack_f32_fn pack = g_variant->pack_f32;
    void (*row)(const float *, const float *, const float *, const float *, int64_t, float *, pack_f32_fn,
                uint64_t *, int *) = glue_fast() ? packb_row_fast : packb_row_base;
    const int64_t W = cdiv(k, 64);
    const int nt = resolve_threads(threads);
    int bad = 0, failed = 0;
    (void)nt;
    if (prow < 1 || rows % prow != 0 || (scale == NULL) != (shift == NULL))
        return -2;
#pragma omp parallel num_threads(nt) if (nt > 1 && rows > 1 && rows * k >= (1 << 18)) reduction(| : bad, failed)
    {
        float *buf = (float *)malloc((size_t)max64(k, 1) * sizeof(float));
        if (buf == NULL)
            failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            if (buf == NULL)
                continue;
            const int64_t o = (r % prow) * k;
            row(x + r * k, scale != NULL ? scale + o : NULL, shift != NULL ? shift + o : NULL, bias + o, k, buf,
                pack, out + r * W, &bad);
        }
        free(buf);
    }
    return failed ? -1 : bad;
}

/* --- GELU -------------------------------------------------------------------- */
/* out = GELU(x) = 0.5 x (1 + erf(x / sqrt 2)), n values. */
EXPORT void bhv_gelu(const float *x, int64_t n, float *out, int threads)
{
    const int nt = resolve_threads(threads);
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
    const int nt = resolve_threads(threads);
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
    const int nt = resolve_threads(threads);
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
    epi_args base;
    if (epi_init(&base, NULL, N, t->scale, t->shift, t->sc, t->sc_c, t->m1, t->slope, t->m2, t->ps, t->pb))
        return -2;
    if ((t->out == NULL) == (t->bits == NULL))
        return -2;
    if (t->pool != NULL && (t->bits == NULL || t->pool_k < 1 || N % t->pool_k != 0))
        return -2;
    base.res = t->res;
    base.out = t->out;
    base.nb = t->nb;
    base.bits = t->bits;
    base.pool = t->pool;
    base.pool_k = t->pool_k;
    base.pool_inv = 1.0f / (float)max64(t->pool_k, 1);
    if (M <= 0 || N <= 0)
        return 0;
    const variant_t *v = g_variant;
    if (pp->variant != (const void *)v)
        return -3;
    const uint64_t *Bp = pp->Bp;
    void (*row)(const epi_args *, int64_t, float *, int *) = glue_fast() ? epi_row_fast : epi_row_base;
    int nt = resolve_threads(threads);
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
            gemm_serial(v, a + r0 * W, W, rows, Bp, N, W, 0, k, dot, N);
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
    return failed ? -1 : bad; /* 1: a packed value was NaN (bits != NULL) */
}

/* The flat form of bhv_binary_linear_pp for ctypes: packs b's panels for this call. */
EXPORT int bhv_binary_linear(const uint64_t *a, int64_t M, int64_t W, int64_t k, const uint64_t *b,
                             int64_t N, const float *scale, const float *shift, const float *sc,
                             int64_t sc_c, const float *m1, const float *slope, const float *m2,
                             const float *ps, const float *pb, const float *res, float *out,
                             const float *nb, uint64_t *bits, int64_t pool_k, float *pool,
                             int threads)
{
    const bhv_transform t = {scale, shift, sc, sc_c, m1, slope, m2, ps, pb, res, out, nb, bits, pool_k, pool};
    if (M <= 0 || N <= 0)
        return ((out == NULL) == (bits == NULL)) ? -2 : 0;
    bhv_panels pp;
    if (bhv_panels_pack(&pp, b, N, W))
        return -1;
    const int rc = bhv_binary_linear_pp(a, M, k, &pp, &t, threads);
    bhv_panels_free(&pp);
    return rc;
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
    const int nt = resolve_threads(threads);
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
    const int nt = resolve_threads(threads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && rows > 1 && rows * k * n >= (1 << 18))
    for (int64_t r = 0; r < rows; ++r)
        row(x + r * k, k, wt, n, bias, out + r * n);
}
