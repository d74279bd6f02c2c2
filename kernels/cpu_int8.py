"""CPU decode attention straight from an int8 KV cache (numba): the codes are never dequantized
into a working copy.

With a quantized KV, the torch path dequantizes every visible key and value into an fp32 buffer
(4 bytes written and read again per code byte) before two matmuls and a softmax: at 4K tokens that
is most of a decode step on this CPU. Here each key scores as ``scale_k[t] * (q . codes_k[t])``
and each value adds ``p[t] * scale_v[t] * codes_v[t]``, reading one byte per element once.

The visible tokens of a (row, KV head) are cut into splits that run in parallel (prange) and are
merged by their running max and sum (flash-decoding), so a single sequence with few KV heads
still uses every core. The G query heads of a KV head share each loaded key and value.

Shapes: B rows, Hkv KV heads, G query heads per KV head, N cached tokens, D head_dim.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

# Tokens per parallel task: long enough that a task's loop dwarfs its start-up, short enough
# that one row and a few KV heads spread over the cores.
MIN_SPLIT_TOKENS = 256
TASKS_PER_THREAD = 4
# Below any score: the running max of a split before its first key (finite, as fastmath assumes).
NO_SCORE = np.float32(-3.0e38)


@njit(cache=True, parallel=True, fastmath=True)
def int8_decode_attention(q, k_codes, k_scale, v_codes, v_scale, lo, hi, split, softmax_scale, out, lse):
    """q [B, Hkv, G, D] f32; k_codes/v_codes [B, Hkv, N, D] int8 (any strides, unit stride in D);
    k_scale/v_scale [B, Hkv, N] f32; row b sees tokens lo[b]..hi[b]-1 (hi > lo); ``split``
    tokens per task. Writes out [B, Hkv, G, D] f32 and the log-sum-exp of the scaled scores,
    lse [B, Hkv, G] f32 (partial results merge exactly by it)."""
    B, Hkv, G, D = q.shape
    longest = 0
    for b in range(B):
        longest = max(longest, hi[b] - lo[b])
    S = (longest + split - 1) // split
    part_acc = np.zeros((B, Hkv, S, G, D), np.float32)
    part_max = np.full((B, Hkv, S, G), NO_SCORE, np.float32)
    part_sum = np.zeros((B, Hkv, S, G), np.float32)
    for task in prange(B * Hkv * S):
        b = task // (Hkv * S)
        h = (task // S) % Hkv
        s = task % S
        t0 = lo[b] + s * split
        t1 = min(hi[b], t0 + split)
        if t0 >= t1:
            continue
        scores = np.empty((G, t1 - t0), np.float32)
        for t in range(t0, t1):
            ks = k_scale[b, h, t] * softmax_scale
            for g in range(G):
                dot = np.float32(0.0)
                for d in range(D):
                    dot += q[b, h, g, d] * np.float32(k_codes[b, h, t, d])
                scores[g, t - t0] = dot * ks
        for g in range(G):
            m = scores[g, 0]
            for i in range(1, t1 - t0):
                m = max(m, scores[g, i])
            total = np.float32(0.0)
            for i in range(t1 - t0):
                p = np.exp(scores[g, i] - m)
                scores[g, i] = p
                total += p
            part_max[b, h, s, g] = m
            part_sum[b, h, s, g] = total
        for t in range(t0, t1):
            vs = v_scale[b, h, t]
            for g in range(G):
                w = scores[g, t - t0] * vs
                for d in range(D):
                    part_acc[b, h, s, g, d] += w * np.float32(v_codes[b, h, t, d])
    for b in range(B):  # merge the splits: exact, by their running max
        for h in range(Hkv):
            for g in range(G):
                m = NO_SCORE
                for s in range(S):
                    m = max(m, part_max[b, h, s, g])
                total = np.float32(0.0)
                for d in range(D):
                    out[b, h, g, d] = 0.0
                for s in range(S):
                    if part_sum[b, h, s, g] == 0.0:
                        continue
                    c = np.exp(part_max[b, h, s, g] - m)
                    total += c * part_sum[b, h, s, g]
                    for d in range(D):
                        out[b, h, g, d] += c * part_acc[b, h, s, g, d]
                for d in range(D):
                    out[b, h, g, d] /= total
                lse[b, h, g] = m + np.log(total)


def split_tokens(longest: int, tasks: int, threads: int) -> int:
    """Tokens per parallel task for ``tasks`` (row, KV head) pairs of up to ``longest`` tokens."""
    splits_wanted = max(1, -(-threads * TASKS_PER_THREAD // tasks))
    return max(MIN_SPLIT_TOKENS, -(-longest // splits_wanted))


def set_threads(threads: int) -> None:
    """Run numba's parallel loops on as many threads as torch uses (at most numba's pool)."""
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
