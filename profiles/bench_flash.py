"""FFN on flash ("LLM in a flash") under a memory budget, against naive streaming at the same budget.

For each ``--budgets`` fraction of the model's weight bytes (``cpu_memory``), three CPU runs with
the same ``O_DIRECT`` bundle reads:

- ``naive``: the exact FFN, gate resident, each layer's whole up/down projections read at every
  token (no cache: what "stream the FFN" costs without sparsity);
- ``naive+cache``: the exact FFN with the bundle cache the budget allows (the stronger baseline:
  the same memory spent keeping part of every layer resident, the rest read every token);
- ``flash``: calibrated sparsity (``--sparsity``) with the budget's bundle cache, either holding
  the most often active bundles (hot set) or as a sliding window (``--windows``).

A budget below what the flash mode must keep resident (embeddings, attention and gate weights,
KV, one layer's buffers) is reported with the runtime's own error. Perplexity is teacher forced
on ``--eval-tokens`` of real English (a later passage of the same text than the calibration),
once per sparsity (the cache never changes what is computed: tests/test_flash.py). Each run is
a fresh process; decode ms/token is the median over ``--decode-tokens`` greedy steps (each
step's forward timed); peak host memory is that process's private resident memory sampled while
generating. Writes JSON, a Markdown table and a PNG.

    python -m offload.profiles.bench_flash --out runs/flash/bench_flash.json
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing
import statistics
import tempfile
import time

import torch

from offload.fileio import write_json_atomic

from .bench_generate import _real_text_ids

CALIBRATION_TOKENS = 512


def perplexity(llm, ids: list[int]) -> float:
    """Teacher-forced perplexity of ``ids``."""
    logits = llm.logits(ids)  # [T, V]
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).item())


def timed_decode(llm, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    """Median ms of the decode steps' forward passes, and the greedy tokens."""
    from offload import SamplingParams

    times, started = [], []
    pre = llm.model.register_forward_pre_hook(lambda m, a: started.append(time.perf_counter()))
    post = llm.model.register_forward_hook(
        lambda m, a, out: times.append((a[0].shape[1], time.perf_counter() - started[-1])))
    try:
        out = llm.generate([prompt], SamplingParams(max_new_tokens=tokens, ignore_eos=True))
    finally:
        pre.remove()
        post.remove()
    decode = [dt for width, dt in times if width == 1]
    return 1e3 * statistics.median(decode), out[0].token_ids


