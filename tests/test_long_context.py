"""The long-context product surface: dummy weights, kv_policy="auto", the start-up banner."""

from __future__ import annotations

import pytest
import torch
from conftest import shakespeare

from offload import LLM, SamplingParams
from offload.config import preset
from offload.errors import OffloadError
from offload.tiers import planner as planner_mod
from offload.tiers.planner import kv_fits

GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


def test_dummy_weights_are_seeded_and_never_the_checkpoint(tiny_models):
    folder, _ = tiny_models["llama"]
    ids = list(range(3, 40))
    a = LLM(folder, load_format="dummy", seed=1, verbose=False)
    b = LLM(folder, load_format="dummy", seed=1, verbose=False)
    c = LLM(folder, load_format="dummy", seed=2, verbose=False)
    real = LLM(folder, verbose=False)
    assert torch.equal(a.logits(ids), b.logits(ids))
    assert not torch.allclose(a.logits(ids), c.logits(ids))
    assert not torch.allclose(a.logits(ids), real.logits(ids))
    # the folder's own tokenizer is used, and the weights have the checkpoint's shapes and init scale
    assert a.tokenizer.encode("hi") == real.tokenizer.encode("hi")
    w = a.model.layers[0].attn.wqkv
    assert w.shape == real.model.layers[0].attn.wqkv.shape
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.equal(a.model.layers[0].attn_norm.weight, torch.ones_like(a.model.layers[0].attn_norm.weight))
    # a dummy model never shares a fingerprint (prompt caches, weight stores) with the real weights
    assert len({a.fingerprint, c.fingerprint, real.fingerprint}) == 3


def test_dummy_weights_stream_from_disk_bit_identically(tmp_path, monkeypatch):
    """Dummy weights go through the same staging and store as a checkpoint's."""
    from conftest import make_tiny_model

    monkeypatch.setattr(planner_mod, "RUNTIME_RESERVE", 0)
    folder = tmp_path / "model"
    make_tiny_model(folder, "qwen2", num_hidden_layers=5)
    resident = LLM(folder, load_format="dummy", seed=7, verbose=False)
    args = resident.args
    layer = args.layer_param_count() * 4
    fixed = args.vocab_size * args.hidden_size * 4 * (1 if args.tie_word_embeddings else 2) + args.hidden_size * 4
    budget = fixed + args.kv_bytes_per_token(4) * 64 + 3 * layer + layer // 2
    streamed = LLM(folder, load_format="dummy", seed=7, cpu_memory=budget, disk_dir=tmp_path / "store",
                   max_context=64, verbose=False)
    assert streamed.placement.layer_tiers.count("disk") == args.num_layers - 1
    ids = list(range(5, 45))
    assert torch.equal(streamed.logits(ids), resident.logits(ids))
    streamed.close()


def test_dummy_preset_runs_without_a_checkpoint(capsys):
    llm = LLM("smollm2-135m", load_format="dummy", max_context=128)
    assert "dummy weights (seed 0)" in capsys.readouterr().err  # the banner says what runs
    out = llm.generate("Hello, world", GREEDY)[0]  # text prompts work through a byte-level tokenizer
    assert len(out.token_ids) == 6 and all(0 <= t < llm.args.vocab_size for t in out.token_ids)
    assert llm.tokenizer.decode(llm.tokenizer.encode("Hello, wörld")) == "Hello, wörld"
    assert llm.args == preset("smollm2-135m")


def test_a_preset_without_dummy_names_the_fix():
    with pytest.raises(OffloadError, match="load_format='dummy'"):
        LLM("llama-3.1-8b", verbose=False)
    with pytest.raises(OffloadError, match="unknown load_format"):
        LLM("llama-3.1-8b", load_format="random", verbose=False)


def test_auto_policy_is_dense_when_the_kv_fits_and_retrieval_otherwise():
    llama = preset("llama-3.1-8b")
    gib = 1 << 30
    fits, reason = kv_fits(llama, 131072, "bfloat16", 24 * gib)
    assert not fits and "16.00 GiB" in reason  # 128K of KV beside 15 GiB of weights
    assert kv_fits(llama, 8192, "bfloat16", 24 * gib)[0]  # 1 GiB of KV fits


