/*
 * attention.c -- the binary attention core of BHViT's MSMHA: XNOR/popcount scores,
 * softmax, and the attention matrix in Quantization Decomposition planes multiplied with
 * sign(V) by AND/popcount.
 */
#include "core.h"

#include <math.h>

/* --- attention core ------------------------------------------------------- */
/*
 * The binary attention core of MSMHA for Bw windows x h heads:
 *   scores = sign(Q) sign(K)^T by XNOR/popcount (d - 2 popcount(q ^ k)),
 *   A = softmax(scores * scale) in float,
 *   QD: lv = clip(round(A * L / step + zp), 0, L) (round half to even), the L 0/1 planes
 *   A^s = [lv >= s] each multiplied with the packed sign(V) by AND/popcount:
 *   A^s sign(V) = 2 popcount(A^s & V+) - popcount(A^s); out = step * sum_s A^s sign(V).
 * The planes sum to lv, so sum_s A^s sign(V) = sum_k 2^k B^k sign(V) with B^k the bit k of
 * lv: the kernels AND/popcount these nb = bit_length(L) slices (2 for L = 3) instead of the
 * L planes, with the same integer result.
 * qb: (Bw, h, N, Wd), kb: (Bw, h, M, Wd) packed signs of Q, K (Wd = ceil(d/64));
 * vb: (Bw, h, d, Wm) bits of V >= 0 along the keys (Wm = ceil(M/64));
 * step, zp: per head; out: (Bw, N, h, d) float.
 * Scores are integers d - 2 pc, so exp(score * scale - max) = etab[pc - pc_min]
 * with etab[i] = exp(-2 i scale), computed once per call.
 * Every variant computes the same floats in the same order (see attn_denominator for the
 * one sum), so all give the same bits.
 */
typedef struct {
    const uint64_t *qb, *kb, *vb;
    int64_t heads, N, M, d, levels;
    const float *step, *zp, *etab;
    float *out;
    /* optional combine: out = RPReLU(((ctx * ns + nt) + q) + k) + v) */
    const float *ns, *nt, *q, *k, *v, *m1, *slope, *m2;
} attn_args;

/* Bit slices of a level in 0..levels (levels <= 64): at most 7. */
static inline int attn_slices(int64_t levels) { return 64 - __builtin_clzll((uint64_t)levels); }

/*
 * The softmax denominator of one query row, summed in the order every variant uses (the
 * vector copies keep the partial sums in lanes): 16 partial sums s_l = ((0 + e[l]) +
 * e[l + 16]) + e[l + 32] ... over the keys m = l mod 16 in increasing m, then the fixed tree
 * s_l += s_{l+8} (l < 8), s_l += s_{l+4} (l < 4), s_l += s_{l+2} (l < 2), sum = s_0 + s_1.
 */
INLINE float attn_denominator(const float *e, int64_t M)
{
    float s[16] = {0.0f};
    for (int64_t m = 0; m < M; ++m)
        s[m & 15] += e[m];
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l)
            s[l] += s[l + w];
    return s[0];
}

/* One element of the combine, column c: RPReLU(((x * ns + nt) + q) + k) + v), as in epi_loop. */
INLINE float attn_combine1(const attn_args *a, int64_t c, float x, float q, float k, float v)
{
    const float y = ((((x * a->ns[c] + a->nt[c]) + q) + k) + v) - a->m1[c], ys = y * a->slope[c];
    return (y < 0.0f ? ys : y) + a->m2[c];
}

/* The scores of query row qr against the M keys: pcs[m] = popcount(q ^ k_m); returns their minimum. */
INLINE int32_t attn_scores(const uint64_t *qr, const uint64_t *Kp, int64_t M, int64_t Wd, int32_t *pcs)
{
    int32_t pmin = (int32_t)(64 * Wd);
    for (int64_t m = 0; m < M; ++m) {
        const uint64_t *kr = Kp + m * Wd;
        int32_t pc = 0;
        for (int64_t w = 0; w < Wd; ++w)
            pc += __builtin_popcountll(qr[w] ^ kr[w]);
        pcs[m] = pc;
        pmin = pc < pmin ? pc : pmin;
    }
    return pmin;
}

