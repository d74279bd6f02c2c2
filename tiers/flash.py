"""FFN weights on flash, "LLM in a flash" style (Alizadeh et al., 2024): row-column bundles, sparsity
from calibrated gate thresholds, and a sliding window of resident neurons.

Bundling: neuron j of a layer's FFN is the j-th row of the up projection and the j-th column of the
down projection; both are needed exactly when the neuron is active, so they are stored together as
one 4 KiB-aligned extent (one read, one checksum). The gate projection stays resident: the active
neurons of each token come from the exact gate activations.

Sparsity (training-free, in the spirit of CATS/TEAL): a neuron is active for a token when
|silu(gate)| exceeds its layer's threshold; thresholds are calibrated offline on real text as the
``sparsity`` quantile of |silu(gate)| and saved with the bundles. Inactive neurons contribute 0.

Windowing: bundles used by the last ``window`` tokens stay in a resident cache; each decode step
reads only the active neurons not in it (adjacent ids coalesced into one read). With flash
windowing off the model is untouched: output is bit-identical to the all-resident model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from offload.errors import OffloadError

from .io import StoreReader
from .store import ALIGN, StoreWriter, align_up, read_header


@dataclass(frozen=True)
class FlashConfig:
    sparsity: float = 0.5  # fraction of neurons below the threshold on calibration text
    window: int = 4  # tokens whose active neurons stay resident
    cache_fraction: float = 0.6  # resident bundle cache, as a fraction of the layer's neurons
    calibration_tokens: int = 512
    full_read_runs: int = 64  # more scattered runs than this per layer: one sequential read instead

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise OffloadError(f"flash sparsity must be in [0, 1), got {self.sparsity}")
        if self.window < 0 or not 0 < self.cache_fraction <= 1:
            raise OffloadError("flash window must be >= 0 and cache_fraction in (0, 1]")


@torch.inference_mode()
def calibrate_thresholds(model, token_ids: list[int], sparsity: float, backend) -> list[float]:
    """Per layer, the ``sparsity`` quantile of |silu(gate)| over the calibration tokens."""
    from offload.attention import ForwardBatch

    samples: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.layers):
        def hook(module, args, i=i):
            gate = F.linear(args[0], module.w_gate_up[:module.intermediate])  # [B, T, I]
            samples[i] = F.silu(gate.float()).abs().flatten()
        hooks.append(layer.mlp.register_forward_pre_hook(hook))
    try:
        backend.allocate(1, len(token_ids))
        batch = ForwardBatch.prefill(0, 0, len(token_ids), model.device, token_ids)
        model(torch.tensor([token_ids], device=model.device), batch, backend)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i in range(len(model.layers)):
        a = samples[i]
        k = max(1, int(sparsity * a.numel()))
        out.append(float(a.kthvalue(k).values) if sparsity > 0 else 0.0)
    return out


def bundle_store_path(disk_dir: Path, stem: str, fingerprint: str, dtype: torch.dtype, sparsity: float) -> Path:
    return Path(disk_dir) / f"{stem}-{fingerprint[:12]}-{str(dtype).removeprefix('torch.')}-s{sparsity:g}.ffn"


def write_bundles(path: Path, model, thresholds: list[float], fingerprint: str) -> None:
    """One tensor per layer: [I, P] rows = up row j ++ down column j, zero padded to 4 KiB."""
    a = model.args
    H, inter = a.hidden_size, a.intermediate_size
    elem = torch.finfo(model.dtype).bits // 8
    padded = align_up(2 * H * elem) // elem
    meta = {"fingerprint": fingerprint, "dtype": str(model.dtype), "thresholds": thresholds,
            "bundle_elems": padded, "layers": len(model.layers)}
    with StoreWriter(path, metadata=meta) as w:
        for i, layer in enumerate(model.layers):
            up = layer.mlp.w_gate_up[inter:]  # [I, H]
            down = layer.mlp.w_down  # [H, I]
            bundles = torch.zeros(inter, padded, dtype=model.dtype)  # [I, P]
            bundles[:, :H] = up
            bundles[:, H:2 * H] = down.t()
            w.add(f"ffn.{i}", bundles, extent=padded * elem)


class FlashMLP(nn.Module):
    """A layer's FFN with the gate resident and up/down bundles read from flash on demand."""

    def __init__(self, gate: torch.Tensor, reader: StoreReader, layer: int, threshold: float, hidden: int,
                 config: FlashConfig, bundle_elems: int):
        super().__init__()
        self.gate = gate  # [I, H] resident
        self.reader, self.name, self.threshold, self.hidden = reader, f"ffn.{layer}", threshold, hidden
        self.config, self.bundle_elems = config, bundle_elems
        self.intermediate = gate.shape[0]
        cap = max(1, int(config.cache_fraction * self.intermediate))
        self.cache = torch.zeros(cap, bundle_elems, dtype=gate.dtype)  # [C, P] resident bundles
        self.slot_of = np.full(self.intermediate, -1, np.int64)  # neuron -> cache slot
        self.neuron_in = np.full(cap, -1, np.int64)  # slot -> neuron
        self.last_used = np.full(cap, -(1 << 60), np.int64)  # slot -> step it was last active
        self.step = 0
        self.bytes_read = 0  # all reads, prefill included
        self.decode_steps = 0
        self.decode_bytes = 0
        self.active_total = 0
        self.reads_total = 0
        self.elem = gate.element_size()

    def _read_rows(self, ids: np.ndarray) -> torch.Tensor:
        """Bundles of the sorted neuron ids, adjacent runs coalesced into one verified read each.

        Many scattered runs cost more in request overhead than one sequential read of the layer, so
        past ``config.full_read_runs`` runs the whole layer is read and the rows are taken from it."""
        row_bytes = self.bundle_elems * self.elem
        starts = np.flatnonzero(np.diff(ids, prepend=-2) != 1)  # run starts
        if len(starts) > self.config.full_read_runs:
            layer = self.reader.read(self.name)  # [I, P]
            self.bytes_read += layer.numel() * self.elem
            return layer[torch.from_numpy(ids)]
        out = torch.empty(len(ids), self.bundle_elems, dtype=self.gate.dtype)  # [k, P]
        ends = np.append(starts[1:], len(ids))
        for s, e in zip(starts, ends):
            first = int(ids[s])
            self.reader.read_bytes(self.name, first * row_bytes, (first + e - s) * row_bytes,
                                   out=out[s:e].view(-1).view(torch.uint8))  # straight into place
            self.bytes_read += (e - s) * row_bytes
        return out

    def _expire(self) -> None:
        """Drop bundles no token of the last ``window`` steps used (the sliding window)."""
        expired = np.flatnonzero((self.neuron_in >= 0) & (self.last_used < self.step - self.config.window))
        self.slot_of[self.neuron_in[expired]] = -1
        self.neuron_in[expired] = -1

    def _ensure_resident(self, ids: np.ndarray) -> np.ndarray:
        """Cache slots holding neurons ``ids`` (reading the missing ones); returns slots [k]."""
        self._expire()
        missing = ids[self.slot_of[ids] < 0]
        if len(missing):
            # Free slots: never used, else those idle longest (outside the window first).
            order = np.argsort(self.last_used, kind="stable")
            protected = set(self.slot_of[ids][self.slot_of[ids] >= 0].tolist())
            free = [s for s in order[:len(missing) + len(protected)] if s not in protected][:len(missing)]
            if len(free) < len(missing):
                raise OffloadError(f"flash cache of {len(self.cache)} bundles cannot hold {len(ids)} active neurons; "
                                   "raise cache_fraction")
            free = np.asarray(free, np.int64)
            old = self.neuron_in[free]
            self.slot_of[old[old >= 0]] = -1
            before = self.bytes_read
            self.cache[torch.from_numpy(free)] = self._read_rows(missing)
            self.decode_bytes += self.bytes_read - before
            self.slot_of[missing] = free
            self.neuron_in[free] = missing
            self.reads_total += len(missing)
        slots = self.slot_of[ids]
        self.last_used[slots] = self.step
        return slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H = self.hidden
        act = F.silu(F.linear(x, self.gate))  # [B, T, I]
        mask = act.abs() > self.threshold  # [B, T, I]
        self.step += 1
        if x.shape[1] > 1:  # prefill: every neuron is active for some token; read the whole layer once
            bundles = self.reader.read(self.name)  # [I, P]
            self.bytes_read += bundles.numel() * self.elem
            up, down = bundles[:, :H], bundles[:, H:2 * H]  # [I, H] each
            h = act * mask * F.linear(x, up)  # [B, T, I]
            return torch.matmul(h, down)  # [B, T, H]
        ids = np.flatnonzero(mask.any(dim=(0, 1)).numpy())  # [k] active for some row
        self.active_total += len(ids)
        self.decode_steps += 1
        if len(ids) == 0:
            return torch.zeros_like(x)
        slots = torch.from_numpy(self._ensure_resident(ids))
        rows = self.cache[slots]  # [k, P]
        idx = torch.from_numpy(ids)
        h = (act[..., idx] * mask[..., idx]) * F.linear(x, rows[:, :H])  # [B, 1, k]
        return torch.matmul(h, rows[:, H:2 * H])  # [B, 1, H]

    def nbytes(self) -> int:
        return (self.gate.numel() + self.cache.numel()) * self.elem


