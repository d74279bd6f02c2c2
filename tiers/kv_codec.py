"""The KV cache's per-token codecs, shared by the memory tiers (:mod:`offload.tiers.kv_store`) and
the disk tier's rows (:mod:`offload.tiers.kv_disk`).

- int8, symmetric per token and KV head: codes in -127..127, scale = max |x| / 127 (at least
  KV_SCALE_FLOOR) in the compute dtype; the compiled CPU writer computes the same numbers
  (``offload.kernels.cpu_decode.store_int8_tokens``).
- 4-bit, asymmetric per token over groups of channels: codes in 0..15 two per byte (channel 2j in
  the low nibble), a scale and a zero per group in the compute dtype (FlexGen's group-wise scheme).

Shapes: [..., D] one vector per token and KV head; G = D / group.
"""

from __future__ import annotations

import torch

from offload.kernels.reference import KV_CODE_MAX, KV_SCALE_FLOOR

KV_INT8_MAX = KV_CODE_MAX
INT4_CODE_MAX = 15


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> int8 codes [..., D] and scales [..., 1] (``dtype``): x ~ codes * scale."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / KV_INT8_MAX).clamp(min=KV_SCALE_FLOOR).to(dtype)  # [..., 1]
    codes = torch.round(x.float() / scale.float()).clamp(-KV_INT8_MAX, KV_INT8_MAX).to(torch.int8)  # [..., D]
    return codes, scale


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """codes [..., D] int8, scale [..., 1] -> [..., D] in ``dtype`` (default: the scale's)."""
    dtype = dtype or scale.dtype
    return codes.to(dtype) * scale.to(dtype)


def quantize_int4_rows(x: torch.Tensor, group: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> codes uint8 [..., D/2] and (scale, zero) pairs [..., 2G] in ``dtype``:
    x ~ code * scale + zero per group, from its least to its largest value."""
    *lead, D = x.shape
    groups = x.float().reshape(*lead, D // group, group)  # [..., G, group]
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # [..., G]
    scale = ((hi - lo) / INT4_CODE_MAX).clamp(min=KV_SCALE_FLOOR).to(dtype)  # [..., G]
    zero = lo.to(dtype)  # [..., G]
    codes = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None]).clamp(0, INT4_CODE_MAX)
    codes = codes.to(torch.uint8).reshape(*lead, D)  # [..., D]
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., D/2]
    return packed, torch.stack([scale, zero], dim=-1).reshape(*lead, -1)  # [..., D/2], [..., 2G]


def dequantize_int4_rows(packed: torch.Tensor, scale_zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes uint8 [..., D/2] and (scale, zero) pairs [..., 2G] -> [..., D] in ``dtype``."""
    *lead, half = packed.shape
    G = scale_zero.shape[-1] // 2  # (sizes spelled out: a read of no tokens reshapes too)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).float()  # [..., D/2, 2]
    pairs = scale_zero.float().reshape(*lead, G, 2)  # [..., G, 2]
    out = codes.reshape(*lead, G, 2 * half // G) * pairs[..., :1] + pairs[..., 1:]  # [..., G, group]
    return out.reshape(*lead, 2 * half).to(dtype)
