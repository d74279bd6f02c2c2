"""Placement: which tier holds each layer's weights, the KV cache and the index, and what a decode
step should cost there.

The planner takes the model's tensor inventory (from :class:`ModelArgs`: nothing is read from a
checkpoint, so presets plan models that are not downloaded), the KV bytes at the target context,
the KV policy in use, the budgets, and a :class:`BandwidthProfile` (the JSON that
``offload profile`` writes; documented defaults when none exists). It returns a frozen
:class:`Placement`: printable as a table, saved as JSON, and checked against the budgets before
any work is done.

Tiers: ``device`` (the GPU, or on a CPU-only machine the host memory the model computes from),
``host`` (pinned CPU memory; only when the device is a GPU) and ``disk`` (a store directory).
Preference order for layer weights: device, then host, then disk; two streaming slots (double
buffers, one layer each) are reserved on the device whenever any layer streams.

Decode-step model (memory bound, as decode is, plus the runtime's measured fixed cost per layer):
a resident layer costs its bytes over the device's memory bandwidth (on a CPU, each weight matrix
at the matrix-vector rate measured for its size); a streamed layer costs the larger of that and its
transfer (prefetched one layer ahead, so transfer and compute overlap, FlexGen style); attention
costs the KV bytes it reads (all of it for dense, sinks + window + budget for sparse policies) plus
the index search for the keys it scores; the head costs the LM head matrix (the embedding table is
read one row per token).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from offload.config import DENSE_LAYERS, ModelArgs
from offload.decode_step import binds
from offload.errors import OffloadError
from offload.fileio import write_json_atomic
from offload.quant import embedding_nbytes, layer_nbytes, projection_nbytes, projection_shapes

from .budget import BudgetError, format_size, pinned_nbytes
from .kv_disk import EXPECTED_HIT_RATE, DiskKVSizing
from .kv_store import kv_bytes_per_token

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME_RESERVE = 64 << 20  # activations, logits, small buffers of one decode step
# Where the KV is on disk or layers stream, a prompt goes through the model a layer at a time (each
# streamed layer and each disk layer's rows then read once per group of chunks, not once per chunk),
# this many tokens at a time: the hidden states held at once stay bounded at any prompt length.
LAYER_MAJOR_TOKENS = 16384


def read_profile(path: str | Path) -> dict:
    """A profile JSON written by ``offload profile`` (and ``offload tune``), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise OffloadError(f"bandwidth profile {path} not found: run `offload profile --out {path}` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OffloadError(f"bandwidth profile {path} is not valid JSON ({e}); run `offload profile` again") from None


@dataclass(frozen=True)
class BandwidthProfile:
    """Bandwidths (GB/s) and rates the planner uses. Defaults are conservative guesses for a
    desktop with a PCIe 4 GPU and an NVMe SSD; ``offload profile`` measures the real ones."""

    host_read_gbs: float = 10.0  # CPU streaming read: what a CPU-only decode step is bound by
    gpu_read_gbs: float = 900.0  # GPU memory (HBM/GDDR) read
    h2d_pinned_gbs: float = 20.0
    h2d_pageable_gbs: float = 8.0
    disk_read_gbs: float = 1.5  # cold, O_DIRECT
    verify_gbs: float = 2.0  # CRC-32 of what was read (one core), after each read: streamed disk layers pay both
    index_keys_per_s: float = 3e6  # graph-search keys scored per second (all heads of a layer)
    scored_fraction: float = 0.10  # keys a retrieval search scores per step, fraction of context
    layer_overhead_ms: float = 0.5  # fixed cost of one decoder layer per step (op dispatch), measured
    # The same for the bound CPU decode step (a resident bf16 model on the CPU: offload.decode_step),
    # whose calls between the products are bound once; None: not measured, layer_overhead_ms stands.
    bound_layer_overhead_ms: float | None = None
    # What a sparse layer adds to that per step (its search's and gather's dispatch), per KV policy:
    # [[policy, ms], ...] as measured; a policy not measured is priced at the default.
    sparse_layer_overhead_ms: tuple = ()
    default_sparse_layer_overhead_ms: float = 0.5
    # Matrix-vector bandwidth by matrix size, [[bytes, GB/s], ...] per dtype: small matrices run
    # below the streaming bandwidth. Empty: host_read_gbs for every size.
    gemv_curve_fp32: tuple = ()
    gemv_curve_bf16: tuple = ()
    gemv_curve_int4: tuple = ()  # bytes as held by int4 weights (codes, scales and zeros)
    gemv_curve_int8: tuple = ()  # bytes as held by int8 weights (codes and group scales)
    source: str = "defaults"

    def host_gemv_gbs(self, matrix_bytes: float, dtype: str) -> float:
        """CPU matrix-vector bandwidth for matrices of ``matrix_bytes`` (log-size interpolation).
        ``dtype``: a compute dtype's name, or "int4" / "int8" for quantized weights (bf16 when not
        measured)."""
        curves = {"int4": self.gemv_curve_int4 or self.gemv_curve_bf16,
                  "int8": self.gemv_curve_int8 or self.gemv_curve_bf16, "bfloat16": self.gemv_curve_bf16,
                  "float16": self.gemv_curve_bf16}
        curve = sorted(curves.get(dtype, self.gemv_curve_fp32))
        if not curve:
            return self.host_read_gbs
        if matrix_bytes <= curve[0][0]:
            return curve[0][1]
        for (s0, g0), (s1, g1) in zip(curve, curve[1:]):
            if matrix_bytes <= s1:
                t = math.log(matrix_bytes / s0) / math.log(s1 / s0)
                return g0 + t * (g1 - g0)
        return curve[-1][1]

    def step_layer_overhead_ms(self, bound_step: bool) -> float:
        """The per-layer fixed cost of a decode step: the bound CPU step's where the model runs it."""
        if bound_step and self.bound_layer_overhead_ms is not None:
            return self.bound_layer_overhead_ms
        return self.layer_overhead_ms

    def sparse_overhead_ms(self, policy: str) -> float:
        """The measured fixed cost a sparse layer of ``policy`` adds per decode step."""
        return dict(self.sparse_layer_overhead_ms).get(policy, self.default_sparse_layer_overhead_ms)

    @classmethod
    def load(cls, path: str | Path | None) -> "BandwidthProfile":
        """Read the ``planner`` section of a profile JSON; missing figures keep their defaults."""
        if path is None:
            return cls()
        doc = read_profile(path)
        section = doc.get("planner", doc)
        known = {f.name for f in fields(cls)} - {"source"}
        values = {k: (tuple(tuple(p) for p in v) if isinstance(v, list) else float(v))
                  for k, v in section.items() if k in known}
        return cls(**values, source=str(path))


@dataclass(frozen=True)
class Tuning:
    """Knobs that ``offload tune`` picks on this machine and saves in the profile's ``tuned`` section:
    how disk reads are issued, how many layers stream ahead, and the KV selection's budget and
    search effort. Defaults are what the runtime uses without a tuned profile."""

    read_block: int = 0  # bytes per read request (0: one request per tensor)
    reader_threads: int = 1  # requests in flight
    prefetch_slots: int = 2  # device buffers for streamed layers (slots - 1 layers load ahead)
    kv_budget: float | None = None  # None: the API's default
    search_effort: float | None = None  # None: each graph index's default
    source: str = "defaults"

    def __post_init__(self) -> None:
        ints = (self.read_block, self.reader_threads, self.prefetch_slots)
        nums = [v for v in (self.kv_budget, self.search_effort) if v is not None]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints) or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in nums):
            raise OffloadError(f"the profile's tuned section has a non-numeric setting ({self.source}): run "
                               f"`offload tune` again")
        if self.prefetch_slots < 2:
            raise OffloadError(f"prefetch_slots must be >= 2 (one computing, one loading), got {self.prefetch_slots}")

    @classmethod
    def load(cls, path: str | Path | None) -> "Tuning":
        if path is None:
            return cls()
        section = read_profile(path).get("tuned") or {}
        known = {f.name for f in fields(cls)} - {"source"}
        return cls(**{k: v for k, v in section.items() if k in known}, source=str(path)) if section else cls()


