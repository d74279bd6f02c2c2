"""numba kernels for weights held as int8 codes in groups (``quantize="int8"``), on the CPU, and the
unpacking of int4 weights (``quantize="int4"``) for products of many rows.

A weight W [N, K] is held as codes int8 [N, K] and one fp32 scale per group of ``K / G``
consecutive input columns of each output row: W[n, k] = codes[n, k] * scales[n, k // group]
(GGUF's Q8_0 is this layout at group 32 with fp16 scales, which fp32 holds exactly). torch has no
kernel for grouped int8 (``_weight_int8pack_mm`` takes one scale per row), and these loops, which
LLVM vectorizes along the group (8 codes widened per AVX2 op), measured faster than torch's
per-row int8 kernel for the small matrices of a 135M model and within 20% of it at 4096 x 4096
(BENCHMARKS.md). Compiled on first use and cached on disk (``cache=True``).

Shapes: N output features, K input features, G groups per row, M input rows.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .cpu_decode import bf16_round_bits
from .reference import INT4_MID

# The product walks its rows in blocks and first touches one byte per cache line of the block
# TOUCH_AHEAD_BLOCKS on: independent loads the core keeps in flight while it computes, where the
# hardware prefetcher alone left the product waiting on memory. The default model's LM head
# (49152 x 576, 31.5 MB) read cold, 2 threads on the 2-core Xeon: 4.0 -> 2.6 ms (warm: 1.3 ms both).
TOUCH_BLOCK_ROWS = 32
TOUCH_AHEAD_BLOCKS = 2
LINE_BYTES = 64


@njit(cache=True, parallel=True, fastmath=True)
def int8_group_matmul(codes, scales, x, out, tasks):  # pragma: no cover - compiled
    """out [M, N] = x [M, K] @ W^T for W = codes [N, K] int8 * scales [N, G] fp32 (per group).
    Returns what the touching loads summed to (nothing to use; it keeps them from being dropped).

    Each output row of W is computed whole: its K codes stay in L1 while the M input rows pass over
    them, so a few rows (decode, a short prompt) read the weight once. Each of ``tasks`` takes a
    contiguous range of row blocks (:func:`_int8_rows`)."""
    N = codes.shape[0]
    blocks = (N + TOUCH_BLOCK_ROWS - 1) // TOUCH_BLOCK_ROWS
    tasks = max(1, min(blocks, tasks))
    per_task = (blocks + tasks - 1) // tasks
    sink = np.zeros(tasks, np.float64)
    for task in prange(tasks):
        sink[task] = _int8_rows(codes, scales, x, out, task * per_task, min(blocks, (task + 1) * per_task))
    return sink.sum()


@njit(cache=True, fastmath=True)
def _int8_rows(codes, scales, x, out, first, last):  # pragma: no cover - compiled
    """Row blocks first..last-1 of :func:`int8_group_matmul`, a block at a time, the lines of the block
    TOUCH_AHEAD_BLOCKS on touched first. Returns the touched bytes' sum."""
    N, K = codes.shape
    G = scales.shape[1]
    group = K // G
    M = x.shape[0]
    touched = 0.0
    for block in range(first, last):
        ahead = block + TOUCH_AHEAD_BLOCKS
        if ahead < last:
            for n in range(ahead * TOUCH_BLOCK_ROWS, min(N, (ahead + 1) * TOUCH_BLOCK_ROWS)):
                for i in range(0, K, LINE_BYTES):
                    touched += codes[n, i]
                touched += scales[n, 0]
        for n in range(block * TOUCH_BLOCK_ROWS, min(N, (block + 1) * TOUCH_BLOCK_ROWS)):
            for m in range(M):
                acc = np.float32(0.0)
                for g in range(G):
                    base = g * group
                    dot = np.float32(0.0)
                    for i in range(group):
                        dot += np.float32(codes[n, base + i]) * x[m, base + i]
                    acc += scales[n, g] * dot
                out[m, n] = acc
    return touched


@njit(cache=True, parallel=True)
def int8_group_dequantize(codes, scales, out):  # pragma: no cover - compiled
    """out [N, K] = codes [N, K] * scales [N, G] (each scale over its group of K / G columns), in
    fp32, or as bf16 bits (uint16 ``out``: rounded to nearest even, for a bf16 GEMM)."""
    N, K = codes.shape
    G = scales.shape[1]
    group = K // G
    for n in prange(N):
        row = out[n]
        for g in range(G):
            scale = scales[n, g]
            for i in range(g * group, (g + 1) * group):
                _put(row, i, np.float32(codes[n, i]) * scale)


