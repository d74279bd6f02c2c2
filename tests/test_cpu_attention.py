"""The C decode-attention kernel (kernels/cpu_attention.c) on bf16 caches against the plain-torch
reference over a grid of heads, query groups, head dims, rows and visible ranges; the new token's
store fused into the call; refusals and the fallback to numba's kernel."""

from __future__ import annotations

import pytest
import torch

from offload.attention import ForwardBatch
from offload.kernels import cbuild, cpu_attention, kv_decode_attention_ref
from offload.kernels.api import CacheArrays, DecodeRanges

needs_kernel = pytest.mark.skipif(not cpu_attention.chosen(), reason="the C kernels do not build here")


def _cache(B: int, Hkv: int, N: int, D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(B, Hkv, N, D, generator=g) * 2).to(torch.bfloat16)  # [B, Hkv, N, D]
    v = torch.randn(B, Hkv, N, D, generator=g).to(torch.bfloat16)
    return k, v


@needs_kernel
@pytest.mark.parametrize("H,Hkv", [(9, 3), (8, 8), (28, 4), (32, 2)])  # groups of 3, 1, 7 and 16 queries
@pytest.mark.parametrize("D", [16, 64, 128, 256])
@pytest.mark.parametrize("B,N,lo,hi", [(1, 600, [0], [531]), (3, 300, [0, 5, 37], [297, 150, 40]), (2, 40, [3, 0], [4, 40])])
def test_c_kernel_matches_the_reference_and_reads_only_the_visible_tokens(H, Hkv, D, B, N, lo, hi):
    """Ranges of one token, of a block's remainder and of several splits; everything outside them
    NaN (never read); out to bf16 rounding, the log-sum-exp to fp32's."""
    k, v = _cache(B, Hkv, N, D, seed=H * D + N)
    q = (torch.randn(B, H, D, generator=torch.Generator().manual_seed(B)) * 2).to(torch.bfloat16)  # [B, H, D]
    want, want_lse = kv_decode_attention_ref(q.float(), k.float(), v.float(), torch.tensor(lo), torch.tensor(hi), D ** -0.5)
    for b in range(B):  # what no row sees may hold anything
        k[b, :, :lo[b]], k[b, :, hi[b]:], v[b, :, :lo[b]], v[b, :, hi[b]:] = (float("nan"),) * 4
    got, lse = CacheArrays(k, v).attend(q, DecodeRanges(lo, hi, Hkv, N), D ** -0.5)
    assert got.shape == (B, H, D) and got.dtype == torch.bfloat16 and lse.shape == (B, H)
    assert (got.float() - want).abs().max().item() <= 8e-3 * max(1.0, want.abs().max().item())
    assert torch.allclose(lse, want_lse, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_the_store_lands_before_the_read_and_a_position_outside_raises():
    """store_and_attend writes the step's key and value at each row's position and attends them (the
    same as storing with torch, then attending); a position past the cache raises and writes nothing."""
    B, H, Hkv, N, D = 2, 9, 3, 64, 64
    k, v = _cache(B, Hkv, N, D, seed=1)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, H, D, generator=g).to(torch.bfloat16)
    k_new = torch.randn(B, Hkv, 1, D, generator=g).to(torch.bfloat16)  # [B, Hkv, 1, D]
    v_new = torch.randn(B, Hkv, 1, D, generator=g).to(torch.bfloat16)
    lengths = [20, 33]
    batch = ForwardBatch.decode(lengths, torch.device("cpu"))
    want_k, want_v = k.clone(), v.clone()
    for b, n in enumerate(lengths):
        want_k[b, :, n], want_v[b, :, n] = k_new[b, :, 0], v_new[b, :, 0]
    ranges = DecodeRanges([0, 0], [n + 1 for n in lengths], Hkv, N)
    arrays = CacheArrays(k, v)
    got, lse = arrays.store_and_attend(q, k_new, v_new, batch, ranges, D ** -0.5)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    want, want_lse = kv_decode_attention_ref(q.float(), want_k.float(), want_v.float(), torch.tensor([0, 0]),
                                             torch.tensor(ranges.hi[:, 0]), D ** -0.5)
    assert (got.float() - want).abs().max().item() <= 8e-3 and torch.allclose(lse, want_lse, atol=1e-5)
    before = k.clone()
    with pytest.raises(ValueError, match="lie outside the cache"):
        arrays.store_and_attend(q, k_new, v_new, ForwardBatch.decode([N, 3], torch.device("cpu")), ranges, D ** -0.5)
    assert torch.equal(k, before)


