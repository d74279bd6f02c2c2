"""int8 KV cache: the quantizer's error bound, the store's reads, gathers and prompt-cache prefixes
in each tier against a reference (dequantize, then read), the bytes it holds and sends, index
reads through KVRows, tiny models with every policy against their unquantized-KV twins, the
planner's bytes, bad settings, and the default model's perplexity."""

from __future__ import annotations

import pytest
import torch
from test_kv_store import ARGS, CPU, _filled

from offload import LLM, SamplingParams
from offload.errors import OffloadError
from offload.tiers.kv_codec import KV_INT8_MAX, dequantize_kv, quantize_kv
from offload.tiers.kv_store import KVRows, KVStore, kv_bytes_per_token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizer_error_is_half_a_step_per_token_and_head(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 50, 64, generator=g) * torch.rand(2, 3, 50, 1, generator=g) * 4).to(dtype)
    codes, scale = quantize_kv(x, dtype)  # [.., D] int8, [.., 1]
    assert codes.dtype == torch.int8 and scale.shape == (2, 3, 50, 1) and scale.dtype == dtype
    assert codes.abs().max() == KV_INT8_MAX  # the largest element of each vector sets its scale
    err = (dequantize_kv(codes, scale).float() - x.float()).abs()
    # half a step, plus the compute dtype's rounding of the dequantized value
    assert (err <= scale.float() / 2 + x.float().abs() * (2 ** -8 if dtype == torch.bfloat16 else 1e-6) + 1e-6).all()
    zero = torch.zeros(1, 8, dtype=dtype)
    assert torch.equal(dequantize_kv(*quantize_kv(zero, dtype)), zero)  # an all-zero vector stays zero, no NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_int8_store_equals_the_quantizer_bit_for_bit(dtype):
    """The numba write (decode rows at their own positions, a prefill chunk) holds exactly the codes
    and scales quantize_kv computes, leaves every other slot untouched, gives a token with a NaN a
    NaN scale (so the engine's NaN check sees it), and refuses positions outside the cache."""
    import numpy as np

    from offload.kernels import CacheArrays, store_kv_int8

    g = torch.Generator().manual_seed(1)
    B, Hkv, T, D, R, N = 2, 3, 5, 64, 3, 40
    k = (torch.randn(B, Hkv, T, D, generator=g) * torch.rand(B, Hkv, T, 1, generator=g) * 4).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    k[0, 1, 2] = 0  # an all-zero vector: the scale's floor, codes 0
    v[1, 0, 3, 5] = float("nan")
    codes = [torch.full((R, Hkv, N, D), 99, dtype=torch.int8) for _ in range(2)]  # 99: never a code written here
    scales = [torch.full((R, Hkv, N), 7.0, dtype=dtype) for _ in range(2)]
    rows, starts = np.array([2, 0], np.int64), np.array([7, 30], np.int64)

    def cache_part(t: torch.Tensor) -> np.ndarray:  # numpy has no bf16: its bits
        return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()

    cache = CacheArrays(codes[0], codes[1], scales[0], scales[1])
    store_kv_int8(k, v, cache, rows, starts)
    for new, held, scale in ((k, codes[0], scales[0]), (v, codes[1], scales[1])):
        ref_codes, ref_scale = quantize_kv(new, dtype)  # [B, Hkv, T, D], [B, Hkv, T, 1]
        written = torch.zeros(R, N, dtype=torch.bool)
        for b in range(B):
            span = slice(int(starts[b]), int(starts[b]) + T)
            written[rows[b], span] = True
            got_scale, want_scale = scale[rows[b], :, span], ref_scale[b, ..., 0]  # [Hkv, T]
            nan = torch.isnan(new[b].float()).any(-1)  # [Hkv, T]
            assert torch.equal(got_scale[~nan], want_scale[~nan])
            assert torch.isnan(got_scale[nan]).all() and (held[rows[b], :, span][nan] == 0).all()
            assert torch.equal(held[rows[b], :, span][~nan], ref_codes[b][~nan])
        untouched = ~written[:, None].expand(R, Hkv, N)  # [R, Hkv, N]
        assert (held[untouched] == 99).all() and (scale[untouched] == 7.0).all()
    assert int(torch.isnan(scales[1]).sum()) == 1 and not torch.isnan(scales[0]).any()
    # the kernel's plain-Python form (what numba compiles, with its dtype helpers' plain forms) agrees
    from offload.kernels import cpu_decode

    plain = CacheArrays(torch.full_like(codes[0], 99), torch.full_like(codes[1], 99), torch.full_like(scales[0], 7.0),
                        torch.full_like(scales[1], 7.0))
    cpu_decode.store_int8_tokens.py_func(*(cache_part(t) for t in (k, v)), plain.k, plain.v, plain.k_scale,
                                         plain.v_scale, rows, starts)
    for got, want in ((plain.k, codes[0]), (plain.v, codes[1])):
        assert np.array_equal(got, want.numpy())
    for got, want in ((plain.k_scale, scales[0]), (plain.v_scale, scales[1])):
        want = (want.view(torch.uint16) if dtype == torch.bfloat16 else want).numpy()
        assert np.array_equal(got, want, equal_nan=dtype == torch.float32)
    with pytest.raises(ValueError, match="lie outside the cache's 3 rows of 40 tokens"):
        store_kv_int8(k, v, cache, rows, np.array([7, 36], np.int64))


