"""The KV selection interface shared by every policy, and the selection budget.

An index serves one layer of one sequence, for all KV heads of that layer. It is built once the
prompt is in the cache, extended as decode appends tokens, and asked each step for the token ids
each KV head should attend besides the always-dense part (``sink`` first and ``window`` last
tokens). Selected ids lie in the candidate range [sink, n - window), so nothing is counted twice;
the kernel (``offload.kernels.gather_attention``) merges dense part and selection exactly.

Grouped-query attention: one selection per KV head, serving its G query heads (the kernel then
reads each selected K/V row once for the whole group). Policies score a key for the group by the
group's combined attention to it (the exact twin sums the G heads' true softmax probabilities,
which maximises the attention mass the selection captures); see docs in each policy.

Shapes: H query heads, Hkv KV heads, G = H / Hkv, N cache capacity, n tokens cached, D head_dim.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from offload.errors import OffloadError


@dataclass(frozen=True)
class SelectionConfig:
    """How many tokens a step attends: ``budget`` (a fraction of the context if < 1, else a token
    count) selected by the index, plus ``sink`` first and ``window`` most recent tokens, always."""

    budget: float = 0.02
    sink: int = 4
    window: int = 64
    dense_layers: int = 2  # the first layers attend broadly; they stay dense
    effort: float | None = None  # search width of graph indexes (ef = effort x budget); None: their default

    def __post_init__(self) -> None:
        if not self.budget > 0:
            raise OffloadError(f"kv_budget must be positive (a fraction < 1 or a token count), got {self.budget}")
        if self.effort is not None and not self.effort >= 1:
            raise OffloadError(f"search effort must be >= 1 (beam width = effort x budget), got {self.effort}")
        if self.sink < 0 or self.window < 0 or self.dense_layers < 0:
            raise OffloadError("sink, window and dense_layers must be >= 0")

    def budget_tokens(self, context: int) -> int:
        return int(math.ceil(self.budget * context)) if self.budget < 1 else int(self.budget)

    def candidate_range(self, n: int) -> tuple[int, int]:
        """Token ids [lo, hi) an index may select from, for a sequence of n tokens."""
        lo = min(self.sink, n)
        return lo, max(lo, n - self.window)


@dataclass
class Selection:
    ids: torch.Tensor  # [Hkv, S] int32, valid in the first counts[h] entries
    counts: torch.Tensor  # [Hkv] int32


class KVIndex(ABC):
    """One layer's selection policy for one sequence. Subclasses set ``name``."""

    name = "base"
    uses_prefill_queries = False  # query-aware indexes ask the backend to keep prefill queries

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, config: SelectionConfig):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.scale, self.config = scale, config
        self.keys: torch.Tensor | None = None  # [Hkv, N, D] view of the layer's cache row
        self.n = 0
        self.rope: tuple[torch.Tensor, float] | None = None  # (inv_freq [D/2], scaling), set by the backend
        # Where a build's bulk arithmetic runs (the backend sets its compute device: the GPU, when
        # the KV and the search live on the host); None: where the keys are.
        self.build_device: torch.device | None = None

    def build(self, keys: torch.Tensor, n: int, queries: torch.Tensor | None = None) -> None:
        """keys [Hkv, N, D]: the cache storage (post-RoPE), of which the first n are the prompt."""
        self.keys, self.n = keys, n

    def extend(self, n: int) -> None:
        """The cache now holds n tokens (decode appended n - self.n)."""
        self.n = n

    @abstractmethod
    def search(self, q: torch.Tensor, budget: int) -> Selection:
        """q [H, D] (post-RoPE) -> up to ``budget`` token ids per KV head in the candidate range."""

    def nbytes(self) -> int:
        """Memory the index keeps beyond the KV cache."""
        return 0

    # A policy with its own attention (ShadowKV rebuilds keys) defines
    # attend(q [H, D], keys, values [Hkv, N, D], n, selection, backend) -> (out [H, D], lse [H]);
    # otherwise the backend attends over the selection with exact gather attention.
    attend = None

    # ---------------------------------------------------------------- persistence
    # What an index learned is its instance attributes besides what the backend wires in.
    _NOT_STATE = frozenset({"num_heads", "num_kv_heads", "head_dim", "group", "scale", "config", "keys", "rope",
                            "token_ids", "sentence_end_ids", "build_device"})  # set by the backend, not learned
    persistable = True  # an index holding foreign objects (hnswlib graphs) sets False

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(scalars, tensors) that :meth:`restore` takes back: numpy arrays travel as tensors."""
        if not self.persistable:
            raise OffloadError(f"the '{self.name}' index cannot be saved (it holds library objects); "
                               "use retrieval, shadowkv, sentence, quest or streaming for prompt caching")
        scalars, tensors = {}, {}
        for key, value in vars(self).items():
            if key in self._NOT_STATE:
                continue
            if isinstance(value, torch.Tensor):
                tensors[key] = value
            elif isinstance(value, np.ndarray):
                tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
                scalars[key] = "__numpy__"
            elif value is None or isinstance(value, (bool, int, float, str)):
                scalars[key] = value
            else:
                raise OffloadError(f"index '{self.name}' attribute '{key}' ({type(value).__name__}) cannot be saved")
        return scalars, tensors

    def restore(self, keys: torch.Tensor, scalars: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Take back a saved state over ``keys`` (the reloaded cache row)."""
        self.keys = keys
        for key, value in scalars.items():
            if value != "__numpy__":
                setattr(self, key, value)
        for key, t in tensors.items():
            setattr(self, key, t.numpy() if scalars.get(key) == "__numpy__" else t.to(keys.device))
        missing = {k for k in ("n",) if k not in scalars}
        if missing:
            raise OffloadError(f"saved '{self.name}' index state lacks {sorted(missing)}: the prompt cache is corrupt")

    # ---------------------------------------------------------------- helpers for subclasses
    def empty(self, device: torch.device) -> Selection:
        return Selection(torch.zeros(self.num_kv_heads, 1, dtype=torch.int32, device=device),
                         torch.zeros(self.num_kv_heads, dtype=torch.int32, device=device))

    def all_candidates(self, lo: int, hi: int, device: torch.device) -> Selection:
        """Every candidate id in [lo, hi) for every KV head: the selection of a budget that covers all."""
        if hi <= lo:
            return self.empty(device)
        ids = torch.arange(lo, hi, dtype=torch.int32, device=device).expand(self.num_kv_heads, -1).contiguous()
        return Selection(ids, torch.full((self.num_kv_heads,), hi - lo, dtype=torch.int32, device=device))

    def top_by_score(self, scores: torch.Tensor, lo: int, budget: int) -> Selection:
        """scores [Hkv, M] for candidates lo..lo+M-1 -> the ``budget`` best ids per head (sorted)."""
        m = scores.shape[-1]
        k = min(budget, m)
        if k <= 0:
            return self.empty(scores.device)
        top = torch.topk(scores, k, dim=-1).indices  # [Hkv, k]
        ids = (top.sort(dim=-1).values + lo).to(torch.int32)  # sorted ids read memory in order
        return Selection(ids, torch.full((self.num_kv_heads,), k, dtype=torch.int32, device=scores.device))


_REGISTRY: dict[str, type[KVIndex]] = {}


def register(cls: type[KVIndex]) -> type[KVIndex]:
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def policy_class(policy: str) -> type[KVIndex]:
    if policy not in _REGISTRY:
        raise OffloadError(f"unknown kv_policy '{policy}': choose one of {', '.join(policy_names())}")
    return _REGISTRY[policy]


def make_index(policy: str, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
               config: SelectionConfig) -> KVIndex:
    index = policy_class(policy)(num_heads, num_kv_heads, head_dim, scale, config)
    if config.effort is not None and hasattr(index, "effort"):
        index.effort = config.effort  # this index's own search width, the class default elsewhere
    return index
