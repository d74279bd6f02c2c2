"""offload beside llama.cpp on the same GGUF, the same real text, contexts and threads, in one run (CPU).

llama.cpp runs through ``llama-cpp-python`` (an optional benchmark dependency: it builds from
source in about 10 minutes on a 2-core box, so it is never installed by CI). Both runtimes get
the very same token ids (offload's tokenizer reads the GGUF's vocabulary), prefill the prompt,
then take greedy decode steps one token at a time; each step is timed on its own and the table
quotes the median step. offload runs in each weight/KV format given by ``--configs``. With
``--rounds N`` the runtimes run in turn N times (llama.cpp, offload, llama.cpp, offload, ...), each
in a fresh process, and the table quotes the median of the rounds' medians (the rounds' own figures
are in the JSON): a box whose speed drifts by +-8% between minutes slows both alike.

    pip install llama-cpp-python==0.3.36
    python -m offload.profiles.bench_llamacpp --contexts 512 4096 --threads 2 --out runs/llamacpp.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> LLM settings of each offload configuration measured
CONFIGS = {
    "fp32": {"dtype": "float32", "weights": "dequantize"},
    "bf16": {"dtype": "bfloat16", "weights": "dequantize"},
    "int4": {"quantize": "int4"},  # compute dtype auto: bf16
    "int4 + kv int8": {"quantize": "int4", "kv_dtype": "int8"},
    "int4 + kv int2": {"quantize": "int4", "kv_dtype": "int2"},  # KIVI's 2-bit KV
    "int8": {"quantize": "int8"},  # int8 groups of 32 (compute dtype auto: bf16)
    # fp32 compute, the int4/int8 kernels casting at their edge: on a CPU without native bf16 (AVX2)
    # beside the bf16 configs above, what the compute dtype costs there
    "int4 fp32": {"quantize": "int4", "dtype": "float32"},
    "int4 fp32 + kv int8": {"quantize": "int4", "kv_dtype": "int8", "dtype": "float32"},
}
FP32_COMPUTE = ("int4 fp32", "int4 fp32 + kv int8")  # asked for by name, not in the default run
# Prompt tokens of the untimed warm-up: more rows than any product's switch to its many-rows path
# (int8 beyond 24 rows, int4 from 32, bf16 widened from 16), so that compiling or loading a kernel
# is never timed as prefill.
WARMUP_TOKENS = 64


def _timed_steps(step, first_token: int, steps: int) -> tuple[list[float], list[int]]:
    """Run ``step(token) -> next token`` ``steps`` times from ``first_token``: (seconds per step, tokens)."""
    times, tokens, token = [], [], first_token
    for _ in range(steps):
        t0 = time.perf_counter()
        token = step(token)
        times.append(time.perf_counter() - t0)
        tokens.append(token)
    return times, tokens


def bench_llamacpp(path: str, prompts: dict[int, list[int]], steps: int, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    longest = max(len(p) for p in prompts.values()) + steps + 1
    llm = Llama(model_path=path, n_ctx=longest, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)

    vocab = llm.n_vocab()

    def last_pick() -> int:
        # logits of the last evaluated token (Llama.eval keeps no scores unless logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    def step(token: int) -> int:
        llm.eval([token])
        return last_pick()

    out = {}
    llm.eval(next(iter(prompts.values()))[:WARMUP_TOKENS])  # warm-up: first-call costs are not the runtime's speed
    llm.reset()
    for ctx, ids in prompts.items():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t0
        first = last_pick()
        times, tokens = _timed_steps(step, first, steps)
        out[ctx] = {"prefill_tok_s": len(ids) / prefill, "decode_ms": 1e3 * statistics.median(times),
                    "tokens": [first] + tokens}
    return out


def offload_prefill(llm, ids: list[int], longest: int):
    """Prefill ``ids`` as row 0 of a cache of ``longest`` tokens: (seconds, first greedy token, and
    ``step(token) -> next token``, one greedy decode step of that row)."""
    import torch

    from offload.attention import ForwardBatch

    llm.backend.allocate(1, longest)
    t0 = time.perf_counter()
    logits = llm.engine.prefill(0, ids)  # [V]
    prefill = time.perf_counter() - t0
    position = [len(ids)]

    def step(token: int) -> int:
        batch = ForwardBatch.decode(position, llm.device, [token])
        with torch.inference_mode():
            logits = llm.model(torch.tensor([[token]], device=llm.device), batch, llm.backend)  # [1, 1, V]
        position[0] += 1
        return int(logits[0, -1].argmax())

    return prefill, int(logits.argmax()), step


def bench_offload(path: str, settings: dict, prompts: dict[int, list[int]], steps: int) -> dict:
    from offload import LLM

    longest = max(len(p) for p in prompts.values()) + steps + 1
    llm = LLM(path, max_context=longest, verbose=False, **settings)
    out = {"weights": llm.tier_report()["weights"], "kv_format": llm.tier_report()["kv"]["format"]}
    llm.logits(next(iter(prompts.values()))[:WARMUP_TOKENS])  # warm-up: first-call costs are not the runtime's speed
    for ctx, ids in prompts.items():
        prefill, first, step = offload_prefill(llm, ids, longest)
        times, tokens = _timed_steps(step, first, steps)
        out[ctx] = {"prefill_tok_s": len(ids) / prefill, "decode_ms": 1e3 * statistics.median(times),
                    "tokens": [first] + tokens, "kv_bytes_allocated": llm.backend.kv_nbytes()}
    return out


def _run_one(name: str, path, prompts: dict[int, list[int]], steps: int, threads: int) -> dict:
    """One runtime's figures, and this process's peak resident memory (VmHWM: it starts afresh at
    exec, where ru_maxrss would carry the forking parent's)."""
    if name == "llama.cpp":
        out = bench_llamacpp(str(path), prompts, steps, threads)
    else:
        import torch

        torch.set_num_threads(threads)
        out = bench_offload(str(path), CONFIGS[name.removeprefix("offload ")], prompts, steps)
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    out["peak_rss_mib"] = int(hwm.split()[1]) / 1024
    return out


def _merge_rounds(runs: list[dict], contexts: list[int]) -> dict:
    """One runtime's rounds as one run: per context the median of the rounds' decode and prefill
    figures (each round's own kept as ``..._rounds``), the first round's tokens, the largest peak."""
    merged = {key: value for key, value in runs[0].items() if not isinstance(key, int)}
    merged["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    for ctx in contexts:
        merged[ctx] = dict(runs[0][ctx])
        for key in ("decode_ms", "prefill_tok_s"):
            figures = [r[ctx][key] for r in runs]
            merged[ctx][key], merged[ctx][f"{key}_rounds"] = statistics.median(figures), figures
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1, help="run the runtimes in turn this many times")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if c not in FP32_COMPUTE],
                   choices=list(CONFIGS))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one runtime, print JSON
    p.add_argument("--prompts", default=None, help=argparse.SUPPRESS)  # internal: the token ids, as JSON
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.one is not None:  # a child: the parent's token ids (a tokenizer loaded here would count in the peak)
        prompts = {int(k): v for k, v in json.loads(Path(args.prompts).read_text()).items()}
        print(json.dumps(_run_one(args.one, Path(args.model), prompts, args.decode_steps, args.threads)))
        return 0

    import torch
    from tqdm import tqdm

    from offload import LLM
    from offload.loaders import resolve_model_path
    from offload.profiles.bench_generate import _real_text_ids

    torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    if path.suffix.lower() != ".gguf":
        p.error(f"{path} is not a GGUF file: llama.cpp reads GGUF")
    tokenizer = LLM(path, max_context=64, verbose=False, dtype="float32").tokenizer  # the GGUF's vocabulary
    prompts = {ctx: _real_text_ids(tokenizer, ctx) for ctx in args.contexts}
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "torch": torch.__version__, "threads": args.threads},
               "model": path.name, "settings": vars(args), "runs": {}}
    names = (["llama.cpp"] if importlib.util.find_spec("llama_cpp") else []) + [f"offload {c}" for c in args.configs]
    if "llama.cpp" not in names:
        print("llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36): offload alone", flush=True)
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        rounds: dict[str, list[dict]] = {name: [] for name in names}
        for _, name in tqdm([(r, name) for r in range(args.rounds) for name in names], desc="runtimes", unit="run"):
            # each runtime in its own process: no thread pool of one spins beside the other's, and the
            # peak resident memory is that runtime's alone. llama.cpp's child runs this file as a script,
            # so that neither torch nor offload is imported there (they would count in its peak).
            entry = [__file__] if name == "llama.cpp" else ["-m", "offload.profiles.bench_llamacpp"]
            cmd = [sys.executable, *entry, "--one", name, "--model", str(path), "--decode-steps",
                   str(args.decode_steps), "--threads", str(args.threads), "--prompts", str(prompts_file)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            rounds[name].append({int(k) if k.isdigit() else k: v for k, v in run.items()})
    results["runs"] = {name: _merge_rounds(runs, args.contexts) for name, runs in rounds.items()}
    runs = results["runs"]
    print("| metric | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for ctx in args.contexts:
        print(f"| decode ms/token @{ctx} | " + " | ".join(f"{r[ctx]['decode_ms']:.1f}" for r in runs.values()) + " |")
    for ctx in args.contexts:
        print(f"| prefill tok/s @{ctx} | " + " | ".join(f"{r[ctx]['prefill_tok_s']:.0f}" for r in runs.values()) + " |")
    print("| peak RSS MiB | " + " | ".join(f"{r['peak_rss_mib']:.0f}" for r in runs.values()) + " |")
    if "llama.cpp" in runs:  # greedy agreement with llama.cpp over the decode steps (same weights, other kernels)
        ref = runs["llama.cpp"]
        for ctx in args.contexts:
            print(f"| greedy tokens = llama.cpp's @{ctx} | " + " | ".join(
                f"{sum(a == b for a, b in zip(r[ctx]['tokens'], ref[ctx]['tokens']))}/{len(ref[ctx]['tokens'])}"
                for r in runs.values()) + " |")
    if args.out:
        from offload.fileio import write_json_atomic

        write_json_atomic(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
