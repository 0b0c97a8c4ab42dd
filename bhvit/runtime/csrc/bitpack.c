/*
 * bitpack.c -- packing of signs (floats) and bits (bytes) into uint64 words: one row of
 * k values -> ceil(k / 64) words, element j at bit j % 64 of word j / 64, bit 1 for
 * x >= 0 (-0.0 included), padding bits 0.  A NaN packs as 0 and is reported.
 */
#include "core.h"

/* The scalar sign packer for one float type (auto-vectorisable). */
#define DEFINE_PACK_SIGNS(name, T)                                                   \
    INLINE int name(const T *x, int64_t k, uint64_t *out)                            \
    {                                                                                \
        int bad = 0;                                                                 \
        const int64_t W = cdiv(k, 64);                                               \
        for (int64_t wi = 0; wi < W; ++wi) {                                         \
            const int64_t j0 = wi * 64;                                              \
            const int n = (int)min64(64, k - j0);                                    \
            uint64_t word = 0;                                                       \
            for (int j = 0; j < n; ++j) {                                            \
                const T v = x[j0 + j];                                               \
                word |= (uint64_t)(v >= (T)0) << j;                                  \
                bad |= (v != v);                                                     \
            }                                                                        \
            out[wi] = word;                                                          \
        }                                                                            \
        return bad;                                                                  \
    }
DEFINE_PACK_SIGNS(pack_f32_scalar, float)
DEFINE_PACK_SIGNS(pack_f64_scalar, double)

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

BHVI int bhvi_pack_f32_portable(const float *x, int64_t k, uint64_t *out)
{
    return pack_f32_scalar(x, k, out);
}

BHVI void bhvi_pack_u8_portable(const uint8_t *x, int64_t k, uint64_t *out)
{
    pack_u8_scalar(x, k, out);
}

#if BHV_X86
#define AVX2_ATTR __attribute__((target("avx2,popcnt")))

AVX2_ATTR BHVI int bhvi_pack_f32_avx2(const float *x, int64_t k, uint64_t *out)
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

/* AVX-512: the compare writes the 16 sign bits of a vector straight into a mask register. */
__attribute__((target("avx512f,avx2,popcnt"))) BHVI int bhvi_pack_f32_avx512(const float *x, int64_t k,
                                                                               uint64_t *out)
{
    const int64_t W = cdiv(k, 64);
    const int64_t Wfull = k / 64;
    const __m512 zero = _mm512_setzero_ps();
    unsigned nan = 0;
    for (int64_t wi = 0; wi < Wfull; ++wi) {
        const float *xp = x + wi * 64;
        uint64_t word = 0;
        for (int q = 0; q < 4; ++q) {
            const __m512 v = _mm512_loadu_ps(xp + 16 * q);
            word |= (uint64_t)_mm512_cmp_ps_mask(v, zero, _CMP_GE_OQ) << (16 * q);
            nan |= (unsigned)_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        }
        out[wi] = word;
    }
    int bad = nan != 0;
    if (W > Wfull)
        bad |= pack_f32_scalar(x + Wfull * 64, k - Wfull * 64, out + Wfull);
    return bad;
}

AVX2_ATTR BHVI void bhvi_pack_u8_avx2(const uint8_t *x, int64_t k, uint64_t *out)
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
#endif /* BHV_X86 */

/* --- rows of signs and bits ------------------------------------------------- */
/* x: rows x k floats -> out: rows x ceil(k/64) words. Returns 1 if any NaN. */
#define DEFINE_PACK_ROWS(name, T, fn_t, packer)                                                     \
    EXPORT int name(const T *x, int64_t rows, int64_t k, uint64_t *out, int threads)                \
    {                                                                                               \
        const fn_t pk = packer; /* one variant for the whole call */                                \
        const int64_t W = cdiv(k, 64);                                                              \
        int bad = 0;                                                                                \
        const int nt = bhvi_threads(threads);                                                       \
        (void)nt;                                                                                   \
        _Pragma("omp parallel for schedule(static) reduction(| : bad) num_threads(nt) if (nt > 1 && rows > 1 && rows * k >= BHV_PAR_MIN_FLOATS)") \
        for (int64_t r = 0; r < rows; ++r)                                                          \
            bad |= pk(x + r * k, k, out + r * W);                                                   \
        return bad;                                                                                 \
    }
typedef int (*pack_f64_fn)(const double *x, int64_t k, uint64_t *out);
DEFINE_PACK_ROWS(bhv_pack_signs_f32, float, pack_f32_fn, bhvi_active->pack_f32)
DEFINE_PACK_ROWS(bhv_pack_signs_f64, double, pack_f64_fn, pack_f64_scalar)

