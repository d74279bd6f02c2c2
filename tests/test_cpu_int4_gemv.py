"""The C int4 decode kernel (kernels/cpu_int4_gemv.c) against the plain-torch reference (dequantize,
then multiply) over a grid of shapes, rows and both block layouts it reads; its build cache and the
per-process choice between it and torch's kernel."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from offload.errors import OffloadError
from offload.kernels import cbuild, cpu_int4_gemv, int4_group_linear, int4_pack_layout
from offload.kernels.int4_pack import GEMV_ROWS
from offload.quant import KERNEL_DTYPE, Int4Weight, dequantize_int4, quantize_int4

needs_kernel = pytest.mark.skipif(cpu_int4_gemv.library() is None, reason="the C kernel does not build here")


def _halves_pack(codes: torch.Tensor, block_rows: int) -> torch.Tensor:
    """codes int [N, K] -> uint8 [N, K/2] in the halves form of ``block_rows``-row blocks: each block
    laid [K, rows / 2], byte d of a column holding rows d (low nibble) and rows / 2 + d (high)."""
    N, K = codes.shape
    blocks = codes.to(torch.uint8).view(N // block_rows, 2, block_rows // 2, K)  # [B, halves, rows/2, K]
    packed = blocks[:, 0] | (blocks[:, 1] << 4)  # [B, rows/2, K]
    return packed.transpose(1, 2).contiguous().view(N, K // 2)  # [B, K, rows/2] bytes


def _weight(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes, scale, zero = quantize_int4(torch.randn(n, k, generator=g) * 0.05, 32, KERNEL_DTYPE)
    exact = dequantize_int4(codes, scale.bfloat16().float(), zero.bfloat16().float())  # [N, K] fp32
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # [G, N, 2]
    return codes, scales_zeros, exact


def _close_to_bf16(out: torch.Tensor, exact: torch.Tensor) -> None:
    """out (bf16) is exact (fp32) rounded to bf16, to one unit in its last place (the fp32 sums run in
    another order than the reference's)."""
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape
    err = (out.float() - exact).abs()
    bound = exact.abs() * 2.0 ** -8 + 1e-6 * exact.abs().max()
    assert (err <= bound).all(), (err - bound).max().item()


@needs_kernel
@pytest.mark.parametrize("block_rows", [32, 64])
@pytest.mark.parametrize("n,k", [(64, 32), (128, 96), (960, 576), (576, 1536), (3072, 576)])
@pytest.mark.parametrize("m", sorted({1, 3, 8, GEMV_ROWS}))
def test_kernel_matches_the_reference(block_rows, n, k, m):
    codes, scales_zeros, exact = _weight(n, k, seed=n + k + m)
    packed = _halves_pack(codes, block_rows)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)  # [M, K]
    out = cpu_int4_gemv.int4_gemv(x, packed, scales_zeros, 32, block_rows, torch.get_num_threads())  # [M, N]
    _close_to_bf16(out, x.float() @ exact.t())
    one = cpu_int4_gemv.int4_gemv(x, packed, scales_zeros, 32, block_rows, 1)  # one thread: the same numbers
    assert torch.equal(one.view(torch.int16), out.view(torch.int16))


@needs_kernel
def test_kernel_reads_torchs_packing_and_propagates_nan():
    """On the packer's own layout (this CPU's), the C kernel and torch's fused kernel give the same
    product to bf16 rounding; a NaN scale makes its row NaN, never a number."""
    layout = int4_pack_layout()
    n, k = 4 * layout.block_rows, 128
    codes, scales_zeros, exact = _weight(n, k, seed=1)
    weight = Int4Weight(n, k, torch.bfloat16)
    weight.load_codes(codes, scales_zeros[..., 0].t().float(), scales_zeros[..., 1].t().float())
    assert cpu_int4_gemv.takes(weight.packed, layout, 32) == (not layout.paired and layout.block_rows in (32, 64))
    if not cpu_int4_gemv.takes(weight.packed, layout, 32):
        pytest.skip(f"this CPU's packing ({layout}) is not one the C kernel reads")
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    out = cpu_int4_gemv.int4_gemv(x, weight.packed, weight.scales_zeros, 32, layout.block_rows, 2)
    _close_to_bf16(out, x.float() @ exact.t())
    fused = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight.packed, 32, weight.scales_zeros)
    assert (out.float() - fused.float()).abs().max() <= 2.0 ** -7 * fused.float().abs().max()
    weight.scales_zeros.data[1, 5, 0] = float("nan")
    out = cpu_int4_gemv.int4_gemv(x, weight.packed, weight.scales_zeros, 32, layout.block_rows, 2)
    assert torch.isnan(out[:, 5]).all() and not torch.isnan(out[:, :5]).any()


@needs_kernel
def test_kernel_refuses_what_it_does_not_read():
    layout = int4_pack_layout()
    codes, scales_zeros, _ = _weight(48, 64, seed=0)  # 48 rows: not whole blocks of 32 or 64
    packed = _halves_pack(codes, 16)
    assert not cpu_int4_gemv.takes(packed, layout, 32)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="refused"):
        cpu_int4_gemv.int4_gemv(x, packed, scales_zeros, 32, 32, 1)
    with pytest.raises(ValueError, match="bf16 rows"):
        cpu_int4_gemv.int4_gemv(x.float(), packed, scales_zeros, 32, 32, 1)


