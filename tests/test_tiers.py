"""Tiers: budgets, the planner, streaming layers from disk (bit-exact), and the edge mode under a budget."""

import json
import subprocess
import sys

import pytest
import torch

from offload import LLM, SamplingParams
from offload.config import DENSE_LAYERS, preset
from offload.tiers import planner as planner_mod
from offload.tiers.budget import BudgetError, parse_size, pinned_nbytes
from offload.tiers.planner import BandwidthProfile, plan

GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


def test_parse_size():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size(1234) == 1234
    with pytest.raises(Exception, match="cannot read cpu_memory '24 parsecs'"):
        parse_size("24 parsecs", "cpu_memory")


def test_plan_llama_8b_at_128k_on_24gib_without_a_gpu():
    args = preset("llama-3.1-8b")
    sparse = plan(args, model="llama-3.1-8b", context=131072, device="cuda", dtype="bfloat16", kv_policy="retrieval",
                  gpu_memory=24 * 2**30, cpu_memory=64 * 2**30)
    assert sparse.layer_tiers == ("device",) * 32  # the KV moved to the host frees room for every layer
    # the sparse layers' KV on the host (31 x 512 MiB); the dense layer's KV stays on the device
    per_layer = args.kv_bytes_per_token(2) * 131072 // 32  # 512 MiB
    assert sparse.kv_tiers["host"] == (32 - DENSE_LAYERS) * per_layer
    assert DENSE_LAYERS * per_layer < sparse.kv_tiers["device"] < DENSE_LAYERS * per_layer + 2**30
    assert sparse.tier_bytes()["device"] <= 24 * 2**30
    dense = plan(args, model="llama-3.1-8b", context=131072, device="cuda", dtype="bfloat16", kv_policy="dense",
                 gpu_memory=24 * 2**30, cpu_memory=64 * 2**30)
    assert 0 < dense.layer_tiers.count("device") < 32 and "host" in dense.layer_tiers  # dense KV crowds out layers
    assert dense.tier_bytes()["device"] <= 24 * 2**30
    assert dense.predicted_step_ms > sparse.step_breakdown_ms["weights"]
    assert "| device | 24.00 GiB |" in dense.table()
    with pytest.raises(BudgetError, match="smallest budget that works is"):
        plan(args, model="m", context=131072, device="cuda", dtype="bfloat16", kv_policy="dense",
             gpu_memory=8 * 2**30, cpu_memory=64 * 2**30)
    with pytest.raises(BudgetError, match="give disk_dir"):
        plan(args, model="m", context=8192, device="cuda", dtype="bfloat16", gpu_memory=4 * 2**30,
             cpu_memory=4 * 2**30)


def test_profile_feeds_the_planner(tmp_path):
    args = preset("mistral-7b")
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"planner": {"disk_read_gbs": 0.5, "host_read_gbs": 20.0}}))
    prof = BandwidthProfile.load(path)
    assert prof.disk_read_gbs == 0.5 and prof.source == str(path)
    kw = dict(model="m", context=4096, device="cpu", dtype="bfloat16", cpu_memory=6 * 2**30, disk_dir=str(tmp_path))
    slow, fast = plan(args, profile=prof, **kw), plan(args, profile=BandwidthProfile(), **kw)
    assert "disk" in slow.layer_tiers and slow.predicted_step_ms > fast.predicted_step_ms
    slow.save(tmp_path / "placement.json")
    assert json.loads((tmp_path / "placement.json").read_text())["layer_tiers"] == list(slow.layer_tiers)


