"""The cluster index: k-means within segments, centroid search, its layout, growth and persistence."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import shakespeare
from test_indexes import index_context

from offload import LLM, SamplingParams
from offload.indexes import SelectionConfig, make_index
from offload.indexes.cluster import ClusterIndex, farthest_point_seeds, farthest_point_seeds_tensor, kmeans_segments


def _planted(Hkv: int, n: int, D: int, clusters: int, seed: int, spread: float = 0.05, runs: bool = False):
    """Keys around ``clusters`` well separated centres, each token in a random one (``runs``: in
    runs of n / clusters consecutive tokens, as text stays on a topic): (keys [Hkv, n, D], labels
    [Hkv, n], centres [Hkv, clusters, D])."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(Hkv, clusters, D, generator=g) * 3
    labels = torch.randint(0, clusters, (Hkv, n), generator=g)
    if runs:
        labels = (torch.arange(n) // (n // clusters)).expand(Hkv, -1)
    keys = torch.gather(centres, 1, labels[..., None].expand(-1, -1, D)) + spread * torch.randn(Hkv, n, D, generator=g)
    return keys, labels, centres


def test_kmeans_recovers_planted_clusters():
    """Points around 8 far-apart centres per segment, k = 8: every cluster found is one centre's points."""
    keys, labels, _ = _planted(1, 4 * 256, 16, 8, seed=0)
    x = keys.view(4, 256, 16)  # 4 segments of 256
    truth = labels.view(4, 256)
    assign, centroids = kmeans_segments(x, 8, iterations=10)
    assert assign.shape == (4, 256) and centroids.shape == (4, 8, 16)
    agree = 0
    for s in range(4):  # same partition up to renaming: each found cluster maps to one true label
        pairs = {(int(a), int(t)) for a, t in zip(assign[s], truth[s])}
        agree += len({a for a, _ in pairs}) == len(pairs)
    assert agree == 4


def _index(keys: torch.Tensor, n: int, budget_sink=0, window=0, H=None, **kw) -> ClusterIndex:
    Hkv, _, D = keys.shape
    ctx = index_context(H or Hkv, Hkv, D, scale=1.0)
    idx = make_index("cluster", ctx, SelectionConfig(sink=budget_sink, window=window, dense_layers=0, **kw))
    idx.build(keys, n)
    return idx


def test_clusters_partition_the_tokens_and_grow_by_segments(monkeypatch):
    """order lists every clustered token once, grouped by cluster (starts/sizes agree); decode tokens
    wait in the tail until a whole segment arrives, then join as clusters."""
    monkeypatch.setattr(ClusterIndex, "segment", 64)
    keys = torch.randn(2, 400, 8, generator=torch.Generator().manual_seed(1))
    idx = _index(keys, 150)  # 2 whole segments + a partial one of 22
    assert idx.n_clustered == 150
    for n in (170, 213, 214, 300):
        idx.extend(n)
        assert idx.n_clustered == 150 + (n - 150) // 64 * 64
        for h in range(2):
            assert sorted(idx.order[h].tolist()) == list(range(idx.n_clustered))
            assert idx.starts[h, -1] == idx.n_clustered and (torch.diff(idx.starts[h]) == idx.sizes[h]).all()
    assert idx.centroids.shape[1] == idx.sizes.shape[1] == idx.starts.shape[1] - 1
    assert idx.nbytes() > 0


def test_search_takes_the_cluster_the_query_points_at():
    """Planted clusters, runs of 16 tokens: a query along one centre selects that cluster's tokens
    (the exact twin's choice at a budget of one cluster), within the candidate range."""
    Hkv, n, D = 2, 2048, 32
    keys, labels, centres = _planted(Hkv, n, D, 128, seed=2, runs=True)
    idx = _index(keys, n, budget_sink=4, window=16)
    exact = make_index("exact", index_context(Hkv, Hkv, D, 1.0), SelectionConfig(sink=4, window=16, dense_layers=0))
    exact.build(keys, n)
    target = torch.tensor([5, 77])
    q = torch.stack([centres[h, target[h]] for h in range(Hkv)]) * 0.5  # [H=Hkv, D]
    size = int((labels[0] == 5).sum())
    sel, ref = idx.search(q, size), exact.search(q, size)
    lo, hi = idx.config.candidate_range(n)
    for h in range(Hkv):
        got = set(sel.ids[h, :sel.counts[h]].tolist())
        want = {i for i in range(lo, hi) if labels[h, i] == target[h]}
        assert want <= got and all(lo <= i < hi for i in got)
        best = set(ref.ids[h, :ref.counts[h]].tolist())
        assert len(best & got) / len(best) > 0.9
    assert idx.last_scored < n / 8  # centroids (about n / 16) plus the short tail, not every key


def test_budget_is_spent_in_whole_clusters_and_tail_tokens_compete():
    keys = torch.randn(1, 600, 16, generator=torch.Generator().manual_seed(3))
    idx = _index(keys, 512, H=3)
    idx.extend(600)  # 88 tail tokens, scored exactly
    q = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    for budget in (1, 20, 100, 590):
        sel = idx.search(q, budget)
        count = int(sel.counts[0])
        ids = sel.ids[0, :count]
        assert budget <= count < budget + int(idx.sizes.max()) + 1 or count == 600
        assert ids.unique().numel() == count  # no duplicates
    # the tail token the query likes most is taken even at a small budget
    tail_best = 512 + int((keys[0, 512:600] @ q.view(3, 16).T).softmax(0).sum(-1).argmax())
    keys[0, tail_best] = q.sum(0) * 10
    assert tail_best in idx.search(q, 1).ids[0].tolist()


def _ids(sel, h: int) -> set[int]:
    return set(sel.ids[h, :int(sel.counts[h])].tolist())


def test_lookahead_is_what_a_larger_budget_adds():
    """The tokens ranked just past a selection (what a disk tier reads ahead) are the ones a budget
    larger by that much adds, none of the selection's own, -1 past them."""
    keys = torch.randn(3, 3000, 16, generator=torch.Generator().manual_seed(6))
    idx = _index(keys, 2900, H=6)
    q = torch.randn(6, 16, generator=torch.Generator().manual_seed(7))
    assert idx.lookahead(32) is None  # no search yet
    sel = idx.search(q, 64)
    ahead = idx.lookahead(32)
    wider = idx.search(q, 96)
    assert ahead.shape == (3, 32)
    for h in range(3):
        got = [t for t in ahead[h].tolist() if t >= 0]
        added = _ids(wider, h) - _ids(sel, h)
        assert set(got) <= added and len(got) == min(32, len(added)) > 0
        assert all(t < 0 for t in ahead[h, len(got):].tolist())


def test_state_round_trip_gives_the_same_selection():
    keys = torch.randn(3, 3000, 16, generator=torch.Generator().manual_seed(5))
    idx = _index(keys, 2500, H=6)
    scalars, tensors = idx.state()
    again = make_index("cluster", idx.ctx, idx.config)
    again.restore(keys, scalars, tensors)
    q = torch.randn(6, 16)
    a, b = idx.search(q, 64), again.search(q, 64)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.counts, b.counts)


