"""Sparse decode attention: the attention seam with a KV selection policy in the decode loop.

Prefill is exact (dense). At the first decode step of a sequence, each sparse layer builds its
index over the prompt's keys; every step the index picks the tokens each KV head attends besides
the sinks and the recent window, and :func:`offload.kernels.gather_attention` (Triton on GPU,
on CPU a numba kernel that reads the listed rows where they lie, int8 codes included) attends to
exactly those. The first ``dense_layers`` layers stay dense.
The KV lives in a :class:`~offload.tiers.kv_store.KVStore`: with ``kv_offload`` the sparse layers'
KV is in host memory and only the attended rows cross to the device, gathered by the store.
A sliding-window model's row longer than its window attends exactly over the window instead
(what the model sees is only those tokens; the selection must not reach beyond them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from offload.attention import ForwardBatch, attend_with_lse
from offload.config import ModelArgs
from offload.kernels import gather_attention
from offload.kernels.api import dense_id_lists
from offload.kernels.reference import dense_token_ids
from offload.tiers.budget import format_size
from offload.tiers.kv_store import KVStore

from .base import QUERY_STRIDE, IndexContext, KVIndex, Selection, SelectionConfig, check_disk_policy, make_index, policy_class
from .dense import FUSED_DECODE_DEVICES, DenseAttention, DensePlan
from .heads import CALIBRATION_QUERIES, retrieval_heads
from .telemetry import Telemetry

PROGRESS_FROM_TOKENS = 16384  # index builds over prompts this long show a progress bar


@dataclass
class SparsePlan(DensePlan):
    """Per decode step, from :meth:`SparseAttention.begin`: rows beyond a sliding window, the rows'
    lengths on the KV device, and (kv_offload / a quantized KV) the sinks' and window's token ids
    every layer gathers."""

    beyond_window: list[bool] | None = None
    seq_lens: torch.Tensor | None = None  # [B] int32
    dense_ids: tuple[torch.Tensor, torch.Tensor] | None = None  # ([B, Nd], [B, Nd])
    dense_lists: np.ndarray | None = None  # [B, Nd] int32, -1: none (the CPU's compiled gather)


class SparseAttention(DenseAttention):
    def __init__(self, args: ModelArgs, device: torch.device, dtype: torch.dtype, policy: str,
                 config: SelectionConfig, ctx: IndexContext | None = None, telemetry: bool = False,
                 kernel_backend: str = "auto", kv_offload: bool = False, store: KVStore | None = None):
        # kv_offload: the sparse layers' KV lives in host memory (pinned on a GPU), where the CPU-side
        # indexes search it; each step only the sinks, the window and the selection cross to the
        # device. The dense layers' KV stays on the device. Prefill fetches a layer's prefix per chunk.
        if store is None:
            host_layers = range(config.dense_layers, args.num_layers) if kv_offload else ()
            store = KVStore(args, device, dtype, host_layers=host_layers)
        super().__init__(args, device, dtype, store)
        self.device = torch.device(device)  # where attention computes (index builds use it too)
        self.kv_offload = kv_offload
        self.policy_cls = policy_class(policy)
        if self.kv.disk_layers:
            check_disk_policy(policy)
        self.policy, self.config, self.kernel_backend = policy, config, kernel_backend
        self.indexes: dict[tuple[int, int], KVIndex] = {}  # (row, layer) -> index
        self.ctx = ctx if ctx is not None else IndexContext.for_model(args, device)
        self.keep_queries = self.policy_cls.needs_prefill_queries
        self.rows_movable = self.policy_cls.persistable
        self.prefill_queries: dict[tuple[int, int], list[torch.Tensor]] = {}  # (row, layer) -> [H, Tq, D] chunks
        # A head split's calibration: (row, layer) -> (tokens prefilled, the prompt's last queries [H, C, D])
        self.tail_queries: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}
        self.telemetry = Telemetry() if telemetry else None
        # Text-aware indexes (SentenceKV) see each row's token ids and which ids end a sentence.
        self.keep_tokens = self.policy_cls.needs_token_ids
        self.row_tokens: dict[int, list[int]] = {}

    def allocate(self, batch_size: int, capacity: int) -> None:
        super().allocate(batch_size, capacity)
        self.indexes.clear()  # a new batch of sequences
        self.prefill_queries.clear()
        self.tail_queries.clear()
        self.row_tokens.clear()

    def begin(self, batch: ForwardBatch) -> None:
        super().begin(batch)
        if self.keep_tokens:
            if batch.token_ids is None:
                raise ValueError(f"kv_policy '{self.policy}' needs the token ids in every ForwardBatch")
            for row, start, ids in zip(batch.rows, batch.start_lengths, batch.token_ids):
                tokens = self.row_tokens.setdefault(row, [])
                del tokens[start:]  # a row prefilled again from an earlier point
                tokens.extend(ids)
        if not batch.is_decode:
            return
        # A sliding-window model's row longer than its window sees only the last `sliding_window`
        # tokens: few enough to attend exactly, and a selection must not reach beyond them.
        window = self.args.sliding_window
        plan: SparsePlan = batch.plan
        plan.beyond_window = [window is not None and n > window for n in batch.end_lengths]
        for row, n, beyond in zip(batch.rows, batch.start_lengths, plan.beyond_window):
            if not beyond:  # lengths only grow: a row beyond the window never needs its index
                self.build_indexes(row, n)
            else:  # nor the prompt queries kept for its build
                for layer in range(self.config.dense_layers, self.args.num_layers):
                    self.prefill_queries.pop((row, layer), None)
        plan.seq_lens = torch.tensor(batch.end_lengths, device=self.kv.device, dtype=torch.int32)  # [B]
        plan.dense_lists = dense_id_lists(tuple(batch.end_lengths), self.config.sink, self.config.window)  # [B, Nd]
        if self._fetches_rows():  # the always-attended ids, the same for every layer this step
            lengths = torch.tensor(batch.end_lengths, device="cpu" if self.kv_offload else self.kv.device)  # [B]
            plan.dense_ids = dense_token_ids(lengths, self.config.sink, self.config.window)  # ([B, Nd], [B, Nd])

    def new_plan(self) -> SparsePlan:
        return SparsePlan()

    def build_indexes(self, row: int, n: int) -> None:
        """Build every sparse layer's index of cache row ``row`` over its first n tokens (once)."""
        a = self.args
        layers = [layer for layer in range(self.config.dense_layers, a.num_layers) if (row, layer) not in self.indexes]
        # a long prompt's index takes minutes on a CPU: show it
        for layer in tqdm(layers, desc=f"{self.policy} index over {n:,} tokens ({self.device.type})", unit="layer",
                          disable=n < PROGRESS_FROM_TOKENS or not layers, leave=False):
            self._build_index(row, layer, n)

    def _build_index(self, row: int, layer: int, n: int) -> None:
        keys, values = self.kv.rows(layer, row)
        idx = self._new_index(row, self._retrieval_heads(row, layer, n, keys))
        chunks = self.prefill_queries.pop((row, layer), None)
        if not idx.needs_prefill_queries:
            chunks = None  # a key-only index is built from the keys alone
        queries = torch.cat(chunks, dim=1) if chunks else None  # [H, Nq, D]
        idx.build(keys, n, queries)
        idx.summarize_values(values)
        self.indexes[(row, layer)] = idx
        self._lay_out(layer, idx)

    @contextmanager
    def prefill_pass(self, layer: int, start: int, upto: int, last: bool = True) -> Iterator[None]:
        """A disk layer's index is built at the end of its last layer-major pass, while the prompt's
        rows are in memory: its keys are not read back from disk, and the rows are written in the
        index's order from there (built after the prompt, they would all be read back first)."""
        with self.kv.prefill_pass(layer, start, upto):
            yield
            row = 0  # the disk tier holds one sequence
            if last and layer in self.kv.disk_layers and (row, layer) not in self.indexes and not (
                    self.args.sliding_window is not None and upto > self.args.sliding_window):
                self._build_index(row, layer, upto)

    def _lay_out(self, layer: int, idx: KVIndex) -> None:
        """A disk layer's KV in the index's order, where the index has one (clusters: a selection is
        a few runs of extents); the store does nothing when the order has not grown."""
        if layer in self.kv.disk_layers:
            order = idx.disk_order()
            if order is not None:
                self.kv.lay_out(layer, order)

    def _retrieval_heads(self, row: int, layer: int, n: int, keys) -> torch.Tensor | None:
        """A head split's retrieval heads [Hkv] bool from the prompt's last queries (None: no split
        asked, or the queries kept are not the last n tokens': then every head selects)."""
        tail = self.tail_queries.pop((row, layer), None)
        if self.config.head_split is None or tail is None or tail[0] != n:
            return None
        c = self.config
        return retrieval_heads(tail[1], keys, n, c.sink, c.window, self.args.softmax_scale, c.head_split)

    def _new_index(self, row: int, heads: torch.Tensor | None = None) -> KVIndex:
        return make_index(self.policy, self.ctx, self.config, self.row_tokens[row] if self.keep_tokens else None,
                          heads)

    def settings(self) -> dict:
        # a 4-bit KV is held two ways (KIVI in memory, int8 keys + 4-bit values on disk): a prompt cache
        # of one must not restore into the other
        disk_rows = {"kv_disk_rows": self.kv.kv_dtype} if self.kv.disk_layers and self.kv.kivi is not None else {}
        return {"kv_policy": self.policy, "selection": asdict(self.config), "kv_dtype": self.kv.kv_dtype} | disk_rows

    def index_states(self, row: int) -> dict[int, tuple[dict, dict[str, torch.Tensor]]]:
        """What each layer's index of ``row`` learned, for a prompt cache: layer -> (scalars, tensors)."""
        return {layer: idx.state() for (r, layer), idx in sorted(self.indexes.items()) if r == row}

    def restore_row(self, row: int, token_ids: list[int], layers: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    index_states: dict[int, tuple[dict, dict[str, torch.Tensor]]] | None = None) -> None:
        if self.keep_tokens:
            self.row_tokens[row] = list(token_ids)
        super().restore_row(row, token_ids, layers, index_states)

    def restore_layer(self, row: int, layer: int, k: torch.Tensor, v: torch.Tensor, state: tuple | None) -> None:
        """The layer's KV, then its index from the saved state; a disk layer holds its rows in memory
        meanwhile, so that they are written once, in the index's order (else in token order, then
        read back and written again at the first step)."""
        with self.kv.prefill_pass(layer, 0, k.shape[1]):
            self.kv.restore_layer(layer, row, k, v)
            if state is not None:
                keys, values = self.kv.rows(layer, row)
                idx = self._new_index(row)
                idx.restore(keys, *state)
                idx.summarize_values(values)
                self.indexes[(row, layer)] = idx
                self._lay_out(layer, idx)

    def release_row(self, row: int) -> None:
        for key in [key for key in self.indexes if key[0] == row]:
            del self.indexes[key]
        for key in [key for key in self.prefill_queries if key[0] == row]:
            del self.prefill_queries[key]
        for key in [key for key in self.tail_queries if key[0] == row]:
            del self.tail_queries[key]
        self.row_tokens.pop(row, None)

    def move_row(self, src: int, dst: int, token_ids: list[int]) -> None:
        """The KV moves in place; each index is rebuilt on the new row from its saved state (an
        index reads its keys where they lie), and the prompt queries kept for a build move along."""
        states = self.index_states(src)
        queries = {layer: self.prefill_queries.pop((row, layer))
                   for (row, layer) in [key for key in self.prefill_queries if key[0] == src]}
        tails = {layer: self.tail_queries.pop((row, layer))
                 for (row, layer) in [key for key in self.tail_queries if key[0] == src]}
        super().move_row(src, dst, token_ids)
        self.release_row(src)
        self.release_row(dst)
        self.prefill_queries.update({(dst, layer): q for layer, q in queries.items()})
        self.tail_queries.update({(dst, layer): t for layer, t in tails.items()})
        if self.keep_tokens:
            self.row_tokens[dst] = list(token_ids)
        for layer, (scalars, tensors) in states.items():
            idx = self._new_index(dst)
            idx.restore(self.kv.rows(layer, dst)[0], scalars, tensors)
            self.indexes[(dst, layer)] = idx

    def forward(self, layer, q, k, v, batch):
        if not batch.is_decode or layer < self.config.dense_layers:
            if self.keep_queries and not batch.is_decode and layer >= self.config.dense_layers:
                start = batch.start_lengths[0]
                keep = q[0, :, (-start) % QUERY_STRIDE::QUERY_STRIDE]  # [H, Tq, D] positions % stride == 0
                where = self.kv.layer_devices[layer]  # kept beside the keys the index is built from
                self.prefill_queries.setdefault((batch.rows[0], layer), []).append(keep.to(where, copy=True))
            if self.config.head_split is not None and not batch.is_decode and layer >= self.config.dense_layers:
                self._keep_tail(layer, q, batch)
            return super().forward(layer, q, k, v, batch)
        self.kv.write(layer, k, v, batch)
        B, H, _, D = q.shape
        beyond = batch.plan.beyond_window  # [B] rows that attend exactly within the model's sliding window
        if all(beyond):
            return self._decode(layer, q, batch)
        kv_device = self.kv.layer_devices[layer]
        q_search = q[:, :, 0].to(kv_device)  # [B, H, D] where the keys and the index are
        selections: list[Selection] = []
        for row, n, windowed in zip(batch.rows, batch.end_lengths, beyond):
            if windowed:  # nothing selected: its sparse result is replaced by the exact one below
                selections.append(Selection(torch.zeros(self.args.num_kv_heads, 0, dtype=torch.int32, device=kv_device),
                                            torch.zeros(self.args.num_kv_heads, dtype=torch.int32, device=kv_device)))
                continue
            idx = self.indexes[(row, layer)]
            idx.extend(n)
            self._lay_out(layer, idx)
            selections.append(idx.select(q_search[row], self.config.budget_tokens(n)))
        sparse_row = beyond.index(False)
        estimated = False  # whether the attention merged the indexes' estimates already
        if self.indexes[(batch.rows[sparse_row], layer)].attend is not None:
            # the policy attends itself (e.g. ShadowKV's rebuilt keys)
            outs = [torch.zeros(H, D, dtype=q.dtype, device=kv_device) if windowed else
                    self.indexes[(row, layer)].attend(q_search[row], *self.kv.rows(layer, row), n, sel,
                                                      self.kernel_backend)[0]
                    for row, n, sel, windowed in zip(batch.rows, batch.end_lengths, selections, beyond)]
            out, lse = torch.stack(outs).to(q.device), None  # [B, H, D] (such a policy estimates nothing)
        elif self._fetches_rows():
            out, lse = self._attend_fetched(layer, q[:, :, 0], batch, selections)  # [B, H, D] only the attended rows move
        elif (arrays := self.kv.host_arrays(layer)) is not None and self.kernel_backend in ("auto", "numba"):
            # the CPU's compiled gather where the rows lie, checked against the cache's views only
            selected, counts = _stack_selections(selections, q.device)  # [B, Hkv, S], [B, Hkv]
            estimate = self._estimate_parts(layer, batch) if self.policy_cls.add_estimate is not None else None
            out, lse = arrays.gather(q[:, :, 0], batch.plan.dense_lists, selected.numpy(), counts.numpy(),
                                     self.args.softmax_scale, estimate)  # [B, H, D], [B, H]
            estimated = estimate is not None
        else:  # the rows are read where they lie (a GPU's kernel; torch's where asked, or for an fp16 cache)
            selected, counts = _stack_selections(selections, q.device)  # [B, Hkv, S], [B, Hkv]
            k, v, k_scale, v_scale = self.kv.whole_cache(layer, B)  # [B, Hkv, N, D] each (+ [B, Hkv, N] scales)
            out, lse = gather_attention(q[:, :, 0], k, v, selected, counts, batch.plan.seq_lens,
                                      scale=self.args.softmax_scale, sink=self.config.sink, window=self.config.window,
                                      k_scale=k_scale, v_scale=v_scale, backend=self.kernel_backend)  # [B, H, D]
        if self.policy_cls.add_estimate is not None and not estimated:  # what the selection left out, estimated
            self._add_estimates(layer, q_search, batch, out, lse)
        if any(beyond):  # a batch of rows on both sides of the window
            exact = self._decode(layer, q, batch).view(B, H, D)
            out = torch.where(torch.tensor(beyond, device=q.device)[:, None, None], exact, out)  # [B, H, D]
        else:
            self._observe(layer, q_search, batch, selections, out)
        return out.view(B, H, 1, D)

    def _keep_tail(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> None:
        """The last CALIBRATION_QUERIES prompt queries of each head (q [1, H, T, D] this chunk's),
        for the head split at the build; a row prefilled again from an earlier point starts over."""
        row, start = batch.rows[0], batch.start_lengths[0]
        end, tail = self.tail_queries.get((row, layer), (0, q[0, :, :0]))
        if end != start:
            tail = q[0, :, :0]
        tail = torch.cat([tail, q[0].to(tail.device)], dim=1)[:, -CALIBRATION_QUERIES:]  # [H, <= C, D]
        self.tail_queries[(row, layer)] = (start + q.shape[2], tail.clone())

    def _fetches_rows(self) -> bool:
        """Whether sparse layers copy their attended rows out of the store (host-tier KV, an int8 KV
        where no kernel reads its codes in place, a KIVI KV) rather than attend where the rows lie."""
        in_place = self.kv.device.type in FUSED_DECODE_DEVICES and self.kernel_backend in ("auto", "numba") \
            and self.kv.kernel_readable
        return self.kv_offload or bool(self.kv.disk_layers) or (self.kv.quantized and not in_place)

    def _attend_fetched(self, layer: int, q: torch.Tensor, batch: ForwardBatch,
                        selections: list[Selection]) -> torch.Tensor:
        """Attention of q [B, H, D] over a layer whose KV is in the host tier, or quantized where no
        kernel reads int8 codes in place (a GPU): gather the sinks, the window and each head's
        selection where the KV lives, send (and dequantize) only those rows, attend exactly."""
        a = self.args
        B, Hkv, D = q.shape[0], a.num_kv_heads, a.head_dim
        where = self.kv.layer_devices[layer]  # ids are built where the KV is: no host round trip on a GPU
        dense_ids, dense_valid = (t.to(where) for t in batch.plan.dense_ids)  # [B, Nd] each, from begin()
        width = max(s.ids.shape[-1] for s in selections)
        selected = torch.zeros(B, Hkv, width, dtype=torch.long, device=where)  # [B, Hkv, S]
        counts = torch.zeros(B, Hkv, dtype=torch.long, device=where)  # [B, Hkv]
        for b, s in enumerate(selections):
            selected[b, :, :s.ids.shape[-1]] = s.ids.to(where)
            counts[b] = s.counts.to(where)
        ids = torch.cat([dense_ids[:, None].expand(B, Hkv, -1), selected], dim=-1)  # [B, Hkv, M]
        valid = torch.cat([dense_valid[:, None].expand(B, Hkv, -1),
                           torch.arange(width, device=where) < counts[..., None]], dim=-1)  # [B, Hkv, M]
        k_rows, v_rows = self.kv.gather(layer, ids)  # [B, Hkv, M, D] each, on the device
        lookahead = self.kv.lookahead_tokens(layer, width)
        if lookahead:  # a disk layer (one row): read what the next step likely adds while this one computes
            idx = self.indexes[(batch.rows[0], layer)]
            ahead = idx.lookahead(lookahead)
            if ahead is not None and idx.heads is not None:  # streaming heads read nothing past their window
                ahead = ahead.masked_fill(~idx.heads.to(ahead.device)[:, None], -1)
            if ahead is not None:
                self.kv.prefetch(layer, ahead)
        visible = valid.to(q.device)[:, :, None, :]  # [B, Hkv, 1, M]
        out, lse = attend_with_lse(q.view(B, Hkv, a.group_size, D), k_rows, v_rows, a.softmax_scale,
                                   visible)  # [B, Hkv, G, D], [B, Hkv, G]
        return out.reshape(B, a.num_heads, D), lse.reshape(B, a.num_heads)

    def _add_estimates(self, layer: int, q: torch.Tensor, batch: ForwardBatch, out: torch.Tensor,
                       lse: torch.Tensor) -> None:
        """Merge into the exact part over sinks, window and selection, out [B, H, D] with its lse
        [B, H] (in place), each row's index's estimate of what the selection left out (rows beyond a
        sliding window, attended exactly, get none). q [B, H, D] where the index searches."""
        for b, (row, n, windowed) in enumerate(zip(batch.rows, batch.end_lengths, batch.plan.beyond_window)):
            if not windowed:
                self.indexes[(row, layer)].add_estimate(q[b], self.kv.rows(layer, row)[1], n, out[b], lse[b])

    def _estimate_parts(self, layer: int, batch: ForwardBatch) -> tuple[np.ndarray, np.ndarray] | None:
        """The rows' indexes' estimates for the CPU's attention to merge (KVIndex.estimate_parts): (out
        [B, H, D], lse [B, H]) fp32, lse -inf for a row beyond a sliding window; None where an index has
        none ready (add_estimate merges after the attention then)."""
        parts = []
        for row, windowed in zip(batch.rows, batch.plan.beyond_window):
            part = None if windowed else self.indexes[(row, layer)].estimate_parts(self.kv.rows(layer, row)[1])
            if part is None and not windowed:
                return None
            parts.append(part)
        H, D = self.args.num_heads, self.args.head_dim
        if len(parts) == 1:  # one row: its arrays as they are
            return parts[0][0].reshape(1, H, D), parts[0][1].reshape(1, H)
        est_out = np.zeros((len(parts), H, D), np.float32)  # [B, H, D]
        est_lse = np.full((len(parts), H), -np.inf, np.float32)  # [B, H]
        for b, part in enumerate(parts):
            if part is not None:
                est_out[b], est_lse[b] = part[0].reshape(H, D), part[1].reshape(H)
        return est_out, est_lse

    def _observe(self, layer: int, q: torch.Tensor, batch: ForwardBatch, selections: list[Selection],
                 out: torch.Tensor) -> None:
        if self.telemetry is None:
            return
        for b, (row, n) in enumerate(zip(batch.rows, batch.end_lengths)):
            idx = self.indexes[(row, layer)]
            sel = selections[b]
            extra = idx.extra_ids()  # tokens a policy attends besides its selection
            if extra is not None and extra.shape[-1]:
                ids = torch.cat([sel.ids[:, :int(sel.counts.max())], extra], dim=-1)
                sel = Selection(ids, sel.counts + extra.shape[-1])
            keys, values = self.kv.rows(layer, row)  # [Hkv, N, D] each
            self.telemetry.observe(layer, q[row], keys, values, n, sel, out[b].to(keys.device),
                                   self.config, self.args.softmax_scale, self.config.budget_tokens(n),
                                   streaming=idx.streaming_heads)

    def _kv_where(self) -> str:
        disk = self.kv.disk_tier
        if self.kv.disk_layers:
            return (f", sparse layers' KV on disk in {disk.folder} (read through a {format_size(disk.cache_bytes)} "
                    f"cache of extents, read-ahead {'on' if disk.read_ahead else 'off'})")
        return ", sparse layers' KV in host memory" if self.kv_offload else ""

    def describe(self) -> str:
        c = self.config
        budget = f"{c.budget:.1%} of context" if c.budget < 1 else f"{int(c.budget)} tokens"
        if c.mass is not None:
            budget = (f"adaptive p{c.mass:g} (up to {budget})" if self.policy_cls.adaptive else
                      f"{budget} (no mass estimate for an adaptive p{c.mass:g})")
        split = ("" if c.head_split is None else
                 f", streaming heads (at most {c.head_split:.0%} of their attention beyond sinks + window over the "
                 f"prompt's last {CALIBRATION_QUERIES} queries) keep sinks + window alone")
        return (f"kv_policy {self.policy}: {budget} + {c.sink} sinks + {c.window} recent, "
                f"layers 0..{c.dense_layers - 1} dense" + split
                + self._kv_where()
                + (f", index build's query-key products on {self.device.type}"
                   if self.policy_cls.needs_prefill_queries else ""))


def _stack_selections(selections: list[Selection], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' selections as one batch: ids [B, Hkv, S] int32 (valid up to counts), counts [B, Hkv]. One
    row's are its own tensors, viewed (the usual decode of a single sequence: no copies)."""
    if len(selections) == 1:
        s = selections[0]
        return s.ids.to(device, torch.int32)[None], s.counts.to(device)[None]
    width = max(s.ids.shape[-1] for s in selections)
    selected = torch.zeros(len(selections), *selections[0].ids.shape[:-1], width, dtype=torch.int32,
                           device=device)  # [B, Hkv, S]
    for b, s in enumerate(selections):
        selected[b, :, :s.ids.shape[-1]] = s.ids
    return selected, torch.stack([s.counts.to(device) for s in selections])
