"""The KV store's disk tier: the sparse layers' K and V of one sequence in files, a selection read per step.

A context longer than host memory keeps the sparse layers' KV in ``disk_dir`` (SPANN's pattern:
what a search needs is small and stays in memory, the posting lists live on disk, only the
probed ones are read). Each layer has one file; each KV head a region of it, cut into extents of
EXTENT_BYTES (one O_DIRECT unit, one checksum each). A *slot* is one token's row in a head's
region: its K, its V (int8 codes and their two scales for an int8 KV; for a KIVI KV, the key in int8
and a scale, the value in 4- or 2-bit codes and a scale and zero per group of channels), ``row_bytes``
in all.

Which token a slot holds is the layout. By default tokens are laid out in order as they age out
of memory (page-contiguous: Quest's pages are runs of slots). An index may lay the tokens out in
its own order instead (:meth:`DiskKV.lay_out`): the cluster index puts each cluster's tokens in
consecutive slots, so that a selection of clusters is a few runs of extents, not one extent per
token. The most recent tokens (and those of a slot run not yet a whole extent) stay in memory.

Reads of a step's selection (:meth:`DiskKV.gather`) go through a cache of extents in host memory
(``cache_bytes``; CLOCK eviction, second chance for extents hit since the hand last passed, an
LRU approximation at O(1) per eviction: consecutive steps select heavily overlapping sets), and
the extents it lacks are read in runs of adjacent extents, one request per run, several requests
in flight. After a layer's gather, the tokens its index ranks just past the selection (the
likeliest newcomers to the next step's: :meth:`DiskKV.prefetch`) are read into the cache in the
background, while the rest of the step computes; the layer's next gather waits for them. Every
extent read is checked against the checksum taken when it was written. The files belong to this
process: they live in ``kv-<pid>-<random>`` under ``disk_dir``, are removed when the store
closes, and a later run removes the folders of processes that are gone.

Shapes: Hkv KV heads, n tokens, D head_dim, M rows gathered per head, R row_bytes.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numba import njit, prange

from offload.config import ModelArgs
from offload.errors import OffloadError

from .budget import format_size
from .io import AlignedBuffer, aligned_empty
from .kv_codec import dequantize_kv, dequantize_rows, quantize_kv, quantize_kv_parts, quantize_rows
from .store import ALIGN, align_up, pid_alive

EXTENT_BYTES = ALIGN  # one O_DIRECT unit: a cluster of 16 bf16 tokens of head_dim 64 (K and V) fills one
FOLDER_PREFIX = "kv-"  # kv-<pid>-<random>: one process's KV files
# Extents of rows per head kept in memory beyond the window before the oldest go to disk: writes
# are batched (one request of >= 64 KiB per head per spill), and the window's rows stay in memory.
SPILL_EXTENTS = 16
READ_THREADS = 8  # requests in flight at once: an NVMe drive reaches its bandwidth only with several
# Read-ahead (DiskKV.prefetch): tokens an index ranks just past a step's selection, as a share of the
# selection, are read in the background for the next step, on threads of their own (a step's own
# reads never queue behind them). Where it pays: read_ahead_pays().
LOOKAHEAD_SHARE = 0.5
PREFETCH_THREADS = 4
_PENDING = np.iinfo(np.int64).max  # cache_used of an extent being read ahead: no eviction takes it
# Wanted extents at most this many apart (within a head) are read in one request, the ones between
# dropped: a 4 KiB request costs ~80 us of this box's virtual disk (12K IOPS with 8 in flight) where
# 12 KiB more of a request costs ~22 us (560 MB/s).
MERGE_GAP_EXTENTS = 3
IOV_MAX = 1024  # iovecs per preadv (Linux's limit)
FLUSH_EXTENTS = 1024  # extents per head in one write (4 MiB): a whole layer is written a slice at a time
MEMORY_HEADROOM = 1.5  # the in-memory rows grow by half again when full: appends stay amortised O(1)


# Planning (DiskKVSizing): the rows a disk layer keeps in memory at most (the window, a batch of rows
# waiting to spill, an index's unlaid segment and a prefill chunk, with MEMORY_HEADROOM), the layers
# whose whole KV a prefill chunk or a relayout holds at once (its rows, and its K and V decoded), and
# the extents read per selected row at most (a run of ~16 rows fills one extent; the acceptance bound).
RESIDENT_TOKENS = 3072
TRANSIENT_LAYERS = 3
READ_AMPLIFICATION = 2.0
DEFAULT_CACHE_SHARE = 0.25  # with no memory budget: the cache holds this share of the KV on disk
# Share of a step's extents the cache holds, for predictions: measured 93% (cluster) and 88% (quest)
# at 8K on the default model with a cache of 25% of the KV (BENCHMARKS.md, KV on disk).
EXPECTED_HIT_RATE = 0.9


@dataclass(frozen=True)
class DiskKVSizing:
    """Bytes of a disk KV tier at a context, for the planner: on disk, in memory, the cache."""

    args: ModelArgs
    dtype_bytes: int
    kv_dtype: str | None
    context: int
    attended: int  # tokens a sparse layer attends per step and KV head (selection, sinks, window)
    sparse_layers: int

    @property
    def row_bytes(self) -> int:
        D = self.args.head_dim
        if self.kv_dtype in DISK_VALUE_BITS:  # RowFormat.for_kv's: int8 keys + a scale, low-bit values + pairs
            bits = DISK_VALUE_BITS[self.kv_dtype]
            return D + self.dtype_bytes + D * bits // 8 + 2 * (D // disk_value_group(D, bits)) * self.dtype_bytes
        held = 1 if self.kv_dtype == "int8" else self.dtype_bytes
        return 2 * D * held + (2 * self.dtype_bytes if self.kv_dtype == "int8" else 0)

    @property
    def layer_kv_bytes(self) -> int:
        return self.row_bytes * self.args.num_kv_heads * self.context

    @property
    def sparse_kv_bytes(self) -> int:
        return self.layer_kv_bytes * self.sparse_layers

    @property
    def memory_bytes(self) -> int:
        """Rows kept in memory by every disk layer, and one layer's whole KV held a moment at a time."""
        resident = self.row_bytes * self.args.num_kv_heads * min(self.context, RESIDENT_TOKENS) * self.sparse_layers
        return resident + TRANSIENT_LAYERS * self.layer_kv_bytes

    @property
    def min_cache_bytes(self) -> int:
        """One layer's selection with every row in its own extent, twice over."""
        extent = max(EXTENT_BYTES, align_up(self.row_bytes))
        return 2 * extent * self.args.num_kv_heads * self.attended

    @property
    def default_cache_bytes(self) -> int:
        return max(self.min_cache_bytes, int(DEFAULT_CACHE_SHARE * self.sparse_kv_bytes))

    def read_bytes_per_token(self, hit_rate: float) -> int:
        selected = self.row_bytes * self.args.num_kv_heads * self.attended * self.sparse_layers
        return int(selected * READ_AMPLIFICATION * (1 - hit_rate))