@pytest.mark.slow
def test_cluster_on_real_text(smollm_path):
    """SmolLM2 on 2K tokens of Hamlet at 2%: the cluster index captures more attention mass than
    Quest's pages and comes within 0.1 of the exact twin, scoring about a sixteenth of the keys."""
    results = {}
    ids = None
    for policy in ("exact", "cluster", "quest"):
        llm = LLM(smollm_path, kv_policy=policy, kv_budget=0.02, telemetry=True)
        ids = ids or llm.tokenizer.encode(shakespeare())[:2000]
        llm.generate([ids], SamplingParams(max_new_tokens=4, ignore_eos=True))
        results[policy] = llm.telemetry.summary()
        if policy == "cluster":
            scored = [ix.last_scored / ix.n for ix in llm.backend.indexes.values()]
    assert results["quest"]["mass"] < results["cluster"]["mass"] <= results["exact"]["mass"] + 1e-6
    assert results["cluster"]["mass"] > results["exact"]["mass"] - 0.1
    assert max(scored) < 0.1


@pytest.mark.parametrize("mass", [None, 0.5, 0.9])
def test_compiled_take_equals_the_tensor_form(monkeypatch, mass):
    """The CPU's compiled passes and the tensor ops a GPU runs estimate the same mass and select
    the same ids, tail included, with a fixed or an adaptive budget."""
    monkeypatch.setattr(ClusterIndex, "segment", 256)
    keys = torch.randn(3, 1500, 16, generator=torch.Generator().manual_seed(7))
    idx = _index(keys, 1200, budget_sink=4, window=32, H=9, mass=mass)
    idx.extend(1400)  # a clustered segment more, and a tail
    q = torch.randn(9, 16, generator=torch.Generator().manual_seed(8)) * 2
    for budget in (1, 17, 150, 2000):
        lo, hi = idx.config.candidate_range(idx.n)
        qg = q.float().view(3, 3, 16)
        tail = keys[:, idx.n_clustered:hi]  # [Hkv, T, D]
        centroids = idx.centroids.float().transpose(1, 2)  # [Hkv, D, C]
        logits = torch.cat([torch.matmul(qg, centroids) * idx.scale + idx.sizes.float().log()[:, None],
                            torch.matmul(qg, tail.transpose(1, 2)) * idx.scale], dim=-1)  # [Hkv, G, C+T]
        mass = torch.softmax(logits, dim=-1).sum(1) / 3  # [Hkv, C+T]: shares of the group's attention
        compiled, cluster_logits, a, zone_a, _ = idx._search_numba(qg, tail, budget, lo, hi)
        assert torch.allclose(torch.from_numpy(compiled), mass, atol=1e-6, rtol=1e-4)
        C = idx.sizes.shape[1]  # the clusters' logits, kept for the estimation zone
        assert torch.allclose(torch.from_numpy(cluster_logits), logits[..., :C], atol=1e-4, rtol=1e-4)
        b, zone_b = idx._take_torch(torch.from_numpy(compiled), budget, lo, hi)
        assert torch.equal(a.counts, b.counts)
        for h in range(3):  # the same ids (the tensor form sorts them; the compiled take lists them by cluster)
            assert torch.equal(a.ids[h, :a.counts[h]].sort().values, b.ids[h, :b.counts[h]])
            # the estimation zone: the same clusters ranked next (a tie may order them otherwise)
            assert set(zone_a[h][zone_a[h] >= 0].tolist()) == set(zone_b[h][zone_b[h] >= 0].tolist())
            picked = a.ids[h, :a.counts[h]].long()
            taken = set(idx._cluster_of[h, picked[picked < idx.n_clustered]].tolist())  # clusters selected
            assert not taken & set(zone_a[h].tolist())


