/*
 * bgemm_x86.c -- the x86-64 micro-kernels of the binary GEMM (layout: bgemm.c):
 *   AVX2:              nibble-lookup popcount (vpshufb + vpsadbw), MR = 4 x NR = 4
 *   AVX-512 VPOPCNTDQ: vpopcntq on 8 columns at once,              MR = 8 x NR = 16
 * Each is compiled for its instruction set with a target attribute and runs only where
 * dispatch.c found it supported.
 */
#include "core.h"

#if BHV_X86

/* --- AVX2: nibble-lookup popcount, MR = 4 rows x NR = 4 columns --- */

#define AVX2_ATTR __attribute__((target("avx2,popcnt")))
#define A2_MR BHV_AVX2_MR
#define A2_NR BHV_AVX2_NR
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

BHV_BLOCK_FN(bhvi_block_avx2, AVX2_ATTR, a2_block)

/* --- AVX-512 VPOPCNTDQ: MR = 8 rows x NR = 16 columns --- */
/* A panel holds 16 columns: two vectors of 8 64-bit words per word of K.  The 64-bit popcount
 * sums of a row's 16 columns are narrowed to 16 int32 with one two-source permute, so a full
 * tile row is one 64-byte store (the output, not the popcounts, bounds the small-K shapes). */

#define AVX512_ATTR __attribute__((target("avx512f,avx512vpopcntdq,avx2,popcnt")))
#define A5_MR BHV_AVX512_MR
#define A5_NR BHV_AVX512_NR

AVX512_ATTR INLINE __m512i a5_op(__m512i a, __m512i b, const int is_and)
{
    return is_and ? _mm512_and_si512(a, b) : _mm512_xor_si512(a, b);
}

/* acc[2 r], acc[2 r + 1]: columns 0-7 and 8-15 of row r */
AVX512_ATTR INLINE void a5_tile(const uint64_t *A, int64_t lda, const int R, const uint64_t *bp, int64_t W,
                                const int is_and, __m512i acc[2 * A5_MR])
{
    for (int r = 0; r < 2 * R; ++r)
        acc[r] = _mm512_setzero_si512();
    for (int64_t w = 0; w < W; ++w) {
        const __m512i b0 = _mm512_loadu_si512((const void *)(bp + w * A5_NR));
        const __m512i b1 = _mm512_loadu_si512((const void *)(bp + w * A5_NR + 8));
        for (int r = 0; r < R; ++r) {
            const __m512i va = _mm512_set1_epi64((long long)A[r * lda + w]);
            acc[2 * r] = _mm512_add_epi64(acc[2 * r], _mm512_popcnt_epi64(a5_op(va, b0, is_and)));
            acc[2 * r + 1] = _mm512_add_epi64(acc[2 * r + 1], _mm512_popcnt_epi64(a5_op(va, b1, is_and)));
        }
    }
}

AVX512_ATTR INLINE void a5_block(const uint64_t *A, int64_t lda, int64_t mrows, const uint64_t *Bp, int64_t p0,
                                 int64_t p1, int64_t N, int64_t W, const int is_and, int64_t kconst, int32_t *out,
                                 int64_t ldo)
{
    __m512i acc[2 * A5_MR];
    uint64_t tmp[A5_MR * A5_NR];
    const __m512i kv = _mm512_set1_epi32((int)kconst);
    /* the low 32 bits of the 16 64-bit lanes of two vectors, in order */
    const __m512i lo32 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
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
                    a5_tile(A + (i + r) * lda, lda, 1, bp, W, is_and, acc + 2 * r);
            }
            int32_t *o = out + i * ldo + c0;
            if (nv == A5_NR) {
                for (int r = 0; r < mr; ++r) {
                    const __m512i pc = _mm512_permutex2var_epi32(acc[2 * r], lo32, acc[2 * r + 1]);
                    const __m512i res = is_and ? pc : _mm512_sub_epi32(kv, _mm512_slli_epi32(pc, 1));
                    _mm512_storeu_si512((void *)(o + r * ldo), res);
                }
            } else {
                for (int r = 0; r < mr; ++r) {
                    _mm512_storeu_si512((void *)(tmp + r * A5_NR), acc[2 * r]);
                    _mm512_storeu_si512((void *)(tmp + r * A5_NR + 8), acc[2 * r + 1]);
                }
                store_tile_u64(tmp, A5_NR, mr, nv, is_and, kconst, o, ldo);
            }
        }
    }
}

BHV_BLOCK_FN(bhvi_block_avx512, AVX512_ATTR, a5_block)

#endif /* BHV_X86 */
