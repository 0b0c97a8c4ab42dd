/*
 * preprocess.c -- an 8-bit image to the network's normalised float32 input, as
 * bhvit/runtime/image.py prepare_image does it with Pillow: the shorter side resized to
 * `resize` (the longer one to int(resize * long / short)), the centre crop, mean and std.
 *
 * The resize reproduces Pillow's resampling of 8-bit images (ImagingResample, Pillow 13):
 * a horizontal and a vertical pass (in the order below), each output sample a weighted sum of the input
 * samples within the filter's support around its centre, the support widened by the
 * downscale factor; the weights (bilinear, or bicubic with a = -0.5) normalised to sum 1
 * in double precision, then rounded to signed fixed point with 22 fractional bits; each
 * pass rounds and clips its result to 0..255.  Only the crop's rows and columns are
 * computed: every output sample depends on its own weights alone, so the crop of the
 * whole resized image and these samples are the same bytes, without the whole resized
 * image in memory.
 */
#include "preprocess.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PREC 22 /* fractional bits of a weight: 32 bits less 8 of pixel and 2 of headroom */

static double bilinear(double x)
{
    if (x < 0.0)
        x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

static double bicubic(double x) /* Keys' cubic convolution, a = -0.5 */
{
    const double a = -0.5;
    if (x < 0.0)
        x = -x;
    if (x < 1.0)
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0)
        return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

/* The weights of n consecutive outputs o0 .. o0 + n - 1 of a 1-D resample of in_size
 * samples to out_size: output i reads inputs first[i] .. first[i] + count[i] - 1 with the
 * fixed-point weights k[i * stride ...]. */
typedef struct {
    int64_t stride;
    int64_t *first, *count;
    int32_t *k;
} taps_t;

static void taps_free(taps_t *t)
{
    free(t->first);
    free(t->count);
    free(t->k);
}

static int taps_make(taps_t *t, int64_t in_size, int64_t out_size, int64_t o0, int64_t n, int cubic)
{
    double (*filter)(double) = cubic ? bicubic : bilinear;
    /* Pillow's source box is (0, in_size) in float: its width as a float, then a double */
    const double scale = (double)(float)in_size / (double)out_size;
    const double fscale = scale < 1.0 ? 1.0 : scale; /* downscaling widens the filter */
    const double support = (cubic ? 2.0 : 1.0) * fscale, inv = 1.0 / fscale;
    const double stride = ceil(support) * 2 + 1;
    memset(t, 0, sizeof *t);
    if (!(stride < (double)(SIZE_MAX / 8 / (size_t)n)))
        return -1;
    t->stride = (int64_t)stride;
    t->first = (int64_t *)malloc((size_t)n * sizeof(int64_t));
    t->count = (int64_t *)malloc((size_t)n * sizeof(int64_t));
    t->k = (int32_t *)calloc((size_t)(n * t->stride), sizeof(int32_t));
    double *w = (double *)malloc((size_t)t->stride * sizeof(double));
    if (!t->first || !t->count || !t->k || !w) {
        free(w);
        taps_free(t);
        return -1;
    }
    for (int64_t i = 0; i < n; ++i) {
        const double center = ((double)(o0 + i) + 0.5) * scale;
        int64_t lo = (int64_t)(center - support + 0.5), hi = (int64_t)(center + support + 0.5);
        if (lo < 0)
            lo = 0;
        if (hi > in_size)
            hi = in_size;
        int64_t cnt = hi - lo;
        if (cnt > t->stride) /* not reached: hi - lo <= 2 support + 1 */
            cnt = t->stride;
        double sum = 0.0;
        for (int64_t x = 0; x < cnt; ++x) {
            w[x] = filter(((double)(x + lo) - center + 0.5) * inv);
            sum += w[x];
        }
        int32_t *k = t->k + i * t->stride;
        for (int64_t x = 0; x < cnt; ++x) {
            const double v = sum != 0.0 ? w[x] / sum : w[x];
            k[x] = v < 0 ? (int32_t)(-0.5 + v * (1 << PREC)) : (int32_t)(0.5 + v * (1 << PREC));
        }
        t->first[i] = lo;
        t->count[i] = cnt;
    }
    free(w);
    return 0;
}

/* A fixed-point sum (with its rounding half already added) as a pixel value 0..255. */
static inline uint8_t clip8(int64_t acc)
{
    if (acc < 0)
        return 0;
    acc >>= PREC;
    return acc > 255 ? 255 : (uint8_t)acc;
}

/* Rounding half to even of d / 2 (Python's round), d >= 0. */
static int64_t half_even(int64_t d)
{
    const int64_t q = d / 2;
    return (d % 2) && (q % 2) ? q + 1 : q;
}

/* Source row y in the resampled channels, indexed by column: the image's own bytes, or
 * (grey) the luma of its columns x0 .. x1 - 1 written to buf, as Pillow's convert("L"). */
static const uint8_t *source_row(const uint8_t *pixels, int64_t width, int64_t ch, int grey, int64_t y, int64_t x0,
                                 int64_t x1, uint8_t *buf)
{
    const uint8_t *row = pixels + (size_t)y * (size_t)width * (size_t)ch;
    if (!grey)
        return row;
    for (int64_t x = x0; x < x1; ++x) {
        const uint8_t *p = row + 3 * x;
        buf[x] = (uint8_t)((p[0] * 19595u + p[1] * 38470u + p[2] * 7471u + 0x8000u) >> 16);
    }
    return buf;
}

/* The horizontal pass on one row: dst[j * nc + c] for the taps' n outputs; row[0] is column base. */
static void hsample(const uint8_t *row, int64_t base, int64_t nc, const taps_t *t, int64_t n, uint8_t *dst)
{
    for (int64_t j = 0; j < n; ++j) {
        const int32_t *k = t->k + j * t->stride;
        const uint8_t *src = row + (t->first[j] - base) * nc;
        for (int64_t c = 0; c < nc; ++c) {
            int64_t s = 1 << (PREC - 1);
            for (int64_t x = 0; x < t->count[j]; ++x)
                s += (int64_t)src[x * nc + c] * k[x];
            dst[j * nc + c] = clip8(s);
        }
    }
}

static void vsample_add(int64_t *acc, const uint8_t *r, size_t len, int32_t k)
{
    for (size_t j = 0; j < len; ++j)
        acc[j] += (int64_t)r[j] * k;
}

static void vsample_end(int64_t *acc, uint8_t *dst, size_t len)
{
    for (size_t j = 0; j < len; ++j) {
        dst[j] = clip8(acc[j]);
        acc[j] = 1 << (PREC - 1);
    }
}

int bhvi_prepare_image(const uint8_t *pixels, int64_t width, int64_t height, int64_t ch, int64_t out_ch,
                       int64_t size, int64_t resize, int cubic, const float *mean, const float *std, float *out)
{
    const int grey = ch == 3 && out_ch == 1; /* RGB to luma first, as Pillow's convert("L") */
    const int64_t nc = grey ? 1 : ch;          /* channels resampled */
    const int64_t shorter = width <= height ? width : height, longer = width <= height ? height : width;
    /* Python's int(resize * long / short): an exact product, one correctly rounded division */
    const int64_t nlong = (int64_t)((double)(resize * longer) / (double)shorter);
    const int64_t nw = width <= height ? resize : nlong, nh = width <= height ? nlong : resize;
    const int64_t left = half_even(nw - size), top = half_even(nh - size);
    const int need_h = nw != width, need_v = nh != height; /* Pillow skips a pass of the same size */
    /* Pillow 13 resamples vertically first when the height loses more than twice as many
     * pixels as the width (horizontally first before it, and otherwise) */
    const int v_first = need_h && need_v && nh < height && height - nh > 2 * (width - nw);
    const size_t line = (size_t)(size * nc);
    taps_t th = {0}, tv = {0};
    uint8_t *tmp = NULL, *rowbuf = NULL, *outline = NULL;
    int64_t *acc = NULL;
    int rc = -1;

    if ((need_h && taps_make(&th, width, nw, left, size, cubic)) ||
        (need_v && taps_make(&tv, height, nh, top, size, cubic)))
        goto done;
    /* the source rows the vertical pass reads, and the source columns the horizontal one reads */
    int64_t y0 = top, y1 = top + size, x0 = left, x1 = left + size;
    if (need_v) {
        y0 = height, y1 = 0;
        for (int64_t i = 0; i < size; ++i) {
            y0 = tv.first[i] < y0 ? tv.first[i] : y0;
            y1 = tv.first[i] + tv.count[i] > y1 ? tv.first[i] + tv.count[i] : y1;
        }
        y1 = y1 < y0 ? y0 : y1;
    }
    if (need_h) {
        x0 = width, x1 = 0;
        for (int64_t j = 0; j < size; ++j) {
            x0 = th.first[j] < x0 ? th.first[j] : x0;
            x1 = th.first[j] + th.count[j] > x1 ? th.first[j] + th.count[j] : x1;
        }
        x1 = x1 < x0 ? x0 : x1;
    }
    /* the first pass's output: rows y0 .. y1 - 1 of the crop's columns, or (v_first) the crop's
     * rows of columns x0 .. x1 - 1 */
    const int64_t tmp_rows = v_first ? size : y1 - y0;
    const size_t tmp_line = v_first ? (size_t)((x1 - x0) * nc) : line;
    if ((uint64_t)tmp_rows > SIZE_MAX / (tmp_line + 1) - 1)
        goto done;
    tmp = (uint8_t *)malloc((size_t)tmp_rows * tmp_line + 1);
    rowbuf = grey ? (uint8_t *)malloc((size_t)width) : NULL;
    outline = (uint8_t *)malloc(line);
    acc = (int64_t *)malloc((tmp_line > line ? tmp_line : line) * sizeof(int64_t));
    if (!tmp || (grey && !rowbuf) || !outline || !acc)
        goto done;
    for (size_t j = 0; j < (tmp_line > line ? tmp_line : line); ++j)
        acc[j] = 1 << (PREC - 1);

    if (v_first) { /* vertical pass: the crop's rows, columns x0 .. x1 - 1 */
        for (int64_t i = 0; i < size; ++i) {
            const int32_t *k = tv.k + i * tv.stride;
            for (int64_t y = 0; y < tv.count[i]; ++y) {
                const uint8_t *r = source_row(pixels, width, ch, grey, tv.first[i] + y, x0, x1, rowbuf);
                vsample_add(acc, r + x0 * nc, tmp_line, k[y]);
            }
            vsample_end(acc, tmp + (size_t)i * tmp_line, tmp_line);
        }
    } else { /* horizontal pass: source rows y0 .. y1 - 1, the crop's columns */
        for (int64_t y = y0; y < y1; ++y) {
            const uint8_t *r = source_row(pixels, width, ch, grey, y, x0, x1, rowbuf);
            uint8_t *dst = tmp + (size_t)(y - y0) * line;
            if (need_h)
                hsample(r, 0, nc, &th, size, dst);
            else
                memcpy(dst, r + left * nc, line);
        }
    }

    /* the second pass, then mean and std into the CHW output */
    float mu[3], sd[3];
    for (int64_t c = 0; c < out_ch; ++c) {
        mu[c] = mean[c] * 255.0f; /* as bhvit.runtime.image.normalize_images, in float32 */
        sd[c] = std[c] * 255.0f;
    }
    for (int64_t i = 0; i < size; ++i) {
        const uint8_t *src = outline;
        if (v_first) {
            hsample(tmp + (size_t)i * tmp_line, x0, nc, &th, size, outline);
        } else if (need_v) {
            const int32_t *k = tv.k + i * tv.stride;
            for (int64_t y = 0; y < tv.count[i]; ++y)
                vsample_add(acc, tmp + (size_t)(tv.first[i] + y - y0) * line, line, k[y]);
            vsample_end(acc, outline, line);
        } else {
            src = tmp + (size_t)(top + i - y0) * line;
        }
        for (int64_t c = 0; c < out_ch; ++c) {
            const uint8_t *p = src + (nc == 1 ? 0 : c);
            float *o = out + (c * size + i) * size;
            for (int64_t j = 0; j < size; ++j)
                o[j] = ((float)p[j * nc] - mu[c]) / sd[c];
        }
    }
    rc = 0;
done:
    taps_free(&th);
    taps_free(&tv);
    free(tmp);
    free(rowbuf);
    free(outline);
    free(acc);
    return rc;
}
