"""The attention seam: the one object the model calls per layer to store K/V and attend.

The model computes q, k, v (RoPE applied) and hands them to an :class:`AttentionBackend`
together with the :class:`ForwardBatch` that says where the new tokens sit. The backend owns
the KV storage (a :class:`offload.tiers.kv_store.KVStore`); the backends themselves live above
this module: :class:`offload.indexes.dense.DenseAttention` attends exactly,
:class:`offload.indexes.backend.SparseAttention` over what a KV policy selects. This module holds
what the model needs to call them, and the exact attention math they share.

Shapes: B batch rows, H query heads, Hkv KV heads, G = H / Hkv, T new tokens, N cached tokens,
D head_dim.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .kernels import cpu_has_fast_bf16, merge_attention


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
    # What the backend's begin() works out for this call (masks, lengths) and its forward reads at
    # every layer: it belongs to the call, so the parts of a MixedBatch keep theirs apart.
    plan: Any = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.rows) * self.num_new

    @property
    def row_index(self) -> torch.Tensor:
        return torch.arange(len(self.rows), device=self.positions.device)  # [B]

    @property
    def end_lengths(self) -> list[int]:
        return [s + self.num_new for s in self.start_lengths]

    @functools.cached_property
    def store_at(self) -> tuple[np.ndarray, np.ndarray]:
        """(cache rows, first positions) of this call's new tokens, int64 numpy [B], as the compiled
        KV stores take them: worked out once per call, not once per layer."""
        return np.asarray(self.rows, np.int64), np.asarray(self.start_lengths, np.int64)

    @functools.cached_property
    def store_addresses(self) -> tuple[int, int]:
        """The addresses of :attr:`store_at`'s two arrays, as the C decode kernel takes them (numpy's
        ``.ctypes.data`` costs a microsecond; every layer of a step asks)."""
        rows, starts = self.store_at
        return rows.ctypes.data, starts.ctypes.data

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


@dataclass
class MixedBatch:
    """One model call over several batches laid end to end as one sequence of tokens [1, N]: a
    decode step of rows 0..B-1 and the prompts of rows being admitted beside it (continuous
    batching). Every projection and MLP reads its weights once for all of them; attention runs per
    part. Logits are taken at ``logit_index``: each decode token and each prompt's last token."""

    parts: list[ForwardBatch]

    def __post_init__(self):
        if not self.parts:
            raise ValueError("a MixedBatch needs at least one part")
        self.positions = torch.cat([p.positions.reshape(1, -1) for p in self.parts], dim=1)  # [1, N]
        index, offset = [], 0
        for p in self.parts:
            index += ([offset + i for i in range(p.num_tokens)] if p.is_decode else [offset + p.num_tokens - 1])
            offset += p.num_tokens
        self.logit_index = index  # positions in the flat sequence whose logits the caller reads

    @classmethod
    def of(cls, decode: ForwardBatch | None, prefills: list[ForwardBatch]) -> "MixedBatch":
        return cls(([decode] if decode is not None else []) + prefills)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [1, H, N, D] (the flat sequence) -> per part [B, H, T, D]."""
        out, offset = [], 0
        for p in self.parts:
            piece = x[0, :, offset:offset + p.num_tokens]  # [H, B*T, D]
            out.append(piece.unflatten(1, (len(p.rows), p.num_new)).transpose(0, 1))  # [B, H, T, D]
            offset += p.num_tokens
        return out

    @staticmethod
    def join(parts: list[torch.Tensor]) -> torch.Tensor:
        """Per part [B, H, T, D] -> [1, H, N, D]: the inverse of :meth:`split`."""
        return torch.cat([t.transpose(0, 1).flatten(1, 2) for t in parts], dim=1)[None]


class AttentionBackend(ABC):
    """Per-layer KV storage and attention. One instance serves all layers of one model.

    Everything the engine, the API and the prompt cache call is declared here."""

    telemetry = None  # a sparse backend's per-layer recall/mass/error record (telemetry=True)
    rows_movable = True  # move_row works (a policy whose index cannot be saved cannot move rows)

    @abstractmethod
    def allocate(self, batch_size: int, capacity: int) -> None:
        """Make room for ``batch_size`` sequences of up to ``capacity`` tokens (reused if it fits)."""

    def close(self) -> None:
        """Give back what outlives the process's memory (the KV's disk tier files)."""

    def begin(self, batch: ForwardBatch) -> None:
        """Called once per model call (once per part of a mixed call) before layer 0: build masks and
        per-step state here, in ``batch.plan`` (the parts of a mixed call each have their own)."""

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """Store k, v [B, Hkv, T, D] for ``layer`` and return attention of q [B, H, T, D] over the cache."""

    def end(self, batch: ForwardBatch) -> None:
        """Called once per model call after the last layer."""

    def prefill_pass(self, layer: int, start: int, upto: int, last: bool = True) -> AbstractContextManager:
        """A layer-major prefill (Transformer.prefill_layer_major) runs consecutive chunks of one
        prompt, tokens start..upto-1, through ``layer`` inside this context (``last``: they end the
        prompt): a store whose KV of the layer lives in a slower tier keeps the layer's rows at hand
        for the pass."""
        return nullcontext()

    def forward_mixed(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      batch: MixedBatch) -> torch.Tensor:
        """:meth:`forward` of each part of a mixed call: q [1, H, N, D], k, v [1, Hkv, N, D] -> [1, H, N, D]."""
        outs = [self.forward(layer, q_part, k_part, v_part, part)
                for part, q_part, k_part, v_part in zip(batch.parts, batch.split(q), batch.split(k), batch.split(v))]
        return batch.join(outs)

    @abstractmethod
    def prefix_layers(self, row: int, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first n cached tokens of ``row`` on the host, a layer at a time: (k, v) [Hkv, n, D]
        of each layer in order, each read when it is asked for."""

    @abstractmethod
    def restore_row(self, row: int, token_ids: list[int], layers: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    index_states: dict | None = None) -> None:
        """Put a saved prefix back as ``row``'s first tokens, with its index states: ``layers`` gives
        (k, v) [Hkv, n, D] of each layer in order (each stored before the next is asked for)."""

    def release_row(self, row: int) -> None:
        """Forget what cache row ``row`` held beyond its KV (indexes, kept queries, tokens): the row
        is free, and the next sequence prefilled into it must build its own."""

    @abstractmethod
    def move_row(self, src: int, dst: int, token_ids: list[int]) -> None:
        """Make cache row ``dst`` what row ``src`` is (its cached ``token_ids``, KV and index states);
        ``src`` is then free. Decode runs over rows 0..B-1, so a server that retires a request moves
        its last row into the gap."""

    def build_indexes(self, row: int, n: int) -> None:
        """Build whatever selection structures ``row``'s first n tokens need (none for dense)."""

    def index_states(self, row: int) -> dict:
        """What ``row``'s indexes learned, layer -> (scalars, tensors), for a prompt cache."""
        return {}

    @abstractmethod
    def kv_nbytes(self, device_type: str | None = None) -> int:
        """KV bytes held (in the tier of ``device_type`` only: "cpu", "cuda", "disk"; all tiers if None)."""

    def kv_disk_report(self) -> dict | None:
        """The KV's disk tier: bytes on disk, read and written, the cache and its hit rate (None: no disk tier)."""
        return None

    @property
    @abstractmethod
    def kv_bytes_to_device(self) -> int:
        """KV bytes copied from the host tier to the compute device so far."""

    @abstractmethod
    def settings(self) -> dict:
        """The KV policy and selection settings a prompt cache must match."""

    @abstractmethod
    def describe(self) -> str:
        """The KV policy in words, for the start-up line."""


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


