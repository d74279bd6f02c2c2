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

``kv_dtype="int8"`` holds K and V as int8 codes with one scale per token and KV head (symmetric,
absmax / 127, the scale in the compute dtype): 1 + 2/D bytes per element in bf16 instead of 2, in
every tier. Codes cross to the device as codes (half the bytes) and are dequantized there; a
gather dequantizes only the rows it sends. Readers get compute-dtype tensors either way.

``kv_dtype="int2"`` / ``"int4"`` hold them in KIVI's form (:mod:`offload.tiers.kv_kivi`: keys per
channel over groups of 32 tokens, values per token, a row's newest KIVI_RESIDUAL and first
KIVI_SINK tokens in the compute dtype), in the device and host tiers; 48 bytes per token and KV
head of 64 dims at 2 bits. A host-tier layer's reads cross as codes (and its kept rows) and are
unpacked on the device; its gathers are unpacked on the host, only the rows selected crossing.
The disk tier reads and writes a token's row on its own, which KIVI's groups of tokens cannot be:
there each token's key is held in int8 (a scale per token) and its value in 4 or 2 bits with a scale
and zero per group of 32 channels (:data:`~offload.tiers.kv_disk.DISK_VALUE_GROUP`, KIVI's scheme
for values).

Shapes: B rows, Hkv KV heads, N tokens (capacity), D head_dim, M gathered rows per head.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from offload.attention import ForwardBatch
from offload.config import ModelArgs
from offload.errors import OffloadError
from offload.kernels import CacheArrays, KiviArrays, store_kv

from .kv_codec import dequantize_kv, quantize_kv_parts
from .kv_disk import DiskKV, RowFormat
from .kv_kivi import KIVI_BITS, KIVI_CHANNEL_GROUP, KIVI_GROUP, KIVI_RESIDUAL, KIVI_SINK, KiviFormat, KiviLayer

