"""CPU decode attention straight from KIVI's packed 2-bit / 4-bit KV (numba).

Through torch, a KIVI layer's read unpacks every code into a uint8 tensor, widens it, multiplies
and adds its scales in separate passes and only then attends (about 60 bytes written and read per
byte of codes). Here each token's key and value are unpacked into an fp32 row that stays in L1
(code x scale + minimum: the key's per channel of its group of tokens, the value's per channel
group of its token) and used at once, as :mod:`offload.kernels.cpu_decode` does for int8 codes; the
splits of a (row, KV head) run in parallel and merge by their running max and sum.

The tokens a KIVI cache keeps in the compute dtype (sinks, residual) are one more task of each
(row, KV head), merged with the rest like any split: a layer's decode attention is one call.

Shapes: B rows, Hkv KV heads, G query heads per KV head, N tokens, D head_dim, P = D * bits / 8
packed bytes, K key groups (N / group), C value channel groups.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .cpu_decode import (
    BLOCK_TOKENS,
    NO_SCORE,
    accumulate_row,
    merge_splits,
    narrow_row,
    score_row,
    softmax_block,
)


def _widen(src, b, h, i, dst, dst_bits):
    """dst [n] f32 <- src[b, h, i, :n]: bf16 bits (uint16) shifted into an fp32's high half
    (``dst_bits`` is ``dst`` viewed as uint32), or fp32 copied. The plain-numpy form; the kernel
    compiles the form for the scales' dtype (:func:`_widen_forms`)."""
    if src.dtype == np.uint16:
        dst_bits[:] = src[b, h, i].astype(np.uint32) << 16
    else:
        dst[:] = src[b, h, i]


@overload(_widen, inline="always")
def _widen_forms(src, b, h, i, dst, dst_bits):  # pragma: no cover - numba
    if src.dtype == types.uint16:
        def widen(src, b, h, i, dst, dst_bits):
            for d in range(dst.shape[0]):
                dst_bits[d] = np.uint32(src[b, h, i, d]) << np.uint32(16)
    else:
        def widen(src, b, h, i, dst, dst_bits):
            for d in range(dst.shape[0]):
                dst[d] = src[b, h, i, d]
    return widen


