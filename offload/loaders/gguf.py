"""Loads a GGUF file (llama.cpp's format): the header read by :class:`GGUFFile`, the blocks
dequantized by the ``gguf`` library.

Hyper-parameters come from the metadata, tensors are dequantized to the compute dtype one at a
time (any type the library can dequantize: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, ...),
and the tokenizer is rebuilt from the GGUF vocabulary with the ``tokenizers`` library so that it
splits text exactly as llama.cpp does for the file's pre-tokenizer type.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import ModelArgs, RopeScaling
from ..errors import ModelLoadError, UnsupportedModelError
from ..model import Transformer
from ..tokenizer import Tokenizer
from .gguf_blocks import INT4_BLOCK_TYPES, INT8_BLOCK_TYPES, int4_groups, int8_groups
from .gguf_file import GGUFFile
from .weights import WeightAssembler

# GGUF architecture name -> our family. Mistral v0.x files are written as "llama".
_ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# GGUF tensor names -> Hugging Face names (the per-layer part).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}

# llama.cpp's pre-tokenizer regexes by `tokenizer.ggml.pre` (llama-vocab.cpp), applied in order.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
                 r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
                r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {  # name -> (regexes, ignore_merges)
    "default": ([_GPT2_REGEX], False),
    "gpt-2": ([_GPT2_REGEX], False),
    "smollm": ([r"\p{N}", _GPT2_REGEX], False),
    "starcoder": ([r"\p{N}", _GPT2_REGEX], False),
    "refact": ([r"\p{N}", _GPT2_REGEX], False),
    "llama3": ([_LLAMA3_REGEX], True),
    "llama-v3": ([_LLAMA3_REGEX], True),
    "llama-bpe": ([_LLAMA3_REGEX], True),
    "smaug-bpe": ([_LLAMA3_REGEX], False),
    "qwen2": ([_QWEN2_REGEX], False),
    "deepseek-r1-qwen": ([_QWEN2_REGEX], False),
}
_CONTROL, _USER_DEFINED = 3, 4


def _open(path: Path) -> GGUFFile:
    return GGUFFile(path)


def _fields(reader: GGUFFile) -> dict[str, Any]:
    """The metadata but the tokenizer's large arrays (read on demand)."""
    return {key: value for key, value in reader.fields.items()
            if not (key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "scores", "token_type", "merges")))}


def args_from_gguf(meta: dict[str, Any], tensor_names: set[str], reader, source: str) -> ModelArgs:
    arch_name = meta.get("general.architecture")
    if arch_name not in _ARCHES:
        raise UnsupportedModelError(f"{source}: unsupported architecture '{arch_name}': offload runs llama, "
                                    f"mistral, qwen2 and qwen3 GGUF files")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = meta.get(f"{arch_name}.{key}", default)
        if required and value is None:
            raise ModelLoadError(f"{source}: GGUF metadata lacks {arch_name}.{key}")
        return value

    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    head_dim = int(get("attention.key_length", hidden // heads))
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"])
    scaling = None
    kind = get("rope.scaling.type")
    if "rope_freqs.weight" in tensor_names:
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        scaling = RopeScaling("freq_factors", freq_factors=tuple(float(x) for x in np.asarray(t.data).ravel()))
    elif kind in ("linear", "yarn"):
        scaling = RopeScaling(kind, factor=float(get("rope.scaling.factor", 1.0)),
                              original_max_position_embeddings=int(get("rope.scaling.original_context_length",
                                                                       get("context_length", 4096))))
    elif kind not in (None, "none"):
        raise UnsupportedModelError(f"{source}: rope scaling type '{kind}' is not supported")
    eos = [meta.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id")]
    return ModelArgs(
        architecture=_ARCHES[arch_name],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_layers=int(get("block_count", required=True)),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 4096)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm=_ARCHES[arch_name] == "qwen3",
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        name=str(meta.get("general.name", "")),
    )


_PROJECTIONS = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_gate.weight",
                "ffn_up.weight", "ffn_down.weight")


def projection_tensors(reader) -> dict[str, tuple[str, int]]:
    """The decoder layers' projection weights by Hugging Face name: (block type name, weights)."""
    return {_hf_name(t.name): (t.tensor_type.name, int(t.n_elements)) for t in reader.tensors
            if t.name.startswith("blk.") and t.name.endswith(_PROJECTIONS)}


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp permutes Llama's q/k rows for its interleaved RoPE; undo it for rotate-half RoPE."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.match(r"^blk\.(\d+)\.(.+)$", name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def build_tokenizer(reader, meta: dict[str, Any], source: str) -> Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    model_kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ModelLoadError(f"{source}: GGUF file has no tokenizer vocabulary")
    tokens: list[str] = reader.fields["tokenizer.ggml.tokens"]
    types = (reader.fields["tokenizer.ggml.token_type"] if "tokenizer.ggml.token_type" in reader.fields
             else [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if model_kind == "gpt2":
        pre_name = meta.get("tokenizer.ggml.pre", "default")
        if pre_name not in _PRE_TOKENIZERS:
            raise UnsupportedModelError(f"{source}: GGUF pre-tokenizer '{pre_name}' is not supported; supported: "
                                        f"{', '.join(sorted(_PRE_TOKENIZERS))}")
        regexes, ignore_merges = _PRE_TOKENIZERS[pre_name]
        merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"]]
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
    elif model_kind == "llama":
        # SentencePiece BPE (Llama 2, Mistral): merges follow the pieces' scores.
        scores = reader.fields["tokenizer.ggml.scores"]
        ranked = []
        for piece, score in zip(tokens, scores):
            pairs = [(piece[:i], piece[i:]) for i in range(1, len(piece))
                     if piece[:i] in vocab and piece[i:] in vocab]
            ranked += [(-score, vocab[l], vocab[r], l, r) for l, r in pairs]
        merges = [(l, r) for *_, l, r in sorted(ranked)]
        unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk], fuse_unk=True,
                                         byte_fallback=True))
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        backend.normalizer = normalizers.Sequence(
            ([normalizers.Prepend("\u2581")] if prefix else []) + [normalizers.Replace(" ", "\u2581")])
        backend.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    else:
        raise UnsupportedModelError(f"{source}: GGUF tokenizer model '{model_kind}' is not supported (gpt2 and "
                                    f"llama are)")
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False)
                                for tok, kind in zip(tokens, types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(tok, special=False, normalized=False)
                        for tok, kind in zip(tokens, types) if kind == _USER_DEFINED])
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", model_kind == "llama")
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                               special_tokens=[(bos, bos_id)])
    eos_ids = tuple(int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                           "tokenizer.ggml.eom_token_id") if meta.get(k) is not None)
    return Tokenizer(backend=backend, bos_token_id=bos_id, eos_token_ids=tuple(dict.fromkeys(eos_ids)),
                     chat_template=meta.get("tokenizer.chat_template"),
                     bos_token=tokens[bos_id] if bos_id is not None else "",
                     eos_token=tokens[eos_ids[0]] if eos_ids else "")