def test_adaptive_budget_parsing_and_errors():
    from offload import EngineConfig
    from offload.errors import OffloadError
    from offload.indexes.base import ADAPTIVE_CAP

    assert SelectionConfig.parse_budget("p0.95") == (ADAPTIVE_CAP, 0.95)
    assert SelectionConfig.parse_budget(0.02) == (0.02, None)
    assert SelectionConfig.parse_budget(512) == (512.0, None)
    for bad in ("p1.5", "p", "pp", "x", -1, 0, 2.5, True):
        with pytest.raises(OffloadError, match="kv_budget"):
            SelectionConfig.parse_budget(bad)
    with pytest.raises(OffloadError, match="kv_budget") as e:
        EngineConfig(kv_budget="p2")
    assert "\n" not in str(e.value)


def test_adaptive_exact_takes_few_tokens_when_attention_is_peaked():
    """The exact twin with p0.9: one key that takes nearly all attention -> the floor; flat
    attention -> the cap (budget); in between, just enough to cover 90% of the candidates' mass."""
    from offload.indexes.base import ADAPTIVE_FLOOR_TOKENS
    from offload.indexes.simple import group_attention_mass

    Hkv, n, D = 2, 1000, 16
    ctx = index_context(Hkv, Hkv, D, scale=1.0)
    idx = make_index("exact", ctx, SelectionConfig(sink=0, window=0, dense_layers=0, mass=0.9))
    keys = torch.zeros(Hkv, n, D)
    keys[0, 500, 0] = 50.0  # head 0: one key dominates; head 1: all keys equal
    idx.build(keys, n)
    q = torch.zeros(Hkv, D)
    q[:, 0] = 1.0
    sel = idx.search(q, 300)
    assert sel.counts.tolist() == [ADAPTIVE_FLOOR_TOKENS, 300]
    assert 500 in sel.ids[0, :ADAPTIVE_FLOOR_TOKENS].tolist()
    # graded attention: the smallest prefix of the ranking that covers 90%
    keys = torch.randn(Hkv, n, D, generator=torch.Generator().manual_seed(9))
    idx.build(keys, n)
    q = torch.randn(Hkv, D, generator=torch.Generator().manual_seed(10)) * 0.4
    sel = idx.search(q, n)
    mass = group_attention_mass(q, keys, n, 1.0, 1)  # [Hkv, n]
    for h in range(Hkv):
        c = int(sel.counts[h])
        got = float(mass[h, sel.ids[h, :c].long()].sum())
        ranked = mass[h].sort(descending=True).values
        assert c > ADAPTIVE_FLOOR_TOKENS
        assert got >= 0.9 - 1e-5 and float(ranked[:c - 1].sum()) < 0.9  # enough, and one fewer is not
        assert (torch.diff(sel.ids[h, :c]) > 0).all()


