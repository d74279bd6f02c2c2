"""The one builder: a :class:`ResolvedConfig` in, a :class:`Runtime` out.

Every way of loading a model is a branch here: resident (no budget), placed under budgets (layers
streamed from host memory or a disk store), and flash FFN windowing on top of either. Nothing
below this module imports the API class; nothing here decides an "auto" (that is
:meth:`EngineConfig.resolve`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .attention import AttentionBackend
from .engine import Engine
from .engine_config import MIN_FLASH_CALIBRATION, ResolvedConfig
from .indexes.backend import SparseAttention
from .indexes.base import IndexContext, policy_class
from .indexes.dense import DenseAttention
from .kernels.cpu_int4_gemv import decode_kernel
from .kernels.warm import warm_cpu_kernels
from .loaders import load_model
from .model import Transformer
from .prompt_cache import model_fingerprint
from .quant import KERNEL_DTYPE, held_format, int4_layout
from .rope import RotaryEmbedding
from .tiers.budget import release_freed_memory
from .tiers.flash import enable_flash, flash_stats
from .tiers.kv_store import KVStore, kv_format_words, kv_held_dtype
from .tiers.planner import LAYER_MAJOR_TOKENS, Placement
from .tiers.runtime import load_offloaded
from .tiers.streaming import LayerStreamer
from .tokenizer import Tokenizer


@dataclass
class Runtime:
    """What a run computes with: the model, its tokenizer, the attention backend, the engine, and
    the tiers in use. ``placement``: the layer placement in force (None when there is no budget,
    or when flash made every layer resident); ``flash``: what the FFN bundles hold."""

    resolved: ResolvedConfig
    model: Transformer
    tokenizer: Tokenizer
    source: Path
    fingerprint: str  # identifies the weights by content (prompt caches, weight and bundle stores)
    backend: AttentionBackend
    engine: Engine
    placement: Placement | None
    streamer: LayerStreamer | None
    flash: dict | None

    def describe(self) -> str:
        """One line: model, device, dtype, where the weights live and the KV policy (and why)."""
        r, a = self.resolved, self.model.args
        seed = r.dummy_seed
        weights = "weights" if seed is None else f"dummy weights (seed {seed})"
        if self.placement is not None:
            tiers = self.placement.layer_tiers
            weights += ": layers " + ", ".join(f"{tiers.count(t)} on {t}" for t in ("device", "host", "disk")
                                               if t in tiers)
        else:
            weights += f": all {a.num_layers} layers on {r.device.type}"
        if r.quantize:
            kernel = str(KERNEL_DTYPE).removeprefix("torch.")
            weights += (f", projections {r.quantize} ({held_format(r.quantize)}), "
                        f"embeddings and head int8 ({held_format('int8')}), norms {r.dtype_name}")
            if r.device.type == "cpu" and r.dtype != KERNEL_DTYPE and r.quantize == "int4":
                weights += f", {kernel} kernel inputs"  # fp32 model: the CPU's int4 kernel casts at its edge
            if r.device.type == "cpu" and r.quantize == "int4":  # which kernel a step's products run (measured)
                chosen = decode_kernel()
                on = "the C kernel" if chosen.name == "c" else "torch's kernel"
                weights += f", int4 steps on {on} ({chosen.reason})"
            if r.device.type != "cpu":  # the Triton kernels (resolve refuses a GPU run without them)
                weights += ", Triton kernels" + (f" ({int4_layout(r.device)} layout)" if r.quantize == "int4" else "")
        if r.weights_note:
            weights += f" [auto: {r.weights_note}]"
        if self.flash is not None:
            f = self.flash
            weights += (f", FFN up/down on flash (sparsity {f['sparsity']:g}, {f['cache_fraction']:.0%} of the "
                        f"bundles cached, reads via {f['reader_mode']})")
        attention = self.backend.describe()
        if r.config.kv_dtype:
            attention += f", KV {r.config.kv_dtype} ({kv_format_words(r.config.kv_dtype, r.dtype_name)})"
        if r.kv_policy_reason:
            attention += f" [auto: {r.kv_policy_reason}]"
        return (f"offload: {self.source.name} ({a.architecture}, {a.param_count() / 1e6:.0f}M params, "
                f"{a.num_layers} layers, {a.num_heads}/{a.num_kv_heads} heads) on {r.device.type}, "
                f"{r.dtype_name}; {weights}; {attention}")

    def tier_report(self) -> dict:
        """What each tier holds as placed, and the disk bytes read per forward pass so far; with
        flash, what a decode step reads and what stays resident."""
        resident = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.device.type != "meta")
        r = self.resolved
        on_gpu = r.device.type == "cuda"
        report: dict = {"placement": None, "weights": {"format": r.quantize or r.dtype_name,
                                                       "resident_bytes": resident},
                        # the KV as allocated now (it grows to the longest batch's context)
                        "kv": {"format": r.config.kv_dtype or r.dtype_name,
                               "device_bytes": self.backend.kv_nbytes(r.device.type),
                               "host_bytes": self.backend.kv_nbytes("cpu") if on_gpu else 0,
                               "disk": self.backend.kv_disk_report()}}
        if self.placement is not None:
            st = self.streamer
            read, passes = (st.bytes_read, st.passes) if st is not None else (0, 0)
            report |= {"placement": self.placement.tier_bytes(), "disk_bytes_read": read, "forward_passes": passes,
                      # each forward pass (a decode step or a prefill chunk) streams every off-device layer once
                      "disk_bytes_per_pass": read / passes if passes else None,
                      "disk_mode": st.store.mode if st is not None and st.store is not None else None,
                      "layer_loads": st.loads if st is not None else 0}
        if self.flash is not None:
            report["flash"] = {**flash_stats(self.model), "cache_fraction": self.flash["cache_fraction"],
                               "accounted_resident_bytes": self.flash["resident_bytes"]}
        return report

    def close(self) -> None:
        """Stop the prefetch thread, close the weight store (streamed layers only) and remove the
        KV's disk tier files."""
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None
        self.backend.close()


