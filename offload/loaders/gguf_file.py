"""A GGUF file's metadata and tensor table, read straight from its memory map.

The ``gguf`` library's reader keeps every metadata value as numpy views (a 49K-token vocabulary
becomes hundreds of thousands of small arrays): for the default model it took 1.9 s and 156 MB
before a tensor was read. Here the header is parsed once into plain Python values (0.1 s, a few
MB) and each tensor is a view of the map, shaped as that reader shapes it (float types as their
dtype, block types as rows of bytes), so ``gguf.quants.dequantize`` takes it unchanged. The
library is still the authority on block sizes and types.

Layout (GGUF v2/v3, little-endian): magic, version, tensor count, metadata count; the metadata
(key, type, value; arrays of a type); the tensor table (name, dims innermost first, type, offset);
then the tensors' data, from the next multiple of ``general.alignment`` (32 if absent).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Metadata value types: (struct format, size) of the scalar ones; 8 is a string, 9 an array.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
# Whether this OS lets a process drop a mapping's pages (Linux, macOS); elsewhere release() does nothing.
_CAN_DROP_PAGES = hasattr(mmap, "MADV_DONTNEED")
# Tensor types held as their numpy dtype; every other type is rows of bytes (its blocks).
_ELEMENT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                   "I32": np.int32, "I64": np.int64}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (outermost first): [rows, columns] for a matrix
    n_elements: int
    n_bytes: int
    data_offset: int  # from the start of the file
    data: np.ndarray  # a view of the map: dtype for element types, uint8 [..., row bytes] for block types


class _Cursor:
    """Reads little-endian values from a buffer, naming the file when it runs out."""

    def __init__(self, buffer, path: Path):
        self.buf, self.pos, self.path, self.size = buffer, 0, path, len(buffer)

    def take(self, fmt: str, size: int):
        if self.pos + size > self.size:
            raise ModelLoadError(f"{self.path}: the GGUF header ends past the end of the file ({self.size} bytes); "
                                 f"the file is truncated, download it again")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q", 8)
        if self.pos + n > self.size:
            self.take("<B", n + 1)  # raises the truncation error
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(f"{self.path}: a GGUF string at byte {self.pos - n} is not UTF-8; the file is "
                                 f"corrupt, download it again") from None

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(*_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("<I", 4), self.take("<Q", 8)
            if item in _NUMPY:  # numbers: one read of the whole run
                size = np.dtype(_NUMPY[item]).itemsize * count
                if self.pos + size > self.size:
                    self.take("<B", size + 1)
                values = np.frombuffer(self.buf, _NUMPY[item], count, self.pos).tolist()
                self.pos += size
                return values
            return [self.value(item) for _ in range(count)]
        raise ModelLoadError(f"{self.path}: unknown GGUF metadata type {kind} at byte {self.pos}; the file is "
                             f"corrupt or from a newer format")


class GGUFFile:
    """``fields``: every metadata key -> its value (int, float, bool, str, or a list of them);
    ``tensors``: the tensor table in file order, each with a view of its data."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # an empty file cannot be mapped
            raise ModelLoadError(f"{self.path}: cannot be read as a GGUF file ({e})") from None
        self._map = np.frombuffer(self._mmap, dtype=np.uint8)  # [file bytes], read-only
        cur = _Cursor(memoryview(self._map), self.path)
        if cur.size < 4 or bytes(self._map[:4]) != GGUF_MAGIC:
            raise ModelLoadError(f"{self.path}: not a GGUF file (no GGUF magic at its start)")
        cur.pos = 4
        version = cur.take("<I", 4)
        if version not in SUPPORTED_VERSIONS:
            raise ModelLoadError(f"{self.path}: GGUF version {version} (big-endian, or too old or new); versions "
                                 f"{SUPPORTED_VERSIONS} little-endian are supported: convert it again with llama.cpp")
        n_tensors, n_fields = cur.take("<Q", 8), cur.take("<Q", 8)
        self.fields: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors,
                                       "GGUF.kv_count": n_fields}
        for _ in range(n_fields):
            key = cur.string()
            self.fields[key] = cur.value(cur.take("<I", 4))
        table = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.take("<Q", 8) for _ in range(cur.take("<I", 4))]
            table.append((name, dims, cur.take("<I", 4), cur.take("<Q", 8)))
        alignment = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-cur.pos // alignment) * alignment
        self.tensors: list[GGUFTensor] = []
        seen: set[str] = set()
        for name, dims, kind, offset in table:
            if name in seen:
                raise ModelLoadError(f"{self.path}: tensor {name} appears twice; the file is corrupt")
            seen.add(name)
            try:
                qtype = gguf.GGMLQuantizationType(kind)
            except ValueError:
                raise ModelLoadError(f"{self.path}: tensor {name} has unknown type {kind}; the file is from a newer "
                                     f"llama.cpp than the gguf library knows") from None
            self.tensors.append(self._tensor(name, dims, qtype, start + offset))

    def _tensor(self, name: str, dims: list[int], qtype, at: int) -> GGUFTensor:
        import gguf

        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_elements = int(np.prod(dims)) if dims else 1
        n_bytes = n_elements * type_size // block
        if at + n_bytes > len(self._map):
            raise ModelLoadError(f"{self.path}: tensor {name} extends past the end of the file ({len(self._map)} "
                                 f"bytes); the file is truncated, download it again")
        shape = tuple(reversed(dims))
        raw = self._map[at:at + n_bytes]
        element = _ELEMENT_DTYPES.get(qtype.name)
        if element is not None:
            data = raw.view(element).reshape(shape)
        else:  # rows of blocks: the innermost dimension as bytes
            if dims[0] % block:
                raise ModelLoadError(f"{self.path}: tensor {name} has {dims[0]} columns, not a whole number of "
                                     f"{qtype.name} blocks of {block}; the file is corrupt")
            data = raw.reshape(*shape[:-1], dims[0] // block * type_size)
        return GGUFTensor(name, qtype, shape, n_elements, n_bytes, at, data)

    def release(self, tensor: GGUFTensor) -> None:
        """Drop the file pages of a tensor that has been read (and converted) from this process's
        resident memory: they are the page cache's to keep, and a loader that converts every tensor
        would otherwise hold the whole file mapped in beside the model it built (no-op where the OS
        has no madvise)."""
        page = mmap.PAGESIZE
        first = tensor.data_offset // page * page
        end = min(len(self._mmap), -(-(tensor.data_offset + tensor.n_bytes) // page) * page)
        if end > first and _CAN_DROP_PAGES:
            self._mmap.madvise(mmap.MADV_DONTNEED, first, end - first)
