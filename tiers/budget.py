"""Memory budgets ("24GiB", "auto") and the accounting that holds every tier to its budget.

A :class:`TierAccount` is charged before memory is taken; a charge that would exceed the budget
fails with :class:`BudgetError`, which names the tier, the budget, what was asked for and the
smallest budget that would work, before any work is done. Peaks are kept for the report. The
process's real memory is read from the OS (``RssAnon``: private, anonymous resident memory; file
pages of a memory-mapped checkpoint are the page cache's, not the process's) and, on a GPU, from
the driver (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

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


def rss_anon() -> int:
    """Private anonymous resident memory of this process (bytes), from /proc; RSS where absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.Process().memory_info().rss)


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


@dataclass
class TierAccount:
    """What one tier holds, by label, against its budget (None: unlimited)."""

    name: str
    budget: int | None = None
    held: dict[str, int] = field(default_factory=dict)
    peak: int = 0

    @property
    def used(self) -> int:
        return sum(self.held.values())

    def charge(self, label: str, nbytes: int) -> None:
        need = self.used - self.held.get(label, 0) + nbytes
        if self.budget is not None and need > self.budget:
            raise BudgetError(
                f"{self.name} budget {format_size(self.budget)} is too small: {label} needs {format_size(nbytes)} "
                f"on top of {format_size(self.used - self.held.get(label, 0))} already placed; the smallest "
                f"{self.name} budget that works here is {format_size(need)}")
        self.held[label] = nbytes
        self.peak = max(self.peak, self.used)

    def release(self, label: str) -> None:
        self.held.pop(label, None)


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