class CorruptKVError(OffloadError):
    """An extent of the KV on disk did not match the checksum taken when it was written."""


@njit(cache=True, parallel=True)
def _extent_checksums(data, which, out):  # pragma: no cover - numba
    """data [C, E] uint8 (E a multiple of 4), which [k] rows of it -> out [k] uint32: a
    position-weighted sum of each extent's 32-bit words mod 2^32, the weight store's device-side
    checksum (``store.weighted_sum32``) over many extents in one compiled pass (catches flipped
    bytes and swapped or shifted words; ~10 GB/s where zlib's crc32 gives ~1)."""
    words = data.view(np.uint32)
    W = words.shape[1]
    for i in prange(which.shape[0]):
        row = words[which[i]]
        acc = np.uint64(0)
        for w in range(W):
            acc += np.uint64(row[w]) * np.uint64(w + 1)
        out[i] = np.uint32(acc & np.uint64(0xFFFFFFFF))


def read_ahead_pays(device: torch.device) -> bool:
    """Whether reads ahead can run beside the compute: where a GPU computes (the host's cores wait on
    it), or a core is left beside the compute threads. Where those take every core they stall its
    parallel regions: on the 2-core CPU box (2 threads) read-ahead raised the hit rate from 92% to
    95% but slowed decode from 177 to 241 ms/token (8K, default model, BENCHMARKS.md)."""
    return device.type == "cuda" or (os.cpu_count() or 1) > torch.get_num_threads()


def extent_checksums(data: np.ndarray, which: np.ndarray | None = None) -> np.ndarray:
    """Checksums of the extents ``data`` [C, E] (rows ``which``, default all) -> [k] uint32."""
    which = np.arange(data.shape[0], dtype=np.int64) if which is None else which.astype(np.int64)
    out = np.empty(which.shape[0], np.uint32)
    _extent_checksums(data, which, out)
    return out


@njit(cache=True, nogil=True)
def _plan_gather(ids, mem_start, slot_of, rpe, eph, cache_at, cache_used, cache_ref, cache_ahead, seen, tick,
                 missing, use):  # pragma: no cover
    """ids [Hkv, M] (tokens): lists once each in ``missing`` the extents of the disk rows that the
    cache lacks; ``seen`` [Hkv E] remembers the extents met at this ``tick`` (a read-ahead after a
    gather shares its tick: what the gather met is skipped). ``use`` (a gather): the cached ones
    are marked used at ``tick`` and counted; else (a read-ahead) they are left as they are.
    Returns (extents missing, rows from disk, extents found in the cache, of which read ahead and
    used now for the first time: ``cache_ahead`` cleared)."""
    H, M = ids.shape
    n_miss, n_disk, hits, ahead_hits = 0, 0, 0, 0
    for h in range(H):
        for j in range(M):
            t = ids[h, j]
            if t >= mem_start:
                continue
            n_disk += 1
            key = h * eph + slot_of[h, t] // rpe
            if seen[key] == tick:
                continue
            seen[key] = tick
            c = cache_at[key]
            if c < 0:
                missing[n_miss] = key
                n_miss += 1
            elif use:
                cache_used[c] = tick
                cache_ref[c] = 1
                hits += 1
                if cache_ahead[c]:
                    cache_ahead[c] = 0
                    ahead_hits += 1
    return n_miss, n_disk, hits, ahead_hits


