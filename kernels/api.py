"""Public sparse decode-attention operations, dispatched at run time to Triton, numba or plain torch.

``backend="auto"`` takes the Triton kernel when the tensors live on a CUDA device and Triton
imports; on CPU, :func:`gather_attention` and :func:`kv_decode_attention` take the numba kernels
(:mod:`offload.kernels.cpu_decode`, reading the cache in place), :func:`int8_group_linear` the
numba int8 kernels (:mod:`offload.kernels.cpu_quant`), and the rest the torch reference.
``backend="triton"`` on CPU runs the
kernels under Triton's interpreter, which needs TRITON_INTERPRET=1 set before the kernel module is
first imported (the tests do this). :func:`last_backend` tells which one ran.

Arguments are checked before launch: shapes, dtypes, devices and unit stride in the head dim.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import OffloadError
from . import cpu_attention, cpu_int8_gemv, reference
from .int4_pack import unpack_buffer

_last_backend = {"name": None}
# Row ranges per thread of the int8 product: a few, so that a slow thread on a busy machine is not
# waited for long.
INT8_TASKS_PER_THREAD = 4


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16, AMX, or the AVX-512
    path oneDNN runs them on). On AVX2 alone torch falls back to a scalar path: measured on an AVX2
    EPYC (2 threads), [3,1024,64] @ [3,64,4096] takes 3.3 s in bf16 against 65 ms in fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bf16 either
        return False


def last_backend() -> str | None:
    """The backend ("triton" or "torch") that served the most recent call."""
    return _last_backend["name"]


def _triton_module():
    try:
        from . import triton_attention
    except ImportError as e:  # pragma: no cover - triton is a Linux dependency
        raise OffloadError(f"the Triton kernels need triton (pip install triton==3.7.1): {e}") from None
    return triton_attention


def _triton_quant():
    try:
        from . import triton_quant
    except ImportError as e:  # pragma: no cover - triton is a Linux dependency
        raise OffloadError(f"the Triton kernels need triton (pip install triton==3.7.1): {e}") from None
    return triton_quant


def int4_nibbles_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
                        backend: str = "auto") -> torch.Tensor:
    """x [M, K] @ W^T for an int4 weight in the nibbles layout (the GPU's: packed uint8 [N, K/2], byte
    j of a row holding inputs 2j and 2j + 1 in its low and high nibbles; scales_zeros [G, N, 2], one
    (scale, zero) per ``group`` inputs). Returns [M, N] in x's dtype.

    ``backend="auto"``: the Triton kernel (:mod:`offload.kernels.triton_quant`) on a GPU, the torch
    reference (dequantize, then multiply) elsewhere; "triton" or "torch" force one."""
    name = resolve_backend(x.device, backend)
    _last_backend["name"] = name
    M, K = x.shape if x.dim() == 2 else (None, None)
    N = packed.shape[0]
    if K is None or packed.dtype != torch.uint8 or packed.dim() != 2 or 2 * packed.shape[1] != K:
        raise ValueError(f"int4_nibbles_linear needs x [M, K] and packed uint8 [N, K/2]; got x {tuple(x.shape)}, "
                         f"packed {tuple(packed.shape)} {packed.dtype}")
    if K % group or tuple(scales_zeros.shape) != (K // group, N, 2):
        raise ValueError(f"int4_nibbles_linear needs scales_zeros [K/group, N, 2] = [{K // group}, {N}, 2] with "
                         f"group dividing K = {K}; got {tuple(scales_zeros.shape)}, group {group}")
    if name == "torch":
        return reference.int4_nibbles_linear_ref(x, packed, scales_zeros).to(x.dtype)
    _check(packed.device == x.device == scales_zeros.device, "x, packed and scales_zeros must be on one device")
    return _triton_quant().int4_nibbles_linear(x.contiguous(), packed.contiguous(), scales_zeros.contiguous(), group)


def resolve_backend(device: torch.device, backend: str = "auto") -> str:
    if backend not in ("auto", "triton", "torch"):
        raise OffloadError(f"unknown kernel backend '{backend}': use auto, triton or torch"
                           + (" (numba: gather_attention and kv_decode_attention only)" if backend == "numba" else ""))
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        try:
            _triton_module()
        except OffloadError:
            return "torch"
        return "triton"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise OffloadError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before offload.kernels "
                           "is imported; use backend='torch' (the CPU path) otherwise")
    return backend


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_common(q, selected, num_selected, num_kv_heads):
    # each message is built only when its check fails (a decode step runs these per sparse layer)
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D], got {tuple(q.shape)}")
    B, H, D = q.shape
    if H % num_kv_heads:
        raise ValueError(f"{H} query heads are not a multiple of {num_kv_heads} KV heads")
    if not (D % 16 == 0 and D & (D - 1) == 0):
        raise ValueError(f"head_dim must be a power of two >= 16, got {D}")
    if not (selected.dim() == 3 and tuple(selected.shape[:2]) == (B, num_kv_heads)):
        raise ValueError(f"selected must be [B, Hkv, S] = [{B}, {num_kv_heads}, S], got {tuple(selected.shape)}")
    if selected.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"selected must be int32/int64, got {selected.dtype}")
    if tuple(num_selected.shape) != (B, num_kv_heads):
        raise ValueError(f"num_selected must be [B, Hkv], got {tuple(num_selected.shape)}")
    _check(q.stride(-1) == 1 and selected.stride(-1) == 1, "q and selected need unit stride in the last dim")


def gather_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, selected: torch.Tensor,
                     num_selected: torch.Tensor, seq_lens: torch.Tensor, *, scale: float, sink: int = 0,
                     window: int = 0, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                     backend: str = "auto", arrays: CacheArrays | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over the dense part (``sink`` first + ``window`` last tokens) plus the
    selected token ids of each KV head. Returns (out [B, H, D], lse [B, H] fp32).
    See :mod:`offload.kernels.reference` for the exact contract. ``backend``: "auto" (Triton on
    CUDA; on CPU the numba kernel, which reads the listed rows where they lie, for int8, bf16 and
    fp32 caches; torch otherwise), "triton", "numba" or "torch". An int8 cache (codes, with per-token
    scales ``k_scale``/``v_scale`` [B, Hkv, N]) is read by the numba kernel or dequantized by torch
    after the gather; the Triton kernel takes float caches only. ``arrays``: the cache's
    :class:`CacheArrays` (made once by its owner), so that the numba path converts nothing."""
    _check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "k_cache and v_cache must be equal [B, Hkv, N, D]")
    B, Hkv, N, D = k_cache.shape
    _check_common(q, selected, num_selected, Hkv)
    if not (q.shape[0] == B and q.shape[2] == D):
        raise ValueError(f"q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)}")
    if tuple(seq_lens.shape) != (B,):
        raise ValueError(f"seq_lens must be [B], got {tuple(seq_lens.shape)}")
    _check(k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "k_cache/v_cache need unit stride in head_dim")
    quantized = k_cache.dtype == torch.int8
    if quantized:
        _check(v_cache.dtype == torch.int8 and k_scale is not None and v_scale is not None
               and k_scale.shape == v_scale.shape == k_cache.shape[:3],
               "an int8 cache needs k_scale and v_scale [B, Hkv, N] (and int8 values)")
    else:
        _check(q.dtype == k_cache.dtype == v_cache.dtype, "q, k_cache and v_cache must share a dtype")
        _check(k_scale is None and v_scale is None, "k_scale/v_scale belong to an int8 cache only")
    _check(sink >= 0 and window >= 0, "sink and window must be >= 0")
    if backend == "numba" or (backend == "auto" and q.device.type == "cpu" and k_cache.dtype in NUMBA_DTYPES):
        if not (q.device.type == "cpu" and k_cache.dtype in NUMBA_DTYPES):
            raise ValueError(f"the numba gather reads int8, bf16 or fp32 caches on CPU, got {k_cache.dtype} on "
                             f"{q.device}")
        _last_backend["name"] = "numba"
        if arrays is not None:
            arrays.check_views_of(k_cache)
        cache = arrays.parts if arrays is not None else _cache_arrays(k_cache, v_cache, k_scale, v_scale)
        return _gather_numba(q, cache, selected, num_selected, seq_lens, scale, sink, window)
    name = resolve_backend(q.device, backend)
    _last_backend["name"] = name
    if name == "torch":
        return reference.gather_attention_ref(q, k_cache, v_cache, selected, num_selected, seq_lens, scale,
                                              sink, window, k_scale, v_scale)
    _check(not quantized, "the Triton gather takes float caches: dequantize, or gather on CPU")
    return _triton_module().gather_attention(q, k_cache, v_cache, selected, num_selected, seq_lens, scale,
                                             sink, window)