def enable_flash(llm, disk_dir: str | Path, config: FlashConfig, calibration_ids: list[int]) -> dict:
    """Move every layer's up/down projections to flash bundles; keep gates resident."""
    from offload.prompt_cache import model_fingerprint

    model = llm.model
    if model.offloaded:
        raise OffloadError("flash FFN windowing works on resident layers; do not combine it with layer streaming")
    fingerprint = model_fingerprint(llm.args, llm.path)
    path = bundle_store_path(Path(disk_dir), llm.path.stem, fingerprint, model.dtype, config.sparsity)
    meta = None
    if path.is_file():
        try:
            meta, _ = read_header(path)
        except OffloadError:
            meta = None
        if meta is not None and meta.get("fingerprint") != fingerprint:
            meta = None
    if meta is None:
        thresholds = calibrate_thresholds(model, calibration_ids, config.sparsity, llm.backend)
        write_bundles(path, model, thresholds, fingerprint)
        meta, _ = read_header(path)
    reader = StoreReader(path, device="cpu")
    inter, H = llm.args.intermediate_size, llm.args.hidden_size
    for i, layer in enumerate(model.layers):
        gate = layer.mlp.w_gate_up[:inter].detach().clone()  # [I, H]
        layer.mlp = FlashMLP(gate, reader, i, meta["thresholds"][i], H, config, meta["bundle_elems"])
    return {"store": str(path), "thresholds": meta["thresholds"], "reader_mode": reader.mode,
            "bundle_bytes": meta["bundle_elems"] * model.layers[0].mlp.elem}


def flash_stats(llm) -> dict:
    """Per decode step, summed over layers: active neurons, bytes read from flash; resident bytes."""
    layers = [m for m in (layer.mlp for layer in llm.model.layers) if isinstance(m, FlashMLP)]
    steps = max(1, layers[0].decode_steps) if layers else 1
    return {"decode_steps": steps, "decode_bytes_per_step": sum(m.decode_bytes for m in layers) / steps,
            "active_neurons_per_step": sum(m.active_total for m in layers) / steps,
            "neurons": sum(m.intermediate for m in layers),
            "resident_bytes": sum(m.nbytes() for m in layers)}
