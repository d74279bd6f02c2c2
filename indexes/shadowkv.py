"""ShadowKV (Sun et al., 2024): low-rank pre-RoPE keys, chunk landmarks and outlier chunks.

At build time the prompt's keys are un-rotated (RoPE is a rotation, so rotating by -position
recovers the pre-RoPE keys exactly) and factored once across all KV heads, K_pre [n, Hkv*D] ~
U [n, r] @ SV [r, Hkv*D], with the rank r chosen from the spectrum (the smallest r keeping
``energy`` of the squared singular values, at most ``max_rank``); ``compression`` reports
Hkv*D / r. The prompt is cut into chunks of ``chunk`` tokens; each chunk's landmark is the mean of
its post-RoPE keys. Chunks whose keys are poorly summarised by their landmark (lowest minimum
cosine similarity, ``outlier_fraction`` of them) are outliers and always attended exactly.

Each decode step scores the landmarks (softmax over chunks per query head, summed over the group),
takes the best chunks for the budget, and attends over them with keys rebuilt from U and SV and
rotated at their true positions (:func:`offload.kernels.shadowkv_attention`), values from the
cache; sinks, window, outliers and decode tokens that left the window go through exact gather
attention; the two partial results are merged exactly by log-sum-exp.
"""

from __future__ import annotations

import torch

from offload.kernels import gather_attention, merge_attention, shadowkv_attention
from offload.kernels.reference import gather_rows, rope_rotate

from .base import KVIndex, Selection, register


