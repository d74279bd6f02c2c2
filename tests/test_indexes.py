"""KV selection policies in the decode loop: exactness at full budget, telemetry, policy properties."""

from __future__ import annotations

import pytest
import torch
from conftest import shakespeare

from offload import LLM, SamplingParams
from offload.attention import ForwardBatch
from offload.indexes import SelectionConfig, make_index, policy_names
from offload.indexes.base import IndexContext
from offload.tiers.kv_store import KVRows

PROMPT, STEPS = 60, 10


def teacher_forced_logits(llm: LLM, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Prefill ids[:prompt_len], then decode the rest one token at a time; logits [steps + 1, V]."""
    llm.backend.allocate(1, len(ids))
    out = [llm.engine.prefill(0, ids[:prompt_len])]
    for n in range(prompt_len, len(ids) - 1):
        out.append(llm.model(torch.tensor([[ids[n]]]), ForwardBatch.decode([n], llm.device, [ids[n]]), llm.backend)[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("policy", policy_names())
def test_full_budget_equals_dense(tiny_models, policy, monkeypatch):
    from offload.indexes.shadowkv import ShadowKVIndex

    monkeypatch.setattr(ShadowKVIndex, "energy", 1.0)  # full rank: rebuilt keys are the keys
    folder, hf = tiny_models["qwen2"]
    ids = torch.randint(3, hf.config.vocab_size, (PROMPT + STEPS,), generator=torch.Generator().manual_seed(0)).tolist()
    dense = teacher_forced_logits(LLM(folder), ids, PROMPT)
    window = 1000 if policy == "streaming" else 8  # streaming covers everything only through its window
    # telemetry=True routes even "dense" through the sparse backend (plain "dense" takes the fast path).
    sparse_llm = LLM(folder, kv_policy=policy, kv_budget=10_000, sink=4, window=window, dense_layers=1,
                     telemetry=True)
    sparse = teacher_forced_logits(sparse_llm, ids, PROMPT)
    assert sparse_llm.backend.indexes, "the sparse path was not used"
    assert (sparse - dense).abs().max().item() < 1e-4


def test_small_budget_changes_output(tiny_models):
    """The test above would pass vacuously if the selection were ignored: a tiny budget must differ."""
    folder, hf = tiny_models["qwen2"]
    ids = torch.randint(3, hf.config.vocab_size, (PROMPT + STEPS,), generator=torch.Generator().manual_seed(0)).tolist()
    dense = teacher_forced_logits(LLM(folder), ids, PROMPT)
    sparse = teacher_forced_logits(LLM(folder, kv_policy="exact", kv_budget=2, sink=1, window=2, dense_layers=0),
                                   ids, PROMPT)
    assert (sparse[1:] - dense[1:]).abs().max().item() > 1e-2


def test_telemetry_of_dense_policy_is_perfect(tiny_models):
    folder, hf = tiny_models["llama"]
    llm = LLM(folder, kv_policy="dense", telemetry=True, dense_layers=0)
    llm.generate([list(range(3, 80))], SamplingParams(max_new_tokens=6, ignore_eos=True))
    s = llm.telemetry.summary()
    assert s["mass"] == pytest.approx(1.0, abs=1e-5)
    assert s["recall"] == 1.0
    assert s["output_error"] < 1e-5
    assert set(s["per_layer"]) == set(range(hf.config.num_hidden_layers))


def index_context(num_heads: int, num_kv_heads: int, head_dim: int, scale: float, inv_freq=None,
                  sentence_end_ids=frozenset()) -> IndexContext:
    inv_freq = inv_freq if inv_freq is not None else torch.ones(head_dim // 2)
    return IndexContext(num_heads, num_kv_heads, head_dim, scale, (inv_freq, 1.0), torch.device("cpu"),
                        frozenset(sentence_end_ids))


def test_quest_page_bound_is_an_upper_bound():
    torch.manual_seed(0)
    Hkv, G, N, D = 2, 3, 200, 32
    keys = torch.randn(Hkv, N, D)
    idx = make_index("quest", index_context(Hkv * G, Hkv, D, 1.0), SelectionConfig(budget=32, sink=0, window=0))
    idx.build(keys, N)
    q = torch.randn(Hkv * G, D)
    qg = q.view(Hkv, G, 1, D)
    bound = torch.maximum(qg * idx.page_min[:, None], qg * idx.page_max[:, None]).sum(-1)  # [Hkv, G, P]
    scores = torch.einsum("hgd,hnd->hgn", q.view(Hkv, G, D), keys)  # [Hkv, G, N]
    for p in range(bound.shape[-1]):
        page_max = scores[:, :, p * idx.page_size:(p + 1) * idx.page_size].amax(-1)
        assert torch.all(bound[:, :, p] >= page_max - 1e-4)
    sel = idx.search(q, 32)
    assert torch.all(sel.counts == 32)
    assert torch.all(sel.ids[:, :32].diff(dim=-1) > 0)  # sorted, distinct
    best = torch.topk(bound.amax(1), 2, dim=-1).indices.sort(dim=-1).values  # [Hkv, 2] pages of the top bounds
    assert torch.equal(sel.ids[:, :32:idx.page_size].long() // idx.page_size, best)  # the search picks exactly them


def test_quest_lookahead_is_the_pages_ranked_next():
    """The pages a 2-page-larger budget adds are Quest's lookahead (what a disk tier reads ahead)."""
    keys = torch.randn(2, 300, 32, generator=torch.Generator().manual_seed(2))
    idx = make_index("quest", index_context(6, 2, 32, 1.0), SelectionConfig(budget=32, sink=0, window=0))
    idx.build(keys, 300)
    q = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    sel = idx.search(q, 32)
    ahead = idx.lookahead(32)
    wider = idx.search(q, 64)
    for h in range(2):
        chosen = set(sel.ids[h, :int(sel.counts[h])].tolist())
        added = set(wider.ids[h, :int(wider.counts[h])].tolist()) - chosen
        assert set(ahead[h].tolist()) == added and len(added) == 32


def test_extend_keeps_quest_pages_current():
    torch.manual_seed(1)
    keys = torch.zeros(1, 64, 16)
    keys[:, :20] = torch.randn(1, 20, 16)
    idx = make_index("quest", index_context(1, 1, 16, 1.0), SelectionConfig(budget=16, sink=0, window=0))
    idx.build(keys, 20)
    keys[:, 20:37] = torch.randn(1, 17, 16) * 5
    idx.extend(37)
    for p in range(3):
        block = keys[:, p * 16:min((p + 1) * 16, 37)]
        torch.testing.assert_close(idx.page_max[:, p], block.amax(1))
        torch.testing.assert_close(idx.page_min[:, p], block.amin(1))


def test_unknown_policy_is_a_clear_error(tiny_models):
    from offload.errors import OffloadError

    folder, _ = tiny_models["llama"]
    with pytest.raises(OffloadError, match="unknown kv_policy 'magic'"):
        LLM(folder, kv_policy="magic")


@pytest.mark.slow
def test_policies_on_real_text(smollm_path):
    """SmolLM2 on 2K tokens of Hamlet at a 2% budget: the exact twin captures the most attention
    mass; RetrievalAttention's graph search comes within 0.03 of it while scoring a fraction of the
    keys; Quest beats sinks + window alone; every figure is a real probability."""
    llm_ids = None
    results, scored = {}, None
    for policy in ("exact", "retrieval", "quest", "streaming", "sentence"):
        llm = LLM(smollm_path, kv_policy=policy, kv_budget=0.02, telemetry=True)
        if llm_ids is None:
            llm_ids = llm.tokenizer.encode(shakespeare())[:2000]
        llm.generate([llm_ids], SamplingParams(max_new_tokens=4, ignore_eos=True))
        results[policy] = llm.telemetry.summary()
        if policy == "retrieval":
            fractions = [ix.last_scored / ix.n for ix in llm.backend.indexes.values()]
            scored = sum(fractions) / len(fractions)
    exact, retrieval, quest, streaming = (results[p] for p in ("exact", "retrieval", "quest", "streaming"))
    assert exact["recall"] == 1.0
    assert 0 < streaming["mass"] < quest["mass"] < retrieval["mass"] <= exact["mass"] + 1e-6 <= 1.0 + 1e-6
    assert retrieval["mass"] > exact["mass"] - 0.03
    assert retrieval["recall"] > 0.6
    assert scored < 0.35  # keys scored per search, as a fraction of the context
    assert exact["output_error"] < streaming["output_error"]
    assert streaming["recall"] == 0.0
    assert streaming["mass"] + 0.05 < results["sentence"]["mass"] <= exact["mass"] + 1e-6  # whole sentences pay


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"])
def test_graph_search_with_full_effort_is_exact(dtype):
    """The key graph plus sequence edges is connected, so a beam as wide as the context visits every
    candidate and must return the exact top-k by max-over-group inner product (fp32 and bf16 keys,
    and int8 keys scored on their codes and scales against the keys they stand for)."""
    from offload.indexes.retrieval import RetrievalIndex
    from offload.tiers.kv_codec import quantize_kv

    torch.manual_seed(0)
    Hkv, G, N, D, budget = 2, 3, 300, 32, 20
    keys = torch.randn(Hkv, N, D).to(torch.float32 if dtype == "int8" else dtype)
    rows = KVRows(keys)
    if dtype == "int8":
        rows = KVRows(*quantize_kv(keys, torch.float32))  # codes [Hkv, N, D], scales [Hkv, N, 1]
        keys = rows[:, :]  # the keys the codes stand for
        dtype = torch.float32
    queries = torch.randn(Hkv * G, 64, D).to(dtype)
    idx = make_index("retrieval", index_context(Hkv * G, Hkv, D, 1.0), SelectionConfig(budget=budget, sink=4, window=8))
    idx.effort = 100.0
    idx.build(rows, N, queries)
    q = torch.randn(Hkv * G, D).to(dtype)
    sel = idx.search(q, budget)
    scores = torch.einsum("hgd,hnd->hgn", q.float().view(Hkv, G, D), keys.float()).amax(1)  # [Hkv, N]
    for h in range(Hkv):
        expected = torch.topk(scores[h, 4:N - 8], budget).indices + 4
        assert sorted(sel.ids[h, :sel.counts[h]].tolist()) == sorted(expected.tolist())
    assert idx.last_scored >= N - 12  # it looked at (nearly) everything, as it must at this effort
    assert isinstance(idx, RetrievalIndex)


def test_graph_projection_links_pivots_both_ways():
    import numpy as np

    from offload.indexes.retrieval import project_to_key_graph

    top = np.array([[5, 1, 2], [5, 2, 3], [0, 4, 1]])
    indptr, indices = project_to_key_graph(top, 6, max_degree=8)
    nbrs = {i: set(indices[indptr[i]:indptr[i + 1]].tolist()) for i in range(6)}
    assert nbrs[5] == {1, 2, 3} and nbrs[0] == {4, 1}
    assert nbrs[2] == {5} and nbrs[1] == {5, 0} and nbrs[4] == {0}
    indptr, indices = project_to_key_graph(top, 6, max_degree=1)
    assert indices[indptr[5]:indptr[6]].tolist() == [2]  # the most often proposed neighbour survives


def test_passkey_prompt_hides_the_needle_at_its_depth_in_each_haystack(smollm):
    """Every haystack gives a prompt of exactly the length asked, the needle where the depth says,
    and haystacks that differ from one another; an unknown one is one clear error."""
    from offload.profiles.passkey import HAYSTACKS, haystack_ids, passkey_prompt

    tok = smollm.tokenizer
    needle = tok.encode(" The pass key is 68213. Remember it. 68213 is the pass key. ", False)
    seen = {}
    for name in HAYSTACKS:
        for depth in (0.1, 0.5, 0.9):
            ids = passkey_prompt(tok, 3000, depth, haystack=name)
            assert len(ids) == 3000
            at = next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle)
            assert abs(at / 3000 - depth) < 0.05, (name, depth, at)
        seen[name] = tuple(haystack_ids(tok, name, 500))
        assert len(seen[name]) == 500
    assert len(set(seen.values())) == len(HAYSTACKS)  # four different texts
    with pytest.raises(ValueError, match="unknown haystack 'essays': use one of filler, sentences"):
        haystack_ids(tok, "essays", 10)


