/* int8 products of a few rows (decode steps) on an x86-64 CPU with AVX2 and FMA: the weight in
 * int8 codes [N, K] with an fp32 scale per group of K / G input columns of each output row
 * (GGUF's Q8_0 layout, offload.quant.Int8Weight), x fp32 [M, K], out fp32 [M, N]:
 *     out[m, n] = sum_g scales[n, g] * sum_{k in g} codes[n, k] x[m, k]
 * Why C: the default model's LM head (49152 x 576, 28 MB of codes) is the largest product of its
 * decode step; it is bound by reading the codes, and the numba kernel read them at ~11 GB/s on the
 * 2-core EPYC, where this one keeps up with the memory (BENCHMARKS.md). Eight output rows at a time:
 * each row's group sums are scaled into one vector of partial sums, and the eight rows' vectors are
 * reduced together (no horizontal sum per row). OpenMP over blocks of eight rows. */
#include <immintrin.h>
#include <stdint.h>

#include "cpu_simd.h"

#define ROWS 8

/* The partial-sum vector of one output row for one input row. */
static inline __m256 row_sums(const int8_t *codes, const float *scales, const float *x, int G, int group) {
    __m256 y = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        const int8_t *c = codes + (size_t)g * group;
        const float *xg = x + (size_t)g * group;
        __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
        int k = 0;
        for (; k + 16 <= group; k += 16) {
            const __m128i w = _mm_loadu_si128((const __m128i *)(c + k));
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w)), _mm256_loadu_ps(xg + k), a);
            b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(w, w))),
                                _mm256_loadu_ps(xg + k + 8), b);
        }
        if (k < group) /* a group of 8 (mod 16) columns */
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(c + k)))),
                                _mm256_loadu_ps(xg + k), a);
        y = _mm256_fmadd_ps(_mm256_set1_ps(scales[g]), _mm256_add_ps(a, b), y);
    }
    return y;
}

/* Returns 0, or -1 for a shape it does not take (K / G not a multiple of 8). */
int int8_gemv(const int8_t *codes, const float *scales, const float *x, float *out, int M, int N, int K, int G,
              int threads) {
    if (M <= 0 || N <= 0 || G <= 0 || K % G || (K / G) % 8 || threads <= 0) return -1;
    const int group = K / G;
    const int blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > 1)
    for (int blk = 0; blk < blocks; blk++) {
        const int n0 = blk * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
        for (int m = 0; m < M; m++) {
            const float *xm = x + (size_t)m * K;
            __m256 y[ROWS];
            for (int r = 0; r < ROWS; r++)
                y[r] = r < rows ? row_sums(codes + (size_t)(n0 + r) * K, scales + (size_t)(n0 + r) * G, xm, G, group)
                                : _mm256_setzero_ps();
            float sums[ROWS];
            _mm256_storeu_ps(sums, sum8x8(y));
            for (int r = 0; r < rows; r++) out[(size_t)m * N + n0 + r] = sums[r];
        }
    }
    return 0;
}