def test_cli_plan_for_a_preset_on_this_machine(capsys):
    from offload.cli import main

    assert main(["plan", "--model", "qwen2.5-7b", "--context", "131072", "--gpu-memory", "24GiB",
                 "--cpu-memory", "64GiB", "--device", "cuda", "--kv-policy", "retrieval"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-7b" in out and "predicted decode step" in out
    assert main(["plan", "--model", "qwen2.5-7b", "--context", "131072", "--gpu-memory", "2GiB", "--device", "cuda"]) == 2
    assert "too small" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_layers_streamed_from_disk_are_bit_identical(tmp_path, monkeypatch, family):
    """Off-device layers go through the store and the double buffers; logits are bit-identical."""
    from conftest import make_tiny_model

    monkeypatch.setattr(planner_mod, "RUNTIME_RESERVE", 0)
    folder = tmp_path / "model"
    hf = make_tiny_model(folder, family, seed=3, num_hidden_layers=6)  # 5 streamed: an odd cycle
    ids = torch.randint(3, hf.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    resident = LLM(folder)
    args = resident.args
    layer = args.layer_param_count() * 4
    fixed = args.vocab_size * args.hidden_size * 4 * (1 if args.tie_word_embeddings else 2) + args.hidden_size * 4
    kv = args.kv_bytes_per_token(4) * 64
    budget = fixed + kv + 3 * layer + layer // 2  # two streaming buffers + one resident layer
    streamed = LLM(folder, cpu_memory=budget, disk_dir=tmp_path / "store", max_context=64)
    assert streamed.placement.layer_tiers.count("disk") == args.num_layers - 1
    assert torch.equal(streamed.logits(ids), resident.logits(ids))
    assert streamed.generate([ids], GREEDY)[0].token_ids == resident.generate([ids], GREEDY)[0].token_ids
    report = streamed.tier_report()
    assert report["disk_mode"] == "O_DIRECT"
    # peaks measured while generating: at least the resident weights and the KV, no GPU here
    held = sum(p.numel() * p.element_size() for p in streamed.model.parameters() if p.device.type == "cpu")
    assert report["peak"]["host"] >= held + streamed.backend.kv_nbytes() and report["peak"]["device"] is None
    assert report["disk_bytes_per_pass"] >= (args.num_layers - 1) * layer  # every off-device layer, every pass
    streamed_layers = args.num_layers - 1
    # each pass loads every streamed layer once, plus the two buffers prefetched for the next pass
    assert report["forward_passes"] * streamed_layers <= report["layer_loads"] <= (
        report["forward_passes"] * streamed_layers + 2)
    again = LLM(folder, cpu_memory=budget, disk_dir=tmp_path / "store", max_context=64)  # reuses the verified store
    assert torch.equal(again.logits(ids), resident.logits(ids))
    streamed.close()
    again.close()


def test_a_prompt_streams_each_layer_once_in_layer_major_order(tmp_path, monkeypatch):
    """Streamed layers prefill a prompt of several chunks a layer at a time: logits bit-identical to
    the resident model's chunk-by-chunk prefill, and each streamed layer loaded once for the prompt."""
    from conftest import make_tiny_model

    monkeypatch.setattr(planner_mod, "RUNTIME_RESERVE", 0)
    folder = tmp_path / "model"
    hf = make_tiny_model(folder, "llama", seed=4, num_hidden_layers=5)
    ids = torch.randint(3, hf.config.vocab_size, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    resident = LLM(folder, prefill_chunk_size=8)
    args = resident.args
    layer = args.layer_param_count() * 4
    fixed = args.vocab_size * args.hidden_size * 4 * (1 if args.tie_word_embeddings else 2) + args.hidden_size * 4
    budget = fixed + args.kv_bytes_per_token(4) * 64 + 3 * layer + layer // 2
    streamed = LLM(folder, cpu_memory=budget, disk_dir=tmp_path / "store", max_context=64, prefill_chunk_size=8)
    assert streamed.engine.layer_major_tokens and resident.engine.layer_major_tokens is None
    assert torch.equal(streamed.logits(ids), resident.logits(ids))  # 6 chunks
    report = streamed.tier_report()
    streamed_layers = args.num_layers - 1
    assert report["forward_passes"] == 1  # chunk by chunk: 6 passes, 6 loads of every streamed layer
    assert streamed_layers <= report["layer_loads"] <= streamed_layers + 2
    assert streamed.generate([ids], GREEDY)[0].token_ids == resident.generate([ids], GREEDY)[0].token_ids
    streamed.close()


EDGE_SCRIPT = r"""
import json, sys
from offload.tiers.budget import MemorySampler, rss_anon, release_freed_memory
release_freed_memory()
from offload import LLM, SamplingParams
from offload.loaders import read_model_args
base = rss_anon()
with MemorySampler() as reader:  # the checkpoint reader and tokenizer: the runtime's fixed overhead
    args, _ = read_model_args(None)
del args
release_freed_memory()
weights = LLM(max_context=256, weights="dequantize").args.param_count() * 4 if sys.argv[1] == "resident" else None
mode, budget, disk = sys.argv[1], int(sys.argv[2]), sys.argv[3]
release_freed_memory()
base = rss_anon()
with MemorySampler() as run:
    kw = {} if mode == "resident" else dict(cpu_memory=budget, disk_dir=disk)
    llm = LLM(max_context=256, weights="dequantize", **kw)
    with MemorySampler() as gen:
        out = llm.generate(["The capital of France is"], SamplingParams(max_new_tokens=8, ignore_eos=True))
report = llm.tier_report() if mode != "resident" else {}
print(json.dumps({"tokens": out[0].token_ids, "peak": run.peak - base, "gen_peak": gen.peak - base,
                  "reader": reader.peak - reader.baseline, "weights": weights,
                  "tiers": report.get("placement"), "disk_per_pass": report.get("disk_bytes_per_pass"),
                  "mode": report.get("disk_mode")}))
"""


def _run_edge(mode, budget, disk):
    out = subprocess.run([sys.executable, "-c", EDGE_SCRIPT, mode, str(budget), str(disk)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_edge_mode_half_the_weights_in_memory(smollm_path, tmp_path):
    """Default model, CPU only: cpu_memory = 50% of the fp32 weights, the rest streamed from disk.
    Greedy output equals the all-resident run; the process's private resident memory stays under
    the budget plus the runtime's fixed overhead (the GGUF reader and tokenizer, measured here)."""
    resident = _run_edge("resident", 0, tmp_path)
    budget = resident["weights"] // 2
    edge = _run_edge("edge", budget, tmp_path)
    assert edge["tokens"] == resident["tokens"]
    assert edge["tiers"]["disk"] > 0.4 * resident["weights"]
    assert edge["mode"] == "O_DIRECT"
    assert edge["disk_per_pass"] >= edge["tiers"]["disk"]
    assert edge["peak"] <= budget + edge["reader"], edge
    assert edge["gen_peak"] <= budget, edge  # generating: under the budget itself
    assert resident["peak"] > budget + edge["reader"]  # the measurement can tell the two apart


@pytest.mark.slow
def test_edge_mode_stats_report_the_peak_against_the_budget(smollm_path, tmp_path):
    """`offload generate --cpu-memory 230MB --max-context 256 --stats` in its own process: the peak it
    reports splits into what Python and torch held before loading and what the runtime added, and
    the runtime's share is within the budget (it was reported against the whole process before)."""
    import re

    out = subprocess.run([sys.executable, "-m", "offload.cli", "generate", "The capital of France is",
                          "--max-new-tokens", "4", "--cpu-memory", "230MB", "--max-context", "256",
                          "--disk-dir", str(tmp_path), "--stats"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stderr.splitlines() if x.startswith("peak while generating"))
    total, before, added, budget = map(int, re.search(
        r"host (\d+) MiB private resident = (\d+) MiB before loading \(Python, torch\) \+ (-?\d+) MiB runtime, "
        r"within cpu_memory (\d+) MiB", line).groups())
    assert abs(total - before - added) <= 1 and 0 < added <= budget == 219, line


def test_peak_line_splits_the_process_and_flags_a_runtime_over_budget():
    from offload.cli import _peak_vs_budget

    mib = 2**20
    peak = {"host": 300 * mib, "host_before_load": 170 * mib, "device": None}
    assert _peak_vs_budget(peak, 200 * mib).endswith("170 MiB before loading (Python, torch) + 130 MiB runtime, "
                                                     "within cpu_memory 200 MiB")
    assert "+ 130 MiB runtime, OVER cpu_memory 100 MiB" in _peak_vs_budget(peak, 100 * mib)
    assert _peak_vs_budget({**peak, "device": 5 * mib}, None).endswith("runtime; GPU 5 MiB allocated")


def test_disk_layers_on_a_gpu_reserve_pinned_staging_in_the_host_budget():
    """Disk layers reach a GPU through pinned host buffers (one layer per streaming slot): the
    planner counts them in the host tier and names them when cpu_memory cannot hold them."""
    args = preset("llama-3.1-8b")
    kw = dict(model="m", context=8192, device="cuda", dtype="bfloat16", gpu_memory=6 * 2**30, disk_dir="/tmp")
    p = plan(args, cpu_memory=8 * 2**30, **kw)
    assert "disk" in p.layer_tiers and "host" in p.layer_tiers
    # torch's pinned allocator rounds each buffer up to a power of two: the planner counts that
    assert p.host_staging_bytes == 2 * pinned_nbytes(p.layer_bytes) and pinned_nbytes(p.layer_bytes) > p.layer_bytes
    assert pinned_nbytes(4096) == 4096 and pinned_nbytes(4097) == 8192 and pinned_nbytes(0) == 0
    assert p.tier_bytes()["host"] == p.layer_tiers.count("host") * p.layer_bytes + p.host_staging_bytes <= 8 * 2**30
    resident = plan(args, cpu_memory=None, **kw)  # every streamed layer fits in host memory: no staging
    assert resident.host_staging_bytes == 0 and "disk" not in resident.layer_tiers
    with pytest.raises(BudgetError, match="pinned staging"):
        plan(args, cpu_memory=p.layer_bytes, **kw)


def test_plan_says_what_a_step_reads_where_it_computes():
    """Beside the bytes moved between tiers, the plan states what the compute device reads per decode
    step: every layer's weights and the head, and the KV attention reads (whole for dense layers, the
    selection for sparse ones)."""
    from offload.quant import embedding_nbytes
    from offload.tiers.kv_store import kv_bytes_per_token

    args = preset("llama-3.1-8b")
    kw = dict(model="llama-3.1-8b", context=131072, device="cuda", dtype="bfloat16", gpu_memory=24 * 2**30,
              quantize="int4", kv_dtype="int8")
    dense = plan(args, **kw)
    head = embedding_nbytes(args, 2, "int4") // 2  # untied: the head alone
    assert dense.read_per_token == {"weights": 32 * dense.layer_bytes + head,
                                    "kv": kv_bytes_per_token(args, 2, "int8") * 131072}
    assert set(dense.layer_tiers) == {"device"} and not any(dense.bytes_per_token.values())
    assert "read per token on the cuda: weights 4.61 GiB, kv 8.12 GiB; moved between tiers per token: nothing" \
        in dense.table()
    sparse = plan(args, kv_policy="cluster", kv_budget=0.02, dense_layers=1, **kw)
    per_layer = kv_bytes_per_token(args, 2, "int8") // 32
    attended = int(0.02 * 131072) + 4 + 64
    assert sparse.read_per_token["kv"] == per_layer * (131072 + 31 * attended)