/* b: rows x k bytes (nonzero = 1) -> out: rows x ceil(k/64) words. */
EXPORT void bhv_pack_bits_u8(const uint8_t *b, int64_t rows, int64_t k, uint64_t *out, int threads)
{
    const variant_t *v = bhvi_active;
    const int64_t W = cdiv(k, 64);
    const int nt = bhvi_threads(threads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && rows > 1 && rows * k >= (1 << 19))
    for (int64_t r = 0; r < rows; ++r)
        v->pack_u8(b + r * k, k, out + r * W);
}

/* --- input bias + sign packing -------------------------------------------- */
/* sign bits of ((x * scale + shift) + bias) per row: a folded norm and the input bias
 * of a binary layer fused into its packing (scale/shift may be NULL: x + bias).
 * x: rows x k; scale, shift, bias: prow x k, row r uses row r % prow (channel groups
 * or heads packed separately).  Returns 1 if any NaN (its bit is 0), -2 bad arguments.
 * One row function per instruction set, each straight from the floats to the words (no
 * staging buffer; rows shorter than a word, like MSGDC's 16-channel groups, are one
 * masked vector), with the same float operations in the same order. */
static int packb_row_base(const float *x, const float *sc, const float *sh, const float *b, int64_t k,
                          uint64_t *out)
{
    int bad = 0;
    for (int64_t wi = 0; wi < cdiv(k, 64); ++wi) {
        const int64_t j0 = wi * 64, n = min64(64, k - j0);
        uint64_t word = 0;
        for (int64_t j = j0; j < j0 + n; ++j) {
            const float v = sc != NULL ? (x[j] * sc[j] + sh[j]) + b[j] : x[j] + b[j];
            word |= (uint64_t)(v >= 0.0f) << (j - j0);
            bad |= v != v;
        }
        out[wi] = word;
    }
    return bad;
}

#if BHV_X86
/* 8 lanes a vector: whole words from eight unmasked vectors, the row's tail (and rows shorter
 * than a word) through masked loads (lanes past k give no bit). */
AVX2_ATTR INLINE __m256 packb_vec256(const float *x, const float *sc, const float *sh, const float *b, int64_t j)
{
    __m256 v = _mm256_loadu_ps(x + j);
    if (sc != NULL)
        v = _mm256_add_ps(_mm256_mul_ps(v, _mm256_loadu_ps(sc + j)), _mm256_loadu_ps(sh + j));
    return _mm256_add_ps(v, _mm256_loadu_ps(b + j));
}

AVX2_ATTR static int packb_row_avx2(const float *x, const float *sc, const float *sh, const float *b, int64_t k,
                                    uint64_t *out)
{
    const __m256 zero = _mm256_setzero_ps();
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 nan = _mm256_setzero_ps();
    int64_t wi = 0;
    for (; wi < k / 64; ++wi) {
        uint64_t word = 0;
        for (int q = 0; q < 8; q += 2) {
            const __m256 v0 = packb_vec256(x, sc, sh, b, wi * 64 + 8 * q);
            const __m256 v1 = packb_vec256(x, sc, sh, b, wi * 64 + 8 * q + 8);
            const unsigned m0 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v0, zero, _CMP_GE_OQ));
            const unsigned m1 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v1, zero, _CMP_GE_OQ));
            word |= (uint64_t)(m0 | m1 << 8) << (8 * q);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v0, v1, _CMP_UNORD_Q));
        }
        out[wi] = word;
    }
    if (wi * 64 < k) {
        uint64_t word = 0;
        for (int64_t q = 0; wi * 64 + 8 * q < k; ++q) {
            const int64_t j = wi * 64 + 8 * q;
            const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)min64(k - j, 8)), lane);
            __m256 v = _mm256_maskload_ps(x + j, m);
            if (sc != NULL)
                v = _mm256_add_ps(_mm256_mul_ps(v, _mm256_maskload_ps(sc + j, m)), _mm256_maskload_ps(sh + j, m));
            v = _mm256_add_ps(v, _mm256_maskload_ps(b + j, m)); /* 0 in the lanes past k */
            const __m256 ge = _mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_GE_OQ), _mm256_castsi256_ps(m));
            word |= (uint64_t)(unsigned)_mm256_movemask_ps(ge) << (8 * q);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        out[wi] = word;
    }
    return _mm256_movemask_ps(nan) != 0;
}

/* 16 lanes a vector: the compare writes the sign bits into a mask register.  Whole words take
 * four unmasked vectors; the row's tail, and rows shorter than a word, masked ones. */
#define AVX512_PACK_ATTR __attribute__((target("avx512f,avx2,popcnt")))