def test_adaptive_cluster_end_to_end_reports_the_budget_used(tiny_models):
    """kv_budget="p0.9" through LLM: the banner says adaptive; telemetry reports the tokens each head
    selected, between the floor and the 10% cap, and the attention mass it captured."""
    from offload.indexes.base import ADAPTIVE_FLOOR_TOKENS

    folder, hf = tiny_models["llama"]
    llm = LLM(folder, kv_policy="cluster", kv_budget="p0.9", dense_layers=1, sink=4, window=16, telemetry=True,
              verbose=False)
    assert "adaptive p0.9" in llm.backend.describe()
    ids = torch.randint(3, hf.config.vocab_size, (480,), generator=torch.Generator().manual_seed(11)).tolist()
    llm.generate([ids], SamplingParams(max_new_tokens=4, ignore_eos=True))
    s = llm.telemetry.summary()
    assert ADAPTIVE_FLOOR_TOKENS <= s["selected"] <= 0.1 * 484 + ClusterIndex.cluster_size
    assert 0 < s["mass"] <= 1


def test_farthest_point_seeds_numba_and_tensor_forms_agree():
    """The CPU (numba) seeding and the tensor form a GPU runs choose the same seeds, the first the longest point."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 300, 32, generator=g) * torch.rand(5, 300, 1, generator=g)  # [S, T, D], lengths spread
    seeds = farthest_point_seeds(x, 24)  # [S, k]
    assert seeds.shape == (5, 24) and seeds.dtype == torch.int64
    assert torch.equal(seeds, farthest_point_seeds_tensor(x, 24))
    assert torch.equal(seeds[:, 0], (x * x).sum(-1).argmax(dim=1))
    assert all(len(set(row.tolist())) == 24 for row in seeds)  # never a point twice


def _exact(q, keys, values, n, scale):
    """Full attention of q [H, D] over keys/values [Hkv, n, D] (GQA) -> [H, D] fp32."""
    Hkv, _, D = keys.shape
    qg = q.float().view(Hkv, -1, D)
    probs = torch.softmax(torch.matmul(qg, keys[:, :n].float().transpose(1, 2)) * scale, dim=-1)  # [Hkv, G, n]
    return torch.matmul(probs, values[:, :n].float()).view(-1, D)


@pytest.mark.parametrize("window", [0, 40])
def test_the_estimation_zone_brings_the_output_closer_to_exact(window):
    """Keys on topics in runs, values per topic: the clusters ranked next after the selection,
    estimated from centroid and value sums and merged by log-sum-exp, cut the error against full
    attention (the selection alone drops their share); tokens attended exactly anyway (sinks, a
    window inside clustered tokens) are not estimated again."""
    from offload.kernels import merge_attention
    from offload.kernels.reference import gather_attention_ref

    Hkv, H, D, n = 2, 8, 32, 2048
    keys, labels, _ = _planted(Hkv, n, D, 64, seed=11, spread=0.5, runs=True)
    g = torch.Generator().manual_seed(12)
    topic_values = torch.randn(Hkv, 64, D, generator=g)
    values = torch.gather(topic_values, 1, labels[..., None].expand(-1, -1, D)) + 0.3 * torch.randn(Hkv, n, D,
                                                                                                    generator=g)
    idx = _index(keys, n, budget_sink=4, window=window, H=H)
    scale = 0.02  # broad attention: ~20% of the mass beyond a 3% selection
    q = keys[:, 700].repeat_interleave(H // Hkv, 0) + torch.randn(H, D, generator=g)  # [H, D]
    idx.scale = scale
    sel = idx.search(q, 64)
    zone = idx._ranked.zone
    for h in range(Hkv):  # the zone: clusters next after the taken ones, none of them taken
        taken = {int(c) for c in idx._cluster_of[h, sel.ids[h, :sel.counts[h]].long()]}
        assert zone[h][zone[h] >= 0].numel() > 0 and not taken & set(zone[h].tolist())
    out, lse = gather_attention_ref(q[None], keys[None], values[None], sel.ids[None].long(), sel.counts[None].long(),
                                    torch.tensor([n]), scale, 4, window)  # [1, H, D], [1, H]
    est_out, est_lse = idx.estimate_tensors(q, values, n)
    merged, merged_lse = merge_attention([out, est_out[None].to(out)], [lse, est_lse[None]])
    compiled, compiled_lse = out[0].clone(), lse[0].clone()
    assert idx._ranked.estimate is None  # the search had no values: add_estimate estimates in one compiled pass
    idx.add_estimate(q, values, n, compiled, compiled_lse)
    tensors, tensors_lse = out[0].clone(), lse[0].clone()
    edge_cluster, edge_values = idx._edge(values, idx._ranked.lo, idx._ranked.hi)
    idx._merge_tensors(q, zone, edge_cluster, edge_values, tensors, tensors_lse)  # a GPU's form
    assert torch.equal(idx.search(q, 64).ids, sel.ids)  # the values seen now: this search estimates as it ranks
    assert idx._ranked.estimate is not None
    searched, searched_lse = out[0].clone(), lse[0].clone()
    idx.add_estimate(q, values, n, searched, searched_lse)  # only merges
    for got, got_lse in ((compiled, compiled_lse), (tensors, tensors_lse), (searched, searched_lse)):
        torch.testing.assert_close(got, merged[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_lse, merged_lse[0], rtol=1e-5, atol=1e-5)
    exact = _exact(q, keys, values, n, scale)
    before, after = (out[0] - exact).norm() / exact.norm(), (merged[0] - exact).norm() / exact.norm()
    assert after < 0.6 * before, (before, after)
    if window:  # the window's tokens are clustered (the build took all n): estimating them too would count them twice
        idx.config = SelectionConfig(sink=4, window=0, dense_layers=0)
        idx._ranked = dataclasses.replace(idx._ranked, hi=n)  # the same zone, the window's tokens no longer left out
        _, lse_all = idx.estimate_tensors(q, values, n)
        for h in range(Hkv):
            counted_twice = set(idx._cluster_of[h, n - window:].tolist()) & set(zone[h].tolist())
            G = H // Hkv
            if counted_twice:
                assert (lse_all[h * G:(h + 1) * G] > est_lse[h * G:(h + 1) * G] + 1e-4).all()
            else:
                torch.testing.assert_close(lse_all[h * G:(h + 1) * G], est_lse[h * G:(h + 1) * G])
        assert any(set(idx._cluster_of[h, n - window:].tolist()) & set(zone[h].tolist()) for h in range(Hkv))


def test_value_sums_follow_the_clusters_through_extend_and_restore(monkeypatch):
    monkeypatch.setattr(ClusterIndex, "segment", 64)
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 400, 8, generator=g), torch.randn(2, 400, 8, generator=g)
    idx = _index(keys, 150)
    idx.search(torch.randn(2, 8, generator=g), 20)
    idx.estimate_tensors(torch.randn(2, 8, generator=g), values, 150)
    idx.extend(300)  # two more segments clustered
    idx.search(torch.randn(2, 8, generator=g), 20)
    idx.estimate_tensors(torch.randn(2, 8, generator=g), values, 300)
    again = make_index("cluster", idx.ctx, idx.config)
    again.restore(keys, *idx.state())
    again.search(torch.randn(2, 8, generator=g), 20)
    again.estimate_tensors(torch.randn(2, 8, generator=g), values, 300)
    for ix in (idx, again):
        assert torch.equal(ix._cluster_of, idx._cluster_of)
        for h in range(2):
            want = torch.zeros(ix.sizes.shape[1], 8).index_add_(0, ix._cluster_of[h].long(), values[h, :ix.n_clustered])
            torch.testing.assert_close(ix._vsums[h], want.to(torch.bfloat16))  # held in bf16: the sums rounded once


@pytest.mark.parametrize("kv_int8", [False, True])
def test_effort_keeps_the_exact_best_of_the_clusters_tokens(kv_int8):
    """effort e: clusters are taken for e x budget tokens and the exact best budget of those kept.
    Taking every candidate (large e) with one query head per KV head gives the exact twin's choice;
    a smaller e keeps a subset of what its wide take held, and scores those keys beside the
    centroids. An int8 cache's candidates are dequantized for the score."""
    from offload.tiers.kv_codec import quantize_kv
    from offload.tiers.kv_store import KVRows

    Hkv, n, D, budget = 2, 1500, 16, 40
    keys = torch.randn(Hkv, n, D, generator=torch.Generator().manual_seed(7)) * 0.7
    rows = KVRows(*quantize_kv(keys, torch.float32)) if kv_int8 else KVRows(keys)
    ctx = index_context(Hkv, Hkv, D, 1.0)
    config = SelectionConfig(sink=4, window=16, dense_layers=0)
    exact = make_index("exact", ctx, config)
    exact.build(rows, n)
    q = torch.randn(Hkv, D, generator=torch.Generator().manual_seed(8))
    plain = make_index("cluster", ctx, config)
    plain.build(rows, n)
    wide = plain.search(q, 3 * budget)
    plain.search(q, budget)
    for effort, want in ((1e6, exact.search(q, budget)), (3.0, None)):
        idx = make_index("cluster", ctx, dataclasses.replace(config, effort=effort))
        idx.build(rows, n)
        sel = idx.search(q, budget)
        assert sel.counts.tolist() == [budget] * Hkv
        for h in range(Hkv):
            assert (torch.diff(sel.ids[h, :budget]) > 0).all()
            if want is not None:
                assert _ids(sel, h) == _ids(want, h)
            else:
                assert _ids(sel, h) <= _ids(wide, h)
        if want is None:
            assert idx.last_scored >= plain.last_scored + 3 * budget  # centroids and the candidates' keys


