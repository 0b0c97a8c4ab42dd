/*
 * bhvit.h -- the C API of libbhvit, the bit-packed BHViT inference runtime.
 *
 * Load an export directory written by `bhvit export` (manifest.json + model.safetensors,
 * see docs/EXPORT_FORMAT.md), run float32 NCHW batches through it, read the logits:
 *
 *     bhvit_model *m;
 *     if (bhvit_load("export/", 0, &m) != BHVIT_OK) { puts(bhvit_last_error()); return 1; }
 *     float *logits = malloc(batch * bhvit_num_classes(m) * sizeof(float));
 *     if (bhvit_run(m, images, batch, logits) != BHVIT_OK) puts(bhvit_last_error());
 *     bhvit_free(m);
 *
 * Loading validates the export (sizes and offsets before reading, the weights file's
 * SHA-256, every tensor's shape against the model config, finite parameters) and
 * prepares an execution plan: packed weight panels for the active kernel variant and the
 * model's tensors resolved once.  bhvit_run then does no allocation once a batch of that
 * size has run.  Images must be normalised like the training data (bhvit_normalize does
 * it for 0..255 pixel values with the export's mean and std).
 *
 * Thread safety: one bhvit_run at a time per model (each model has its own buffers);
 * different models may run concurrently.  Errors: every function returns a BHVIT_*
 * code; bhvit_last_error() gives the message of the calling thread's last failure.
 */
#ifndef BHVIT_H
#define BHVIT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BHVIT_API_VERSION 1
#define BHVIT_MAX_THREADS 4096 /* threads a model may use (bhvit_load, bhvit_set_threads) */

#if defined(__GNUC__)
#define BHVIT_API __attribute__((visibility("default")))
#else
#define BHVIT_API
#endif

enum {
    BHVIT_OK = 0,
    BHVIT_E_IO = 1,        /* a file is missing or cannot be read */
    BHVIT_E_FORMAT = 2,    /* not a valid bhvit export, or a modified / corrupt one */
    BHVIT_E_INPUT = 3,     /* bad arguments or input (shape, NaN / infinite pixels) */
    BHVIT_E_NOMEM = 4,     /* out of memory */
    BHVIT_E_NONFINITE = 5  /* the network's values overflowed to inf/NaN on this input */
};

typedef struct bhvit_model bhvit_model;

/* Load and prepare the export at path (its directory or its manifest.json).  threads: the
 * number of CPU threads bhvit_run uses (0: all cores, or OMP_NUM_THREADS; at most
 * BHVIT_MAX_THREADS). */
BHVIT_API int bhvit_load(const char *path, int threads, bhvit_model **model);

/* logits[batch * num_classes] from x[batch * in_chans * img_size * img_size] (NCHW, float32). */
BHVIT_API int bhvit_run(bhvit_model *model, const float *x, int64_t batch, float *logits);

BHVIT_API void bhvit_free(bhvit_model *model);

/* The message of this thread's last failed call ("" if none). */
BHVIT_API const char *bhvit_last_error(void);

BHVIT_API int bhvit_set_threads(bhvit_model *model, int threads);
BHVIT_API int64_t bhvit_num_classes(const bhvit_model *model);
/* The input image's channels and side (images are square). */
BHVIT_API int64_t bhvit_in_chans(const bhvit_model *model);
BHVIT_API int64_t bhvit_img_size(const bhvit_model *model);
/* The class name of logit i, or NULL when the export has no class names. */
BHVIT_API const char *bhvit_class_name(const bhvit_model *model, int64_t i);
/* Normalise n images of pixel values 0..255 in place like training: x = (x - 255 mean[c]) / (255 std[c]),
 * with the export's mean and std of [0, 1] pixels.  BHVIT_E_INPUT if the export has none. */
BHVIT_API int bhvit_normalize(const bhvit_model *model, float *x, int64_t n);
/* The kernel variant in use: "c-avx512-vpopcntdq", "c-avx2", "c-popcnt", "c-neon" or "c-portable". */
BHVIT_API const char *bhvit_kernel_variant(void);
/* Choose a kernel variant by name ("auto": the best this CPU supports).  Models re-prepare their
 * weights for it on their next run.  BHVIT_E_INPUT for an unknown or unsupported name. */
BHVIT_API int bhvit_select_kernels(const char *name);

#ifdef __cplusplus
}
#endif

#endif