@needs_kernel
def test_a_nan_reaches_the_output():
    """A NaN in a visible key gives NaN outputs for its KV head's queries (the engine's check then
    reports it), never a silently finite answer; the other heads stay finite."""
    k, v = _cache(1, 3, 200, 64, seed=3)
    k[0, 1, 150, 7] = float("nan")
    q = torch.randn(1, 9, 64).to(torch.bfloat16)
    got, _ = CacheArrays(k, v).attend(q, DecodeRanges([0], [200], 3, 200), 0.125)
    assert got[0, 3:6].isnan().all() and got[0, :3].isfinite().all() and got[0, 6:].isfinite().all()


def test_shapes_the_kernel_does_not_take_go_to_numba(monkeypatch):
    """A head_dim off its multiple of 16, a group past 16 queries, an fp32 cache, or
    OFFLOAD_DECODE_ATTENTION=numba: numba's kernel answers, with the same numbers."""
    k, v = _cache(1, 2, 50, 64, seed=4)
    assert not cpu_attention.takes(CacheArrays(k, v).k, 34)  # 17 queries a KV head
    assert not cpu_attention.takes(CacheArrays(k[..., :40].contiguous(), v[..., :40].contiguous()).k, 4)
    assert not cpu_attention.takes(CacheArrays(k.float(), v.float()).k, 4)
    q = torch.randn(1, 4, 64).to(torch.bfloat16)
    ranges = DecodeRanges([0], [50], 2, 50)
    c_out, c_lse = CacheArrays(k, v).attend(q, ranges, 0.125)
    monkeypatch.setenv(cpu_attention.KERNEL_ENV, "numba")
    cpu_attention.chosen.cache_clear()
    try:
        assert not cpu_attention.chosen()
        numba_out, numba_lse = CacheArrays(k, v).attend(q, ranges, 0.125)
    finally:
        monkeypatch.delenv(cpu_attention.KERNEL_ENV)
        cpu_attention.chosen.cache_clear()
    assert (c_out.float() - numba_out.float()).abs().max().item() <= 8e-3 and torch.allclose(c_lse, numba_lse, atol=1e-5)
    assert cpu_attention.chosen() == (cbuild.library() is not None)


@needs_kernel
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (32, 8, 128), (4, 4, 16)])
def test_the_gather_attends_the_listed_tokens_as_numba_does(H, Hkv, D):
    """A sparse policy's lists (sinks and window shared by the heads, -1 where a short row has no
    such token, then each head's own selection and count): the C kernel against numba's over the
    same lists, and against the reference over the tokens gathered by hand; an id past the cache
    raises."""
    from offload.kernels.api import _attend_lists

    B, N = 2, 300
    k, v = _cache(B, Hkv, N, D, seed=H + D)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, D, generator=g).to(torch.bfloat16)
    dense = torch.tensor([[0, 1, 290, 291, 292], [0, 1, -1, 40, 41]], dtype=torch.int32).numpy()  # [B, Nd]
    selected = torch.randint(2, 280, (B, Hkv, 70), generator=g, dtype=torch.int32).numpy()  # [B, Hkv, S]
    counts = torch.randint(1, 71, (B, Hkv), generator=g, dtype=torch.int32).numpy()  # [B, Hkv]
    arrays = CacheArrays(k, v)
    got, lse = arrays.gather(q, dense, selected, counts, D ** -0.5)
    numba_out, numba_lse = _attend_lists(q, arrays.parts, dense, selected, counts, D ** -0.5)
    assert (got.float() - numba_out.float()).abs().max().item() <= 8e-3 and torch.allclose(lse, numba_lse, atol=1e-5)
    G = H // Hkv
    for b in range(B):
        for h in range(Hkv):
            ids = [t for t in dense[b].tolist() if t >= 0] + selected[b, h, :counts[b, h]].tolist()
            ids = torch.tensor(ids)
            want, want_lse = kv_decode_attention_ref(q[b:b + 1, h * G:(h + 1) * G].float(), k[b:b + 1, h:h + 1, ids].float(),
                                                     v[b:b + 1, h:h + 1, ids].float(), torch.tensor([0]),
                                                     torch.tensor([len(ids)]), D ** -0.5)
            assert (got[b, h * G:(h + 1) * G].float() - want[0]).abs().max().item() <= 8e-3
            assert torch.allclose(lse[b, h * G:(h + 1) * G], want_lse[0], atol=1e-5)
    selected[1, 0, 0] = N  # one id past the cache
    counts[1, 0] = max(1, counts[1, 0])
    with pytest.raises(ValueError, match="lie outside the cache's 2 rows of 300 tokens"):
        arrays.gather(q, dense, selected, counts, D ** -0.5)