@pytest.mark.slow
def test_passkey_4k_retrieval_matches_dense_and_streaming_fails(smollm_path):
    """A number hidden at 10/50/90% of 4K tokens: at a 2% budget (the selection `LLM(kv_policy=...,
    kv_budget=0.02)` resolves), RetrievalAttention and ShadowKV answer as dense attention does, and
    sinks + window alone (streaming) cannot, so the test discriminates. One prefill per depth, every
    policy answering from it (as the benchmarks do): each policy's own prefill computes the same
    dense KV, four times the time."""
    from offload.profiles.bench_context import backend_for, prefill_shared
    from offload.profiles.bench_long import _greedy
    from offload.profiles.passkey import passkey_prompt

    llm = LLM(smollm_path, kv_policy="retrieval", kv_budget=0.02, max_context=4096)
    config = llm.runtime.resolved.selection
    assert config.budget == 0.02
    policies = ("dense", "retrieval", "shadowkv", "streaming")
    answers = {policy: [] for policy in policies}
    for depth in (0.1, 0.5, 0.9):
        ids = passkey_prompt(llm.tokenizer, 4000, depth)
        shared, logits, _ = prefill_shared(llm, ids, len(ids) + 8, config)
        for policy in policies:
            tokens = _greedy(llm, backend_for(policy, llm, shared, config), len(ids), int(logits.argmax()), 6)
            answers[policy].append(llm.tokenizer.decode(tokens).strip())
    assert all(a.startswith("68213") for a in answers["dense"]), answers
    assert answers["retrieval"] == answers["dense"], answers
    assert answers["shadowkv"] == answers["dense"], answers
    assert not any(a.startswith("68213") for a in answers["streaming"]), answers