@pytest.mark.slow
def test_auto_policy_in_the_api(smollm_path, tmp_path, capsys):
    fits = LLM(smollm_path, kv_policy="auto", max_context=256)
    assert fits.kv_policy == "dense"
    err = capsys.readouterr().err
    assert "[auto: the KV at 256 tokens" in err and "kv_policy dense" in err
    # bf16: 257 MiB of weights + 180 MiB of KV at 8K (+ 64 MiB reserve) do not fit in 490 MiB: retrieval,
    # layers streamed (beside 2 streaming buffers and the 9 MiB of hidden states a layer-major prefill holds)
    tight = LLM(smollm_path, kv_policy="auto", max_context=8192, cpu_memory="490MiB", disk_dir=tmp_path,
                dtype="bfloat16", weights="dequantize")
    assert tight.kv_policy == "retrieval"
    err = capsys.readouterr().err
    assert "| tier |" in err  # the placement table, printed once at start
    assert "kv_policy retrieval" in err and "exceed the device budget 490.00 MiB" in err
    assert "on disk" in err
    # a prompt long enough that retrieval selects (600 tokens: budget 2% + sinks + window < 600); the
    # layers streamed from disk and the KV policy give exactly what the resident model gives
    prompt = tight.tokenizer.encode(shakespeare())[:600]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    streamed = tight.generate([prompt], params)[0].token_ids
    selected = tight.backend.config.budget_tokens(600) + tight.backend.config.sink + tight.backend.config.window
    assert selected < 600 and len(tight.backend.indexes) == tight.args.num_layers - tight.backend.config.dense_layers
    tight.close()
    resident = LLM(smollm_path, kv_policy="retrieval", max_context=8192, dtype="bfloat16", verbose=False)
    assert resident.streamer is None and resident.backend.config == tight.backend.config
    assert streamed == resident.generate([prompt], params)[0].token_ids


@pytest.mark.parametrize("policy", ["retrieval", "quest", "shadowkv"])
def test_kv_in_the_host_tier_gives_the_same_tokens(tiny_models, policy):
    """kv_offload: the sparse layers' KV in host memory, sinks + window + selection fetched per step.
    On this CPU the tiers coincide, so the fetch-and-attend path must equal the in-place kernel's."""
    folder, _ = tiny_models["llama"]
    ids = list(range(3, 200))
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    kw = dict(kv_policy=policy, kv_budget=16, sink=2, window=8, dense_layers=1, verbose=False, max_context=256)
    base = LLM(folder, **kw)
    moved = LLM(folder, kv_offload=True, **kw)
    assert moved.backend.kv_offload and "KV in host memory" in moved.describe()
    # where a query-aware build computes is shown (the GPU when the model runs on one)
    assert ("index build's query-key products on cpu" in moved.describe()) == (policy == "retrieval")
    assert moved.generate([ids], params)[0].token_ids == base.generate([ids], params)[0].token_ids
    if policy != "shadowkv":  # ShadowKV attends itself; the others go through the fetch
        assert moved.backend.kv_bytes_to_device > 0
    # the decode logits themselves agree to rounding
    for llm in (base, moved):
        llm.backend.allocate(1, 256)
        llm.engine.prefill(0, ids)
    from offload.attention import ForwardBatch

    with torch.inference_mode():
        outs = [llm.model(torch.tensor([[7]]), ForwardBatch.decode([len(ids)], llm.device, [7]), llm.backend)
                for llm in (base, moved)]
    assert torch.allclose(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_kv_offload_needs_a_sparse_policy(tiny_models):
    with pytest.raises(OffloadError, match="sparse kv_policy"):
        LLM(tiny_models["llama"][0], kv_offload=True, verbose=False)


@pytest.mark.parametrize("rounds", [1, 2])
def test_bench_context_times_every_policy_over_one_prefill(smollm_path, rounds):
    """profiles.bench_context over 600 tokens of real text: a row per policy with its timed steps
    (in one go, or in turns across the policies: `--rounds`), and a sparse policy's telemetry (the
    attention mass its selection captures: below dense's 1, above sinks + window's)."""
    from offload.indexes import SelectionConfig
    from offload.profiles.bench_context import main, run_context

    llm = LLM(smollm_path, max_context=640, verbose=False)
    rows = run_context(llm, 600, ["dense", "cluster:0.1", "streaming"], SelectionConfig(), steps=4,
                       telemetry_steps=1, rounds=rounds)
    assert [r["policy"] for r in rows] == ["dense", "cluster:0.1", "streaming"]
    assert all(len(r["decode_ms_runs"]) == 4 and r["decode_ms"] > 0 for r in rows)
    mass = {r["policy"]: r.get("mass") for r in rows}
    assert mass["dense"] is None and 0 < mass["streaming"] < mass["cluster:0.1"] < 1
    with pytest.raises(SystemExit):
        main(["--contexts", "600", "--steps", "2", "--rounds", "3"])
