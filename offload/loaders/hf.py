"""Loads a Hugging Face model folder: config.json, (sharded) *.safetensors, tokenizer files.

Tensors are read one at a time from memory-mapped safetensors files, converted to the compute
dtype and copied into place, so loading never holds two copies of the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import ModelArgs
from ..errors import ModelLoadError
from ..model import Transformer
from ..tokenizer import Tokenizer
from .weights import WeightAssembler


def read_config(folder: Path) -> ModelArgs:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no config.json here; a Hugging Face model folder needs config.json, "
                             f"*.safetensors and tokenizer.json (or pass a .gguf file)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    args = ModelArgs.from_hf_config(cfg, source=str(path))
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        try:
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{gen_path}: not valid JSON ({e})") from None
        eos = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        merged = tuple(dict.fromkeys([*args.eos_token_ids, *(int(e) for e in eos)]))
        args = args.replace(eos_token_ids=merged)
    return args


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shards listed in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        extra = " (PyTorch .bin checkpoints are not supported: convert them to safetensors)" if any(
            folder.glob("*.bin")) else ""
        raise ModelLoadError(f"{folder}: no *.safetensors weights found{extra}")
    return files


def load_hf_folder(folder: Path, device: torch.device, dtype: torch.dtype,
                   progress: bool = True, offloaded: frozenset[int] = frozenset(),
                   spill=None, quantize: str | None = None) -> tuple[Transformer, Tokenizer]:
    from safetensors import SafetensorError, safe_open

    args = read_config(folder)
    tokenizer = Tokenizer.from_hf_folder(folder, eos_token_ids=args.eos_token_ids)
    files = safetensors_files(folder)
    model = Transformer(args, device=device, dtype=dtype, offloaded=offloaded, staged_layers=bool(quantize))
    assembler = WeightAssembler(model, str(folder), spill, quantize)
    bar = tqdm(total=len(files), desc="loading weights", unit="file", disable=not progress or None)
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    assembler.put(name, f.get_tensor(name))
        except SafetensorError as e:
            raise ModelLoadError(f"{path}: cannot read safetensors ({e}); the file is truncated or corrupt, "
                                 f"download it again") from None
        bar.update(1)
    bar.close()
    assembler.finish()
    return model, tokenizer
