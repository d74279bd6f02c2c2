"""Decode-step breakdown: where the time of one decode step goes, per phase and per layer, against
the step time the placement planner predicts from the bandwidth profile.

Phases (exclusive times; nested timers subtract their children): ``weight_fetch`` (waiting for a
streamed layer's load), ``qkv_o_proj`` (attention projections, RoPE), ``index_search`` (the KV
policy's search), ``attention`` (the attention itself: dense, or gather over the selection),
``mlp``, ``norms`` (with the residual add fused to the FFN norm), ``layer_glue`` (the rest of a decoder
layer's own time: the second residual add and the calls into its modules), ``embed_head`` (embedding,
final norm, LM head) and ``sampling``. Overlap:
how much of the weight transfer ran while compute ran (transfer time not waited for).
``step_ms`` is the step as the runtime runs it; the phases come from further steps through the
model's generic forward with a timer around each module (a bound CPU decode step,
:mod:`offload.decode_step`, calls no module), and ``accounted_fraction`` is their share of those
instrumented steps (``instrumented_step_ms``). Writes a JSON, prints a table and draws a stacked
bar chart (PNG).

    python -m offload.profiles.breakdown --context 4096 --profile profile.json --out breakdown.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from offload.fileio import write_json_atomic

PHASES = ("weight_fetch", "qkv_o_proj", "index_search", "attention", "mlp", "norms", "layer_glue", "embed_head",
          "sampling")


class PhaseTimer:
    """Exclusive wall time per (phase, layer); children's time is taken out of their parent."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.totals: dict[tuple[str, int], float] = defaultdict(float)
        self._stack: list[list] = []  # [phase, layer, start, child_time]
        self.layer = -1

    @contextmanager
    def phase(self, name: str):
        self.sync()
        frame = [name, self.layer, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self.sync()
            elapsed = time.perf_counter() - frame[2]
            self._stack.pop()
            self.totals[(name, frame[1])] += elapsed - frame[3]
            if self._stack:
                self._stack[-1][3] += elapsed

    def by_phase(self) -> dict[str, float]:
        out = defaultdict(float)
        for (name, _), t in self.totals.items():
            out[name] += t
        return out


def instrument(timer: PhaseTimer, llm):
    """Wrap the model's parts with timers; returns an undo function."""
    from offload import model as model_mod
    from offload.indexes import base as index_base

    patches = []

    def wrap(owner, attr, phase, layer_arg=None):
        """Time ``owner.attr`` (a method on a class, or a function in a module) as ``phase``;
        ``layer_arg``: the position of the layer index among its arguments (self included)."""
        original = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            if layer_arg is not None:
                timer.layer = args[layer_arg]
            with timer.phase(phase):
                return original(*args, **kwargs)
        patches.append((owner, attr, original, attr in vars(owner)))
        setattr(owner, attr, wrapped)

    wrap(model_mod.Transformer, "embed_tokens", "embed_head")
    wrap(model_mod.Transformer, "head", "embed_head")
    # a layer's own time: the residual adds and the calls into its modules (Python dispatch)
    wrap(model_mod.DecoderLayer, "forward", "layer_glue", layer_arg=2)
    wrap(model_mod.Attention, "forward", "qkv_o_proj")
    wrap(model_mod.RotaryEmbedding, "cos_sin", "qkv_o_proj")  # the step's RoPE table rows
    wrap(model_mod.MLP, "forward", "mlp")
    wrap(model_mod.RMSNorm, "forward", "norms")
    # the residual add and the FFN norm as one compiled call (DecoderLayer.forward on the CPU)
    wrap(model_mod.row_ops, "add_rms_norm", "norms")
    backend = type(llm.backend)
    wrap(backend, "forward", "attention")
    wrap(backend, "begin", "attention")  # the step's masks and per-row lengths
    wrap(backend, "end", "attention")
    for cls in {type(ix) for ix in getattr(llm.backend, "indexes", {}).values()} | set(index_base._REGISTRY.values()):
        if "search" in vars(cls):
            wrap(cls, "search", "index_search")
    if llm.streamer is not None:
        wrap(type(llm.streamer), "acquire", "weight_fetch")

    def undo():
        for owner, attr, original, own in reversed(patches):
            if own:
                setattr(owner, attr, original)
            else:  # inherited: the base class's stays
                delattr(owner, attr)
    return undo


@torch.inference_mode()
def measure(llm, context: int, steps: int) -> dict:
    from offload.attention import ForwardBatch

    from .bench_generate import _real_text_ids

    dev = llm.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    ids = _real_text_ids(llm.tokenizer, context)
    llm.backend.allocate(1, context + 2 * steps + 2)  # warm-up, the plain steps, the instrumented ones
    logits = llm.engine.prefill(0, ids)  # [V]
    token = int(logits.argmax())
    n = context
    for _ in range(2):  # warm up: index build, first-touch of buffers
        batch = ForwardBatch.decode([n], dev, [token])
        token = int(llm.model(torch.tensor([[token]], device=dev), batch, llm.backend)[0, -1].argmax())
        n += 1
    plain_s = []  # the step as the runtime runs it (a bound CPU decode step calls no module: no phases)
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        batch = ForwardBatch.decode([n], dev, [token])
        token = int(llm.model(torch.tensor([[token]], device=dev), batch, llm.backend)[0, -1].argmax())
        sync()
        plain_s.append(time.perf_counter() - t0)
        n += 1
    timer = PhaseTimer(sync)
    undo = instrument(timer, llm)
    bound, llm.model.decode_step = llm.model.decode_step, None  # the phases are the generic forward's modules
    steps_s, per_step = [], []
    try:
        for _ in range(steps):
            before = dict(timer.by_phase())
            sync()
            t0 = time.perf_counter()
            batch = ForwardBatch.decode([n], dev, [token])
            logits = llm.model(torch.tensor([[token]], device=dev), batch, llm.backend)[0, -1]  # [V]
            with timer.phase("sampling"):
                token = int(logits.argmax())
            steps_s.append(time.perf_counter() - t0)
            after = timer.by_phase()
            per_step.append({k: after.get(k, 0.0) - before.get(k, 0.0) for k in PHASES})
            n += 1
    finally:
        llm.model.decode_step = bound
        undo()
    per_layer: dict[int, dict[str, float]] = defaultdict(dict)
    for (name, layer), t in timer.totals.items():
        if layer >= 0:
            per_layer[layer][name] = 1e3 * t / steps
    median = statistics.median(steps_s)
    phases_ms = {k: 1e3 * statistics.median(s[k] for s in per_step) for k in PHASES}
    accounted = sum(phases_ms.values())
    out = {"context": context, "steps": steps, "step_ms": 1e3 * statistics.median(plain_s),
           "step_ms_runs": [1e3 * s for s in plain_s], "instrumented_step_ms": 1e3 * median,
           "phases_ms": phases_ms, "accounted_fraction": accounted / (1e3 * median),
           "per_layer_ms": {str(k): v for k, v in sorted(per_layer.items())}}
    if llm.streamer is not None:
        report = llm.tier_report()
        out["overlap"] = {"weight_fetch_wait_ms": phases_ms["weight_fetch"],
                          "disk_bytes_per_pass": report["disk_bytes_per_pass"]}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    bottom = 0.0
    for phase in PHASES:
        v = result["measured"]["phases_ms"][phase]
        if v > 0:
            ax.bar(["measured"], [v], bottom=bottom, label=phase)
            bottom += v
    pbottom = 0.0
    for phase, v in result["predicted"]["breakdown_ms"].items():
        if v > 0:
            ax.bar(["predicted"], [v], bottom=pbottom, label=f"pred: {phase}", hatch="//", alpha=0.6)
            pbottom += v
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"Decode step at context {result['measured']['context']:,}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run(model=None, context: int = 4096, steps: int = 8, kv_policy: str = "dense", dtype: str = "auto",
        profile: str | None = None, cpu_memory=None, gpu_memory=None, disk_dir=None) -> dict:
    from offload import LLM

    llm = LLM(model, dtype=dtype, kv_policy=kv_policy, max_context=context + 2 * steps + 8, cpu_memory=cpu_memory,
              gpu_memory=gpu_memory, disk_dir=disk_dir, profile=profile, verbose=False)
    measured = measure(llm, context, steps)
    # the placement the runtime was resolved with (at its max_context: the steps measured sit just below it)
    placement = llm.runtime.resolved.placement
    llm.close()
    return {"measured": measured,
            "predicted": {"step_ms": placement.predicted_step_ms, "breakdown_ms": placement.step_breakdown_ms,
                          "profile": placement.profile_source},
            "prediction_error": placement.predicted_step_ms / measured["step_ms"] - 1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--kv-policy", default="dense")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--profile", default=None, help="bandwidth profile JSON (offload profile)")
    p.add_argument("--cpu-memory", default=None)
    p.add_argument("--gpu-memory", default=None)
    p.add_argument("--disk-dir", default=None)
    p.add_argument("--out", default="breakdown.json")
    args = p.parse_args(argv)
    result = run(args.model, args.context, args.steps, args.kv_policy, args.dtype, args.profile, args.cpu_memory,
                 args.gpu_memory, args.disk_dir)
    write_json_atomic(args.out, result)
    plot(result, Path(args.out).with_suffix(".png"))
    m = result["measured"]
    print("| phase | ms/step (median) |\n|---|---|")
    for k, v in m["phases_ms"].items():
        print(f"| {k} | {v:.2f} |")
    print(f"measured step {m['step_ms']:.1f} ms, phases account for {m['accounted_fraction']:.1%}; "
          f"planner predicted {result['predicted']['step_ms']:.1f} ms ({result['prediction_error']:+.0%}), "
          f"profile: {result['predicted']['profile']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