/* o[j] = step * (2 sum_m lv_m [v_jm] - sum_m lv_m) for the d rows of V, from the nb level slices. */
INLINE void attn_output(const uint64_t *V, int64_t d, int64_t Wm, const uint64_t *planes, int nb, float st, float *o)
{
    int64_t ones = 0;
    for (int k = 0; k < nb; ++k)
        for (int64_t w = 0; w < Wm; ++w)
            ones += (int64_t)__builtin_popcountll(planes[k * Wm + w]) << k;
    for (int64_t j = 0; j < d; ++j) {
        const uint64_t *vr = V + j * Wm;
        int64_t hits = 0;
        for (int k = 0; k < nb; ++k)
            for (int64_t w = 0; w < Wm; ++w)
                hits += (int64_t)__builtin_popcountll(planes[k * Wm + w] & vr[w]) << k;
        o[j] = (float)(2 * hits - ones) * st;
    }
}

/*
 * One window x head, portable: the reference of the vector copies below (c-portable, c-popcnt, c-neon).
 * e: M floats, pcs: M ints, planes: nb * Wm words of scratch.
 */
static void attn_bh_base(const attn_args *a, int64_t bh, float *e, int32_t *pcs, uint64_t *planes)
{
    const int64_t heads = a->heads, N = a->N, M = a->M, d = a->d;
    const int64_t Wd = cdiv(d, 64), Wm = cdiv(M, 64);
    const int nb = attn_slices(a->levels);
    const int64_t b = bh / heads, hd = bh % heads;
    const uint64_t *Q = a->qb + bh * N * Wd, *Kp = a->kb + bh * M * Wd, *V = a->vb + bh * d * Wm;
    const float st = a->step[hd], z = a->zp[hd], L = (float)a->levels;
    for (int64_t n = 0; n < N; ++n) {
        const int32_t pmin = attn_scores(Q + n * Wd, Kp, M, Wd, pcs);
        for (int64_t m = 0; m < M; ++m)
            e[m] = a->etab[pcs[m] - pmin];
        const float sum = attn_denominator(e, M);
        memset(planes, 0, (size_t)(nb * Wm) * sizeof(uint64_t));
        for (int64_t m = 0; m < M; ++m) {
            float lv = rintf(e[m] / sum * L / st + z); /* half to even (the default mode) */
            /* clip to [0, L]; NaN (a NaN or infinite step or zero point) -> level 0, as in the
             * numpy backend (NaN >= s is false for every plane): never a NaN into the int cast */
            lv = lv > 0.0f ? (lv < L ? lv : L) : 0.0f;
            const uint64_t li = (uint64_t)lv;
            for (int k = 0; k < nb; ++k)
                planes[k * Wm + m / 64] |= ((li >> k) & 1) << (m % 64);
        }
        const int64_t off = ((b * N + n) * heads + hd) * d; /* (Bw, N, C) with C = h * d */
        float *o = a->out + off;
        attn_output(V, d, Wm, planes, nb, st, o);
        if (a->ns != NULL)
            for (int64_t j = 0; j < d; ++j)
                o[j] = attn_combine1(a, hd * d + j, o[j], a->q[off + j], a->k[off + j], a->v[off + j]);
    }
}

#if BHV_X86
/*
 * attn_output for one word per V row (M <= 64) and nb <= 5, 4 rows a vector: byte popcounts by
 * nibble lookup (vpshufb), weighted in the bytes by Horner's rule (c = 2 c + popcount of slice
 * k, at most 8 * 31 per byte), summed by vpsadbw; the d % 8 last rows as attn_output.
 */