AVX512_PACK_ATTR INLINE __m512 packb_vec512(const float *x, const float *sc, const float *sh, const float *b,
                                            int64_t j, __mmask16 m)
{
    __m512 v = _mm512_maskz_loadu_ps(m, x + j);
    if (sc != NULL)
        v = _mm512_add_ps(_mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, sc + j)), _mm512_maskz_loadu_ps(m, sh + j));
    return _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, b + j));
}

AVX512_PACK_ATTR static int packb_row_avx512(const float *x, const float *sc, const float *sh, const float *b,
                                             int64_t k, uint64_t *out)
{
    const __m512 zero = _mm512_setzero_ps();
    __mmask16 nan = 0;
    int64_t wi = 0;
    for (; wi < k / 64; ++wi) {
        const int64_t j = wi * 64;
        const __m512 v0 = packb_vec512(x, sc, sh, b, j, 0xFFFF), v1 = packb_vec512(x, sc, sh, b, j + 16, 0xFFFF);
        const __m512 v2 = packb_vec512(x, sc, sh, b, j + 32, 0xFFFF), v3 = packb_vec512(x, sc, sh, b, j + 48, 0xFFFF);
        out[wi] = (uint64_t)_mm512_cmp_ps_mask(v0, zero, _CMP_GE_OQ) |
                  (uint64_t)_mm512_cmp_ps_mask(v1, zero, _CMP_GE_OQ) << 16 |
                  (uint64_t)_mm512_cmp_ps_mask(v2, zero, _CMP_GE_OQ) << 32 |
                  (uint64_t)_mm512_cmp_ps_mask(v3, zero, _CMP_GE_OQ) << 48;
        nan |= _mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v2, v3, _CMP_UNORD_Q);
    }
    if (wi * 64 < k) {
        uint64_t word = 0;
        for (int64_t q = 0; wi * 64 + 16 * q < k; ++q) {
            const int64_t j = wi * 64 + 16 * q, n = min64(k - j, 16);
            const __mmask16 m = (__mmask16)(n == 16 ? 0xFFFFu : (1u << n) - 1u);
            const __m512 v = packb_vec512(x, sc, sh, b, j, m);
            word |= (uint64_t)_mm512_mask_cmp_ps_mask(m, v, zero, _CMP_GE_OQ) << (16 * q);
            nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
        }
        out[wi] = word;
    }
    return nan != 0;
}
#endif

#if BHV_X86
/* Rows shorter than a word, of whole vectors (k = 16, 32 or 48: MSGDC's channel groups), on
 * AVX-512: one loop over the rows instead of a call per row; the operations of packb_row_avx512. */
AVX512_PACK_ATTR static int packb_short_avx512(const float *x, int64_t rows, int64_t k, const float *scale,
                                               const float *shift, const float *bias, int64_t prow, uint64_t *out)
{
    const __m512 zero = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = (r % prow) * k;
        const float *xr = x + r * k;
        uint64_t word = 0;
        for (int64_t j = 0; j < k; j += 16) {
            const __m512 v = packb_vec512(xr, scale != NULL ? scale + o : NULL, shift != NULL ? shift + o : NULL,
                                          bias + o, j, 0xFFFF);
            word |= (uint64_t)_mm512_cmp_ps_mask(v, zero, _CMP_GE_OQ) << j;
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        }
        out[r] = word;
    }
    return nan != 0;
}
#endif

BHVI packb_fn bhvi_packb(void)
{
#if BHV_X86
    return bhvi_active->glue_avx512 ? packb_row_avx512 : bhvi_active->glue_avx2 ? packb_row_avx2 : packb_row_base;
#else
    return packb_row_base;
#endif
}

EXPORT int bhv_pack_signs_bias_f32(const float *x, int64_t rows, int64_t k, const float *scale,
                                   const float *shift, const float *bias, int64_t prow,
                                   uint64_t *out, int threads)
{
    const packb_fn row = bhvi_packb();
    const int64_t W = cdiv(k, 64);
    const int nt = bhvi_threads(threads);
    int bad = 0;
    (void)nt;
    if (prow < 1 || rows % prow != 0 || (scale == NULL) != (shift == NULL))
        return -2;
#if BHV_X86
    if (bhvi_active->glue_avx512 && k < 64 && k % 16 == 0) {
        /* whole blocks of prow rows per thread, so each starts at parameter row 0 */
        const int64_t blocks = rows / prow, per = cdiv(blocks, nt);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && blocks > 1 && rows * k >= BHV_PAR_MIN_FLOATS) \
    reduction(| : bad)
        for (int t = 0; t < nt; ++t) {
            const int64_t b0 = t * per, nb = min64(per, blocks - b0);
            if (nb > 0)
                bad |= packb_short_avx512(x + b0 * prow * k, nb * prow, k, scale, shift, bias, prow, out + b0 * prow);
        }
        return bad;
    }
