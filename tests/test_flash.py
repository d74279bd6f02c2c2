"""FFN weights on flash: row-column bundles, calibrated thresholds, windowed residency."""

from pathlib import Path

import numpy as np
import pytest
import torch

from offload import LLM
from offload.tiers.flash import FlashConfig, FlashMLP, flash_stats
from offload.tiers.io import StoreReader
from offload.tiers.store import read_header


def _ids(hf, n, seed):
    return torch.randint(3, hf.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture()
def tiny(tmp_path):
    from conftest import make_tiny_model

    folder = tmp_path / "model"
    hf = make_tiny_model(folder, "llama", seed=5, num_hidden_layers=3, intermediate_size=256)
    return folder, hf


def test_bundles_hold_up_rows_and_down_columns(tiny, tmp_path):
    folder, hf = tiny
    resident = LLM(folder)
    llm = LLM(folder, disk_dir=tmp_path / "store", flash=FlashConfig(sparsity=0.5),
              flash_calibration=_ids(hf, 64, 1))
    inter = resident.args.intermediate_size
    with StoreReader(llm.flash_info["store"]) as r:
        for i in range(resident.args.num_layers):
            bundles = r.read(f"ffn.{i}")  # [I, P]
            H = resident.args.hidden_size
            order = torch.tensor(r.metadata["orders"][i])  # stored row -> neuron, a permutation
            assert torch.equal(order.sort().values, torch.arange(inter))
            assert torch.equal(bundles[:, :H], resident.model.layers[i].mlp.w_gate_up[inter:][order])
            assert torch.equal(bundles[:, H:2 * H], resident.model.layers[i].mlp.w_down.t()[order])
            assert r.entry(f"ffn.{i}").extent % 512 == 0  # one sector-aligned extent per bundle
    assert all(isinstance(layer.mlp, FlashMLP) for layer in llm.model.layers)


def test_thresholds_give_the_calibrated_sparsity(tiny, tmp_path):
    folder, hf = tiny
    calib = _ids(hf, 128, 1)
    llm = LLM(folder, disk_dir=tmp_path / "store", flash=FlashConfig(sparsity=0.6), flash_calibration=calib)
    resident = LLM(folder)
    x = {}
    hook = resident.model.layers[1].mlp.register_forward_pre_hook(lambda m, a: x.setdefault("in", a[0]))
    resident.logits(calib)
    hook.remove()
    gate = resident.model.layers[1].mlp.w_gate_up[:resident.args.intermediate_size]
    act = torch.nn.functional.silu(x["in"] @ gate.t()).abs()  # [1, T, I]
    below = (act <= llm.flash_info["thresholds"][1]).float().mean().item()
    assert below == pytest.approx(0.6, abs=0.01)
    # bundles are stored most-often-active first (what the cache starts with)
    counts = (act[0] > llm.flash_info["thresholds"][1]).sum(0)  # [I]
    stored = counts[torch.tensor(read_header(Path(llm.flash_info["store"]))[0]["orders"][1])]
    assert torch.all(stored[:-1] >= stored[1:]) and stored[0] > stored[-1]


def test_zero_sparsity_matches_the_dense_ffn(tiny, tmp_path):
    folder, hf = tiny
    ids = _ids(hf, 24, 2)
    resident = LLM(folder)
    llm = LLM(folder, disk_dir=tmp_path / "store", flash=FlashConfig(sparsity=0.0, window=2, cache_fraction=1.0),
              flash_calibration=_ids(hf, 64, 1))
    assert (llm.logits(ids) - resident.logits(ids)).abs().max() < 1e-4  # prefill path
    from offload.attention import ForwardBatch

    for backend_llm in (llm, resident):
        backend_llm.backend.allocate(1, 40)
        backend_llm.engine.prefill(0, ids)
    for n in range(24, 30):  # decode path: bundles through the window cache
        tok = torch.tensor([[ids[n % 24]]])
        a = llm.model(tok, ForwardBatch.decode([n], llm.device, [ids[n % 24]]), llm.backend)[0, -1]
        b = resident.model(tok, ForwardBatch.decode([n], resident.device, [ids[n % 24]]), resident.backend)[0, -1]
        assert (a - b).abs().max() < 1e-4


def test_window_keeps_recent_neurons_resident_and_reads_less(tiny, tmp_path):
    folder, hf = tiny
    prompt = _ids(hf, 32, 3)
    from offload import SamplingParams

    read = {}
    for window in (0, 4):
        llm = LLM(folder, disk_dir=tmp_path / "store", flash=FlashConfig(sparsity=0.5, window=window),
                  flash_calibration=_ids(hf, 64, 1))
        out = llm.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))
        read[window] = flash_stats(llm.model)
        assert len(out[0].token_ids) == 12
    # window 0 reads every active neuron every step; a window of 4 re-reads only new ones
    per_bundle = read[0]["decode_bytes_per_step"] / read[0]["active_neurons_per_step"]
    assert read[0]["decode_bytes_per_step"] == pytest.approx(read[0]["active_neurons_per_step"] * per_bundle)
    assert read[4]["decode_bytes_per_step"] < 0.8 * read[0]["decode_bytes_per_step"]
    assert 0.2 < read[0]["active_neurons_per_step"] / read[0]["neurons"] < 0.8


