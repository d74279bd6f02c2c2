"""offload's weight formats side by side in one process (CPU): each format's model is loaded and
prefilled, then their greedy decode steps are timed in turn (one step of each, round after round),
so that a busy or drifting machine slows every format alike; the table quotes medians.

Runs on any model offload loads, real or a preset with dummy weights (speed only):

    python -m offload.profiles.bench_formats --model llama-3.2-1b --load-format dummy --out runs/formats_1b.json
    python -m offload.profiles.bench_formats --formats int4 int8 bf16 --context 4096

Writes JSON and a PNG (decode ms/token and prefill tok/s per format) beside it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from .bench_llamacpp import CONFIGS, WARMUP_TOKENS, offload_prefill

WARM_STEPS = 2  # untimed steps per format first: first-call costs are not the runtime's speed


def measure(model, load_format: str, formats: list[str], context: int, steps: int) -> dict:
    """Per format: load seconds, resident weight bytes, prefill tok/s of ``context`` tokens and the
    decode step times (ms), interleaved across formats."""
    import torch
    from tqdm import tqdm

    from offload import LLM
    from offload.profiles.bench_generate import _real_text_ids

    longest = context + WARM_STEPS + steps + 1
    runs, steppers = {}, {}
    for name in tqdm(formats, desc="load and prefill", unit="format"):
        t0 = time.perf_counter()
        llm = LLM(model, load_format=load_format, max_context=longest, verbose=False, **CONFIGS[name])
        load = time.perf_counter() - t0
        if load_format == "dummy":  # random weights: any ids serve (speed only)
            ids = torch.randint(10, llm.args.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
        else:
            ids = _real_text_ids(llm.tokenizer, context)
        llm.logits(ids[:WARMUP_TOKENS])  # untimed: compiling or loading a kernel is not prefill
        prefill, token, step = offload_prefill(llm, ids, longest)
        runs[name] = {"load_s": load, "weights_bytes": llm.tier_report()["weights"]["resident_bytes"],
                      "prefill_tok_s": context / prefill, "decode_ms": []}
        steppers[name] = [step, token]
    for _ in range(WARM_STEPS):
        for entry in steppers.values():
            entry[1] = entry[0](entry[1])
    for _ in tqdm(range(steps), desc="decode rounds", unit="round"):
        for name, entry in steppers.items():
            t0 = time.perf_counter()
            entry[1] = entry[0](entry[1])
            runs[name]["decode_ms"].append(1e3 * (time.perf_counter() - t0))
    for run in runs.values():
        run["decode_ms_median"] = statistics.median(run["decode_ms"])
    return runs


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.5))
    left.bar(names, [runs[n]["decode_ms_median"] for n in names])
    left.set_ylabel("decode ms/token (median)")
    right.bar(names, [runs[n]["prefill_tok_s"] for n in names])
    right.set_ylabel("prefill tokens/s")
    for ax in (left, right):
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Weight formats, interleaved in one process")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a path, or a preset with --load-format dummy (default: SmolLM2)")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    p.add_argument("--formats", nargs="+", default=["int4", "int8", "bf16"], choices=list(CONFIGS))
    p.add_argument("--context", type=int, default=512, help="prompt tokens before the timed steps")
    p.add_argument("--steps", type=int, default=12, help="timed decode rounds (one step of every format each)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="formats.json")
    args = p.parse_args(argv)
    if args.context < 1 or args.steps < 1:
        p.error("--context and --steps must be at least 1")
    import torch

    from offload.fileio import write_json_atomic

    if args.threads:
        torch.set_num_threads(args.threads)
    runs = measure(args.model, args.load_format, args.formats, args.context, args.steps)
    print("| format | weights resident | load s | prefill tok/s | decode ms/token |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['weights_bytes'] / 2**20:,.0f} MiB | {r['load_s']:.1f} | {r['prefill_tok_s']:.0f} "
              f"| {r['decode_ms_median']:.1f} |")
    out = Path(args.out)
    write_json_atomic(out, {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                                        "torch": torch.__version__, "threads": torch.get_num_threads()},
                            "settings": vars(args), "runs": runs})
    plot(runs, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
