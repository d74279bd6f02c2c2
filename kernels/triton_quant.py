"""Triton kernels for quantized linear layers on a GPU (on CPU only under TRITON_INTERPRET=1).

Import this module only after deciding on the backend: Triton reads TRITON_INTERPRET at import.
Each kernel has the contract of its reference in :mod:`offload.kernels.reference`
(:func:`~offload.kernels.reference.int4_nibbles_linear_ref`,
:func:`~offload.kernels.reference.int8_group_linear_ref`).

The weight is dequantized in registers, a tile at a time, inside the K loop of a tiled product:
no dense copy of the weight exists at any time, so a decode step reads the quantized bytes alone
(0.625 bytes per weight for int4 groups of 32, 1.125 for int8). One kernel serves every row count:
a decode step's few rows fill one BLOCK_M = 16 tile (``tl.dot``'s smallest; the product is bound
by the weight's bytes, not by the wasted rows), a prefill chunk takes 64-row tiles.

int4 weights are in the "nibbles" layout: codes [N, K / 2] uint8, byte j of a row holding the codes
of inputs 2j (low nibble) and 2j + 1 (high nibble); scale and zero [G, N, 2] (one pair per group of
``group`` inputs of an output row), w = (q - 8) * scale + zero, torch's tinygemm convention. The
even and odd inputs multiply the low and high nibbles in two half-width products, so nothing is
interleaved in registers.

Shapes: M input rows, N output features, K input features, G = K / group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import INTERPRET, dot

# the codes' centre (reference.INT4_MID): a global a jit kernel reads must be a constexpr (a plain int
# compiles under the interpreter and fails on a GPU)
INT4_MID = tl.constexpr(8)
# Row counts up to this run the decode tiling (one 16-row tile, narrow column tiles so that a single
# row still spreads the weight over every SM); more rows take the prefill tiling.
DECODE_ROWS = 16
DECODE_TILE = (16, 32, 128)  # BLOCK_M, BLOCK_N, BLOCK_K
PREFILL_TILE = (64, 64, 64)


@triton.jit
def int4_nibbles_linear_kernel(x_ptr, w_ptr, sz_ptr, out_ptr, M, N, K, s_xm, s_om,
                               GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, FP32: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    # int64 rows: offsets such as row * K pass 2**31 for a large weight or many rows of logits
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN]
    offs_j = tl.arange(0, BLOCK_K // 2)  # [BK/2] bytes of a row's tile
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_even = k0 + 2 * offs_j  # [BK/2] the inputs of the low nibbles
        k_ok = k_even < K
        wk_ok = n_ok[:, None] & k_ok[None, :]  # [BN, BK/2]
        b = tl.load(w_ptr + offs_n[:, None] * (K // 2) + (k_even // 2)[None, :], mask=wk_ok, other=0)  # [BN, BK/2]
        lo = (b & 0xF).to(tl.float32) - INT4_MID
        hi = (b >> 4).to(tl.float32) - INT4_MID
        pair = ((k_even // GROUP)[None, :] * N + offs_n[:, None]) * 2  # [BN, BK/2] -> (scale, zero)
        scale = tl.load(sz_ptr + pair, mask=wk_ok, other=0.0).to(tl.float32)
        zero = tl.load(sz_ptr + pair + 1, mask=wk_ok, other=0.0).to(tl.float32)
        xk_ok = m_ok[:, None] & k_ok[None, :]  # [BM, BK/2]
        x_even = tl.load(x_ptr + offs_m[:, None] * s_xm + k_even[None, :], mask=xk_ok, other=0.0)  # [BM, BK/2]
        x_odd = tl.load(x_ptr + offs_m[:, None] * s_xm + (k_even + 1)[None, :], mask=xk_ok, other=0.0)
        w_lo = (lo * scale + zero).to(x_even.dtype)  # [BN, BK/2]
        w_hi = (hi * scale + zero).to(x_even.dtype)
        acc += dot(x_even, tl.trans(w_lo), FP32) + dot(x_odd, tl.trans(w_hi), FP32)  # [BM, BN]
    tl.store(out_ptr + offs_m[:, None] * s_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def int8_group_linear_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, s_xm, s_om,
                             GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, FP32: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM] (int64: see above)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    m_ok, n_ok = offs_m < M, offs_n < N
    groups = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k  # [BK]
        k_ok = k < K
        wk_ok = n_ok[:, None] & k_ok[None, :]  # [BN, BK]
        codes = tl.load(w_ptr + offs_n[:, None] * K + k[None, :], mask=wk_ok, other=0)  # [BN, BK] int8
        scale = tl.load(s_ptr + offs_n[:, None] * groups + (k // GROUP)[None, :], mask=wk_ok, other=0.0)  # [BN, BK]
        x = tl.load(x_ptr + offs_m[:, None] * s_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = (codes.to(tl.float32) * scale).to(x.dtype)  # [BN, BK]
        acc += dot(x, tl.trans(w), FP32)  # [BM, BN]
    tl.store(out_ptr + offs_m[:, None] * s_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _tile(M: int) -> tuple[int, int, int]:
    return DECODE_TILE if M <= DECODE_ROWS else PREFILL_TILE


def _launch(kernel, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, N: int, K: int, group: int,
            out_dtype: torch.dtype) -> torch.Tensor:
    M = x.shape[0]
    out = torch.empty(M, N, dtype=out_dtype, device=x.device)  # [M, N]
    if M == 0:
        return out
    block_m, block_n, block_k = _tile(M)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    # fp32 products (and every product under the interpreter, where a bf16 tl.dot is wrong) in IEEE fp32
    fp32 = INTERPRET or x.dtype == torch.float32
    kernel[grid](x, weight, scales, out, M, N, K, x.stride(0), out.stride(0), GROUP=group,
                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, FP32=fp32)
    return out


def int4_nibbles_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] (unit stride in K) @ W^T for W in the nibbles layout: packed uint8 [N, K/2], scales_zeros
    [G, N, 2]. Returns [M, N] in x's dtype (fp32 accumulation)."""
    return _launch(int4_nibbles_linear_kernel, x, packed, scales_zeros, packed.shape[0], x.shape[1], group, x.dtype)


def int8_group_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] (unit stride in K) @ W^T for W = codes int8 [N, K] * scales fp32 [N, G]. Returns [M, N]
    fp32, as the CPU kernels do."""
    N, K = codes.shape
    return _launch(int8_group_linear_kernel, x, codes, scales, N, K, K // scales.shape[1], torch.float32)
