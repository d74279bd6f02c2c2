"""The generation loop: chunked prefill of each prompt, then batched decode until every row stops.

There is one loop. ``LLM.generate`` drains it, ``LLM.stream`` forwards its text deltas.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Iterator

import torch

from .attention import AttentionBackend, ForwardBatch
from .errors import InvalidRequestError
from .model import Transformer
from .prompt_cache import CachedPrompt
from .sampling import Sampler, SamplingParams, nan_logits_error
from .tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class RequestOutput:
    """The result of one prompt."""

    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GenerationStats:
    rows: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second of decode; each row's first token comes from prefill and is not counted."""
        decoded = self.generated_tokens - self.rows
        return decoded / self.decode_seconds if self.decode_seconds else 0.0


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, backend: AttentionBackend,
                 prefill_chunk_size: int = 512, max_context: int | None = None, layer_major_tokens: int | None = None):
        """``layer_major_tokens``: a prompt goes through the model a layer at a time, this many tokens
        (whole chunks, at least one) at a time (Transformer.prefill_layer_major): where layers stream
        from another tier or the KV lives on disk, each is then read once per group of chunks, not
        once per chunk, and the hidden states held stay bounded. None: chunk by chunk."""
        if prefill_chunk_size <= 0:
            raise InvalidRequestError(f"prefill_chunk_size must be positive, got {prefill_chunk_size}")
        self.model, self.tokenizer, self.backend = model, tokenizer, backend
        self.prefill_chunk_size = prefill_chunk_size
        self.layer_major_tokens = layer_major_tokens
        self._max_context = max_context
        self.stats = GenerationStats()

    @property
    def max_context(self) -> int:
        return self._max_context or self.model.args.max_position_embeddings

    def check_prompt(self, ids: list[int]) -> None:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise InvalidRequestError(f"a prompt given to the engine must be a list of token ids, got "
                                      f"{type(ids).__name__}: encode text with the tokenizer first")
        if not ids:
            raise InvalidRequestError("the prompt is empty: give at least one token of text")
        if len(ids) >= self.max_context:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but the model supports at most {self.max_context} "
                f"(max_position_embeddings; max_context overrides it), including generated tokens: shorten the prompt")
        vocab = self.model.args.vocab_size
        # Python's own ints are the common case; the rest (numpy ints, floats, None, bools) are looked at one by one.
        if not all(type(t) is int and 0 <= t < vocab for t in ids):
            for pos, t in enumerate(ids):
                _check_token_id(pos, t, vocab)

    def prefill(self, row: int, ids: list[int], all_logits: bool = False, begin: int = 0) -> torch.Tensor:
        """Run the prompt through the model in chunks, filling cache row ``row`` (from token ``begin``:
        the tokens before it are already cached).

        Returns logits [V] of the last position, or [T, V] for every position with ``all_logits``.
        """
        device = self.model.device
        chunks = []  # (tokens [1, T], batch)
        for start in range(begin, len(ids), self.prefill_chunk_size):
            piece = ids[start:start + self.prefill_chunk_size]
            chunks.append((torch.tensor([piece], device=device), ForwardBatch.prefill(row, start, len(piece), device,
                                                                                      piece)))
        if self.layer_major_tokens is not None and len(chunks) > 1:
            per_group = max(1, self.layer_major_tokens // self.prefill_chunk_size)  # chunks
            logits = []  # [1, T or 1, V] each
            for g in range(0, len(chunks), per_group):
                logits += self.model.prefill_layer_major(chunks[g:g + per_group], self.backend, all_logits=all_logits,
                                                         last=g + per_group >= len(chunks))
        else:
            logits = [self.model(tokens, batch, self.backend, all_logits=all_logits) for tokens, batch in chunks]
        return torch.cat([x[0] for x in logits]) if all_logits else logits[-1][0, -1]

    def run(self, prompts: list[list[int]], params: list[SamplingParams],
            texts: list[str | None] | None = None,
            cached: dict[int, CachedPrompt] | None = None) -> Iterator[list[tuple[RequestOutput, str]]]:
        """Generate for every prompt; yields, after each step, (output, new text) for rows that grew.

        ``cached`` maps a row to a saved prefix of its prompt (a prompt cache): its KV and indexes
        are restored and only the tokens after it are prefilled."""
        params = _check_params(prompts, params)
        for ids in prompts:
            self.check_prompt(ids)
        outputs = [RequestOutput(prompt=(texts or [None] * len(prompts))[i], prompt_token_ids=list(ids))
                   for i, ids in enumerate(prompts)]
        budgets = [min(p.max_new_tokens, self.max_context - len(ids)) for ids, p in zip(prompts, params)]
        capacity = max(len(ids) + n for ids, n in zip(prompts, budgets))
        self.backend.allocate(len(prompts), capacity)
        sampler = Sampler(params, self.model.device)
        detok = [IncrementalDetokenizer(self.tokenizer, ids) for ids in prompts]
        stats = self.stats = GenerationStats(rows=len(prompts), prompt_tokens=sum(len(p) for p in prompts))

        t0 = time.perf_counter()
        logits = torch.stack([self._prefill_row(row, ids, (cached or {}).get(row))
                              for row, ids in enumerate(prompts)])  # [B, V]
        next_tokens, finite = sampler.pick(logits)  # the .tolist() inside synchronises, so the timing is honest
        _check_finite(finite, outputs, step=0)
        stats.prefill_seconds = time.perf_counter() - t0
        lengths = [len(ids) for ids in prompts]

        t0 = time.perf_counter()
        while True:
            deltas = []
            for b, out in enumerate(outputs):
                if not out.finished:
                    delta = self.append_token(out, next_tokens[b], detok[b], params[b], budgets[b])
                    deltas.append((out, delta))
            stats.generated_tokens += len(deltas)
            yield deltas
            if all(out.finished for out in outputs):
                break
            # Finished rows keep decoding their last token (ignored) so the batch stays rectangular.
            tokens = torch.tensor([[t] for t in next_tokens], device=self.model.device)  # [B, 1]
            batch = ForwardBatch.decode(lengths, self.model.device, next_tokens)
            logits = self.model(tokens, batch, self.backend)[:, -1]  # [B, V]
            lengths = batch.end_lengths
            next_tokens, finite = sampler.pick(logits)
            stats.decode_steps += 1
            _check_finite(finite, outputs, step=stats.decode_steps)
        stats.decode_seconds = time.perf_counter() - t0

    def _prefill_row(self, row: int, ids: list[int], prefix: CachedPrompt | None) -> torch.Tensor:
        if prefix is None:
            return self.prefill(row, ids)
        n = len(prefix.token_ids)
        if ids[:n] != prefix.token_ids:
            raise InvalidRequestError("the prompt does not start with the cached prompt: use the prompt the cache "
                                      "was saved for (optionally followed by more text)")
        self.backend.restore_row(row, ids, prefix.kv.layers(), prefix.index_states)
        return self.prefill(row, ids, begin=n) if len(ids) > n else prefix.logits

    def append_token(self, out: RequestOutput, token: int, detok: IncrementalDetokenizer, p: SamplingParams,
                     budget: int) -> str:
        """Add a picked token to ``out`` (EOS, stop strings and the token budget end it); returns the
        new text, a stop string cut off."""
        if token in self.tokenizer.eos_token_ids and not p.ignore_eos:
            out.finish_reason = "stop"
            return ""
        out.token_ids.append(token)
        delta = detok.push(token)
        out.text += delta
        for stop in p.stop:
            cut = out.text.find(stop, max(0, len(out.text) - len(delta) - len(stop)))
            if cut >= 0:
                delta = delta[:max(0, len(delta) - (len(out.text) - cut))]
                out.text = out.text[:cut]
                out.finish_reason = "stop"
                return delta
        if len(out.token_ids) >= budget:
            out.finish_reason = "length"
        return delta


def _check_token_id(pos: int, t: Any, vocab: int) -> None:
    """One token id of a prompt: an integer (not a bool, which is surely a mistake) inside the vocabulary."""
    if isinstance(t, bool) or not isinstance(t, Integral):
        raise InvalidRequestError(f"the prompt's token at position {pos} is {t!r} ({type(t).__name__}), not an "
                                  f"integer token id: a prompt is a string or a list of ints")
    if not 0 <= t < vocab:
        raise InvalidRequestError(f"token id {t} at position {pos} is outside the vocabulary (0..{vocab - 1})")


def _check_params(prompts: list[list[int]], params: Sequence[SamplingParams]) -> list[SamplingParams]:
    """One SamplingParams per prompt (a dict or anything else is a one-line error, not an AttributeError)."""
    if isinstance(params, SamplingParams) or not isinstance(params, Sequence):
        params = [SamplingParams.coerce(params)] * len(prompts)
    if len(params) != len(prompts):
        raise InvalidRequestError(f"{len(params)} SamplingParams for {len(prompts)} prompts: "
                                  f"give one, or one per prompt")
    return [SamplingParams.coerce(p) for p in params]


def _check_finite(finite: list[bool], outputs: list[RequestOutput], step: int) -> None:
    """Stop at the first NaN/inf logits of a row still generating (step 0 is the prefill); a finished row
    keeps decoding only to keep the batch rectangular, so its logits do not matter."""
    for b, (ok, out) in enumerate(zip(finite, outputs)):
        if not ok and not out.finished:
            raise nan_logits_error(b, step)
