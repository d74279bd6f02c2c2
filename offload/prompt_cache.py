"""Prompt caching: a long prompt's KV and its index structures saved to one verified store file.

Reading a book once and asking many questions about it should pay for the book's prefill and
index build once. :func:`save_prompt_cache` writes the prompt's token ids, every layer's K and V,
the last position's logits and every sparse layer's index state into one store file
(``offload.tiers.store``: aligned extents, checksums, atomic replacement). :func:`load_prompt_cache`
checks, before anything is used, that the file is intact (checksums), that it was made by the
same model weights, dtype, KV policy and selection settings, and hands back what the engine
restores; a prompt that extends the cached one then prefills only its new tokens. The KV goes a
layer at a time both ways, so a prompt whose KV is larger than memory (the KV's disk tier) is
saved and restored within the memory budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelArgs
from .errors import InvalidRequestError, OffloadError
from .fingerprint import source_fingerprint
from .tiers.io import StoreReader
from .tiers.store import CorruptStoreError, StoreWriter

# /2: each layer's K and V an entry of its own (read a layer at a time); /3: cluster centroids [Hkv, C, D] bf16
FORMAT = "offload-prompt-cache/3"


def model_fingerprint(args: ModelArgs, path: Path, dummy_seed: int | None = None) -> str:
    """Identifies the weights by their bytes: see :func:`offload.fingerprint.source_fingerprint`."""
    return source_fingerprint(args, path, dummy_seed)


class PromptKV:
    """A prompt cache's K and V, read a layer at a time: a long prompt's whole KV (more than memory
    holds, where the KV lives on disk) is never in memory at once. The file stays open, so a cache
    saved again under the same name meanwhile does not change what is read; every layer read is
    checked against its checksums (the whole file was, too, when it was loaded)."""

    def __init__(self, path: Path, reader: StoreReader, num_layers: int):
        self.path, self._reader, self.num_layers = path, reader, num_layers

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [Hkv, n, D] of ``layer``, on the host."""
        try:
            return self._reader.read(f"k/{layer}"), self._reader.read(f"v/{layer}")
        except CorruptStoreError as e:
            raise _corrupt(self.path, e) from None

    def layers(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(K, V) of each layer in order, each read when it is asked for."""
        return (self.layer(layer) for layer in range(self.num_layers))


@dataclass
class CachedPrompt:
    token_ids: list[int]
    kv: PromptKV  # read a layer at a time
    logits: torch.Tensor  # [V] of the last prompt position
    index_states: dict[int, tuple[dict, dict[str, torch.Tensor]]]  # layer -> (scalars, tensors)


def save_prompt_cache(path: str | Path, *, fingerprint: str, dtype: torch.dtype, policy: str, settings: dict,
                      token_ids: list[int], layers: Iterable[tuple[torch.Tensor, torch.Tensor]], logits: torch.Tensor,
                      index_states: dict[int, tuple[dict, dict[str, torch.Tensor]]]) -> Path:
    """Write one prompt cache file atomically. ``layers``: each layer's (k, v) [Hkv, n, D] in order,
    written as it comes (a generator reads one layer from the store at a time); logits [V]."""
    meta = {"format": FORMAT, "fingerprint": fingerprint, "dtype": str(dtype), "policy": policy,
            "settings": settings, "token_ids": list(token_ids),
            "indexes": {str(layer): scalars for layer, (scalars, _) in index_states.items()}}
    with StoreWriter(path, metadata=meta) as w:
        num_layers = 0
        for layer, (k, v) in enumerate(layers):
            w.add(f"k/{layer}", k)
            w.add(f"v/{layer}", v)
            num_layers += 1
        w.metadata["num_layers"] = num_layers
        w.add("logits", logits)
        for layer, (_, tensors) in index_states.items():
            for name, t in tensors.items():
                w.add(f"index/{layer}/{name}", t)
    return Path(path)


def load_prompt_cache(path: str | Path, *, fingerprint: str, dtype: torch.dtype, policy: str,
                      settings: dict, device: torch.device) -> CachedPrompt:
    """Open and verify a prompt cache made by the same model and settings: every extent is checked
    (a piece at a time) before anything is used; the KV is then read a layer at a time
    (:class:`PromptKV`), the logits and index states now."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"prompt cache not found: {path} (make one with LLM.save_prompt)")
    reader = None
    try:
        reader = StoreReader(path, device="cpu")
        meta = reader.metadata
        if meta.get("format") != FORMAT:
            raise OffloadError(f"{path} is not a prompt cache of this version ({meta.get('format')}, this one reads "
                               f"{FORMAT}): save it again with LLM.save_prompt")
        wanted = {"fingerprint": fingerprint, "dtype": str(dtype), "policy": policy, "settings": settings}
        for key, value in wanted.items():
            if meta.get(key) != value:
                raise InvalidRequestError(
                    f"prompt cache {path} was made with a different {key} ({meta.get(key)!r}, this model has "
                    f"{value!r}): make it again with this model and settings")
        reader.verify()
        logits = reader.read("logits").to(device)
        states = {}
        for layer, scalars in meta["indexes"].items():
            prefix = f"index/{layer}/"
            tensors = {name[len(prefix):]: reader.read(name) for name in reader.entries if name.startswith(prefix)}
            states[int(layer)] = (scalars, tensors)
    except CorruptStoreError as e:
        if reader is not None:
            reader.close()
        raise _corrupt(path, e) from None
    except BaseException:
        if reader is not None:
            reader.close()
        raise
    return CachedPrompt(meta["token_ids"], PromptKV(path, reader, meta["num_layers"]), logits, states)


def _corrupt(path: Path, e: CorruptStoreError) -> CorruptStoreError:
    # Unlike a weight store, a prompt cache cannot be rebuilt from the model: only its maker knows the prompt.
    return CorruptStoreError(path, e.reason or str(e), fix="save it again with LLM.save_prompt", what="prompt cache")