def build_runtime(resolved: ResolvedConfig) -> Runtime:
    config, quantize = resolved.config, resolved.quantize
    fingerprint = model_fingerprint(resolved.args, resolved.source, resolved.dummy_seed)
    if quantize:  # other weights than the file's: a prompt cache of the dense model must not match
        fingerprint += f"+{quantize}"
    if resolved.int8_projections:  # int8 beside int4: neither an all-int4 nor a dense prompt cache matches
        fingerprint += f"+int8x{len(resolved.int8_projections)}"
    streamer = placement = None
    if config.budgeted:
        if config.verbose:
            print(resolved.placement.table(), file=sys.stderr)
        loaded = load_offloaded(config.model, resolved.placement, device=resolved.device, dtype=resolved.dtype,
                                fingerprint=fingerprint, disk_dir=config.disk_dir and Path(config.disk_dir),
                                tuning=resolved.tuning, io_backend=config.io_backend, progress=config.progress,
                                verbose=config.verbose, load_format=config.load_format, seed=config.seed,
                                quantize=quantize)
        model, tokenizer, source = loaded.model, loaded.tokenizer, loaded.path
        placement, streamer = resolved.placement, loaded.streamer
    else:
        model, tokenizer, source = load_model(config.model, resolved.device, resolved.dtype, progress=config.progress,
                                              load_format=config.load_format, seed=config.seed,
                                              quantize=quantize, int8_projections=resolved.int8_projections)
    if quantize:  # the dense pages each layer gave up as it converted
        release_freed_memory()
    if config.rope_scaling is not None:  # context extension: before any attention backend is built
        model.args = resolved.args
        model.rope = RotaryEmbedding(model.args, resolved.device)
    backend = build_backend(resolved, tokenizer)
    if resolved.device.type == "cpu":
        _warm_kernels(resolved, backend, config.verbose)
    flash = None
    if config.flash is not None:  # FFN up/down projections on flash ("LLM in a flash")
        calibration = config.flash_calibration
        ids = tokenizer.encode(calibration) if isinstance(calibration, str) else list(calibration)
        if len(ids) < MIN_FLASH_CALIBRATION:
            print(f"offload: flash thresholds calibrated on only {len(ids)} tokens: the sparsity they give on other "
                  f"text is uncertain; calibrate on a few hundred tokens like your prompts (flash_calibration=..., "
                  f"--flash-calibration FILE)", file=sys.stderr)
        flash = enable_flash(model, backend, source_stem=source.stem, fingerprint=fingerprint,
                             disk_dir=config.disk_dir, config=config.flash,
                             calibration_ids=ids[:config.flash.calibration_tokens], sizing=resolved.flash_sizing)
        # every layer is resident now but for its bundles: the layer placement no longer describes it
        streamer = placement = None
    model.bind_decode_step()  # the weights are final now
    # layers streamed from another tier, or a KV on disk: each read once per prompt, not once per chunk
    layer_major = streamer is not None or resolved.kv_disk is not None
    engine = Engine(model, tokenizer, backend, config.prefill_chunk_size, config.max_context,
                    layer_major_tokens=LAYER_MAJOR_TOKENS if layer_major else None)
    return Runtime(resolved=resolved, model=model, tokenizer=tokenizer, source=source, fingerprint=fingerprint,
                   backend=backend, engine=engine, placement=placement, streamer=streamer, flash=flash)


