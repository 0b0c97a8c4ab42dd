/*
 * dispatch.c -- libbhvit's kernel variants and their run-time selection.
 *
 * Conventions of every kernel (see kernels.py):
 *   sign(x) = +1 if x >= 0 (-0.0 included) else -1; bit = 1 for +1.
 *   Bits are packed little-endian into uint64 words along the last axis:
 *   element k -> word k / 64, bit k % 64; padding bits of the last word are 0.
 *   Binary dot of two packed +-1 vectors of true length K: K - 2 * popcount(a ^ b).
 *
 * Variants (the best one this CPU runs is chosen when the library loads; bhv_select):
 *   c-portable          __builtin_popcountll, no ISA extension assumed
 *   c-popcnt            the same code compiled for the POPCNT instruction   (x86-64)
 *   c-avx2              AVX2 nibble-lookup popcount (vpshufb + vpsadbw)     (x86-64)
 *   c-avx512-vpopcntdq  AVX-512F + VPOPCNTDQ                                (x86-64)
 *   c-neon              NEON vcntq_u8 byte popcounts                        (AArch64)
 */
#include "core.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static int supported_always(void) { return 1; }

#if BHV_X86
static int supported_popcnt(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("popcnt");
}

static int supported_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
}

static int supported_avx512(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
}
#endif

/* Ordered from least to most preferred. */
static const variant_t VARIANTS[] = {
    {"c-portable", BHV_SCALAR_NR, BHV_SCALAR_MR, bhvi_block_portable, bhvi_pack_f32_portable,
     bhvi_pack_u8_portable, supported_always, 0, 0},
#if BHV_X86
    {"c-popcnt", BHV_SCALAR_NR, BHV_SCALAR_MR, bhvi_block_popcnt, bhvi_pack_f32_portable, bhvi_pack_u8_portable,
     supported_popcnt, 0, 0},
    {"c-avx2", BHV_AVX2_NR, BHV_AVX2_MR, bhvi_block_avx2, bhvi_pack_f32_avx2, bhvi_pack_u8_avx2, supported_avx2,
     1, 0},
    {"c-avx512-vpopcntdq", BHV_AVX512_NR, BHV_AVX512_MR, bhvi_block_avx512, bhvi_pack_f32_avx512,
     bhvi_pack_u8_avx2, supported_avx512, 1, 1},
#endif
#if defined(__aarch64__)
    {"c-neon", BHV_NEON_NR, BHV_NEON_MR, bhvi_block_neon, bhvi_pack_f32_portable, bhvi_pack_u8_portable,
     supported_always, 0, 0},
#endif
};
#define N_VARIANTS ((int)(sizeof(VARIANTS) / sizeof(VARIANTS[0])))

BHVI const variant_t *bhvi_active = &VARIANTS[0];

static const variant_t *best_variant(void)
{
    for (int i = N_VARIANTS - 1; i > 0; --i)
        if (VARIANTS[i].supported())
            return &VARIANTS[i];
    return &VARIANTS[0];
}

__attribute__((constructor)) static void bhv_init(void) { bhvi_active = best_variant(); }

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

EXPORT const char *bhv_backend(void) { return bhvi_active->name; }

/* name: a variant name or "auto". 0 = ok, -1 = unknown name, -2 = not supported here. */
EXPORT int bhv_select(const char *name)
{
    if (name == NULL || strcmp(name, "auto") == 0) {
        bhvi_active = best_variant();
        return 0;
    }
    for (int i = 0; i < N_VARIANTS; ++i)
        if (strcmp(name, VARIANTS[i].name) == 0) {
            if (!VARIANTS[i].supported())
                return -2;
            bhvi_active = &VARIANTS[i];
            return 0;
        }
    return -1;
}

BHVI int bhvi_threads(int threads)
{
#ifdef _OPENMP
    return threads > 0 ? threads : omp_get_max_threads();
#else
    (void)threads;
    return 1;
#endif
}

EXPORT int bhv_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

EXPORT int bhv_max_threads(void) { return bhvi_threads(0); }
