"""Tuning sweep: try a small grid of knobs on this machine and save the best into the profile.

Knobs and how each is judged (all measured here, nothing assumed):

- **read block x reader threads**: verified cold reads (``O_DIRECT``) of a store written in
  ``--disk-dir``, each read split into blocks issued by several threads at once; best GB/s.
- **prefetch slots**: device buffers for streamed layers (2 = double buffering, 3 = two layers
  load ahead): decode ms/token of the default model with half its layers streamed from disk, with
  the best read settings; fewest slots within 3% of the fastest (each slot costs a layer of memory).
- **KV budget x search effort** (retrieval): attention mass captured on real text at
  ``--context``; the smallest budget that reaches ``--target-mass``, then the smallest effort
  within 0.01 of that budget's best mass.

The choices go into the profile's ``tuned`` section (the rest of the file is kept), which
``LLM(profile=...)``, ``offload generate --profile`` and the planner read.

    offload tune --profile profile.json [--quick] [--disk-dir /mnt/nvme]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from offload.fileio import write_json_atomic

MiB = 1 << 20
SIMPLER_WITHIN = 0.03  # prefer the simpler setting when it is this close to the best


def sweep_reads(disk_dir: Path, size: int, blocks: list[int], threads: list[int], repeats: int) -> list[dict]:
    """GB/s of verified O_DIRECT reads of one ``size``-byte tensor, per (block, threads)."""
    from offload.tiers.io import StoreReader
    from offload.tiers.store import write_store

    work = Path(tempfile.mkdtemp(dir=disk_dir, prefix="offload-tune-"))
    try:
        path = write_store(work / "reads.store", {"t": torch.randint(0, 255, (size,), dtype=torch.uint8)})
        out = torch.empty(size, dtype=torch.uint8)  # [size]
        rows = []
        grid = [(b, t) for b in blocks for t in threads if not (b == 0 and t > 1)]
        for block, nthreads in tqdm(grid, desc="reads", disable=None):
            with StoreReader(path, read_block=block, reader_threads=nthreads) as reader:
                reader.read_bytes("t", out=out)  # warm the buffer allocation, not the data (direct I/O)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    reader.read_bytes("t", out=out)
                    times.append(time.perf_counter() - t0)
                rows.append({"read_block": block, "reader_threads": nthreads, "mode": reader.mode,
                             "median_gbs": size / statistics.median(times) / 1e9,
                             "runs_gbs": [size / t / 1e9 for t in times]})
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def best_reads(rows: list[dict]) -> dict:
    top = max(r["median_gbs"] for r in rows)
    # simplest first: fewest threads, then one request per tensor (block 0), then larger blocks
    ordered = sorted(rows, key=lambda r: (r["reader_threads"], r["read_block"] != 0, -r["read_block"]))
    return next(r for r in ordered if r["median_gbs"] >= (1 - SIMPLER_WITHIN) * top)


def sweep_prefetch(model, disk_dir: Path, slots: list[int], read: dict, tokens: int, profile: Path) -> list[dict]:
    """Decode ms/token with half of the model's weights streamed from disk, per prefetch depth."""
    from offload import LLM, SamplingParams
    from offload.loaders import read_model_args
    from offload.tiers.planner import read_profile

    args, _ = read_model_args(model)
    base = {k: v for k, v in read_profile(profile).items() if k == "planner"} if profile.is_file() else {}
    weights = args.param_count() * 4  # fp32 on the CPU
    rows = []
    store_dir = Path(tempfile.mkdtemp(dir=disk_dir, prefix="offload-tune-"))
    try:
        for n in tqdm(slots, desc="prefetch", disable=None):
            trial = store_dir / f"profile-{n}.json"  # the profile as it is, with this trial's knobs
            settings = {"prefetch_slots": n, "read_block": read["read_block"], "reader_threads": read["reader_threads"]}
            write_json_atomic(trial, {**base, "tuned": settings})
            llm = LLM(model, cpu_memory=weights // 2, disk_dir=store_dir, max_context=256, profile=trial,
                      verbose=False)
            llm.generate("The capital of France is", SamplingParams(max_new_tokens=tokens, ignore_eos=True))
            report = llm.tier_report()
            rows.append({"prefetch_slots": n, "decode_ms": 1e3 / llm.stats.decode_tokens_per_second,
                         "disk_bytes_per_pass": report["disk_bytes_per_pass"],
                         "streamed_layers": len(llm.placement.streamed_layers)})
            llm.close()
        return rows
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)


