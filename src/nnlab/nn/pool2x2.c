/* 2x2, stride-2 max pooling fused with an optional ReLU, over channels-last (N, H, W, C) memory.

   Why by hand: ATen's CPU max-pool writes int64 indices in forward, and its backward zero-fills
   the whole input gradient before scattering into it. For the article's CNN (64x32x28x28 bf16)
   those passes cost more than the pooling itself. Here the forward writes one byte per output
   (which of the 4 window positions won), and the backward writes every input-gradient element
   exactly once, so nothing is zero-filled. The C loop over channels is contiguous, so the
   compiler vectorizes it; OpenMP splits the rows among the threads of the OpenMP runtime that
   torch has already loaded (the same libgomp, so the thread count torch sets applies here too).

   Semantics match F.max_pool2d(x, 2) then torch.relu exactly: the first maximum in the order
   (0,0), (0,1), (1,0), (1,1) wins ties; a NaN wins over any number (a later NaN over an earlier
   one, as in ATen's kernel); with relu, an output <= 0 becomes 0 and passes no gradient, while
   NaN passes through (as torch.relu and its backward do). Code 4 marks "no gradient".
   H and W must be even; the caller falls back to ATen otherwise. */
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline float f32_to_float(float v) { return v; }

#define POOL_KERNELS(NAME, T, U, TO_FLOAT)                                                            \
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
                for (long c = 0; c < C; c++) {                                                     \
                    float m = TO_FLOAT(p0[c]), v;                                                  \
                    T out = p0[c];                                                                 \
                    uint8_t k = 0;                                                                 \
                    v = TO_FLOAT(p1[c]); if (v > m || v != v) { m = v; out = p1[c]; k = 1; }       \
                    v = TO_FLOAT(p2[c]); if (v > m || v != v) { m = v; out = p2[c]; k = 2; }       \
                    v = TO_FLOAT(p3[c]); if (v > m || v != v) { m = v; out = p3[c]; k = 3; }       \
                    if (relu && m <= 0.0f) { out = (T)0; k = 4; }                                  \
                    y[o + c] = out;                                                                \
                    code[o + c] = k;                                                               \
                }                                                                                  \
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
                U *restrict q0 = gx + ((n * H + 2 * i) * W + 2 * j) * C;                           \
                U *restrict q1 = q0 + C, *restrict q2 = q0 + W * C, *restrict q3 = q2 + C;         \
                long o = ((n * Ho + i) * Wo + j) * C;                                              \
                for (long c = 0; c < C; c++) {                                                     \
                    U g = gy[o + c], k = code[o + c];  /* on the bits: a mask of all ones or 0 */  \
                    q0[c] = g & -(U)(k == 0);                                                      \
                    q1[c] = g & -(U)(k == 1);                                                      \
                    q2[c] = g & -(U)(k == 2);                                                      \
                    q3[c] = g & -(U)(k == 3);                                                      \
                }                                                                                  \
            }                                                                                      \
}

POOL_KERNELS(bf16, uint16_t, uint16_t, bf16_to_float)  /* bf16 as its bits: (T)0 is +0.0 */
POOL_KERNELS(f32, float, uint32_t, f32_to_float)
