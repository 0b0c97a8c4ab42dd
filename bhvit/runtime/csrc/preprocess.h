/* preprocess.h -- an 8-bit image to the network's input (bhvit_preprocess in model.c). */
#ifndef BHV_PREPROCESS_H
#define BHV_PREPROCESS_H

#include <stdint.h>

/* pixels: height x width x ch bytes (ch 1: grey, 3: RGB), 1 <= width, height <= INT32_MAX.
 * Writes out_ch x size x size float32 (out_ch 1 or 3): the shorter side resized to resize
 * (>= size) with Pillow's bilinear or bicubic filter, the centre size x size crop, then
 * (v - 255 mean[c]) / (255 std[c]).  An RGB image for a one-channel model becomes grey
 * first (ITU-R 601-2 luma, as Pillow's convert("L")); a grey one for a three-channel
 * model is repeated in each channel.  Returns 0, or -1 when memory runs out (out is then
 * unspecified). */
int bhvi_prepare_image(const uint8_t *pixels, int64_t width, int64_t height, int64_t ch, int64_t out_ch,
                       int64_t size, int64_t resize, int bicubic, const float *mean, const float *std, float *out);

#endif
