"""KIVI's 2-bit and 4-bit KV cache (offload.tiers.kv_kivi): the grid each group is held on, the
recent group kept as written, writes in any chunking giving the same bytes, every read path
giving the same rows, the store's bytes, and a tiny model's logits through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_kv_quant import _as_host_tier
from test_kv_store import ARGS, CPU

from offload import LLM, EngineConfig, SamplingParams
from offload.attention import ForwardBatch
from offload.errors import OffloadError
from offload.tiers.kv_kivi import KIVI_GROUP, KIVI_RESIDUAL, KIVI_SINK, KiviFormat, KiviLayer
from offload.tiers.kv_store import KVStore, kv_bytes_per_token

D, HKV = 64, 3


def _layer(bits: int, capacity: int = 200, batch: int = 2, dtype=torch.bfloat16) -> KiviLayer:
    return KiviLayer(KiviFormat(bits, D), batch, HKV, capacity, dtype, CPU, pin=False)


def _kv(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(HKV, n, D, generator=g) * torch.linspace(0.1, 8, D)  # channels of very different sizes
    return k, torch.randn(HKV, n, D, generator=g)  # [Hkv, n, D]


def _grid(x: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """The plain definition: each slice along ``dim`` on its own min..max grid of 2^bits points
    (scale and minimum rounded to bf16 first), x's nearest point; x as the bf16 cache is given it."""
    x = x.bfloat16().float()
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-8).bfloat16().float()
    lo = lo.bfloat16().float()
    return torch.round((x - lo) / scale).clamp(0, 2 ** bits - 1) * scale + lo


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_and_unpack_give_back_the_codes(bits):
    fmt = KiviFormat(bits, D)
    codes = torch.randint(0, 2 ** bits, (5, 7, D), dtype=torch.uint8)
    packed = fmt.pack(codes)
    assert packed.shape == (5, 7, D * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(fmt.unpack(packed), codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_keys_per_channel_values_per_token_and_the_residual_as_written(bits):
    """Keys are on a grid per channel over each group of 32 tokens, values per token over 32
    channels (the plain definition, to fp32 rounding); the residual (newest tokens) and the sinks
    read back as written (bf16), tokens beyond the row as 0."""
    layer = _layer(bits, capacity=400)
    n = KIVI_RESIDUAL + 150
    k, v = _kv(n)
    layer.write(0, 0, k, v)
    got_k, got_v = layer.read(0, 0, n + 10, torch.float32)  # [Hkv, n + 10, D]
    full = n - n % KIVI_RESIDUAL  # quantized
    want_k = _grid(k[:, :full].view(HKV, -1, KIVI_GROUP, D), 2, bits).view(HKV, full, D)
    want_v = _grid(v[:, :full].view(HKV, full, D // 32, 32), 3, bits).view(HKV, full, D)
    s = KIVI_SINK
    torch.testing.assert_close(got_k[:, s:full], want_k[:, s:], rtol=0, atol=1e-5 * k.abs().max().item())
    torch.testing.assert_close(got_v[:, s:full], want_v[:, s:], rtol=0, atol=1e-5 * v.abs().max().item())
    for exact in (slice(0, s), slice(full, n)):
        assert torch.equal(got_k[:, exact], k[:, exact].bfloat16().float())
        assert torch.equal(got_v[:, exact], v[:, exact].bfloat16().float())
    assert not got_k[:, n:].any() and not got_v[:, n:].any()
    # the per-channel grid follows each channel's own range: small channels keep small errors
    err = (got_k[:, s:full] - k[:, s:full]).abs().amax(dim=(0, 1))  # [D]
    assert err[0] < 0.1 * err[-1]


def _held(layer: KiviLayer, row: int = 0) -> list[bytes]:
    """What a row holds that reads can see: codes, scales, sinks and the residual's live tokens."""
    live = layer.length[row] % KIVI_RESIDUAL
    return [t[row].contiguous().view(torch.uint8).numpy().tobytes() for t in layer.tensors[:6]] + \
        [t[row, :, :n].contiguous().view(torch.uint8).numpy().tobytes()
         for t, n in ((layer.k_sink, layer.sink), (layer.v_sink, layer.sink), (layer.k_recent, live), (layer.v_recent, live))]


def test_any_chunking_of_the_writes_holds_the_same_bytes():
    """A prompt in one write, in chunks that cut groups, or token by token (decode) gives the same
    codes, scales and residual; so does writing again from inside a quantized stretch."""
    n = 2 * KIVI_RESIDUAL + 40
    k, v = _kv(n, seed=1)
    whole = _layer(2, capacity=400)
    whole.write(0, 0, k, v)
    for cuts in ([70], [33, 95, 200, 201], list(range(1, n))):
        parts = _layer(2, capacity=400)
        for lo, hi in zip([0, *cuts], [*cuts, n]):
            parts.write(0, lo, k[:, lo:hi], v[:, lo:hi])
        assert parts.length[0] == n
        assert _held(whole) == _held(parts), cuts
    again = _layer(2, capacity=400)
    again.write(0, 0, k, v)
    k2, v2 = _kv(n, seed=2)
    at = KIVI_RESIDUAL + 40  # inside the second residual's stretch, quantized already
    again.write(0, at, k2[:, at:at + 60], v2[:, at:at + 60])
    assert again.length[0] == at + 60
    step = _layer(2, capacity=400)
    step.write(0, 0, *again.read(0, 0, at, torch.float32))  # what the row held before, as read
    step.write(0, at, k2[:, at:at + 60], v2[:, at:at + 60])
    assert torch.equal(again.read(0, 0, at + 60)[0], step.read(0, 0, at + 60)[0])
    with pytest.raises(ValueError, match="written in order"):
        again.write(0, at + 70, k[:, :1], v[:, :1])


def test_take_unpacks_the_rows_a_read_gives():
    layer = _layer(4)
    k, v = _kv(150, seed=3)
    layer.write(1, 0, k[:, :140], v[:, :140])
    layer.write(1, 140, k[:, 140:], v[:, 140:])
    all_k, all_v = layer.read(1, 0, 150)
    ids = torch.randint(0, 150, (HKV, 57), generator=torch.Generator().manual_seed(0))  # [Hkv, M] each head its own
    ids[:, :3] = torch.tensor([149, 3, 100])[:, None].T  # a residual token, a sink, a quantized one
    got_k, got_v = layer.take(1, ids)
    at = ids[..., None].expand(-1, -1, D)
    assert torch.equal(got_k, all_k.gather(1, at)) and torch.equal(got_v, all_v.gather(1, at))
    middle_k, _ = layer.read(1, 37, 101)  # a slice that starts and ends inside groups
    assert torch.equal(middle_k, all_k[:, 37:101])


def test_moving_a_row_moves_what_it_holds():
    layer = _layer(2)
    k, v = _kv(90, seed=4)
    layer.write(1, 0, k, v)
    layer.move_row(1, 0, 91)  # a server's length counts the token not yet written
    assert layer.length[0] == 90
    assert all(torch.equal(a, b) for a, b in zip(layer.read(0, 0, 90), layer.read(1, 0, 90)))
    with pytest.raises(ValueError, match="moves whole"):  # its residual cannot be cut
        layer.move_row(1, 0, 50)


def _store(kv_dtype, host_layers=()) -> KVStore:
    store = KVStore(ARGS, CPU, torch.float32, host_layers=host_layers, kv_dtype=kv_dtype)
    store.allocate(2, 64)
    g = torch.Generator().manual_seed(0)
    for row in range(2):
        batch = ForwardBatch.prefill(row, 0, 40, CPU)
        for layer in range(ARGS.num_layers):
            store.write(layer, torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g), batch)
    return store


@pytest.mark.parametrize("host_layers", [(), (1, 2)])
def test_store_read_gather_rows_and_prefix_agree(host_layers, monkeypatch):
    """Every way out of a KIVI store gives the same rows: read (dense attention), gather (sparse
    paths: only the rows named), rows (indexes), prefix and restore (prompt caches: exactly)."""
    store = _store("int2", host_layers)
    _as_host_tier(store, host_layers, monkeypatch)
    keys, values = store.read(2, slice(0, 2), 0, 40)  # [B, Hkv, 40, D]
    ids = torch.tensor([[[0, 33, 39, -1], [2, 2, 31, 32]]] * 2)  # [B, Hkv, M]; -1 is padding
    k_rows, v_rows = store.gather(2, ids)
    at = ids.clamp(min=0)[..., None].expand(-1, -1, -1, 8)
    assert torch.equal(k_rows, keys.gather(2, at)) and torch.equal(v_rows, values.gather(2, at))
    rows_k, rows_v = store.rows(2, 1)
    assert rows_k.quantized and rows_k.shape == (2, 64, 8)
    assert torch.equal(rows_k[:, :40], keys[1]) and torch.equal(rows_v[1, 5:9], values[1, 1, 5:9])
    assert torch.equal(rows_k[0, torch.tensor([3, 35])], keys[1, 0, [3, 35]])
    assert torch.equal(rows_v[:, 7], values[1, :, 7]) and torch.equal(rows_k[None][0, :, :40], keys[1])
    assert torch.equal(rows_k.take(ids[1].clamp(min=0)), k_rows[1])
    if host_layers:  # the read crossed as codes, scales and the kept rows it covers; the gather as rows
        codes = 2 * 2 * 2 * 40 * 8 * 2 // 8  # K and V, B = 2 rows, Hkv = 2, 40 tokens, D = 8 at 2 bits
        key_groups = 2 * 2 * 2 * 2 * 8 * 4  # scale and minimum, 2 rows x 2 heads x 2 groups of 32 x D, fp32
        value_groups = 2 * 2 * 2 * 40 * 1 * 4  # scale and minimum per token and head (one group of 8)
        kept = 2 * 2 * 2 * 40 * 8 * 4  # 40 tokens of the residual (the sinks among them), K and V, fp32
        rows = 2 * 2 * 2 * 4 * 8 * 4  # K and V, B x Hkv x M gathered rows of D, fp32
        assert store.bytes_to_device == codes + key_groups + value_groups + kept + rows
    with pytest.raises(OffloadError, match="no kernel reads KIVI"):
        store.whole_cache(0, 2)
    again = KVStore(ARGS, CPU, torch.float32, kv_dtype="int2")
    again.allocate(1, 64)
    for layer in range(ARGS.num_layers):
        again.restore_layer(layer, 0, *store.layer_prefix(layer, 1, 40))
        assert _held(again.kivi_layers[layer], 0) == _held(store.kivi_layers[layer], 1)


def test_store_bytes_follow_the_planner_formula():
    """A KIVI store holds the formula's bytes per token (codes, key groups' and value groups' scale
    and minimum) plus each row's recent group; 2 bits take under a quarter of int8's bytes at D=64."""
    store = _store("int2")
    per_token = kv_bytes_per_token(ARGS, 4, "int2")
    held = min(64, KIVI_SINK) + KIVI_RESIDUAL  # tokens per row in the compute dtype
    recent = 2 * ARGS.num_layers * 2 * ARGS.num_kv_heads * held * ARGS.head_dim * 4  # B=2, K and V, fp32
    assert store.nbytes() == 2 * 64 * per_token + recent
    fmt = KiviFormat(2, 64)
    assert fmt.bytes_per_token(2) == 48  # the module's worked example
    assert KiviFormat(4, 128).bytes_per_token(2) == 2 * 64 + 2 * 2 * 128 // 32 + 2 * 2 * 4
    on_disk = EngineConfig(model="llama-3.1-8b", load_format="dummy", device="cpu", dtype="bfloat16",
                           max_context=32768, kv_dtype="int2", kv_policy="cluster", kv_offload="disk",
                           disk_dir="/tmp").resolve(planning=True)  # int8 keys and 2-bit values per row there
    rows = 32768 * 8 * (31 * (128 + 2 + 128 * 2 // 8 + 2 * 2 * 4))  # 31 sparse layers, 8 KV heads of 128
    assert on_disk.placement.kv_tiers["disk"] == rows


@pytest.mark.parametrize("kv_dtype", ["int4", "int2"])
# (fp16: no compiled kernel takes it, so reads and decode unpack through torch, as on a GPU)
@pytest.mark.parametrize("policy,extra", [("dense", {}), ("dense", {"dtype": "float16"}), ("retrieval", {}),
                                          ("quest", {}), ("cluster", {}),
                                          ("sentence", {}), ("retrieval", {"kv_offload": True}), ("shadowkv", {})])
def test_tiny_model_through_a_kivi_cache(tiny_models, kv_dtype, policy, extra):
    """Teacher-forced decode logits through a KIVI cache stay finite and near the unquantized
    cache's (4 bits nearer than 2); the start-up line and the tier report say what is held."""
    folder, hf = tiny_models["llama"]
    ids = torch.randint(3, hf.config.vocab_size, (160,), generator=torch.Generator().manual_seed(4)).tolist()
    kw = dict(verbose=False, dtype="float32", max_context=256) | extra
    if policy != "dense":
        kw |= dict(kv_policy=policy, kv_budget=48, dense_layers=1)
    ref, quantized = LLM(folder, **kw), LLM(folder, kv_dtype=kv_dtype, **kw)
    out = ref.generate([ids], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids
    tolerance = {"int4": 0.1, "int2": 0.4}[kv_dtype]
    for i in (0, 8):
        want, got = ref.logits(ids + out[:i])[-1], quantized.logits(ids + out[:i])[-1]
        assert torch.isfinite(got).all()
        assert (got - want).abs().max().item() <= tolerance * want.abs().max().item()
    step = quantized.generate([ids], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids
    assert len(step) == 8
    assert f"KV {kv_dtype} (KIVI" in quantized.describe()
    if policy == "retrieval":  # its graph walks a compute-dtype copy of the keys, counted as its bytes
        index = next(iter(quantized.runtime.backend.indexes.values()))
        copy = index._key_copy
        assert copy is not None and index.nbytes() >= copy.numel() * copy.element_size() > 0
    report, store, a = quantized.tier_report()["kv"], quantized.runtime.backend.kv, quantized.args
    b = quantized.dtype.itemsize
    residual = a.num_layers * a.num_kv_heads * 2 * (KIVI_RESIDUAL + min(KIVI_SINK, store.capacity)) * a.head_dim * b
    assert report["format"] == kv_dtype
    padded = -store.capacity % KIVI_GROUP  # key groups are whole: the last one's scales cover its padding
    key_groups = a.num_layers * a.num_kv_heads * 2 * a.head_dim * b * padded // KIVI_GROUP
    assert report["device_bytes"] == store.capacity * kv_bytes_per_token(a, b, kv_dtype) + residual + key_groups


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [2, 4])
def test_cpu_kernel_attends_what_the_unpacked_rows_give(dtype, bits):
    """The CPU decode path (codes in place by the numba kernel, sinks and residual by torch, merged
    by log-sum-exp) equals attention over the rows a read unpacks, for rows of different lengths
    (a residual empty, a row shorter than the sinks) and windows that start inside each part."""
    from offload.attention import attend

    layer = _layer(bits, capacity=600, batch=5, dtype=dtype)
    # rows: a residual and codes; no residual; shorter than the sinks; longer than the sinks but all
    # in the residual (the sinks then are residual tokens: attended once); codes past three residuals
    lengths = [2 * KIVI_RESIDUAL + 77, 2 * KIVI_RESIDUAL, KIVI_SINK // 2, KIVI_SINK + 9, 3 * KIVI_RESIDUAL + 5]
    for row, n in enumerate(lengths):
        k, v = _kv(n, seed=row)
        layer.write(row, 0, k, v)
    q = torch.randn(5, 2 * HKV, D, generator=torch.Generator().manual_seed(9))  # [B, H, D], 2 query heads a KV head
    for lo in ([0, 0, 0, 0, 0], [KIVI_SINK // 2, 40, 3, 5, 2 * KIVI_RESIDUAL + 2]):
        hi = lengths
        got = layer.attend(layer.kernel_arrays(), q, lo, hi, 0.125)  # [B, H, D]
        for b in range(5):
            k_rows, v_rows = layer.read(b, lo[b], hi[b], torch.float32)  # [Hkv, n, D]
            want = attend(q[b].view(1, HKV, 2, D), k_rows[None], v_rows[None], 0.125, None)  # [1, Hkv, 2, D]
            torch.testing.assert_close(got[b], want.view(2 * HKV, D), rtol=1e-5, atol=1e-5)
    bad = np.zeros((5, HKV, 6), np.int64)
    bad[2, 1] = (0, 601, 0, 0, 0, 0)  # codes past the capacity
    with pytest.raises(ValueError, match="1 .row, head. bounds lie outside 600 codes"):
        layer.kernel_arrays().attend(q, bad, 0.125)


def test_a_batch_of_rows_generates_what_each_row_does_alone(tiny_models):
    """Rows of different lengths decode together through a KIVI cache (each row's own residual and
    groups) exactly as each does alone."""
    folder, hf = tiny_models["llama"]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, hf.config.vocab_size, (n,), generator=g).tolist() for n in (150, 41, 200)]
    llm = LLM(folder, dtype="bfloat16", kv_dtype="int2", verbose=False, max_context=320)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    together = [out.token_ids for out in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    assert together == alone


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [2, 4])
def test_compiled_unpack_equals_the_torch_form_bit_for_bit(cache_dtype, bits, monkeypatch):
    """A CPU read or gather unpacks codes in one compiled pass; off the CPU (or in fp16) torch does:
    the two give the same numbers, bit for bit, into bf16 and fp32, for ranges starting inside a
    group and for ids among the sinks, the codes and the residual."""
    layer = _layer(bits, capacity=600, dtype=cache_dtype)
    n = 2 * KIVI_RESIDUAL + 50
    k, v = _kv(n, seed=7)
    layer.write(1, 0, k, v)
    ids = torch.randint(0, n, (HKV, 90), generator=torch.Generator().manual_seed(2))  # [Hkv, M]
    ids[:, :3] = torch.tensor([3, 2 * KIVI_RESIDUAL + 10, 100])  # a sink, a residual token, a coded one
    compiled_takes = {dtype: layer.take(1, ids, dtype) for dtype in (torch.bfloat16, torch.float32)}
    for start, end in ((0, 2 * KIVI_RESIDUAL), (37, 201), (5, 6)):
        for dtype in (torch.bfloat16, torch.float32):
            compiled = layer.kernel_arrays().read(1, start, end, dtype)
            plain = layer.span(1, start, end).unpacked_codes(dtype)
            assert all(torch.equal(a, b) for a, b in zip(compiled, plain)), (start, end, dtype)
    with pytest.raises(ValueError, match="3 token id.s. lie outside the cache's 600 tokens"):
        layer.kernel_arrays().take(1, torch.full((HKV, 1), 600), 32, 32, 256, torch.float32)  # one per head
    monkeypatch.setattr(layer, "kernel_arrays", lambda: None)  # the torch forms, as on a GPU
    for dtype, compiled in compiled_takes.items():
        assert all(torch.equal(a, b) for a, b in zip(compiled, layer.take(1, ids, dtype))), dtype


COMPUTE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("bits", [2, 4])
def test_a_layer_on_the_compute_device_reads_what_a_cpu_layer_reads(bits):
    """A KIVI layer where attention computes (a GPU when there is one: the torch forms, no compiled
    kernel) gives the rows a CPU layer gives: reads across codes, residual and sinks, gathers of
    scattered ids, and a host span sent over and unpacked there. On the CPU both sides are the CPU
    (the compiled read against itself); profiles.gpu_check runs it on the GPU."""
    k, v = _kv(2 * KIVI_RESIDUAL + 70, seed=11)
    layers = [KiviLayer(KiviFormat(bits, D), 1, HKV, 400, torch.bfloat16, device, pin=False) for device in (CPU, COMPUTE)]
    for layer in layers:
        layer.write(0, 0, k[:, :300], v[:, :300])
        layer.write(0, 300, k[:, 300:], v[:, 300:])
    ids = torch.randint(0, k.shape[1], (HKV, 40), generator=torch.Generator().manual_seed(3))  # [Hkv, M]
    cpu, there = layers
    for got, want in ((there.read(0, 5, 330, torch.float32), cpu.read(0, 5, 330, torch.float32)),
                      (there.take(0, ids, torch.float32), cpu.take(0, ids, torch.float32)),
                      (cpu.span(0, 0, 320).to(COMPUTE).unpack(torch.float32), cpu.read(0, 0, 320, torch.float32))):
        for a, b in zip(got, want):
            assert a.device.type == COMPUTE.type
            torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-6)
