"""GGUF loading for every quantization type we promise, on tiny Llama files written here.

Each file is written like llama.cpp's converter writes one (q/k rows permuted for its RoPE layout,
metadata, a byte-level BPE vocabulary). Checks: (1) the weights we load equal an independent
dequantization of the stored bytes written from the ggml block layouts, and (2) our logits equal
transformers' loading the same file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from offload import LLM

QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]
QK_K = 256


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def reference_dequant(data: np.ndarray, qtype: str, rows: int, cols: int) -> np.ndarray:
    """ggml's dequantize_row_* for one tensor, from the block structs in ggml-common.h."""
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1)
    if qtype == "F32":
        return raw.view(np.float32).reshape(rows, cols)
    if qtype == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(rows, cols)
    if qtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(rows, cols)
    if qtype in ("Q8_0", "Q4_0", "Q4_1"):
        block = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype]
        b = raw.reshape(-1, block)
        d = _f16(b[:, 0:2])  # [nb, 1]
        if qtype == "Q8_0":
            return (d * b[:, 2:].view(np.int8).astype(np.float32)).reshape(rows, cols)
        qs = b[:, 2:] if qtype == "Q4_0" else b[:, 4:]  # [nb, 16]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32)  # [nb, 32]
        if qtype == "Q4_0":
            return (d * (q - 8)).reshape(rows, cols)
        return (d * q + _f16(b[:, 2:4])).reshape(rows, cols)
    if qtype == "Q4_K":
        b = raw.reshape(-1, 144)
        d, dmin, sc, qs = _f16(b[:, 0:2]), _f16(b[:, 2:4]), b[:, 4:16].astype(np.int32), b[:, 16:]
        scales, mins = np.zeros((len(b), 8)), np.zeros((len(b), 8))
        for j in range(8):  # get_scale_min_k4
            if j < 4:
                scales[:, j], mins[:, j] = sc[:, j] & 63, sc[:, j + 4] & 63
            else:
                scales[:, j] = (sc[:, j + 4] & 0xF) | ((sc[:, j - 4] >> 6) << 4)
                mins[:, j] = (sc[:, j + 4] >> 4) | ((sc[:, j] >> 6) << 4)
        out = np.zeros((len(b), QK_K), np.float32)
        for chunk in range(4):  # 64 values per chunk: low nibbles, then high nibbles
            q = qs[:, 32 * chunk:32 * chunk + 32]
            for half, vals in enumerate((q & 0xF, q >> 4)):
                j = 2 * chunk + half
                out[:, 64 * chunk + 32 * half:64 * chunk + 32 * half + 32] = (
                    d * scales[:, j:j + 1] * vals - dmin * mins[:, j:j + 1])
        return out.reshape(rows, cols)
    if qtype == "Q6_K":
        b = raw.reshape(-1, 210)
        ql, qh = b[:, :128].astype(np.int32), b[:, 128:192].astype(np.int32)
        sc, d = b[:, 192:208].view(np.int8).astype(np.float32), _f16(b[:, 208:210])
        out = np.zeros((len(b), QK_K), np.float32)
        for n in range(2):  # two halves of 128 values
            l_ = ql[:, 64 * n:64 * n + 64]
            h = qh[:, 32 * n:32 * n + 32]
            s = sc[:, 8 * n:8 * n + 8]
            q1 = (l_[:, :32] & 0xF) | (((h >> 0) & 3) << 4)
            q2 = (l_[:, 32:] & 0xF) | (((h >> 2) & 3) << 4)
            q3 = (l_[:, :32] >> 4) | (((h >> 4) & 3) << 4)
            q4 = (l_[:, 32:] >> 4) | (((h >> 6) & 3) << 4)
            for k, q in enumerate((q1, q2, q3, q4)):
                scale = np.repeat(s[:, [2 * k, 2 * k + 1]], 16, axis=1)  # is = l / 16
                out[:, 128 * n + 32 * k:128 * n + 32 * k + 32] = d * scale * (q - 32)
        return out.reshape(rows, cols)
    raise ValueError(qtype)


