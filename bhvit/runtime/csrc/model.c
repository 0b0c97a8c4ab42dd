/*
 * model.c -- libbhvit's model: load an export, prepare its plan, run it (bhvit.h).
 *
 * Loading reads manifest.json and model.safetensors with bounded reads, checks the
 * weights file's size and SHA-256 against the manifest, parses the safetensors header,
 * checks the model config (the same bounds as bhvit/runtime/format.py), and builds the
 * plan: every tensor the config implies is looked up once, with its expected shape (a
 * tensor of another shape, a missing one or one the config does not use is an error),
 * float16 tensors are widened, float parameters must be finite, and every binary
 * layer's weights are packed into the active kernel variant's panels.
 *
 * The forward pass mirrors bhvit/runtime/engine.py (the readable reference) op for op,
 * on channels-last float32 maps, with the fused kernels of kernels.h.  Temporaries come
 * from a per-model arena that grows to the largest batch run so far, so a run of a batch
 * size seen before allocates nothing but the kernels' small per-thread buffers.
 */
#include "bhvit.h"
#include "json.h"
#include "kernels.h"
#include "preprocess.h"
#include "sha256.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_MANIFEST_BYTES (64 << 20)
#define MAX_HEADER_BYTES (100 << 20)
#define MAX_WEIGHTS_BYTES ((int64_t)1 << 34)
#define MAX_ATTENTION_KEYS 16384
#define MAX_BRANCHES 16
#define EXPORT_FORMAT "bhvit-packed"
#define EXPORT_VERSION 2

/* ------------------------------------------------------------------ errors */

static _Thread_local char g_err[1024];

static int seterr(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err, sizeof(g_err), fmt, ap);
    va_end(ap);
    return code;
}

const char *bhvit_last_error(void) { return g_err; }

/* ------------------------------------------------------------------ arena */

typedef struct {
    char *base;
    size_t cap, used, extra, peak;
    void **ov;
    size_t nov, capov;
} arena_t;

static void *arena_alloc(arena_t *a, size_t bytes)
{
    bytes = (bytes + 63) & ~(size_t)63;
    if (bytes == 0)
        bytes = 64;
    void *p;
    if (a->used + bytes <= a->cap) {
        p = a->base + a->used;
        a->used += bytes;
    } else {
        if (a->nov == a->capov) {
            const size_t nc = a->capov ? 2 * a->capov : 16;
            void **ov = (void **)realloc(a->ov, nc * sizeof(void *));
            if (!ov)
                return NULL;
            a->ov = ov;
            a->capov = nc;
        }
        p = aligned_alloc(64, bytes);
        if (!p)
            return NULL;
        a->ov[a->nov++] = p;
        a->extra += bytes;
    }
    if (a->used + a->extra > a->peak)
        a->peak = a->used + a->extra;
    return p;
}

/* After a forward pass: if it overflowed, one block big enough for the next. */
static int arena_settle(arena_t *a)
{
    int rc = 0;
    if (a->nov) {
        for (size_t i = 0; i < a->nov; ++i)
            free(a->ov[i]);
        a->nov = 0;
        a->extra = 0;
        free(a->base);
        const size_t cap = (a->peak + 4095) & ~(size_t)4095;
        a->base = (char *)aligned_alloc(64, cap);
        a->cap = a->base ? cap : 0;
        rc = a->base ? 0 : -1;
    }
    a->used = 0;
    return rc;
}

static void arena_free(arena_t *a)
{
    for (size_t i = 0; i < a->nov; ++i)
        free(a->ov[i]);
    free(a->ov);
    free(a->base);
    memset(a, 0, sizeof(*a));
}

/* ------------------------------------------------------------------ plan */

typedef struct {
    int ln;            /* 0: affine x * a + b (a folded BatchNorm); 1: LayerNorm, weight a, bias b */
    const float *a, *b;
    float eps;
} norm_t;

typedef struct {
    const float *m1, *slope, *m2;
} act_t;

typedef struct {
    const float *scale, *bias; /* bias + y * scale */
} ls_t;

typedef struct {               /* binary linear: N outputs, K inputs */
    const uint64_t *wbits;
    int64_t N, K;
    const float *scale, *shift, *ib;
    bhv_panels pan;
} blin_t;

typedef struct {               /* binary conv: Cout x KH x KW over cpg bits per group */
    const uint64_t *wbits;
    int64_t Cout, KH, KW, cpg, G;
    const float *scale, *shift;
    bhv_conv conv;
} bconv_t;

typedef struct {               /* layer-wise residual RPReLU(norm(op(x)) + shortcut(x)) */
    int bn;                    /* op kind binary+bn: the BatchNorm folded into scale/shift */
    norm_t norm;               /* otherwise: a LayerNorm after the op */
    act_t act;
} resid_t;

typedef struct {
    blin_t op;
    resid_t r;
} rlin_t;

typedef struct {
    int mixer; /* 0 msgdc, 1 conv (one dense 3x3), 2 msmha, 3 attn (global) */
    norm_t norm1, norm2;
    /* msgdc / conv */
    const float *ib;
    int64_t groups, nbr, dil[MAX_BRANCHES];
    bconv_t convs[MAX_BRANCHES];
    act_t acts[MAX_BRANCHES];
    norm_t mnorm;
    /* msmha / attn */
    int64_t heads, window;
    const float *pool_mix, *out_mix, *tn_w, *tn_b, *qkv_bias, *qd_step, *qd_zp;
    rlin_t q, k, v, o;
    norm_t ctx_norm;
    act_t ctx_act;
    ls_t ls;
    /* mlp */
    rlin_t up, down;
    ls_t mls;
    /* shift branches: (3 * nshift, C) each, owned */
    float *shift_s, *shift_b;
} block_t;

typedef struct {
    int binary;
    norm_t norm0;
    bconv_t reduce;
    resid_t r;
    const float *ib;
    float *fp_wt; /* owned (4 C, Cout) */
    norm_t norm;
    const float *pos;
} down_t;

typedef struct {
    char *name;
    int dtype;      /* 0 float32 (after widening), 2 int64 words */
    int file_dtype; /* in the file: 0 F32, 1 F16, 2 I64 */
    int64_t off0, off1; /* its bytes in the file's data section */
    int ndim;
    int64_t shape[8];
    int64_t numel;
    void *data; /* owned */
    int used;
} tensor_t;

/* The per-op-kind profile of the forward pass (BHVIT_PROFILE=1 at bhvit_load, or
 * bhv_plan_profile_enable): wall time and calls per kind, summed over runs.  Off, it costs
 * one branch per kernel call. */
enum {
    P_STEM_PATCH, P_DENSE, P_NORM, P_GELU, P_PACK, P_XGEMM, P_BLIN, P_BCONV, P_EPI, P_RESID, P_ATT,
    P_ATT_GLUE, P_WINDOW, P_DOWN_POOL, P_SHIFT, P_POS, P_CHECK, P_ARENA, P_N
};
static const char *const PROF_NAMES[P_N] = {
    "stem patches (im2col)", "dense fp32 (stem, head, fp down)", "norm (LayerNorm, affine)", "GELU",
    "sign packing", "xnor GEMM (unfused)", "binary linear + epilogue (fused)", "binary conv (implicit GEMM)",
    "epilogue (conv, LN form)", "residual / LN-tail loops", "attention core (QD)", "attention glue (ctx, LN form)",
    "window partition / pool / mix", "downsample 2x2 pool / patches", "shift branches", "pos embed / final pool",
    "input + logits checks", "arena settle",
};

/* What one thread of a run owns: its arena of temporaries and its profile sums.  A batch runs
 * in tiles of images (tile_of); with several threads and at least two tiles, each thread runs
 * whole tiles through the plan on its own worker (one parallel region per run), otherwise one
 * worker runs the tiles in turn with the kernels' own threads. */
typedef struct {
    arena_t ar;
    double prof_s[P_N];
    int64_t prof_calls[P_N];
    double busy;       /* seconds this worker ran tiles (profile) */
    int rc;            /* the first failure of this worker's tiles, its tile and message */
    int64_t err_tile;
    char err[1024];
} worker_t;

struct bhvit_model {
    /* config */
    int64_t img, chans, classes, stride, pad, groups, qd_levels, grid;
    int64_t dims[4], depths[4], ratios[4], heads[4], windows[4];
    int64_t ndil, dil[MAX_BRANCHES], nshift, shift[MAX_BRANCHES];
    int qd, shift_on, msgdc_on, msmha_on;
    int stage_mixer[4];
    int threads;
    /* data */
    int has_norm;
    float *mean, *std;
    int64_t resize; /* the evaluation transform: shorter side before the centre crop */
    int bicubic;    /* its filter: 1 bicubic, 0 bilinear */
    char **class_names;
    /* tensors and plan */
    tensor_t *t;
    int64_t nt;
    jval kinds;
    float *stem_wt;
    const float *stem_b, *stem_pos;
    norm_t stem_norm;
    down_t down[4];
    block_t *blocks[4];
    norm_t final_norm;
    float *head_wt;
    const float *head_b;
    /* workers (grown to the threads of the largest parallel run) and batch tiles */
    worker_t *wk;
    int nwk;
    int64_t tile;      /* images per tile: 0 chooses it from the cache size (bhv_plan_set_tile) */
    size_t img_bytes;  /* the arena's peak for one image (the load's run) */
    int64_t last_tile; /* the tile size and workers of the latest run */
    int last_workers;
    /* profile */
    int prof_on;
    double prof_total;
    int64_t prof_runs, prof_images;
};

static int64_t cdiv64(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Images per tile for a batch on nt threads: the set tile, or as many images as 8 x the L2 cache
 * holds of the plan's temporaries (at least one: the arena's peak counts every temporary of a
 * block, an op touches a few; measured best at 4-16 images for bhvit_tiny_c32, whose peak is
 * 2.3 MB an image, one image for bhvit_tiny at 224, 28 MB); with several threads at least one tile
 * per thread where the batch allows. */
static int64_t tile_of(const bhvit_model *m, int64_t batch, int nt)
{
    int64_t T = m->tile;
    if (T <= 0) {
        long l2 = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
        l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
        const int64_t budget = 8 * (l2 > 0 ? (int64_t)l2 : (int64_t)1 << 20);
        T = budget / (int64_t)(m->img_bytes ? m->img_bytes : 1);
        T = T < 1 ? 1 : T;
    }
    if (nt > 1 && batch >= 2) {
        const int64_t even = cdiv64(batch, nt);
        T = T < even ? T : even;
    }
    return T < batch ? T : batch;
}

/* Workers [0, n) exist (zeroed when new). */
static int ensure_workers(bhvit_model *m, int n)
{
    if (n <= m->nwk)
        return 0;
    worker_t *w = (worker_t *)realloc(m->wk, (size_t)n * sizeof(worker_t));
    if (!w)
        return -1;
    memset(w + m->nwk, 0, (size_t)(n - m->nwk) * sizeof(worker_t));
    m->wk = w;
    m->nwk = n;
    return 0;
}

/* ------------------------------------------------------------------ file reading */

static int read_file(const char *path, int64_t limit, int64_t expected, char **out, int64_t *len)
{
    /* non-blocking open, then the type check: opening a FIFO for reading would otherwise wait
     * for a writer forever */
    const int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return seterr(BHVIT_E_IO, "%s: cannot open (%s)", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return seterr(BHVIT_E_IO, "%s: not a regular file", path);
    }
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        close(fd);
        return seterr(BHVIT_E_IO, "%s: cannot open (%s)", path, strerror(errno));
    }
    const int64_t size = (int64_t)st.st_size;
    if (size > limit) {
        fclose(f);
        return seterr(BHVIT_E_FORMAT, "%s: %lld bytes, more than the %lld a bhvit export holds", path,
                      (long long)size, (long long)limit);
    }
    if (expected >= 0 && size != expected) {
        fclose(f);
        return seterr(BHVIT_E_FORMAT, "%s: %lld bytes, the manifest says %lld; the file is truncated or was replaced",
                      path, (long long)size, (long long)expected);
    }
    char *buf = (char *)malloc((size_t)size + 1);
    if (!buf) {
        fclose(f);
        return seterr(BHVIT_E_NOMEM, "%s: out of memory reading %lld bytes", path, (long long)size);
    }
    const size_t got = fread(buf, 1, (size_t)size, f);
    fclose(f);
    if ((int64_t)got != size) {
        free(buf);
        return seterr(BHVIT_E_IO, "%s: read %zu of %lld bytes", path, got, (long long)size);
    }
    buf[size] = 0;
    *out = buf;
    *len = size;
    return 0;
}

/* ------------------------------------------------------------------ config */

