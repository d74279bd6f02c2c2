"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch

from .errors import InvalidRequestError, NumericalError

# The seeds torch.Generator.manual_seed takes (it wraps negative ones); outside, it overflows.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


def _is_int(value: Any) -> bool:
    """An integer (Python or numpy), but not a bool: True as a token count is surely a mistake."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _stop_strings(stop: Any) -> tuple[str, ...]:
    """None -> (), one string -> (string,), an iterable of non-empty strings -> a tuple of them."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, (bytes, bytearray)) or not hasattr(stop, "__iter__"):
        raise InvalidRequestError(f"stop must be a string or a list of strings, got {type(stop).__name__}: "
                                  f"e.g. stop=['\\n\\n']")
    stops = tuple(stop)
    for s in stops:
        if not isinstance(s, str):
            raise InvalidRequestError(f"stop strings must be str, got {s!r} ({type(s).__name__}): "
                                      f"e.g. stop=['\\n\\n']")
        if not s:
            raise InvalidRequestError("stop strings must be non-empty")
    return stops


def nan_logits_error(row: int, step: int | None = None) -> NumericalError:
    where = f"at step {step} " if step is not None else ""
    return NumericalError(f"the model produced NaN/inf logits {where}(prompt row {row}): the weights are likely "
                          f"corrupt or the dtype overflows (try dtype='float32')")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature=0`` is greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None
    stop: tuple[str, ...] = ()  # also accepts None, one string, or any iterable of strings
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Every field is checked here, so a bad value is one line now, not a torch error mid-generation.
        fix = object.__setattr__  # frozen: normalise in place (numpy scalars -> Python numbers)
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise InvalidRequestError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        fix(self, "max_new_tokens", int(self.max_new_tokens))
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be a finite number >= 0 (0: greedy), "
                                      f"got {self.temperature!r}")
        fix(self, "temperature", float(self.temperature))
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be a non-negative integer (0: no top-k cut), got {self.top_k!r}")
        fix(self, "top_k", int(self.top_k))
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:  # NaN fails the comparison too
            raise InvalidRequestError(f"top_p must be a number in (0, 1] (1: no nucleus cut), got {self.top_p!r}")
        fix(self, "top_p", float(self.top_p))
        if self.seed is not None:
            if not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX:
                raise InvalidRequestError(f"seed must be None or an integer in [-2**63, 2**64), got {self.seed!r}")
            fix(self, "seed", int(self.seed))
        fix(self, "stop", _stop_strings(self.stop))
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    @classmethod
    def coerce(cls, obj: Any) -> "SamplingParams":
        """``obj`` itself when it is a SamplingParams; anything else (a dict, kwargs, a number) is a
        one-line error that shows how to build one."""
        if isinstance(obj, cls):
            return obj
        raise InvalidRequestError(f"sampling_params must be a SamplingParams (or a list of them, one per prompt), "
                                  f"got {type(obj).__name__}: use SamplingParams(max_new_tokens=...)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """Picks the next token of every row; each sampled row has its own seeded generator."""

    def __init__(self, params: list[SamplingParams], device: torch.device):
        self.params = params
        self.sampled = False
        self.generators: list[torch.Generator | None] = []
        for p in params:
            if p.greedy:
                self.generators.append(None)
                continue
            g = torch.Generator(device=device)
            g.manual_seed(p.seed) if p.seed is not None else g.seed()
            self.generators.append(g)
            self.sampled = True

    def __call__(self, logits: torch.Tensor) -> list[int]:
        """logits [B, V] fp32 -> one token id per row; NaN/inf logits raise :class:`NumericalError`."""
        tokens, finite = self.pick(logits)
        bad = [b for b, ok in enumerate(finite) if not ok]
        if bad:
            raise nan_logits_error(bad[0])
        return tokens

    def pick(self, logits: torch.Tensor) -> tuple[list[int], list[bool]]:
        """logits [B, V] fp32 -> (one token id per row, whether each row's logits were all finite).

        Both come back in one device-to-host read: the finiteness check costs one reduction and no
        extra synchronisation. A row that is not finite gets a meaningless token; the caller decides
        whether that row matters (a finished row's token is ignored) and raises if it does."""
        # A row's sum is NaN or inf when any of its logits is (or past ~1e33 each, which is garbage as
        # surely): one reduction, 6x cheaper than isfinite(...).all() on a CPU (63 -> 10 us at 49K).
        finite = logits.sum(dim=-1).isfinite()  # [B] bool
        if self.sampled:
            # NaN/inf would make multinomial fail inside torch (a device assert on CUDA); zeroed rows
            # sample uniformly instead, and the caller sees the flag.
            logits = torch.where(finite[:, None], logits, 0.0)  # [B, V]
        # the first maximal index, as argmax gives it (max's indices: 68 -> 24 us for 49K on a CPU)
        picked = logits.max(dim=-1).indices  # [B]
        for b, (p, g) in enumerate(zip(self.params, self.generators)):
            if g is not None:
                picked[b] = self._sample(logits[b], p, g)
        flat = torch.cat([picked, finite.to(picked.dtype)]).tolist()  # [2B]: tokens, then flags; one sync
        n = len(self.params)
        return flat[:n], [bool(f) for f in flat[n:]]

    @staticmethod
    def _sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        # Shifted so the top logit is 0 first: a tiny temperature then sends the rest to -inf rather
        # than overflowing the top one to inf (softmax is shift-invariant, so nothing else changes).
        scaled = (logits - logits.max()) / p.temperature  # [V]
        if p.top_k:
            kth = torch.topk(scaled, min(p.top_k, scaled.numel())).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(scaled, descending=True)  # [V]
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)  # [V]
            # Drop a token once the mass before it already reaches top_p (the first always stays).
            drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p.top_p
            scaled = scaled.scatter(0, order[drop], float("-inf"))
        probs = torch.softmax(scaled, dim=-1)  # [V]
        return torch.multinomial(probs, 1, generator=generator)[0]