@njit(cache=True, nogil=True)
def _copy_rows(ids, mem_start, mem, slot_of, rpe, eph, cache_at, cache, bounds, outs0, outs1, outs2,
               outs3):  # pragma: no cover
    """Rows of tokens ids [Hkv, M] split into their parts: part i (bytes bounds[i]..bounds[i+1] of
    a row) into outs_i [Hkv, M, bytes] (uint8). A row comes from memory (token >= mem_start) or
    from its extent's cache row."""
    H, M = ids.shape
    R = bounds[4]
    for h in range(H):
        for j in range(M):
            t = ids[h, j]
            if t >= mem_start:
                row = mem[h, t - mem_start]
            else:
                s = slot_of[h, t]
                at = (s % rpe) * R
                row = cache[cache_at[h * eph + s // rpe], at:at + R]
            outs0[h, j] = row[bounds[0]:bounds[1]]
            outs1[h, j] = row[bounds[1]:bounds[2]]
            if bounds[4] > bounds[2]:
                outs2[h, j] = row[bounds[2]:bounds[3]]
                outs3[h, j] = row[bounds[3]:bounds[4]]


@njit(cache=True, nogil=True)
def _clock_victims(cache_used, cache_ref, tick, hand, k, out):  # pragma: no cover
    """CLOCK (second chance, an LRU approximation at O(1) per eviction): from ``hand``, skip the
    entries this gather uses (cache_used == tick) or a read-ahead is filling (cache_used > tick:
    _PENDING) and, once, those hit since the hand last passed
    (cache_ref: cleared as it passes); take the others into out[:k]. Returns (taken, new hand):
    fewer than k only if the cache cannot hold this gather's extents. The rows taken are marked
    used at ``tick``."""
    C = cache_used.shape[0]
    taken = 0
    for _ in range(2 * C):
        if taken == k:
            break
        c = hand
        hand = (hand + 1) % C
        if cache_used[c] >= tick:
            continue
        if cache_ref[c]:
            cache_ref[c] = 0
            continue
        cache_used[c] = tick  # taken: a second pass of the hand must not take it again
        out[taken] = c
        taken += 1
    return taken, hand


# KIVI's KV (kv_dtype="int4" / "int2") on disk: KIVI quantizes keys per channel over groups of tokens,
# which a token's row on its own cannot hold (and a cluster layout reorders the tokens). Per token,
# 4-bit keys lose what retrieval needs: the default model at 8K missed the passkey at 90% depth with
# 4-bit keys in groups of 32 channels, Hadamard-rotated or not, where int8 keys and KIVI found it. So
# a row holds the key in int8 (a scale per token) and the value in 4 or 2 bits with a scale and zero
# per group of channels (KIVI's own scheme for values): 106 / 90 bytes per token and KV head of 64
# dims in bf16, against 132 for int8 and 256 for bf16.
DISK_VALUE_GROUP = 32
DISK_VALUE_BITS = {"int4": 4, "int2": 2}


def disk_value_group(head_dim: int, bits: int) -> int:
    """Channels per (scale, zero) of a low-bit value: DISK_VALUE_GROUP, or the whole head when smaller."""
    group = min(DISK_VALUE_GROUP, head_dim)
    if head_dim % group or head_dim % (8 // bits):
        raise OffloadError(f"a {bits}-bit KV on disk needs a head_dim divisible by {group}; this model's is "
                           f"{head_dim}: use kv_dtype='int8'")
    return group


@dataclass(frozen=True)
class RowFormat:
    """One token's row of one KV head on disk: K, V (held dtype: the compute dtype or int8 codes; a
    KIVI KV's values in ``value_bits`` codes packed to bytes), then, for a quantized KV, K's and V's
    scales (the compute dtype: one per row, or for low-bit values a scale and a zero per
    ``value_group`` channels)."""

    head_dim: int
    held: torch.dtype  # K (and V but for low-bit values) as stored
    scale: torch.dtype | None  # the scales' dtype (a quantized KV), else None
    value_bits: int | None = None  # a KIVI KV: its values' bits (4 or 2)
    value_group: int | None = None  # ... and channels per (scale, zero)

    @classmethod
    def for_kv(cls, head_dim: int, dtype: torch.dtype, kv_dtype: str | None) -> "RowFormat":
        """The row of a KV of ``kv_dtype`` (None, "int8", "int4" or "int2") computed in ``dtype``."""
        if kv_dtype == "int8":
            return cls(head_dim, torch.int8, dtype)
        if kv_dtype in DISK_VALUE_BITS:
            bits = DISK_VALUE_BITS[kv_dtype]
            return cls(head_dim, torch.int8, dtype, bits, disk_value_group(head_dim, bits))
        return cls(head_dim, dtype, None)

    @property
    def part_bytes(self) -> list[int]:
        kv = self.head_dim * self.held.itemsize
        if self.value_bits is not None:  # int8 keys, low-bit values
            return [kv, self.head_dim * self.value_bits // 8, self.scale.itemsize,
                    2 * (self.head_dim // self.value_group) * self.scale.itemsize]
        return [kv, kv] + ([self.scale.itemsize] * 2 if self.scale is not None else [])

    @property
    def part_dtypes(self) -> list[torch.dtype]:
        """What each part is viewed as: K, V, then their scales."""
        values = torch.uint8 if self.value_bits is not None else self.held
        return [self.held, values, self.scale, self.scale]

    def quantize(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        """K, V [..., D] in the compute dtype -> the parts a row holds (see :meth:`encode`): as they are
        for a float KV, else codes and scales (:mod:`offload.tiers.kv_codec`, the memory tiers' codecs)."""
        if self.scale is None:
            return [k, v]
        if self.value_bits is None:
            return quantize_kv_parts(k, v, self.scale)
        (kc, ks), (vc, vs) = quantize_kv(k, self.scale), quantize_rows(v, self.value_bits, self.value_group, self.scale)
        return [kc, vc, ks, vs]

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, keys: bool) -> torch.Tensor:
        """One side's parts (K or V codes, their scales) -> [..., D] in ``dtype`` (a quantized KV);
        ``keys``: the K side."""
        if self.value_bits is not None and not keys:
            return dequantize_rows(codes, scales, self.value_bits, dtype)
        return dequantize_kv(codes, scales, dtype)

    @property
    def row_bytes(self) -> int:
        return sum(self.part_bytes)

    @property
    def extent_bytes(self) -> int:
        return max(EXTENT_BYTES, align_up(self.row_bytes))

    @property
    def rows_per_extent(self) -> int:
        return self.extent_bytes // self.row_bytes

    def encode(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """K, V [Hkv, T, D] (and scales [Hkv, T, 1]; 4-bit: codes [Hkv, T, D/2], scales [Hkv, T, 2G]) on
        the host -> rows [Hkv, T, R] uint8."""
        return torch.cat([p.contiguous().view(torch.uint8) for p in parts], dim=-1)

    def decode(self, rows: torch.Tensor, which: tuple[int, ...] | None = None) -> list[torch.Tensor]:
        """rows [..., R] uint8 -> K, V [..., D] (held dtype; 4-bit: [..., D/2]), and their scales for a
        quantized KV ([..., 1]; 4-bit: [..., 2G]); only the parts numbered in ``which`` (0 K, 1 V, 2
        and 3 their scales) when given."""
        out, at = [], 0
        for part, (nbytes, dtype) in enumerate(zip(self.part_bytes, self.part_dtypes)):
            if which is None or part in which:
                out.append(rows[..., at:at + nbytes].contiguous().view(dtype))
            at += nbytes
        return out


class _LayerFile:
    """One layer's KV: its file on disk, the layout of its slots, and the rows still in memory."""

    def __init__(self, layer: int, path: Path, num_kv_heads: int, capacity: int, fmt: RowFormat):
        self.layer, self.path, self.fmt = layer, path, fmt
        self.fd, self.direct = _open(path)
        rpe = fmt.rows_per_extent
        self.extents_per_head = -(-capacity // rpe)
        self.token_of = np.zeros((num_kv_heads, self.extents_per_head * rpe), np.int32)  # [Hkv, slots] slot -> token
        self.slot_of = np.zeros((num_kv_heads, capacity), np.int32)  # [Hkv, n] token -> slot (valid below laid)
        self.checksums = np.zeros((num_kv_heads, self.extents_per_head), np.uint32)  # [Hkv, E]
        self.seen = np.zeros(num_kv_heads * self.extents_per_head, np.int64)  # [Hkv E] last gather that met it
        self.laid = 0  # tokens [0, laid) have slots [0, laid) (a prefix: every layout keeps one)
        self.written = 0  # slots [0, written) are on disk (whole extents)
        self.ordered = False  # an index lays the tokens out (else the store does, in token order)
        self.mem_start = 0  # tokens [mem_start, n) have their rows in memory
        self._mem = torch.zeros(num_kv_heads, 0, fmt.row_bytes, dtype=torch.uint8)  # [Hkv, room, R]
        self._mem_len = 0
        self.held_upto = 0  # a layer-major prefill's pass (DiskKV.hold): its rows stay in memory up to this token

    @property
    def n(self) -> int:
        return self.mem_start + self._mem_len

    @property
    def mem(self) -> torch.Tensor:
        """Rows of tokens [mem_start, n): [Hkv, n - mem_start, R] (a view)."""
        return self._mem[:, :self._mem_len]

    def append(self, rows: torch.Tensor) -> None:
        """rows [Hkv, T, R] after the last token (in place: a decode step copies one row, not the tail)."""
        T = rows.shape[1]
        if self._mem_len + T > self._mem.shape[1]:
            self.reserve(int((self._mem_len + T) * MEMORY_HEADROOM) + 1)
        self._mem[:, self._mem_len:self._mem_len + T] = rows
        self._mem_len += T

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` rows in memory (from mem_start) without another copy."""
        if rows > self._mem.shape[1]:
            grown = torch.empty(self._mem.shape[0], rows, self._mem.shape[2], dtype=torch.uint8)  # [Hkv, room, R]
            grown[:, :self._mem_len] = self.mem
            self._mem = grown

    def load(self, room: torch.Tensor, n: int) -> None:
        """Hold the rows of tokens 0..n-1, room[:, :n], in memory, with room[:, n:] free for more."""
        self.mem_start, self._mem, self._mem_len = 0, room, n

    def set_memory(self, start: int, rows: torch.Tensor) -> None:
        """Hold rows [Hkv, T, R] of tokens start.. in memory (and nothing else; ``rows`` is kept, not copied)."""
        self.mem_start, self._mem, self._mem_len = start, rows, rows.shape[1]

    def drop_before(self, token: int) -> None:
        """Rows of tokens before ``token`` leave memory (they are on disk): the rest is copied out
        so that the old buffer is freed."""
        if token > self.mem_start:
            self.set_memory(token, self.mem[:, token - self.mem_start:].clone())

    def memory_nbytes(self) -> int:
        return self._mem.numel()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open(path: Path) -> tuple[int, bool]:
    """Open a KV file for aligned reads and writes: O_DIRECT where the filesystem takes it (the
    page cache neither hides the disk's cost nor holds a second copy of the KV), else buffered."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o600), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # tmpfs refuses O_DIRECT with EINVAL; anything else is real
                raise
    return os.open(path, flags, 0o600), False


def remove_stale_folders(disk_dir: Path) -> list[Path]:
    """Remove the KV folders of processes that are gone (a run that was killed cannot clean up)."""
    removed = []
    try:
        names = os.listdir(disk_dir)
    except OSError:
        return removed
    for name in names:
        parts = name.split("-")
        if len(parts) != 3 or parts[0] + "-" != FOLDER_PREFIX or not parts[1].isdigit():
            continue
        if int(parts[1]) == os.getpid() or pid_alive(int(parts[1])):
            continue
        shutil.rmtree(disk_dir / name, ignore_errors=True)
        removed.append(disk_dir / name)
    return removed


def _disk_error(e: OSError, disk_dir: Path, what: str) -> OffloadError:
    """One line for an OSError of the disk tier: what happened, in which disk_dir, and the fix."""
    if e.errno == errno.ENOSPC:
        return OffloadError(f"disk_dir {disk_dir} is full while {what}: free space there, choose another disk_dir, "
                            f"or give more cpu_memory so that less KV goes to disk")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OffloadError(f"disk_dir {disk_dir} is not writable ({e.strerror}): choose a writable disk_dir")
    return OffloadError(f"disk_dir {disk_dir}: {e.strerror or e} while {what}")


@dataclass
class DiskStats:
    bytes_written: int = 0
    bytes_read: int = 0  # from the disk (whole extents): selections, prefill's prefixes and index builds
    selection_bytes_read: int = 0  # of which for selections (decode steps)
    read_requests: int = 0
    selected_bytes: int = 0  # rows a gather handed out from the disk tier (the selection's own bytes)
    extents_hit: int = 0  # extents a gather found in the cache
    extents_missed: int = 0
    ahead_extents: int = 0  # extents read ahead (their bytes count in bytes_read and selection_bytes_read)
    ahead_hits: int = 0  # of which a later gather used


@dataclass
class _ReadAhead:
    """A layer's extents being read in the background (DiskKV.prefetch)."""

    keys: np.ndarray  # [k] head * extents_per_head + extent
    rows: np.ndarray  # [k] their cache rows
    reads: list  # futures, one per request
    tick: int  # the gather they followed


class DiskKV:
    """The disk tier of one cache row: ``layers`` (model layer numbers) each in a file under
    ``disk_dir``, read through a cache of ``cache_bytes`` of extents."""

    def __init__(self, disk_dir: str | Path, layers: list[int], num_kv_heads: int, capacity: int,
                 fmt: RowFormat, cache_bytes: int, keep_tokens: int, read_ahead: bool = True):
        """``keep_tokens``: the most recent tokens kept in memory (the window attended every step).
        ``read_ahead``: prefetch() reads (else lookahead_tokens() is 0: nothing is asked for)."""
        self.fmt, self.num_kv_heads = fmt, num_kv_heads
        self.keep_tokens, self.read_ahead = keep_tokens, read_ahead
        self.disk_dir = Path(disk_dir)
        if self.disk_dir.exists() and not self.disk_dir.is_dir():
            raise OffloadError(f"disk_dir {self.disk_dir} is a file, not a directory: give a directory")
        remove_stale_folders(self.disk_dir)
        self.folder = self.disk_dir / f"{FOLDER_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.folder.mkdir(parents=True)
        except OSError as e:
            raise _disk_error(e, self.disk_dir, "creating the KV folder") from None
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self._pool: ThreadPoolExecutor | None = None
        self._ahead_pool: ThreadPoolExecutor | None = None
        self._ahead: dict[int, _ReadAhead] = {}  # layer -> its read-ahead in flight
        self.files: dict[int, _LayerFile] = {}
        try:
            for layer in layers:
                self.files[layer] = _LayerFile(layer, self.folder / f"layer{layer:03d}.kv", num_kv_heads, capacity, fmt)
        except OSError as e:
            self.close()
            raise _disk_error(e, self.disk_dir, "creating the KV files") from None
        eb = fmt.extent_bytes
        self.cache_extents = max(1, cache_bytes // eb)
        self.cache = aligned_empty((self.cache_extents, eb), torch.uint8).numpy()  # [C, E] page-aligned rows
        self.cache_key = np.full(self.cache_extents, -1, np.int64)  # [C] (layer, head, extent) held, -1 free
        self.cache_used = np.zeros(self.cache_extents, np.int64)  # [C] tick of the last gather that used it
        self.cache_ref = np.zeros(self.cache_extents, np.uint8)  # [C] hit since the clock hand last passed
        self.cache_ahead = np.zeros(self.cache_extents, np.uint8)  # [C] read ahead, not used since
        self._hand = 0
        self.cache_at = {layer: np.full(num_kv_heads * f.extents_per_head, -1, np.int32)
                         for layer, f in self.files.items()}  # layer -> [Hkv E] cache row of each extent
        self._tick = 0
        self._layers = list(self.files)  # a cache key's high bits: the layer's place in this list
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="offload-kv-read")
        if read_ahead:
            self._ahead_pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="offload-kv-ahead")
        self._scratch = AlignedBuffer()  # spans with gaps land here, their wanted extents are copied out
        self.stats = DiskStats()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        for pool in (self._ahead_pool, self._pool):  # no read may be in flight when the files close
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._ahead_pool = None
        self._ahead.clear()
        for f in self.files.values():
            f.close()
        self._finalizer()

    def nbytes_on_disk(self) -> int:
        return sum(f.written * self.fmt.row_bytes * self.num_kv_heads for f in self.files.values())

    def memory_nbytes(self) -> int:
        """Host bytes the tier holds: the extent cache, the rows in memory, the layouts."""
        return self.cache.nbytes + sum(f.memory_nbytes() + f.token_of.nbytes + f.slot_of.nbytes + f.checksums.nbytes
                                       + f.seen.nbytes for f in self.files.values())

    # ------------------------------------------------------------------ writes
    def write(self, layer: int, start: int, parts: list[torch.Tensor]) -> None:
        """New tokens' K, V [Hkv, T, D] (and scales [Hkv, T, 1]), on the host, at positions start.."""
        f = self.files[layer]
        rows = self.fmt.encode(parts)  # [Hkv, T, R]
        if start < f.n:  # the sequence continues from an earlier point: drop what came after it
            self._truncate(f, start)
        if start != f.n:
            raise OffloadError(f"KV of layer {layer} written at position {start} but it holds {f.n} tokens")
        if f.held_upto:  # room for the whole pass at once (a truncation above may have let it go)
            f.reserve(f.held_upto - f.mem_start)
        f.append(rows)
        if not f.held_upto:
            self._spill(f, SPILL_EXTENTS)

    def _spill(self, f: _LayerFile, batch_extents: int) -> None:
        """Rows past the window go to disk, laid out in token order, once at least ``batch_extents``
        extents per head are waiting (an index that lays the layer out writes its own order)."""
        if f.ordered:
            return
        keep_from = f.n - self.keep_tokens
        rpe = self.fmt.rows_per_extent
        upto = keep_from - keep_from % rpe
        if upto > f.laid and keep_from - f.laid >= batch_extents * rpe:
            ids = np.arange(f.laid, upto, dtype=np.int32)
            self._assign(f, np.broadcast_to(ids, (self.num_kv_heads, ids.size)), upto)

    def hold(self, layer: int, start: int, upto: int) -> None:
        """A layer-major prefill's pass over ``layer``, tokens start..upto-1, begins: the layer's rows
        before ``start`` are read back once (what came after them is dropped), and they and the rows
        the pass writes stay in memory (room reserved at once) until :meth:`release`, so each chunk
        attends to its prefix in memory (read from disk per chunk, its bytes would grow with the
        square of the prompt)."""
        f = self.files[layer]
        keep = min(start, f.n)
        if f.mem_start > 0 or keep < f.n:
            room = torch.empty(self.num_kv_heads, upto, self.fmt.row_bytes, dtype=torch.uint8)  # [Hkv, upto, R]
            self.read_range(layer, 0, keep, out=room[:, :keep])  # one read of the layer
            self._drop_cached(layer)
            if keep < f.n:  # what the disk holds stays valid up to ``keep``
                if f.ordered:  # an index's order of more tokens than are kept: void
                    f.laid = f.written = 0
                    f.ordered = False
                else:  # in token order: slot = token
                    f.laid = f.written = min(f.written, keep - keep % self.fmt.rows_per_extent)
            f.load(room, keep)
        f.held_upto = upto

    def release(self, layer: int) -> None:
        """The pass is over: the rows past the window go to disk, and those on disk leave memory."""
        f = self.files[layer]
        f.held_upto = 0
        self._spill(f, 0)
        self._drop_written(f)

    def lay_out(self, layer: int, order: np.ndarray) -> None:
        """An index's layout of tokens [0, m) (order [Hkv, m]: each head's token ids in slot order, a
        permutation of 0..m-1 per head): from now on the index lays this layer out. Tokens already
        on disk in another order are read back and rewritten (once, after the prompt's build); an
        order that extends the one already laid out only lays out the new tokens (an index appends
        a segment at a time)."""
        f = self.files[layer]
        m = order.shape[1]
        if f.ordered and m == f.laid:  # nothing new (the index is asked every step)
            return
        if f.ordered and m >= f.laid and np.array_equal(order[:, :f.laid], f.token_of[:, :f.laid]):
            if m > f.laid:
                self._assign(f, order[:, f.laid:], m)
            return
        rows = self.read_range(layer, 0, f.n)  # [Hkv, n, R] every token, in token order
        self._drop_cached(layer)
        f.laid = f.written = 0
        f.set_memory(0, rows)
        f.ordered = True
        self._assign(f, order, m)

    def _assign(self, f: _LayerFile, tokens: np.ndarray, upto: int) -> None:
        """Slots [laid, upto) of each head hold ``tokens`` [Hkv, upto - laid] (tokens laid..upto-1,
        in any order per head); the whole extents among them go to disk."""
        f.token_of[:, f.laid:upto] = tokens
        np.put_along_axis(f.slot_of[:, :upto], tokens.astype(np.int64) if tokens.size else
                          np.zeros((self.num_kv_heads, 0), np.int64),
                          np.broadcast_to(np.arange(f.laid, upto, dtype=np.int32), tokens.shape), axis=1)
        f.laid = upto
        rpe = self.fmt.rows_per_extent
        end = upto - upto % rpe
        if end > f.written:
            self._flush(f, end)

    def _flush(self, f: _LayerFile, end: int) -> None:
        """Write slots [written, end) (whole extents) of every head from memory to the file, at most
        FLUSH_EXTENTS per head and request (a relayout of a whole layer holds no second copy of it)."""
        rpe, eb, R = self.fmt.rows_per_extent, self.fmt.extent_bytes, self.fmt.row_bytes
        for first in range(f.written // rpe, end // rpe, FLUSH_EXTENTS):
            last = min(end // rpe, first + FLUSH_EXTENTS)
            E = last - first
            buf = aligned_empty((self.num_kv_heads, E, eb), torch.uint8).numpy()  # [Hkv, E, eb]
            tokens = f.token_of[:, first * rpe:last * rpe] - f.mem_start  # [Hkv, slots] rows of memory
            index = torch.from_numpy(tokens.astype(np.int64))[..., None].expand(-1, -1, R)
            buf[:, :, :rpe * R] = torch.gather(f.mem, 1, index).numpy().reshape(self.num_kv_heads, E, rpe * R)
            buf[:, :, rpe * R:] = 0
            for h in range(self.num_kv_heads):
                f.checksums[h, first:last] = extent_checksums(buf[h])
                offset = (h * f.extents_per_head + first) * eb
                try:
                    done = os.pwrite(f.fd, memoryview(buf[h]).cast("B"), offset)
                except OSError as e:
                    raise _disk_error(e, self.disk_dir, f"writing the KV ({f.path.name})") from None
                if done != buf[h].nbytes:
                    raise _disk_error(OSError(errno.ENOSPC, "short write"), self.disk_dir,
                                      f"writing the KV ({f.path.name})")
                if not f.direct and hasattr(os, "posix_fadvise"):
                    os.fdatasync(f.fd)  # buffered: the pages can only be dropped once clean
                    os.posix_fadvise(f.fd, offset, buf[h].nbytes, os.POSIX_FADV_DONTNEED)
            self.stats.bytes_written += buf.nbytes
        f.written = end
        self._drop_written(f)

    @staticmethod
    def _drop_written(f: _LayerFile) -> None:
        """The rows on disk leave memory, up to the first token some head still needs there (laid
        out but not yet written, or not laid out at all)."""
        if f.held_upto:  # a prefill's pass attends to them: they go when it ends
            return
        pending = f.token_of[:, f.written:f.laid]
        keep_from = int(pending.min()) if pending.size else f.laid
        f.drop_before(min(keep_from, f.n))

    def _truncate(self, f: _LayerFile, n: int) -> None:
        """Keep tokens [0, n): the sequence goes on from there (a row prefilled again)."""
        if n >= f.mem_start:
            f.set_memory(f.mem_start, f.mem[:, :n - f.mem_start].clone())
            if n < f.laid:  # slots past n are void; in token order they are a suffix
                rows = self.read_range(f.layer, 0, n)
                self._reset(f, rows)
            return
        self._reset(f, self.read_range(f.layer, 0, n))

    def _reset(self, f: _LayerFile, rows: torch.Tensor) -> None:
        """Start the layer over with ``rows`` [Hkv, n, R] in memory, laid out by the store."""
        self._drop_cached(f.layer)
        f.laid = f.written = 0
        f.ordered = False
        f.set_memory(0, rows)
        keep_from = f.n - self.keep_tokens
        upto = max(0, keep_from - keep_from % self.fmt.rows_per_extent)
        ids = np.arange(0, upto, dtype=np.int32)
        self._assign(f, np.broadcast_to(ids, (self.num_kv_heads, upto)), upto)

    def _drop_cached(self, layer: int) -> None:
        self._settle(layer)
        at = self.cache_at[layer]
        held = at[at >= 0]
        self.cache_key[held] = -1
        at[:] = -1

    # ------------------------------------------------------------------ reads
    def read_range(self, layer: int, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of tokens [start, end) of every head, in token order -> [Hkv, end - start, R] uint8
        (whole regions streamed from disk, not through the cache), into ``out`` when given; rows all
        in memory come back as a view of them (read, never write, and before the next write)."""
        f = self.files[layer]
        H, R, rpe, eb = self.num_kv_heads, self.fmt.row_bytes, self.fmt.rows_per_extent, self.fmt.extent_bytes
        if out is None and start >= f.mem_start:
            return f.mem[:, start - f.mem_start:end - f.mem_start]
        if out is None:
            out = torch.empty(H, end - start, R, dtype=torch.uint8)  # [Hkv, n', R]
        disk_end = min(end, f.mem_start)
        if start < disk_end:
            # the extents that hold those tokens: in token order their own; in an index's order any written one
            e0, e1 = (0, f.written // rpe) if f.ordered else (start // rpe, -(-disk_end // rpe))
            buf = aligned_empty((e1 - e0, eb), torch.uint8).numpy()  # [E, eb] one head at a time
            tokens = torch.from_numpy(f.token_of[:, e0 * rpe:e1 * rpe].astype(np.int64))  # [Hkv, slots]
            keep = (tokens >= start) & (tokens < disk_end)
            for h in range(H):
                self._read_requests(f, [(buf.reshape(-1), (h * f.extents_per_head + e0) * eb)])
                bad = np.nonzero(extent_checksums(buf) != f.checksums[h, e0:e1])[0]
                if bad.size:
                    raise CorruptKVError(f"KV file {f.path}: extent {e0 + int(bad[0])} of KV head {h} does not match "
                                         f"its checksum (the disk returned other bytes than were written): run again")
                slots = torch.from_numpy(buf[:, :rpe * R].reshape(-1, R))  # [slots, R]
                out[h, tokens[h][keep[h]] - start] = slots[keep[h]]
                self.stats.bytes_read += buf.nbytes
        if end > f.mem_start:
            lo = max(start, f.mem_start)
            out[:, lo - start:] = f.mem[:, lo - f.mem_start:end - f.mem_start]
        return out

    @staticmethod
    def _read_one(f: _LayerFile, bufs: np.ndarray | list[np.ndarray], offset: int) -> int:
        """One preadv of the file at ``offset`` into a buffer or a list of them -> bytes it came short by."""
        views = [memoryview(b).cast("B") for b in (bufs if isinstance(bufs, list) else [bufs])]
        want = sum(len(v) for v in views)
        got = 0
        for i in range(0, len(views), IOV_MAX):
            got += os.preadv(f.fd, views[i:i + IOV_MAX], offset + got)
        if not f.direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fd, offset, want, os.POSIX_FADV_DONTNEED)
        return want - got

    def _read_requests(self, f: _LayerFile, requests: list[tuple[np.ndarray | list[np.ndarray], int]]) -> None:
        """Each (buffer or list of buffers, file offset): one preadv each, several in flight."""
        def one(req) -> int:
            return self._read_one(f, *req)

        short = list(self._pool.map(one, requests)) if len(requests) > 1 else [one(r) for r in requests]
        if any(s for s in short):
            raise CorruptKVError(f"KV file {f.path} is shorter than what was written to it: run again")
        self.stats.read_requests += len(requests)

    def gather(self, layer: int, ids: np.ndarray) -> list[torch.Tensor]:
        """Rows of tokens ``ids`` [Hkv, M] (per head; all < n) -> K, V [Hkv, M, D] (and for an int8
        KV the scales [Hkv, M, 1]), in the held dtypes: recent tokens from memory, the others from
        their extents, through the cache."""
        f = self.files[layer]
        H, M = ids.shape
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._settle(layer)
        for done in [a for a, ahead in self._ahead.items() if all(r.done() for r in ahead.reads)]:
            self._settle(done)  # other layers' read-ahead that has landed: evictable again
        self._tick += 1
        missing = np.empty(H * M, np.int64)
        n_miss, n_disk, hits, ahead_hits = _plan_gather(
            ids, f.mem_start, f.slot_of, self.fmt.rows_per_extent, f.extents_per_head, self.cache_at[layer],
            self.cache_used, self.cache_ref, self.cache_ahead, f.seen, self._tick, missing, True)
        self.stats.extents_hit += hits
        self.stats.ahead_hits += ahead_hits
        self.stats.selected_bytes += n_disk * self.fmt.row_bytes
        if n_miss:
            self._fetch(layer, f, np.sort(missing[:n_miss]), hits)
        sizes = self.fmt.part_bytes + [0] * (4 - len(self.fmt.part_bytes))
        outs = [np.empty((H, M, b), np.uint8) for b in sizes]
        bounds = np.cumsum([0] + sizes)
        _copy_rows(ids, f.mem_start, f.mem.numpy(), f.slot_of, self.fmt.rows_per_extent, f.extents_per_head,
                   self.cache_at[layer], self.cache, bounds, *outs)
        return [torch.from_numpy(o).view(dt) for o, dt in zip(outs, self.fmt.part_dtypes) if o.shape[-1]]

    def _fetch(self, layer: int, f: _LayerFile, missing: np.ndarray, hits: int) -> None:
        """Read extents ``missing`` (sorted, unique) of ``layer`` into the cache, evicting by CLOCK
        (never one this gather needs: they are marked with the current tick)."""
        at = self.cache_at[layer]
        self.stats.extents_missed += missing.size
        victims = np.empty(missing.size, np.int64)
        taken, self._hand = _clock_victims(self.cache_used, self.cache_ref, self._tick, self._hand, missing.size,
                                           victims)
        if taken < missing.size and self._ahead:  # rows held by reads ahead: wait for them, then look on
            for other in list(self._ahead):
                self._settle(other)
            more, self._hand = _clock_victims(self.cache_used, self.cache_ref, self._tick, self._hand,
                                              missing.size - taken, victims[taken:])
            taken += more
        if taken < missing.size:
            raise OffloadError(
                f"the disk KV's extent cache ({format_size(self.cache.nbytes)}) cannot hold one layer's selection "
                f"({missing.size + hits} extents of {format_size(self.fmt.extent_bytes)}): give more "
                f"cpu_memory or a smaller kv_budget")
        self._admit(layer, missing, victims)
        # spans of extents, one request each: adjacent ones, and ones a few extents apart within a head
        # (the extents between are read and dropped: on a disk that serves few requests per second, a
        # request saved is worth more than the bytes)
        eb = self.fmt.extent_bytes
        gap, head = np.diff(missing), missing // f.extents_per_head
        breaks = np.nonzero((gap > MERGE_GAP_EXTENTS + 1) | (np.diff(head) != 0))[0] + 1
        spans = list(zip(np.r_[0, breaks], np.r_[breaks, missing.size]))
        if all(missing[hi - 1] - missing[lo] == hi - lo - 1 for lo, hi in spans):
            # every span is a run of wanted extents: read straight into their cache rows
            requests = [([self.cache[c] for c in victims[lo:hi]], int(missing[lo]) * eb) for lo, hi in spans]
            self._read_requests(f, requests)
            nbytes = missing.size * eb
        else:
            widths = [int(missing[hi - 1] - missing[lo]) + 1 for lo, hi in spans]
            scratch = self._scratch.reserve(sum(widths) * eb)[:sum(widths) * eb].reshape(-1, eb)  # [extents, eb]
            starts = np.cumsum([0] + widths[:-1])
            self._read_requests(f, [(scratch[at:at + w].reshape(-1), int(missing[lo]) * eb)
                                    for (lo, _), at, w in zip(spans, starts, widths)])
            rows = np.concatenate([at + missing[lo:hi] - missing[lo] for (lo, hi), at in zip(spans, starts)])
            self.cache[victims] = scratch[rows]
            nbytes = sum(widths) * eb
        self.stats.bytes_read += nbytes
        self.stats.selection_bytes_read += nbytes
        sums = extent_checksums(self.cache, victims)
        want = f.checksums.reshape(-1)[missing]
        bad = np.nonzero(sums != want)[0]
        if bad.size:
            key = int(missing[bad[0]])
            at[missing] = -1
            self.cache_key[victims] = -1
            raise CorruptKVError(f"KV file {f.path}: extent {key % f.extents_per_head} of KV head "
                                 f"{key // f.extents_per_head} does not match its checksum (the disk returned other "
                                 f"bytes than were written): run again")

    def _admit(self, layer: int, keys: np.ndarray, victims: np.ndarray) -> None:
        """Cache rows ``victims`` [k] hold extents ``keys`` [k] of ``layer`` from now on (the
        caller fills them): their previous extents leave their layers' maps."""
        old = self.cache_key[victims]
        old = old[old >= 0]
        for owner in np.unique(old >> 32):  # evicted: their layers' maps forget them
            self.cache_at[self._layers[int(owner)]][old[(old >> 32) == owner] & 0xFFFFFFFF] = -1
        self.cache_key[victims] = (self._layers.index(layer) << 32) | keys
        self.cache_used[victims] = self._tick
        self.cache_ref[victims] = 0
        self.cache_ahead[victims] = 0
        self.cache_at[layer][keys] = victims

    # ------------------------------------------------------------------ read-ahead
    def lookahead_tokens(self, selected: int) -> int:
        """Tokens per head to read ahead after a step that selected ``selected`` per head."""
        return int(LOOKAHEAD_SHARE * selected) if self.read_ahead else 0

    def prefetch(self, layer: int, ids: np.ndarray) -> None:
        """Start reading, in the background, the extents of tokens ``ids`` [Hkv, P] (-1: none) that
        the cache lacks: tokens an index ranks just past this step's selection, likely in the
        next step's (consecutive queries move little). Returns at once; the layer's next gather
        waits for them and checks each against its checksum (one that fails leaves the cache and
        is read again by the gather that needs it). Runs after the layer's gather and shares its
        tick, so it never evicts what that gather used; extents the cache has no room for are
        skipped: a read-ahead is a hint."""
        if not self.read_ahead:
            return
        f = self.files[layer]
        self._settle(layer)
        ids = np.where((ids >= 0) & (ids < f.mem_start), ids, f.mem_start).astype(np.int64)  # [Hkv, P]
        rpe, eb = self.fmt.rows_per_extent, self.fmt.extent_bytes
        missing = np.empty(ids.size, np.int64)
        n_miss = _plan_gather(np.ascontiguousarray(ids), f.mem_start, f.slot_of, rpe, f.extents_per_head,
                              self.cache_at[layer], self.cache_used, self.cache_ref, self.cache_ahead, f.seen,
                              self._tick, missing, False)[0]
        if not n_miss:
            return
        missing = np.sort(missing[:n_miss])
        victims = np.empty(n_miss, np.int64)
        taken, self._hand = _clock_victims(self.cache_used, self.cache_ref, self._tick, self._hand, n_miss, victims)
        missing, victims = missing[:taken], victims[:taken]
        if not taken:
            return
        self._admit(layer, missing, victims)
        self.cache_used[victims] = _PENDING
        self.cache_ahead[victims] = 1
        breaks = np.nonzero(np.diff(missing) != 1)[0] + 1  # runs of adjacent extents: one request each
        reads = [self._ahead_pool.submit(self._read_one, f, [self.cache[c] for c in victims[lo:hi]],
                                         int(missing[lo]) * eb)
                 for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, taken])]
        self._ahead[layer] = _ReadAhead(missing, victims, reads, self._tick)
        self.stats.read_requests += len(reads)
        self.stats.ahead_extents += taken
        nbytes = taken * eb
        self.stats.bytes_read += nbytes
        self.stats.selection_bytes_read += nbytes

    def _settle(self, layer: int) -> None:
        """Wait for ``layer``'s read-ahead and check what it read: extents that came back short or
        do not match their checksums leave the cache; the rest become ordinary cached extents."""
        ahead = self._ahead.pop(layer, None)
        if ahead is None:
            return
        f = self.files[layer]
        try:
            complete = all(r.result() == 0 for r in ahead.reads)
        except OSError:
            complete = False
        good = extent_checksums(self.cache, ahead.rows) == f.checksums.reshape(-1)[ahead.keys] if complete \
            else np.zeros(ahead.keys.size, bool)
        bad = ahead.rows[~good]
        self.cache_at[layer][ahead.keys[~good]] = -1
        self.cache_key[bad] = -1
        self.cache_ahead[bad] = 0
        self.cache_used[ahead.rows] = ahead.tick

    def report(self) -> dict:
        """Bytes on disk, in memory (cache included), read, written and selected so far, and the cache's hit rate."""
        s = self.stats
        looked = s.extents_hit + s.extents_missed
        return {"folder": str(self.folder), "mode": "O_DIRECT" if all(f.direct for f in self.files.values())
                else "buffered", "layers": len(self.files), "bytes_on_disk": self.nbytes_on_disk(),
                "memory_bytes": self.memory_nbytes(), "cache_bytes": self.cache.nbytes,
                "bytes_read": s.bytes_read, "selection_bytes_read": s.selection_bytes_read,
                "bytes_written": s.bytes_written, "read_requests": s.read_requests, "read_ahead": self.read_ahead,
                "selected_bytes": s.selected_bytes, "extents_hit": s.extents_hit, "extents_missed": s.extents_missed,
                "ahead_extents": s.ahead_extents, "ahead_hits": s.ahead_hits,
                "hit_rate": s.extents_hit / looked if looked else None}
