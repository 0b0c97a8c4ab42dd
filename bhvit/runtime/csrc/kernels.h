/*
 * kernels.h -- the bit-packed kernels of libbhvit, as used by the model (model.c) and,
 * through ctypes, by bhvit/runtime/kernels.py.  Not part of the public C API (bhvit.h).
 * The files that implement them are listed in core.h.  Conventions (dispatch.c):
 * sign(x) = +1 iff x >= 0, bit 1 for +1, 64 elements per uint64 word, little-endian,
 * padding bits 0.
 *
 * Return codes: 0 ok, 1 a packed value was NaN, -1 out of memory, -2 bad arguments,
 * -3 weights prepared for another kernel variant (prepare them again).
 */
#ifndef BHV_KERNELS_H
#define BHV_KERNELS_H

#include <stdint.h>

#define EXPORT __attribute__((visibility("default")))

/* B (N rows of W words) re-packed into the active variant's panels, once per weight. */
typedef struct {
    const void *variant;
    int64_t N, W;
    uint64_t *Bp;
} bhv_panels;

/* A binary convolution's weights, prepared once: bit-dense panels per group and the
 * per-tap popcounts for the zero-padding correction. */
typedef struct {
    const void *variant;
    uint64_t *Bp;
    int32_t *pwt;
    int64_t G, Wg, Cout, KH, KW, cpg;
} bhv_conv;

/* The output transform of a binary linear layer (LCE's OutputTransform):
 *   y = post(act(dot * scale + shift + shortcut)), written as out = [res +] y, or, with
 *   bits != NULL, as the packed signs of y + nb and optionally the means of groups of
 *   pool_k consecutive channels (pool).  Exactly one of out and bits is set; sc, m1 (with
 *   slope and m2), ps (with pb), res, nb and pool may be NULL: that part is left out. */
typedef struct {
    const float *scale, *shift;
    const float *sc;
    int64_t sc_c;
    const float *m1, *slope, *m2;
    const float *ps, *pb;
    const float *res;
    float *out;
    const float *nb;
    uint64_t *bits;
    int64_t pool_k;
    float *pool;
} bhv_transform;

/* dispatch.c: kernel variants and threads */
EXPORT int bhv_abi_version(void);
EXPORT int bhv_num_variants(void);
EXPORT const char *bhv_variant_name(int i);
EXPORT int bhv_variant_supported(int i);
EXPORT const char *bhv_backend(void);
EXPORT int bhv_select(const char *name);
EXPORT int bhv_openmp(void);
EXPORT int bhv_max_threads(void);

/* bitpack.c */
EXPORT int bhv_pack_signs_f32(const float *x, int64_t rows, int64_t k, uint64_t *out, int threads);
EXPORT int bhv_pack_signs_f64(const double *x, int64_t rows, int64_t k, uint64_t *out, int threads);
EXPORT void bhv_pack_bits_u8(const uint8_t *b, int64_t rows, int64_t k, uint64_t *out, int threads);
EXPORT int bhv_pack_signs_bias_f32(const float *x, int64_t rows, int64_t k, const float *scale,
                                   const float *shift, const float *bias, int64_t prow, uint64_t *out,
                                   int threads);
EXPORT int bhv_pack_heads_f32(const float *x, int64_t Bw, int64_t L, int64_t h, int64_t d, const float *bias,
                              uint64_t *out, int threads);
EXPORT int bhv_pack_keys_f32(const float *v, int64_t Bw, int64_t L, int64_t h, int64_t d, const float *bias,
                             uint64_t *out, int threads);

/* bgemm.c: a and b are M x W and N x W words; bhv_*_pp take weights packed once */
EXPORT int bhv_xnor_gemm(const uint64_t *a, const uint64_t *b, int64_t M, int64_t N, int64_t W, int64_t k,
                         int32_t *out, int threads);
EXPORT int bhv_and_gemm(const uint64_t *a, const uint64_t *b, int64_t M, int64_t N, int64_t W, int32_t *out,
                        int threads);
EXPORT int bhv_panels_pack(bhv_panels *p, const uint64_t *b, int64_t N, int64_t W);
EXPORT void bhv_panels_free(bhv_panels *p);
EXPORT int bhv_panels_current(const bhv_panels *p);
EXPORT int bhv_xnor_gemm_pp(const uint64_t *a, const bhv_panels *pp, int64_t M, int64_t k, int32_t *out,
                            int threads);

/* bconv.c */
EXPORT int bhv_xnor_conv2d(const uint64_t *x, const uint64_t *w, int64_t B, int64_t H, int64_t Wd, int64_t G,
                           int64_t Wg, int64_t Cout, int64_t KH, int64_t KW, int64_t cpg, int64_t stride,
                           int64_t pad, int64_t dil, int64_t Ho, int64_t Wo, int32_t *out, int threads);
EXPORT int bhv_conv_prepare(bhv_conv *c, const uint64_t *w, int64_t G, int64_t Wg, int64_t Cout, int64_t KH,
                            int64_t KW, int64_t cpg);
EXPORT void bhv_conv_free(bhv_conv *c);
EXPORT int bhv_conv_current(const bhv_conv *c);
EXPORT int bhv_xnor_conv2d_pp(const uint64_t *x, const bhv_conv *c, int64_t B, int64_t H, int64_t Wd,
                              int64_t stride, int64_t pad, int64_t dil, int64_t Ho, int64_t Wo, int32_t *out,
                              int threads);

/* transform.c: the output transform alone, and fused with the XNOR GEMM */
EXPORT int bhv_epilogue(const int32_t *dot, int64_t rows, int64_t n, const float *scale, const float *shift,
                        const float *sc, int64_t sc_c, const float *m1, const float *slope, const float *m2,
                        const float *ps, const float *pb, const float *res, float *out, int threads);
EXPORT int bhv_epilogue_pack(const int32_t *dot, int64_t rows, int64_t n, const float *scale, const float *shift,
                             const float *sc, int64_t sc_c, const float *m1, const float *slope, const float *m2,
                             const float *nb, uint64_t *bits, int64_t pool_k, float *pool, int threads);
EXPORT int bhv_binary_linear_pp(const uint64_t *a, int64_t M, int64_t k, const bhv_panels *pp,
                                const bhv_transform *t, int threads);

EXPORT void bhv_affine(const float *x, int64_t rows, int64_t C, const float *a, const float *b, float *out,
                       int threads);
EXPORT void bhv_add(const float *x, const float *y, int64_t n, int64_t reps, float *out);

/* attention.c */
EXPORT int bhv_attention(const uint64_t *qb, const uint64_t *kb, const uint64_t *vb, int64_t Bw, int64_t heads,
                         int64_t N, int64_t M, int64_t d, const float *step, const float *zp, int64_t levels,
                         float scale, const float *cs, const float *ct, const float *q, const float *k,
                         const float *v, const float *m1, const float *slope, const float *m2, float *out,
                         int threads);

/* glue.c */
EXPORT void bhv_gelu(const float *x, int64_t n, float *out, int threads);
EXPORT int bhv_shift_mix(const float *x, int64_t B, int64_t H, int64_t Wd, int64_t C, const int64_t *ks,
                         int64_t nk, const float *ps, const float *pb, float *out, int threads);
EXPORT void bhv_layer_norm(const float *x, int64_t rows, int64_t C, const float *w, const float *b, float eps,
                           float *out, int threads);
EXPORT void bhv_dense(const float *x, int64_t rows, int64_t k, const float *wt, int64_t n, const float *bias,
                      float *out, int threads);

#endif
