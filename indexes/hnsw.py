"""Plain approximate nearest-neighbour baselines over the keys, for comparison with RetrievalAttention.

``hnsw``: hnswlib's HNSW graph over each KV head's keys (inner-product space), queried with each
query head of the group; the union is re-scored exactly (max over the group) and the best
``budget`` kept. ``keygraph``: the same graph construction and numba search as ``retrieval`` but
built from the keys themselves instead of the prompt's queries, so the two can be compared at an
equal number of scored keys.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import KVIndex, Selection, register
from .retrieval import RetrievalIndex


@register
class KeyGraphIndex(RetrievalIndex):
    name = "keygraph"
    needs_prefill_queries = False  # build() falls back to the keys as their own queries


@register
class HNSWIndex(KVIndex):
    name = "hnsw"
    persistable = False
    searches_on_host = True  # hnswlib searches host memory
    M = 16
    ef_construction = 100
    effort = 1.0  # ef = effort x budget (at least the number of results asked for)

    @classmethod
    def estimate_nbytes(cls, args, context: int, dtype_bytes: int) -> int:
        # hnswlib: a copy of each fp32 key plus 2M int32 links per element on layer 0, every layer
        return args.num_layers * args.num_kv_heads * context * (args.head_dim * 4 + 2 * cls.M * 4)

    @classmethod
    def search_seconds(cls, args, context: int, keys_per_s: float, scored_fraction: float) -> float:
        return RetrievalIndex.search_seconds(args, context, keys_per_s, scored_fraction)

    def build(self, keys: torch.Tensor, n: int, queries: torch.Tensor | None = None) -> None:
        import hnswlib

        super().build(keys, n, queries)
        D = keys.shape[-1]
        self.graphs = []
        for h in range(self.num_kv_heads):
            graph = hnswlib.Index(space="ip", dim=D)
            graph.init_index(max_elements=keys.shape[1], ef_construction=self.ef_construction, M=self.M)
            graph.set_num_threads(1)
            graph.add_items(keys[h, :n].float().numpy(), np.arange(n))
            self.graphs.append(graph)

    def extend(self, n: int) -> None:
        old = self.n
        super().extend(n)
        if n > old:
            for h, graph in enumerate(self.graphs):
                graph.add_items(self.keys[h, old:n].float().numpy(), np.arange(old, n))

    def search(self, q: torch.Tensor, budget: int) -> Selection:
        lo, hi = self.config.candidate_range(self.n)
        if hi <= lo:
            return self.empty(q.device)
        k = min(self.n, budget + (self.n - hi) + lo)  # over-fetch: the dense part may come back too
        qg = q.float().view(self.num_kv_heads, self.group, -1)  # [Hkv, G, D]
        ids = torch.zeros(self.num_kv_heads, budget, dtype=torch.int32)
        counts = torch.zeros(self.num_kv_heads, dtype=torch.int32)
        ef = max(k, int(self.effort * budget))
        # hnswlib does not count its distance computations; each of the G queries scores at least
        # the ef candidates it keeps, so G x ef is a lower bound on the keys scored per KV head.
        self.last_scored = float(self.group * ef)
        for h, graph in enumerate(self.graphs):
            graph.set_ef(ef)
            labels, _ = graph.knn_query(qg[h].numpy(), k=k)  # [G, k]
            cand = np.unique(labels)
            cand = torch.from_numpy(cand[(cand >= lo) & (cand < hi)].astype(np.int64))
            if len(cand) == 0:
                continue
            scores = (qg[h] @ self.keys[h, cand].float().T).amax(0)  # [C]
            best = cand[torch.topk(scores, min(budget, len(cand))).indices].sort().values
            ids[h, :len(best)] = best.to(torch.int32)
            counts[h] = len(best)
        return Selection(ids, counts)
