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
import torch.nn.functional as F

from .config import ModelArgs

# Upper bound on one block of attention scores (fp32) in chunked prefill: even where SDPA falls
# back to its math kernel, a long prompt never materialises a score block larger than this.
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
    token_ids: list[list[int]] | None = None  # host copy of the tokens per row, for text-aware indexes

    @property
    def row_index(self) -> torch.Tensor:
        return torch.arange(len(self.rows), device=self.positions.device)  # [B]

    @property
    def end_lengths(self) -> list[int]:
        return [s + self.num_new for s in self.start_lengths]

    @classmethod
    def prefill(cls, row: int, start: int, num_tokens: int, device: torch.device,
                token_ids: list[int] | None = None) -> "ForwardBatch":
        positions = torch.arange(start, start + num_tokens, device=device)[None]  # [1, T]
        return cls(rows=[row], positions=positions, start_lengths=[start], num_new=num_tokens, is_decode=False,
                   token_ids=None if token_ids is None else [list(token_ids)])

    @classmethod
    def decode(cls, lengths: list[int], device: torch.device,
               token_ids: list[int] | None = None) -> "ForwardBatch":
        positions = torch.tensor(lengths, device=device, dtype=torch.int64)[:, None]  # [B, 1]
        return cls(rows=list(range(len(lengths))), positions=positions, start_lengths=list(lengths), num_new=1,
                   is_decode=True, token_ids=None if token_ids is None else [[t] for t in token_ids])


