/* Self-attention for short sequences, forward and backward, on the CPU.

   Why by hand: for short sequences attention is many small matrix products. ATen runs each step of
   it (QK^T, mask, softmax, AV, and five more in backward) as a separate batched op with its own
   dispatch, allocation and memory pass, and its bf16 batched matmuls pay oneDNN's per-call setup.
   Here one call per direction does a whole (batch, head) pair at a time in a thread's L1/L2: Q, K, V (and in backward O, dO) are copied once into fp32 scratch, the T x T
   scores stay in that scratch, and nothing else is written but the results.

   Layout: qkv is the fused projection's output, (B, T, 3C) row-major, C = H * D, with query,
   key and value of head h at columns h*D, C + h*D, 2C + h*D: the attention reads it in place,
   with no split, transpose or copy by the caller. y is (B, T, C) with head h at columns h*D (the
   heads already side by side), and dqkv has qkv's layout. lse (B, H, T) keeps each query row's
   log-sum-exp for the backward, which recomputes the probabilities instead of storing them
   (as flash attention does). All arithmetic is fp32; bf16 tensors are widened on load and
   rounded to nearest even on store, so bf16 results differ from fp32 ones by that rounding only.

   The products use simd.h's vectors, as wide as the CPU's own (LANES floats). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

/* The products below are small (T x T and T x D per (batch, head) pair) and stay in L1/L2, so
   what bounds them is loads and the FMAs' latency, not memory: an MR-row x 2-vector register tile
   loads 2 vectors of B and MR scalars of A for its 2 MR FMAs per k. MR = 8 where AVX-512's 32
   registers hold the 16 sums, else 4 (AVX2 has 16 registers). LANES is the CPU's vector
   width in floats; every scratch row is padded to a multiple of NV = 2 LANES columns (zeros), so no
   tile needs a remainder loop. */
#define NV (2 * LANES)
#if LANES == 16
#define MR 8
#else
#define MR 4
#endif

static inline long round_up(long x, long m) { return (x + m - 1) / m * m; }
static inline vf splat(float x) { return (vf){0} + x; }
static inline vi lane_index(void) {
    vi l;
    for (int i = 0; i < LANES; i++) l[i] = i;
    return l;
}
/* The largest lane (a NaN lane loses every comparison, as in a scalar max loop) and the sum of the
   lanes, pairwise: log2(LANES) shuffles each. */
static inline float hmax(vf v) {
    for (int s = LANES / 2; s > 0; s /= 2) {
        const vf w = __builtin_shuffle(v, lane_index() ^ s);
        v = vselect(w > v, w, v);
    }
    return v[0];
}
static inline float hsum(vf v) {
    for (int s = LANES / 2; s > 0; s /= 2) v += __builtin_shuffle(v, lane_index() ^ s);
    return v[0];
}

/* Keeps v in a register as it is: what comes after it cannot be fused with the operation that made
   it (no FMA of a product rounded on its own). */
#if defined(__x86_64__) || defined(__i386__)
#define SEPARATE(v) __asm__("" : "+x"(v))
#elif defined(__aarch64__)
#define SEPARATE(v) __asm__("" : "+w"(v))
#else
#define SEPARATE(v) (void)0
#endif

/* e^x, lane by lane, for x <= 0 (what softmax takes after subtracting the row maximum): 2^n * e^r
   with |r| <= ln2/2 and Cephes' polynomial for e^r: within 1.02 ulp of the exact e^x at every float
   in [-87, 0] (checked one by one, with FMAs as built here); 0 below -87 (where e^x would be
   denormal), NaN for NaN. n = rint(x log2 e) by adding and subtracting 1.5 * 2^23, exact for
   |x log2 e| < 2^22, the product rounded first (SEPARATE), as rintf would take it: every float in
   [-88, 0] gives the same bits as a scalar rintf-based version (checked one by one, AVX-512 and
   AVX2 builds), on whole vectors. */
static inline vf vexp_nonpos(vf x) {
    const vi under = x < splat(-87.0f);
    const vf xc = vselect(under, splat(-87.0f), x);
    vf t = xc * 1.44269504088896341f;
    SEPARATE(t);
    vf n = t + 12582912.0f;
    SEPARATE(n);
    n = n - 12582912.0f;
    vf r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return vselect(under, (vf){0}, p * (vf)bits);
}

