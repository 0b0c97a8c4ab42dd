/*
 * bhvit_run -- run a bhvit export on images with libbhvit.
 *
 *   bhvit_run EXPORT_DIR [IMAGES|-] [--threads N] [--batch N] [--normalize] [--classes]
 *             [--repeat N] [--kernels NAME]
 *   bhvit_run EXPORT_DIR IMAGE.ppm|IMAGE.pgm ... [--threads N] [--batch N] [--classes]
 *             [--repeat N] [--kernels NAME]
 *
 * IMAGES (default: standard input) holds raw little-endian float32 images, each
 * in_chans x img_size x img_size, back to back.  The images must be normalised like the
 * training data, or hold pixel values 0..255 and --normalize applies the export's mean
 * and std.  Files named *.ppm, *.pgm or *.pnm are binary Netpbm images instead (P6 RGB,
 * P5 grey; maxval 1..65535), one image each, prepared with bhvit_preprocess as the
 * export's data entry records (resize, centre crop, mean and std), like bhvit.runtime's
 * preprocess.  Prints one line of logits per image (or, with --classes, the index and
 * name of the top class).  --repeat N runs every batch N times and prints the median
 * time per batch to standard error (a benchmark, not part of the output).
 */
#include "bhvit.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* Images with more pixels are refused before their pixels are read, as bhvit.runtime.image
 * does (BHVIT_MAX_IMAGE_PIXELS sets another limit). */
#define MAX_IMAGE_PIXELS 50000000LL
#define MAX_HEADER_BYTES 65536 /* a Netpbm header, comments included */

