"""The fused row kernels of a CPU decode step (offload.kernels.row_ops) against torch's ops, over a
grid of dtypes and shapes; the model with them against the model without; the compiled KV store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from offload.kernels import CacheArrays, row_ops, store_kv
from offload.rope import RotaryEmbedding

BF16_ULP = 2.0 ** -7  # relative spacing of bf16 near 1


def _close_to_torch(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16: equal but for the rare element a reordered fp32 sum rounds across a bf16 boundary (one
    bf16 step); fp32: within the reordering's rounding."""
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.float(), want.float()
    if got.dtype == torch.bfloat16:
        assert (got == want).float().mean() >= 0.99
        assert torch.all((g - w).abs() <= BF16_ULP * w.abs() + 1e-30)
    else:
        torch.testing.assert_close(g, w, rtol=2e-6, atol=1e-6)


def _norm_ref(x, w, eps):
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 1, 64), (2, 5, 100), (64, 96)])
def test_rms_norm_and_add_norm_match_torch(dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    r = torch.randn(shape, generator=gen).to(dtype)
    w = torch.randn(shape[-1], generator=gen).to(dtype)
    _close_to_torch(row_ops.rms_norm(x, w, 1e-5), _norm_ref(x, w, 1e-5))
    summed, normed = row_ops.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(summed, x + r)  # the residual add rounds exactly as torch's
    _close_to_torch(normed, _norm_ref(x + r, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,T,H,Hkv,D", [(1, 1, 9, 3, 64), (3, 2, 4, 2, 16), (2, 4, 8, 8, 128)])
def test_rope_split_matches_the_split_and_rotate_half(dtype, B, T, H, Hkv, D):
    gen = torch.Generator().manual_seed(B * 100 + D)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=gen).to(dtype)
    angles = torch.rand(B, 1, T, D, generator=gen) * 50
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, Hkv, D).transpose(1, 2)
    v = v.view(B, T, Hkv, D).transpose(1, 2)
    got_q, got_k, got_v = row_ops.rope_split(qkv, cos, sin, H, Hkv, D)
    # every product and sum rounded where torch rounds it: bit for bit
    assert torch.equal(got_q, RotaryEmbedding.apply(q, cos, sin))
    assert torch.equal(got_k, RotaryEmbedding.apply(k, cos, sin))
    assert torch.equal(got_v, v) and got_v.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 3072), (5, 2, 64), (64, 10)])
def test_silu_gate_matches_torch(dtype, shape):
    gen = torch.Generator().manual_seed(shape[-1])
    gate_up = (torch.randn(shape, generator=gen) * 6).to(dtype)
    gate, up = gate_up.split(shape[-1] // 2, dim=-1)
    _close_to_torch(row_ops.silu_mul(gate_up), F.silu(gate) * up)


def test_row_ops_keep_nan_and_reject_what_they_do_not_take():
    x = torch.randn(2, 64).bfloat16()
    x[1, 3] = float("nan")
    out = row_ops.rms_norm(x, torch.ones(64).bfloat16(), 1e-5)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()  # never a silent number
    gate_up = torch.randn(1, 8).bfloat16()
    gate_up[0, 0] = float("nan")
    assert torch.isnan(row_ops.silu_mul(gate_up)[0, 0])
    assert row_ops.row_ops_apply(torch.randn(64, 8).bfloat16())
    assert not row_ops.row_ops_apply(torch.randn(65, 8).bfloat16())  # a long prompt keeps torch's ops
    assert not row_ops.row_ops_apply(torch.randn(2, 8))  # and an fp32 model (its path matches transformers')
    assert not row_ops.row_ops_apply(torch.randn(2, 8).half())
    with pytest.raises(ValueError, match="at most 64 tokens in bf16 or fp32"):
        row_ops.rms_norm(torch.randn(2, 8).half(), torch.ones(8).half(), 1e-5)
    with pytest.raises(ValueError, match="a contiguous weight"):
        row_ops.rms_norm(torch.randn(2, 8), torch.ones(9), 1e-5)
    with pytest.raises(ValueError, match=r"rope_split needs CPU qkv \[B, T, \(H \+ 2 Hkv\) D\]"):
        row_ops.rope_split(torch.randn(1, 1, 100), torch.ones(1, 1, 1, 8), torch.ones(1, 1, 1, 8), 4, 2, 8)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])  # plain, QKV bias, q/k norm (torch's RoPE)
