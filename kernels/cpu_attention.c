/* Decode attention on an x86-64 CPU with AVX2 and FMA, straight from a bf16 KV cache, with the
 * step's new key and value stored first: one call per layer and decode step.
 *
 * Why C: the numba kernel (cpu_decode.py) does the same arithmetic, but a call costs ~60 us before
 * it reads a key (argument typing, the parallel region's start, the partial results' arrays, the
 * wrapper's tensor ops): at 512 tokens of the default model that is half of each layer's attention
 * and 1.8 ms of a 13.4 ms step (BENCHMARKS.md). Here a call costs a few microseconds.
 *
 * Layout: cache k/v [R, Hkv, N, D] bf16 (their bits as uint16); q [B, H, D] bf16, the G = H / Hkv
 * query heads of KV head h being h G .. h G + G - 1; query row b reads cache row b, positions
 * lo[b, h] .. hi[b, h] - 1. The new keys and values k_new/v_new [B, Hkv, D] go to cache row
 * rows[b], position starts[b] (before any key is read, so the step's own token is attended).
 *
 * Arithmetic (fp32 throughout; the numbers of the plain-torch reference to fp32 rounding): the
 * visible tokens of each (row, KV head) are cut into splits that run in parallel (OpenMP) and merge
 * by their running max and sum (flash-decoding). A split takes BLOCK tokens at a time: their keys
 * are widened to fp32 once into a buffer that stays in L1 (bf16 is an fp32's high half: exact), the
 * G queries score them (eight tokens' sums reduced together, no horizontal sum per token), the
 * block's softmax update runs in base 2 (the queries are scaled by log2 e: one exp2 per score, a
 * polynomial, no libm call), and the G outputs take the values, widened as they are read, in
 * register tiles of up to 4 queries x 16 columns (values through a buffer: 10-15% slower).
 * A NaN anywhere in q, k or v reaches the output as NaN (the engine's check reports it).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"

#define MAX_GROUP 16 /* query heads per KV head */
#define MAX_DIM 256  /* head_dim, a multiple of 16 */
#define BLOCK 32     /* tokens per softmax update: their widened keys and values stay in L1 */
#define MIN_SPLIT 64 /* the fewest tokens a parallel task takes */
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define EXP2_FLOOR -126.0f /* 2^-126: fp32's smallest normal; lower scores count as that (their share is 0 to fp32) */

/* 2^x for x <= 0 (scores minus their max), to fp32 rounding: 2^x = 2^k 2^f, k = round(x), |f| <= 1/2,
 * 2^f by the Taylor series of e^(f ln 2) to degree 7 (error < 1e-8). A NaN stays NaN (max keeps its
 * second operand when one is NaN). */
static inline __m256 exp2_ps(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(EXP2_FLOOR), x);
    const __m256 k = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, k);
    __m256 p = _mm256_set1_ps(1.5252733804059840e-05f); /* (ln 2)^7 / 7! */
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381606e-04f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-02f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* acc[i, :] += sum_t p[i, t] v[at[t], :] (bf16 rows, widened as read) for GN (a constant where inlined: the tile stays in registers)
 * queries, p rows BLOCK apart. */
static inline __attribute__((always_inline)) void value_tiles(float *acc, const float *p, const uint16_t *v,
                                                              const int64_t *at, int n, int D, const int GN) {
    for (int c = 0; c < D; c += 16) {
        __m256 a[4][2];
        for (int i = 0; i < GN; i++) {
            a[i][0] = _mm256_loadu_ps(acc + i * D + c);
            a[i][1] = _mm256_loadu_ps(acc + i * D + c + 8);
        }
        for (int t = 0; t < n; t++) {
            const uint16_t *row = v + (size_t)at[t] * D + c;
            const __m256 v0 = widen8(row), v1 = widen8(row + 8);
            for (int i = 0; i < GN; i++) {
                const __m256 w = _mm256_broadcast_ss(p + i * BLOCK + t);
                a[i][0] = _mm256_fmadd_ps(w, v0, a[i][0]);
                a[i][1] = _mm256_fmadd_ps(w, v1, a[i][1]);
            }
        }
        for (int i = 0; i < GN; i++) {
            _mm256_storeu_ps(acc + i * D + c, a[i][0]);
            _mm256_storeu_ps(acc + i * D + c + 8, a[i][1]);
        }
    }
}

