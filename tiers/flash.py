"""FFN weights on flash, "LLM in a flash" style (Alizadeh et al., 2024): row-column bundles, sparsity
from calibrated gate thresholds, and a sliding window of resident neurons.

Bundling: neuron j of a layer's FFN is the j-th row of the up projection and the j-th column of the
down projection; both are needed exactly when the neuron is active, so they are stored together as
one extent padded to whole 512-byte sectors (one read, one checksum). The gate projection stays resident: the active
neurons of each token come from the exact gate activations.

Sparsity (training-free, in the spirit of CATS/TEAL): a neuron is active for a token when
|silu(gate)| exceeds its layer's threshold; thresholds are calibrated offline on real text as the
``sparsity`` quantile of |silu(gate)| and saved with the bundles. Inactive neurons contribute 0.
Bundles are stored most-often-active first (counted on the same text), and the cache starts with
them: the neurons a step misses are then mostly the rarer ones, gathered in the back of the layer
where few requests cover them.

The resident cache of bundles is as large as the memory budget allows. By default it holds the
most often active bundles for good (a hot set, as PowerInfer splits hot and cold neurons); with
``window=W`` it is the "LLM in a flash" sliding window: bundles read join it, the least recently
used make room, and those unused for W tokens are forgotten. Each decode step uses the cached
active bundles in place and reads only the others (runs coalesced, small gaps read through, many
requests in flight). The cache changes what is read, never what is computed. Without ``flash``
the model is untouched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from offload.errors import OffloadError

from .io import StoreReader, aligned_empty
from .store import SECTOR, StoreWriter, align_up, read_header


@dataclass(frozen=True)
class FlashConfig:
    sparsity: float = 0.25  # fraction of neurons below the threshold on calibration text
    # None: the cache holds the bundles most often active on the calibration text and keeps them
    # (a fixed hot set, as PowerInfer does); the others are read when active. W: a sliding window
    # ("LLM in a flash"): bundles read are cached too, those unused for W tokens are forgotten,
    # the least recently used make room.
    window: int | None = None
    # Resident bundle cache as a fraction of each layer's neurons. None: what ``cpu_memory`` leaves
    # after everything else resident (half the layer when no budget is given); 0: no cache, every
    # active bundle is read at every step.
    cache_fraction: float | None = None
    calibration_tokens: int = 512
    # Scattered reads are latency bound: on the project's virtio disk (BENCHMARKS.md) one O_DIRECT
    # request costs ~60 us, as much as reading ~45 KB more in sequence. Hence: read through gaps
    # of up to ``read_gap`` bundles (one request instead of two), and past ``full_read_runs``
    # requests per layer read the whole layer in one (~9 ms for 7 MB at 0.8 GB/s, ~150 requests).
    read_gap: int = 8
    full_read_runs: int = 128
    reader_threads: int = 4  # requests in flight: 4 was the best measured for 4-8 KiB reads

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise OffloadError(f"flash sparsity must be in [0, 1), got {self.sparsity}")
        if self.window is not None and self.window < 0:
            raise OffloadError(f"flash window must be >= 0 tokens (or None), got {self.window}")
        if self.cache_fraction is not None and not 0 <= self.cache_fraction <= 1:
            raise OffloadError(f"flash cache_fraction must be in [0, 1] (or None), got {self.cache_fraction}")
        if self.read_gap < 0 or self.full_read_runs < 1 or self.reader_threads < 1:
            raise OffloadError("flash read_gap must be >= 0, full_read_runs and reader_threads >= 1")


def _computing_layers(model) -> list[nn.Module]:
    """Every decoder layer module that runs: the resident layers and the streamer's buffers."""
    layers = [layer for i, layer in enumerate(model.layers) if i not in model.offloaded]
    return layers + (list(model.streamer.slots) if model.streamer is not None else [])


