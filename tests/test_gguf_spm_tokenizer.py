"""SentencePiece-BPE vocabularies (Llama 2, Mistral GGUFs) rebuilt from GGUF tokens and scores."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_tiny_model
from test_gguf_formats import write_gguf

from offload import LLM

TEXT = ("the theory there then they thee\n  hello world! 123 naïve café 日本 🚀 tail end "
        "the hat that the thin")


def write_spm_gguf(path, hf_model):
    """A tiny llama GGUF whose tokenizer is SentencePiece BPE: scores, byte fallback, control tokens."""
    import gguf

    write_gguf(path, hf_model, "F32", np.random.default_rng(0))  # weights and llama metadata
    reader = gguf.GGUFReader(str(path))
    pieces = ["\u2581t", "he", "\u2581the", "\u2581th", "en", "\u2581then", "or", "y", "\u2581h", "at",
              "\u2581hat", "\u2581that", "in", "\u2581thin", "\u2581w", "\u2581he", "ll", "o", "\u2581hello"]
    letters = sorted(set("".join(p for p in pieces if p != "\u2581") + "abcdefghijklmnopqrstuvwxyz!\u2581"))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + letters + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * (len(letters) + len(pieces))
    scores = [0.0] * (3 + 256) + [-1000.0 - i for i in range(len(letters))] + [-float(i) for i in
                                                                              range(len(pieces))]
    vocab_size = hf_model.config.vocab_size
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    types += [5] * (vocab_size - len(types))
    scores += [-1e4] * (vocab_size - len(scores))
    w = gguf.GGUFWriter(str(path) + ".tmp", "llama")
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "general.architecture")) or key.startswith("tokenizer."):
            continue
        w.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1] if len(field.types) > 1
                        else None)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=list(t.data.shape), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    import os

    os.replace(str(path) + ".tmp", path)


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    hf = make_tiny_model(root / "hf", "llama", seed=3, vocab_size=400, hidden_size=64)
    path = root / "spm.gguf"
    write_spm_gguf(path, hf)
    return path


def test_spm_tokenizer_matches_transformers(spm_gguf):
    from transformers import AutoTokenizer

    ours = LLM(spm_gguf).tokenizer
    ref = AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
    ids = ours.encode(TEXT)
    assert ids == ref(TEXT)["input_ids"]
    assert ids[0] == 1  # BOS added, as add_bos_token says
    # Merges follow scores: "the" is one piece, unknown characters fall back to bytes.
    assert ours.encode("the", add_special_tokens=False) == [ours.backend.token_to_id("\u2581the")]
    assert ours.decode(ids) == ref.decode(ref(TEXT)["input_ids"], skip_special_tokens=True)
    assert ours.decode(ours.encode("naïve 🚀"), skip_special_tokens=True) == "naïve 🚀"


def test_spm_space_prefix_after_special_tokens(spm_gguf):
    """Like llama.cpp (and Llama 2's legacy tokenizer), text after a special token gets the space
    prefix again; transformers' GGUF converter prefixes only the first segment, so it is not the
    reference for this case."""
    tok = LLM(spm_gguf).tokenizer
    ids = tok.encode("<s>the", add_special_tokens=False)
    assert [tok.token_text(i) for i in ids] == ["<s>", "\u2581the"]
