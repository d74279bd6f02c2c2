"""Loading a model under budgets: plan, spill off-device layers to their tier, wire the streamer."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from offload.errors import OffloadError

from .budget import free_device_memory, free_host_memory, release_freed_memory, resolve_budget
from .io import StoreReader
from .planner import BandwidthProfile, Placement, Tuning, plan
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


def load_offloaded(model: str | Path | None, device: torch.device, dtype: torch.dtype, *, context: int | None,
                   kv_policy: str, kv_budget: float, sink: int, window: int, gpu_memory, cpu_memory,
                   disk_dir, profile: str | Path | None, io_backend: str = "auto", progress: bool = False,
                   verbose: bool = False, load_format: str = "auto", seed: int = 0,
                   dense_layers: int = 2) -> OffloadedModel:
    from offload.loaders import load_model, read_model_args
    from offload.model import DecoderLayer
    from offload.prompt_cache import model_fingerprint

    args, path = read_model_args(model, load_format)
    on_gpu = device.type == "cuda"
    gpu = resolve_budget(gpu_memory, "gpu_memory", lambda: free_device_memory(device)) if on_gpu else None
    cpu = resolve_budget(cpu_memory, "cpu_memory", free_host_memory)
    if gpu_memory is not None and not on_gpu:
        print("offload: gpu_memory is ignored: no GPU is in use (device cpu)", file=sys.stderr)
    dtype_name = str(dtype).removeprefix("torch.")
    tuning = Tuning.load(profile)
    placement = plan(args, model=path.name, context=context or args.max_position_embeddings, device=device.type,
                     dtype=dtype_name, kv_policy=kv_policy, kv_budget=kv_budget, sink=sink, window=window,
                     gpu_memory=gpu, cpu_memory=cpu, disk_dir=None if disk_dir is None else str(disk_dir),
                     profile=BandwidthProfile.load(profile), prefetch_slots=tuning.prefetch_slots,
                     dense_layers=dense_layers)
    if verbose:
        print(placement.table(), file=sys.stderr)
    streamed = placement.streamed_layers
    disk_layers = [i for i in streamed if placement.layer_tiers[i] == "disk"]
    fingerprint = model_fingerprint(args, path, seed if load_format == "dummy" else None)
    store_path = None
    disk_spill = None
    if disk_layers:
        store_path = Path(disk_dir) / f"{path.stem}-{fingerprint[:12]}-{dtype_name}.weights"
        disk_spill = WeightSpill(store_path, disk_layers, fingerprint, dtype)
        disk_spill.begin()
        if verbose:
            print(f"offload: {'reusing' if disk_spill.reusable else 'writing'} weight store {store_path}",
                  file=sys.stderr)
    host_spill = HostSpill(pin=on_gpu)
    release_freed_memory()
    ok = False
    try:
        model_obj, tokenizer, path = load_model(model, device, dtype, progress=progress, load_format=load_format,
                                                seed=seed,
                                                offloaded=frozenset(streamed),
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
        streamer = LayerStreamer(lambda: DecoderLayer(args, device, dtype), streamed, reader, device,
                                 host_layers=host_spill.modules, slots=tuning.prefetch_slots)
        model_obj.streamer = streamer
    if len(model_obj.offloaded) != len(streamed):
        raise OffloadError("internal: the model's offloaded layers differ from the placement")
    return OffloadedModel(model_obj, tokenizer, path, placement, streamer, store_path)
