"""numba kernels for weights held as int8 codes in groups (``quantize="int8"``), on the CPU.

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
from numba import njit, prange


@njit(cache=True, parallel=True, fastmath=True)
def int8_group_matmul(codes, scales, x, out):  # pragma: no cover - compiled
    """out [M, N] = x [M, K] @ W^T for W = codes [N, K] int8 * scales [N, G] fp32 (per group).

    One output row of W per task: its K codes stay in L1 while the M input rows pass over them, so
    a few rows (decode, a short prompt) read the weight once."""
    N, K = codes.shape
    G = scales.shape[1]
    group = K // G
    M = x.shape[0]
    for n in prange(N):
        for m in range(M):
            acc = np.float32(0.0)
            for g in range(G):
                base = g * group
                dot = np.float32(0.0)
                for i in range(group):
                    dot += np.float32(codes[n, base + i]) * x[m, base + i]
                acc += scales[n, g] * dot
            out[m, n] = acc


@njit(cache=True, parallel=True)
def int8_group_dequantize(codes, scales, out):  # pragma: no cover - compiled
    """out [N, K] fp32 = codes [N, K] * scales [N, G] (each scale over its group of K / G columns)."""
    N, K = codes.shape
    G = scales.shape[1]
    group = K // G
    for n in prange(N):
        for g in range(G):
            scale = scales[n, g]
            for i in range(g * group, (g + 1) * group):
                out[n, i] = np.float32(codes[n, i]) * scale