@pytest.mark.parametrize("cache_fraction,window", [(1.0, 2), (0.1, None), (0.0, None), (0.5, 1)])
def test_windowed_decode_equals_the_sparse_model_in_one_pass(tiny, tmp_path, cache_fraction, window):
    """The cache changes what is read, never what is computed: step-by-step decode through a cache
    of any size (smaller than the active set, none at all) equals the same thresholded FFN applied
    to the whole sequence at once."""
    from offload.attention import ForwardBatch

    folder, hf = tiny
    ids = _ids(hf, 40, 4)
    llm = LLM(folder, disk_dir=tmp_path / "store", flash_calibration=_ids(hf, 64, 1),
              flash=FlashConfig(sparsity=0.5, window=window, cache_fraction=cache_fraction))
    full = llm.logits(ids)  # [T, V], one pass
    llm.backend.allocate(1, 48)
    llm.engine.prefill(0, ids[:20])
    for n in range(20, 39):
        step = llm.model(torch.tensor([[ids[n]]]), ForwardBatch.decode([n], llm.device, [ids[n]]), llm.backend)
        assert (step[0, -1] - full[n]).abs().max() < 1e-4
    stats = flash_stats(llm.model)
    assert stats["decode_bytes_per_step"] > 0
    if cache_fraction == 0:  # nothing resident: every active bundle is read at every step
        assert stats["read_neurons_per_step"] == stats["active_neurons_per_step"]


def test_reads_are_exactly_the_missing_bundles(tiny, tmp_path):
    """Bytes read per step = the missing bundles (no read-through), and naive streaming (sparsity 0,
    no cache) reads each layer's whole up/down projections in one request per step."""
    folder, hf = tiny
    from offload import SamplingParams

    llm = LLM(folder, disk_dir=tmp_path / "store", flash_calibration=_ids(hf, 64, 1),
              flash=FlashConfig(sparsity=0.5, cache_fraction=0.2, read_gap=0, full_read_runs=10_000))
    llm.generate([_ids(hf, 16, 3)], SamplingParams(max_new_tokens=8, ignore_eos=True))
    stats = flash_stats(llm.model)
    bundle = llm.flash_info["bundle_bytes"]
    assert stats["decode_bytes_per_step"] == pytest.approx(stats["read_neurons_per_step"] * bundle)
    assert 0 < stats["read_neurons_per_step"] < stats["active_neurons_per_step"]  # the cache served some
    for layer in llm.model.layers:  # no window: the hot set (stored first) stays, nothing else joins it
        assert np.array_equal(layer.mlp.neuron_in, np.arange(len(layer.mlp.cache)))
    naive = LLM(folder, disk_dir=tmp_path / "store", flash_calibration=_ids(hf, 64, 1),
                flash=FlashConfig(sparsity=0.0, cache_fraction=0.0))
    naive.generate([_ids(hf, 16, 3)], SamplingParams(max_new_tokens=8, ignore_eos=True))
    stats = flash_stats(naive.model)
    layers = naive.args.num_layers
    assert stats["decode_bytes_per_step"] == layers * naive.args.intermediate_size * bundle
    assert stats["requests_per_step"] == layers


