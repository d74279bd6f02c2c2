"""Numba kernels for the query-aware key graph: greedy beam search by inner product.

Keys are read in place from the KV cache. numba has no float16/bfloat16, so 16-bit caches are
passed as uint16 views and widened in-kernel (bf16 -> fp32 is a 16-bit shift); an int8 cache is
scored on its codes and each key's scale (q . (c s) = s (q . c)), so only visited keys are read.
One call searches every KV head of a layer in parallel (prange over heads); no Python loop runs
per visited node.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always", fastmath=True)
def _score_f32(keys, node, qg):
    """max over the group's queries of q . k, keys [N, D] float32, qg [G, D]."""
    best = -np.inf
    for g in range(qg.shape[0]):
        s = 0.0
        for d in range(qg.shape[1]):
            s += qg[g, d] * keys[node, d]
        if s > best:
            best = s
    return best


KEYS_F32, KEYS_BF16, KEYS_INT8 = 0, 1, 2  # how a search reads its keys


@njit(cache=True, inline="always", fastmath=True)
def _score_int8(keys, scales, node, qg):
    """keys [N, D] int8 codes, scales [N] float32 (positive): max over the group of q . (codes * scale)."""
    return _score_f32(keys, node, qg) * scales[node]


@njit(cache=True, inline="always", fastmath=True)
def _score(keys, mode, scales, node, qg, row):
    if mode == KEYS_BF16:
        return _score_bf16(keys, node, qg, row)
    if mode == KEYS_INT8:
        return _score_int8(keys, scales, node, qg)
    return _score_f32(keys, node, qg)


@njit(cache=True, inline="always", fastmath=True)
def _score_bf16(keys, node, qg, row):
    """keys [N, D] uint16 holding bfloat16 bits; ``row`` a [D] uint32 scratch (no allocation per key)."""
    best = -np.inf
    for d in range(qg.shape[1]):
        row[d] = np.uint32(keys[node, d]) << np.uint32(16)
    kf = row.view(np.float32)
    for g in range(qg.shape[0]):
        s = 0.0
        for d in range(qg.shape[1]):
            s += qg[g, d] * kf[d]
        if s > best:
            best = s
    return best


@njit(cache=True, inline="always")
def _heap_push(sc, ids, size, score, node):
    """Push (score, node) on the min-heap held in sc/ids[:size]; returns the new size."""
    i = size
    sc[i], ids[i] = score, node
    while i > 0:
        parent = (i - 1) >> 1
        if sc[parent] <= sc[i]:
            break
        sc[parent], sc[i] = sc[i], sc[parent]
        ids[parent], ids[i] = ids[i], ids[parent]
        i = parent
    return size + 1


@njit(cache=True, inline="always")
def _heap_sift_down(sc, ids, size):
    """Restore the min-heap property after the root was replaced."""
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        child = left
        if left + 1 < size and sc[left + 1] < sc[left]:
            child = left + 1
        if sc[i] <= sc[child]:
            break
        sc[child], sc[i] = sc[i], sc[child]
        ids[child], ids[i] = ids[i], ids[child]
        i = child


@njit(cache=True, inline="always")
def _heap_pop(sc, ids, size):
    """Remove the root of the min-heap; returns the new size."""
    size -= 1
    sc[0], ids[0] = sc[size], ids[size]
    _heap_sift_down(sc, ids, size)
    return size


