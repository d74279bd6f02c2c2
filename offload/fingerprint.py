"""Which weights a weight store or prompt cache was made from: a digest of the model's bytes.

A fingerprint that looked only at file names and sizes would let a different model file of the
same name and size (a re-quantization, a fine-tune saved over the old one) silently reuse the old
file's weight store or prompt caches. :func:`source_fingerprint` hashes the bytes instead: the
whole GGUF file, or every ``*.safetensors`` file and ``config.json`` of a Hugging Face folder.

Hashing costs a full read of the model, so each file's digest is cached in a small JSON sidecar
under ``$XDG_CACHE_HOME/offload/fingerprints/`` (``~/.cache`` by default), keyed by the file's
absolute path, size, mtime_ns and inode: a later load costs a ``stat``, and a file that was
replaced or rewritten (any of those changes) is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from .config import ModelArgs
from .fileio import cache_root, write_json_atomic

# SHA-256 over 8 MiB chunks: with the CPU's SHA extensions OpenSSL hashes the default 98 MB GGUF at
# ~1.1 GB/s from the page cache, against ~0.41 GB/s for blake2b (measured on a 2-core x86 VM), so
# the first load of that model pays ~0.09 s and later ones a stat.
HASH = "sha256"
CHUNK = 8 << 20
MAX_SIDECARS = 512  # past this many, sidecars of files that no longer exist are pruned


def cache_dir() -> Path:
    return cache_root() / "fingerprints"


def _hash_file(path: Path) -> str:
    """The hex digest of every byte of ``path`` (one reusable 8 MiB buffer; hashlib releases the GIL)."""
    h = hashlib.new(HASH)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _sidecar(path: Path) -> Path:
    return cache_dir() / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")


def _prune(folder: Path) -> None:
    """Drop sidecars whose file is gone (test models in temporary folders leave many behind)."""
    sidecars = list(folder.glob("*.json"))
    if len(sidecars) <= MAX_SIDECARS:
        return
    for s in sidecars:
        try:
            if not Path(json.loads(s.read_text())["path"]).exists():
                s.unlink()
        except (OSError, ValueError, KeyError, TypeError):
            s.unlink(missing_ok=True)


def file_digest(path: str | Path) -> str:
    """The digest of one file's bytes, from its sidecar when the file is unchanged since it was hashed."""
    path = Path(path).absolute()
    key = {"path": str(path), "hash": HASH, **_stat_key(path.stat())}
    sidecar = _sidecar(path)
    try:
        doc = json.loads(sidecar.read_text())
        if {k: doc.get(k) for k in key} == key and isinstance(doc.get("digest"), str):
            return doc["digest"]
    except (OSError, ValueError):
        pass  # no sidecar yet, or an unreadable one: hash again and replace it
    digest = _hash_file(path)
    if _stat_key(path.stat()) == {k: key[k] for k in ("size", "mtime_ns", "inode")}:  # not changed while hashed
        try:
            write_json_atomic(sidecar, {**key, "digest": digest})
            _prune(sidecar.parent)
        except OSError:
            pass  # a read-only or full cache only costs the next load another hash
    return digest


def source_files(path: Path) -> list[Path]:
    """The files whose bytes are the model: a GGUF file itself, or a folder's safetensors and config."""
    if not path.is_dir():
        return [path]
    return sorted(path.glob("*.safetensors")) + [f for f in [path / "config.json"] if f.is_file()]


def source_fingerprint(args: ModelArgs, path: str | Path, dummy_seed: int | None = None) -> str:
    """Identifies the weights: the architecture plus a digest of the model's bytes (see module doc);
    for dummy (seeded random) weights, the architecture, the source's name and the seed."""
    path = Path(path)
    if dummy_seed is not None:
        doc = {"args": asdict(args), "dummy": [path.name, dummy_seed]}
    else:
        root = path if path.is_dir() else path.parent
        doc = {"args": asdict(args), "hash": HASH,
               "files": [(str(f.relative_to(root)) if path.is_dir() else "", file_digest(f))
                         for f in source_files(path)]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]