static int usage(void)
{
    fprintf(stderr, "usage: bhvit_run EXPORT_DIR [IMAGES|-] [--threads N] [--batch N] [--normalize] "
                    "[--classes] [--repeat N] [--kernels NAME]\n"
                    "       bhvit_run EXPORT_DIR IMAGE.ppm|IMAGE.pgm ... [--threads N] [--batch N] [--classes] "
                    "[--repeat N] [--kernels NAME]\n"
                    "IMAGES: raw float32 NCHW images (standard input: -); *.ppm, *.pgm, *.pnm: binary Netpbm "
                    "images (P6, P5), prepared as the export's data entry says\n");
    return 2;
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int parse_int(const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    const long v = strtol(s, &end, 10);
    if (!*s || *end || errno || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

static int is_netpbm_name(const char *path)
{
    const char *dot = strrchr(path, '.');
    return dot && (strcasecmp(dot, ".ppm") == 0 || strcasecmp(dot, ".pgm") == 0 || strcasecmp(dot, ".pnm") == 0);
}

/* ------------------------------------------------------------------ Netpbm (P5, P6) */

typedef struct {
    FILE *f;
    const char *path;
    long read; /* header bytes read */
    char *err;
    size_t errlen;
} pnm_reader;

static int pnm_fail(pnm_reader *r, const char *msg)
{
    snprintf(r->err, r->errlen, "%s: %s", r->path, msg);
    return -1;
}

static int pnm_getc(pnm_reader *r)
{
    if (++r->read > MAX_HEADER_BYTES)
        return -2;
    return getc(r->f);
}

/* The next header number: whitespace and comments (# to the end of the line) before it,
 * 1 to 10 decimal digits, then one whitespace byte, which is consumed. */
static int pnm_number(pnm_reader *r, const char *what, long long lo, long long hi, long long *out)
{
    char msg[160];
    int c = pnm_getc(r);
    for (;;) {
        if (c == '#') {
            while (c != '\n' && c != '\r' && c >= 0)
                c = pnm_getc(r);
        } else if (c >= 0 && isspace(c)) {
            c = pnm_getc(r);
        } else {
            break;
        }
    }
    if (c == -2)
        return pnm_fail(r, "Netpbm header longer than 65536 bytes");
    if (c == EOF) {
        snprintf(msg, sizeof msg, "truncated Netpbm header (no %s)", what);
        return pnm_fail(r, msg);
    }
    long long v = 0;
    int digits = 0;
    while (c >= '0' && c <= '9') {
        if (++digits > 10) {
            snprintf(msg, sizeof msg, "Netpbm %s has more than 10 digits", what);
            return pnm_fail(r, msg);
        }
        v = v * 10 + (c - '0');
        c = pnm_getc(r);
    }
    if (digits == 0 || (c >= 0 && !isspace(c))) {
        snprintf(msg, sizeof msg, "bad Netpbm header: the %s is not a decimal number followed by whitespace", what);
        return pnm_fail(r, msg);
    }
    if (c < 0) {
        snprintf(msg, sizeof msg, "truncated Netpbm header (it ends after the %s)", what);
        return pnm_fail(r, msg);
    }
    if (v < lo || v > hi) {
        snprintf(msg, sizeof msg, "Netpbm %s %lld is out of range (%lld to %lld)", what, v, lo, hi);
        return pnm_fail(r, msg);
    }
    *out = v;
    return 0;
}

/* Python's round(x) for x >= 0: halves to even (the default rounding mode). */
static long round_even(double x) { return lrint(x); }

/* Read a binary PGM (P5) or PPM (P6) file as 8-bit pixels (height x width x channels),
 * converted to 8 bits as Pillow and bhvit.runtime.image read them: maxval 255 as is;
 * otherwise round(v / maxval * 255), and for a 16-bit grey image (P5, maxval > 255) the
 * 16-bit values (round(v / maxval * 65535), or v for maxval 65535) as 8 bits by
 * (v + 128) / 257, unless none exceeds 255 (then they are the 8-bit values). */
static int read_netpbm(const char *path, long long max_pixels, uint8_t **pixels, int64_t *width, int64_t *height,
                       int64_t *channels, char *err, size_t errlen)
{
    pnm_reader r = {NULL, path, 0, err, errlen};
    uint8_t *px = NULL;
    uint16_t *wide = NULL;
    unsigned char *raw = NULL;
    char msg[256];
    int rc = -1;
    /* non-blocking open, then the type check: a FIFO would otherwise wait for a writer */
    const int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) {
        snprintf(err, errlen, "%s: cannot open (%s)", path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        snprintf(err, errlen, "%s: not a regular file", path);
        return -1;
    }
    r.f = fdopen(fd, "rb");
    if (!r.f) {
        close(fd);
        snprintf(err, errlen, "%s: cannot open (%s)", path, strerror(errno));
        return -1;
    }
    const int m0 = pnm_getc(&r), m1 = pnm_getc(&r), m2 = pnm_getc(&r);
    if (m0 != 'P' || (m1 != '5' && m1 != '6') || m2 < 0 || !isspace(m2)) {
        pnm_fail(&r, m0 == 'P' && m1 >= '1' && m1 <= '7'
                         ? "not a binary PGM (P5) or PPM (P6) file (plain, bitmap and PAM Netpbm are not read)"
                         : "not a binary PGM (P5) or PPM (P6) file");
        goto out;
    }
    const int64_t ch = m1 == '6' ? 3 : 1;
    long long w, h, maxval;
    if (pnm_number(&r, "width", 1, 2147483647LL, &w) || pnm_number(&r, "height", 1, 2147483647LL, &h) ||
        pnm_number(&r, "maxval", 1, 65535, &maxval))
        goto out;
    if (w > max_pixels / h) {
        snprintf(msg, sizeof msg,
                 "%lld x %lld = %lld pixels, more than the limit of %lld (set BHVIT_MAX_IMAGE_PIXELS to allow "
                 "larger images)", w, h, w * h, max_pixels);
        pnm_fail(&r, msg);
        goto out;
    }
    if (w > (INT64_MAX / 6) / h) { /* only with a limit raised that far */
        pnm_fail(&r, "image too large");
        goto out;
    }
    const int64_t samples = w * h * ch, bps = maxval > 255 ? 2 : 1;
    const int64_t need = samples * bps, have = (int64_t)st.st_size - r.read;
    if (have < need) {
        snprintf(msg, sizeof msg, "truncated: %lld bytes of pixels, the header (%lld x %lld, maxval %lld) needs %lld",
                 (long long)(have < 0 ? 0 : have), w, h, maxval, (long long)need);
        pnm_fail(&r, msg);
        goto out;
    }
    px = (uint8_t *)malloc((size_t)samples);
    raw = bps == 2 ? (unsigned char *)malloc((size_t)need) : NULL;
    wide = bps == 2 && ch == 1 ? (uint16_t *)malloc((size_t)samples * sizeof(uint16_t)) : NULL;
    if (!px || (bps == 2 && !raw) || (bps == 2 && ch == 1 && !wide)) {
        pnm_fail(&r, "out of memory");
        goto out;
    }
    if (fread(bps == 2 ? raw : px, 1, (size_t)need, r.f) != (size_t)need) {
        pnm_fail(&r, ferror(r.f) ? "read error" : "truncated pixel data");
        goto out;
    }
    if (bps == 1 && maxval != 255) {
        uint8_t lut[256];
        for (int v = 0; v < 256; ++v) {
            const long s = round_even((double)v / (double)maxval * 255.0);
            lut[v] = (uint8_t)(s > 255 ? 255 : s);
        }
        for (int64_t i = 0; i < samples; ++i)
            px[i] = lut[px[i]];
    } else if (bps == 2 && ch == 3) { /* Pillow reads 16-bit RGB straight to 8 bits */
        for (int64_t i = 0; i < samples; ++i) {
            const unsigned v = (unsigned)raw[2 * i] << 8 | raw[2 * i + 1];
            const long s = round_even((double)v / (double)maxval * 255.0);
            px[i] = (uint8_t)(s > 255 ? 255 : s);
        }
    } else if (bps == 2) { /* 16-bit grey: Pillow's mode I, then bhvit's _to_8bit */
        unsigned top = 0;
        for (int64_t i = 0; i < samples; ++i) {
            unsigned v = (unsigned)raw[2 * i] << 8 | raw[2 * i + 1];
            if (maxval != 65535) {
                const long s = round_even((double)v / (double)maxval * 65535.0);
                v = (unsigned)(s > 65535 ? 65535 : s);
            }
            wide[i] = (uint16_t)v;
            top = v > top ? v : top;
        }
        for (int64_t i = 0; i < samples; ++i)
            px[i] = (uint8_t)(top <= 255 ? wide[i] : (wide[i] + 128u) / 257u);
    }
    *pixels = px, px = NULL;
    *width = w, *height = h, *channels = ch;
    rc = 0;
out:
    free(px);
    free(raw);
    free(wide);
    fclose(r.f);
    return rc;
}

static int max_image_pixels(long long *out)
{
    const char *env = getenv("BHVIT_MAX_IMAGE_PIXELS");
    *out = MAX_IMAGE_PIXELS;
    if (!env)
        return 0;
    char *end;
    errno = 0;
    const long long v = strtoll(env, &end, 10);
    while (*end && isspace((unsigned char)*end))
        ++end;
    if (!*env || *end || errno || v < 1) {
        fprintf(stderr, "bhvit_run: BHVIT_MAX_IMAGE_PIXELS must be a positive integer, got '%.40s'\n", env);
        return -1;
    }
    *out = v;
    return 0;
}

/* ------------------------------------------------------------------ running */

typedef struct {
    bhvit_model *m;
    float *logits;
    double *times;
    long repeat, threads;
    int classes;
    int64_t done; /* images printed so far */
} runner;

/* Run got images of x and print their lines; 0, or the exit status of a failure. */
static int run_and_print(runner *R, const float *x, int64_t got)
{
    const int64_t nc = bhvit_num_classes(R->m);
    const long runs = R->repeat ? R->repeat : 1;
    for (long t = 0; t < runs; ++t) {
        const double t0 = now();
        const int rc = bhvit_run(R->m, x, got, R->logits);
        if (R->repeat)
            R->times[t] = now() - t0;
        if (rc != BHVIT_OK) {
            fprintf(stderr, "bhvit_run: image %lld: %s\n", (long long)R->done, bhvit_last_error());
            return rc == BHVIT_E_INPUT || rc == BHVIT_E_NONFINITE ? 1 : 2;
        }
    }
    if (R->repeat) {
        qsort(R->times, (size_t)R->repeat, sizeof(double), cmp_double);
        fprintf(stderr, "batch of %lld: median %.3f ms over %ld runs (%s, %ld threads)\n", (long long)got,
                R->times[R->repeat / 2] * 1e3, R->repeat, bhvit_kernel_variant(), R->threads);
    }
    for (int64_t i = 0; i < got; ++i) {
        const float *l = R->logits + i * nc;
        if (R->classes) {
            int64_t best = 0;
            for (int64_t c = 1; c < nc; ++c)
                if (l[c] > l[best])
                    best = c;
            const char *name = bhvit_class_name(R->m, best);
            printf("%lld %s\n", (long long)best, name ? name : "");
        } else {
            for (int64_t c = 0; c < nc; ++c)
                printf(c ? " %.9g" : "%.9g", l[c]);
            printf("\n");
        }
    }
    R->done += got;
    return 0;
}

/* Raw float32 images from a file or standard input. */
static int run_raw(runner *R, const char *images, int normalize, float *x, long batch)
{
    bhvit_model *m = R->m;
    const int64_t per = bhvit_in_chans(m) * bhvit_img_size(m) * bhvit_img_size(m);
    FILE *f = strcmp(images, "-") == 0 ? stdin : fopen(images, "rb");
    if (!f) {
        perror(images);
        return 2;
    }
    int status = 0;
    const size_t image_bytes = sizeof(float) * (size_t)per;
    for (;;) {
        const size_t nbytes = fread(x, 1, image_bytes * (size_t)batch, f), got = nbytes / image_bytes;
        const size_t partial = nbytes % image_bytes; /* after the whole images: reported below */
        if (ferror(f)) {
            perror(images);
            status = 2;
            break;
        }
        if (got == 0 && !partial) {
            if (R->done == 0 || fgetc(f) != EOF) {
                fprintf(stderr, "bhvit_run: %s: expected whole float32 images of %lld x %lld x %lld\n", images,
                        (long long)bhvit_in_chans(m), (long long)bhvit_img_size(m), (long long)bhvit_img_size(m));
                status = 2;
            }
            break;
        }
        if (got > 0) {
            if (normalize && bhvit_normalize(m, x, (int64_t)got) != BHVIT_OK) {
                fprintf(stderr, "bhvit_run: %s\n", bhvit_last_error());
                status = 2;
                break;
            }
            if ((status = run_and_print(R, x, (int64_t)got)))
                break;
        }
        if (partial) { /* a partial image at the end: an error, not dropped */
            fprintf(stderr,
                    "bhvit_run: %s: %zu bytes after image %lld are not a whole float32 image of %lld x %lld x %lld\n",
                    images, partial, (long long)R->done, (long long)bhvit_in_chans(m), (long long)bhvit_img_size(m),
                    (long long)bhvit_img_size(m));
            status = 2;
            break;
        }
        if ((long)got < batch)
            break;
    }
    if (f != stdin)
        fclose(f);
    return status;
}

/* Netpbm files, one image each, in batches; the images before a bad file are printed. */
static int run_netpbm(runner *R, char **files, int nfiles, float *x, long batch)
{
    const int64_t per = bhvit_in_chans(R->m) * bhvit_img_size(R->m) * bhvit_img_size(R->m);
    long long limit;
    if (max_image_pixels(&limit))
        return 2;
    char err[1024];
    for (int i = 0; i < nfiles;) {
        int64_t got = 0;
        int status = 0;
        for (; got < batch && i < nfiles; ++got, ++i) {
            uint8_t *px;
            int64_t w, h, ch;
            if (read_netpbm(files[i], limit, &px, &w, &h, &ch, err, sizeof err)) {
                fprintf(stderr, "bhvit_run: %s\n", err);
                status = 2;
                break;
            }
            const int rc = bhvit_preprocess(R->m, px, w, h, ch, x + got * per);
            free(px);
            if (rc != BHVIT_OK) {
                fprintf(stderr, "bhvit_run: %s: %s\n", files[i], bhvit_last_error());
                status = 2;
                break;
            }
        }
        if (got > 0) {
            const int rc = run_and_print(R, x, got);
            if (rc)
                return rc;
        }
        if (status)
            return status;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *export_dir = NULL, *kernels = NULL;
    char **inputs = (char **)calloc((size_t)argc, sizeof(char *));
    long threads = 0, batch = 1, repeat = 0;
    int normalize = 0, classes = 0, ninputs = 0;
    if (!inputs) {
        fprintf(stderr, "bhvit_run: out of memory\n");
        return 2;
    }
    for (int i = 1; i < argc; ++i) {
        const char *a = argv[i];
        if (strcmp(a, "--threads") == 0 && i + 1 < argc) {
            if (parse_int(argv[++i], 0, 4096, &threads))
                return usage();
        } else if (strcmp(a, "--batch") == 0 && i + 1 < argc) {
            if (parse_int(argv[++i], 1, 1 << 20, &batch))
                return usage();
        } else if (strcmp(a, "--repeat") == 0 && i + 1 < argc) {
            if (parse_int(argv[++i], 1, 1000000, &repeat))
                return usage();
        } else if (strcmp(a, "--kernels") == 0 && i + 1 < argc) {
            kernels = argv[++i];
        } else if (strcmp(a, "--normalize") == 0) {
            normalize = 1;
        } else if (strcmp(a, "--classes") == 0) {
            classes = 1;
        } else if (a[0] == '-' && a[1] == '-') {
            return usage();
        } else if (!export_dir) {
            export_dir = a;
        } else {
            inputs[ninputs++] = argv[i];
        }
    }
    if (!export_dir)
        return usage();
    const int netpbm = ninputs > 0 && is_netpbm_name(inputs[0]);
    for (int i = 0; i < ninputs; ++i)
        if (is_netpbm_name(inputs[i]) != netpbm || (!netpbm && i > 0)) {
            fprintf(stderr, "bhvit_run: give one raw float32 file (or -), or PPM/PGM files (*.ppm, *.pgm, *.pnm)\n");
            return usage();
        }
    if (netpbm && normalize) {
        fprintf(stderr, "bhvit_run: --normalize is for raw float32 input; PPM/PGM images are prepared with the "
                        "export's mean and std already\n");
        return 2;
    }
    if (kernels && bhvit_select_kernels(kernels) != BHVIT_OK) {
        fprintf(stderr, "bhvit_run: %s\n", bhvit_last_error());
        return 2;
    }
    bhvit_model *m;
    if (bhvit_load(export_dir, (int)threads, &m) != BHVIT_OK) {
        fprintf(stderr, "bhvit_run: %s\n", bhvit_last_error());
        return 2;
    }
    const int64_t per = bhvit_in_chans(m) * bhvit_img_size(m) * bhvit_img_size(m), nc = bhvit_num_classes(m);
    float *x = (float *)malloc((size_t)(batch * per) * sizeof(float));
    runner R = {m, (float *)malloc((size_t)(batch * nc) * sizeof(float)), NULL, repeat, threads, classes, 0};
    R.times = repeat ? (double *)malloc((size_t)repeat * sizeof(double)) : NULL;
    int status;
    if (!x || !R.logits || (repeat && !R.times)) {
        fprintf(stderr, "bhvit_run: out of memory\n");
        status = 2;
    } else if (netpbm) {
        status = run_netpbm(&R, inputs, ninputs, x, batch);
    } else {
        status = run_raw(&R, ninputs ? inputs[0] : "-", normalize, x, batch);
    }
    free(x);
    free(R.logits);
    free(R.times);
    free(inputs);
    bhvit_free(m);
    return status;
}
