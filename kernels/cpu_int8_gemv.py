"""int8 products of a few rows (decode steps) on an x86-64 CPU through the C kernel
(``cpu_int8_gemv.c``): the grouped int8 weights of :class:`offload.quant.Int8Weight` (GGUF Q8_0's
layout), the default model's LM head among them.

The numba row kernel (:func:`offload.kernels.cpu_quant.int8_group_matmul`) computes the same sums;
on the 2-core EPYC it read the LM head's 28 MB of codes at ~11 GB/s, the C kernel at the memory's
pace (BENCHMARKS.md). Taken for up to C_ROWS rows where the C kernels built (:mod:`.cbuild`) and
the group is a multiple of 8 columns; ``OFFLOAD_INT8_DECODE_KERNEL=numba`` keeps numba's.

Shapes: M input rows, N output features, K input features, G groups per row.
"""

from __future__ import annotations

import functools

import torch

from .cbuild import c_kernel_chosen, library

KERNEL_ENV = "OFFLOAD_INT8_DECODE_KERNEL"
# Rows up to which products take the C kernel: it reads the codes once per block of 8 output rows
# for all rows; past a few rows the numba kernel's and then the GEMM's paths are the measured ones.
C_ROWS = 8
GROUP_MULTIPLE = 8  # columns per group the kernel takes: a multiple of one vector


@functools.cache
def chosen() -> bool:
    """Whether this process's int8 products of a few rows run the C kernel."""
    return c_kernel_chosen(KERNEL_ENV, "numba")


def takes(rows: int, in_features: int, groups: int) -> bool:
    """Whether a product of ``rows`` rows by a weight of these inputs and groups runs the C kernel."""
    return 0 < rows <= C_ROWS and (in_features // groups) % GROUP_MULTIPLE == 0 and chosen()


def int8_gemv(x: torch.Tensor, codes_address: int, scales_address: int, N: int, K: int, G: int) -> torch.Tensor:
    """x [M, K] (any float dtype, CPU) @ W^T -> fp32 [M, N], W the codes int8 [N, K] and scales fp32
    [N, G] at these addresses (C-contiguous; their owner keeps them alive). The caller has checked
    :func:`takes` and the shapes."""
    xf = x.float().contiguous()  # [M, K]
    M = xf.shape[0]
    out = torch.empty(M, N, dtype=torch.float32)  # [M, N]
    rc = library().int8_gemv(codes_address, scales_address, xf.data_ptr(), out.data_ptr(), M, N, K, G,
                             torch.get_num_threads())
    if rc:
        raise RuntimeError(f"int8_gemv refused {M} x {K} @ {N} x {K} in {G} groups: code {rc}")
    return out
