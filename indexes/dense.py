"""Exact attention on a :class:`~offload.tiers.kv_store.KVStore`: the dense backend, and the exact
twin every KV policy is measured against. :class:`~offload.indexes.backend.SparseAttention`
builds on it (prefill, dense layers and windowed layers are exact)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from offload.attention import AttentionBackend, ForwardBatch, OnlineSoftmax, attend, causal_prefill_attention, visible_keys
from offload.config import ModelArgs
from offload.errors import OffloadError
from offload.kernels import CacheArrays, DecodeRanges
from offload.tiers.kv_store import DECODE_BLOCK_TOKENS, KVStore

# Upper bound on one block of attention scores (fp32) in chunked prefill: even where SDPA falls
# back to its math kernel, a long prompt never materialises a score block larger than this.
PREFILL_SCORE_BYTES = 256 * 1024 * 1024
# Devices whose decode reads the cache in place through offload.kernels' numba kernel (CacheArrays.attend:
# on CPU: an int8 KV without a dequantized copy, 1.5x faster decode at 4K on the default model; a bf16
# KV without bf16 matmuls, which run at ~0.6 GB/s here); elsewhere torch attends (int8: in blocks).
FUSED_DECODE_DEVICES = ("cpu",)
FUSED_DECODE_DTYPES = (torch.int8, torch.bfloat16)
# An fp32 cache: torch's fp32 matmuls keep up with the kernel to ~2K visible tokens and fall behind
# past it (per layer, 3 KV heads, median of 40: 2K 0.32 vs 0.31 ms, 4K 0.50 vs 0.41, 8K 1.14 vs 0.86)
FUSED_F32_MIN_TOKENS = 4096


@dataclass
class DensePlan:
    """What :meth:`DenseAttention.begin` works out once per call, for every layer (``batch.plan``)."""

    decode_start: int = 0  # first cached token any row of this decode step can see
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, N'] bool, or None (every row sees the same keys)
    prefill_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # {t0: [Tb, N] bool}
    # what the in-place kernel reads of each row, made by the first layer that reads in place
    decode_ranges: DecodeRanges | None = None
    # a decode step whose layers in CPU memory store and attend in place (no KIVI, a cache the
    # kernel reads at this length): forward goes straight to the two kernels for them
    in_place: bool = False
    # a CPU prefill chunk that sees every earlier token (no sliding window reached): no masks
    prefill_causal: bool = False


class DenseAttention(AttentionBackend):
    """Exact attention over every cached token (within the model's sliding window, if it has one).
    ``store`` shares another backend's KV (benchmarks compare policies over one prefill)."""

    def __init__(self, args: ModelArgs, device: torch.device, dtype: torch.dtype, store: KVStore | None = None):
        self.args = args
        self.kv = store if store is not None else KVStore(args, device, dtype)

    def allocate(self, batch_size: int, capacity: int) -> None:
        self.kv.allocate(batch_size, capacity)

    def prefix_layers(self, row: int, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self.kv.layer_prefix(layer, row, n) for layer in range(self.args.num_layers))

    def close(self) -> None:
        self.kv.close()

    def prefill_pass(self, layer: int, start: int, upto: int, last: bool = True) -> AbstractContextManager:
        return self.kv.prefill_pass(layer, start, upto)

    def kv_disk_report(self) -> dict | None:
        return None if self.kv.disk is None else self.kv.disk.report()

    def kv_nbytes(self, device_type: str | None = None) -> int:
        return self.kv.nbytes(device_type)

    @property
    def kv_bytes_to_device(self) -> int:
        return self.kv.bytes_to_device

    def settings(self) -> dict:
        return {"kv_policy": "dense", "selection": None, "kv_dtype": self.kv.kv_dtype}

    def describe(self) -> str:
        return "kv_policy dense (exact)"

    def restore_row(self, row: int, token_ids: list[int], layers: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    index_states: dict | None = None) -> None:
        """Put a saved prefix back: each layer's k, v [Hkv, n, D] become cache row ``row``'s first n
        tokens, a layer at a time (:meth:`restore_layer`, with the layer's index state if saved)."""
        states = index_states or {}
        count = 0
        for layer, (k, v) in enumerate(layers):
            self.restore_layer(row, layer, k, v, states.get(layer))
            count += 1
        if count != self.args.num_layers:
            raise OffloadError(f"a saved prefix of {count} layers for a model of {self.args.num_layers}")

    def restore_layer(self, row: int, layer: int, k: torch.Tensor, v: torch.Tensor, state: tuple | None) -> None:
        """One layer of a saved prefix, k, v [Hkv, n, D], into its tier (dense attention has no index state)."""
        self.kv.restore_layer(layer, row, k, v)

    def move_row(self, src: int, dst: int, token_ids: list[int]) -> None:
        self.kv.move_row(src, dst, len(token_ids))

    def begin(self, batch: ForwardBatch) -> None:
        # Masks are built once per model call and shared by all layers.
        batch.plan = plan = self.new_plan()
        window = self.args.sliding_window
        if batch.is_decode:
            n = max(batch.end_lengths)
            if len(set(batch.start_lengths)) == 1:
                # Rows of equal length see the same keys: the last `window` of them (or all), no mask;
                # only those are read, so a sliding-window model's step reads at most `window` tokens.
                plan.decode_start = 0 if window is None else max(0, n - window)
            else:  # from the first key any row sees: a windowed model's shortest row bounds the read
                plan.decode_start = 0 if window is None else max(0, min(batch.end_lengths) - window)
                plan.decode_mask = visible_keys(batch.positions, n, window)[:, None, :, plan.decode_start:]  # [B, 1, 1, N']
            cache_dtype = torch.int8 if self.kv.quantized else self.kv.dtype
            plan.in_place = self.kv.kivi_layers is None and self._reads_in_place(cache_dtype, n - plan.decode_start)
        else:
            n, T, H = batch.end_lengths[0], batch.num_new, self.args.num_heads
            # every key up to its own position visible (no sliding window reached): on a CPU the
            # chunk attends in two flash calls without a mask (causal_prefill_attention)
            plan.prefill_causal = self.kv.device.type == "cpu" and (window is None or n <= window)
            if plan.prefill_causal:
                return
            block = max(1, min(T, PREFILL_SCORE_BYTES // (4 * H * n)))
            plan.prefill_masks = {
                t0: visible_keys(batch.positions[:, t0:t0 + block], n, window)[0]
                for t0 in range(0, T, block)}  # {t0: [Tb, N] bool}

    def new_plan(self) -> DensePlan:
        return DensePlan()

    def forward(self, layer, q, k, v, batch):
        if batch.is_decode and batch.plan.in_place:  # the step's common case, with nothing else to decide
            arrays = self.kv.compiled_store(layer, k)  # None: a layer whose KV is on disk, say
            if arrays is not None:
                return self._decode_in_place(arrays, q, k, v, batch)
        self.kv.write(layer, k, v, batch)
        if batch.is_decode:
            return self._decode(layer, q, batch)
        return self._prefill(layer, q, k, v, batch)

    def _decode_in_place(self, arrays: CacheArrays, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         batch: ForwardBatch) -> torch.Tensor:
        """A decode step's layer whose KV the CPU kernels store and read in place: what
        ``kv.write`` then ``_decode`` do for it, without their dispatch (on a bf16 cache, one call of
        the C kernel for both). q [B, H, 1, D] -> [B, H, 1, D]."""
        B, H, _, D = q.shape
        ranges = self._decode_ranges(arrays, batch)
        out, _ = arrays.store_and_attend(q.view(B, H, D), k, v, batch, ranges, self.args.softmax_scale)  # [B, H, D]
        return out.view(B, H, 1, D)

    def _attend_in_place(self, arrays: CacheArrays, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The in-place kernel over each row's visible tokens: q [B, H, 1, D] -> [B, H, 1, D]."""
        B, H, _, D = q.shape
        out, _ = arrays.attend(q.view(B, H, D), self._decode_ranges(arrays, batch), self.args.softmax_scale)  # [B, H, D]
        return out.view(B, H, 1, D)

    def _decode_ranges(self, arrays: CacheArrays, batch: ForwardBatch) -> DecodeRanges:
        plan: DensePlan = batch.plan
        if plan.decode_ranges is None:  # the first layer of the step works them out for all
            plan.decode_ranges = DecodeRanges(*self._visible_ranges(batch), self.args.num_kv_heads, arrays.k.shape[2])
        return plan.decode_ranges

    def _reads_in_place(self, cache_dtype: torch.dtype, visible: int) -> bool:
        """Whether decode attends through the in-place kernel for a cache of this dtype and length."""
        if self.kv.device.type not in FUSED_DECODE_DEVICES:
            return False
        return cache_dtype in FUSED_DECODE_DTYPES or (cache_dtype == torch.float32 and visible >= FUSED_F32_MIN_TOKENS)

    def _decode(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Exact attention of one new token per row, q [B, H, 1, D], over the visible cached keys."""
        a = self.args
        B, H, _, D = q.shape
        qg = q.view(B, a.num_kv_heads, a.group_size, D)  # [B, Hkv, G, D]
        plan: DensePlan = batch.plan
        start, end, decode_mask = plan.decode_start, max(batch.end_lengths), plan.decode_mask
        on_disk = layer in self.kv.disk_layers  # read like a host layer's (a sliding window's rows)
        arrays = None if on_disk else self.kv.host_arrays(layer)  # the CPU cache's views, for the kernel
        if arrays is not None and self._reads_in_place(arrays.dtype, end - start):
            return self._attend_in_place(arrays, q, batch)
        kivi = self.kv.kivi_arrays(layer)
        if kivi is not None:  # KIVI's codes attended in place, its kept rows beside them
            lo, hi = self._visible_ranges(batch)
            out = self.kv.kivi_layers[layer].attend(kivi, q.view(B, H, D), lo, hi, a.softmax_scale)  # [B, H, D]
            return out.to(q.dtype).view(B, H, 1, D)
        if self.kv.quantized and end - start > DECODE_BLOCK_TOKENS:  # dequantize a block at a time
            acc = OnlineSoftmax(qg, a.softmax_scale)
            for lo in range(start, end, DECODE_BLOCK_TOKENS):
                hi = min(end, lo + DECODE_BLOCK_TOKENS)
                keys, values = self.kv.read(layer, slice(0, B), lo, hi, self.kv.attend_dtype)  # [B, Hkv, n, D]
                mask = None if decode_mask is None else decode_mask[..., lo - start:hi - start]
                acc.add(keys, values, mask)
            return acc.result().view(B, H, 1, D)
        # a layer in the host tier: everything visible comes over (dense attention's price)
        keys, values = self.kv.read(layer, slice(0, B), start, end, self.kv.attend_dtype)  # [B, Hkv, N', D]
        out = attend(qg, keys, values, a.softmax_scale, decode_mask)  # [B, Hkv, G, D]
        return out.view(B, H, 1, D)

    def _visible_ranges(self, batch: ForwardBatch) -> tuple[list[int], list[int]]:
        """The tokens each row of a decode step sees, lo[b]..hi[b]-1: the model's sliding window of
        its own length, or everything up to the longest row when all rows are alike."""
        plan: DensePlan = batch.plan
        end, window = max(batch.end_lengths), self.args.sliding_window
        if plan.decode_mask is None:
            return [plan.decode_start] * len(batch.rows), [end] * len(batch.rows)
        hi = list(batch.end_lengths)
        return [0 if window is None else max(0, n - window) for n in hi], hi

    def _prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 batch: ForwardBatch) -> torch.Tensor:
        a = self.args
        row, n = batch.rows[0], batch.end_lengths[0]
        # a layer in the host tier: its prefix comes over for each chunk
        keys, values = self.kv.read(layer, slice(row, row + 1), 0, n)  # [1, Hkv, N, D]
        if self.kv.kivi is not None and layer not in self.kv.disk_layers:
            # KIVI keeps a row's newest tokens unquantized: a chunk's own tokens are attended as
            # computed (k, v [1, Hkv, T, D]), so that a chunk of KIVI_RESIDUAL tokens sees what decode
            # would (the read is a copy: the cache keeps its codes). A disk layer's 4-bit rows hold
            # every token quantized, and decode reads them so.
            keys[:, :, batch.start_lengths[0]:n] = k
            values[:, :, batch.start_lengths[0]:n] = v
        if batch.plan.prefill_causal:
            return causal_prefill_attention(q, keys, values, batch.start_lengths[0], a.softmax_scale)  # [1, H, T, D]
        out = torch.empty_like(q)  # [1, H, T, D]
        # SDPA's fused CPU/GPU kernels are exact and several times faster than explicit matmuls
        # for a block of queries; query blocks bound the scores if it falls back to its math path.
        for t0, visible in batch.plan.prefill_masks.items():  # visible [Tb, N]
            t1 = t0 + visible.shape[0]
            out[:, :, t0:t1] = F.scaled_dot_product_attention(
                q[:, :, t0:t1], keys, values, attn_mask=visible, scale=a.softmax_scale,
                enable_gqa=True)  # [1, H, Tb, D]
        return out