@register
class ShadowKVIndex(KVIndex):
    name = "shadowkv"
    learned = ("rank", "compression", "u", "sv", "prompt_len", "first_chunk_token", "num_chunks", "landmarks",
               "outliers")
    chunk = 8
    energy = 0.999
    max_rank = 160
    outlier_fraction = 0.01

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.exact_ids: torch.Tensor | None = None  # [Hkv, E] outliers and uncovered tokens of the last search
        self.chunks_taken = 0  # chunks the last search selected (host-side: attend() reads no device count)

    def build(self, keys: torch.Tensor, n: int, queries: torch.Tensor | None = None) -> None:
        super().build(keys, n, queries)
        inv_freq, scaling = self.ctx.rope
        Hkv, _, D = keys.shape
        positions = torch.arange(n, device=keys.device)
        pre = rope_rotate(keys[:, :n].float(), -positions, inv_freq, 1.0 / scaling)  # [Hkv, n, D] pre-RoPE
        flat = pre.transpose(0, 1).reshape(n, Hkv * D)  # [n, Hkv*D]
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        energy = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
        rank = int(torch.searchsorted(energy, torch.tensor(self.energy, dtype=torch.float64)).item()) + 1
        self.rank = min(rank, self.max_rank, len(s))
        self.compression = Hkv * D / self.rank
        self.u = (u[:, :self.rank] * s[:self.rank]).to(keys.dtype).contiguous()  # [n, r]
        self.sv = vh[:self.rank].to(keys.dtype).contiguous()  # [r, Hkv*D]
        self.prompt_len = n
        lo, hi = self.config.candidate_range(n)
        self.first_chunk_token = lo
        num_chunks = max(0, (hi - lo) // self.chunk)  # whole chunks inside the candidates
        self.num_chunks = num_chunks
        if num_chunks == 0:
            self.landmarks = torch.zeros(Hkv, 0, D, device=keys.device)
            self.outliers = torch.zeros(Hkv, 0, dtype=torch.long, device=keys.device)
            return
        blocks = keys[:, lo:lo + num_chunks * self.chunk].float().view(Hkv, num_chunks, self.chunk, D)
        self.landmarks = blocks.mean(dim=2)  # [Hkv, C, D] post-RoPE
        cos = torch.nn.functional.cosine_similarity(blocks, self.landmarks[:, :, None], dim=-1)  # [Hkv, C, chunk]
        n_out = int(round(self.outlier_fraction * num_chunks))
        self.outliers = torch.topk(-cos.amin(-1), n_out, dim=-1).indices if n_out else torch.zeros(
            Hkv, 0, dtype=torch.long, device=keys.device)  # [Hkv, n_out] chunk numbers

    @classmethod
    def estimate_nbytes(cls, args, context: int, dtype_bytes: int) -> int:
        # U factors (context x rank, in the KV dtype) + one fp32 landmark per chunk per KV head, every layer
        per_layer = context * cls.max_rank * dtype_bytes + args.num_kv_heads * (context // cls.chunk) * args.head_dim * 4
        return args.num_layers * per_layer

    def extra_ids(self) -> torch.Tensor | None:
        return self.exact_ids

    def nbytes(self) -> int:
        return (self.u.numel() + self.sv.numel()) * self.u.element_size() + self.landmarks.numel() * 4

    def _chunk_tokens(self, chunks: torch.Tensor) -> torch.Tensor:
        """chunk numbers [Hkv, M] -> token ids [Hkv, M * chunk], ascending."""
        base = chunks * self.chunk + self.first_chunk_token
        return (base[..., None] + torch.arange(self.chunk, device=chunks.device)).flatten(1).sort(-1).values

    def search(self, q: torch.Tensor, budget: int) -> Selection:
        """The chunks to rebuild (the selection); outliers and uncovered tokens are in ``exact_ids``."""
        Hkv, G = self.num_kv_heads, self.group
        lo, hi = self.config.candidate_range(self.n)
        # Tokens no chunk covers and that are outside the dense part: the prompt's ragged tail
        # before the window, and decode tokens that have left the window.
        covered_end = self.first_chunk_token + self.num_chunks * self.chunk
        extra = torch.arange(max(covered_end, lo), hi, device=q.device)
        outlier_ids = self._chunk_tokens(self.outliers)  # [Hkv, n_out * chunk]
        self.exact_ids = torch.cat([outlier_ids, extra.expand(Hkv, -1)], dim=-1).to(torch.int32)  # [Hkv, E]
        take = max(0, min(self.num_chunks - self.outliers.shape[-1], budget // self.chunk))
        self.chunks_taken = take  # host-side, so attend() needs no read of the counts from the device
        if take == 0:
            return self.empty(q.device)
        scores = torch.matmul(q.float().view(Hkv, G, -1), self.landmarks.transpose(-1, -2)) * self.scale  # [Hkv,G,C]
        weight = torch.softmax(scores, dim=-1).sum(1)  # [Hkv, C]
        if self.outliers.shape[-1]:
            weight.scatter_(1, self.outliers, float("-inf"))  # outliers are attended exactly anyway
        chunks = torch.topk(weight, take, dim=-1).indices  # [Hkv, take]
        ids = self._chunk_tokens(chunks).to(torch.int32)  # [Hkv, take * chunk]
        return Selection(ids.contiguous(), torch.full((Hkv,), ids.shape[-1], dtype=torch.int32, device=q.device))

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n: int,
               selection: Selection, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """q [H, D]; keys/values [Hkv, N, D] -> (out [H, D], lse [H])."""
        Hkv = self.num_kv_heads
        exact = self.exact_ids
        counts = torch.full((1, Hkv), exact.shape[-1], dtype=torch.int32, device=q.device)
        if exact.shape[-1] == 0:
            exact = torch.zeros(Hkv, 1, dtype=torch.int32, device=q.device)
        seq = torch.tensor([n], dtype=torch.int32, device=q.device)
        dense_out, dense_lse = gather_attention(q[None], keys[None], values[None], exact[None], counts, seq,
                                                scale=self.scale, sink=self.config.sink, window=self.config.window,
                                                backend=backend)  # [1, H, D], [1, H]
        if self.chunks_taken == 0:
            return dense_out[0], dense_lse[0]
        v_sel = gather_rows(values[None], selection.ids[None])  # [1, Hkv, S, D] (fed from host memory)
        inv_freq, scaling = self.ctx.rope
        rec_out, rec_lse = shadowkv_attention(q[None], self.u[None], self.sv[None], v_sel, selection.ids[None],
                                              selection.counts[None], inv_freq, scale=self.scale,
                                              attention_scaling=scaling, backend=backend)
        out, lse = merge_attention(torch.stack([dense_out, rec_out]), torch.stack([dense_lse, rec_lse]),
                                   backend=backend)
        return out[0], lse[0]