def product_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matrix products of many rows over ``t`` (a K or V, a weight) run in: its own, but
    fp32 for a bf16 tensor on a CPU without native bf16 (AVX2 alone), where a batched bf16 product
    runs on a scalar path: [3,1024,64] @ [3,64,4096] 3.3 s against 65 ms in fp32, measured."""
    if t.dtype == torch.bfloat16 and t.device.type == "cpu" and not cpu_has_fast_bf16():
        return torch.float32
    return t.dtype


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           visible: torch.Tensor | None) -> torch.Tensor:
    """Exact grouped-query attention with fp32 softmax.

    q [B, Hkv, G*T, D], k/v [B, Hkv, N, D], visible bool, broadcastable to [B, Hkv, G*T, N].
    Explicit matmuls in the KV's dtype (a dequantized KV may be wider than q; the result is in
    q's dtype): for decode they are several times faster than SDPA on CPU in bf16, and GQA needs
    no repeat of K/V.
    """
    return attend_with_lse(q, k, v, scale, visible)[0]


def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    visible: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend`, and the log-sum-exp of each query's scores [B, Hkv, G*T] fp32 (-inf: nothing
    visible), for merging with another part by log-sum-exp."""
    out_dtype, kd = q.dtype, product_dtype(k)
    scores = scores_qk(q.to(kd), k.to(kd)).float() * scale  # [B, Hkv, G*T, N]
    if visible is not None:
        scores.masked_fill_(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G*T]
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]).to(kd)  # [B, Hkv, G*T, N]
    return torch.matmul(probs, v.to(kd)).to(out_dtype), lse  # [B, Hkv, G*T, D]


