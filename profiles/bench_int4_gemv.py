"""int4 decode products on the CPU: torch's fused kernel against the C kernel of
:mod:`offload.kernels.cpu_int4_gemv`, on the projections of the default model and of an 8B model.

Each shape is timed with both kernels alternating (rounds of a few calls; a kernel's best round
counts, as on a shared box the slow rounds are other work's), on one weight packed by torch for
this CPU. Prints a table, writes a JSON and draws the weights per second of each (PNG).

    python -m offload.profiles.bench_int4_gemv --out runs/int4_gemv.json
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from offload.fileio import write_json_atomic

# (name, N, K): the default model's four projections (SmolLM2-135M), an 8B model's (Llama-3.1-8B)
SHAPES = (("135M qkv", 960, 576), ("135M o", 576, 576), ("135M gate_up", 3072, 576), ("135M down", 576, 1536),
          ("8B qkv", 6144, 4096), ("8B o", 4096, 4096), ("8B gate_up", 28672, 4096), ("8B down", 4096, 14336))
GROUP = 32


def measure(rows: int, rounds: int, models: tuple[str, ...] = ("135M", "8B")) -> list[dict]:
    from offload.kernels import cpu_int4_gemv

    results = []
    for name, n, k in SHAPES:
        if name.split()[0] not in models:
            continue
        calls = max(2, int(2e7 // (n * k)))  # ~20 M weights a round
        best = cpu_int4_gemv.time_kernels(n, k, rows, rounds, calls, GROUP, seed=len(results))
        row = {"shape": name, "N": n, "K": k, "rows": rows, **{f"{kernel}_ms": t for kernel, t in best.items()}}
        if "c" in best:
            row["speedup"] = best["torch"] / best["c"]
        results.append(row)
        print(f"| {name} | {n} x {k} | {best['torch']:.3f} | " + (f"{best['c']:.3f} | {row['speedup']:.2f}x |"
                                                              if "c" in best else "- | - |"), flush=True)
    return results


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["shape"] for r in results]
    for i, kernel in enumerate(("torch", "c")):
        rates = [r["N"] * r["K"] * r["rows"] / r[f"{kernel}_ms"] / 1e6 if f"{kernel}_ms" in r else 0 for r in results]
        ax.bar([j + 0.4 * i for j in range(len(names))], rates, width=0.4, label=kernel)
    ax.set_xticks([j + 0.2 for j in range(len(names))], names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("G weights x rows / s")
    ax.set_title("int4 decode products (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1, help="input rows (decode rows in a step)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="default: torch's")
    p.add_argument("--models", nargs="+", default=["135M", "8B"], choices=("135M", "8B"),
                   help="whose projections to time (8B's take ~1 GB to make)")
    p.add_argument("--out", default="int4_gemv.json")
    args = p.parse_args(argv)
    import offload  # noqa: F401  (one OpenMP runtime for torch and the C kernel: offload.openmp)
    from offload.kernels import cpu_int4_gemv

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    print(f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}), {threads} threads, {args.rows} row(s); "
          f"process choice: {cpu_int4_gemv.decode_kernel()}")
    print("| product | N x K | torch ms | C ms | C speed-up |\n|---|---|---|---|---|")
    results = measure(args.rows, args.rounds, tuple(args.models))
    write_json_atomic(args.out, {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": threads,
                                 "choice": cpu_int4_gemv.decode_kernel().reason, "results": results})
    plot(results, Path(args.out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