def best_prefetch(rows: list[dict]) -> dict:
    fastest = min(r["decode_ms"] for r in rows)
    return min((r for r in rows if r["decode_ms"] <= (1 + SIMPLER_WITHIN) * fastest), key=lambda r: r["prefetch_slots"])


def sweep_selection(model, context: int, budgets: list[float], efforts: list[float], steps: int) -> list[dict]:
    """Retrieval's attention mass and decode ms/token on real text, per (budget, effort)."""
    from offload import LLM
    from offload.indexes import SelectionConfig

    from .bench_context import run_context

    llm = LLM(model, max_context=context + 2 * steps + 4, verbose=False)
    rows = []
    for budget in tqdm(budgets, desc="kv budget", disable=None):
        config = SelectionConfig(budget=budget)
        for r in run_context(llm, context, ["retrieval"], config, steps, steps, efforts):
            rows.append({"kv_budget": budget, "search_effort": r["effort"], "mass": r["mass"],
                         "recall": r["recall"], "decode_ms": r["decode_ms"], "scored_fraction": r["scored_fraction"]})
    return rows


def best_selection(rows: list[dict], target_mass: float) -> tuple[dict, bool]:
    """(choice, whether the target was reached)."""
    best_per_budget = {b: max(r["mass"] for r in rows if r["kv_budget"] == b) for b in {r["kv_budget"] for r in rows}}
    reached = sorted(b for b, m in best_per_budget.items() if m >= target_mass)
    budget = reached[0] if reached else max(best_per_budget)
    ok = [r for r in rows if r["kv_budget"] == budget and r["mass"] >= best_per_budget[budget] - 0.01]
    return min(ok, key=lambda r: r["search_effort"]), bool(reached)


def run_tune(profile: Path, disk_dir: Path, model, quick: bool, context: int | None, target_mass: float) -> dict:
    size = 64 * MiB if quick else 512 * MiB
    blocks = [0, 1 * MiB, 4 * MiB] if quick else [0, 256 * 1024, 1 * MiB, 4 * MiB, 16 * MiB]
    threads = [1, 2] if quick else [1, 2, 4, 8]
    reads = sweep_reads(disk_dir, size, blocks, threads, repeats=2 if quick else 5)
    read = best_reads(reads)
    prefetch = sweep_prefetch(model, disk_dir, [2, 3], read, tokens=3 if quick else 12, profile=profile)
    slots = best_prefetch(prefetch)
    steps = 2 if quick else 4
    if context is None:  # 8K, within the model's trained positions including the decode steps
        from offload.loaders import read_model_args

        context = min(1024 if quick else 8192, read_model_args(model)[0].max_position_embeddings - 2 * steps - 4)
    ctx = context
    selection = sweep_selection(model, ctx, [0.02, 0.05, 0.1] if quick else [0.01, 0.02, 0.05],
                                [1.0, 2.0] if quick else [1.0, 1.5, 2.0, 4.0], steps=steps)
    choice, reached = best_selection(selection, target_mass)
    return {"read_block": read["read_block"], "reader_threads": read["reader_threads"],
            "prefetch_slots": slots["prefetch_slots"], "kv_budget": choice["kv_budget"],
            "search_effort": choice["search_effort"],
            "why": {"disk_read_gbs": read["median_gbs"], "decode_ms_streamed": slots["decode_ms"],
                    "mass": choice["mass"], "target_mass": target_mass, "target_reached": reached,
                    "context": ctx},
            "sweeps": {"reads": reads, "prefetch": prefetch, "selection": selection},
            "quick": quick, "date": time.strftime("%Y-%m-%d %H:%M"), "threads": torch.get_num_threads()}


