"""What the user asks for (:class:`EngineConfig`, "auto" allowed) and what the runtime runs
(:class:`ResolvedConfig`, every "auto" decided).

``EngineConfig`` is frozen and checks its own values on construction: nothing is read, so a bad
value fails before any model is opened. :meth:`EngineConfig.resolve` is the only place where a
setting is interpreted: device, dtype, the profile's tuned defaults, budget bytes, the KV policy,
the placement under the budgets, the flash cache size, whether the sparse layers' KV lives on the
host, and whether the model fits at all. ``LLM``, ``offload generate`` and ``offload plan`` all go
through it, so ``plan`` prints the placement ``generate`` uses.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .config import DENSE_LAYERS, ModelArgs, RopeScaling
from .errors import OffloadError
from .indexes.base import (
    AUTO_SPARSE_POLICY,
    TUNED_EFFORT_POLICY,
    SelectionConfig,
    check_disk_policy,
    policy_class,
    policy_names,
)
from .kernels import resolve_backend
from .loaders import LOAD_FORMATS, read_model_args, read_projection_types, read_weight_types
from .quant import (
    GGUF_FINER_TYPES,
    INT8_GROUP,
    QUANTIZE_SCHEMES,
    finer_nbytes,
    finer_projections,
    projection_shapes,
    quantize_supported,
    scheme_for_file,
    shape_rule,
)
from .tiers.budget import (
    BudgetError,
    check_disk_dir,
    format_size,
    free_device_memory,
    free_host_memory,
    parse_size,
    resolve_budget,
)
from .tiers.flash import FlashConfig, size_cache
from .tiers.io import IO_BACKENDS
from .tiers.kv_disk import read_ahead_pays
from .tiers.kv_store import KV_DTYPES, DiskTier
from .tiers.planner import DTYPE_BYTES, BandwidthProfile, Placement, Tuning, kv_fits, plan

KV_OFFLOAD_CHOICES = (None, False, True, "host", "disk")
WEIGHT_MODES = ("auto", "dequantize")
DEFAULT_KV_BUDGET = 0.02  # 2% of the context, plus sinks and the recent window
MIN_FLASH_CALIBRATION = 128  # fewer calibration tokens than this: thresholds are a guess, say so
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise OffloadError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class EngineConfig:
    """Every setting of a run, as the user gave it. ``LLM(model, **settings)`` and the CLI flags
    build one; ``replace(**changes)`` makes a variant (unknown names are one clear error)."""

    model: str | Path | None = None  # HF folder, .gguf file, preset name (dummy), None: the default model
    device: str = "auto"  # auto: CUDA when usable, else the CPU
    dtype: str = "auto"  # auto: bf16 on a GPU, fp32 on the CPU (bf16 with quantized weights)
    # "auto": a GGUF file's projections stay quantized, in the scheme nearest their blocks (Q4_x -> int4,
    # Q5_x..Q8_0 -> int8: EngineConfig.resolve); "dequantize": every tensor in the compute dtype, the
    # exact reference path
    weights: str = "auto"
    # "int4": projection weights in int4 groups of 32 at run time (CPU kernels or Triton on a GPU),
    # "int8": int8 groups of 32 with an fp32 scale (1.125 bytes per weight; see offload/quant.py),
    # whatever the source; None: as weights= decides
    quantize: str | None = None
    load_format: str = "auto"  # dummy: the model's shape with seeded random weights (speed runs only)
    seed: int = 0  # of the dummy weights
    max_context: int | None = None  # longest sequence (prompt + generated); None: the model's maximum
    prefill_chunk_size: int = 512  # prompt tokens per prefill step
    rope_scaling: Mapping[str, Any] | None = None  # context extension, e.g. {"type": "yarn", "factor": 4, ...}
    # "int8": codes + a scale per token and KV head; "int4"/"int2": KIVI (on disk: int8 keys and 4- or 2-bit
    # values per token); None: the compute dtype
    kv_dtype: str | None = None
    kv_policy: str = "dense"  # auto, or a name from offload.indexes.policy_names()
    kv_budget: float | str | None = None  # fraction of the context, token count, or "p0.95" (adaptive); None: tuned/2%
    sink: int = 4
    window: int = 64
    dense_layers: int = DENSE_LAYERS
    search_effort: float | None = None
    # Streaming heads: a KV head with at most this share of its attention beyond sinks + window (over
    # the prompt's last queries) keeps only those; None: every head selects (see indexes/heads.py)
    kv_head_split: float | None = None
    # The sparse layers' KV off the device: True / "host" in host memory, "disk" in disk_dir (read a
    # selection at a time), False on the device; None: wherever the placement or the policy's search needs it
    kv_offload: bool | str | None = None
    # A KV on disk reads the next step's likely extents ahead, in the background: True / False; None:
    # where that pays (a GPU computes, or a core is spare beside the compute threads: read_ahead_pays)
    kv_read_ahead: bool | None = None
    telemetry: bool = False
    gpu_memory: str | int | None = None  # "24GiB", bytes, "auto" (90% of free), None: no limit
    cpu_memory: str | int | None = None
    disk_dir: str | Path | None = None
    profile: str | Path | None = None  # bandwidth profile JSON from `offload profile` / `offload tune`
    io_backend: str = "auto"
    flash: FlashConfig | None = None
    flash_calibration: str | Sequence[int] | None = None
    verbose: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        _check(self.model is None or isinstance(self.model, (str, os.PathLike)),
               f"model must be a path (a Hugging Face folder or a .gguf file), a preset name or None, got "
               f"{type(self.model).__name__} {self.model!r}")
        _check(isinstance(self.device, (str, torch.device)), f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        _check(isinstance(self.dtype, torch.dtype) or self.dtype in ("auto", *DTYPES),
               f"unknown dtype {self.dtype!r}: use one of auto, {', '.join(sorted(DTYPES))}")
        _check(self.quantize is None or self.quantize in QUANTIZE_SCHEMES,
               f"unknown quantize {self.quantize!r}: use one of {', '.join(QUANTIZE_SCHEMES)} or None")
        _check(self.weights in WEIGHT_MODES, f"unknown weights {self.weights!r}: use 'auto' (a GGUF file's "
               f"projections stay quantized on the CPU) or 'dequantize' (every tensor in the compute dtype)")
        _check(not (self.quantize and self.weights == "dequantize"), f"quantize={self.quantize!r} and "
               f"weights='dequantize' ask for opposite things: drop one")
        _check(self.kv_dtype is None or self.kv_dtype in KV_DTYPES,
               f"unknown kv_dtype {self.kv_dtype!r}: use one of {', '.join(KV_DTYPES)} or None (the compute dtype)")
        _check(self.load_format in LOAD_FORMATS, f"unknown load_format {self.load_format!r}: use 'auto' (read the "
               f"checkpoint) or 'dummy' (seeded random weights, for speed runs)")
        _check(_is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        _check(self.max_context is None or (_is_int(self.max_context) and self.max_context > 0),
               f"max_context must be a positive integer, got {self.max_context!r}")
        _check(_is_int(self.prefill_chunk_size) and self.prefill_chunk_size > 0,
               f"prefill_chunk_size must be a positive integer, got {self.prefill_chunk_size!r}")
        _check(self.rope_scaling is None or isinstance(self.rope_scaling, Mapping),
               f"rope_scaling must be a dict such as {{'type': 'yarn', 'factor': 4}}, got {self.rope_scaling!r}")
        _check(self.kv_policy in ("auto", *policy_names()),
               f"unknown kv_policy {self.kv_policy!r}: choose auto or one of {', '.join(policy_names())}")
        if self.kv_budget is not None:
            SelectionConfig.parse_budget(self.kv_budget)  # one line naming the problem, or nothing
        for name in ("sink", "window", "dense_layers"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 0, f"{name} must be an integer >= 0, got {value!r}")
        _check(self.search_effort is None or (_is_number(self.search_effort) and self.search_effort >= 1),
               f"search_effort must be >= 1 (search width = effort x budget), got {self.search_effort!r}")
        _check(self.kv_head_split is None or (_is_number(self.kv_head_split) and 0 < self.kv_head_split < 1),
               f"kv_head_split must be a share of attention in (0, 1) (e.g. 0.05: KV heads with at most 5% of their "
               f"attention beyond sinks + window keep only those), got {self.kv_head_split!r}")
        for name in ("gpu_memory", "cpu_memory"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip().lower() == "auto"):
                parse_size(value, name)  # syntax now, bytes at resolve()
        _check(isinstance(self.kv_offload, bool) or self.kv_offload in KV_OFFLOAD_CHOICES,
               f"kv_offload must be None (auto), False, True / 'host' or 'disk', got {self.kv_offload!r}")
        _check(self.kv_read_ahead is None or isinstance(self.kv_read_ahead, bool),
               f"kv_read_ahead must be None (auto), True or False, got {self.kv_read_ahead!r}")
        _check(self.kv_offload != "disk" or self.disk_dir is not None,
               "kv_offload='disk' puts the sparse layers' KV in disk_dir: give disk_dir=...")
        _check(self.disk_dir is None or isinstance(self.disk_dir, (str, os.PathLike)),
               f"disk_dir must be a directory path, got {self.disk_dir!r}")
        _check(self.io_backend in IO_BACKENDS, f"unknown io_backend {self.io_backend!r}: use {', '.join(IO_BACKENDS)}")
        _check(self.flash is None or isinstance(self.flash, FlashConfig),
               f"flash must be a FlashConfig(sparsity=...), got {type(self.flash).__name__}")

    def replace(self, **changes: Any) -> "EngineConfig":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise OffloadError(f"unknown setting {unknown[0]!r}: known settings are {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    @property
    def budgeted(self) -> bool:
        """Weights are placed under budgets (layers may stream). With flash and no cpu_memory the
        model loads whole and only its FFN moves to flash."""
        given = self.gpu_memory is not None or self.cpu_memory is not None or self.disk_dir is not None
        return given and (self.flash is None or self.cpu_memory is not None)

    # ------------------------------------------------------------------ resolution
    def resolve(self, planning: bool = False) -> "ResolvedConfig":
        """Decide every "auto", check what can be checked before loading, and place the model.
        ``planning``: for ``offload plan``, which may plan a GPU machine from a machine without one."""
        device = resolve_device(self.device, planning, self.gpu_memory)
        self._check_flash(device, planning)  # before the model is opened
        if self.quantize:
            self._check_quantize(self.quantize, device, self._dtype(device, True))
        tuning, bandwidth = Tuning.load(self.profile), BandwidthProfile.load(self.profile)
        args, source = read_model_args(self.model, self.load_format)
        quantize, weights_note, int8_projections, streamed_note = self._weight_scheme(args, device)
        dtype = self._dtype(device, bool(quantize))
        dtype_name = str(dtype).removeprefix("torch.")
        args = self._extended(args)
        context = self.max_context or args.max_position_embeddings
        _check(self.dense_layers <= args.num_layers, f"dense_layers {self.dense_layers} is more than the model's "
               f"{args.num_layers} layers: give 0..{args.num_layers}")
        on_gpu = device.type == "cuda"
        gpu = resolve_budget(self.gpu_memory, "gpu_memory", lambda: _free_gpu(device)) if on_gpu else None
        cpu = resolve_budget(self.cpu_memory, "cpu_memory", free_host_memory)
        if self.gpu_memory is not None and not on_gpu:
            print("offload: gpu_memory is ignored: no GPU is in use (device cpu)", file=sys.stderr)
        kv_policy, reason = self.kv_policy, None
        if kv_policy == "auto":  # dense when the model and its KV at the context fit on the device
            budget = gpu if on_gpu else cpu
            if budget is None:
                budget = int(0.9 * (_free_gpu(device) if on_gpu else free_host_memory()))
            fits, reason = kv_fits(args, context, dtype_name, budget, quantize, self.kv_dtype,
                                   finer_nbytes(args, int8_projections))
            kv_policy = "dense" if fits else AUTO_SPARSE_POLICY
        budget, mass = SelectionConfig.parse_budget(self.kv_budget or tuning.kv_budget or DEFAULT_KV_BUDGET)
        selection = SelectionConfig(budget=budget, mass=mass, sink=self.sink, head_split=self.kv_head_split,
                                    window=self.window, dense_layers=self.dense_layers,
                                    effort=self.search_effort if self.search_effort is not None else
                                    tuning.search_effort if kv_policy == TUNED_EFFORT_POLICY else None)
        policy = policy_class(kv_policy)
        searches_on_host = policy.searches_on_host
        flash_sizing = None if self.flash is None else size_cache(args, dtype, cpu, context, self.flash)
        # the KV on disk: asked for, or (auto) when it does not fit in memory, for a policy whose
        # selection the disk tier reads in runs (clusters, pages)
        kv_disk = self.kv_offload == "disk" or (None if self.kv_offload is None and self.disk_dir is not None
                                                 and policy.disk_layout is not None else False)
        if self.kv_offload == "disk":
            check_disk_policy(kv_policy)
        def place(finer: frozenset[tuple[int, str]]) -> Placement:
            return plan(args, model=source.name, context=context, device=device.type, dtype=dtype_name,
                        kv_policy=kv_policy, kv_budget=selection.budget, sink=self.sink, window=self.window,
                        gpu_memory=gpu if self.budgeted else None, cpu_memory=cpu if self.budgeted else None,
                        disk_dir=None if self.disk_dir is None else str(self.disk_dir), profile=bandwidth,
                        prefetch_slots=tuning.prefetch_slots, dense_layers=self.dense_layers,
                        kv_on_host=on_gpu and kv_policy != "dense" and (self.kv_offload is not False),
                        selection_cost=policy.selection_cost(args, context, DTYPE_BYTES[dtype_name],
                                                             self.dense_layers, bandwidth),
                        quantize=quantize, kv_dtype=self.kv_dtype, kv_disk=kv_disk,
                        finer_bytes=finer_nbytes(args, finer))

        try:
            placement = place(int8_projections)
        except BudgetError:
            if not int8_projections:
                raise
            placement = None  # the int8 parts do not fit this budget: try without them
        if int8_projections and (placement is None or placement.streamed_layers):  # one scheme per streamed buffer
            int8_projections, weights_note = frozenset(), streamed_note
            placement = place(int8_projections)
        kv_disk = None
        if "disk" in placement.kv_tiers:
            read_ahead = read_ahead_pays(device) if self.kv_read_ahead is None else self.kv_read_ahead
            kv_disk = DiskTier(Path(self.disk_dir), placement.kv_disk_cache_bytes, keep_tokens=selection.window,
                               read_ahead=read_ahead)
        kv_offload = True if kv_disk is not None or self.kv_offload == "host" else self.kv_offload
        if kv_offload is None:  # the full KV of sparse layers on the host when the placement put it there,
            # and always on a GPU for a policy whose search runs on the host (graphs, sentences)
            kv_offload = placement.kv_tiers.get("host", 0) > 0 or (on_gpu and searches_on_host)
        _check(not (kv_offload and kv_policy == "dense"), "kv_offload keeps the KV in host memory and fetches a "
               "selection of it per step: it needs a sparse kv_policy (e.g. retrieval), not dense")
        _check(not (on_gpu and searches_on_host and not kv_offload),
               f"kv_policy {kv_policy!r} searches its index on the host: on a GPU its KV must be in host memory "
               f"(drop kv_offload=False)")
        if self.disk_dir is not None and not planning:
            needed = placement.tier_bytes()["disk"] + (flash_sizing or {}).get("flash_bytes", 0)
            check_disk_dir(Path(self.disk_dir), needed)
        if not planning and not self.budgeted:
            _check_fits(args, source, device, dtype_name, placement)
        if self.quantize:
            problem = _shape_problem(self.quantize, args)
            _check(problem is None, f"quantize={self.quantize!r} {problem}: drop quantize")
        if self.max_context is not None and self.max_context > args.max_position_embeddings and self.verbose:
            print(f"offload: max_context {self.max_context} is beyond the {args.max_position_embeddings} positions "
                  "this model was trained for: fine for measuring speed and index behaviour, but expect output "
                  "quality to degrade", file=sys.stderr)
        return ResolvedConfig(config=self, args=args, source=source, device=device, dtype=dtype, context=context,
                              quantize=quantize, weights_note=weights_note, int8_projections=int8_projections,
                              kv_policy=kv_policy, kv_policy_reason=reason, selection=selection,
                              kv_offload=kv_offload, kv_disk=kv_disk, tuning=tuning, bandwidth=bandwidth, gpu_budget=gpu,
                              cpu_budget=cpu, placement=placement, flash_sizing=flash_sizing)

    def _dtype(self, device: torch.device, quantized: bool) -> torch.dtype:
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        return DTYPES[self.dtype] if self.dtype != "auto" else auto_dtype(device, quantized)

    def _check_quantize(self, scheme: str, device: torch.device, dtype: torch.dtype) -> None:
        problem = _run_problem(device, dtype, self.flash is not None)
        fix = {"dtype": "use dtype='auto'", "flash": "use one", "triton": "pip install triton, or drop quantize"}
        if problem is not None:
            raise OffloadError(f"quantize={scheme!r}: quantized projections {problem[1]}: {fix[problem[0]]}")

    def _weight_scheme(self, args: ModelArgs, device: torch.device) -> tuple[str | None, str | None,
                                                                              frozenset[tuple[int, str]], str | None]:
        """The scheme the projections are held in at run time (None: the compute dtype), when
        weights='auto' decided it why (for the start-up line), the fused weights held in int8 beside
        an int4 majority, and the note to give instead if layers stream. A GGUF file keeps its
        projections quantized in the scheme nearest their blocks (quant.scheme_for_file), unless the
        run or the model's shapes cannot take it: then its tensors are dequantized and the note says
        why. In an int4 file, the weights it gives in a finer type (a Q4_K_M file's Q6_K ones) are held
        in int8 when every layer is resident; a streamed layer's buffer holds one scheme, so when the
        placement streams layers they are requantized to int4 (resolve decides, once placed)."""
        none: frozenset[tuple[int, str]] = frozenset()
        if self.quantize or self.weights == "dequantize":
            return self.quantize, None, none, None
        tensors = read_projection_types(self.model, self.load_format)
        types = read_weight_types(self.model, self.load_format)
        if not types:
            return None, None, none, None
        scheme, held = scheme_for_file(types)
        if scheme is None:
            return None, None, none, None
        run = _run_problem(device, self._dtype(device, True), self.flash is not None)
        if run is not None:
            return None, f"{held}: dequantized (quantized projections {run[1]})", none, None
        problem = _shape_problem(scheme, args)
        if problem is not None and scheme == "int4" and _shape_problem("int8", args) is None:
            return "int8", f"{held}: held in int8 (int4 {problem})", none, None
        if problem is not None:
            return None, f"{held}: dequantized ({scheme} {problem})", none, None
        kept = f"{held}: held in {scheme} (weights='dequantize' for the compute dtype)"
        finer = finer_projections(tensors) if scheme == "int4" else none
        if not finer:
            return scheme, kept, none, None
        finer_types = ", ".join(sorted(t for t in types if t in GGUF_FINER_TYPES))
        return (scheme, f"{held}: held in int4, the {len(finer)} fused projections with {finer_types} tensors in "
                f"int8 (weights='dequantize' for the compute dtype)", finer,
                f"{held}: held in int4, {finer_types} requantized to int4 (this budget does not hold every layer "
                f"resident with them in int8, and a streamed layer's buffer holds one scheme)")

    def _extended(self, args: ModelArgs) -> ModelArgs:
        """The model's hyper-parameters with the requested RoPE scaling (context extension)."""
        if self.rope_scaling is None:
            return args
        longest = max(args.max_position_embeddings, self.max_context or 0)
        return args.replace(rope_scaling=RopeScaling.from_hf(self.rope_scaling), max_position_embeddings=longest)

    def _check_flash(self, device: torch.device, planning: bool) -> None:
        """Flash settings that need no model, checked before it is opened."""
        if self.flash is None:
            return
        _check(device.type == "cpu", "flash FFN windowing is the CPU-only (edge) mode; on a GPU, stream whole "
               "layers (gpu_memory=..., cpu_memory=..., disk_dir=...) instead, or pass device='cpu'")
        _check(self.disk_dir is not None, "flash FFN windowing keeps up/down projections on disk: give disk_dir=...")
        _check(planning or self.flash_calibration is not None, "flash FFN windowing calibrates its activation "
               "thresholds on real text: give flash_calibration='...' (a few hundred tokens of text like your prompts)")

    @classmethod
    def from_cli(cls, ns, *, prompt: str | None = None) -> "EngineConfig":
        """The config of the shared model/budget flags of ``offload generate`` and ``offload plan``."""
        flash = calibration = None
        if ns.flash_sparsity is not None:
            flash = FlashConfig(sparsity=ns.flash_sparsity, window=ns.flash_window)
            calibration = prompt
            if ns.flash_calibration is not None:
                path = Path(ns.flash_calibration)
                _check(path.is_file(), f"--flash-calibration {path} not found: give a text file like your prompts")
                calibration = path.read_text(errors="replace")
        else:
            _check(ns.flash_window is None and ns.flash_calibration is None,
                   "--flash-window and --flash-calibration need --flash-sparsity")
        return cls(model=ns.model, device=ns.device, dtype=ns.dtype, load_format=ns.load_format, seed=ns.dummy_seed,
                   max_context=ns.max_context, prefill_chunk_size=ns.prefill_chunk_size, kv_policy=ns.kv_policy,
                   kv_budget=ns.kv_budget, sink=ns.sink, window=ns.window, dense_layers=ns.dense_layers,
                   search_effort=ns.search_effort, kv_head_split=ns.kv_head_split, quantize=ns.quantize, weights=ns.weights,
                   kv_dtype=ns.kv_dtype,
                   gpu_memory=ns.gpu_memory, cpu_memory=ns.cpu_memory,
                   disk_dir=ns.disk_dir, profile=ns.profile, flash=flash, flash_calibration=calibration,
                   kv_offload={"auto": None, "off": False}.get(ns.kv_offload, ns.kv_offload),
                   kv_read_ahead={"auto": None, "on": True, "off": False}[ns.kv_read_ahead], verbose=not ns.quiet)


@dataclass(frozen=True)
class ResolvedConfig:
    """A run with every decision made: what the builder builds and ``offload plan`` prints."""

    config: EngineConfig
    args: ModelArgs  # with the requested RoPE scaling
    source: Path  # the model file or folder (a preset's name for dummy presets)
    device: torch.device
    dtype: torch.dtype
    context: int
    quantize: str | None  # the projections' run-time scheme; None: the compute dtype
    weights_note: str | None  # what weights="auto" found in the file and chose
    int8_projections: frozenset[tuple[int, str]]  # (layer, fused weight) held in int8 beside an int4 majority
    kv_policy: str
    kv_policy_reason: str | None  # why "auto" chose it
    selection: SelectionConfig
    kv_offload: bool  # the sparse layers' KV in host memory (or on disk)
    kv_disk: DiskTier | None  # the sparse layers' KV on disk: where, and the cache it is read through
    tuning: Tuning
    bandwidth: BandwidthProfile
    gpu_budget: int | None
    cpu_budget: int | None
    placement: Placement  # all on the device when no budget is given
    flash_sizing: dict | None

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def dummy_seed(self) -> int | None:
        return self.config.seed if self.config.load_format == "dummy" else None


def _run_problem(device: torch.device, dtype: torch.dtype, flash: bool) -> tuple[str, str] | None:
    """Why quantized projections cannot run here, as (setting, words); None: they can. On a GPU the
    Triton kernels take bf16, fp16 or fp32 activations (where Triton imports: the reference products
    would dequantize a whole weight per call); the CPU's take bf16 (fp32 ones cast)."""
    if device.type == "cuda" and resolve_backend(device) != "triton":
        return "triton", "need Triton on a GPU (their kernels are Triton's), which does not import here"
    if device.type == "cuda" and dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return "dtype", (f"compute in bfloat16, float16 or float32 on a GPU, not "
                         f"{str(dtype).removeprefix('torch.')}")
    if device.type == "cpu" and dtype not in (torch.bfloat16, torch.float32):
        return "dtype", (f"compute in bfloat16 or float32 (their kernels take bf16 activations), not "
                         f"{str(dtype).removeprefix('torch.')}")
    if flash:
        return "flash", "and flash both rewrite the FFN weights"
    return None


def _shape_problem(scheme: str, args: ModelArgs) -> str | None:
    """Why this model's shapes cannot be held in ``scheme`` (None: they can)."""
    bad = sorted(s for s in set(projection_shapes(args)) if not quantize_supported(scheme, *s))
    if bad:
        return f"needs projections with {shape_rule(scheme)}; this model has {bad[0][0]} x {bad[0][1]}"
    if not quantize_supported("int8", args.vocab_size, args.hidden_size):  # the int8 embedding table
        return (f"holds the embeddings in int8, which needs a hidden size divisible by {INT8_GROUP}; this "
                f"model's is {args.hidden_size}")
    return None


def auto_dtype(device: torch.device, quantized: bool) -> torch.dtype:
    """dtype='auto': bf16 on a GPU; on a CPU fp32, or bf16 with quantized weights (their kernels take
    bf16 activations; half the activation and KV bytes). Also on a CPU without native bf16 (AVX2):
    measured there, interleaved in one process, int4 decode at 512 / 4K 41.1 / 57.4 ms in bf16
    against 42.9 / 64.3 in fp32 (the products that would be slow in bf16 run in fp32 anyway,
    offload.attention.product_dtype)."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if quantized else torch.float32


def resolve_device(device: str | torch.device, planning: bool = False, gpu_memory=None) -> torch.device:
    """"auto" takes CUDA when a GPU is usable, else the CPU. Checked at run time, never at import."""
    usable = torch.cuda.is_available()
    if str(device) == "auto":
        if planning and gpu_memory is not None and not usable:
            raise OffloadError("gpu_memory is a GPU budget but no GPU is usable here: pass --device cuda to plan for "
                               "a GPU machine, or drop --gpu-memory")
        return torch.device("cuda" if usable else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise OffloadError(f"unknown device {device!r}: use auto, cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise OffloadError(f"unsupported device {device!r}: use auto, cpu or cuda")
    if dev.type == "cuda" and not usable and not planning:
        raise OffloadError(f"device '{device}' was requested but no CUDA GPU is usable here: use device='cpu' or 'auto'")
    return dev


def _free_gpu(device: torch.device) -> int:
    if not torch.cuda.is_available():
        raise OffloadError("gpu_memory='auto' measures the GPU's free memory, and no GPU is usable here: give a size "
                           "such as 24GiB")
    return free_device_memory(device)


def _check_fits(args: ModelArgs, source: Path, device: torch.device, dtype_name: str, placement: Placement) -> None:
    """Without budgets everything loads onto the device: say what to pass when it cannot fit,
    before the allocator fails mid-load."""
    need = placement.tier_bytes()["device"] - placement.kv_tiers.get("device", 0) - \
        sum(placement.index_tiers.values())  # weights + reserve; the KV grows with the prompt
    free = free_device_memory(device) if device.type == "cuda" else free_host_memory()
    if need <= free:
        return
    smaller = "" if DTYPE_BYTES[dtype_name] == 2 else f", or dtype='bfloat16' ({format_size(need // 2)})"
    memory = "gpu_memory" if device.type == "cuda" else "cpu_memory"
    raise OffloadError(f"{source.name} needs {format_size(need)} for its weights in {dtype_name} but only "
                       f"{format_size(free)} of {device.type} memory is free: pass {memory}=... with disk_dir=... to "
                       f"stream layers from disk{smaller}")
