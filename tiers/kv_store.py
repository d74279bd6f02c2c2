"""The KV store: K and V of every layer, each layer in one tier, allocated once and updated in place.

A layer's KV lives either on the compute device or in host memory (pinned when a GPU computes, so
that its copies are asynchronous). Attention backends never move KV themselves; they ask the store:

- :meth:`KVStore.write` puts a call's new k, v at the batch's positions, into the layer's tier;
- :meth:`KVStore.read` hands a layer's first n tokens to the compute device (all of them cross when
  the layer is in the host tier: dense attention and prefill chunks);
- :meth:`KVStore.gather` sends only chosen token rows of a host-tier layer to the device, gathered
  into reused staging buffers (the sparse decode path: sinks, window and the selection);
- :meth:`KVStore.prefix` / :meth:`KVStore.restore` move a row's prefix out to and back from a
  prompt cache, each layer into its own tier.

``bytes_to_device`` counts every KV byte that crossed from the host tier to the device.
Shapes: B rows, Hkv KV heads, N tokens (capacity), D head_dim, M gathered rows per head.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from offload.attention import ForwardBatch
from offload.config import ModelArgs

HOST = torch.device("cpu")
# Staging buffers grow with headroom, so that a selection a little wider than the last one
# (budgets grow with the context) reuses the buffer instead of reallocating pinned memory.
STAGING_HEADROOM = 1.25


class _Staging:
    """Host buffers the gathered KV rows are written into, reused every step. On a GPU they are
    pinned (asynchronous copies) and two alternate, each reused only after its last copy is done."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.slots: list[torch.Tensor | None] = [None, None]  # flat buffers: K and V of one fetch
        self.done: list = [None, None]  # CUDA event of each slot's last copy
        self.turn = 0

    def take(self, shape: torch.Size, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        n = shape.numel()
        if self.done[self.turn] is not None:
            self.done[self.turn].synchronize()  # its previous copy to the device has finished
        buf = self.slots[self.turn]
        if buf is None or buf.numel() < 2 * n or buf.dtype != dtype:
            size = int(2 * n * STAGING_HEADROOM)
            buf = self.slots[self.turn] = torch.empty(size, dtype=dtype, pin_memory=self.pinned)
        return buf[:n].view(shape), buf[n:2 * n].view(shape)

    def sent(self) -> None:
        """The copies from the slot just taken are queued; the next fetch uses the other slot."""
        if self.pinned:
            self.done[self.turn] = torch.cuda.Event(blocking=True)  # waited on from the host: sleep, not spin
            self.done[self.turn].record()
        self.turn = 1 - self.turn


class KVStore:
    """K and V of every layer: one [B, Hkv, capacity, D] tensor per layer and kind, in the layer's
    tier. ``host_layers`` are kept in host memory; the others on ``device``."""

    def __init__(self, args: ModelArgs, device: torch.device, dtype: torch.dtype,
                 host_layers: Iterable[int] = ()):
        self.args, self.device, self.dtype = args, torch.device(device), dtype
        host_layers = frozenset(host_layers)
        if not host_layers <= set(range(args.num_layers)):
            raise ValueError(f"host_layers {sorted(host_layers)} name layers beyond the model's {args.num_layers}")
        self.layer_devices = [HOST if i in host_layers else self.device for i in range(args.num_layers)]
        self.k: list[torch.Tensor] | None = None  # per layer [B, Hkv, N, D]
        self.v: list[torch.Tensor] | None = None
        self._staging = _Staging(pinned=self.device.type == "cuda")
        self.bytes_to_device = 0  # KV bytes copied from the host tier to the device

    @property
    def batch_size(self) -> int:
        return 0 if self.k is None else self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k[0].shape[2]

    def on_device(self, layer: int) -> bool:
        """Whether ``layer``'s KV is where attention computes (else it is in the host tier)."""
        return self.layer_devices[layer] == self.device

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

    def read(self, layer: int, rows: slice, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens start..end-1 of cache rows ``rows`` of ``layer``, on the compute device: k, v
        [B', Hkv, end-start, D]. Views when the layer is on the device; copies from the host tier."""
        keys = self.k[layer][rows, :, start:end]  # [B', Hkv, n, D]
        values = self.v[layer][rows, :, start:end]
        if self.on_device(layer):
            return keys, values
        self.bytes_to_device += 2 * keys.numel() * keys.element_size()
        return keys.to(self.device, non_blocking=True), values.to(self.device, non_blocking=True)

    def gather(self, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``ids`` [B, Hkv, M] (token positions, per head; negative = padding, read as 0) of a
        host-tier ``layer``, gathered in host memory and sent to the device: k, v [B, Hkv, M, D]."""
        D = self.args.head_dim
        gather = ids.clamp(min=0)[..., None].expand(-1, -1, -1, D)  # [B, Hkv, M, D]
        k_host, v_host = self._staging.take(gather.shape, self.dtype)  # [B, Hkv, M, D] each
        torch.gather(self.k[layer], 2, gather, out=k_host)
        torch.gather(self.v[layer], 2, gather, out=v_host)
        k_rows = k_host.to(self.device, non_blocking=True)  # [B, Hkv, M, D]
        v_rows = v_host.to(self.device, non_blocking=True)
        self._staging.sent()
        self.bytes_to_device += 2 * k_rows.numel() * k_rows.element_size()
        return k_rows, v_rows

    def prefix(self, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n tokens of cache row ``row``, every layer, on the host: k, v [L, Hkv, n, D]."""
        return (torch.stack([k[row, :, :n].cpu() for k in self.k]),
                torch.stack([v[row, :, :n].cpu() for v in self.v]))

    def restore(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put a saved prefix k, v [L, Hkv, n, D] (on the host) back as row ``row``'s first n tokens,
        each layer into its own tier: only the device-tier layers cross to the device."""
        n = k.shape[2]
        for layer in range(self.args.num_layers):
            self.k[layer][row, :, :n] = k[layer]  # [Hkv, n, D]
            self.v[layer][row, :, :n] = v[layer]
