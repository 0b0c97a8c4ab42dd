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
        _Pragma("omp parallel for schedule(static) reduction(| : bad) num_threads(nt) if (nt > 1 && rows > 1 && rows * k >= (1 << 18))") \
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
GLUE_VARIANTS512(packb_row, (const float *x, const float *sc, const float *sh, const float *b, int64_t k,
                          float *buf, pack_f32_fn pack, uint64_t *out, int *bad),
              (x, sc, sh, b, k, buf, pack, out, bad))

EXPORT int bhv_pack_signs_bias_f32(const float *x, int64_t rows, int64_t k, const float *scale,
                                   const float *shift, const float *bias, int64_t prow,
                                   uint64_t *out, int threads)
{
    const pack_f32_fn pack = bhvi_active->pack_f32;
    void (*row)(const float *, const float *, const float *, const float *, int64_t, float *, pack_f32_fn,
                uint64_t *, int *) = GLUE_PICK(packb_row);
    const int64_t W = cdiv(k, 64);
    const int nt = bhvi_threads(threads);
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