def _as_host_tier(store: KVStore, host_layers, monkeypatch) -> None:
    """On a CPU the host tier is the compute device: make the store treat ``host_layers`` as another
    tier (the GPU's path: staging buffers, bytes counted as they cross; ``.to`` is a no-op here)."""
    monkeypatch.setattr(store, "on_device", lambda layer: layer not in host_layers)


@pytest.mark.parametrize("host_layers", [(), (1, 2)])
def test_int8_store_reads_gathers_and_prefixes_match_the_reference(host_layers, monkeypatch):
    """Every way out of the store returns the dequantized codes of the rows asked for: read
    (dense attention), gather (sparse paths: only the named rows), rows (indexes), prefix."""
    store, k, v = _filled(host_layers, "int8")
    _as_host_tier(store, host_layers, monkeypatch)
    ref_k = dequantize_kv(*quantize_kv(k, torch.float32))  # [L, B, Hkv, T, D]
    ref_v = dequantize_kv(*quantize_kv(v, torch.float32))
    assert (ref_k - k).abs().max() <= k.abs().max() / KV_INT8_MAX  # the reference is close to the original
    keys, values = store.read(2, slice(0, 1), 5, 20)  # [1, Hkv, 15, D]
    assert torch.equal(keys[0], ref_k[2, 0, :, 5:20]) and torch.equal(values[0], ref_v[2, 0, :, 5:20])
    ids = torch.tensor([[[0, 3, 19, -1], [2, 2, 5, 1]]] * 2)  # [B, Hkv, M]; -1 is padding
    for layer in range(ARGS.num_layers):
        k_rows, v_rows = store.gather(layer, ids)  # [B, Hkv, M, D]
        for b in range(2):
            for h in range(2):
                assert torch.equal(k_rows[b, h], ref_k[layer, b, h, ids[b, h].clamp(min=0)])
                assert torch.equal(v_rows[b, h], ref_v[layer, b, h, ids[b, h].clamp(min=0)])
    rows_k, rows_v = store.rows(1, 1)  # KVRows [Hkv, N, D]
    assert rows_k.quantized and rows_k.dtype == torch.float32 and rows_k.shape == (2, 32, 8)
    assert torch.equal(rows_k[1, torch.tensor([4, 0])], ref_k[1, 1, 1, [4, 0]])
    assert torch.equal(rows_v[:, 3], ref_v[1, 1, :, 3])
    prefix = [store.layer_prefix(layer, 1, 20) for layer in range(ARGS.num_layers)]  # [Hkv, n, D], compute dtype
    assert all(torch.equal(pk, ref_k[layer, 1]) and torch.equal(pv, ref_v[layer, 1])
               for layer, (pk, pv) in enumerate(prefix))
    again = KVStore(ARGS, CPU, torch.float32, host_layers=host_layers, kv_dtype="int8")
    again.allocate(1, 32)
    for layer, (pk, pv) in enumerate(prefix):
        again.restore_layer(layer, 0, pk, pv)  # requantizing dequantized codes gives them back
    assert all(torch.equal(again.k[layer][0, :, :20], store.k[layer][1, :, :20]) for layer in range(ARGS.num_layers))
    assert all(torch.equal(again.v_scale[layer][0, :, :20], store.v_scale[layer][1, :, :20])
               for layer in range(ARGS.num_layers))


