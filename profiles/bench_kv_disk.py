"""The KV on disk beside the KV in memory: the same model, text, policy and budget, one run.

Each (policy, tier) runs in its own process, whose resident memory this process samples from
outside: the peak of its private memory (RssAnon) over what it held before building the model
(the interpreter, torch, offload: the fixed overhead) is what ``--cpu-memory`` must hold. A run
prefills real text and decodes greedily (tokens, ms per token), then answers the passkey at each
depth. With the KV on disk the sparse layers' KV lives in ``--disk-dir`` and is read a selection
at a time through a cache of extents (a quarter of that KV, or what ``--cpu-memory`` leaves
beside the weights, the dense layers' KV and the recent rows).
Reported per policy: tokens and passkey answers identical or not, decode ms/token both ways,
disk bytes read per token against the selection's own bytes, the cache's hit rate, peak RSS.

    python -m offload.profiles.bench_kv_disk --context 8192 --policies cluster quest --out-dir runs/kvdisk8k
    python -m offload.profiles.bench_kv_disk --context 8192 --policies cluster --cpu-memory 862MiB --out-dir runs/kvdisk8k_budget
    python -m offload.profiles.bench_kv_disk --context 32768 --extend yarn --policies cluster --share-prefill \
        --out-dir runs/kvdisk32k

Writes ``bench_kv_disk.json`` and ``bench_kv_disk.png`` in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

from offload.config import DENSE_LAYERS
from offload.fileio import write_json_atomic

TIERS = ("memory", "disk")
SAMPLE_SECONDS = 0.02  # RSS sampling period of the child processes


def _vm_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` (VmRSS: shared libraries' pages included), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(argv: list[str]) -> tuple[dict, dict]:
    """Run this module with ``argv`` in a child process; -> (its JSON result, its peak resident
    memory sampled here: {"rss": VmRSS, "anon": RssAnon (private; what a budget holds)})."""
    from offload.tiers.budget import rss_anon

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        path = out.name
    proc = subprocess.Popen([sys.executable, "-m", "offload.profiles.bench_kv_disk", *argv, "--child-out", path])
    peak, done = {"rss": 0, "anon": 0}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["rss"] = max(peak["rss"], _vm_rss(proc.pid))
            peak["anon"] = max(peak["anon"], rss_anon(proc.pid))
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = proc.wait()
    done.set()
    sampler.join()
    if rc:
        raise SystemExit(f"bench_kv_disk: the {argv[argv.index('--tier') + 1]} run failed (exit {rc})")
    result = json.loads(Path(path).read_text())
    os.unlink(path)
    return result, peak


def _decode(llm, ids: list[int], steps: int, cached=None) -> dict:
    """Prefill ``ids`` (or restore ``cached``, a prompt cache) and decode ``steps`` greedy tokens:
    prefill seconds, tokens, median ms per token and the disk tier's bytes per token."""
    import torch

    from offload import SamplingParams

    # per step: when it arrived and the disk tier's counters then (the first decode step also builds
    # the index and, on disk, lays the KV out in its order: the steady state is measured after it)
    marks = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for step in llm.engine.run([ids], [SamplingParams(max_new_tokens=steps, ignore_eos=True)], None, cached):
            marks.append((time.perf_counter(), llm.backend.kv_disk_report() or {}, list(step[0][0].token_ids)))
    times = [t for t, _, _ in marks]
    step_ms = [1e3 * (b - a) for a, b in zip(times, times[1:])]
    out = {"prefill_s": times[0] - t0, "tokens": marks[-1][2], "decode_ms": statistics.median(step_ms),
           "decode_ms_all": step_ms}
    return out | _disk_stats([report for _, report, _ in marks])


