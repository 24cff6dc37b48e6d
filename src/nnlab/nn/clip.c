/* Gradient-norm clipping over all of a model's gradients in one call each way. Loaded by kernels.py;
   nnlab.train.optim.clip_grad_norm is the caller, torch.nn.utils.clip_grad_norm_ its reference.

   Why by hand: on CPU torch has no fused kernel for it (its foreach path is for GPUs), so
   clip_grad_norm_ runs a norm and then a multiply per parameter tensor. The baby GPT has 52: about
   0.7 ms of norms and 0.3 ms of multiplies per step in a profile of its compiled bf16 training step
   (~22 ms), for 0.8 M numbers, mostly per-call overhead. Here each pass is one call over all the
   tensors, split evenly between the threads by element count, not by tensor (sizes range from 128
   to 65,536 numbers).

   The n buffers are fp32 and contiguous: ptrs[i] holds sizes[i] floats. */
#include <omp.h>
#include <stdint.h>

/* This thread's share of the buffers laid end to end: elements [*lo, *hi) of the whole. */
static void my_share(const int64_t *sizes, long n, int64_t *lo, int64_t *hi) {
    int64_t total = 0;
    for (long i = 0; i < n; i++) total += sizes[i];
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    *lo = total * t / nt, *hi = total * (t + 1) / nt;
}

/* The part [*a, *b) of a buffer of `size` numbers, starting at element `base` of the whole, that
   lies in [lo, hi); 0 if none does. */
static inline int piece(int64_t base, int64_t size, int64_t lo, int64_t hi, int64_t *a, int64_t *b) {
    *a = lo > base ? lo - base : 0;
    *b = hi - base < size ? hi - base : size;
    return *a < *b;
}

/* The sum of the squares of every number in the buffers. Each block of 4,096 is summed in fp32 on
   vectors, and the blocks in double: closer to the exact sum than torch's per-tensor fp32 norms. */
double sumsq_many(float *const *ptrs, const int64_t *sizes, long n, int threads) {
    double sum = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : sum)
    {
        int64_t lo, hi, base = 0, a, b;
        my_share(sizes, n, &lo, &hi);
        for (long i = 0; i < n && base < hi; base += sizes[i++]) {
            if (!piece(base, sizes[i], lo, hi, &a, &b)) continue;
            const float *restrict x = ptrs[i];
            for (int64_t j0 = a; j0 < b; j0 += 4096) {
                const int64_t j1 = j0 + 4096 < b ? j0 + 4096 : b;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t j = j0; j < j1; j++) s += x[j] * x[j];
                sum += s;
            }
        }
    }
    return sum;
}

/* Every number in the buffers times c, in place. */
void scale_many(float *const *ptrs, const int64_t *sizes, long n, float c, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t lo, hi, base = 0, a, b;
        my_share(sizes, n, &lo, &hi);
        for (long i = 0; i < n && base < hi; base += sizes[i++]) {
            if (!piece(base, sizes[i], lo, hi, &a, &b)) continue;
            float *restrict x = ptrs[i];
#pragma omp simd
            for (int64_t j = a; j < b; j++) x[j] *= c;
        }
    }
}
