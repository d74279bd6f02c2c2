"""Reading store files: aligned ``O_DIRECT`` POSIX reads, or kvikio (GPUDirect Storage) on a GPU.

``io_backend``: "auto" picks kvikio when the target is a CUDA device and kvikio imports, else
POSIX; "posix" forces POSIX; "kvikio" requires kvikio (an ImportError says what to install).
kvikio that imports can still fail when it opens or reads a file (no GPUDirect driver, a
filesystem cuFile refuses): the reader then says so once and carries on with POSIX reads.
POSIX reads open the file with ``O_DIRECT`` and read into reusable page-aligned buffers, so the
page cache neither serves repeated reads (hiding the disk's real cost) nor holds a copy of the
data (taking memory the budget gave elsewhere). Where the filesystem refuses ``O_DIRECT``
(tmpfs), reads are buffered and each range's pages are dropped after use
(``posix_fadvise(DONTNEED)``); :attr:`StoreReader.mode` says which mode is in effect.
Every read verifies the checksums of the extents it covers.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from offload.errors import OffloadError

from .store import ALIGN, SECTOR, CorruptStoreError, TensorEntry, align_up, read_header, weighted_sum32


def kvikio_available() -> bool:
    try:
        import kvikio  # noqa: F401
    except ImportError:
        return False
    return True


IO_BACKENDS = ("auto", "posix", "kvikio")


def resolve_io_backend(io_backend: str, device: torch.device) -> str:
    if io_backend not in IO_BACKENDS:
        raise OffloadError(f"unknown io_backend '{io_backend}': use auto, posix or kvikio")
    if io_backend == "kvikio":
        if not kvikio_available():
            raise ImportError("io_backend='kvikio' needs kvikio: pip install 'offload[gpu]' (kvikio-cu13)")
        if device.type != "cuda":
            raise OffloadError("io_backend='kvikio' reads into GPU memory: it needs a CUDA device")
        return "kvikio"
    if io_backend == "auto" and device.type == "cuda" and kvikio_available():
        return "kvikio"
    return "posix"


class AlignedBuffer:
    """Page-aligned host memory (anonymous mmap), grown on demand and reused between reads."""

    def __init__(self, nbytes: int = 0):
        self._map: mmap.mmap | None = None
        self.array = np.zeros(0, np.uint8)
        self.reserve(nbytes)

    def reserve(self, nbytes: int) -> np.ndarray:
        nbytes = align_up(max(nbytes, 1))
        if self._map is None or len(self._map) < nbytes:
            # the old map is not closed here: a reader thread may still hold a view of it (between
            # its copy out and its return); it is unmapped when the last view goes
            self._map = mmap.mmap(-1, nbytes)
            self.array = np.frombuffer(self._map, np.uint8)  # [capacity]
        return self.array

    @property
    def capacity(self) -> int:
        return 0 if self._map is None else len(self._map)


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A page-aligned host tensor (anonymous mmap): O_DIRECT reads can land in it with no copy."""
    nbytes = int(np.prod(shape)) * (torch.finfo(dtype).bits if dtype.is_floating_point else
                                    torch.iinfo(dtype).bits) // 8
    buf = np.frombuffer(mmap.mmap(-1, align_up(max(nbytes, 1))), np.uint8)  # the tensor keeps it alive
    return torch.frombuffer(buf, dtype=torch.uint8)[:nbytes].view(dtype).view(shape)


def _direct_target(out: torch.Tensor | None, align: int) -> np.ndarray | None:
    """``out`` as a uint8 numpy view when an O_DIRECT read can land in it (CPU, contiguous, aligned)."""
    if out is None or out.device.type != "cpu" or not out.is_contiguous() or out.data_ptr() % align:
        return None
    return out.view(-1).view(torch.uint8).numpy()