static int cfg_int(const jval *cfg, const char *key, int64_t lo, int64_t hi, int64_t *out)
{
    const jval *v = bhvi_json_get(cfg, key);
    if (!v || v->type != J_NUM || !v->is_int || v->i < lo || v->i > hi)
        return seterr(BHVIT_E_FORMAT, "config %s must be an integer in %lld..%lld", key, (long long)lo,
                      (long long)hi);
    *out = v->i;
    return 0;
}

static int cfg_list(const jval *cfg, const char *key, int64_t nmin, int64_t nmax, int64_t lo, int64_t hi,
                    int64_t *out, int64_t *n)
{
    const jval *v = bhvi_json_get(cfg, key);
    if (!v || v->type != J_ARR || (int64_t)v->n < nmin || (int64_t)v->n > nmax)
        goto bad;
    for (size_t i = 0; i < v->n; ++i) {
        const jval *x = &v->items[i];
        if (x->type != J_NUM || !x->is_int || x->i < lo || x->i > hi)
            goto bad;
        out[i] = x->i;
    }
    if (n)
        *n = (int64_t)v->n;
    return 0;
bad:
    return seterr(BHVIT_E_FORMAT, "config %s must be a list of %lld..%lld integers in %lld..%lld", key,
                  (long long)nmin, (long long)nmax, (long long)lo, (long long)hi);
}

static int cfg_bool(const jval *cfg, const char *key, int *out)
{
    const jval *v = bhvi_json_get(cfg, key);
    if (!v || v->type != J_BOOL)
        return seterr(BHVIT_E_FORMAT, "config %s must be true or false", key);
    *out = v->boolean;
    return 0;
}

enum { MX_MSGDC = 0, MX_CONV = 1, MX_MSMHA = 2, MX_ATTN = 3 };

static int read_config(bhvit_model *m, const jval *cfg)
{
    if (!cfg || cfg->type != J_OBJ)
        return seterr(BHVIT_E_FORMAT, "the manifest has no 'config' object");
    int rc = cfg_int(cfg, "img_size", 1, 16384, &m->img) || cfg_int(cfg, "in_chans", 1, 1024, &m->chans) ||
             cfg_int(cfg, "num_classes", 1, 1000000, &m->classes) ||
             cfg_int(cfg, "stem_stride", 1, 16384, &m->stride) || cfg_int(cfg, "stem_pad", 0, 16384, &m->pad) ||
             cfg_int(cfg, "msgdc_groups", 1, 65536, &m->groups) ||
             cfg_int(cfg, "qd_levels", 1, 64, &m->qd_levels) ||
             cfg_list(cfg, "dims", 4, 4, 1, 65536, m->dims, NULL) ||
             cfg_list(cfg, "depths", 4, 4, 1, 1024, m->depths, NULL) ||
             cfg_list(cfg, "mlp_ratios", 4, 4, 1, 64, m->ratios, NULL) ||
             cfg_list(cfg, "heads", 4, 4, 1, 65536, m->heads, NULL) ||
             cfg_list(cfg, "windows", 4, 4, 1, 16384, m->windows, NULL) ||
             cfg_bool(cfg, "qd", &m->qd) || cfg_bool(cfg, "shift", &m->shift_on) ||
             cfg_bool(cfg, "msgdc", &m->msgdc_on) || cfg_bool(cfg, "msmha", &m->msmha_on);
    if (rc)
        return BHVIT_E_FORMAT;
    const int64_t side = m->img + 2 * m->pad;
    if (side % (8 * m->stride))
        return seterr(BHVIT_E_FORMAT, "config img_size + 2 * stem_pad = %lld is not a multiple of 8 * stem_stride",
                      (long long)side);
    m->grid = side / m->stride;
    if (cfg_list(cfg, "msgdc_dilations", 1, MAX_BRANCHES, 1, 65536, m->dil, &m->ndil) ||
        cfg_list(cfg, "shift_sizes", 0, MAX_BRANCHES, 1, m->grid, m->shift, &m->nshift))
        return BHVIT_E_FORMAT;
    const jval *hy = bhvi_json_get(cfg, "hybrid");
    const char *h = (hy && hy->type == J_STR) ? hy->str : "";
    int base[4];
    if (strcmp(h, "hybrid") == 0) {
        base[0] = base[1] = MX_MSGDC;
        base[2] = base[3] = MX_MSMHA;
    } else if (strcmp(h, "msgdc") == 0) {
        base[0] = base[1] = base[2] = base[3] = MX_MSGDC;
    } else if (strcmp(h, "msmha") == 0) {
        base[0] = base[1] = base[2] = base[3] = MX_MSMHA;
    } else {
        return seterr(BHVIT_E_FORMAT, "config hybrid must be 'hybrid', 'msgdc' or 'msmha'");
    }
    for (int i = 0; i < 3; ++i)
        if (m->dims[i + 1] % m->dims[i])
            return seterr(BHVIT_E_FORMAT, "config dims[%d] is not a multiple of dims[%d]", i + 1, i);
    for (int i = 0; i < 4; ++i) {
        int mx = base[i];
        if (mx == MX_MSGDC && !m->msgdc_on)
            mx = MX_CONV;
        if (mx == MX_MSMHA && !m->msmha_on)
            mx = MX_ATTN;
        m->stage_mixer[i] = mx;
        const int64_t size = m->grid >> i, C = m->dims[i];
        if (m->shift_on && m->nshift && C % 4)
            return seterr(BHVIT_E_FORMAT, "config dims[%d] = %lld is not divisible by 4 (the shift channel mix)", i,
                          (long long)C);
        if (mx == MX_MSGDC && C % m->groups)
            return seterr(BHVIT_E_FORMAT, "config dims[%d] is not divisible by msgdc_groups", i);
        if ((mx == MX_MSMHA || mx == MX_ATTN) && C % m->heads[i])
            return seterr(BHVIT_E_FORMAT, "config dims[%d] is not divisible by heads[%d]", i, i);
        if (mx == MX_MSMHA && size % m->windows[i])
            return seterr(BHVIT_E_FORMAT, "config windows[%d] does not divide the stage-%d map side", i, i + 1);
        if (mx == MX_MSMHA || mx == MX_ATTN) {
            const int64_t w = m->windows[i];
            const int64_t keys = mx == MX_ATTN ? size * size : w * w + (size / w) * (size / w);
            if (keys > MAX_ATTENTION_KEYS)
                return seterr(BHVIT_E_FORMAT, "config stage %d attends over %lld tokens; at most %d", i + 1,
                              (long long)keys, MAX_ATTENTION_KEYS);
        }
    }
    return 0;
}

