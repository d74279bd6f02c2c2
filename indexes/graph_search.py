"""Numba kernels for the query-aware key graph: greedy beam search by inner product.

Keys are read in place from the KV cache. numba has no float16/bfloat16, so 16-bit caches are
passed as uint16 views and widened in-kernel (bf16 -> fp32 is a 16-bit shift). One call searches
every KV head of a layer in parallel (prange over heads); no Python loop runs per visited node.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
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


@njit(cache=True, inline="always")
def _score_bf16(keys, node, qg):
    """keys [N, D] uint16 holding bfloat16 bits."""
    best = -np.inf
    row = np.empty(qg.shape[1], np.uint32)
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


@njit(cache=True)
def _beam_search(keys, is_bf16, indptr, indices, entries, qg, lo, hi, n_tokens, ef, topk, out_ids, visited):
    """Best-first search; returns (number of results written, number of keys scored).

    Neighbours of a node: its graph edges (prompt tokens) and its sequence neighbours node - 1 and
    node + 1, which keep every token, decode tokens included, reachable without graph updates.
    """
    n_scored = 0
    cap = ef + 1
    # results: a bounded set kept as arrays (ef is small); candidates: a simple array-backed frontier
    res_ids = np.empty(cap, np.int64)
    res_sc = np.empty(cap, np.float64)
    n_res = 0
    cand_ids = np.empty(n_tokens + entries.shape[0] + 1, np.int64)
    cand_sc = np.empty(n_tokens + entries.shape[0] + 1, np.float64)
    n_cand = 0
    for e in entries:
        if e < 0 or visited[e]:
            continue
        visited[e] = True
        s = _score_bf16(keys, e, qg) if is_bf16 else _score_f32(keys, e, qg)
        n_scored += 1
        cand_ids[n_cand] = e
        cand_sc[n_cand] = s
        n_cand += 1
    while n_cand > 0:
        # pop the best candidate
        b = 0
        for i in range(1, n_cand):
            if cand_sc[i] > cand_sc[b]:
                b = i
        node, s = cand_ids[b], cand_sc[b]
        n_cand -= 1
        cand_ids[b], cand_sc[b] = cand_ids[n_cand], cand_sc[n_cand]
        # the worst kept result
        if n_res >= ef:
            w = 0
            for i in range(1, n_res):
                if res_sc[i] < res_sc[w]:
                    w = i
            if s < res_sc[w]:
                break  # no candidate can improve the results
        # keep node if it is a selectable candidate
        if lo <= node < hi:
            if n_res < ef:
                res_ids[n_res], res_sc[n_res] = node, s
                n_res += 1
            else:
                w = 0
                for i in range(1, n_res):
                    if res_sc[i] < res_sc[w]:
                        w = i
                if s > res_sc[w]:
                    res_ids[w], res_sc[w] = node, s
        n_graph = indptr.shape[0] - 1
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
            sc = _score_bf16(keys, nb, qg) if is_bf16 else _score_f32(keys, nb, qg)
            n_scored += 1
            cand_ids[n_cand], cand_sc[n_cand] = nb, sc
            n_cand += 1
    # top-k of the results, ids ascending
    order = np.argsort(-res_sc[:n_res])
    k = min(topk, n_res)
    chosen = np.sort(res_ids[order[:k]])
    for i in range(k):
        out_ids[i] = chosen[i]
    return k, n_scored


@njit(cache=True, parallel=True)
def search_heads(keys_f32, keys_u16, is_bf16, indptr, indices, entries, queries, lo, hi, n_tokens, ef, topk,
                 out_ids, out_counts, out_scored):
    """Search every KV head in parallel.

    keys_*: [Hkv, N, D] (one of them used), indptr [Hkv, N + 1], indices [Hkv, E], entries [Hkv, M],
    queries [Hkv, G, D] float32 (pre-scaled), outputs [Hkv, topk], [Hkv], [Hkv].
    """
    Hkv = queries.shape[0]
    for h in prange(Hkv):
        visited = np.zeros(n_tokens, np.bool_)
        if is_bf16:
            k, scored = _beam_search(keys_u16[h], True, indptr[h], indices[h], entries[h], queries[h], lo, hi,
                                     n_tokens, ef, topk, out_ids[h], visited)
        else:
            k, scored = _beam_search(keys_f32[h], False, indptr[h], indices[h], entries[h], queries[h], lo, hi,
                                     n_tokens, ef, topk, out_ids[h], visited)
        out_counts[h] = k
        out_scored[h] = scored
