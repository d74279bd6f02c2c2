"""Every kernel against its plain-torch reference over a grid, and the references against dense attention.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest) in fp32; on a GPU the
same tests run the compiled kernels in fp32 and bf16. Outputs are poisoned with NaN first.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from offload.kernels import (
    dense_attention_ref,
    gather_attention,
    gather_attention_ref,
    merge_attention,
    merge_attention_ref,
    shadowkv_attention,
    shadowkv_attention_ref,
)
from offload.kernels.reference import dense_token_ids

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    from offload.kernels import triton_attention

    monkeypatch.setattr(triton_attention, "POISON", True)


def _selection(seq_lens, Hkv, S, sink, window, gen, full=False):
    """Random distinct ids outside the dense part, padded to S; returns (selected, num_selected)."""
    B = len(seq_lens)
    selected = torch.zeros(B, Hkv, S, dtype=torch.int32)
    counts = torch.zeros(B, Hkv, dtype=torch.int32)
    for b, n in enumerate(seq_lens.tolist()):
        dense_ids, valid = dense_token_ids(torch.tensor([n]), sink, window)
        dense = set(dense_ids[0][valid[0]].tolist())
        pool = torch.tensor([t for t in range(n) if t not in dense], dtype=torch.int32)
        for h in range(Hkv):
            take = len(pool) if full else min(S, len(pool), int(torch.randint(0, S + 1, (1,), generator=gen)))
            take = min(take, S)
            perm = pool[torch.randperm(len(pool), generator=gen)[:take]]
            selected[b, h, :take] = perm
            counts[b, h] = take
    return selected.to(DEVICE), counts.to(DEVICE)


def _close(a, b, dtype):
    assert not torch.isnan(a).any(), "unwritten (NaN-poisoned) or NaN output"
    err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    assert err < TOL[dtype] * max(1.0, b.float().abs().max().item()), err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("budget", [0, 16, 37])
def test_gather_attention_kernel_matches_reference(dtype, head_dim, group, budget):
    gen = torch.Generator().manual_seed(head_dim * 100 + group * 10 + budget)
    B, Hkv, N = 2, 2, 160
    H = Hkv * group
    seq_lens = torch.tensor([N, 97])
    sink, window = 4, 16
    q = torch.randn(B, H, head_dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, N, head_dim, generator=gen).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, N, head_dim, generator=gen).to(DEVICE, dtype)
    selected, counts = _selection(seq_lens, Hkv, max(budget, 1), sink, window, gen)
    if budget == 0:
        counts.zero_()
    args = (q, k, v, selected, counts, seq_lens.to(DEVICE))
    scale = 1 / math.sqrt(head_dim)
    out, lse = gather_attention(*args, scale=scale, sink=sink, window=window, backend="triton")
    ref_out, ref_lse = gather_attention_ref(*args, scale, sink, window)
    _close(out, ref_out, dtype)
    _close(lse, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_selection_and_no_dense_part(dtype):
    q = torch.randn(1, 4, 64).to(DEVICE, dtype)
    k = torch.randn(1, 1, 32, 64).to(DEVICE, dtype)
    sel = torch.zeros(1, 1, 8, dtype=torch.int32, device=DEVICE)
    counts = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    out, lse = gather_attention(q, k, k, sel, counts, torch.tensor([32], device=DEVICE), scale=0.125,
                                backend="triton")
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    ref_out, ref_lse = gather_attention_ref(q, k, k, sel, counts, torch.tensor([32], device=DEVICE), 0.125)
    assert torch.all(ref_out == 0) and torch.all(torch.isneginf(ref_lse))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("group", [1, 4])
def test_full_selection_equals_dense(backend, group):
    gen = torch.Generator().manual_seed(5)
    B, Hkv, N, D = 2, 2, 90, 64
    seq_lens = torch.tensor([N, 61])
    q = torch.randn(B, Hkv * group, D, generator=gen).to(DEVICE)
    k = torch.randn(B, Hkv, N, D, generator=gen).to(DEVICE)
    v = torch.randn(B, Hkv, N, D, generator=gen).to(DEVICE)
    selected, counts = _selection(seq_lens, Hkv, N, 4, 8, gen, full=True)
    out, lse = gather_attention(q, k, v, selected, counts, seq_lens.to(DEVICE), scale=D ** -0.5, sink=4, window=8,
                                backend=backend)
    dense_out, dense_lse = dense_attention_ref(q, k, v, seq_lens.to(DEVICE), D ** -0.5)
    _close(out, dense_out, torch.float32)
    _close(lse, dense_lse, torch.float32)


def test_reference_equals_dense_attention_restricted_to_ids():
    """The reference is exact: attention over the listed ids computed the long way round."""
    gen = torch.Generator().manual_seed(9)
    B, Hkv, G, N, D = 1, 2, 3, 200, 64
    q = torch.randn(B, Hkv * G, D, generator=gen)
    k = torch.randn(B, Hkv, N, D, generator=gen)
    v = torch.randn(B, Hkv, N, D, generator=gen)
    seq_lens = torch.tensor([N])
    selected, counts = _selection(seq_lens, Hkv, 30, 4, 8, gen)
    out, lse = gather_attention_ref(q, k, v, selected, counts, seq_lens, 0.125, 4, 8)
    dense_ids, valid = dense_token_ids(seq_lens, 4, 8)
    for h in range(Hkv):
        ids = torch.cat([dense_ids[0][valid[0]], selected[0, h, :counts[0, h]].long()])
        for g in range(G):
            scores = (k[0, h, ids] @ q[0, h * G + g]) * 0.125
            torch.testing.assert_close(lse[0, h * G + g], torch.logsumexp(scores, 0))
            torch.testing.assert_close(out[0, h * G + g], torch.softmax(scores, 0) @ v[0, h, ids])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("budget", [16, 37])
def test_shadowkv_kernel_matches_reference(dtype, head_dim, group, budget):
    gen = torch.Generator().manual_seed(head_dim + group + budget)
    B, Hkv, R = 2, 2, 24
    N = 131072  # positions up to the end of a 128K context: RoPE at its extremes
    H = Hkv * group
    q = torch.randn(B, H, head_dim, generator=gen).to(DEVICE, dtype)
    u = (torch.randn(B, N, R, generator=gen) / math.sqrt(R)).to(DEVICE, dtype)
    sv = torch.randn(B, R, Hkv * head_dim, generator=gen).to(DEVICE, dtype)
    v_sel = torch.randn(B, Hkv, budget, head_dim, generator=gen).to(DEVICE, dtype)
    selected = torch.cat([torch.randint(N - 64, N, (B, Hkv, budget // 2), generator=gen),
                          torch.randint(0, N, (B, Hkv, budget - budget // 2), generator=gen)], -1).int().to(DEVICE)
    counts = torch.tensor([[budget, budget - 5], [0, budget]], dtype=torch.int32, device=DEVICE)
    from offload.config import preset
    from offload.rope import rope_frequencies

    inv_freq, scaling = rope_frequencies(preset("llama-3.1-8b").replace(head_dim=head_dim))
    args = (q, u, sv, v_sel, selected, counts, inv_freq.to(DEVICE))
    out, lse = shadowkv_attention(*args, scale=head_dim ** -0.5, attention_scaling=scaling, backend="triton")
    ref_out, ref_lse = shadowkv_attention_ref(*args, head_dim ** -0.5, scaling)
    _close(out, ref_out, dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    _close(lse[finite], ref_lse[finite], dtype)


def test_shadowkv_reference_equals_attention_over_rebuilt_keys():
    """Keys rebuilt from exact factors of real keys give the same attention as the keys themselves."""
    from offload.kernels import rope_rotate

    gen = torch.Generator().manual_seed(3)
    B, Hkv, G, N, D = 1, 2, 2, 300, 64
    keys_pre = torch.randn(B, N, Hkv * D, generator=gen, dtype=torch.float64)
    U, S_, Vh = torch.linalg.svd(keys_pre[0], full_matrices=False)  # exact, full rank
    u, sv = (U * S_)[None].float(), Vh[None].float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    keys = rope_rotate(keys_pre.float().view(B, N, Hkv, D).transpose(1, 2), torch.arange(N), inv_freq)
    values = torch.randn(B, Hkv, N, D, generator=gen)
    q = torch.randn(B, Hkv * G, D, generator=gen)
    selected = torch.randperm(N, generator=gen)[:40].int().view(1, 1, 40).repeat(1, Hkv, 1)
    counts = torch.full((1, Hkv), 40, dtype=torch.int32)
    v_sel = torch.gather(values, 2, selected.long()[..., None].expand(-1, -1, -1, D))
    out, lse = shadowkv_attention_ref(q, u, sv, v_sel, selected, counts, inv_freq, D ** -0.5)
    ref_out, ref_lse = gather_attention_ref(q, keys, values, selected, counts, torch.tensor([N]), D ** -0.5)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("parts", [2, 3, 5])
def test_merge_equals_attention_over_the_union(backend, parts):
    gen = torch.Generator().manual_seed(parts)
    B, Hkv, G, N, D = 2, 2, 4, 120, 64
    q = torch.randn(B, Hkv * G, D, generator=gen).to(DEVICE)
    k = torch.randn(B, Hkv, N, D, generator=gen).to(DEVICE)
    v = torch.randn(B, Hkv, N, D, generator=gen).to(DEVICE)
    seq_lens = torch.full((B,), N, device=DEVICE)
    perm = torch.randperm(N, generator=gen)
    chunks = list(torch.tensor_split(perm, parts)) + [perm[:0]]  # an empty part (lse = -inf) must not disturb
    outs, lses = [], []
    for c in chunks:
        sel = c.int().view(1, 1, -1).repeat(B, Hkv, 1).to(DEVICE)
        if sel.shape[-1] == 0:
            sel = torch.zeros(B, Hkv, 1, dtype=torch.int32, device=DEVICE)
        counts = torch.full((B, Hkv), len(c), dtype=torch.int32, device=DEVICE)
        o, l_ = gather_attention_ref(q, k, v, sel, counts, seq_lens, 0.125)
        part_device = torch.device("cpu") if len(outs) == 0 else DEVICE  # one part computed on the CPU
        outs.append(o.to(part_device))
        lses.append(l_.to(part_device))
    out, lse = merge_attention(outs, lses, backend=backend)
    ref_out, ref_lse = dense_attention_ref(q, k, v, seq_lens, 0.125)
    _close(out, ref_out, torch.float32)
    _close(lse, ref_lse, torch.float32)
    mo, ml = merge_attention_ref(torch.stack([o.to(DEVICE) for o in outs]), torch.stack([x.to(DEVICE) for x in lses]))
    _close(mo, ref_out, torch.float32)


def test_bad_shapes_are_rejected_before_launch():
    q = torch.randn(1, 6, 64)
    k = torch.randn(1, 4, 32, 64)
    sel = torch.zeros(1, 4, 8, dtype=torch.int32)
    counts = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple"):
        gather_attention(q, k, k, sel, counts, torch.tensor([32]), scale=0.1)
    with pytest.raises(ValueError, match="int32"):
        gather_attention(torch.randn(1, 8, 64), k, k, sel.float(), counts, torch.tensor([32]), scale=0.1)
    with pytest.raises(ValueError, match="selected must be"):
        gather_attention(torch.randn(1, 8, 64), k, k, sel[:, :2], counts, torch.tensor([32]), scale=0.1)


def test_auto_backend_on_cpu_is_numba_for_bf16_and_fp32_caches_else_torch():
    from offload.kernels import last_backend

    q = torch.randn(1, 4, 64)
    k = torch.randn(1, 2, 16, 64)
    args = (torch.zeros(1, 2, 1, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32), torch.tensor([16]))
    gather_attention(q, k, k, *args, scale=0.125, sink=2, window=4)
    assert last_backend() == "numba"
    gather_attention(q.half(), k.half(), k.half(), *args, scale=0.125, sink=2, window=4)
    assert last_backend() == "torch"
    with pytest.raises(ValueError, match="numba gather reads int8, bf16 or fp32"):
        gather_attention(q.half(), k.half(), k.half(), *args, scale=0.125, backend="numba")


@pytest.mark.parametrize("cache", ["f32", "bf16", "int8-f32-scale", "int8-bf16-scale"])
@pytest.mark.parametrize("B,Hkv,group,D,N,S", [(2, 2, 4, 64, 160, 37), (1, 8, 4, 64, 3000, 700),
                                               (3, 3, 3, 128, 600, 0), (2, 1, 7, 64, 100, 60)])
def test_numba_gather_matches_reference(cache, B, Hkv, group, D, N, S):
    """The numba CPU gather (rows read where they lie in the cache, never copied; int8 codes by
    their scales) against the torch reference: sinks, window and selections of unequal length,
    short rows whose dense part has holes, an empty selection; entries no list names are
    poisoned, so reading one shows."""
    from offload.kernels import last_backend
    from offload.tiers.kv_codec import quantize_kv

    gen = torch.Generator().manual_seed(B * 1000 + N + S)
    seq_lens = torch.tensor([N, 97, 9][:B])
    sink, window = 4, 64
    dtype = torch.bfloat16 if cache == "bf16" else torch.float32  # q's (and a float cache's)
    q = torch.randn(B, Hkv * group, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=gen) * 2
    v = torch.randn(B, Hkv, N, D, generator=gen)
    scales = {}
    if cache.startswith("int8"):
        scale_dtype = torch.float32 if cache == "int8-f32-scale" else torch.bfloat16
        (k, ks), (v, vs) = (quantize_kv(t, scale_dtype) for t in (k, v))  # codes, [B, Hkv, N, 1]
        scales = {"k_scale": ks[..., 0], "v_scale": vs[..., 0]}
    else:
        k, v = k.to(dtype), v.to(dtype)
    selected, counts = _selection(seq_lens, Hkv, max(S, 1), sink, window, gen)
    if S == 0:
        counts.zero_()
    want, want_lse = gather_attention_ref(q, k, v, selected, counts, seq_lens, D ** -0.5, sink, window, **scales)
    named = torch.zeros(B, Hkv, N, dtype=torch.bool)  # [B, Hkv, N] tokens some list names
    for b, n in enumerate(seq_lens.tolist()):
        dense_ids, valid = dense_token_ids(torch.tensor([n]), sink, window)
        named[b, :, dense_ids[0][valid[0]]] = True
        for h in range(Hkv):
            named[b, h, selected[b, h, :counts[b, h]].long()] = True
    if scales:
        k[~named], v[~named] = 127, 127
        scales["k_scale"][~named], scales["v_scale"][~named] = float("nan"), float("nan")
    else:
        k[~named], v[~named] = float("nan"), float("nan")
    got, lse = gather_attention(q, k, v, selected, counts, seq_lens, scale=D ** -0.5, sink=sink, window=window,
                                **scales)
    assert last_backend() == "numba"
    tol = 2e-5 if dtype == torch.float32 else 2e-2  # bf16: the output's own rounding
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    assert torch.allclose(lse, want_lse, atol=2e-5, rtol=2e-5)
    from offload.kernels import CacheArrays  # a KV store's numpy views, made once: the same numbers

    arrays = CacheArrays(k, v, scales.get("k_scale"), scales.get("v_scale"))
    got_arrays, _ = gather_attention(q, k, v, selected, counts, seq_lens, scale=D ** -0.5, sink=sink,
                                     window=window, arrays=arrays, **scales)
    assert torch.equal(got_arrays, got)
    # the decode step's form: the step's dense id lists made once, the views checked alone
    from offload.kernels.api import dense_id_lists

    dense = dense_id_lists(tuple(seq_lens.tolist()), sink, window)  # [B, Nd]
    got_lists, lse_lists = arrays.gather(q, dense, selected.to(torch.int32).numpy(), counts.numpy(), D ** -0.5)
    from offload.kernels import cpu_attention

    if dtype == torch.bfloat16 and cpu_attention.takes(arrays.k, q.shape[1]):  # the C kernel: the same to rounding
        assert (got_lists.float() - got.float()).abs().max().item() <= 8e-3 * max(1.0, got.float().abs().max().item())
        assert torch.allclose(lse_lists, lse, atol=2e-5, rtol=2e-5)
    else:  # numba's kernel: the very numbers
        assert torch.equal(got_lists, got) and torch.equal(lse_lists, lse)
    with pytest.raises(ValueError, match="gather needs CPU q"):
        arrays.gather(q, dense, selected.long().numpy(), counts.numpy(), D ** -0.5)  # int64 ids: named, not misread


def test_numba_gather_names_an_id_past_the_cache_in_one_line():
    q, k = torch.randn(1, 4, 64), torch.randn(1, 2, 16, 64)
    sel = torch.tensor([[[3, 99], [5, 6]]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"1 selected token id\(s\) lie past the cache's 16 tokens"):
        gather_attention(q, k, k, sel, torch.tensor([[2, 2]]), torch.tensor([16]), scale=0.125, sink=2, window=4)
    out, _ = gather_attention(q, k, k, sel, torch.tensor([[1, 2]]), torch.tensor([16]), scale=0.125, sink=2,
                              window=4)  # past the count: never read
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("cache", ["int8-f32-scale", "int8-bf16-scale", "bf16", "f32"])
@pytest.mark.parametrize("B,H,Hkv,D,cap", [(1, 9, 3, 64, 700), (2, 8, 8, 128, 300), (3, 32, 8, 64, 1100)])
def test_kv_decode_kernels_match_the_widening_reference(cache, B, H, Hkv, D, cap):
    """The numba CPU kernels (int8 codes x scale, bf16 bits, fp32; never a widened copy of the
    cache) against the torch reference over shapes, cache kinds and visible ranges of unequal rows,
    long enough to be split across tasks and blocks and merged; the log-sum-exp too. They read only
    lo..hi: poisoned entries outside it change nothing."""
    from offload.kernels import kv_decode_attention, kv_decode_attention_ref, last_backend
    from offload.tiers.kv_codec import quantize_kv

    g = torch.Generator().manual_seed(B * 100 + H)
    keys = torch.randn(B, Hkv, cap, D, generator=g) * 2  # [B, Hkv, N, D]
    values = torch.randn(B, Hkv, cap, D, generator=g)
    if cache.startswith("int8"):
        scale_dtype = torch.float32 if cache == "int8-f32-scale" else torch.bfloat16
        (k, ks), (v, vs) = (quantize_kv(t, scale_dtype) for t in (keys, values))  # codes, [B, Hkv, N, 1]
        scales = {"k_scale": ks[..., 0], "v_scale": vs[..., 0]}
    else:
        dtype = torch.bfloat16 if cache == "bf16" else torch.float32
        k, v, scales = keys.to(dtype), values.to(dtype), {}
    q = torch.randn(B, H, D, generator=g) * 2  # [B, H, D]
    lo = [0, 5, 37][:B]
    hi = [cap - 3, cap // 2, 40][:B]
    want, want_lse = kv_decode_attention_ref(q, k, v, torch.tensor(lo), torch.tensor(hi), D ** -0.5, **scales)
    poison = 127 if k.dtype == torch.int8 else float("nan")
    for b in range(B):  # what no row sees may hold anything
        k[b, :, :lo[b]], k[b, :, hi[b]:], v[b, :, hi[b]:] = poison, poison, poison
        if scales:
            scales["k_scale"][b, :, hi[b]:] = float("nan")
    got, lse = kv_decode_attention(q, k, v, lo, hi, scale=D ** -0.5, **scales)
    assert last_backend() == "numba"
    assert got.shape == (B, H, D) and lse.shape == (B, H)
    assert torch.allclose(got, want, atol=2e-5, rtol=2e-5)
    assert torch.allclose(lse, want_lse, atol=2e-5, rtol=2e-5)
    got_bf16, _ = kv_decode_attention(q.bfloat16(), k, v, lo, hi, scale=D ** -0.5, **scales)
    assert got_bf16.dtype == torch.bfloat16 and torch.allclose(got_bf16.float(), want, atol=2e-2, rtol=2e-2)
    # the numpy views a KV store makes once: the same numbers, also from a cache with more rows
    from offload.kernels import CacheArrays

    arrays = CacheArrays(k, v, scales.get("k_scale"), scales.get("v_scale"))
    got_arrays, _ = kv_decode_attention(q, k, v, lo, hi, scale=D ** -0.5, arrays=arrays, **scales)
    assert torch.equal(got_arrays, got)
    got_first, _ = kv_decode_attention(q[:1], k[:1], v[:1], lo[:1], hi[:1], scale=D ** -0.5, arrays=arrays,
                                       **{name: t[:1] for name, t in scales.items()})
    assert torch.equal(got_first, got[:1])
    # the form a decode step uses: ranges worked out once for every layer, each layer's views
    from offload.kernels import DecodeRanges

    got_step, step_lse = arrays.attend(q, DecodeRanges(lo, hi, Hkv, cap), D ** -0.5)
    assert torch.equal(got_step, got) and torch.equal(step_lse, lse)
    with pytest.raises(ValueError, match="attend needs CPU q"):  # ranges of another cache
        arrays.attend(q, DecodeRanges(lo, hi, Hkv, cap - 1), D ** -0.5)
    other = CacheArrays(k.clone(), v, scales.get("k_scale"), scales.get("v_scale"))
    with pytest.raises(ValueError, match="arrays= must be the numpy views of the cache"):
        kv_decode_attention(q, k, v, lo, hi, scale=D ** -0.5, arrays=other, **scales)
    with pytest.raises(ValueError, match="cache arrays need CPU k/v"):
        CacheArrays(k, v.to(torch.float16 if k.dtype != torch.float16 else torch.float32))


def test_kv_decode_kernel_rejects_bad_input_in_one_line():
    from offload.kernels import kv_decode_attention

    kc = torch.zeros(1, 2, 10, 16, dtype=torch.int8)
    ks = torch.ones(1, 2, 10)
    q = torch.zeros(1, 4, 16)
    with pytest.raises(ValueError, match="visible ranges"):
        kv_decode_attention(q, kc, kc, [3], [3], scale=1.0, k_scale=ks, v_scale=ks)
    with pytest.raises(ValueError, match="visible ranges"):
        kv_decode_attention(q, kc, kc, [0], [11], scale=1.0, k_scale=ks, v_scale=ks)
    with pytest.raises(ValueError, match="int8 codes, bf16 or fp32"):
        kv_decode_attention(q, kc.half(), kc.half(), [0], [5], scale=1.0)
    with pytest.raises(ValueError, match="needs k_scale"):
        kv_decode_attention(q, kc, kc, [0], [5], scale=1.0)
    with pytest.raises(ValueError, match="needs k_scale"):
        kv_decode_attention(q, kc.float(), kc.float(), [0], [5], scale=1.0, k_scale=ks, v_scale=ks)
    with pytest.raises(ValueError, match="needs q"):
        kv_decode_attention(torch.zeros(1, 3, 16), kc, kc, [0], [5], scale=1.0, k_scale=ks, v_scale=ks)


def test_kv_decode_widening_plain_form_matches_torch():
    """The plain-numpy form of the kernel's row widening (what numba's per-dtype forms implement)
    gives torch's own widening: int8 code x scale (fp32, or bf16 read as its bits), bf16 bits
    exactly, fp32 as is."""
    from offload.kernels.cpu_decode import _widen_row

    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 4, 16, generator=g)  # [B, Hkv, N, D]
    scale = torch.rand(1, 2, 4, generator=g) + 0.5  # [B, Hkv, N]
    codes = (x * 40).round().clamp(-127, 127).to(torch.int8)
    row_bits = np.empty(16, np.uint32)
    row = row_bits.view(np.float32)
    cases = [(codes.numpy(), scale.numpy(), (codes.float() * scale[..., None])[0, 1, 3]),
             (codes.numpy(), scale.bfloat16().view(torch.uint16).numpy(),
              (codes.float() * scale.bfloat16().float()[..., None])[0, 1, 3]),
             (x.bfloat16().view(torch.uint16).numpy(), scale.numpy(), x.bfloat16().float()[0, 1, 3]),
             (x.numpy(), scale.numpy(), x[0, 1, 3])]
    for cache, scales, want in cases:
        _widen_row(cache, scales, 0, 1, 3, row, row_bits)
        assert torch.equal(torch.from_numpy(row.copy()), want)


def test_vectorized_exp_matches_numpy_within_fp32_rounding():
    """The kernels' exp (range reduced by ln 2, a Taylor series, 2^k in the exponent bits) over a
    softmax's inputs (scores minus their max, <= 0): relative error ~1e-7 where exp stays in fp32's
    normal range, and what underflows is at most exp(-87) ~ 1.6e-38, nothing a softmax sum can see."""
    from offload.kernels.cpu_decode import EXP_FLOOR, exp_inplace

    x = np.concatenate([-np.linspace(0, 86.9, 5000), -np.random.default_rng(0).exponential(3, 5000),
                        [0.0, -1e-7, -87.0, -100.0, -3e38]]).astype(np.float32)
    want = np.exp(x.astype(np.float64))
    got = x.copy()
    exp_inplace(got, np.empty(len(x), np.int32), len(x))
    normal = x > EXP_FLOOR
    assert np.max(np.abs(got[normal] - want[normal]) / want[normal]) < 3e-7
    assert np.all(got[~normal] <= 2e-38) and np.all(got >= 0) and got[-5] == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_cpu_parts_merge_in_one_compiled_pass(dtype):
    """merge_attention of two CPU parts (the prefill's merge) goes through the numba kernel and gives
    the torch reference's result: rows where one part or both saw no key (lse -inf) included."""
    from offload.kernels import api

    gen = torch.Generator().manual_seed(3)
    B, H, D = 5, 7, 64
    outs = [torch.randn(B, H, D, generator=gen).to(dtype) for _ in range(2)]
    outs[1] = outs[1].transpose(0, 1).contiguous().transpose(0, 1)  # strided, as a prefill's parts are
    lses = [torch.randn(B, H, generator=gen) * 4 for _ in range(2)]
    lses[1] = lses[1].t().contiguous().t()
    lses[0][0, 1] = float("-inf")  # only the second part saw keys
    lses[1][2, 3] = float("-inf")  # only the first
    lses[0][4, 0] = lses[1][4, 0] = float("-inf")  # neither
    outs[0][4, 0] = outs[1][4, 0] = 0.0  # what an attention over no key gives
    assert api._merges_in_one_pass(outs, lses)
    out, lse = merge_attention(outs, lses)
    ref_out, ref_lse = merge_attention_ref(torch.stack(outs), torch.stack(lses))
    assert out.dtype == dtype and out.shape == (B, H, D)
    _close(out, ref_out, dtype)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    _close(lse[seen], ref_lse[seen], torch.float32)
    assert torch.equal(out[0, 1], outs[1][0, 1]) and torch.equal(out[2, 3], outs[0][2, 3])
    assert lse[4, 0] == float("-inf") and not out[4, 0].any()