def test_shadowkv_rank_from_spectrum_and_exact_rebuild_at_full_rank():
    """Keys rebuilt from the factors (rotated back at their positions) equal the cached keys at full
    rank; at a lower energy the rank drops and compression is reported."""
    from offload.indexes.shadowkv import ShadowKVIndex
    from offload.kernels import rope_rotate

    torch.manual_seed(0)
    Hkv, G, N, D = 2, 2, 256, 32
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    pre = torch.randn(N, 4) @ torch.randn(4, Hkv * D) + 0.01 * torch.randn(N, Hkv * D)  # nearly rank 4
    keys = rope_rotate(pre.view(N, Hkv, D).transpose(0, 1), torch.arange(N), inv_freq)  # [Hkv, N, D]
    for energy, expect_full in ((1.0, True), (0.99, False)):
        idx = make_index("shadowkv", index_context(Hkv * G, Hkv, D, D ** -0.5, inv_freq),
                         SelectionConfig(budget=32, sink=4, window=8))
        assert isinstance(idx, ShadowKVIndex)
        idx.energy = energy
        idx.build(keys, N)
        rebuilt = (idx.u @ idx.sv).view(N, Hkv, D).transpose(0, 1)  # pre-RoPE
        rebuilt = rope_rotate(rebuilt, torch.arange(N), inv_freq)
        if expect_full:
            torch.testing.assert_close(rebuilt, keys, atol=1e-4, rtol=1e-4)
        else:
            assert idx.rank == 4 and idx.compression == Hkv * D / 4
            assert (rebuilt - keys).norm() / keys.norm() < 0.05


