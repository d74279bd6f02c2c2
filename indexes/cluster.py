"""A cluster index (the RetroInfer / SPANN / ClusterKV family): keys grouped into small clusters,
one product with the centroids ranks them, the best clusters are attended exactly.

Build: the keys of each KV head are cut into segments of ``segment`` consecutive tokens and each
segment is clustered by k-means into ``segment / cluster_size`` clusters (about 16 tokens each).
k-means inside a segment costs O(segment x clusters x D) per token, so the build is linear in the
context (every segment is independent: all of them run as one batched product), where a graph over
all keys grows with its square. Keys that arrive during decode wait in a tail, scored exactly,
until a whole segment has come; it is then clustered like the prompt's.

Search: one matrix product scores the centroids, q . c (the mean of q . k over the cluster, exact
for a tight cluster); a cluster's estimated attention is size x exp(scale q . c), normalised per
query head together with the tail's exact exp(scale q . k), and summed over the query group. Clusters
are taken best first until the budget is spent. A cluster's tokens are listed contiguously
(``order``, ``starts``): a selection is a few runs of that list, the layout a tier that stores KV
in cluster order (NVMe) reads in long extents.

Shapes: Hkv KV heads, G = H / Hkv, C clusters, n tokens cached, D head_dim.
"""

from __future__ import annotations

import math

import torch

from .base import KVIndex, Selection, register

KMEANS_ITERATIONS = 6  # Lloyd steps per segment: the captured mass stops growing after ~5 (tests/bench)


