/* A 3x3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3) (Lavin and
   Gray, "Fast Algorithms for Convolutional Neural Networks", 2015), fp32, channels-last, optionally
   followed by 2x2 max-pool and ReLU in the same pass.

   Why: in fp32 oneDNN's direct convolution of seed-cnn's second block runs at about the CPU's FMA
   peak, so only fewer multiply-adds can be faster. F(2x2, 3x3) computes each 2x2 output tile from a
   4x4 input tile with 16 products per channel pair instead of 36:
       Y = A^T [ (G g G^T) . (B^T d B) ] A
   (g: a 3x3 filter, d: a 4x4 input tile, ".": elementwise). With U = G g G^T precomputed per filter
   (on the Python side, in torch), a convolution becomes, for each of the 16 tile positions k, one
   matrix product M[k] (tiles x Cout) = V[k] (tiles x Cin) @ U[k] (Cin x Cout), between two
   transforms that only add and subtract. Rounding differs from a direct convolution by a few ulps
   of the largest terms (tests/test_kernels.py bounds it against float64).

   The transforms and products run on blocks of TB tiles at a time, in each thread's own scratch, so
   V and M stay in cache (16 x TB x C floats each). Each output tile of the pooling variant is
   exactly one pooling window, so its pooled value and winner code come straight from the tile, and
   the full-size convolution output is never written.

   x: (N, H, W, C); U: (16, C, O); y: (N, H, W, O), or with pool (N, H/2, W/2, O) plus the winner
   codes (as pool2x2 writes them). H and W even, C a multiple of LANES, O of 2 LANES. */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define TB 30 /* tiles per block */
#define RB 6  /* rows (tiles) per register block of the products: 12 accumulators, 15 of AVX2's 16 registers */

/* V[k][i][c] (k = 4r + s: the tile position) = B^T d B for the block's tiles t0.., zeros past nt. */
static void transform_input(const float *restrict x, float *restrict V, long t0, long nt, long H, long W, long C) {
    const long Tw = W / 2, per_image = H / 2 * Tw;
    for (long i = 0; i < TB; i++) {
        if (i >= nt) {
            for (int k = 0; k < 16; k++) memset(V + (k * TB + i) * C, 0, C * sizeof(float));
            continue;
        }
        const long t = t0 + i, n = t / per_image, ti = t % per_image / Tw, tj = t % Tw;
        for (long c0 = 0; c0 < C; c0 += LANES) {
            vf d[4][4], u[4][4];
            for (int r = 0; r < 4; r++)
                for (int s = 0; s < 4; s++) {
                    const long y = 2 * ti - 1 + r, xx = 2 * tj - 1 + s;  /* padding 1: zeros outside */
                    const int inside = y >= 0 && y < H && xx >= 0 && xx < W;
                    d[r][s] = inside ? vload(x + ((n * H + y) * W + xx) * C + c0) : (vf){0};
                }
            /* B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], on the columns, then on the rows. */
            for (int s = 0; s < 4; s++) {
                u[0][s] = d[0][s] - d[2][s], u[1][s] = d[1][s] + d[2][s];
                u[2][s] = d[2][s] - d[1][s], u[3][s] = d[1][s] - d[3][s];
            }
            for (int r = 0; r < 4; r++) {
                float *v = V + (4 * r * TB + i) * C + c0;
                vstore(v, u[r][0] - u[r][2]);
                vstore(v + TB * C, u[r][1] + u[r][2]);
                vstore(v + 2 * TB * C, u[r][2] - u[r][1]);
                vstore(v + 3 * TB * C, u[r][1] - u[r][3]);
            }
        }
    }
}

/* M[k] (TB x O) = V[k] (TB x C) @ U[k] (C x O), RB rows x 2 vectors at a time. A scalar of V times
   a vector of U compiles to one broadcast from memory per row ((vf){0} + scalar to an add and a
   broadcast). */