#endif
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && rows > 1 && rows * k >= BHV_PAR_MIN_FLOATS) \
    reduction(| : bad)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = (r % prow) * k;
        bad |= row(x + r * k, scale != NULL ? scale + o : NULL, shift != NULL ? shift + o : NULL, bias + o, k,
                   out + r * W);
    }
    return bad;
}

/* sign bits of x + bias per attention head, in the attention core's layout: x: (Bw, L, h * d)
 * floats, bias: h * d, out: (Bw, h, L, ceil(d/64)) words -- the heads split and moved to the
 * front while packing, with no float copy.  Returns 1 if any NaN, -2 bad arguments. */
EXPORT int bhv_pack_heads_f32(const float *x, int64_t Bw, int64_t L, int64_t h, int64_t d, const float *bias,
                              uint64_t *out, int threads)
{
    if (Bw < 0 || L < 0 || h < 1 || d < 1)
        return -2;
    const packb_fn row = bhvi_packb();
    const int64_t Wd = cdiv(d, 64), rows = Bw * L * h;
    const int nt = bhvi_threads(threads);
    int bad = 0;
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && rows * d >= BHV_PAR_MIN_FLOATS) \
    reduction(| : bad)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = r / (L * h), n = r / h % L, hd = r % h; /* x row r = (b, n, hd) */
        bad |= row(x + r * d, NULL, NULL, bias + hd * d, d, out + ((b * h + hd) * L + n) * Wd);
    }
    return bad;
}

/* a[i] bit j -> a[j] bit i for a 64 x 64 bit matrix: six rounds of swapping the off-diagonal
 * halves of ever smaller blocks (Hacker's Delight, 7-3). */
static void transpose64(uint64_t a[64])
{
    uint64_t m = 0x00000000FFFFFFFFull;
    for (int j = 32; j != 0; j >>= 1, m ^= m << j)
        for (int k = 0; k < 64; k = ((k | j) + 1) & ~j) {
            const uint64_t t = ((a[k] >> j) ^ a[k | j]) & m;
            a[k] ^= t << j;
            a[k | j] ^= t;
        }
}

/* sign bits of v + bias along the keys, per head, in the attention core's layout: v: (Bw, L, h * d)
 * floats, bias: h * d, out: (Bw, h, d, ceil(L/64)) words.  Per window and block of 64 keys the
 * rows are packed along the channels, then each 64 x 64 bit block is transposed.  Returns 1 if
 * any NaN, -1 out of memory, -2 bad arguments. */
EXPORT int bhv_pack_keys_f32(const float *v, int64_t Bw, int64_t L, int64_t h, int64_t d, const float *bias,
                             uint64_t *out, int threads)
{
    if (Bw < 0 || L < 0 || h < 1 || d < 1)
        return -2;
    const packb_fn row = bhvi_packb();
    const int64_t C = h * d, Wc = cdiv(C, 64), Wm = cdiv(L, 64), tasks = Bw * Wm;
    const int nt = bhvi_threads(threads);
    int bad = 0, failed = 0;
    (void)nt;
#pragma omp parallel num_threads(nt) if (nt > 1 && tasks > 1 && Bw * L * C >= BHV_PAR_MIN_FLOATS) \
    reduction(| : bad, failed)
    {
        uint64_t *blk = (uint64_t *)malloc((size_t)(64 * Wc) * sizeof(uint64_t));
        if (blk == NULL)
            failed = 1;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; ++t) {
            if (blk == NULL)
                continue;
            const int64_t b = t / Wm, kb = t % Wm, n0 = kb * 64, nn = min64(64, L - n0);
            for (int64_t i = 0; i < 64; ++i)
                if (i < nn)
                    bad |= row(v + (b * L + n0 + i) * C, NULL, NULL, bias, C, blk + i * Wc);
                else
                    memset(blk + i * Wc, 0, (size_t)Wc * sizeof(uint64_t));
            for (int64_t cw = 0; cw < Wc; ++cw) {
                uint64_t a[64];
                for (int i = 0; i < 64; ++i)
                    a[i] = blk[i * Wc + cw];
                transpose64(a); /* a[i]: channel cw * 64 + i over the block's keys */
                for (int64_t i = 0; i < 64 && cw * 64 + i < C; ++i) {
                    const int64_t c = cw * 64 + i, hd = c / d, j = c % d;
                    out[((b * h + hd) * d + j) * Wm + kb] = a[i];
                }
            }
        }
        free(blk);
    }
    return failed ? -1 : bad;
}
