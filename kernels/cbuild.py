"""The C kernels' shared library: built on first use, cached, loaded once per process.

The C kernels (``cpu_int4_gemv.c`` and ``cpu_int8_gemv.c``: int4 and int8 decode products;
``cpu_attention.c``: decode attention on a bf16 cache) are AVX2 and FMA code with OpenMP, compiled
with the system's C compiler (``-O3 -march=native``: the CPU this runs on) into one library in
``$XDG_CACHE_HOME/offload/kernels/`` under a name that digests the sources, the flags, the
compiler's version and the CPU's feature flags, so a changed source or another CPU builds again.
The build is written to a temporary name and renamed (a killed build leaves no half library; its
temporary files are removed by the next build). Without a compiler, on another architecture, or
where the build or the load fails, :func:`library` is None, says why once, and each caller keeps to
its fallback (torch's int4 kernel, numba's int8 products and attention).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import OffloadError
from ..fileio import cache_root

SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_int4_gemv.c", "cpu_int8_gemv.c", "cpu_attention.c"))
HEADERS = (Path(__file__).with_name("cpu_simd.h"),)  # what the sources include: part of the digest
LIBRARY_NAME = "cpu_kernels"
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120
STALE_TEMP_S = 3600  # a temporary build file older than this is a killed build's: removed
FALLBACKS = "int4 decode products use torch's kernel, int8 products and decode attention numba's"

# Each entry point's return and argument types (ctypes converts per call what is declared here once).
_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "int4_gemv": (_I, [_P] * 4 + [_I] * 6),
    "int8_gemv": (_I, [_P] * 4 + [_I] * 5),
    "decode_attention_bf16": (_I, [_P] * 10 + [_I] * 7 + [_F, _I] + [_P] * 4),
}


def cache_dir() -> Path:
    return cache_root() / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags (the build is -march=native: a cache shared by two CPUs must not mix)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _compiler() -> tuple[str, str] | None:
    """(path, version line) of the C compiler ($CC, else cc or gcc), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        path = shutil.which(name) if name else None
        if path:
            try:
                version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            return path, version.splitlines()[0] if version else ""
    return None


def _say(why: str) -> None:
    print(f"offload: no C kernels ({why}): {FALLBACKS}", file=sys.stderr)


def _build(compiler: str, target: Path) -> None:
    """Compile SOURCES into ``target`` atomically (temporary name in the same folder, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for stale in target.parent.glob(".build-*.so"):  # a killed build's leftovers
        try:
            if now - stale.stat().st_mtime > STALE_TEMP_S:
                stale.unlink()
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *COMPILE_FLAGS, "-o", tmp, *map(str, SOURCES)], capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, loaded (built first if these sources, compiler and CPU have none cached),
    or None where they cannot be (said once, on stderr)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None  # the kernels are x86 (AVX2) code; nothing to say on other machines
    compiler = _compiler()
    if compiler is None:
        _say("no C compiler found: set CC, or install gcc")
        return None
    sources = "\n".join(path.read_text() for path in SOURCES + HEADERS)
    key = hashlib.sha256("\n".join((sources, " ".join(COMPILE_FLAGS), compiler[1], _cpu_flags()))
                         .encode()).hexdigest()[:20]
    target = cache_dir() / f"{LIBRARY_NAME}-{key}.so"
    try:
        if not target.exists():
            _build(compiler[0], target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _say(f"they did not build or load: {e}")
        return None
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def c_kernel_chosen(env: str, other: str) -> bool:
    """Whether a C kernel runs in this process by the setting ``env`` ("c", the default, where the
    library is there; ``other`` names the kernel it falls back to)."""
    setting = os.environ.get(env, "c").strip().lower()
    if setting not in ("c", other):
        raise OffloadError(f"{env}={setting!r}: use c or {other}")
    return setting == "c" and library() is not None


def best_rounds(kernels: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """Best-round milliseconds per call of each kernel: a first call each (page faults, the thread
    pool's start), then rounds of ``calls`` calls, the kernels alternating so that drifts of a shared
    box's speed reach all of them."""
    best = {name: float("inf") for name in kernels}
    for run in kernels.values():
        run()
    for _ in range(rounds):
        for name, run in kernels.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                run()
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3 / calls)
    return best