def shadowkv_attention(q: torch.Tensor, u: torch.Tensor, sv: torch.Tensor, v_selected: torch.Tensor,
                       selected: torch.Tensor, num_selected: torch.Tensor, inv_freq: torch.Tensor, *,
                       scale: float, attention_scaling: float = 1.0,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over selected tokens whose keys are rebuilt from low-rank pre-RoPE factors
    (u [B, N, R] @ sv [B, R, Hkv*D]) and rotated at their positions in-kernel; values come from
    v_selected [B, Hkv, S, D] in selection order. Returns (out [B, H, D], lse [B, H])."""
    B, H, D = q.shape
    _check(v_selected.dim() == 4, f"v_selected must be [B, Hkv, S, D], got {tuple(v_selected.shape)}")
    Hkv = v_selected.shape[1]
    _check_common(q, selected, num_selected, Hkv)
    _check(tuple(v_selected.shape) == (B, Hkv, selected.shape[2], D),
           f"v_selected must be [B, Hkv, S, D] = {(B, Hkv, selected.shape[2], D)}, got {tuple(v_selected.shape)}")
    _check(u.dim() == 3 and u.shape[0] == B, f"u must be [B, N, R], got {tuple(u.shape)}")
    _check(tuple(sv.shape) == (B, u.shape[2], Hkv * D), f"sv must be [B, R, Hkv*D] = {(B, u.shape[2], Hkv * D)}, "
                                                        f"got {tuple(sv.shape)}")
    _check(tuple(inv_freq.shape) == (D // 2,) and inv_freq.dtype == torch.float32, "inv_freq must be fp32 [D/2]")
    _check(u.stride(-1) == 1 and sv.stride(-1) == 1 and v_selected.stride(-1) == 1,
           "u, sv and v_selected need unit stride in the last dim")
    name = resolve_backend(q.device, backend)
    _last_backend["name"] = name
    if name == "torch":
        return reference.shadowkv_attention_ref(q, u, sv, v_selected, selected, num_selected, inv_freq, scale,
                                                attention_scaling)
    return _triton_module().shadowkv_attention(q, u, sv, v_selected, selected, num_selected, inv_freq, scale,
                                               attention_scaling)


def merge_attention(outs: torch.Tensor | list[torch.Tensor], lses: torch.Tensor | list[torch.Tensor], *,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial results over disjoint key sets: outs [P, B, H, D] and lses [P, B, H] (or lists,
    e.g. one part computed on the CPU) into the exact softmax over their union. Two CPU parts [B, H,
    D] in bf16 or fp32 (rows of unit stride, any layout otherwise) merge in one compiled pass ("auto";
    numba), as the torch reference would."""
    if backend == "auto" and _merges_in_one_pass(outs, lses):
        return _merge_two_numba(outs[0], lses[0], outs[1], lses[1])
    if isinstance(outs, (list, tuple)):
        device = outs[0].device
        outs = torch.stack([o.to(device) for o in outs])
        lses = torch.stack([torch.as_tensor(x).to(device, torch.float32) for x in lses])
    _check(outs.dim() == 4 and lses.shape == outs.shape[:3], f"outs [P, B, H, D] and lses [P, B, H] do not match: "
                                                             f"{tuple(outs.shape)} vs {tuple(lses.shape)}")
    _check(outs.stride(-1) == 1, "outs need unit stride in the last dim")
    name = resolve_backend(outs.device, backend)
    _last_backend["name"] = name
    if name == "torch":
        return reference.merge_attention_ref(outs, lses)
    return _triton_module().merge_attention(outs, lses.float())


def _merges_in_one_pass(outs, lses) -> bool:
    """Two CPU parts of one shape in bf16 or fp32 (rows of unit stride), with fp32 lses: the compiled merge."""
    if len(outs) != 2 or len(lses) != 2:
        return False
    first, second = outs[0], outs[1]
    return (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor) and first.dim() == 3
            and first.shape == second.shape and first.dtype == second.dtype
            and first.dtype in (torch.bfloat16, torch.float32) and first.is_cpu and second.is_cpu
            and first.stride(-1) == 1 and second.stride(-1) == 1
            and all(isinstance(x, torch.Tensor) and x.shape == first.shape[:2] and x.dtype == torch.float32
                    and x.is_cpu for x in lses))


