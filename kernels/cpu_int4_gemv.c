/* int4 products of a few rows (decode steps) on an x86-64 CPU with AVX2 and FMA, on the weight as
 * torch's CPU int4 packer lays it out (offload/kernels/int4_pack.py learns that layout per process).
 *
 * Layout read here: the weight W [N, K] in blocks of BR output rows (32 on AVX2, 64 on AVX-512), each
 * block's bytes laid [K, BR / 2]; byte d of input column k holds rows d (low nibble) and BR / 2 + d
 * (high nibble) of the block. Scales and zeros: bf16 [G, N, 2], W[n, k] = (q - 8) * scale + zero for
 * the group k / group of row n.
 *
 * Why not torch's kernel: it widens each code to fp32 and applies the scale and zero per weight, so
 * on a 2-core AVX2 EPYC it reaches ~12 G weights/s, bound by arithmetic, not memory (BENCHMARKS.md).
 * Here a block of BR rows keeps BR fp32 sums in registers; each input column adds its BR codes times
 * the column's input, and the scale and zero are applied once per group of 32 columns:
 *     y[n] = sum_g scale[g, n] * sum_{k in g} q[n, k] x[k] + (zero[g, n] - 8 scale[g, n]) * sum_{k in g} x[k]
 * which is the same sum in another order (fp32 throughout, as torch's kernel).
 *
 * Inputs and outputs are bf16 (their bits as uint16): the output rounded to nearest even, as torch
 * rounds. Threads: OpenMP, over blocks of rows; the library is linked to the libgomp torch uses in
 * this process (offload/openmp.py makes it the system's), so both share one pool.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"

#define MID 8.0f

/* Lanes of one 32-bit word of a column's bytes (bytes 4i .. 4i + 3, i = the word): the shifts put
 * the low nibbles (rows 4i .. 4i + 3 of the block) in lanes 0-3 and the high ones (rows W + 4i ..
 * W + 4i + 3, W = BR / 2) in lanes 4-7, so accumulator i holds those rows in order. */
#define LANE_SHIFTS _mm256_setr_epi32(0, 8, 16, 24, 4, 12, 20, 28)

/* (scale, zero - 8 scale) of rows r .. r + 3 and w .. w + 3 of group g, in accumulator order; sz pairs
 * are (scale, zero) bf16 bits, read as one uint32 each (scale in the low half). */
static inline void scale_shift(const uint16_t *gsz, int r, int w, __m256 *scale, __m256 *shift) {
    const __m256i pairs = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(gsz + 2 * w)),
                                           _mm_loadu_si128((const __m128i *)(gsz + 2 * r)));
    *scale = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32((int)0xffff0000u)));
    *shift = _mm256_fnmadd_ps(_mm256_set1_ps(MID), *scale, zero);
}

/* One block of BR = 8 * NW rows (NW = 4: 32 rows, 8: 64 rows) for R input rows at once (each
 * word of codes unpacked once for all R): outs[r] [BR] fp32 in row order. xrows[r] fp32 [K], xsums[r]
 * [G] its group sums; sz the weight's [G, N, 2] pairs. One row of a 32-row block keeps two sets of
 * sums (even and odd columns): four chains of dependent FMAs alone would wait on the FMA's latency;
 * two rows give eight chains. The scales of the block PREFETCH_BLOCKS on are fetched ahead: they lie
 * N pairs apart per group, one cache line pair a group, which the hardware prefetcher does not follow
 * (an 8B model's 28672 x 4096 product: 13.4 -> 5.6 ms on the EPYC). */