def test_a_decode_step_with_the_row_kernels_matches_the_torch_ops(tiny_models, family, monkeypatch):
    """A tiny model's logits over a short prompt and its greedy tokens, row kernels on and off (the
    same products and attention either way): equal but for a reordered sum's rounding."""
    from offload import LLM, SamplingParams

    folder = tiny_models[family][0]
    ids = list(range(3, 20))
    outs = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(row_ops, "row_ops_apply", lambda x: False)
        llm = LLM(str(folder), dtype="bfloat16", max_context=64, verbose=False)
        logits = llm.logits(ids)  # [T, V]: 17 rows, the row kernels' path
        tokens = llm.generate(ids, SamplingParams(max_new_tokens=8))[0].token_ids
        outs[fused] = (logits, tokens)
    (logits_on, tokens_on), (logits_off, tokens_off) = outs[True], outs[False]
    assert torch.isfinite(logits_on).all()
    torch.testing.assert_close(logits_on, logits_off, rtol=3e-2, atol=3e-2)
    assert tokens_on == tokens_off


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_kv_copies_new_tokens_into_a_float_cache(dtype):
    k_cache, v_cache = torch.zeros(3, 2, 16, 8, dtype=dtype), torch.zeros(3, 2, 16, 8, dtype=dtype)
    cache = CacheArrays(k_cache, v_cache)
    k = torch.randn(2, 2, 3, 8).to(dtype)
    v = torch.randn(2, 2, 3, 8).to(dtype)
    rows, starts = np.array([2, 0], np.int64), np.array([5, 13], np.int64)
    store_kv(k.transpose(2, 3).contiguous().transpose(2, 3), v, cache, rows, starts)  # a strided view too
    want_k, want_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    for b, (r, s) in enumerate(zip(rows, starts)):
        want_k[r, :, s:s + 3], want_v[r, :, s:s + 3] = k[b], v[b]
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    with pytest.raises(ValueError, match="lie outside the cache's 3 rows of 16 tokens"):
        store_kv(k, v, cache, rows, np.array([5, 14], np.int64))
    with pytest.raises(ValueError, match=f"needs CPU k/v \\[B, Hkv, T, D\\] in {dtype}"):
        store_kv(k.double(), v.double(), cache, rows, starts)


def test_bf16_rounding_of_ties_overflow_nan_and_subnormals_is_torchs():
    """The residual add rounds an fp32 sum to bf16 as torch's bf16 add does: ties to even, overflow
    to inf, NaN kept, subnormals."""
    half_ulp = 2.0 ** -8  # half a bf16 step at 1.0
    big = torch.finfo(torch.bfloat16).max
    tiny = 2.0 ** -130  # subnormal in bf16 as in fp32
    x = torch.tensor([[1.0, 1.0 + 2 ** -7, -1.0, big, -big, float("nan"), float("inf"), tiny, 3.0, 0.0]])
    a = torch.tensor([[half_ulp, half_ulp, -half_ulp, big, -big, 1.0, 1.0, tiny, 2 ** -9, -0.0]])
    x, a = x.bfloat16(), a.bfloat16()
    summed, _ = row_ops.add_rms_norm(x, a, torch.ones(x.shape[-1]).bfloat16(), 1e-5)
    want = x + a
    assert torch.equal(torch.isnan(summed), torch.isnan(want))
    keep = ~torch.isnan(want)
    assert torch.equal(summed[keep].view(torch.int16), want[keep].view(torch.int16))
    assert summed[0, 0] == 1.0 and summed[0, 1] == 1.0 + 2 ** -6 and summed[0, 3] == float("inf")


def _kernel_signatures() -> dict[str, int]:
    """Compiled signatures of every numba kernel of the CPU paths a decode step and a prompt take."""
    from numba.core.registry import CPUDispatcher

    from offload.indexes import cluster, cluster_search
    from offload.kernels import cpu_decode, cpu_glue, cpu_kivi, cpu_quant

    modules = (cpu_decode, cpu_glue, cpu_kivi, cpu_quant, cluster, cluster_search)
    return {f"{m.__name__}.{name}": len(obj.signatures) for m in modules
            for name, obj in vars(m).items() if isinstance(obj, CPUDispatcher)}


# (fp16: attention through torch, nothing to warm)
@pytest.mark.parametrize("settings", [{}, {"kv_dtype": "int8"}, {"kv_dtype": "int2"}, {"quantize": "int8"},
                                      {"dtype": "float32"}, {"dtype": "float16"},
                                      {"kv_policy": "cluster", "kv_budget": 8, "sink": 4, "window": 8},
                                      {"kv_policy": "cluster", "kv_budget": 8, "sink": 4, "window": 8, "kv_dtype": "int8"}])
def test_a_built_model_has_compiled_the_kernels_its_steps_call(smollm_path, settings):
    """Loading warms every CPU kernel with the argument types the model will pass (numba compiles per
    type signature): a prompt of more than 32 tokens and decode steps then compile nothing, so the
    first request is not the one that waits (a fresh machine's first step compiled ~18 s)."""
    from offload import LLM, SamplingParams

    llm = LLM(smollm_path, max_context=256, verbose=False, **settings)
    before = _kernel_signatures()
    out = llm.generate(list(range(100, 170)), SamplingParams(max_new_tokens=4))[0]
    assert len(out.token_ids) == 4
    grown = {name: n for name, n in _kernel_signatures().items() if n != before.get(name, 0)}
    assert grown == {}, f"compiled during generation: {grown}"