class AttentionBackend(ABC):
    """Per-layer KV storage and attention. One instance serves all layers of one model.

    Everything the engine, the API and the prompt cache call is declared here."""

    telemetry = None  # a sparse backend's per-layer recall/mass/error record (telemetry=True)

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

    @abstractmethod
    def prefix(self, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n cached tokens of ``row``, every layer, on the host: k, v [L, Hkv, n, D]."""

    @abstractmethod
    def restore_row(self, row: int, token_ids: list[int], k: torch.Tensor, v: torch.Tensor,
                    index_states: dict | None = None) -> None:
        """Put a saved prefix back as ``row``'s first tokens (k, v [L, Hkv, n, D]), with its index states."""

    def build_indexes(self, row: int, n: int) -> None:
        """Build whatever selection structures ``row``'s first n tokens need (none for dense)."""

    def index_states(self, row: int) -> dict:
        """What ``row``'s indexes learned, layer -> (scalars, tensors), for a prompt cache."""
        return {}

    @abstractmethod
    def settings(self) -> dict:
        """The KV policy and selection settings a prompt cache must match."""

    @abstractmethod
    def describe(self) -> str:
        """The KV policy in words, for the start-up line."""


class KVCache:
    """K and V of every layer, allocated once: one [B, Hkv, capacity, D] tensor per layer, updated in
    place. ``layer_devices`` puts some layers' KV in another tier (host memory, pinned when a GPU
    computes): those layers' attention fetches what it needs from there."""

    def __init__(self, args: ModelArgs, device: torch.device, dtype: torch.dtype,
                 layer_devices: list[torch.device] | None = None):
        self.args, self.device, self.dtype = args, device, dtype
        self.layer_devices = list(layer_devices) if layer_devices is not None else [device] * args.num_layers
        if len(self.layer_devices) != args.num_layers:
            raise ValueError(f"layer_devices names {len(self.layer_devices)} layers, the model has {args.num_layers}")
        self.k: list[torch.Tensor] | None = None  # per layer [B, Hkv, N, D]
        self.v: list[torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return 0 if self.k is None else self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k[0].shape[2]

    def allocate(self, batch_size: int, capacity: int) -> None:
        if self.k is not None and self.batch_size == batch_size and self.capacity >= capacity:
            return
        self.k = self.v = None  # free the old cache before allocating the new one
        a = self.args
        shape = (batch_size, a.num_kv_heads, capacity, a.head_dim)
        # Zeroed, not empty: rows of a batch are masked beyond their length, and a masked weight
        # of 0 times uninitialised memory that happens to hold NaN would still be NaN.
        self.k = [self._zeros(shape, dev) for dev in self.layer_devices]  # L x [B, Hkv, N, D]
        self.v = [self._zeros(shape, dev) for dev in self.layer_devices]  # L x [B, Hkv, N, D]

    def _zeros(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        # Host-tier KV is pinned when a GPU computes, so that its copies to the GPU are asynchronous.
        pin = device.type == "cpu" and self.device.type == "cuda"
        return torch.zeros(shape, device=device, dtype=self.dtype, pin_memory=pin)

    def nbytes(self, device_type: str | None = None) -> int:
        """Bytes held (in the tier of ``device_type`` only, if given)."""
        if self.k is None:
            return 0
        return sum(2 * k.numel() * k.element_size() for k in self.k if device_type in (None, k.device.type))

    def prefix(self, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n tokens of cache row ``row``, every layer, on the host: k, v [L, Hkv, n, D]."""
        return (torch.stack([k[row, :, :n].cpu() for k in self.k]),
                torch.stack([v[row, :, :n].cpu() for v in self.v]))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> None:
        """Put k, v [B, Hkv, T, D] at the batch's positions (into this layer's tier)."""
        k_layer, v_layer = self.k[layer], self.v[layer]  # [B, Hkv, N, D]
        if batch.is_decode:
            if len(set(batch.start_lengths)) == 1:  # all rows at one position: a plain slice
                n = batch.start_lengths[0]
                k_layer[:, :, n] = k[:, :, 0]  # [B, Hkv, D]
                v_layer[:, :, n] = v[:, :, 0]
                return
            rows, pos = batch.row_index, batch.positions[:, 0]  # [B], [B]
            if k_layer.device != rows.device:
                rows, pos = rows.to(k_layer.device), pos.to(k_layer.device)
            k_layer[rows, :, pos] = k[:, :, 0].to(k_layer.device)  # [B, Hkv, D]
            v_layer[rows, :, pos] = v[:, :, 0].to(k_layer.device)
        else:
            row, start = batch.rows[0], batch.start_lengths[0]
            k_layer[row, :, start:start + batch.num_new] = k[0]  # [Hkv, T, D]
            v_layer[row, :, start:start + batch.num_new] = v[0]


def scores_qk(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [B, Hkv, M, D] @ k [B, Hkv, N, D]^T -> [B, Hkv, M, N] in the compute dtype.

    Cache slices [:n] of a larger capacity are strided between heads; for 16-bit dtypes on the
    CPU, batched matmul copies such a K first (10x slower at 32K tokens, measured), so the heads
    are multiplied one by one there.
    """
    B, Hkv = k.shape[:2]
    if k.device.type == "cpu" and k.element_size() == 2 and not k.is_contiguous() and B * Hkv <= 64:
        out = torch.empty(B, Hkv, q.shape[2], k.shape[2], dtype=q.dtype)  # [B, Hkv, M, N]
        for b in range(B):
            for h in range(Hkv):
                torch.matmul(q[b, h], k[b, h].transpose(0, 1), out=out[b, h])
        return out
    return torch.matmul(q, k.transpose(-1, -2))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           visible: torch.Tensor | None) -> torch.Tensor:
    """Exact grouped-query attention with fp32 softmax.

    q [B, Hkv, G*T, D], k/v [B, Hkv, N, D], visible bool, broadcastable to [B, Hkv, G*T, N].
    Explicit matmuls in the compute dtype: for decode they are several times faster than SDPA
    on CPU in bf16, and GQA needs no repeat of K/V.
    """
    scores = scores_qk(q, k).float() * scale  # [B, Hkv, G*T, N]
    if visible is not None:
        scores.masked_fill_(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)  # [B, Hkv, G*T, N]
    return torch.matmul(probs, v)  # [B, Hkv, G*T, D]


def visible_keys(q_positions: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """Bool [B, T, N]: key j is visible to the query at position p iff j <= p
    (and p - j < window for sliding-window models)."""
    keys = torch.arange(num_keys, device=q_positions.device)  # [N]
    p = q_positions[:, :, None]  # [B, T, 1]
    visible = keys <= p  # [B, T, N]
    if window is not None:
        visible &= keys > p - window
    return visible


class DenseAttention(AttentionBackend):
    """Exact attention over a preallocated, fully resident KV cache."""

    def __init__(self, args: ModelArgs, device: torch.device, dtype: torch.dtype):
        self.args = args
        self.cache = KVCache(args, device, dtype)
        self._decode_mask: torch.Tensor | None = None  # [B, 1, 1, N] bool, or None
        self._prefill_masks: dict[int, torch.Tensor] = {}

    def allocate(self, batch_size: int, capacity: int) -> None:
        self.cache.allocate(batch_size, capacity)

    def prefix(self, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.prefix(row, n)

    def settings(self) -> dict:
        return {"kv_policy": "dense", "selection": None}

    def describe(self) -> str:
        return "kv_policy dense (exact)"

    def restore_row(self, row: int, token_ids: list[int], k: torch.Tensor, v: torch.Tensor,
                    index_states: dict | None = None) -> None:
        """Put a saved prefix back: k, v [L, Hkv, n, D] become cache row ``row``'s first n tokens."""
        n = k.shape[2]
        for layer in range(len(self.cache.k)):
            self.cache.k[layer][row, :, :n] = k[layer]  # [Hkv, n, D]
            self.cache.v[layer][row, :, :n] = v[layer]

    def begin(self, batch: ForwardBatch) -> None:
        # Masks are built once per model call and shared by all layers.
        if batch.is_decode:
            n = max(batch.end_lengths)
            uniform = len(set(batch.start_lengths)) == 1 and self.args.sliding_window is None
            # Rows of equal length with no window see every cached key: no mask needed.
            self._decode_mask = None if uniform else visible_keys(
                batch.positions, n, self.args.sliding_window)[:, None]  # [B, 1, 1, N]
        else:
            n, T, H = batch.end_lengths[0], batch.num_new, self.args.num_heads
            block = max(1, min(T, PREFILL_SCORE_BYTES // (4 * H * n)))
            self._prefill_masks = {
                t0: visible_keys(batch.positions[:, t0:t0 + block], n, self.args.sliding_window)[0]
                for t0 in range(0, T, block)}  # {t0: [Tb, N] bool}

    def forward(self, layer, q, k, v, batch):
        self.cache.write(layer, k, v, batch)
        a = self.args
        B, H, T, D = q.shape
        G = a.group_size
        if batch.is_decode:
            n = max(batch.end_lengths)
            keys = self.cache.k[layer][:, :, :n]  # [B, Hkv, N, D]
            values = self.cache.v[layer][:, :, :n]  # [B, Hkv, N, D]
            if keys.device != q.device:  # dense attention over a host-tier KV: all of it comes over
                keys, values = keys.to(q.device, non_blocking=True), values.to(q.device, non_blocking=True)
            out = attend(q.view(B, a.num_kv_heads, G, D), keys, values, a.softmax_scale,
                         self._decode_mask)  # [B, Hkv, G, D]
            return out.view(B, H, 1, D)
        return self._prefill(layer, q, batch)

    def _prefill(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        a = self.args
        row, n = batch.rows[0], batch.end_lengths[0]
        keys = self.cache.k[layer][row:row + 1, :, :n]  # [1, Hkv, N, D]
        values = self.cache.v[layer][row:row + 1, :, :n]  # [1, Hkv, N, D]
        if keys.device != q.device:  # KV in the host tier: this layer's prefix comes over for the chunk
            keys = keys.to(q.device, non_blocking=True)
            values = values.to(q.device, non_blocking=True)
        out = torch.empty_like(q)  # [1, H, T, D]
        # SDPA's fused CPU/GPU kernels are exact and several times faster than explicit matmuls
        # for a block of queries; query blocks bound the scores if it falls back to its math path.
        for t0, visible in self._prefill_masks.items():  # visible [Tb, N]
            t1 = t0 + visible.shape[0]
            out[:, :, t0:t1] = F.scaled_dot_product_attention(
                q[:, :, t0:t1], keys, values, attn_mask=visible, scale=a.softmax_scale,
                enable_gqa=True)  # [1, H, Tb, D]
        return out