#define PREFETCH_BLOCKS 2
#define DEFINE_BLOCK(NAME, NW, SETS, R)                                                            \
    static void NAME(const uint8_t *block, const uint16_t *sz, const float *const *xrows,         \
                     const float *const *xsums, int N, int K, int group, int first, int prefetch, \
                     float *const *outs) {                                                         \
        const int width = 4 * (NW); /* bytes per column: BR / 2 */                                 \
        const __m256i shifts = LANE_SHIFTS, nibble = _mm256_set1_epi32(0xf);                       \
        __m256 y[R][NW];                                                                           \
        for (int r = 0; r < (R); r++)                                                              \
            for (int i = 0; i < (NW); i++) y[r][i] = _mm256_setzero_ps();                          \
        const int G = K / group;                                                                   \
        for (int g = 0; g < G; g++) {                                                              \
            const uint16_t *gsz = sz + ((size_t)g * N + first) * 2;                                \
            if (prefetch) {                                                                        \
                const char *ahead = (const char *)(gsz + (size_t)PREFETCH_BLOCKS * 8 * (NW) * 2);  \
                for (int line = 0; line < 8 * (NW) * 4; line += 64)                               \
                    _mm_prefetch(ahead + line, _MM_HINT_T0);                                      \
            }                                                                                      \
            __m256 acc[R][SETS][NW];                                                               \
            for (int r = 0; r < (R); r++)                                                          \
                for (int s = 0; s < (SETS); s++)                                                   \
                    for (int i = 0; i < (NW); i++) acc[r][s][i] = _mm256_setzero_ps();             \
            const uint32_t *col = (const uint32_t *)(block + (size_t)g * group * width);           \
            const size_t g0 = (size_t)g * group;                                                   \
            for (int k = 0; k < group; k += (SETS)) {                                              \
                for (int s = 0; s < (SETS); s++) {                                                 \
                    __m256 xk[R];                                                                  \
                    for (int r = 0; r < (R); r++) xk[r] = _mm256_broadcast_ss(xrows[r] + g0 + k + s); \
                    const uint32_t *words = col + (size_t)(k + s) * (NW);                          \
                    for (int i = 0; i < (NW); i++) {                                               \
                        const __m256i w = _mm256_set1_epi32((int)words[i]);                        \
                        const __m256 q = _mm256_cvtepi32_ps(                                       \
                            _mm256_and_si256(_mm256_srlv_epi32(w, shifts), nibble));              \
                        for (int r = 0; r < (R); r++) acc[r][s][i] = _mm256_fmadd_ps(q, xk[r], acc[r][s][i]); \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            for (int i = 0; i < (NW); i++) {                                                       \
                __m256 scale, shift;                                                               \
                scale_shift(gsz, 4 * i, width + 4 * i, &scale, &shift);                            \
                for (int r = 0; r < (R); r++) {                                                    \
                    __m256 sum = acc[r][0][i];                                                     \
                    for (int s = 1; s < (SETS); s++) sum = _mm256_add_ps(sum, acc[r][s][i]);       \
                    y[r][i] = _mm256_fmadd_ps(scale, sum, y[r][i]);                                \
                    y[r][i] = _mm256_fmadd_ps(shift, _mm256_set1_ps(xsums[r][g]), y[r][i]);        \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < (R); r++)                                                              \
            for (int i = 0; i < (NW); i++) {                                                       \
                _mm_storeu_ps(outs[r] + 4 * i, _mm256_castps256_ps128(y[r][i]));                   \
                _mm_storeu_ps(outs[r] + width + 4 * i, _mm256_extractf128_ps(y[r][i], 1));         \
            }                                                                                      \
    }

DEFINE_BLOCK(rows32_one, 4, 2, 1)
DEFINE_BLOCK(rows32_two, 4, 1, 2) /* 8 + 8 registers would spill: 64-row blocks go a row at a time */
DEFINE_BLOCK(rows64_one, 8, 1, 1)

/* out [M, N] (bf16 bits) = x [M, K] (bf16 bits) @ W^T. N a multiple of block_rows (32 or 64), K of
 * group. Each block of rows is read once for all M input rows (it stays in L1/L2 while they pass); a
 * 32-row block takes them two at a time, each word of codes unpacked once for both.
 * Returns 0, or -1 for a shape it does not take, -2 when out of memory (nothing written). */
int int4_gemv(const uint8_t *packed, const uint16_t *scales_zeros, const uint16_t *x, uint16_t *out,
              int M, int N, int K, int group, int block_rows, int threads) {
    if ((block_rows != 32 && block_rows != 64) || N % block_rows || group <= 0 || group % 2 || K % group ||
        M <= 0 || threads <= 0)
        return -1;
    const int G = K / group;
    const int blocks = N / block_rows;
    float *xf = malloc(sizeof(float) * ((size_t)M * K + (size_t)M * G)); /* [M, K] then sums [M, G] */
    if (!xf) return -2;
    float *xsum = xf + (size_t)M * K;
    for (size_t i = 0; i < (size_t)M * K; i++) xf[i] = bf16_to_f32(x[i]);
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            float s = 0.0f;
            for (int k = g * group; k < (g + 1) * group; k++) s += xf[(size_t)m * K + k];
            xsum[(size_t)m * G + g] = s;
        }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > 1)
    for (int b = 0; b < blocks; b++) {
        float rows[2][64] = {{0}};
        float *outs[2] = {rows[0], rows[1]};
        const int first = b * block_rows;
        const uint8_t *block = packed + (size_t)first * (K / 2);
        const int prefetch = b + PREFETCH_BLOCKS < blocks; /* (never past the scales' end) */
        for (int m = 0; m < M;) {
            const float *xm[2] = {xf + (size_t)m * K, xf + (size_t)(m + 1) * K};
            const float *sm[2] = {xsum + (size_t)m * G, xsum + (size_t)(m + 1) * G};
            int taken = 1;
            if (block_rows == 64)
                rows64_one(block, scales_zeros, xm, sm, N, K, group, first, prefetch && m == 0, outs);
            else if (m + 1 < M) {
                rows32_two(block, scales_zeros, xm, sm, N, K, group, first, prefetch && m == 0, outs);
                taken = 2;
            } else
                rows32_one(block, scales_zeros, xm, sm, N, K, group, first, prefetch && m == 0, outs);
            for (int t = 0; t < taken; t++) {
                uint16_t *out_m = out + (size_t)(m + t) * N;
                for (int r = 0; r < block_rows; r++) out_m[first + r] = f32_to_bf16(rows[t][r]);
            }
            m += taken;
        }
    }
    free(xf);
    return 0;
}