static int read_data(bhvit_model *m, const jval *data)
{
    m->resize = m->img; /* absent: no enlargement, bilinear (image.py eval_transform) */
    m->bicubic = 0;
    if (!data || data->type == J_NULL)
        return 0;
    if (data->type != J_OBJ)
        return seterr(BHVIT_E_FORMAT, "data is not an object");
    const jval *mean = bhvi_json_get(data, "mean"), *std = bhvi_json_get(data, "std");
    const int hm = mean && mean->type != J_NULL, hs = std && std->type != J_NULL;
    if (hm != hs)
        return seterr(BHVIT_E_FORMAT, "data has only one of mean and std");
    if (hm) {
        if (mean->type != J_ARR || std->type != J_ARR || (int64_t)mean->n != m->chans || (int64_t)std->n != m->chans)
            return seterr(BHVIT_E_FORMAT, "data mean and std must be lists of %lld numbers", (long long)m->chans);
        m->mean = (float *)malloc((size_t)m->chans * sizeof(float));
        m->std = (float *)malloc((size_t)m->chans * sizeof(float));
        if (!m->mean || !m->std)
            return seterr(BHVIT_E_NOMEM, "out of memory");
        for (int64_t c = 0; c < m->chans; ++c) {
            const jval *a = &mean->items[c], *b = &std->items[c];
            if (a->type != J_NUM || b->type != J_NUM || !isfinite(a->num) || !isfinite(b->num) ||
                !isfinite((float)a->num) || !(b->num >= 1e-6)) /* MIN_STD in runtime/format.py */
                return seterr(BHVIT_E_FORMAT, "data mean[%lld] / std[%lld] must be finite float32 numbers, std >= 1e-06",
                              (long long)c, (long long)c);
            m->mean[c] = (float)a->num;
            m->std[c] = (float)b->num;
        }
        m->has_norm = 1;
    }
    /* the evaluation transform (docs/EXPORT_FORMAT.md): validated as the Python reader does */
    const jval *rs = bhvi_json_get(data, "resize"), *ip = bhvi_json_get(data, "interpolation");
    if (rs && rs->type != J_NULL && (rs->type != J_NUM || !rs->is_int || rs->i < m->img || rs->i > 65536))
        return seterr(BHVIT_E_FORMAT, "data resize must be an integer from img_size (%lld) to 65536",
                      (long long)m->img);
    if (ip && ip->type != J_NULL &&
        (ip->type != J_STR || (strcmp(ip->str, "bilinear") != 0 && strcmp(ip->str, "bicubic") != 0)))
        return seterr(BHVIT_E_FORMAT, "data interpolation must be one of ['bilinear', 'bicubic']");
    if (rs && rs->type != J_NULL)
        m->resize = rs->i;
    if (ip && ip->type != J_NULL)
        m->bicubic = strcmp(ip->str, "bicubic") == 0;
    const jval *cl = bhvi_json_get(data, "classes");
    if (cl && cl->type != J_NULL) {
        if (cl->type != J_ARR || (int64_t)cl->n != m->classes)
            return seterr(BHVIT_E_FORMAT, "data classes must list %lld names", (long long)m->classes);
        m->class_names = (char **)calloc((size_t)m->classes, sizeof(char *));
        if (!m->class_names)
            return seterr(BHVIT_E_NOMEM, "out of memory");
        for (int64_t i = 0; i < m->classes; ++i) {
            if (cl->items[i].type != J_STR)
                return seterr(BHVIT_E_FORMAT, "data classes[%lld] is not a string", (long long)i);
            /* no control character (C0, DEL, C1): a newline would forge an output line */
            for (const unsigned char *c = (const unsigned char *)cl->items[i].str; *c; ++c)
                if (*c < 0x20 || *c == 0x7F || (c[0] == 0xC2 && c[1] >= 0x80 && c[1] <= 0x9F))
                    return seterr(BHVIT_E_FORMAT, "data classes[%lld] holds a control character", (long long)i);
            m->class_names[i] = strdup(cl->items[i].str);
            if (!m->class_names[i])
                return seterr(BHVIT_E_NOMEM, "out of memory");
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ safetensors */

static float half_to_float(uint16_t h)
{
    const uint32_t s = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 0x1f, f = h & 0x3ff;
    uint32_t bits;
    if (e == 0) {
        if (f == 0) {
            bits = s;
        } else { /* subnormal: normalise */
            int sh = 0;
            uint32_t ff = f;
            while (!(ff & 0x400)) {
                ff <<= 1;
                ++sh;
            }
            bits = s | (uint32_t)(127 - 15 - sh + 1) << 23 | (ff & 0x3ff) << 13;
        }
    } else if (e == 31) {
        bits = s | 0x7f800000u | f << 13;
    } else {
        bits = s | (e + 127 - 15) << 23 | f << 13;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

static int tensor_cmp(const void *a, const void *b)
{
    return strcmp(((const tensor_t *)a)->name, ((const tensor_t *)b)->name);
}

static int offset_cmp(const void *a, const void *b)
{
    const tensor_t *x = (const tensor_t *)a, *y = (const tensor_t *)b;
    if (x->off0 != y->off0)
        return x->off0 < y->off0 ? -1 : 1;
    return (x->off1 > y->off1) - (x->off1 < y->off1);
}

static int read_tensors(bhvit_model *m, const char *wpath, const char *blob, int64_t len)
{
    if (len < 8)
        return seterr(BHVIT_E_FORMAT, "%s: too short for safetensors", wpath);
    uint64_t hn = 0;
    for (int i = 0; i < 8; ++i)
        hn |= (uint64_t)(unsigned char)blob[i] << (8 * i);
    if (hn > MAX_HEADER_BYTES || (int64_t)hn > len - 8)
        return seterr(BHVIT_E_FORMAT, "%s: safetensors header of %llu bytes does not fit the file", wpath,
                      (unsigned long long)hn);
    jval hdr;
    char jerr[160];
    if (bhvi_json_parse(blob + 8, (size_t)hn, &hdr, jerr, sizeof(jerr)))
        return seterr(BHVIT_E_FORMAT, "%s: cannot parse the safetensors header (%s)", wpath, jerr);
    int rc = 0;
    const char *data = blob + 8 + hn;
    const int64_t dlen = len - 8 - (int64_t)hn;
    if (hdr.type != J_OBJ) {
        rc = seterr(BHVIT_E_FORMAT, "%s: the safetensors header is not an object", wpath);
        goto done;
    }
    m->t = (tensor_t *)calloc(hdr.n ? hdr.n : 1, sizeof(tensor_t));
    if (!m->t) {
        rc = seterr(BHVIT_E_NOMEM, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < hdr.n; ++i) {
        const char *name = hdr.keys[i];
        const jval *e = &hdr.items[i];
        if (strcmp(name, "__metadata__") == 0)
            continue;
        const jval *dt = bhvi_json_get(e, "dtype"), *sh = bhvi_json_get(e, "shape"), *off = bhvi_json_get(e, "data_offsets");
        if (!dt || dt->type != J_STR || !sh || sh->type != J_ARR || sh->n > 8 || !off || off->type != J_ARR ||
            off->n != 2) {
            rc = seterr(BHVIT_E_FORMAT, "%s: malformed safetensors entry %.80s", wpath, name);
            goto done;
        }
        tensor_t *t = &m->t[m->nt++];
        t->name = strdup(name);
        if (!t->name) {
            rc = seterr(BHVIT_E_NOMEM, "out of memory");
            goto done;
        }
        int esize;
        int src; /* 0 f32, 1 f16, 2 i64 */
        if (strcmp(dt->str, "F32") == 0)
            src = 0, esize = 4;
        else if (strcmp(dt->str, "F16") == 0)
            src = 1, esize = 2;
        else if (strcmp(dt->str, "I64") == 0)
            src = 2, esize = 8;
        else {
            rc = seterr(BHVIT_E_FORMAT, "%s: tensor %.80s has dtype %.20s (F32, F16 or I64 expected)", wpath, name,
                        dt->str);
            goto done;
        }
        const int is_bits = strlen(name) > 6 && strcmp(name + strlen(name) - 6, ".wbits") == 0;
        if (is_bits != (src == 2)) {
            rc = seterr(BHVIT_E_FORMAT, "%s: tensor %.80s: packed signs (.wbits) are I64, other tensors F32/F16",
                        wpath, name);
            goto done;
        }
        int64_t numel = 1;
        t->ndim = (int)sh->n;
        t->file_dtype = src;
        for (size_t d = 0; d < sh->n; ++d) {
            const jval *x = &sh->items[d];
            if (x->type != J_NUM || !x->is_int || x->i < 0 || x->i >= ((int64_t)1 << 31)) {
                rc = seterr(BHVIT_E_FORMAT, "%s: tensor %.80s has a bad shape", wpath, name);
                goto done;
            }
            t->shape[d] = x->i;
            /* checked: [2^30, 8, 2^30, 2] must not wrap to 0 elements */
            if (__builtin_mul_overflow(numel, x->i, &numel) || numel > ((int64_t)1 << 33)) {
                rc = seterr(BHVIT_E_FORMAT, "%s: tensor %.80s is too large", wpath, name);
                goto done;
            }
        }
        t->numel = numel;
        const jval *o0 = &off->items[0], *o1 = &off->items[1];
        if (o0->type != J_NUM || o1->type != J_NUM || !o0->is_int || !o1->is_int || o0->i < 0 || o1->i < o0->i ||
            o1->i > dlen || o1->i - o0->i != numel * esize) {
            rc = seterr(BHVIT_E_FORMAT, "%s: tensor %.80s: data offsets do not fit its shape or the file", wpath,
                        name);
            goto done;
        }
        t->off0 = o0->i;
        t->off1 = o1->i;
        const char *src_p = data + o0->i;
        t->dtype = src == 2 ? 2 : 0;
        t->data = aligned_alloc(64, (size_t)(((numel ? numel : 1) * (src == 2 ? 8 : 4) + 63) & ~63));
        if (!t->data) {
            rc = seterr(BHVIT_E_NOMEM, "out of memory");
            goto done;
        }
        if (src == 1) {
            float *dst = (float *)t->data;
            for (int64_t j = 0; j < numel; ++j) {
                uint16_t hv;
                memcpy(&hv, src_p + 2 * j, 2);
                dst[j] = half_to_float(hv);
            }
        } else {
            memcpy(t->data, src_p, (size_t)(numel * esize));
        }
        if (src != 2) {
            const float *f = (const float *)t->data;
            for (int64_t j = 0; j < numel; ++j)
                if (!isfinite(f[j])) {
                    rc = seterr(BHVIT_E_FORMAT, "%s: tensor %.80s has NaN or infinite values; the model diverged "
                                "or the file is corrupt", wpath, name);
                    goto done;
                }
        }
    }
    /* the tensors' bytes cover the data section exactly, without gaps or overlaps (as the
     * safetensors format requires and Python's reader checks) */
    qsort(m->t, (size_t)m->nt, sizeof(tensor_t), offset_cmp);
    int64_t end = 0;
    for (int64_t i = 0; i <= m->nt; ++i) {
        if (i < m->nt ? m->t[i].off0 != end : end != dlen) {
            rc = seterr(BHVIT_E_FORMAT, "%s: the tensors' data offsets overlap or leave gaps (at byte %lld)", wpath,
                        (long long)end);
            goto done;
        }
        if (i < m->nt)
            end = m->t[i].off1;
    }
    qsort(m->t, (size_t)m->nt, sizeof(tensor_t), tensor_cmp);
    for (int64_t i = 1; i < m->nt; ++i)
        if (strcmp(m->t[i - 1].name, m->t[i].name) == 0) {
            rc = seterr(BHVIT_E_FORMAT, "%s: tensor %.80s appears twice", wpath, m->t[i].name);
            goto done;
        }
done:
    bhvi_json_free(&hdr);
    return rc;
}

/* ------------------------------------------------------------------ plan building */

typedef struct {
    bhvit_model *m;
    const char *file;
    int rc;
} builder;

static tensor_t *find(bhvit_model *m, const char *name)
{
    int64_t lo = 0, hi = m->nt - 1;
    while (lo <= hi) {
        const int64_t mid = (lo + hi) / 2;
        const int c = strcmp(m->t[mid].name, name);
        if (c == 0)
            return &m->t[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return NULL;
}

/* The tensor prefix.suffix of the given shape (-1: any size), or NULL with an error set. */
static void *tget(builder *b, const char *prefix, const char *suffix, int bits, int ndim, ...)
{
    if (b->rc)
        return NULL;
    char name[256];
    snprintf(name, sizeof(name), "%s%s%s", prefix, suffix[0] ? "." : "", suffix);
    tensor_t *t = find(b->m, name);
    if (!t) {
        b->rc = seterr(BHVIT_E_FORMAT, "%s: no tensor %s, which the manifest's config implies", b->file, name);
        return NULL;
    }
    int ok = t->ndim == ndim && (t->dtype == 2) == bits;
    va_list ap;
    va_start(ap, ndim);
    char want[128] = "";
    for (int d = 0; d < ndim; ++d) {
        const int64_t s = va_arg(ap, int64_t);
        if (ok && s >= 0 && t->shape[d] != s)
            ok = 0;
        snprintf(want + strlen(want), sizeof(want) - strlen(want), d ? ", %lld" : "%lld", (long long)s);
    }
    va_end(ap);
    if (!ok) {
        b->rc = seterr(BHVIT_E_FORMAT, "%s: tensor %s does not have the shape (%s) the manifest's config implies",
                       b->file, name, want);
        return NULL;
    }
    t->used = 1;
    return t->data;
}

#define F1(b, p, s, n) ((const float *)tget(b, p, s, 0, 1, (int64_t)(n)))

static const char *kind_of(builder *b, const char *name)
{
    const jval *k = bhvi_json_get(&b->m->kinds, name);
    if (!k || k->type != J_STR) {
        if (!b->rc)
            b->rc = seterr(BHVIT_E_FORMAT, "%s: the manifest's kinds has no entry for %s", b->file, name);
        return "";
    }
    return k->str;
}

static void get_norm(builder *b, const char *prefix, int64_t C, norm_t *n)
{
    const char *kind = kind_of(b, prefix);
    if (b->rc)
        return;
    if (strcmp(kind, "affine") == 0) {
        n->ln = 0;
        n->a = F1(b, prefix, "scale", C);
        n->b = F1(b, prefix, "shift", C);
    } else if (strncmp(kind, "ln:", 3) == 0) {
        char *end;
        const double eps = strtod(kind + 3, &end);
        if (*end || !(eps > 0 && eps <= 1)) {
            b->rc = seterr(BHVIT_E_FORMAT, "%s: kinds[%s] is %.40s", b->file, prefix, kind);
            return;
        }
        n->ln = 1;
        n->eps = (float)eps;
        n->a = F1(b, prefix, "weight", C);
        n->b = F1(b, prefix, "bias", C);
    } else {
        b->rc = seterr(BHVIT_E_FORMAT, "%s: kinds[%s] is %.40s, not a norm", b->file, prefix, kind);
    }
}

static void get_act(builder *b, const char *prefix, int64_t C, act_t *a)
{
    a->m1 = F1(b, prefix, "move1", C);
    a->slope = F1(b, prefix, "slope", C);
    a->m2 = F1(b, prefix, "move2", C);
}

static void get_ls(builder *b, const char *prefix, int64_t C, ls_t *l)
{
    l->scale = F1(b, prefix, "scale", C);
    l->bias = F1(b, prefix, "bias", C);
}

/* kind of prefix.op must be binary or binary+bn; returns bn */
static int op_kind(builder *b, const char *op)
{
    const char *k = kind_of(b, op);
    if (b->rc)
        return 0;
    if (strcmp(k, "binary+bn") == 0)
        return 1;
    if (strcmp(k, "binary") == 0)
        return 0;
    b->rc = seterr(BHVIT_E_FORMAT, "%s: kinds[%s] is %.40s, not a binary layer", b->file, op, k);
    return 0;
}

static void get_linear(builder *b, const char *prefix, int64_t K, int64_t N, int input_bias, blin_t *l)
{
    char op[256];
    snprintf(op, sizeof(op), "%s.op", prefix);
    const int64_t W = (K + 63) / 64;
    l->N = N;
    l->K = K;
    l->wbits = (const uint64_t *)tget(b, op, "wbits", 1, 2, N, W);
    l->scale = F1(b, op, "scale", N);
    l->shift = F1(b, op, "shift", N);
    l->ib = NULL;
    if (input_bias)
        l->ib = F1(b, op, "input_bias", K);
    if (b->rc)
        return;
    /* the GEMM counts every bit: the bits past K in each row's last word must be 0 */
    if (K % 64)
        for (int64_t r = 0; r < N; ++r)
            if (l->wbits[r * W + W - 1] >> (K % 64)) {
                b->rc = seterr(BHVIT_E_FORMAT, "%s: %s.wbits has bits set past the layer's %lld inputs", b->file,
                               op, (long long)K);
                return;
            }
}

static void get_resid_linear(builder *b, const char *prefix, int64_t K, int64_t N, rlin_t *r)
{
    char op[256], buf[256];
    snprintf(op, sizeof(op), "%s.op", prefix);
    r->r.bn = op_kind(b, op);
    /* the input bias is optional for linears (engine.py reads it with .get) */
    snprintf(buf, sizeof(buf), "%s.op.input_bias", prefix);
    get_linear(b, prefix, K, N, find(b->m, buf) != NULL, &r->op);
    if (!r->r.bn) {
        snprintf(buf, sizeof(buf), "%s.norm", prefix);
        get_norm(b, buf, N, &r->r.norm);
    }
    snprintf(buf, sizeof(buf), "%s.act", prefix);
    get_act(b, buf, N, &r->r.act);
}

static void get_conv(builder *b, const char *op, int64_t Cout, int64_t KH, int64_t KW, int64_t cpg, int64_t G,
                     bconv_t *c)
{
    c->Cout = Cout;
    c->KH = KH;
    c->KW = KW;
    c->cpg = cpg;
    c->G = G;
    c->wbits = (const uint64_t *)tget(b, op, "wbits", 1, 4, Cout, KH, KW, (cpg + 63) / 64);
    c->scale = F1(b, op, "scale", Cout);
    c->shift = F1(b, op, "shift", Cout);
}

static float *transposed(builder *b, const char *name, int64_t rows, int64_t cols)
{
    const float *w = (const float *)tget(b, name, "", 0, 2, rows, cols);
    if (!w)
        return NULL;
    float *t = (float *)malloc((size_t)(rows * cols) * sizeof(float));
    if (!t) {
        b->rc = seterr(BHVIT_E_NOMEM, "out of memory");
        return NULL;
    }
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
            t[c * rows + r] = w[r * cols + c];
    return t;
}

static void build_block(builder *b, int i, int j, block_t *k)
{
    bhvit_model *m = b->m;
    char p[200], q[256];
    const int64_t C = m->dims[i], hidden = C * m->ratios[i];
    snprintf(p, sizeof(p), "stages.%d.blocks.%d", i, j);
    k->mixer = m->stage_mixer[i];
    snprintf(q, sizeof(q), "%s.norm1", p);
    get_norm(b, q, C, &k->norm1);
    snprintf(q, sizeof(q), "%s.norm2", p);
    get_norm(b, q, C, &k->norm2);
    if (k->mixer == MX_MSGDC || k->mixer == MX_CONV) {
        k->groups = k->mixer == MX_MSGDC ? m->groups : 1;
        k->nbr = k->mixer == MX_MSGDC ? m->ndil : 1;
        const int64_t cg = C / k->groups;
        snprintf(q, sizeof(q), "%s.mixer", p);
        k->ib = F1(b, q, "input_bias", C);
        for (int64_t t = 0; t < k->nbr; ++t) {
            k->dil[t] = k->mixer == MX_MSGDC ? m->dil[t] : 1;
            snprintf(q, sizeof(q), "%s.mixer.convs.%lld", p, (long long)t);
            get_conv(b, q, C, 3, 3, cg, k->groups, &k->convs[t]);
            snprintf(q, sizeof(q), "%s.mixer.acts.%lld", p, (long long)t);
            get_act(b, q, C, &k->acts[t]);
        }
        snprintf(q, sizeof(q), "%s.mixer.norm", p);
        get_norm(b, q, C, &k->mnorm);
    } else {
        k->heads = m->heads[i];
        k->window = k->mixer == MX_MSMHA ? m->windows[i] : 0;
        snprintf(q, sizeof(q), "%s.mixer", p);
        if (k->window) {
            k->pool_mix = F1(b, q, "pool_mix", C);
            k->out_mix = F1(b, q, "out_mix", C);
        }
        k->tn_w = F1(b, q, "token_norm.weight", C);
        k->tn_b = F1(b, q, "token_norm.bias", C);
        k->qkv_bias = (const float *)tget(b, q, "qkv_bias", 0, 2, (int64_t)3, C);
        k->qd_step = F1(b, q, "core.qd.step", k->heads);
        k->qd_zp = F1(b, q, "core.qd.zero_point", k->heads);
        if (k->qd_step)
            for (int64_t h = 0; h < k->heads; ++h)
                if (k->qd_step[h] == 0.0f) {
                    b->rc = seterr(BHVIT_E_FORMAT, "%s: tensor %s.core.qd.step (the QD step) has a zero value",
                                   b->file, q);
                    return;
                }
        rlin_t *projs[4] = {&k->q, &k->k, &k->v, &k->o};
        const char *names[4] = {"q_proj", "k_proj", "v_proj", "out_proj"};
        for (int t = 0; t < 4; ++t) {
            char r[256];
            snprintf(r, sizeof(r), "%s.mixer.%s", p, names[t]);
            get_resid_linear(b, r, C, C, projs[t]);
        }
        snprintf(q, sizeof(q), "%s.mixer.ctx_norm", p);
        get_norm(b, q, C, &k->ctx_norm);
        snprintf(q, sizeof(q), "%s.mixer.ctx_act", p);
        get_act(b, q, C, &k->ctx_act);
        snprintf(q, sizeof(q), "%s.mixer.layer_scale", p);
        get_ls(b, q, C, &k->ls);
    }
    snprintf(q, sizeof(q), "%s.mlp.up", p);
    get_resid_linear(b, q, C, hidden, &k->up);
    snprintf(q, sizeof(q), "%s.mlp.down", p);
    get_resid_linear(b, q, hidden, C, &k->down);
    snprintf(q, sizeof(q), "%s.mlp.layer_scale", p);
    get_ls(b, q, C, &k->mls);
    if (m->shift_on && m->nshift) {
        const int64_t nb = 3 * m->nshift;
        k->shift_s = (float *)malloc((size_t)(nb * C) * sizeof(float));
        k->shift_b = (float *)malloc((size_t)(nb * C) * sizeof(float));
        if (!k->shift_s || !k->shift_b) {
            b->rc = seterr(BHVIT_E_NOMEM, "out of memory");
            return;
        }
        for (int64_t t = 0; t < nb; ++t) {
            snprintf(q, sizeof(q), "%s.shift.scales.%lld", p, (long long)t);
            const float *s = F1(b, q, "scale", C), *bb = F1(b, q, "bias", C);
            if (b->rc)
                return;
            memcpy(k->shift_s + t * C, s, (size_t)C * sizeof(float));
            memcpy(k->shift_b + t * C, bb, (size_t)C * sizeof(float));
        }
    }
}

static void build_plan(builder *b)
{
    bhvit_model *m = b->m;
    const int64_t k = m->stride, g = m->grid, C0 = m->dims[0];
    m->stem_wt = transposed(b, "stem.proj.weight", C0, k * k * m->chans);
    m->stem_b = F1(b, "stem.proj", "bias", C0);
    get_norm(b, "stem.norm", C0, &m->stem_norm);
    m->stem_pos = (const float *)tget(b, "stem.pos_embed", "", 0, 3, g, g, C0);
    char p[200], q[256];
    for (int i = 0; i < 4 && !b->rc; ++i) {
        const int64_t C = m->dims[i], s = g >> i;
        if (i > 0) {
            down_t *d = &m->down[i];
            const int64_t Cin = m->dims[i - 1];
            snprintf(p, sizeof(p), "stages.%d.downsample", i);
            snprintf(q, sizeof(q), "%s.norm0", p);
            get_norm(b, q, Cin, &d->norm0);
            snprintf(q, sizeof(q), "%s.reduce.op", p);
            const jval *rk = bhvi_json_get(&m->kinds, q);
            d->binary = rk != NULL;
            if (d->binary) {
                d->r.bn = op_kind(b, q);
                get_conv(b, q, C, 2, 2, Cin, 1, &d->reduce);
                d->ib = F1(b, q, "input_bias", Cin);
                if (!d->r.bn) {
                    snprintf(q, sizeof(q), "%s.reduce.norm", p);
                    get_norm(b, q, C, &d->r.norm);
                }
                snprintf(q, sizeof(q), "%s.reduce.act", p);
                get_act(b, q, C, &d->r.act);
            } else {
                snprintf(q, sizeof(q), "%s.conv.weight", p);
                d->fp_wt = transposed(b, q, C, 4 * Cin);
                snprintf(q, sizeof(q), "%s.norm", p);
                get_norm(b, q, C, &d->norm);
            }
            snprintf(q, sizeof(q), "%s.pos_embed", p);
            d->pos = (const float *)tget(b, q, "", 0, 3, s, s, C);
        }
        m->blocks[i] = (block_t *)calloc((size_t)m->depths[i], sizeof(block_t));
        if (!m->blocks[i]) {
            b->rc = seterr(BHVIT_E_NOMEM, "out of memory");
            return;
        }
        for (int j = 0; j < m->depths[i] && !b->rc; ++j)
            build_block(b, i, j, &m->blocks[i][j]);
    }
    get_norm(b, "norm", m->dims[3], &m->final_norm);
    m->head_wt = transposed(b, "head.weight", m->classes, m->dims[3]);
    m->head_b = F1(b, "head", "bias", m->classes);
    if (b->rc)
        return;
    for (int64_t i = 0; i < m->nt; ++i)
        if (!m->t[i].used) {
            b->rc = seterr(BHVIT_E_FORMAT, "%s: tensor %s is not used by the manifest's config; it was not written "
                           "by `bhvit export`", b->file, m->t[i].name);
            return;
        }
}

/* Pack every binary layer's weights for the active kernel variant (again after a switch). */
static int prepare_weights(bhvit_model *m)
{
#define PANELS(l)                                                                              \
    do {                                                                                       \
        if (!bhv_panels_current(&(l).pan)) {                                                   \
            bhv_panels_free(&(l).pan);                                                         \
            if (bhv_panels_pack(&(l).pan, (l).wbits, (l).N, ((l).K + 63) / 64))                \
                return -1;                                                                     \
        }                                                                                      \
    } while (0)
#define CONV(c)                                                                                \
    do {                                                                                       \
        if (!bhv_conv_current(&(c).conv)) {                                                    \
            bhv_conv_free(&(c).conv);                                                          \
            if (bhv_conv_prepare(&(c).conv, (c).wbits, (c).G, ((c).cpg + 63) / 64, (c).Cout,   \
                                 (c).KH, (c).KW, (c).cpg))                                     \
                return -1;                                                                     \
        }                                                                                      \
    } while (0)
    for (int i = 0; i < 4; ++i) {
        if (i > 0 && m->down[i].binary)
            CONV(m->down[i].reduce);
        for (int64_t j = 0; j < m->depths[i]; ++j) {
            block_t *k = &m->blocks[i][j];
            if (k->mixer == MX_MSGDC || k->mixer == MX_CONV) {
                for (int64_t t = 0; t < k->nbr; ++t)
                    CONV(k->convs[t]);
            } else {
                PANELS(k->q.op);
                PANELS(k->k.op);
                PANELS(k->v.op);
                PANELS(k->o.op);
            }
            PANELS(k->up.op);
            PANELS(k->down.op);
        }
    }
    return 0;
#undef PANELS
#undef CONV
}

/* ------------------------------------------------------------------ the forward pass */

typedef struct {
    bhvit_model *m;
    worker_t *w;
    int th;
    int rc; /* first failure: BHVIT_E_NOMEM or BHVIT_E_NONFINITE */
} run_t;

#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline double prof_t0(const bhvit_model *m) { return m->prof_on ? now_s() : 0.0; }
static inline void prof_add_w(const bhvit_model *m, worker_t *w, int kind, double t0)
{
    if (m->prof_on) {
        w->prof_s[kind] += now_s() - t0;
        w->prof_calls[kind]++;
    }
}
#define prof_add(r, kind, t0) prof_add_w((r)->m, (r)->w, (kind), (t0))
/* Time the statements (no return inside) as op kind KIND. */
#define PROF(r, kind, ...)                                \
    do {                                                  \
        const double pt0_ = prof_t0((r)->m);              \
        __VA_ARGS__;                                      \
        prof_add((r), (kind), pt0_);                      \
    } while (0)

/* The threads of this run's kernels (its own loops below use them too). */
static int run_threads(const run_t *r) { return r->th > 0 ? r->th : bhv_max_threads(); }

/* Buffer sizes are products of config sizes (bounded by read_config) and the batch (at most
 * 2^20), so they fit int64; a negative or oversized count is refused here all the same. */
static float *fbuf(run_t *r, int64_t n)
{
    float *p = n < 0 || (uint64_t)n > SIZE_MAX / sizeof(float) ? NULL
                                                              : (float *)arena_alloc(&r->w->ar, (size_t)n * sizeof(float));
    if (!p && !r->rc)
        r->rc = seterr(BHVIT_E_NOMEM, "out of memory in the forward pass");
    return p;
}

static void *wbuf(run_t *r, int64_t n, size_t esize)
{
    void *p = n < 0 || (uint64_t)n > SIZE_MAX / esize ? NULL : arena_alloc(&r->w->ar, (size_t)n * esize);
    if (!p && !r->rc)
        r->rc = seterr(BHVIT_E_NOMEM, "out of memory in the forward pass");
    return p;
}

static void check_kernel(run_t *r, int rc)
{
    if (rc == 0 || r->rc)
        return;
    if (rc == 1)
        r->rc = seterr(BHVIT_E_NONFINITE, "the network's values overflowed to inf/NaN on this input; normalise "
                       "the images like the training data");
    else if (rc == -1)
        r->rc = seterr(BHVIT_E_NOMEM, "out of memory in a kernel");
    else
        r->rc = seterr(BHVIT_E_FORMAT, "internal error: a kernel refused its arguments (%d)", rc);
}

static void norm_apply(run_t *r, const norm_t *n, const float *x, int64_t rows, int64_t C, float *out)
{
    PROF(r, P_NORM, {
        if (n->ln)
            bhv_layer_norm(x, rows, C, n->a, n->b, n->eps, out, r->th);
        else
            bhv_affine(x, rows, C, n->a, n->b, out, r->th);
    });
}

static inline float rprelu(float x, const act_t *a, int64_t c)
{
    const float y = x - a->m1[c], ys = y * a->slope[c];
    return (y < 0.0f ? ys : y) + a->m2[c]; /* as epi_loop */
}

/* engine.py's _channel_shortcut(sc, N)[c] for one row */
static inline float shortcut_at(const float *sc, int64_t sc_c, int64_t N, int64_t c)
{
    if (sc_c == N)
        return sc[c];
    if (sc_c < N)
        return sc[c % sc_c];
    const int64_t k = sc_c / N;
    float s = 0.0f;
    for (int64_t t = 0; t < k; ++t)
        s += sc[c * k + t];
    return s / (float)k;
}

/* The LayerNorm form of a layer-wise residual (kind "binary"): y = act(norm(dot * scale + shift) +
 * shortcut), then LayerScale and residual: engine.py's _residual after the op. */
static void resid_ln_tail(run_t *r, const resid_t *rs, const int32_t *dot, const float *scale, const float *shift,
                          int64_t rows, int64_t N, const float *sc, int64_t sc_c, const ls_t *ls, const float *res,
                          float *out)
{
    float *tmp = fbuf(r, rows * N);
    if (!tmp)
        return;
    PROF(r, P_EPI, check_kernel(r, bhv_epilogue(dot, rows, N, scale, shift, NULL, 0, NULL, NULL, NULL, NULL, NULL,
                                                NULL, tmp, r->th)));
    norm_apply(r, &rs->norm, tmp, rows, N, out);
    PROF(r, P_RESID, {
        for (int64_t i = 0; i < rows; ++i) {
            float *o = out + i * N;
            const float *s = sc + i * sc_c;
            for (int64_t c = 0; c < N; ++c) {
                float y = rprelu(o[c] + shortcut_at(s, sc_c, N, c), &rs->act, c);
                if (ls)
                    y = ls->bias[c] + y * ls->scale[c];
                o[c] = res ? res[i * N + c] + y : y;
            }
        }
    });
}

/* Packed sign(x + input bias) rows of a binary linear. */
static uint64_t *pack_input(run_t *r, const blin_t *l, const float *x, int64_t rows)
{
    const int64_t W = (l->K + 63) / 64;
    uint64_t *bits = (uint64_t *)wbuf(r, rows * W, 8);
    if (!bits)
        return NULL;
    PROF(r, P_PACK, {
        if (l->ib)
            check_kernel(r, bhv_pack_signs_bias_f32(x, rows, l->K, NULL, NULL, l->ib, 1, bits, r->th));
        else
            check_kernel(r, bhv_pack_signs_f32(x, rows, l->K, bits, r->th));
    });
    return bits;
}

/* out = [res +] LayerScale(RPReLU(norm(op(x)) + x)) for a binary linear with a residual around it
 * (engine.py's _residual with _bin_dot). */
static void resid_linear(run_t *r, const rlin_t *L, const float *x, int64_t rows, const ls_t *ls, const float *res,
                         float *out)
{
    uint64_t *bits = pack_input(r, &L->op, x, rows);
    if (!bits || r->rc)
        return;
    if (L->r.bn) {
        const bhv_transform t = {L->op.scale, L->op.shift, x, L->op.K, L->r.act.m1, L->r.act.slope, L->r.act.m2,
                                 ls ? ls->scale : NULL, ls ? ls->bias : NULL, res, out, NULL, NULL, 0, NULL};
        PROF(r, P_BLIN, check_kernel(r, bhv_binary_linear_pp(bits, rows, L->op.K, &L->op.pan, &t, r->th)));
        return;
    }
    int32_t *dot = (int32_t *)wbuf(r, rows * L->op.N, 4);
    if (!dot)
        return;
    PROF(r, P_XGEMM, check_kernel(r, bhv_xnor_gemm_pp(bits, &L->op.pan, rows, L->op.K, dot, r->th)));
    resid_ln_tail(r, &L->r, dot, L->op.scale, L->op.shift, rows, L->op.N, x, L->op.K, ls, res, out);
}

/* the stem: patches of the (zero-padded) image, dense, norm, GELU, + position embedding */
static void run_stem(run_t *r, const float *x, int64_t B, float *out)
{
    bhvit_model *m = r->m;
    const int64_t k = m->stride, pad = m->pad, C = m->chans, g = m->grid, img = m->img, D = m->dims[0];
    const int64_t kk = k * k * C, rows = B * g * g;
    float *patches = fbuf(r, rows * kk), *y = fbuf(r, rows * D);
    if (!patches || !y)
        return;
    const int nt = run_threads(r);
    (void)nt;
    const double pt = prof_t0(m);
#pragma omp parallel for collapse(2) schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < g; ++i)
            for (int64_t j = 0; j < g; ++j) {
                float *pr = patches + ((b * g + i) * g + j) * kk;
                for (int64_t kh = 0; kh < k; ++kh)
                    for (int64_t kw = 0; kw < k; ++kw)
                        for (int64_t c = 0; c < C; ++c) {
                            const int64_t h = i * k + kh - pad, w = j * k + kw - pad;
                            pr[(kh * k + kw) * C + c] = (h >= 0 && h < img && w >= 0 && w < img)
                                                            ? x[((b * C + c) * img + h) * img + w]
                                                            : 0.0f;
                        }
            }
    prof_add(r, P_STEM_PATCH, pt);
    PROF(r, P_DENSE, bhv_dense(patches, rows, kk, m->stem_wt, D, m->stem_b, y, r->th));
    norm_apply(r, &m->stem_norm, y, rows, D, out);
    PROF(r, P_GELU, bhv_gelu(out, rows * D, out, r->th));
    const int64_t per = g * g * D;
    PROF(r, P_POS, bhv_add(out, m->stem_pos, per, B, out));
}

static void downsample(run_t *r, const down_t *d, const float *x, int64_t B, int64_t H, int64_t Cin, int64_t C,
                       float *out)
{
    const int64_t Ho = H / 2, rows = B * Ho * Ho;
    float *x0 = fbuf(r, B * H * H * Cin);
    if (!x0)
        return;
    norm_apply(r, &d->norm0, x, B * H * H, Cin, x0);
    if (d->binary) {
        const int64_t Wc = (Cin + 63) / 64;
        uint64_t *xb = (uint64_t *)wbuf(r, B * H * H * Wc, 8);
        int32_t *dot = (int32_t *)wbuf(r, rows * C, 4);
        float *pooled = fbuf(r, rows * Cin);
        if (!xb || !dot || !pooled)
            return;
        PROF(r, P_PACK,
             check_kernel(r, bhv_pack_signs_bias_f32(x0, B * H * H, Cin, NULL, NULL, d->ib, 1, xb, r->th)));
        PROF(r, P_BCONV,
             check_kernel(r, bhv_xnor_conv2d_pp(xb, &d->reduce.conv, B, H, H, 2, 0, 1, Ho, Ho, dot, r->th)));
        if (r->rc)
            return;
        PROF(r, P_DOWN_POOL, {
            for (int64_t b = 0; b < B; ++b)
                for (int64_t i = 0; i < Ho; ++i)
                    for (int64_t j = 0; j < Ho; ++j) {
                        const float *a00 = x0 + ((b * H + 2 * i) * H + 2 * j) * Cin, *a01 = a00 + Cin;
                        const float *a10 = a00 + H * Cin, *a11 = a10 + Cin;
                        float *p = pooled + ((b * Ho + i) * Ho + j) * Cin;
                        for (int64_t c = 0; c < Cin; ++c)
                            p[c] = (((a00[c] + a01[c]) + a10[c]) + a11[c]) / 4.0f;
                    }
        });
        if (d->r.bn)
            PROF(r, P_EPI,
                 check_kernel(r, bhv_epilogue(dot, rows, C, d->reduce.scale, d->reduce.shift, pooled, Cin,
                                              d->r.act.m1, d->r.act.slope, d->r.act.m2, NULL, NULL, NULL, out,
                                              r->th)));
        else
            resid_ln_tail(r, &d->r, dot, d->reduce.scale, d->reduce.shift, rows, C, pooled, Cin, NULL, NULL, out);
    } else {
        float *patches = fbuf(r, rows * 4 * Cin), *y = fbuf(r, rows * C);
        if (!patches || !y)
            return;
        PROF(r, P_DOWN_POOL, {
            for (int64_t b = 0; b < B; ++b)
                for (int64_t i = 0; i < Ho; ++i)
                    for (int64_t j = 0; j < Ho; ++j)
                        for (int64_t kh = 0; kh < 2; ++kh)
                            memcpy(patches + ((b * Ho + i) * Ho + j) * 4 * Cin + kh * 2 * Cin,
                                   x0 + ((b * H + 2 * i + kh) * H + 2 * j) * Cin,
                                   (size_t)(2 * Cin) * sizeof(float));
        });
        PROF(r, P_DENSE, bhv_dense(patches, rows, 4 * Cin, d->fp_wt, C, NULL, y, r->th));
        norm_apply(r, &d->norm, y, rows, C, out);
    }
    const int64_t per = Ho * Ho * C;
    PROF(r, P_POS, bhv_add(out, d->pos, per, B, out));
}

/* out = x + MSGDC(norm1(x)) (engine.py's _msgdc) */
static void msgdc(run_t *r, const block_t *k, const float *x, int64_t B, int64_t H, int64_t C, float *out)
{
    const int64_t G = k->groups, cg = C / G, Wg = (cg + 63) / 64, rows = B * H * H;
    const float *n = x, *sc = NULL, *sh = NULL;
    if (k->norm1.ln) {
        float *t = fbuf(r, rows * C);
        if (!t)
            return;
        norm_apply(r, &k->norm1, x, rows, C, t);
        n = t;
    } else {
        sc = k->norm1.a;
        sh = k->norm1.b;
    }
    uint64_t *xb = (uint64_t *)wbuf(r, rows * G * Wg, 8);
    int32_t *dot = (int32_t *)wbuf(r, rows * C, 4);
    if (!xb || !dot)
        return;
    PROF(r, P_PACK, check_kernel(r, bhv_pack_signs_bias_f32(n, rows * G, cg, sc, sh, k->ib, G, xb, r->th)));
    const int folded = !k->mnorm.ln;
    float *acc = folded ? out : fbuf(r, rows * C);
    float *zeros = fbuf(r, C);
    if (!acc || !zeros)
        return;
    memset(zeros, 0, (size_t)C * sizeof(float));
    for (int64_t t = 0; t < k->nbr && !r->rc; ++t) {
        const bconv_t *cv = &k->convs[t];
        PROF(r, P_BCONV, check_kernel(r, bhv_xnor_conv2d_pp(xb, &cv->conv, B, H, H, 1, k->dil[t], k->dil[t], H, H,
                                                            dot, r->th)));
        if (r->rc)
            return;
        const act_t *a = &k->acts[t];
        if (folded) {
            const float *pb = t == k->nbr - 1 ? k->mnorm.b : zeros;
            PROF(r, P_EPI, check_kernel(r, bhv_epilogue(dot, rows, C, cv->scale, cv->shift, NULL, 0, a->m1, a->slope,
                                                        a->m2, k->mnorm.a, pb, t == 0 ? x : acc, acc, r->th)));
        } else {
            PROF(r, P_EPI, check_kernel(r, bhv_epilogue(dot, rows, C, cv->scale, cv->shift, NULL, 0, a->m1, a->slope,
                                                        a->m2, NULL, NULL, t == 0 ? NULL : acc, acc, r->th)));
        }
    }
    if (!folded && !r->rc) {
        norm_apply(r, &k->mnorm, acc, rows, C, out);
        PROF(r, P_RESID, {
            for (int64_t i = 0; i < rows * C; ++i)
                out[i] = x[i] + out[i];
        });
    }
}

/* Binary attention over Bw groups of L tokens: engine.py's _attention (ctx_norm, + q + k + v, ctx_act). */
static void attention(run_t *r, const block_t *k, const float *q, const float *kk, const float *v, int64_t Bw,
                      int64_t L, int64_t C, float *out)
{
    bhvit_model *m = r->m;
    const int64_t h = k->heads, d = C / h, Wd = (d + 63) / 64, Wm = (L + 63) / 64;
    uint64_t *qb = (uint64_t *)wbuf(r, Bw * h * L * Wd, 8), *kb = (uint64_t *)wbuf(r, Bw * h * L * Wd, 8);
    uint64_t *vb = (uint64_t *)wbuf(r, Bw * h * d * Wm, 8);
    if (!qb || !kb || !vb)
        return;
    PROF(r, P_PACK, {
        check_kernel(r, bhv_pack_heads_f32(q, Bw, L, h, d, k->qkv_bias, qb, r->th));
        check_kernel(r, bhv_pack_heads_f32(kk, Bw, L, h, d, k->qkv_bias + C, kb, r->th));
    });
    PROF(r, P_PACK, check_kernel(r, bhv_pack_keys_f32(v, Bw, L, h, d, k->qkv_bias + 2 * C, vb, r->th)));
    if (r->rc)
        return;
    const int64_t levels = m->qd ? m->qd_levels : 1;
    const float scale = (float)(1.0 / sqrt((double)d));
    if (!k->ctx_norm.ln) {
        PROF(r, P_ATT, check_kernel(r, bhv_attention(qb, kb, vb, Bw, h, L, L, d, k->qd_step, k->qd_zp, levels, scale,
                                                     k->ctx_norm.a, k->ctx_norm.b, q, kk, v, k->ctx_act.m1,
                                                     k->ctx_act.slope, k->ctx_act.m2, out, r->th)));
        return;
    }
    float *ctx = fbuf(r, Bw * L * C);
    if (!ctx)
        return;
    PROF(r, P_ATT, check_kernel(r, bhv_attention(qb, kb, vb, Bw, h, L, L, d, k->qd_step, k->qd_zp, levels, scale,
                                                 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, ctx, r->th)));
    norm_apply(r, &k->ctx_norm, ctx, Bw * L, C, out);
    PROF(r, P_ATT_GLUE, {
        for (int64_t i = 0; i < Bw * L; ++i)
            for (int64_t c = 0; c < C; ++c) {
                const int64_t o = i * C + c;
                out[o] = rprelu(((out[o] + q[o]) + kk[o]) + v[o], &k->ctx_act, c);
            }
    });
}

/* out = res + LayerScale(MSMHA(n)) (engine.py's _msmha) */
static void msmha(run_t *r, const block_t *k, const float *n, const float *res, int64_t B, int64_t H, int64_t C,
                  float *out)
{
    const int64_t w = k->window;
    const int64_t nwin = w ? (H / w) * (H / w) : 1, nloc = w ? w * w : H * H;
    const int64_t G = w ? nwin : 0, L = nloc + G, Bw = B * nwin, R = Bw * L;
    float *tok = fbuf(r, R * C);
    if (!tok)
        return;
    double pt = prof_t0(r->m); /* the window partition and pooled tokens (error returns drop the sample) */
    if (!w) {
        memcpy(tok, n, (size_t)(B * H * H * C) * sizeof(float));
    } else {
        const int64_t nb = H / w, pad = (w - 1) / 2;
        float *g = fbuf(r, B * G * C);
        if (!g)
            return;
        const int nt = run_threads(r);
        (void)nt;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nt) if (nt > 1)
        for (int64_t b = 0; b < B; ++b) /* window partition */
            for (int64_t wi = 0; wi < nb; ++wi)
                for (int64_t wj = 0; wj < nb; ++wj)
                    for (int64_t i = 0; i < w; ++i)
                        memcpy(tok + (((b * nwin + wi * nb + wj) * L) + i * w) * C,
                               n + ((b * H + wi * w + i) * H + wj * w) * C, (size_t)(w * C) * sizeof(float));
        const float inv = (float)(w * w);
        float *mxs = fbuf(r, nt * C); /* one row of maxima per thread */
        if (!mxs)
            return;
#pragma omp parallel for collapse(3) schedule(static) num_threads(nt) if (nt > 1)
        for (int64_t b = 0; b < B; ++b) /* pooled global tokens: max and mean over padded w x w blocks */
            for (int64_t bi = 0; bi < nb; ++bi)
                for (int64_t bj = 0; bj < nb; ++bj) {
#ifdef _OPENMP
                    float *mx = mxs + omp_get_thread_num() * C;
#else
                    float *mx = mxs;
#endif
                    float *gr = g + ((b * G) + bi * nb + bj) * C; /* the sums first, then the mix */
                    for (int64_t c = 0; c < C; ++c)
                        mx[c] = -INFINITY, gr[c] = 0.0f;
                    for (int64_t i = 0; i < w; ++i) {
                        const int64_t hh = bi * w + i - pad;
                        for (int64_t j = 0; j < w; ++j) {
                            const int64_t ww = bj * w + j - pad;
                            if (hh < 0 || hh >= H || ww < 0 || ww >= H)
                                continue; /* padding: 0 for the sum, -inf for the max */
                            const float *src = n + ((b * H + hh) * H + ww) * C;
                            for (int64_t c = 0; c < C; ++c) {
                                gr[c] += src[c];
                                mx[c] = src[c] > mx[c] ? src[c] : mx[c];
                            }
                        }
                    }
                    for (int64_t c = 0; c < C; ++c) {
                        const float av = gr[c] / inv;
                        gr[c] = av + k->pool_mix[c] * (mx[c] - av);
                    }
                }
        for (int64_t b = 0; b < B; ++b)
            for (int64_t t = 0; t < nwin; ++t)
                memcpy(tok + ((b * nwin + t) * L + nloc) * C, g + b * G * C, (size_t)(G * C) * sizeof(float));
    }
    prof_add(r, P_WINDOW, pt);
    float *t = fbuf(r, R * C), *q = fbuf(r, R * C), *kk = fbuf(r, R * C), *v = fbuf(r, R * C);
    float *ctx = fbuf(r, R * C);
    if (!t || !q || !kk || !v || !ctx)
        return;
    PROF(r, P_NORM, bhv_layer_norm(tok, R, C, k->tn_w, k->tn_b, 1e-5f, t, r->th));
    resid_linear(r, &k->q, t, R, NULL, NULL, q);
    resid_linear(r, &k->k, t, R, NULL, NULL, kk);
    resid_linear(r, &k->v, t, R, NULL, NULL, v);
    if (r->rc)
        return;
    attention(r, k, q, kk, v, Bw, L, C, ctx);
    if (r->rc)
        return;
    float *o = tok; /* the tokens are dead: reuse as the mixed local map (B, H, W, C) */
    pt = prof_t0(r->m);
    if (!w) {
        memcpy(o, ctx, (size_t)(B * H * H * C) * sizeof(float));
    } else {
        const int64_t nb = H / w;
        float *glob = fbuf(r, B * G * C);
        if (!glob)
            return;
        memset(glob, 0, (size_t)(B * G * C) * sizeof(float));
        for (int64_t b = 0; b < B; ++b) /* global tokens averaged over the windows */
            for (int64_t t2 = 0; t2 < nwin; ++t2)
                for (int64_t gi = 0; gi < G; ++gi) {
                    float *gl = glob + (b * G + gi) * C;
                    const float *src = ctx + ((b * nwin + t2) * L + nloc + gi) * C;
                    for (int64_t c = 0; c < C; ++c)
                        gl[c] += src[c];
                }
        for (int64_t i = 0; i < B * G * C; ++i)
            glob[i] /= (float)nwin;
        const int nt = run_threads(r);
        (void)nt;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nt) if (nt > 1)
        for (int64_t b = 0; b < B; ++b) /* mix and window reverse */
            for (int64_t wi = 0; wi < nb; ++wi)
                for (int64_t wj = 0; wj < nb; ++wj) {
                    const int64_t win = wi * nb + wj;
                    const float *gl = glob + (b * G + win) * C;
                    for (int64_t i = 0; i < w; ++i)
                        for (int64_t j = 0; j < w; ++j) {
                            const float *lc = ctx + ((b * nwin + win) * L + i * w + j) * C;
                            float *dst = o + ((b * H + wi * w + i) * H + wj * w + j) * C;
                            for (int64_t c = 0; c < C; ++c)
                                dst[c] = gl[c] + k->out_mix[c] * (lc[c] - gl[c]);
                        }
                }
    }
    prof_add(r, P_WINDOW, pt);
    resid_linear(r, &k->o, o, B * H * H, &k->ls, res, out);
}

/* out = x + LayerScale(down(up(n))) (engine.py's _mlp) */
static void mlp(run_t *r, const block_t *k, const float *n, const float *x, int64_t rows, int64_t C, float *out)
{
    const int64_t hidden = k->up.op.N;
    if (k->up.r.bn && k->down.r.bn && hidden > C && hidden % C == 0) {
        uint64_t *a = pack_input(r, &k->up.op, n, rows);
        uint64_t *bits = (uint64_t *)wbuf(r, rows * ((hidden + 63) / 64), 8);
        float *pooled = fbuf(r, rows * C);
        if (!a || !bits || !pooled || r->rc)
            return;
        const act_t *ua = &k->up.r.act, *da = &k->down.r.act;
        const bhv_transform up = {k->up.op.scale, k->up.op.shift, n, C, ua->m1, ua->slope, ua->m2, NULL, NULL, NULL,
                                  NULL, k->down.op.ib, bits, hidden / C, pooled};
        PROF(r, P_BLIN, check_kernel(r, bhv_binary_linear_pp(a, rows, C, &k->up.op.pan, &up, r->th)));
        if (r->rc)
            return;
        const bhv_transform dn = {k->down.op.scale, k->down.op.shift, pooled, C, da->m1, da->slope, da->m2,
                                  k->mls.scale, k->mls.bias, x, out, NULL, NULL, 0, NULL};
        PROF(r, P_BLIN, check_kernel(r, bhv_binary_linear_pp(bits, rows, hidden, &k->down.op.pan, &dn, r->th)));
        return;
    }
    float *h = fbuf(r, rows * hidden);
    if (!h)
        return;
    resid_linear(r, &k->up, n, rows, NULL, NULL, h);
    if (!r->rc)
        resid_linear(r, &k->down, h, rows, &k->mls, x, out);
}

/* One block: x (in a) -> mixer -> b -> mlp (+ shifts) -> a. */
static void block(run_t *r, const block_t *k, float *a, float *bbuf, int64_t B, int64_t H, int64_t C)
{
    bhvit_model *m = r->m;
    const int64_t rows = B * H * H;
    const size_t mark = r->w->ar.used;
    if (k->mixer == MX_MSGDC || k->mixer == MX_CONV) {
        msgdc(r, k, a, B, H, C, bbuf);
    } else {
        float *n = fbuf(r, rows * C);
        if (!n)
            return;
        norm_apply(r, &k->norm1, a, rows, C, n);
        msmha(r, k, n, a, B, H, C, bbuf);
    }
    r->w->ar.used = mark;
    if (r->rc)
        return;
    float *n = fbuf(r, rows * C);
    if (!n)
        return;
    norm_apply(r, &k->norm2, bbuf, rows, C, n);
    mlp(r, k, n, bbuf, rows, C, a);
    if (!r->rc && m->shift_on && m->nshift)
        PROF(r, P_SHIFT,
             check_kernel(r, bhv_shift_mix(n, B, H, H, C, m->shift, m->nshift, k->shift_s, k->shift_b, a, r->th)));
    r->w->ar.used = mark;
}

static void forward(run_t *r, const float *x, int64_t B, float *logits)
{
    bhvit_model *m = r->m;
    int64_t amax = 0;
    for (int i = 0; i < 4; ++i) {
        const int64_t s = m->grid >> i, n = s * s * m->dims[i];
        amax = n > amax ? n : amax;
    }
    float *a = fbuf(r, B * amax), *b = fbuf(r, B * amax);
    if (!a || !b)
        return;
    size_t mark = r->w->ar.used;
    run_stem(r, x, B, a);
    r->w->ar.used = mark;
    for (int i = 0; i < 4 && !r->rc; ++i) {
        const int64_t H = m->grid >> i, C = m->dims[i];
        if (i > 0) {
            downsample(r, &m->down[i], a, B, H * 2, m->dims[i - 1], C, b);
            r->w->ar.used = mark;
            float *t = a;
            a = b;
            b = t;
        }
        for (int64_t j = 0; j < m->depths[i] && !r->rc; ++j)
            block(r, &m->blocks[i][j], a, b, B, H, C);
    }
    if (r->rc)
        return;
    const int64_t H = m->grid >> 3, C = m->dims[3], rows = B * H * H;
    norm_apply(r, &m->final_norm, a, rows, C, b);
    float *pooled = fbuf(r, B * C);
    if (!pooled)
        return;
    PROF(r, P_POS, {
        for (int64_t bi = 0; bi < B; ++bi)
            for (int64_t c = 0; c < C; ++c) {
                float s = 0.0f;
                for (int64_t t = 0; t < H * H; ++t)
                    s += b[(bi * H * H + t) * C + c];
                pooled[bi * C + c] = s / (float)(H * H);
            }
    });
    PROF(r, P_DENSE, bhv_dense(pooled, B, C, m->head_wt, m->classes, m->head_b, logits, r->th));
}

/* ------------------------------------------------------------------ profile */

/* The table BHVIT_PROFILE=1 prints at bhvit_free: per op kind, ms per run, share, calls per run. */
static double prof_kind(const bhvit_model *m, int i, int64_t *calls)
{
    double s = 0.0;
    *calls = 0;
    for (int w = 0; w < m->nwk; ++w)
        s += m->wk[w].prof_s[i], *calls += m->wk[w].prof_calls[i];
    return s;
}

/* Seconds the workers ran (with tiles in parallel, up to threads x the runs' wall time). */
static double prof_busy(const bhvit_model *m)
{
    double s = 0.0;
    for (int w = 0; w < m->nwk; ++w)
        s += m->wk[w].busy;
    return s;
}

/* The table BHVIT_PROFILE=1 prints at bhvit_free: per op kind, ms per run (thread time: with
 * tiles in parallel the kinds add up to the workers' time), share, calls per run. */
static void prof_print(const bhvit_model *m, FILE *f)
{
    if (!m->prof_runs)
        return;
    const double runs = (double)m->prof_runs, tot = m->prof_total, busy = prof_busy(m) + 0.0;
    const double base = busy > tot ? busy : tot;
    double sum = 0.0;
    fprintf(f, "libbhvit profile: %lld runs, %lld images, %d threads, kernels %s, tiles of %lld images on %d "
            "worker(s); ms per run\n", (long long)m->prof_runs, (long long)m->prof_images, m->threads, bhv_backend(),
            (long long)m->last_tile, m->last_workers);
    for (int i = 0; i < P_N; ++i) {
        int64_t calls;
        const double s = prof_kind(m, i, &calls);
        sum += s;
        if (calls)
            fprintf(f, "  %-36s %10.3f ms %5.1f %% %8.1f calls\n", PROF_NAMES[i], 1e3 * s / runs,
                    base > 0 ? 100.0 * s / base : 0.0, (double)calls / runs);
    }
    fprintf(f, "  %-36s %10.3f ms %5.1f %%\n", "other (model.c, arena, copies)", 1e3 * (base - sum) / runs,
            base > 0 ? 100.0 * (base - sum) / base : 0.0);
    if (busy > tot)
        fprintf(f, "  %-36s %10.3f ms\n", "workers' time", 1e3 * busy / runs);
    fprintf(f, "  %-36s %10.3f ms (%.3f ms per image)\n", "total (wall)", 1e3 * tot / runs,
            1e3 * tot / (double)m->prof_images);
}

/* Profiling on (1) or off (0); either way the sums start again from zero. */
EXPORT int bhv_plan_profile_enable(bhvit_model *m, int on)
{
    if (!m)
        return -2;
    m->prof_on = on != 0;
    for (int w = 0; w < m->nwk; ++w) {
        memset(m->wk[w].prof_s, 0, sizeof(m->wk[w].prof_s));
        memset(m->wk[w].prof_calls, 0, sizeof(m->wk[w].prof_calls));
        m->wk[w].busy = 0.0;
    }
    m->prof_total = 0.0;
    m->prof_runs = m->prof_images = 0;
    return 0;
}

/* Op kind i (0 <= i < the return value): its name, seconds (thread time) and calls summed over
 * the runs since profiling was enabled; i = -1: "total", the runs' wall seconds and their number;
 * i = -2: "images", 0 and the images run; i = -3: "workers", the seconds the workers ran tiles
 * (with tiles in parallel up to threads x total) and the workers of the latest run; i = -4:
 * "tile", 0 and the images per tile of the latest run.  Returns the number of op kinds, or -2
 * for bad arguments. */
EXPORT int bhv_plan_profile_get(const bhvit_model *m, int i, const char **name, double *seconds, int64_t *calls)
{
    if (!m || !name || !seconds || !calls || i < -4 || i >= P_N)
        return -2;
    if (i == -1) {
        *name = "total", *seconds = m->prof_total, *calls = m->prof_runs;
    } else if (i == -2) {
        *name = "images", *seconds = 0.0, *calls = m->prof_images;
    } else if (i == -3) {
        *name = "workers", *seconds = prof_busy(m), *calls = m->last_workers;
    } else if (i == -4) {
        *name = "tile", *seconds = 0.0, *calls = m->last_tile;
    } else {
        *name = PROF_NAMES[i];
        *seconds = prof_kind(m, i, calls);
    }
    return P_N;
}

/* Images per batch tile: 0 (the default) sizes tiles from the L2 cache and the plan's memory per
 * image; the results do not depend on it.  -2 for bad arguments. */
EXPORT int bhv_plan_set_tile(bhvit_model *m, int64_t tile)
{
    if (!m || tile < 0)
        return -2;
    m->tile = tile;
    return 0;
}

/* ------------------------------------------------------------------ API */

void bhvit_free(bhvit_model *m)
{
    if (!m)
        return;
    if (m->prof_on)
        prof_print(m, stderr);
    for (int i = 0; i < 4; ++i) {
        if (m->blocks[i]) {
            for (int64_t j = 0; j < m->depths[i]; ++j) {
                block_t *k = &m->blocks[i][j];
                for (int t = 0; t < MAX_BRANCHES; ++t)
                    bhv_conv_free(&k->convs[t].conv);
                rlin_t *ls[6] = {&k->q, &k->k, &k->v, &k->o, &k->up, &k->down};
                for (int t = 0; t < 6; ++t)
                    bhv_panels_free(&ls[t]->op.pan);
                free(k->shift_s);
                free(k->shift_b);
            }
            free(m->blocks[i]);
        }
        bhv_conv_free(&m->down[i].reduce.conv);
        free(m->down[i].fp_wt);
    }
    for (int64_t i = 0; i < m->nt; ++i) {
        free(m->t[i].name);
        free(m->t[i].data);
    }
    free(m->t);
    if (m->class_names)
        for (int64_t i = 0; i < m->classes; ++i)
            free(m->class_names[i]);
    free(m->class_names);
    free(m->mean);
    free(m->std);
    free(m->stem_wt);
    free(m->head_wt);
    bhvi_json_free(&m->kinds);
    for (int w = 0; w < m->nwk; ++w)
        arena_free(&m->wk[w].ar);
    free(m->wk);
    free(m);
}

/* manifest_sha256: the SHA-256 of the manifest's canonical JSON without that field */
static int check_digest(const jval *man, const char *mpath)
{
    const jval *d = bhvi_json_get(man, "manifest_sha256");
    char *canon = bhvi_json_canonical(man, "manifest_sha256");
    char hex[65] = "";
    if (canon)
        bhv_sha256_hex((const uint8_t *)canon, strlen(canon), hex);
    free(canon);
    if (!d || d->type != J_STR || strcmp(d->str, hex) != 0)
        return seterr(BHVIT_E_FORMAT, "%s: SHA-256 of the manifest does not match; it was modified (export the "
                      "checkpoint again instead of editing it)", mpath);
    return 0;
}

/* The manifest's tensor list names exactly the weights file's tensors, with their dtypes and shapes. */
static int check_tensor_list(bhvit_model *m, const jval *list, const char *mpath)
{
    int64_t n = 0;
    if (!list || list->type != J_OBJ)
        return seterr(BHVIT_E_FORMAT, "%s: the manifest has no 'tensors' object", mpath);
    for (size_t i = 0; i < list->n; ++i) {
        const jval *e = &list->items[i], *dt = bhvi_json_get(e, "dtype"), *sh = bhvi_json_get(e, "shape");
        tensor_t *t = find(m, list->keys[i]);
        static const char *const file_dtypes[3] = {"float32", "float16", "int64"};
        int ok = t && dt && dt->type == J_STR && sh && sh->type == J_ARR && (int)sh->n == t->ndim &&
                 strcmp(dt->str, file_dtypes[t->file_dtype]) == 0;
        for (size_t d = 0; ok && d < sh->n; ++d)
            ok = sh->items[d].type == J_NUM && sh->items[d].is_int && sh->items[d].i == t->shape[d];
        if (!ok)
            return seterr(BHVIT_E_FORMAT, "%s: the manifest's entry for tensor %.80s does not match the weights file",
                          mpath, list->keys[i]);
        n++;
    }
    if (n != m->nt)
        return seterr(BHVIT_E_FORMAT, "%s: the manifest lists %lld tensors, the weights file holds %lld", mpath,
                      (long long)n, (long long)m->nt);
    return 0;
}

static int load_into(bhvit_model *m, const char *path)
{
    char mpath[4096], wpath[4096];
    struct stat st;
    const size_t pl = strlen(path);
    if (pl > 4000)
        return seterr(BHVIT_E_INPUT, "path too long");
    if (stat(path, &st) != 0)
        return seterr(BHVIT_E_IO, "%s: no such export (expected the directory written by `bhvit export`, or its "
                      "manifest.json)", path);
    if (S_ISDIR(st.st_mode))
        snprintf(mpath, sizeof(mpath), "%s/manifest.json", path);
    else
        snprintf(mpath, sizeof(mpath), "%s", path);
    char *mtext = NULL;
    int64_t mlen = 0;
    int rc = read_file(mpath, MAX_MANIFEST_BYTES, -1, &mtext, &mlen);
    if (rc)
        return rc;
    jval man;
    char jerr[160];
    if (bhvi_json_parse(mtext, (size_t)mlen, &man, jerr, sizeof(jerr))) {
        free(mtext);
        return seterr(BHVIT_E_FORMAT, "%s: not valid JSON (%s)", mpath, jerr);
    }
    free(mtext);
    char *blob = NULL;
    const jval *fmt = bhvi_json_get(&man, "format"), *ver = bhvi_json_get(&man, "version"), *file = bhvi_json_get(&man, "file");
    if (man.type != J_OBJ || !fmt || fmt->type != J_STR || strcmp(fmt->str, EXPORT_FORMAT) != 0) {
        rc = seterr(BHVIT_E_FORMAT, "%s: not a bhvit export", mpath);
        goto done;
    }
    if (!ver || ver->type != J_NUM || !ver->is_int || ver->i != EXPORT_VERSION) {
        rc = seterr(BHVIT_E_FORMAT, "%s: export version is not supported (this runtime reads version %d)", mpath,
                    EXPORT_VERSION);
        goto done;
    }
    if ((rc = check_digest(&man, mpath)))
        goto done;
    if ((rc = read_config(m, bhvi_json_get(&man, "config"))) || (rc = read_data(m, bhvi_json_get(&man, "data")))) {
        char msg[1024];
        snprintf(msg, sizeof(msg), "%s", g_err);
        rc = seterr(rc, "%s: %s", mpath, msg);
        goto done;
    }
    const jval *kinds = bhvi_json_get(&man, "kinds");
    const jval *fname = bhvi_json_get(file, "name"), *fbytes = bhvi_json_get(file, "bytes"), *fsha = bhvi_json_get(file, "sha256");
    if (!kinds || kinds->type != J_OBJ || !file || file->type != J_OBJ || !fbytes || fbytes->type != J_NUM ||
        !fbytes->is_int || !fsha || fsha->type != J_STR || strlen(fsha->str) != 64) {
        rc = seterr(BHVIT_E_FORMAT, "%s: the manifest needs 'kinds' and a 'file' with bytes and sha256", mpath);
        goto done;
    }
    const char *name = (fname && fname->type == J_STR) ? fname->str : "model.safetensors";
    if (!name[0] || strchr(name, '/') || strchr(name, '\\') || strcmp(name, ".") == 0 || strcmp(name, "..") == 0) {
        rc = seterr(BHVIT_E_FORMAT, "%s: file name is not a plain file name next to the manifest", mpath);
        goto done;
    }
    /* the weights file lies next to the manifest */
    const char *slash = strrchr(mpath, '/');
    if (slash)
        snprintf(wpath, sizeof(wpath), "%.*s/%s", (int)(slash - mpath), mpath, name);
    else
        snprintf(wpath, sizeof(wpath), "%s", name);
    int64_t wlen = 0;
    if (fbytes->i < 8 || fbytes->i > MAX_WEIGHTS_BYTES) {
        rc = seterr(BHVIT_E_FORMAT, "%s: 'file' bytes out of range", mpath);
        goto done;
    }
    /* the size the listed tensors imply, before the file is opened (a claim of gigabytes for a
     * few tensors is refused without reading them) */
    const jval *list = bhvi_json_get(&man, "tensors");
    int64_t data_bytes = 0;
    for (size_t i = 0; list && list->type == J_OBJ && i < list->n && data_bytes <= MAX_WEIGHTS_BYTES; ++i) {
        const jval *dt = bhvi_json_get(&list->items[i], "dtype"), *sh = bhvi_json_get(&list->items[i], "shape");
        int64_t n = dt && dt->type == J_STR ? (strcmp(dt->str, "int64") == 0 ? 8 : strcmp(dt->str, "float16") == 0 ? 2 : 4)
                                            : 4;
        for (size_t d = 0; sh && sh->type == J_ARR && d < sh->n && n <= MAX_WEIGHTS_BYTES; ++d) {
            const jval *x = &sh->items[d];
            const int64_t k = x->type == J_NUM && x->is_int && x->i >= 0 && x->i < ((int64_t)1 << 31) ? x->i : 0;
            if (__builtin_mul_overflow(n, k, &n))
                n = MAX_WEIGHTS_BYTES + 1; /* saturated: refused below */
        }
        data_bytes += n > MAX_WEIGHTS_BYTES ? MAX_WEIGHTS_BYTES + 1 : n; /* no signed overflow */
    }
    if (!(data_bytes + 8 <= fbytes->i && fbytes->i <= data_bytes + 8 + MAX_HEADER_BYTES)) {
        rc = seterr(BHVIT_E_FORMAT, "%s: 'file' says %lld bytes, the tensors it lists take %lld (plus a header)", mpath,
                    (long long)fbytes->i, (long long)data_bytes);
        goto done;
    }
    if ((rc = read_file(wpath, MAX_WEIGHTS_BYTES, fbytes->i, &blob, &wlen)))
        goto done;
    char hex[65];
    bhv_sha256_hex((const uint8_t *)blob, (size_t)wlen, hex);
    if (strcmp(hex, fsha->str) != 0) {
        rc = seterr(BHVIT_E_FORMAT, "%s: SHA-256 does not match the manifest; the file was modified", wpath);
        goto done;
    }
    if ((rc = read_tensors(m, wpath, blob, wlen)) || (rc = check_tensor_list(m, bhvi_json_get(&man, "tensors"), mpath)))
        goto done;
    free(blob);
    blob = NULL;
    /* keep the kinds object: move it out of the manifest */
    m->kinds = *kinds;
    memset((jval *)kinds, 0, sizeof(jval));
    ((jval *)kinds)->type = J_NULL;
    builder b = {m, mpath, 0};
    build_plan(&b);
    if ((rc = b.rc))
        goto done;
    if (prepare_weights(m))
        rc = seterr(BHVIT_E_NOMEM, "out of memory packing the weights");
done:
    free(blob);
    bhvi_json_free(&man);
    return rc;
}

int bhvit_load(const char *path, int threads, bhvit_model **out)
{
    if (!path || !out)
        return seterr(BHVIT_E_INPUT, "bhvit_load: path and model must not be NULL");
    *out = NULL;
    if (threads < 0 || threads > BHVIT_MAX_THREADS)
        return seterr(BHVIT_E_INPUT, "bhvit_load: threads must be 0 (all cores) to %d, got %d", BHVIT_MAX_THREADS,
                      threads);
    bhvit_model *m = (bhvit_model *)calloc(1, sizeof(bhvit_model));
    if (!m)
        return seterr(BHVIT_E_NOMEM, "out of memory");
    m->threads = threads;
    m->kinds.type = J_NULL;
    int rc = load_into(m, path);
    if (!rc) {
        /* one zero image through the network, as bhvit.runtime.load does: parameters that are finite
         * but overflow the network are refused here, and the arena is sized for batch 1 */
        const int64_t n = m->chans * m->img * m->img;
        float *x = (float *)calloc((size_t)n, sizeof(float)), *y = (float *)malloc((size_t)m->classes * sizeof(float));
        rc = (x && y) ? bhvit_run(m, x, 1, y) : seterr(BHVIT_E_NOMEM, "out of memory");
        if (!rc)
            m->img_bytes = m->wk[0].ar.peak;
        if (rc == BHVIT_E_NONFINITE)
            rc = seterr(BHVIT_E_FORMAT, "%s: the network's values overflow to inf/NaN on a zero image; its parameters "
                        "are corrupt or out of range (export a good checkpoint again)", path);
        free(x);
        free(y);
    }
    if (!rc) { /* after the load's own run: BHVIT_PROFILE=1 profiles the caller's runs */
        const char *p = getenv("BHVIT_PROFILE");
        bhv_plan_profile_enable(m, p && *p && strcmp(p, "0") != 0);
    }
    if (rc) {
        bhvit_free(m);
        return rc;
    }
    g_err[0] = 0;
    *out = m;
    return BHVIT_OK;
}

/* Tile t (images [t T, t T + T) of the batch) through the plan on worker w with th threads;
 * the worker keeps its first failure (the tile and message). */
static void run_tile(bhvit_model *m, worker_t *w, int th, int64_t t, int64_t T, int64_t batch, const float *x,
                     float *logits)
{
    if (w->rc)
        return;
    const double tw = prof_t0(m);
    run_t r = {m, w, th, 0};
    const int64_t b0 = t * T, nb = batch - b0 < T ? batch - b0 : T;
    forward(&r, x + b0 * m->chans * m->img * m->img, nb, logits + b0 * m->classes);
    const double ta = prof_t0(m);
    if (arena_settle(&w->ar) && !r.rc)
        r.rc = seterr(BHVIT_E_NOMEM, "out of memory");
    prof_add_w(m, w, P_ARENA, ta);
    if (m->prof_on)
        w->busy += now_s() - tw;
    if (r.rc && t < w->err_tile) {
        w->rc = r.rc;
        w->err_tile = t;
        snprintf(w->err, sizeof(w->err), "%s", g_err);
    }
}

/* The index of the first NaN or inf of x[0, n), or -1: blocks of exponent-bit tests the compiler
 * vectorises, the exact index looked up only in a block that has one. */
static int64_t first_nonfinite(const float *x, int64_t n)
{
    for (int64_t i0 = 0; i0 < n; i0 += 4096) {
        const int64_t i1 = n - i0 < 4096 ? n : i0 + 4096;
        uint32_t any = 0;
        for (int64_t i = i0; i < i1; ++i) {
            uint32_t u;
            memcpy(&u, x + i, sizeof(u));
            any |= (u & 0x7f800000u) == 0x7f800000u;
        }
        if (any)
            for (int64_t i = i0; i < i1; ++i)
                if (!isfinite(x[i]))
                    return i;
    }
    return -1;
}

int bhvit_run(bhvit_model *m, const float *x, int64_t batch, float *logits)
{
    if (!m || !x || !logits)
        return seterr(BHVIT_E_INPUT, "bhvit_run: model, input and logits must not be NULL");
    if (batch < 1 || batch > (1 << 20))
        return seterr(BHVIT_E_INPUT, "bhvit_run: batch must be in 1..%d, got %lld", 1 << 20, (long long)batch);
    const int64_t n = batch * m->chans * m->img * m->img;
    const double t0 = prof_t0(m);
    const int64_t bad_px = first_nonfinite(x, n);
    if (bad_px >= 0)
        return seterr(BHVIT_E_INPUT, "input contains NaN or infinite pixels (the first at flat index %lld)",
                      (long long)bad_px);
    if (prepare_weights(m))
        return seterr(BHVIT_E_NOMEM, "out of memory packing the weights");
    const int nt = m->threads > 0 ? m->threads : bhv_max_threads();
    const int64_t T = tile_of(m, batch, nt), ntile = cdiv64(batch, T);
    const int par = nt > 1 && ntile > 1;
    const int nw = par ? (int)(ntile < nt ? ntile : nt) : 1;
    if (ensure_workers(m, nw))
        return seterr(BHVIT_E_NOMEM, "out of memory");
    m->last_tile = T;
    m->last_workers = nw;
    prof_add_w(m, &m->wk[0], P_CHECK, t0);
    for (int w = 0; w < nw; ++w)
        m->wk[w].rc = 0, m->wk[w].err_tile = INT64_MAX;
    /* Each tile is a whole forward pass over its images: no op mixes images, so the values do not
     * depend on the tiles or on which worker runs them.  In parallel, each worker runs its tiles on
     * one thread: one parallel region per run instead of one per kernel.  Otherwise no enclosing
     * region at all: a kernel's parallel region nested in one (even of one thread) would start
     * new threads instead of reusing OpenMP's pool. */
    if (par) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nw)
        for (int64_t t = 0; t < ntile; ++t) {
#ifdef _OPENMP
            worker_t *w = &m->wk[omp_get_thread_num()];
#else
            worker_t *w = &m->wk[0];
#endif
            run_tile(m, w, 1, t, T, batch, x, logits);
        }
    } else {
        for (int64_t t = 0; t < ntile; ++t)
            run_tile(m, &m->wk[0], m->threads, t, T, batch, x, logits);
    }
    const worker_t *bad = NULL;
    for (int w = 0; w < nw; ++w)
        if (m->wk[w].rc && (!bad || m->wk[w].err_tile < bad->err_tile))
            bad = &m->wk[w];
    if (bad)
        return seterr(bad->rc, "%s", bad->err);
    const double tc = prof_t0(m);
    if (first_nonfinite(logits, batch * m->classes) >= 0)
        return seterr(BHVIT_E_NONFINITE, "the network's values overflowed to inf/NaN on this input; normalise "
                          "the images like the training data");
    prof_add_w(m, &m->wk[0], P_CHECK, tc);
    if (m->prof_on) {
        m->prof_total += now_s() - t0;
        m->prof_runs++;
        m->prof_images += batch;
    }
    return BHVIT_OK;
}

int bhvit_set_threads(bhvit_model *m, int threads)
{
    if (!m || threads < 0 || threads > BHVIT_MAX_THREADS)
        return seterr(BHVIT_E_INPUT, "bhvit_set_threads: threads must be 0 (all cores) to %d", BHVIT_MAX_THREADS);
    m->threads = threads;
    return BHVIT_OK;
}

int64_t bhvit_num_classes(const bhvit_model *m) { return m ? m->classes : 0; }
int64_t bhvit_in_chans(const bhvit_model *m) { return m ? m->chans : 0; }
int64_t bhvit_img_size(const bhvit_model *m) { return m ? m->img : 0; }

const char *bhvit_class_name(const bhvit_model *m, int64_t i)
{
    if (!m || !m->class_names || i < 0 || i >= m->classes)
        return NULL;
    return m->class_names[i];
}

int bhvit_normalize(const bhvit_model *m, float *x, int64_t n)
{
    if (!m || !x || n < 0)
        return seterr(BHVIT_E_INPUT, "bhvit_normalize: bad arguments");
    if (!m->has_norm)
        return seterr(BHVIT_E_INPUT, "the export has no data mean and std to normalise with");
    const int64_t hw = m->img * m->img;
    for (int64_t b = 0; b < n; ++b)
        for (int64_t c = 0; c < m->chans; ++c) {
            /* as bhvit.data.normalize: mean and std are of [0, 1] pixels, x holds 0..255 */
            const float mu = m->mean[c] * 255.0f, sd = m->std[c] * 255.0f;
            float *p = x + (b * m->chans + c) * hw;
            for (int64_t i = 0; i < hw; ++i)
                p[i] = (p[i] - mu) / sd;
        }
    return BHVIT_OK;
}

int bhvit_preprocess(const bhvit_model *m, const uint8_t *pixels, int64_t width, int64_t height, int64_t channels,
                     float *out)
{
    if (!m || !pixels || !out)
        return seterr(BHVIT_E_INPUT, "bhvit_preprocess: bad arguments (NULL)");
    if (channels != 1 && channels != 3)
        return seterr(BHVIT_E_INPUT, "bhvit_preprocess: channels must be 1 (grey) or 3 (RGB), got %lld",
                      (long long)channels);
    /* Pillow's limit on a side; the pixels' bytes must be addressable */
    if (width < 1 || height < 1 || width > INT32_MAX || height > INT32_MAX ||
        (uint64_t)width * (uint64_t)height > (uint64_t)(SIZE_MAX < INT64_MAX ? SIZE_MAX : INT64_MAX) / 3)
        return seterr(BHVIT_E_INPUT, "bhvit_preprocess: image size %lld x %lld is out of range (1 to %d per side)",
                      (long long)width, (long long)height, INT32_MAX);
    if (m->chans != 1 && m->chans != 3)
        return seterr(BHVIT_E_INPUT,
                      "bhvit_preprocess: the model takes %lld input channels; images are prepared for 1 (grey) "
                      "or 3 (RGB)", (long long)m->chans);
    if (!m->has_norm)
        return seterr(BHVIT_E_INPUT, "the export has no data mean and std to normalise with");
    if (bhvi_prepare_image(pixels, width, height, channels, m->chans, m->img, m->resize, m->bicubic, m->mean,
                           m->std, out))
        return seterr(BHVIT_E_NOMEM, "bhvit_preprocess: out of memory for a %lld x %lld image", (long long)width,
                      (long long)height);
    return BHVIT_OK;
}

const char *bhvit_kernel_variant(void) { return bhv_backend(); }

int bhvit_select_kernels(const char *name)
{
    const int rc = bhv_select(name);
    if (rc == -1)
        return seterr(BHVIT_E_INPUT, "unknown kernel variant %.60s", name ? name : "(null)");
    if (rc == -2)
        return seterr(BHVIT_E_INPUT, "kernel variant %.60s is not supported on this CPU", name);
    return BHVIT_OK;
}