@njit(cache=True, parallel=True, fastmath=True)
def int4_dequantize_t(packed, scales_zeros, block_rows, block_paired, tail_paired, row0, out_t):  # pragma: no cover
    """out_t [K, n] = W^T of rows row0..row0+n-1 of an int4 weight held in the CPU kernel's packed
    layout (transposed: the packed bytes run along K, so each column's codes land side by side), in
    fp32, or as bf16 bits (uint16 ``out_t``: each weight rounded to nearest even, as torch rounds the
    fp32 one; half the bytes written, and no second pass to narrow them for a bf16 GEMM).

    ``packed`` uint8, the weight's [N, K/2] bytes flattened: blocks of ``block_rows`` output rows,
    each block's bytes laid [K, rows / 2]; byte d of input column k holds two of the block's rows,
    (d, rows / 2 + d) in its (low, high) nibbles, or (2d, 2d + 1) where the block is ``paired``
    (``block_paired`` for full blocks, ``tail_paired`` for a last, shorter one). ``scales_zeros``
    [G, N, 2] bf16 bits (uint16): W[n, k] = (q - 8) * scale[k // group, n] + zero[k // group, n].
    row0 is a multiple of block_rows; one block per task."""
    K, n_out = out_t.shape
    G, N = scales_zeros.shape[0], scales_zeros.shape[1]
    group = K // G
    blocks = (n_out + block_rows - 1) // block_rows
    for b in prange(blocks):
        start = row0 + b * block_rows
        size = min(block_rows, N - start)
        paired = block_paired if size == block_rows else tail_paired
        width = size // 2
        base = start * (K // 2)
        col = start - row0
        bits = np.empty((2, size), np.uint32)  # the block's scales and zeros of one group, widened
        widened = bits.view(np.float32)
        scale, zero = widened[0], widened[1]
        for g in range(G):
            for r in range(size):
                bits[0, r] = np.uint32(scales_zeros[g, start + r, 0]) << 16
                bits[1, r] = np.uint32(scales_zeros[g, start + r, 1]) << 16
            for k in range(g * group, (g + 1) * group):
                codes = packed[base + k * width:base + (k + 1) * width]
                dest = out_t[k, col:col + size]
                if paired:
                    for d in range(width):
                        _put(dest, 2 * d, np.float32(np.int32(codes[d] & 15) - INT4_MID) * scale[2 * d] + zero[2 * d])
                        _put(dest, 2 * d + 1, np.float32(np.int32(codes[d] >> 4) - INT4_MID) * scale[2 * d + 1]
                             + zero[2 * d + 1])
                elif width == FULL_BLOCK_WIDTH:  # the common case, a trip count LLVM sees: 2.7x faster
                    _unpack_halves(codes, scale, zero, dest, FULL_BLOCK_WIDTH)
                else:
                    _unpack_halves(codes, scale, zero, dest, width)


# Bytes per input column of a full block of AVX-512's packing (64 rows): the unpacking loop with this
# trip count known at compile time vectorizes whole (27 -> 10 ns per 64 weights, measured).
FULL_BLOCK_WIDTH = 32


@njit(inline="always")
def _unpack_halves(codes, scale, zero, dest, width):  # pragma: no cover - numba
    """dest[d] <- weight of the low nibble of codes[d], dest[width + d] <- of its high nibble."""
    for d in range(width):
        _put(dest, d, np.float32(np.int32(codes[d] & 15) - INT4_MID) * scale[d] + zero[d])
    for d in range(width):
        _put(dest, width + d, np.float32(np.int32(codes[d] >> 4) - INT4_MID) * scale[width + d] + zero[width + d])


def _put(dest, i, value):
    """dest[i] <- value, an fp32 (plain-numpy form; inside the kernels :func:`_put_forms`)."""
    if dest.dtype == np.uint16:
        dest[i] = bf16_round_bits(np.asarray(value, np.float32).view(np.uint32)[()])
    else:
        dest[i] = value


@overload(_put, inline="always")
def _put_forms(dest, i, value):  # pragma: no cover - numba
    """An fp32 destination takes the value; a uint16 one its bf16 bits
    (:func:`~offload.kernels.cpu_decode.bf16_round_bits`)."""
    if dest.dtype == types.uint16:
        def put(dest, i, value):
            dest[i] = np.uint16(bf16_round_bits(_f32_bits(value)))
    else:
        def put(dest, i, value):
            dest[i] = value
    return put


@intrinsic
def _f32_bits(typingctx, value):  # pragma: no cover - numba
    """An fp32's bits as uint32 (a bitcast; no memory round trip)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))
    return types.uint32(types.float32), codegen