def run(model, dtype: str, disk: str, config, budget: int | None, calibration, prompt, tokens: int) -> dict:
    """One flash run: decode speed, bytes and requests per token, cache size, peak memory."""
    from offload import LLM
    from offload.tiers.flash import flash_stats

    llm = LLM(model, dtype=dtype, disk_dir=disk, flash=config, flash_calibration=calibration, cpu_memory=budget,
              max_context=len(prompt) + tokens + 1, verbose=False)
    ms, out = timed_decode(llm, prompt, tokens)
    stats = flash_stats(llm.model)
    info = llm.flash_info
    row = {"decode_ms": ms, "tokens_per_s": 1e3 / ms, "tokens": out,
           "flash_bytes_per_token": stats["decode_bytes_per_step"],
           "requests_per_token": stats["requests_per_step"],
           "active_fraction": stats["active_neurons_per_step"] / stats["neurons"],
           "read_fraction": stats["read_neurons_per_step"] / stats["neurons"],
           "cache_fraction": info["cache_fraction"], "resident_bytes": info["resident_bytes"],
           "peak_host_bytes": llm.tier_report()["peak"]["host"], "reader_mode": info["reader_mode"]}
    llm.close()
    del llm
    gc.collect()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.8, 0.9, 1.0, 1.1],
                   help="cpu_memory as fractions of the model's weight bytes")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.2, 0.25])
    p.add_argument("--windows", type=int, nargs="*", default=[8],
                   help="sliding windows to run besides the fixed hot set (tokens a bundle stays cached)")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--disk-dir", default=None, help="where the bundle stores go (default: a temporary directory)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from offload import LLM
    from offload.errors import OffloadError
    from offload.tiers.flash import FlashConfig

    base = LLM(args.model, dtype=args.dtype, verbose=False)
    weight_bytes = base.args.param_count() * base.model.layers[0].mlp.w_down.element_size()
    text = _real_text_ids(base.tokenizer, CALIBRATION_TOKENS + args.eval_tokens + args.prompt)
    calibration = text[:CALIBRATION_TOKENS]
    evaluation = text[CALIBRATION_TOKENS:CALIBRATION_TOKENS + args.eval_tokens]
    prompt = text[-args.prompt:]
    dense_ppl = perplexity(base, evaluation)
    dense_ms, dense_tokens = timed_decode(base, prompt, args.decode_tokens)
    del base
    gc.collect()
    print(f"weights {weight_bytes / 2**20:.1f} MiB; dense (all resident): perplexity {dense_ppl:.3f} on "
          f"{len(evaluation)} tokens, decode {dense_ms:.1f} ms/token", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        disk = args.disk_dir or tmp
        ppl = {}
        for s in args.sparsity:
            llm = LLM(args.model, dtype=args.dtype, disk_dir=disk, flash=FlashConfig(sparsity=s, cache_fraction=0.0),
                      flash_calibration=calibration, verbose=False)
            ppl[s] = perplexity(llm, evaluation)
            del llm
            gc.collect()
            print(f"sparsity {s:g}: perplexity {ppl[s]:.3f} ({100 * (ppl[s] / dense_ppl - 1):+.2f}%)", flush=True)
        modes = [("naive", 0.0, None, 0.0)] + [("naive+cache", 0.0, None, None)] + \
            [(f"flash s={s:g}" + (f" window {w}" if w is not None else " hot set"), s, w, None)
             for s in args.sparsity for w in [None] + args.windows]
        for fraction in args.budgets:
            budget = int(fraction * weight_bytes)
            for name, sparsity, window, cache in modes:
                row = {"budget_fraction": fraction, "budget_bytes": budget, "mode": name, "sparsity": sparsity,
                       "window": window, "ppl": ppl.get(sparsity, dense_ppl)}
                config = FlashConfig(sparsity=sparsity, window=window, cache_fraction=cache)
                try:  # a fresh process per run: its peak memory is its own, not the previous runs' leftovers
                    with multiprocessing.get_context("spawn").Pool(1) as pool:
                        row.update(pool.apply(run, (args.model, args.dtype, disk, config, budget, calibration,
                                                    prompt, args.decode_tokens)))
                    row["greedy_agreement"] = sum(a == b for a, b in zip(row.pop("tokens"), dense_tokens)) / len(
                        dense_tokens)
                except OffloadError as e:
                    row["error"] = str(e)
                rows.append(row)
                print(fmt(row), flush=True)
    for fraction in args.budgets:  # speedup over naive streaming at the same budget
        same = {r["mode"]: r for r in rows if r["budget_fraction"] == fraction and "error" not in r}
        for r in same.values():
            if "naive" in same:
                r["speedup_vs_naive"] = same["naive"]["decode_ms"] / r["decode_ms"]
            if "naive+cache" in same:
                r["speedup_vs_naive_cache"] = same["naive+cache"]["decode_ms"] / r["decode_ms"]
    print(table(rows))
    if args.out:
        write_json_atomic(args.out, {"settings": vars(args), "weight_bytes": weight_bytes, "dense_ppl": dense_ppl,
                                     "dense_decode_ms": dense_ms, "rows": rows})
        plot(rows, args.out.removesuffix(".json") + ".png")
    return 0


def fmt(r: dict) -> str:
    if "error" in r:
        return f"budget {r['budget_fraction']:.0%} {r['mode']}: {r['error']}"
    return (f"budget {r['budget_fraction']:.0%} {r['mode']}: {r['decode_ms']:.1f} ms/token, "
            f"{r['flash_bytes_per_token'] / 2**20:.1f} MiB read/token in {r['requests_per_token']:.0f} requests, "
            f"cache {r['cache_fraction']:.0%}, peak {r['peak_host_bytes'] / 2**20:.0f} MiB")


def table(rows: list[dict]) -> str:
    lines = ["| budget | mode | perplexity | decode ms/token | tok/s vs naive | vs naive+cache | flash MiB/token | "
             "requests/token | active / read neurons | cache | accounted resident MiB | peak host MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['budget_fraction']:.0%} ({r['budget_bytes'] / 2**20:.0f} MiB) | {r['mode']} |"
        if "error" in r:
            lines.append(f"{head} {r['ppl']:.2f} | does not fit: {r['error'].split(': the smallest')[1][:60]}"
                         f" | | | | | | | | |" if ": the smallest" in r["error"] else f"{head} {r['error']} |")
            continue
        lines.append(f"{head} {r['ppl']:.2f} | {r['decode_ms']:.1f} | {r.get('speedup_vs_naive', float('nan')):.2f}x"
                     f" | {r.get('speedup_vs_naive_cache', float('nan')):.2f}x | "
                     f"{r['flash_bytes_per_token'] / 2**20:.1f} | {r['requests_per_token']:.0f} | "
                     f"{r['active_fraction']:.2f} / {r['read_fraction']:.2f} | {r['cache_fraction']:.0%} | "
                     f"{r['resident_bytes'] / 2**20:.0f} | {r['peak_host_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = sorted((r["budget_fraction"], r) for r in rows if r["mode"] == mode and "error" not in r)
        if not pts:
            continue
        a.plot([100 * f for f, _ in pts], [r["tokens_per_s"] for _, r in pts], marker="o", label=mode)
        b.plot([100 * f for f, _ in pts], [r["flash_bytes_per_token"] / 2**20 for _, r in pts], marker="o",
               label=mode)
    a.set_ylabel("decode tokens/s (median step)")
    b.set_ylabel("MiB read from flash per token")
    for ax in (a, b):
        ax.set_xlabel("cpu_memory, % of the weights")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
