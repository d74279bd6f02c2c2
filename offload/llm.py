"""The user-facing API: ``LLM(model).generate(prompts, SamplingParams(...))``.

``LLM`` resolves one :class:`EngineConfig` (offload.engine_config), has the builder make the
runtime (offload.build), and keeps what a user calls: generate, stream, logits, prompt caches and
the reports. It decides nothing about placement or policies itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch

from .build import Runtime, build_runtime
from .engine import RequestOutput
from .engine_config import EngineConfig
from .errors import InvalidRequestError
from .prompt_cache import CachedPrompt, load_prompt_cache, save_prompt_cache
from .sampling import SamplingParams
from .tiers.budget import MemorySampler, rss_anon

Prompt = Union[str, Sequence[int], Sequence[dict]]
PEAK_SAMPLE_INTERVAL = 0.02  # seconds between samples of the process's memory while generating


class LLM:
    """Loads a model (Hugging Face folder, GGUF file, or the default SmolLM2) and generates text.

    Settings are :class:`EngineConfig` fields, given as ``config=`` and/or keywords
    (``LLM("model.gguf", kv_policy="auto", cpu_memory="8GiB")``).

    >>> llm = LLM()  # doctest: +SKIP
    >>> llm.generate(["The capital of France is"], SamplingParams(max_new_tokens=8))[0].text  # doctest: +SKIP
    """

    def __init__(self, model: str | Path | None = None, config: EngineConfig | None = None, **settings):
        if config is not None and not isinstance(config, EngineConfig):
            raise InvalidRequestError(f"config must be an EngineConfig, got {type(config).__name__}")
        if model is not None:
            settings["model"] = model
        self.config = (config or EngineConfig()).replace(**settings)
        # What the process held before the model: the interpreter, torch and the libraries. cpu_memory
        # budgets what the runtime loads above it (weights, KV, indexes, buffers); reported beside the peaks.
        baseline = rss_anon()
        self.runtime: Runtime = build_runtime(self.config.resolve())
        self._peaks: dict[str, int | None] = {"host": 0, "device": None, "host_before_load": baseline}
        if self.config.verbose:
            print(self.runtime.describe(), file=sys.stderr)

    # What the runtime holds, for users, benchmarks and tests.
    model = property(lambda self: self.runtime.model)
    tokenizer = property(lambda self: self.runtime.tokenizer)
    backend = property(lambda self: self.runtime.backend)
    engine = property(lambda self: self.runtime.engine)
    placement = property(lambda self: self.runtime.placement)
    streamer = property(lambda self: self.runtime.streamer)
    flash_info = property(lambda self: self.runtime.flash)
    path = property(lambda self: self.runtime.source)
    args = property(lambda self: self.runtime.model.args)
    device = property(lambda self: self.runtime.resolved.device)
    dtype = property(lambda self: self.runtime.resolved.dtype)
    kv_policy = property(lambda self: self.runtime.resolved.kv_policy)
    telemetry = property(lambda self: self.runtime.backend.telemetry)  # per-layer recall, mass, error (or None)
    stats = property(lambda self: self.runtime.engine.stats)  # timing of the last generate/stream
    fingerprint = property(lambda self: self.runtime.fingerprint)

    def describe(self) -> str:
        return self.runtime.describe()

    def close(self) -> None:
        self.runtime.close()

    def tier_report(self) -> dict:
        """What each tier holds as placed, the disk bytes read so far, and the peaks measured while
        generating (``peak``: host = the process's private resident bytes, host_before_load = what it
        held before the model was loaded, device = the GPU allocator's peak, None on a CPU)."""
        return {**self.runtime.tier_report(), "peak": dict(self._peaks)}

    @contextlib.contextmanager
    def _measure_peaks(self):
        with MemorySampler(interval=PEAK_SAMPLE_INTERVAL) as sampler:
            yield
        self._peaks["host"] = max(self._peaks["host"], sampler.peak)
        if self.device.type == "cuda":
            self._peaks["device"] = max(self._peaks["device"] or 0, torch.cuda.max_memory_allocated(self.device))

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, prompt: Prompt, chat: bool = False) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if chat:
                text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
                return self.tokenizer.encode(text, add_special_tokens=False), prompt
            return self.tokenizer.encode(prompt), prompt
        items = list(prompt) if isinstance(prompt, (list, tuple)) else None
        if items and all(isinstance(m, dict) for m in items):
            text = self.tokenizer.apply_chat_template(items)
            return self.tokenizer.encode(text, add_special_tokens=False), None
        if items is not None and not any(isinstance(t, (dict, str)) for t in items):
            return items, None  # token ids: Engine.check_prompt names a bad one by position
        raise InvalidRequestError(f"a prompt must be a string, a list of token ids, or a list of chat messages, "
                                  f"got {type(prompt).__name__} {str(prompt)[:40]!r}")

    def _prepare(self, prompts, sampling_params, chat):
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InvalidRequestError("no prompts given: pass a string, a list of token ids, chat messages, or a "
                                      "list of those")
        encoded = [self.encode_prompt(p, chat) for p in prompts]
        # one SamplingParams or one per prompt: Engine.run checks them (a dict is one clear line there)
        params = SamplingParams() if sampling_params is None else sampling_params
        return [e[0] for e in encoded], params, [e[1] for e in encoded]

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None
                 = None, *, chat: bool = False, prompt_cache: str | Path | None = None) -> list[RequestOutput]:
        """Generate for one prompt or a batch of prompts of any lengths. Returns one output per prompt.

        ``prompt_cache``: a file from :meth:`save_prompt` whose prompt starts this one's."""
        ids, params, texts = self._prepare(prompts, sampling_params, chat)
        outputs: list[RequestOutput] = []
        with self._measure_peaks():
            for step in self.engine.run(ids, params, texts, self.read_prompt_cache(prompt_cache, len(ids))):
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
            for step in self.engine.run(ids, params, texts, self.read_prompt_cache(prompt_cache, 1)):
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

    # ------------------------------------------------------------------ prompt caching
    @torch.inference_mode()
    def save_prompt(self, prompt: Prompt, path: str | Path, *, chat: bool = False) -> Path:
        """Prefill ``prompt``, build its KV indexes and save both to ``path`` (one verified store
        file, written atomically). ``generate(..., prompt_cache=path)`` then skips that work for any
        prompt that starts with this one."""
        path = Path(path)
        if not path.parent.is_dir():
            raise InvalidRequestError(f"cannot save the prompt cache to {path}: folder {path.parent} does not exist")
        (ids,), _, _ = self._prepare(prompt, None, chat)
        self.engine.check_prompt(ids)
        self.backend.allocate(1, len(ids))
        logits = self.engine.prefill(0, ids)  # [V]
        self.backend.build_indexes(0, len(ids))
        return save_prompt_cache(path, fingerprint=self.fingerprint, dtype=self.dtype, policy=self.kv_policy,
                                 settings=self.backend.settings(), token_ids=ids,
                                 layers=self.backend.prefix_layers(0, len(ids)), logits=logits,
                                 index_states=self.backend.index_states(0))

    def read_prompt_cache(self, path: str | Path | None, num_prompts: int = 1) -> dict[int, CachedPrompt] | None:
        """A file from :meth:`save_prompt`, checked against this model and its settings, as
        ``Engine.run``'s ``cached`` argument (row 0); None for no file."""
        if path is None:
            return None
        if num_prompts != 1:
            raise InvalidRequestError("prompt_cache serves one prompt at a time; call generate once per prompt")
        # Verified now, read a layer at a time as restore_row stores each into the tier its KV lives in
        # (a whole 128K KV is never in memory at once); only the logits go to the compute device.
        cached = load_prompt_cache(path, fingerprint=self.fingerprint, dtype=self.dtype, policy=self.kv_policy,
                                   settings=self.backend.settings(), device=torch.device("cpu"))
        return {0: dataclasses.replace(cached, logits=cached.logits.to(self.device))}