def test_int8_store_holds_and_sends_codes_and_scales(monkeypatch):
    """Bytes held are int8 codes plus one scale per token and KV head (the planner's formula), and
    what crosses from the host tier is the codes and scales of the rows sent."""
    dense, _, _ = _filled(host_layers=(1, 2))
    quantized, _, _ = _filled(host_layers=(1, 2), kv_dtype="int8")
    for store in (dense, quantized):
        _as_host_tier(store, (1, 2), monkeypatch)
    per_token = kv_bytes_per_token(ARGS, 4, "int8")
    assert quantized.nbytes() == 2 * 32 * per_token  # B = 2 rows of capacity 32
    assert per_token == 2 * ARGS.num_layers * ARGS.num_kv_heads * (ARGS.head_dim + 4)
    assert dense.nbytes() == 2 * 32 * ARGS.kv_bytes_per_token(4)
    ids = torch.tensor([[[0, 3, 19], [2, 2, 5]]] * 2)  # [B, Hkv, M]
    for store in (dense, quantized):
        store.read(1, slice(0, 2), 0, 20)
        store.gather(2, ids)
    rows = 2 * 2 * 20 + 2 * 2 * 3  # (B, Hkv, tokens) read + gathered, K and V each
    assert dense.bytes_to_device == 2 * rows * 8 * 4
    assert quantized.bytes_to_device == 2 * rows * (8 + 4)


def test_kvrows_reads_compute_dtype_views_when_not_quantized():
    data = torch.randn(2, 10, 8)
    rows = KVRows(data)
    assert not rows.quantized and rows[:, 2:5].data_ptr() == data[:, 2:5].data_ptr()


@pytest.mark.parametrize("policy,extra", [("dense", {}), ("dense", {"dtype": "bfloat16"}), ("quest", {}),
                                          ("retrieval", {}), ("retrieval", {"kv_offload": True}),
                                          ("retrieval", {"dtype": "bfloat16"}), ("shadowkv", {})])
