"""Retrieval heads and streaming heads (RazorAttention, DuoAttention), found without training.

Most attention heads of a long-context model look only at the first tokens and the recent ones;
a few (the retrieval heads) reach across the whole context. A streaming head loses little by
keeping sinks + window alone, and then costs no index search, no selection and no KV fetch: only
the retrieval heads pay for sparse attention. DuoAttention learns the split by optimisation and
RazorAttention finds it from echo and induction scores; here it is measured on the text at hand,
per sequence and per KV head: over the prompt's last ``CALIBRATION_QUERIES`` queries, the share of
each group's attention that falls beyond the sinks and the window. A head at most
``SelectionConfig.head_split`` of it is a streaming head.

The prompt's last queries are the closest to the decode queries that follow (the question of a
prompt comes last), and the mean over them is what a streaming head would lose per step.
"""

from __future__ import annotations

import torch

from offload.tiers.kv_store import KVRows

CALIBRATION_QUERIES = 64  # the prompt's last positions whose queries measure the split, every head


def beyond_window_share(queries: torch.Tensor, keys: KVRows | torch.Tensor, n: int, sink: int, window: int,
                        scale: float) -> torch.Tensor:
    """queries [H, C, D] at positions n - C .. n - 1 (post-RoPE), keys [Hkv, N, D] of which n are
    cached -> [Hkv] float32: the mean over the C queries and the group's heads of the attention share
    on tokens beyond the sinks and the window (what the query at position p would not see with sinks
    + window alone: ids in [sink, p + 1 - window))."""
    H, C, D = queries.shape
    Hkv = keys.shape[0]
    G = H // Hkv
    positions = torch.arange(n - C, n).repeat(G)  # [G C] each row's position, head-major within the group
    kpos = torch.arange(n)  # [n]
    visible = kpos[None, :] <= positions[:, None]  # [G C, n] causal
    beyond = (kpos[None, :] >= sink) & (kpos[None, :] < positions[:, None] + 1 - window)  # [G C, n]
    share = torch.empty(Hkv)
    for h in range(Hkv):  # one KV head at a time: the scores of C x G queries over n keys
        k = keys[h, :n].float()  # [n, D]
        q = queries[h * G:(h + 1) * G].float().reshape(G * C, D).to(k.device)  # [G C, D]
        scores = (q @ k.T).mul_(scale).masked_fill_(~visible.to(k.device), float("-inf"))  # [G C, n]
        probs = torch.softmax(scores, dim=-1)  # [G C, n]
        share[h] = (probs * beyond.to(k.device)).sum(-1).mean().cpu()
    return share


def retrieval_heads(queries: torch.Tensor, keys: KVRows | torch.Tensor, n: int, sink: int, window: int,
                    scale: float, threshold: float) -> torch.Tensor:
    """[Hkv] bool: the KV heads whose share beyond sinks + window (:func:`beyond_window_share`) is
    above ``threshold``; the others are streaming heads."""
    return beyond_window_share(queries, keys, n, sink, window, scale) > threshold
