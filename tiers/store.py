"""The disk tier's file format: named tensors in 4 KiB-aligned extents, each with a checksum.

Layout of one store file::

    [tensor data, each tensor starting on a 4 KiB boundary, zero padded] [header JSON]
    [trailer: magic, header offset, header length, header crc32]  (the last 32 bytes)

The header lists every tensor (dtype, shape, offset, byte length, extent size and one crc32 per
extent). Data is written first and the header last, so a writer streams tensors of any total
size without holding them. Files are written atomically: into a temporary file in the same
directory (``.<name>.tmp-<pid>``), fsync'd, renamed over the target, and the directory fsync'd;
an interrupted write leaves the previous file intact, and the temporary file of a writer that was
killed is removed by the next writer in that directory. Every read verifies the checksums of the
extents it touches.

Reads go through :class:`offload.tiers.io.StoreReader`: ``O_DIRECT`` into reusable aligned
buffers where the filesystem allows it (the page cache neither hides the disk's cost nor takes
the memory budget), kvikio on a GPU when installed (see ``offload.tiers.io``).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from offload.errors import OffloadError

ALIGN = 4096  # tensors start on page boundaries: O_DIRECT works on every device at this alignment
SECTOR = 512  # the smallest O_DIRECT unit (a 512-byte logical block): the finest extent a tensor may have
DEFAULT_EXTENT = 4 << 20  # streaming reads: several MiB per request
MAGIC = b"OFFLDST1"
TRAILER = struct.Struct("<8sQQI4x")  # magic, header offset, header length, header crc32

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool)}


REBUILD_FIX = "delete it and run again (the next run rebuilds it)"


class CorruptStoreError(OffloadError):
    """A store file failed verification (bad trailer, header or extent checksum).

    ``path`` and ``reason`` (what failed) let a caller that knows where the file came from say how
    to replace it: a weight store is rebuilt from the model, a prompt cache must be saved again."""

    def __init__(self, path, reason: str | None = None, fix: str = REBUILD_FIX, what: str = "store"):
        if reason is None:  # a finished message (this is also how a pickled error is rebuilt)
            self.path, self.reason = None, None
            super().__init__(path)
            return
        self.path, self.reason = Path(path), reason
        super().__init__(f"{what} {path} is corrupt ({reason}): {fix}")


_TMP_NAME = re.compile(r"^\..+\.tmp-(\d+)$")  # StoreWriter's temporary files: .<name>.tmp-<pid>


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Remove the temporary files that killed writers left in ``folder`` (up to a whole store each).

    A file is stale when the pid in its name is not a live process and no writer holds its lock:
    the lock keeps a live writer's file even where its pid means another process here (a folder
    shared between pid namespaces)."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TMP_NAME.match(name)
        if not match or pid_alive(int(match.group(1))):
            continue
        tmp = folder / name
        try:
            with open(tmp, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass  # in use, gone already or not ours to remove: cleaning up never stops a write
    return removed


def align_up(n: int, alignment: int = ALIGN) -> int:
    return (n + alignment - 1) // alignment * alignment


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor (any dtype, bf16 included) as a uint8 array, without copying when contiguous."""
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def weighted_sum32(data: torch.Tensor) -> int:
    """A position-weighted sum of the 32-bit words of ``data`` (uint8, length a multiple of 4), mod 2^32.

    The device-side checksum: computed with torch where the bytes are (kvikio reads straight into
    GPU memory), it catches flipped bytes and swapped words. int64 products wrap mod 2^64, which
    keeps the value mod 2^32 exact.
    """
    words = data.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # [W]
    weights = torch.arange(1, words.numel() + 1, device=data.device, dtype=torch.int64)  # [W]
    return int((words * weights).sum().item() & 0xFFFFFFFF)


def _pad4(data: torch.Tensor) -> torch.Tensor:
    pad = (-data.numel()) % 4
    return torch.cat([data, data.new_zeros(pad)]) if pad else data


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # byte offset in the file, ALIGN-aligned
    nbytes: int
    extent: int  # bytes per checksummed extent (a multiple of SECTOR)
    crcs: tuple[int, ...]
    sums: tuple[int, ...]  # weighted_sum32 per extent (of the zero-padded, 4-byte-aligned extent)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def extent_ranges(self, start: int = 0, end: int | None = None) -> list[tuple[int, int, int]]:
        """(extent number, first byte, end byte) of the extents covering bytes [start, end) of the tensor."""
        end = self.nbytes if end is None else end
        first, last = start // self.extent, max(start, end - 1) // self.extent
        return [(i, i * self.extent, min((i + 1) * self.extent, self.nbytes)) for i in range(first, last + 1)
                if i * self.extent < self.nbytes]


