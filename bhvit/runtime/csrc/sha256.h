/* sha256.h -- SHA-256 (FIPS 180-4), to check an export's weights file. */
#ifndef BHV_SHA256_H
#define BHV_SHA256_H

#include <stddef.h>
#include <stdint.h>

/* hex: 65 bytes, the lower-case hex digest and a NUL. */
void bhv_sha256_hex(const uint8_t *data, size_t n, char hex[65]);

#endif
