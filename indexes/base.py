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
from typing import ClassVar

import numpy as np
import torch

from offload.config import DENSE_LAYERS, ModelArgs
from offload.errors import OffloadError
from offload.rope import rope_frequencies
from offload.tiers.kv_store import KVRows
from offload.tiers.planner import BandwidthProfile, SelectionCost

# Query-aware indexes learn from the prompt's queries; every QUERY_STRIDE-th position is kept
# (neighbouring queries are near-duplicates), which bounds the memory they take during prefill.
QUERY_STRIDE = 4
# What kv_policy="auto" picks when the KV does not fit on the device.
AUTO_SPARSE_POLICY = "retrieval"
# `offload tune` sweeps this policy's search width: a tuned effort is that policy's alone.
TUNED_EFFORT_POLICY = "retrieval"
# Adaptive budgets (kv_budget="p0.95"): the cap on a head's selection, a fraction of the context,
# and the floor (an estimate that puts its whole mass on a few keys is not trusted below this).
ADAPTIVE_CAP = 0.1
ADAPTIVE_FLOOR_TOKENS = 16


@dataclass(frozen=True)
class SelectionConfig:
    """How many tokens a step attends: ``budget`` (a fraction of the context if < 1, else a token
    count) selected by the index, plus ``sink`` first and ``window`` most recent tokens, always.

    ``mass`` makes the budget adaptive (Twilight's top-p): each KV head, each step, takes the
    index's best tokens until its estimate of the attention they get, as a share of what all
    candidates get, reaches ``mass``, never fewer than ADAPTIVE_FLOOR_TOKENS nor more than
    ``budget`` (the cap). Policies without a mass estimate (``KVIndex.adaptive`` False) select
    ``budget`` tokens.

    ``head_split`` splits retrieval heads from streaming heads (RazorAttention, DuoAttention): a KV
    head whose group puts at most this share of its attention beyond the sinks and the window, over
    the prompt's last queries, keeps only sinks + window for the sequence (no index search, no
    selection, no rows fetched); None: every head selects."""

    budget: float = 0.02
    sink: int = 4
    window: int = 64
    dense_layers: int = DENSE_LAYERS  # the first layers attend broadly; they stay dense
    effort: float | None = None  # search width (x budget): graph beams, cluster's rerank; None: their default
    mass: float | None = None  # adaptive: the share of the candidates' attention to select; budget caps it
    head_split: float | None = None  # streaming heads: at most this share of attention beyond sinks + window

    @classmethod
    def parse_budget(cls, value) -> tuple[float, float | None]:
        """A ``kv_budget`` as the user gives it -> (budget, mass): 0.02 (2% of the context), 512
        (tokens), or "p0.95" (adaptive, capped at ADAPTIVE_CAP of the context)."""
        if isinstance(value, str) and value.strip().lower().startswith("p"):
            try:
                mass = float(value.strip()[1:])
            except ValueError:
                mass = -1.0
            if not 0 < mass < 1:
                raise OffloadError(f"kv_budget {value!r}: an adaptive budget is 'p' and a share of the attention "
                                   f"in (0, 1), e.g. 'p0.95'")
            return ADAPTIVE_CAP, mass
        try:
            budget = float(value)
        except (TypeError, ValueError):
            budget = -1.0
        if isinstance(value, bool) or not budget > 0 or not (budget < 1 or budget.is_integer()):
            raise OffloadError(f"kv_budget must be a fraction of the context in (0, 1), a whole number of tokens "
                               f">= 1, or 'p' and a share of the attention (adaptive, e.g. 'p0.95'), got {value!r}")
        return budget, None

    def __post_init__(self) -> None:
        if not self.budget > 0:
            raise OffloadError(f"kv_budget must be positive (a fraction < 1 or a token count), got {self.budget}")
        if self.effort is not None and not self.effort >= 1:
            raise OffloadError(f"search effort must be >= 1 (beam width = effort x budget), got {self.effort}")
        if self.sink < 0 or self.window < 0 or self.dense_layers < 0:
            raise OffloadError("sink, window and dense_layers must be >= 0")
        if self.mass is not None and not 0 < self.mass < 1:
            raise OffloadError(f"an adaptive budget's mass must be in (0, 1), got {self.mass}")
        if self.head_split is not None and not 0 < self.head_split < 1:
            raise OffloadError(f"kv_head_split must be a share of attention in (0, 1) (e.g. 0.05: heads with at most 5% "
                               f"of their attention beyond sinks + window keep only those), got {self.head_split}")

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


