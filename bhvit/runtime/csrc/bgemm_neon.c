/*
 * bgemm_neon.c -- the AArch64 micro-kernel of the binary GEMM (layout: bgemm.c):
 * NEON vcntq_u8 byte popcounts, MR = 4 rows x NR = 4 columns.
 */
#include "core.h"

#if defined(__aarch64__)
#include <arm_neon.h>

#define NE_MR BHV_NEON_MR
#define NE_NR BHV_NEON_NR
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

BHV_BLOCK_FN(bhvi_block_neon, , ne_block)
#endif /* __aarch64__ */