def plot(tuned: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    reads = tuned["sweeps"]["reads"]
    for t in sorted({r["reader_threads"] for r in reads}):
        pts = sorted((r["read_block"] or 0, r["median_gbs"]) for r in reads if r["reader_threads"] == t and r["read_block"])
        axes[0].plot([p[0] / MiB for p in pts], [p[1] for p in pts], marker="o", label=f"{t} thread(s)")
    whole = [r["median_gbs"] for r in reads if r["read_block"] == 0]
    if whole:
        axes[0].axhline(whole[0], ls="--", color="grey", label="one request per tensor")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("read block (MiB)")
    axes[0].set_ylabel("cold read GB/s (O_DIRECT, verified)")
    axes[0].legend()
    pre = tuned["sweeps"]["prefetch"]
    axes[1].bar([str(r["prefetch_slots"]) for r in pre], [r["decode_ms"] for r in pre])
    axes[1].set_xlabel("prefetch slots")
    axes[1].set_ylabel("decode ms/token, half the layers on disk")
    sel = tuned["sweeps"]["selection"]
    for e in sorted({r["search_effort"] for r in sel}):
        pts = sorted((r["kv_budget"], r["mass"]) for r in sel if r["search_effort"] == e)
        axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"effort {e:g}")
    axes[2].axhline(tuned["why"]["target_mass"], ls="--", color="grey", label="target")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("KV budget (fraction of context)")
    axes[2].set_ylabel(f"attention mass at {tuned['why']['context']} tokens")
    axes[2].legend()
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle("offload tune: chosen " + ", ".join(f"{k}={tuned[k]}" for k in (
        "read_block", "reader_threads", "prefetch_slots", "kv_budget", "search_effort")))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="profile.json", help="profile JSON to write the tuned section into "
                                                             "(created if missing; other sections are kept)")
    p.add_argument("--quick", action="store_true", help="a small grid and sizes: about a minute")
    p.add_argument("--disk-dir", default=None, help="directory on the disk that will hold stores (default: next to "
                                                    "--profile)")
    p.add_argument("--model", default=None, help="model for the prefetch and selection sweeps (default model)")
    p.add_argument("--context", type=int, default=None, help="context of the selection sweep (default 8192; quick 1024)")
    p.add_argument("--target-mass", type=float, default=0.9,
                   help="attention mass the KV budget must capture (retrieval, real text)")
    args = p.parse_args(argv)

    profile = Path(args.profile)
    disk_dir = Path(args.disk_dir) if args.disk_dir else (profile.parent if str(profile.parent) else Path("."))
    disk_dir.mkdir(parents=True, exist_ok=True)
    tuned = run_tune(profile, disk_dir, args.model, args.quick, args.context, args.target_mass)
    from offload.tiers.planner import read_profile

    doc = read_profile(profile) if profile.is_file() else {}
    doc["tuned"] = tuned
    write_json_atomic(profile, doc)
    png = profile.with_name(profile.stem + "-tune.png")
    plot(tuned, png)
    w = tuned["why"]
    print(f"read_block {tuned['read_block'] >> 10} KiB x {tuned['reader_threads']} thread(s): "
          f"{w['disk_read_gbs']:.2f} GB/s cold | prefetch_slots {tuned['prefetch_slots']}: "
          f"{w['decode_ms_streamed']:.0f} ms/token streamed | kv_budget {tuned['kv_budget']:g}, search_effort "
          f"{tuned['search_effort']:g}: mass {w['mass']:.3f} at {w['context']} tokens"
          + ("" if w["target_reached"] else f" (target {w['target_mass']} not reached: largest budget tried)"))
    print(f"wrote the tuned section of {profile} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
