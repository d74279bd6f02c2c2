"""Streaming layer weights from the host or disk tier, one layer ahead of compute.

Every streamed layer goes through the same lifecycle: **load** (a reader thread fills one of two
device-resident buffer layers, the double buffers, from the store or from pinned host memory),
**compute** (the model runs the buffer layer as layer i) and **release** (the buffer is handed
to the next streamed layer, whose load starts at once). Buffers are allocated once and reused,
never reallocated per step. On a GPU the copies run on a side stream: a load waits (on the GPU,
not the host) for an event the compute stream records at release, and the compute stream waits
for the load's own event at acquire, so neither side stalls the other. A disk layer goes disk ->
pinned host staging (one per buffer, verified there) -> device, the read of layer i+1 overlapping
the compute of layer i; kvikio reads straight into device memory. On the CPU a reader thread does
the aligned direct reads while the main thread computes (the read and checksum release the GIL).

:class:`WeightSpill` is the loader's side: tensors of layers placed off the device are assembled
one layer at a time in host memory and written into one store file (atomically, checksummed),
which is reused on the next run when it matches the model and every extent verifies; a store that
fails verification is deleted and rebuilt from the model, since the loader reads the model anyway.
"""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from offload.errors import OffloadError

from .budget import pinned_nbytes
from .io import StoreReader, aligned_empty
from .store import ALIGN, CorruptStoreError, StoreWriter, align_up, read_header


def layer_tensor_name(layer: int, param: str) -> str:
    return f"layers.{layer}.{param}"


class WeightSpill:
    """Receives the weights of off-device layers during loading and writes them to a store."""

    def __init__(self, path: Path, layers: list[int], fingerprint: str, dtype: torch.dtype, layout: str = ""):
        """``layout``: how quantized projections are held ("" for dense), recorded in the store: a
        store written in another layout (an older int8 one, say) is rewritten, not read."""
        self.path, self.layers, self.fingerprint, self.dtype = Path(path), sorted(layers), fingerprint, dtype
        self.layout = layout
        self.reusable = self._matches_existing()
        self._writer: StoreWriter | None = None
        self.written: set[int] = set()

    def _matches_existing(self) -> bool:
        """Whether the store at ``path`` holds these weights intact: header and every extent verified.
        A corrupt one is deleted here (before its replacement is written, which may need the space)."""
        if not self.path.is_file():
            return False
        try:
            meta, _ = read_header(self.path)
            if not (meta.get("fingerprint") == self.fingerprint and meta.get("dtype") == str(self.dtype)
                    and meta.get("layout", "") == self.layout and set(self.layers) <= set(meta.get("layers", []))):
                return False  # another model's or placement's store: overwritten by the new one
            with StoreReader(self.path, device="cpu", io_backend="posix") as reader:
                reader.verify()  # one read of the store, once per load: a bad extent is caught here, not mid-generation
        except CorruptStoreError as e:
            print(f"offload: weight store {self.path} failed verification ({e.reason or e}); rebuilding it "
                  "from the model", file=sys.stderr)
            self.path.unlink(missing_ok=True)
            return False
        return True

    def begin(self) -> None:
        if not self.reusable:
            self._writer = StoreWriter(self.path, metadata={"fingerprint": self.fingerprint, "dtype": str(self.dtype),
                                                            "layout": self.layout, "layers": self.layers}).__enter__()

    def put_layer(self, layer: int, module: torch.nn.Module) -> None:
        """All of ``layer``'s tensors are assembled in ``module`` (host memory): write them out."""
        if self._writer is not None:
            for name, p in module.named_parameters():
                self._writer.add(layer_tensor_name(layer, name), p.detach())
        self.written.add(layer)

    def finish(self, ok: bool = True) -> None:
        if self._writer is not None:
            if ok and self.written != set(self.layers):
                missing = sorted(set(self.layers) - self.written)
                self._writer.__exit__(OffloadError, None, None)
                raise OffloadError(f"layers {missing} never completed while loading: the checkpoint is incomplete")
            self._writer.__exit__(None if ok else OffloadError, None, None)
            self._writer = None


