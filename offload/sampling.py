"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature=0`` is greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise InvalidRequestError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """Picks the next token of every row; each sampled row has its own seeded generator."""

    def __init__(self, params: list[SamplingParams], device: torch.device):
        self.params = params
        self.generators: list[torch.Generator | None] = []
        for p in params:
            if p.greedy:
                self.generators.append(None)
                continue
            g = torch.Generator(device=device)
            g.manual_seed(p.seed) if p.seed is not None else g.seed()
            self.generators.append(g)

    def __call__(self, logits: torch.Tensor) -> list[int]:
        """logits [B, V] fp32 -> one token id per row."""
        picked = logits.argmax(dim=-1)  # [B]
        for b, (p, g) in enumerate(zip(self.params, self.generators)):
            if g is not None:
                picked[b] = self._sample(logits[b], p, g)
        return picked.tolist()

    @staticmethod
    def _sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        scaled = logits / p.temperature  # [V]
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
