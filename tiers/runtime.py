"""Loading a model under budgets: plan, spill off-device layers to their tier, wire the streamer."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from offload.errors import OffloadError
from offload.quant import INT4_CPU_LAYOUT, int4_layout, stored_format

from .budget import release_freed_memory
from .io import StoreReader
from .planner import Placement, Tuning
from .streaming import LayerStreamer, WeightSpill


@dataclass
class OffloadedModel:
    model: object  # offload.model.Transformer
    tokenizer: object
    path: Path
    placement: Placement
    streamer: LayerStreamer | None
    store_path: Path | None


class HostSpill:
    """Keeps host-tier layers in (pinned) host memory for the streamer to copy from."""

    def __init__(self, pin: bool):
        self.pin, self.modules = pin, {}

    def put_layer(self, layer: int, module: torch.nn.Module) -> None:
        if self.pin:
            for p in module.parameters():
                p.data = p.data.pin_memory()
        self.modules[layer] = module


class _SpillRouter:
    """One spill per tier, chosen by the placement."""

    def __init__(self, tiers: tuple[str, ...], disk: WeightSpill | None, host: HostSpill):
        self.tiers, self.disk, self.host = tiers, disk, host

    def put_layer(self, layer: int, module: torch.nn.Module) -> None:
        (self.disk if self.tiers[layer] == "disk" else self.host).put_layer(layer, module)


def load_offloaded(model: str | Path | None, placement: Placement, *, device: torch.device, dtype: torch.dtype,
                   fingerprint: str, disk_dir: Path | None, tuning: Tuning, io_backend: str = "auto",
                   progress: bool = False, verbose: bool = False, load_format: str = "auto",
                   seed: int = 0, quantize: str | None = None) -> OffloadedModel:
    """Load ``model`` as ``placement`` says: device layers resident, host layers in (pinned) host
    memory, disk layers spilled to a weight store in ``disk_dir`` (reused when it holds these
    weights: ``fingerprint`` identifies them by content), and a streamer for the off-device ones.
    ``quantize``: layers are quantized as they load, so the store and the buffers hold its codes."""
    from offload.loaders import load_model
    from offload.model import DecoderLayer

    streamed = placement.streamed_layers
    disk_layers = [i for i in streamed if placement.layer_tiers[i] == "disk"]
    store_path = None
    disk_spill = None
    if disk_layers:
        # dense, int4 (per layout) and int8 stores live side by side
        held = placement.dtype + (f"-{quantize}" if quantize else "")
        if quantize == "int4" and int4_layout(device) != INT4_CPU_LAYOUT:
            held += f"-{int4_layout(device)}"
        store_path = Path(disk_dir) / f"{Path(placement.model).stem}-{fingerprint[:12]}-{held}.weights"
        disk_spill = WeightSpill(store_path, disk_layers, fingerprint, dtype,
                                 layout=stored_format(quantize, int4_layout(device)) if quantize else "")
        disk_spill.begin()
        if verbose:
            print(f"offload: {'reusing' if disk_spill.reusable else 'writing'} weight store {store_path}",
                  file=sys.stderr)
    on_gpu = device.type == "cuda"
    host_spill = HostSpill(pin=on_gpu)
    release_freed_memory()
    ok = False
    try:
        model_obj, tokenizer, path = load_model(model, device, dtype, progress=progress, load_format=load_format,
                                                seed=seed, offloaded=frozenset(streamed), quantize=quantize,
                                                spill=_SpillRouter(placement.layer_tiers, disk_spill, host_spill))
        ok = True
    finally:
        if disk_spill is not None:
            disk_spill.finish(ok)
    release_freed_memory()  # the checkpoint reader's and the staging layers' memory
    streamer = None
    if streamed:
        reader = StoreReader(store_path, device=device, io_backend=io_backend, read_block=tuning.read_block,
                             reader_threads=tuning.reader_threads) if disk_layers else None
        if reader is not None and verbose:
            print(f"offload: disk reads via {reader.mode}", file=sys.stderr)
        args = model_obj.args
        streamer = LayerStreamer(lambda: DecoderLayer(args, device, dtype, quantize), streamed, reader, device,
                                 host_layers=host_spill.modules, slots=tuning.prefetch_slots)
        model_obj.streamer = streamer
    if len(model_obj.offloaded) != len(streamed):
        raise OffloadError("internal: the model's offloaded layers differ from the placement")
    return OffloadedModel(model_obj, tokenizer, path, placement, streamer, store_path)