class LayerStreamer:
    """Double-buffered streaming of the layers in ``layers`` (each: load, compute, release)."""

    def __init__(self, make_layer, layers: list[int], store: StoreReader | None, device: torch.device,
                 host_layers: dict[int, torch.nn.Module] | None = None, slots: int = 2):
        if not layers:
            raise OffloadError("LayerStreamer needs at least one streamed layer")
        self.layers = sorted(layers)
        self.position = {layer: j for j, layer in enumerate(self.layers)}
        self.store, self.device = store, torch.device(device)
        self.host_layers = host_layers or {}  # layer -> module in (pinned) host memory
        self.slots = [make_layer() for _ in range(min(slots, len(self.layers)))]  # the double buffers
        self._names = [name for name, _ in self.slots[0].named_parameters()]
        self._span = self._store_span()
        # CPU: each buffer layer's tensors are views of one page-aligned block laid out as a layer is
        # in the store, so a disk layer lands in one O_DIRECT read, no bounce copy
        self._blocks: list[torch.Tensor | None] = [None] * len(self.slots)
        if self.device.type == "cpu":
            for j, slot in enumerate(self.slots):
                if self._span is not None:
                    self._blocks[j] = aligned_empty((self._span[0],), torch.uint8)  # [span bytes]
                    views = self._views(self._blocks[j], slot)
                    for name, p in slot.named_parameters():
                        p.data = views[name]
                else:
                    for p in slot.parameters():
                        p.data = aligned_empty(tuple(p.shape), p.dtype)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-prefetch")
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        # GPU: pinned host staging per slot for POSIX disk reads (allocated at its first use: kvikio
        # reads need none); events of the compute stream's last use of each buffer (recorded at
        # release) and of each staging buffer's last copy to the device.
        self._staging: list[tuple[torch.Tensor, dict[str, torch.Tensor]] | None] = [None] * len(self.slots)
        self._freed: list = [None] * len(self.slots)
        self._staged: list = [None] * len(self.slots)
        self._pending: dict[int, Future] = {}  # slot -> load in flight
        self._holds: dict[int, int] = {}  # slot -> layer loaded (or loading)
        self.loads = 0
        self.passes = 0  # forward passes that streamed the layers (decode steps + prefill chunks)
        for j in range(len(self.slots)):
            self._start(self.layers[j], j)
        self._next = len(self.slots) % len(self.layers)  # the next layer to prefetch, cyclically

    def _store_span(self) -> tuple[int, dict[str, int]] | None:
        """(bytes, parameter -> offset) of the layout every disk layer has in the store when each
        layer's tensors lie back to back there, the same way: a layer then loads in one read."""
        if self.store is None:
            return None
        layouts = set()
        for layer in self.layers:
            if layer in self.host_layers:
                continue
            span = self.store.span_of([layer_tensor_name(layer, n) for n in self._names])
            if span is None:
                return None
            _, length, at = span
            layouts.add((length, tuple(sorted((n, at[layer_tensor_name(layer, n)]) for n in self._names))))
        if len(layouts) != 1:
            return None
        length, at = layouts.pop()
        return length, dict(at)

    def _views(self, block: torch.Tensor, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s parameters as views of ``block`` (uint8) at their offsets in the store layout."""
        at = self._span[1]
        return {name: block[at[name]:at[name] + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
                for name, p in module.named_parameters()}

    def _pinned_views(self, module: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One pinned host block shaped like ``module``'s parameters, each at a page-aligned offset
        (so that O_DIRECT reads land in it without a bounce copy; as the store lays a layer out when
        it can, for one read per layer): (block, name -> view)."""
        if self._span is not None:
            block = torch.empty(self._span[0], dtype=torch.uint8, pin_memory=True)  # [span] (cudaHostAlloc)
            return block, self._views(block, module)
        params = list(module.named_parameters())
        offsets, total = [], 0
        for _, p in params:
            offsets.append(total)
            total = align_up(total + p.numel() * p.element_size(), ALIGN)
        block = torch.empty(total, dtype=torch.uint8, pin_memory=True)  # [bytes] page-aligned (cudaHostAlloc)
        return block, {name: block[at:at + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
                       for (name, p), at in zip(params, offsets)}

    @property
    def slot_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for s in self.slots for p in s.parameters())

    @property
    def staging_bytes(self) -> int:
        """Pinned host memory the disk layers pass through on their way to a GPU, as reserved."""
        return sum(pinned_nbytes(block.numel()) for block, _ in filter(None, self._staging))

    def _read_layer(self, layer: int, block: torch.Tensor | None, views: dict[str, torch.Tensor]) -> None:
        """``layer``'s tensors from the store: in one read into ``block`` when the layout allows it."""
        names = [layer_tensor_name(layer, n) for n in self._names]
        if block is not None and self._span is not None:
            self.store.read_span(names, out=block)
            return
        for name, store_name in zip(self._names, names):
            self.store.read(store_name, out=views[name])

    @property
    def bytes_read(self) -> int:
        return self.store.bytes_read if self.store is not None else 0

    def _start(self, layer: int, slot: int) -> None:
        self._holds[slot] = layer
        self._pending[slot] = self._pool.submit(self._load, layer, slot)

    def _load(self, layer: int, slot: int):
        """Fill buffer ``slot`` with ``layer``'s weights (on the reader thread); on a GPU, return
        the event of the side stream that marks them in place."""
        params = dict(self.slots[slot].named_parameters())
        if not self._cuda:  # CPU: verified direct reads into the buffer (released: compute is done)
            self._read_layer(layer, self._blocks[slot], {name: p.data for name, p in params.items()})
            self.loads += 1
            return None
        with torch.cuda.stream(self._stream):
            if layer in self.host_layers:  # host tier: copy from pinned memory
                src = dict(self.host_layers[layer].named_parameters())
                self._after_release(slot)
                for name in self._names:
                    params[name].data.copy_(src[name].data, non_blocking=True)
            elif self.store.backend == "kvikio":  # cuFile writes device memory outside stream order
                if self._freed[slot] is not None:
                    self._freed[slot].synchronize()  # so the buffer must be free now (waits on this thread only)
                for name in self._names:
                    self.store.read(layer_tensor_name(layer, name), out=params[name].data)
            else:  # disk -> pinned staging (verified) -> device
                if self._staging[slot] is None:
                    self._staging[slot] = self._pinned_views(self.slots[slot])
                block, staging = self._staging[slot]
                if self._staged[slot] is not None:
                    self._staged[slot].synchronize()  # the staging's previous copy to the device is done
                self._read_layer(layer, block, staging)
                self._after_release(slot)
                for name in self._names:
                    params[name].data.copy_(staging[name], non_blocking=True)
                self._staged[slot] = torch.cuda.Event(blocking=True)  # waited on by this thread: sleep, not spin
                self._staged[slot].record(self._stream)
            loaded = torch.cuda.Event()
            loaded.record(self._stream)
        self.loads += 1
        return loaded

    def _after_release(self, slot: int) -> None:
        """Order the side stream's writes into buffer ``slot`` after the compute that last read it."""
        if self._freed[slot] is not None:
            self._stream.wait_event(self._freed[slot])

    def _mark_free(self, slot: int) -> None:
        if self._cuda:  # kernels reading the buffer are queued, not done: the next load waits for this event
            self._freed[slot] = torch.cuda.Event(blocking=True)
            self._freed[slot].record(torch.cuda.current_stream(self.device))

    def acquire(self, layer: int) -> torch.nn.Module:
        """Wait until ``layer``'s weights are in its buffer; return the buffer layer to compute with."""
        if layer == self.layers[0]:
            self.passes += 1
        slot = next((j for j, held in self._holds.items() if held == layer), None)
        if slot is None:  # out of the usual order (a pass stopped early): restart the pipeline from it
            for j in range(len(self.slots)):
                self._pending[j].result()
                self._mark_free(j)
            at = self.position[layer]
            for j in range(len(self.slots)):  # every buffer again holds a distinct upcoming layer
                self._start(self.layers[(at + j) % len(self.layers)], j)
            self._next = (at + len(self.slots)) % len(self.layers)
            slot = 0
        loaded = self._pending[slot].result()
        if loaded is not None:
            torch.cuda.current_stream(self.device).wait_event(loaded)  # a GPU-side wait: the host goes on
        return self.slots[slot]

    def release(self, layer: int) -> None:
        """Compute on ``layer`` is queued: its buffer starts loading the next streamed layer (on a GPU,
        the load's writes wait for that compute on the GPU; the host does not stall here)."""
        if len(self.slots) == len(self.layers):
            return  # every streamed layer has its own buffer: nothing to reload
        slot = next(j for j, held in self._holds.items() if held == layer)
        self._mark_free(slot)
        self._start(self.layers[self._next], slot)
        self._next = (self._next + 1) % len(self.layers)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.store is not None:
            self.store.close()