def _first_bad_extent(e: TensorEntry, data: np.ndarray, start: int, end: int) -> int | None:
    """The first extent of tensor bytes [start, end) (``start`` on an extent boundary; held in
    ``data`` from its first byte) whose CRC-32 does not match, or None. A bundle store has a
    thousand small extents per layer: the loop keeps its per-extent cost to one zlib call."""
    view, extent, crcs = memoryview(data)[:min(end, e.nbytes) - start], e.extent, e.crcs
    first = start // extent
    for k, lo in enumerate(range(0, len(view), extent)):  # the last slice stops at the tensor's end
        if zlib.crc32(view[lo:lo + extent]) != crcs[first + k]:
            return first + k
    return None


class StoreReader:
    """Reads tensors (or extent-aligned byte ranges of them) from one store file, verified."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", io_backend: str = "auto",
                 direct: bool = True, read_block: int = 0, reader_threads: int = 1):
        """``read_block`` > 0 splits each read into blocks of that many bytes (a multiple of 4 KiB)
        issued by ``reader_threads`` threads at once: an NVMe drive reaches its bandwidth only with
        several requests in flight. ``offload tune`` picks both for this machine."""
        if read_block % ALIGN or read_block < 0 or reader_threads < 1:
            raise OffloadError(f"read_block must be a multiple of {ALIGN} bytes and reader_threads >= 1, got "
                               f"{read_block} and {reader_threads}")
        self.read_block, self.reader_threads = read_block, reader_threads
        self._readers = ThreadPoolExecutor(reader_threads, thread_name_prefix="offload-read") \
            if reader_threads > 1 else None
        self.path = Path(path)
        self.metadata, self.entries = read_header(self.path)
        self.device = torch.device(device)
        self.backend = resolve_io_backend(io_backend, self.device)
        self.bytes_read = 0  # accounting: bytes requested from the disk
        self._lock = threading.Lock()  # one reader thread at a time shares the aligned buffer
        self._buffer = AlignedBuffer()
        self.mode = "buffered"
        flags = os.O_RDONLY
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(self.path, flags | os.O_DIRECT)
                self.mode = "O_DIRECT"
            except OSError:
                self._fd = os.open(self.path, flags)
        else:
            self._fd = os.open(self.path, flags)
        self.align = self._direct_alignment() if self.mode == "O_DIRECT" else SECTOR
        self._posix_mode = self.mode  # what a fallback from kvikio reads with
        self._cufile = None
        if self.backend == "kvikio":
            try:
                import kvikio

                self._cufile = kvikio.CuFile(str(self.path), "r")
                self.mode = "kvikio"
            except Exception as e:  # noqa: BLE001 - whatever cuFile raises, POSIX reads still work
                self._fall_back_to_posix(e)

    def _fall_back_to_posix(self, error: Exception) -> None:
        """kvikio failed at run time: read with POSIX from now on (said once per reader)."""
        with self._lock:  # two threads failing at once still fall back (and say so) once
            if self.backend != "kvikio":
                return
            print(f"offload: kvikio read failed ({type(error).__name__}: {error}); falling back to POSIX reads",
                  file=sys.stderr)
            cufile, self._cufile = self._cufile, None
            self.backend, self.mode = "posix", self._posix_mode
        if cufile is not None:
            try:
                cufile.close()
            except Exception:  # noqa: BLE001 - a broken handle may not close either
                pass

    def close(self) -> None:
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._cufile is not None:
            self._cufile.close()
            self._cufile = None

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _direct_alignment(self) -> int:
        """The O_DIRECT unit of this file's device: 512 bytes where a 512-byte read at a 512-byte
        offset works (most SSDs and virtual disks), else a page."""
        probe = self._buffer.reserve(2 * SECTOR)
        try:
            os.preadv(self._fd, [memoryview(probe[SECTOR:2 * SECTOR])], SECTOR)
        except OSError:
            return ALIGN
        return SECTOR

    def entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise OffloadError(f"tensor '{name}' is not in store {self.path}")
        return self.entries[name]

    # ------------------------------------------------------------------ reads
    def _pread(self, offset: int, nbytes: int) -> np.ndarray:
        """Aligned read of bytes [offset, offset + nbytes) into the reusable buffer (a view of it)."""
        start = offset - offset % self.align
        length = align_up(offset + nbytes, self.align) - start
        buf = self._buffer.reserve(length)[:length]
        self._pread_into(buf, start)
        return buf[offset - start:offset - start + nbytes]

    def _pread_into(self, buf: np.ndarray, start: int) -> None:
        """Fill the aligned ``buf`` from file byte ``start`` (aligned), in ``read_block`` requests
        issued by the reader threads when tuned so (they land in disjoint slices; preadv releases the GIL)."""
        length = len(buf)
        if self._readers is not None and self.read_block and length > self.read_block:
            spans = [(lo, min(lo + self.read_block, length)) for lo in range(0, length, self.read_block)]
            got = sum(self._readers.map(lambda s: os.preadv(self._fd, [memoryview(buf[s[0]:s[1]])], start + s[0]),
                                        spans))
        elif self.read_block and length > self.read_block:
            got = sum(os.preadv(self._fd, [memoryview(buf[lo:lo + self.read_block])], start + lo)
                      for lo in range(0, length, self.read_block))
        else:
            got = os.preadv(self._fd, [memoryview(buf)], start)
        if got < min(length, os.fstat(self._fd).st_size - start):
            raise CorruptStoreError(self.path, f"short read at byte {start}: the file is truncated")
        if self.mode == "buffered" and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, start, length, os.POSIX_FADV_DONTNEED)
        self.bytes_read += length

    def read_bytes(self, name: str, start: int = 0, end: int | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Bytes [start, end) of tensor ``name`` as uint8 on ``self.device``, verified; ``start``
        must sit on an extent boundary so that every byte read is covered by a whole checksum.
        ``out`` (uint8, end - start bytes) receives them without an intermediate tensor."""
        e = self.entry(name)
        end = e.nbytes if end is None else end
        if start % e.extent or not 0 <= start <= end <= e.nbytes:
            raise OffloadError(f"read of '{name}' bytes [{start}, {end}) is not extent-aligned (extent {e.extent})")
        span_end = min(-(-end // e.extent) * e.extent, e.nbytes) if end > start else start  # whole extents
        if self.backend == "kvikio":
            got = self._read_kvikio(e, e.extent_ranges(start, end), start, span_end)
            if got is not None:
                return got[:end - start]  # else kvikio failed: this read and the later ones go through POSIX
        target = _direct_target(out, self.align) if self.mode == "O_DIRECT" else None
        if target is not None and span_end == end and (e.offset + start) % self.align == 0 \
                and (end - start) % self.align == 0:  # straight into the caller's aligned buffer
            self._pread_into(target, e.offset + start)
            self._verify(e, target, start, end)
            return out
        with self._lock:
            data = self._pread(e.offset + start, span_end - start)  # [span] uint8 view of the buffer
            self._verify(e, data, start, span_end)
            if out is None:
                out = torch.empty(end - start, dtype=torch.uint8, device=self.device)  # [nbytes]
            out.copy_(torch.from_numpy(data[:end - start]))
        return out

    def span_of(self, names: list[str]) -> tuple[int, int, dict[str, int]] | None:
        """(first byte, bytes, name -> offset within) of tensors ``names`` when they lie back to back
        in the file (each aligned, nothing between them), else None: a span one request can read."""
        entries = sorted((self.entry(n) for n in names), key=lambda e: e.offset)
        base, pos = entries[0].offset, entries[0].offset
        for e in entries:
            if e.offset != pos:
                return None
            pos = align_up(e.offset + e.nbytes)
        return base, pos - base, {e.name: e.offset - base for e in entries}

    def read_span(self, names: list[str], out: torch.Tensor) -> torch.Tensor:
        """Tensors ``names`` (back to back in the file: :meth:`span_of`) in one request into ``out``
        (uint8 host memory, page-aligned, the span's length), each landing at its offset within the
        span, every extent verified. A decode step streaming layers reads each in one request
        instead of one per tensor (ten per quantized layer), which per-request latency dominates."""
        span = self.span_of(names)
        if span is None:
            raise OffloadError(f"tensors {names[:2]}... are not back to back in {self.path}")
        base, length, at = span
        if out.dtype != torch.uint8 or out.numel() != length:
            raise OffloadError(f"read_span needs a uint8 buffer of {length} bytes, got {out.numel()} {out.dtype}")
        target = _direct_target(out, self.align) if self.backend == "posix" else None
        if target is None:
            for name in names:  # kvikio, or a buffer not aligned for O_DIRECT: tensor by tensor
                e = self.entry(name)
                piece = out[at[name]:at[name] + e.nbytes]
                got = self.read_bytes(name, out=piece)  # kvikio returns device memory of its own
                if got is not piece:
                    piece.copy_(got)
            return out
        self._pread_into(target, base)
        for name in names:
            e = self.entry(name)
            self._verify(e, target[at[name]:], 0, e.nbytes)
        return out

    def _verify(self, e: TensorEntry, data: np.ndarray, start: int, end: int) -> None:
        """Check the extents covering tensor bytes [start, end), held in ``data`` from its first byte."""
        bad = _first_bad_extent(e, data, start, end)
        if bad is not None:
            raise CorruptStoreError(self.path, f"checksum mismatch in tensor '{e.name}' extent {bad}")

    def read_ranges(self, name: str, ranges: list[tuple[int, int]], out: torch.Tensor) -> torch.Tensor:
        """Byte ranges [(start, end), ...] of tensor ``name``, each starting on an extent boundary,
        verified and packed in order into ``out`` (uint8 on the CPU, their total length).

        Scattered reads (flash bundles) are bound by each request's latency, not by bandwidth, so
        the ranges are issued together by the reader threads (several requests in flight, ``preadv``
        releases the GIL), each into its own aligned slice of one reusable buffer, or straight into
        ``out`` when it is aligned (:func:`aligned_empty`) and the ranges are whole blocks."""
        e = self.entry(name)
        for start, end in ranges:
            if start % e.extent or not 0 <= start < end <= e.nbytes:
                raise OffloadError(f"read of '{name}' bytes [{start}, {end}) is not extent-aligned (extent {e.extent})")
        if self.backend == "kvikio" or self.device.type != "cpu" or len(ranges) < 2:
            pos = 0
            for start, end in ranges:
                self.read_bytes(name, start, end, out=out[pos:pos + end - start])
                pos += end - start
            return out
        a = self.align
        skips = [(e.offset + start) % a for start, _ in ranges]  # bytes before each range in its first block
        spans = [align_up(e.offset + end, a) - (e.offset + start - skip) for (start, end), skip in zip(ranges, skips)]
        at = np.concatenate([[0], np.cumsum(spans)]).tolist()  # where each request lands in the buffer
        target = _direct_target(out, a) if self.mode == "O_DIRECT" else None
        if target is not None and not any(skips) and all(end - start == span for (start, end), span in
                                                          zip(ranges, spans)):
            self._read_spans(e, ranges, skips, spans, at, target)  # whole blocks: straight into ``out``
            return out
        with self._lock:
            buf = self._buffer.reserve(at[-1])
            self._read_spans(e, ranges, skips, spans, at, buf)
            pos = 0
            for k, (start, end) in enumerate(ranges):
                out[pos:pos + end - start].copy_(torch.from_numpy(buf[at[k] + skips[k]:at[k] + skips[k] + end - start]))
                pos += end - start
        return out

    def _read_spans(self, e: TensorEntry, ranges, skips, spans, at, buf: np.ndarray) -> None:
        """Issue the aligned requests of ``read_ranges`` (in flight together) into ``buf`` and verify them."""
        def one(k: int) -> str | None:
            (start, end), skip = ranges[k], skips[k]
            view = buf[at[k]:at[k] + spans[k]]
            got = os.preadv(self._fd, [memoryview(view)], e.offset + start - skip)
            if got < skip + end - start:
                return f"short read at byte {e.offset + start} (the file is truncated)"
            bad = _first_bad_extent(e, view[skip:], start, end)
            return None if bad is None else f"checksum mismatch in tensor '{e.name}' extent {bad}"

        problems = list(self._readers.map(one, range(len(ranges)))) if self._readers is not None else \
            [one(k) for k in range(len(ranges))]
        bad = next((p for p in problems if p), None)
        if bad:
            raise CorruptStoreError(self.path, bad)
        if self.mode == "buffered" and hasattr(os, "posix_fadvise"):
            for (start, _), skip, span in zip(ranges, skips, spans):
                os.posix_fadvise(self._fd, e.offset + start - skip, span, os.POSIX_FADV_DONTNEED)
        self.bytes_read += at[-1]

    def _read_kvikio(self, e: TensorEntry, ranges, start: int, span_end: int) -> torch.Tensor | None:
        """Tensor bytes [start, span_end) read by cuFile into device memory and verified there;
        None when cuFile failed (the reader has fallen back to POSIX)."""
        length = align_up(span_end - start, 4)
        out = torch.empty(length, dtype=torch.uint8, device=self.device)  # [span] on the GPU
        out[span_end - start:].zero_()  # the checksum reads whole words: the pad is zero
        # cuFile writes outside stream order: memory the allocator recycled on this stream must be
        # done with (its queued kernels run) before the read lands in it
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        try:
            self._cufile.pread(out, span_end - start, e.offset + start).get()
        except Exception as err:  # noqa: BLE001 - only cuFile's own failure is caught here
            self._fall_back_to_posix(err)
            return None
        self.bytes_read += span_end - start
        for i, lo, hi in ranges:
            piece = out[lo - start:align_up(hi - start, 4)]
            if weighted_sum32(piece) != e.sums[i]:
                raise CorruptStoreError(self.path, f"checksum mismatch in tensor '{e.name}' extent {i}")
        return out

    def verify(self, chunk: int = 16 << 20) -> None:
        """Read every tensor and check every extent (CorruptStoreError at the first bad one), in
        pieces of about ``chunk`` bytes (whole extents) through one reused buffer: a store about to
        be reused is checked once, before anything depends on it."""
        pieces = {e.name: max(1, chunk // e.extent) * e.extent for e in self.entries.values()}
        buf = aligned_empty((max([min(e.nbytes, pieces[e.name]) for e in self.entries.values()], default=0),),
                            torch.uint8)  # [largest piece]
        for e in self.entries.values():
            for lo in range(0, e.nbytes, pieces[e.name]):
                hi = min(lo + pieces[e.name], e.nbytes)
                self.read_bytes(e.name, lo, hi, out=buf[:hi - lo])

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor ``name`` (verified), into ``out`` when given (reused buffers)."""
        e = self.entry(name)
        if out is None:
            raw = self.read_bytes(name)
            return raw.view(e.torch_dtype).view(e.shape) if e.nbytes else torch.empty(
                e.shape, dtype=e.torch_dtype, device=self.device)
        if tuple(out.shape) != e.shape or out.dtype != e.torch_dtype:
            raise OffloadError(f"tensor '{name}' is {e.shape} {e.dtype}, the buffer is "
                               f"{tuple(out.shape)} {out.dtype}")
        if e.nbytes:
            if out.is_contiguous() and out.device.type == "cpu" and self.backend == "posix":
                # straight into a host buffer (a GPU streamer's pinned staging too): POSIX reads land in host memory
                self.read_bytes(name, out=out.view(-1).view(torch.uint8))
            else:
                out.copy_(self.read_bytes(name).view(e.torch_dtype).view(e.shape), non_blocking=True)
        return out
