"""RetrievalAttention (Liu et al., 2024): a query-aware graph over the keys, searched on the CPU.

Decode queries are out of distribution for an ANN index built over keys alone: the keys a query
attends to are often not each other's nearest neighbours. Following RetrievalAttention, the graph
is built from the prefill queries' true top-k keys and projected onto the keys (RoarGraph style):
a query's best key (its pivot) is linked with the query's other top keys, both ways, so that a
search that reaches one key a query likes reaches the rest. The decode query then walks the
graph greedily (beam search, numba, parallel over KV heads), scoring only the keys it visits.

The build learns from a bounded sample of the prompt's queries per KV head (``build_queries``: the
most recent ones, which resemble decode queries, and an even spread over the rest), each scored
against every key: its cost grows linearly with the context (every query against every key would
grow with its square: ~4.5 minutes at 32K on a 2-core CPU).

Knobs: ``effort`` (beam width ef = effort x budget: higher finds more of the true top-k and scores
more keys), ``build_queries`` (prompt queries learned from per KV head), ``build_topk`` (neighbours
per prefill query), ``max_degree``.
"""

from __future__ import annotations

import numpy as np
import torch

from offload.kernels import cpu_has_fast_bf16
from offload.tiers.kv_store import KVRows

from .base import KVIndex, Selection, register
from .graph_search import KEYS_BF16, KEYS_F32, KEYS_INT8, search_heads

SCORE_BLOCK_BYTES = 256 << 20  # one block of query-key scores: bounded at any context
RECENT_SHARE = 0.25  # of a build's query sample: the prompt's last positions (the rest spread evenly)