@pytest.mark.parametrize("kernel", ["c", "numba"])
def test_the_gather_merges_an_estimate_as_the_reference_merges_two_parts(kernel, monkeypatch):
    """A cluster index's estimate of what its selection left out (out, lse per query; -inf: none for
    that query) merged by the gather: the exact part over the lists and the estimate merged by the
    plain-torch log-sum-exp merge, to bf16 rounding; a query without an estimate keeps its exact
    part; a NaN estimate reaches the output; an estimate of the wrong shape is refused in one line."""
    from offload.kernels.reference import merge_attention_ref

    if kernel == "c" and not cpu_attention.chosen():
        pytest.skip("the C kernels do not build here")
    monkeypatch.setenv(cpu_attention.KERNEL_ENV, kernel)
    cpu_attention.chosen.cache_clear()
    try:
        B, H, Hkv, D, N = 2, 9, 3, 64, 200
        k, v = _cache(B, Hkv, N, D, seed=11)
        g = torch.Generator().manual_seed(12)
        q = torch.randn(B, H, D, generator=g).to(torch.bfloat16)
        dense = torch.tensor([[0, 1, 190, 191], [0, 1, 120, 121]], dtype=torch.int32).numpy()  # [B, Nd]
        selected = torch.randint(2, 110, (B, Hkv, 30), generator=g, dtype=torch.int32).numpy()  # [B, Hkv, S]
        counts = torch.full((B, Hkv), 30, dtype=torch.int32).numpy()  # [B, Hkv]
        est_out = torch.randn(B, H, D, generator=g)  # [B, H, D]
        est_lse = torch.randn(B, H, generator=g) * 3 + 2  # [B, H]
        est_lse[1, 4] = float("-inf")  # this query has nothing estimated
        arrays = CacheArrays(k, v)
        exact, exact_lse = arrays.gather(q, dense, selected, counts, D ** -0.5)
        got, lse = arrays.gather(q, dense, selected, counts, D ** -0.5, (est_out.numpy(), est_lse.numpy()))
        want, want_lse = merge_attention_ref(torch.stack([exact.float(), est_out]), torch.stack([exact_lse, est_lse]))
        assert (got.float() - want.float()).abs().max().item() <= 1.6e-2
        assert torch.allclose(lse, want_lse, atol=1e-4)
        assert torch.equal(got[1, 4], exact[1, 4]) and lse[1, 4].item() == pytest.approx(exact_lse[1, 4].item(), abs=1e-6)
        est_lse[0, 2] = float("nan")
        nan_out, nan_lse = arrays.gather(q, dense, selected, counts, D ** -0.5, (est_out.numpy(), est_lse.numpy()))
        assert nan_out[0, 2].isnan().all() and nan_lse[0, 2].isnan() and nan_out[0, 3].isfinite().all()
        with pytest.raises(ValueError, match="gather's estimate needs C-contiguous fp32"):
            arrays.gather(q, dense, selected, counts, D ** -0.5, (est_out[:, :3].numpy(), est_lse.numpy()))
    finally:
        monkeypatch.delenv(cpu_attention.KERNEL_ENV)
        cpu_attention.chosen.cache_clear()


def test_the_benchmark_writes_its_table_json_and_plot(tmp_path):
    """`python -m offload.profiles.bench_cpu_decode`: numba's and (where built) the C kernels on the
    default model's attention (dense and a sparse list) and int8 products; JSON and PNG written
    (speeds are recorded in BENCHMARKS.md, not asserted)."""
    import json

    from offload.profiles.bench_cpu_decode import main

    out = tmp_path / "decode.json"
    assert main(["--models", "135M", "--contexts", "32", "600", "--rounds", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["case"], r["context"]) for r in results] == [
        ("135M attention dense", 32), ("135M attention sparse 3%", 32), ("135M attention dense", 600),
        ("135M attention sparse 3%", 600), ("int8 product 135M LM head", None)]
    assert all(r["numba_ms"] > 0 for r in results)
    if cpu_attention.chosen():
        assert all(r["c_ms"] > 0 and r["speedup"] > 0 for r in results)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