def _decode_synthetic(llm, ctx: int, steps: int) -> dict:
    """Fill the KV with ``ctx`` synthetic tokens (speed only) a layer at a time, as a layer-major
    prefill writes it (the disk tier holds a layer in memory for its pass and builds its index at
    the pass's end), build the indexes still missing (the memory run's), and decode ``steps``
    greedy tokens from it."""
    import torch

    from offload.profiles.bench_context import decode, fill_synthetic_kv

    backend = llm.backend
    backend.allocate(1, ctx + steps + 2)
    with torch.inference_mode():
        t0 = time.perf_counter()
        fill_synthetic_kv(backend, llm, ctx, layer_passes=True)
        fill_s = time.perf_counter() - t0
        backend.build_indexes(0, ctx)
        build_s = time.perf_counter() - t0 - fill_s
    tokens, reports = [], []
    seconds, _, _ = decode(llm, backend, ctx, llm.tokenizer.encode("The")[-1], steps,
                           lambda: backend.kv_disk_report() or {}, reports, tokens)
    times = [1e3 * s for s in seconds]
    out = {"prefill_s": fill_s, "fill_s": fill_s, "build_s": build_s, "tokens": tokens,
           "decode_ms": statistics.median(times[1:]), "decode_ms_all": times}
    return out | _disk_stats(reports)


def _disk_stats(reports: list[dict]) -> dict:
    """The disk tier's report after the last step, with the steady steps' bytes (all but the first:
    a cold cache, and where the index is built at the first step, its relayout) per token; {} for
    the KV in memory. ``reports``: after the prompt, then after each step."""
    if not reports[-1]:
        return {}
    first, steady, last = reports[0], reports[1], reports[-1]
    n = len(reports) - 2
    return {"disk": last | {
        "read_per_token": (last["selection_bytes_read"] - steady["selection_bytes_read"]) / n,
        "selected_per_token": (last["selected_bytes"] - steady["selected_bytes"]) / n,
        "ahead_per_token": (last["ahead_extents"] - steady["ahead_extents"]) / n,  # extents read ahead
        "ahead_hits_per_token": (last["ahead_hits"] - steady["ahead_hits"]) / n,  # of which used
        "hit_rate": (last["extents_hit"] - steady["extents_hit"]) / max(1, sum(
            last[k] - steady[k] for k in ("extents_hit", "extents_missed"))),  # decode's steady state
        "first_step_bytes_read": steady["bytes_read"] - first["bytes_read"],  # build, relayout, a cold cache
        "prefill_bytes_read": first["bytes_read"]}}


