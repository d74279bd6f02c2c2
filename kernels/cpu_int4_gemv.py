"""int4 products of a few input rows (decode steps) on an x86-64 CPU: a C kernel (``cpu_int4_gemv.c``,
AVX2 and FMA, OpenMP) on the weight as torch's CPU int4 packer lays it out.

Why a C kernel: torch's fused int4 kernel widens each code to fp32 and applies the scale and zero per
weight; on a 2-core AVX2 EPYC it reaches ~12 G weights/s, bound by arithmetic, and decode of the
default model waited on it for 9 of its 25 ms (BENCHMARKS.md). The C kernel keeps a block's sums in
registers and applies the scale and zero once per group: the same fp32 sums in another order, so its
outputs match torch's kernel to bf16 rounding. numba could not express it (its int4 GEMV measured
3-4x slower than torch's kernel: the unpacking does not vectorize).

Chosen per process by measurement (:func:`decode_kernel`): both kernels time a decode product of a
probe weight and the C kernel is taken where it is clearly faster (on the AVX2 EPYC by 1.4-1.9x for
one row; on a CPU whose torch kernel runs AVX-512 the probe decides). ``OFFLOAD_INT4_DECODE_KERNEL=c|torch`` sets
the choice instead (``auto``, the default, measures).

Built with the other C kernels (:mod:`.cbuild`); where they are not there, products keep to torch's
kernel.

Shapes: M input rows, N output features, K input features.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from ..errors import OffloadError
from .cbuild import best_rounds, library
from .int4_pack import GEMV_ROWS, Int4PackLayout, int4_pack_layout

PAIRED_BLOCK_ROWS = 32  # the layout whose blocks take input rows in pairs: past one row, only it (measured)
BLOCK_ROWS = (32, 64)  # the packed layouts the kernel reads (AVX2's and AVX-512's blocks, halves form)
KERNEL_ENV = "OFFLOAD_INT4_DECODE_KERNEL"
# The probe the choice is timed on: a decode product of 2M weights (a small model's FFN, 1 MiB of codes).
PROBE_N, PROBE_K, PROBE_GROUP = 2048, 1024, 32
PROBE_ROUNDS, PROBE_CALLS = 5, 4  # alternating rounds of a few calls each; each kernel's best round counts
# The C kernel is taken when its best round is at most this share of torch's: a near tie keeps torch's
# kernel (the one the rest of the ecosystem runs).
FASTER_SHARE = 0.9


def takes(packed: torch.Tensor, layout: Int4PackLayout | None, group: int) -> bool:
    """Whether the C kernel computes products of this weight: uint8 [N, K/2] packed in whole blocks of
    the halves form (``layout``, the process's: :func:`~offload.kernels.int4_pack.int4_pack_layout`)."""
    return (layout is not None and layout.block_rows in BLOCK_ROWS and not layout.paired and packed.is_cpu
            and packed.shape[0] % layout.block_rows == 0 and (2 * packed.shape[1]) % group == 0
            and library() is not None)


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, block_rows: int,
              threads: int) -> torch.Tensor:
    """x bf16 [M, K] @ W^T -> bf16 [M, N], for a weight :func:`takes` (any M; products route up to
    :func:`decode_rows` rows here, where it is faster than torch's kernel)."""
    if x.dtype != torch.bfloat16 or x.dim() != 2:
        raise ValueError(f"int4_gemv takes bf16 rows [M, K]; got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()  # [M, K]
    M, K = x.shape
    N = packed.shape[0]
    out = torch.empty(M, N, dtype=torch.bfloat16)  # [M, N]
    rc = library().int4_gemv(packed.data_ptr(), scales_zeros.data_ptr(), x.data_ptr(), out.data_ptr(), M, N, K,
                             group, block_rows, threads)
    if rc:
        raise RuntimeError(f"int4_gemv refused {M} x {K} @ {N} x {K} (group {group}, blocks of {block_rows}): code {rc}")
    return out


@dataclass(frozen=True)
class DecodeKernel:
    """Which kernel this process's int4 products of a few rows run, and why."""

    name: str  # "c" or "torch"
    reason: str  # what decided: the probe's timings, the setting, or why the C kernel is not there


def time_kernels(n: int, k: int, rows: int, rounds: int, calls: int, group: int = PROBE_GROUP,
                 seed: int = 0) -> dict[str, float]:
    """Best-round milliseconds of one product x [rows, k] @ W^T, W a random int4 weight [n, k] packed
    by torch for this CPU, for torch's kernel ("torch") and, where it reads the weight, the C kernel
    ("c"): rounds of ``calls`` calls, the kernels alternating so that drifts of a shared box's speed
    reach both. The run-time choice's probe and ``profiles/bench_int4_gemv`` time with it."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # [N, K/2]
    scales_zeros = (torch.rand(k // group, n, 2, generator=gen) * 0.01).to(torch.bfloat16)  # [G, N, 2]
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)  # [M, K]
    layout, threads = int4_pack_layout(), torch.get_num_threads()
    kernels = {"torch": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)}
    if takes(packed, layout, group):
        kernels["c"] = lambda: int4_gemv(x, packed, scales_zeros, group, layout.block_rows, threads)
    return best_rounds(kernels, rounds, calls)


@functools.cache
def decode_kernel() -> DecodeKernel:
    """This process's choice for int4 products of a few rows (``OFFLOAD_INT4_DECODE_KERNEL``:
    auto measures, c or torch set it)."""
    setting = os.environ.get(KERNEL_ENV, "auto").strip().lower()
    if setting not in ("auto", "c", "torch"):
        raise OffloadError(f"{KERNEL_ENV}={setting!r}: use auto, c or torch")
    if setting == "torch":
        return DecodeKernel("torch", f"{KERNEL_ENV}=torch")
    layout = int4_pack_layout()
    if layout is None or layout.block_rows not in BLOCK_ROWS or layout.paired:
        return DecodeKernel("torch", f"torch packs int4 in a layout the C kernel does not read ({layout})")
    if library() is None:
        return DecodeKernel("torch", "no C kernel on this machine (not x86-64 Linux, or the build said why)")
    if setting == "c":
        return DecodeKernel("c", f"{KERNEL_ENV}=c")
    timed = time_kernels(PROBE_N, PROBE_K, 1, PROBE_ROUNDS, PROBE_CALLS)
    c_ms, torch_ms = timed["c"], timed["torch"]
    name = "c" if c_ms <= FASTER_SHARE * torch_ms else "torch"
    return DecodeKernel(name, f"measured on a {PROBE_N} x {PROBE_K} product: C {c_ms:.3f} ms, torch {torch_ms:.3f} ms")


def decode_rows() -> int:
    """Input rows up to which this process's int4 products take the C kernel (0: torch's kernel is
    the choice): GEMV_ROWS on the 32-row layout, whose blocks take rows in pairs; one on the 64-row
    one, whose blocks take a row at a time (more rows there are not measured against torch's)."""
    if decode_kernel().name != "c":
        return 0
    return GEMV_ROWS if int4_pack_layout().block_rows == PAIRED_BLOCK_ROWS else 1


def decode_product(packed: torch.Tensor, scales_zeros: torch.Tensor, group: int):
    """The C kernel bound to one weight when it is this process's choice and reads this weight; else
    None (torch's kernel). The product: x bf16 [M, K] contiguous (M up to :func:`decode_rows`) ->
    bf16 [M, N], written into ``out`` [M, N] when given (a decode step's buffer: no allocation per
    call). The weight's addresses are taken now: bind it to a weight whose storage stays put."""
    layout = int4_pack_layout()
    if not (packed.is_cpu and takes(packed, layout, group) and decode_kernel().name == "c"):
        return None
    block_rows, kernel = layout.block_rows, library().int4_gemv
    packed_at, scales_at = packed.data_ptr(), scales_zeros.data_ptr()
    N, K = packed.shape[0], 2 * packed.shape[1]

    def product(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != K or not x.is_contiguous():
            raise ValueError(f"the int4 decode product takes contiguous bf16 rows [M, {K}]; got {x.dtype} {tuple(x.shape)}")
        M = x.shape[0]
        if out is None:
            out = torch.empty(M, N, dtype=torch.bfloat16)  # [M, N]
        rc = kernel(packed_at, scales_at, x.data_ptr(), out.data_ptr(), M, N, K, group, block_rows,
                    torch.get_num_threads())
        if rc:
            raise RuntimeError(f"int4_gemv refused {M} x {K} @ {N} x {K} (group {group}, blocks of {block_rows}): code {rc}")
        return out
    return product
