"""int4 and int8 weights at run time: the fused CPU kernels against a plain-torch reference over a
grid, the quantizer's error bound, a tiny model and the default model against their dense twins,
streamed layers, the planner's bytes, bad settings."""

from __future__ import annotations

import pytest
import torch

from offload import LLM, SamplingParams
from offload.errors import OffloadError
from offload.kernels import INT4_GEMM_ROWS, int4_dequantize_rows, int4_group_linear, int4_pack_layout
from offload.kernels import int4_pack as int4_pack_module
from offload.kernels.api import INT8_GROUP_KERNEL_ROWS as KERNEL_ROWS
from offload.quant import (
    INT4_MAX,
    INT4_MID,
    KERNEL_DTYPE,
    Int4Weight,
    Int8Weight,
    dequantize_int4,
    embedding,
    quantize_int4,
)


def _reference(x: torch.Tensor, codes, scale, zero) -> torch.Tensor:
    """Dequantize (scale and zero as the kernel holds them, bf16), then multiply in fp32."""
    w = dequantize_int4(codes, scale.bfloat16().float(), zero.bfloat16().float())  # [N, K]
    return x.float() @ w.t()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # the compute dtype: fp32 where bf16 is slow
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("n,k", [(16, 64), (128, 64), (256, 128), (960, 576), (576, 1536)])
@pytest.mark.parametrize("m", [1, 3, 17, INT4_GEMM_ROWS + 8])  # the last: unpacked blocks through the GEMM
def test_int4_kernel_matches_the_reference(n, k, m, group, dtype):
    g = torch.Generator().manual_seed(n * k + m)
    w = torch.randn(n, k, generator=g) * 0.05
    codes, scale, zero = quantize_int4(w, group, KERNEL_DTYPE)
    weight = Int4Weight(n, k, dtype, group)
    weight.load_codes(codes, scale, zero)
    x = torch.randn(m, k, generator=g).to(dtype)
    out = weight(x)  # [m, n] in the compute dtype (the kernel's bf16 output, cast)
    ref = _reference(x, codes, scale, zero)
    assert out.shape == (m, n) and out.dtype == dtype and weight.scales_zeros.dtype == KERNEL_DTYPE
    # bf16 output: a few units in the last place of the largest output
    assert (out.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item() + 1e-3
    bias = torch.randn(n, generator=g).to(dtype)
    assert torch.allclose(weight(x[None], bias)[0].float(), out.float() + bias.float(), atol=2e-2, rtol=2e-2)
    # what the module holds, read back through the kernel, is the reference weight
    assert weight.dequantize().dtype == dtype and torch.allclose(weight.dequantize().float(),
                          dequantize_int4(codes, scale.bfloat16().float(), zero.bfloat16().float()), atol=1e-2, rtol=1e-2)
    assert weight.nbytes == n * k // 2 + (k // group) * n * 2 * 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k", [(64, 64), (49152, 576), (960, 576), (576, 1536), (7, 96)])
def test_int8_head_and_lookup_match_the_reference(n, k, dtype):
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=g) * 0.05
    weight = Int8Weight.from_float(w, dtype)
    scales = weight.scales.repeat_interleave(weight.group, dim=1)  # [N, K], fp32 as held
    ref_w = weight.codes.float() * scales  # [N, K]
    assert ((ref_w - w).abs() <= scales / 2 + 1e-7).all()  # half a step of each group
    x = torch.randn(3, k, generator=g).to(dtype)
    ref = x.float() @ ref_w.t()
    assert weight(x).dtype == dtype and (weight(x).float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item() + 1e-3
    ids = torch.tensor([[0, n - 1, 5]])
    assert embedding(ids, weight).dtype == dtype
    assert torch.allclose(embedding(ids, weight).float(), ref_w[ids], atol=1e-2, rtol=1e-2)


def test_int8_refuses_widths_without_whole_groups():
    """int8 weights need whole groups of 32 inputs: one line instead of a shape error in the kernel."""
    from offload.quant import int8_supported

    assert int8_supported(3, 64) and not int8_supported(3, 40)
    with pytest.raises(OffloadError, match="int8 weights need inputs divisible by 32; got 3 x 40"):
        Int8Weight.from_float(torch.randn(3, 40), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k,group", [(16, 64, 32), (7, 96, 32), (960, 576, 32), (576, 1536, 32), (64, 256, 128)])
@pytest.mark.parametrize("m", [1, 3, KERNEL_ROWS, KERNEL_ROWS + 1, 40])  # both sides of the row kernel / GEMM switch
def test_int8_group_kernel_matches_the_reference(n, k, group, m, dtype):
    """The numba grouped-int8 product (row by row for a few rows, a block of dequantized rows and
    the GEMM for more: in bf16 for bf16 rows on a CPU with native bf16 products, to bf16's rounding)
    against dequantize-then-multiply, and the quantizer's error bound."""
    from offload.kernels import cpu_has_fast_bf16, int8_group_linear, int8_group_linear_ref, last_backend

    g = torch.Generator().manual_seed(n * k + m)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :group] *= 40  # one loud group: its neighbours' scales must not follow it
    weight = Int8Weight.from_float(w, dtype, group)
    assert weight.scales.shape == (n, k // group) and weight.nbytes == n * k + n * (k // group) * 4
    step = weight.scales.repeat_interleave(group, dim=1)  # [N, K]
    assert ((weight.codes.float() * step - w).abs() <= step / 2 + 1e-7).all()  # half a step of its own group
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = int8_group_linear_ref(x, weight.codes, weight.scales)  # [m, n] fp32
    got = int8_group_linear(x, weight.codes, weight.scales)
    bf16_gemm = m > KERNEL_ROWS and dtype == torch.bfloat16 and cpu_has_fast_bf16()
    from offload.kernels import cpu_int8_gemv

    kernel = "c" if cpu_int8_gemv.takes(m, k, k // group) else "numba"  # the C row kernel where it built
    assert last_backend() == kernel and got.dtype == (torch.bfloat16 if bf16_gemm else torch.float32)
    assert (got.float() - ref).abs().max().item() <= (1e-2 if bf16_gemm else 1e-5) * ref.abs().max().item()
    out = weight(x[None])  # [1, m, n] in the compute dtype
    assert out.shape == (1, m, n) and out.dtype == dtype
    assert torch.allclose(out[0].float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2)
    assert torch.allclose(weight.dequantize().float(), weight.codes.float() * step, atol=1e-2, rtol=1e-2)


def test_int8_group_quantizer_keeps_a_q8_0_grid_exactly():
    """Weights already on GGUF's Q8_0 grid (codes times an fp16 scale per 32, the largest code
    +-127) are held with the very codes and scales: a Q8_0 file quantized to int8 loses nothing."""
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(-127, 128, (48, 128), generator=g, dtype=torch.int8)
    codes[:, ::32] = 127 * torch.where(torch.rand(48, 4, generator=g) < 0.5, -1, 1).to(torch.int8)
    d = (torch.rand(48, 4, generator=g) * 0.01 + 1e-4).half().float()  # fp16 block scales
    w = codes.float() * d.repeat_interleave(32, dim=1)
    weight = Int8Weight.from_float(w, torch.float32)
    assert torch.equal(weight.codes, codes) and torch.equal(weight.scales, d)


def test_int4_packs_in_row_blocks_as_a_whole_matrix_does():
    """Quantizing a tall matrix in row blocks (small temporaries) packs exactly as one call over the
    whole matrix: no part ends inside one of the packer's blocks, whatever their size on this CPU."""
    from offload.kernels import PACK_TILE_ROWS
    from offload.quant import quantize_rows

    assert all(quantize_rows(k) % 64 == 0 for k in (64, 576, 1536, 4096, 14336))  # AVX-512's blocks too

    w = torch.randn(quantize_rows(64) + 48, 64, generator=torch.Generator().manual_seed(3))  # a ragged last block
    codes, scale, zero = quantize_int4(w, dtype=torch.bfloat16)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    blocked = Int4Weight.from_float(w, torch.bfloat16)
    assert torch.equal(blocked.packed, whole)
    assert torch.equal(blocked.scales_zeros, torch.stack([scale.t(), zero.t()], dim=-1).bfloat16())
    with pytest.raises(ValueError, match=f"tiles of {PACK_TILE_ROWS}"):
        blocked.load_codes(codes[:16], scale[:16], zero[:16], first_row=16)


def test_quantizer_error_is_half_a_step_and_grid_values_are_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    codes, scale, zero = quantize_int4(w)
    assert codes.min() >= 0 and codes.max() <= INT4_MAX
    err = (dequantize_int4(codes, scale, zero) - w).abs().reshape(32, -1, 32)  # [N, G, 32]
    groups = w.reshape(32, -1, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / INT4_MAX  # [N, G]: the asymmetric grid's (a zero-centred one errs less)
    assert (err <= step[..., None] / 2 + 1e-6).all()
    # values already on a 4-bit grid whose ends are present (as in a GGUF Q4_1 block) come back exactly
    q = torch.randint(0, 16, (16, 64), generator=g)
    q[:, ::32] = 0
    q[:, 1::32] = 15
    d, m = torch.rand(16, 2, generator=g) + 0.1, torch.randn(16, 2, generator=g)
    grid = q.float() * d.repeat_interleave(32, dim=1) + m.repeat_interleave(32, dim=1)
    codes, scale, zero = quantize_int4(grid)
    assert torch.equal(codes, q.to(torch.int32))
    assert torch.allclose(dequantize_int4(codes, scale, zero), grid, atol=1e-5)
    assert torch.allclose(zero - INT4_MID * scale, m, atol=1e-5)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])  # fp32: a CPU without native bf16 (the kernels cast)
@pytest.mark.parametrize("family", ["llama", "llama-tied", "qwen2"])  # untied, tied head, QKV bias
def test_tiny_model_quantized_equals_its_dequantized_twin(tiny_models, family, dtype, scheme):
    """The quantized model's logits equal a model of the same compute dtype holding the very
    weights the kernels see (dequantized), and differ from the original weights' logits."""
    folder, hf = tiny_models[family]
    ids = torch.randint(3, hf.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    quantized = LLM(folder, quantize=scheme, dtype=dtype, verbose=False)
    assert str(quantized.dtype) == f"torch.{dtype}" and f"projections {scheme}" in quantized.describe()
    assert ("int4 steps on" in quantized.describe()) == (scheme == "int4")  # the measured kernel choice, said
    kind = Int4Weight if scheme == "int4" else Int8Weight
    assert all(isinstance(layer.mlp.w_down, kind) for layer in quantized.model.layers)
    twin = LLM(folder, dtype=dtype, verbose=False)
    original = twin.logits(ids)
    with torch.no_grad():
        for q_layer, t_layer in zip(quantized.model.layers, twin.model.layers):
            t_layer.attn.wqkv.copy_(q_layer.attn.wqkv.dequantize())
            t_layer.attn.wo.copy_(q_layer.attn.wo.dequantize())
            t_layer.mlp.w_gate_up.copy_(q_layer.mlp.w_gate_up.dequantize())
            t_layer.mlp.w_down.copy_(q_layer.mlp.w_down.dequantize())
        twin.model.embed.copy_(quantized.model.embed.dequantize())  # int8 embeddings and head
        twin.model.lm_head.copy_(quantized.model.lm_head.dequantize())
    assert (quantized.model.lm_head is quantized.model.embed) == (family == "llama-tied")
    got, ref = quantized.logits(ids), twin.logits(ids)
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    assert (got - original).abs().max().item() > 1e-3  # the weights did change (random weights: far apart)
    report = quantized.tier_report()["weights"]
    assert report["format"] == scheme and report["resident_bytes"] < twin.tier_report()["weights"]["resident_bytes"]
    out = quantized.generate([ids], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5


def test_prompt_cache_of_the_dense_model_is_refused_by_the_quantized_one(tiny_models, tmp_path):
    from offload.errors import InvalidRequestError

    folder, hf = tiny_models["llama"]
    ids = list(range(3, 40))
    path = LLM(folder, dtype="bfloat16", verbose=False).save_prompt(ids, tmp_path / "p.cache")
    with pytest.raises(InvalidRequestError, match="different fingerprint"):
        LLM(folder, quantize="int4", verbose=False).generate([ids + [5]], SamplingParams(max_new_tokens=2),
                                                             prompt_cache=path)


def test_quantize_settings_are_checked_before_loading(tiny_models, tmp_path):
    from offload import EngineConfig

    folder, _ = tiny_models["llama"]
    with pytest.raises(OffloadError, match="unknown quantize 'int3'"):
        LLM(folder, quantize="int3")
    with pytest.raises(OffloadError, match="compute in bfloat16 or float32"):
        LLM(folder, quantize="int4", dtype="float16")
    with pytest.raises(OffloadError, match="unknown weights 'int4'"):
        LLM(folder, weights="int4")
    with pytest.raises(OffloadError, match="ask for opposite things"):
        LLM(folder, quantize="int8", weights="dequantize")
    from offload.tiers.flash import FlashConfig

    preset = EngineConfig(model="smollm2-135m", load_format="dummy", quantize="int4")
    on_gpu = preset.replace(device="cuda", dtype="float16").resolve(planning=True)  # the Triton kernels take fp16
    assert (on_gpu.device.type, on_gpu.quantize) == ("cuda", "int4")
    with pytest.raises(OffloadError, match="both rewrite the FFN weights"):
        preset.replace(flash=FlashConfig(sparsity=0.5), disk_dir=tmp_path).resolve(planning=True)


def test_planner_places_int4_bytes():
    """Under one budget the int4 model keeps about three times as many layers resident, and every
    byte the placement counts is an int4 byte (layers) or an int8 byte (embeddings)."""
    from offload import EngineConfig
    from offload.quant import embedding_nbytes, layer_nbytes

    config = EngineConfig(model="smollm2-135m", load_format="dummy", dtype="bfloat16", cpu_memory="180MiB",
                          max_context=1024, disk_dir="/tmp")
    dense, quantized = config.resolve(planning=True).placement, config.replace(quantize="int4").resolve(
        planning=True).placement
    args = config.resolve(planning=True).args
    assert quantized.layer_bytes == layer_nbytes(args, 2, "int4") < 0.35 * dense.layer_bytes
    assert quantized.fixed_device_bytes - dense.fixed_device_bytes == \
        embedding_nbytes(args, 2, "int4") - embedding_nbytes(args, 2, None)
    resident = [p.layer_tiers.count("device") for p in (dense, quantized)]
    assert resident[1] >= 2.5 * max(resident[0], 1), resident
    assert "int4 projections" in quantized.table()
    int8 = config.replace(quantize="int8").resolve(planning=True).placement  # 1 byte a weight, fp32 scale per 32
    assert int8.layer_bytes == layer_nbytes(args, 2, "int8")
    assert quantized.layer_bytes < int8.layer_bytes < 0.6 * dense.layer_bytes
    assert quantized.predicted_step_ms < int8.predicted_step_ms < dense.predicted_step_ms  # priced by their bytes
    assert "int8 projections" in int8.table()


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantized_layers_stream_from_disk_as_such(tmp_path, scheme):
    """Layers placed on disk are stored and read quantized: the store holds the scheme's bytes, each
    forward pass reads exactly the streamed layers' bytes, and the logits equal the resident
    quantized model's (the same codes, computed by the same kernel)."""
    from conftest import make_tiny_model

    from offload.quant import layer_nbytes
    from offload.tiers.store import align_up, read_header

    folder = tmp_path / "model"
    hf = make_tiny_model(folder, "qwen2", seed=5, num_hidden_layers=5)  # QKV bias: a streamed dense tensor
    ids = torch.randint(3, hf.config.vocab_size, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    resident = LLM(folder, quantize=scheme, verbose=False)
    args, b = resident.args, resident.dtype.itemsize  # bf16 or fp32, as this CPU computes (auto)
    layer = layer_nbytes(args, b, scheme)
    whole = resident.config.replace(max_context=64).resolve().placement.tier_bytes()["device"]
    hidden = 64 * args.hidden_size * b  # the prompt's hidden states, held by a layer-major prefill
    budget = whole - (args.num_layers - 3) * layer + hidden  # two streaming buffers and one resident layer
    tmp_path = tmp_path / "stores"
    tmp_path.mkdir()
    streamed = LLM(folder, quantize=scheme, cpu_memory=budget, disk_dir=tmp_path, max_context=64, verbose=False)
    placement = streamed.runtime.placement
    on_disk = placement.layer_tiers.count("disk")
    assert 0 < on_disk < args.num_layers and placement.layer_bytes == layer
    got, ref = streamed.logits(ids), resident.logits(ids)
    assert torch.equal(got, ref)
    store = next(tmp_path.glob(f"*-{scheme}.weights"))
    _, entries = read_header(store)
    assert sum(e.nbytes for e in entries.values()) == on_disk * layer  # codes, scales (and zeros), norms
    report = streamed.tier_report()
    assert report["disk_bytes_per_pass"] >= on_disk * layer
    # each load reads one layer's quantized tensors and nothing else (each tensor padded to a page in the store)
    per_layer = sum(align_up(e.nbytes) for e in entries.values()) // on_disk
    assert report["disk_bytes_read"] == report["layer_loads"] * per_layer
    # the dense model's store of the same file is another file: neither overwrites the other
    dense = resident.config.replace(quantize=None, max_context=64)
    dense_layer = args.layer_param_count() * b
    LLM(config=dense.replace(cpu_memory=dense.resolve().placement.tier_bytes()["device"] - 2 * dense_layer,
                      disk_dir=tmp_path))
    assert len(list(tmp_path.glob("*.weights"))) == 2


@pytest.mark.slow
def test_default_model_int4_agrees_with_bf16_on_real_text(smollm_path):
    """SmolLM2 (Q4_1 GGUF) with int4 projections against the bf16 model: resident bytes less than
    half, next-token agreement over real text, and the same greedy answer to a factual prompt."""
    from conftest import shakespeare

    quantized = LLM(smollm_path, quantize="int4", verbose=False)
    dense = LLM(smollm_path, dtype="bfloat16", weights="dequantize", verbose=False)
    import gguf

    file_bytes = sum(t.n_bytes for t in gguf.GGUFReader(str(smollm_path)).tensors)  # Q4_1 layers, Q8_0 embeddings
    resident = quantized.tier_report()["weights"]["resident_bytes"]
    assert resident <= 1.1 * file_bytes and resident < 0.4 * dense.tier_report()["weights"]["resident_bytes"]
    ids = quantized.tokenizer.encode(shakespeare())[:512]
    picks = quantized.logits(ids).argmax(-1), dense.logits(ids).argmax(-1)  # [T] each
    agreement = (picks[0] == picks[1]).float().mean().item()
    assert agreement >= 0.85, agreement
    params = SamplingParams(max_new_tokens=8)
    prompt = "The capital of France is Paris. The capital of Germany is"
    assert "Berlin" in quantized.generate([prompt], params)[0].text
    # int8 groups: between int4 and bf16 in bytes, and as close to bf16 (measured 0.979 against int4's
    # 0.986; one scale per row, before, gave 0.959: it rounded Q4_1's grid of 32-weight groups anew)
    int8 = LLM(smollm_path, quantize="int8", verbose=False)
    int8_bytes = int8.tier_report()["weights"]["resident_bytes"]
    assert resident < int8_bytes < 0.6 * dense.tier_report()["weights"]["resident_bytes"]
    int8_agreement = (int8.logits(ids).argmax(-1) == picks[1]).float().mean().item()
    assert int8_agreement >= 0.96, (int8_agreement, agreement)
    assert "Berlin" in int8.generate([prompt], params)[0].text



def test_attention_products_leave_bf16_where_the_cpu_lacks_it(monkeypatch):
    """On a CPU without native bf16 attention's products over a bf16 KV run in fp32 (a batched bf16
    product takes a scalar path there); the result is the same attention, returned in q's dtype."""
    import offload.attention as attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=g).bfloat16() for _ in range(3))
    ref = torch.softmax(q.float() @ k.float().transpose(-1, -2) * 0.25, dim=-1) @ v.float()  # [1, 2, 6, 16]
    for fast in (True, False):
        monkeypatch.setattr(attention, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert attention.product_dtype(k) == (torch.bfloat16 if fast else torch.float32)
        out = attention.attend(q, k, v, 0.25, None)
        assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, atol=3e-2)
    assert attention.product_dtype(k.float()) == torch.float32


def test_bf16_products_of_many_rows_widen_where_the_cpu_lacks_bf16(monkeypatch):
    """A bf16 weight times 16 rows or more runs in fp32 on a CPU without native bf16 (a prefill
    chunk: 5x faster there); one row (decode) stays in bf16, which is faster there; same numbers."""
    import offload.attention as attention
    import offload.quant as quant

    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(48, 32, generator=g).bfloat16(), torch.randn(48, generator=g).bfloat16()
    many, one = torch.randn(2, 8, 32, generator=g).bfloat16(), torch.randn(1, 32, generator=g).bfloat16()
    widened = torch.nn.functional.linear(many.float(), w.float(), bias.float()).bfloat16()  # [2, 8, 48]
    monkeypatch.setattr(attention, "cpu_has_fast_bf16", lambda: False)
    assert torch.equal(quant.linear(many, w, bias), widened)
    assert torch.equal(quant.linear(one, w), torch.nn.functional.linear(one, w))
    monkeypatch.setattr(attention, "cpu_has_fast_bf16", lambda: True)
    assert torch.equal(quant.linear(many, w, bias), torch.nn.functional.linear(many, w, bias))


def test_quantizer_keeps_a_q4_0_grid_without_its_top_code():
    """Values on ggml's Q4_0 grid (d * (q - 8), the largest magnitude at q = 0) whose block lacks
    the top code come back up to the rounding of d to the kernel's bf16, where a grid from the
    group's least to largest value would move them by up to half its step; ordinary weights keep
    the asymmetric grid's error bound."""
    g = torch.Generator().manual_seed(4)
    q = torch.randint(0, 13, (16, 64), generator=g)  # codes 13..15 never drawn
    q[:, ::32] = 0
    d = (torch.rand(16, 2, generator=g) + 0.1) * torch.where(torch.rand(16, 2, generator=g) < 0.5, -1.0, 1.0)
    d = d.bfloat16().float()  # a scale the kernel holds exactly: the grid comes back exactly
    grid = (q.float() - INT4_MID) * d.repeat_interleave(32, dim=1)
    codes, scale, zero = quantize_int4(grid, dtype=torch.bfloat16)
    assert torch.equal(dequantize_int4(codes, scale, zero), grid)
    w = torch.randn(32, 128, generator=g)
    codes, scale, zero = quantize_int4(w, dtype=torch.bfloat16)
    lo, hi = w.reshape(32, -1, 32).amin(-1), w.reshape(32, -1, 32).amax(-1)
    err = (dequantize_int4(codes, scale, zero) - w).abs().reshape(32, -1, 32).amax(-1)  # [N, G]
    assert (err <= (hi - lo) / INT4_MAX / 2 * 1.02 + 1e-6).all()


def test_int8_kernel_views_follow_the_weights_storage():
    """The numpy views an int8 weight hands its kernel see in-place refills (a streaming buffer) and
    are made again when a parameter's storage is replaced: never a stale read."""
    g = torch.Generator().manual_seed(9)
    weight = Int8Weight.from_float(torch.randn(64, 96, generator=g), torch.float32)
    x = torch.randn(2, 96, generator=g)
    first = weight(x)
    with torch.no_grad():
        weight.codes.data = weight.codes.data.clone()  # new storage, same values
        assert torch.equal(weight(x), first)
        weight.codes.zero_()  # in place: the views made for this storage see it
        assert torch.equal(weight(x), torch.zeros_like(first))
        weight.scales.data = torch.ones_like(weight.scales)
        weight.codes.fill_(1)
        assert torch.allclose(weight(x), x.sum(-1, keepdim=True).expand(-1, 64), atol=1e-5)


@pytest.mark.parametrize("n,k", [(16, 64), (48, 96), (80, 32), (96, 64), (960, 576)])
def test_int4_unpacking_reads_the_packed_layout_exactly(n, k):
    """The packed int4 bytes unpacked (the layout learned by probing the packer) give the weights the
    codes, scales and zeros stand for, bit for bit, including a last block shorter than the rest."""
    layout = int4_pack_layout()
    assert layout is not None and layout.block_rows in (16, 32, 64, 128, 256)
    g = torch.Generator().manual_seed(n + k)
    codes, scale, zero = quantize_int4(torch.randn(n, k, generator=g), 32, KERNEL_DTYPE)
    weight = Int4Weight(n, k, torch.float32)
    weight.load_codes(codes, scale, zero)
    exact = dequantize_int4(codes, scale.bfloat16().float(), zero.bfloat16().float())  # [N, K]
    assert torch.equal(int4_dequantize_rows(weight.packed, weight.scales_zeros, 0, torch.empty(k, n), layout).t(), exact)
    assert torch.equal(weight.dequantize(), exact)
    if n > layout.block_rows:  # from the second block on, into a smaller buffer
        part = int4_dequantize_rows(weight.packed, weight.scales_zeros, layout.block_rows,
                                    torch.empty(k, n - layout.block_rows), layout)
        assert torch.equal(part.t(), exact[layout.block_rows:])
    with pytest.raises(ValueError, match="blocks of"):
        int4_dequantize_rows(weight.packed, weight.scales_zeros, 1, torch.empty(k, 8), layout)


def test_int4_products_of_many_rows_unpack_a_block_at_a_time(monkeypatch):
    """Above INT4_GEMM_ROWS rows the product unpacks blocks of rows and runs the GEMM: with
    blocks of one layout block (and a short last one) it equals the fp32 reference, and the fused
    kernel (bf16 activations) to its rounding; bf16 activations on a CPU with native bf16 products
    multiply the block in bf16, to bf16's rounding."""
    n, k, m = 80, 96, INT4_GEMM_ROWS + 5
    layout = int4_pack_layout()
    g = torch.Generator().manual_seed(3)
    codes, scale, zero = quantize_int4(torch.randn(n, k, generator=g) * 0.05, 32, KERNEL_DTYPE)
    weight = Int4Weight(n, k, torch.float32)
    weight.load_codes(codes, scale, zero)
    x = torch.randn(m, k, generator=g)
    monkeypatch.setattr(int4_pack_module, "INT4_UNPACK_BLOCK_BYTES", 4 * k * layout.block_rows)
    out = int4_group_linear(x, weight.packed, weight.scales_zeros, 32)  # [m, n] fp32
    ref = _reference(x, codes, scale, zero)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    fused = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), weight.packed, 32, weight.scales_zeros)
    assert (fused.float() - out).abs().max().item() <= 2e-2 * out.abs().max().item()
    few = int4_group_linear(x[:INT4_GEMM_ROWS - 1], weight.packed, weight.scales_zeros, 32)  # the fused kernel
    assert few.dtype == torch.bfloat16 and torch.allclose(few.float(), out[:INT4_GEMM_ROWS - 1], atol=2e-2, rtol=2e-2)
    # bf16 activations on a CPU with native bf16 products: the block GEMM runs in bf16, to its rounding
    from offload.kernels import cpu_has_fast_bf16

    xb = x.bfloat16()
    half = int4_group_linear(xb, weight.packed, weight.scales_zeros, 32)  # [m, n]
    assert half.dtype == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    assert (half.float() - _reference(xb, codes, scale, zero)).abs().max().item() <= 1e-2 * out.abs().max().item()


def test_int4_unpacks_to_bf16_as_its_fp32_unpacking_rounds():
    """The bf16 GEMM's blocks are unpacked straight to bf16 bits: bit for bit the fp32 unpacking
    rounded by torch (to nearest even), short last block and a NaN scale included."""
    layout = int4_pack_layout()
    g = torch.Generator().manual_seed(5)
    for n, k in ((layout.block_rows * 2 + 64, 96), (layout.block_rows, 64)):
        codes, scale, zero = quantize_int4(torch.randn(n, k, generator=g) * 3, 32, KERNEL_DTYPE)
        scale[1, 0] = float("nan")
        weight = Int4Weight(n, k, torch.float32)
        weight.load_codes(codes, scale, zero)
        wide = int4_dequantize_rows(weight.packed, weight.scales_zeros, 0, torch.empty(k, n), layout)
        narrow = int4_dequantize_rows(weight.packed, weight.scales_zeros, 0,
                                      torch.empty(k, n, dtype=torch.bfloat16), layout)
        want = wide.bfloat16()
        assert torch.equal(torch.isnan(narrow), torch.isnan(want)) and torch.isnan(narrow[:32, 1]).all()
        keep = ~torch.isnan(want)
        assert torch.equal(narrow[keep].view(torch.int16), want[keep].view(torch.int16))


def test_int4_unpacking_follows_the_packers_other_layout():
    """torch packs int4 in a byte order set by the CPU's vector width; its plain kernels
    (ATEN_CPU_CAPABILITY=default, run in a process of their own) pair adjacent rows where AVX2 lays a
    block out in halves. The probe learns that form too, and the unpacking and the many-rows product
    stay exact there."""
    import os
    import subprocess
    import sys

    code = """
import torch
from offload.kernels import int4_dequantize_rows, int4_group_linear, int4_pack_layout
from offload.quant import KERNEL_DTYPE, Int4Weight, dequantize_int4, quantize_int4
layout = int4_pack_layout()
n, k = 80, 64
codes, scale, zero = quantize_int4(torch.randn(n, k, generator=torch.Generator().manual_seed(5)), 32, KERNEL_DTYPE)
weight = Int4Weight(n, k, torch.float32)
weight.load_codes(codes, scale, zero)
exact = dequantize_int4(codes, scale.bfloat16().float(), zero.bfloat16().float())
assert torch.equal(int4_dequantize_rows(weight.packed, weight.scales_zeros, 0, torch.empty(k, n), layout).t(), exact)
x = torch.randn(40, k)
assert torch.allclose(int4_group_linear(x, weight.packed, weight.scales_zeros, 32), x @ exact.t(), atol=1e-4, rtol=1e-4)
print(torch.backends.cpu.get_cpu_capability(), layout.block_rows, layout.paired)
"""
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": "default"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["DEFAULT", "32", "True"]


def test_int4_weight_store_records_whose_packer_laid_it_out(monkeypatch):
    """The int4 byte order follows the vector width torch's kernels run at: a weight store records
    it, so a store written on an AVX2 machine is rewritten, never misread, on an AVX-512 one (the
    store's layout check, tests/test_store_recovery.py)."""
    from offload.quant import stored_format

    formats = {}
    for capability in ("AVX2", "AVX512"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        formats[capability] = (stored_format("int4"), stored_format("int8"))
    assert formats["AVX2"][0] != formats["AVX512"][0] and "AVX2" in formats["AVX2"][0]
    assert formats["AVX2"][1] == formats["AVX512"][1] == "int8: groups of 32, float32 scale"


def test_a_files_scheme_follows_most_of_its_projection_weights():
    """weights='auto' holds a GGUF's projections in the scheme of most of their weights (a Q4_K_M
    file's Q6_K minority aside: quant.finer_projections); 5 to 8 bits int8; floats as loaded."""
    from offload.quant import scheme_for_file

    assert scheme_for_file({"Q4_1": 100}) == ("int4", "GGUF Q4_1 projections")
    scheme, words = scheme_for_file({"Q4_K": 830, "Q6_K": 170})
    assert scheme == "int4" and words == "GGUF Q4_K (83%), Q6_K (17%) projections"
    assert scheme_for_file({"Q5_0": 40, "Q8_0": 60})[0] == "int8"
    assert scheme_for_file({"Q4_0": 40, "Q8_0": 60})[0] == "int8"  # most weights need more than 4 bits
    assert scheme_for_file({"F16": 70, "Q8_0": 30})[0] is None
    assert scheme_for_file({"BF16": 10})[0] is None
