"""Retrieval heads and streaming heads: the split measured on the prompt's last queries, honoured by
every policy (streaming heads attend sinks + window alone), skipped by retrieval's build and search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_indexes import index_context, teacher_forced_logits

from offload import LLM, SamplingParams
from offload.engine_config import EngineConfig
from offload.errors import OffloadError
from offload.indexes import SelectionConfig, make_index
from offload.indexes.heads import beyond_window_share, retrieval_heads

PROMPT, STEPS = 60, 8


def test_beyond_window_share_matches_a_loop_over_queries():
    g = torch.Generator().manual_seed(0)
    Hkv, G, C, n, D, sink, window, scale = 2, 3, 5, 40, 8, 2, 6, 0.4
    keys = torch.randn(Hkv, n + 7, D, generator=g)  # capacity beyond n: not read
    queries = torch.randn(Hkv * G, C, D, generator=g)
    got = beyond_window_share(queries, keys, n, sink, window, scale)  # [Hkv]
    for h in range(Hkv):
        shares = []
        for head in range(h * G, (h + 1) * G):
            for c in range(C):
                p = n - C + c  # the query's position: it sees tokens 0..p
                probs = torch.softmax(queries[head, c] @ keys[h, :p + 1].T * scale, dim=-1)  # [p + 1]
                shares.append(probs[sink:max(sink, p + 1 - window)].sum())
        assert got[h].item() == pytest.approx(torch.stack(shares).mean().item(), abs=1e-5)


def test_a_head_looking_far_back_is_a_retrieval_head_one_looking_at_the_window_is_not():
    g = torch.Generator().manual_seed(1)
    Hkv, G, C, n, D = 2, 2, 4, 64, 16
    keys = 0.1 * torch.randn(Hkv, n, D, generator=g)
    far, near = torch.zeros(D), torch.zeros(D)
    far[0], near[1] = 1.0, 1.0
    keys[0, 20] = far  # head 0: one key far back matches its queries
    keys[1, n - 8:] = near  # head 1: its queries match the recent tokens
    queries = torch.cat([10 * far.expand(G, C, D), 10 * near.expand(G, C, D)])  # [H, C, D]
    share = beyond_window_share(queries, keys, n, 4, 16, 1.0)
    assert share[0] > 0.9 and share[1] < 0.01
    assert retrieval_heads(queries, keys, n, 4, 16, 1.0, 0.05).tolist() == [True, False]


def test_retrieval_builds_and_searches_only_its_retrieval_heads():
    g = torch.Generator().manual_seed(2)
    Hkv, G, N, D, n = 3, 2, 700, 16, 600
    keys = torch.randn(Hkv, N, D, generator=g)
    queries = torch.randn(Hkv * G, n // 4, D, generator=g)
    config = SelectionConfig(budget=24, sink=4, window=8)
    ctx = index_context(Hkv * G, Hkv, D, D ** -0.5)
    whole = make_index("retrieval", ctx, config)
    split = make_index("retrieval", ctx, config, heads=torch.tensor([True, False, True]))
    for idx in (whole, split):
        idx.build(keys, n, queries)
    assert split.streaming_heads == 1 and whole.streaming_heads == 0
    assert (split.indptr[1] == 0).all() and (split.indptr[0] == whole.indptr[0]).all()  # no graph for head 1
    q = torch.randn(Hkv * G, D, generator=g)
    a, b = whole.select(q, 24), split.select(q, 24)
    assert b.counts.tolist() == [a.counts[0], 0, a.counts[2]] and a.counts[1] > 0
    for h in (0, 2):
        assert torch.equal(a.ids[h, :a.counts[h]], b.ids[h, :b.counts[h]])
    assert split.last_scored < whole.last_scored  # the streaming head scored nothing


def _ids(hf, n):
    return torch.randint(3, hf.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def test_all_streaming_heads_attend_as_the_streaming_policy_none_as_the_exact_one(tiny_models):
    """A split that leaves every head streaming gives the streaming policy's logits; one that leaves
    none gives the full-budget (dense) ones; a split in between differs from both."""
    folder, hf = tiny_models["llama"]
    ids = _ids(hf, PROMPT + STEPS)
    kw = dict(sink=4, window=8, dense_layers=1, telemetry=True)

    def run(policy, **extra):
        llm = LLM(folder, kv_policy=policy, kv_budget=10_000, **kw, **extra)
        return teacher_forced_logits(llm, ids, PROMPT), llm.telemetry.summary()["streaming"]

    streaming, _ = run("streaming")
    dense, _ = run("exact")
    every, every_share = run("exact", kv_head_split=0.999)
    none, none_share = run("exact", kv_head_split=1e-9)
    assert every_share == 1.0 and none_share == 0.0
    assert (every - streaming).abs().max().item() < 1e-4
    assert (none - dense).abs().max().item() < 1e-4
    assert (streaming[1:] - dense[1:]).abs().max().item() > 1e-2  # the window alone does change the output
    middle = float(np.median(beyond_window_share_of(folder, ids[:PROMPT], sink=4, window=8, dense_layers=1)))
    mixed, mixed_share = run("exact", kv_head_split=middle)
    assert 0 < mixed_share < 1
    assert (mixed[1:] - dense[1:]).abs().max().item() > 1e-4 and (mixed[1:] - streaming[1:]).abs().max().item() > 1e-4


def beyond_window_share_of(folder, prompt, **kw) -> list[float]:
    """Every sparse layer's KV heads' shares beyond sinks + window after ``prompt``."""
    llm = LLM(folder, kv_policy="exact", kv_budget=10_000, kv_head_split=0.5, **kw)
    llm.backend.allocate(1, len(prompt) + 1)
    llm.engine.prefill(0, prompt)
    shares = []
    for (row, layer), (end, tail) in llm.backend.tail_queries.items():
        keys, _ = llm.backend.kv.rows(layer, row)
        shares += beyond_window_share(tail, keys, end, kw["sink"], kw["window"], llm.args.softmax_scale).tolist()
    assert len(shares) == (llm.args.num_layers - kw["dense_layers"]) * llm.args.num_kv_heads
    return shares


def test_a_prompt_cache_keeps_the_head_split(tiny_models, tmp_path):
    folder, hf = tiny_models["qwen2"]
    prompt = _ids(hf, 96)
    shares = beyond_window_share_of(folder, prompt, sink=2, window=4, dense_layers=1)
    kw = dict(kv_policy="cluster", kv_budget=6, sink=2, window=4, dense_layers=1, telemetry=True,
              kv_head_split=float(np.mean(shares)))  # between the heads' shares: a mixed split
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    llm = LLM(folder, **kw)
    fresh = llm.generate([prompt], greedy)[0].token_ids
    split = {layer: idx.heads.tolist() for (_, layer), idx in llm.backend.indexes.items()}
    assert 0 < llm.telemetry.summary()["streaming"] < 1
    path = LLM(folder, **kw).save_prompt(prompt, tmp_path / "p.cache")
    reloaded = LLM(folder, **kw)
    assert reloaded.generate([prompt], greedy, prompt_cache=path)[0].token_ids == fresh
    assert {layer: idx.heads.tolist() for (_, layer), idx in reloaded.backend.indexes.items()} == split


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, "x"])
def test_a_bad_head_split_is_one_line(value):
    with pytest.raises(OffloadError, match="kv_head_split must be a share of attention in"):
        EngineConfig(kv_head_split=value)


def test_cli_head_split_reaches_the_run(tiny_models, capsys):
    from offload.cli import main

    folder, _ = tiny_models["llama"]
    assert main(["generate", "the quick brown fox " * 20, "--model", str(folder), "-n", "3", "--ignore-eos",
                 "--kv-policy", "retrieval", "--kv-budget", "4", "--window", "8", "--dense-layers", "1",
                 "--kv-head-split", "0.2"]) == 0
    assert "streaming heads (at most 20% of their attention beyond sinks + window" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", str(folder), "--kv-policy", "retrieval", "--kv-head-split", "2"]) == 2
    assert "kv_head_split must be a share of attention in (0, 1)" in capsys.readouterr().err
