/* bf16 <-> float, shared by kernels.c and attention.c. A bf16 is handled as its 16 bits: the top
   half of a float's. */
#ifndef NNLAB_BF16_H
#define NNLAB_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The bf16 nearest to f, ties to even, as torch's float -> bfloat16 cast rounds (a NaN stays a NaN). */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u & 0x7fffffffu) > 0x7f800000u ? (u | 0x00400000u) : u + 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* f rounded to bf16, as a float. */
static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

#endif
