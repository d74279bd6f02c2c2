"""Per-step, per-layer cost of a selection policy, measured against exact attention.

For every sparse layer and decode step: recall@budget against the exact twin's selection of the
same size, the true attention mass the attended set (dense part + selection) captures, and the
relative L2 error of the attention output against dense attention over every cached token.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from offload.kernels.reference import dense_token_ids

from .base import Selection, SelectionConfig


class Telemetry:
    def __init__(self) -> None:
        self.records: dict[int, list[dict[str, float]]] = defaultdict(list)

    def observe(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n: int,
                selection: Selection, out: torch.Tensor, config: SelectionConfig, scale: float, budget: int,
                streaming: int = 0) -> None:
        """q [H, D]; keys/values [Hkv, N, D] (n valid); out [H, D] the sparse attention output;
        ``streaming``: the layer's KV heads that keep sinks + window alone (a head split's).

        Recall@budget: the share of the exact twin's ``budget`` best candidates that were selected
        (a policy that selects nothing scores 0)."""
        Hkv, _, D = keys.shape
        G = q.shape[0] // Hkv
        qg = q.view(Hkv, G, D)
        scores = torch.matmul(qg, keys[:, :n].transpose(-1, -2)).float() * scale  # [Hkv, G, n]
        probs = torch.softmax(scores, dim=-1)  # [Hkv, G, n]
        dense_out = torch.matmul(probs.to(values.dtype), values[:, :n]).float().view(-1, D)  # [H, D]
        attended = torch.zeros(Hkv, n, dtype=torch.bool, device=q.device)  # [Hkv, n]
        ids, valid = dense_token_ids(torch.tensor([n], device=q.device), config.sink, config.window)
        attended[:, ids[0][valid[0]]] = True
        counts = selection.counts.tolist()
        exact_hits, total = 0, 0
        mass = probs.sum(dim=1)  # [Hkv, n] the group's attention to each key
        lo, hi = config.candidate_range(n)
        for h, c in enumerate(counts):
            chosen = selection.ids[h, :c].long()
            attended[h, chosen] = True
            if hi > lo:
                best = torch.topk(mass[h, lo:hi], min(budget, hi - lo)).indices + lo
                exact_hits += len(set(best.tolist()) & set(chosen.tolist()))
                total += len(best)
        captured = (probs * attended[:, None]).sum(-1).mean().item()
        err = ((out.float() - dense_out).norm() / dense_out.norm().clamp_min(1e-12)).item()
        self.records[layer].append({"recall": exact_hits / total if total else 1.0, "mass": captured,
                                    "output_error": err, "selected": sum(counts) / len(counts), "context": n,
                                    "streaming": streaming / Hkv})

    def summary(self) -> dict[str, float | dict[int, dict[str, float]]]:
        """Means per layer and over all layers and steps."""
        # selected: tokens per KV head (an adaptive budget's use); streaming: the share of KV heads a
        # head split left with sinks + window alone
        keys = ("recall", "mass", "output_error", "selected", "streaming")
        per_layer = {layer: {k: sum(r[k] for r in rs) / len(rs) for k in keys}
                     for layer, rs in sorted(self.records.items())}
        everything = [r for rs in self.records.values() for r in rs]
        overall = {k: (sum(r[k] for r in everything) / len(everything) if everything else float("nan"))
                   for k in keys}
        return {**overall, "per_layer": per_layer}

    def clear(self) -> None:
        self.records.clear()