static void products(const float *restrict V, const float *restrict U, float *restrict M, long C, long O) {
    for (int k = 0; k < 16; k++) {
        const float *A = V + k * TB * C, *B = U + k * C * O;
        float *D = M + k * TB * O;
        for (long j = 0; j < O; j += 2 * LANES)
            for (long i = 0; i < TB; i += RB) {
                vf acc[RB][2];
                for (int r = 0; r < RB; r++) acc[r][0] = acc[r][1] = (vf){0};
                const float *a = A + i * C;
                for (long c = 0; c < C; c++) {
                    const vf b0 = vload(B + c * O + j), b1 = vload(B + c * O + j + LANES);
                    _Pragma("GCC unroll 8")
                    for (int r = 0; r < RB; r++) {
                        const float ar = a[r * C + c];
                        acc[r][0] += ar * b0, acc[r][1] += ar * b1;
                    }
                }
                float *d = D + i * O + j;
                for (int r = 0; r < RB; r++) vstore(d + r * O, acc[r][0]), vstore(d + r * O + LANES, acc[r][1]);
            }
    }
}

/* Tile i's 2x2 outputs, channels c0.., in the order (0,0), (0,1), (1,0), (1,1): A^T M A with
   A^T = [1 1 1 0; 0 1 -1 -1]. */
static inline void transform_output(const float *restrict M, long i, long O, long c0, vf y[4]) {
    vf a[2][4];
    for (int s = 0; s < 4; s++) {
        const vf m0 = vload(M + (s * TB + i) * O + c0), m1 = vload(M + ((4 + s) * TB + i) * O + c0);
        const vf m2 = vload(M + ((8 + s) * TB + i) * O + c0), m3 = vload(M + ((12 + s) * TB + i) * O + c0);
        a[0][s] = m0 + m1 + m2, a[1][s] = m1 - m2 - m3;
    }
    for (int r = 0; r < 2; r++)
        y[2 * r] = a[r][0] + a[r][1] + a[r][2], y[2 * r + 1] = a[r][1] - a[r][2] - a[r][3];
}

/* Returns 0, -1 if a thread's scratch could not be allocated, -2 for sizes it does not take. */
int conv3x3_winograd(const float *restrict x, const float *restrict U, const float *restrict bias,
                     float *restrict y, uint8_t *restrict code, long N, long H, long W, long C, long O,
                     int pool, int relu, int threads) {
    if (H % 2 || W % 2 || C % LANES || O % (2 * LANES)) return -2;
    const long Tw = W / 2, per_image = H / 2 * Tw, T = N * per_image, blocks = (T + TB - 1) / TB;
    int failed = 0;
    _Pragma("omp parallel num_threads(threads)")
    {
        float *V = aligned_alloc(64, 16 * TB * C * sizeof(float)), *M = aligned_alloc(64, 16 * TB * O * sizeof(float));
        if (!V || !M) {
            _Pragma("omp atomic write")
            failed = 1;
        }
        /* Every thread reaches the loop's implicit barrier, even one whose allocation failed. */
        _Pragma("omp for schedule(static)")
        for (long blk = 0; blk < blocks; blk++) {
            if (!V || !M) continue;
            const long t0 = blk * TB, nt = T - t0 < TB ? T - t0 : TB;
            transform_input(x, V, t0, nt, H, W, C);
            products(V, U, M, C, O);
            for (long i = 0; i < nt; i++) {
                const long t = t0 + i, n = t / per_image, ti = t % per_image / Tw, tj = t % Tw;
                for (long c0 = 0; c0 < O; c0 += LANES) {
                    vf v[4];
                    transform_output(M, i, O, c0, v);
                    if (bias)
                        for (int k = 0; k < 4; k++) v[k] += vload(bias + c0);
                    if (pool) {  /* the tile is the pooling window (i, j) = (ti, tj) */
                        vi k;
                        vstore(y + t * O + c0, window_max(v, relu, &k));
                        store_codes(code + t * O + c0, k);
                    } else {
                        for (int k = 0; k < 4; k++)
                            vstore(y + ((n * H + 2 * ti + k / 2) * W + 2 * tj + k % 2) * O + c0, v[k]);
                    }
                }
            }
        }
        free(V);
        free(M);
    }
    return failed ? -1 : 0;
}