/* log(x) for normal x > 0: e ln2 + log(m), x = m 2^e with m in [sqrt(1/2), sqrt(2)), and Cephes'
   polynomial for log(m). Branch-free, so a loop over the rows' sums vectorizes (logf is a
   library call per row). Within 1 ulp of glibc's logf at every float
   in [1, 2^24] (checked one by one), which holds every row's sum for T <= 2^24. */
static inline float log_pos(float x) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    float e = (float)((int32_t)(bits >> 23) - 126);
    bits = (bits & 0x007fffffu) | 0x3f000000u;  /* m in [0.5, 1) */
    float m;
    memcpy(&m, &bits, 4);
    const int small = m < 0.707106781186547524f;
    e = small ? e - 1.0f : e;
    m = small ? m + m - 1.0f : m - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y += -2.12194440e-4f * e;
    y += -0.5f * z;
    return m + y + 0.693359375f * e;
}

/* C[i][n] = sum over k in [k0, k1) of A(i, k) B[k][n], for the MR rows from c and the NV columns
   from n0. A(i, k) = a[i * sai + k * sak] (so A can be a transpose in place); B is row-major with
   row stride ldb. */
static inline void tile(float *restrict c, long ldc, const float *restrict a, long sai, long sak,
                        const float *restrict b, long ldb, long k0, long k1) {
    vf acc[MR][2];
    _Pragma("GCC unroll 8")
    for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = (vf){0};
    for (long k = k0; k < k1; k++) {
        const vf b0 = vload(b + k * ldb), b1 = vload(b + k * ldb + LANES);
        const float *ak = a + k * sak;
        _Pragma("GCC unroll 8")
        for (int r = 0; r < MR; r++) {
            const float ar = ak[r * sai];
            acc[r][0] += ar * b0, acc[r][1] += ar * b1;
        }
    }
    _Pragma("GCC unroll 8")
    for (int r = 0; r < MR; r++) vstore(c + r * ldc, acc[r][0]), vstore(c + r * ldc + LANES, acc[r][1]);
}

/* C (M x N, row stride ldc) = A B with k in [0, K), where a causal product skips what the mask
   zeroes: mode 1 (scores) computes only columns n <= the tile's last row; mode 2 (A's columns
   past a row are zero: P V, dS K) stops k after the tile's last row; mode 3 (A is the transpose
   of a lower-triangular matrix: P^T dO, dS^T Q) starts k at the tile's first row. M, N multiples
   of MR and NV. Entries a mode-1 product skips are left as they were. */
static void matmul(float *restrict c, long ldc, const float *restrict a, long sai, long sak, const float *restrict b,
                   long ldb, long M, long N, long K, int mode) {
    for (long i = 0; i < M; i += MR) {
        long k0 = mode == 3 ? i : 0, k1 = mode == 2 && i + MR < K ? i + MR : K;
        for (long n = 0; n < N && (mode != 1 || n < i + MR); n += NV)
            tile(c + i * ldc + n, ldc, a + i * sai, sai, sak, b + n, ldb, k0, k1);
    }
}

/* One (batch, head) pair's scratch, fp32, rows padded with zeros: Q (times scale), K, V, dO as
   (Tp, Dp); K and V transposed, (Dp, Tp); scores/probabilities and their gradient, (Tp, Tp);
   the results, (Tp, Dp). Tp, Dp: T and D rounded up to NV. */
typedef struct {
    long T, D, Tp, Dp;
    float *q, *k, *v, *kt, *vt, *dout, *p, *ds, *r1, *r2, *r3, *l;
} Scratch;

static float *scratch_alloc(Scratch *s, long T, long D) {
    s->T = T, s->D = D, s->Tp = round_up(T, NV), s->Dp = round_up(D, NV);
    long td = s->Tp * s->Dp, tt = s->Tp * s->Tp;
    float *buf = calloc(9 * td + 2 * tt + s->Tp, sizeof(float));
    if (buf) {
        s->q = buf, s->k = s->q + td, s->v = s->k + td, s->kt = s->v + td, s->vt = s->kt + td;
        s->dout = s->vt + td, s->r1 = s->dout + td, s->r2 = s->r1 + td, s->r3 = s->r2 + td;
        s->p = s->r3 + td, s->ds = s->p + tt, s->l = s->ds + tt;
    }
    return buf;
}