def test_the_choice_is_measured_or_set(monkeypatch):
    """auto times both kernels on a probe and says what it measured; torch and c set the choice; a
    typo is one clear error. The product through int4_group_linear is right whichever runs."""
    layout = int4_pack_layout()
    codes, scales_zeros, exact = _weight(2 * layout.block_rows, 96, seed=4)
    weight = Int4Weight(2 * layout.block_rows, 96, torch.bfloat16)
    weight.load_codes(codes, scales_zeros[..., 0].t().float(), scales_zeros[..., 1].t().float())
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    chosen = {}
    try:
        for setting in ("auto", "torch", "c"):
            monkeypatch.setenv(cpu_int4_gemv.KERNEL_ENV, setting)
            cpu_int4_gemv.decode_kernel.cache_clear()
            chosen[setting] = (cpu_int4_gemv.decode_kernel(), cpu_int4_gemv.decode_rows())
            for rows in (1, 3, GEMV_ROWS):  # the C kernel's single and paired rows, or torch's
                xr = x.expand(rows, -1).contiguous() * torch.arange(1, rows + 1).to(torch.bfloat16)[:, None]
                _close_to_bf16(int4_group_linear(xr, weight.packed, weight.scales_zeros, 32), xr.float() @ exact.t())
        monkeypatch.setenv(cpu_int4_gemv.KERNEL_ENV, "fastest")
        cpu_int4_gemv.decode_kernel.cache_clear()
        with pytest.raises(OffloadError, match="auto, c or torch"):
            cpu_int4_gemv.decode_kernel()
    finally:
        monkeypatch.delenv(cpu_int4_gemv.KERNEL_ENV)
        cpu_int4_gemv.decode_kernel.cache_clear()
    assert chosen["torch"][0].name == "torch" and chosen["torch"][1] == 0
    if cpu_int4_gemv.library() is not None and not layout.paired and layout.block_rows in cpu_int4_gemv.BLOCK_ROWS:
        assert chosen["c"][0].name == "c" and chosen["c"][1] == (GEMV_ROWS if layout.block_rows == 32 else 1)
        auto, rows = chosen["auto"]
        assert auto.name in ("c", "torch") and "measured" in auto.reason and (rows > 0) == (auto.name == "c")
        assert "C " in auto.reason and "torch " in auto.reason


def test_build_is_cached_atomic_and_falls_back_without_a_compiler(tmp_path):
    """A fresh cache builds one library (no temporary file left; a killed build's old leftover
    removed) that a second process loads without building; with a compiler that fails, one line says
    so and products keep to torch's kernel."""
    if cbuild.library() is None:
        pytest.skip("the C kernels do not build here")
    layout = int4_pack_layout()
    readable = "c" if layout.block_rows in cpu_int4_gemv.BLOCK_ROWS and not layout.paired else "torch"
    kernels = tmp_path / "cache" / "offload" / "kernels"
    kernels.mkdir(parents=True)
    stale = kernels / ".build-killed.so"
    stale.write_bytes(b"half a library")
    old = time.time() - 2 * cbuild.STALE_TEMP_S
    os.utime(stale, (old, old))
    code = ("from offload.kernels import cpu_int4_gemv as g; lib = g.library(); "
            "print(lib is not None, g.decode_kernel().name)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), cpu_int4_gemv.KERNEL_ENV: "c"}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and first.stdout.split() == ["True", readable], first.stderr[-2000:]
    built = sorted(p.name for p in kernels.iterdir())
    assert len(built) == 1 and built[0].startswith("cpu_kernels-") and built[0].endswith(".so"), built
    mtime = (kernels / built[0]).stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert again.stdout.split() == ["True", readable] and (kernels / built[0]).stat().st_mtime_ns == mtime
    failing = {**env, "XDG_CACHE_HOME": str(tmp_path / "other"), "CC": "false"}
    code = code + "; import torch; from offload.kernels import int4_group_linear; print(g.decode_kernel().reason)"
    run = subprocess.run([sys.executable, "-c", code], env=failing, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split()[:2] == ["False", "torch"], run.stderr[-2000:]
    said = [line for line in run.stderr.splitlines() if "int4 decode products use torch's kernel" in line]
    assert len(said) == 1 and "did not build" in said[0] and "attention numba's" in said[0], run.stderr[-2000:]
    assert not list((tmp_path / "other" / "offload" / "kernels").glob(".build-*"))


def test_the_benchmark_writes_its_table_json_and_plot(tmp_path):
    """`python -m offload.profiles.bench_int4_gemv`: both kernels on the default model's shapes, JSON
    and PNG written (speeds are recorded in BENCHMARKS.md, not asserted)."""
    import json

    from offload.profiles.bench_int4_gemv import main

    out = tmp_path / "gemv.json"
    assert main(["--models", "135M", "--rounds", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["shape"] for r in result["results"]] == ["135M qkv", "135M o", "135M gate_up", "135M down"]
    assert all(r["torch_ms"] > 0 for r in result["results"])
    if cpu_int4_gemv.takes(torch.empty(64, 16, dtype=torch.uint8), int4_pack_layout(), 32):
        assert all(r["c_ms"] > 0 and r["speedup"] > 0 for r in result["results"])
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
