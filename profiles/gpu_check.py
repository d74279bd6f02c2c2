"""One command that measures, on a CUDA GPU, the figures BENCHMARKS.md's GPU sections still lack.

    python -m offload.profiles.gpu_check --out gpu_check/

1. kernel_tests: ``pytest -q tests/test_kernels.py`` compiled (TRITON_INTERPRET unset: fp32 and bf16),
   and a KIVI KV layer on the GPU against one on the CPU (tests/test_kv_kivi.py, KIVI_DEVICE_TEST);
   kernel_direct: gather / shadowkv / merge, Triton against the torch reference, max abs error.
2. gather_bandwidth: gather attention over a Llama-3.1-8B layer's KV at 128K with a 2% selection,
   as a percentage of a device-to-device copy measured in the same run.
3. decode_32k / decode_128k: Llama-3.1-8B shape, dummy bf16 weights, 24 GiB cap, retrieval with the
   sparse layers' KV in host memory: prefill s, decode ms/token, peak memory per tier.
   decode_int4_32k: the same model with int4 projections (Triton) and an int8 KV, dense attention,
   every layer and the whole KV on the device under the same cap.
4. layer_overlap: Llama-3.2-1B with half its layers streamed from pinned host memory: step time
   against max(transfer, compute).
5. store_read: a 1 GiB store file read into GPU memory through kvikio and through POSIX.
6. quant_products: Llama-3.1-8B's projection shapes in int4 (nibbles) and int8 through the Triton
   kernels against the bf16 product (cuBLAS), one row (decode) and 512 (prefill): time, error
   against the dequantized weight, and the weight bytes' rate as a percentage of the copy roofline.
   (The compiled grid of tests/test_gpu_quant.py runs in stage 1.)

Every stage runs in its own process with a time limit: a hung or crashed stage, a sticky CUDA
error or one stage's memory cap never reaches the next, and the whole run stays under 8 minutes
(the 128K decode, the longest, goes last and gets what is left, or is skipped saying why).
Writes gpu_check.json and gpu_check.md (a table for BENCHMARKS.md) under --out; exit code 0 only
when every stage ran and the kernels matched. Without a usable CUDA GPU it prints one line and
exits 0, measuring and writing nothing.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from offload.engine_config import DEFAULT_KV_BUDGET
from offload.fileio import write_bytes_atomic, write_json_atomic

from .bench_kernels import _gpu_time, copy_bandwidth

TOTAL_BUDGET_S = 8 * 60 - 30  # 8 minutes, less the time to stop a stage and write the results
GIB, MIB = 1 << 30, 1 << 20
LLAMA8B = dict(heads=32, kv_heads=8, head_dim=128)  # Llama-3.1-8B attention: 32 query heads over 8 KV heads
LONG_CONTEXT = 131072
SINK, WINDOW = 4, 64  # the runtime's defaults (LLM(sink=4, window=64))
KV_BUDGET = DEFAULT_KV_BUDGET  # the runtime's default selection: 2% of the context besides sinks and window
SHADOWKV_RANK = 160  # rank of the pre-RoPE key factors, as bench_kernels
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # tests/test_kernels.py's, relative to max |reference|
KIVI_DEVICE_TEST = "test_a_layer_on_the_compute_device_reads_what_a_cpu_layer_reads"  # in tests/test_kv_kivi.py
# (N, K) of Llama-3.1-8B's projections: q|k|v fused, o, gate|up fused, down
QUANT_SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
QUANT_ROWS = (1, 512)  # a decode step's row, a prefill chunk
QUANT_TOL = 2e-2  # relative to max |reference|: bf16 activations and output
# (B, H, Hkv, D, N, S): a small batch of two with ragged selections, and one Llama-3.1-8B layer at 8K
DIRECT_SHAPES = ((2, 8, 2, 64, 1000, 37), (1, 32, 8, 128, 8192, 164))
MERGE_PARTS = 3

DECODE_MODEL, DECODE_GPU_MEMORY = "llama-3.1-8b", "24GiB"
DECODE_CPU_MEMORY = "64GiB"  # the README's 8B example: room for the host KV and index at 128K (~20 GiB)
PROMPT_SLACK = 64  # the prompt is context - 64 tokens: room for the generated ones
DECODE_TOKENS = 8  # the first comes from prefill, the first decode step builds the index: 6 steady steps
PREFILL_CHUNK = 4096  # bench_long's GPU chunk: each chunk fetches the sparse layers' prefix from the host
LONG_OVER_SHORT = LONG_CONTEXT / 32768  # prefill and index build grow at least this much from 32K to 128K

OVERLAP_MODEL, OVERLAP_CONTEXT, OVERLAP_PROMPT, OVERLAP_STEPS = "llama-3.2-1b", 1024, 64, 16
STORE_BYTES, READ_REPEATS = GIB, 3


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    cap_s: float  # the longest it may run
    min_s: float  # not started with less time left than this


# Run order: the 128K decode last, so that it takes what the others leave.
STAGES = (
    Stage("kernel_tests", "1. kernel tests, compiled", 180, 30),
    Stage("kernel_direct", "1. kernels vs torch reference", 90, 20),
    Stage("gather_bandwidth", "2. gather attention at 128K", 60, 20),
    Stage("store_read", "5. 1 GiB store read into GPU memory", 90, 30),
    Stage("quant_products", "6. int4 / int8 products, Triton", 60, 20),
    Stage("layer_overlap", "4. layer streaming overlap", 120, 40),
    Stage("decode_int4_32k", "3. 8B int4 + int8 KV decode, 32K, 24 GiB cap", 150, 60),
    Stage("decode_32k", "3. 8B decode, 32K, 24 GiB cap", 150, 60),
    Stage("decode_128k", "3. 8B decode, 128K, 24 GiB cap", TOTAL_BUDGET_S, 90),
)


# ------------------------------------------------------------------------------ helpers (CPU-testable)
def say(message: str) -> None:
    """Progress inside a stage's process (stderr: stdout is the parent's summary)."""
    print(f"gpu_check:   {message}", file=sys.stderr, flush=True)


def error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300].rstrip(": ")


def pytest_counts(output: str) -> dict:
    """passed / failed / errors / skipped from pytest's summary line ("3 passed, 1 failed in 2.1s")."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    lines = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|failed|errors?|skipped)", ln)]
    for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", lines[-1] if lines else ""):
        counts["errors" if word.startswith("error") else word] += int(n)
    return counts