def test_sentence_index_selects_whole_sentences():
    """Segmentation at sentence-ending tokens (and every max_sentence tokens), running means for
    the sentence vectors, whole sentences chosen best first, decode tokens joining sentences."""
    from offload.indexes.sentence import SentenceIndex

    torch.manual_seed(0)
    D, n = 16, 60
    tokens = [1] * n
    for end in (9, 19, 39):  # sentences [0,10) [10,20) [20,40)->split at max_sentence [40,60)->split
        tokens[end] = 0
    keys = torch.randn(2, 80, D)  # [Hkv, N, D]
    cfg = SelectionConfig(budget=12, sink=0, window=0)
    idx = SentenceIndex(index_context(4, 2, D, D ** -0.5, sentence_end_ids={0}), cfg, tokens)
    idx.build(keys, n)
    starts = idx.starts[:idx.num_sentences].tolist()
    assert starts == [0, 10, 20, 36, 40, 56]
    assert torch.allclose(idx.sums[:, 2] / 16, keys[:, 20:36].mean(dim=1), atol=1e-6)
    # A query aligned with sentence [10, 20)'s keys picks that sentence whole (10 tokens <= 12).
    q = keys[:, 10:20].mean(dim=1).repeat_interleave(2, dim=0) * 50  # [H, D]
    sel = idx.search(q, 12)
    for h in range(2):
        chosen = sel.ids[h, :sel.counts[h]].tolist()
        assert set(range(10, 20)) <= set(chosen) and len(chosen) <= 12
        for s, e in zip(starts, starts[1:] + [n]):  # never a part of a sentence
            part = set(range(s, e)) & set(chosen)
            assert not part or part == set(range(s, e))
    tokens += [1, 0, 1]  # decode: the open sentence [56,60) grows to 62, then a new one starts at 62
    idx.extend(63)
    assert idx.starts[:idx.num_sentences].tolist() == starts + [62]
    assert idx.lengths[5].item() == 6
    assert torch.allclose(idx.sums[:, 5] / 6, keys[:, 56:62].mean(dim=1), atol=1e-6)


