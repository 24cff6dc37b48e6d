/* 2x2, stride-2 max pooling fused with an optional ReLU, over channels-last (N, H, W, C) memory.

   Why by hand: ATen's CPU max-pool writes int64 indices in forward, and its backward zero-fills the
   whole input gradient before scattering into it. Here the forward writes one byte per output
   (which of the 4 window positions won) and the backward writes every input-gradient element
   exactly once. The channel loop is contiguous, so the compiler vectorizes it; OpenMP splits the
   rows among torch's own OpenMP threads (the same libgomp).

   Semantics match F.max_pool2d(x, 2) then torch.relu exactly: the first maximum in the order
   (0,0), (0,1), (1,0), (1,1) wins ties; a NaN wins over any number (a later NaN over an earlier
   one, as in ATen's kernel); with relu, an output <= 0 becomes 0 and passes no gradient, while
   NaN passes through (as torch.relu and its backward do). Code 4 marks "no gradient".
   H and W must be even. */
#include <omp.h>
#include <stdint.h>

#include "simd.h"

static inline float f32_to_float(float v) { return v; }

/* One output pixel's C channels. The drivers call these with C as a literal for the common widths,
   so the channel loop compiles to whole vectors (with C known only at run time, gcc left a scalar
   remainder loop for C < 32). */
#define POOL_KERNELS(NAME, T, U, TO_FLOAT)                                                            \
static inline __attribute__((always_inline)) void pool_fwd_px_##NAME(                             \
        const T *restrict p0, const T *restrict p1, const T *restrict p2, const T *restrict p3,      \
        T *restrict y, uint8_t *restrict code, long C, int relu) {                                 \
    for (long c = 0; c < C; c++) {                                                                 \
        float m = TO_FLOAT(p0[c]), v;                                                              \
        T out = p0[c];                                                                             \
        uint8_t k = 0;                                                                             \
        v = TO_FLOAT(p1[c]); if (v > m || v != v) { m = v; out = p1[c]; k = 1; }                   \
        v = TO_FLOAT(p2[c]); if (v > m || v != v) { m = v; out = p2[c]; k = 2; }                   \
        v = TO_FLOAT(p3[c]); if (v > m || v != v) { m = v; out = p3[c]; k = 3; }                   \
        if (relu && m <= 0.0f) { out = (T)0; k = 4; }                                              \
        y[c] = out;                                                                                \
        code[c] = k;                                                                               \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
static inline __attribute__((always_inline)) void pool_bwd_px_##NAME(                             \
        const U *restrict g, const uint8_t *restrict code, U *restrict q0, U *restrict q1,          \
        U *restrict q2, U *restrict q3, long C) {                                                  \
    for (long c = 0; c < C; c++) {                                                                 \
        U v = g[c], k = code[c];  /* on the bits: v & a mask of all ones or of zeros */            \
        q0[c] = v & -(U)(k == 0);                                                                  \
        q1[c] = v & -(U)(k == 1);                                                                  \
        q2[c] = v & -(U)(k == 2);                                                                  \
        q3[c] = v & -(U)(k == 3);                                                                  \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
void pool2x2_fwd_##NAME(const T *restrict x, T *restrict y, uint8_t *restrict code,               \
                        long N, long H, long W, long C, int relu, int threads) {                  \
    long Ho = H / 2, Wo = W / 2;                                                                   \
    _Pragma("omp parallel for collapse(2) num_threads(threads)")                                   \
    for (long n = 0; n < N; n++)                                                                   \
        for (long i = 0; i < Ho; i++)                                                              \
            for (long j = 0; j < Wo; j++) {                                                        \
                const T *p0 = x + ((n * H + 2 * i) * W + 2 * j) * C;                               \
                const T *p1 = p0 + C, *p2 = p0 + W * C, *p3 = p2 + C;                              \
                long o = ((n * Ho + i) * Wo + j) * C;                                              \
                if (C == 16) pool_fwd_px_##NAME(p0, p1, p2, p3, y + o, code + o, 16, relu);        \
                else if (C == 32) pool_fwd_px_##NAME(p0, p1, p2, p3, y + o, code + o, 32, relu);   \
                else if (C == 64) pool_fwd_px_##NAME(p0, p1, p2, p3, y + o, code + o, 64, relu);   \
                else pool_fwd_px_##NAME(p0, p1, p2, p3, y + o, code + o, C, relu);                 \
            }                                                                                      \
}                                                                                                  \
                                                                                                   \
void pool2x2_bwd_##NAME(const U *restrict gy, const uint8_t *restrict code, U *restrict gx,       \
                        long N, long H, long W, long C, int threads) {                            \
    long Ho = H / 2, Wo = W / 2;                                                                   \
    _Pragma("omp parallel for collapse(2) num_threads(threads)")                                   \
    for (long n = 0; n < N; n++)                                                                   \
        for (long i = 0; i < Ho; i++)                                                              \
            for (long j = 0; j < Wo; j++) {                                                        \
                U *q0 = gx + ((n * H + 2 * i) * W + 2 * j) * C;                                    \
                U *q1 = q0 + C, *q2 = q0 + W * C, *q3 = q2 + C;                                    \
                long o = ((n * Ho + i) * Wo + j) * C;                                              \
                if (C == 16) pool_bwd_px_##NAME(gy + o, code + o, q0, q1, q2, q3, 16);             \
                else if (C == 32) pool_bwd_px_##NAME(gy + o, code + o, q0, q1, q2, q3, 32);        \
                else if (C == 64) pool_bwd_px_##NAME(gy + o, code + o, q0, q1, q2, q3, 64);        \
                else pool_bwd_px_##NAME(gy + o, code + o, q0, q1, q2, q3, C);                      \
            }                                                                                      \
}

POOL_KERNELS(bf16, uint16_t, uint16_t, bf16_to_float)  /* bf16 as its bits: (T)0 is +0.0 */
POOL_KERNELS(f32, float, uint32_t, f32_to_float)
