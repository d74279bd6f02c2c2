"""One OpenMP runtime for torch and numba (offload.openmp), checked in fresh interpreters: the test
process itself imported torch first."""

import subprocess
import sys
import textwrap

import pytest

from offload.openmp import GOMP_SONAME, _system_gomp, _torch_gomp, version_definitions

PROBE = textwrap.dedent("""
    import ctypes, offload, numpy as np, torch
    from numba import njit, prange

    @njit(parallel=True)
    def doubled(x):
        out = np.empty_like(x)
        for i in prange(x.shape[0]):
            out[i] = 2 * x[i]
        return out

    x = torch.arange(64.0).view(8, 8)
    assert torch.equal(x @ torch.eye(8), x)  # torch's parallel product on the runtime it bound to
    assert np.array_equal(doubled(np.arange(1000.0)), 2 * np.arange(1000.0))  # numba's pool
    libs = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line})
    print(offload.openmp.STATE)
    print(ctypes.CDLL(libs[0]).omp_get_max_active_levels())  # after numba's pool started
    print(*libs, sep="\\n")
""")


def _probe(first: str = "") -> list[str]:
    done = subprocess.run([sys.executable, "-c", first + PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


@pytest.mark.skipif(not sys.platform.startswith("linux") or _system_gomp() is None or _torch_gomp() is None,
                    reason="Linux with a system libgomp and torch's bundled one")
def test_offload_first_gives_torch_and_numba_one_openmp_runtime():
    state, levels, *libs = _probe()
    assert state.startswith("one OpenMP runtime"), state
    assert libs == [str(_system_gomp())]  # torch's bundled copy never loaded
    # numba's start turned nesting on (255 levels) and offload set it back: torch's flash attention
    # nested its regions inside numba's pool otherwise, 10-200x slower (offload.openmp)
    assert levels == "1"
    state, _, *libs = _probe("import torch\n")  # torch first: nothing can be shared, and it says so
    assert state.startswith("torch was imported before offload")
    assert len(libs) == 2


def test_symbol_versions_read_from_the_elf_headers(tmp_path):
    if _system_gomp() is not None:
        names = version_definitions(_system_gomp())
        assert {GOMP_SONAME, "GOMP_1.0", "GOMP_4.0", "OMP_1.0"} <= names
    if _torch_gomp() is not None:
        assert "GOMP_4.0" in version_definitions(_torch_gomp())
    (tmp_path / "text.so").write_text("not a library")
    assert version_definitions(tmp_path / "text.so") == frozenset()
    (tmp_path / "cut.so").write_bytes(b"\x7fELF\x02\x01" + bytes(40))  # a header cut short: no exception
    assert version_definitions(tmp_path / "cut.so") == frozenset()
    assert version_definitions(tmp_path / "missing.so") == frozenset()