def child(args) -> dict:
    """One (policy, tier) run in this process."""
    from offload.tiers.budget import rss_anon

    out: dict = {"anon_before_model": rss_anon()}  # interpreter, torch, offload: the fixed overhead
    from offload import LLM, SamplingParams
    from offload.loaders import read_model_args
    from offload.profiles.bench_generate import _real_text_ids
    from offload.profiles.passkey import passkey_prompt

    longest = args.context + args.steps + 8
    rope_scaling = None
    if args.extend == "yarn":
        trained = read_model_args(args.model)[0].max_position_embeddings
        rope_scaling = {"type": "yarn", "factor": max(1.0, longest / trained), "original_max_position_embeddings": trained}
    kw = dict(kv_policy=args.policy, kv_budget=args.budget, dense_layers=args.dense_layers, max_context=longest,
              dtype=args.dtype, load_format=args.load_format, quantize=args.quantize, weights=args.weights,
              prefill_chunk_size=args.prefill_chunk, rope_scaling=rope_scaling, kv_dtype=args.kv_dtype, verbose=False)
    if args.tier == "disk":
        kw |= dict(kv_offload="disk", disk_dir=args.disk_dir, cpu_memory=args.cpu_memory,
                   kv_read_ahead={"auto": None, "on": True, "off": False}[args.read_ahead])
        if args.lookahead_share is not None:  # the constant under measurement
            from offload.tiers import kv_disk

            kv_disk.LOOKAHEAD_SHARE = args.lookahead_share
    llm = LLM(args.model, **kw)
    out["describe"] = llm.describe()
    out["passkey"] = {}
    if args.synthetic_kv:  # speed and memory only: no text, no passkey
        out |= _decode_synthetic(llm, args.context, args.steps)
    elif not args.share_prefill:
        out |= _decode(llm, _real_text_ids(llm.tokenizer, args.context - args.steps), args.steps)
        for depth in args.depths:
            prompt = passkey_prompt(llm.tokenizer, args.context - 8, depth, args.key, args.haystack)
            answer = llm.generate([prompt], SamplingParams(max_new_tokens=6))[0].text
            out["passkey"][str(depth)] = {"answer": answer, "found": answer.strip().startswith(args.key)}
    else:  # decode after each passkey prompt, from the memory run's prefill (a prompt cache)
        runs = []
        for depth in args.depths:
            prompt = passkey_prompt(llm.tokenizer, args.context - args.steps, depth, args.key, args.haystack)
            path = Path(args.out_dir) / "prompts" / f"passkey-{depth}.cache"
            if args.tier == "memory":
                path.parent.mkdir(parents=True, exist_ok=True)
                t = time.perf_counter()
                llm.save_prompt(prompt, path)
                out.setdefault("save_prompt_s", []).append(time.perf_counter() - t)
            run = _decode(llm, prompt, args.steps, llm.read_prompt_cache(path))
            answer = llm.tokenizer.decode(run["tokens"][:6])
            out["passkey"][str(depth)] = {"answer": answer, "found": answer.strip().startswith(args.key)}
            runs.append(run)
        out["tokens"] = [r["tokens"] for r in runs]
        out["decode_ms"] = statistics.median([ms for r in runs for ms in r["decode_ms_all"]])
        out["decode_ms_all"] = [r["decode_ms_all"] for r in runs]
        out["prefill_s"] = statistics.median([r["prefill_s"] for r in runs])  # a restore, not a prefill
        if "disk" in runs[0]:
            out["disk"] = runs[-1]["disk"] | {key: statistics.mean(r["disk"][key] for r in runs) for key in
                                              ("read_per_token", "selected_per_token", "hit_rate", "ahead_per_token",
                                               "ahead_hits_per_token")}
    report = llm.tier_report()
    out["peak"], out["kv_placed"] = report["peak"], report["placement"]
    out["cpu_budget"] = llm.runtime.resolved.cpu_budget
    llm.close()
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["policy"] for r in rows]
    x = range(len(rows))
    ax1.bar([i - 0.2 for i in x], [r["memory"]["decode_ms"] for r in rows], 0.4, label="KV in memory")
    ax1.bar([i + 0.2 for i in x], [r["disk"]["decode_ms"] for r in rows], 0.4, label="KV on disk")
    ax1.set_xticks(list(x), names)
    ax1.set_ylabel("decode ms / token (median)")
    ax1.legend()
    ax2.bar([i - 0.2 for i in x], [r["disk"]["disk"]["selected_per_token"] / 2**20 for r in rows], 0.4,
            label="selection's bytes (from the disk tier)")
    ax2.bar([i + 0.2 for i in x], [r["disk"]["disk"]["read_per_token"] / 2**20 for r in rows], 0.4,
            label="read from disk (after the cache)")
    ax2.set_xticks(list(x), names)
    ax2.set_ylabel("MiB per token")
    ax2.legend()
    fig.suptitle(f"KV on disk vs in memory, context {result['settings']['context']:,} ({result['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--extend", choices=("none", "yarn"), default="none", help="YaRN beyond the trained context")
    p.add_argument("--policies", nargs="+", default=["cluster", "quest"])
    p.add_argument("--budget", type=float, default=0.02)
    p.add_argument("--dense-layers", type=int, default=DENSE_LAYERS, help="first layers attended densely (their KV in memory)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-dtype", default=None, choices=("int8", "int4", "int2"),
                   help="int4 / int2: KIVI in memory, int8 keys and 4- or 2-bit values per row on disk")
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32, help="greedy decode steps (median ms reported)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--haystack", default="filler")
    p.add_argument("--key", default="68213")
    p.add_argument("--disk-dir", default=None, help="where the KV goes (default: a folder under --out-dir)")
    p.add_argument("--cpu-memory", default=None,
                   help="memory budget of the disk run (the cache takes what it leaves; default: no budget, a cache "
                        "of a quarter of the KV on disk)")
    p.add_argument("--share-prefill", action="store_true",
                   help="the disk run restores the memory run's prefill of each passkey prompt (a prompt cache) and "
                        "both decode --steps tokens after it: one prefill per depth in all (a 32K fp32 prefill takes "
                        "~17 min on a 2-core CPU); else each run prefills real text and each passkey prompt itself")
    p.add_argument("--read-ahead", choices=("auto", "on", "off"), default="auto",
                   help="the disk run's kv_read_ahead (auto: where a GPU computes or a core is spare)")
    p.add_argument("--lookahead-share", type=float, default=None,
                   help="read ahead this share of a step's selection (offload.tiers.kv_disk.LOOKAHEAD_SHARE)")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"),
                   help="dummy: a preset's shape (--model llama-3.2-1b) with seeded random weights (with --synthetic-kv)")
    p.add_argument("--weights", default="auto", choices=("auto", "dequantize"),
                   help="auto: a GGUF's projections stay quantized on the CPU; dequantize: the compute dtype")
    p.add_argument("--quantize", default=None, choices=("int4", "int8"))
    p.add_argument("--synthetic-kv", action="store_true",
                   help="speed and memory only: the KV filled with synthetic keys and values a layer at a time, as a "
                        "layer-major prefill writes it (128K on a CPU without hours of prefill), then --steps greedy "
                        "steps; no passkey")
    p.add_argument("--out-dir", default="bench_kv_disk")
    p.add_argument("--policy", help=argparse.SUPPRESS)
    p.add_argument("--tier", choices=TIERS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    args.disk_dir = args.disk_dir or str(out_dir / "kv")
    if args.child_out:
        write_json_atomic(args.child_out, child(args))
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    machine = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (no GPU)"
    result = {"settings": vars(args), "machine": machine, "date": str(date.today()), "rows": []}
    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--out-dir", args.out_dir)]
    for policy in args.policies:
        row: dict = {"policy": policy}
        for tier in TIERS:
            run, peak = run_child(passed + ["--policy", policy, "--tier", tier, "--out-dir", args.out_dir])
            # the runtime's private memory: the child's peak less what it held before building the model
            # (interpreter, torch, offload: the fixed overhead), against the budget it was given
            held = peak["anon"] - run["anon_before_model"]
            row[tier] = run | {"peak_rss": peak["rss"], "peak_anon": peak["anon"], "runtime_peak": held,
                               "within_budget": None if run["cpu_budget"] is None else held <= run["cpu_budget"]}
            budget = "" if run["cpu_budget"] is None else f" (budget {run['cpu_budget'] / 2**20:.0f} MiB)"
            print(f"{policy} {tier}: {run['decode_ms']:.1f} ms/token, prefill {run['prefill_s']:.1f} s, peak RSS "
                  f"{peak['rss'] / 2**20:.0f} MiB, runtime's private peak {held / 2**20:.0f} MiB{budget} over "
                  f"{run['anon_before_model'] / 2**20:.0f} MiB before the model", flush=True)
        m, d = row["memory"], row["disk"]
        if "disk" not in d:
            raise SystemExit(f"bench_kv_disk: the disk run of {policy} kept no layer's KV on disk (every layer dense?)")
        row["same_tokens"] = m["tokens"] == d["tokens"]
        row["same_passkey"] = m["passkey"] == d["passkey"]
        row["slowdown"] = d["decode_ms"] / m["decode_ms"]
        row["read_over_selected"] = d["disk"]["read_per_token"] / max(1.0, d["disk"]["selected_per_token"])
        result["rows"].append(row)
        write_json_atomic(out_dir / "bench_kv_disk.json", result)
    if args.share_prefill:
        shutil.rmtree(out_dir / "prompts", ignore_errors=True)
    plot(result, out_dir / "bench_kv_disk.png")
    print("| policy | tokens same | passkey same (found) | decode ms mem / disk | disk read / selection per token "
          "| hit rate | peak RSS mem / disk | disk run's private peak over its start / budget |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        m, d = r["memory"], r["disk"]
        found = "/".join("y" if v["found"] else "n" for v in d["passkey"].values())
        print(f"| {r['policy']} | {r['same_tokens']} | {r['same_passkey']} ({found}) | {m['decode_ms']:.1f} / "
              f"{d['decode_ms']:.1f} ({r['slowdown']:.2f}x) | {d['disk']['read_per_token'] / 2**10:.0f} / "
              f"{d['disk']['selected_per_token'] / 2**10:.0f} KiB ({r['read_over_selected']:.2f}x) | "
              f"{d['disk']['hit_rate']:.0%} | {m['peak_rss'] / 2**20:.0f} / {d['peak_rss'] / 2**20:.0f} MiB | "
              f"{d['runtime_peak'] / 2**20:.0f} / "
              f"{'-' if d['cpu_budget'] is None else format(d['cpu_budget'] / 2**20, '.0f')} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