GLUE_FAST_ATTR static inline void attn_output1_avx2(const uint64_t *V, int64_t d, const uint64_t *sl, int nb,
                                                    float st, float *o)
{
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                         2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    int64_t ones = 0;
    __m256i slv[5];
    for (int k = 0; k < nb; ++k) {
        ones += (int64_t)__builtin_popcountll(sl[k]) << k;
        slv[k] = _mm256_set1_epi64x((long long)sl[k]);
    }
    const __m256i onesv = _mm256_set1_epi32((int32_t)ones);
    const __m256 stv = _mm256_set1_ps(st);
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) {
        __m256i h[2];
        for (int u = 0; u < 2; ++u) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(V + j + 4 * u));
            __m256i c = zero;
            for (int k = nb - 1; k >= 0; --k) {
                const __m256i x = _mm256_and_si256(v, slv[k]);
                const __m256i xh = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
                const __m256i pc = _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(x, low)),
                                                   _mm256_shuffle_epi8(lut, xh));
                c = _mm256_add_epi8(_mm256_add_epi8(c, c), pc);
            }
            h[u] = _mm256_sad_epu8(c, zero); /* 4 sums of at most 64 * 31 */
        }
        /* the low dwords of h[0] then of h[1]: rows j..j+7 */
        const __m256i h01 = _mm256_blend_epi32(h[0], _mm256_slli_epi64(h[1], 32), 0xaa);
        const __m256i hits = _mm256_permutevar8x32_epi32(h01, even);
        const __m256i r = _mm256_sub_epi32(_mm256_add_epi32(hits, hits), onesv);
        _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_cvtepi32_ps(r), stv));
    }
    if (j < d)
        attn_output(V + j, d - j, 1, sl, nb, st, o + j);
}

/*
 * One window x head with AVX2 (+POPCNT), any shape: scalar popcount scores and outputs, the
 * softmax denominator (two 8-lane vectors: s_0..7 and s_8..15), levels, slices (movemask of the
 * level bit shifted to the sign) and the combine 8 floats a vector.  e has room for
 * cdiv(M, 16) * 16 floats, zero past M.
 */
GLUE_FAST_ATTR static void attn_bh_avx2(const attn_args *a, int64_t bh, float *e, int32_t *pcs, uint64_t *planes)
{
    const int64_t heads = a->heads, N = a->N, M = a->M, d = a->d;
    const int64_t Wd = cdiv(d, 64), Wm = cdiv(M, 64), M16 = cdiv(M, 16) * 16;
    const int nb = attn_slices(a->levels);
    const int64_t b = bh / heads, hd = bh % heads;
    const uint64_t *Q = a->qb + bh * N * Wd, *Kp = a->kb + bh * M * Wd, *V = a->vb + bh * d * Wm;
    const float st = a->step[hd], z = a->zp[hd], L = (float)a->levels;
    const __m256 Lv = _mm256_set1_ps(L), stv = _mm256_set1_ps(st), zv = _mm256_set1_ps(z), zero = _mm256_setzero_ps();
    for (int64_t n = 0; n < N; ++n) {
        int32_t pmin;
        if (Wd == 1) {
            const uint64_t q = Q[n];
            pmin = 64;
            for (int64_t m = 0; m < M; ++m) {
                const int32_t pc = __builtin_popcountll(q ^ Kp[m]);
                pcs[m] = pc;
                pmin = pc < pmin ? pc : pmin;
            }
        } else {
            pmin = attn_scores(Q + n * Wd, Kp, M, Wd, pcs);
        }
        for (int64_t m = 0; m < M; ++m)
            e[m] = a->etab[pcs[m] - pmin];
        __m256 s0 = zero, s1 = zero;
        for (int64_t m = 0; m < M16; m += 16) {
            s0 = _mm256_add_ps(s0, _mm256_loadu_ps(e + m));
            s1 = _mm256_add_ps(s1, _mm256_loadu_ps(e + m + 8));
        }
        const __m256 r8 = _mm256_add_ps(s0, s1);
        const __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps(r8, 1));
        const __m128 r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
        const __m256 sumv = _mm256_broadcastss_ps(_mm_add_ss(r2, _mm_shuffle_ps(r2, r2, 1)));
        memset(planes, 0, (size_t)(nb * Wm) * sizeof(uint64_t));
        for (int64_t m = 0; m < M; m += 8) {
            const __m256 a0 = _mm256_mul_ps(_mm256_div_ps(_mm256_loadu_ps(e + m), sumv), Lv);
            const __m256 t = _mm256_add_ps(_mm256_div_ps(a0, stv), zv);
            const __m256 lv = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            /* min(lv, L) is lv < L ? lv : L; lanes not > 0 (NaN included) -> 0 */
            const __m256 pos = _mm256_cmp_ps(lv, zero, _CMP_GT_OQ);
            const __m256i li = _mm256_cvttps_epi32(_mm256_and_ps(_mm256_min_ps(lv, Lv), pos));
            const unsigned keep = M - m >= 8 ? 0xffu : (1u << (M - m)) - 1;
            for (int k = 0; k < nb; ++k) {
                const __m256i bit = _mm256_sll_epi32(li, _mm_cvtsi32_si128(31 - k));
                const unsigned bits = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(bit)) & keep;
                planes[k * Wm + m / 64] |= (uint64_t)bits << (m % 64);
            }
        }
        const int64_t off = ((b * N + n) * heads + hd) * d;
        float *o = a->out + off;
        if (Wm == 1 && nb <= 5)
            attn_output1_avx2(V, d, planes, nb, st, o);
        else
            attn_output(V, d, Wm, planes, nb, st, o);
        if (a->ns != NULL) {
            const int64_t c0 = hd * d;
            int64_t j = 0;
            for (; j + 8 <= d; j += 8) {
                const int64_t c = c0 + j;
                __m256 x = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(o + j), _mm256_loadu_ps(a->ns + c)),
                                         _mm256_loadu_ps(a->nt + c));
                x = _mm256_add_ps(_mm256_add_ps(x, _mm256_loadu_ps(a->q + off + j)), _mm256_loadu_ps(a->k + off + j));
                x = _mm256_add_ps(x, _mm256_loadu_ps(a->v + off + j));
                const __m256 y = _mm256_sub_ps(x, _mm256_loadu_ps(a->m1 + c));
                const __m256 neg = _mm256_cmp_ps(y, zero, _CMP_LT_OQ);
                const __m256 r = _mm256_blendv_ps(y, _mm256_mul_ps(y, _mm256_loadu_ps(a->slope + c)), neg);
                _mm256_storeu_ps(o + j, _mm256_add_ps(r, _mm256_loadu_ps(a->m2 + c)));
            }
            for (; j < d; ++j)
                o[j] = attn_combine1(a, c0 + j, o[j], a->q[off + j], a->k[off + j], a->v[off + j]);
        }
    }
}