def test_an_adaptive_budget_takes_its_clusters_tokens_whatever_the_effort():
    """kv_budget "p": the take already stops at the estimated share; no exact rerank follows."""
    Hkv, n, D = 2, 1200, 16
    keys = torch.randn(Hkv, n, D, generator=torch.Generator().manual_seed(9))
    q = torch.randn(Hkv, D, generator=torch.Generator().manual_seed(10)) * 2
    plain = _index(keys, n, budget_sink=4, window=16, mass=0.5).search(q, 100)
    wide = _index(keys, n, budget_sink=4, window=16, mass=0.5, effort=4.0).search(q, 100)
    assert torch.equal(plain.counts, wide.counts) and all(_ids(plain, h) == _ids(wide, h) for h in range(Hkv))


def _small_tree(monkeypatch, visit: float = 2.0, tree_from: int = 0, rest: float = 0.75):
    """Segments of 64 tokens in 4 clusters; blocks of 16 clusters grouped in supers of about 4."""
    monkeypatch.setattr(ClusterIndex, "segment", 64)
    monkeypatch.setattr(ClusterIndex, "tree_block", 16)
    monkeypatch.setattr(ClusterIndex, "tree_fanout", 4)
    monkeypatch.setattr(ClusterIndex, "tree_from", tree_from)
    monkeypatch.setattr(ClusterIndex, "tree_visit", visit)
    monkeypatch.setattr(ClusterIndex, "tree_visit_rest", rest)


