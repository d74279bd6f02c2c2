"""The CPU kernels a model's steps call, compiled (or loaded from numba's cache) when the model is
built rather than in its first step.

numba compiles a kernel for each new combination of argument types at its first call; on a fresh
machine the default model's first step compiled ~18 s of kernels (later runs load them from the
cache in a fraction of a second). Calling each kernel once on tiny arrays of the very types the
model will pass, at load, keeps that out of the first request (a server's, a benchmark's timed
step, ``--stats``) and lets the loader say once that it is compiling. Shapes do not enter a
kernel's signature, only dtypes, dimensions and layouts: a 1-head, 16-token cache compiles what a
32K one runs.
"""

from __future__ import annotations

import numpy as np
import torch

from . import row_ops
from .api import NUMBA_DTYPES, CacheArrays, DecodeRanges, KiviArrays, int8_group_linear, merge_attention, store_kv
from .cbuild import library
from .int4_pack import INT4_GEMM_ROWS, int4_group_linear

# Tiny shapes of valid arguments: one KV head of 8 dims over 16 tokens; a weight of one packing tile.
_HEAD_DIM, _TOKENS, _ROWS, _COLS = 8, 16, 256, 64


def warm_cpu_kernels(dtype: torch.dtype, kv_dtype: torch.dtype, quantize: str | None) -> None:
    """Call every CPU kernel a model of compute dtype ``dtype``, KV cache dtype ``kv_dtype`` (int8:
    codes with scales in ``dtype``; uint8: KIVI's packed codes) and weight scheme ``quantize`` uses,
    once, on tiny arrays."""
    gen = torch.Generator().manual_seed(0)
    library()  # the C kernels (decode attention on a bf16 cache, few-row products): built here if not cached
    if kv_dtype in NUMBA_DTYPES and dtype in NUMBA_DTYPES:  # (an fp16 model attends through torch)
        _warm_cache_kernels(dtype, kv_dtype, gen)
    if kv_dtype == torch.uint8 and dtype in (torch.bfloat16, torch.float32):  # KIVI's decode kernel
        codes = torch.zeros(1, 1, _TOKENS, _HEAD_DIM // 4, dtype=torch.uint8)  # [R, Hkv, N, P] 2-bit codes
        key_scales = torch.ones(1, 1, 1, _HEAD_DIM, dtype=dtype)  # [R, Hkv, K, D]: one group of 16 tokens
        value_scales = torch.ones(1, 1, _TOKENS, 1, dtype=dtype)  # [R, Hkv, N, C]
        kept = torch.ones(1, 1, 4, _HEAD_DIM, dtype=dtype)  # [R, Hkv, F, D]
        kivi = KiviArrays(codes, codes, key_scales, key_scales, value_scales, value_scales, kept, kept, _TOKENS, 2)
        bounds = np.array([[[0, 4, 0, 2, 2, 4]]], np.int64)  # [R, Hkv, 6]
        kivi.attend(torch.randn(1, 1, _HEAD_DIM, generator=gen).to(dtype), bounds, 1.0)
        ids = torch.zeros(1, 2, dtype=torch.long)  # [Hkv, M]
        for out in {dtype, torch.float32}:  # the compute dtype (prompts, indexes), fp32 (sparse attention)
            kivi.read(0, 0, 4, out)
            kivi.take(0, ids, 1, 2, 3, out)
    if dtype in (torch.bfloat16, torch.float32):  # two attention parts merge (numba compiles per layout):
        part = torch.randn(2, 2, _HEAD_DIM, generator=gen).to(dtype)  # [2, 2, D]
        lse = torch.zeros(2, 2)
        merge_attention([part, part], [lse, lse])  # contiguous: ShadowKV's parts, a 1-token prompt chunk's
        # a prompt chunk's, laid out as the flash kernel returns them for the model's q: [T, H, D], [T, H] memory
        merge_attention([part.transpose(0, 1)] * 2, [lse.t()] * 2)  # [H, T, D], [H, T]
    if dtype == torch.bfloat16:  # the row kernels run for bf16 models only
        x = torch.randn(1, 1, _COLS, generator=gen).to(dtype)
        weight = torch.ones(_COLS, dtype=dtype)
        row_ops.rms_norm(x, weight, 1e-5)
        row_ops.add_rms_norm(x, x, weight, 1e-5)
        angles = torch.zeros(1, 1, 1, _HEAD_DIM, dtype=dtype)
        row_ops.rope_split(torch.randn(1, 1, 3 * _HEAD_DIM, generator=gen).to(dtype), angles, angles, 1, 1, _HEAD_DIM)
        row_ops.silu_mul(x)
    if quantize is None:
        return
    codes = torch.randint(-127, 128, (_ROWS, _COLS), generator=gen, dtype=torch.int8)  # int8 groups of 32
    scales = torch.rand(_ROWS, _COLS // 32, generator=gen)
    for rows in (1, INT4_GEMM_ROWS + 1):  # the int8 tables (and int8 projections): few rows and many
        int8_group_linear(torch.randn(rows, _COLS, generator=gen).to(dtype), codes, scales)
    if quantize == "int4":  # a step's products may take the C kernel; a prompt's unpack the packed weight
        nibbles = torch.randint(0, 16, (_ROWS, _COLS), generator=gen, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)  # [N, K/2] uint8
        scales_zeros = torch.rand(_COLS // 32, _ROWS, 2, generator=gen).to(torch.bfloat16)  # [G, N, 2]
        for rows in (1, INT4_GEMM_ROWS):  # a step's (the C kernel built and chosen), a prompt's
            int4_group_linear(torch.randn(rows, _COLS, generator=gen).to(dtype), packed, scales_zeros, 32)


def _warm_cache_kernels(dtype: torch.dtype, kv_dtype: torch.dtype, gen: torch.Generator) -> None:
    """The KV cache's store and the decode attention read in place (dense and gathered alike)."""
    k = torch.randn(1, 1, _TOKENS, _HEAD_DIM, generator=gen)  # [R, Hkv, N, D]
    if kv_dtype == torch.int8:
        cache = CacheArrays(torch.zeros(k.shape, dtype=torch.int8), torch.zeros(k.shape, dtype=torch.int8),
                            torch.ones(k.shape[:3], dtype=dtype), torch.ones(k.shape[:3], dtype=dtype))
    else:
        cache = CacheArrays(k.to(kv_dtype), k.to(kv_dtype))
    new = torch.randn(1, 1, 1, _HEAD_DIM, generator=gen).to(dtype)  # [B, Hkv, T, D]: a step's key
    store_kv(new, new, cache, np.zeros(1, np.int64), np.zeros(1, np.int64))
    cache.attend(torch.randn(1, 1, _HEAD_DIM, generator=gen).to(dtype), DecodeRanges([0], [4], 1, _TOKENS), 1.0)
