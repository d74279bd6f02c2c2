"""The user-facing API: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch

from .attention import DenseAttention
from .engine import Engine, GenerationStats, RequestOutput
from .errors import InvalidRequestError, OffloadError
from .loaders import load_model
from .prompt_cache import CachedPrompt, load_prompt_cache, model_fingerprint, save_prompt_cache
from .sampling import SamplingParams

DEFAULT_KV_BUDGET = 0.02  # 2% of the context, plus sinks and the recent window
Prompt = Union[str, Sequence[int], Sequence[dict]]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" takes CUDA when a GPU is usable, else the CPU. Checked at run time, never at import."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OffloadError(f"device '{device}' was requested but no CUDA GPU is usable here: use device='cpu' "
                           f"or 'auto'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto": bf16 on a GPU; fp32 on the CPU, where it is exact and fast enough for small models."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise OffloadError(f"unknown dtype '{dtype}': use one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


MIN_FLASH_CALIBRATION = 128  # fewer calibration tokens than this: thresholds are a guess, say so


class LLM:
    """Loads a model (Hugging Face folder, GGUF file, or the default SmolLM2) and generates text.

    >>> llm = LLM()  # doctest: +SKIP
    >>> llm.generate(["The capital of France is"], SamplingParams(max_new_tokens=8))[0].text  # doctest: +SKIP
    """

    def __init__(self, model: str | Path | None = None, *, device: str | None = "auto", dtype: str | None = "auto",
                 prefill_chunk_size: int = 512, kv_policy: str = "dense", kv_budget: float | None = None,
                 sink: int = 4, window: int = 64, dense_layers: int = 2, telemetry: bool = False,
                 max_context: int | None = None, gpu_memory: str | int | None = None,
                 cpu_memory: str | int | None = None, disk_dir: str | Path | None = None,
                 profile: str | Path | None = None, io_backend: str = "auto", flash=None,
                 flash_calibration: str | Sequence[int] | None = None, rope_scaling: dict | None = None,
                 load_format: str = "auto", seed: int = 0, search_effort: float | None = None,
                 kv_offload: bool | None = None, verbose: bool = True, progress: bool = False):
        from .tiers.planner import Tuning

        tuning = Tuning.load(profile)  # what `offload tune` chose on this machine, where not given here
        kv_budget = kv_budget if kv_budget is not None else tuning.kv_budget or DEFAULT_KV_BUDGET
        search_effort = search_effort if search_effort is not None else tuning.search_effort
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self._peaks: dict[str, int | None] = {"host": 0, "device": None}
        self.placement = self.streamer = None
        self.load_format, self.dummy_seed = load_format, (seed if load_format == "dummy" else None)
        self.kv_policy_reason = None
        if kv_policy == "auto":
            kv_policy, self.kv_policy_reason = self._choose_policy(model, load_format, max_context, gpu_memory,
                                                                   cpu_memory)
        if flash is not None:  # bad flash settings fail before the model is read
            cpu_memory = self._check_flash(model, load_format, flash, disk_dir, flash_calibration, cpu_memory,
                                           max_context)
        if (gpu_memory is not None or cpu_memory is not None or disk_dir is not None) and (
                flash is None or cpu_memory is not None):
            # with flash, a budget below the weights loads as edge mode first (layers streamed from
            # disk, never the whole model in memory); enabling flash then makes every layer resident
            # but for its FFN bundles
            from .tiers.runtime import load_offloaded

            loaded = load_offloaded(model, self.device, self.dtype, context=max_context, kv_policy=kv_policy,
                                    kv_budget=kv_budget, sink=sink, window=window, gpu_memory=gpu_memory,
                                    cpu_memory=cpu_memory, disk_dir=disk_dir, profile=profile,
                                    io_backend=io_backend, progress=progress, verbose=verbose,
                                    load_format=load_format, seed=seed, dense_layers=dense_layers)
            self.model, self.tokenizer, self.path = loaded.model, loaded.tokenizer, loaded.path
            self.placement, self.streamer = loaded.placement, loaded.streamer
        else:
            self.model, self.tokenizer, self.path = load_model(model, self.device, self.dtype, progress=progress,
                                                               load_format=load_format, seed=seed)
        if rope_scaling is not None:
            self._extend_context(rope_scaling, max_context)
        self.args = self.model.args
        self.kv_policy = kv_policy
        if kv_policy == "dense" and not telemetry:
            if kv_offload:
                raise OffloadError("kv_offload keeps the KV in host memory and fetches a selection of it per step: "
                                   "it needs a sparse kv_policy (e.g. retrieval), not dense")
            self.backend = DenseAttention(self.args, self.device, self.dtype)
        else:
            from .indexes import SelectionConfig
            from .indexes.backend import SparseAttention

            config = SelectionConfig(budget=kv_budget, sink=sink, window=window, dense_layers=dense_layers,
                                     effort=search_effort)
            from .indexes.base import policy_class

            ends = self.tokenizer.sentence_end_ids() if getattr(policy_class(kv_policy), "uses_token_ids", False) \
                else frozenset()
            if kv_offload is None:  # the placement puts the full KV on the host (a GPU with a sparse policy)
                kv_offload = self.placement is not None and self.placement.kv_tiers.get("host", 0) > 0
            self.backend = SparseAttention(self.args, self.device, self.dtype, kv_policy, config, telemetry,
                                           sentence_end_ids=ends, kv_offload=kv_offload)
        if max_context is not None:
            if max_context <= 0:
                raise OffloadError(f"max_context must be positive, got {max_context}")
            if max_context > self.args.max_position_embeddings:
                print(f"offload: max_context {max_context} is beyond the {self.args.max_position_embeddings} positions "
                      "this model was trained for: fine for measuring speed and index behaviour, but expect "
                      "output quality to degrade", file=sys.stderr)
        self.engine = Engine(self.model, self.tokenizer, self.backend, prefill_chunk_size, max_context)
        self.flash_info = None
        if flash is not None:  # FFN up/down projections on flash ("LLM in a flash"): offload.tiers.flash
            self._enable_flash(flash, disk_dir, flash_calibration, cpu_memory, max_context)  # cpu_memory: bytes
        if verbose:
            print(self.describe(), file=sys.stderr)

    def describe(self) -> str:
        """One line: model, device, dtype, where the weights live and the KV policy (and why)."""
        a = self.args
        weights = "dummy weights (seed %d)" % self.dummy_seed if self.dummy_seed is not None else "weights"
        if self.placement is not None:
            tiers = self.placement.layer_tiers
            where = ", ".join(f"{tiers.count(t)} on {t}" for t in ("device", "host", "disk") if t in tiers)
            weights += f": layers {where}"
        else:
            weights += f": all {a.num_layers} layers on {self.device.type}"
        if self.flash_info is not None:
            f = self.flash_info
            weights += (f", FFN up/down on flash (sparsity {f['sparsity']:g}, {f['cache_fraction']:.0%} of the "
                        f"bundles cached, reads via {f['reader_mode']})")
        attention = self.backend.describe() if hasattr(self.backend, "describe") else "kv_policy dense (exact)"
        if self.kv_policy_reason:
            attention += f" [auto: {self.kv_policy_reason}]"
        return (f"offload: {self.path.name} ({a.architecture}, {a.param_count() / 1e6:.0f}M params, "
                f"{a.num_layers} layers, {a.num_heads}/{a.num_kv_heads} heads) on {self.device.type}, "
                f"{str(self.dtype).removeprefix('torch.')}; {weights}; {attention}")

    def _choose_policy(self, model, load_format: str, max_context: int | None, gpu_memory, cpu_memory
                       ) -> tuple[str, str]:
        """kv_policy="auto": dense when the model and its KV at the target context fit on the device."""
        from .loaders import read_model_args
        from .tiers.budget import free_device_memory, free_host_memory, resolve_budget
        from .tiers.planner import choose_kv_policy

        args, _ = read_model_args(model, load_format)
        context = max_context or args.max_position_embeddings
        if self.device.type == "cuda":
            budget = resolve_budget(gpu_memory if gpu_memory is not None else "auto", "gpu_memory",
                                    lambda: free_device_memory(self.device))
        else:
            budget = resolve_budget(cpu_memory if cpu_memory is not None else "auto", "cpu_memory", free_host_memory)
        return choose_kv_policy(args, context, str(self.dtype).removeprefix("torch."), budget)

    def _extend_context(self, rope_scaling: dict, max_context: int | None) -> None:
        """Replace the model's RoPE scaling (context extension, e.g. {"type": "yarn", "factor": 4,
        "original_max_position_embeddings": 8192}), before any attention backend is built."""
        from .config import RopeScaling
        from .rope import RotaryEmbedding

        args = self.model.args
        scaling = RopeScaling.from_hf(rope_scaling)
        longest = max(args.max_position_embeddings, max_context or 0)
        self.model.args = args.replace(rope_scaling=scaling, max_position_embeddings=longest)
        self.model.rope = RotaryEmbedding(self.model.args, self.device)

    def _check_flash(self, model, load_format: str, config, disk_dir, calibration, cpu_memory,
                     max_context: int | None) -> int | None:
        """Flash settings checked before anything is loaded: a CPU device, a disk directory, a
        calibration text, and a budget that fits (size_cache names the smallest that works).
        Returns the budget in bytes (resolved once), or None."""
        from .loaders import read_model_args
        from .tiers.budget import free_host_memory, resolve_budget
        from .tiers.flash import size_cache

        if self.device.type != "cpu":
            raise OffloadError("flash FFN windowing is the CPU-only (edge) mode; on a GPU, stream whole layers "
                               "(gpu_memory=..., cpu_memory=..., disk_dir=...) instead, or pass device='cpu'")
        if disk_dir is None:
            raise OffloadError("flash FFN windowing keeps up/down projections on disk: give disk_dir=...")
        if calibration is None:
            raise OffloadError("flash FFN windowing calibrates its activation thresholds on real text: give "
                               "flash_calibration='...' (a few hundred tokens of text like your prompts)")
        if cpu_memory is None:
            return None
        budget = resolve_budget(cpu_memory, "cpu_memory", free_host_memory)
        args, _ = read_model_args(model, load_format)
        size_cache(args, self.dtype, budget, max_context or args.max_position_embeddings, config)
        return budget

    def _enable_flash(self, config, disk_dir, calibration, budget: int | None, max_context) -> None:
        """Up/down projections to flash bundles; under ``budget`` (bytes) the bundle cache takes what
        the rest of the resident model leaves (offload.tiers.flash.size_cache)."""
        from .tiers.flash import enable_flash

        ids = self.tokenizer.encode(calibration) if isinstance(calibration, str) else list(calibration)
        if len(ids) < MIN_FLASH_CALIBRATION:
            print(f"offload: flash thresholds calibrated on only {len(ids)} tokens: the sparsity they give on other "
                  f"text is uncertain; calibrate on a few hundred tokens like your prompts (flash_calibration=..., "
                  f"--flash-calibration FILE)", file=sys.stderr)
        self.flash_info = enable_flash(self, disk_dir, config, ids[:config.calibration_tokens], cpu_budget=budget,
                                       context=max_context)

    def close(self) -> None:
        """Stop the prefetch thread and close the weight store (streamed layers only)."""
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None

    @contextlib.contextmanager
    def _measure_peaks(self):
        """Sample the process's private resident memory while generating (psutil//proc, every 20 ms);
        the GPU's peak comes from the driver's allocator statistics."""
        from .tiers.budget import MemorySampler

        with MemorySampler(interval=0.02) as sampler:
            yield
        self._peaks["host"] = max(self._peaks["host"], sampler.peak)
        if self.device.type == "cuda":
            self._peaks["device"] = max(self._peaks["device"] or 0, torch.cuda.max_memory_allocated(self.device))

    def tier_report(self) -> dict:
        """What each tier holds as placed, the peaks measured while generating (``peak``: host =
        the process's private resident bytes, device = the GPU allocator's peak, None on a CPU), and
        the disk bytes read per forward pass so far."""
        report = self._tier_report()
        report["peak"] = dict(self._peaks)
        if self.flash_info is not None:  # FFN bundles on flash: what a decode step reads, what stays resident
            from .tiers.flash import flash_stats

            report["flash"] = {**flash_stats(self), "cache_fraction": self.flash_info["cache_fraction"],
                               "accounted_resident_bytes": self.flash_info["resident_bytes"]}
        return report

    def _tier_report(self) -> dict:
        if self.placement is None:
            return {"placement": None}
        st = self.streamer
        read = st.bytes_read if st is not None else 0
        passes = st.passes if st is not None else 0
        return {"placement": self.placement.tier_bytes(), "disk_bytes_read": read, "forward_passes": passes,
                # each forward pass (a decode step or a prefill chunk) streams every off-device layer once
                "disk_bytes_per_pass": read / passes if passes else None,
                "disk_mode": st.store.mode if st is not None and st.store is not None else None,
                "layer_loads": st.loads if st is not None else 0}

    @property
    def fingerprint(self) -> str:
        """Identifies these weights (for prompt caches and weight stores)."""
        return model_fingerprint(self.args, self.path, self.dummy_seed)

    @property
    def telemetry(self):
        """Recall, attention mass and output error per layer (``telemetry=True``), else None."""
        return getattr(self.backend, "telemetry", None)

    @property
    def stats(self) -> GenerationStats:
        """Timing of the last generate/stream call."""
        return self.engine.stats

    def encode_prompt(self, prompt: Prompt, chat: bool = False) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if chat:
                text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
                return self.tokenizer.encode(text, add_special_tokens=False), prompt
            return self.tokenizer.encode(prompt), prompt
        items = list(prompt)
        if items and all(isinstance(m, dict) for m in items):
            text = self.tokenizer.apply_chat_template(items)
            return self.tokenizer.encode(text, add_special_tokens=False), None
        if all(isinstance(t, int) for t in items):
            return items, None
        raise InvalidRequestError("a prompt must be a string, a list of token ids, or a list of chat messages")

    def _prepare(self, prompts, sampling_params, chat):
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]
        if not prompts:
            raise InvalidRequestError("no prompts given")
        encoded = [self.encode_prompt(p, chat) for p in prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        return [e[0] for e in encoded], params, [e[1] for e in encoded]

    # ------------------------------------------------------------------ prompt caching
    def _cache_settings(self) -> dict:
        config = getattr(self.backend, "config", None)
        return {"kv_policy": self.kv_policy, "selection": None if config is None else asdict(config)}

    @torch.inference_mode()
    def save_prompt(self, prompt: Prompt, path: str | Path, *, chat: bool = False) -> Path:
        """Prefill ``prompt``, build its KV indexes and save both to ``path`` (one verified store
        file, written atomically). ``generate(..., prompt_cache=path)`` then skips that work for any
        prompt that starts with this one."""
        (ids,), _, _ = self._prepare(prompt, None, chat)
        self.engine.check_prompt(ids)
        self.backend.allocate(1, len(ids))
        logits = self.engine.prefill(0, ids)  # [V]
        states = {}
        if hasattr(self.backend, "build_indexes"):
            self.backend.build_indexes(0, len(ids))
            states = self.backend.index_states(0)
        k, v = self.backend.cache.prefix(0, len(ids))  # [L, Hkv, n, D] each
        return save_prompt_cache(path, fingerprint=self.fingerprint, dtype=self.dtype,
                                 policy=self.kv_policy, settings=self._cache_settings(), token_ids=ids,
                                 k=k, v=v, logits=logits,
                                 index_states=states)

    def _load_prompt_cache(self, path: str | Path | None, num_prompts: int) -> dict[int, CachedPrompt] | None:
        if path is None:
            return None
        if num_prompts != 1:
            raise InvalidRequestError("prompt_cache serves one prompt at a time; call generate once per prompt")
        return {0: load_prompt_cache(path, fingerprint=self.fingerprint, dtype=self.dtype,
                                     policy=self.kv_policy, settings=self._cache_settings(), device=self.device)}

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None
                 = None, *, chat: bool = False, prompt_cache: str | Path | None = None) -> list[RequestOutput]:
        """Generate for one prompt or a batch of prompts of any lengths. Returns one output per prompt.

        ``prompt_cache``: a file from :meth:`save_prompt` whose prompt starts this one's."""
        ids, params, texts = self._prepare(prompts, sampling_params, chat)
        outputs: list[RequestOutput] = []
        with self._measure_peaks():
            for step in self.engine.run(ids, params, texts, self._load_prompt_cache(prompt_cache, len(ids))):
                if not outputs:  # the first step carries every row, in prompt order
                    outputs = [out for out, _ in step]
        return outputs

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None, *,
               chat: bool = False, prompt_cache: str | Path | None = None) -> Iterator[str]:
        """Yield the text of one prompt's continuation piece by piece as tokens are produced."""
        ids, params, texts = self._prepare(prompt, sampling_params, chat)
        if len(ids) != 1:
            raise InvalidRequestError("stream() takes one prompt; use generate() for a batch")
        with self._measure_peaks():
            for step in self.engine.run(ids, params, texts, self._load_prompt_cache(prompt_cache, 1)):
                for _, delta in step:
                    if delta:
                        yield delta

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits [T, V] (fp32) for every position of one token sequence, through chunked prefill."""
        ids = list(token_ids)
        self.engine.check_prompt(ids)
        self.backend.allocate(1, len(ids))
        return self.engine.prefill(0, ids, all_logits=True)