@dataclass(frozen=True)
class Placement:
    model: str
    device: str  # "cuda" or "cpu"
    dtype: str
    context: int
    kv_policy: str
    layer_tiers: tuple[str, ...]  # per layer: device | host | disk
    layer_bytes: int
    fixed_device_bytes: int  # embeddings, head, final norm, runtime reserve
    prompt_hidden_bytes: int  # a layer-major prefill's hidden states (the KV on disk, or layers streamed)
    slot_bytes: int  # streaming double buffers on the device
    host_staging_bytes: int  # pinned host buffers disk layers pass through to a GPU (one layer per slot)
    kv_tiers: dict  # tier -> bytes of KV
    index_tiers: dict  # tier -> bytes of index structures
    budgets: dict  # tier -> bytes (None: unlimited)
    predicted_step_ms: float
    step_breakdown_ms: dict
    profile_source: str
    bytes_per_token: dict = field(default_factory=dict)  # tier -> bytes moved per decode step
    # what the compute device reads per decode step where it computes: "weights" (every layer, the
    # head), "kv" (what attention reads: whole for dense layers, the selection for sparse ones)
    read_per_token: dict = field(default_factory=dict)
    quantize: str | None = None  # "int4" / "int8": layers hold quantized projections (layer_bytes counts those)
    kv_dtype: str | None = None  # "int8": the KV bytes counted are int8 codes and scales
    kv_disk_cache_bytes: int = 0  # the sparse layers' KV is on disk, read through a cache this big (in KV "host"
    # on a GPU, "device" on a CPU, beside the rows kept in memory)

    @property
    def streamed_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_tiers) if t != "device"]

    def tier_bytes(self) -> dict[str, int]:
        out = {"device": self.fixed_device_bytes + self.slot_bytes + self.prompt_hidden_bytes,
               "host": self.host_staging_bytes, "disk": 0}
        for t in self.layer_tiers:
            out[t] += self.layer_bytes
        for d in (self.kv_tiers, self.index_tiers):
            for t, b in d.items():
                out[t] += b
        return out

    def table(self) -> str:
        """A human-readable summary of where everything lives and what a step should cost."""
        tiers = self.tier_bytes()
        counts = {t: self.layer_tiers.count(t) for t in ("device", "host", "disk")}
        held = self.dtype + (f" ({self.quantize} projections, int8 embeddings)" if self.quantize else "") + (
            f", KV {self.kv_dtype}" if self.kv_dtype else "")
        lines = [f"placement: {self.model}, {held} on {self.device}, context {self.context:,}, "
                 f"kv_policy {self.kv_policy}",
                 "| tier | budget | placed | layers (weights) | KV | index |",
                 "|---|---|---|---|---|---|"]
        for t in ("device", "host", "disk"):
            if t == "host" and self.device == "cpu":
                continue
            budget = self.budgets.get(t)
            lines.append(f"| {t} | {'-' if budget is None else format_size(budget)} | {format_size(tiers[t])} | "
                         f"{counts[t]} | {format_size(self.kv_tiers.get(t, 0))} | "
                         f"{format_size(self.index_tiers.get(t, 0))} |")
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.step_breakdown_ms.items())
        moved = ", ".join(f"{k} {format_size(v)}" for k, v in self.bytes_per_token.items() if v)
        read = ", ".join(f"{k} {format_size(v)}" for k, v in self.read_per_token.items())
        lines.append(f"predicted decode step: {self.predicted_step_ms:.1f} ms ({parts}); "
                     f"read per token on the {self.device}: {read or '-'}; moved between tiers per token: "
                     f"{moved or 'nothing'}; profile: {self.profile_source}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())


@dataclass(frozen=True)
class SelectionCost:
    """What a KV selection policy adds to a placement, priced by the policy itself
    (``KVIndex.selection_cost`` in offload.indexes): the planner knows no policy by name."""

    index_bytes: int = 0  # index structures, all sparse layers
    prefill_query_bytes: int = 0  # prompt queries a query-aware index keeps until it is built
    search_ms: float = 0.0  # host-side search per decode step, all sparse layers


def kv_fits(args: ModelArgs, context: int, dtype: str, device_budget: int,
            quantize: str | None = None, kv_dtype: str | None = None, finer_bytes: int = 0) -> tuple[bool, str]:
    """Whether the whole model and its full KV at ``context`` fit in ``device_budget`` (what
    ``kv_policy="auto"`` asks), with the reason in words. ``finer_bytes``: as :func:`plan` takes it."""
    b = DTYPE_BYTES[dtype]
    kv = kv_bytes_per_token(args, b, kv_dtype) * context
    weights = (args.num_layers * layer_nbytes(args, b, quantize) + embedding_nbytes(args, b, quantize)
               + args.hidden_size * b + finer_bytes)
    need = kv + weights + RUNTIME_RESERVE
    if need <= device_budget:
        return True, (f"the KV at {context:,} tokens ({format_size(kv)}) fits on the device beside the weights "
                      f"({format_size(need)} of {format_size(device_budget)})")
    return False, (f"the KV at {context:,} tokens ({format_size(kv)}) and the weights ({format_size(weights)}) "
                   f"exceed the device budget {format_size(device_budget)}")


def plan(args: ModelArgs, *, model: str, context: int, device: str = "cpu", dtype: str = "float32",
         kv_policy: str = "dense", kv_budget: float = 0.02, sink: int = 4, window: int = 64,
         gpu_memory: int | None = None, cpu_memory: int | None = None, disk_dir: str | None = None,
         profile: BandwidthProfile | None = None, prefetch_slots: int = 2, dense_layers: int = DENSE_LAYERS,
         kv_on_host: bool | None = None, selection_cost: SelectionCost = SelectionCost(),
         quantize: str | None = None, kv_dtype: str | None = None, kv_disk: bool | None = False,
         kv_disk_hit_rate: float = EXPECTED_HIT_RATE, finer_bytes: int = 0) -> Placement:
    """Place weights, KV and index under the budgets (bytes; None = unlimited). ``prefetch_slots``:
    device buffers for streamed layers (2 = double buffering). ``kv_on_host``: the sparse layers'
    full KV lives in host memory, only each step's selection crossing to the GPU (None: whenever a
    GPU computes with a sparse policy). ``quantize``: layers, their stores and buffers hold int4
    projections, the embeddings int8 (the bytes placed, streamed and read are those). ``kv_dtype``:
    "int8" KV (codes and a scale per token and KV head), in every tier; "int4" / "int2" (KIVI's
    groups) in memory tiers, on disk as rows of int8 keys and 4- or 2-bit values (kv_disk.RowFormat).
    ``kv_disk``: the sparse
    layers' KV on disk (in ``disk_dir``), read a selection at a time through a cache of extents in
    the memory left (None: when the weights and the whole KV do not fit in memory and a disk_dir is
    given; only for a policy whose selection the disk tier reads in runs). ``kv_disk_hit_rate``:
    the share of a step's extents expected in that cache (the prediction of bytes read per token).
    ``finer_bytes``: what the resident layers hold beyond ``quantize``'s bytes (a file's finer
    projections held in int8 beside int4 ones, unbudgeted runs only), counted with the fixed bytes."""
    if dtype not in DTYPE_BYTES:
        raise OffloadError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPE_BYTES)}")
    if context <= 0:
        raise OffloadError(f"context must be positive, got {context}")
    profile = profile or BandwidthProfile()
    b = DTYPE_BYTES[dtype]
    kv_token = kv_bytes_per_token(args, b, kv_dtype)  # all layers, as the KV store holds them
    on_gpu = device == "cuda"
    layer_bytes = layer_nbytes(args, b, quantize)
    fixed = embedding_nbytes(args, b, quantize) + args.hidden_size * b + RUNTIME_RESERVE + finer_bytes
    kv_total = kv_token * context
    sparse = kv_policy not in ("dense",)
    budget_tokens = int(kv_budget * context) if kv_budget < 1 else int(kv_budget)
    attended = min(context, budget_tokens + sink + window) if sparse else context
    idx_bytes = selection_cost.index_bytes + selection_cost.prefill_query_bytes if sparse else 0
    device_budget = gpu_memory if on_gpu else cpu_memory
    host_budget = cpu_memory if on_gpu else None

    # KV and index first: they decide what room is left for weights.
    kv_tiers: dict[str, int] = {}
    index_tiers: dict[str, int] = {}
    if kv_on_host is None:
        kv_on_host = on_gpu and sparse
    if kv_on_host:
        # The GPU keeps the dense layers' KV and the sparse layers' attended working set; the sparse
        # layers' full KV and the CPU-side index live on the host (kv_offload).
        per_layer = kv_token // args.num_layers  # one layer, one token
        dense = min(dense_layers, args.num_layers)
        kv_tiers = {"device": per_layer * (dense * context + (args.num_layers - dense) * attended),
                    "host": per_layer * (args.num_layers - dense) * context}
        index_tiers = {"host": idx_bytes}
    else:
        kv_tiers = {"device": kv_total}
        if sparse:
            index_tiers = {"device": idx_bytes}
    memory_tier = "host" if kv_on_host else "device"  # where the sparse layers' KV is kept in memory
    dense = min(dense_layers, args.num_layers) if sparse else args.num_layers
    sizing = DiskKVSizing(args, b, kv_dtype, context, attended, sparse_layers=args.num_layers - dense)
    memory_budget = host_budget if kv_on_host else device_budget
    if kv_disk is None:  # when the weights and the whole KV do not fit in memory (weights stream last)
        weights_there = 0 if kv_on_host else args.num_layers * layer_bytes + fixed
        kv_disk = sparse and disk_dir is not None and memory_budget is not None and (
            weights_there + kv_tiers.get(memory_tier, 0) + idx_bytes > memory_budget)
    # A prompt prefilled layer by layer (where the KV is on disk or layers stream) holds the hidden
    # states of LAYER_MAJOR_TOKENS positions on the compute device at once.
    prompt_hidden = min(context, LAYER_MAJOR_TOKENS) * args.hidden_size * b
    hidden_bytes = 0  # held where it applies: the KV on disk (now) or layers streamed (below)
    cache_bytes = 0
    if kv_disk:
        if not sparse or disk_dir is None:
            raise OffloadError("the KV on disk needs a sparse kv_policy and disk_dir=...")
        hidden_bytes = prompt_hidden
        # the sparse layers' KV leaves memory (in the memory tiers' format: KIVI's for int4) for the disk's rows
        sparse_in_memory = kv_token // args.num_layers * sizing.sparse_layers * context
        kv_tiers[memory_tier] = kv_tiers.get(memory_tier, 0) - sparse_in_memory + sizing.memory_bytes
        kv_tiers["disk"] = sizing.sparse_kv_bytes
        if memory_budget is None:
            cache_bytes = sizing.default_cache_bytes
        else:  # the cache takes what the memory budget leaves (weights resident first on a CPU)
            weights_there = 0 if kv_on_host else args.num_layers * layer_bytes + fixed + hidden_bytes
            room = memory_budget - weights_there - kv_tiers[memory_tier] - index_tiers.get(memory_tier, 0)
            if room < sizing.min_cache_bytes:
                need = memory_budget - room + sizing.min_cache_bytes
                raise BudgetError(f"{'cpu' if kv_on_host or not on_gpu else 'gpu'}_memory {format_size(memory_budget)}"
                                  f" cannot hold the weights, the KV kept in memory and the smallest cache of the KV "
                                  f"on disk ({format_size(sizing.min_cache_bytes)}): the smallest budget that works "
                                  f"is {format_size(need)}")
            cache_bytes = min(room, sizing.sparse_kv_bytes)
        kv_tiers[memory_tier] += cache_bytes
    device_left = None if device_budget is None else device_budget - fixed - hidden_bytes - sum(
        v for t, v in kv_tiers.items() if t == "device") - index_tiers.get("device", 0)
    host_left = None if host_budget is None else host_budget - kv_tiers.get("host", 0) - index_tiers.get("host", 0)
    if device_left is not None and device_left < 0:
        raise BudgetError(f"{'gpu' if on_gpu else 'cpu'}_memory {format_size(device_budget)} is too small for the "
                          f"embeddings, KV cache ({format_size(kv_tiers.get('device', 0))}) and index at context "
                          f"{context:,}: the smallest budget that works is "
                          f"{format_size(device_budget - device_left + prefetch_slots * layer_bytes)}"
                          + ("" if sparse else "; a sparse kv_policy (e.g. retrieval) needs far less"))
    if host_left is not None and host_left < 0:
        raise BudgetError(f"cpu_memory {format_size(host_budget)} is too small for the offloaded KV and index "
                          f"({format_size(host_budget - host_left)}): the smallest budget that works is "
                          f"{format_size(host_budget - host_left)}")

    L = args.num_layers
    tiers = ["device"] * L
    slot_bytes = host_staging = 0
    if device_left is not None and device_left < L * layer_bytes:
        if not kv_disk:  # streamed layers: the prompt is prefilled layer by layer (counted above if kv_disk)
            hidden_bytes = prompt_hidden
            device_left -= prompt_hidden
        slot_bytes = prefetch_slots * layer_bytes  # buffers for streamed layers
        resident = max(0, (device_left - slot_bytes) // layer_bytes)
        if device_left < slot_bytes:
            raise BudgetError(f"{'gpu' if on_gpu else 'cpu'}_memory {format_size(device_budget)} cannot hold "
                              f"{prefetch_slots} streaming buffers of one layer each ({format_size(slot_bytes)}) beside the "
                              f"embeddings, KV, index and the prompt's hidden states: the smallest budget that works is "
                              f"{format_size(device_budget - device_left + slot_bytes)}")
        rest = L - resident
        on_host = 0
        if on_gpu:
            on_host = rest if host_left is None else min(rest, max(0, host_left) // layer_bytes)
            if on_host < rest:  # disk layers reach the GPU through pinned host staging, one layer per slot
                host_staging = prefetch_slots * pinned_nbytes(layer_bytes)  # as the pinned allocator rounds it
                if host_left is not None:
                    if host_left < host_staging:
                        raise BudgetError(
                            f"cpu_memory {format_size(host_budget)} cannot hold the {prefetch_slots} pinned staging "
                            f"buffers ({format_size(host_staging)}) that disk layers pass through to the GPU beside "
                            f"the offloaded KV and index: the smallest budget that works is "
                            f"{format_size(host_budget - host_left + host_staging)}")
                    on_host = min(rest, (host_left - host_staging) // layer_bytes)
        on_disk = rest - on_host
        if on_disk and disk_dir is None:
            where = "gpu_memory and cpu_memory" if on_gpu else "cpu_memory"
            raise BudgetError(f"{on_disk} layers ({format_size(on_disk * layer_bytes)}) fit in neither {where}: "
                              f"give disk_dir=... to stream them from disk, or raise the budget")
        # Resident layers first (the earliest), then host, then disk: a fixed order streams in sequence.
        tiers = ["device"] * resident + ["host"] * on_host + ["disk"] * on_disk

    # Predicted decode step.
    # Decode reads each weight matrix once; on the CPU the achieved bandwidth depends on the matrix's
    # size (small ones pay a larger share of per-call cost), so each is priced at its own size's rate.
    matrices = [projection_nbytes(n, k, quantize) if quantize else n * k * b for n, k in projection_shapes(args)]
    typical = sum(matrices) / len(matrices)
    dev_bw = (profile.gpu_read_gbs if on_gpu else profile.host_gemv_gbs(typical, quantize or dtype)) * 1e9

    def read_s(nbytes: float, kind: str) -> float:
        return nbytes / (dev_bw if on_gpu else profile.host_gemv_gbs(nbytes, kind) * 1e9)

    rest_bytes = layer_bytes - sum(matrices)  # norms, QKV bias: read at the typical rate
    layer_compute_s = sum(read_s(m, quantize or dtype) for m in matrices) + rest_bytes / dev_bw
    link = profile.h2d_pinned_gbs * 1e9
    # a disk layer is read, then checked, on the reader thread: the two rates add in series
    disk = 1e9 / (1 / profile.disk_read_gbs + 1 / profile.verify_gbs)
    weights_ms = 1e3 * read_s(finer_bytes, "int8") if finer_bytes else 0.0  # a mixed file's int8 parts, resident
    transfer_ms = 0.0
    moved = {"host": 0, "disk": 0}
    for t in tiers:
        compute = layer_compute_s
        fetch = 0.0
        if t == "host":
            fetch = layer_bytes / link
        elif t == "disk":
            fetch = layer_bytes / disk + (layer_bytes / link if on_gpu else 0.0)
        if t != "device":
            moved[t] += layer_bytes
        weights_ms += 1e3 * compute
        transfer_ms += 1e3 * max(0.0, fetch - compute)  # what the prefetch cannot hide
    dense_count = L if not sparse else min(dense_layers, L)  # dense layers read their whole KV
    # a sparse layer on disk attends rows gathered in the disk's format (for int4: int8 keys, 4-bit values)
    sparse_token = sizing.row_bytes * args.num_kv_heads if kv_disk else kv_token // L
    kv_read = kv_token // L * dense_count * context + sparse_token * (L - dense_count) * attended
    attention_ms = 1e3 * kv_read / dev_bw
    fetch_kv_ms = 0.0
    if kv_on_host:  # the selected rows of the sparse layers cross the link every step, from pinned staging
        sparse_layers = args.num_layers - min(dense_layers, args.num_layers)
        sel_bytes = kv_token // args.num_layers * sparse_layers * attended
        fetch_kv_ms = 1e3 * sel_bytes / link
        moved["host"] += sel_bytes
    if kv_disk:  # the selection's extents the cache lacks are read every step
        disk_kv = sizing.read_bytes_per_token(kv_disk_hit_rate)
        fetch_kv_ms += 1e3 * disk_kv / disk
        moved["disk_kv"] = disk_kv
    search_ms = selection_cost.search_ms if sparse else 0.0
    # Per token the LM head is read whole, the embedding table for one row only.
    head_bytes = embedding_nbytes(args, b, quantize) // (1 if args.tie_word_embeddings else 2)
    head_ms = 1e3 * read_s(head_bytes, dtype)
    # A resident bf16 model on the CPU runs the bound decode step, priced at its own overhead
    bound_step = binds("cuda" if on_gpu else "cpu", dtype == "bfloat16", args.qk_norm,
                       streamed=any(t != "device" for t in tiers))
    breakdown = {"weights": weights_ms, "weight_transfer": transfer_ms, "attention": attention_ms,
                 "kv_fetch": fetch_kv_ms, "index_search": search_ms, "embed_head": head_ms,
                 "layer_overhead": L * profile.step_layer_overhead_ms(bound_step)}
    return Placement(model=model, device=device, dtype=dtype, context=context, kv_policy=kv_policy,
                     layer_tiers=tuple(tiers), layer_bytes=layer_bytes, fixed_device_bytes=fixed,
                     prompt_hidden_bytes=hidden_bytes,
                     slot_bytes=slot_bytes, host_staging_bytes=host_staging, kv_tiers=kv_tiers, index_tiers=index_tiers,
                     budgets={"device": device_budget, "host": host_budget, "disk": None},
                     predicted_step_ms=sum(breakdown.values()), step_breakdown_ms=breakdown,
                     profile_source=profile.source, bytes_per_token=moved, quantize=quantize, kv_dtype=kv_dtype,
                     kv_disk_cache_bytes=cache_bytes,
                     read_per_token={"weights": L * layer_bytes + finer_bytes + head_bytes, "kv": kv_read})
