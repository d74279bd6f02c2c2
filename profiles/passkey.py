"""Passkey retrieval: a number hidden at a given depth of long filler text, asked for at the end.

A policy passes when its greedy answer equals dense attention's. Filler is the classic repeated
sentences of the passkey test (Mohtashami & Jaggi, 2023), so only the needle carries information.

    python -m offload.profiles.passkey --contexts 4000 6000 --policies dense retrieval quest streaming
    python -m offload.profiles.passkey --contexts 8000 --policies dense retrieval quest --kv-dtype int8
"""

from __future__ import annotations

import argparse
import time

from offload.fileio import write_json_atomic

HEAD = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, num_tokens: int, depth: float, key: str = "68213") -> list[int]:
    """Token ids of a prompt of exactly ``num_tokens`` with the needle at ``depth`` (0..1) of the filler."""
    needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ", False)
    head, tail = tokenizer.encode(HEAD), tokenizer.encode(QUESTION, False)
    unit = tokenizer.encode(FILLER, False)
    room = num_tokens - len(head) - len(needle) - len(tail)
    if room <= 0:
        raise ValueError(f"{num_tokens} tokens cannot hold the passkey prompt")
    filler = (unit * (room // len(unit) + 1))[:room]
    cut = int(room * depth)
    return head + filler[:cut] + needle + filler[cut:] + tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--contexts", type=int, nargs="+", default=[4000, 6000])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--policies", nargs="+", default=["dense", "retrieval", "quest", "streaming"])
    p.add_argument("--budget", type=float, default=0.02)
    p.add_argument("--key", default="68213")
    p.add_argument("--kv-dtype", default=None, choices=("int8",), help="quantized KV cache (default: the dtype)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from offload import LLM, SamplingParams

    rows = []
    kv = args.kv_dtype or "dtype"
    print("| context | depth | policy | KV | answer | correct |")
    print("|---|---|---|---|---|---|")
    for policy in args.policies:
        llm = LLM(args.model, kv_policy=policy, kv_budget=args.budget, kv_dtype=args.kv_dtype)
        for ctx in args.contexts:
            for depth in args.depths:
                t0 = time.perf_counter()
                out = llm.generate([passkey_prompt(llm.tokenizer, ctx, depth, args.key)],
                                   SamplingParams(max_new_tokens=6))[0]
                ok = out.text.strip().startswith(args.key)
                rows.append({"policy": policy, "context": ctx, "depth": depth, "kv_dtype": args.kv_dtype,
                             "answer": out.text, "correct": ok, "seconds": time.perf_counter() - t0})
                print(f"| {ctx} | {depth:.0%} | {policy} | {kv} | {out.text.strip()!r} | {'yes' if ok else 'no'} |",
                      flush=True)
    if args.out:
        write_json_atomic(args.out, {"settings": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