def _merge_two_numba(first: torch.Tensor, first_lse: torch.Tensor, second: torch.Tensor,
                     second_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_attention` of two CPU parts [B, H, D] in one compiled pass (:func:`cpu_decode.merge_two`)."""
    from . import cpu_decode  # numba compiles (or loads from its cache) on first use

    out = torch.empty_like(first)  # [B, H, D], laid out as first is
    lse = torch.empty_like(first_lse)  # [B, H]
    cpu_decode.set_threads(torch.get_num_threads())
    cpu_decode.merge_two(_bits(first), first_lse.numpy(), _bits(second), second_lse.numpy(), _bits(out), lse.numpy())
    return out, lse


def kv_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: list[int], hi: list[int], *,
                        scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                        backend: str = "auto", arrays: CacheArrays | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of q [B, H, D] over a whole KV cache k/v [B, Hkv, N, D], row b seeing tokens
    lo[b]..hi[b]-1 (host ints), read in place: an int8 cache (codes, with per-token scales
    ``k_scale``/``v_scale`` [B, Hkv, N] of any float dtype) is never dequantized into a copy, and
    a bf16 or fp32 cache skips the torch matmuls (bf16 ones run at a fraction of the memory's speed
    on CPU). Pass the whole cache, not a slice of it: lo/hi bound the read, and the kernel is
    compiled for contiguous arrays (a strided view is copied first).
    Returns (out [B, H, D] in q's dtype, lse [B, H] fp32).

    ``backend="auto"``: the numba kernels (:mod:`offload.kernels.cpu_decode`) for CPU tensors, the
    torch reference (widen or dequantize, then attend) elsewhere; "numba" or "torch" force one.
    ``arrays``: the :class:`CacheArrays` of the cache k/v/k_scale/v_scale are the first rows of, made
    once by the cache's owner (the numba path then converts none of them).
    Called once per layer per decode step: the checks build no message unless one fails."""
    if backend not in ("auto", "numba", "torch"):
        raise OffloadError(f"unknown KV decode attention backend '{backend}': use auto, numba or torch")
    B, Hkv, N, D = k.shape
    H = q.shape[1]
    quantized = k.dtype == torch.int8
    if not (q.dim() == 3 and q.shape[0] == B and q.shape[2] == D and H % Hkv == 0 and v.shape == k.shape):
        raise ValueError(f"KV decode attention needs q [B, H, D] and k/v [B, Hkv, N, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} / {tuple(v.shape)}")
    if k.dtype not in (torch.int8, torch.bfloat16, torch.float32) or v.dtype != k.dtype:
        raise ValueError(f"the KV cache must be int8 codes, bf16 or fp32 (both alike), got {k.dtype} / {v.dtype}")
    if quantized != (k_scale is not None and v_scale is not None) or (
            quantized and not k_scale.shape == v_scale.shape == k.shape[:3]):
        raise ValueError("an int8 KV cache needs k_scale and v_scale [B, Hkv, N] (and a float cache none)")
    if len(lo) != B:
        raise ValueError(f"lo/hi must be {B} visible ranges, got {list(lo)} / {list(hi)}")
    ranges = DecodeRanges(lo, hi, Hkv, N)
    name = ("numba" if q.device.type == "cpu" else "torch") if backend == "auto" else backend
    _last_backend["name"] = name
    if name == "torch":
        bounds = torch.tensor([list(lo), list(hi)], device=q.device)  # [2, B]
        return reference.kv_decode_attention_ref(q, k, v, bounds[0], bounds[1], scale, k_scale, v_scale)
    if q.device.type != "cpu":
        raise ValueError("the numba KV decode kernels run on CPU tensors")
    if arrays is not None:
        arrays.check_views_of(k)
        return arrays.attend(q, ranges, scale)
    return _attend_numba(q, _cache_arrays(k, v, k_scale, v_scale), NO_IDS, ranges.lo, ranges.hi, scale, ranges.longest)


class DecodeRanges:
    """The tokens each row of one decode step sees, lo[b]..hi[b]-1 (host ints), as the numba kernel
    takes them ([B, Hkv] bounds, every KV head of a row alike), checked once: every layer of the step
    shares them (built and checked per layer, they cost about what the kernel does over 512 tokens)."""

    def __init__(self, lo: Sequence[int], hi: Sequence[int], num_kv_heads: int, capacity: int):
        if len(lo) != len(hi) or not lo or not all(0 <= a < b <= capacity for a, b in zip(lo, hi)):
            raise ValueError(f"lo/hi must be visible ranges with 0 <= lo < hi <= {capacity}, one per row; "
                             f"got {list(lo)} / {list(hi)}")
        self.rows, self.num_kv_heads, self.capacity = len(lo), num_kv_heads, capacity
        self.lo = np.repeat(np.asarray(lo, np.int64)[:, None], num_kv_heads, axis=1)  # [B, Hkv]
        self.hi = np.repeat(np.asarray(hi, np.int64)[:, None], num_kv_heads, axis=1)  # [B, Hkv]
        self.longest = max(b - a for a, b in zip(lo, hi))
        self.addresses = (self.lo.ctypes.data, self.hi.ctypes.data)  # what the C kernel takes
        self._splits: dict[int, int] = {}  # threads -> the kernel's tokens per task

    def split(self, threads: int) -> int:
        """The kernel's tokens per parallel task on ``threads`` threads: the same for every layer."""
        split = self._splits.get(threads)
        if split is None:
            from . import cpu_decode

            split = self._splits[threads] = cpu_decode.split_tokens(self.longest, self.rows * self.num_kv_heads,
                                                                    threads)
        return split


# Input rows up to which the grouped-int8 product runs its row-by-row kernel (the codes widened once
# per output row and input row); more rows dequantize a block of weight rows to fp32 and hand it to
# the BLAS GEMM, whose cost barely grows with the rows (measured on a 2-core AVX2 EPYC: 3072 x 576,
# kernel / GEMM 0.70 / 2.88 ms at 4 rows, 2.92 / 3.57 at 16, 11.5 / 6.0 at 64; 4096 x 4096,
# 27.4 / 58.5 ms at 16, 93.1 / 54.5 at 64).
INT8_GROUP_KERNEL_ROWS = 24
# Bytes of weight rows dequantized at a time for the GEMM path (in the GEMM's dtype: bf16 where the
# CPU has native bf16 products, else fp32), in a buffer kept per thread.
INT8_DEQUANT_BLOCK_BYTES = 4 << 20


class Int8Arrays:
    """numpy views of an int8 weight's codes [N, K] and scales [N, G] (CPU, contiguous), made and
    checked once by the weight's owner: a decode step calls the kernel for every projection, and
    turning parameters into arrays (and checking them) each time cost more than a small product."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        N, K = codes.shape
        if not (codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.dim() == 2
                and scales.shape[0] == N and scales.shape[1] > 0 and K % scales.shape[1] == 0
                and {codes.device.type, scales.device.type} == {"cpu"}
                and codes.is_contiguous() and scales.is_contiguous()):
            raise ValueError(f"int8 arrays need contiguous CPU codes int8 [N, K] and scales fp32 [N, G] with G "
                             f"dividing K; got codes {tuple(codes.shape)} {codes.dtype}, scales "
                             f"{tuple(scales.shape)} {scales.dtype}")
        self.codes, self.scales = codes.detach().numpy(), scales.detach().numpy()
        self.addresses = (self.codes.ctypes.data, self.scales.ctypes.data)  # what the C kernel takes

    def are_views_of(self, codes: torch.Tensor, scales: torch.Tensor) -> bool:
        """Whether these still view ``codes`` and ``scales`` (a weight refilled in place keeps them)."""
        return self.codes.ctypes.data == codes.data_ptr() and self.scales.ctypes.data == scales.data_ptr()


def int8_group_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, backend: str = "auto",
                      arrays: Int8Arrays | None = None) -> torch.Tensor:
    """x [M, K] (any float dtype) @ W^T for W = codes [N, K] int8 * scales [N, G] fp32, one scale per
    group of K / G consecutive input columns of each output row. Returns [M, N] fp32.

    ``backend="auto"``: the numba kernels (:mod:`offload.kernels.cpu_quant`) for CPU tensors, the
    Triton kernel (:mod:`offload.kernels.triton_quant`) on a GPU, the torch reference (dequantize,
    then multiply) where Triton does not import; "numba", "triton" or "torch" force one.
    ``arrays``: the :class:`Int8Arrays` of codes and scales, made once by their owner (the numba
    path then converts and checks neither)."""
    if backend not in ("auto", "numba", "triton", "torch"):
        raise OffloadError(f"unknown int8 product backend '{backend}': use auto, numba, triton or torch")
    if backend == "auto":
        name = "numba" if x.device.type == "cpu" else resolve_backend(x.device)
    else:
        name = resolve_backend(x.device, backend) if backend != "numba" else backend
    _last_backend["name"] = name
    if arrays is None:
        N, K = codes.shape
        if not (codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.dim() == 2
                and scales.shape[0] == N and scales.shape[1] > 0 and K % scales.shape[1] == 0):
            raise ValueError(f"int8_group_linear needs codes int8 [N, K] and scales fp32 [N, G] with G dividing K; "
                             f"got codes {tuple(codes.shape)} {codes.dtype}, scales {tuple(scales.shape)} {scales.dtype}")
    else:
        N, K = arrays.codes.shape
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"int8_group_linear needs x [M, {K}]; got {tuple(x.shape)}")
    if name == "torch":
        return reference.int8_group_linear_ref(x, codes, scales)
    if name == "triton":
        _check(codes.device == x.device == scales.device, "x, codes and scales must be on one device")
        return _triton_quant().int8_group_linear(x.contiguous(), codes.contiguous(), scales.contiguous())
    if x.device.type != "cpu":
        raise ValueError("the numba int8 kernels run on CPU tensors")
    if arrays is None:
        arrays = Int8Arrays(codes.contiguous(), scales.contiguous())
    M = x.shape[0]
    if cpu_int8_gemv.takes(M, K, arrays.scales.shape[1]):
        _last_backend["name"] = "c"
        return cpu_int8_gemv.int8_gemv(x, *arrays.addresses, N, K, arrays.scales.shape[1])  # [M, N]
    from . import cpu_decode, cpu_quant  # numba compiles (or loads from its cache) on first use

    cpu_decode.set_threads(torch.get_num_threads())
    codes_np, scales_np = arrays.codes, arrays.scales
    if M <= INT8_GROUP_KERNEL_ROWS:
        out = torch.empty(M, N, dtype=torch.float32)  # [M, N]
        cpu_quant.int8_group_matmul(codes_np, scales_np, x.float().contiguous().numpy(), out.numpy(),
                                    cpu_decode.threads() * INT8_TASKS_PER_THREAD)
        return out
    # Many rows: blocks of rows dequantized for the GEMM, in bf16 for bf16 x on a CPU with native bf16
    # products (AMX: about 3x the fp32 GEMM), as the int4 product does.
    gemm_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 and cpu_has_fast_bf16() else torch.float32
    xg = x.to(gemm_dtype).contiguous()  # [M, K]
    out = torch.empty(M, N, dtype=gemm_dtype)  # [M, N]
    rows = max(1, INT8_DEQUANT_BLOCK_BYTES // (gemm_dtype.itemsize * K))
    block = unpack_buffer(min(rows, N) * K, gemm_dtype).view(-1, K)  # [rows, K], kept between calls
    for r in range(0, N, rows):
        w = block[:min(rows, N - r)]  # [n, K]
        cpu_quant.int8_group_dequantize(codes_np[r:r + rows], scales_np[r:r + rows], _bits(w))
        if w.shape[0] == N:
            torch.mm(xg, w.t(), out=out)  # [M, N]: one block, no copy
        else:
            out[:, r:r + rows] = xg @ w.t()  # [M, n]
    return out


class CacheArrays:
    """numpy views of one layer's KV cache on the CPU, made once per allocation by its owner, for
    the numba kernels: k/v [R, Hkv, N, D] (int8 codes, bf16 as its bits, or fp32) and, for int8
    codes, their scales k_scale/v_scale [R, Hkv, N] (fp32, or bf16 as its bits). Turning a tensor
    into a numpy array costs four dispatcher calls; a decode step would pay them for every part of
    every layer."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None):
        quantized = k.dtype == torch.int8
        if not (k.dtype == v.dtype and k.dtype in NUMBA_DTYPES and k.shape == v.shape and k.dim() == 4
                and {t.device.type for t in (k, v)} == {"cpu"} and quantized == (k_scale is not None)
                and quantized == (v_scale is not None)
                and (not quantized or (k_scale.dtype == v_scale.dtype and k_scale.dtype in (torch.bfloat16, torch.float32)
                                       and k_scale.shape == v_scale.shape == k.shape[:3]
                                       and {k_scale.device.type, v_scale.device.type} == {"cpu"}))):
            raise ValueError(f"cache arrays need CPU k/v [R, Hkv, N, D] (int8 codes with scales [R, Hkv, N] in bf16 "
                             f"or fp32, or bf16 / fp32 without); got k {tuple(k.shape)} {k.dtype}, scales "
                             f"{None if k_scale is None else (tuple(k_scale.shape), k_scale.dtype)}")
        self.dtype = k.dtype  # the cache's
        self.scale_dtype = k_scale.dtype if quantized else None
        self.k, self.v = _bits(k), _bits(v)
        # a float cache's scales: never read, a placeholder of the kernel's type
        self.k_scale, self.v_scale = (_bits(k_scale), _bits(v_scale)) if quantized else (_NO_SCALES, _NO_SCALES)
        self.c_cache = (self.k.ctypes.data, self.v.ctypes.data, *self.k.shape)  # what the C kernel takes

    @property
    def parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(k, k_scale, v, v_scale): what the decode kernel takes."""
        return self.k, self.k_scale, self.v, self.v_scale

    def attend(self, q: torch.Tensor, ranges: DecodeRanges, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode attention of q [B, H, D] (CPU) over cache rows 0..B-1 within the step's ``ranges``:
        (out [B, H, D] in q's dtype, lse [B, H] fp32). :func:`kv_decode_attention`'s numba path,
        checked against these views only (a decode step calls it once per layer)."""
        R, Hkv, N, D = self.k.shape
        if not (q.dim() == 3 and q.shape[0] == ranges.rows <= R and q.shape[2] == D and q.shape[1] % Hkv == 0
                and ranges.num_kv_heads == Hkv and ranges.capacity == N and q.device.type == "cpu"):
            raise ValueError(f"attend needs CPU q [B, H, D] for a cache of {R} rows x {Hkv} KV heads x {N} tokens x "
                             f"{D} and ranges of B rows over {Hkv} heads and {N} tokens; got q {tuple(q.shape)}, "
                             f"ranges of {ranges.rows} rows, {ranges.num_kv_heads} heads, {ranges.capacity} tokens")
        if q.dtype == torch.bfloat16 and cpu_attention.takes(self.k, q.shape[1]):
            return cpu_attention.store_and_attend(q, None, None, None, self.c_cache, ranges.addresses, scale)
        threads = torch.get_num_threads()
        return _attend_numba(q, self.parts, NO_IDS, ranges.lo, ranges.hi, scale, ranges.longest, threads,
                             ranges.split(threads))

    def store_and_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch,
                         ranges: DecodeRanges, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`store_kv` of a decode step's new token a row (k/v [B, Hkv, 1, D], at the cache rows
        and positions of ``batch``, a ForwardBatch) then :meth:`attend`: on a bf16 cache where the C
        kernel takes it, one call for both."""
        if (q.dtype == k.dtype == v.dtype == torch.bfloat16 == self.dtype and k.shape[2] == 1
                and cpu_attention.takes(self.k, q.shape[1])):
            R, Hkv, N, D = self.k.shape
            B = q.shape[0]
            if not (q.dim() == 3 and q.shape[2] == D and ranges.rows == B and ranges.num_kv_heads == Hkv
                    and ranges.capacity == N and k.shape == v.shape == (B, Hkv, 1, D) and k.is_cpu and v.is_cpu):
                raise ValueError(f"store_and_attend needs q [B, H, {D}], k/v [B, {Hkv}, 1, {D}] on the CPU and ranges "
                                 f"of B rows over {Hkv} heads and {N} tokens; got q {tuple(q.shape)}, k "
                                 f"{tuple(k.shape)}, v {tuple(v.shape)}, ranges of {ranges.rows} rows")
            return cpu_attention.store_and_attend(q, k, v, batch.store_addresses, self.c_cache, ranges.addresses, scale)
        store_kv(k, v, self, *batch.store_at)
        return self.attend(q, ranges, scale)

    def gather(self, q: torch.Tensor, dense: np.ndarray, selected: np.ndarray, counts: np.ndarray,
               scale: float, estimate: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse decode attention of q [B, H, D] (CPU) over cache rows 0..B-1: each (row, KV head)
        attends the step's dense ids dense [B, Nd] int32 (sinks and window, -1: none;
        :func:`dense_id_lists`) and the first counts [B, Hkv] of its selected ids [B, Hkv, S] int32.
        :func:`gather_attention`'s numba path, checked against these views only (a decode step calls
        it once per sparse layer, where gather_attention's checks cost about what the kernel does).
        ``estimate``: (out [B, H, D], lse [B, H]) fp32 C-contiguous, a partial result over tokens
        not attended (lse -inf: none), merged into the result by log-sum-exp (the C kernel merges
        before it rounds; a cluster index's estimation zone)."""
        R, Hkv, N, D = self.k.shape
        B = q.shape[0]
        if not (q.dim() == 3 and B <= R and q.shape[2] == D and q.shape[1] % Hkv == 0 and q.device.type == "cpu"
                and dense.ndim == 2 and dense.shape[0] == B and selected.dtype == np.int32
                and selected.shape[:2] == (B, Hkv) and counts.shape == (B, Hkv)):
            raise ValueError(f"gather needs CPU q [B, H, D] for a cache of {R} rows x {Hkv} KV heads x {D}, dense ids "
                             f"[B, Nd], int32 selected ids [B, {Hkv}, S] and counts [B, {Hkv}]; got q {tuple(q.shape)}, "
                             f"dense {dense.shape}, selected {selected.shape} {selected.dtype}, counts {counts.shape}")
        if estimate is not None and not (estimate[0].shape == tuple(q.shape) and estimate[1].shape == tuple(q.shape[:2])
                                         and estimate[0].dtype == estimate[1].dtype == np.float32
                                         and estimate[0].flags.c_contiguous and estimate[1].flags.c_contiguous):
            raise ValueError(f"gather's estimate needs C-contiguous fp32 out {tuple(q.shape)} and lse "
                             f"{tuple(q.shape[:2])}; got {estimate[0].shape} {estimate[0].dtype}, {estimate[1].shape}")
        if q.dtype == torch.bfloat16 and cpu_attention.takes(self.k, q.shape[1]):
            ids, lo, hi = _id_lists(dense, selected, counts)  # [B, Hkv, M], [B, Hkv] x2
            return cpu_attention.store_and_attend(
                q, None, None, None, self.c_cache, (lo.ctypes.data, hi.ctypes.data), scale,
                ids=(ids.ctypes.data, ids.shape[2]),
                estimate=(None, None) if estimate is None else (estimate[0].ctypes.data, estimate[1].ctypes.data))
        out, lse = _attend_lists(q, self.parts, dense, selected, counts, scale)
        if estimate is None:
            return out, lse
        merged, lse = _merge_two_numba(out.float(), lse, torch.from_numpy(estimate[0]), torch.from_numpy(estimate[1]))
        return merged.to(out.dtype), lse

    def check_views_of(self, k: torch.Tensor) -> None:
        """These must be the arrays of the cache ``k`` is (the first rows of)."""
        if self.k.ctypes.data != k.data_ptr() or self.dtype != k.dtype:
            raise ValueError("arrays= must be the numpy views of the cache k is the first rows of")


class KiviArrays:
    """numpy views of one layer's KIVI cache on the CPU (offload.tiers.kv_kivi), made once per
    allocation by its owner: codes k_codes/v_codes [R, Hkv, N, P] uint8 (``bits`` per code), key
    scale and minimum [R, Hkv, K, D] per group of ``group`` tokens, value scale and minimum [R, Hkv,
    N, C] per token and channel group, the rows kept unquantized k_kept/v_kept [R, Hkv, F, D] (the
    floats all bf16 or all fp32)."""

    def __init__(self, k_codes: torch.Tensor, v_codes: torch.Tensor, k_scale: torch.Tensor, k_min: torch.Tensor,
                 v_scale: torch.Tensor, v_min: torch.Tensor, k_kept: torch.Tensor, v_kept: torch.Tensor,
                 group: int, bits: int):
        R, Hkv, N, P = k_codes.shape
        D = k_scale.shape[-1]
        floats = (k_scale, k_min, v_scale, v_min, k_kept, v_kept)
        if not (k_codes.dtype == v_codes.dtype == torch.uint8 and v_codes.shape == k_codes.shape
                and bits in (2, 4) and P * 8 // bits == D and k_scale.shape == k_min.shape == (R, Hkv, -(-N // group), D)
                and v_scale.shape == v_min.shape and v_scale.shape[:3] == (R, Hkv, N) and D % v_scale.shape[3] == 0
                and k_kept.shape == v_kept.shape and k_kept.shape[:2] == (R, Hkv) and k_kept.shape[3] == D
                and len({t.dtype for t in floats}) == 1 and k_scale.dtype in (torch.bfloat16, torch.float32)
                and {t.device.type for t in (k_codes, v_codes, *floats)} == {"cpu"}):
            raise ValueError(f"KIVI arrays need CPU uint8 codes [R, Hkv, N, D * bits / 8], key scales [R, Hkv, "
                             f"ceil(N / group), D], value scales [R, Hkv, N, C] and kept rows [R, Hkv, F, D] in bf16 "
                             f"or fp32; got codes {tuple(k_codes.shape)} {k_codes.dtype}, key scales "
                             f"{tuple(k_scale.shape)} {k_scale.dtype}, value scales {tuple(v_scale.shape)}, kept "
                             f"{tuple(k_kept.shape)} {k_kept.dtype}, {bits} bits")
        self.group, self.bits, self.head_dim = group, bits, D
        self.parts = tuple(_bits(t) for t in (k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_kept, v_kept))

    def attend(self, q: torch.Tensor, bounds: np.ndarray, scale: float,
               longest: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode attention of q [B, H, D] (CPU) over cache rows 0..B-1: codes bounds[b, h, 0]..[1]-1
        and kept rows [2]..[3]-1 and [4]..[5]-1 ([B, Hkv, 6] int64; empty ranges allowed; checked in
        the kernel); ``longest`` the widest codes range when the caller knows it. Returns (out [B, H,
        D] fp32, lse [B, H] fp32; no token: out 0, lse -inf)."""
        from . import cpu_decode, cpu_kivi  # numba compiles (or loads from its cache) on first use

        k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_kept, v_kept = self.parts
        R, Hkv, N, _ = k_codes.shape
        B, H, D = q.shape
        F = k_kept.shape[2]
        if not (q.device.type == "cpu" and D == self.head_dim and H % Hkv == 0 and B <= R
                and bounds.shape == (B, Hkv, 6) and bounds.dtype == np.int64):
            raise ValueError(f"attend needs CPU q [B, H, {self.head_dim}] for {R} rows x {Hkv} KV heads and int64 "
                             f"bounds [B, Hkv, 6]; got q {tuple(q.shape)}, bounds {bounds.shape} {bounds.dtype}")
        qg = q.float().contiguous().view(B, Hkv, H // Hkv, D)  # [B, Hkv, G, D] fp32
        out = torch.empty(B, Hkv, H // Hkv, D, dtype=torch.float32)  # [B, Hkv, G, D]
        lse = torch.empty(B, Hkv, H // Hkv, dtype=torch.float32)  # [B, Hkv, G]
        threads = torch.get_num_threads()
        cpu_decode.set_threads(threads)
        if longest is None:
            longest = int((bounds[..., 1] - bounds[..., 0]).max())
        split = cpu_decode.split_tokens(max(1, longest), B * Hkv, threads)
        outside = cpu_kivi.kivi_decode_attention(qg.numpy(), k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_kept,
                                                 v_kept, self.group, self.bits, bounds, split, float(scale), out.numpy(),
                                                 lse.numpy())
        if outside:
            raise ValueError(f"{outside} (row, head) bounds lie outside {N} codes or {F} kept rows (0 <= lo <= hi)")
        return out.view(B, H, D), lse.view(B, H)

    def read(self, row: int, start: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of tokens start..end-1 of cache row ``row`` from their codes: k, v [Hkv,
        end - start, D] in ``dtype`` (bf16 or fp32), code x scale + minimum in fp32 rounded once,
        the bits of the torch form (offload.tiers.kv_kivi.KiviSpan.unpacked_codes). The kept rows
        are the caller's to lay over: their codes are whatever was last quantized there."""
        from . import cpu_decode, cpu_kivi  # numba compiles (or loads from its cache) on first use

        k_codes, k_scale, k_min, v_codes, v_scale, v_min, _, _ = self.parts
        R, Hkv, N, _ = k_codes.shape
        if not (0 <= row < R and 0 <= start <= end <= N and dtype in (torch.bfloat16, torch.float32)):
            raise ValueError(f"read needs a row below {R}, 0 <= start <= end <= {N} and bf16 or fp32; got row {row}, "
                             f"{start}..{end}, {dtype}")
        k = torch.empty(Hkv, end - start, self.head_dim, dtype=dtype)  # [Hkv, M, D]
        v = torch.empty_like(k)
        threads = torch.get_num_threads()
        cpu_decode.set_threads(threads)
        split = cpu_decode.split_tokens(max(1, end - start), Hkv, threads)
        cpu_kivi.kivi_unpack_range(k_codes, k_scale, k_min, v_codes, v_scale, v_min, row, start, self.group,
                                   self.bits, split, _bits(k), _bits(v))
        return k, v

    def take(self, row: int, ids: torch.Tensor, sinks: int, residual_at: int, done: int,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of tokens ids [Hkv, M] (each head its own) of cache row ``row``: k, v [Hkv,
        M, D] in ``dtype`` (bf16 or fp32); a token below ``sinks`` from its kept row, one from
        ``done`` on from kept row ``residual_at`` + t - done (the residual), the others from their
        codes, rounded as :meth:`read` rounds. An id outside the cache raises."""
        from . import cpu_kivi  # numba compiles (or loads from its cache) on first use

        R, Hkv, N, _ = self.parts[0].shape
        if not (0 <= row < R and ids.dim() == 2 and ids.shape[0] == Hkv and dtype in (torch.bfloat16, torch.float32)):
            raise ValueError(f"take needs a row below {R}, ids [{Hkv}, M] and bf16 or fp32; got row {row}, ids "
                             f"{tuple(ids.shape)}, {dtype}")
        at = ids.to("cpu", torch.int64).contiguous().numpy()  # [Hkv, M]
        k = torch.empty(Hkv, ids.shape[1], self.head_dim, dtype=dtype)  # [Hkv, M, D]
        v = torch.empty_like(k)
        outside = cpu_kivi.kivi_take(*self.parts, row, at, self.group, self.bits, sinks, residual_at, done, _bits(k),
                                     _bits(v))
        if outside:
            raise ValueError(f"{outside} token id(s) lie outside the cache's {N} tokens")
        return k, v


_NO_SCALES = np.ones((1, 1, 1), np.float32)


def _bits(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy (bf16, which numpy lacks, as its bits)."""
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def store_kv(k: torch.Tensor, v: torch.Tensor, cache: CacheArrays, rows: np.ndarray, starts: np.ndarray) -> None:
    """Put new keys and values k/v [B, Hkv, T, D] (CPU) into the ``cache`` in place, at cache row
    rows[b], positions starts[b]..+T-1 (int64 numpy [B]): int8 codes quantized as
    :func:`store_kv_int8` does, a bf16 or fp32 cache (k/v in its dtype) copied, in one numba call."""
    if cache.dtype == torch.int8:
        store_kv_int8(k, v, cache, rows, starts)
        return
    from . import cpu_decode  # numba compiles (or loads from its cache) on first use

    _check_store(k, v, cache, rows, starts, cache.dtype)
    # contiguous: one compiled signature (a prompt's k/v arrive as transposed views)
    if cpu_decode.store_tokens(_bits(k.contiguous()), _bits(v.contiguous()), cache.k, cache.v, rows, starts):
        _raise_outside(cache, rows, starts, k.shape[2])


def _check_store(k, v, cache: CacheArrays, rows, starts, dtype: torch.dtype) -> None:
    """New k/v [B, Hkv, T, D] in ``dtype`` on the CPU, and rows/starts [B] (whether they stay inside
    the cache the kernels check: numpy's min and max would cost more than the copy)."""
    B, Hkv, T, D = k.shape
    if not (v.shape == k.shape and k.dtype == v.dtype == dtype and k.is_cpu and v.is_cpu
            and cache.k.shape[1] == Hkv and cache.k.shape[3] == D and rows.shape == starts.shape == (B,)):
        raise ValueError(f"storing into a {cache.dtype} cache of {cache.k.shape[1]} KV heads of {cache.k.shape[3]} "
                         f"needs CPU k/v [B, Hkv, T, D] in {dtype} and rows/starts [B]; got k {tuple(k.shape)} "
                         f"{k.dtype}, v {tuple(v.shape)} {v.dtype}, rows {rows.shape}")


def _raise_outside(cache: CacheArrays, rows, starts, T: int) -> None:
    R, _, N, _ = cache.k.shape
    raise ValueError(f"storing rows {rows.tolist()} at {starts.tolist()}..+{T}: they lie outside the cache's {R} "
                     f"rows of {N} tokens")


def store_kv_int8(k: torch.Tensor, v: torch.Tensor, cache: CacheArrays, rows: np.ndarray,
                  starts: np.ndarray) -> None:
    """Quantize new keys and values k/v [B, Hkv, T, D] (CPU, in the cache's scale dtype) per token
    and KV head into the int8 ``cache`` in place, at cache row rows[b], positions starts[b]..+T-1
    (int64 numpy [B]). The numbers of ``offload.tiers.kv_codec.quantize_kv``, bit for bit, in one
    numba call: the tensor form costs a dozen ops and four slice copies per layer and step."""
    from . import cpu_decode  # numba compiles (or loads from its cache) on first use

    if cache.dtype != torch.int8:
        raise ValueError(f"store_kv_int8 needs an int8 cache; got a {cache.dtype} one")
    _check_store(k, v, cache, rows, starts, cache.scale_dtype)
    # contiguous: one compiled signature (a prompt's k/v arrive as transposed views)
    if cpu_decode.store_int8_tokens(_bits(k.contiguous()), _bits(v.contiguous()), cache.k, cache.v, cache.k_scale,
                                    cache.v_scale, rows, starts):
        _raise_outside(cache, rows, starts, k.shape[2])


# The numba kernel's "no id list": positions are token ids.
NO_IDS = np.zeros((0, 0, 0), np.int32)
# Cache dtypes the numba kernel reads in place (int8: codes with per-token scales).
NUMBA_DTYPES = (torch.int8, torch.bfloat16, torch.float32)


def _cache_arrays(k, v, k_scale, v_scale) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A cache as the numba kernel reads it (:attr:`CacheArrays.parts`), made contiguous for one
    call; an int8 cache's scales as held when bf16 or fp32, else widened to fp32."""
    if k.dtype == torch.int8:
        k_scale, v_scale = (s.contiguous() if s.dtype in (torch.bfloat16, torch.float32) else s.float().contiguous()
                            for s in (k_scale, v_scale))  # [B, Hkv, N]
    return CacheArrays(k.contiguous(), v.contiguous(), k_scale, v_scale).parts


def _attend_numba(q, cache: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ids: np.ndarray,
                  lo: np.ndarray, hi: np.ndarray, scale: float, longest: int, threads: int | None = None,
                  split: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The numba kernel over positions lo..hi-1 [B, Hkv] (of ``ids`` [B, Hkv, M], or token ids when
    empty; ``longest`` the widest range) of ``cache`` (:func:`_cache_arrays`; rows beyond q's B
    unread), on ``threads`` threads (torch's count if None) with ``split`` tokens per task (worked
    out if None). Returns (out [B, H, D] in q's dtype, lse [B, H])."""
    from . import cpu_decode  # numba compiles (or loads from its cache) on first use

    k, k_s, v, v_s = cache
    B, H, D = q.shape
    Hkv = k.shape[1]
    qg = q.float().contiguous().view(B, Hkv, H // Hkv, D)  # [B, Hkv, G, D] fp32
    out = torch.empty(B, Hkv, H // Hkv, D, dtype=torch.float32)  # [B, Hkv, G, D]
    lse = torch.empty(B, Hkv, H // Hkv, dtype=torch.float32)  # [B, Hkv, G]
    threads = torch.get_num_threads() if threads is None else threads
    cpu_decode.set_threads(threads)
    if split is None:
        split = cpu_decode.split_tokens(longest, B * Hkv, threads)
    N = k.shape[2]
    past = cpu_decode.decode_attention(qg.numpy(), k, k_s, v, v_s, ids,
                                       lo, hi, N, split, float(scale), out.numpy(), lse.numpy())
    if past:
        raise ValueError(f"{past} selected token id(s) lie past the cache's {N} tokens")
    return out.view(B, H, D).to(q.dtype), lse.view(B, H)


def _gather_numba(q, cache, selected, num_selected, seq_lens, scale, sink, window):
    """gather_attention through the numba kernel (:func:`_attend_lists`)."""
    dense = dense_id_lists(tuple(seq_lens.tolist()), sink, window)  # [B, Nd] int32
    return _attend_lists(q, cache, dense, selected.to(torch.int32).numpy(), num_selected.numpy(), scale)


def _attend_lists(q, cache, dense: np.ndarray, selected: np.ndarray, counts: np.ndarray,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The numba kernel over one id list per (row, KV head): the dense part dense [B, Nd] first (an
    id that does not exist in a short sequence is -1, skipped), then the first counts [B, Hkv] of the
    selection selected [B, Hkv, S] int32."""
    ids, lo, hi = _id_lists(dense, selected, counts)
    return _attend_numba(q, cache, ids, lo, hi, scale, int(hi.max()))


def _id_lists(dense: np.ndarray, selected: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One id list per (row, KV head), dense [B, Nd] then selected [B, Hkv, S] -> (ids [B, Hkv, Nd + S]
    int32, lo, hi [B, Hkv] int64: positions 0 .. Nd + counts - 1 of each list)."""
    B, Hkv, S = selected.shape
    Nd = dense.shape[1]
    ids = np.empty((B, Hkv, Nd + S), np.int32)  # [B, Hkv, Nd + S]
    ids[:, :, :Nd] = dense[:, None]
    ids[:, :, Nd:] = selected
    hi = Nd + counts.astype(np.int64)  # [B, Hkv]
    return ids, np.zeros_like(hi), hi


@functools.lru_cache(maxsize=8)
def dense_id_lists(seq_lens: tuple[int, ...], sink: int, window: int) -> np.ndarray:
    """The sinks' and the window's token ids [B, sink + window] int32 (-1: no such token in a short
    sequence), as :func:`reference.dense_token_ids` gives them: the same for every sparse layer of
    a decode step, so worked out once per step (per layer it cost twice the kernel at 4K)."""
    ids, valid = reference.dense_token_ids(torch.tensor(seq_lens), sink, window)  # [B, Nd] each
    dense = torch.where(valid, ids, -1).to(torch.int32).numpy()
    dense.setflags(write=False)  # shared by every call of the step
    return dense
