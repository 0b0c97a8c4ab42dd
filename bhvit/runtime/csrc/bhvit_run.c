/*
 * bhvit_run -- run a bhvit export on float32 NCHW images with libbhvit.
 *
 *   bhvit_run EXPORT_DIR [IMAGES|-] [--threads N] [--batch N] [--normalize] [--classes]
 *             [--repeat N] [--kernels NAME]
 *
 * IMAGES (default: standard input) holds raw little-endian float32 images, each
 * in_chans x img_size x img_size, back to back.  Prints one line of logits per image
 * (or, with --classes, the index and name of the top class).  The images must be normalised
 * like the training data, or hold pixel values 0..255 and --normalize applies the export's
 * mean and std.  --repeat N runs every batch N times and prints the median
 * time per batch to standard error (a benchmark, not part of the output).
 */
#include "bhvit.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int usage(void)
{
    fprintf(stderr, "usage: bhvit_run EXPORT_DIR [IMAGES|-] [--threads N] [--batch N] [--normalize] "
                    "[--classes] [--repeat N] [--kernels NAME]\n");
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
    const long v = strtol(s, &end, 10);
    if (!*s || *end || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    const char *export_dir = NULL, *images = "-", *kernels = NULL;
    long threads = 0, batch = 1, repeat = 0;
    int normalize = 0, classes = 0, npos = 0;
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
        } else if (npos == 0) {
            export_dir = a, npos++;
        } else if (npos == 1) {
            images = a, npos++;
        } else {
            return usage();
        }
    }
    if (!export_dir)
        return usage();
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
    FILE *f = strcmp(images, "-") == 0 ? stdin : fopen(images, "rb");
    if (!f) {
        perror(images);
        bhvit_free(m);
        return 2;
    }
    float *x = (float *)malloc((size_t)(batch * per) * sizeof(float));
    float *logits = (float *)malloc((size_t)(batch * nc) * sizeof(float));
    double *times = repeat ? (double *)malloc((size_t)repeat * sizeof(double)) : NULL;
    int status = 0;
    if (!x || !logits || (repeat && !times)) {
        fprintf(stderr, "bhvit_run: out of memory\n");
        status = 2;
        goto out;
    }
    const size_t image_bytes = sizeof(float) * (size_t)per;
    for (int64_t done = 0;;) {
        const size_t nbytes = fread(x, 1, image_bytes * (size_t)batch, f), got = nbytes / image_bytes;
        const size_t partial = nbytes % image_bytes; /* after the whole images: reported below */
        if (ferror(f)) {
            perror(images);
            status = 2;
            break;
        }
        if (got == 0 && !partial) {
            if (done == 0 || fgetc(f) != EOF) {
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
            const long runs = repeat ? repeat : 1;
            for (long t = 0; t < runs; ++t) {
                const double t0 = now();
                const int rc = bhvit_run(m, x, (int64_t)got, logits);
                if (repeat)
                    times[t] = now() - t0;
                if (rc != BHVIT_OK) {
                    fprintf(stderr, "bhvit_run: image %lld: %s\n", (long long)done, bhvit_last_error());
                    status = rc == BHVIT_E_INPUT || rc == BHVIT_E_NONFINITE ? 1 : 2;
                    goto out;
                }
            }
            if (repeat) {
                qsort(times, (size_t)repeat, sizeof(double), cmp_double);
                fprintf(stderr, "batch of %zu: median %.3f ms over %ld runs (%s, %ld threads)\n", got,
                        times[repeat / 2] * 1e3, repeat, bhvit_kernel_variant(), threads);
            }
            for (size_t i = 0; i < got; ++i) {
                const float *l = logits + i * nc;
                if (classes) {
                    int64_t best = 0;
                    for (int64_t c = 1; c < nc; ++c)
                        if (l[c] > l[best])
                            best = c;
                    const char *name = bhvit_class_name(m, best);
                    printf("%lld %s\n", (long long)best, name ? name : "");
                } else {
                    for (int64_t c = 0; c < nc; ++c)
                        printf(c ? " %.9g" : "%.9g", l[c]);
                    printf("\n");
                }
            }
        }
        done += (int64_t)got;
        if (partial) { /* a partial image at the end: an error, not dropped */
            fprintf(stderr,
                    "bhvit_run: %s: %zu bytes after image %lld are not a whole float32 image of %lld x %lld x %lld\n",
                    images, partial, (long long)done, (long long)bhvit_in_chans(m), (long long)bhvit_img_size(m),
                    (long long)bhvit_img_size(m));
            status = 2;
            break;
        }
        if ((long)got < batch)
            break;
    }
out:
    if (f != stdin)
        fclose(f);
    free(x);
    free(logits);
    free(times);
    bhvit_free(m);
    return status;
}