@dataclass(frozen=True)
class IndexContext:
    """What every index of one model is built with: given at construction, never saved."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    rope: tuple[torch.Tensor, float]  # (inv_freq [D/2], attention scaling): pre-RoPE policies undo it
    build_device: torch.device  # where a build's bulk arithmetic runs (the GPU when one computes)
    sentence_end_ids: frozenset[int] = frozenset()  # token ids that end a sentence (SentenceKV)

    @classmethod
    def for_model(cls, args: ModelArgs, device: torch.device,
                  sentence_end_ids: frozenset[int] = frozenset()) -> "IndexContext":
        inv_freq, scaling = rope_frequencies(args)
        return cls(args.num_heads, args.num_kv_heads, args.head_dim, args.softmax_scale,
                   (inv_freq.to(device), scaling), torch.device(device), frozenset(sentence_end_ids))


class KVIndex(ABC):
    """One layer's selection policy for one sequence. Subclasses set ``name`` and declare what
    they need and learn in class attributes."""

    name: ClassVar[str] = "base"
    needs_prefill_queries: ClassVar[bool] = False  # the backend keeps the prompt's queries for build()
    needs_token_ids: ClassVar[bool] = False  # the index reads the row's token ids (given at construction)
    # The search walks the keys with numpy/numba on the CPU: on a GPU the backend keeps such a
    # policy's KV in host memory (kv_offload), where the search reads it.
    searches_on_host: ClassVar[bool] = False
    persistable: ClassVar[bool] = True  # an index holding foreign objects (hnswlib graphs) sets False
    adaptive: ClassVar[bool] = False  # search() honours config.mass (an estimate of each token's attention)
    learned: ClassVar[tuple[str, ...]] = ()  # attributes build() learns: what a prompt cache saves
    effort: ClassVar[float | None] = None  # graph beams (ef = effort x budget), cluster's tokens taken to rerank
    # How the KV's disk tier lays this policy's tokens out: "tokens" (in order: pages), "clusters"
    # (disk_order()), or None: its search reads keys all over the KV, which a disk tier cannot serve.
    disk_layout: ClassVar[str | None] = None

    def __init__(self, ctx: IndexContext, config: SelectionConfig, token_ids: list[int] | None = None,
                 heads: torch.Tensor | None = None):
        self.ctx, self.config = ctx, config
        self.num_heads, self.num_kv_heads, self.head_dim = ctx.num_heads, ctx.num_kv_heads, ctx.head_dim
        self.group = ctx.num_heads // ctx.num_kv_heads
        self.scale = ctx.scale
        self.token_ids = token_ids  # the row's tokens, grown by the backend as decode appends them
        if config.effort is not None and self.effort is not None:
            self.effort = config.effort  # this index's own search width, the class default elsewhere
        self.keys: KVRows | None = None  # [Hkv, N, D] the layer's cache row, read in place
        self.n = 0
        self.last_scored = 0.0  # keys scored by the last search, per KV head (telemetry)
        # [Hkv] bool: the retrieval heads (a head split's; the rest keep sinks + window), None: every head
        self.heads = None if heads is None else heads.to(torch.bool).cpu()

    @classmethod
    def warm(cls, ctx: IndexContext, dtype: torch.dtype) -> None:
        """Compile (or load from numba's cache) this policy's own CPU kernels on a tiny index, at load
        rather than in the first decode step. A policy without kernels of its own has nothing to do."""

    @classmethod
    def estimate_nbytes(cls, args: ModelArgs, context: int, dtype_bytes: int) -> int:
        """Memory of this policy's index over ``context`` tokens, all layers (built indexes report
        their exact size through :meth:`nbytes`)."""
        return 0

    @classmethod
    def search_seconds(cls, args: ModelArgs, context: int, keys_per_s: float, scored_fraction: float) -> float:
        """Host-side search time of one decode step, all layers (0: the search is a few device
        products, counted with the attention)."""
        return 0.0

    @classmethod
    def selection_cost(cls, args: ModelArgs, context: int, dtype_bytes: int, dense_layers: int,
                       profile: BandwidthProfile) -> SelectionCost:
        """What this policy adds to a placement of ``context`` tokens: its index, the prompt queries
        it keeps until the build, and its host-side search per step (the planner asks, by class)."""
        sparse_layers = max(0, args.num_layers - dense_layers)
        sparse_share = sparse_layers / args.num_layers
        queries = 0
        if cls.needs_prefill_queries:  # every QUERY_STRIDE-th prompt query of every head, sparse layers
            queries = int(sparse_share * args.num_layers) * args.num_heads * args.head_dim * \
                (context // QUERY_STRIDE + 1) * dtype_bytes
        return SelectionCost(
            index_bytes=int(sparse_share * cls.estimate_nbytes(args, context, dtype_bytes)),
            prefill_query_bytes=queries,
            search_ms=1e3 * sparse_share * cls.search_seconds(args, context, profile.index_keys_per_s,
                                                              profile.scored_fraction)
            + sparse_layers * profile.sparse_overhead_ms(cls.name))

    def build(self, keys: KVRows | torch.Tensor, n: int, queries: torch.Tensor | None = None) -> None:
        """keys [Hkv, N, D]: the cache storage (post-RoPE), of which the first n are the prompt (a
        tensor is the compute-dtype cache itself; a quantized cache comes as :class:`KVRows`)."""
        self.keys, self.n = _rows(keys), n

    def extend(self, n: int) -> None:
        """The cache now holds n tokens (decode appended n - self.n)."""
        self.n = n

    def summarize_values(self, values: KVRows) -> None:
        """Right after build(), with the row's values [Hkv, N, D] at hand (a disk layer's are still in
        memory then): an index that estimates from value statistics (``add_estimate``) takes them now."""

    @abstractmethod
    def search(self, q: torch.Tensor, budget: int) -> Selection:
        """q [H, D] (post-RoPE) -> up to ``budget`` token ids per KV head in the candidate range."""

    def select(self, q: torch.Tensor, budget: int) -> Selection:
        """What the backend attends besides sinks and window: :meth:`search`'s selection, nothing
        for a streaming head (a policy that knows ``heads`` skips their search; this holds for all)."""
        selection = self.search(q, budget)
        if self.heads is None:
            return selection
        keep = self.heads.to(selection.counts.device, selection.counts.dtype)  # [Hkv] 1: a retrieval head
        return Selection(selection.ids, selection.counts * keep)

    @property
    def streaming_heads(self) -> int:
        """KV heads that keep only sinks + window (a head split's)."""
        return 0 if self.heads is None else int((~self.heads).sum())

    def nbytes(self) -> int:
        """Memory the index keeps beyond the KV cache."""
        return 0

    def disk_order(self) -> np.ndarray | None:
        """Token ids [Hkv, m] in the order the disk tier should lay tokens 0..m-1 out (each head a
        permutation: what one selection takes in consecutive slots), or None: in token order."""
        return None

    def lookahead(self, count: int) -> torch.Tensor | None:
        """Up to ``count`` token ids per KV head [Hkv, count] (-1: none) ranked just past the last
        search's selection: the likeliest newcomers to the next step's (consecutive queries move
        little), which a disk tier reads ahead. None: the policy ranks nothing past its selection."""
        return None

    def extra_ids(self) -> torch.Tensor | None:
        """Token ids [Hkv, E] the last step attended besides its selection (ShadowKV's outliers)."""
        return None

    # A policy with its own attention (ShadowKV rebuilds keys) defines
    # attend(q [H, D], keys, values [Hkv, N, D], n, selection, backend) -> (out [H, D], lse [H]);
    # otherwise the backend attends over the selection with exact gather attention.
    attend = None
    # A policy that estimates what its selection leaves out (the cluster index: from centroids and
    # value sums; RetroInfer's estimation zone) defines add_estimate(q [H, D], values [Hkv, N, D], n,
    # out [H, D], lse [H]), which merges its estimate into the exact part (out, lse) in place.
    add_estimate = None

    def estimate_parts(self, values) -> tuple[np.ndarray, np.ndarray] | None:
        """The last search's estimate as arrays the CPU's exact attention merges as it finishes (the
        add_estimate of an index whose search made one on the CPU): (out [Hkv, G, D], lse [Hkv, G])
        fp32, lse -inf where nothing is estimated; values [Hkv, N, D] (KVRows). None: add_estimate
        merges, after the attention."""
        return None

    # ---------------------------------------------------------------- persistence
    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(scalars, tensors) of what build() learned (``learned``), for :meth:`restore`."""
        if not self.persistable:
            raise OffloadError(f"the '{self.name}' index cannot be saved (it holds library objects); "
                               "use retrieval, shadowkv, sentence, quest or streaming for prompt caching")
        scalars: dict = {"n": self.n}
        tensors: dict[str, torch.Tensor] = {} if self.heads is None else {"heads": self.heads}
        for key in self.learned:
            value = getattr(self, key)
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

    def restore(self, keys: KVRows | torch.Tensor, scalars: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Take back a saved state over ``keys`` (the reloaded cache row)."""
        missing = sorted({"n", *self.learned} - set(scalars) - set(tensors))
        if missing:
            raise OffloadError(f"saved '{self.name}' index state lacks {missing}: the prompt cache is corrupt; "
                               f"save it again with LLM.save_prompt")
        self.keys = _rows(keys)
        saved = tensors.get("heads")  # the head split the state was saved with (None: none)
        self.heads = None if saved is None else saved.to(torch.bool).cpu()
        for key in ("n", *self.learned):
            if key in tensors:
                t = tensors[key]
                setattr(self, key, t.numpy() if scalars.get(key) == "__numpy__" else t.to(keys.device))
            else:
                setattr(self, key, scalars[key])

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

    def top_by_mass(self, mass: torch.Tensor, lo: int, budget: int) -> Selection:
        """mass [Hkv, M] (each candidate's share of attention, lo..lo+M-1) -> per head the best ids
        until ``config.mass`` of the candidates' total is covered, within the floor and ``budget``
        (sorted, padded). Without ``config.mass``: the ``budget`` best."""
        p = self.config.mass
        if p is None:
            return self.top_by_score(mass, lo, budget)
        m = mass.shape[-1]
        k = min(budget, m)
        if k <= 0:
            return self.empty(mass.device)
        top = torch.topk(mass, k, dim=-1)  # [Hkv, k] best first
        share = torch.cumsum(top.values, dim=-1) / mass.sum(-1, keepdim=True).clamp_min(1e-30)  # [Hkv, k]
        before = torch.cat([torch.zeros_like(share[:, :1]), share[:, :-1]], dim=-1)  # covered before each
        take = (before < p) | (torch.arange(k, device=mass.device) < ADAPTIVE_FLOOR_TOKENS)  # [Hkv, k]
        counts = take.sum(-1).to(torch.int32)  # [Hkv] a prefix of the ranking
        width = int(counts.max())
        ids = torch.where(take, top.indices + lo, torch.iinfo(torch.int32).max).sort(dim=-1).values[:, :width]
        ids = ids.masked_fill(torch.arange(width, device=mass.device) >= counts[:, None], 0)  # [Hkv, S] sorted, padded
        return Selection(ids.to(torch.int32).contiguous(), counts)

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


def check_disk_policy(policy: str) -> None:
    """A KV on disk serves only policies whose selection it reads in runs (``disk_layout``): one
    line naming them otherwise."""
    if policy_class(policy).disk_layout is None:
        supported = ", ".join(n for n in policy_names() if policy_class(n).disk_layout is not None)
        raise OffloadError(f"kv_policy {policy!r} reads keys all over the KV each step: with the KV on disk use one "
                           f"whose selection is read in runs ({supported}), or give cpu_memory for the KV")


def make_index(policy: str, ctx: IndexContext, config: SelectionConfig,
               token_ids: list[int] | None = None, heads: torch.Tensor | None = None) -> KVIndex:
    """``heads`` [Hkv] bool: a head split's retrieval heads (the rest keep sinks + window)."""
    return policy_class(policy)(ctx, config, token_ids, heads)


def _rows(keys: KVRows | torch.Tensor) -> KVRows:
    """The keys an index reads: a cache tensor becomes rows read in place."""
    return keys if isinstance(keys, KVRows) else KVRows(keys)