@njit(inline="always")
def _unpack_row(codes, b, h, t, bits, row):  # pragma: no cover - numba
    """row [D] <- the codes of token t as fp32: packed in planes (offload.tiers.kv_kivi.KiviFormat.pack),
    channel i * P + j in bits i*bits.. of byte j, so each plane is one shift and mask over P bytes."""
    packed = codes[b, h, t]
    P = packed.shape[0]
    top = np.int32((1 << bits) - 1)
    for i in range(row.shape[0] // P):
        shift = np.int32(i * bits)
        plane = row[i * P:(i + 1) * P]
        for j in range(P):
            plane[j] = np.float32((np.int32(packed[j]) >> shift) & top)


@njit(cache=True, parallel=True, fastmath=True)
def kivi_decode_attention(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_kept, v_kept, group, bits, bounds,
                          split, softmax_scale, out, lse):  # pragma: no cover - numba
    """q [B, Hkv, G, D] f32; k_codes/v_codes [B, Hkv, N, P] uint8 (``bits`` per code); k_scale/k_min
    [B, Hkv, K, D] (per key group of ``group`` tokens and channel), v_scale/v_min [B, Hkv, N, C] (per
    token and channel group); k_kept/v_kept [B, Hkv, F, D] the rows kept unquantized; all floats fp32
    or bf16 bits as uint16. (row b, KV head h) attends codes bounds[b, h, 0]..bounds[b, h, 1]-1 and
    kept rows bounds[b, h, 2]..[3]-1 and [4]..[5]-1 ([B, Hkv, 6] int64), ``split`` codes per task
    and one task for the kept rows. Writes out [B, Hkv, G, D] f32 and the log-sum-exp of the scaled
    scores lse [B, Hkv, G] (no token: out 0, lse -inf). Returns how many (row, head) bounds lie
    outside the codes or the kept rows (those attend nothing; the caller raises)."""
    B, Hkv, G, D = q.shape
    N, F = k_codes.shape[2], k_kept.shape[2]
    C = v_scale.shape[3]
    width = D // C  # channels per value group
    longest, outside = 0, 0
    for b in range(B):
        for h in range(Hkv):
            c0, c1, s0, s1, r0, r1 = bounds[b, h]
            if not (0 <= c0 <= c1 <= N and 0 <= s0 <= s1 <= F and 0 <= r0 <= r1 <= F):
                outside += 1
                bounds[b, h] = 0
            longest = max(longest, bounds[b, h, 1] - bounds[b, h, 0])
    S = max(1, (longest + split - 1) // split) + 1  # the last task of a (row, head): its kept rows
    part_acc = np.zeros((B, Hkv, S, G, D), np.float32)
    part_max = np.full((B, Hkv, S, G), NO_SCORE, np.float32)
    part_sum = np.zeros((B, Hkv, S, G), np.float32)
    for task in prange(B * Hkv * S):
        b, h, s = task // (Hkv * S), (task // S) % Hkv, task % S
        row_bits = np.empty(D, np.uint32)  # one widened key or value, in L1
        row = row_bits.view(np.float32)
        scores = np.empty((G, BLOCK_TOKENS), np.float32)
        exp_bits = np.empty(BLOCK_TOKENS, np.int32)
        acc, run_max, run_sum = part_acc[b, h, s], part_max[b, h, s], part_sum[b, h, s]
        if s == S - 1:  # the kept rows, in the compute dtype
            for a0, a1 in ((bounds[b, h, 2], bounds[b, h, 3]), (bounds[b, h, 4], bounds[b, h, 5])):
                for u0 in range(a0, a1, BLOCK_TOKENS):
                    n = min(a1, u0 + BLOCK_TOKENS) - u0
                    for i in range(n):
                        _widen(k_kept, b, h, u0 + i, row, row_bits)
                        score_row(q, b, h, row, scores, i, softmax_scale)
                    softmax_block(scores, n, acc, run_max, run_sum, exp_bits)
                    for i in range(n):
                        _widen(v_kept, b, h, u0 + i, row, row_bits)
                        accumulate_row(acc, scores, i, row)
            continue
        p0 = bounds[b, h, 0] + s * split
        p1 = min(bounds[b, h, 1], p0 + split)
        # the current key group's scale and minimum, widened once per group; a token's value
        # scales and minima, widened once per token
        scale_bits = np.empty(2 * D, np.uint32)
        key_scale, key_min = scale_bits[:D].view(np.float32), scale_bits[D:].view(np.float32)
        value_bits = np.empty(2 * C, np.uint32)
        value_scale, value_min = value_bits[:C].view(np.float32), value_bits[C:].view(np.float32)
        key_group = -1
        # a key group's scores: sum_d q[d] (code[d] scale[d] + min[d]) = sum_d (q scale)[d] code[d] + q . min
        q_scaled = np.empty((G, D), np.float32)
        q_min = np.empty(G, np.float32)
        for u0 in range(p0, p1, BLOCK_TOKENS):  # flash-attention's update, a block at a time
            n = min(p1, u0 + BLOCK_TOKENS) - u0
            for i in range(n):
                t = u0 + i
                if t // group != key_group:
                    key_group = t // group
                    _widen(k_scale, b, h, key_group, key_scale, scale_bits[:D])
                    _widen(k_min, b, h, key_group, key_min, scale_bits[D:])
                    for g in range(G):
                        dot = np.float32(0.0)
                        for d in range(D):
                            q_scaled[g, d] = q[b, h, g, d] * key_scale[d]
                            dot += q[b, h, g, d] * key_min[d]
                        q_min[g] = dot
                _unpack_row(k_codes, b, h, t, bits, row)
                for g in range(G):
                    dot = q_min[g]
                    for d in range(D):
                        dot += q_scaled[g, d] * row[d]
                    scores[g, i] = dot * softmax_scale
            softmax_block(scores, n, acc, run_max, run_sum, exp_bits)
            for i in range(n):
                t = u0 + i
                _unpack_row(v_codes, b, h, t, bits, row)
                _widen(v_scale, b, h, t, value_scale, value_bits[:C])
                _widen(v_min, b, h, t, value_min, value_bits[C:])
                for c in range(C):
                    sc, mn = value_scale[c], value_min[c]
                    seg = row[c * width:(c + 1) * width]
                    for d in range(width):
                        seg[d] = seg[d] * sc + mn
                accumulate_row(acc, scores, i, row)
    merge_splits(part_acc, part_max, part_sum, out, lse)
    return outside


@njit(inline="always")
def _key_row(k_codes, row, h, t, bits, scale, low, values):  # pragma: no cover - numba
    """values [D] <- token t's key from its codes and its group's scale and minimum (widened)."""
    _unpack_row(k_codes, row, h, t, bits, values)
    for d in range(values.shape[0]):
        values[d] = values[d] * scale[d] + low[d]


@njit(inline="always")
def _value_row(v_codes, v_scale, v_min, row, h, t, bits, value_bits, values):  # pragma: no cover - numba
    """values [D] <- token t's value from its codes and its channel groups' scales and minima
    (``value_bits`` a scratch of 2C words)."""
    C = v_scale.shape[3]
    width = values.shape[0] // C
    value_scale, value_min = value_bits[:C].view(np.float32), value_bits[C:].view(np.float32)
    _unpack_row(v_codes, row, h, t, bits, values)
    _widen(v_scale, row, h, t, value_scale, value_bits[:C])
    _widen(v_min, row, h, t, value_min, value_bits[C:])
    for c in range(C):
        sc, mn = value_scale[c], value_min[c]
        for d in range(c * width, (c + 1) * width):
            values[d] = values[d] * sc + mn


@njit(cache=True, parallel=True)
def kivi_unpack_range(k_codes, k_scale, k_min, v_codes, v_scale, v_min, row, start, group, bits, split, out_k,
                      out_v):  # pragma: no cover - numba
    """out_k/out_v [Hkv, M, D] (fp32, or bf16 bits as uint16) <- the keys and values of tokens
    start..start+M-1 of cache row ``row``, from their codes (arrays as
    :func:`kivi_decode_attention` takes them): code x scale + minimum in fp32, rounded once to
    out's dtype (no fastmath: no fused multiply-add, so torch's fp32 operations give the same
    bits). ``split`` tokens per parallel task."""
    Hkv, M, D = out_k.shape
    C = v_scale.shape[3]
    S = max(1, (M + split - 1) // split)
    for task in prange(Hkv * S):
        h, s = task // S, task % S
        row_bits = np.empty(D, np.uint32)
        values = row_bits.view(np.float32)
        scale_bits = np.empty(2 * D, np.uint32)
        scale, low = scale_bits[:D].view(np.float32), scale_bits[D:].view(np.float32)
        value_bits = np.empty(2 * C, np.uint32)
        key_group = -1
        for i in range(s * split, min(M, (s + 1) * split)):
            t = start + i
            if t // group != key_group:  # a group's scale and minimum widened once
                key_group = t // group
                _widen(k_scale, row, h, key_group, scale, scale_bits[:D])
                _widen(k_min, row, h, key_group, low, scale_bits[D:])
            _key_row(k_codes, row, h, t, bits, scale, low, values)
            narrow_row(out_k, h, i, values, row_bits)
            _value_row(v_codes, v_scale, v_min, row, h, t, bits, value_bits, values)
            narrow_row(out_v, h, i, values, row_bits)


@njit(cache=True, parallel=True)
def kivi_take(k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_kept, v_kept, row, ids, group, bits, sinks,
              residual_at, done, out_k, out_v):  # pragma: no cover - numba
    """out_k/out_v [Hkv, M, D] (fp32, or bf16 bits as uint16) <- the keys and values of tokens
    ids[h, m] ([Hkv, M] int64, each head its own) of cache row ``row``: a token below ``sinks`` is
    read from kept row t, a token from ``done`` on from kept row residual_at + t - done (the
    residual; none past the kept rows: 0), any other from its codes (code x scale + minimum in
    fp32, rounded once, as :func:`kivi_unpack_range`). Returns how many ids lie outside 0..N-1
    (read as 0; the caller raises)."""
    Hkv, M, D = out_k.shape
    N, F = k_codes.shape[2], k_kept.shape[2]
    C = v_scale.shape[3]
    outside = np.zeros(Hkv, np.int64)
    for h in prange(Hkv):
        row_bits = np.empty(D, np.uint32)
        values = row_bits.view(np.float32)
        scale_bits = np.empty(2 * D, np.uint32)
        scale, low = scale_bits[:D].view(np.float32), scale_bits[D:].view(np.float32)
        value_bits = np.empty(2 * C, np.uint32)
        for m in range(M):
            t = ids[h, m]
            at = t if t < sinks else residual_at + t - done  # its kept row, when it has one
            if t < 0 or t >= N or ((t < sinks or t >= done) and at >= F):  # outside, or past the row
                outside[h] += t < 0 or t >= N
                values[:] = 0.0
                narrow_row(out_k, h, m, values, row_bits)
                narrow_row(out_v, h, m, values, row_bits)
            elif t < sinks or t >= done:  # kept in the compute dtype
                _widen(k_kept, row, h, at, values, row_bits)
                narrow_row(out_k, h, m, values, row_bits)
                _widen(v_kept, row, h, at, values, row_bits)
                narrow_row(out_v, h, m, values, row_bits)
            else:
                _widen(k_scale, row, h, t // group, scale, scale_bits[:D])
                _widen(k_min, row, h, t // group, low, scale_bits[D:])
                _key_row(k_codes, row, h, t, bits, scale, low, values)
                narrow_row(out_k, h, m, values, row_bits)
                _value_row(v_codes, v_scale, v_min, row, h, t, bits, value_bits, values)
                narrow_row(out_v, h, m, values, row_bits)
    return outside.sum()
