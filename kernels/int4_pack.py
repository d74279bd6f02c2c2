"""int4 weights in the CPU kernel's packed layout: products of one row or many.

torch's fused int4 kernel (``aten._weight_int4pack_mm_for_cpu``) reads codes packed by
``aten._convert_weight_to_int4pack_for_cpu``, whose byte order depends on the CPU's vector width
(blocks of 32 output rows on AVX2, 64 on AVX-512) and is not documented. For one input row (a decode
step) that kernel is the fastest we measured. For many rows (a prefill chunk) it is not: on an AVX2
EPYC it computes a 4096 x 4096 product of 512 rows several times slower than the fp32 BLAS GEMM, so
there the weight is unpacked to fp32 a block of rows at a time and the GEMM runs on the block (the
int8 weights' path does the same).

The byte order is learned, not assumed: :func:`int4_pack_layout` packs small matrices of known
codes once per process and reads back where each code went. If what it finds is not the block form
the unpacker reads (a future torch, another CPU), it says so once and products keep to the fused
kernel for every row count.

Shapes: N output features, K input features, G = K / group groups per row, M input rows.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
from dataclasses import dataclass

import numpy as np
import torch

# Input rows from which a product unpacks blocks of the weight to fp32 for the BLAS GEMM instead of
# running the fused kernel (measured on a 2-core AVX2 EPYC: BENCHMARKS.md).
INT4_GEMM_ROWS = 32
# Input rows up to which a product may take the C decode kernel (:mod:`.cpu_int4_gemv`): 1.4-1.9x
# torch's kernel for one row, 1.2-1.5x at 4 and 8 (a 32-row block takes its rows in pairs, each word of
# codes unpacked once for both; 2-core AVX2 EPYC: BENCHMARKS.md).
GEMV_ROWS = 8
# fp32 bytes of weight rows unpacked at a time for the GEMM path: a small temporary, reused.
INT4_UNPACK_BLOCK_BYTES = 4 << 20
# What the probes pack: rows enough for several blocks of the widest vector unit, and a few columns.
PROBE_ROWS, PROBE_COLS = 256, 4
ROW_MULTIPLE = 16  # the packer's own requirement on N: its blocks and short last blocks are multiples
# Rows packed by one call, when a matrix is packed in parts: a multiple of every block size the probe
# considers (16..256 rows: 32 on AVX2, 64 on AVX-512), so that parts of whole tiles pack exactly as the
# whole matrix does on any CPU (a part ending inside a block would be packed as a short last block).
PACK_TILE_ROWS = 256


@dataclass(frozen=True)
class Int4PackLayout:
    """Where the packer puts each code: blocks of ``block_rows`` output rows, each block's bytes laid
    [K, rows / 2], byte d of a column holding rows (d, rows / 2 + d) of the block in its (low, high)
    nibbles, or (2d, 2d + 1) in a ``paired`` block; ``tails_paired[r]``: the form of a last block of
    r < block_rows rows."""

    block_rows: int
    paired: bool
    tails_paired: dict  # r -> bool

    def tail_paired(self, rows: int) -> bool:
        """The form of the last block of a weight of ``rows`` output rows (that of a full one if none)."""
        tail = rows % self.block_rows
        return self.tails_paired[tail] if tail else self.paired


def _pack(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


def _probe(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack [rows, cols] matrices whose codes spell each entry's index in base 16, a digit per
    packing: (index of the entry in the low nibble, in the high nibble) of every packed byte."""
    ids = torch.arange(rows * cols, dtype=torch.int64).reshape(rows, cols)
    lo = torch.zeros(rows * cols // 2, dtype=torch.int64)
    hi = torch.zeros_like(lo)
    for digit in range(max(1, math.ceil(math.log(rows * cols, 16)))):
        packed = _pack((ids >> (4 * digit)) & 15).reshape(-1).to(torch.int64)  # [rows * cols / 2]
        lo += (packed & 15) << (4 * digit)
        hi += (packed >> 4) << (4 * digit)
    return lo.numpy(), hi.numpy()


def _block_form(lo_ids: np.ndarray, hi_ids: np.ndarray, cols: int, first: int, rows: int, start: int) -> bool | None:
    """Whether a block of ``rows`` rows starting at row ``first``, whose bytes start at byte
    ``start``, is paired (True) or in halves (False); None: not laid [cols, rows / 2] in either form."""
    width = rows // 2
    lo_rows = lo_ids[start:start + width] // cols - first
    hi_rows = hi_ids[start:start + width] // cols - first
    d = np.arange(rows * cols // 2)
    column = d // width  # the input column each byte of the block holds
    expect_lo = (first + lo_rows[d % width]) * cols + column
    expect_hi = (first + hi_rows[d % width]) * cols + column
    block = slice(start, start + rows * cols // 2)
    if not (np.array_equal(lo_ids[block], expect_lo) and np.array_equal(hi_ids[block], expect_hi)):
        return None
    d = np.arange(width)
    if np.array_equal(lo_rows, 2 * d) and np.array_equal(hi_rows, 2 * d + 1):
        return True
    if np.array_equal(lo_rows, d) and np.array_equal(hi_rows, width + d):
        return False
    return None


@functools.cache
def int4_pack_layout() -> Int4PackLayout | None:
    """This process's packed int4 layout, learned by packing known codes (None: not the block form
    the unpacker reads; products then keep to the fused kernel)."""
    try:
        lo_ids, hi_ids = _probe(PROBE_ROWS, PROBE_COLS)
    except (RuntimeError, AttributeError) as e:  # no CPU int4 packer in this torch build
        print(f"offload: int4 products of many rows use the fused kernel (no packer to probe: {e})", file=sys.stderr)
        return None
    for block_rows in (16, 32, 64, 128, 256):
        forms = {_block_form(lo_ids, hi_ids, PROBE_COLS, b, block_rows, b * PROBE_COLS // 2)
                 for b in range(0, PROBE_ROWS, block_rows)}
        if len(forms) == 1 and None not in forms:
            break
    else:
        print("offload: int4 products of many rows use the fused kernel (the packed layout is not one "
              "this version unpacks)", file=sys.stderr)
        return None
    tails = {}
    for tail in range(ROW_MULTIPLE, block_rows, ROW_MULTIPLE):  # a weight whose rows end in a short block
        lo_t, hi_t = _probe(block_rows + tail, PROBE_COLS)
        found = _block_form(lo_t, hi_t, PROBE_COLS, block_rows, tail, block_rows * PROBE_COLS // 2)
        if found is None:
            print(f"offload: int4 products of many rows use the fused kernel (a last block of {tail} rows "
                  "is laid out in a form this version does not unpack)", file=sys.stderr)
            return None
        tails[tail] = found
    return Int4PackLayout(block_rows, forms.pop(), tails)


def int4_dequantize_rows(packed: torch.Tensor, scales_zeros: torch.Tensor, first: int, out_t: torch.Tensor,
                         layout: Int4PackLayout) -> torch.Tensor:
    """Rows first..first+n-1 of an int4 weight (``packed`` uint8 [N, K/2], ``scales_zeros`` bf16
    [G, N, 2]) unpacked, transposed, into ``out_t`` [K, n], fp32 or bf16 (rounded to nearest even;
    the codes of a column lie side by side in the packed bytes): ``first`` a multiple of the layout's
    block rows, n too unless the rows reach N."""
    from . import cpu_quant  # numba compiles (or loads from its cache) on first use

    N = packed.shape[0]
    n = out_t.shape[1]
    if first % layout.block_rows or (n % layout.block_rows and first + n != N) or first + n > N:
        raise ValueError(f"int4 rows are unpacked in blocks of {layout.block_rows}: rows {first}..{first + n - 1} "
                         f"of {N} cut one")
    out_np = (out_t.view(torch.uint16) if out_t.dtype == torch.bfloat16 else out_t).numpy()
    cpu_quant.int4_dequantize_t(packed.reshape(-1).numpy(), scales_zeros.view(torch.uint16).numpy(),
                                layout.block_rows, layout.paired, layout.tail_paired(N), first, out_np)
    return out_t


def int4_dequantize(packed: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """The whole weight W [N, K] in fp32: unpacked where the layout is known, else read back through
    the fused kernel (a product with the identity: each output is one weight, so nothing is summed)."""
    N, K = packed.shape[0], packed.shape[1] * 2
    layout = int4_pack_layout() if packed.device.type == "cpu" else None
    if layout is None:
        eye = torch.eye(K, dtype=torch.bfloat16, device=packed.device)  # [K, K]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, group, scales_zeros).t().float()
    return int4_dequantize_rows(packed, scales_zeros, 0, torch.empty(K, N), layout).t()  # [N, K]


class _Scratch(threading.local):
    """Per thread: the bytes unpacked blocks are written to (at most about INT4_UNPACK_BLOCK_BYTES,
    or one layout block of a very wide weight)."""

    def __init__(self):
        self.buffer = torch.empty(0, dtype=torch.uint8)


_scratch = _Scratch()


def unpack_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A buffer of at least ``numel`` elements for unpacked (int4) or dequantized (int8) blocks of a
    weight, kept per thread and grown as needed: a fresh one of a few MiB each product page-faulted
    in again (0.2-0.4 ms of a 1.5 ms 512-row product, measured)."""
    nbytes = numel * dtype.itemsize
    if _scratch.buffer.numel() < nbytes:
        _scratch.buffer = torch.empty(nbytes, dtype=torch.uint8)
    return _scratch.buffer[:nbytes].view(dtype)


def int4_group_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] @ W^T for an int4 weight (CPU: ``packed`` uint8 [N, K/2] in the fused kernel's layout,
    ``scales_zeros`` bf16 [G, N, 2]). Returns [M, N]: bf16 from a fused kernel (fewer than
    INT4_GEMM_ROWS rows, or no known layout: up to GEMV_ROWS rows the one this process measured
    fastest, torch's or the C kernel of :mod:`.cpu_int4_gemv`, else torch's), else from the GEMM
    over unpacked blocks: bf16 for bf16 x on a CPU with native bf16 products, fp32 otherwise."""
    M, K = x.shape
    N = packed.shape[0]
    layout = int4_pack_layout() if M >= INT4_GEMM_ROWS and x.is_cpu else None
    if layout is None:
        if x.dtype != torch.bfloat16:
            x = x.to(torch.bfloat16)
        if M <= GEMV_ROWS and x.is_cpu:  # a decode step's rows: the kernel this process measured fastest
            from .cpu_int4_gemv import decode_product, decode_rows

            product = decode_product(packed, scales_zeros, group) if M <= decode_rows() else None
            if product is not None:
                return product(x.contiguous())  # [M, N]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group, scales_zeros)  # [M, N]
    from . import cpu_decode
    from .api import cpu_has_fast_bf16

    cpu_decode.set_threads(torch.get_num_threads())
    # A bf16 model on a CPU with native bf16 products (AVX512-BF16, AMX) multiplies the unpacked block
    # in bf16: 3-3.5x faster than the fp32 GEMM there (2-core Xeon with AMX, 512 rows: 3072 x 576 5.8 ->
    # 1.7 ms, 4096 x 4096 55 -> 18 ms), each weight rounded to bf16 as the dequantized bf16 model's is.
    gemm_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 and cpu_has_fast_bf16() else torch.float32
    xg = x.to(gemm_dtype)  # [M, K]
    out = torch.empty(M, N, dtype=gemm_dtype)  # [M, N]
    per_row = K * gemm_dtype.itemsize  # a block's bytes per weight row, unpacked in the GEMM's dtype
    step = max(layout.block_rows, INT4_UNPACK_BLOCK_BYTES // per_row // layout.block_rows * layout.block_rows)
    buffer = unpack_buffer(K * min(step, N), gemm_dtype)  # each block [K, n] contiguous in it
    for r in range(0, N, step):
        n = min(step, N - r)
        w_t = int4_dequantize_rows(packed, scales_zeros, r, buffer[:K * n].view(K, n), layout)  # [K, n]
        if n == N:
            torch.mm(xg, w_t, out=out)  # [M, N]: one block, no copy
        else:
            out[:, r:r + n] = xg @ w_t  # [M, n]
    return out

