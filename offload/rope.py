"""Rotary position embeddings, with the scaling schemes of Llama 3.1, YaRN and linear interpolation.

cos/sin are computed from positions on the fly: a table for 128K positions would cost more
memory than the few multiplies it saves, and decode needs one row per step.
"""

from __future__ import annotations

import math

import torch

from .config import ModelArgs, RopeScaling


def _default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # [D/2]
    return 1.0 / (theta ** exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between blended.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(head_dim: int, theta: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(s.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(theta))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (s.factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    attention_factor = s.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0
    return inv_freq, attention_factor


def rope_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (fp32) and the factor that scales cos and sin."""
    s = args.rope_scaling
    if s is not None and s.kind == "yarn":
        return _yarn_inv_freq(args.head_dim, args.rope_theta, s)
    inv_freq = _default_inv_freq(args.head_dim, args.rope_theta)  # [D/2]
    if s is None:
        return inv_freq, 1.0
    if s.kind == "linear":
        return inv_freq / s.factor, 1.0
    if s.kind == "llama3":
        return _llama3_inv_freq(inv_freq, s), 1.0
    factors = torch.tensor(s.freq_factors, dtype=torch.float32)  # "freq_factors": [D/2]
    if factors.numel() != inv_freq.numel():
        raise ValueError(f"rope freq_factors has {factors.numel()} entries, expected {inv_freq.numel()}")
    return inv_freq / factors, 1.0


class RotaryEmbedding:
    """Applies RoPE in the rotate-half (NeoX / Hugging Face) convention."""

    def __init__(self, args: ModelArgs, device: torch.device):
        inv_freq, self.attention_scaling = rope_frequencies(args)
        self.inv_freq = inv_freq.to(device)  # [D/2] fp32

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] int64 -> cos, sin [B, 1, T, D] in ``dtype``."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        cos = (emb.cos() * self.attention_scaling).to(dtype)[:, None]  # [B, 1, T, D]
        sin = (emb.sin() * self.attention_scaling).to(dtype)[:, None]  # [B, 1, T, D]
        return cos, sin

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, D] rotated by the angles in cos/sin [B, 1, T, D]."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [B, H, T, D]
        return x * cos + rotated * sin
