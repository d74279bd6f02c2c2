"""A cluster index (the RetroInfer / SPANN / ClusterKV family): keys grouped into small clusters,
one product with the centroids ranks them, the best clusters are attended exactly.

Build: the keys of each KV head are cut into segments of ``segment`` consecutive tokens and each
segment is clustered by k-means into ``segment / cluster_size`` clusters (about 16 tokens each).
k-means inside a segment costs O(segment x clusters x D) per token, so the build is linear in the
context (every segment is independent: all of them run as one batched product), where a graph over
all keys grows with its square. Keys that arrive during decode wait in a tail, scored exactly,
until a whole segment has come; it is then clustered like the prompt's.

Search: one matrix product scores the centroids, q . c (the mean of q . k over the cluster, exact
for a tight cluster); a cluster's estimated attention is size x exp(scale q . c) (a Gaussian spread
term, + scale^2 s2 |q|^2 / 2, lowered the mass on real text: 0.838 against 0.846), normalised per
query head together with the tail's exact exp(scale q . k), and summed over the query group. Clusters
are taken best first until the budget is spent. With ``effort`` e > 1 (CLI ``--search-effort``),
clusters are taken for e x budget tokens and the exact best ``budget`` of those kept, by each
token's share of the group's attention among them (their keys read and scored: a cluster's
centroid ranks it, its own key decides each token). A cluster's tokens are listed contiguously
(``order``, ``starts``): a selection is a few runs of that list, the layout a tier that stores KV
in cluster order (NVMe) reads in long extents.

Two levels on a CPU at long context: scoring every centroid is linear in the context (8,192 per
head at 128K), so each block of 1,024 clusters is grouped once more by k-means of their centroids
into super-clusters (the mean key of their tokens); a search scores the supers, then only the
clusters of the best ones (:class:`_Tree`, :func:`~offload.indexes.cluster_search.search_take_tree`).

Shapes: Hkv KV heads, G = H / Hkv, C clusters, n tokens cached, D head_dim.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit, prange

from offload.kernels.cpu_decode import threads

from .base import ADAPTIVE_FLOOR_TOKENS, KVIndex, Selection, SelectionConfig, register
from .cluster_search import merge_estimate, search_take, search_take_tree, take_clusters, zone_estimates

# Segments clustered in one batched k-means: large products, and keys read (from disk, say) and held
# in fp32 16K tokens at a time however long the prompt.
BUILD_SEGMENTS = 16
KMEANS_ITERATIONS = 6  # Lloyd steps per segment: the captured mass stops growing after ~5 (tests/bench)


@njit(cache=True, parallel=True, fastmath=True)
def _farthest_point_seeds(x, k, out):  # pragma: no cover - numba
    """x [S, T, D] f32 -> out [S, k] int64: per segment the longest point, then k - 1 times the
    point farthest from the seeds so far. One segment (T x D x 4 bytes, 256 KiB at 1,024 x 64)
    stays in the core's cache for its k passes: the batched tensor form streams all segments
    from memory on every pass (0.5 s per layer at 32K, against 0.04 s here)."""
    S, T, D = x.shape
    for s in prange(S):
        nearest = np.empty(T, np.float32)  # squared distance to the closest seed
        seed, longest = 0, np.float32(-1.0)
        for t in range(T):
            nearest[t] = np.inf
            norm = np.float32(0.0)
            for d in range(D):
                norm += x[s, t, d] * x[s, t, d]
            if norm > longest:
                longest, seed = norm, t
        for j in range(k):
            out[s, j] = seed
            farthest, far = np.float32(-1.0), 0
            for t in range(T):
                dist = np.float32(0.0)
                for d in range(D):
                    diff = x[s, t, d] - x[s, seed, d]
                    dist += diff * diff
                if dist < nearest[t]:
                    nearest[t] = dist
                if nearest[t] > farthest:
                    farthest, far = nearest[t], t
            seed = far


def farthest_point_seeds(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [S, T, D] fp32 -> seed ids [S, k] int64 (k <= T): the longest point, then each next seed
    the point farthest from those so far (deterministic; a far-out key, the kind attention singles
    out, gets a cluster of its own). numba on CPU; the tensor form elsewhere (a GPU)."""
    if x.device.type != "cpu":
        return farthest_point_seeds_tensor(x, k)
    out = np.empty((x.shape[0], k), np.int64)
    _farthest_point_seeds(x.contiguous().numpy(), k, out)
    return torch.from_numpy(out)


def farthest_point_seeds_tensor(x: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`farthest_point_seeds` as batched tensor operations (for a GPU: k passes over all
    segments, which a CPU pays for in memory traffic)."""
    S, T, D = x.shape
    rows = torch.arange(S, device=x.device)
    seeds = torch.empty(S, k, dtype=torch.int64, device=x.device)
    seeds[:, 0] = (x * x).sum(-1).argmax(dim=1)
    nearest = torch.full((S, T), float("inf"), device=x.device)  # [S, T]
    for j in range(1, k):
        seed = x[rows, seeds[:, j - 1]]  # [S, D]
        nearest = torch.minimum(nearest, ((x - seed[:, None]) ** 2).sum(-1))
        seeds[:, j] = nearest.argmax(dim=1)
    return seeds


def kmeans_segments(x: torch.Tensor, clusters: int,
                    iterations: int = KMEANS_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched k-means: x [S, T, D] (S independent segments of T points) -> (assignment [S, T] int64,
    centroids [S, K, D] fp32) with K = ``clusters``, seeded by :func:`farthest_point_seeds`. A
    cluster that loses every point keeps its centroid and counts zero."""
    x = x.float().contiguous()
    S, T, D = x.shape
    K = min(clusters, T)
    rows = torch.arange(S, device=x.device)
    centroids = x[rows[:, None], farthest_point_seeds(x, K).to(x.device)]  # [S, K, D]
    first = (rows * K)[:, None]  # [S, 1]: segment s's clusters in a flat [S K] list
    for i in range(iterations + 1):
        # argmin_c ||x - c||^2 = argmin_c ||c||^2 - 2 x.c: one batched product (||x||^2 is the same for every c)
        dist = torch.baddbmm((centroids * centroids).sum(-1)[:, None], x, centroids.transpose(1, 2), alpha=-2)  # [S, T, K]
        assign = dist.argmin(dim=-1)  # [S, T]
        if i == iterations:
            break
        flat = (assign + first).view(-1)  # [S T]
        sums = torch.zeros(S * K, D, device=x.device).index_add_(0, flat, x.view(-1, D)).view(S, K, D)
        counts = torch.bincount(flat, minlength=S * K).view(S, K)  # [S, K]
        centroids = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centroids)
    return assign, centroids


