"""Prompt caching: a long prompt's KV and its index structures saved to one verified store file.

Reading a book once and asking many questions about it should pay for the book's prefill and
index build once. :func:`save_prompt_cache` writes the prompt's token ids, every layer's K and V,
the last position's logits and every sparse layer's index state into one store file
(``offload.tiers.store``: aligned extents, checksums, atomic replacement). :func:`load_prompt_cache`
checks, before anything is used, that the file is intact (checksums), that it was made by the
same model weights, dtype, KV policy and selection settings, and hands back what the engine
restores; a prompt that extends the cached one then prefills only its new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelArgs
from .errors import InvalidRequestError, OffloadError
from .fingerprint import source_fingerprint
from .tiers.io import StoreReader
from .tiers.store import CorruptStoreError, StoreWriter

FORMAT = "offload-prompt-cache/1"


def model_fingerprint(args: ModelArgs, path: Path, dummy_seed: int | None = None) -> str:
    """Identifies the weights by their bytes: see :func:`offload.fingerprint.source_fingerprint`."""
    return source_fingerprint(args, path, dummy_seed)


@dataclass
class CachedPrompt:
    token_ids: list[int]
    k: torch.Tensor  # [L, Hkv, n, D]
    v: torch.Tensor  # [L, Hkv, n, D]
    logits: torch.Tensor  # [V] of the last prompt position
    index_states: dict[int, tuple[dict, dict[str, torch.Tensor]]]  # layer -> (scalars, tensors)


def save_prompt_cache(path: str | Path, *, fingerprint: str, dtype: torch.dtype, policy: str, settings: dict,
                      token_ids: list[int], k: torch.Tensor, v: torch.Tensor, logits: torch.Tensor,
                      index_states: dict[int, tuple[dict, dict[str, torch.Tensor]]]) -> Path:
    """Write one prompt cache file atomically. k, v [L, Hkv, n, D]; logits [V]."""
    meta = {"format": FORMAT, "fingerprint": fingerprint, "dtype": str(dtype), "policy": policy,
            "settings": settings, "token_ids": list(token_ids),
            "indexes": {str(layer): scalars for layer, (scalars, _) in index_states.items()}}
    with StoreWriter(path, metadata=meta) as w:
        w.add("k", k)
        w.add("v", v)
        w.add("logits", logits)
        for layer, (_, tensors) in index_states.items():
            for name, t in tensors.items():
                w.add(f"index/{layer}/{name}", t)
    return Path(path)


def load_prompt_cache(path: str | Path, *, fingerprint: str, dtype: torch.dtype, policy: str,
                      settings: dict, device: torch.device) -> CachedPrompt:
    """Read and verify a prompt cache made by the same model and settings."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"prompt cache not found: {path} (make one with LLM.save_prompt)")
    try:
        with StoreReader(path, device="cpu") as r:
            meta = r.metadata
            if meta.get("format") != FORMAT:
                raise OffloadError(f"{path} is not a prompt cache of this version ({meta.get('format')})")
            wanted = {"fingerprint": fingerprint, "dtype": str(dtype), "policy": policy, "settings": settings}
            for key, value in wanted.items():
                if meta.get(key) != value:
                    raise InvalidRequestError(
                        f"prompt cache {path} was made with a different {key} ({meta.get(key)!r}, this model has "
                        f"{value!r}): make it again with this model and settings")
            k, v, logits = r.read("k").to(device), r.read("v").to(device), r.read("logits").to(device)
            states = {}
            for layer, scalars in meta["indexes"].items():
                prefix = f"index/{layer}/"
                tensors = {name[len(prefix):]: r.read(name) for name in r.entries if name.startswith(prefix)}
                states[int(layer)] = (scalars, tensors)
    except CorruptStoreError as e:
        # Unlike a weight store, a prompt cache cannot be rebuilt from the model: only its maker knows the prompt.
        raise CorruptStoreError(path, e.reason or str(e), fix="save it again with LLM.save_prompt",
                                what="prompt cache") from None
    return CachedPrompt(meta["token_ids"], k, v, logits, states)