def test_tiny_model_int8_kv_logits_match_the_unquantized_cache(tiny_models, policy, extra):
    """Each decode step's logits with an int8 KV are within a small tolerance of the same policy over
    an fp32 KV (teacher-forced on the same tokens); in bf16 (where the CPU attends the dequantized
    KV in fp32) no further from the fp32 run than the unquantized bf16 run is, give or take. The
    store holds what the planner's formula says: about a third of the fp32 bytes."""
    folder, hf = tiny_models["llama"]
    ids = torch.randint(3, hf.config.vocab_size, (160,), generator=torch.Generator().manual_seed(4)).tolist()
    kw = dict(verbose=False, dtype="float32", max_context=256) | extra
    if policy != "dense":
        kw |= dict(kv_policy=policy, kv_budget=48, dense_layers=1)
    ref = LLM(folder, **(kw | {"dtype": "float32"}))
    quantized, twin = LLM(folder, kv_dtype="int8", **kw), LLM(folder, **kw)
    out = ref.generate([ids], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids
    for i in (0, 4, 8):
        want = ref.logits(ids + out[:i])[-1]
        got, unquantized = quantized.logits(ids + out[:i])[-1], twin.logits(ids + out[:i])[-1]
        assert torch.isfinite(got).all()
        bound = 0.05 * want.abs().max().item() + 2 * (unquantized - want).abs().max().item()
        assert (got - want).abs().max().item() <= bound
    assert "KV int8" in quantized.describe()
    report = quantized.tier_report()["kv"]
    held, dense = report["device_bytes"], twin.tier_report()["kv"]["device_bytes"]
    assert report["format"] == "int8" and held == quantized.runtime.backend.kv_nbytes() > 0
    a, b = quantized.args, quantized.dtype.itemsize
    assert held * a.kv_bytes_per_token(b) == dense * kv_bytes_per_token(a, b, "int8")
    assert held < (0.35 if b == 4 else 0.63) * dense


def test_online_softmax_over_blocks_equals_attention_over_all_keys():
    """Blocks of keys merged by running max and sum give exact attention, masks included (a row
    that sees nothing in a block, or whose first block is fully masked)."""
    from offload.attention import OnlineSoftmax, attend

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 4, 16, generator=g)  # [B, Hkv, G, D]
    k, v = torch.randn(2, 3, 50, 16, generator=g), torch.randn(2, 3, 50, 16, generator=g)  # [B, Hkv, N, D]
    visible = torch.ones(2, 1, 1, 50, dtype=torch.bool)
    visible[1, ..., :20] = False  # row 1 sees only keys 20..49: its first block is fully masked
    visible[0, ..., 37:] = False  # row 0 sees only keys 0..36
    want = attend(q, k, v, 0.25, visible)
    acc = OnlineSoftmax(q, 0.25)
    for lo in range(0, 50, 16):
        acc.add(k[:, :, lo:lo + 16], v[:, :, lo:lo + 16], visible[..., lo:lo + 16])
    assert torch.allclose(acc.result(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: a sliding window of 24
def test_long_quantized_decode_attends_in_blocks_exactly(tiny_models, monkeypatch, family):
    """Past DECODE_BLOCK_TOKENS a quantized KV is dequantized a block at a time (devices without the
    fused kernel): the tokens and logits equal the single-block path's and the CPU's fused kernel's,
    for rows of unequal lengths (a mask) and a sliding-window model."""
    import offload.indexes.dense as dense
    from offload.attention import ForwardBatch

    folder, hf = tiny_models[family]
    ids = torch.randint(3, hf.config.vocab_size, (100,), generator=torch.Generator().manual_seed(8)).tolist()
    llm = LLM(folder, dtype="float32", kv_dtype="int8", verbose=False)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    tokens, steps = [], []
    for fused, block in (((), 8192), ((), 16), (("cpu",), 8192)):  # whole, blocked, fused kernel
        monkeypatch.setattr(dense, "FUSED_DECODE_DEVICES", fused)
        monkeypatch.setattr(dense, "DECODE_BLOCK_TOKENS", block)
        tokens.append([o.token_ids for o in llm.generate([ids, ids[:70]], params)])  # rows of two lengths: a mask
        llm.backend.allocate(1, 256)  # one decode step's logits
        llm.engine.prefill(0, ids)
        with torch.inference_mode():
            steps.append(llm.model(torch.tensor([[7]]), ForwardBatch.decode([len(ids)], llm.device, [7]), llm.backend))
    assert tokens[0] == tokens[1] == tokens[2]
    assert torch.allclose(steps[0], steps[1], atol=1e-4, rtol=1e-4)
    assert torch.allclose(steps[0], steps[2], atol=1e-4, rtol=1e-4)


def test_int8_kv_prompt_cache_round_trips_exactly(tiny_models, tmp_path):
    """A prompt cache of an int8 KV (bf16 scales) restores the very codes and scales: generating from
    it equals generating from the prompt; a cache of the other KV format is refused."""
    from offload.errors import InvalidRequestError

    folder, hf = tiny_models["llama"]
    ids = torch.randint(3, hf.config.vocab_size, (90,), generator=torch.Generator().manual_seed(6)).tolist()
    llm = LLM(folder, dtype="bfloat16", kv_dtype="int8", verbose=False)
    path = llm.save_prompt(ids, tmp_path / "p.cache")
    store = llm.runtime.backend.kv
    saved = [t[0, :, :90].clone() for layer in range(llm.args.num_layers) for t in store._parts(layer)]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    fresh = llm.generate([ids + [7]], params)[0].token_ids
    assert llm.generate([ids + [7]], params, prompt_cache=path)[0].token_ids == fresh
    restored = [t[0, :, :90] for layer in range(llm.args.num_layers) for t in store._parts(layer)]
    assert all(torch.equal(a, b) for a, b in zip(saved, restored))  # codes and scales, bit for bit
    with pytest.raises(InvalidRequestError, match="different settings"):
        LLM(folder, dtype="bfloat16", verbose=False).generate([ids + [7]], params, prompt_cache=path)


def test_int8_kv_settings_and_planner_bytes():
    from offload import EngineConfig

    with pytest.raises(OffloadError, match="unknown kv_dtype .int3."):
        EngineConfig(kv_dtype="int3")
    config = EngineConfig(model="llama-3.1-8b", load_format="dummy", device="cpu", dtype="bfloat16",
                          max_context=32768)
    dense, quantized = (config.resolve(planning=True).placement,
                        config.replace(kv_dtype="int8").resolve(planning=True).placement)
    args = config.resolve(planning=True).args
    assert quantized.kv_tiers["device"] == kv_bytes_per_token(args, 2, "int8") * 32768
    assert 0.5 < quantized.kv_tiers["device"] / dense.kv_tiers["device"] < 0.52  # D = 128: 1 + 2/128 bytes of 2
    assert "KV int8" in quantized.table()


@pytest.mark.slow
def test_default_model_int8_kv_perplexity_within_half_a_percent(smollm_path):
    """Perplexity over 2,048 tokens of real text with an int8 KV is within 0.5% of the fp32 KV's."""
    from conftest import shakespeare

    results = {}
    for kv in (None, "int8"):
        llm = LLM(smollm_path, dtype="float32", kv_dtype=kv, max_context=2100, verbose=False)
        ids = llm.tokenizer.encode(shakespeare())[:2049]
        logits = llm.logits(ids[:-1]).float()  # [T, V]
        results[kv] = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).exp().item()
    assert abs(results["int8"] / results[None] - 1) <= 0.005, results