@dataclass(frozen=True)
class _Ranked:
    """A search's scores and what it took: lookahead() ranks on from there."""

    mass: torch.Tensor  # [Hkv, C+T] each entry's estimated share of attention (0: a two-level search left it out)
    budget: int
    lo: int
    hi: int
    selection: Selection
    zone: torch.Tensor  # [Hkv, Z] int64: clusters ranked next after the taken ones (-1: none), add_estimate's
    cluster_logits: np.ndarray | None = None  # [Hkv, G, C] the CPU search's, for add_estimate's compiled merge
    # the zone's estimate, (out [Hkv, G, D], lse [Hkv, G]) f32, where the CPU search made it (it had the values)
    estimate: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True)
class _Tree:
    """The cluster index's second level: its first ``blocked`` clusters grouped, a block of
    ``block`` consecutive clusters at a time, by k-means of their centroids into super-clusters of
    about ``fanout`` (:func:`~offload.indexes.cluster_search.search_take_tree` scores these first).
    Derived from the clusters (deterministic), so not saved with the index."""

    supers: torch.Tensor  # [Hkv, S, D] bf16: the mean key of each super's tokens
    log_sizes: torch.Tensor  # [Hkv, S] f32: log of its tokens (an empty super: -69, never visited first)
    members: torch.Tensor  # [Hkv, blocked] int32: cluster ids, super after super
    starts: torch.Tensor  # [Hkv, S + 1] int32: each super's first place in members

    @classmethod
    def empty(cls, num_kv_heads: int, head_dim: int, device) -> _Tree:
        Hkv = num_kv_heads
        return cls(torch.zeros(Hkv, 0, head_dim, dtype=torch.bfloat16, device=device),
                   torch.zeros(Hkv, 0, device=device), torch.zeros(Hkv, 0, dtype=torch.int32, device=device),
                   torch.zeros(Hkv, 1, dtype=torch.int32, device=device))

    @property
    def blocked(self) -> int:
        return self.members.shape[1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.supers, self.log_sizes, self.members, self.starts

    def host(self) -> tuple[np.ndarray, ...]:
        """numpy views for the compiled search: supers as bf16 bits, log sizes, members, starts."""
        return self.supers.view(torch.uint16).numpy(), self.log_sizes.numpy(), self.members.numpy(), self.starts.numpy()

    def grown(self, centroids: torch.Tensor, sizes: torch.Tensor, block: int, fanout: int) -> _Tree:
        """This tree with the whole blocks of clusters past ``blocked`` grouped: centroids [Hkv, C,
        D], sizes [Hkv, C] (tokens per cluster)."""
        Hkv, C, D = centroids.shape
        first = self.blocked
        blocks = (C - first) // block
        if blocks == 0:
            return self
        end = first + blocks * block
        x = centroids[:, first:end].float().reshape(Hkv * blocks, block, D)  # [Hkv W, block, D]
        K = max(1, block // fanout)  # supers per block
        assign, _ = kmeans_segments(x, K)  # [Hkv W, block] each cluster's super within its block
        device = x.device
        group = (assign + torch.arange(Hkv * blocks, device=device)[:, None] * K).view(-1)  # [Hkv W block] flat super
        weight = sizes[:, first:end].float().reshape(-1).to(device)  # [Hkv W block] tokens: the supers are token means
        sums = torch.zeros(Hkv * blocks * K, D, device=device).index_add_(0, group, x.view(-1, D) * weight[:, None])
        tokens = torch.zeros(Hkv * blocks * K, device=device).index_add_(0, group, weight)  # [Hkv W K]
        supers = (sums / tokens.clamp(min=1.0)[:, None]).view(Hkv, blocks * K, D)
        log_sizes = tokens.clamp(min=1e-30).log().view(Hkv, blocks * K)
        within = torch.sort(assign, dim=-1, stable=True).indices  # [Hkv W, block] clusters by super
        base = first + torch.arange(blocks, device=device).repeat(Hkv)[:, None] * block  # [Hkv W, 1]
        members = (within + base).view(Hkv, blocks * block).to(torch.int32)
        counts = torch.bincount(group, minlength=Hkv * blocks * K).view(Hkv, blocks * K)
        starts = first + torch.cumsum(counts, dim=1)  # [Hkv, W K]: past each super's members
        target = self.supers.device
        return _Tree(torch.cat([self.supers, supers.to(target, torch.bfloat16)], dim=1),
                     torch.cat([self.log_sizes, log_sizes.to(target)], dim=1),
                     torch.cat([self.members, members.to(target)], dim=1),
                     torch.cat([self.starts, starts.to(target, torch.int32)], dim=1))


@register
class ClusterIndex(KVIndex):
    """Keys in k-means clusters of about ``cluster_size`` tokens within segments of ``segment``
    tokens; each step the centroids are scored (one product, on the compute device) and the best
    clusters' tokens are selected."""

    name = "cluster"
    adaptive = True
    learned = ("centroids", "sizes", "order", "starts", "n_clustered")
    cluster_size = 16
    segment = 1024
    disk_layout = "clusters"
    # Tokens taken by cluster = effort x budget, of which the exact best budget are kept (1: the
    # clusters' tokens are the selection; an adaptive budget takes its clusters' tokens as they
    # are). Measured at 8K, budget 2%: mass 0.837 (1), 0.883 (2), 0.908 (4) for 6%, 10%, 14% of the
    # keys scored; output error 0.126, 0.084, 0.072 (BENCHMARKS.md). The default stays the fastest.
    effort = 1.0
    # The CPU search's second level (search_take_tree): every tree_block clusters (16 segments) are
    # grouped by k-means of their centroids into super-clusters of about tree_fanout; from tree_from
    # clusters per head (32K tokens) on, the supers are scored first and only the best ones' clusters
    # after them, tree_visit x the entries a search ranks. Measured on real text at 32K, budget 3%:
    # mass 0.905 as the flat scan's with 2.0% of the keys scored instead of 6.2% (x1.5: 0.903, x1:
    # 0.899), 38.6 -> 36.6 ms a step; at 128K (synthetic) the search 1.85 -> 1.0 ms a layer warm.
    tree_block = 1024
    tree_fanout = 16
    tree_from = 2048
    tree_visit = 2.0
    # An adaptive budget (p) ranks entries for its cap (10% of the context), so its want would be
    # most clusters: it visits supers until they hold p + (1 - p) x tree_visit_rest of the supers'
    # estimated attention instead (p0.9: 0.99), within the want. Measured, p0.9 at 32K (real text):
    # want only 45.6 ms (mass 0.859, 5.5% scored); rest 0.75: 31.8 ms (0.840); 0.9: 34.3 ms
    # (0.862, 1.3% scored, output error 0.137 against 0.115: a smaller estimation zone); 0.95: 35.2.
    tree_visit_rest = 0.9

    def __init__(self, ctx, config, token_ids=None, heads=None):
        super().__init__(ctx, config, token_ids, heads)
        self._ranked: _Ranked | None = None  # what the last search ranked (lookahead, estimate)
        # Derived, not saved: each clustered token's cluster [Hkv, n_clustered], and the clusters'
        # value sums [Hkv, C', D] bf16 over their first C' (summarize_values: after the build, then as
        # add_estimate meets new clusters)
        self._cluster_of = torch.zeros(ctx.num_kv_heads, 0, dtype=torch.int32)
        self._vsums = torch.zeros(ctx.num_kv_heads, 0, ctx.head_dim, dtype=torch.bfloat16)
        self._widest = 1  # the largest cluster's size (_refresh_log_sizes)
        # _edge's last read: ((sinks, clustered tokens), the window's first clustered token, their
        # clusters [Hkv, E], their values [Hkv, E, D])
        self._edge_rows: tuple | None = None
        self._values = None  # the row's values [Hkv, N, D] (KVRows), from summarize_values
        # numpy views (centroids, log sizes, sizes, starts, order) of a CPU index (_refresh_log_sizes)
        self._host: tuple[np.ndarray, ...] = ()
        self._tree = _Tree.empty(ctx.num_kv_heads, ctx.head_dim, "cpu")  # the super-clusters (derived, not saved)
        self._tree_host: tuple[np.ndarray, ...] = ()  # its numpy views on a CPU (_refresh_log_sizes)

    @classmethod
    def warm(cls, ctx, dtype: torch.dtype) -> None:
        """The compiled search and estimate, run once over a few clusters and a tail of random keys
        in the model's dtype: what a step passes them, but for the sizes."""
        if ctx.build_device.type != "cpu":
            return
        gen = torch.Generator().manual_seed(0)
        Hkv, D, clustered = ctx.num_kv_heads, ctx.head_dim, 2 * cls.cluster_size
        keys, values = (torch.randn(Hkv, clustered + 4, D, generator=gen).to(dtype) for _ in range(2))  # [Hkv, n, D]
        idx = cls(ctx, SelectionConfig(budget=cls.cluster_size, sink=1, window=1, dense_layers=0))
        idx.build(keys, clustered)
        idx.extend(clustered + 4)  # a tail
        idx.summarize_values(values)
        q = torch.randn(ctx.num_heads, D, generator=gen).to(dtype)  # [H, D]
        idx.search(q, cls.cluster_size)
        idx.add_estimate(q, values, clustered + 4, torch.zeros(ctx.num_heads, D, dtype=dtype),
                         torch.zeros(ctx.num_heads))
        # the two-level search too (a long context's): its clusters grouped as one block of supers of one
        idx._tree = idx._tree.grown(idx.centroids, idx.sizes, idx.sizes.shape[1], 1)
        idx._refresh_log_sizes()
        lo, hi = idx.config.candidate_range(idx.n)
        idx._search_numba(q.float().view(Hkv, -1, D), idx.keys[:, idx.n_clustered:hi].float(), cls.cluster_size,
                          lo, hi, tree=True)

    @classmethod
    def estimate_nbytes(cls, args, context: int, dtype_bytes: int) -> int:
        # per KV head and layer: bf16 centroids and value sums (D each per cluster), int32 sizes
        # and starts per cluster, int32 token order and cluster of each token
        clusters = context // cls.cluster_size + 1
        supers = clusters // cls.tree_fanout + 1  # bf16 mean key, f32 log size, int32 start; a member id per cluster
        return args.num_layers * args.num_kv_heads * (clusters * (args.head_dim * (2 + 2) + 8 + 4) + context * 8
                                                      + supers * (args.head_dim * 2 + 8))

    def build(self, keys, n: int, queries: torch.Tensor | None = None) -> None:
        super().build(keys, n, queries)
        Hkv, _, D = self.keys.shape
        device = self.keys.device
        # [Hkv, C, D] in bf16: each step reads all of them (half the bytes of fp32; the ranking
        # moves by less than the clusters' own spread)
        self.centroids = torch.zeros(Hkv, 0, D, dtype=torch.bfloat16, device=device)
        self.sizes = torch.zeros(Hkv, 0, dtype=torch.int32, device=device)  # [Hkv, C]
        self.order = torch.zeros(Hkv, 0, dtype=torch.int32, device=device)  # [Hkv, n_clustered] ids by cluster
        self.starts = torch.zeros(Hkv, 1, dtype=torch.int32, device=device)  # [Hkv, C + 1] into order
        self.n_clustered = 0
        self._refresh_log_sizes()
        self._cluster_of = torch.zeros(Hkv, 0, dtype=torch.int32, device=device)
        self._vsums = torch.zeros(Hkv, 0, D, dtype=torch.bfloat16, device=device)
        self._tree = _Tree.empty(Hkv, D, device)
        whole = n - n % self.segment
        step = self.segment * BUILD_SEGMENTS
        for start in range(0, whole, step):  # a batch of segments at a time: bounded memory at any context
            self._cluster(start, min(whole, start + step))
        if n > whole:  # the prompt's last, shorter segment: clustered now, the tail starts empty
            self._cluster(whole, n)

    def _cluster(self, start: int, end: int) -> None:
        """Cluster tokens start..end-1 (one or more segments of equal length) and append them."""
        seg = min(self.segment, end - start)
        segments = (end - start) // seg
        Hkv, _, D = self.keys.shape
        x = self.keys[:, start:start + segments * seg].reshape(Hkv * segments, seg, D)  # [Hkv S, T, D]
        k = max(1, math.ceil(seg / self.cluster_size))
        assign, centroids = kmeans_segments(x.to(self.ctx.build_device), k)  # [Hkv S, T], [Hkv S, K, D]
        K = centroids.shape[1]
        device = self.centroids.device
        # global cluster id of each token: segment s's clusters follow segment s-1's
        offset = torch.arange(segments, device=assign.device)[None, :, None] * K  # [1, S, 1]
        cluster = (assign.view(Hkv, segments, seg) + offset).reshape(Hkv, segments * seg)  # [Hkv, tokens]
        ids = torch.arange(start, start + segments * seg, device=assign.device)
        order = torch.sort(cluster, dim=-1, stable=True).indices  # [Hkv, tokens]: ids grouped by cluster, in order
        sizes = torch.zeros(Hkv, segments * K, dtype=torch.int32, device=assign.device).scatter_add_(
            1, cluster, torch.ones_like(cluster, dtype=torch.int32))  # [Hkv, S K]
        starts = self.n_clustered + torch.cumsum(sizes, dim=-1, dtype=torch.int32)  # [Hkv, S K]
        self._cluster_of = torch.cat([self._cluster_of, (cluster + self.sizes.shape[1]).to(device, torch.int32)], dim=1)
        self.centroids = torch.cat([self.centroids, centroids.reshape(Hkv, segments * K, D).to(device, torch.bfloat16)],
                                   dim=1)
        self.sizes = torch.cat([self.sizes, sizes.to(device)], dim=1)
        self.order = torch.cat([self.order, ids[order].to(device, torch.int32)], dim=1)
        self.starts = torch.cat([self.starts, starts.to(device)], dim=1)
        self.n_clustered = start + segments * seg
        self._tree = self._tree.grown(self.centroids, self.sizes, self.tree_block, self.tree_fanout)
        self._refresh_log_sizes()
        if self.n_clustered < end:  # a partial last segment
            self._cluster(self.n_clustered, end)

    def extend(self, n: int) -> None:
        super().extend(n)
        while self.n - self.n_clustered >= self.segment:  # a whole segment has arrived: cluster it
            self._cluster(self.n_clustered, self.n_clustered + self.segment)

    def restore(self, keys, scalars: dict, tensors: dict[str, torch.Tensor]) -> None:
        super().restore(keys, scalars, tensors)
        self._tree = _Tree.empty(*self.centroids.shape[::2], self.centroids.device).grown(
            self.centroids, self.sizes, self.tree_block, self.tree_fanout)
        self._refresh_log_sizes()
        Hkv, C = self.sizes.shape
        listed = torch.repeat_interleave(torch.arange(C, device=self.sizes.device).expand(Hkv, C).reshape(-1),
                                         self.sizes.reshape(-1).long()).view(Hkv, -1)  # [Hkv, n_clustered] by `order`
        self._cluster_of = torch.empty(Hkv, self.n_clustered, dtype=torch.int32, device=self.sizes.device)
        self._cluster_of.scatter_(1, self.order.long(), listed.to(torch.int32))
        self._vsums = torch.zeros(Hkv, 0, self.centroids.shape[2], dtype=torch.bfloat16, device=self.centroids.device)

    def _refresh_log_sizes(self) -> None:
        """What each step reads, derived once the clusters change: log(size) [Hkv, 1, C] (an empty
        cluster: -69, never taken), the widest cluster, and on the CPU numpy views of the arrays the
        compiled search reads (~1 us each, a dozen per layer and step otherwise)."""
        self._log_sizes = self.sizes.float().clamp(min=1e-30).log()[:, None]
        self._widest = int(self.sizes.max()) if self.sizes.numel() else 1
        if self.centroids.device.type == "cpu":
            self._host = (self.centroids.view(torch.uint16).numpy(), self._log_sizes[:, 0].numpy(), self.sizes.numpy(),
                          self.starts.numpy(), self.order.numpy())
            self._tree_host = self._tree.host()

    def disk_order(self) -> np.ndarray:
        return self.order.cpu().numpy()  # [Hkv, n_clustered]: each cluster's tokens consecutive

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.centroids, self.sizes, self.order, self.starts,
                                                           self._cluster_of, self._vsums, *self._tree.tensors()))

    def add_estimate(self, q: torch.Tensor, values, n: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        """RetroInfer's estimation zone, merged into the exact part in place: the clusters the last
        search ranked next after its selection, each taken as its size times exp(scale q . centroid)
        with the mean of its values, join out [H, D] (the exact attention over sinks, window and
        selection) and lse [H] by log-sum-exp. Their tokens attended exactly anyway (sinks, a window
        reaching into clustered tokens) are left out of the estimate. q [H, D]; values [Hkv, N, D]
        (KVRows). On the CPU the search estimated already (else :func:`zone_estimates` does now) and
        one compiled call merges; elsewhere :meth:`_merge_tensors` (the same numbers)."""
        r = self._ranked
        if r is None or r.zone.shape[1] == 0:
            return
        if r.cluster_logits is None or out.device.type != "cpu":  # the search ran as tensor ops
            self.summarize_values(values)
            self._merge_tensors(q, r.zone, *self._edge(values, r.lo, r.hi), out, lse)
            return
        Hkv, _, D = self.centroids.shape
        estimate = self.estimate_parts(values)
        acc = out.float().reshape(Hkv, self.group, D).contiguous()  # [Hkv, G, D]
        total = lse.float().reshape(Hkv, self.group).contiguous()  # [Hkv, G]
        merge_estimate(acc.numpy(), total.numpy(), *estimate)
        out.copy_(acc.view(-1, D))
        lse.copy_(total.view(-1))

    def estimate_parts(self, values) -> tuple[np.ndarray, np.ndarray] | None:
        r = self._ranked
        if r is None or r.zone.shape[1] == 0 or r.cluster_logits is None:
            return None  # nothing ranked next, or the search ran as tensor ops (add_estimate merges those)
        if r.estimate is None:  # the search had no values yet (a moved row's index): estimate now
            self.summarize_values(values)
            edge_cluster, edge_values = self._edge(values, r.lo, r.hi)
            Hkv, _, D = self.centroids.shape
            estimate = (np.empty((Hkv, self.group, D), np.float32), np.empty((Hkv, self.group), np.float32))
            _, log_sizes, sizes, _, _ = self._host
            zone_estimates(r.cluster_logits, log_sizes, sizes, self._vsums.view(torch.uint16).numpy(), r.zone.numpy(),
                           edge_cluster.numpy(), edge_values.numpy(), *estimate)
            self._ranked = r = dataclasses.replace(r, estimate=estimate)
        return r.estimate

    def _edge(self, values, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Clustered tokens attended exactly anyway (the window's tokens already clustered, then the
        sinks): their clusters [Hkv, E] int32 and values [Hkv, E, D] fp32."""
        clusters, rows, gone = self._edge_read(values, lo, hi)
        return (clusters[:, gone:].contiguous(), rows[:, gone:].contiguous()) if gone else (clusters, rows)

    def _edge_read(self, values, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """:meth:`_edge`'s rows as read once per clustering, and how many at their front have left
        the window since (candidates now: not part of the edge): the compiled search skips those
        itself, where slicing them off would copy both arrays every step."""
        lo, clustered = min(lo, self.n_clustered), self.n_clustered
        first = min(hi, clustered)  # the window's first clustered token
        cached = self._edge_rows
        if cached is None or cached[0] != (lo, clustered) or first < cached[1]:
            edge = torch.cat([torch.arange(first, clustered), torch.arange(0, lo)])  # [E] token ids
            device = self.centroids.device
            cached = ((lo, clustered), first, self._cluster_of[:, edge.to(device)].contiguous(),
                      values[:, edge].float().to(device).contiguous())
            self._edge_rows = cached
        return cached[2], cached[3], first - cached[1]

    def _merge_tensors(self, q: torch.Tensor, zone: torch.Tensor, edge_cluster: torch.Tensor,
                       edge_values: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
        """:meth:`add_estimate`'s merge as tensor ops (a GPU's): out [H, D] and lse [H] in place."""
        est_out, est_lse = self._estimate_tensors(q, zone, edge_cluster, edge_values)
        lse_all = torch.logaddexp(lse.float(), est_lse.to(lse.device))  # [H]
        # the exact part's share (the rest is the estimate's); nothing on either side keeps the exact part
        keep = torch.where(torch.isfinite(lse_all), torch.exp(lse.float() - lse_all), 1.0)[:, None]
        out.copy_(out.float() * keep + est_out.to(out.device) * (1 - keep))
        lse.copy_(lse_all)

    def estimate_tensors(self, q: torch.Tensor, values, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The estimation zone's softmax part alone as tensor ops -> (out [H, D], lse [H]) fp32 (None:
        nothing ranked): the reference :meth:`add_estimate` merges."""
        r = self._ranked
        if r is None or r.zone.shape[1] == 0:
            return None
        self.summarize_values(values)
        edge_cluster, edge_values = self._edge(values, r.lo, r.hi)
        return self._estimate_tensors(q, r.zone, edge_cluster, edge_values)

    def _estimate_tensors(self, q: torch.Tensor, zone: torch.Tensor, edge_cluster: torch.Tensor,
                          edge_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        Hkv, C, D = self.centroids.shape
        device = self.centroids.device
        zone = zone.to(device)  # [Hkv, Z]
        Z = zone.shape[1]
        valid = zone >= 0
        at = zone.clamp(min=0)
        size = self.sizes.gather(1, at).float()  # [Hkv, Z]
        vsum = self._vsums.gather(1, at[..., None].expand(-1, -1, D)).float()  # [Hkv, Z, D]
        if edge_cluster.shape[1]:
            where = torch.full((Hkv, C + 1), -1, dtype=torch.long, device=device)  # cluster -> zone place
            where.scatter_(1, torch.where(valid, zone, C), torch.arange(Z, device=device).expand(Hkv, Z))
            place = where.gather(1, edge_cluster.long())  # [Hkv, E]
            hit = (place >= 0).float()
            place = place.clamp(min=0)
            size = size - torch.zeros_like(size).scatter_add_(1, place, hit)
            vsum = vsum - torch.zeros_like(vsum).scatter_add_(1, place[..., None].expand(-1, -1, D),
                                                               edge_values * hit[..., None])
        valid &= size > 0.5
        qg = q.float().view(Hkv, self.group, D).to(device)  # [Hkv, G, D]
        centroids = self.centroids.gather(1, at[..., None].expand(-1, -1, D)).float()  # [Hkv, Z, D]
        logits = torch.baddbmm(size.clamp(min=1e-30).log()[:, None], qg, centroids.transpose(1, 2),
                               alpha=self.scale)  # [Hkv, G, Z]
        logits = logits.masked_fill(~valid[:, None], float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)  # [Hkv, G]
        weights = torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])  # [Hkv, G, Z]; -inf -> 0
        out = torch.bmm(weights, vsum / size.clamp(min=1.0)[..., None])  # [Hkv, G, D]: weighted value means
        return out.view(-1, D), lse.view(-1)

    def summarize_values(self, values) -> None:
        """Value sums of the clusters made since the last call: their tokens (the ones clustered
        since) are read once, in token order (a disk layer streams them; the search calls this for
        the clusters decode adds). The rows are kept: the CPU search estimates its zone from them."""
        self._values = values
        done, C = self._vsums.shape[1], self.sizes.shape[1]
        if done == C:
            return
        Hkv, D = self._vsums.shape[0], self._vsums.shape[2]
        first = self.n_clustered - int(self.sizes[0, done:].sum())  # their tokens: the last clustered (every head)
        v = values[:, first:self.n_clustered].float().to(self._vsums.device)  # [Hkv, T, D]
        cluster = (self._cluster_of[:, first:self.n_clustered].long() - done)[..., None].expand(-1, -1, D)  # [Hkv, T, D]
        sums = torch.zeros(Hkv, C - done, D, device=self._vsums.device).scatter_add_(1, cluster, v)
        self._vsums = torch.cat([self._vsums, sums.to(torch.bfloat16)], dim=1)

    def search(self, q: torch.Tensor, budget: int) -> Selection:
        lo, hi = self.config.candidate_range(self.n)
        self._ranked = None
        if hi <= lo:
            return self.empty(q.device)
        Hkv, C = self.sizes.shape
        device = self.centroids.device
        qg = q.float().view(Hkv, self.group, -1).to(device)  # [Hkv, G, D]
        tail = self.keys[:, self.n_clustered:hi].float().to(device)  # [Hkv, T, D] unclustered candidates
        T = tail.shape[1]
        self.last_scored = C + T  # centroids and tail keys scored, per KV head
        if device.type == "cpu":  # one compiled pass: the torch form below is ~100 small ops (1 ms) more
            tree = C >= self.tree_from and self._tree.blocked > 0  # scoring every centroid would be the step
            mass, cluster_logits, selection, zone, estimate = self._search_numba(qg, tail, self._wide(budget, hi - lo),
                                                                                 lo, hi, tree)
            selection = self._rerank(qg, selection, budget)
            self._ranked = _Ranked(torch.from_numpy(mass), budget, lo, hi, selection, self._retrieval_zone(zone),
                                   cluster_logits, estimate)
            return selection
        logits = torch.baddbmm(self._log_sizes, qg, self.centroids.float().transpose(1, 2), alpha=self.scale)  # [Hkv, G, C]
        if T:
            logits = torch.cat([logits, torch.matmul(qg, tail.transpose(1, 2)) * self.scale], dim=2)  # [Hkv, G, C+T]
        mass = torch.softmax(logits, dim=2).sum(dim=1)  # [Hkv, C+T]: the group's estimated attention
        selection, zone = self._take_torch(mass, self._wide(budget, hi - lo), lo, hi)
        selection = self._rerank(qg, selection, budget)
        self._ranked = _Ranked(mass, budget, lo, hi, selection, self._retrieval_zone(zone))
        return selection

    def _wide(self, budget: int, candidates: int) -> int:
        """Tokens the clusters are taken for: ``effort`` x budget (no more than the candidates)."""
        return max(budget, min(candidates, int(self.effort * budget)))

    def _rerank(self, qg: torch.Tensor, wide: Selection, budget: int) -> Selection:
        """The exact best ``budget`` tokens per KV head among the clusters' tokens, wide [Hkv, W], by
        each one's share of the group's attention among them; qg [Hkv, G, D]. Not with an adaptive
        budget: its take already stops at the estimated share, and a second stop on the exact
        shares among those would keep p of p (measured at 8K, p0.9: mass 0.914 -> 0.879)."""
        if self.effort <= 1 or self.config.mass is not None:
            return wide
        device = qg.device
        ids, counts = wide.ids.to(device).long(), wide.counts.to(device).long()  # [Hkv, W], [Hkv]
        W = ids.shape[1]
        keys = self.keys.take(ids).float().to(device)  # [Hkv, W, D] the candidates' keys only
        self.last_scored += float(counts.float().mean())
        slot = torch.arange(W, device=device)[None, :]  # [1, W]
        logits = torch.bmm(qg, keys.transpose(1, 2)).mul_(self.scale)  # [Hkv, G, W]
        logits.masked_fill_((slot >= counts[:, None])[:, None], float("-inf"))
        share = torch.softmax(logits, dim=-1).nan_to_num_(0.0).sum(dim=1)  # [Hkv, W] the group's
        k = min(budget, W)
        top = torch.topk(share, k, dim=-1)  # [Hkv, k] best first
        rank = slot[:, :k]  # [1, k]
        keep = rank < counts[:, None]  # [Hkv, k] real candidates
        chosen = torch.where(keep, ids.gather(1, top.indices), torch.iinfo(torch.int32).max)
        chosen = chosen.sort(dim=-1).values  # [Hkv, k] sorted ids read memory in order, padding last
        out_counts = keep.sum(-1).to(torch.int32)  # [Hkv]
        chosen = chosen.masked_fill(rank >= out_counts[:, None], 0)
        return Selection(chosen.to(torch.int32).contiguous(), out_counts)

    def _retrieval_zone(self, zone: torch.Tensor) -> torch.Tensor:
        """zone [Hkv, Z] with a streaming head's row emptied (-1): it keeps sinks + window alone."""
        if self.heads is None:
            return zone
        return zone.masked_fill(~self.heads.to(zone.device)[:, None], -1)

    def lookahead(self, count: int) -> torch.Tensor | None:
        """The clusters ranked next after the last selection, until ``count`` more tokens per head
        (their tokens in the candidate range, the selection's own left out)."""
        r = self._ranked
        if r is None or count <= 0:
            return None
        Hkv, C = self.sizes.shape
        mass = r.mass.float().cpu()  # [Hkv, C+T]
        wider = r.budget + count
        k = min(mass.shape[1], self._ranked_entries(wider))
        top = torch.topk(mass, k, dim=1)  # [Hkv, k] best first
        taken = np.zeros((Hkv, wider + self._widest), dtype=np.int32)  # [Hkv, S]
        counts = take_clusters(top.indices.numpy(), top.values.numpy(), self.sizes.cpu().numpy(),
                                self.starts.cpu().numpy(), self.order.cpu().numpy(), self.n_clustered, r.lo, r.hi,
                                wider, 0.0, 0, taken)
        chosen, chosen_counts = r.selection.ids.cpu().numpy(), r.selection.counts.cpu().numpy()
        ahead = np.full((Hkv, count), -1, dtype=np.int32)  # [Hkv, count]
        for h in range(Hkv):
            extra = np.setdiff1d(taken[h, :counts[h]], chosen[h, :chosen_counts[h]], assume_unique=True)[:count]
            ahead[h, :extra.size] = extra
        return torch.from_numpy(ahead)

    def _ranked_entries(self, budget: int) -> int:
        """Entries (clusters, tail tokens) ranked for a budget: enough unless the best clusters are
        much smaller than cluster_size (a head that runs out of them ranks all of them)."""
        return budget // (self.cluster_size // 4) + 8

    def _search_numba(self, qg: torch.Tensor, tail: torch.Tensor, budget: int, lo: int, hi: int,
                      tree: bool = False) -> tuple[np.ndarray, np.ndarray, Selection, torch.Tensor, tuple | None]:
        """The CPU's search in one compiled call (:func:`search_take`, or with ``tree`` the supers first:
        :func:`search_take_tree`): qg [Hkv, G, D], tail [Hkv, T, D]
        -> (mass [Hkv, C+T] each entry's share of the group's attention, the clusters' logits [Hkv, G,
        C], the selection, the estimation zone [Hkv, Z], and with the values at hand (summarize_values)
        the zone's estimate (out [Hkv, G, D], lse [Hkv, G]); the retrieval heads' alone)."""
        Hkv, C = self.sizes.shape
        G, D = self.group, self.head_dim
        T = tail.shape[1]
        centroids, log_sizes, sizes, starts, order = self._host
        mass = np.empty((Hkv, C + T), np.float32)  # [Hkv, C+T]
        cluster_logits = np.empty((Hkv, G, C), np.float32)  # [Hkv, G, C]
        out = np.zeros((Hkv, budget + self._widest), dtype=np.int32)  # [Hkv, S]
        counts = np.zeros(Hkv, np.int32)  # [Hkv]
        est_out, est_lse = np.empty((Hkv, G, D), np.float32), np.empty((Hkv, G), np.float32)
        if self._values is not None:
            self.summarize_values(self._values)
            edge_cluster, edge_values, gone = self._edge_read(self._values, lo, hi)  # [Hkv, E], [Hkv, E, D]
            estimate = np.ones(Hkv, np.uint8) if self.heads is None else self.heads.numpy().astype(np.uint8)
        else:  # values not seen yet (an index restored on a moved row): add_estimate estimates
            edge_cluster, edge_values, gone = torch.zeros(Hkv, 0, dtype=torch.int32), torch.zeros(Hkv, 0, D), 0
            estimate = np.zeros(Hkv, np.uint8)
        common = (qg.contiguous().numpy(), centroids, log_sizes, tail.contiguous().numpy(), np.float32(self.scale),
                  sizes, starts, order, self.n_clustered, lo, hi, budget, self.config.mass or 0.0,
                  ADAPTIVE_FLOOR_TOKENS, self._ranked_entries(budget))
        # the results, then the estimate's inputs and results
        rest = (mass, cluster_logits, out, counts, estimate, self._vsums.view(torch.uint16).numpy(),
                edge_cluster.numpy(), edge_values.numpy(), gone, est_out, est_lse)
        if tree:
            want = int(self.tree_visit * self._ranked_entries(budget))  # clusters scored
            p = self.config.mass
            visit_share = p + (1 - p) * self.tree_visit_rest if p is not None else 0.0
            scored = np.empty(Hkv, np.int64)  # [Hkv] supers and clusters scored
            zone = search_take_tree(*common, want, visit_share, *self._tree_host, self._tree.blocked, scored, *rest)
            self.last_scored = sum(scored.tolist()) / Hkv + T  # (numpy's mean costs ~8 us a layer, its sum ~4)
        else:
            zone = search_take(*common, threads(), *rest)
        width = max(1, *counts.tolist())  # (a list's max: numpy's costs ~4 us)
        selection = Selection(torch.from_numpy(out)[:, :width], torch.from_numpy(counts))  # a view: no copy
        return (mass, cluster_logits, selection, torch.from_numpy(zone),
                (est_out, est_lse) if self._values is not None else None)

    def _take_torch(self, mass: torch.Tensor, budget: int, lo: int, hi: int) -> tuple[Selection, torch.Tensor]:
        """Clusters best first while the budget lasts, their tokens in the candidate range, as tensor
        ops on the index's device (what :func:`take_clusters` does on the CPU) -> (the selection,
        the estimation zone [Hkv, Z])."""
        Hkv, C = self.sizes.shape
        device = mass.device
        T = mass.shape[1] - C
        sizes = torch.cat([self.sizes, torch.ones(Hkv, T, dtype=torch.int32, device=device)], dim=1)  # [Hkv, C+T]
        ranked = torch.argsort(mass, dim=-1, descending=True)  # [Hkv, C+T]
        size = torch.gather(sizes, 1, ranked)  # [Hkv, C+T] tokens of each, best first
        before = torch.cumsum(size, dim=-1) - size  # tokens taken before each
        keep = before < budget  # taken while the budget lasts
        if self.config.mass is not None:  # ... and until the estimated share is covered (past the floor)
            share = torch.gather(mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-30), 1, ranked)
            covered = torch.cumsum(share, dim=-1) - share  # [Hkv, C+T] covered before each
            keep &= (covered < self.config.mass) | (before < ADAPTIVE_FLOOR_TOKENS)
        k = int(keep.sum(-1).max())  # clusters the widest head takes
        # the estimation zone: per head the clusters ranked past its selection among those the CPU path
        # ranks (the best _ranked_entries, or all of them where a head takes every one of those)
        used = keep.sum(-1)  # [Hkv] entries taken
        M = ranked.shape[1]
        ranked_k = min(M, self._ranked_entries(budget))
        n_ranked = torch.where(used >= ranked_k, M, ranked_k)  # [Hkv]
        at = used[:, None] + torch.arange(int((n_ranked - used).max()), device=device)  # [Hkv, Z] places in ranked
        zone = ranked.gather(1, at.clamp(max=M - 1))
        zone = torch.where((at < n_ranked[:, None]) & (zone < C), zone, -1).long()  # [Hkv, Z], -1: none
        ranked, size = ranked[:, :k], size[:, :k] * keep[:, :k]  # [Hkv, k]; a cluster not taken adds nothing
        # every taken token, all heads at once: cluster j's tokens are order[starts[j]:starts[j] + size]
        # (a tail entry is one token, n_clustered + its place in the tail)
        count = size.flatten()  # [Hkv k]
        entry = torch.repeat_interleave(torch.arange(Hkv * k, device=device), count)  # [M] entry of each token
        within = torch.arange(entry.numel(), device=device) - (torch.cumsum(count, 0) - count)[entry]  # [M]
        cluster = ranked.flatten()[entry]  # [M]
        head = entry // k  # [M]
        in_tail = cluster >= C
        begin = self.starts[head, cluster.clamp(max=max(C - 1, 0))] if C else torch.zeros_like(cluster)
        clustered = self.order.flatten()[(head * self.n_clustered + begin + within).clamp(
            max=max(self.order.numel() - 1, 0))] if self.order.numel() else torch.zeros_like(cluster)
        ids = torch.where(in_tail, cluster - C + self.n_clustered, clustered.long())  # [M] token ids
        valid = (ids >= lo) & (ids < hi)
        ids, head = ids[valid], head[valid]
        ids = torch.sort(head * self.n + ids).values  # by head, then id: sorted ids read memory in order
        head = ids // self.n
        counts = torch.bincount(head, minlength=Hkv)  # [Hkv]
        pos = torch.arange(ids.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[head]
        out = torch.zeros(Hkv, max(1, int(counts.max()) if ids.numel() else 1), dtype=torch.int32,
                          device=device)  # [Hkv, S]
        out[head, pos] = (ids - head * self.n).to(torch.int32)
        counts = counts.to(torch.int32)
        return Selection(out, counts), zone