@torch.inference_mode()
def calibrate(model, token_ids: list[int], sparsity: float, backend) -> tuple[list[float], list[list[int]]]:
    """Per layer: the ``sparsity`` quantile of |silu(gate)| over the calibration tokens (the
    threshold), and the neurons ordered by how often they exceed it, most often first (the order
    bundles are stored in, so that the often-active ones sit together at the front). Works on a
    model whose layers stream from disk: hooks sit on the streamer's buffers too."""
    from offload.attention import ForwardBatch

    found: dict[int, tuple[float, list[int]]] = {}
    current = {}  # the layer index the decoder layer running now was called with
    hooks = []
    for layer in _computing_layers(model):
        hooks.append(layer.register_forward_pre_hook(lambda m, args: current.update(layer=args[1])))

        def hook(module, args):
            gate = F.linear(args[0], module.w_gate_up[:module.intermediate])  # [B, T, I]
            a = F.silu(gate.float()).abs().reshape(-1, module.intermediate)  # [T, I]
            threshold = float(a.flatten().kthvalue(max(1, int(sparsity * a.numel()))).values) if sparsity > 0 else 0.0
            counts = (a > threshold).sum(0)  # [I] tokens each neuron was active for
            found[current["layer"]] = (threshold, torch.sort(counts, descending=True, stable=True).indices.tolist())
        hooks.append(layer.mlp.register_forward_pre_hook(hook))
    try:
        backend.allocate(1, len(token_ids))
        batch = ForwardBatch.prefill(0, 0, len(token_ids), model.device, token_ids)
        model(torch.tensor([token_ids], device=model.device), batch, backend)
    finally:
        for h in hooks:
            h.remove()
    return [found[i][0] for i in range(len(model.layers))], [found[i][1] for i in range(len(model.layers))]


