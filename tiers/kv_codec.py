"""The KV cache's per-token codecs, shared by the memory tiers (:mod:`offload.tiers.kv_store`) and
the disk tier's rows (:mod:`offload.tiers.kv_disk`).

- int8, symmetric per token and KV head: codes in -127..127, scale = max |x| / 127 (at least
  KV_SCALE_FLOOR) in the compute dtype; the compiled CPU writer computes the same numbers
  (``offload.kernels.cpu_decode.store_int8_tokens``).
- 4- or 2-bit, asymmetric per token over groups of channels: codes packed 2 or 4 to a byte (the
  lowest channel in the lowest bits), a scale and a zero per group in the compute dtype (FlexGen's
  group-wise scheme; KIVI quantizes values so).

Shapes: [..., D] one vector per token and KV head; G = D / group.
"""

from __future__ import annotations

import torch

from offload.kernels.reference import KV_CODE_MAX, KV_SCALE_FLOOR

KV_INT8_MAX = KV_CODE_MAX


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> int8 codes [..., D] and scales [..., 1] (``dtype``): x ~ codes * scale."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / KV_INT8_MAX).clamp(min=KV_SCALE_FLOOR).to(dtype)  # [..., 1]
    codes = torch.round(x.float() / scale.float()).clamp(-KV_INT8_MAX, KV_INT8_MAX).to(torch.int8)  # [..., D]
    return codes, scale


def quantize_kv_parts(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """K, V [..., D] -> [K codes, V codes, K scales, V scales] in int8 (the order a cache holds them)."""
    (kc, ks), (vc, vs) = quantize_kv(k, dtype), quantize_kv(v, dtype)
    return [kc, vc, ks, vs]


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """codes [..., D] int8, scale [..., 1] -> [..., D] in ``dtype`` (default: the scale's)."""
    dtype = dtype or scale.dtype
    return codes.to(dtype) * scale.to(dtype)


def quantize_rows(x: torch.Tensor, bits: int, group: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> ``bits``-bit codes (2 or 4) packed 8 / bits to a byte, uint8 [..., D * bits / 8]
    (channel c in bits (c % per_byte) * bits of byte c // per_byte), and (scale, zero) pairs [..., 2G]
    in ``dtype``: x ~ code * scale + zero per group, from its least to its largest value."""
    *lead, D = x.shape
    top = (1 << bits) - 1
    groups = x.float().reshape(*lead, D // group, group)  # [..., G, group]
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # [..., G]
    scale = ((hi - lo) / top).clamp(min=KV_SCALE_FLOOR).to(dtype)  # [..., G]
    zero = lo.to(dtype)  # [..., G]
    codes = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None]).clamp(0, top)
    codes = codes.to(torch.uint8).reshape(*lead, D // (8 // bits), 8 // bits)  # [..., bytes, per byte]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=x.device)  # [per byte]
    packed = (codes << shifts).sum(dim=-1, dtype=torch.uint8)  # [..., bytes] (disjoint bits: sum is or)
    return packed, torch.stack([scale, zero], dim=-1).reshape(*lead, -1)  # [..., bytes], [..., 2G]


def dequantize_rows(packed: torch.Tensor, scale_zero: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """``bits``-bit codes uint8 [..., D * bits / 8] and (scale, zero) pairs [..., 2G] -> [..., D] in ``dtype``."""
    *lead, nbytes = packed.shape
    D, G = nbytes * 8 // bits, scale_zero.shape[-1] // 2  # (sizes spelled out: a read of no tokens reshapes too)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # [per byte]
    codes = ((packed[..., None] >> shifts) & ((1 << bits) - 1)).float()  # [..., bytes, per byte]
    pairs = scale_zero.float().reshape(*lead, G, 2)  # [..., G, 2]
    out = codes.reshape(*lead, G, D // G) * pairs[..., :1] + pairs[..., 1:]  # [..., G, group]
    return out.reshape(*lead, D).to(dtype)