def test_query_key_topk_in_blocks_equals_brute_force(monkeypatch):
    """The build's exact top-k is computed in bounded blocks (on the backend's device): any block
    size gives the brute-force answer."""
    import offload.indexes.retrieval as retrieval

    torch.manual_seed(3)
    q, k = torch.randn(700, 32), torch.randn(500, 32)
    ref = torch.topk(q @ k.T, 16, dim=-1).indices  # [700, 16]
    for block_bytes in (64 * 500 * 4, 200 * 500 * 4, 1 << 30):  # 64 (the floor), 200, all queries per block
        monkeypatch.setattr(retrieval, "SCORE_BLOCK_BYTES", block_bytes)
        assert torch.equal(retrieval.query_key_topk(q, k, 16, torch.device("cpu")), ref)
    # a bf16 cache is scored in bf16 on the CPU: the same neighbours but for near-ties
    got = retrieval.query_key_topk(q.bfloat16(), k.bfloat16(), 16, torch.device("cpu"))
    same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, ref)) / ref.numel()
    assert same > 0.9


@pytest.mark.parametrize("policy,kv_offload", [("exact", False), ("quest", True), ("shadowkv", False)])
def test_sliding_window_model_attends_within_its_window(tiny_models, policy, kv_offload):
    """Mistral-style sliding window (24 here): a sparse policy must not reach keys the model cannot
    see. Beyond the window the sparse layers attend exactly over it; the logits equal dense ones,
    though the sinks and a small budget alone would differ."""
    folder, hf = tiny_models["mistral"]
    window = hf.config.sliding_window
    ids = torch.randint(3, hf.config.vocab_size, (PROMPT + STEPS,), generator=torch.Generator().manual_seed(2)).tolist()
    assert PROMPT > window
    dense = teacher_forced_logits(LLM(folder), ids, PROMPT)
    sparse_llm = LLM(folder, kv_policy=policy, kv_budget=2, sink=2, window=2, dense_layers=0, kv_offload=kv_offload)
    sparse = teacher_forced_logits(sparse_llm, ids, PROMPT)
    assert (sparse - dense).abs().max().item() < 1e-4
    assert not sparse_llm.backend.indexes, "an index was built for rows that only attend within the window"