/* One task: the G queries qs [G, D] (scaled by softmax scale x log2 e) over the tokens p0 .. p1 - 1
 * of one (row, KV head)'s keys k and values v [N, D], or over the tokens ids[p0 .. p1 - 1] when ids is
 * not NULL (a sparse policy's selection; a negative id is skipped). Leaves the unnormalised output
 * acc [G, D], the running max mx [G] (base 2) and sum sm [G]. */
static void attend_split(const float *qs, const uint16_t *k, const uint16_t *v, const int32_t *ids, int64_t p0,
                         int64_t p1, int G, int D, float *acc, float *mx, float *sm) {
    float kw[BLOCK * MAX_DIM] __attribute__((aligned(32))); /* the block's keys, fp32 [BLOCK, D] */
    float sc[MAX_GROUP][BLOCK] __attribute__((aligned(32))); /* scores, then their exp2 */
    int64_t at[BLOCK];                                       /* the block's token ids */
    const int J = D / 8;
    const size_t row_bytes = sizeof(uint16_t) * (size_t)D;
    for (int g = 0; g < G; g++) {
        mx[g] = -INFINITY;
        sm[g] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * (size_t)G * D);
    for (int64_t u = p0; u < p1;) {
        int n = 0;
        if (!ids) {
            for (; n < BLOCK && u < p1; n++) at[n] = u++;
            if (u < p1) { /* the next block's first lines: the stream's start, before the prefetcher sees it */
                _mm_prefetch((const char *)(k + (size_t)u * D), _MM_HINT_T0);
                _mm_prefetch((const char *)(v + (size_t)u * D), _MM_HINT_T0);
            }
        } else {
            while (n < BLOCK && u < p1) {
                const int32_t t = ids[u++];
                if (t >= 0) at[n++] = t;
            }
            /* scattered rows: every line of the block's keys and values asked for at once, independent
             * loads the core keeps in flight together, before the first is waited on */
            for (int t = 0; t < n; t++)
                for (size_t line = 0; line < row_bytes; line += 64) {
                    _mm_prefetch((const char *)(k + (size_t)at[t] * D) + line, _MM_HINT_T0);
                    _mm_prefetch((const char *)(v + (size_t)at[t] * D) + line, _MM_HINT_T0);
                }
        }
        if (n == 0) continue;
        const int n8 = (n + 7) & ~7;
        for (int t = 0; t < n; t++)
            for (int j = 0; j < J; j++) {
                _mm256_store_ps(kw + t * D + 8 * j, widen8(k + (size_t)at[t] * D + 8 * j));
            }
        for (int t = n; t < n8; t++) memset(kw + t * D, 0, sizeof(float) * D); /* padding: scored, then dropped */
        for (int g = 0; g < G; g++) {
            const float *qg = qs + g * D;
            for (int t8 = 0; t8 < n8; t8 += 8) {
                __m256 a[8];
                for (int t = 0; t < 8; t++) a[t] = _mm256_setzero_ps();
                for (int j = 0; j < J; j++) {
                    const __m256 qj = _mm256_loadu_ps(qg + 8 * j);
                    for (int t = 0; t < 8; t++) a[t] = _mm256_fmadd_ps(qj, _mm256_load_ps(kw + (t8 + t) * D + 8 * j), a[t]);
                }
                _mm256_store_ps(sc[g] + t8, sum8x8(a));
            }
            float m = mx[g];
            for (int t = 0; t < n; t++) m = sc[g][t] > m ? sc[g][t] : m; /* a NaN score is skipped here: its exp2 is NaN */
            const float corr = exp2f(mx[g] - m); /* the old sums' share at the new max (0 on the first block) */
            const __m256 mv = _mm256_set1_ps(m);
            __m256 sum = _mm256_setzero_ps();
            for (int t8 = 0; t8 < n8; t8 += 8) {
                __m256 p = exp2_ps(_mm256_sub_ps(_mm256_load_ps(sc[g] + t8), mv));
                if (t8 + 8 > n) { /* the padding's lanes: no share */
                    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                    p = _mm256_and_ps(p, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n - t8), lane)));
                }
                _mm256_store_ps(sc[g] + t8, p);
                sum = _mm256_add_ps(sum, p);
            }
            const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
            const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            sm[g] = (mx[g] == -INFINITY ? 0.0f : sm[g] * corr) + _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
            if (mx[g] != -INFINITY) {
                const __m256 c = _mm256_set1_ps(corr);
                for (int j = 0; j < J; j++)
                    _mm256_storeu_ps(acc + g * D + 8 * j, _mm256_mul_ps(c, _mm256_loadu_ps(acc + g * D + 8 * j)));
            }
            mx[g] = m;
        }
        /* acc[g] += sum_t p[g, t] v[t]: tiles of 16 columns for up to 4 queries held in registers */
        for (int g0 = 0; g0 < G; g0 += 4) {
            switch (G - g0) {
                case 1: value_tiles(acc + g0 * D, sc[g0], v, at, n, D, 1); break;
                case 2: value_tiles(acc + g0 * D, sc[g0], v, at, n, D, 2); break;
                case 3: value_tiles(acc + g0 * D, sc[g0], v, at, n, D, 3); break;
                default: value_tiles(acc + g0 * D, sc[g0], v, at, n, D, 4); break;
            }
        }
    }
}