class StoreWriter:
    """Writes tensors to ``path`` atomically. Use as a context manager; nothing replaces ``path``
    unless the block completes."""

    def __init__(self, path: str | Path, extent: int = DEFAULT_EXTENT, metadata: dict | None = None):
        if extent <= 0 or extent % ALIGN:
            raise OffloadError(f"extent size must be a positive multiple of {ALIGN} bytes, got {extent}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        remove_stale_temp_files(self.path.parent)
        self.extent = extent
        self.metadata = dict(metadata or {})
        self.entries: dict[str, TensorEntry] = {}
        self._file = None
        self._pos = 0

    def __enter__(self) -> "StoreWriter":
        self._file = open(self.tmp, "wb")
        fcntl.flock(self._file, fcntl.LOCK_EX)  # held until closed: the file is in use (remove_stale_temp_files)
        return self

    def add(self, name: str, tensor: torch.Tensor, extent: int | None = None) -> TensorEntry:
        """Append one tensor. ``extent`` (a multiple of 512 bytes) sets its checksum granularity: the
        unit a partial read verifies (e.g. one FFN bundle, which then needs no padding to 4 KiB on a
        device with 512-byte logical blocks)."""
        if name in self.entries:
            raise OffloadError(f"tensor '{name}' is already in the store")
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise OffloadError(f"tensor '{name}' has dtype {tensor.dtype}, which the store does not support")
        extent = extent or self.extent
        if extent <= 0 or extent % SECTOR:
            raise OffloadError(f"extent size must be a positive multiple of {SECTOR} bytes, got {extent}")
        data = tensor_bytes(tensor)  # [nbytes] uint8
        crcs = tuple(crc32(data[i:i + extent]) for i in range(0, len(data), extent))
        sums = tuple(weighted_sum32(_pad4(torch.from_numpy(data[i:i + extent]))) for i in range(0, len(data), extent))
        entry = TensorEntry(name, dtype, tuple(tensor.shape), self._pos, len(data), extent, crcs, sums)
        self._file.write(memoryview(data))  # tensor_bytes is contiguous: no copy
        padded = align_up(len(data))
        self._file.write(b"\0" * (padded - len(data)))
        self._pos += padded
        self.entries[name] = entry
        return entry

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                header = json.dumps({"metadata": self.metadata, "tensors": [
                    {"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "offset": e.offset,
                     "nbytes": e.nbytes, "extent": e.extent, "crcs": list(e.crcs), "sums": list(e.sums)}
                    for e in self.entries.values()]}).encode()
                self._file.write(header)
                self._file.write(TRAILER.pack(MAGIC, self._pos, len(header), crc32(header)))
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def write_store(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None,
                extent: int = DEFAULT_EXTENT) -> Path:
    """Write ``tensors`` to one store file, atomically."""
    with StoreWriter(path, extent, metadata) as w:
        for name, t in tensors.items():
            w.add(name, t)
    return Path(path)


def read_header(path: Path) -> tuple[dict, dict[str, TensorEntry]]:
    """Read and verify a store's header: (metadata, entries by name)."""
    if not path.is_file():
        raise OffloadError(f"store file not found: {path}")
    size = path.stat().st_size
    if size < TRAILER.size:
        raise CorruptStoreError(path, f"too short to be a store ({size} bytes): truncated")
    with open(path, "rb") as f:
        f.seek(size - TRAILER.size)
        magic, offset, length, crc = TRAILER.unpack(f.read(TRAILER.size))
        if magic != MAGIC or offset + length + TRAILER.size != size:
            raise CorruptStoreError(path, "no valid store trailer: truncated or not a store")
        f.seek(offset)
        header = f.read(length)
    if crc32(header) != crc:
        raise CorruptStoreError(path, "the header checksum does not match")
    doc = json.loads(header)
    entries = {}
    for t in doc["tensors"]:
        entries[t["name"]] = TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), t["offset"], t["nbytes"],
                                         t["extent"], tuple(t["crcs"]), tuple(t["sums"]))
    return doc["metadata"], entries