#define ATTN_AVX512_ATTR __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512vpopcntdq,avx2,popcnt")))

/* etab[idx] for 16 indices in 0..64 from registers (two-table permutes, no gather): t[0..3]
 * hold etab[0..63], t64 etab[64]; lanes off in keep are 0. */
ATTN_AVX512_ATTR static inline __m512 attn_etab16(const __m512 *t, __m512 t64, __m512i idx, __mmask16 keep)
{
    const __m512 lo = _mm512_permutex2var_ps(t[0], idx, t[1]), hi = _mm512_permutex2var_ps(t[2], idx, t[3]);
    const __m512 r = _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), lo, hi);
    return _mm512_maskz_mov_ps(keep, _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(idx, _mm512_set1_epi32(64)), r, t64));
}

/* The clipped levels of 16 exp values e: lv = rint(e / sum * L / st + z) clipped to [0, L], NaN -> 0. */
ATTN_AVX512_ATTR static inline __m512i attn_levels16(__m512 e, __m512 sumv, __m512 Lv, __m512 stv, __m512 zv)
{
    const __m512 x = _mm512_add_ps(_mm512_div_ps(_mm512_mul_ps(_mm512_div_ps(e, sumv), Lv), stv), zv);
    const __m512 lv = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* min(lv, L) is lv < L ? lv : L; lanes not > 0 (NaN included) -> 0 */
    const __mmask16 pos = _mm512_cmp_ps_mask(lv, _mm512_setzero_ps(), _CMP_GT_OQ);
    return _mm512_maskz_cvttps_epi32(pos, _mm512_min_ps(lv, Lv));
}

/*
 * One window x head with AVX-512 VPOPCNTDQ for d <= 64 and M <= 64 (one word per q / k row and
 * per V row): per query row, scores for 8 keys a vector (xor with the broadcast query word,
 * vpopcntq), packed to 16 keys a vector; exp-table lookups, softmax and levels 16 keys a vector
 * (the partial sums s_0..15 of attn_denominator are the lanes); the level slices are the masks
 * of vector tests (16 bits per 16 keys); the output 8 V rows a vector (AND with the broadcast
 * slice + vpopcntq), 16 columns a vector for the combine.  Always 4 chunks of 16 keys (those
 * past M masked off): fixed trip counts, unrolled; nb is a constant where the caller passes one.
 */
