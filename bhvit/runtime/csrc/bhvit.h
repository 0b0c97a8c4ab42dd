/*
 * bhvit.h -- the C API of libbhvit, the bit-packed BHViT inference runtime.
 *
 * Load an export directory written by `bhvit export` (manifest.json + model.safetensors,
 * see docs/EXPORT_FORMAT.md), run float32 NCHW batches through it, read the logits:
 *
 *     bhvit_model *m;
 *     if (bhvit_load("export/", 0, &m) != BHVIT_OK) { puts(bhvit_last_error()); return 1; }
 *     float *x = malloc(bhvit_in_chans(m) * bhvit_img_size(m) * bhvit_img_size(m) * sizeof(float));
 *     float *logits = malloc(bhvit_num_classes(m) * sizeof(float));
 *     // rgb: height x width x 3 bytes
 *     if (bhvit_preprocess(m, rgb, width, height, 3, x) != BHVIT_OK || bhvit_run(m, x, 1, logits) != BHVIT_OK)
 *         puts(bhvit_last_error());
 *     bhvit_free(m);
 *
 * Loading validates the export (sizes and offsets before reading, the weights file's
 * SHA-256, every tensor's shape against the model config, finite parameters) and
 * prepares an execution plan: packed weight panels for the active kernel variant and the
 * model's tensors resolved once.  bhvit_run then does no allocation once a batch of that
 * size has run.  Images must be normalised like the training data: bhvit_preprocess
 * prepares an 8-bit image as the export's data entry records (resize, centre crop, mean
 * and std), bhvit_normalize applies mean and std to pixel values 0..255 already cropped.
 *
 * Thread safety: one bhvit_run at a time per model (each model has its own buffers);
 * different models may run concurrently; bhvit_preprocess, the getters and
 * bhvit_normalize only read the model.
 *
 * Errors: the functions declared `int` return BHVIT_OK or one of the BHVIT_E_* codes
 * below, and on failure bhvit_last_error() gives the calling thread's message.  The
 * getters (bhvit_num_classes, bhvit_in_chans, bhvit_img_size, bhvit_class_name,
 * bhvit_kernel_variant, bhvit_last_error) return their value and set no error;
 * bhvit_free returns nothing.
 */
#ifndef BHVIT_H
#define BHVIT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The version of this interface.  BHVIT_API_VERSION is the ABI's major version and the
 * shared library's SONAME (libbhvit.so.1): it changes when a program built with an older
 * bhvit.h may not work with the library any more (a function removed, a signature, an
 * error code or a documented behaviour changed).  BHVIT_VERSION_MINOR counts compatible
 * additions since then (1: bhvit_preprocess), BHVIT_VERSION_PATCH fixes that change no
 * interface; the library file is libbhvit.so.MAJOR.MINOR.PATCH.  A program can refuse a
 * header older than it needs with #if BHVIT_API_VERSION != 1 || BHVIT_VERSION_MINOR < 1. */
#define BHVIT_API_VERSION 1
#define BHVIT_VERSION_MINOR 1
#define BHVIT_VERSION_PATCH 1
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
/* One 8-bit image as the network's input, prepared as bhvit.runtime's prepare_image does
 * with the export's data entry: pixels holds height rows of width pixels of `channels`
 * bytes (1: grey, 3: RGB; rows contiguous, no padding).  The shorter side is resized to
 * data.resize (absent: img_size) with data.interpolation (bilinear or bicubic; absent:
 * bilinear), the longer to int(resize * long / short), bit for bit as Pillow resamples
 * 8-bit images; then the centre img_size x img_size crop (offsets rounded half to even),
 * then (v - 255 mean[c]) / (255 std[c]).  A model of one input channel gets an RGB image
 * as grey (Pillow's convert("L") luma: (19595 R + 38470 G + 7471 B + 32768) >> 16); a
 * model of three gets a grey image in each channel.  Writes in_chans x img_size x img_size
 * float32 to out (CHW, one image of a bhvit_run batch).  BHVIT_E_INPUT for a NULL
 * argument, channels other than 1 or 3, a side below 1 or above INT32_MAX, a model of
 * other than 1 or 3 input channels, or an export without mean and std; BHVIT_E_NOMEM if
 * its temporaries (about img_size x the rows the crop reads x channels bytes, and the
 * filter weights) cannot be allocated. */
BHVIT_API int bhvit_preprocess(const bhvit_model *model, const uint8_t *pixels, int64_t width, int64_t height,
                               int64_t channels, float *out);
/* The kernel variant in use: "c-avx512-vpopcntdq", "c-avx2", "c-popcnt", "c-neon" or "c-portable". */
BHVIT_API const char *bhvit_kernel_variant(void);
/* Choose a kernel variant by name ("auto": the best this CPU supports).  Models re-prepare their
 * weights for it on their next run.  BHVIT_E_INPUT for an unknown or unsupported name. */
BHVIT_API int bhvit_select_kernels(const char *name);

#ifdef __cplusplus
}
#endif

#endif
