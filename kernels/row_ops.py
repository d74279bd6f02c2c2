"""The row operations of a transformer layer between its matrix products, for few rows on a CPU:
RMSNorm, the residual add fused with the next norm, RoPE with the split of the fused q|k|v
product, and the SiLU gate. Each is one numba call (:mod:`offload.kernels.cpu_glue`) computing
torch's numbers op for op (see there); :func:`row_ops_apply` says when rows take this path
(decode steps and short prompts on the CPU), the caller keeps the torch ops otherwise.

torch spends 20-40 tensor ops per layer on these between the four products, each a few
microseconds for a few hundred numbers; here they are four calls of 1-3 us each, the tensors
passed by address (a numpy view of a tensor costs 1 us, as much as the kernel).
"""

from __future__ import annotations

import numpy as np
import torch

# Up to this many rows (tokens of a batch) the numba kernels run: their loops are serial, torch's
# elementwise ops go parallel on long prompts where dispatch no longer matters.
ROW_OPS_MAX_ROWS = 64
# The compute dtypes the kernels take, and the 0-length array whose dtype tells them which.
_LIKE = {torch.bfloat16: np.empty(0, np.uint16), torch.float32: np.empty(0, np.float32)}


def row_ops_apply(x: torch.Tensor) -> bool:
    """Whether a model's rows ``x`` take the fused row kernels: bf16 rows on the CPU, at most
    ROW_OPS_MAX_ROWS of them. An fp32 model keeps torch's ops: there the norm's sum order and SiLU's
    exp would move results by an ulp, and the fp32 path is the one that matches transformers bit for
    bit (the kernels themselves take fp32 too). (``is_cpu``: a tenth of the cost of ``device.type``;
    a decode step asks eight times a layer.)"""
    return x.is_cpu and x.dtype == torch.bfloat16 and x.numel() <= ROW_OPS_MAX_ROWS * x.shape[-1]


def _takes(x: torch.Tensor) -> bool:
    """Whether the kernels take ``x``: CPU rows in bf16 or fp32, at most ROW_OPS_MAX_ROWS of them."""
    return x.is_cpu and x.dtype in _LIKE and x.numel() <= ROW_OPS_MAX_ROWS * x.shape[-1]


_kernels = {}


def _glue():
    """The kernel module, imported on first use (numba compiles, or loads from its cache, then)."""
    glue = _kernels.get("glue")
    if glue is None:
        from . import cpu_glue
        glue = _kernels["glue"] = cpu_glue
    return glue


def _check_rows(x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    if not (_takes(x) and (weight is None or (weight.dtype == x.dtype and weight.shape == (x.shape[-1],)
                                                     and weight.device.type == "cpu" and weight.is_contiguous()))):
        raise ValueError(f"the fused row ops take CPU rows [..., n] of at most {ROW_OPS_MAX_ROWS} tokens in bf16 or "
                         f"fp32 (and a contiguous weight [n] of their dtype); got x {tuple(x.shape)} {x.dtype} on "
                         f"{x.device}" + ("" if weight is None else f", weight {tuple(weight.shape)} {weight.dtype}"))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * F.rms_norm(x.float(), eps).to(x.dtype)`` for x [..., n]: the same shape and dtype."""
    _check_rows(x, weight)
    x = x.contiguous()
    return rms_norm_into(x, weight, eps, torch.empty_like(x))


def rms_norm_into(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """:func:`rms_norm` into ``out`` (x's shape and dtype), unchecked: x, weight and out contiguous
    rows the kernels take, checked once by a caller that reuses them (a decode step's buffers)."""
    n = x.shape[-1]
    _glue().rms_norm_at(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps, _LIKE[x.dtype])
    return out


def add_rms_norm(x: torch.Tensor, addend: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) with h = x + addend: a residual add and the norm after it, x/addend [..., n]."""
    _check_rows(x, weight)
    if addend.shape != x.shape or addend.dtype != x.dtype:
        raise ValueError(f"add_rms_norm adds rows of one shape and dtype; got {tuple(x.shape)} {x.dtype} and "
                         f"{tuple(addend.shape)} {addend.dtype}")
    x, addend = x.contiguous(), addend.contiguous()
    return add_rms_norm_into(x, addend, weight, eps, torch.empty_like(x), torch.empty_like(x))


def add_rms_norm_into(x: torch.Tensor, addend: torch.Tensor, weight: torch.Tensor, eps: float,
                      summed: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_rms_norm` into ``summed`` and ``out``, unchecked (as :func:`rms_norm_into`)."""
    n = x.shape[-1]
    _glue().add_rms_norm_at(x.data_ptr(), addend.data_ptr(), weight.data_ptr(), summed.data_ptr(), out.data_ptr(),
                            x.numel() // n, n, eps, _LIKE[x.dtype])
    return summed, out


def rope_split(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
               head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, T, (H + 2 Hkv) D] (the fused projection's output) -> q [B, H, T, D], k and v
    [B, Hkv, T, D], contiguous, q and k rotated by cos/sin [B, 1, T, D] (rotate-half RoPE) as
    ``RotaryEmbedding.apply`` rotates them."""
    B, T, width = qkv.shape
    H, Hkv, D = num_heads, num_kv_heads, head_dim
    if not (_takes(qkv) and width == (H + 2 * Hkv) * D and D % 2 == 0
            and cos.shape == sin.shape == (B, 1, T, D) and cos.dtype == sin.dtype == qkv.dtype):
        raise ValueError(f"rope_split needs CPU qkv [B, T, (H + 2 Hkv) D] = [B, T, {(H + 2 * Hkv) * D}] and cos/sin "
                         f"[B, 1, T, {D}] of its dtype; got qkv {tuple(qkv.shape)} {qkv.dtype}, cos "
                         f"{tuple(cos.shape)} {cos.dtype}")
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    return rope_split_into(qkv, cos, sin, torch.empty(B, H, T, D, dtype=qkv.dtype),
                           torch.empty(B, Hkv, T, D, dtype=qkv.dtype), torch.empty(B, Hkv, T, D, dtype=qkv.dtype))


def rope_split_into(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`rope_split` into q [B, H, T, D], k and v [B, Hkv, T, D] (contiguous, qkv's dtype),
    unchecked (as :func:`rms_norm_into`); qkv [B, T, (H + 2 Hkv) D] or [B T, ...] contiguous."""
    B, H, T, D = q.shape
    _glue().rope_split_at(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                          B, T, H, k.shape[1], D, _LIKE[qkv.dtype])
    return q, k, v


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` for gate_up [..., 2I] = [gate | up] -> [..., I]."""
    _check_rows(gate_up)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul needs rows [..., 2I]; got {tuple(gate_up.shape)}")
    gate_up = gate_up.contiguous()
    return silu_mul_into(gate_up, torch.empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2, dtype=gate_up.dtype))


def silu_mul_into(gate_up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`silu_mul` into ``out`` [..., I], unchecked (as :func:`rms_norm_into`)."""
    n = out.shape[-1]
    _glue().silu_mul_at(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * n), n, _LIKE[gate_up.dtype])
    return out
