/*
 * core.h -- what the kernel files of libbhvit share and nobody else sees: the kernel
 * variants (one micro-kernel and one sign packer per instruction set), the active one,
 * the tile store, the serial GEMM driver and the helpers.  What one file defines for
 * another is named bhvi_* (hidden in the shared library, and out of the way of a program
 * that links libbhvit.a); the rest here is static inline.  The exported kernels are in
 * kernels.h.
 *
 *   dispatch.c    the variant table, run-time selection, threads
 *   bitpack.c     sign and bit packing (portable, AVX2), bias + sign packing
 *   bgemm.c       panels, the portable and POPCNT micro-kernels, the GEMM drivers
 *   bgemm_x86.c   the AVX2 and AVX-512 VPOPCNTDQ micro-kernels
 *   bgemm_neon.c  the NEON micro-kernel
 *   bconv.c       grouped / dilated / strided binary convolution (implicit GEMM)
 *   transform.c   the output transform of a binary layer, and the fused binary linear
 *   attention.c   MSMHA's binary attention core with Quantization Decomposition
 *   glue.c        the float layers of the forward pass: GELU, shifts, LayerNorm, dense
 */
#ifndef BHV_CORE_H
#define BHV_CORE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(__x86_64__)
#define BHV_X86 1
#include <immintrin.h>
#else
#define BHV_X86 0
#endif

#define BHV_ABI_VERSION 7
#define INLINE static inline __attribute__((always_inline))
#define BHVI __attribute__((visibility("hidden")))

/* Bytes of packed B panels per column block (kept in L2 while A rows stream). */
#define BHV_COLBLOCK_BYTES (128 * 1024)
/* Below this many word-ops (M * N * W) a GEMM runs on one thread. */
#define BHV_PAR_MIN_WORK (1 << 15)
/* Below this many floats an element-wise kernel (packing, epilogue, norm) runs on one thread: about
 * 3 us of work at one thread, several times what waking a second one costs. */
#define BHV_PAR_MIN_FLOATS (1 << 14)

/* Rows [0, mrows) of A (lda words apart) against panels [p0, p1) of Bp (N columns, W words
 * per column): out = kconst - 2 popcount(a ^ b) (is_and = 0) or popcount(a & b). */
typedef void (*block_fn)(const uint64_t *A, int64_t lda, int64_t mrows, const uint64_t *Bp, int64_t p0,
                         int64_t p1, int64_t N, int64_t W, int is_and, int64_t kconst, int32_t *out,
                         int64_t ldo);
/* One row of k floats (or bytes) -> ceil(k / 64) words; the f32 form returns 1 on a NaN. */
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
    int glue_avx2;   /* the float glue may use its AVX2 copies */
    int glue_avx512; /* ... and its AVX-512 copies (GLUE_VARIANTS512) */
} variant_t;

/* The selected variant (dispatch.c). */
BHVI extern const variant_t *bhvi_active;

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* threads <= 0: OpenMP's default; 1 without OpenMP. */
BHVI int bhvi_threads(int threads);

/* --- packers (bitpack.c) ---------------------------------------------------- */
BHVI int bhvi_pack_f32_portable(const float *x, int64_t k, uint64_t *out);
BHVI void bhvi_pack_u8_portable(const uint8_t *x, int64_t k, uint64_t *out);
#if BHV_X86
BHVI int bhvi_pack_f32_avx2(const float *x, int64_t k, uint64_t *out);
BHVI int bhvi_pack_f32_avx512(const float *x, int64_t k, uint64_t *out);
BHVI void bhvi_pack_u8_avx2(const uint8_t *x, int64_t k, uint64_t *out);
#endif

/* One row of k sign bits of ((x * sc + sh) + b), or of x + b with sc = sh = NULL: the active
 * variant's row function (returns 1 on a NaN, whose bit is 0). */
typedef int (*packb_fn)(const float *x, const float *sc, const float *sh, const float *b, int64_t k,
                        uint64_t *out);
BHVI packb_fn bhvi_packb(void);

/* --- micro-kernels (bgemm*.c) ---------------------------------------------- */
#define BHV_BLOCK_PARAMS                                                                                    \
    (const uint64_t *A, int64_t lda, int64_t mrows, const uint64_t *Bp, int64_t p0, int64_t p1, int64_t N,   \
     int64_t W, int is_and, int64_t kconst, int32_t *out, int64_t ldo)

/* A block_fn from an always-inline block implementation: is_and becomes a constant, so the
 * compiler drops the branch between XOR and AND from the inner loop. */
