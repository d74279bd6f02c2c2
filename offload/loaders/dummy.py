"""Dummy weights (vLLM's ``--load-format dummy``): any preset or config.json with seeded random weights.

Measures speed and memory at the shape of a model whose checkpoint is not here (Llama-3.1-8B,
Qwen2.5-7B, Mistral-7B). Random weights attend in unrealistic patterns, so accuracy is never
measured on them. Every tensor has its own generator, seeded from ``seed`` and the tensor's name:
the same seed gives the same weights whatever the placement (resident, host, disk) or device
order, so two runs of one configuration are comparable token for token.

Tensors go through :class:`~offload.loaders.weights.WeightAssembler` under their Hugging Face
names, exactly like a checkpoint's, so off-device layers are staged and spilled to their tier the
same way.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import ModelArgs
from ..model import Transformer
from ..tokenizer import Tokenizer
from .weights import WeightAssembler

# Hugging Face's initializer_range for Llama, Mistral and Qwen: keeps activations of a random
# model in a realistic range (no overflow in bf16), which is all a speed measurement needs.
INIT_STD = 0.02


def byte_tokenizer(args: ModelArgs) -> Tokenizer:
    """A byte-level tokenizer for a model that has none (a preset): every UTF-8 byte is one token,
    ids 0..255, so text prompts work for speed runs; ids above 255 decode to nothing."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for the bytes
    backend = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend=backend, bos_token_id=None, eos_token_ids=tuple(args.eos_token_ids))


def _fill(shape: tuple[int, ...], name: str, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)  # RMSNorm scales start at one
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, INIT_STD, generator=gen)


def load_dummy(args: ModelArgs, source: Path, device: torch.device, dtype: torch.dtype, seed: int = 0,
               progress: bool = True, offloaded: frozenset[int] = frozenset(),
               spill=None, quantize: str | None = None) -> tuple[Transformer, Tokenizer]:
    """Build ``args`` with random weights. ``source``: the config folder (its tokenizer.json is used
    when present) or the preset's name."""
    tokenizer = (Tokenizer.from_hf_folder(source, eos_token_ids=args.eos_token_ids)
                 if source.is_dir() and (source / "tokenizer.json").is_file() else byte_tokenizer(args))
    model = Transformer(args, device=device, dtype=dtype, offloaded=offloaded, staged_layers=bool(quantize))
    assembler = WeightAssembler(model, f"{source.name} (dummy weights)", spill, quantize)
    names = sorted(assembler.expected(), key=_load_order)
    for name in tqdm(names, desc="random weights", unit="tensor", disable=not progress or None):
        dest = assembler.target(name)
        # Generate where the tensor will live (fast on a GPU); off-device layers on the host (a resident
        # layer of a quantized load is meta here until its staging layer, on the device, is made).
        where = torch.device("cpu") if _load_order(name)[0] in offloaded else device
        assembler.put(name, _fill(tuple(dest.shape), name, seed, dtype, where))
    assembler.finish()
    return model, tokenizer


def _load_order(name: str) -> tuple[int, str]:
    """Layers in order (so each off-device layer is complete, spilled and freed before the next)."""
    parts = name.split(".")
    if name.startswith("model.layers."):
        return int(parts[2]), name
    return (-1 if "embed" in name else 1 << 30), name
