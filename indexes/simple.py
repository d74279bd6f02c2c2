"""Baseline policies: dense (everything), exact top-k (the oracle), streaming (sinks + window), Quest."""

from __future__ import annotations

import torch

from .base import KVIndex, Selection, register


@register
class DenseIndex(KVIndex):
    """Selects every candidate: with the dense part, the step attends to all tokens."""

    name = "dense"

    def search(self, q: torch.Tensor, budget: int) -> Selection:
        return self.all_candidates(*self.config.candidate_range(self.n), q.device)


def group_attention_mass(q: torch.Tensor, keys: torch.Tensor, n: int, scale: float, group: int) -> torch.Tensor:
    """The true attention each key receives from its query group: [Hkv, n], summed over G heads.

    q [H, D], keys [Hkv, N, D]. Probabilities are normalised over all n keys, per query head.
    """
    Hkv, _, D = keys.shape
    qg = q.view(Hkv, group, D)  # [Hkv, G, D]
    scores = torch.matmul(qg, keys[:, :n].transpose(-1, -2)).float() * scale  # [Hkv, G, n]
    return torch.softmax(scores, dim=-1).sum(dim=1)  # [Hkv, n]


@register
class ExactTopK(KVIndex):
    """The exact twin: the candidates with the most true attention mass (summed over the group).

    Scores every key each step, so it is the yardstick for recall, mass and output error, not a
    fast path.
    """

    name = "exact"
    adaptive = True

    def search(self, q: torch.Tensor, budget: int) -> Selection:
        lo, hi = self.config.candidate_range(self.n)
        if hi <= lo:
            return self.empty(q.device)
        mass = group_attention_mass(q, self.keys, self.n, self.scale, self.group)  # [Hkv, n]
        return self.top_by_mass(mass[:, lo:hi], lo, budget)


@register
class StreamingIndex(KVIndex):
    """StreamingLLM: attention sinks and the recent window only; selects nothing."""

    name = "streaming"
    disk_layout = "tokens"

    def search(self, q: torch.Tensor, budget: int) -> Selection:
        return self.empty(q.device)


@register
class QuestIndex(KVIndex):
    """Quest (Tang et al., 2024): pages of keys with per-channel min/max; a page's score is the
    upper bound sum_d max(q_d min_d, q_d max_d) of q.k over its keys, maximised over the query
    group; whole pages are selected, best first, until the budget is spent."""

    name = "quest"
    disk_layout = "tokens"
    learned = ("page_min", "page_max")
    page_size = 16

    def __init__(self, ctx, config, token_ids=None, heads=None):
        super().__init__(ctx, config, token_ids, heads)
        # the last search's page scores [Hkv, pages], its first page and how many it took (lookahead)
        self._ranked: tuple[torch.Tensor, int, int] | None = None

    @classmethod
    def estimate_nbytes(cls, args, context: int, dtype_bytes: int) -> int:
        # fp32 per-channel min and max per page per KV head, every layer
        return args.num_layers * args.num_kv_heads * (context // cls.page_size + 1) * args.head_dim * 4 * 2

    def build(self, keys: torch.Tensor, n: int, queries: torch.Tensor | None = None) -> None:
        super().build(keys, n, queries)
        Hkv, N, D = keys.shape
        pages = (N + self.page_size - 1) // self.page_size
        self.page_min = torch.empty(Hkv, pages, D, dtype=torch.float32, device=keys.device)  # [Hkv, P, D]
        self.page_max = torch.empty(Hkv, pages, D, dtype=torch.float32, device=keys.device)  # [Hkv, P, D]
        self._update_pages(0, n)

    def _update_pages(self, start: int, end: int) -> None:
        """Bounds of the pages holding tokens start..end-1, from one read of their keys (a disk tier's
        keys are read in one request per head, not one per page)."""
        ps = self.page_size
        first = start // ps
        block = self.keys[:, first * ps:end].float()  # [Hkv, T, D]
        Hkv, T, D = block.shape
        whole = T // ps
        if whole:
            pages = block[:, :whole * ps].reshape(Hkv, whole, ps, D)  # [Hkv, P, ps, D]
            self.page_min[:, first:first + whole] = pages.amin(dim=2)
            self.page_max[:, first:first + whole] = pages.amax(dim=2)
        if T > whole * ps:  # the last page, not yet full
            self.page_min[:, first + whole] = block[:, whole * ps:].amin(dim=1)
            self.page_max[:, first + whole] = block[:, whole * ps:].amax(dim=1)

    def extend(self, n: int) -> None:
        old = self.n
        super().extend(n)
        self._update_pages(old - old % self.page_size, n)

    def restore(self, keys, scalars: dict, tensors: dict[str, torch.Tensor]) -> None:
        super().restore(keys, scalars, tensors)
        # the saved bounds cover the saved prompt's pages; this cache row has room for decode too
        Hkv, have, D = self.page_min.shape
        pages = -(-self.keys.shape[1] // self.page_size)
        if pages > have:
            pad = torch.zeros(Hkv, pages - have, D, dtype=self.page_min.dtype, device=self.page_min.device)
            self.page_min, self.page_max = torch.cat([self.page_min, pad], 1), torch.cat([self.page_max, pad], 1)

    def nbytes(self) -> int:
        return 2 * self.page_min.numel() * 4

    def search(self, q: torch.Tensor, budget: int) -> Selection:
        lo, hi = self.config.candidate_range(self.n)
        if hi <= lo:
            return self.empty(q.device)
        ps = self.page_size
        first, last = lo // ps, (hi - 1) // ps + 1  # pages overlapping the candidates
        qg = q.float().view(self.num_kv_heads, self.group, -1)  # [Hkv, G, D]
        # sum_d max(q_d min_d, q_d max_d) = max . q+ + min . q-: two matrix products, no [Hkv, G, P, D] temporaries
        bound = torch.matmul(self.page_max[:, first:last], qg.clamp(min=0).transpose(1, 2)) + \
            torch.matmul(self.page_min[:, first:last], qg.clamp(max=0).transpose(1, 2))  # [Hkv, pages, G]
        page_score = bound.amax(dim=-1)  # [Hkv, pages]
        n_pages = min(page_score.shape[-1], max(1, -(-budget // ps)))
        self._ranked = (page_score, first, n_pages)
        pages = torch.topk(page_score, n_pages, dim=-1).indices + first  # [Hkv, n_pages]
        ids = (pages[..., None] * ps + torch.arange(ps, device=q.device)).flatten(1)  # [Hkv, n_pages * ps]
        ids = ids.sort(dim=-1).values
        keep = (ids >= lo) & (ids < hi)  # pages at the edges overlap the dense part
        counts = keep.sum(-1).to(torch.int32)  # [Hkv]
        # Move the valid ids to the front of each row (stable: stays sorted).
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
        ids = torch.gather(ids, 1, order).to(torch.int32)
        return Selection(ids.contiguous(), counts)

    def lookahead(self, count: int) -> torch.Tensor | None:
        """The pages ranked next after the last selection's, ``count`` tokens' worth per head."""
        if self._ranked is None or count <= 0:
            return None
        page_score, first, n_pages = self._ranked
        ps = self.page_size
        wider = min(page_score.shape[-1], n_pages + -(-count // ps))
        if wider == n_pages:
            return None
        pages = torch.topk(page_score, wider, dim=-1).indices[:, n_pages:] + first  # [Hkv, extra] next best
        ids = (pages[..., None] * ps + torch.arange(ps, device=pages.device)).flatten(1)  # [Hkv, extra * ps]
        return torch.where(ids < self.n, ids, -1).to(torch.int32).cpu()
