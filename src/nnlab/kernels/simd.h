/* bf16 conversions and the vector helpers every kernel shares. */
#ifndef NNLAB_SIMD_H
#define NNLAB_SIMD_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* ---- bf16 as its 16 bits: the top half of a float's ---- */

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

static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

/* ---- vectors as wide as the CPU's own: LANES floats ----

   GCC vector types of the CPU's width (16 floats with AVX-512, 8 with AVX or AVX2, 4 otherwise), so
   accumulators stay in registers: wider types get split and spilled, and plain loops over channels
   kept them in memory. Channel counts are whole multiples of LANES (the Python side checks). */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
typedef uint32_t vu __attribute__((vector_size(LANES * 4)));
typedef uint16_t vh __attribute__((vector_size(LANES * 2)));  /* LANES bf16 bit patterns */
typedef uint8_t vb __attribute__((vector_size(LANES)));       /* LANES winner codes */

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
static inline vi viselect(vi mask, vi a, vi b) { return (a & mask) | (b & ~mask); }

/* LANES winner codes, widened to 32 bits. gcc compiles __builtin_convertvector from bytes into
   scalar extracts and inserts, so x86 CPUs get the widening instruction itself. */
static inline vi load_codes(const uint8_t *p) {
#if defined(__AVX512F__)
    return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__)
    return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    vb b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vi);
#endif
}

static inline void store_codes(uint8_t *p, vi code) {
    vb codes = __builtin_convertvector(code, vb);
    memcpy(p, &codes, sizeof codes);
}

#if defined(__AVX512BF16__)
/* The CPU's own conversion (vcvtneps2bf16): nearest even, a NaN stays NaN, as below; unlike below,
   it flushes denormals to zero. */
static inline vf vround_bf16(vf f) {
    __m256bh h = _mm512_cvtneps_pbh((__m512)f);
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16);
}
#else
static inline vf vround_bf16(vf f) {  /* to the nearest bf16, ties to even; a NaN stays NaN */
    vu u = (vu)f;  /* unsigned: the carry into the exponent must wrap, not overflow */
    vu r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    vi nan = (vi)((u & 0x7fffffffu) > 0x7f800000u);
    return (vf)viselect(nan, (vi)((u | 0x00400000u) & 0xffff0000u), (vi)r);
}
#endif

/* The 2x2 window's maximum over its four values v (in the order (0,0), (0,1), (1,0), (1,1)), then
   ReLU if relu, with each lane's winner code in *code, as pool2x2 computes them: the first maximum
   wins ties, a NaN wins over any number (a later NaN over an earlier one), and with relu an output
   <= 0 becomes 0 with code 4 (no gradient). */
static inline vf window_max(const vf v[4], int relu, vi *code) {
    vf m = v[0];
    vi kk = (vi){0};
    for (int k = 1; k < 4; k++) {
        vi win = (v[k] > m) | (v[k] != v[k]);
        m = vselect(win, v[k], m);
        kk = viselect(win, (vi){0} + k, kk);
    }
    if (relu) {
        vi off = m <= 0.0f;
        m = vselect(off, (vf){0}, m);
        kk = viselect(off, (vi){0} + 4, kk);
    }
    *code = kk;
    return m;
}

#endif