HOST = torch.device("cpu")
KV_DTYPES = ("int8", *KIVI_BITS)  # beside None: the compute dtype
# Compute dtypes of a CPU layer's KV that the compiled kernels take (offload.kernels: CacheArrays,
# store_kv; int8 codes have their scales in the compute dtype).
KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def kv_held_dtype(kv_dtype: str | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype a KV cache holds its keys and values in: int8 codes for ``kv_dtype="int8"`` (their
    scales in the compute dtype), packed uint8 codes for KIVI's, else the compute dtype ``dtype``."""
    if kv_dtype in KIVI_BITS:
        return torch.uint8
    return torch.int8 if kv_dtype == "int8" else dtype


def kv_format_words(kv_dtype: str, dtype_name: str) -> str:
    """How a quantized KV cache holds its keys and values, in words (the start-up line)."""
    if kv_dtype in KIVI_BITS:
        return (f"KIVI {KIVI_BITS[kv_dtype]}-bit: keys per channel over groups of {KIVI_GROUP} tokens, values per "
                f"token over groups of {KIVI_CHANNEL_GROUP} channels, {dtype_name} scale + minimum; a row's "
                f"newest {KIVI_RESIDUAL} and first {KIVI_SINK} tokens in {dtype_name}")
    return f"a {dtype_name} scale per token and KV head"


def kv_bytes_per_token(args: ModelArgs, dtype_bytes: int, kv_dtype: str | None) -> int:
    """Bytes of K and V for one token across all layers, as the store holds them."""
    if kv_dtype is None:
        return args.kv_bytes_per_token(dtype_bytes)
    if kv_dtype in KIVI_BITS:
        fmt = KiviFormat(KIVI_BITS[kv_dtype], args.head_dim)
        return args.num_layers * args.num_kv_heads * fmt.bytes_per_token(dtype_bytes)
    return 2 * args.num_layers * args.num_kv_heads * (args.head_dim + dtype_bytes)  # codes + a scale per head


# Staging buffers grow with headroom, so that a selection a little wider than the last one
# (budgets grow with the context) reuses the buffer instead of reallocating pinned memory.
STAGING_HEADROOM = 1.25
# Tokens of a quantized KV dequantized at a time in decode (offload.indexes.dense): the working copy
# of one layer stays at a block (fp32 K and V of 8,192 tokens: 64 MiB for 8 KV heads of 128) however
# long the context. Reads up to a block land in reused buffers; longer ones (a long prefill's
# prefix) get a fresh tensor.
DECODE_BLOCK_TOKENS = 8192
# A prompt cache's disk layer is written back this many tokens at a time (each piece's rows encoded,
# appended, spilled): one layer's rows are not held encoded beside the layer read from the file.
RESTORE_PIECE_TOKENS = 4096


class KVRows:
    """One cache row of one layer's keys (or values) [Hkv, N, D], as the store holds them, read in
    the compute dtype: ``rows[index]`` (any index that leaves D whole) is a view of the cache when
    it is not quantized, and dequantizes only the rows it names when it is. Indexes hold one of
    these rather than a tensor, so that a search scoring 3% of the keys dequantizes 3% of them."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor | None = None):
        self.data = data  # [Hkv, N, D] (compute dtype, or int8 codes)
        self.scale = scale  # [Hkv, N, 1] in the compute dtype, or None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype rows are read in (the compute dtype)."""
        return self.data.dtype if self.scale is None else self.scale.dtype

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    @property
    def in_place(self) -> bool:
        """Whether ``data`` (and ``scale``) are the cache's own arrays, which a compiled search may
        read directly (the compute dtype, or int8 codes by their scales)."""
        return True

    def __getitem__(self, index) -> torch.Tensor:
        if self.scale is None:
            return self.data[index]
        return dequantize_kv(self.data[index], self.scale[index])

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """Each head's own rows: ids [Hkv, W] (token ids per KV head) -> [Hkv, W, D] in the compute
        dtype (an int8 cache dequantizes only these)."""
        ids = ids.to(self.data.device).long()
        data = self.data.gather(1, ids[..., None].expand(-1, -1, self.data.shape[-1]))  # [Hkv, W, D]
        if self.scale is None:
            return data
        return dequantize_kv(data, self.scale.gather(1, ids[..., None]))


class DiskRows(KVRows):
    """:class:`KVRows` of a layer in the disk tier: a slice of tokens is read from disk (and the
    rows still in memory), a list of token ids gathered through the extent cache."""

    def __init__(self, store: "KVStore", layer: int, which: int):
        self.store, self.layer, self.which = store, layer, which  # which: 0 keys, 1 values

    @property
    def shape(self) -> torch.Size:
        a = self.store.args
        return torch.Size((a.num_kv_heads, self.store.capacity, a.head_dim))

    @property
    def device(self) -> torch.device:
        return HOST

    @property
    def dtype(self) -> torch.dtype:
        return self.store.dtype

    @property
    def quantized(self) -> bool:
        return self.store.quantized

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 2:
            raise IndexError("disk KV rows take [heads, tokens] indexes (D whole)")
        heads, tokens = index[0], index[1] if len(index) == 2 else slice(None)
        disk = self.store.disk
        n = disk.files[self.layer].n
        if isinstance(tokens, int):
            tokens = slice(tokens, tokens + 1) if tokens >= 0 else slice(n + tokens, n + tokens + 1)
            squeeze = True
        else:
            squeeze = False
        if isinstance(tokens, slice):
            start, stop, step = tokens.indices(n)
            if step != 1:
                raise IndexError("disk KV rows take token slices with step 1")
            # only this side's part (and scale) decoded: an index build reads a whole layer's keys
            coded = disk.fmt.scale is not None
            which = (self.which, 2 + self.which) if coded else (self.which,)
            rows = disk.fmt.decode(disk.read_range(self.layer, start, max(start, stop)), which)  # [Hkv, T, ...]
            out = rows[0] if not coded else disk.fmt.dequantize(rows[0], rows[1], self.store.dtype,
                                                                keys=self.which == 0)  # [Hkv, T, D]
        else:
            ids = torch.as_tensor(tokens).long()  # token ids for every head
            ids = ids.expand(self.store.args.num_kv_heads, -1) if ids.dim() == 1 else ids
            out = self.store._disk_side(disk.gather(self.layer, ids.numpy()), self.which, None)  # [Hkv, M, D]
        out = out[heads]
        return out[..., 0, :] if squeeze else out

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [Hkv, W] -> [Hkv, W, D], through the extent cache."""
        return self[:, ids]


class KiviRows(KVRows):
    """:class:`KVRows` of one cache row of a KIVI layer: a slice of tokens or a list of token ids
    is unpacked (only those), in the compute dtype."""

    def __init__(self, layer: KiviLayer, row: int, which: int):
        self.layer, self.row, self.which = layer, row, which  # which: 0 keys, 1 values

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.layer.k_codes.shape[1], self.layer.capacity, self.layer.fmt.head_dim))

    @property
    def device(self) -> torch.device:
        return self.layer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.dtype

    @property
    def quantized(self) -> bool:
        return True

    @property
    def in_place(self) -> bool:
        return False  # packed groups: read through __getitem__ / take only

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        if not index or index[0] is None or index[0] is Ellipsis:  # x[None], x[...]: the whole row first
            return self._tokens(0, self.layer.capacity)[index]
        heads, tokens, rest = index[0], index[1] if len(index) > 1 else slice(None), index[2:]
        if isinstance(tokens, slice):
            start, stop, step = tokens.indices(self.layer.capacity)
            rows = self._tokens(start, max(start, stop))[:, ::step]  # [Hkv, T, D]
        elif isinstance(tokens, int):
            t = tokens % self.layer.capacity
            rows = self._tokens(t, t + 1)[:, 0]  # [Hkv, D]
        else:
            ids = torch.as_tensor(tokens, device=self.device).long()
            taken = self.take(ids.reshape(1, -1).expand(self.shape[0], -1))  # [Hkv, M, D]
            rows = taken.view(self.shape[0], *ids.shape, -1)  # [Hkv, *ids, D]
        token_dims = rows.dim() - 2  # the tokens' dims as asked (none for one token)
        return rows[(heads,) + (slice(None),) * token_dims + rest]

    def _tokens(self, start: int, end: int) -> torch.Tensor:
        return self.layer.read(self.row, start, end)[self.which]

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [Hkv, W] -> [Hkv, W, D]: only these tokens unpacked."""
        return self.layer.take(self.row, ids)[self.which]


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


@dataclass(frozen=True)
class DiskTier:
    """The KV store's disk tier (:mod:`offload.tiers.kv_disk`): the folder its files go in, the
    host memory its cache of extents may take, the recent tokens kept in memory, and whether the
    next step's likely extents are read ahead."""

    folder: Path
    cache_bytes: int
    keep_tokens: int
    read_ahead: bool


class KVStore:
    """K and V of every layer: one [B, Hkv, capacity, D] tensor per layer and kind, in the layer's
    tier. ``host_layers`` are kept in host memory; the others on ``device``. ``kv_dtype="int8"``:
    ``k``/``v`` hold int8 codes and ``k_scale``/``v_scale`` [B, Hkv, capacity, 1] their scales.
    ``kv_dtype="int2"`` / ``"int4"``: each layer in memory is a :class:`KiviLayer` (``kivi_layers``;
    None for a disk layer, whose rows are the disk tier's) and ``k``/``v`` are None."""

    def __init__(self, args: ModelArgs, device: torch.device, dtype: torch.dtype,
                 host_layers: Iterable[int] = (), kv_dtype: str | None = None,
                 disk_layers: Iterable[int] = (), disk: DiskTier | None = None):
        self.args, self.device, self.dtype = args, torch.device(device), dtype
        if kv_dtype is not None and kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown kv_dtype {kv_dtype!r}: use one of {', '.join(KV_DTYPES)} or None")
        self.kv_dtype = kv_dtype
        self.quantized = kv_dtype is not None  # reads dequantize (int8 codes, or KIVI's groups)
        self.kivi: KiviFormat | None = None
        if kv_dtype in KIVI_BITS:
            try:
                self.kivi = KiviFormat(KIVI_BITS[kv_dtype], args.head_dim)
            except ValueError as e:
                raise OffloadError(f"kv_dtype={kv_dtype!r}: {e}; use kv_dtype='int8'") from None
        # What decode attention reads a quantized KV in: dequantizing costs the same into fp32 as into
        # bf16, and on a CPU fp32 products of this shape run several times faster than bf16 ones
        # (BENCHMARKS.md, int8 KV); a GPU keeps the compute dtype.
        self.attend_dtype = torch.float32 if self.quantized and self.device.type == "cpu" else dtype
        host_layers = self.host_layers = frozenset(host_layers)
        if not host_layers <= set(range(args.num_layers)):
            raise ValueError(f"host_layers {sorted(host_layers)} name layers beyond the model's {args.num_layers}")
        disk_layers = self.disk_layers = frozenset(disk_layers)
        if disk_layers and disk is None:
            raise ValueError("disk_layers need a DiskTier (where the KV goes and the cache it is read through)")
        if disk_layers & host_layers or not disk_layers <= set(range(args.num_layers)):
            raise ValueError(f"disk_layers {sorted(disk_layers)} must be layers of the model, none of them a host layer")
        self.disk_tier = disk
        self.disk: DiskKV | None = None  # the disk layers' KV of the one cache row, made by allocate()
        self.layer_devices = [HOST if i in host_layers | disk_layers else self.device for i in range(args.num_layers)]
        self.k: list[torch.Tensor] | None = None  # per layer [B, Hkv, N, D] (codes when quantized)
        self.v: list[torch.Tensor] | None = None
        self.k_scale: list[torch.Tensor] | None = None  # quantized: per layer [B, Hkv, N, 1]
        self.v_scale: list[torch.Tensor] | None = None
        self.kivi_layers: list[KiviLayer | None] | None = None  # KIVI: per layer, in its tier (None: on disk)
        self._staging = _Staging(pinned=self.device.type == "cuda")
        self._scale_staging = _Staging(pinned=self.device.type == "cuda")
        self._scratch: list[torch.Tensor | None] = [None, None]  # reused dequantized K and V of a decode read
        self._arrays: list[CacheArrays | None] = [None] * args.num_layers  # numpy views of CPU layers
        self.bytes_to_device = 0  # KV bytes copied from the host tier to the device
        self._capacity = 0
        self._batch_size = 0

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def kernel_readable(self) -> bool:
        """Whether the int8/float kernels (``host_arrays``, ``whole_cache``) read this cache's layout in
        place; KIVI's packed groups have their own decode kernel (``kivi_arrays``) and are otherwise
        unpacked through torch."""
        return self.kivi is None

    @property
    def capacity(self) -> int:
        return self._capacity

    def on_device(self, layer: int) -> bool:
        """Whether ``layer``'s KV is where attention computes (else it is in the host tier)."""
        return self.layer_devices[layer] == self.device

    def allocate(self, batch_size: int, capacity: int) -> None:
        if self._batch_size == batch_size and self.capacity >= capacity:
            return
        if self.disk_layers and batch_size != 1:
            raise OffloadError(f"the KV's disk tier holds one sequence at a time; got a batch of {batch_size}: "
                               "generate one prompt at a time, or give cpu_memory enough for the KV in memory")
        self.k = self.v = self.k_scale = self.v_scale = self.kivi_layers = None  # free the old cache first
        self.close()
        self._scratch = [None, None]
        self._arrays = [None] * self.args.num_layers
        a = self.args
        self._capacity, self._batch_size = capacity, batch_size
        if self.kivi is not None:  # a disk layer has no KIVI layer (None): its rows are the disk tier's
            self.kivi_layers = [None if i in self.disk_layers else
                                KiviLayer(self.kivi, batch_size, a.num_kv_heads, capacity, self.dtype, dev,
                                          pin=dev.type == "cpu" and self.device.type == "cuda")
                                for i, dev in enumerate(self.layer_devices)]
            self._allocate_disk(capacity)
            return
        shape = (batch_size, a.num_kv_heads, capacity, a.head_dim)
        held = kv_held_dtype(self.kv_dtype, self.dtype)
        # a disk layer holds no tensor (an empty one keeps its place in the lists): its KV is in self.disk
        sizes = [shape[:2] + (0,) + shape[3:] if i in self.disk_layers else shape for i in range(a.num_layers)]
        # Zeroed, not empty: rows of a batch are masked beyond their length, and a masked weight
        # of 0 times uninitialised memory that happens to hold NaN would still be NaN.
        self.k = [self._zeros(n, dev, held) for n, dev in zip(sizes, self.layer_devices)]  # L x [B, Hkv, N, D]
        self.v = [self._zeros(n, dev, held) for n, dev in zip(sizes, self.layer_devices)]  # L x [B, Hkv, N, D]
        if self.quantized:
            self.k_scale = [self._zeros(n[:3] + (1,), dev, self.dtype) for n, dev in zip(sizes, self.layer_devices)]
            self.v_scale = [self._zeros(n[:3] + (1,), dev, self.dtype) for n, dev in zip(sizes, self.layer_devices)]
        self._allocate_disk(capacity)

    def _allocate_disk(self, capacity: int) -> None:
        if self.disk_layers:
            t = self.disk_tier
            fmt = RowFormat.for_kv(self.args.head_dim, self.dtype, self.kv_dtype)
            self.disk = DiskKV(t.folder, sorted(self.disk_layers), self.args.num_kv_heads, capacity, fmt,
                               t.cache_bytes, t.keep_tokens, t.read_ahead)

    def _kivi(self, layer: int) -> KiviLayer | None:
        """``layer``'s KIVI layer (None: not KIVI, or a disk layer)."""
        return None if self.kivi_layers is None else self.kivi_layers[layer]

    def _disk_side(self, parts: list[torch.Tensor], which: int, dtype: torch.dtype | None) -> torch.Tensor:
        """One side (0 K, 1 V) of a disk layer's decoded or gathered parts, in ``dtype`` (default: the
        compute dtype) when quantized."""
        fmt = self.disk.fmt
        if fmt.scale is None:
            return parts[which]
        return fmt.dequantize(parts[which], parts[2 + which], dtype or self.dtype, keys=which == 0)

    def close(self) -> None:
        """Remove the disk tier's files (the KV on disk belongs to this store alone)."""
        if self.disk is not None:
            self.disk.close()
            self.disk = None

    @contextmanager
    def prefill_pass(self, layer: int, start: int, upto: int) -> Iterator[None]:
        """A layer-major prefill's pass over ``layer``, tokens start..upto-1: a disk layer holds its
        rows in memory until the pass ends (DiskKV.hold), then writes them; the other tiers hold
        their rows anyway."""
        if layer not in self.disk_layers:
            yield
            return
        self.disk.hold(layer, start, upto)
        try:
            yield
        finally:
            self.disk.release(layer)

    def lay_out(self, layer: int, order: np.ndarray) -> None:
        """A disk layer's tokens [0, m) in an index's order (order [Hkv, m]): see DiskKV.lay_out."""
        if layer in self.disk_layers:
            self.disk.lay_out(layer, order)

    def lookahead_tokens(self, layer: int, selected: int) -> int:
        """Tokens per head worth reading ahead for ``layer`` after a step that selected ``selected``
        per head: some for a disk layer (DiskKV.lookahead_tokens), none elsewhere (nothing to hide)."""
        return self.disk.lookahead_tokens(selected) if layer in self.disk_layers else 0

    def prefetch(self, layer: int, ids: torch.Tensor) -> None:
        """Tokens ``ids`` [Hkv, P] (-1: none) a disk layer likely gathers next step: read in the
        background (DiskKV.prefetch)."""
        if layer in self.disk_layers:
            self.disk.prefetch(layer, ids.cpu().numpy())

    def host_arrays(self, layer: int) -> CacheArrays | None:
        """numpy views of a CPU layer's cache for the compiled kernels, made on first use after an
        allocation; None when the layer's KV is not on the CPU in a dtype they take."""
        if not (self.layer_devices[layer].type == "cpu" and self.dtype in KERNEL_DTYPES and self.kernel_readable) \
                or layer in self.disk_layers:
            return None
        arrays = self._arrays[layer]
        if arrays is None:
            scales = (self.k_scale[layer][..., 0], self.v_scale[layer][..., 0]) if self.quantized else ()
            arrays = self._arrays[layer] = CacheArrays(self.k[layer], self.v[layer], *scales)
        return arrays

    def compiled_store(self, layer: int, k: torch.Tensor) -> CacheArrays | None:
        """The layer's cache views when one compiled call stores new rows like ``k`` there (a CPU
        layer in memory, k in the cache's dtype or quantized into its int8 codes); None otherwise."""
        if not k.is_cpu or self.kivi_layers is not None:
            return None
        arrays = self.host_arrays(layer)
        return arrays if arrays is not None and (self.quantized or k.dtype == self.dtype) else None

    def kivi_arrays(self, layer: int) -> KiviArrays | None:
        """A KIVI layer's views for the CPU decode kernel (None: not KIVI, or no kernel takes it)."""
        kivi = self._kivi(layer)
        return None if kivi is None else kivi.kernel_arrays()

    def _zeros(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # Host-tier KV is pinned when a GPU computes, so that its copies to the GPU are asynchronous.
        pin = device.type == "cpu" and self.device.type == "cuda"
        return torch.zeros(shape, device=device, dtype=dtype, pin_memory=pin)

    def _parts(self, layer: int) -> list[torch.Tensor]:
        """What ``layer`` holds: [k, v], [k codes, v codes, k scales, v scales], or a KIVI layer's tensors
        (a KIVI store's disk layer: nothing; its rows are the disk tier's)."""
        if self.kivi_layers is not None:
            kivi = self.kivi_layers[layer]
            return [] if kivi is None else kivi.tensors
        if self.quantized:
            return [self.k[layer], self.v[layer], self.k_scale[layer], self.v_scale[layer]]
        return [self.k[layer], self.v[layer]]

    def nbytes(self, device_type: str | None = None) -> int:
        """Bytes held (in the tier of ``device_type`` only, if given: "cuda", "cpu" or "disk"; the
        disk tier's cache and in-memory rows count as "cpu")."""
        if self._batch_size == 0:
            return 0
        held = sum(t.numel() * t.element_size() for layer in range(self.args.num_layers)
                   for t in self._parts(layer) if device_type in (None, t.device.type))
        if self.disk is not None:
            held += self.disk.nbytes_on_disk() if device_type in (None, "disk") else 0
            held += self.disk.memory_nbytes() if device_type in (None, "cpu") else 0
        return held

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> None:
        """Put k, v [B, Hkv, T, D] at the batch's positions (into this layer's tier)."""
        if layer in self.disk_layers:  # one row (allocate saw to it)
            self.disk.write(layer, batch.start_lengths[0], self.disk.fmt.quantize(k[0].cpu(), v[0].cpu()))  # [Hkv, T, ...]
            return
        if self.kivi_layers is not None:
            for i, (row, start) in enumerate(zip(batch.rows, batch.start_lengths)):
                self.kivi_layers[layer].write(row, start, k[i], v[i])  # [Hkv, T, D]
            return
        arrays = self.compiled_store(layer, k)
        if arrays is not None:
            # One compiled call stores both, quantizing int8 codes (the tensor form below: ~36 small
            # ops for int8, two indexed copies of ~8 us each for a float cache).
            store_kv(k, v, arrays, *batch.store_at)
            return
        new = [k, v]  # [B, Hkv, T, D] each
        if self.quantized:
            new = quantize_kv_parts(k, v, self.dtype)  # codes [B, Hkv, T, D], scales [B, Hkv, T, 1]
        if batch.is_decode:
            if len(set(batch.start_lengths)) == 1:  # all rows at one position: a plain slice
                n, B = batch.start_lengths[0], len(batch.rows)  # rows 0..B-1 (a server's cache has more)
                for dest, src in zip(self._parts(layer), new):
                    dest[:B, :, n] = src[:, :, 0]  # [B, Hkv, D or 1]
                return
            rows, pos = batch.row_index, batch.positions[:, 0]  # [B], [B]
            where = self.k[layer].device
            if where != rows.device:
                rows, pos = rows.to(where), pos.to(where)
            for dest, src in zip(self._parts(layer), new):
                dest[rows, :, pos] = src[:, :, 0].to(where)  # [B, Hkv, D or 1]
        else:
            row, start = batch.rows[0], batch.start_lengths[0]
            for dest, src in zip(self._parts(layer), new):
                dest[row, :, start:start + batch.num_new] = src[0]  # [Hkv, T, D or 1]

    def read(self, layer: int, rows: slice, start: int, end: int,
             dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens start..end-1 of cache rows ``rows`` of ``layer``, on the compute device: k, v
        [B', Hkv, end-start, D] in the compute dtype (a quantized KV: in ``dtype`` when given). Views
        when the layer is on the device and not quantized; copies from the host tier (codes cross,
        then are dequantized on the device; KIVI's codes, scales and kept rows cross, then are
        unpacked on the device)."""
        if layer in self.disk_layers:  # codes and scales cross as they are, then are dequantized
            parts = [p[None] for p in self.disk.fmt.decode(self.disk.read_range(layer, start, end))]  # [1, Hkv, n, ...]
            if self.device.type != "cpu":
                self.bytes_to_device += sum(t.numel() * t.element_size() for t in parts)
                parts = [t.to(self.device, non_blocking=True) for t in parts]
            return self._disk_side(parts, 0, dtype), self._disk_side(parts, 1, dtype)  # [1, Hkv, n, D] each
        if self.kivi_layers is not None:
            kivi, rows = self.kivi_layers[layer], range(*rows.indices(self._batch_size))
            if self.on_device(layer):
                pairs = [kivi.read(r, start, end, dtype) for r in rows]
            else:  # the codes cross, then are unpacked on the device
                spans = [kivi.span(r, start, end) for r in rows]
                self.bytes_to_device += sum(span.nbytes for span in spans)
                pairs = [span.to(self.device).unpack(dtype or self.dtype) for span in spans]
            return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])  # [B', Hkv, n, D] each
        parts = [t[rows, :, start:end] for t in self._parts(layer)]  # [B', Hkv, n, D or 1] each
        if not self.on_device(layer):
            self.bytes_to_device += sum(t.numel() * t.element_size() for t in parts)
            parts = [t.to(self.device, non_blocking=True) for t in parts]
        if self.quantized:
            return self._dequantized(parts[0], parts[2], dtype, 0), self._dequantized(parts[1], parts[3], dtype, 1)
        return parts[0], parts[1]

    def _sent(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v read from ``layer``'s tier, on the compute device (bytes that cross counted)."""
        if self.on_device(layer):
            return k, v
        self.bytes_to_device += k.numel() * k.element_size() + v.numel() * v.element_size()
        return k.to(self.device, non_blocking=True), v.to(self.device, non_blocking=True)

    def _dequantized(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None,
                     which: int) -> torch.Tensor:
        """codes [..., D] times scale [..., 1]; a read of at most DECODE_BLOCK_TOKENS tokens (a decode
        step's, or one block of it) lands in a reused buffer, valid until the next read: a fresh
        multi-MiB tensor per layer per step would be mapped and page-faulted anew each time."""
        dtype = dtype or self.dtype
        if codes.shape[-2] > DECODE_BLOCK_TOKENS:
            return dequantize_kv(codes, scale, dtype)
        buf = self._scratch[which]
        if buf is None or buf.numel() < codes.numel() or buf.dtype != dtype or buf.device != codes.device:
            buf = self._scratch[which] = torch.empty(int(codes.numel() * STAGING_HEADROOM), dtype=dtype,
                                                     device=codes.device)
        out = buf[:codes.numel()].view(codes.shape)  # [..., D]
        out.copy_(codes)
        return out.mul_(scale)

    def whole_cache(self, layer: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                                  torch.Tensor | None]:
        """A layer's whole cache in place, for a kernel that reads it directly: k [B, Hkv, N, D],
        v, and when quantized (k holds int8 codes) the per-token scales k_scale [B, Hkv, N] and
        v_scale, else None twice (first ``batch_size`` rows, contiguous; N the capacity, the caller
        bounds what it reads)."""
        if layer in self.disk_layers:
            raise OffloadError(f"layer {layer}'s KV is on disk: it is read a selection at a time (KVStore.gather)")
        if self.kivi_layers is not None:
            raise OffloadError(f"kv_dtype={self.kv_dtype!r}: no kernel reads KIVI's groups in place (KVStore.read / gather)")
        if self.quantized:
            k, v, ks, vs = self._parts(layer)
            return k[:batch_size], v[:batch_size], ks[:batch_size, ..., 0], vs[:batch_size, ..., 0]
        return self.k[layer][:batch_size], self.v[layer][:batch_size], None, None

    def rows(self, layer: int, row: int) -> tuple[KVRows, KVRows]:
        """Keys and values of cache row ``row`` of ``layer`` where the layer lives, read through
        :class:`KVRows` (indexes, a policy's own attention, telemetry)."""
        if layer in self.disk_layers:
            return DiskRows(self, layer, 0), DiskRows(self, layer, 1)
        if self.kivi_layers is not None:
            return KiviRows(self.kivi_layers[layer], row, 0), KiviRows(self.kivi_layers[layer], row, 1)
        if self.quantized:
            return (KVRows(self.k[layer][row], self.k_scale[layer][row]),
                    KVRows(self.v[layer][row], self.v_scale[layer][row]))
        return KVRows(self.k[layer][row]), KVRows(self.v[layer][row])

    def gather(self, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``ids`` [B, Hkv, M] (token positions, per head; negative = padding, read as 0) of
        ``layer`` on the device: k, v [B, Hkv, M, D] (a quantized KV: in ``attend_dtype``). A
        host-tier layer's rows are gathered in host memory and sent (quantized: their codes and
        scales cross, then are dequantized); a device-tier layer's are gathered in place (the
        quantized KV's sparse path; KIVI's rows are unpacked where they lie)."""
        if layer in self.disk_layers:  # codes and scales cross as they are, then are dequantized
            rows = self.disk.gather(layer, ids[0].clamp(min=0).cpu().numpy())  # [Hkv, M, ...] each
            parts = [p[None].to(self.device, non_blocking=True) for p in rows]  # [1, Hkv, M, ...]
            if self.device.type != "cpu":
                self.bytes_to_device += sum(t.numel() * t.element_size() for t in parts)
            return self._disk_side(parts, 0, self.attend_dtype), self._disk_side(parts, 1, self.attend_dtype)
        if self.kivi_layers is not None:
            kivi = self.kivi_layers[layer]
            pairs = [kivi.take(b, ids[b].clamp(min=0), self.attend_dtype) for b in range(ids.shape[0])]
            return self._sent(layer, torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
        host = layer in self.host_layers
        index = ids.to(self.k[layer].device).clamp(min=0)[..., None]  # [B, Hkv, M, 1]
        rows = self._gathered(self._staging if host else None, [self.k[layer], self.v[layer]],
                              index.expand(-1, -1, -1, self.args.head_dim))  # [B, Hkv, M, D] each
        if not self.quantized:
            return rows[0], rows[1]
        scales = self._gathered(self._scale_staging if host else None, [self.k_scale[layer], self.v_scale[layer]],
                                index)  # [B, Hkv, M, 1] each
        return dequantize_kv(rows[0], scales[0], self.attend_dtype), dequantize_kv(rows[1], scales[1], self.attend_dtype)

    def _gathered(self, staging: _Staging | None, sources: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
        """torch.gather of each source along tokens: in place (``staging`` None), or into
        ``staging``'s host buffers and sent to the device (counted in ``bytes_to_device``)."""
        if staging is None:
            return [torch.gather(src, 2, index) for src in sources]
        hosts = staging.take(index.shape, sources[0].dtype)  # [B, Hkv, M, D or 1] each
        for src, out in zip(sources, hosts):
            torch.gather(src, 2, index, out=out)
        sent = [h.to(self.device, non_blocking=True) for h in hosts]
        staging.sent()
        self.bytes_to_device += sum(t.numel() * t.element_size() for t in sent)
        return sent

    def move_row(self, src: int, dst: int, n: int) -> None:
        """Copy the first n tokens of cache row ``src`` into row ``dst``, in place in each tier (codes
        and scales as held: exact). A server keeps its rows in flight at 0..B-1 this way."""
        if self.disk_layers:
            raise OffloadError("the KV's disk tier holds one sequence: rows do not move")
        if self.kivi_layers is not None:
            for kivi in self.kivi_layers:
                kivi.move_row(src, dst, n)
            return
        for layer in range(self.args.num_layers):
            for part in self._parts(layer):
                part[dst, :, :n] = part[src, :, :n]

    def layer_prefix(self, layer: int, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n tokens of cache row ``row`` of ``layer``, on the host: k, v [Hkv, n, D] in the
        compute dtype (quantized: in fp32, where codes times scales are exact, so that
        :meth:`restore_layer` gives back the very codes and scales; a disk layer's 4-bit values come
        back with their codes, their scale and zero within an fp32 ulp)."""
        if layer in self.disk_layers:
            parts = self.disk.fmt.decode(self.disk.read_range(layer, 0, n))  # [Hkv, n, ...] each
            return self._disk_side(parts, 0, torch.float32), self._disk_side(parts, 1, torch.float32)
        if self.kivi_layers is not None:
            k, v = self.kivi_layers[layer].read(row, 0, n, torch.float32)
            return k.cpu(), v.cpu()
        parts = [t[row, :, :n].cpu() for t in self._parts(layer)]  # [Hkv, n, D or 1] each
        if self.quantized:
            return dequantize_kv(parts[0], parts[2], torch.float32), dequantize_kv(parts[1], parts[3], torch.float32)
        return parts[0], parts[1]

    def restore_layer(self, layer: int, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put a saved prefix of ``layer``, k, v [Hkv, n, D] on the host, back as row ``row``'s first
        n tokens, in the layer's tier (quantized as the store holds it): only a device-tier layer
        crosses to the device."""
        if layer in self.disk_layers:  # a piece at a time: the layer is never whole in memory twice over
            for start in range(0, k.shape[1], RESTORE_PIECE_TOKENS):
                end = start + RESTORE_PIECE_TOKENS
                self.disk.write(layer, start, self.disk.fmt.quantize(k[:, start:end], v[:, start:end]))
            return
        if self.kivi_layers is not None:
            self.kivi_layers[layer].write(row, 0, k, v)
            return
        new = [k, v]  # [Hkv, n, D]
        if self.quantized:
            new = quantize_kv_parts(k, v, self.dtype)
        for dest, src in zip(self._parts(layer), new):
            dest[row, :, :k.shape[1]] = src