def kmeans_segments(x: torch.Tensor, clusters: int,
                    iterations: int = KMEANS_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched k-means: x [S, T, D] (S independent segments of T points) -> (assignment [S, T] int64,
    centroids [S, K, D] fp32) with K = ``clusters``. Seeded by farthest points (deterministic; each
    seed the point farthest from the seeds so far, which gives a far-out key, the kind attention
    singles out, a cluster of its own). A cluster that loses every point keeps its centroid and
    counts zero."""
    x = x.float()
    S, T, D = x.shape
    K = min(clusters, T)
    x_sq = (x * x).sum(-1, keepdim=True)  # [S, T, 1]
    rows = torch.arange(S, device=x.device)
    seed = x_sq[..., 0].argmax(dim=1)  # [S]: the longest key first
    centroids = torch.empty(S, K, D, device=x.device)
    nearest = torch.full((S, T), float("inf"), device=x.device)  # squared distance to the closest seed
    for j in range(K):
        centroids[:, j] = x[rows, seed]
        nearest = torch.minimum(nearest, ((x - centroids[:, j, None]) ** 2).sum(-1))
        seed = nearest.argmax(dim=1)
    for i in range(iterations + 1):
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, as one batched product
        dist = x_sq - 2 * torch.bmm(x, centroids.transpose(1, 2)) + (centroids * centroids).sum(-1)[:, None]  # [S, T, K]
        assign = dist.argmin(dim=-1)  # [S, T]
        if i == iterations:
            break
        sums = torch.zeros(S, K, D, device=x.device).scatter_add_(1, assign[..., None].expand(-1, -1, D), x)
        counts = torch.zeros(S, K, device=x.device).scatter_add_(1, assign, torch.ones(S, T, device=x.device))
        centroids = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centroids)
    return assign, centroids


@register
class ClusterIndex(KVIndex):
    """Keys in k-means clusters of about ``cluster_size`` tokens within segments of ``segment``
    tokens; each step the centroids are scored (one product, on the compute device) and the best
    clusters' tokens are selected."""

    name = "cluster"
    learned = ("centroids", "sizes", "order", "starts", "n_clustered")
    cluster_size = 16
    segment = 1024

    @classmethod
    def estimate_nbytes(cls, args, context: int, dtype_bytes: int) -> int:
        # per KV head and layer: fp32 centroids (D per cluster), int32 sizes and starts per cluster,
        # int32 token order per token
        clusters = context // cls.cluster_size + 1
        return args.num_layers * args.num_kv_heads * (clusters * (args.head_dim * 4 + 8) + context * 4)

    def build(self, keys, n: int, queries: torch.Tensor | None = None) -> None:
        super().build(keys, n, queries)
        Hkv, _, D = self.keys.shape
        device = self.keys.device
        self.centroids = torch.zeros(Hkv, 0, D, dtype=torch.float32, device=device)  # [Hkv, C, D]
        self.sizes = torch.zeros(Hkv, 0, dtype=torch.int32, device=device)  # [Hkv, C]
        self.order = torch.zeros(Hkv, 0, dtype=torch.int32, device=device)  # [Hkv, n_clustered] ids by cluster
        self.starts = torch.zeros(Hkv, 1, dtype=torch.int32, device=device)  # [Hkv, C + 1] into order
        self.n_clustered = 0
        whole = n - n % self.segment
        if whole:
            self._cluster(0, whole)
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
        self.centroids = torch.cat([self.centroids, centroids.reshape(Hkv, segments * K, D).to(device)], dim=1)
        self.sizes = torch.cat([self.sizes, sizes.to(device)], dim=1)
        self.order = torch.cat([self.order, ids[order].to(device, torch.int32)], dim=1)
        self.starts = torch.cat([self.starts, starts.to(device)], dim=1)
        self.n_clustered = start + segments * seg
        if self.n_clustered < end:  # a partial last segment
            self._cluster(self.n_clustered, end)

    def extend(self, n: int) -> None:
        super().extend(n)
        while self.n - self.n_clustered >= self.segment:  # a whole segment has arrived: cluster it
            self._cluster(self.n_clustered, self.n_clustered + self.segment)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.centroids, self.sizes, self.order, self.starts))

    def search(self, q: torch.Tensor, budget: int) -> Selection:
        lo, hi = self.config.candidate_range(self.n)
        if hi <= lo:
            return self.empty(q.device)
        Hkv, C = self.sizes.shape
        device = self.centroids.device
        qg = q.float().view(Hkv, self.group, -1).to(device)  # [Hkv, G, D]
        logits = torch.matmul(qg, self.centroids.transpose(1, 2)) * self.scale  # [Hkv, G, C]
        # sum over a cluster's keys of exp(scale q.k) ~ size x exp(scale q.c). (A Gaussian spread
        # term, + scale^2 s2 |q|^2 / 2, lowered the mass on real text: 0.838 against 0.846.)
        logits += torch.log(self.sizes.float().clamp(min=1e-30))[:, None]
        tail = self.keys[:, self.n_clustered:hi].float().to(device)  # [Hkv, T, D] unclustered candidates
        T = tail.shape[1]
        if T:
            logits = torch.cat([logits, torch.matmul(qg, tail.transpose(1, 2)) * self.scale], dim=-1)  # [Hkv, G, C+T]
        mass = torch.softmax(logits, dim=-1).sum(dim=1)  # [Hkv, C+T]: the group's estimated attention
        self.last_scored = C + T  # centroids and tail keys scored, per KV head
        sizes = torch.cat([self.sizes, torch.ones(Hkv, T, dtype=torch.int32, device=device)], dim=1)  # [Hkv, C+T]
        ranked = torch.argsort(mass, dim=-1, descending=True)  # [Hkv, C+T]
        taken = torch.cumsum(torch.gather(sizes, 1, ranked), dim=-1)  # tokens after each cluster
        keep = (taken - torch.gather(sizes, 1, ranked)) < budget  # clusters started before the budget ran out
        rows = []
        for h in range(Hkv):
            chosen = ranked[h][keep[h]]  # [c]
            clusters = chosen[chosen < C]
            begin, count = self.starts[h, clusters], self.sizes[h, clusters]  # [c] each
            within = torch.arange(int(count.sum()), device=device) - torch.repeat_interleave(
                torch.cumsum(count, 0) - count, count)  # position inside its cluster
            ids = torch.cat([self.order[h, torch.repeat_interleave(begin, count) + within],
                             (chosen[chosen >= C] - C + self.n_clustered).to(torch.int32)])
            ids = ids[(ids >= lo) & (ids < hi)]
            rows.append(ids.sort().values)
        width = max(1, max(r.numel() for r in rows))
        out = torch.zeros(Hkv, width, dtype=torch.int32, device=device)  # [Hkv, S]
        for h, r in enumerate(rows):
            out[h, :r.numel()] = r
        counts = torch.tensor([r.numel() for r in rows], dtype=torch.int32, device=device)
        return Selection(out.to(q.device), counts.to(q.device))
