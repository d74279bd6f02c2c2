"""The C decode kernels beside numba's on a CPU: attention on a bf16 cache (every visible token, and
a sparse policy's list of sinks, window and selection) and the grouped-int8 product (the LM head).

Each case is timed with both kernels alternating (rounds of a few calls; a kernel's best round
counts, as on a shared box the slow rounds are other work's), hot caches, one row. Attention: one
layer of the default model (3 KV heads x 3 queries x 64) at several contexts and of Llama-3.1-8B
(8 x 4 x 128). Prints a table, writes a JSON and draws each case's speed-up (PNG).

    python -m offload.profiles.bench_cpu_decode --out runs/cpu_decode.json
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch

from offload.fileio import write_json_atomic
from offload.kernels.cbuild import best_rounds

# (name, H, Hkv, D): the default model's attention layer, an 8B model's
ATTENTION_SHAPES = (("135M", 9, 3, 64), ("8B", 32, 8, 128))
CONTEXTS = (32, 512, 4096, 32768)
SPARSE_SHARE = 0.03  # a sparse list: this share of the context selected, plus sinks and a window
SINKS, WINDOW = 4, 64
# (name, N, K): int8 products, one row
INT8_SHAPES = (("135M LM head", 49152, 576), ("8B o (int8)", 4096, 4096), ("8B down (int8)", 4096, 14336))
INT8_GROUP = 32


def _attention_cases(rounds: int, contexts: tuple[int, ...], models: tuple[str, ...]) -> list[dict]:
    from offload.kernels import cpu_attention
    from offload.kernels.api import NO_IDS, CacheArrays, DecodeRanges, _attend_lists, _attend_numba

    results = []
    gen = torch.Generator().manual_seed(0)
    for model, H, Hkv, D in ATTENTION_SHAPES:
        if model not in models:
            continue
        for n in contexts:
            k = torch.randn(1, Hkv, n, D, generator=gen).to(torch.bfloat16)  # [1, Hkv, N, D]
            v = torch.randn(1, Hkv, n, D, generator=gen).to(torch.bfloat16)
            q = torch.randn(1, H, D, generator=gen).to(torch.bfloat16)  # [1, H, D]
            arrays, ranges, threads = CacheArrays(k, v), DecodeRanges([0], [n], Hkv, n), torch.get_num_threads()
            chosen = cpu_attention.takes(arrays.k, H)
            dense = {"numba": lambda: _attend_numba(q, arrays.parts, NO_IDS, ranges.lo, ranges.hi, D ** -0.5,
                                                    ranges.longest, threads, ranges.split(threads))}
            if chosen:
                dense["c"] = lambda: arrays.attend(q, ranges, D ** -0.5)
            selected_n = max(1, int(SPARSE_SHARE * n))
            sinks = np.array([[t if t < n else -1 for t in range(SINKS)]
                              + [t if t >= SINKS else -1 for t in range(n - WINDOW, n)]], np.int32)  # [1, Nd]
            picked = np.sort(torch.randperm(n, generator=gen)[:selected_n].numpy().astype(np.int32))
            selected = np.ascontiguousarray(np.broadcast_to(picked, (1, Hkv, selected_n)))  # [1, Hkv, S]
            counts = np.full((1, Hkv), selected_n, np.int32)
            sparse = {"numba": lambda: _attend_lists(q, arrays.parts, sinks, selected, counts, D ** -0.5)}
            if chosen:
                sparse["c"] = lambda: arrays.gather(q, sinks, selected, counts, D ** -0.5)
            calls = max(3, int(3e6 // (n * Hkv * D)))
            for kind, kernels in (("dense", dense), (f"sparse {SPARSE_SHARE:.0%}", sparse)):
                best = best_rounds(kernels, rounds, calls)
                row = {"case": f"{model} attention {kind}", "context": n, **{f"{name}_ms": t for name, t in best.items()}}
                if "c" in best:
                    row["speedup"] = best["numba"] / best["c"]
                results.append(row)
                _print(row)
    return results


def _int8_cases(rounds: int, models: tuple[str, ...]) -> list[dict]:
    from offload.kernels import cpu_int8_gemv
    from offload.kernels.api import Int8Arrays
    from offload.kernels.cpu_quant import int8_group_matmul

    results = []
    gen = torch.Generator().manual_seed(1)
    for name, n, k in INT8_SHAPES:
        if name.split()[0] not in models:
            continue
        codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)  # [N, K]
        scales = torch.rand(n, k // INT8_GROUP, generator=gen) * 0.01  # [N, G]
        x = torch.randn(1, k, generator=gen).to(torch.bfloat16)  # [1, K]
        arrays = Int8Arrays(codes, scales)
        out = torch.empty(1, n)

        def numba_product():
            int8_group_matmul(arrays.codes, arrays.scales, x.float().numpy(), out.numpy(), 4 * torch.get_num_threads())
        kernels = {"numba": numba_product}
        if cpu_int8_gemv.takes(1, k, k // INT8_GROUP):
            kernels["c"] = lambda: cpu_int8_gemv.int8_gemv(x, *arrays.addresses, n, k, k // INT8_GROUP)
        best = best_rounds(kernels, rounds, max(3, int(1e8 // (n * k))))
        row = {"case": f"int8 product {name}", "context": None, "N": n, "K": k,
               **{f"{kernel}_ms": t for kernel, t in best.items()}}
        if "c" in best:
            row["speedup"] = best["numba"] / best["c"]
        results.append(row)
        _print(row)
    return results


def _print(row: dict) -> None:
    where = f"{row['context']:,} tokens" if row["context"] else f"{row['N']} x {row['K']}"
    c = f"{row['c_ms']:.3f} | {row['speedup']:.2f}x" if "c_ms" in row else "- | -"
    print(f"| {row['case']} | {where} | {row['numba_ms']:.3f} | {c} |", flush=True)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    names = [f"{r['case']}" + (f" @{r['context']}" if r["context"] else "") for r in results]
    ax.bar(range(len(names)), [r.get("speedup", 0.0) for r in results])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("numba time / C time")
    ax.set_title("C decode kernels beside numba's (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    p.add_argument("--models", nargs="+", default=["135M", "8B"], choices=("135M", "8B"),
                   help="whose shapes to time (8B's at 32K take ~1 GB)")
    p.add_argument("--out", default="cpu_decode.json")
    args = p.parse_args(argv)
    import offload  # noqa: F401  (one OpenMP runtime for torch, numba and the C kernels: offload.openmp)
    from offload.kernels.cbuild import library

    print(f"CPU {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; C kernels "
          f"{'built' if library() is not None else 'not built'}")
    print("| case | size | numba ms | C ms | C speed-up |\n|---|---|---|---|---|")
    results = _attention_cases(args.rounds, tuple(args.contexts), tuple(args.models))
    results += _int8_cases(args.rounds, tuple(args.models))
    out = Path(args.out)
    write_json_atomic(out, {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                            "results": results})
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