def stage_timeout(stage: Stage, left_s: float) -> tuple[float | None, str | None]:
    """(time limit, None), or (None, why it is skipped) when less than the stage's minimum is left."""
    if left_s < stage.min_s:
        return None, f"{max(left_s, 0):.0f} s of the budget left, the stage needs at least {stage.min_s:.0f} s"
    return min(stage.cap_s, left_s), None


def long_context_floor(short: dict | None) -> float | None:
    """A lower bound of the 128K decode's run time from the 32K one: loading, then prefill and the
    index build (the first decode step), which grow at least linearly with the context."""
    if not short or short.get("status") != "ok":
        return None
    return short.get("load_s", 0.0) + LONG_OVER_SHORT * (short["prefill_s"] + short["first_step_s"])


def child_result(partial: dict | None, rc: int | None, timed_out: bool, timeout: float, stderr: str) -> dict:
    """A stage process's outcome: what it saved (its figures so far), marked timed out or failed
    when it did not finish on its own."""
    result = dict(partial or {})
    if timed_out:
        result.update(status="timed out", error=f"no result within its {timeout:.0f} s limit"
                      + ("; the figures saved before are kept" if len(result) > 1 else ""))
    elif result.get("status") not in ("ok", "failed"):
        last = next((ln for ln in reversed(stderr.splitlines()) if ln.strip()), "no output")
        result.update(status="failed", error=f"the stage process exited with code {rc}: {last.strip()[:300]}")
    return result


def overall_ok(stages: dict) -> bool:
    """Every stage ran and every kernel check passed."""
    return len(stages) == len(STAGES) and all(
        s.get("status") == "ok" and s.get("checks_passed", True) for s in stages.values())


def gather_kv_bytes(batch: int, kv_heads: int, listed: int, head_dim: int, elem: int) -> int:
    """Bytes of K and V rows gather attention reads: each KV head's listed tokens (sinks, window,
    selection), once for its whole query group."""
    return batch * kv_heads * listed * head_dim * 2 * elem


def bandwidth_figures(nbytes: int, seconds: float, copy_bytes_per_s: float) -> dict:
    return {"seconds_us": 1e6 * seconds, "kv_mib": nbytes / MIB, "GBps": nbytes / seconds / 1e9,
            "copy_GBps": copy_bytes_per_s / 1e9, "roofline_pct": 100 * nbytes / seconds / copy_bytes_per_s}


def overlap_figures(step_s: float, compute_s: float, streamed_bytes: int, h2d_bytes_per_s: float) -> dict:
    """A streamed step against its ideal (transfer and compute fully overlapped) and serial bounds."""
    transfer_s = streamed_bytes / h2d_bytes_per_s
    bound = max(transfer_s, compute_s)
    return {"step_ms": 1e3 * step_s, "compute_ms": 1e3 * compute_s, "transfer_ms": 1e3 * transfer_s,
            "bound_ms": 1e3 * bound, "serial_ms": 1e3 * (transfer_s + compute_s), "step_over_bound": step_s / bound,
            "h2d_GBps": h2d_bytes_per_s / 1e9, "streamed_mib": streamed_bytes / MIB}


