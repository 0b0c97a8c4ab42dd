/*
 * preprocess_check -- a program built against an installed libbhvit (or the build tree's):
 *
 *   preprocess_check EXPORT_DIR WIDTH HEIGHT CHANNELS < pixels > out
 *
 * reads one 8-bit HWC image from standard input, prepares it with bhvit_preprocess and
 * writes the float32 CHW input (raw, little-endian) and then the float32 logits of
 * bhvit_run to standard output.  Errors: the library's message on standard error, exit 2.
 */
#include <bhvit.h>

#include <stdio.h>
#include <stdlib.h>

#if BHVIT_API_VERSION != 1 || BHVIT_VERSION_MINOR < 1
#error "needs libbhvit 1.1 (bhvit_preprocess)"
#endif

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: preprocess_check EXPORT_DIR WIDTH HEIGHT CHANNELS < pixels\n");
        return 2;
    }
    const long long w = atoll(argv[2]), h = atoll(argv[3]), ch = atoll(argv[4]);
    if (w < 1 || h < 1 || ch < 1 || w > 100000 || h > 100000 || ch > 4) {
        fprintf(stderr, "preprocess_check: bad image size\n");
        return 2;
    }
    bhvit_model *m;
    if (bhvit_load(argv[1], 1, &m) != BHVIT_OK) {
        fprintf(stderr, "preprocess_check: %s\n", bhvit_last_error());
        return 2;
    }
    const size_t n = (size_t)(w * h * ch), per = (size_t)(bhvit_in_chans(m) * bhvit_img_size(m) * bhvit_img_size(m));
    unsigned char *px = malloc(n);
    float *x = malloc(per * sizeof(float)), *logits = malloc((size_t)bhvit_num_classes(m) * sizeof(float));
    int status = 2;
    if (!px || !x || !logits || fread(px, 1, n, stdin) != n)
        fprintf(stderr, "preprocess_check: cannot read %zu bytes of pixels\n", n);
    else if (bhvit_preprocess(m, px, w, h, ch, x) != BHVIT_OK || bhvit_run(m, x, 1, logits) != BHVIT_OK)
        fprintf(stderr, "preprocess_check: %s\n", bhvit_last_error());
    else if (fwrite(x, sizeof(float), per, stdout) == per &&
             fwrite(logits, sizeof(float), (size_t)bhvit_num_classes(m), stdout) == (size_t)bhvit_num_classes(m))
        status = 0;
    free(px);
    free(x);
    free(logits);
    bhvit_free(m);
    return status;
}
