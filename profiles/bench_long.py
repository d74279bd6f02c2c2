"""The long-context benchmark suite: latency against context for every KV policy, accuracy beside it.

Latency (any model, dummy weights allowed): for each context the prompt is prefilled once (prefill
tokens/s) and every policy decodes from that same KV cache: decode ms/token (median), peak memory
per tier (device, host; what the KV and the index take) and the KV bytes read per token.

Accuracy (real weights only: random weights attend in unrealistic patterns): at ``--accuracy-context``
(default: the model's trained limit), for every policy and every ``--budgets`` value,
- passkey retrieval at depths 10/50/90% of each ``--haystacks`` text (profiles.passkey): the
  greedy answer equals dense attention's,
- greedy agreement with dense over ``--agree-tokens`` tokens after real text: free-running
  (position by position, as generated) and teacher-forced (the policy's next-token choice on
  dense's own continuation).

One command writes ``bench_long.json``, ``table.md``, ``latency.png`` and ``accuracy.png`` under
``--out-dir``, and with ``--append BENCHMARKS.md`` adds the table, dated, with the command.

CPU, default model (SmolLM2, trained to 8K; longer contexts measure speed only):

    python -m offload.profiles.bench_long --contexts 4096 16384 32768 --budgets 0.02 \\
        --out-dir runs/long --append BENCHMARKS.md
    python -m offload.profiles.bench_long --contexts --accuracy-context 8192 \\
        --haystacks filler sentences --out-dir runs/acc8k     # the accuracy part alone

GPU, Llama-3.1-8B shape, bf16 dummy weights, the process capped at 24 GiB:

    python -m offload.profiles.bench_long --model llama-3.1-8b --load-format dummy --device cuda \\
        --dtype bfloat16 --gpu-memory 24GiB --contexts 4096 16384 32768 65536 131072 \\
        --policies dense retrieval shadowkv quest streaming --out-dir runs/long-gpu --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from offload.config import DENSE_LAYERS
from offload.fileio import write_bytes_atomic, write_json_atomic
from offload.tiers.kv_store import KV_DTYPES

from .bench_context import backend_for, build_and_decode, prefill_shared, synthetic_shared
from .bench_generate import _real_text_ids
from .passkey import HAYSTACKS, passkey_prompt

POLICIES = ["dense", "retrieval", "cluster", "shadowkv", "quest", "streaming", "sentence"]



def _weight_bytes_per_pass(report: dict) -> int:
    """Weight bytes a forward pass reads: every resident weight (int4/int8 at their own bytes, not
    the compute dtype's) and, under a budget, the streamed layers' bytes per pass."""
    passes = report.get("forward_passes") or 0
    streamed = report.get("disk_bytes_read", 0) / passes if passes else 0
    return int(report["weights"]["resident_bytes"] + streamed)


def _gpu_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _query_aware(policy: str) -> bool:
    from offload.indexes.base import policy_class

    return policy != "dense" and policy_class(policy).needs_prefill_queries


def latency_rows(llm, ctx: int, policies: list[str], config, steps: int, kv_offload: bool = False,
                 synthetic: bool = False, kv_disk=None, kv_dtype: str | None = None) -> list[dict]:
    """Prefill ``ctx`` tokens once (or, ``synthetic``, fill the KV with synthetic keys and values:
    speed only); each policy decodes ``steps`` tokens from the same KV. ``kv_disk`` (a DiskTier):
    the sparse layers' KV on disk, read a selection at a time through its cache. ``kv_dtype``: the
    KV held quantized (int8, or KIVI's int4 / int2)."""
    from offload.tiers.budget import MemorySampler
    from offload.tiers.kv_store import KVStore, kv_bytes_per_token

    store = None
    if kv_disk is not None or kv_dtype is not None:
        sparse = range(config.dense_layers, llm.args.num_layers) if kv_disk is not None else ()
        store = KVStore(llm.args, llm.device, llm.dtype, kv_dtype=kv_dtype, disk_layers=sparse, disk=kv_disk)
        kv_offload = kv_offload or kv_disk is not None

    a, b = llm.args, llm.dtype.itemsize
    _reset_gpu_peak(llm.device)
    keep_queries = any(_query_aware(p) for p in policies)
    with MemorySampler() as prefill_mem:
        if synthetic:
            shared, _, prefill_s = synthetic_shared(llm, ctx, ctx + steps + 1, config, keep_queries, kv_offload,
                                                    store=store)
            first = llm.tokenizer.encode("The")[-1]
        else:
            shared, logits, prefill_s = prefill_shared(llm, _real_text_ids(llm.tokenizer, ctx), ctx + steps + 1, config,
                                                       keep_queries=keep_queries, kv_offload=kv_offload, store=store)
            first = int(logits.argmax())
    rows = []
    for policy in policies:
        _reset_gpu_peak(llm.device)
        fetched_before = shared.kv_bytes_to_device  # the policies share one KV store and its counter
        with MemorySampler() as mem:
            disk_marks: list[dict | None] = []
            backend, build_s, (times, _, _) = build_and_decode(llm, policy, shared, config, ctx, first, steps,
                                                               shared.kv_disk_report, disk_marks)
        sparse_layers = 0 if policy == "dense" else a.num_layers - config.dense_layers
        attended = min(ctx, config.budget_tokens(ctx) + config.sink + config.window)
        kv_read = kv_bytes_per_token(a, b, kv_dtype) // a.num_layers * (
            (a.num_layers - sparse_layers) * ctx + sparse_layers * attended)
        index_bytes = sum(ix.nbytes() for ix in getattr(backend, "indexes", {}).values())
        rows.append({
            "context": ctx, "policy": policy, "synthetic_kv": synthetic,
            "prefill_tok_s": None if synthetic else ctx / prefill_s, "prefill_s": None if synthetic else prefill_s,
            "build_s": build_s, "decode_ms": 1e3 * statistics.median(times),
            "decode_ms_runs": [1e3 * t for t in times],
            "kv_bytes": shared.kv_nbytes(), "kv_bytes_host_tier": shared.kv_nbytes("cpu") if kv_offload else 0,
            "kv_fetched_per_token": (shared.kv_bytes_to_device - fetched_before) / steps if kv_offload else None,
            "index_bytes": index_bytes, "kv_read_per_token": kv_read, "kv_disk": _disk_row(disk_marks),
            "weight_bytes_per_token": _weight_bytes_per_pass(llm.tier_report()),
            "peak_host_bytes": max(mem.peak, prefill_mem.peak), "peak_device_bytes": _gpu_peak(llm.device),
            "beyond_trained_context": ctx > llm.args.max_position_embeddings})
        del backend
    shared.close()  # a disk tier's files go with it
    del shared
    return rows


@torch.inference_mode()
def _disk_row(marks: list[dict | None]) -> dict | None:
    """The disk tier's report after the timed steps, with what the steady steps (all but the first:
    the index build's relayout and a cold cache) read from disk and selected from it, per token."""
    if len(marks) < 3 or marks[-1] is None:
        return None
    first, last, n = marks[1], marks[-1], len(marks) - 2
    return last | {"read_per_token": (last["selection_bytes_read"] - first["selection_bytes_read"]) / n,
                   "selected_per_token": (last["selected_bytes"] - first["selected_bytes"]) / n}


def _greedy(llm, backend, n: int, first: int, steps: int, forced: list[int] | None = None) -> list[int]:
    """``steps`` greedy tokens from context n. With ``forced``, the input of each step is forced[i]
    (teacher forcing) and the returned list holds the model's choice at each step."""
    from offload.attention import ForwardBatch

    out, token = [first], first
    for i in range(steps - 1):
        fed = forced[i] if forced is not None else token
        batch = ForwardBatch.decode([n + i], llm.device, [fed])
        token = int(llm.model(torch.tensor([[fed]], device=llm.device), batch, backend)[0, -1].argmax())
        out.append(token)
    return out


def accuracy_rows(llm, ctx: int, policies: list[str], budgets: list[float], sink: int, window: int,
                  dense_layers: int, agree_tokens: int, depths: list[float], key: str,
                  haystacks: list[str] = ("filler",)) -> list[dict]:
    """Passkey per haystack and depth (``passkey``: {haystack: {depth: found}}) and greedy agreement
    with dense after real text, for every policy and budget."""
    from offload.indexes import SelectionConfig

    configs = {bud: SelectionConfig(budget=bud, sink=sink, window=window, dense_layers=dense_layers)
               for bud in budgets}
    rows = {(p, bud): {"context": ctx, "policy": p, "budget": bud, "passkey": {h: {} for h in haystacks}}
            for p in policies for bud in budgets}
    bar = tqdm(total=len(haystacks) * len(depths) + 1, desc=f"accuracy at {ctx}", disable=None)
    # Passkey: one prefill per haystack and depth, every policy and budget answers from it.
    for haystack in haystacks:
        for depth in depths:
            ids = passkey_prompt(llm.tokenizer, ctx - 8, depth, key, haystack)
            shared, logits, _ = prefill_shared(llm, ids, len(ids) + 8, configs[budgets[0]])
            for (policy, bud), row in rows.items():
                backend = backend_for(policy, llm, shared, configs[bud])
                answer = llm.tokenizer.decode(_greedy(llm, backend, len(ids), int(logits.argmax()), 6))
                row["passkey"][haystack][str(depth)] = answer.strip().startswith(key)
            bar.update(1)
    # Greedy agreement after real text.
    ids = _real_text_ids(llm.tokenizer, ctx - agree_tokens)
    shared, logits, _ = prefill_shared(llm, ids, ctx + 1, configs[budgets[0]])
    first = int(logits.argmax())
    reference = _greedy(llm, backend_for("dense", llm, shared, configs[budgets[0]]), len(ids), first, agree_tokens)
    for (policy, bud), row in rows.items():
        free = _greedy(llm, backend_for(policy, llm, shared, configs[bud]), len(ids), first, agree_tokens)
        forced = _greedy(llm, backend_for(policy, llm, shared, configs[bud]), len(ids), first, agree_tokens,
                         forced=reference)
        row["greedy_agreement"] = sum(x == y for x, y in zip(free, reference)) / agree_tokens
        row["teacher_forced_agreement"] = sum(x == y for x, y in zip(forced, reference)) / agree_tokens
        row["first_divergence"] = next((i for i, (x, y) in enumerate(zip(free, reference)) if x != y), None)
    bar.update(1)
    bar.close()
    for row in rows.values():
        dense = rows[("dense", row["budget"])]["passkey"] if "dense" in policies else None
        row["passkey_equals_dense"] = None if dense is None else row["passkey"] == dense
    return list(rows.values())


def _fmt_bytes(n) -> str:
    from offload.tiers.budget import format_size

    return "-" if n is None else format_size(int(n))


def table(latency: list[dict], accuracy: list[dict]) -> str:
    lines = ["| context | policy | prefill tok/s | decode ms/token | vs dense | KV read/token | KV (all) | index | "
             "peak host | peak device |", "|---|---|---|---|---|---|---|---|---|---|"] if latency else []
    for r in latency:
        dense = next((d["decode_ms"] for d in latency if d["context"] == r["context"] and d["policy"] == "dense"), None)
        flag = "*" if r["beyond_trained_context"] else ""
        speedup = f"{dense / r['decode_ms']:.2f}x" if dense else "-"
        prefill = "synthetic KV" if r.get("synthetic_kv") else f"{r['prefill_tok_s']:.0f}"
        lines.append(f"| {r['context']:,}{flag} | {r['policy']} | {prefill} | {r['decode_ms']:.1f} | "
                     f"{speedup} | {_fmt_bytes(r['kv_read_per_token'])} | {_fmt_bytes(r['kv_bytes'])} | "
                     f"{_fmt_bytes(r['index_bytes'])} | {_fmt_bytes(r['peak_host_bytes'])} | "
                     f"{_fmt_bytes(r['peak_device_bytes'])} |")
    if any(r["beyond_trained_context"] for r in latency):
        lines.append("\n\\* beyond the model's trained context: speed only")
    if any(r.get("synthetic_kv") for r in latency):
        lines.append("\nsynthetic KV: keys and values drawn, not prefilled (--synthetic-kv): speed only")
    if accuracy:
        first = accuracy[0]["passkey"]
        heads = " | ".join(f"passkey {h} " + "/".join(f"{float(d):.0%}" for d in first[h]).replace("%", "") + "%"
                           for h in first)
        lines += ["", f"| context | policy | budget | {heads} | = dense | greedy agreement | teacher-forced | "
                      "first divergence |", "|---|---|---|" + "---|" * len(first) + "---|---|---|---|"]
        for r in accuracy:
            keys = " | ".join("/".join("ok" if v else "miss" for v in found.values()) for found in r["passkey"].values())
            lines.append(f"| {r['context']:,} | {r['policy']} | {r['budget']:g} | {keys} | "
                         f"{'yes' if r['passkey_equals_dense'] else 'no'} | {r['greedy_agreement']:.1%} | "
                         f"{r['teacher_forced_agreement']:.1%} | {r['first_divergence']} |")
    return "\n".join(lines)


def plot(latency: list[dict], accuracy: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .bench_context import plot as plot_latency

    paths = []
    if latency:
        paths.append(out_dir / "latency.png")
        plot_latency(latency, str(paths[0]))
    if accuracy:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for policy in dict.fromkeys(r["policy"] for r in accuracy):
            rows = sorted((r for r in accuracy if r["policy"] == policy), key=lambda r: r["budget"])
            budgets = [r["budget"] for r in rows]
            axes[0].plot(budgets, [r["greedy_agreement"] for r in rows], marker="o", label=policy)
            found = [[v for h in r["passkey"].values() for v in h.values()] for r in rows]
            axes[1].plot(budgets, [sum(f) / len(f) for f in found], marker="o", label=policy)
        axes[0].set_ylabel("greedy agreement with dense")
        axes[1].set_ylabel("passkey found (fraction of haystacks x depths)")
        for ax in axes:
            ax.set_xlabel("KV budget (fraction of context)")
            ax.set_xscale("log")
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.suptitle(f"Accuracy vs budget at {accuracy[0]['context']:,} tokens")
        fig.tight_layout()
        paths.append(out_dir / "accuracy.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def machine(llm) -> str:
    if llm.device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(llm.device)}, {torch.get_num_threads()} CPU threads"
    from offload import openmp

    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (no GPU); "
            f"OpenMP: {openmp.STATE}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="path, or a preset with --load-format dummy")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--weights", default="auto", choices=("auto", "dequantize"),
                   help="auto: a GGUF's projections stay quantized on the CPU; dequantize: the compute dtype")
    p.add_argument("--quantize", default=None, choices=("int4", "int8"),
                   help="projection weights in int4 at run time (CPU): the weights' share of a step shrinks ~4x")
    p.add_argument("--gpu-memory", default=None,
                   help="cap on the process's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. 24GiB")
    p.add_argument("--kv-offload", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the sparse layers' KV in host memory (pinned) and fetch sinks + window + selection "
                        "per step; default: on with a GPU, off on a CPU (where host memory is the device)")
    p.add_argument("--kv-disk", default=None, metavar="DIR",
                   help="the sparse layers' KV on disk in DIR, read a selection at a time (latency runs; policies "
                        "that read a selection in runs: cluster, quest, streaming)")
    p.add_argument("--kv-disk-cache", default="256MiB", help="host memory for the disk KV's cache of extents")
    p.add_argument("--kv-dtype", default=None, choices=KV_DTYPES,
                   help="the KV held quantized: int8, or KIVI's int4 / int2 (default: the compute dtype)")
    p.add_argument("--contexts", type=int, nargs="*", default=[4096, 16384, 32768, 65536, 131072],
                   help="latency contexts (none: the accuracy runs alone)")
    p.add_argument("--policies", nargs="+", default=POLICIES)
    p.add_argument("--budget", type=float, default=0.02, help="KV budget of the latency runs")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.02, 0.05], help="budgets of the accuracy runs")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--dense-layers", type=int, default=DENSE_LAYERS)
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per policy (median reported)")
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--synthetic-kv", action="store_true",
                   help="fill the KV with synthetic keys and values instead of prefilling (speed only: decode "
                        "latency at 64K-128K on a CPU without hours of prefill; index builds included)")
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                   help="passkey and greedy agreement at --accuracy-context (real weights only)")
    p.add_argument("--accuracy-context", type=int, default=None, help="default: the model's trained limit")
    p.add_argument("--agree-tokens", type=int, default=128)
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--key", default="68213")
    p.add_argument("--haystacks", nargs="+", default=["filler"], choices=tuple(HAYSTACKS),
                   help="passkey haystacks (profiles.passkey): the classic filler, shuffled plain sentences, a play")
    p.add_argument("--out-dir", default="bench_long")
    p.add_argument("--append", default=None, help="append the dated table and command to this Markdown file")
    args = p.parse_args(argv)

    from offload import LLM
    from offload.engine_config import resolve_device
    from offload.errors import OffloadError
    from offload.indexes import SelectionConfig
    from offload.tiers.budget import parse_size

    device = resolve_device(args.device)
    cap_note = ""
    if args.gpu_memory is not None:
        if device.type != "cuda":
            raise OffloadError("--gpu-memory caps a GPU; this run is on the CPU")
        cap = parse_size(args.gpu_memory, "gpu_memory")
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
        cap_note = f", process capped at {args.gpu_memory} of GPU memory (set_per_process_memory_fraction)"
    kv_offload = device.type == "cuda" if args.kv_offload is None else args.kv_offload
    if args.accuracy and (args.load_format == "dummy" or args.synthetic_kv):
        print("bench_long: accuracy is never measured on dummy weights or a synthetic KV: skipped", file=sys.stderr)
        args.accuracy = False
    if args.accuracy and args.kv_dtype is not None:
        print("bench_long: --kv-dtype applies to the latency runs; for accuracy over a quantized KV use "
              "profiles.passkey / profiles.quant_accuracy: accuracy skipped", file=sys.stderr)
        args.accuracy = False
    if not args.contexts and not args.accuracy:
        raise OffloadError("nothing to measure: give --contexts, or leave --accuracy on")
    # The longest context asked for (None: the model's own limit, which the accuracy runs default to).
    longest = max(args.contexts + [args.accuracy_context or 0]) + args.steps + 2 if args.contexts else args.accuracy_context
    llm = LLM(args.model, device=device, dtype=args.dtype, prefill_chunk_size=args.prefill_chunk,
              max_context=longest, load_format=args.load_format, quantize=args.quantize,
              weights=args.weights)
    config = SelectionConfig(budget=args.budget, sink=args.sink, window=args.window, dense_layers=args.dense_layers)
    kv_disk = None
    if args.kv_disk is not None:
        from offload.tiers.kv_disk import read_ahead_pays
        from offload.tiers.kv_store import DiskTier

        kv_disk = DiskTier(Path(args.kv_disk), parse_size(args.kv_disk_cache, "--kv-disk-cache"), args.window,
                           read_ahead_pays(device))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"settings": vars(args), "machine": machine(llm) + cap_note, "kv_offload": kv_offload,
              "model": llm.describe() + ("; sparse layers' KV in host memory (kv_offload)" if kv_offload else ""),
              "latency": [], "accuracy": []}
    for ctx in tqdm(args.contexts, desc="contexts", disable=None):
        try:
            result["latency"] += latency_rows(llm, ctx, args.policies, config, args.steps, kv_offload,
                                              synthetic=args.synthetic_kv, kv_disk=kv_disk, kv_dtype=args.kv_dtype)
        except torch.OutOfMemoryError as e:  # a context that does not fit under the cap is a result too
            result.setdefault("did_not_fit", []).append({"context": ctx, "error": str(e).splitlines()[0]})
            torch.cuda.empty_cache()
        write_json_atomic(out_dir / "bench_long.json", result)  # a long run keeps what it measured
    if args.accuracy:
        ctx = args.accuracy_context or llm.args.max_position_embeddings
        result["accuracy"] = accuracy_rows(llm, ctx, args.policies, args.budgets, args.sink, args.window,
                                           args.dense_layers, args.agree_tokens, args.depths, args.key,
                                           args.haystacks)
    write_json_atomic(out_dir / "bench_long.json", result)
    text = table(result["latency"], result["accuracy"])
    for miss in result.get("did_not_fit", []):
        text += f"\n\ncontext {miss['context']:,} did not fit: {miss['error']}"
    write_bytes_atomic(out_dir / "table.md", (text + "\n").encode())
    plots = plot(result["latency"], result["accuracy"], out_dir)
    print(text)
    print(f"wrote {out_dir / 'bench_long.json'}, {out_dir / 'table.md'}, " + ", ".join(map(str, plots)))
    if args.append:
        command = "python -m offload.profiles.bench_long " + " ".join(map(shlex.quote, argv or sys.argv[1:]))
        with open(args.append, "a") as f:
            f.write(f"\n## Long-context suite, {datetime.date.today().isoformat()}, {result['machine']}\n\n"
                    f"{result['model']}\n\n```\n{command}\n```\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