/* Store the new keys and values (k_new/v_new NULL: none), then attend (see the top of the file).
 * q [B, H, D], caches [R, Hkv, N, D], lo/hi [B, Hkv] int64, rows/starts [B] int64; ids NULL, or the
 * token ids [B, Hkv, M] int32 that lo..hi index (negative: skipped). est_out [B, H, D] and est_lse
 * [B, H] fp32 (NULL: none): a partial result over other tokens (a cluster index's estimate of what
 * its selection left out), merged by log-sum-exp before the output is rounded (est_lse -inf: none for
 * that query). Writes out [B, H, D] bf16 and lse [B, H] fp32 (natural log of the scaled scores'
 * exp-sum, as the numba kernel gives it; no token: out 0, lse -inf). Returns 0; -1 for shapes it does
 * not take; -2 out of memory; a positive count of new tokens, visible ranges or listed ids lying
 * outside the cache (nothing attended). */
int decode_attention_bf16(const uint16_t *q, const uint16_t *k_new, const uint16_t *v_new, const int64_t *rows,
                          const int64_t *starts, uint16_t *k_cache, uint16_t *v_cache, const int64_t *lo,
                          const int64_t *hi, const int32_t *ids, int M, int B, int H, int Hkv, int R, int N, int D,
                          float scale, int threads, uint16_t *out, float *lse, const float *est_out,
                          const float *est_lse) {
    if (B <= 0 || Hkv <= 0 || H % Hkv || H / Hkv > MAX_GROUP || D <= 0 || D % 16 || D > MAX_DIM || B > R ||
        threads <= 0 || (ids && M < 0))
        return -1;
    const int G = H / Hkv;
    const int64_t positions = ids ? M : N; /* what lo..hi index */
    int outside = 0;
    int64_t longest = 0;
    for (int b = 0; b < B; b++) {
        if (k_new && (rows[b] < 0 || rows[b] >= R || starts[b] < 0 || starts[b] >= N)) outside++;
        for (int h = 0; h < Hkv; h++) {
            const int64_t a = lo[(size_t)b * Hkv + h], z = hi[(size_t)b * Hkv + h];
            if (a < 0 || z > positions || a > z) {
                outside++;
                continue;
            }
            if (z - a > longest) longest = z - a;
            if (ids)
                for (int64_t p = a; p < z; p++) outside += ids[((size_t)b * Hkv + h) * M + p] >= N;
        }
    }
    if (outside) return outside;
    if (k_new)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < Hkv; h++) {
                const size_t at = (((size_t)rows[b] * Hkv + h) * N + (size_t)starts[b]) * D;
                memcpy(k_cache + at, k_new + ((size_t)b * Hkv + h) * D, sizeof(uint16_t) * D);
                memcpy(v_cache + at, v_new + ((size_t)b * Hkv + h) * D, sizeof(uint16_t) * D);
            }
    /* Splits per (row, KV head): the fewest that give every thread as many tasks, at least MIN_SPLIT tokens each. */
    const int pairs = B * Hkv;
    int S = 1;
    while ((pairs * S) % threads && S < threads) S++;
    if ((int64_t)S * MIN_SPLIT > longest) S = longest > MIN_SPLIT ? (int)(longest / MIN_SPLIT) : 1;
    const int64_t split = longest ? (longest + S - 1) / S : 1;
    const int tasks = pairs * S;
    float *qs = malloc(sizeof(float) * ((size_t)B * H * D + (size_t)tasks * G * (D + 2)));
    if (!qs) return -2;
    float *part = qs + (size_t)B * H * D; /* per task: acc [G, D], max [G], sum [G] */
    const float qscale = scale * LOG2E;
    for (size_t i = 0; i < (size_t)B * H * D; i++) qs[i] = bf16_to_f32(q[i]) * qscale;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && tasks > 1)
    for (int task = 0; task < tasks; task++) {
        const int b = task / (Hkv * S), h = (task / S) % Hkv, s = task % S;
        const int64_t a = lo[(size_t)b * Hkv + h], z = hi[(size_t)b * Hkv + h];
        const int64_t p0 = a + s * split, p1 = p0 + split < z ? p0 + split : z;
        float *acc = part + (size_t)task * G * (D + 2), *mx = acc + (size_t)G * D, *sm = mx + G;
        const size_t row = ((size_t)b * Hkv + h) * N * D;
        attend_split(qs + ((size_t)b * H + (size_t)h * G) * D, k_cache + row, v_cache + row,
                     ids ? ids + ((size_t)b * Hkv + h) * M : NULL, p0, p0 < p1 ? p1 : p0, G, D, acc, mx, sm);
    }
    for (int b = 0; b < B; b++)
        for (int h = 0; h < Hkv; h++)
            for (int g = 0; g < G; g++) {
                const float *first = part + ((size_t)(b * Hkv + h) * S) * G * (D + 2);
                const size_t qi = (size_t)b * H + (size_t)h * G + g; /* the query's place in q, out, lse */
                float m = -INFINITY, e2 = -INFINITY; /* e2: the estimate's lse, base 2 (one more split of sum 1) */
                int nan = 0;
                if (est_lse) {
                    nan |= est_lse[qi] != est_lse[qi];
                    if (est_lse[qi] > -INFINITY) e2 = m = est_lse[qi] * LOG2E;
                }
                for (int s = 0; s < S; s++) {
                    const float *at = first + (size_t)s * G * (D + 2) + (size_t)G * D;
                    nan |= at[g] != at[g] || at[G + g] != at[G + g];
                    if (at[g] > m) m = at[g];
                }
                float total = 0.0f, o[MAX_DIM];
                for (int d = 0; d < D; d++) o[d] = 0.0f;
                for (int s = 0; s < S; s++) {
                    const float *acc = first + (size_t)s * G * (D + 2);
                    const float ms = acc[(size_t)G * D + g];
                    if (ms == -INFINITY && acc[(size_t)G * D + G + g] == 0.0f) continue; /* an empty split */
                    const float w = nan ? NAN : exp2f(ms - m);
                    total += w * acc[(size_t)G * D + G + g];
                    for (int d = 0; d < D; d++) o[d] += w * acc[(size_t)g * D + d];
                }
                if (e2 > -INFINITY) { /* the estimate: its output is a mean already (weight 2^e2 in all) */
                    const float w = nan ? NAN : exp2f(e2 - m);
                    total += w;
                    for (int d = 0; d < D; d++) o[d] += w * est_out[qi * D + d];
                }
                uint16_t *dst = out + qi * D;
                const int none = total == 0.0f && !nan;
                for (int d = 0; d < D; d++) dst[d] = f32_to_bf16(none ? 0.0f : o[d] / total);
                lse[qi] = none ? -INFINITY : (nan ? NAN : (m + log2f(total)) * LN2);
            }
    free(qs);
    return 0;
}
