"""SentenceKV (Zhu et al., 2025): sentence-level semantic vectors select whole sentences.

The prompt is cut at sentence boundaries, where the model's own tokenizer says a token ends a
sentence (``Tokenizer.sentence_end_ids``: text ending in . ! ? or holding a line break); runs
with no boundary are split every ``max_sentence`` tokens so that a sentence stays a unit worth
fetching. Each sentence keeps one semantic vector per KV head, the mean of its post-RoPE keys
(small: one vector per sentence, on the device); the token KV stays where the cache is (host
memory when offloaded). Each decode step scores the sentence vectors against the query group,
and whole sentences are fetched best first until the token budget is spent. Decode tokens join
sentences as they arrive (the open sentence's vector is a running mean).

Scoring: a sentence's vector v_s gives q.v_s = the mean of q.k over its tokens, so
softmax_s(scale q.v_s), summed over the query group, ranks sentences by the attention each of
their tokens is expected to receive (mass per budget token), which is what a token budget buys.
"""

from __future__ import annotations

import torch

from .base import KVIndex, Selection, register


@register
class SentenceIndex(KVIndex):
    name = "sentence"
    needs_token_ids = True
    searches_on_host = True  # the budget is filled sentence by sentence in numpy
    learned = ("starts", "lengths", "sums", "num_sentences", "last_ended")
    max_sentence = 16
    max_misses = 32  # stop filling the budget after this many sentences in a row did not fit

    @classmethod
    def estimate_nbytes(cls, args, context: int, dtype_bytes: int) -> int:
        # one fp32 key sum per sentence (~12 tokens on English text) per KV head, every layer
        return args.num_layers * args.num_kv_heads * (context // 12 + 1) * args.head_dim * 4

    def build(self, keys: torch.Tensor, n: int, queries: torch.Tensor | None = None) -> None:
        super().build(keys, n, queries)
        if self.token_ids is None or len(self.token_ids) < n:
            raise ValueError("the sentence policy needs the token ids of the sequence (given at construction)")
        Hkv, N, D = keys.shape
        ends = torch.tensor([t in self.ctx.sentence_end_ids for t in self.token_ids[:n]], dtype=torch.bool)  # [n]
        # A new sentence starts after an ending token, and every max_sentence tokens within a run.
        flag = torch.zeros(n, dtype=torch.bool)  # [n]
        flag[0] = True
        flag[1:] = ends[:-1]
        run = torch.cumsum(flag.long(), 0) - 1  # [n] run id
        run_start = torch.nonzero(flag).squeeze(1)  # [R]
        offset = torch.arange(n) - run_start[run]  # [n] position within the run
        flag |= offset % self.max_sentence == 0
        sent = torch.cumsum(flag.long(), 0) - 1  # [n] sentence id of each token
        starts = torch.nonzero(flag).squeeze(1)  # [S]
        S = len(starts)
        cap = max(2 * S, 64)
        self.starts = torch.zeros(cap, dtype=torch.long)  # [cap] first token of each sentence
        self.starts[:S] = starts
        self.lengths = torch.zeros(cap, dtype=torch.long)  # [cap]
        self.lengths[:S] = torch.bincount(sent, minlength=S)
        self.sums = torch.zeros(Hkv, cap, D, dtype=torch.float32, device=keys.device)  # [Hkv, cap, D]
        self.sums[:, :S].index_add_(1, sent.to(keys.device), keys[:, :n].float())
        self.num_sentences = S
        self.last_ended = bool(ends[-1])

    def _grow(self) -> None:
        cap = self.starts.shape[0] * 2
        self.starts = torch.cat([self.starts, torch.zeros_like(self.starts)])
        self.lengths = torch.cat([self.lengths, torch.zeros_like(self.lengths)])
        self.sums = torch.cat([self.sums, torch.zeros_like(self.sums)], dim=1)
        assert self.starts.shape[0] == cap

    def extend(self, n: int) -> None:
        for pos in range(self.n, n):
            s = self.num_sentences - 1
            if self.last_ended or self.lengths[s] >= self.max_sentence:
                if self.num_sentences == self.starts.shape[0]:
                    self._grow()
                s = self.num_sentences
                self.num_sentences += 1
                self.starts[s] = pos
            self.lengths[s] += 1
            self.sums[:, s] += self.keys[:, pos].float()  # [Hkv, D]
            self.last_ended = self.token_ids[pos] in self.ctx.sentence_end_ids
        super().extend(n)

    def nbytes(self) -> int:
        return self.num_sentences * (self.sums.shape[0] * self.sums.shape[2] * 4 + 16)

    def search(self, q: torch.Tensor, budget: int) -> Selection:
        lo, hi = self.config.candidate_range(self.n)
        if hi <= lo:
            return self.empty(q.device)
        if budget >= hi - lo:
            return self.all_candidates(lo, hi, q.device)
        S, Hkv = self.num_sentences, self.num_kv_heads
        starts, lengths = self.starts[:S], self.lengths[:S]  # [S]
        first = torch.clamp(starts, min=lo)  # [S] candidate part of each sentence
        cost = torch.clamp(torch.clamp(starts + lengths, max=hi) - first, min=0)  # [S] tokens it would take
        vectors = self.sums[:, :S] / lengths.clamp(min=1)[None, :, None].to(self.sums)  # [Hkv, S, D]
        qg = q.float().view(Hkv, self.group, -1)  # [Hkv, G, D]
        logits = torch.matmul(qg, vectors.transpose(-1, -2)) * self.scale  # [Hkv, G, S]
        logits = logits.masked_fill((cost == 0)[None, None], float("-inf"))
        score = torch.softmax(logits, dim=-1).sum(dim=1)  # [Hkv, S]
        order = torch.argsort(score, dim=-1, descending=True).numpy()  # [Hkv, S]
        cost_np = cost.numpy()
        counts = torch.zeros(Hkv, dtype=torch.int32)
        rows = []
        for h in range(Hkv):
            # Whole sentences, best first; one that no longer fits is skipped for smaller ones.
            left, chosen, misses = budget, [], 0
            for s in order[h]:
                c = cost_np[s]
                if 0 < c <= left:
                    chosen.append(s)
                    left, misses = left - c, 0
                elif c > 0:
                    misses += 1
                if left == 0 or misses == self.max_misses:
                    break
            chosen = torch.tensor(chosen, dtype=torch.long)  # [k] sentence ids
            lens = cost[chosen]  # [k]
            base = torch.repeat_interleave(first[chosen] - (torch.cumsum(lens, 0) - lens), lens)  # [T]
            ids = (base + torch.arange(int(lens.sum()))).sort().values  # [T] token ids, in memory order
            rows.append(ids)
            counts[h] = len(ids)
        width = max(1, int(counts.max()))
        out = torch.zeros(Hkv, width, dtype=torch.int32)  # [Hkv, S]
        for h, ids in enumerate(rows):
            out[h, :len(ids)] = ids.to(torch.int32)
        return Selection(out.to(q.device), counts.to(q.device))