def half_streaming_budget(args, context: int, dtype: str = "bfloat16") -> tuple[int, int]:
    """The largest gpu_memory (bytes, on a half-layer grid) under which the planner streams at least
    half of the layers from host memory: (budget, layers streamed)."""
    from offload.tiers.planner import Tuning, plan

    def streamed(gpu_memory):
        return plan(args, model="gpu_check", context=context, device="cuda", dtype=dtype, gpu_memory=gpu_memory,
                    prefetch_slots=Tuning().prefetch_slots)  # what LLM uses without a tuned profile

    full = streamed(None)
    for k in range(args.num_layers):
        budget = full.tier_bytes()["device"] - k * full.layer_bytes - full.layer_bytes // 2
        n = len(streamed(budget).streamed_layers)
        if n >= args.num_layers // 2:
            return budget, n
    raise ValueError(f"no gpu_memory streams half of {args.num_layers} layers")


def synthetic_decode_inputs(B: int, H: int, Hkv: int, D: int, N: int, S: int, dtype: torch.dtype,
                            device: torch.device, seed: int = 0, ragged: bool = False):
    """Random q and KV; S distinct ids per KV head outside the dense part (sorted, as the indexes
    return them); ``ragged``: each head's count of valid ids random in 0..S."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, D, device=device, dtype=dtype, generator=gen)  # [B, H, D]
    k = torch.randn(B, Hkv, N, D, device=device, dtype=dtype, generator=gen)  # [B, Hkv, N, D]
    v = torch.randn(B, Hkv, N, D, device=device, dtype=dtype, generator=gen)  # [B, Hkv, N, D]
    seq_lens = torch.full((B,), N, device=device, dtype=torch.int32)  # [B]
    pool = torch.rand(B, Hkv, N - SINK - WINDOW, device=device, generator=gen)  # [B, Hkv, N - sink - window]
    selected = (pool.argsort(-1)[..., :S] + SINK).sort(-1).values.to(torch.int32).contiguous()  # [B, Hkv, S]
    counts = (torch.randint(0, S + 1, (B, Hkv), device=device, generator=gen, dtype=torch.int32) if ragged
              else torch.full((B, Hkv), S, device=device, dtype=torch.int32))  # [B, Hkv]
    return q, k, v, selected, counts, seq_lens


def compare(op: str, dtype: torch.dtype, shape, got: tuple, want: tuple) -> dict:
    """Max abs error of (out, lse) against the reference, within test_kernels' tolerance."""
    out, ref = got[0].float(), want[0].float()  # [B, H, D]
    err = (out - ref).abs().max().item()
    lse, ref_lse = got[1].float(), want[1].float()  # [B, H], finite: the dense part is never empty
    lse_err = (lse - ref_lse).abs().max().item()
    tol = TOL[dtype] * max(1.0, ref.abs().max().item())
    ok = (not torch.isnan(out).any().item() and err <= tol
          and lse_err <= TOL[dtype] * max(1.0, ref_lse.abs().max().item()))
    return {"op": op, "dtype": str(dtype).removeprefix("torch."), "shape": list(shape), "max_abs_err": err,
            "lse_max_abs_err": lse_err, "tol": tol, "ok": bool(ok)}


def check_kernels(device: torch.device, backend: str) -> list[dict]:
    """gather, shadowkv and merge with ``backend`` against the torch references, fp32 and bf16."""
    from offload.config import preset
    from offload.kernels import api, reference
    from offload.rope import rope_frequencies

    checks = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in DIRECT_SHAPES:
            B, H, Hkv, D, N, S = shape
            q, k, v, sel, counts, seq_lens = synthetic_decode_inputs(B, H, Hkv, D, N, S, dtype, device, ragged=B > 1)
            scale = D ** -0.5
            got = api.gather_attention(q, k, v, sel, counts, seq_lens, scale=scale, sink=SINK, window=WINDOW,
                                       backend=backend)
            want = reference.gather_attention_ref(q, k, v, sel, counts, seq_lens, scale, SINK, WINDOW)
            checks.append(compare("gather_attention", dtype, shape, got, want))

            gen = torch.Generator(device=device).manual_seed(1)
            u = (torch.randn(B, N, SHADOWKV_RANK, device=device, generator=gen) / math.sqrt(SHADOWKV_RANK)
                 ).to(dtype)  # [B, N, R]
            sv = torch.randn(B, SHADOWKV_RANK, Hkv * D, device=device, dtype=dtype, generator=gen)  # [B, R, Hkv*D]
            v_sel = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=gen)  # [B, Hkv, S, D]
            inv_freq, scaling = rope_frequencies(preset(DECODE_MODEL).replace(head_dim=D))  # [D/2] fp32
            inv_freq = inv_freq.to(device)
            got = api.shadowkv_attention(q, u, sv, v_sel, sel, counts, inv_freq, scale=scale,
                                         attention_scaling=scaling, backend=backend)
            want = reference.shadowkv_attention_ref(q, u, sv, v_sel, sel, counts, inv_freq, scale, scaling)
            checks.append(compare("shadowkv_attention", dtype, shape, got, want))

            outs = torch.randn(MERGE_PARTS, B, H, D, device=device, dtype=dtype, generator=gen)  # [P, B, H, D]
            lses = torch.randn(MERGE_PARTS, B, H, device=device, generator=gen)  # [P, B, H] fp32
            got = api.merge_attention(outs, lses, backend=backend)
            checks.append(compare("merge_attention", dtype, shape, got, reference.merge_attention_ref(outs, lses)))
    return checks