def test_the_second_level_groups_every_block_of_clusters(monkeypatch):
    """Each whole block of clusters is split among its supers (every cluster once, in its own
    block), a super is the mean key of its tokens, the tree grows as segments arrive, and a restored
    index derives the same tree."""
    _small_tree(monkeypatch)
    keys = torch.randn(2, 1400, 8, generator=torch.Generator().manual_seed(21))
    idx = _index(keys, 1000)  # 15 segments and a partial one: 3 whole blocks of 16 clusters
    for n in (1000, 1300):
        idx.extend(n)
        tree = idx._tree
        C = idx.sizes.shape[1]
        assert tree.blocked == C - C % 16 and tree.supers.shape[1] == tree.blocked // 4
        for h in range(2):
            members, starts = tree.members[h].long(), tree.starts[h].long()
            assert sorted(members.tolist()) == list(range(tree.blocked)) and starts[-1] == tree.blocked
            for s in range(tree.supers.shape[1]):
                inside = members[starts[s]:starts[s + 1]]
                assert (inside // 16 == s // 4).all()  # a super's clusters come from its own block
                tokens = idx.sizes[h, inside].float()
                if tokens.sum() > 0:
                    mean = (idx.centroids[h, inside].float() * tokens[:, None]).sum(0) / tokens.sum()
                    torch.testing.assert_close(tree.supers[h, s].float(), mean, atol=2e-2, rtol=1e-2)
                    torch.testing.assert_close(tree.log_sizes[h, s], tokens.sum().log())
    assert idx._tree.blocked == 64  # 1300 tokens: 20 segments, 80 clusters, 4 whole blocks
    again = make_index("cluster", idx.ctx, idx.config)
    again.restore(keys, *idx.state())
    for a, b in zip(idx._tree.tensors(), again._tree.tensors()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mass", [None, 0.9])
def test_the_tree_search_visiting_every_super_is_the_flat_search(monkeypatch, mass):
    """Told to visit every super, the two-level search scores every cluster: the same mass, logits,
    selection, zone and estimate as the flat one, a tail and ungrouped clusters included."""
    _small_tree(monkeypatch, visit=1e9, rest=2.0)  # an adaptive budget's visit share past 1: never reached
    g = torch.Generator().manual_seed(22)
    keys, values = torch.randn(3, 1500, 16, generator=g), torch.randn(3, 1500, 16, generator=g)
    idx = _index(keys, 1200, budget_sink=4, window=32, H=9, mass=mass)
    idx.extend(1400)
    idx.summarize_values(values)
    assert 0 < idx._tree.blocked < idx.sizes.shape[1]
    q = torch.randn(9, 16, generator=g) * 2
    for budget in (17, 150):
        monkeypatch.setattr(ClusterIndex, "tree_from", 10**9)
        flat = idx.search(q, budget), idx._ranked
        monkeypatch.setattr(ClusterIndex, "tree_from", 0)
        tree = idx.search(q, budget), idx._ranked
        (a, ra), (b, rb) = flat, tree
        assert torch.allclose(rb.mass, ra.mass, atol=1e-6, rtol=1e-4)
        assert torch.equal(a.counts, b.counts)
        for h in range(3):
            assert torch.equal(a.ids[h, :a.counts[h]].sort().values, b.ids[h, :b.counts[h]].sort().values)
            zone = ra.zone[h][ra.zone[h] >= 0]
            assert set(zone.tolist()) == set(rb.zone[h][rb.zone[h] >= 0].tolist())
            assert np.allclose(ra.cluster_logits[h][:, zone], rb.cluster_logits[h][:, zone], atol=1e-4)
        for x, y in zip(ra.estimate, rb.estimate):
            assert np.allclose(x, y, atol=1e-5, rtol=1e-4)


def test_the_tree_search_finds_the_planted_cluster_scoring_few_centroids(monkeypatch):
    """Keys on 64 topics in runs: a query along one topic's centre selects that topic's tokens
    through the best supers alone, as the flat search does, with the other supers' share counted."""
    _small_tree(monkeypatch, visit=1.0)
    Hkv, n, D = 2, 4096, 16
    keys, labels, centres = _planted(Hkv, n, D, 64, seed=23, spread=0.05, runs=True)
    idx = _index(keys, n, H=4)
    C = idx.sizes.shape[1]
    assert idx._tree.blocked == C
    for topic in (3, 40):
        q = centres[:, topic].repeat_interleave(2, 0)  # [H, D]
        sel = idx.search(q, 64)
        r = idx._ranked
        for h in range(Hkv):
            got = set(sel.ids[h, :sel.counts[h]].tolist())
            assert got == set(torch.nonzero(labels[h] == topic).flatten().tolist())
            scored = int((r.mass[h] > 0).sum())
            assert scored < C // 2  # the clusters of a few supers (the rest: their share, no score)
            assert 0.99 < float(r.mass[h].sum()) <= 1.0 + 1e-5  # the scored clusters hold nearly all of it
        assert idx.last_scored < C // 2  # supers and clusters scored per head, as telemetry reports


def test_an_adaptive_budget_visits_the_supers_that_hold_its_share(monkeypatch):
    """With p0.5 the search ranks entries for its cap (most clusters), but visits supers only until
    they hold p + (1 - p) x tree_visit_rest of the supers' attention: on planted topics the topic's
    supers, the same tokens of the topic selected as by the flat search."""
    _small_tree(monkeypatch, visit=1e9)
    Hkv, n, D = 2, 4096, 16
    keys, labels, centres = _planted(Hkv, n, D, 64, seed=24, spread=0.05, runs=True)
    idx = _index(keys, n, H=4, mass=0.5)
    C = idx.sizes.shape[1]
    q = centres[:, 7].repeat_interleave(2, 0)  # [H, D]
    tree = idx.search(q, 400)
    scored = idx.last_scored
    monkeypatch.setattr(ClusterIndex, "tree_from", 10**9)
    flat = idx.search(q, 400)
    assert scored < C // 2  # the supers and a few supers' clusters, where the cap's want is every cluster
    for h in range(Hkv):
        got = set(tree.ids[h, :tree.counts[h]].tolist())
        assert got == set(flat.ids[h, :flat.counts[h]].tolist())
        assert got and got <= set(torch.nonzero(labels[h] == 7).flatten().tolist())  # p0.5: part of the topic


@pytest.mark.parametrize("kernel,rows", [("c", 1), ("numba", 1), ("c", 2)])
def test_the_cpu_decode_merges_the_estimate_where_it_attends(tiny_models, monkeypatch, kernel, rows):
    """A bf16 decode with the cluster policy on the CPU: the gather merges each layer's estimate (the
    C kernel as it finishes, before rounding; numba's kernel's result merged in one compiled pass),
    add_estimate's merge after the attention is not called. Both give the logits of the plain-torch
    step (the generic forward, torch's gather and add_estimate's tensor merge) to bf16 rounding."""
    from test_decode_step import _decode_logits

    from offload.indexes import cluster
    from offload.kernels import cpu_attention

    if kernel == "c" and not cpu_attention.chosen():
        pytest.skip("the C kernels do not build here")
    folder, _ = tiny_models["llama"]
    prompts = [[(7 * i + 3 + r) % 290 + 3 for i in range(300 - 40 * r)] for r in range(rows)]  # rows of two lengths
    monkeypatch.setenv(cpu_attention.KERNEL_ENV, kernel)
    cpu_attention.chosen.cache_clear()
    try:
        llm = LLM(folder, dtype="bfloat16", max_context=320, kv_policy="cluster", kv_budget=0.1, dense_layers=1,
                  sink=4, window=16, verbose=False)
        merges_after = []  # add_estimate's compiled merges (after the attention; loading warmed it once)
        merge = cluster.merge_estimate
        monkeypatch.setattr(cluster, "merge_estimate", lambda *a: merges_after.append(1) or merge(*a))
        got = _decode_logits(llm, prompts, 4, bound=True)
        assert not merges_after
        llm.engine.backend.kernel_backend = "torch"
        want = _decode_logits(llm, prompts, 4, bound=False)
    finally:
        monkeypatch.delenv(cpu_attention.KERNEL_ENV)
        cpu_attention.chosen.cache_clear()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
