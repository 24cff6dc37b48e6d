/* The convolutions of the article's CNN fused with the 2x2 max-pool (+ReLU) that follows them.

   1. conv3x3_pool2x2_fwd/bwd: a 3x3 convolution (padding 1) of a one-channel image, then 2x2
      max-pool and an optional ReLU, in one pass; its backward gives the weight and bias gradients.
   2. conv3x3_pool2x2_wgrad: the weight and bias gradients of a many-channel 3x3 convolution
      followed by 2x2 max-pool, from the pooled gradient, at the windows' winners only.
   Winner codes are pool.c's: 0-3 the window position that won, 4 no gradient. */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

/* ---- 1. conv3x3_pool2x2: one input channel ----

   With one input channel the convolution is 9 multiply-adds per output, so ATen's version is all
   memory traffic: it writes the full-size (N, C, H, W) conv output, reads it to pool, and in
   backward writes its gradient back at full size. Here only the pooled (N, H/2, W/2, C) output and
   the 1-byte winner codes are written, and the weight gradient is summed straight from the pooled
   gradient: the winner's 3x3 input patch times its gradient. No input gradient is computed.

   The forward takes x (N, H, W), the weights (C, 9) and the bias (C) or NULL as the module holds
   them (fp32), and writes xpad: x zero-padded to (N, H+2, W+2), rounded to bf16 in bf16 mode, which
   the backward reads. In bf16 mode x, W and b are rounded to bf16 first, as autocast rounds a bf16
   convolution's inputs, and each conv output is rounded to bf16 before the max, as its output is.
   Float accumulation order differs from oneDNN's, so values agree to rounding, not bit for bit. */
/* 1 where the conv kernels' vectors are the CPU's own and fast: AVX-512 or AVX2 (with narrower
   vectors they are slower than ATen's). The Python side uses them only where this returns 1. */
