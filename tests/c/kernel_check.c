/*
 * kernel_check -- libbhvit's binary kernels on every variant this CPU runs, against plain C.
 *
 * The XNOR and AND GEMMs against a bit-by-bit reference; the prepared binary convolution,
 * the fused linear and the attention core against the c-portable variant (itself checked
 * against the reference GEMM).  Shapes cover partial words, partial tiles and panels.
 * Prints one line per variant and exits 1 on the first mismatch.
 */
#include "kernels.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

EXPORT int bhv_num_variants(void);
EXPORT const char *bhv_variant_name(int i);
EXPORT int bhv_variant_supported(int i);
EXPORT int bhv_and_gemm(const uint64_t *a, const uint64_t *b, int64_t M, int64_t N, int64_t W, int32_t *out,
                        int threads);
EXPORT int bhv_xnor_gemm(const uint64_t *a, const uint64_t *b, int64_t M, int64_t N, int64_t W, int64_t k,
                         int32_t *out, int threads);

static uint64_t state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

static void fill_bits(uint64_t *w, int64_t rows, int64_t k)
{
    const int64_t W = (k + 63) / 64;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < W; ++j) {
            uint64_t v = rnd();
            if (j == W - 1 && (k % 64))
                v &= (~0ull) >> (64 - k % 64);
            w[r * W + j] = v;
        }
}

static int fail(const char *variant, const char *what, int64_t a, int64_t b, int64_t c)
{
    printf("FAIL %s: %s (%lld, %lld, %lld)\n", variant, what, (long long)a, (long long)b, (long long)c);
    return 1;
}

static int check_gemm(const char *v)
{
    const int64_t shapes[][3] = {{1, 1, 1}, {3, 5, 63}, {4, 4, 64}, {7, 9, 65}, {33, 17, 200}, {64, 64, 1024},
                                 {5, 130, 4608}, {129, 3, 96}};
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); ++s) {
        const int64_t M = shapes[s][0], N = shapes[s][1], k = shapes[s][2], W = (k + 63) / 64;
        uint64_t *a = malloc(M * W * 8), *b = malloc(N * W * 8);
        int32_t *x = malloc(M * N * 4), *y = malloc(M * N * 4);
        fill_bits(a, M, k);
        fill_bits(b, N, k);
        for (int is_and = 0; is_and < 2; ++is_and) {
            if (is_and)
                bhv_and_gemm(a, b, M, N, W, x, 2);
            else
                bhv_xnor_gemm(a, b, M, N, W, k, x, 2);
            for (int64_t i = 0; i < M; ++i)
                for (int64_t j = 0; j < N; ++j) {
                    int64_t pc = 0;
                    for (int64_t w = 0; w < W; ++w)
                        pc += __builtin_popcountll(is_and ? (a[i * W + w] & b[j * W + w]) : (a[i * W + w] ^ b[j * W + w]));
                    y[i * N + j] = (int32_t)(is_and ? pc : k - 2 * pc);
                }
            if (memcmp(x, y, M * N * 4))
                return fail(v, is_and ? "and_gemm" : "xnor_gemm", M, N, k);
        }
        free(a), free(b), free(x), free(y);
    }
    return 0;
}

/* conv / fused linear / attention outputs of the current variant */
typedef struct {
    int32_t *conv;
    float *lin, *att;
} outs;

static void run_others(outs *o)
{
    /* a grouped dilated 3x3 conv over a 6x5 map, 2 groups of 40 channels */
    const int64_t B = 2, H = 6, Wd = 5, G = 2, cpg = 40, Wg = 1, Cout = 6;
    static uint64_t x[2 * 6 * 5 * 2], w[6 * 9];
    static int init = 0;
    static uint64_t a[37 * 3], bw[70 * 3], qb[2 * 2 * 9 * 1], kb[2 * 2 * 9 * 1], vb[2 * 2 * 20 * 1];
    static float scale[70], shift[70], m1[70], slope[70], m2[70], step[2] = {0.3f, 0.25f}, zp[2] = {0.1f, -0.2f};
    if (!init) {
        state = 12345;
        fill_bits(x, B * H * Wd * G, cpg);
        fill_bits(w, Cout * 9, cpg);
        fill_bits(a, 37, 150);
        fill_bits(bw, 70, 150);
        fill_bits(qb, 2 * 2 * 9, 20);
        fill_bits(kb, 2 * 2 * 9, 20);
        fill_bits(vb, 2 * 2 * 20, 9);
        for (int i = 0; i < 70; ++i) {
            scale[i] = (float)(rnd() % 1000) / 500.0f - 1.0f;
            shift[i] = (float)(rnd() % 1000) / 100.0f - 5.0f;
            m1[i] = (float)(rnd() % 100) / 100.0f;
            slope[i] = 0.25f;
            m2[i] = -0.5f;
        }
        init = 1;
    }
    bhv_conv c;
    bhv_conv_prepare(&c, w, G, Wg, Cout, 3, 3, cpg);
    bhv_xnor_conv2d_pp(x, &c, B, H, Wd, 1, 2, 2, H, Wd, o->conv, 2);
    bhv_conv_free(&c);
    bhv_panels p;
    bhv_panels_pack(&p, bw, 70, 3);
    const bhv_transform t = {scale, shift, NULL, 0, m1, slope, m2, NULL, NULL, NULL, o->lin, NULL, NULL, 0, NULL};
    bhv_binary_linear_pp(a, 37, 150, &p, &t, 2);
    bhv_panels_free(&p);
    bhv_attention(qb, kb, vb, 2, 2, 9, 9, 20, step, zp, 3, 0.2236f, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                  o->att, 2);
}

int main(void)
{
    outs ref = {malloc(2 * 6 * 5 * 6 * 4), malloc(37 * 70 * 4), malloc(2 * 9 * 40 * 4)};
    outs got = {malloc(2 * 6 * 5 * 6 * 4), malloc(37 * 70 * 4), malloc(2 * 9 * 40 * 4)};
    if (bhv_select("c-portable"))
        return fail("c-portable", "select", 0, 0, 0);
    run_others(&ref);
    int checked = 0;
    for (int i = 0; i < bhv_num_variants(); ++i) {
        const char *v = bhv_variant_name(i);
        if (!bhv_variant_supported(i)) {
            printf("skip %s (not supported by this CPU)\n", v);
            continue;
        }
        bhv_select(v);
        if (check_gemm(v))
            return 1;
        run_others(&got);
        if (memcmp(ref.conv, got.conv, 2 * 6 * 5 * 6 * 4))
            return fail(v, "xnor_conv2d_pp differs from c-portable", 0, 0, 0);
        if (memcmp(ref.lin, got.lin, 37 * 70 * 4))
            return fail(v, "binary_linear_pp differs from c-portable", 0, 0, 0);
        if (memcmp(ref.att, got.att, 2 * 9 * 40 * 4))
            return fail(v, "attention differs from c-portable", 0, 0, 0);
        printf("ok %s\n", v);
        checked++;
    }
    printf("%d variant(s) checked\n", checked);
    return checked ? 0 : 1;
}