#define BHV_BLOCK_FN(name, attr, impl)                                                      \
    attr BHVI void name BHV_BLOCK_PARAMS                                                     \
    {                                                                                        \
        if (is_and)                                                                          \
            impl(A, lda, mrows, Bp, p0, p1, N, W, 1, kconst, out, ldo);                      \
        else                                                                                 \
            impl(A, lda, mrows, Bp, p0, p1, N, W, 0, kconst, out, ldo);                      \
    }

BHVI void bhvi_block_portable BHV_BLOCK_PARAMS;
#define BHV_SCALAR_MR 4
#define BHV_SCALAR_NR 4
#if BHV_X86
BHVI void bhvi_block_popcnt BHV_BLOCK_PARAMS;
BHVI void bhvi_block_avx2 BHV_BLOCK_PARAMS;
BHVI void bhvi_block_avx512 BHV_BLOCK_PARAMS;
#define BHV_AVX2_MR 4
#define BHV_AVX2_NR 4
#define BHV_AVX512_MR 8
#define BHV_AVX512_NR 16
#endif
#if defined(__aarch64__)
BHVI void bhvi_block_neon BHV_BLOCK_PARAMS;
#define BHV_NEON_MR 4
#define BHV_NEON_NR 4
#endif

/* Write one finished tile of 64-bit popcount sums: out = kconst - 2 P (xnor) or P (and). */
INLINE void store_tile_u64(const uint64_t *acc, int acc_ld, int mr, int nv, int is_and, int64_t kconst,
                           int32_t *out, int64_t ldo)
{
    for (int r = 0; r < mr; ++r)
        for (int c = 0; c < nv; ++c) {
            const int64_t P = (int64_t)acc[r * acc_ld + c];
            out[r * ldo + c] = (int32_t)(is_and ? P : kconst - 2 * P);
        }
}

/* --- GEMM drivers (bgemm.c) ------------------------------------------------- */
/* Bp[(p * W + w) * nr + c] = B[(p * nr + c) * ldb + w], 0 for rows >= N. */
BHVI void bhvi_pack_panels(const uint64_t *B, int64_t ldb, int64_t N, int64_t W, int nr, uint64_t *Bp);
/* Single-threaded: rows [0, M) of A against all panels of Bp (N columns). */
BHVI void bhvi_gemm_serial(const variant_t *v, const uint64_t *A, int64_t lda, int64_t M, const uint64_t *Bp,
                           int64_t N, int64_t W, int is_and, int64_t kconst, int32_t *out, int64_t ldo);

/* --- float glue -------------------------------------------------------------- */
/*
 * Each glue kernel is an always-inline worker compiled once per instruction set: for the
 * baseline target, with AVX2 (+POPCNT), and with AVX-512 (GLUE_VARIANTS512; GLUE_PICK runs
 * the copy of the selected GEMM variant).  Kernels with hand-written vector code (the
 * attention core, glue.c's vector bodies) keep the same rule: the same operations in the
 * same order in every copy.  The build uses -ffp-contract=off and no fast-math, so the
 * copies round identically; -fno-trapping-math (no value changes) lets the compiler turn a
 * select between a product and another value into a vector blend.
 */
#if BHV_X86
#define GLUE_FAST_ATTR __attribute__((target("avx2,popcnt")))
#else
#define GLUE_FAST_ATTR
#endif
static inline int glue_fast(void) { return bhvi_active->glue_avx2; }

#define GLUE_VARIANTS(name, params, args)                                          \
    static void name##_base params { name##_impl args; }                           \
    GLUE_FAST_ATTR static void name##_fast params { name##_impl args; }

/* The third copy, compiled for AVX-512 (16 floats a vector), run with the AVX-512 VPOPCNTDQ
 * variant.  Element-wise code only (no reassociation: the same roundings as the other
 * copies); GLUE_PICK(name) is the copy to run. */
#if BHV_X86
#define GLUE_AVX512_ATTR __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,popcnt")))
#define GLUE_VARIANTS512(name, params, args)                                                  \
    GLUE_VARIANTS(name, params, args)                                                         \
    GLUE_AVX512_ATTR static void name##_avx512 params { name##_impl args; }
#define GLUE_PICK(name) \
    (bhvi_active->glue_avx512 ? name##_avx512 : bhvi_active->glue_avx2 ? name##_fast : name##_base)
#else
#define GLUE_VARIANTS512(name, params, args) GLUE_VARIANTS(name, params, args)
#define GLUE_PICK(name) (glue_fast() ? name##_fast : name##_base)
#endif

#endif