int conv_kernels_native(void) {
#if defined(__AVX512F__) || defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* Elements o..o+LANES-1 of a bf16 (bf16 != 0) or fp32 array, as floats. */
static inline vf load_grad(const void *p, long o, int bf16) {
    if (!bf16) return vload((const float *)p + o);
    vh bits;
    memcpy(&bits, (const uint16_t *)p + o, sizeof bits);
    return (vf)(__builtin_convertvector(bits, vi) << 16);
}

/* The input pixel that tap t = (t/3, t%3) of window position k = (k/2, k%2) reads, in the 4x4 region
   whose top-left is x0. */
#define TAP(x0, Wp, k, t) ((x0)[((k) / 2 + (t) / 3) * (Wp) + (k) % 2 + (t) % 3])

/* The windows of one output row (n, i), LANES channels from c0. The channel block is the outer loop so
   that its 9 weight vectors and bias stay in registers along the row, and each multiply-add reads
   its input pixel straight from xpad. */
static inline __attribute__((always_inline)) void fwd_row(
        const float *restrict x0, long Wp, long Wo, const float *restrict w, const float *restrict b, long C,
        long c0, void *restrict y, uint8_t *restrict code, int bf16, int relu) {
    vf wt[9], bias = vload(b + c0);
    for (int t = 0; t < 9; t++) wt[t] = vload(w + t * C + c0);
    for (long j = 0; j < Wo; j++, x0 += 2) {
        vf v[4], u[4];  /* two partial sums per position: 8 independent chains of multiply-adds */
        for (int k = 0; k < 4; k++) v[k] = bias, u[k] = (vf){0};
        _Pragma("GCC unroll 9")  /* whole: each tap's offsets become constants */
        for (int t = 0; t < 9; t++)
            _Pragma("GCC unroll 4")
            for (int k = 0; k < 4; k++) {
                if (t % 2) u[k] += wt[t] * TAP(x0, Wp, k, t);
                else v[k] += wt[t] * TAP(x0, Wp, k, t);
            }
        for (int k = 0; k < 4; k++) v[k] += u[k];
        if (bf16)
            for (int k = 0; k < 4; k++) v[k] = vround_bf16(v[k]);
        vi kk;
        const vf m = window_max(v, relu, &kk);
        long o = j * C + c0;
        store_codes(code + o, kk);
        if (bf16) {
            vh bits = __builtin_convertvector((vi)m >> 16, vh);  /* exact: m holds bf16 values already */
            memcpy((uint16_t *)y + o, &bits, sizeof bits);
        } else {
            vstore((float *)y + o, m);
        }
    }
}

/* Returns 0, or -1 if the weights' scratch could not be allocated. */
int conv3x3_pool2x2_fwd(const float *restrict x, const float *restrict w, const float *restrict b,
                        float *restrict xpad, void *restrict y, uint8_t *restrict code, long N, long H, long W,
                        long C, int bf16, int relu, int threads) {
    long Ho = H / 2, Wo = W / 2, Wp = W + 2, size = bf16 ? 2 : 4;
    float *wt = malloc((size_t)10 * C * sizeof(float)), *bt = wt + 9 * C;  /* (9, C) tap-major, then bias */
    if (!wt) return -1;
    for (long c = 0; c < C; c++) {
        for (int t = 0; t < 9; t++) wt[t * C + c] = bf16 ? round_bf16(w[c * 9 + t]) : w[c * 9 + t];
        bt[c] = b ? (bf16 ? round_bf16(b[c]) : b[c]) : 0.0f;
    }
    _Pragma("omp parallel num_threads(threads)")
    {
        _Pragma("omp for")
        for (long n = 0; n < N; n++) {
            float *p = xpad + n * (H + 2) * Wp;
            memset(p, 0, Wp * sizeof(float));
            memset(p + (H + 1) * Wp, 0, Wp * sizeof(float));
            for (long r = 0; r < H; r++) {
                float *row = p + (r + 1) * Wp;
                const float *src = x + (n * H + r) * W;
                row[0] = row[W + 1] = 0.0f;
                if (bf16)
                    for (long j = 0; j < W; j++) row[j + 1] = round_bf16(src[j]);
                else
                    memcpy(row + 1, src, W * sizeof(float));
            }
        }  /* the implicit barrier: every image is padded before any is convolved */
        _Pragma("omp for collapse(2)")
        for (long n = 0; n < N; n++)
            for (long i = 0; i < Ho; i++) {
                long o = (n * Ho + i) * Wo * C;
                for (long c0 = 0; c0 < C; c0 += LANES)
                    fwd_row(xpad + (n * (H + 2) + 2 * i) * Wp, Wp, Wo, wt, bt, C, c0, (char *)y + o * size, code + o,
                            bf16, relu);
            }
    }
    free(wt);
    return 0;
}

/* One output row's share of the weight and bias gradients, LANES channels from c0: each window's
   winner's 3x3 patch times its gradient, summed in registers along the row (9 taps + bias), then
   added to this thread's partial sums tw (9, C) and tb (C). */
static inline __attribute__((always_inline)) void bwd_row(
        const float *restrict x0, long Wp, long Wo, const void *restrict gy, const uint8_t *restrict code, long C,
        long c0, int bf16, float *restrict tw, float *restrict tb) {
    vf acc[9], accb = (vf){0};
    for (int t = 0; t < 9; t++) acc[t] = (vf){0};
    for (long j = 0; j < Wo; j++, x0 += 2) {
        long o = j * C + c0;
        vf g = load_grad(gy, o, bf16);
        vi k = load_codes(code + o);
        vf gk[4];
        for (int kk = 0; kk < 4; kk++) gk[kk] = vselect(k == kk, g, (vf){0});
        accb += vselect(k < 4, g, (vf){0});
        _Pragma("GCC unroll 9")
        for (int t = 0; t < 9; t++)
            _Pragma("GCC unroll 4")
            for (int kk = 0; kk < 4; kk++) acc[t] += gk[kk] * TAP(x0, Wp, kk, t);
    }
    for (int t = 0; t < 9; t++) vstore(tw + t * C + c0, vload(tw + t * C + c0) + acc[t]);
    vstore(tb + c0, vload(tb + c0) + accb);
}

/* gw: (threads, 9, C) and gb: (threads, C) zeroed partial sums, one slice per thread; the caller
   adds the slices. gy: the pooled output's gradient, channels-last, bf16 or fp32. */
void conv3x3_pool2x2_bwd(const void *restrict gy, const uint8_t *restrict code, const float *restrict xpad,
                         float *restrict gw, float *restrict gb, long N, long H, long W, long C,
                         int bf16, int threads) {
    long Ho = H / 2, Wo = W / 2, Wp = W + 2, size = bf16 ? 2 : 4;
    _Pragma("omp parallel num_threads(threads)")
    {
        float *restrict tw = gw + (long)omp_get_thread_num() * 9 * C;
        float *restrict tb = gb + (long)omp_get_thread_num() * C;
        _Pragma("omp for collapse(2)")
        for (long n = 0; n < N; n++)
            for (long i = 0; i < Ho; i++) {
                long o = (n * Ho + i) * Wo * C;
                for (long c0 = 0; c0 < C; c0 += LANES)
                    bwd_row(xpad + (n * (H + 2) + 2 * i) * Wp, Wp, Wo, (const char *)gy + o * size, code + o, C, c0,
                            bf16, tw, tb);
            }
    }
}

/* ---- 2. conv3x3_pool2x2_wgrad: many input channels ----

   The weight and bias gradients of a 3x3 convolution (padding 1, Cin -> Cout channels) followed by
   2x2 max-pool (and ReLU), straight from the pooled gradient. Only a window's winner receives
   gradient, so
       dW[co][t][ci] = sum over (n, i, j) of gy[n,i,j,co] * x[n, winner(n,i,j,co) + tap t - (1,1), ci]
   is a quarter of the multiply-adds of the dense weight gradient that ATen computes from the
   zero-filled full-size gradient. Each output channel picks its own winners, so this is a gather on
   vector FMAs, not a matrix product.

   x: the convolution's input, channels-last (N, H, W, Cin), bf16 or fp32; gy, code: the pooled
   output's gradient and winner codes (N, H/2, W/2, Cout), as pool2x2 writes them. Cin and Cout must
   be multiples of 16. Writes gw (Cout, 9, Cin) and gb (Cout): each thread sums its images into its
   own partial sums (here, not in the caller's tensors: zero-filling and adding those with torch ops
   cost more than the sums), added at the end in a fixed order, so the result does not depend on
   timing. Accumulation is in fp32, in bf16 mode too. Returns 0, or -1 if scratch memory could not
   be allocated (gw, gb then hold garbage). */

/* dw (9 taps, channels c0.. of Cin) += the sum over the m windows of gv[e] times the 3x3 patch whose
   top-left pixel is off[e] in xb, one (H+2, W+2, NV*LANES) block of channels. NV = 1 or 2 vectors:
   up to 18 accumulators stay in registers while the windows stream by. */
static inline __attribute__((always_inline)) void wgrad_block(
        const float *restrict xb, long Wp, const int32_t *restrict off, const float *restrict gv, long m,
        float *restrict dw, long Cin, const int NV) {
    const long B = NV * LANES, row = Wp * B;
    vf acc[9][2];
    for (int t = 0; t < 9; t++)
        for (int h = 0; h < NV; h++) acc[t][h] = vload(dw + t * Cin + LANES * h);
    for (long e = 0; e < m; e++) {
        const float *p0 = xb + off[e] * B, *p1 = p0 + row, *p2 = p1 + row;
        vf g = (vf){0} + gv[e];
        _Pragma("GCC unroll 3")
        for (int kx = 0; kx < 3; kx++)
            _Pragma("GCC unroll 2")
            for (int h = 0; h < NV; h++) {
                acc[kx][h] += g * vload(p0 + kx * B + LANES * h);
                acc[3 + kx][h] += g * vload(p1 + kx * B + LANES * h);
                acc[6 + kx][h] += g * vload(p2 + kx * B + LANES * h);
            }
    }
    for (int t = 0; t < 9; t++)
        for (int h = 0; h < NV; h++) vstore(dw + t * Cin + LANES * h, acc[t][h]);
}

int conv3x3_pool2x2_wgrad(const void *restrict x, const void *restrict gy, const uint8_t *restrict code,
                          float *restrict gw, float *restrict gb, long N, long H, long W, long Cin, long Cout,
                          int bf16, int threads) {
    const long Ho = H / 2, Wo = W / 2, P = Ho * Wo, Wp = W + 2, plane = (H + 2) * Wp;
    /* Channels per block: two vectors where 18 accumulators fit in the registers (AVX-512's 32). */
    const long B = LANES == 16 && Cin % 32 == 0 ? 2 * LANES : LANES;
    const long nw = Cout * 9 * Cin, per = nw + Cout;  /* one thread's partial sums: weights, then bias */
    float *part = malloc((size_t)threads * per * sizeof(float));
    if (!part) return -1;
    int failed = 0;
    _Pragma("omp parallel num_threads(threads)")
    {
        float *restrict tw = part + (long)omp_get_thread_num() * per, *restrict tb = tw + nw;
        memset(tw, 0, per * sizeof(float));
        /* One image at a time, in fp32, zero-padded, as (Cin/B, H+2, W+2, B) blocks of channels:
           within a block a tap is a constant offset from its window's top-left pixel. */
        float *xf = aligned_alloc(64, (size_t)plane * Cin * sizeof(float));
        int32_t *off = malloc(P * sizeof *off), *corner = malloc(P * sizeof *corner);
        float *gv = malloc(P * sizeof *gv);
        const int32_t step[5] = {0, 1, (int32_t)Wp, (int32_t)Wp + 1, 0};  /* winner code -> pixel offset */
        const int no_scratch = !xf || !off || !corner || !gv;
        if (no_scratch) {
            _Pragma("omp atomic write")
            failed = 1;
        } else {
            memset(xf, 0, (size_t)plane * Cin * sizeof(float));
            for (long i = 0; i < Ho; i++)
                for (long j = 0; j < Wo; j++) corner[i * Wo + j] = (int32_t)(2 * i * Wp + 2 * j);
        }
        /* Every thread reaches the loop's implicit barrier, even one whose allocation failed. */
        _Pragma("omp for schedule(static)")
        for (long n = 0; n < N; n++) {
            if (no_scratch) continue;
            for (long y = 0; y < H; y++)
                for (long xx = 0; xx < W; xx++) {
                    long s = ((n * H + y) * W + xx) * Cin, d = ((y + 1) * Wp + xx + 1) * B;
                    for (long c0 = 0; c0 < Cin; c0 += B, d += plane * B, s += B)
                        for (long c = 0; c < B; c += LANES) vstore(xf + d + c, load_grad(x, s + c, bf16));
                }
            const long q0 = n * P * Cout;
            /* Bias: the sum of the gradients that pass (code < 4), LANES output channels at a time. */
            for (long p = 0; p < P; p++)
                for (long c0 = 0; c0 < Cout; c0 += LANES) {
                    long q = q0 + p * Cout + c0;
                    vf g = load_grad(gy, q, bf16);
                    vstore(tb + c0, vload(tb + c0) + vselect(load_codes(code + q) < 4, g, (vf){0}));
                }
            for (long co = 0; co < Cout; co++) {
                /* This channel's windows that pass gradient: their winner's pixel in xf and gradient. */
                long m = 0;
                const uint8_t *cd = code + q0 + co;
                for (long p = 0; p < P; p++) {
                    int k = cd[p * Cout];
                    uint32_t bits = bf16 ? (uint32_t)((const uint16_t *)gy)[q0 + p * Cout + co] << 16
                                         : ((const uint32_t *)gy)[q0 + p * Cout + co];
                    off[m] = corner[p] + step[k];
                    memcpy(gv + m, &bits, sizeof bits);
                    m += k < 4;
                }
                float *dw = tw + co * 9 * Cin;
                for (long c0 = 0; c0 < Cin; c0 += B) {
                    if (B == 2 * LANES) wgrad_block(xf + c0 * plane, Wp, off, gv, m, dw + c0, Cin, 2);
                    else wgrad_block(xf + c0 * plane, Wp, off, gv, m, dw + c0, Cin, 1);
                }
            }
        }
        /* The loop's implicit barrier is behind every thread: add the partial sums, in thread order. */
        if (!failed) {
            const int nt = omp_get_num_threads();
            _Pragma("omp for schedule(static)")
            for (long e = 0; e < per; e++) {
                float sum = 0.0f;
                for (int t = 0; t < nt; t++) sum += part[t * per + e];
                if (e < nw) gw[e] = sum;
                else gb[e - nw] = sum;
            }
        }
        free(xf);
        free(off);
        free(corner);
        free(gv);
    }
    free(part);
    return failed ? -1 : 0;
}