def test_cache_is_sized_from_the_budget(tiny, tmp_path):
    """Under cpu_memory the bundle cache takes what the resident rest leaves; a budget below that
    rest is refused before any work, naming the smallest budget that works."""
    from offload.loaders import read_model_args
    from offload.tiers.budget import BudgetError
    from offload.tiers.flash import size_cache

    folder, hf = tiny
    args, _ = read_model_args(folder)
    rest = size_cache(args, torch.float32, None, 64, FlashConfig(cache_fraction=0.0))["resident_bytes"]
    per_neuron = args.num_layers * size_cache(args, torch.float32, None, 64, FlashConfig())["bundle_bytes"]
    budget = rest + int(0.3 * args.intermediate_size) * per_neuron + per_neuron // 2
    llm = LLM(folder, disk_dir=tmp_path / "store", flash_calibration=_ids(hf, 64, 1), cpu_memory=budget,
              max_context=64, flash=FlashConfig(sparsity=0.5))
    info = llm.flash_info
    assert info["cache_bundles"] == int(0.3 * args.intermediate_size)
    assert all(layer.mlp.cache.shape[0] == info["cache_bundles"] for layer in llm.model.layers)
    assert info["resident_bytes"] <= budget
    held = sum(p.numel() * 4 for p in llm.model.parameters()) + sum(layer.mlp.nbytes() for layer in llm.model.layers)
    assert held < info["resident_bytes"]  # the accounting covers every tensor the model holds
    with pytest.raises(BudgetError, match="smallest budget that works is"):
        LLM(folder, disk_dir=tmp_path / "store", flash_calibration=_ids(hf, 64, 1), cpu_memory=rest - 1,
            max_context=64, flash=FlashConfig(sparsity=0.5))
    with pytest.raises(BudgetError, match="cache of 90%"):
        LLM(folder, disk_dir=tmp_path / "store", flash_calibration=_ids(hf, 64, 1), cpu_memory=budget,
            max_context=64, flash=FlashConfig(sparsity=0.5, cache_fraction=0.9))


def test_cli_generate_with_flash_prints_what_it_read(tiny, tmp_path, capsys):
    """`offload generate --flash-sparsity`: same greedy text as the library call, the bytes read per
    token in --stats, and flags that need --flash-sparsity refused in one line."""
    from offload import SamplingParams
    from offload.cli import main

    folder, hf = tiny
    prompt = "the quick brown fox jumps over the lazy dog " * 2
    assert main(["generate", prompt, "--model", str(folder), "-n", "6", "--ignore-eos", "--stats", "--quiet",
                 "--flash-sparsity", "0.25", "--disk-dir", str(tmp_path / "store")]) == 0
    out, err = capsys.readouterr()
    llm = LLM(folder, disk_dir=tmp_path / "store", flash=FlashConfig(sparsity=0.25), flash_calibration=prompt)
    assert out.strip() == llm.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].text.strip()
    assert "flash:" in err and "MiB read per token" in err
    assert "calibrated on only" in err  # the prompt is short: the user is told to give more text
    assert main(["generate", "hi", "--model", str(folder), "--flash-window", "4"]) == 2
    assert "--flash-window and --flash-calibration need --flash-sparsity" in capsys.readouterr().err


def test_store_is_reused_only_for_the_same_calibration(tiny, tmp_path):
    """The bundle store (thresholds and order inside) is reused for the same weights and calibration
    text, and rebuilt when the calibration text changes: thresholds always match their text."""
    folder, hf = tiny
    config = FlashConfig(sparsity=0.5)
    first = LLM(folder, disk_dir=tmp_path / "store", flash=config, flash_calibration=_ids(hf, 64, 1))
    store = Path(first.flash_info["store"])
    written = store.stat().st_mtime_ns
    again = LLM(folder, disk_dir=tmp_path / "store", flash=config, flash_calibration=_ids(hf, 64, 1))
    assert store.stat().st_mtime_ns == written and again.flash_info["thresholds"] == first.flash_info["thresholds"]
    other = LLM(folder, disk_dir=tmp_path / "store", flash=config, flash_calibration=_ids(hf, 64, 9))
    assert other.flash_info["thresholds"] != first.flash_info["thresholds"]
    assert read_header(store)[0]["thresholds"] == other.flash_info["thresholds"]