DEQUANT_ROWS = 4096  # rows per block when dequantizing a large tensor
_TABLES = ("model.embed_tokens.weight", "lm_head.weight")


def _held_form(name: str, block_type: str, scheme: str | None):
    """The reader that turns this tensor's blocks into the form the model holds it in (int4 or int8
    groups), or None when it goes through floats: a projection weight whose blocks are the
    scheme's (Q4_0/Q4_1/Q4_K for int4, Q8_0 for int8), a Q8_0 embedding table or LM head when the
    model is quantized (its tables are int8 either way)."""
    if scheme is None:
        return None
    if name in _TABLES:
        return int8_groups if block_type in INT8_BLOCK_TYPES else None
    if not name.endswith(("_proj.weight",)):
        return None
    if scheme == "int4" and block_type in INT4_BLOCK_TYPES:
        return int4_groups
    if scheme == "int8" and block_type in INT8_BLOCK_TYPES:
        return int8_groups
    return None


def _dequantize(data: np.ndarray, t, path: Path) -> np.ndarray:
    import gguf

    try:
        array = gguf.quants.dequantize(data, t.tensor_type)
    except NotImplementedError:
        raise UnsupportedModelError(f"{path}: tensor {t.name} has quantization type {t.tensor_type.name}, "
                                    f"which the gguf library cannot dequantize") from None
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not array.flags.writeable:  # F32 tensors are read-only views of the memory map
        array = array.copy()
    return array


def load_gguf(path: Path, device: torch.device, dtype: torch.dtype,
              progress: bool = True, offloaded: frozenset[int] = frozenset(),
              spill=None, quantize: str | None = None,
              int8_projections: frozenset[tuple[int, str]] = frozenset()) -> tuple[Transformer, Tokenizer]:
    """``int8_projections``: resident layers' fused weights held in int8 in a quantized load (the
    file's finer ones: offload.quant.finer_projections)."""
    reader = _open(path)
    meta = _fields(reader)
    names = {t.name for t in reader.tensors}
    args = args_from_gguf(meta, names, reader, str(path))
    tokenizer = build_tokenizer(reader, meta, str(path))
    model = Transformer(args, device=device, dtype=dtype, offloaded=offloaded, staged_layers=bool(quantize))
    assembler = WeightAssembler(model, str(path), spill, quantize, int8_projections)
    permute = args.architecture == "llama"  # qwen files keep the NeoX (rotate-half) layout
    for t in tqdm(reader.tensors, desc="dequantizing", unit="tensor", disable=not progress or None):
        name = _hf_name(t.name)
        if name is None:
            continue
        is_qk = name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"))
        data = t.data
        form = _held_form(name, t.tensor_type.name, assembler.scheme_of(name))
        if form is not None:  # blocks straight into the form the model holds: no float copy
            parts = [torch.from_numpy(p) for p in form(data, t.tensor_type.name)]
            if permute and is_qk:
                heads = args.num_heads if name.endswith("q_proj.weight") else args.num_kv_heads
                parts = [_unpermute_rope(p, heads) for p in parts]
            assembler.put_codes(name, tuple(parts))
            reader.release(t)
            continue
        if data.ndim == 2 and data.shape[0] > DEQUANT_ROWS and not (permute and is_qk):
            # Large tensors (the embedding) are dequantized in row blocks straight into place.
            for r0 in range(0, data.shape[0], DEQUANT_ROWS):
                block = _dequantize(data[r0:r0 + DEQUANT_ROWS], t, path)  # [rows, cols] fp32
                assembler.put(name, torch.from_numpy(block), rows=(r0, r0 + block.shape[0]))
            reader.release(t)
            continue
        tensor = torch.from_numpy(_dequantize(data, t, path))
        if tensor.dim() == 2 and tensor.shape[0] == 1 and name.endswith(("norm.weight", "bias")):
            tensor = tensor[0]
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _unpermute_rope(tensor, args.num_heads)
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _unpermute_rope(tensor, args.num_kv_heads)
        assembler.put(name, tensor)
        reader.release(t)  # its bytes were converted: the model holds them now
    assembler.finish()
    return model, tokenizer