@njit(cache=True, fastmath=True)
def _beam_search(keys, mode, scales, indptr, indices, entries, qg, lo, hi, n_tokens, ef, topk, out_ids, visited):
    """Best-first search (HNSW's search-layer on one graph); returns (results written, keys scored).

    Two binary heaps: the frontier (a max-heap, stored negated) and the ef best selectable results
    (a min-heap whose root is the worst kept). The search stops when the best frontier node is
    worse than the worst result; a neighbour worse than the worst result is not queued. Neighbours
    of a node: its graph edges (prompt tokens) and its sequence neighbours node - 1 and node + 1,
    which keep every token, decode tokens included, reachable without graph updates.
    """
    n_scored = 0
    row = np.empty(qg.shape[1], np.uint32)  # bf16 widening scratch, reused for every key
    res_sc = np.empty(ef + 1, np.float64)
    res_ids = np.empty(ef + 1, np.int64)
    n_res = 0
    cap = n_tokens + entries.shape[0] + 1
    cand_sc = np.empty(cap, np.float64)  # negated scores: the root is the best candidate
    cand_ids = np.empty(cap, np.int64)
    n_cand = 0
    for e in entries:
        if e < 0 or visited[e]:
            continue
        visited[e] = True
        s = _score(keys, mode, scales, e, qg, row)
        n_scored += 1
        n_cand = _heap_push(cand_sc, cand_ids, n_cand, -s, e)
    n_graph = indptr.shape[0] - 1
    while n_cand > 0:
        s, node = -cand_sc[0], cand_ids[0]
        n_cand = _heap_pop(cand_sc, cand_ids, n_cand)
        if n_res >= ef and s < res_sc[0]:
            break  # no frontier node can improve the results
        if lo <= node < hi:
            if n_res < ef:
                n_res = _heap_push(res_sc, res_ids, n_res, s, node)
            elif s > res_sc[0]:
                res_sc[0], res_ids[0] = s, node
                _heap_sift_down(res_sc, res_ids, n_res)
        start = indptr[node] if node < n_graph else 0
        stop = indptr[node + 1] if node < n_graph else 0
        for j in range(start, stop + 2):
            if j < stop:
                nb = indices[j]
            elif j == stop:
                nb = node - 1
            else:
                nb = node + 1
            if nb < 0 or nb >= n_tokens or visited[nb]:
                continue
            visited[nb] = True
            sc = _score(keys, mode, scales, nb, qg, row)
            n_scored += 1
            if n_res < ef or sc > res_sc[0]:
                n_cand = _heap_push(cand_sc, cand_ids, n_cand, -sc, nb)
    # top-k of the results, ids ascending
    order = np.argsort(-res_sc[:n_res])
    k = min(topk, n_res)
    chosen = np.sort(res_ids[order[:k]])
    for i in range(k):
        out_ids[i] = chosen[i]
    return k, n_scored


@njit(cache=True, parallel=True, fastmath=True)
def search_heads(keys_f32, keys_u16, keys_i8, scales, mode, indptr, indices, entries, queries, lo, hi, n_tokens,
                 ef, topk, active, out_ids, out_counts, out_scored):
    """Search every KV head in parallel.

    keys_*: [Hkv, N, D] (the one ``mode`` names is used: KEYS_F32, KEYS_BF16 as uint16 bits, or
    KEYS_INT8 codes with ``scales`` [Hkv, N] float32), indptr [Hkv, N + 1], indices [Hkv, E],
    entries [Hkv, M], queries [Hkv, G, D] float32 (pre-scaled), active [Hkv] bool (a head split's
    retrieval heads; the others select nothing and score nothing), outputs [Hkv, topk], [Hkv], [Hkv].
    """
    Hkv = queries.shape[0]
    for h in prange(Hkv):
        if not active[h]:
            out_counts[h] = 0
            out_scored[h] = 0
            continue
        visited = np.zeros(n_tokens, np.bool_)
        if mode == KEYS_BF16:
            k, scored = _beam_search(keys_u16[h], mode, scales[h], indptr[h], indices[h], entries[h], queries[h],
                                     lo, hi, n_tokens, ef, topk, out_ids[h], visited)
        elif mode == KEYS_INT8:
            k, scored = _beam_search(keys_i8[h], mode, scales[h], indptr[h], indices[h], entries[h], queries[h],
                                     lo, hi, n_tokens, ef, topk, out_ids[h], visited)
        else:
            k, scored = _beam_search(keys_f32[h], mode, scales[h], indptr[h], indices[h], entries[h], queries[h],
                                     lo, hi, n_tokens, ef, topk, out_ids[h], visited)
        out_counts[h] = k
        out_scored[h] = scored