ATTN_AVX512_ATTR INLINE void attn_bh_avx512_impl(const attn_args *a, int64_t bh, const int nb)
{
    const int64_t heads = a->heads, N = a->N, M = a->M, d = a->d;
    const int64_t b = bh / heads, hd = bh % heads;
    const uint64_t *Q = a->qb + bh * N, *Kp = a->kb + bh * M, *V = a->vb + bh * d;
    const float st = a->step[hd], z = a->zp[hd], L = (float)a->levels;
    const __m512 Lv = _mm512_set1_ps(L), stv = _mm512_set1_ps(st), zv = _mm512_set1_ps(z), zero = _mm512_setzero_ps();
    const __m512 t[4] = {_mm512_loadu_ps(a->etab), _mm512_loadu_ps(a->etab + 16), _mm512_loadu_ps(a->etab + 32),
                         _mm512_loadu_ps(a->etab + 48)};
    const __m512 t64 = _mm512_set1_ps(a->etab[64]);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    __mmask16 keep[4]; /* the keys of each 16-key chunk */
    __mmask8 kload[8]; /* the key words of each 8-key group */
    for (int c = 0; c < 4; ++c)
        keep[c] = (__mmask16)(M >= 16 * c + 16 ? 0xffff : M > 16 * c ? (1u << (M - 16 * c)) - 1 : 0);
    for (int g = 0; g < 8; ++g)
        kload[g] = (__mmask8)((1u << min64(8, max64(0, M - 8 * g))) - 1);
    for (int64_t n = 0; n < N; ++n) {
        const __m512i qv = _mm512_set1_epi64((long long)Q[n]);
        __m512i P[4], pm = _mm512_set1_epi32(INT32_MAX);
        for (int c = 0; c < 4; ++c) {
            const __m512i k0 = _mm512_maskz_loadu_epi64(kload[2 * c], Kp + 16 * c);
            const __m512i k1 = _mm512_maskz_loadu_epi64(kload[2 * c + 1], Kp + 16 * c + 8);
            P[c] = _mm512_permutex2var_epi32(_mm512_popcnt_epi64(_mm512_xor_si512(qv, k0)), even,
                                             _mm512_popcnt_epi64(_mm512_xor_si512(qv, k1)));
            pm = _mm512_mask_min_epi32(pm, keep[c], pm, P[c]);
        }
        const __m512i pmin = _mm512_set1_epi32(_mm512_reduce_min_epi32(pm));
        __m512 E[4], acc = zero;
        __m512i I[4];
        __mmask16 wide = 0; /* keys with pc - pc_min >= 16, >= 32 */
        uint32_t wider = 0;
        for (int c = 0; c < 4; ++c) {
            I[c] = _mm512_sub_epi32(P[c], pmin);
            E[c] = attn_etab16(t, t64, I[c], keep[c]);
            acc = _mm512_add_ps(acc, E[c]); /* + 0 past M: exact */
            wide |= _mm512_mask_cmpge_epi32_mask(keep[c], I[c], _mm512_set1_epi32(16));
            wider |= _mm512_mask_cmpge_epi32_mask(keep[c], I[c], _mm512_set1_epi32(32));
        }
        const __m256 r8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
        const __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps(r8, 1));
        const __m128 r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
        const __m512 sumv = _mm512_broadcastss_ps(_mm_add_ss(r2, _mm_shuffle_ps(r2, r2, 1)));
        /* The level of a key is that of its table index: the levels of the indices (etab[0..15]
         * or etab[0..31]: 2 or 4 divisions) looked up where every index is below 16 or 32 (the
         * same operations on the same values), else those of the keys (8 divisions). */
        __m512i li[4];
        if (!wide) {
            const __m512i lt = attn_levels16(t[0], sumv, Lv, stv, zv);
            for (int c = 0; c < 4; ++c)
                li[c] = _mm512_maskz_permutexvar_epi32(keep[c], I[c], lt);
        } else if (!wider) {
            const __m512i lt0 = attn_levels16(t[0], sumv, Lv, stv, zv), lt1 = attn_levels16(t[1], sumv, Lv, stv, zv);
            for (int c = 0; c < 4; ++c)
                li[c] = _mm512_maskz_permutex2var_epi32(keep[c], lt0, I[c], lt1);
        } else {
            for (int c = 0; c < 4; ++c)
                li[c] = _mm512_maskz_mov_epi32(keep[c], attn_levels16(E[c], sumv, Lv, stv, zv));
        }
        uint64_t sl[7] = {0};
        for (int c = 0; c < 4; ++c)
            for (int k = 0; k < nb; ++k)
                sl[k] |= (uint64_t)_mm512_test_epi32_mask(li[c], _mm512_set1_epi32(1 << k)) << (16 * c);
        int64_t ones = 0;
        __m512i slv[7];
        for (int k = 0; k < nb; ++k) {
            ones += (int64_t)__builtin_popcountll(sl[k]) << k;
            slv[k] = _mm512_set1_epi64((long long)sl[k]);
        }
        const __m512i onesv = _mm512_set1_epi64(ones);
        const int64_t off = ((b * N + n) * heads + hd) * d;
        float *o = a->out + off;
        for (int64_t j = 0; j < d; j += 16) {
            const int64_t cols = min64(16, d - j);
            const __mmask16 km = (__mmask16)((1u << cols) - 1);
            __m256 f[2];
            for (int u = 0; u < 2; ++u) { /* rows j + 8u .. j + 8u + 7 */
                const int64_t rows = min64(8, max64(0, cols - 8 * u));
                const __m512i vg = _mm512_maskz_loadu_epi64((__mmask8)((1u << rows) - 1), V + j + 8 * u);
                __m512i h = _mm512_setzero_si512();
                for (int k = 0; k < nb; ++k)
                    h = _mm512_add_epi64(h, _mm512_slli_epi64(_mm512_popcnt_epi64(_mm512_and_si512(vg, slv[k])),
                                                              (unsigned)k));
                const __m512i r = _mm512_sub_epi64(_mm512_slli_epi64(h, 1), onesv);
                f[u] = _mm256_mul_ps(_mm512_cvtepi64_ps(r), _mm512_castps512_ps256(stv));
            }
            __m512 x = _mm512_insertf32x8(_mm512_castps256_ps512(f[0]), f[1], 1);
            if (a->ns != NULL) {
                const int64_t c = hd * d + j;
                x = _mm512_mul_ps(x, _mm512_maskz_loadu_ps(km, a->ns + c));
                x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(km, a->nt + c));
                x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(km, a->q + off + j));
                x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(km, a->k + off + j));
                x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(km, a->v + off + j));
                const __m512 y = _mm512_sub_ps(x, _mm512_maskz_loadu_ps(km, a->m1 + c));
                const __mmask16 neg = _mm512_cmp_ps_mask(y, zero, _CMP_LT_OQ);
                x = _mm512_mask_mul_ps(y, neg, y, _mm512_maskz_loadu_ps(km, a->slope + c));
                x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(km, a->m2 + c));
            }
            _mm512_mask_storeu_ps(o + j, km, x);
        }
    }
}

