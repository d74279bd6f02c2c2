"""Decode speed and selection quality of every KV policy against context length, in one run.

For each context: the prompt (real text) is prefilled once and every policy decodes from that same
KV cache, so all policies see the same keys and the figures are comparable. Per policy: index
build time, decode ms/token (median of ``--steps`` greedy steps, no telemetry), then
``--telemetry-steps`` more steps with telemetry (attention mass, recall@budget, output error vs
exact attention, keys scored per search), and the index's memory. Writes JSON, a Markdown table
and a plot of ms/token against context per policy.

Contexts beyond the model's trained positions (SmolLM2: 8,192) are allowed here for speed and
index measurements; they are flagged in the output. ``--rounds R`` times the policies in turns (each
``steps / R`` steps a turn, every backend built first): on a machine whose speed drifts over minutes,
policies timed one after another compare the drift.

    python -m offload.profiles.bench_context --contexts 4096 8192 16384 32768 \\
        --policies dense retrieval shadowkv quest streaming sentence --out bench_context.json
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import torch
from tqdm import tqdm

from offload.attention import ForwardBatch
from offload.config import DENSE_LAYERS
from offload.fileio import write_json_atomic
from offload.indexes.dense import DenseAttention

from .bench_generate import _real_text_ids


def _shared_backend(llm, config, ctx, kv_offload: bool, store):
    """The backend a shared prefill runs through: ``store`` (a KVStore, e.g. one with a disk tier)
    or a new one; its policy keeps what the policies after it need (a disk store serves only
    policies that read a selection in runs: cluster's then)."""
    from offload.indexes.backend import SparseAttention

    policy = "cluster" if store is not None and store.disk_layers else "retrieval"
    return SparseAttention(llm.args, llm.device, llm.dtype, policy, config, ctx, kv_offload=kv_offload, store=store)


def prefill_shared(llm, ids: list[int], capacity: int, config, keep_queries: bool = True, kv_offload: bool = False,
                   store=None):
    """Prefill once with a backend that keeps what every policy needs (prefill queries, token ids).
    ``keep_queries=False`` when no query-aware policy follows (they take memory at long contexts)."""
    from offload.indexes.base import IndexContext

    ctx = IndexContext.for_model(llm.args, llm.device, llm.tokenizer.sentence_end_ids())
    shared = _shared_backend(llm, config, ctx, kv_offload, store)
    shared.keep_tokens = True
    shared.keep_queries = keep_queries
    shared.allocate(1, capacity)
    llm.engine.backend = shared
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = llm.engine.prefill(0, ids)  # [V]
    return shared, logits, time.perf_counter() - t0


# Synthetic KV (speed only): each KV head's pre-RoPE keys are drawn around SYNTHETIC_TOPICS centres,
# in runs of tokens that share one (text stays on a topic for a while), then rotated at their
# positions like real keys; values are Gaussian. Search and attention costs depend on the data only
# through such structure (how many keys a graph search visits, how clusters form), not on meaning.
SYNTHETIC_TOPICS = 256
SYNTHETIC_RUN_TOKENS = (8, 256)  # a topic lasts this many tokens (uniform)
SYNTHETIC_CHUNK = 16384  # tokens generated and written at a time


@torch.inference_mode()
def synthetic_shared(llm, ctx: int, capacity: int, config, keep_queries: bool = True,
                     kv_offload: bool = False, seed: int = 0, store=None):
    """Like :func:`prefill_shared`, for latency only: the KV of a ``ctx``-token prompt is filled with
    synthetic keys and values (and, for query-aware policies, synthetic prompt queries near the
    keys' topics) instead of running the model, so that decode at 64K-128K can be timed on a CPU
    without hours of prefill. Returns (shared backend, None, fill seconds)."""
    from offload.indexes.base import IndexContext

    index_ctx = IndexContext.for_model(llm.args, llm.device, llm.tokenizer.sentence_end_ids())
    shared = _shared_backend(llm, config, index_ctx, kv_offload, store)
    shared.keep_tokens, shared.keep_queries = True, keep_queries
    shared.allocate(1, capacity)
    llm.engine.backend = shared
    t0 = time.perf_counter()
    fill_synthetic_kv(shared, llm, ctx, config.dense_layers if keep_queries else None, seed)
    return shared, None, time.perf_counter() - t0


def fill_synthetic_kv(backend, llm, ctx: int, queries_from: int | None = None, seed: int = 0,
                      layer_passes: bool = False) -> None:
    """Write a ``ctx``-token synthetic KV into row 0 of ``backend`` (allocated), a layer at a time,
    with synthetic prompt queries for layers from ``queries_from`` (None: none) and the token ids
    when the backend keeps them. ``layer_passes``: each layer is written inside
    ``backend.prefill_pass``, as a layer-major prefill writes it (a disk layer held in memory for
    the pass, its index built at the end; no prompt queries are then kept for the pass's build)."""
    from contextlib import nullcontext

    from offload.indexes.base import QUERY_STRIDE
    from offload.kernels.reference import rope_rotate

    a = llm.args
    g = torch.Generator().manual_seed(seed)
    inv_freq, scaling = (t.cpu() if isinstance(t, torch.Tensor) else t for t in backend.ctx.rope)
    Hkv, D, G = a.num_kv_heads, a.head_dim, a.group_size
    token_ids = torch.randint(0, a.vocab_size, (ctx,), generator=g).tolist()
    if backend.keep_tokens:
        backend.row_tokens[0] = token_ids
    # topic of each token: runs of random length
    runs = torch.randint(*SYNTHETIC_RUN_TOKENS, (ctx // SYNTHETIC_RUN_TOKENS[0] + 1,), generator=g)
    topic_of_run = torch.randint(0, SYNTHETIC_TOPICS, runs.shape, generator=g)
    topic = torch.repeat_interleave(topic_of_run, runs)[:ctx]  # [ctx]
    for layer in tqdm(range(a.num_layers), desc=f"synthetic KV, {ctx:,} tokens", unit="layer", disable=None):
        centres = torch.randn(Hkv, SYNTHETIC_TOPICS, D, generator=g) * 1.5  # [Hkv, topics, D]
        bias = torch.randn(Hkv, 1, D, generator=g) * 2  # a direction all keys share, as real keys do
        with backend.prefill_pass(layer, 0, ctx) if layer_passes else nullcontext():
            for start in range(0, ctx, SYNTHETIC_CHUNK):
                end = min(ctx, start + SYNTHETIC_CHUNK)
                pos = torch.arange(start, end)
                pre = centres[:, topic[start:end]] + bias + torch.randn(Hkv, end - start, D, generator=g)  # [Hkv, T, D]
                k = rope_rotate(pre, pos, inv_freq, scaling)  # [Hkv, T, D]
                v = torch.randn(Hkv, end - start, D, generator=g)  # [Hkv, T, D]
                batch = ForwardBatch.prefill(0, start, end - start, llm.device)
                backend.kv.write(layer, k[None].to(llm.device, llm.dtype), v[None].to(llm.device, llm.dtype), batch)
        if queries_from is not None and layer >= queries_from:  # every QUERY_STRIDE-th position, like a prefill
            pos = torch.arange(0, ctx, QUERY_STRIDE)
            pre = centres[:, topic[pos]].repeat_interleave(G, 0) + torch.randn(Hkv * G, len(pos), D, generator=g)
            q = rope_rotate(pre, pos, inv_freq, scaling)  # [H, Tq, D]
            backend.prefill_queries[(0, layer)] = [q.to(backend.kv.layer_devices[layer], llm.dtype)]


def backend_for(policy: str, llm, shared, config):
    from offload.indexes.backend import SparseAttention

    if policy == "dense":  # the same KV for every policy: the shared backend's store
        return DenseAttention(llm.args, llm.device, llm.dtype, store=shared.kv)
    backend = SparseAttention(llm.args, llm.device, llm.dtype, policy, config, shared.ctx,
                              kv_offload=shared.kv_offload, store=shared.kv)
    backend.prefill_queries = {key: list(chunks) for key, chunks in shared.prefill_queries.items()}
    backend.tail_queries = dict(shared.tail_queries)  # a head split's calibration (each build takes its own)
    backend.row_tokens = {row: list(t) for row, t in shared.row_tokens.items()}
    return backend


@torch.inference_mode()
def decode(llm, backend, n: int, token: int, steps: int, observe=None,
           marks: list | None = None, tokens: list | None = None) -> tuple[list[float], int, int]:
    """``steps`` greedy steps from context n: (seconds per step, next token, new context).
    ``observe``: called before the first step and after each, its results appended to ``marks``;
    ``tokens``: each step's token appended."""
    times = []
    if observe is not None:
        marks.append(observe())
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = ForwardBatch.decode([n], llm.device, [token])
        logits = llm.model(torch.tensor([[token]], device=llm.device), batch, backend)[0, -1]  # [V]
        token = int(logits.argmax())
        times.append(time.perf_counter() - t0)
        if tokens is not None:
            tokens.append(token)
        if observe is not None:
            marks.append(observe())
        n += 1
    return times, token, n


def build_and_decode(llm, policy: str, shared, config, ctx: int, first: int, steps: int, observe=None,
                     marks: list | None = None):
    """A policy's backend over the shared KV: (backend, index build seconds, decode(...) result)."""
    backend = backend_for(policy, llm, shared, config)
    t0 = time.perf_counter()
    if policy != "dense":
        backend.build_indexes(0, ctx)
    build_s = time.perf_counter() - t0
    return backend, build_s, decode(llm, backend, ctx, first, steps, observe, marks)


def _has_effort(policy: str) -> bool:
    """Whether ``policy`` has a search-effort knob (graph indexes), read from its class."""
    from offload.indexes.base import policy_class

    return policy != "dense" and policy_class(policy).effort is not None


def run_context(llm, ctx: int, policies: list[str], config, steps: int, telemetry_steps: int,
                efforts: list[float | None] = (None,), head_splits: list[float | None] = (None,),
                rounds: int = 1) -> list[dict]:
    """Every policy (and effort, head split) over one shared prefill of ``ctx`` tokens of real text:
    ``steps`` timed decode steps each, then ``telemetry_steps`` measuring the selection. ``rounds`` >
    1 takes the timed steps in turns (each policy ``steps / rounds`` steps a round, all backends
    built first): on a machine whose speed drifts over minutes, policies timed minutes apart compare
    the drift, not the policies. Then each policy's telemetry steps come first, one policy after
    another from the prefill (each reads only the tokens it wrote), and the turns after them write
    the same decode positions of the shared cache (the speed is the same whoever wrote them)."""
    from offload.indexes.base import SelectionConfig, policy_class

    ids = _real_text_ids(llm.tokenizer, ctx)
    splitting = any(s is not None for s in head_splits)  # the shared prefill keeps the prompt's last queries
    shared, logits, prefill_s = prefill_shared(llm, ids, ctx + steps + telemetry_steps + 1,
                                               dataclasses.replace(config, head_split=0.5) if splitting else config)
    first = int(logits.argmax())
    runs = [(p, e, s) for p in policies for e in (efforts if _has_effort(p.split(":")[0]) else [None])
            for s in (head_splits if p.split(":")[0] not in ("dense", "streaming") else [None])]
    rows, turns = [], []  # turns: [row, backend, next token, position] of each run timed in rounds
    for spec, effort, split in runs:
        policy, _, budget = spec.partition(":")  # "cluster:p0.9": a policy with its own budget
        default_effort = policy_class(policy).effort if policy != "dense" else None
        run_config = dataclasses.replace(config, effort=effort) if effort is not None else config
        run_config = dataclasses.replace(run_config, head_split=split)
        if budget:
            size, mass = SelectionConfig.parse_budget(budget)
            run_config = dataclasses.replace(run_config, budget=size, mass=mass)
        row = {"context": ctx, "policy": spec, "prefill_s": prefill_s, "prefill_tok_s": ctx / prefill_s,
               "beyond_trained_context": ctx > llm.args.max_position_embeddings,
               "effort": effort if effort is not None else default_effort, "head_split": split}
        if rounds == 1:  # one policy at a time: its backend (and index) freed before the next is built
            backend, row["build_s"], (row["decode_s"], token, n) = build_and_decode(
                llm, policy, shared, run_config, ctx, first, steps)
            rows.append(_finish_row(llm, row, backend, token, n, telemetry_steps))
            del backend
            continue
        backend = backend_for(policy, llm, shared, run_config)
        t0 = time.perf_counter()
        if policy != "dense":
            backend.build_indexes(0, ctx)
        row["build_s"] = time.perf_counter() - t0
        row.update(_telemetry(llm, spec, backend, ctx, first, telemetry_steps))
        turns.append([row, backend, first, ctx + telemetry_steps])
    for _ in range(rounds if turns else 0):
        for turn in turns:
            times, turn[2], turn[3] = decode(llm, turn[1], turn[3], turn[2], max(1, steps // rounds))
            turn[0].setdefault("decode_s", []).extend(times)
    while turns:
        row, backend, token, n = turns.pop(0)
        rows.append(_finish_row(llm, row, backend, token, n, 0))
        del backend
    return rows


def _telemetry(llm, policy: str, backend, n: int, token: int, steps: int) -> dict:
    """A sparse policy's selection measured over ``steps`` decode steps from position n: attention
    mass, recall, output error against exact attention, tokens selected, streaming heads."""
    from offload.indexes.telemetry import Telemetry

    if policy == "dense" or not steps:
        return {}
    backend.telemetry = Telemetry()
    decode(llm, backend, n, token, steps)
    backend.telemetry, s = None, backend.telemetry.summary()
    return {key: s[key] for key in ("mass", "recall", "output_error", "selected", "streaming")}


def _finish_row(llm, row: dict, backend, token: int, n: int, telemetry_steps: int) -> dict:
    """A run's row from its timed steps (row["decode_s"]): their median, and for a sparse policy its
    index's size, the selection's telemetry over ``telemetry_steps`` more steps and the keys scored."""
    times = row.pop("decode_s")
    row["decode_ms"] = 1e3 * statistics.median(times)
    row["decode_ms_runs"] = [1e3 * t for t in times]
    row.update(_telemetry(llm, row["policy"], backend, n, token, telemetry_steps))
    if row["policy"] != "dense":
        row["index_bytes"] = sum(ix.nbytes() for ix in backend.indexes.values())
        scored = [ix.last_scored / ix.n for ix in backend.indexes.values() if hasattr(ix, "last_scored")]
        row["scored_fraction"] = sum(scored) / len(scored) if scored else None
    return row


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((r["context"], r["decode_ms"]) for r in rows if r["policy"] == policy)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode ms/token (median)")
    ax.set_title("Decode latency vs context")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--weights", default="auto", choices=("auto", "dequantize"),
                   help="auto: a GGUF's projections stay quantized on the CPU; dequantize: the compute dtype")
    p.add_argument("--quantize", default=None, choices=("int4", "int8"),
                   help="projection weights held quantized at run time (CPU): the weights' share of a step shrinks")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--policies", nargs="+", default=["dense", "retrieval", "cluster", "shadowkv", "quest", "streaming",
                                                       "sentence"],
                   help="policy names; 'policy:budget' gives one its own budget, e.g. cluster:p0.9 cluster:0.05")
    p.add_argument("--budget", type=float, default=0.02)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--dense-layers", type=int, default=DENSE_LAYERS)
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per policy (median reported)")
    p.add_argument("--telemetry-steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1,
                   help="take the timed steps in this many turns across the policies (each steps / rounds a turn), "
                        "so that a machine's drift over minutes falls on every policy alike")
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--extend", choices=["none", "yarn"], default="none",
                   help="contexts beyond the trained length: plain RoPE positions, or YaRN with factor "
                        "longest context / trained length (training-free context extension)")
    p.add_argument("--efforts", type=float, nargs="+", default=[None],
                   help="search widths (x budget) for retrieval, keygraph and hnsw; one row per value")
    p.add_argument("--head-splits", type=lambda s: None if s.lower() == "none" else float(s), nargs="+",
                   default=[None], help="streaming heads: KV heads with at most this share of attention beyond sinks "
                   "+ window keep only those (kv_head_split; 'none': no split); one row per value and sparse policy")
    p.add_argument("--out", default=None, help="JSON path; the plot goes next to it (.png)")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= args.steps:
        p.error(f"--rounds must be between 1 and --steps ({args.steps}), got {args.rounds}")

    from offload import LLM, openmp
    from offload.indexes import SelectionConfig
    from offload.loaders import read_model_args

    longest = max(args.contexts) + args.steps + args.telemetry_steps + 2
    rope_scaling = None
    if args.extend == "yarn":
        trained = read_model_args(args.model)[0].max_position_embeddings
        rope_scaling = {"type": "yarn", "factor": max(1.0, longest / trained),
                        "original_max_position_embeddings": trained}
    llm = LLM(args.model, dtype=args.dtype, prefill_chunk_size=args.prefill_chunk, max_context=longest,
              rope_scaling=rope_scaling, quantize=args.quantize,
              weights=args.weights)
    config = SelectionConfig(budget=args.budget, sink=args.sink, window=args.window, dense_layers=args.dense_layers)
    print(f"# {llm.path.name}, {llm.device.type}, {str(llm.dtype).removeprefix('torch.')}, "
          f"weights {llm.tier_report()['weights']['format']}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"rope scaling {rope_scaling or 'as trained'}; OpenMP: {openmp.STATE}")
    print("| context | policy | effort | head split | streaming heads | decode ms/token | vs dense | build s | mass | "
          "recall | out. err | scored | selected/head | index MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for ctx in tqdm(args.contexts, desc="contexts", disable=None):
        ctx_rows = run_context(llm, ctx, args.policies, config, args.steps, args.telemetry_steps, args.efforts,
                               args.head_splits, args.rounds)
        dense = next((r["decode_ms"] for r in ctx_rows if r["policy"] == "dense"), None)
        for r in ctx_rows:
            r["speedup_vs_dense"] = dense / r["decode_ms"] if dense else None
            fmt = lambda k, f: "-" if r.get(k) is None else format(r[k], f)  # noqa: E731
            flag = "*" if r["beyond_trained_context"] and rope_scaling is None else ""
            print(f"| {ctx}{flag} | {r['policy']} | {fmt('effort', 'g')} | {fmt('head_split', 'g')} | "
                  f"{fmt('streaming', '.0%')} | {r['decode_ms']:.1f} | "
                  f"{fmt('speedup_vs_dense', '.1f')}x | "
                  f"{r['build_s']:.1f} | {fmt('mass', '.3f')} | {fmt('recall', '.3f')} | {fmt('output_error', '.3f')} | "
                  f"{fmt('scored_fraction', '.3f')} | {fmt('selected', '.0f')} | {r.get('index_bytes', 0) / 2**20:.1f} |",
                  flush=True)
        rows += ctx_rows
        if args.out:  # write as we go: a long run keeps what it measured
            write_json_atomic(args.out, {"settings": vars(args), "machine": platform.platform(),
                                         "threads": torch.get_num_threads(), "rows": rows})
    if args.out:
        plot(rows, str(args.out).removesuffix(".json") + ".png")
    print("* beyond the model's trained context")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
