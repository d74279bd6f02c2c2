"""The attention seam: the one object the model calls per layer to store K/V and attend.

The model computes q, k, v (RoPE applied) and hands them to an :class:`AttentionBackend`
together with the :class:`ForwardBatch` that says where the new tokens sit. The backend owns
the KV storage. :class:`DenseAttention` keeps it in one preallocated cache and attends exactly;
sparse and offloaded backends (indexes, tiers) implement the same two calls.

Shapes: B batch rows, H query heads, Hkv KV heads, G = H / Hkv, T new tokens, N cached tokens,
D head_dim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .config import ModelArgs

# Upper bound on one block of attention scores (fp32) in chunked prefill: keeps a long
# prompt from ever materialising a T x N matrix larger than this.
PREFILL_SCORE_BYTES = 256 * 1024 * 1024


@dataclass
class ForwardBatch:
    """Where the tokens of one model call go in the KV cache.

    Prefill: one sequence (``rows == [row]``), T tokens at positions start..start+T-1.
    Decode: every cache row, one token each, at ``positions[b]``.
    Lengths are tracked on the host so that no step needs a device synchronisation.
    """

    rows: list[int]
    positions: torch.Tensor  # [B, T] int64 on the compute device
    start_lengths: list[int]  # cache length of each row before this call
    num_new: int  # T
    is_decode: bool  # one token for every cache row (else: a prefill chunk of one row)

    @property
    def end_lengths(self) -> list[int]:
        return [s + self.num_new for s in self.start_lengths]

    @classmethod
    def prefill(cls, row: int, start: int, num_tokens: int, device: torch.device) -> "ForwardBatch":
        positions = torch.arange(start, start + num_tokens, device=device)[None]  # [1, T]
        return cls(rows=[row], positions=positions, start_lengths=[start], num_new=num_tokens, is_decode=False)

    @classmethod
    def decode(cls, lengths: list[int], device: torch.device) -> "ForwardBatch":
        positions = torch.tensor(lengths, device=device, dtype=torch.int64)[:, None]  # [B, 1]
        return cls(rows=list(range(len(lengths))), positions=positions, start_lengths=list(lengths), num_new=1,
                   is_decode=True)


class AttentionBackend(ABC):
    """Per-layer KV storage and attention. One instance serves all layers of one model."""

    @abstractmethod
    def allocate(self, batch_size: int, capacity: int) -> None:
        """Make room for ``batch_size`` sequences of up to ``capacity`` tokens (reused if it fits)."""

    def begin(self, batch: ForwardBatch) -> None:
        """Called once per model call before layer 0: build masks and per-step state here."""

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """Store k, v [B, Hkv, T, D] for ``layer`` and return attention of q [B, H, T, D] over the cache."""

    def end(self, batch: ForwardBatch) -> None:
        """Called once per model call after the last layer."""


class KVCache:
    """K and V for every layer, allocated once: [L, B, Hkv, capacity, D]. Updated in place."""

    def __init__(self, args: ModelArgs, device: torch.device, dtype: torch.dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[3]

    def allocate(self, batch_size: int, capacity: int) -> None:
        if self.k is not None and self.batch_size == batch_size and self.capacity >= capacity:
            return
        self.k = self.v = None  # free the old cache before allocating the new one
        a = self.args
        shape = (a.num_layers, batch_size, a.num_kv_heads, capacity, a.head_dim)
        self.k = torch.empty(shape, device=self.device, dtype=self.dtype)  # [L, B, Hkv, N, D]
        self.v = torch.empty(shape, device=self.device, dtype=self.dtype)  # [L, B, Hkv, N, D]

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> None:
        """Put k, v [B, Hkv, T, D] at the batch's positions."""
        if batch.is_decode:
            rows = torch.arange(len(batch.rows), device=self.device)  # [B]
            pos = batch.positions[:, 0]  # [B]
            self.k[layer][rows, :, pos] = k[:, :, 0]  # [B, Hkv, D]
            self.v[layer][rows, :, pos] = v[:, :, 0]
        else:
            row, start = batch.rows[0], batch.start_lengths[0]
            self.k[layer, row, :, start:start + batch.num_new] = k[0]  # [Hkv, T, D]
            self.v[layer, row, :, start:start + batch.num_new] = v[0]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           mask: torch.Tensor | None) -> torch.Tensor:
    """Exact grouped-query attention with fp32 softmax.

    q [B, Hkv, G*T, D], k/v [B, Hkv, N, D], mask additive, broadcastable to [B, Hkv, G*T, N].
    Explicit matmuls in the compute dtype: on CPU they are several times faster than SDPA's
    generic path for bf16, and GQA needs no repeat of K/V.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [B, Hkv, G*T, N]
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1).to(v.dtype)  # [B, Hkv, G*T, N]
    return torch.matmul(probs, v)  # [B, Hkv, G*T, D]


def causal_mask(q_positions: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """Additive mask [B, 1, T, N]: key j is visible to query at position p iff j <= p
    (and p - j < window for sliding-window models)."""
    keys = torch.arange(num_keys, device=q_positions.device)  # [N]
    p = q_positions[:, None, :, None]  # [B, 1, T, 1]
    visible = keys <= p  # [B, 1, T, N]
    if window is not None:
        visible &= keys > p - window
    return torch.zeros(visible.shape, device=q_positions.device).masked_fill_(~visible, float("-inf"))


class DenseAttention(AttentionBackend):
    """Exact attention over a preallocated, fully resident KV cache."""

    def __init__(self, args: ModelArgs, device: torch.device, dtype: torch.dtype):
        self.args = args
        self.cache = KVCache(args, device, dtype)
        self._decode_mask: torch.Tensor | None = None

    def allocate(self, batch_size: int, capacity: int) -> None:
        self.cache.allocate(batch_size, capacity)

    def begin(self, batch: ForwardBatch) -> None:
        # Rows of a decode batch have different lengths: one mask per step, shared by all layers.
        if batch.is_decode:
            n = max(batch.end_lengths)
            self._decode_mask = causal_mask(batch.positions, n, self.args.sliding_window)  # [B, 1, 1, N]

    def forward(self, layer, q, k, v, batch):
        self.cache.write(layer, k, v, batch)
        a = self.args
        B, H, T, D = q.shape
        G = a.group_size
        if batch.is_decode:
            n = max(batch.end_lengths)
            keys = self.cache.k[layer, :, :, :n]  # [B, Hkv, N, D]
            values = self.cache.v[layer, :, :, :n]  # [B, Hkv, N, D]
            out = attend(q.view(B, a.num_kv_heads, G, D), keys, values, a.softmax_scale,
                         self._decode_mask)  # [B, Hkv, G, D]
            return out.view(B, H, 1, D)
        return self._prefill(layer, q, batch)

    def _prefill(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        a = self.args
        _, H, T, D = q.shape
        G = a.group_size
        row, n = batch.rows[0], batch.end_lengths[0]
        keys = self.cache.k[layer, row:row + 1, :, :n]  # [1, Hkv, N, D]
        values = self.cache.v[layer, row:row + 1, :, :n]  # [1, Hkv, N, D]
        qg = q.view(1, a.num_kv_heads, G, T, D)  # [1, Hkv, G, T, D]
        out = torch.empty_like(qg)  # [1, Hkv, G, T, D]
        # Query blocks small enough that one block of scores stays under PREFILL_SCORE_BYTES.
        block = max(1, min(T, PREFILL_SCORE_BYTES // (4 * H * n)))
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            mask = causal_mask(batch.positions[:, t0:t1], n, a.sliding_window)  # [1, 1, Tb, N]
            qb = qg[:, :, :, t0:t1].reshape(1, a.num_kv_heads, G * (t1 - t0), D)  # [1, Hkv, G*Tb, D]
            mb = mask[:, :, None].expand(1, 1, G, t1 - t0, n).reshape(1, 1, G * (t1 - t0), n)
            ob = attend(qb, keys, values, a.softmax_scale, mb)  # [1, Hkv, G*Tb, D]
            out[:, :, :, t0:t1] = ob.view(1, a.num_kv_heads, G, t1 - t0, D)
        return out.view(1, H, T, D)