def _ffn_weights(model, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's w_gate_up [2I, H] and w_down [H, I]: resident, or read from the layer store."""
    if i not in model.offloaded:
        return model.layers[i].mlp.w_gate_up, model.layers[i].mlp.w_down
    from .streaming import layer_tensor_name

    store = model.streamer.store
    return store.read(layer_tensor_name(i, "mlp.w_gate_up")), store.read(layer_tensor_name(i, "mlp.w_down"))


def _gate_weight(model, i: int) -> torch.Tensor:
    """Layer i's gate projection [I, H]: a view of the resident weights, or only its bytes (the
    first I rows of w_gate_up) read from the layer store."""
    inter, hidden = model.args.intermediate_size, model.args.hidden_size
    if i not in model.offloaded:
        return model.layers[i].mlp.w_gate_up[:inter]
    from .streaming import layer_tensor_name

    nbytes = inter * hidden * model.dtype.itemsize
    raw = model.streamer.store.read_bytes(layer_tensor_name(i, "mlp.w_gate_up"), 0, nbytes)  # [nbytes] uint8
    return raw.view(model.dtype).view(inter, hidden)


def bundle_store_path(disk_dir: Path, stem: str, fingerprint: str, dtype: torch.dtype, sparsity: float) -> Path:
    return Path(disk_dir) / f"{stem}-{fingerprint[:12]}-{str(dtype).removeprefix('torch.')}-s{sparsity:g}.ffn"


def write_bundles(path: Path, model, thresholds: list[float], orders: list[list[int]], fingerprint: str,
                  calibration: str) -> None:
    """One tensor per layer: [I, P] row r = up row j ++ down column j of neuron j = order[r], zero
    padded to whole sectors."""
    a = model.args
    H, inter = a.hidden_size, a.intermediate_size
    elem = torch.finfo(model.dtype).bits // 8
    padded = bundle_elems_for(H, model.dtype)
    meta = {"fingerprint": fingerprint, "calibration": calibration, "dtype": str(model.dtype),
            "thresholds": thresholds, "orders": orders,
            "bundle_elems": padded, "layers": len(model.layers)}
    with StoreWriter(path, metadata=meta) as w:
        for i in range(len(model.layers)):
            w_gate_up, w_down = _ffn_weights(model, i)
            order = torch.tensor(orders[i])  # [I] stored row -> neuron
            up = w_gate_up[inter:][order]  # [I, H]
            down = w_down[:, order]  # [H, I]
            bundles = torch.zeros(inter, padded, dtype=model.dtype)  # [I, P]
            bundles[:, :H] = up
            bundles[:, H:2 * H] = down.t()
            w.add(f"ffn.{i}", bundles, extent=padded * elem)


class FlashMLP(nn.Module):
    """A layer's FFN with the gate resident and up/down bundles read from flash on demand.

    Decode step: the exact gate activations pick the active neurons; those in the resident cache
    are computed from it in place (one matrix product over the cache, inactive slots weighted 0),
    the others are read into the shared staging buffer and computed from there; with a window they
    then take the cache slots of the least recently used bundles (never one the step used)."""

    def __init__(self, gate: torch.Tensor, reader: StoreReader, layer: int, threshold: float, hidden: int,
                 config: FlashConfig, bundle_elems: int, cache_bundles: int, staging: torch.Tensor):
        super().__init__()
        self.gate = gate  # [I, H] resident
        self.reader, self.name, self.threshold, self.hidden = reader, f"ffn.{layer}", threshold, hidden
        self.config, self.bundle_elems = config, bundle_elems
        self.intermediate = gate.shape[0]
        self.staging = staging  # [I, P], shared by all layers (they run one at a time)
        self.cache = aligned_empty((cache_bundles, bundle_elems), gate.dtype)  # [C, P] resident bundles (zeroed)
        self.slot_of = np.full(self.intermediate, -1, np.int64)  # neuron -> cache slot
        self.neuron_in = np.full(cache_bundles, -1, np.int64)  # slot -> neuron
        self.last_used = np.full(cache_bundles, -(1 << 60), np.int64)  # slot -> step it was last active
        self.step = 0
        self.bytes_read = 0  # all reads, prefill included
        self.decode_steps = self.decode_bytes = self.active_total = self.reads_total = self.requests_total = 0
        self.elem = gate.element_size()

    @property
    def row_bytes(self) -> int:
        return self.bundle_elems * self.elem

    def _plan_reads(self, ids: np.ndarray) -> list[tuple[int, int]] | None:
        """Neuron runs [first, end) covering the sorted ``ids``, reading through gaps of at most
        ``read_gap`` bundles; None when that is more requests than a sequential read of the layer costs."""
        gap = np.diff(ids) - 1  # bundles skipped between consecutive ids
        breaks = np.flatnonzero(gap > self.config.read_gap)
        firsts = np.concatenate([[0], breaks + 1])  # positions in ids where runs start
        lasts = np.concatenate([breaks, [len(ids) - 1]])
        if len(firsts) > self.config.full_read_runs:
            return None
        return list(zip(ids[firsts].tolist(), (ids[lasts] + 1).tolist()))

    def _read(self, ids: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Read the bundles of the sorted neuron ids (verified) into the staging buffer: the rows
        read [n, P], gaps read through included, and the neuron of each row [n]. Rows are used
        where they land (no gather): a row whose neuron was not asked for gets weight 0."""
        runs = self._plan_reads(ids)
        if runs is None:  # scattered over the whole layer: one sequential read
            self.reader.read(self.name, out=self.staging)
            self.bytes_read += self.staging.numel() * self.elem
            self.requests_total += 1
            return self.staging, np.arange(self.intermediate)
        neurons = np.concatenate([np.arange(first, end) for first, end in runs])  # [n] row -> neuron
        rows = self.staging[:len(neurons)]  # [n, P]
        self.reader.read_ranges(self.name, [(first * self.row_bytes, end * self.row_bytes) for first, end in runs],
                                out=rows.view(-1).view(torch.uint8))
        self.bytes_read += len(neurons) * self.row_bytes
        self.requests_total += len(runs)
        return rows, neurons

    def _admit(self, ids: np.ndarray, rows: torch.Tensor) -> None:
        """Cache the bundles just read, in the slots idle longest (those outside the window first);
        slots the current step used keep their bundles, so fewer may be admitted than were read."""
        if not len(self.cache):
            return
        order = np.argsort(self.last_used, kind="stable")
        free = order[self.last_used[order] < self.step][:len(ids)]  # [n] slots to reuse
        if not len(free):
            return
        take = ids[:len(free)]
        old = self.neuron_in[free]
        self.slot_of[old[old >= 0]] = -1
        self.cache[torch.from_numpy(free)] = rows[:len(free)]
        self.slot_of[take] = free
        self.neuron_in[free] = take
        self.last_used[free] = self.step

    def preload(self) -> None:
        """Fill the cache with the bundles most often active on the calibration text (stored first):
        the first decode steps then read only what the calibration did not predict."""
        n = len(self.cache)
        if n:
            self.reader.read_ranges(self.name, [(0, n * self.row_bytes)], out=self.cache.view(-1).view(torch.uint8))
            self.bytes_read += n * self.row_bytes
            self.slot_of[:n] = np.arange(n)
            self.neuron_in[:] = np.arange(n)
            self.last_used[:] = 0

    def _expire(self) -> None:
        """Forget bundles no token of the last ``window`` steps used (the sliding window)."""
        if self.config.window is None:
            return
        expired = np.flatnonzero((self.neuron_in >= 0) & (self.last_used < self.step - self.config.window))
        self.slot_of[self.neuron_in[expired]] = -1
        self.neuron_in[expired] = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H = self.hidden
        act = F.silu(F.linear(x, self.gate))  # [B, T, I]
        coef = act * (act.abs() > self.threshold)  # [B, T, I] inactive neurons contribute 0
        self.step += 1
        if x.shape[1] > 1:  # prefill: every neuron is active for some token; read the whole layer once
            self.reader.read(self.name, out=self.staging)
            self.bytes_read += self.staging.numel() * self.elem
            up, down = self.staging[:, :H], self.staging[:, H:2 * H]  # [I, H] each
            return torch.matmul(coef * F.linear(x, up), down)  # [B, T, H]
        ids = np.flatnonzero((coef != 0).any(dim=(0, 1)).numpy())  # [k] active for some row
        self.active_total += len(ids)
        self.decode_steps += 1
        self._expire()
        slots = self.slot_of[ids]
        hit = slots >= 0
        self.last_used[slots[hit]] = self.step
        out = torch.zeros_like(x)  # [B, 1, H]
        if hit.any():  # every cache slot at once; slots not active now weigh 0
            valid = torch.from_numpy(self.neuron_in >= 0)  # [C]
            slot_coef = coef[..., torch.from_numpy(self.neuron_in).clamp(min=0)] * valid  # [B, 1, C]
            out += torch.matmul(slot_coef * F.linear(x, self.cache[:, :H]), self.cache[:, H:2 * H])
        missing = ids[~hit]
        if len(missing):
            before = self.bytes_read
            rows, neurons = self._read(missing)  # [n, P], [n]
            self.decode_bytes += self.bytes_read - before
            self.reads_total += len(missing)
            wanted = np.zeros(self.intermediate, bool)
            wanted[missing] = True
            asked = wanted[neurons]  # [n] rows of missing neurons (the others: read-through gaps)
            row_coef = coef[..., torch.from_numpy(neurons)] * torch.from_numpy(asked)  # [B, 1, n]
            out += torch.matmul(row_coef * F.linear(x, rows[:, :H]), rows[:, H:2 * H])  # [B, 1, H]
            if self.config.window is not None:  # sliding window: what was read joins the cache
                self._admit(missing, rows[torch.from_numpy(np.flatnonzero(asked))])
        return out

    def nbytes(self) -> int:
        return (self.gate.numel() + self.cache.numel()) * self.elem


def bundle_elems_for(hidden: int, dtype: torch.dtype) -> int:
    """Elements of one bundle (up row ++ down column), padded to whole 512-byte sectors (the
    O_DIRECT unit of most devices; on a 4 KiB-only device a read covers the pages around it)."""
    elem = torch.finfo(dtype).bits // 8
    return align_up(2 * hidden * elem, SECTOR) // elem


def size_cache(args, dtype: torch.dtype, cpu_budget: int | None, context: int, config: FlashConfig) -> dict:
    """How many bundles per layer the cache holds: ``config.cache_fraction``, or what ``cpu_budget``
    leaves after everything that stays resident (every weight but the up/down projections, the KV
    cache at ``context``, the staging and read buffers of one layer, the runtime's reserve).
    Raises a BudgetError naming the smallest budget that works when nothing is left."""
    from .budget import BudgetError, format_size
    from .planner import RUNTIME_RESERVE

    elem = torch.finfo(dtype).bits // 8
    I, L = args.intermediate_size, args.num_layers
    bundle = bundle_elems_for(args.hidden_size, dtype) * elem
    on_flash = L * 2 * I * args.hidden_size * elem  # up + down, all layers
    resident = (args.param_count() * elem - on_flash + args.kv_bytes_per_token(elem) * context
                + 2 * I * bundle + RUNTIME_RESERVE)  # + staging and aligned read buffer
    fraction = config.cache_fraction
    if cpu_budget is not None:
        room = max(0, cpu_budget - resident) / (L * I * bundle)
        if fraction is None:
            fraction = min(1.0, room)
        if fraction > room or cpu_budget < resident:
            need = resident + int(fraction * I) * L * bundle
            raise BudgetError(
                f"cpu_memory {format_size(cpu_budget)} is too small for flash FFN: the embeddings, attention and "
                f"gate weights, the KV at context {context:,} and one layer's read buffers stay resident "
                f"({format_size(resident)}), plus a bundle cache of {fraction:.0%} of the neurons: the smallest "
                f"budget that works is {format_size(need)}; below it, drop flash= and stream whole layers "
                f"(cpu_memory + disk_dir)")
    if fraction is None:
        fraction = 0.5
    bundles = int(fraction * I)
    return {"cache_bundles": bundles, "cache_fraction": bundles / I, "bundle_bytes": bundle,
            "resident_bytes": resident + L * bundles * bundle, "flash_bytes": L * I * bundle}


def _resident_without_ffn(model, i: int) -> nn.Module:
    """Streamed layer i made resident from the layer store: attention and norms read in, the
    FFN left out (its up/down go to flash bundles, its gate comes with them)."""
    from offload.model import DecoderLayer

    from .streaming import layer_tensor_name

    layer = DecoderLayer(model.args, "meta", model.dtype)
    layer.mlp = nn.Module()  # replaced by a FlashMLP right after; no FFN storage here
    layer.to_empty(device="cpu")
    for name, p in layer.named_parameters():
        model.streamer.store.read(layer_tensor_name(i, name), out=p.data)
    return layer


def enable_flash(model, backend, *, source_stem: str, fingerprint: str, disk_dir: str | Path,
                 config: FlashConfig, calibration_ids: list[int], sizing: dict) -> dict:
    """Move every layer's up/down projections to flash bundles; keep gates resident; the bundle
    cache holds ``sizing["cache_bundles"]`` per layer (:func:`size_cache`). A model loaded with
    layers streamed from disk (a budget below the weights) is calibrated as it streams and comes
    out resident but for the bundles, so loading never holds the whole model; its streamer is
    closed. ``fingerprint`` identifies the weights by content (seed included for dummy weights).
    Returns what the bundles hold and how they are read (the runtime's flash info)."""
    if model.device.type != "cpu":
        raise OffloadError("flash FFN windowing is the CPU-only (edge) mode; on a GPU, stream whole layers "
                           "(gpu_memory=..., cpu_memory=..., disk_dir=...) instead")
    calibration = hashlib.sha256(np.asarray(calibration_ids, np.int64).tobytes()).hexdigest()[:16]
    path = bundle_store_path(Path(disk_dir), source_stem, fingerprint, model.dtype, config.sparsity)
    meta = None
    if path.is_file():
        try:
            meta, _ = read_header(path)
        except OffloadError:
            meta = None
        # Reused only for the same weights calibrated on the same text, in this version's layout.
        if meta is not None and (meta.get("fingerprint"), meta.get("calibration"), "orders" in meta) != (
                fingerprint, calibration, True):
            meta = None
    if meta is None:
        thresholds, orders = calibrate(model, calibration_ids, config.sparsity, backend)
        write_bundles(path, model, thresholds, orders, fingerprint, calibration)
        meta, _ = read_header(path)
    reader = StoreReader(path, device="cpu", reader_threads=config.reader_threads)
    inter, H = model.args.intermediate_size, model.args.hidden_size
    staging = aligned_empty((inter, meta["bundle_elems"]), model.dtype)  # [I, P] one layer's bundles
    from .budget import release_freed_memory

    # Resident layers first (dropping their up/down frees memory), then the streamed ones, which
    # come back resident without their up/down: the budget holds throughout.
    streamed = len(model.offloaded)
    for i in sorted(range(len(model.layers)), key=lambda i: i in model.offloaded):
        layer = model.layers[i] if i not in model.offloaded else _resident_without_ffn(model, i)
        # Neurons are numbered in stored order (most often active first); the FFN's output is a sum
        # over neurons, so renumbering them changes nothing.
        gate = _gate_weight(model, i)[torch.tensor(meta["orders"][i])]  # [I, H], a copy
        layer.mlp = FlashMLP(gate, reader, i, meta["thresholds"][i], H, config, meta["bundle_elems"],
                             sizing["cache_bundles"], staging)
        layer.mlp.preload()
        model.layers[i] = layer
        release_freed_memory()  # the up/down projections just dropped
    if model.streamer is not None:  # every layer is resident now (its FFN on flash): no more streaming
        model.streamer.close()
        model.streamer, model.offloaded = None, frozenset()
    return {"store": str(path), "thresholds": meta["thresholds"], "reader_mode": reader.mode, "sparsity": config.sparsity,
            "bundle_bytes": meta["bundle_elems"] * model.layers[0].mlp.elem, "loaded_streaming": streamed, **sizing}


def flash_stats(model) -> dict:
    """Per decode step, summed over layers: active neurons, bundles and bytes read from flash, read
    requests; resident bytes (gates and caches)."""
    layers = [m for m in (layer.mlp for layer in model.layers) if isinstance(m, FlashMLP)]
    steps = max(1, layers[0].decode_steps) if layers else 1
    return {"decode_steps": steps, "decode_bytes_per_step": sum(m.decode_bytes for m in layers) / steps,
            "active_neurons_per_step": sum(m.active_total for m in layers) / steps,
            "read_neurons_per_step": sum(m.reads_total for m in layers) / steps,
            "requests_per_step": sum(m.requests_total for m in layers) / steps,
            "neurons": sum(m.intermediate for m in layers),
            "resident_bytes": sum(m.nbytes() for m in layers)}