def sample_queries(group: int, positions: int, limit: int) -> np.ndarray:
    """Rows of a [group * positions] query block (head-major) to learn from: all when they number at
    most ``limit``, else every head's last positions (RECENT_SHARE of the sample) and an even spread
    over the earlier ones, sorted (the last rows stay the latest queries)."""
    if group * positions <= limit:
        return np.arange(group * positions)
    per_head = max(1, limit // group)
    recent = min(positions, max(1, int(per_head * RECENT_SHARE)))
    spread = np.linspace(0, positions - recent, per_head - recent, endpoint=False).astype(np.int64)
    picked = np.unique(np.concatenate([spread, np.arange(positions - recent, positions)]))  # [<= per_head]
    return (np.arange(group)[:, None] * positions + picked[None, :]).ravel()


def query_key_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, device: torch.device | None = None
                   ) -> torch.Tensor:
    """queries [M, D], keys [n, D] -> ids [M, k] (on the CPU) of each query's highest inner products.

    Exact (brute force): M x n products, the bulk of a build at long context (every prefill query
    against every key: ~4 minutes for 28 layers at 32K on a 2-core CPU). ``device`` (the GPU when
    the model runs on one) computes them there block by block while the KV stays in host memory."""
    device = torch.device(device) if device is not None else keys.device
    # A bf16 cache is scored in bf16 on a CPU that computes bf16 natively (2.5x the fp32 matrix
    # product there; the graph only needs each query's near-best keys); elsewhere in fp32 (on AVX2
    # alone bf16 products run 7-50x slower than fp32).
    bf16 = device.type == "cpu" and keys.dtype == torch.bfloat16 and cpu_has_fast_bf16()
    dtype = torch.bfloat16 if bf16 else torch.float32
    n = keys.shape[0]
    block = max(64, min(8192, SCORE_BLOCK_BYTES // (4 * max(n, 1))))  # queries per block
    keys_t = keys.to(device, dtype, non_blocking=True).T  # [D, n]
    out = []
    for i in range(0, queries.shape[0], block):
        scores = queries[i:i + block].to(device, dtype, non_blocking=True) @ keys_t  # [Mb, n]
        out.append(torch.topk(scores, min(k, n), dim=-1).indices.cpu())
    return torch.cat(out)


def project_to_key_graph(top: np.ndarray, n: int, max_degree: int) -> tuple[np.ndarray, np.ndarray]:
    """top [M, K] query neighbour lists -> CSR (indptr [n + 1], indices) of the key graph.

    Pivot (column 0) <-> every other key in the list; duplicate edges are merged and each node
    keeps its ``max_degree`` most often proposed neighbours.
    """
    pivot = np.repeat(top[:, :1], top.shape[1] - 1, axis=1).ravel()
    other = top[:, 1:].ravel()
    src = np.concatenate([pivot, other]).astype(np.int64)
    dst = np.concatenate([other, pivot]).astype(np.int64)
    pairs, freq = np.unique(src * n + dst, return_counts=True)
    src, dst = pairs // n, pairs % n
    order = np.lexsort((-freq, src))  # by node, most frequent first
    src, dst = src[order], dst[order]
    starts = np.searchsorted(src, np.arange(n))
    rank = np.arange(len(src)) - starts[src]
    keep = rank < max_degree
    src, dst = src[keep], dst[keep]
    indptr = np.zeros(n + 1, np.int64)
    np.add.at(indptr, src + 1, 1)
    return np.cumsum(indptr), dst.astype(np.int32)


@register
class RetrievalIndex(KVIndex):
    name = "retrieval"
    needs_prefill_queries = True
    searches_on_host = True  # numba walks the graph over host memory
    learned = ("indptr", "indices", "entries")
    build_queries = 1024  # prompt queries learned from per KV head: the build's cost is linear in the context
    build_topk = 32
    max_degree = 32
    num_entries = 16
    effort = 1.0  # ef = effort x budget

    @classmethod
    def estimate_nbytes(cls, args, context: int, dtype_bytes: int) -> int:
        # per KV head: max_degree int32 neighbour ids + an int64 CSR offset per key, every layer
        return args.num_layers * args.num_kv_heads * context * (cls.max_degree * 4 + 8)

    @classmethod
    def search_seconds(cls, args, context: int, keys_per_s: float, scored_fraction: float) -> float:
        return args.num_layers * scored_fraction * context * args.num_kv_heads / keys_per_s

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A cache no compiled search reads in place (KIVI's packed groups): the graph walks a copy of
        # its keys in the compute dtype, grown as decode appends (bytes of a bf16 key cache).
        self._key_copy: torch.Tensor | None = None  # [Hkv, N', D]
        self._copied = 0  # tokens in _key_copy
        self._copy_of: KVRows | None = None  # the rows it copies (a build or restore brings new ones)

    def _searched_keys(self) -> KVRows:
        """The keys the graph search reads: the cache's own, or the copy (brought up to n)."""
        if self.keys.in_place:
            return self.keys
        if self._copy_of is not self.keys or self._copied > self.n:
            grown = torch.zeros(self.num_kv_heads, self.keys.shape[1], self.head_dim, dtype=self.keys.dtype)
            self._key_copy, self._copied, self._copy_of = grown, 0, self.keys  # [Hkv, N, D]
        if self._copied < self.n:
            self._key_copy[:, self._copied:self.n] = self.keys[:, self._copied:self.n]
            self._copied = self.n
        return KVRows(self._key_copy)

    def build(self, keys: torch.Tensor, n: int, queries: torch.Tensor | None = None) -> None:
        super().build(keys, n, queries)
        if queries is None or queries.shape[1] == 0:
            queries = keys[:, :n].repeat_interleave(self.group, dim=0)  # no prefill queries: a plain key graph
        Hkv, G = self.num_kv_heads, self.group
        graphs, entries = [], []
        for h in range(Hkv):
            if self.heads is not None and not self.heads[h]:  # a streaming head: no graph, never searched
                graphs.append((np.zeros(n + 1, np.int64), np.zeros(0, np.int32)))
                entries.append(np.zeros(0, np.int64))
                continue
            qh = queries[h * G:(h + 1) * G].reshape(-1, queries.shape[-1])  # [G * Nq, D]
            qh = qh[torch.from_numpy(sample_queries(G, queries.shape[1], self.build_queries))]  # [<= build_queries, D]
            top = query_key_topk(qh, keys[h, :n], self.build_topk, self.ctx.build_device).numpy()  # [G * Nq, K]
            graphs.append(project_to_key_graph(top, n, self.max_degree))
            hubs = np.bincount(top.ravel(), minlength=n).argsort()[::-1][:self.num_entries // 2]
            recent = top[-(self.num_entries - len(hubs)):, 0]  # latest queries resemble decode queries
            entries.append(np.unique(np.concatenate([hubs, recent])))
        width = max(len(g[1]) for g in graphs)
        self.indptr = np.stack([g[0] for g in graphs])  # [Hkv, n + 1]
        self.indices = np.zeros((Hkv, max(width, 1)), np.int32)  # [Hkv, E] padded
        for h, (_, idx) in enumerate(graphs):
            self.indices[h, :len(idx)] = idx
        m = max(1, max(len(e) for e in entries))
        self.entries = np.full((Hkv, m), -1, np.int64)  # [Hkv, M], -1 padded
        for h, e in enumerate(entries):
            self.entries[h, :len(e)] = e

    def nbytes(self) -> int:
        copy = 0 if self._key_copy is None else self._key_copy.numel() * self._key_copy.element_size()
        return self.indptr.nbytes + self.indices.nbytes + self.entries.nbytes + copy

    def search(self, q: torch.Tensor, budget: int) -> Selection:
        lo, hi = self.config.candidate_range(self.n)
        if hi <= lo:
            return self.empty(q.device)
        if budget >= hi - lo:  # the budget covers every candidate: no search needed
            self.last_scored = float(hi - lo)
            return self.all_candidates(lo, hi, q.device)
        keys = self._searched_keys()  # KVRows: read in place, as the cache holds them
        f32, u16, i8 = np.zeros((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.uint16), np.zeros((1, 1, 1), np.int8)
        scales = np.zeros((self.num_kv_heads, 1), np.float32)  # a row per head: each head's search indexes it
        if keys.quantized:
            mode, i8 = KEYS_INT8, keys.data.numpy()  # [Hkv, N, D] codes
            scales = keys.scale[..., 0].float().numpy()  # [Hkv, N]
        elif keys.dtype == torch.bfloat16:
            mode, u16 = KEYS_BF16, keys.data.view(torch.int16).numpy().view(np.uint16)
        else:
            mode, f32 = KEYS_F32, keys.data.float().numpy()
        qg = q.float().view(self.num_kv_heads, self.group, -1).numpy()  # [Hkv, G, D]
        ef = max(budget, int(self.effort * budget))
        out_ids = np.zeros((self.num_kv_heads, budget), np.int64)
        counts = np.zeros(self.num_kv_heads, np.int64)
        scored = np.zeros(self.num_kv_heads, np.int64)
        active = np.ones(self.num_kv_heads, np.bool_) if self.heads is None else self.heads.numpy()  # [Hkv]
        search_heads(f32, u16, i8, scales, mode, self.indptr, self.indices, self.entries, qg, lo, hi, self.n, ef,
                     budget, active, out_ids, counts, scored)
        self.last_scored = float(scored.mean())
        return Selection(torch.from_numpy(out_ids.astype(np.int32)), torch.from_numpy(counts.astype(np.int32)))