def drop_page_cache(path: Path) -> bool:
    """posix_fadvise(DONTNEED) on the whole file: its clean pages leave the page cache (no root
    needed, unlike /proc/sys/vm/drop_caches). False where the OS does not offer it."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class StepTimer:
    """Wall time of every forward pass of ``model`` (a CUDA device synchronised at both ends): prefill
    chunks (several tokens) and decode steps (one). ``progress(timer, event)`` runs after each pass
    ("prefill" or "decode") and before the first decode step ("decode_start"), so a stage can save
    its prefill time before the index build."""

    def __init__(self, model, progress=None):
        self.model, self.progress = model, progress or (lambda timer, event: None)
        self.sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
        self.prefill: list[float] = []
        self.decode: list[float] = []
        self._t0, self._hooks = 0.0, []

    def _pre(self, module, inputs):
        if inputs[0].shape[1] == 1 and not self.decode:
            self.progress(self, "decode_start")
        self.sync()
        self._t0 = time.perf_counter()

    def _post(self, module, inputs, output):
        self.sync()
        decode = inputs[0].shape[1] == 1
        (self.decode if decode else self.prefill).append(time.perf_counter() - self._t0)
        self.progress(self, "decode" if decode else "prefill")

    def __enter__(self) -> "StepTimer":
        self._hooks = [self.model.register_forward_pre_hook(self._pre), self.model.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()


def measure_decode(llm, context: int, report) -> dict:
    """Generate DECODE_TOKENS from a prompt of context - 64 random ids; prefill s, the first decode
    step (it builds the index), decode ms/token over the steps after it, peaks per tier."""
    from offload import SamplingParams

    from .bench_long import _reset_gpu_peak

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, llm.args.vocab_size, (context - PROMPT_SLACK,), generator=gen).tolist()
    _reset_gpu_peak(llm.device)  # the peak of generating, not of loading

    def progress(t: StepTimer, event: str) -> None:
        report(prefill_s=sum(t.prefill), **({"first_step_s": t.decode[0]} if t.decode else {}))
        if event == "decode_start":
            say(f"prefilled {len(prompt):,} tokens in {sum(t.prefill):.1f} s; the first decode step builds the index")
        elif event == "decode" and len(t.decode) == 1:
            say(f"first decode step {t.decode[0]:.1f} s")

    with StepTimer(llm.model, progress) as timer:
        llm.generate([prompt], SamplingParams(max_new_tokens=DECODE_TOKENS, ignore_eos=True))
    stats, tiers = llm.stats, llm.tier_report()
    steady = timer.decode[1:]
    return {"context": context, "prompt_tokens": len(prompt), "prefill_s": stats.prefill_seconds,
            "prefill_tok_s": stats.prefill_tokens_per_second, "first_step_s": timer.decode[0],
            "decode_ms": 1e3 * statistics.median(steady), "decode_steps_timed": len(steady),
            "decode_ms_stats": 1e3 * stats.decode_seconds / max(stats.decode_steps, 1),
            "kv_fetched_mib_per_step": llm.backend.kv_bytes_to_device / max(stats.decode_steps, 1) / MIB,
            "peak_device_gib": None if tiers["peak"]["device"] is None else tiers["peak"]["device"] / GIB,
            "peak_host_gib": tiers["peak"]["host"] / GIB}


# ------------------------------------------------------------------------------ stages (GPU)
def stage_kernel_tests(timeout: float) -> dict:
    """Runs in the parent: pytest is its own process already."""
    root = Path(__file__).resolve().parents[1]
    tests = [root / "tests" / "test_kernels.py", root / "tests" / "test_kv_kivi.py", root / "tests" / "test_gpu_quant.py"]
    missing = [t for t in tests if not t.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} is not here: run from a source checkout (pip install -e .)")
    script = Path(sys.executable).with_name("pytest")  # not `python -m pytest`: see README (kernels/ shadowing)
    cmd = ([str(script)] if script.is_file() else [sys.executable, "-m", "pytest"]) + [
        "-q", "-p", "no:cacheprovider", str(tests[0]), f"{tests[1]}::{KIVI_DEVICE_TEST}", str(tests[2])]
    run = run_process(cmd, timeout, cwd=root)
    if run["timed_out"]:
        return {"status": "timed out", "error": f"pytest did not finish within {timeout:.0f} s"}
    counts = pytest_counts(run["stdout"])
    if run["rc"] not in (0, 1):  # 1: tests failed; anything else: pytest itself could not run them
        last = next((ln for ln in reversed((run["stdout"] + run["stderr"]).splitlines()) if ln.strip()), "")
        return {"status": "failed", "error": f"pytest exited with code {run['rc']}: {last.strip()[:300]}", **counts}
    return {"status": "ok", **counts, "checks_passed": counts["passed"] > 0 and not counts["failed"]
            and not counts["errors"]}


def stage_kernel_direct(report, args) -> dict:
    checks = check_kernels(torch.device("cuda"), "triton")
    return {"checks": checks, "checks_passed": all(c["ok"] for c in checks)}


def stage_gather_bandwidth(report, args) -> dict:
    from offload.kernels import api

    dev, dtype = torch.device("cuda"), torch.bfloat16
    H, Hkv, D, N = LLAMA8B["heads"], LLAMA8B["kv_heads"], LLAMA8B["head_dim"], LONG_CONTEXT
    S = int(KV_BUDGET * N)
    q, k, v, sel, counts, seq_lens = synthetic_decode_inputs(1, H, Hkv, D, N, S, dtype, dev)
    roof = copy_bandwidth(dev, repeats=0)  # bytes/s of a 1 GiB copy_, read + write counted (do_bench: events, median)
    seconds = _gpu_time(lambda: api.gather_attention(q, k, v, sel, counts, seq_lens, scale=D ** -0.5, sink=SINK,
                                                     window=WINDOW, backend="triton"))
    nbytes = gather_kv_bytes(1, Hkv, SINK + WINDOW + S, D, torch.finfo(dtype).bits // 8)
    return {"heads": H, "kv_heads": Hkv, "head_dim": D, "context": N, "selected": S, "sink": SINK, "window": WINDOW,
            "dtype": "bfloat16", **bandwidth_figures(nbytes, seconds, roof)}


def stage_quant_products(report, args) -> dict:
    from offload.quant import INT4_NIBBLES_LAYOUT, Int4Weight, Int8Weight

    dev, dtype = torch.device("cuda"), torch.bfloat16
    roof = copy_bandwidth(dev, repeats=0)
    gen = torch.Generator(device=dev).manual_seed(0)
    products = []
    for N, K in QUANT_SHAPES:
        w = torch.randn(N, K, device=dev, dtype=dtype, generator=gen) * 0.02  # [N, K]
        weights = {"int4": Int4Weight.from_float(w, dtype), "int8": Int8Weight.from_float(w, dtype)}
        assert weights["int4"].layout == INT4_NIBBLES_LAYOUT
        for M in QUANT_ROWS:
            x = torch.randn(M, K, device=dev, dtype=dtype, generator=gen)  # [M, K]
            row = {"N": N, "K": K, "M": M, "bf16_us": _gpu_time(lambda: x @ w.t()) * 1e6}
            for name, weight in weights.items():
                ref = x.float() @ weight.dequantize().float().t()  # [M, N]
                err = (weight(x).float() - ref).abs().max().item() / ref.abs().max().item()
                seconds = _gpu_time(lambda: weight(x))
                row |= {f"{name}_us": seconds * 1e6, f"{name}_rel_err": err, f"{name}_ok": err <= QUANT_TOL,
                        f"{name}_weight_GBps": weight.nbytes / seconds / 1e9,
                        f"{name}_roofline_pct": 100 * weight.nbytes / seconds / (roof / 2)}  # reads alone
            products.append(row)
            report(products=products, copy_GBps=roof / 1e9)
    return {"products": products, "copy_GBps": roof / 1e9,
            "checks_passed": all(r["int4_ok"] and r["int8_ok"] for r in products)}


def _decode_llm(context: int, quantized: bool):
    from offload import LLM

    if quantized:  # every layer and the KV on the device: what `offload plan --quantize int4 --kv-dtype int8` places
        return LLM(DECODE_MODEL, load_format="dummy", seed=0, device="cuda", dtype="bfloat16",
                   gpu_memory=DECODE_GPU_MEMORY, cpu_memory=DECODE_CPU_MEMORY, quantize="int4", kv_dtype="int8",
                   kv_policy="dense", max_context=context, prefill_chunk_size=PREFILL_CHUNK, verbose=False)
    return LLM(DECODE_MODEL, load_format="dummy", seed=0, device="cuda", dtype="bfloat16",
               gpu_memory=DECODE_GPU_MEMORY, cpu_memory=DECODE_CPU_MEMORY, kv_policy="retrieval",
               max_context=context, kv_offload=True, prefill_chunk_size=PREFILL_CHUNK, verbose=False)


def stage_decode(report, context: int, quantized: bool = False) -> dict:
    from offload.tiers.budget import parse_size

    dev = torch.device("cuda")
    total = torch.cuda.get_device_properties(dev).total_memory
    # A real cap, as bench_long's --gpu-memory: the allocator fails past it, whatever the planner thought.
    torch.cuda.set_per_process_memory_fraction(min(1.0, parse_size(DECODE_GPU_MEMORY) / total), dev)
    t0 = time.perf_counter()
    llm = _decode_llm(context, quantized)
    tiers = llm.placement.layer_tiers
    report(load_s=time.perf_counter() - t0, layers=f"{tiers.count('device')}/{tiers.count('host')}/"
                                                   f"{tiers.count('disk')}")
    say(f"loaded {DECODE_MODEL} (dummy) in {time.perf_counter() - t0:.0f} s; prefilling {context - PROMPT_SLACK:,} "
        f"tokens")
    try:
        return measure_decode(llm, context, report)
    finally:
        llm.close()


def _step_seconds(llm) -> float:
    """Median decode step of OVERLAP_STEPS after a warm-up step, from a short random prompt."""
    from offload import SamplingParams

    prompt = torch.randint(0, llm.args.vocab_size, (OVERLAP_PROMPT,), generator=torch.Generator().manual_seed(0))
    with StepTimer(llm.model) as timer:
        llm.generate([prompt.tolist()], SamplingParams(max_new_tokens=OVERLAP_STEPS + 2, ignore_eos=True))
    return statistics.median(timer.decode[1:])


def stage_layer_overlap(report, args) -> dict:
    from offload import LLM, preset

    common = dict(load_format="dummy", seed=0, device="cuda", dtype="bfloat16", max_context=OVERLAP_CONTEXT,
                  verbose=False)
    resident = LLM(OVERLAP_MODEL, **common)
    compute_s = _step_seconds(resident)  # every layer resident: the compute a streamed step overlaps with
    say(f"all-resident decode step {1e3 * compute_s:.2f} ms")
    del resident
    gc.collect()  # the model's modules reference each other: free its weights before the next load
    torch.cuda.empty_cache()
    budget, _ = half_streaming_budget(preset(OVERLAP_MODEL), OVERLAP_CONTEXT)
    llm = LLM(OVERLAP_MODEL, gpu_memory=budget, **common)
    try:
        p = llm.placement
        streamed = p.streamed_layers
        report(layers=len(p.layer_tiers), streamed_layers=len(streamed), gpu_memory_gib=budget / GIB)
        step_s = _step_seconds(llm)
        say(f"{len(streamed)} of {len(p.layer_tiers)} layers streamed: decode step {1e3 * step_s:.2f} ms")
    finally:
        llm.close()
    src = torch.empty(p.layer_bytes, dtype=torch.uint8).pin_memory()  # [layer bytes] pinned host
    dst = torch.empty(p.layer_bytes, dtype=torch.uint8, device="cuda")  # [layer bytes]
    h2d = p.layer_bytes / _gpu_time(lambda: dst.copy_(src, non_blocking=True))  # one layer's copy, as streamed
    return {"layers": len(p.layer_tiers), "streamed_layers": len(streamed), "gpu_memory_gib": budget / GIB,
            **overlap_figures(step_s, compute_s, p.layer_bytes * len(streamed), h2d)}


def _timed_reads(path: Path, io_backend: str) -> dict:
    """GB/s of whole verified reads into GPU memory, the page cache dropped before each; the first
    read (buffers, kvikio's threads) is not timed."""
    from offload.tiers.io import StoreReader

    with StoreReader(path, device="cuda", io_backend=io_backend) as reader:
        times, dropped = [], True
        for _ in range(READ_REPEATS + 1):
            dropped &= drop_page_cache(path)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = reader.read("blob")  # [STORE_BYTES] uint8 on the GPU
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            del out
        return {f"{io_backend}_GBps": STORE_BYTES / statistics.median(times[1:]) / 1e9,
                f"{io_backend}_mode": reader.mode, f"{io_backend}_cache_dropped": dropped}


def stage_store_read(report, args) -> dict:
    from offload.tiers.store import write_store

    with tempfile.TemporaryDirectory(prefix="gpu_check-store-", dir=args.tmp_dir) as tmp:
        path = Path(tmp) / "read_check.store"
        data = torch.randint(0, 256, (STORE_BYTES,), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(0))  # [STORE_BYTES] host
        t0 = time.perf_counter()
        write_store(path, {"blob": data})
        del data
        report(file_gib=STORE_BYTES / GIB, write_GBps=STORE_BYTES / (time.perf_counter() - t0) / 1e9)
        say(f"wrote a {STORE_BYTES / GIB:.0f} GiB store in {time.perf_counter() - t0:.1f} s; reading it")
        report(**_timed_reads(path, "posix"))
        try:
            import kvikio  # noqa: F401
        except Exception as e:  # not installed, or its CUDA libraries are missing
            return {"kvikio": f"kvikio unavailable: {error_line(e)}"}
        return _timed_reads(path, "kvikio")


CHILD_STAGES = {
    "kernel_direct": stage_kernel_direct,
    "gather_bandwidth": stage_gather_bandwidth,
    "store_read": stage_store_read,
    "quant_products": stage_quant_products,
    "layer_overlap": stage_layer_overlap,
    "decode_int4_32k": lambda report, args: stage_decode(report, 32768, quantized=True),
    "decode_32k": lambda report, args: stage_decode(report, 32768),
    "decode_128k": lambda report, args: stage_decode(report, LONG_CONTEXT),
}


# ------------------------------------------------------------------------------ running stages
def _tee(pipe, stream, sink: list[str]) -> None:
    """Echo a child's output as it comes (progress bars included) and keep it."""
    while chunk := os.read(pipe.fileno(), 1 << 16):
        text = chunk.decode(errors="replace")
        sink.append(text)
        stream.write(text)
        stream.flush()


def run_process(cmd: list[str], timeout: float, cwd=None) -> dict:
    """Run ``cmd`` (TRITON_INTERPRET unset: kernels compile), echoing its output; at the time limit
    its whole process group (compiler workers included) is killed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=_tee, args=(proc.stdout, sys.stdout, out), daemon=True),
               threading.Thread(target=_tee, args=(proc.stderr, sys.stderr, err), daemon=True)]
    for r in readers:
        r.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:  # past its limit, or this check interrupted (Ctrl-C): never leave it running
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended meanwhile
                pass
            proc.wait()
    for r in readers:
        r.join(timeout=5)  # a grandchild holding the pipe open does not hold the check
    return {"rc": proc.returncode, "timed_out": timed_out, "stdout": "".join(out), "stderr": "".join(err)}


def run_child(stage: str, timeout: float, work: Path, tmp_dir: str | None) -> dict:
    result_file = work / f"{stage}.json"
    cmd = [sys.executable, "-m", "offload.profiles.gpu_check", "--stage", stage, "--stage-out", str(result_file)]
    run = run_process(cmd + (["--tmp-dir", tmp_dir] if tmp_dir else []), timeout, cwd=work)
    partial = json.loads(result_file.read_text()) if result_file.is_file() else None
    return child_result(partial, run["rc"], run["timed_out"], timeout, run["stderr"])


def child_main(stage: str, out: Path, args) -> int:
    """Inside a stage's process: run it, saving its figures as they come (a stage that runs out of
    time keeps them) and its failure as one error line."""
    result: dict = {"status": "running"}

    def report(**figures) -> None:
        result.update(figures)
        write_json_atomic(out, result)

    report()
    try:
        figures = CHILD_STAGES[stage](report, args)
        report(**figures, status="ok")
    except Exception as e:
        report(status="failed", error=error_line(e))
    return 0


# ------------------------------------------------------------------------------ the report
ROWS = {  # stage -> (figure, value format over the stage's result); rows whose figures are missing are left out
    "kernel_tests": [("tests passed / failed / errors / skipped", "{passed} / {failed} / {errors} / {skipped}")],
    "gather_bandwidth": [
        ("shape", "B=1 H={heads} Hkv={kv_heads} D={head_dim}, {context:,} tokens, {selected:,} selected + "
                  "{sink} sinks + {window} window, {dtype}"),
        ("median time (do_bench)", "{seconds_us:.1f} us"), ("K/V bytes read", "{kv_mib:.2f} MiB"),
        ("achieved", "{GBps:.0f} GB/s"), ("copy roofline (1 GiB D2D copy_, read + write)", "{copy_GBps:.0f} GB/s"),
        ("% of copy roofline", "{roofline_pct:.1f}%")],
    "decode": [
        ("load (dummy weights); layers device/host/disk", "{load_s:.1f} s; {layers}"),
        ("prefill", "{prefill_s:.1f} s"), ("prefill rate", "{prefill_tok_s:,.0f} tokens/s"),
        ("first decode step (builds the retrieval index; dense: none)", "{first_step_s:.1f} s"),
        ("decode", "{decode_ms:.1f} ms/token (median of {decode_steps_timed} steps after the first)"),
        ("decode, engine stats (all steps)", "{decode_ms_stats:.1f} ms/token"),
        ("KV fetched from host per step", "{kv_fetched_mib_per_step:.2f} MiB"),
        ("peak device / host", "{peak_device_gib:.2f} / {peak_host_gib:.2f} GiB")],
    "layer_overlap": [
        ("layers streamed from pinned host memory", "{streamed_layers} of {layers} ({streamed_mib:.0f} MiB per step), "
                                                    "gpu_memory {gpu_memory_gib:.2f} GiB"),
        ("pinned H2D (one layer's bytes)", "{h2d_GBps:.1f} GB/s"),
        ("compute: all-resident step", "{compute_ms:.2f} ms"),
        ("transfer: streamed bytes / H2D", "{transfer_ms:.2f} ms"), ("streamed step", "{step_ms:.2f} ms"),
        ("step / max(transfer, compute)", "{step_over_bound:.2f}x (serial sum {serial_ms:.2f} ms)")],
    "store_read": [
        ("write_store (fsync)", "{write_GBps:.2f} GB/s"),
        ("POSIX read, verified, into GPU memory", "{posix_GBps:.2f} GB/s ({posix_mode}, page cache dropped: "
                                                  "{posix_cache_dropped})"),
        ("kvikio read, verified, into GPU memory", "{kvikio_GBps:.2f} GB/s ({kvikio_mode}, page cache dropped: "
                                                   "{kvikio_cache_dropped})"),
        ("kvikio", "{kvikio}")],
}


def stage_rows(name: str, result: dict) -> list[tuple[str, str]]:
    rows = []
    if result.get("status") != "ok":
        rows.append(("status", f"{result.get('status')}: {result.get('error', '')}".rstrip(": ")))
    for c in result.get("checks", []):
        rows.append((f"{c['op']} {c['dtype']} {tuple(c['shape'])}",
                     f"max abs err {c['max_abs_err']:.3g} (lse {c['lse_max_abs_err']:.3g}), tol {c['tol']:.3g}: "
                     f"{'ok' if c['ok'] else 'FAIL'}"))
    for r in result.get("products", []):
        rows.append((f"{r['N']} x {r['K']}, {r['M']} rows",
                     f"bf16 {r['bf16_us']:.1f} us; " + "; ".join(
                         f"{q} {r[q + '_us']:.1f} us ({r[q + '_weight_GBps']:.0f} GB/s of weight, "
                         f"{r[q + '_roofline_pct']:.0f}% of copy reads, rel err {r[q + '_rel_err']:.1g}"
                         f"{'' if r[q + '_ok'] else ' FAIL'})" for q in ("int4", "int8") if q + "_us" in r)))
    for label, fmt in ROWS.get("decode" if name.startswith("decode") else name, []):
        try:
            rows.append((label, fmt.format_map(result)))
        except (KeyError, TypeError, ValueError):
            pass  # a figure this run did not reach
    return rows


def render_markdown(results: dict) -> str:
    titles = {s.name: s.title for s in STAGES}
    lines = [f"## GPU check: {results['device']} — {results['date']}", "",
             f"torch {results['torch']} (CUDA {results['cuda']}); {results['elapsed_s']:.0f} s; every stage ran and "
             f"the kernels matched: {'yes' if results['ok'] else 'no'}.", "", "```", results["command"], "```", "",
             "| stage | figure | value |", "|---|---|---|"]
    for name, result in results["stages"].items():
        for label, value in stage_rows(name, result):
            lines.append(f"| {titles.get(name, name)} | {label} | {value.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check", help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--tmp-dir", default=None, help="where the 1 GiB store file is written (default: the system's)")
    p.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="time for all stages together")
    p.add_argument("--stage", choices=sorted(CHILD_STAGES), help=argparse.SUPPRESS)  # inside a stage's process
    p.add_argument("--stage-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        return child_main(args.stage, Path(args.stage_out), args)
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU is usable here (torch {torch.__version__}, cuda available: False): "
              "nothing measured")
        return 0

    start = time.monotonic()
    try:
        device = torch.cuda.get_device_name(0)
    except Exception as e:
        device = f"unknown GPU ({error_line(e)})"
    results = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
               "date": datetime.date.today().isoformat(), "started": datetime.datetime.now().isoformat(),
               "command": shlex.join(["python", "-m", "offload.profiles.gpu_check",
                                      *(sys.argv[1:] if argv is None else argv)]),
               "budget_s": args.budget_s, "stages": {}}
    stages = results["stages"]
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        for i, stage in enumerate(STAGES, 1):
            left = args.budget_s - (time.monotonic() - start)
            timeout, why = stage_timeout(stage, left)
            floor = long_context_floor(stages.get("decode_32k")) if stage.name == "decode_128k" else None
            if why is None and floor is not None and floor > left:
                why = f"the 32K run predicts at least {floor:.0f} s at 128K, {left:.0f} s are left"
            print(f"gpu_check: [{i}/{len(STAGES)}] {stage.title}: " + (f"skipped ({why})" if why else
                  f"up to {timeout:.0f} s"), flush=True)
            t0 = time.monotonic()
            if why:
                stages[stage.name] = {"status": "skipped", "error": why}
                continue
            try:
                stages[stage.name] = (stage_kernel_tests(timeout) if stage.name == "kernel_tests"
                                      else run_child(stage.name, timeout, Path(work), args.tmp_dir))
            except Exception as e:  # the runner itself failed (e.g. no tests folder)
                stages[stage.name] = {"status": "failed", "error": error_line(e)}
            stages[stage.name]["seconds"] = time.monotonic() - t0
            r = stages[stage.name]
            print(f"gpu_check: {stage.name}: {r['status']} in {r['seconds']:.0f} s"
                  + (f" ({r['error']})" if r.get("error") else ""), flush=True)
    results["elapsed_s"] = time.monotonic() - start
    results["ok"] = overall_ok(stages)
    markdown = render_markdown(results)
    out = Path(args.out)
    write_json_atomic(out / "gpu_check.json", results)
    write_bytes_atomic(out / "gpu_check.md", markdown.encode())
    print(markdown + f"\ngpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
