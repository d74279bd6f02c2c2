"""Memory budgets ("24GiB", "auto"), the disk tier's directory, and measuring what the process holds.

Budgets are held by the planner (offload.tiers.planner) before anything is loaded: a placement
that does not fit fails with :class:`BudgetError`, which names the tier, the budget and the
smallest budget that would work. While generating, :class:`MemorySampler` measures what the
process really holds, for the report and the tests that hold the budgets from outside. The
process's real memory is read from the OS (``RssAnon``: private, anonymous resident memory; file
pages of a memory-mapped checkpoint are the page cache's, not the process's) and, on a GPU, from
the driver (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from offload.errors import OffloadError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class BudgetError(OffloadError):
    """A placement or allocation does not fit the memory budget the user gave."""


def parse_size(text: str | int | float, what: str = "size") -> int:
    """'24GiB', '1.5 GB', '512MiB', 1073741824 -> bytes."""
    if isinstance(text, (int, float)):
        if text < 0:
            raise OffloadError(f"{what} must be >= 0, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise OffloadError(f"cannot read {what} '{text}': write a number with a unit, e.g. 24GiB, 512MiB or 8GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def free_host_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def free_device_memory(device) -> int:
    import torch

    if getattr(device, "type", device) == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return free_host_memory()


def resolve_budget(value: str | int | None, what: str, auto_bytes) -> int | None:
    """None stays None (no limit given); "auto" takes 90% of what ``auto_bytes()`` reports free."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return int(0.9 * auto_bytes())
    return parse_size(value, what)


def ensure_writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` (and its parents) and check that a file can be written in it, before any
    work that would write there; a failure is one line naming ``what`` the folder is for."""
    if path.exists() and not path.is_dir():
        raise OffloadError(f"{what} {path} is a file, not a directory: give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".offload-probe-"):
            pass
    except OSError as e:
        raise OffloadError(f"{what} {path} is not writable ({e.strerror or e}): choose a writable location") from None
    return path


def check_disk_dir(path: Path, needed: int) -> None:
    """The disk tier's directory, checked before anything is written to it: it is a directory (or
    can be made one), writable, with room for the ``needed`` bytes the planner will put there."""
    ensure_writable_dir(path, "disk_dir")
    free = shutil.disk_usage(path).free
    if needed > free:
        raise BudgetError(f"disk_dir {path} has {format_size(free)} free but the disk tier needs "
                          f"{format_size(needed)}: free space there or choose another directory")


def rss_anon(pid: int | None = None) -> int:
    """Private anonymous resident memory of process ``pid`` (default: this one; bytes), from /proc;
    RSS where absent; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def pinned_nbytes(nbytes: int) -> int:
    """Host memory torch's pinned allocator takes for a request of ``nbytes``: it rounds each block
    up to a power of two (CachingHostAllocator), so budgets count pinned buffers at that size."""
    return 1 << max(0, int(nbytes) - 1).bit_length() if nbytes > 0 else 0


def release_freed_memory() -> None:
    """Make freed memory leave the process: glibc keeps large freed blocks in its heap (its mmap
    threshold adapts upwards), which would count against a budget. Large allocations are made to
    use mmap (returned on free) and the heap is trimmed. No-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB, fixed
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemorySampler:
    """Samples the process's private resident memory in a background thread; ``peak`` after stop."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.baseline = interval, 0, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "MemorySampler":
        self.baseline = self.peak = rss_anon()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())