def test_sliding_window_batch_across_the_window_equals_single_runs(tiny_models):
    """A batch with one row inside the window (sparse selection) and one beyond it (exact within
    the window), the short row crossing the window while it generates: each row as if alone."""
    folder, hf = tiny_models["mistral"]
    llm = LLM(folder, kv_policy="exact", kv_budget=2, sink=2, window=2, dense_layers=0)
    prompts = [list(range(3, 13)), list(range(40, 90))]  # 10 and 50 tokens; the window is 24
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    batched = [o.token_ids for o in llm.generate(prompts, params)]
    single = [llm.generate([p], params)[0].token_ids for p in prompts]
    assert batched == single
    # the short row's first steps were sparse: dense attention gives other tokens there
    dense = [o.token_ids for o in LLM(folder).generate(prompts[:1], params)]
    assert llm.generate(prompts[:1], SamplingParams(max_new_tokens=14, ignore_eos=True))[0].token_ids != dense[0][:14]


def test_retrieval_build_learns_from_a_bounded_query_sample(monkeypatch):
    """The build scores at most ``build_queries`` prompt queries per KV head against the keys (its
    cost linear in the context), every head's last positions among them; on planted topics the
    graph learned from the sample finds about as much of the exact top-k as one learned from all."""
    import numpy as np

    import offload.indexes.retrieval as retrieval

    rows = retrieval.sample_queries(3, 1000, 300)
    assert len(rows) <= 300 and np.all(np.diff(rows) > 0)
    per_head = rows.reshape(3, -1) - 1000 * np.arange(3)[:, None]  # the same positions for every head
    assert (per_head == per_head[0]).all() and set(range(1000 - 25, 1000)) <= set(per_head[0].tolist())
    assert np.array_equal(retrieval.sample_queries(3, 10, 300), np.arange(30))  # few: all of them

    g = torch.Generator().manual_seed(0)
    Hkv, G, N, D, topics, budget = 2, 3, 3000, 32, 40, 30
    centres = torch.randn(Hkv, topics, D, generator=g) * 2  # keys cluster around topics
    keys = centres[:, torch.randint(0, topics, (N,), generator=g)] + torch.randn(Hkv, N, D, generator=g)
    queries = (centres.repeat_interleave(G, 0)[:, torch.randint(0, topics, (1000,), generator=g)]
               + torch.randn(Hkv * G, 1000, D, generator=g))  # [Hq, Nq, D]
    decode_q = centres.repeat_interleave(G, 0)[:, 7] + torch.randn(Hkv * G, D, generator=g)  # [Hq, D]
    exact = torch.einsum("hgd,hnd->hgn", decode_q.view(Hkv, G, D), keys).amax(1)  # [Hkv, N]
    seen, real = [], retrieval.query_key_topk
    monkeypatch.setattr(retrieval, "query_key_topk", lambda q, *a: seen.append(q.shape[0]) or real(q, *a))
    recall = {}
    for limit in (Hkv * G * 1000, 256):
        monkeypatch.setattr(retrieval.RetrievalIndex, "build_queries", limit)
        idx = make_index("retrieval", index_context(Hkv * G, Hkv, D, 1.0),
                         SelectionConfig(budget=budget, sink=4, window=8))
        idx.effort = 2.0  # a beam twice the budget
        idx.build(KVRows(keys), N, queries)
        sel = idx.search(decode_q, budget)
        hits = [len(set(sel.ids[h, :sel.counts[h]].tolist()) & set((torch.topk(exact[h, 4:N - 8], budget).indices
                                                                      + 4).tolist())) for h in range(Hkv)]
        recall[limit] = sum(hits) / (Hkv * budget)
    assert max(seen[Hkv:]) <= 256 and min(seen[:Hkv]) == G * 1000  # the bounded build's queries, per head
    assert recall[256] >= 0.8 and recall[256] >= recall[Hkv * G * 1000] - 0.1, recall
