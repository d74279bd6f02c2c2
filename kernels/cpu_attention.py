"""Decode attention on a bf16 KV cache through the C kernel (``cpu_attention.c``): the new token's
key and value stored and every visible token attended in one call per layer; or a sparse policy's
sinks, window and selection attended where they lie in the cache.

The numba kernel (:func:`offload.kernels.cpu_decode.decode_attention`) computes the same; a call to
it costs ~60 us before it reads a key, half of each layer's attention at 512 tokens of the default
model. Used where the C kernels built (:mod:`.cbuild`) and the cache is bf16 with a head_dim and a
query group the kernel takes; ``OFFLOAD_DECODE_ATTENTION=numba`` keeps numba's kernel (``c``, the
default, takes the C one where it can).

Shapes: B rows, H query heads, Hkv KV heads, D head_dim, R cache rows, N cache tokens.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .cbuild import c_kernel_chosen, library

KERNEL_ENV = "OFFLOAD_DECODE_ATTENTION"
MAX_GROUP, MAX_DIM, DIM_MULTIPLE = 16, 256, 16  # what cpu_attention.c takes (its MAX_GROUP, MAX_DIM)


@functools.cache
def chosen() -> bool:
    """Whether this process's decode attention on bf16 caches runs the C kernel."""
    return c_kernel_chosen(KERNEL_ENV, "numba")


def takes(cache_k: np.ndarray, num_heads: int) -> bool:
    """Whether the C kernel attends a cache like ``cache_k`` (bf16 bits [R, Hkv, N, D]) for
    ``num_heads`` query heads in this process."""
    Hkv, D = cache_k.shape[1], cache_k.shape[3]
    return (cache_k.dtype == np.uint16 and num_heads % Hkv == 0 and num_heads // Hkv <= MAX_GROUP
            and D % DIM_MULTIPLE == 0 and D <= MAX_DIM and chosen())


def store_and_attend(q: torch.Tensor, k_new: torch.Tensor | None, v_new: torch.Tensor | None,
                     store_at: tuple[int, int] | None, cache: tuple[int, int, int, int, int, int],
                     ranges: tuple[int, int], scale: float,
                     ids: tuple[int | None, int] = (None, 0),
                     estimate: tuple[int | None, int | None] = (None, None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Store k_new/v_new [B, Hkv, 1, D] bf16 at cache row rows[b], position starts[b] (``store_at``:
    the addresses of int64 rows and starts [B]; k_new, v_new and store_at all None: nothing to
    store), then attend q [B, H, D] bf16 over cache row b's positions lo[b, h] .. hi[b, h] - 1
    (``ranges``: the addresses of int64 lo and hi [B, Hkv]), or over the token ids at those positions
    of an id list (``ids``: its address and M, int32 [B, Hkv, M], a negative id skipped: a sparse
    policy's sinks, window and selection). ``estimate``: the addresses of est_out [B, H, D] and est_lse
    [B, H] fp32, a partial result over tokens not attended (a cluster index's estimation zone; lse
    -inf: none for that query) merged by log-sum-exp before the output is rounded. ``cache``: (address of k, address of v,
    R, Hkv, N, D), bf16 [R, Hkv, N, D] C-contiguous each. Returns (out [B, H, D] bf16, lse [B, H]
    fp32), as the numba kernel gives them. Addresses, not arrays: numpy's ``.ctypes.data`` costs a
    microsecond and a step would ask ~200 times. The caller has checked :func:`takes` and the
    shapes; the kernel checks the positions (a store or a range outside the cache raises, nothing
    attended)."""
    B, H, D = q.shape
    k_cache, v_cache, R, Hkv, N, _ = cache
    q = q.contiguous()
    out = torch.empty(B, H, D, dtype=torch.bfloat16)  # [B, H, D]
    lse = torch.empty(B, H, dtype=torch.float32)  # [B, H]
    if k_new is None:
        new_k = new_v = rows = starts = None
    else:
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
        new_k, new_v, (rows, starts) = k_new.data_ptr(), v_new.data_ptr(), store_at
    rc = library().decode_attention_bf16(q.data_ptr(), new_k, new_v, rows, starts, k_cache, v_cache, *ranges,
                                         *ids, B, H, Hkv, R, N, D, scale, torch.get_num_threads(), out.data_ptr(),
                                         lse.data_ptr(), *estimate)
    if rc > 0:
        raise ValueError(f"decode attention: {rc} new token(s), visible range(s) or listed token id(s) of the step "
                         f"lie outside the cache's {R} rows of {N} tokens")
    if rc:
        raise RuntimeError(f"decode attention refused q {tuple(q.shape)} over a cache of {R} x {Hkv} x {N} x {D}: "
                           f"code {rc}")
    return out, lse