/* attn_bh_avx512_impl with nb = 2 (2 or 3 levels) as a constant. */
ATTN_AVX512_ATTR static void attn_bh_avx512(const attn_args *a, int64_t bh, float *e, int32_t *pcs,
                                            uint64_t *planes)
{
    (void)e, (void)pcs, (void)planes;
    const int nb = attn_slices(a->levels);
    if (nb == 2)
        attn_bh_avx512_impl(a, bh, 2);
    else
        attn_bh_avx512_impl(a, bh, nb);
}
#endif

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
    void (*run)(const attn_args *, int64_t, float *, int32_t *, uint64_t *) = attn_bh_base;
#if BHV_X86
    if (bhvi_active->glue_avx512 && d <= 64 && M <= 64)
        run = attn_bh_avx512;
    else if (glue_fast())
        run = attn_bh_avx2;
#endif
    const int nt = bhvi_threads(threads);
    int failed = 0;
    (void)nt;
#pragma omp parallel num_threads(nt) if (nt > 1 && Bw * heads > 1) reduction(| : failed)
    {
        float *e = (float *)calloc((size_t)cdiv(M, 16) * 16, sizeof(float)); /* zero past M (attn_bh_avx2) */
        int32_t *pcs = (int32_t *)malloc((size_t)M * sizeof(int32_t));
        uint64_t *planes = (uint64_t *)malloc((size_t)(attn_slices(levels) * Wm) * sizeof(uint64_t));
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