# torch's CPU flash-attention kernel, which returns each query's log-sum-exp beside its output (SDPA
# does not): the two parts of a prefill chunk's attention merge exactly by it
_CPU_FLASH_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def causal_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                             scale: float) -> torch.Tensor:
    """Exact causal attention of a prefill chunk on a CPU: q [1, H, T, D] at positions
    start..start+T-1 over k/v [1, Hkv, start+T, D] (Hkv dividing H) -> [1, H, T, D] in q's dtype.

    The earlier tokens, which every query of the chunk sees whole, go through one unmasked
    flash-attention call, the chunk's own tokens through a causal one, and the two merge by
    log-sum-exp (in fp32, in one compiled pass: :func:`offload.kernels.merge_attention`; as tensor
    ops the merge cost a third of what the two calls saved at 4K). SDPA with the chunk's [T, N]
    mask reads the mask and takes a slower kernel: one layer of the default model, 512 queries at
    32K, bf16, 82.6 -> 56.8 ms (4K: 8.4 -> 6.5; fp32 at 32K: 235 -> 177). Each part is rounded to
    q's dtype once before the merge rounds again: within a bf16 step of the single call's result.
    A query with a NaN or inf comes out NaN (the kernel gives such a query zeros and a log-sum-exp
    of 0: silent garbage); one sum of q finds them (a per-element test cost half the kernel's time
    at 512 tokens)."""
    T = q.shape[2]
    own, own_lse = _CPU_FLASH_ATTENTION(q, k[:, :, start:start + T], v[:, :, start:start + T], 0.0, True,
                                        scale=scale)  # [1, H, T, D], [1, H, T] fp32
    if start == 0:
        return _nan_where_corrupt(q, _in_layout_of(q, own))
    seen, seen_lse = _CPU_FLASH_ATTENTION(q, k[:, :, :start], v[:, :, :start], 0.0, False,
                                          scale=scale)  # [1, H, T, D], [1, H, T] fp32
    merged, _ = merge_attention([own[0], seen[0]], [own_lse[0], seen_lse[0]])  # [H, T, D]: one compiled pass
    return _nan_where_corrupt(q, _in_layout_of(q, merged[None]))


def _in_layout_of(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [1, H, T, D] laid out in memory as q is (the model's q is a [1, T, H, D] tensor viewed as
    [1, H, T, D]): the o-projection then reads it as [1, T, H D] without a copy of its own. The
    flash kernel's and the merge's results already are (the batch dim, of size 1, may have any stride)."""
    if out.stride()[1:] == q.stride()[1:]:
        return out
    return torch.empty_like(q).copy_(out)


def _nan_where_corrupt(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [1, H, T, D] with NaN for each query of q [1, H, T, D] holding a NaN or inf (in place)."""
    if bool(torch.isfinite(q.sum(dtype=torch.float32))):  # a CPU tensor: no device to wait for
        return out
    return out.masked_fill_(~torch.isfinite(q).all(dim=-1, keepdim=True), float("nan"))  # [1, H, T, 1] mask


class OnlineSoftmax:
    """Exact attention accumulated over blocks of keys (flash-attention's running max and sum), so
    that a long quantized KV is dequantized a block at a time, never whole. q [B, Hkv, M, D]; each
    :meth:`add` takes k/v [B, Hkv, n, D] and ``visible`` broadcastable to [B, Hkv, M, n] (or None);
    :meth:`result` is [B, Hkv, M, D] in q's dtype. A query that sees no key at all gets zeros."""

    def __init__(self, q: torch.Tensor, scale: float):
        self.q, self.scale = q, scale
        shape = q.shape[:3] + (1,)
        self.running_max = torch.full(shape, float("-inf"), device=q.device)  # [B, Hkv, M, 1] fp32
        self.running_sum = torch.zeros(shape, device=q.device)  # [B, Hkv, M, 1]
        self.acc = torch.zeros(q.shape, device=q.device)  # [B, Hkv, M, D] fp32

    def add(self, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None) -> None:
        kd = product_dtype(k)
        scores = scores_qk(self.q.to(kd), k.to(kd)).float() * self.scale  # [B, Hkv, M, n]
        if visible is not None:
            scores.masked_fill_(~visible, float("-inf"))
        new_max = torch.maximum(self.running_max, scores.amax(dim=-1, keepdim=True))  # [B, Hkv, M, 1]
        safe = torch.where(torch.isfinite(new_max), new_max, 0.0)  # a row with nothing visible yet
        probs = torch.exp(scores - safe)  # [B, Hkv, M, n]; masked -> 0
        rescale = torch.exp(self.running_max - safe)  # old terms under the new max (-inf -> 0)
        self.running_sum = self.running_sum * rescale + probs.sum(dim=-1, keepdim=True)
        self.acc = self.acc * rescale + torch.matmul(probs.to(kd), v.to(kd)).float()  # [B, Hkv, M, D]
        self.running_max = new_max

    def result(self) -> torch.Tensor:
        return (self.acc / self.running_sum.clamp(min=1e-30)).to(self.q.dtype)  # [B, Hkv, M, D]


def visible_keys(q_positions: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """Bool [B, T, N]: key j is visible to the query at position p iff j <= p
    (and p - j < window for sliding-window models)."""
    keys = torch.arange(num_keys, device=q_positions.device)  # [N]
    p = q_positions[:, :, None]  # [B, T, 1]
    visible = keys <= p  # [B, T, N]
    if window is not None:
        visible &= keys > p - window
    return visible