# A warm-up longer than this compiled kernels (cached ones load in a fraction of a second): say so once.
COMPILE_NOTICE_S = 2.0


def _warm_kernels(resolved: ResolvedConfig, backend: AttentionBackend, verbose: bool) -> None:
    """Compile (or load from numba's cache) the CPU kernels the model's steps call (the KV policy's
    own included), now rather than in the first request; say so when that took a while (the first
    run on a machine)."""
    t0 = time.perf_counter()
    warm_cpu_kernels(resolved.dtype, kv_held_dtype(resolved.config.kv_dtype, resolved.dtype), resolved.quantize)
    if isinstance(backend, SparseAttention):
        backend.policy_cls.warm(backend.ctx, resolved.dtype)
    took = time.perf_counter() - t0
    if verbose and took > COMPILE_NOTICE_S:
        print(f"offload: compiled the CPU kernels in {took:.1f} s (once per machine: later runs load them from "
              f"numba's cache)", file=sys.stderr)


def build_backend(resolved: ResolvedConfig, tokenizer: Tokenizer) -> AttentionBackend:
    """Dense attention, or sparse attention with the resolved KV policy (telemetry needs the latter)."""
    config, args = resolved.config, resolved.args
    # the sparse layers' KV in host memory with kv_offload (only selections cross to the device)
    # (or with kv_disk, on disk: read a selection at a time)
    sparse_layers = range(resolved.selection.dense_layers, args.num_layers) if resolved.kv_offload else ()
    on_disk = resolved.kv_disk is not None
    store = KVStore(args, resolved.device, resolved.dtype, host_layers=() if on_disk else sparse_layers,
                    kv_dtype=config.kv_dtype, disk_layers=sparse_layers if on_disk else (), disk=resolved.kv_disk)
    if resolved.kv_policy == "dense" and not config.telemetry:
        return DenseAttention(args, resolved.device, resolved.dtype, store=store)
    ends = tokenizer.sentence_end_ids() if policy_class(resolved.kv_policy).needs_token_ids else frozenset()
    context = IndexContext.for_model(args, resolved.device, sentence_end_ids=ends)
    return SparseAttention(args, resolved.device, resolved.dtype, resolved.kv_policy, resolved.selection,
                           context, telemetry=config.telemetry, kv_offload=resolved.kv_offload, store=store)

