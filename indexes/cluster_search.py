"""The cluster index's search and estimation zone as compiled CPU passes (numba): what
:class:`offload.indexes.cluster.ClusterIndex` runs each decode step on a CPU, where its tensor
forms would be ~100 small ops a layer. One call per layer does the whole search
(:func:`search_take`): the clusters' and tail keys' logits, the group's softmax mass, the ranking,
the take and, with the values at hand, the estimation zone.

Shapes: Hkv KV heads, G = H / Hkv, C clusters, T tail tokens (not yet clustered), M = C + T
entries, D head_dim.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from offload.kernels.cpu_decode import NO_SCORE, PREFETCH_AHEAD, exp_inplace, prefetch, prefetch2

BF16_PER_LINE = 32  # bf16 elements in a 64-byte cache line


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def centroid_logits(q, centroid, scale, log_size, row_bits, out):  # pragma: no cover - numba
    """out [G] <- scale q[g] . centroid + log_size for each query head: q [G, D], centroid [D] (bf16
    bits as uint16) widened once into row_bits [D] (uint32 scratch; the bf16 bits its high half)."""
    row = row_bits.view(np.float32)
    for d in range(row.shape[0]):
        row_bits[d] = np.uint32(centroid[d]) << 16
    for g in range(q.shape[0]):
        dot = np.float32(0.0)
        for d in range(row.shape[0]):
            dot += q[g, d] * row[d]
        out[g] = dot * scale + log_size


@njit(cache=True, fastmath=True, nogil=True)
def entry_logits(q, centroids, log_sizes, tail, scale, first, last, logits):  # pragma: no cover - numba
    """Logits of entries first..last-1 of one KV head (clusters 0..C-1, then the tail's keys): q [G,
    D], centroids [C, D] (bf16 bits as uint16), log_sizes [C], tail keys [T, D] (f32) -> logits [G,
    C+T] f32: scale q . c + log size for a cluster (its size x exp(scale q . c)), scale q . k for a
    tail key. The centroids are read once, in order (a cold index streams in at the memory's pace:
    a [D, C] layout read a block of clusters at a time was 3x slower cold, 64 strided streams)."""
    G, D = q.shape
    C = centroids.shape[0]
    row_bits = np.empty(D, np.uint32)  # one centroid widened to f32 (the bf16 bits its high half)
    for c in range(first, min(last, C)):
        centroid_logits(q, centroids[c], scale, log_sizes[c], row_bits, logits[:, c])
    for c in range(max(first, C), last):
        row = tail[c - C]
        for g in range(G):
            dot = np.float32(0.0)
            for d in range(D):
                dot += q[g, d] * row[d]
            logits[g, c] = dot * scale


@njit(cache=True, fastmath=True, nogil=True)
def head_mass(logits, mass):  # pragma: no cover - numba
    """One KV head's estimated attention per entry from its logits [G, C+T] (:func:`entry_logits`;
    overwritten) -> mass [C+T]: per query head the softmax over the entries, summed over the group
    and divided by G (a share of the group's attention: the entries sum to 1). What torch does as
    baddbmm + cat + softmax + sum."""
    G, M = logits.shape
    exp_bits = np.empty(M, np.int32)
    for c in range(M):
        mass[c] = 0.0
    for g in range(G):
        row = logits[g]
        m = row[0]
        for c in range(M):
            m = max(m, row[c])
        for c in range(M):
            row[c] -= m
        exp_inplace(row, exp_bits, M)
        total = np.float32(0.0)
        for c in range(M):
            total += row[c]
        norm = np.float32(1.0) / (total * G)
        for c in range(M):
            mass[c] += row[c] * norm


@njit(cache=True, nogil=True)
def rank_head(mass, k, ranked, share):  # pragma: no cover - numba
    """The k best entries of mass [M], best first, into ranked[:k] (ids) and share[:k] (their mass):
    a partition finds the k-th largest (O(M)), then only those k are sorted (ties by id)."""
    M = mass.shape[0]
    if k < M:
        threshold = np.partition(mass.copy(), M - k)[M - k]  # the k-th largest
        picked = np.empty(k, np.int64)
        m = 0
        for i in range(M):  # above the threshold, then as many equal to it as fit
            if mass[i] > threshold:
                picked[m] = i
                m += 1
        for i in range(M):
            if m == k:
                break
            if mass[i] == threshold:
                picked[m] = i
                m += 1
    else:
        picked = np.arange(M)
    best = np.argsort(-mass[picked], kind="mergesort")  # best first; equal shares by id
    for i in range(k):
        ranked[i] = picked[best[i]]
        share[i] = mass[ranked[i]]


@njit(cache=True, nogil=True)
def take_head(ranked, share, sizes, starts, order, n_clustered, lo, hi, budget, mass, floor,
               out):  # pragma: no cover - numba
    """One KV head: entries (clusters, then tail tokens) in ``ranked`` order (best first) taken
    while fewer than ``budget`` tokens are (and, with ``mass`` > 0, while the estimated ``share``
    of attention covered is below ``mass`` or fewer than ``floor`` tokens are taken); their token
    ids in [lo, hi) into out, cluster after cluster (each cluster's ascending: sorting them all cost
    ~45 us a layer at 32K and the gather no less time). sizes [C], starts [C+1], order [n_clustered].
    Returns (ids written, ranked entries taken, whether it stopped before running out of ranked
    entries)."""
    C = sizes.shape[0]
    taken, m, covered = 0, 0, 0.0
    half = PREFETCH_AHEAD // 2
    for i in range(ranked.shape[0]):
        if i + PREFETCH_AHEAD < ranked.shape[0] and ranked[i + PREFETCH_AHEAD] < C:  # a cluster's size and start
            prefetch(sizes, ranked[i + PREFETCH_AHEAD])
            prefetch(starts, ranked[i + PREFETCH_AHEAD])
        if i + half < ranked.shape[0] and ranked[i + half] < C and starts[ranked[i + half]] < order.shape[0]:
            prefetch(order, starts[ranked[i + half]])  # ... then its tokens (their start asked for earlier)
        j = ranked[i]
        if taken >= budget or (mass > 0 and covered >= mass and taken >= floor):
            return m, i, True
        covered += share[i]
        if j < C:
            for t in range(starts[j], starts[j] + sizes[j]):
                tok = order[t]
                if lo <= tok < hi:
                    out[m] = tok
                    m += 1
            taken += sizes[j]
        else:
            tok = j - C + n_clustered
            if lo <= tok < hi:
                out[m] = tok
                m += 1
            taken += 1
    return m, ranked.shape[0], False


@njit(cache=True, nogil=True)
def take_clusters(ranked, share, sizes, starts, order, n_clustered, lo, hi, budget, mass, floor,
                   out):  # pragma: no cover - numba
    """:func:`take_head` for every KV head: ranked, share [Hkv, k], sizes [Hkv, C], starts [Hkv,
    C+1], order [Hkv, n_clustered], out [Hkv, S] -> ids written per head [Hkv]."""
    counts = np.zeros(ranked.shape[0], np.int32)
    for h in range(ranked.shape[0]):
        counts[h] = take_head(ranked[h], share[h], sizes[h], starts[h], order[h], n_clustered, lo, hi, budget,
                               mass, floor, out[h])[0]
    return counts


@njit(cache=True, parallel=True, fastmath=True)
def search_take(q, centroids, log_sizes, tail, scale, sizes, starts, order, n_clustered, lo, hi, budget, p,
                 floor, k, parts, mass, cluster_logits, out, counts, estimate, vsums, edge_cluster, edge_values,
                 edge_from, est_out, est_lse):  # pragma: no cover - numba
    """A whole CPU search in two parallel passes: :func:`entry_logits` scores the clusters and tail
    keys (q [Hkv, G, D], centroids [Hkv, C, D] bf16 bits, log_sizes [Hkv, C], tail [Hkv, T, D] ->
    cluster_logits [Hkv, G, C]), then per KV head :func:`head_mass` (-> mass [Hkv, C+T]), the
    best k entries are ranked and :func:`take_head` takes them (a head that runs out of them
    before it is done ranks all of them); its ids into out [Hkv, S], how many into counts [Hkv].
    Returns the estimation zone [Hkv, Z] int64: per head the clusters ranked after the ones it took
    (tail tokens left out), -1 padded. Where ``estimate`` [Hkv] (uint8) says so, the head's zone is
    estimated at once, while its logits are in cache (:func:`head_estimate` with vsums [Hkv, C, D],
    edge_cluster [Hkv, E], edge_values [Hkv, E, D] from entry ``edge_from`` on -> est_out [Hkv, G,
    D], est_lse [Hkv, G]; -inf elsewhere). What torch.topk, the take and the zone's tensor ops cost ~0.2 ms more for."""
    Hkv, G, _ = q.shape
    M = mass.shape[1]
    C = sizes.shape[1]
    # Scored in parts, every head's entries cut in `parts` ranges (one per thread): 3 KV heads on 2
    # threads would leave one thread a head alone (a third of the search on one core)
    span = (M + parts - 1) // parts
    logits = np.empty((Hkv, G, M), np.float32)  # [Hkv, G, C+T]
    for task in prange(Hkv * parts):
        h, part = task // parts, task % parts
        entry_logits(q[h], centroids[h], log_sizes[h], tail[h], scale, part * span, min(M, (part + 1) * span),
                      logits[h])
    ranked = np.empty((Hkv, M), np.int64)  # [Hkv, M] best first, the first ranked_n[h]
    share = np.empty((Hkv, M), np.float32)
    zones = np.empty((Hkv, M), np.int64)  # [Hkv, M] each head's zone, its first zone_n[h] (M is 8K at 128K)
    zone_n = np.zeros(Hkv, np.int64)
    entry_id = np.arange(M)  # every entry scored: its place is its id
    for h in prange(Hkv):
        cluster_logits[h] = logits[h, :, :C]
        head_mass(logits[h], mass[h])
        counts[h], zone_n[h] = finish_head(mass[h], entry_id, k, sizes[h], starts[h], order[h], n_clustered, lo, hi,
                                           budget, p, floor, ranked[h], share[h], out[h], zones[h], estimate[h],
                                           cluster_logits[h], log_sizes[h], vsums[h], edge_cluster[h, edge_from:],
                                           edge_values[h, edge_from:], est_out[h], est_lse[h])
    return padded_zone(zones, zone_n)


@njit(cache=True, nogil=True)
def finish_head(mass, entry_id, k, sizes, starts, order, n_clustered, lo, hi, budget, p, floor, ranked, share, out,
                zone, estimate, cluster_logits, log_sizes, vsums, edge_cluster, edge_values, est_out,
                est_lse):  # pragma: no cover - numba
    """One KV head's search after scoring: the best k of the scored entries' mass [M'] ranked
    (their ids: entry_id [M'] -> a cluster, or C + a tail token's place), taken by
    :func:`take_head` into out (a head that runs out of them before it is done ranks all of them),
    the clusters ranked after the taken ones into zone, and with ``estimate`` the zone estimated
    (:func:`head_estimate`; est_lse -inf otherwise). ranked, share: scratch of >= M'. Returns (ids
    written, zone length)."""
    M = mass.shape[0]
    C = sizes.shape[0]
    n_ranked = min(k, M)
    for attempt in range(2):
        rank_head(mass, n_ranked, ranked, share)
        for i in range(n_ranked):
            ranked[i] = entry_id[ranked[i]]
        m, u, done = take_head(ranked[:n_ranked], share[:n_ranked], sizes, starts, order, n_clustered, lo, hi,
                               budget, p, floor, out)
        if done or n_ranked == M:
            break
        n_ranked = M  # the best clusters were small: rank them all
    z = 0
    for i in range(u, n_ranked):
        if ranked[i] < C:
            zone[z] = ranked[i]
            z += 1
    if estimate:
        head_estimate(cluster_logits, log_sizes, sizes, vsums, zone[:z], edge_cluster, edge_values, est_out, est_lse)
    else:
        est_lse[:] = -np.inf
    return m, z


@njit(cache=True, nogil=True)
def padded_zone(zones, zone_n):  # pragma: no cover - numba
    """Each head's zone, zones[h, :zone_n[h]], as one [Hkv, Z] int64 array, -1 padded."""
    zone = np.full((zones.shape[0], zone_n.max()), -1, np.int64)  # [Hkv, Z]
    for h in range(zones.shape[0]):
        zone[h, :zone_n[h]] = zones[h, :zone_n[h]]
    return zone


@njit(cache=True, fastmath=True, nogil=True)
def listed_logits(q, centroids, log_sizes, ids, scale, logits, cluster_logits):  # pragma: no cover - numba
    """:func:`entry_logits` for the clusters listed in ids [n] (q [G, D], centroids [C, D] bf16 bits,
    log_sizes [C]) -> logits [G, :n] in list order, and each into cluster_logits [G, C] at its id."""
    D = q.shape[1]
    row_bits = np.empty(D, np.uint32)  # one centroid widened to f32
    for i in range(ids.shape[0]):
        if i + PREFETCH_AHEAD < ids.shape[0]:  # the listed clusters lie anywhere: start their reads early
            ahead = ids[i + PREFETCH_AHEAD]
            for d in range(0, D, BF16_PER_LINE):
                prefetch2(centroids, ahead, d)
            prefetch(log_sizes, ahead)
            for g in range(q.shape[0]):
                prefetch2(cluster_logits, g, ahead)
        c = ids[i]
        centroid_logits(q, centroids[c], scale, log_sizes[c], row_bits, logits[:, i])
        for g in range(q.shape[0]):
            cluster_logits[g, c] = logits[g, i]


@njit(cache=True, parallel=True, fastmath=True)
def search_take_tree(q, centroids, log_sizes, tail, scale, sizes, starts, order, n_clustered, lo, hi, budget, p,
                     floor, k, want, visit_share, supers, super_log_sizes, members, member_starts, blocked, scored_n,
                     mass,
                     cluster_logits, out, counts, estimate, vsums, edge_cluster, edge_values, edge_from, est_out,
                     est_lse):  # pragma: no cover - numba
    """:func:`search_take` through a second level, for a long context where scoring every centroid is
    the step: the clusters 0..blocked-1 are grouped (k-means of their centroids) into super-clusters,
    supers [Hkv, S, D] (bf16 bits; the mean key of their tokens), super_log_sizes [Hkv, S] (log of
    their tokens), their clusters members [Hkv, blocked] listed super after super from member_starts
    [Hkv, S+1]. Per head the supers are scored and ranked by the group's softmax over them; the
    clusters of the best ones are scored (``want`` clusters, or with ``visit_share`` > 0 fewer once
    the supers visited hold that share of the supers' softmax; the ungrouped newest always) with
    the tail's keys, and the supers left out join the softmax as one entry each (their share
    of attention counts, their clusters are neither taken nor estimated); scored_n [Hkv] <- the
    supers and clusters each head scored. mass [Hkv, C+T] is 0 and
    cluster_logits [Hkv, G, C] unwritten for the clusters not scored. Arguments and results else as
    :func:`search_take`'s."""
    Hkv, G, D = q.shape
    C = sizes.shape[1]
    T = tail.shape[1]
    S = supers.shape[1]
    zones = np.empty((Hkv, C), np.int64)
    zone_n = np.zeros(Hkv, np.int64)
    for h in prange(Hkv):
        super_logits = np.empty((G, S), np.float32)  # [G, S]
        entry_logits(q[h], supers[h], super_log_sizes[h], tail[h, :0], scale, 0, S, super_logits)
        super_mass = np.empty(S, np.float32)
        head_mass(super_logits.copy(), super_mass)
        visited = np.zeros(S, np.bool_)
        cand = np.empty(C + T, np.int64)  # scored entries' ids: clusters (the ungrouped, then the best supers'), tail
        nc = 0
        for c in range(blocked, C):
            cand[nc] = c
            nc += 1
        covered = np.float32(0.0)
        for s in np.argsort(-super_mass):
            if nc >= want or (visit_share > 0 and covered >= visit_share and nc > 0):
                break
            covered += super_mass[s]
            visited[s] = True
            for j in range(member_starts[h, s], member_starts[h, s + 1]):
                cand[nc] = members[h, j]
                nc += 1
        for t in range(T):
            cand[nc + t] = C + t
        scored_n[h] = S + nc
        left = S - visited.sum()
        logits = np.empty((G, nc + T + left), np.float32)  # [G, scored clusters + tail + supers left out]
        listed_logits(q[h], centroids[h], log_sizes[h], cand[:nc], scale, logits, cluster_logits[h])
        entry_logits(q[h], centroids[h, :0], log_sizes[h, :0], tail[h], scale, 0, T, logits[:, nc:nc + T])
        u = nc + T
        for s in range(S):
            if not visited[s]:
                logits[:, u] = super_logits[:, s]
                u += 1
        scored = np.empty(nc + T + left, np.float32)
        head_mass(logits, scored)
        mass[h] = 0.0
        for i in range(nc + T):
            mass[h, cand[i]] = scored[i]
        ranked = np.empty(nc + T, np.int64)
        share = np.empty(nc + T, np.float32)
        counts[h], zone_n[h] = finish_head(scored[:nc + T], cand[:nc + T], k, sizes[h], starts[h], order[h],
                                           n_clustered, lo, hi, budget, p, floor, ranked, share, out[h], zones[h],
                                           estimate[h], cluster_logits[h], log_sizes[h], vsums[h],
                                           edge_cluster[h, edge_from:], edge_values[h, edge_from:], est_out[h],
                                           est_lse[h])
    return padded_zone(zones, zone_n)


@njit(cache=True, fastmath=True, nogil=True)
def head_estimate(cluster_logits, log_sizes, sizes, vsums, zone, edge_cluster, edge_values, est_out,
                   est_lse):  # pragma: no cover - numba
    """One KV head's estimation zone on its own: the search's cluster_logits [G, C] (scale q . c +
    log size, :func:`entry_logits`), log_sizes [C], sizes [C] int32, vsums [C, D] (bf16 bits as
    uint16), zone [Z] int64 (-1: none), the clustered tokens attended exactly anyway (their
    clusters edge_cluster [E] int32, values edge_values [E, D] f32: taken out of their clusters'
    size and sum) -> est_out [G, D]: the zone's value means weighted by size x exp(scale q . c),
    and est_lse [G]: the log of those weights' sum (-inf: nothing to estimate)."""
    G, D = est_out.shape
    C = sizes.shape[0]
    Z = zone.shape[0]
    size = np.zeros(Z, np.float32)  # tokens estimated: the cluster's, less those attended exactly
    vsum_bits = np.zeros((Z, D), np.uint32)
    vsum = vsum_bits.view(np.float32)  # [Z, D]
    shift = np.zeros(Z, np.float32)  # log(size left) - log(size): 0 but where tokens were taken out
    place = np.full(C, -1, np.int64)  # cluster -> its place in the zone
    for z in range(Z):
        if z + PREFETCH_AHEAD < Z and zone[z + PREFETCH_AHEAD] >= 0:  # the zone's clusters lie anywhere
            for d in range(0, D, BF16_PER_LINE):
                prefetch2(vsums, zone[z + PREFETCH_AHEAD], d)
        c = zone[z]
        if c >= 0:
            size[z] = sizes[c]
            for d in range(D):  # bf16 bits -> f32
                vsum_bits[z, d] = np.uint32(vsums[c, d]) << 16
            place[c] = z
    for e in range(edge_cluster.shape[0]):
        z = place[edge_cluster[e]]
        if z >= 0:
            size[z] -= 1.0
            vsum[z] -= edge_values[e]
    for z in range(Z):
        if zone[z] >= 0 and 0.5 < size[z] < sizes[zone[z]]:
            shift[z] = np.log(size[z]) - log_sizes[zone[z]]
    weights = np.empty(Z, np.float32)
    exp_bits = np.empty(Z, np.int32)
    for g in range(G):
        est_out[g] = 0.0
        m = NO_SCORE
        for z in range(Z):
            if size[z] > 0.5:  # the cluster's logit, its size less the tokens attended exactly
                weights[z] = cluster_logits[g, zone[z]] + shift[z]
                m = max(m, weights[z])
            else:
                weights[z] = NO_SCORE
        if m == NO_SCORE:
            est_lse[g] = -np.inf
            continue
        for z in range(Z):
            weights[z] -= m
        exp_inplace(weights, exp_bits, Z)
        total = np.float32(0.0)
        for z in range(Z):
            if size[z] > 0.5:
                total += weights[z]
                share = weights[z] / size[z]
                for d in range(D):
                    est_out[g, d] += share * vsum[z, d]
        for d in range(D):
            est_out[g, d] /= total
        est_lse[g] = m + np.log(total)


@njit(cache=True, fastmath=True, nogil=True)
def merge_estimate(out, lse, est_out, est_lse):  # pragma: no cover - numba
    """out [Hkv, G, D] and lse [Hkv, G] (the exact part) <- merged with an estimate (est_out,
    est_lse, :func:`head_estimate`) by log-sum-exp, in place (-inf on either side: the other)."""
    Hkv, G, D = out.shape
    for h in range(Hkv):
        for g in range(G):
            e = est_lse[h, g]
            if not np.isfinite(e):
                continue  # nothing estimated
            exact = lse[h, g]
            m = max(exact, e) if np.isfinite(exact) else e
            keep = np.exp(exact - m) if np.isfinite(exact) else np.float32(0.0)
            add = np.exp(e - m)
            total = keep + add
            for d in range(D):
                out[h, g, d] = (keep * out[h, g, d] + add * est_out[h, g, d]) / total
            lse[h, g] = m + np.log(total)


@njit(cache=True, parallel=True)
def zone_estimates(cluster_logits, log_sizes, sizes, vsums, zone, edge_cluster, edge_values, est_out,
                   est_lse):  # pragma: no cover - numba
    """:func:`head_estimate` for every KV head (in parallel; its arguments with a KV head first,
    [Hkv, ...]) -> est_out [Hkv, G, D], est_lse [Hkv, G]: for a search that did not have the values
    at hand (:func:`search_take` estimates as it ranks otherwise)."""
    for h in prange(zone.shape[0]):
        head_estimate(cluster_logits[h], log_sizes[h], sizes[h], vsums[h], zone[h], edge_cluster[h],
                      edge_values[h], est_out[h], est_lse[h])