/* dst[c][r] = src[r][c] for one LANES x LANES block (row strides ld, ls), in registers: round h swaps the
   off-diagonal h x h blocks of every 2h x 2h block, two shuffles per pair of rows (a scalar
   transpose costs a load and a store per element). */
static inline void transpose_block(float *restrict dst, long ld, const float *restrict src, long ls) {
    vf r[LANES];
    for (int i = 0; i < LANES; i++)
        r[i] = vload(src + i * ls);
    _Pragma("GCC unroll 4")
    for (int h = LANES / 2; h > 0; h /= 2) {
        vi keep, take;  /* lane sources in (row i, row i + h): for row i, then for row i + h */
        _Pragma("GCC unroll 16")
        for (int l = 0; l < LANES; l++)
            keep[l] = l & h ? LANES + l - h : l, take[l] = l & h ? LANES + l : l + h;
        _Pragma("GCC unroll 16")
        for (int i = 0; i < LANES; i++)
            if (!(i & h)) {
                const vf a = r[i], b = r[i + h];
                r[i] = __builtin_shuffle(a, b, keep);
                r[i + h] = __builtin_shuffle(a, b, take);
            }
    }
    for (int i = 0; i < LANES; i++)
        vstore(dst + i * ld, r[i]);
}

/* Rows t of one pair's (T, D) slice of a (B, T, stride) tensor at column col into dst (row
   stride Dp), times mul; with dstt, also transposed (row stride Tp), padding included. */
static void load_rows(float *restrict dst, float *restrict dstt, const void *src, long stride, long col,
                      const Scratch *s, long b, float mul, int bf16) {
    for (long t = 0; t < s->T; t++) {
        float *restrict d = dst + t * s->Dp;
        const long o = (b * s->T + t) * stride + col;
        if (bf16) {
            const uint16_t *restrict r = (const uint16_t *)src + o;
#pragma omp simd
            for (long c = 0; c < s->D; c++)
                d[c] = bf16_to_float(r[c]) * mul;
        } else {
            const float *restrict r = (const float *)src + o;
#pragma omp simd
            for (long c = 0; c < s->D; c++)
                d[c] = r[c] * mul;
        }
    }
    if (dstt)  /* dst's padding rows and columns are zeros, so the padded transpose is too */
        for (long t0 = 0; t0 < s->Tp; t0 += LANES)
            for (long c0 = 0; c0 < s->Dp; c0 += LANES)
                transpose_block(dstt + c0 * s->Tp + t0, s->Tp, dst + t0 * s->Dp + c0, s->Dp);
}

static void store_rows(void *dst, long stride, long col, const float *restrict src, const Scratch *s, long b,
                       float mul, int bf16) {
    for (long t = 0; t < s->T; t++) {
        const float *restrict r = src + t * s->Dp;
        const long o = (b * s->T + t) * stride + col;
        if (bf16) {
            uint16_t *restrict d = (uint16_t *)dst + o;
#pragma omp simd
            for (long c = 0; c < s->D; c++)
                d[c] = float_to_bf16(r[c] * mul);
        } else {
            float *restrict d = (float *)dst + o;
#pragma omp simd
            for (long c = 0; c < s->D; c++)
                d[c] = r[c] * mul;
        }
    }
}

/* The largest of a row's first n scores. */
static inline float row_max(const float *restrict p, long n) {
    const vi lane = lane_index(), end = (vi){0} + (int32_t)n;
    vf part = splat(p[0]);
    for (long j0 = 0; j0 < n; j0 += LANES) {
        const vf x = vload(p + j0);
        part = vselect((lane + (int32_t)j0 < end) & (x > part), x, part);
    }
    return hmax(part);
}

/* A row's first n scores s -> exp(s - m), the rest of its Tp columns -> 0 (so the products after
   it may run over the whole padded row); returns the sum of the exponentials. */
