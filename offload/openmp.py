"""One OpenMP runtime for torch and numba's kernels on a Linux CPU.

torch's wheels bundle their own libgomp; numba's OpenMP threading layer links the system's (by
its file name, libgomp.so.1.0.0). Two runtimes keep two pools of worker threads, and each pool's
workers spin for a while after every parallel region: on a 2-core box numba's worker spins while
torch's products run and torch's while numba's kernels run, three busy threads on two cores.
With the system's libgomp loaded before torch is, torch's libraries bind to it (they ask for the
soname libgomp.so.1, already loaded) and numba's to the same file: one pool. Measured on the
default model at 32K (BENCHMARKS.md): the cluster policy's step 42.7 -> 39.9 ms, streaming 21.9
-> 21.1, dense unchanged.

Done only where it is safe: on Linux, before torch is imported, when torch's bundled copy is the
one it links by that soname, and when the system's copy defines every symbol version torch's
does (else torch could not load against it). Otherwise nothing changes, and :data:`STATE` says
why; ``offload`` imports this module first.

One pool needs one more thing: numba's OpenMP layer turns nested parallelism on when it starts
(``omp_set_nested(1)``, once per process), and in the runtime torch shares that lets torch's CPU
flash attention open parallel regions inside its own: more spinning threads than cores. Measured
here (2 cores, bf16, 9 heads of 64): one causal attention call over 5 tokens 0.05 -> 11 ms, over
512 tokens 8.9 -> 59 ms, for the rest of the process once any numba parallel loop had run. So
numba's pool is started here, and the nesting set back to what it was (numba's kernels never nest).
"""

from __future__ import annotations

import ctypes
import importlib.util
import struct
import sys
from pathlib import Path

# Where distributions keep the system's libgomp (the file numba's OpenMP layer links).
SYSTEM_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/lib/x86_64-linux-gnu",
                   "/lib64", "/usr/lib", "/lib")
GOMP_SONAME = "libgomp.so.1"
SHT_GNU_VERDEF = 0x6FFFFFFD  # the section listing the symbol versions a library defines
ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB = 2, 1


def version_definitions(path: Path) -> frozenset[str]:
    """The symbol versions a shared library defines (its .gnu.version_d names, e.g. 'GOMP_4.0'),
    read from its ELF headers; empty for anything but a well-formed little-endian 64-bit ELF file
    (this runs when ``offload`` is imported: it never raises)."""
    try:
        data = path.read_bytes()
        if data[:4] != ELF_MAGIC or data[4] != ELFCLASS64 or data[5] != ELFDATA2LSB:
            return frozenset()
        return _verdef_names(data)
    except (OSError, IndexError, ValueError, UnicodeDecodeError, struct.error):
        return frozenset()


def _verdef_names(data: bytes) -> frozenset[str]:
    """The version names of an ELF64 file's SHT_GNU_verdef section (the section headers' table at
    e_shoff; each definition's first auxiliary entry names it in the linked string table)."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names: set[str] = set()
    for _, kind, _, _, offset, _, link, info, _, _ in sections:
        if kind != SHT_GNU_VERDEF:
            continue
        strings = sections[link][4]  # the linked string table's file offset
        at = offset
        for _ in range(info):  # info: how many definitions
            _, _, _, count, _, aux, following = struct.unpack_from("<HHHHIII", data, at)
            if count:
                name_at, = struct.unpack_from("<I", data, at + aux)
                end = data.index(b"\0", strings + name_at)
                names.add(data[strings + name_at:end].decode())
            at += following
    return frozenset(names)


def _system_gomp() -> Path | None:
    for folder in SYSTEM_LIB_DIRS:
        path = Path(folder) / GOMP_SONAME
        if path.exists():
            return path.resolve()
    return None


def _torch_gomp() -> Path | None:
    """torch's bundled libgomp, found without importing torch (None: it bundles none by that name)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "lib" / GOMP_SONAME
    return path if path.exists() else None


def share_runtime() -> str:
    """Load the system's libgomp ahead of torch where that is safe; return what was done."""
    if not sys.platform.startswith("linux"):
        return "not Linux: left alone"
    if "torch" in sys.modules:
        return "torch was imported before offload: torch and numba keep an OpenMP pool each"
    system, bundled = _system_gomp(), _torch_gomp()
    if system is None or bundled is None:
        return "no system libgomp, or torch bundles none: left alone"
    needed = version_definitions(bundled)
    if not needed or not needed <= version_definitions(system):
        return f"the system's {system} lacks symbol versions torch's libgomp defines: left alone"
    try:
        runtime = ctypes.CDLL(str(system), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        return f"loading {system} failed ({e}): left alone"
    try:
        _start_numba_pool(runtime)
    except (ImportError, ValueError, AttributeError, OSError) as e:  # numba's layer would not start
        return f"one OpenMP runtime for torch and numba ({system}); numba's pool not started here ({e})"
    return f"one OpenMP runtime for torch and numba ({system})"


def _start_numba_pool(runtime: ctypes.CDLL) -> None:
    """Start numba's thread pool in the shared ``runtime`` and undo the nesting its start turns on
    (see the module's docstring); the pool's threads themselves are made at its first parallel loop."""
    import numba

    levels = runtime.omp_get_max_active_levels()
    numba.get_num_threads()  # starts numba's threading layer (its launch sets nesting on, once)
    runtime.omp_set_max_active_levels(levels)


STATE = share_runtime()