FLASH_SCRIPT = r"""
import json, sys
from offload.tiers.budget import MemorySampler, rss_anon, release_freed_memory
release_freed_memory()
from offload import LLM, SamplingParams
from offload.tiers.flash import FlashConfig, flash_stats
from offload.profiles.bench_generate import _real_text_ids
from offload.loaders import default_model_path
from offload.loaders.gguf import _fields, _open
budget, disk = int(sys.argv[1]), sys.argv[2]
calibration = _real_text_ids(LLM(max_context=256, verbose=False).tokenizer, 256)
release_freed_memory()
with MemorySampler() as reader:  # the checkpoint reader: the runtime's fixed overhead (a new one, not the cached header)
    _fields(_open(default_model_path()))
release_freed_memory()
base = rss_anon()
with MemorySampler() as load:
    llm = LLM(max_context=256, cpu_memory=budget, disk_dir=disk, flash=FlashConfig(sparsity=0.25),
              flash_calibration=calibration, verbose=False)
with MemorySampler() as gen:
    out = llm.generate(["The capital of France is"], SamplingParams(max_new_tokens=8, ignore_eos=True))
print(json.dumps({"text": llm.tokenizer.decode(out[0].token_ids), "gen_peak": gen.peak - base,
                  "load_peak": load.peak - base, "reader": reader.peak - reader.baseline,
                  "streamed": llm.flash_info["loaded_streaming"],
                  "accounted": llm.flash_info["resident_bytes"], "cache": llm.flash_info["cache_fraction"],
                  "read": flash_stats(llm.model)["decode_bytes_per_step"]}))
"""


@pytest.mark.slow
def test_flash_on_the_default_model_stays_under_its_budget(smollm_path, tmp_path):
    """Default model, fp32, cpu_memory 450 MiB (88% of the weights; flash needs 400 MiB resident):
    while generating, the process's private memory beyond what it held before loading stays under
    the budget, and while loading under the budget plus the checkpoint reader's fixed overhead
    (layers stream from disk until they are resident but for their bundles); the bundle cache
    takes the rest of the budget, and the answer is still right."""
    import json
    import subprocess
    import sys

    budget = 450 << 20
    out = subprocess.run([sys.executable, "-c", FLASH_SCRIPT, str(budget), str(tmp_path)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["gen_peak"] <= budget, r
    assert r["streamed"] > 0 and r["load_peak"] <= budget + r["reader"], r  # loading too: never the whole model
    assert budget - (4 << 20) <= r["accounted"] <= budget and 0.15 < r["cache"] < 0.3, r
    assert r["read"] > 0 and "Paris" in r["text"], r


def test_a_budget_below_the_weights_streams_while_loading_then_runs_resident(tmp_path, monkeypatch):
    """cpu_memory below the weights: the model loads with layers streamed from disk (never whole in
    memory), is calibrated as it streams, and comes out resident but for its bundles, computing
    exactly what the flash model loaded whole computes."""
    from conftest import make_tiny_model

    import offload.tiers.planner as planner_mod
    from offload.tiers.flash import size_cache

    monkeypatch.setattr(planner_mod, "RUNTIME_RESERVE", 0)
    folder = tmp_path / "wide"  # an FFN-heavy model, as real ones are: its up/down are most of the weights
    hf = make_tiny_model(folder, "llama", seed=6, num_hidden_layers=6, intermediate_size=1024)
    calib, ids = _ids(hf, 64, 1), _ids(hf, 24, 2)
    config = FlashConfig(sparsity=0.5, cache_fraction=0.25)
    whole = LLM(folder, disk_dir=tmp_path / "a", flash=config, flash_calibration=calib, max_context=64)
    need = size_cache(whole.args, torch.float32, None, 64, config)["resident_bytes"]
    budget = need + 1024
    assert budget < whole.args.param_count() * 4  # below the weights: the load has to stream
    streamed = LLM(folder, disk_dir=tmp_path / "b", flash=config, flash_calibration=calib, max_context=64,
                   cpu_memory=budget, verbose=False)
    assert streamed.streamer is None and not streamed.model.offloaded and streamed.placement is None
    assert streamed.flash_info["loaded_streaming"] > 0  # layers came from the layer store
    assert streamed.flash_info["thresholds"] == whole.flash_info["thresholds"]
    assert torch.allclose(streamed.logits(ids), whole.logits(ids), atol=1e-5)
    from offload import SamplingParams

    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    assert streamed.generate([ids], params)[0].token_ids == whole.generate([ids], params)[0].token_ids


def test_bad_flash_settings_fail_before_loading(tmp_path):
    """No disk directory, no calibration text: each is a one-line error naming the fix, raised
    before the (here missing) checkpoint is even opened."""
    from offload.errors import OffloadError

    missing = tmp_path / "not-a-model"
    with pytest.raises(OffloadError, match="give disk_dir"):
        LLM(missing, flash=FlashConfig(), flash_calibration="some text")
    with pytest.raises(OffloadError, match="give flash_calibration"):
        LLM(missing, disk_dir=tmp_path, flash=FlashConfig())