static inline float exp_row(float *restrict p, long n, long Tp, float m) {
    const vi lane = lane_index(), end = (vi){0} + (int32_t)n;
    const vf mv = splat(m);
    const long nv = round_up(n, LANES);
    vf l = {0};
    for (long j0 = 0; j0 < nv; j0 += LANES) {
        const vf e = vselect(lane + (int32_t)j0 < end, vexp_nonpos(vload(p + j0) - mv), (vf){0});
        vstore(p + j0, e);
        l += e;
    }
    for (long j0 = nv; j0 < Tp; j0 += LANES)  /* vector stores: no memset call per row */
        vstore(p + j0, (vf){0});
    return hsum(l);
}

/* Rows [0, T) of the scores in p (Tp wide; row i has i + 1 keys if causal, else T) -> their
   softmax, with each row's maximum in mx[i] and its sum of exponentials in l[i] (the caller takes
   the log-sum-exp, max + log(sum), for all rows at once). One pass over all rows per step (maxima,
   then exponentials, then the scaling): a row's steps depend on each other through a horizontal
   max, a sum and a division, and done row by row that chain set the pace; with each pass's rows
   independent the CPU overlaps them. */
static void softmax_rows(float *restrict p, long T, long Tp, int causal, float *restrict mx, float *restrict l) {
    for (long i = 0; i < T; i++)
        mx[i] = row_max(p + i * Tp, causal ? i + 1 : T);
    for (long i = 0; i < T; i++)
        l[i] = exp_row(p + i * Tp, causal ? i + 1 : T, Tp, mx[i]);
    for (long i = 0; i < T; i++) {
        const float inv = 1.0f / l[i];
        float *restrict r = p + i * Tp;
        for (long j0 = 0; j0 < round_up(causal ? i + 1 : T, LANES); j0 += LANES)
            vstore(r + j0, vload(r + j0) * inv);
    }
}

/* One call's arguments; every (batch, head) pair reads and writes its own slices of them. */
typedef struct {
    const void *qkv, *y, *dy;  /* y: the forward's output, read by the backward */
    void *out;                 /* y (forward) or dqkv (backward) */
    float *lse;
    long B, T, H, D;
    float scale;
    int causal, bf16;
} Args;

/* Runs pair(s, a, b, h) for every (batch b, head h) pair, spread over the threads, each with its
   own scratch holding that pair's Q (times scale), K and K^T, V (and V^T for the backward). Returns 0, or -1 if a
   thread's scratch could not be allocated. */