def _random_k_blocks(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """Valid K-quant bytes (the gguf library cannot quantize K types): random codes, small scales."""
    nb = rows * cols // QK_K
    if qtype == "Q4_K":
        b = rng.integers(0, 256, (nb, 144), dtype=np.uint8)
        b[:, 0:2] = np.full((nb, 1), 2e-3, np.float16).view(np.uint8)  # d
        b[:, 2:4] = np.full((nb, 1), 1e-2, np.float16).view(np.uint8)  # dmin
    else:
        b = rng.integers(0, 256, (nb, 210), dtype=np.uint8)
        b[:, 192:208] = rng.integers(-8, 9, (nb, 16)).astype(np.int8).view(np.uint8)
        b[:, 208:210] = np.full((nb, 1), 4e-3, np.float16).view(np.uint8)
    return b.reshape(rows, -1)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's permute of q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf_model, qtype: str, rng: np.random.Generator,
               types: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Write ``hf_model`` as a llama GGUF with 2-D weights in ``qtype`` (``types``: GGUF tensor name ->
    another type for it, a mixed file like Q4_K_M); returns the stored bytes by name."""
    import gguf
    from tokenizers import pre_tokenizers

    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<unk>", "<s>", "</s>"] + alphabet + ["Ġt", "he"]
    tokens += [f"<extra_{i}>" for i in range(cfg.vocab_size - len(tokens))]
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    stored = {}
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name in names:
            name = names[hf_name]
        else:
            _, _, i, *rest = hf_name.split(".")
            name = f"blk.{i}.{per_layer['.'.join(rest[:-1])]}.weight"
        data = tensor.float().numpy()
        if name.endswith("attn_q.weight"):
            data = _permute(data, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = _permute(data, cfg.num_key_value_heads)
        kind = (types or {}).get(name, qtype)
        if data.ndim == 1 or kind == "F32":
            w.add_tensor(name, np.ascontiguousarray(data))
            stored[name] = (np.ascontiguousarray(data), "F32")
            continue
        gtype = gguf.GGMLQuantizationType[kind]
        if kind in ("Q4_K", "Q6_K"):
            raw = _random_k_blocks(*data.shape, kind, rng)
        else:
            raw = gguf.quants.quantize(data, gtype)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gtype)
        stored[name] = (raw, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.fixture(scope="module")
def hf_256(tmp_path_factory):
    # Row lengths of 256 so that K-quant blocks fit; untied head so output.weight is exercised.
    return make_tiny_model(tmp_path_factory.mktemp("hf256"), "llama", seed=7, hidden_size=256,
                           intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                           initializer_range=0.05)


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_quant_type(qtype, hf_256, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"tiny-{qtype}.gguf"
    stored = write_gguf(path, hf_256, qtype, np.random.default_rng(0))
    llm = LLM(path, device="cpu", dtype="float32", weights="dequantize")
    cfg = hf_256.config

    # (1) weights: un-permuted rows of q, plain k/v/gate/down, against the independent dequantization.
    layer = llm.model.layers[1]
    q_size, kv_size = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads * cfg.num_key_value_heads
    raw, kind = stored["blk.1.attn_q.weight"]  # stored permuted: permuting ours back must give the bytes
    np.testing.assert_array_equal(_permute(layer.attn.wqkv[:q_size].numpy(), cfg.num_attention_heads),
                                  reference_dequant(raw, kind, q_size, cfg.hidden_size))
    raw, kind = stored["blk.1.attn_v.weight"]
    np.testing.assert_array_equal(layer.attn.wqkv[q_size + kv_size:].numpy(),
                                  reference_dequant(raw, kind, kv_size, cfg.hidden_size))
    raw, kind = stored["blk.1.ffn_down.weight"]
    np.testing.assert_array_equal(layer.mlp.w_down.numpy(),
                                  reference_dequant(raw, kind, cfg.hidden_size, cfg.intermediate_size))

    # (2) logits against transformers on the same file.
    ref_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    ids = torch.randint(3, cfg.vocab_size, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ref_model(ids).logits[0]
    ours = llm.logits(ids[0].tolist())
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("qtype,scheme", [("Q8_0", "int8"), ("Q6_K", "int8"), ("Q4_0", "int4"), ("Q4_1", "int4"),
                                          ("Q4_K", "int4")])
def test_gguf_tensors_held_quantized(qtype, scheme, hf_256, tmp_path):
    """A GGUF's tensors held quantized at run time (``quantize``) against an independent
    dequantization of the stored bytes. Q8_0 blocks are int8 groups of 32 exactly (codes and fp16
    scales, fp32 holding them), embeddings and head included: the logits are the dequantized
    path's. Q6_K: within half an int8 step of its group. Q4_x: int4 groups requantized between
    each group's least and largest value: within half a step of the held grid (exact up to the
    bf16 rounding of scale and zero where both ends of the 4-bit range occur, as in every Q4_1
    block), the logits close to the dequantized path's. Q4_x: the file's own codes, read from its
    blocks (offload.loaders.gguf_blocks), with their scale and zero rounded to bf16 as the kernel
    holds them."""
    path = tmp_path / f"tiny-{qtype}.gguf"
    stored = write_gguf(path, hf_256, qtype, np.random.default_rng(1))
    held = LLM(path, quantize=scheme, dtype="float32", verbose=False)
    cfg = hf_256.config
    raw, kind = stored["blk.1.ffn_down.weight"]
    ref = torch.from_numpy(reference_dequant(raw, kind, cfg.hidden_size, cfg.intermediate_size))  # [N, K]
    weight = held.model.layers[1].mlp.w_down
    got = weight.dequantize().float()  # [N, K] as the kernel computes with it
    group_max = ref.reshape(ref.shape[0], -1, 32).abs().amax(-1).repeat_interleave(32, dim=1)  # [N, K]
    ids = torch.randint(3, cfg.vocab_size, (48,), generator=torch.Generator().manual_seed(3)).tolist()
    ours, dense = held.logits(ids), LLM(path, dtype="float32", weights="dequantize", verbose=False).logits(ids)
    if qtype == "Q8_0":
        assert torch.equal(got, ref)
        assert (ours - dense).abs().max().item() <= 1e-4 * dense.abs().max().item()
    elif qtype == "Q6_K":
        # (these random K blocks draw each 16-weight sub-block's scale at random, so a group's two
        # halves may differ a hundredfold: the logits are not compared)
        assert ((got - ref).abs() <= group_max / 254 + 1e-7).all()
    else:
        from offload.loaders.gguf_blocks import int4_groups

        codes, scale, zero = (torch.from_numpy(a) for a in int4_groups(raw, qtype))  # the file's
        scale, zero = (t.to(torch.bfloat16).float().repeat_interleave(32, dim=1) for t in (scale, zero))  # [N, K]
        torch.testing.assert_close(got, (codes.float() - 8) * scale + zero, rtol=1e-6, atol=1e-7)
        assert ((got - ref).abs() <= group_max * 2 ** -6 + 1e-6).all()  # the bf16 rounding alone
        assert (ours - dense).abs().max().item() <= 0.02 * dense.abs().max().item()


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_gguf_blocks_held_as_read_stream_from_disk_the_same(qtype, tmp_path, monkeypatch):
    """Layers spilled to the disk store take the same codes from a file's blocks as resident ones:
    edge mode's logits equal the resident model's, bit for bit."""
    from offload.quant import layer_nbytes
    from offload.tiers import planner as planner_mod

    monkeypatch.setattr(planner_mod, "RUNTIME_RESERVE", 0)
    hf = make_tiny_model(tmp_path / "hf", "llama", seed=11, hidden_size=256, intermediate_size=512,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300, initializer_range=0.05,
                         num_hidden_layers=5)
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(path, hf, qtype, np.random.default_rng(3))
    scheme = "int4" if qtype == "Q4_1" else "int8"
    resident = LLM(path, quantize=scheme, max_context=64, verbose=False)
    args = resident.args
    layer = layer_nbytes(args, 2, scheme)
    held = resident.tier_report()["weights"]["resident_bytes"]
    # room for one resident layer and two streaming buffers: two layers on disk
    budget = held - (args.num_layers - 3) * layer + layer // 2 + args.kv_bytes_per_token(2) * 64 + 2**16
    streamed = LLM(path, quantize=scheme, max_context=64, cpu_memory=budget, disk_dir=tmp_path / "store",
                   verbose=False)
    assert "disk" in streamed.placement.layer_tiers
    ids = list(range(5, 45))
    assert torch.equal(streamed.logits(ids), resident.logits(ids))
    streamed.close()


@pytest.mark.parametrize("qtype,scheme", [("F16", None), ("Q8_0", "int8"), ("Q6_K", "int8"), ("Q4_1", "int4"),
                                          ("Q4_K", "int4")])
def test_gguf_weights_auto_keep_the_files_form(qtype, scheme, hf_256, tmp_path, capsys):
    """The default, weights='auto', on the CPU: a GGUF's projections stay quantized in the scheme
    nearest their blocks (4-bit types int4, 5 to 8 bits int8), computing as ``quantize=`` that
    scheme does, bit for bit; a float file loads as it is. ``weights='dequantize'`` is the exact
    path; on a GPU the file stays quantized too (the Triton kernels) and the plan says so."""
    from offload import EngineConfig
    from offload.cli import main

    path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(path, hf_256, qtype, np.random.default_rng(2))
    auto = LLM(path, verbose=False)
    resolved = auto.runtime.resolved
    assert resolved.quantize == scheme
    assert auto.tier_report()["weights"]["format"] == (scheme or "float32")
    ids = torch.randint(3, hf_256.config.vocab_size, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    same = LLM(path, quantize=scheme, verbose=False) if scheme else LLM(path, weights="dequantize", verbose=False)
    assert torch.equal(auto.logits(ids), same.logits(ids))
    if scheme is None:
        assert resolved.weights_note is None and resolved.dtype == torch.float32
        return
    assert resolved.dtype == torch.bfloat16 and f"{qtype} projections: held in {scheme}" in resolved.weights_note
    exact = LLM(path, weights="dequantize", verbose=False).runtime.resolved
    assert exact.quantize is None and exact.dtype == torch.float32
    on_gpu = EngineConfig(model=path, device="cuda").resolve(planning=True)
    assert on_gpu.quantize == scheme and on_gpu.dtype == torch.bfloat16 and f"held in {scheme}" in on_gpu.weights_note
    assert main(["plan", "--model", str(path), "--device", "cpu"]) == 0
    assert f"weights auto -> {scheme}: GGUF {qtype} projections" in capsys.readouterr().out
    assert main(["plan", "--model", str(path), "--device", "cpu", "--weights", "dequantize"]) == 0
    assert "weights auto" not in capsys.readouterr().out


def test_q4_k_m_like_file_keeps_its_finer_projections_in_int8(hf_256, tmp_path):
    """A Q4_K_M-like file (Q4_K, with Q6_K value and down projections in some layers): weights='auto'
    holds its int4 majority in int4 and each fused weight with a Q6_K part in int8, which keeps those
    tensors within half an int8 step where int4 would requantize them; the logits are nearer the
    dequantized file's than all-int4's, and the planner, the tier report and the start-up line count
    the int8 bytes. Under budgets (layers may stream) they are requantized to int4, and said so."""
    from offload import EngineConfig
    from offload.quant import Int4Weight, Int8Weight, finer_nbytes

    path = tmp_path / "tiny-Q4_K_M.gguf"
    finer = {"blk.0.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K", "blk.1.ffn_down.weight": "Q6_K"}
    write_gguf(path, hf_256, "Q4_K", np.random.default_rng(5), types=finer)
    auto = LLM(path, device="cpu", verbose=False)
    int4 = LLM(path, device="cpu", quantize="int4", verbose=False)  # asked for: every projection int4
    exact = LLM(path, device="cpu", dtype="bfloat16", weights="dequantize", verbose=False)
    resolved = auto.runtime.resolved
    held = {(0, "wqkv"), (0, "w_down"), (1, "w_down")}
    assert resolved.quantize == "int4" and resolved.int8_projections == held
    assert "the 3 fused projections with Q6_K tensors in int8" in resolved.weights_note
    layers = auto.model.layers
    for i, layer in enumerate(layers):
        for owner, name in ((layer.attn, "wqkv"), (layer.attn, "wo"), (layer.mlp, "w_gate_up"), (layer.mlp, "w_down")):
            assert isinstance(getattr(owner, name), Int8Weight if (i, name) in held else Int4Weight), (i, name)
    # the Q6_K tensors: within half an int8 step in int8, several times further in int4
    want = exact.model.layers[1].mlp.w_down.float()
    err8 = (layers[1].mlp.w_down.dequantize().float() - want).abs().max().item()
    err4 = (int4.model.layers[1].mlp.w_down.dequantize().float() - want).abs().max().item()
    assert err8 * 4 < err4
    extra = finer_nbytes(auto.args, resolved.int8_projections)
    assert extra > 0 and resolved.placement.fixed_device_bytes - int4.runtime.resolved.placement.fixed_device_bytes == extra
    weights_ms = [r.placement.step_breakdown_ms["weights"] for r in (resolved, int4.runtime.resolved)]
    assert weights_ms[0] > weights_ms[1]  # the step reads the int8 parts too
    assert auto.tier_report()["weights"]["resident_bytes"] - int4.tier_report()["weights"]["resident_bytes"] == extra
    assert auto.runtime.fingerprint != int4.runtime.fingerprint  # prompt caches of either are not the other's
    roomy = EngineConfig(model=path, device="cpu", cpu_memory="1GiB", disk_dir=tmp_path, max_context=64)
    resident = roomy.resolve(planning=True)  # a budget every layer fits in: nothing streams, int8 kept
    assert resident.int8_projections == held and set(resident.placement.layer_tiers) == {"device"}
    tight = roomy.replace(cpu_memory=resident.placement.tier_bytes()["device"] - 1)  # all int4 fits, not with int8
    requantized = tight.resolve(planning=True)
    assert requantized.quantize == "int4" and not requantized.int8_projections
    assert set(requantized.placement.layer_tiers) == {"device"}
    assert "Q6_K requantized to int4 (this budget does not hold" in requantized.weights_note
    # logits, on a file of real weights (the K-quant blocks above are random): Q4_0 with Q8_0 value and
    # down projections (as Qwen's Q4_K_M files have), the Q8_0 blocks read straight into int8
    path = tmp_path / "tiny-Q4_0-Q8_0.gguf"
    write_gguf(path, hf_256, "Q4_0", np.random.default_rng(5),
               types={f"blk.{i}.{n}.weight": "Q8_0" for i in range(2) for n in ("attn_v", "ffn_down")})
    auto, int4 = LLM(path, device="cpu", verbose=False), LLM(path, device="cpu", quantize="int4", verbose=False)
    assert auto.runtime.resolved.int8_projections == {(i, n) for i in range(2) for n in ("wqkv", "w_down")}
    ids = torch.randint(3, hf_256.config.vocab_size, (40,), generator=torch.Generator().manual_seed(6)).tolist()
    ref = LLM(path, device="cpu", dtype="bfloat16", weights="dequantize", verbose=False).logits(ids)
    assert (auto.logits(ids) - ref).abs().max() * 4 < (int4.logits(ids) - ref).abs().max()  # measured 0.066 vs 0.53


def test_mixed_gguf_writer_follows_llama_cpps_more_bits_layers(hf_256, tmp_path):
    """profiles/mixed_gguf: a copy of a file with Q4_K_M's layout of types (finer value and down
    projections in the more-bits layers), which loads with those in int8."""
    from offload.loaders import read_projection_types
    from offload.profiles.mixed_gguf import more_bits, write_mixed

    assert [i for i in range(32) if more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    source, mixed = tmp_path / "tiny-Q8_0.gguf", tmp_path / "tiny-mixed.gguf"
    write_gguf(source, hf_256, "Q8_0", np.random.default_rng(1))
    (tmp_path / ".tiny-mixed.gguf.999999999.tmp").write_bytes(b"half")  # a killed run's leftover
    write_mixed(source, mixed)
    types = read_projection_types(mixed)
    finer = {name for name, (kind, _) in types.items() if kind == "Q8_0"}
    assert finer == {"model.layers.1.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight"}  # 2 layers
    assert {kind for name, (kind, _) in types.items() if name not in finer} == {"Q4_0"}
    llm = LLM(mixed, device="cpu", verbose=False)
    assert llm.runtime.resolved.int8_projections == {(1, "wqkv"), (1, "w_down")}
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left beside it