static int for_each_pair(const Args *a, int threads, void (*pair)(Scratch *, const Args *, long, long)) {
    int failed = 0;
    const long C = a->H * a->D;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        Scratch s;
        float *buf = scratch_alloc(&s, a->T, a->D);
        failed = !buf;
#pragma omp for schedule(static)
        for (long bh = 0; bh < a->B * a->H; bh++) {
            if (failed)
                continue;
            const long b = bh / a->H, h = bh % a->H;
            load_rows(s.q, NULL, a->qkv, 3 * C, h * a->D, &s, b, a->scale, a->bf16);
            load_rows(s.k, s.kt, a->qkv, 3 * C, C + h * a->D, &s, b, 1.0f, a->bf16);
            load_rows(s.v, a->dy ? s.vt : NULL, a->qkv, 3 * C, 2 * C + h * a->D, &s, b, 1.0f, a->bf16);
            pair(&s, a, b, h);
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

static void fwd_pair(Scratch *s, const Args *a, long b, long h) {
    const long T = a->T, Tp = s->Tp, Dp = s->Dp, C = a->H * a->D;
    float *lse = a->lse + (b * a->H + h) * T;
    matmul(s->p, Tp, s->q, Dp, 1, s->kt, Tp, Tp, Tp, Dp, a->causal);  /* S = (scale Q) K^T */
    softmax_rows(s->p, T, Tp, a->causal, lse, s->l);
    for (long i = 0; i < T; i++)
        lse[i] += log_pos(s->l[i]);
    matmul(s->r1, Dp, s->p, Tp, 1, s->v, Dp, Tp, Dp, a->causal ? Tp : T, a->causal ? 2 : 0);  /* O = P V */
    store_rows(a->out, C, h * a->D, s->r1, s, b, 1.0f, a->bf16);
}

/* With P recomputed from Q, K and lse: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
   dQ = scale dS K, dK = scale dS^T Q. */
static void bwd_pair(Scratch *s, const Args *a, long b, long h) {
    const long T = a->T, Tp = s->Tp, Dp = s->Dp, D = a->D, C = a->H * D, K = a->causal ? Tp : T;
    const float *lse = a->lse + (b * a->H + h) * T;
    load_rows(s->dout, NULL, a->dy, C, h * D, s, b, 1.0f, a->bf16);
    load_rows(s->r1, NULL, a->y, C, h * D, s, b, 1.0f, a->bf16);  /* O, for rowsum(dO * O) */
    matmul(s->p, Tp, s->q, Dp, 1, s->kt, Tp, Tp, Tp, Dp, a->causal);      /* S */
    matmul(s->ds, Tp, s->dout, Dp, 1, s->vt, Tp, Tp, Tp, Dp, a->causal);  /* dP = dO V^T */
    /* rowsum(dO * O) of every row first, on vectors (the padding columns of both are zeros),
       rather than one chain of dependent scalar multiply-adds per row inside the loop below. */
    for (long i = 0; i < T; i++) {
        vf acc = {0};
        for (long c = 0; c < Dp; c += LANES)
            acc += vload(s->dout + i * Dp + c) * vload(s->r1 + i * Dp + c);
        s->l[i] = hsum(acc);
    }
    for (long i = 0; i < T; i++) {
        float *restrict p = s->p + i * Tp, *restrict ds = s->ds + i * Tp;
        exp_row(p, a->causal ? i + 1 : T, Tp, lse[i]);  /* P, from S and the forward's lse */
        const vf di = splat(s->l[i]);
        for (long j0 = 0; j0 < Tp; j0 += LANES)
            vstore(ds + j0, vload(p + j0) * (vload(ds + j0) - di));  /* 0 wherever p is */
    }
    for (long i = T; i < Tp; i++)  /* padding rows: no probability, no gradient */
        memset(s->p + i * Tp, 0, sizeof(float) * Tp), memset(s->ds + i * Tp, 0, sizeof(float) * Tp);
    matmul(s->r1, Dp, s->ds, Tp, 1, s->k, Dp, Tp, Dp, K, a->causal ? 2 : 0);     /* dS K */
    matmul(s->r2, Dp, s->ds, 1, Tp, s->q, Dp, Tp, Dp, K, a->causal ? 3 : 0);     /* dS^T (scale Q) */
    matmul(s->r3, Dp, s->p, 1, Tp, s->dout, Dp, Tp, Dp, K, a->causal ? 3 : 0);   /* P^T dO */
    store_rows(a->out, 3 * C, h * D, s->r1, s, b, a->scale, a->bf16);
    store_rows(a->out, 3 * C, C + h * D, s->r2, s, b, 1.0f, a->bf16);
    store_rows(a->out, 3 * C, 2 * C + h * D, s->r3, s, b, 1.0f, a->bf16);
}

/* y = softmax(scale * Q K^T (+ causal mask)) V and lse = each row's log-sum-exp of its scaled
   scores. Returns 0, or -1 if a thread's scratch could not be allocated. */
int attention_fwd(const void *restrict qkv, void *restrict y, float *restrict lse, long B, long T, long H, long D,
                  float scale, int causal, int bf16, int threads) {
    const Args a = {qkv, NULL, NULL, y, lse, B, T, H, D, scale, causal, bf16};
    return for_each_pair(&a, threads, fwd_pair);
}

/* dqkv from dy, given the forward's qkv, y and lse. Returns 0, or -1 if a thread's scratch could
   not be allocated. */
int attention_bwd(const void *restrict qkv, const void *restrict y, const void *restrict dy,
                  const float *restrict lse, void *restrict dqkv, long B, long T, long H, long D, float scale,
                  int causal, int bf16, int threads) {
    const Args a = {qkv, y, dy, dqkv, (float *)lse, B, T, H, D, scale, causal, bf16};
    return for_each_pair(&a, threads, bwd_pair);
}
