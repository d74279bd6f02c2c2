"""Bandwidth profile of this machine: what the placement planner reads (``offload profile``).

Measures, each figure the median (with p10/p90 and every run) of repeated timings:

- host memory: copy (``torch`` copy of a large buffer; bytes copied per second) and read (a
  matrix-vector product over a weight matrix, which is what a decode step on the CPU is bound by);
- disk, in ``--disk-dir``: writes (with fsync) and cold reads by block size, sequential and random,
  with ``O_DIRECT`` (never the page cache) and, for comparison, buffered reads of pages dropped with
  ``posix_fadvise(DONTNEED)`` and warm buffered reads (page-cache speed, what a cold figure must not
  look like); kvikio reads when CUDA and kvikio are present;
- GPU, when one is usable: host-to-device and device-to-host for pinned and pageable memory from 4 KiB
  to 1 GiB, and device-to-device;
- index search: keys scored per second by the retrieval graph search at a few context sizes;
- the runtime's fixed cost per decoder layer in a decode step (a narrow model, bytes negligible).

Machine facts (CPU, cores, memory, disk device and filesystem; GPU name, driver, memory and PCIe link
through nvidia-ml-py where a driver exists) go with the figures. The ``planner`` section holds the
numbers :class:`offload.tiers.planner.BandwidthProfile` reads. Writes JSON and PNG plots.

    offload profile --quick --out profile.json      # under a minute
    python -m offload.profiles.bandwidth --out profile.json --disk-dir /mnt/nvme
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from offload.errors import OffloadError
from offload.fileio import write_json_atomic
from offload.tiers.budget import ensure_writable_dir

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def summarize(runs_gbs: list[float]) -> dict:
    s = sorted(runs_gbs)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"median_gbs": statistics.median(s), "p10_gbs": pick(0.1), "p90_gbs": pick(0.9), "runs_gbs": runs_gbs}


def timed(fn, nbytes: int, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return summarize(runs)


# ---------------------------------------------------------------------------------------- host
def host_copy(nbytes: int, repeats: int) -> dict:
    """torch copy of a large buffer, all intra-op threads: bytes copied per second."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)  # [n]
    dst = torch.empty_like(src)
    return timed(lambda: dst.copy_(src), nbytes, repeats)


def checksum(nbytes: int, repeats: int) -> dict:
    """CRC-32 of a host buffer, bytes per second: every weight read from a store is verified
    extent by extent on the reader thread, after its read, so a streamed layer costs read + this."""
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    return timed(lambda: zlib.crc32(data), nbytes, repeats)


def paired_copy(nbytes: int, repeats: int) -> tuple[dict, dict]:
    """torch on one thread and an independent numpy copy (one thread), runs interleaved so that
    drift on a shared machine affects both alike: the cross-check of the host copy figure."""
    a = torch.ones(nbytes // 4, dtype=torch.float32)  # [n]
    b = torch.empty_like(a)
    src, dst = np.ones(nbytes // 4, np.float32), np.empty(nbytes // 4, np.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b.copy_(a)
        np.copyto(dst, src)
        ours, theirs = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            b.copy_(a)
            t1 = time.perf_counter()
            np.copyto(dst, src)
            t2 = time.perf_counter()
            ours.append(nbytes / (t1 - t0) / 1e9)
            theirs.append(nbytes / (t2 - t1) / 1e9)
    finally:
        torch.set_num_threads(before)
    return summarize(ours), summarize(theirs)


def host_gemv(matrix_bytes: int, repeats: int, dtype: torch.dtype = torch.float32,
              total_bytes: int = 96 * MIB) -> dict:
    """Weight bytes read per second by decode-shaped matrix-vector products over matrices of
    ``matrix_bytes`` each, cycling through enough of them (``total_bytes``) that caches do not
    serve them: what a decode step over a layer's weight matrices of that size achieves."""
    elem = torch.finfo(dtype).bits // 8
    cols = 512 if matrix_bytes <= 4 * MIB else 2048
    rows = max(1, matrix_bytes // (cols * elem))
    count = max(2, total_bytes // (rows * cols * elem))
    mats = [torch.randn(rows, cols).to(dtype) for _ in range(count)]  # count x [rows, cols]
    x = torch.randn(1, cols).to(dtype)  # [1, cols]

    def run():
        for w in mats:
            torch.nn.functional.linear(x, w)
    return timed(run, count * rows * cols * elem, repeats)


def host_gemv_quantized(matrix_bytes: int, repeats: int, scheme: str = "int4", total_bytes: int = 96 * MIB) -> dict:
    """As :func:`host_gemv` for quantized weights (``scheme`` "int4": group 32, bf16 scale + zero;
    "int8": groups of 32 with an fp32 scale; the kernels the quantized path computes with),
    ``matrix_bytes`` counted as the bytes the weight holds."""
    from offload.quant import N_MULTIPLE, projection_nbytes, quantize_supported, quantize_weight

    cols = 512 if matrix_bytes <= 4 * MIB else 2048
    per_row = projection_nbytes(1, cols, scheme)
    rows = max(N_MULTIPLE, matrix_bytes // per_row // N_MULTIPLE * N_MULTIPLE)  # the int4 packer takes sixteens
    if not quantize_supported(scheme, rows, cols):
        raise ValueError(f"{scheme} gemv shape {rows} x {cols} is not supported")
    count = max(2, total_bytes // (rows * per_row))
    mats = [quantize_weight(torch.randn(rows, cols), scheme, torch.bfloat16) for _ in range(count)]
    x = torch.randn(1, cols).to(torch.bfloat16)  # [1, cols]

    def run():
        for w in mats:
            w(x)
    return timed(run, count * rows * per_row, repeats)


# The narrow model the per-layer fixed costs are timed on: weights and KV negligible, so what is
# left of a step is op dispatch. Its prompt is long enough that a sparse policy selects a subset.
NARROW_LAYERS, NARROW_PROMPT = 8, 256


def _narrow_model(dtype: torch.dtype = torch.float32):
    """The narrow model in ``dtype``; a bf16 one with the CPU decode step bound, as the runtime binds it
    for a resident bf16 model (:meth:`Transformer.bind_decode_step`)."""
    from offload.config import ModelArgs
    from offload.model import Transformer

    args = ModelArgs(architecture="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                     num_layers=NARROW_LAYERS, num_heads=4, num_kv_heads=2, head_dim=16,
                     max_position_embeddings=2 * NARROW_PROMPT, rms_norm_eps=1e-5, rope_theta=10000.0)
    model = Transformer(args, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    model.bind_decode_step()
    return model


class _NarrowRun:
    """One backend on the narrow model: a NARROW_PROMPT-token prompt prefilled, then timed decode
    steps (ms per layer), one at a time, so that several backends' steps can be interleaved."""

    @torch.inference_mode()
    def __init__(self, model, backend, steps: int):
        from offload.attention import ForwardBatch

        self.model, self.backend, self.n = model, backend, NARROW_PROMPT
        ids = torch.arange(NARROW_PROMPT)[None] % model.args.vocab_size  # [1, T]
        backend.allocate(1, NARROW_PROMPT + steps + 4)
        model(ids, ForwardBatch.prefill(0, 0, NARROW_PROMPT, model.device, ids[0].tolist()), backend)
        for _ in range(2):  # index builds and first touches, not timed
            self.step()

    @torch.inference_mode()
    def step(self) -> float:
        from offload.attention import ForwardBatch

        t0 = time.perf_counter()
        self.model(torch.zeros(1, 1, dtype=torch.long), ForwardBatch.decode([self.n], self.model.device, [0]),
                   self.backend)
        self.n += 1
        return 1e3 * (time.perf_counter() - t0) / NARROW_LAYERS


def layer_overhead(repeats: int, dtype: torch.dtype = torch.float32) -> dict:
    """Fixed cost of one decoder layer in a decode step, apart from the bytes it reads: a narrow
    model (hidden 64) whose weights and KV are negligible, timed per layer. This is the runtime's
    per-operation dispatch cost, which a bytes-over-bandwidth model alone would miss. fp32: the
    generic forward (module calls, torch's row ops); bf16: the bound CPU decode step, which a
    resident bf16 model runs (measured on the 2-core AVX2 EPYC: 0.58 against 0.19 ms a layer)."""
    from offload.indexes.dense import DenseAttention

    model = _narrow_model(dtype)
    run = _NarrowRun(model, DenseAttention(model.args, model.device, model.dtype), repeats)
    runs = [run.step() for _ in range(repeats)]
    return {"median_ms": statistics.median(runs), "runs_ms": runs}


def sparse_layer_overhead(repeats: int) -> dict[str, dict]:
    """Per KV policy: the fixed cost a sparse layer adds to a dense one per decode step (its search's
    and the gather path's dispatch), on the narrow model: policy -> {median_ms, runs_ms}. Each
    policy's step is timed right after a dense step and the difference kept, so that drift on a
    shared machine cancels."""
    from offload.indexes import SelectionConfig, policy_names
    from offload.indexes.backend import SparseAttention
    from offload.indexes.dense import DenseAttention

    model = _narrow_model()
    config = SelectionConfig(budget=16, sink=4, window=16, dense_layers=0)
    out = {}
    for policy in policy_names():
        dense = _NarrowRun(model, DenseAttention(model.args, model.device, model.dtype), repeats)
        sparse = _NarrowRun(model, SparseAttention(model.args, model.device, model.dtype, policy, config), repeats)
        runs = [sparse.step() - dense.step() for _ in range(repeats)]
        out[policy] = {"median_ms": max(0.0, statistics.median(runs)), "runs_ms": runs}
    return out


# ---------------------------------------------------------------------------------------- disk
def _aligned(nbytes: int) -> tuple[mmap.mmap, memoryview]:
    m = mmap.mmap(-1, nbytes)  # page-aligned, as O_DIRECT needs
    return m, memoryview(m)


def write_file(path: Path, nbytes: int) -> dict:
    """Sequential write with fsync (the store's own pattern); one run."""
    chunk = np.random.default_rng(0).integers(0, 255, 8 * MIB, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return summarize([nbytes / (time.perf_counter() - t0) / 1e9])


def _read_pattern(fd: int, offsets: list[int], block: int, view: memoryview) -> None:
    for off in offsets:
        got = os.preadv(fd, [view[:block]], off)
        if got != block:
            raise OSError(f"short read at {off}")


def disk_read(path: Path, size: int, block: int, mode: str, random_order: bool, repeats: int,
              max_bytes: int) -> dict:
    """Reads of ``block`` bytes. mode: direct (O_DIRECT), dropped (buffered after DONTNEED) or warm."""
    count = max(1, min(size, max_bytes) // block)
    rng = np.random.default_rng(1)
    flags = os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0)
    fd = os.open(path, flags)
    buf, view = _aligned(block)
    try:
        runs = []
        if mode == "warm":
            _read_pattern(fd, [i * block for i in range(size // block)], block, view)  # load the page cache
        for _ in range(repeats):
            if random_order:
                offsets = (rng.integers(0, size // block, count) * block).tolist()
            else:
                start = int(rng.integers(0, max(1, size // block - count + 1))) * block
                offsets = [start + i * block for i in range(count)]
            if mode == "dropped":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            _read_pattern(fd, offsets, block, view)
            runs.append(count * block / (time.perf_counter() - t0) / 1e9)
        return {**summarize(runs), "block": block, "bytes_per_run": count * block}
    finally:
        view.release()
        buf.close()
        os.close(fd)


def disk_facts(directory: Path) -> dict:
    import psutil

    directory = directory.resolve()
    best = None
    for part in psutil.disk_partitions(all=True):
        if str(directory).startswith(part.mountpoint) and (best is None or len(part.mountpoint) > len(best.mountpoint)):
            best = part
    return {"dir": str(directory), "device": best.device if best else None,
            "filesystem": best.fstype if best else None, "mountpoint": best.mountpoint if best else None}


# ---------------------------------------------------------------------------------------- GPU
def gpu_transfers(sizes: list[int], repeats: int) -> dict:
    """H2D/D2H pinned and pageable, D2D, by size (only with a usable CUDA device)."""
    dev = torch.device("cuda")
    out: dict[str, list[dict]] = {k: [] for k in ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable", "d2d")}
    for size in sizes:
        n = size // 4
        pinned = torch.empty(n, dtype=torch.float32).pin_memory()
        pageable = torch.empty(n, dtype=torch.float32)
        d_a = torch.empty(n, dtype=torch.float32, device=dev)
        d_b = torch.empty(n, dtype=torch.float32, device=dev)

        def run(fn):
            def go():
                fn()
                torch.cuda.synchronize()
            return go

        for name, fn in (("h2d_pinned", lambda: d_a.copy_(pinned, non_blocking=True)),
                         ("h2d_pageable", lambda: d_a.copy_(pageable)),
                         ("d2h_pinned", lambda: pinned.copy_(d_a, non_blocking=True)),
                         ("d2h_pageable", lambda: pageable.copy_(d_a)),
                         ("d2d", lambda: d_b.copy_(d_a))):
            out[name].append({"size": size, **timed(run(fn), size, repeats)})
        pinned = pageable = d_a = d_b = None  # free before the next size is allocated
    return out


def gpu_facts() -> dict:
    facts = {"name": torch.cuda.get_device_name(0), "memory_bytes": torch.cuda.get_device_properties(0).total_memory}
    try:
        import pynvml  # provided by nvidia-ml-py

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        facts.update(driver=pynvml.nvmlSystemGetDriverVersion(),
                     pcie_gen=pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h),
                     pcie_width=pynvml.nvmlDeviceGetCurrPcieLinkWidth(h))
    except Exception as e:  # no nvidia-ml-py, or no driver: say so
        facts["nvml"] = f"unavailable ({type(e).__name__})"
    return facts


# ---------------------------------------------------------------------------------------- index
def index_search(sizes: list[int], repeats: int) -> list[dict]:
    """Keys scored per second by the retrieval graph search (3 KV heads, group 3, head_dim 64)."""
    from offload.indexes import SelectionConfig
    from offload.indexes.base import IndexContext
    from offload.indexes.retrieval import RetrievalIndex

    out = []
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        Hkv, G, D = 3, 3, 64
        keys = torch.randn(Hkv, n, D, generator=g)  # [Hkv, n, D]
        queries = torch.randn(Hkv * G, n // 8, D, generator=g)  # [H, Nq, D]
        ctx = IndexContext(Hkv * G, Hkv, D, D ** -0.5, (torch.ones(D // 2), 1.0), torch.device("cpu"))
        idx = RetrievalIndex(ctx, SelectionConfig())
        idx.build(keys, n, queries)
        budget = max(1, int(0.02 * n))
        idx.search(queries[:, -1], budget)  # compile / warm
        rates = []
        for r in range(repeats):
            t0 = time.perf_counter()
            idx.search(queries[:, -1 - r], budget)
            rates.append(idx.last_scored * Hkv / (time.perf_counter() - t0))
        out.append({"context": n, "keys_per_s": statistics.median(rates), "runs": rates})
    return out


# ---------------------------------------------------------------------------------------- driver
def machine_facts(disk_dir: Path) -> dict:
    import psutil

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cores_logical": psutil.cpu_count(), "cores_physical": psutil.cpu_count(logical=False),
            "memory_bytes": psutil.virtual_memory().total, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "disk": disk_facts(disk_dir),
            "cuda": torch.cuda.is_available()}


def run_profile(quick: bool, disk_dir: Path, progress: bool = True) -> dict:
    from tqdm import tqdm

    repeats = 5 if quick else 11
    host_size = 64 * MIB if quick else 512 * MIB
    file_size = 256 * MIB if quick else 2 * GIB
    read_cap = 64 * MIB if quick else 512 * MIB  # bytes per timed run
    blocks = [4 * KIB, 64 * KIB, 1 * MIB, 4 * MIB] if quick else [4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB,
                                                                   4 * MIB, 16 * MIB]
    steps = ["host", "disk", "index"] + (["gpu"] if torch.cuda.is_available() else [])
    bar = tqdm(total=len(steps), desc="profiling", disable=not progress or None)
    result: dict = {"quick": quick, "machine": machine_facts(disk_dir), "measurements": {}}
    m = result["measurements"]

    m["host_copy"] = [{"size": host_size, **host_copy(host_size, repeats)}]  # all torch threads
    one_thread, numpy_fig = paired_copy(host_size, 2 * repeats + 1)
    m["host_copy_1thread"] = [{"size": host_size, **one_thread}]
    m["host_copy_numpy"] = [{"size": host_size, **numpy_fig}]
    gemv_sizes = [1 * MIB, 4 * MIB, 16 * MIB] + ([] if quick else [64 * MIB])
    m["host_gemv_fp32"] = [{"size": b, **host_gemv(b, repeats)} for b in gemv_sizes]
    m["host_gemv_bf16"] = [{"size": b, **host_gemv(b, repeats, torch.bfloat16)} for b in gemv_sizes]
    for scheme in ("int4", "int8"):
        m[f"host_gemv_{scheme}"] = [{"size": b, **host_gemv_quantized(b, repeats, scheme)} for b in gemv_sizes]
    m["layer_overhead"] = layer_overhead(3 * repeats)
    m["bound_layer_overhead"] = layer_overhead(3 * repeats, torch.bfloat16)
    m["sparse_layer_overhead"] = sparse_layer_overhead(3 * repeats)
    m["checksum"] = [{"size": host_size, **checksum(host_size, repeats)}]
    bar.update(1)

    disk_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=disk_dir, prefix=".offload-profile-", suffix=".bin")
    os.close(fd)
    path = Path(name)
    try:
        m["disk_write_fsync"] = [{"size": file_size, **write_file(path, file_size)}]
        for label, mode, rnd in (("disk_seq_direct", "direct", False), ("disk_rand_direct", "direct", True),
                                 ("disk_seq_dropped", "dropped", False)):
            m[label] = [{"size": b, **disk_read(path, file_size, b, mode, rnd, repeats if b >= MIB else 3,
                                                 read_cap if b >= 64 * KIB else read_cap // 16)} for b in blocks]
        m["disk_seq_warm"] = [{"size": b, **disk_read(path, file_size, b, "warm", False, 3, read_cap)}
                              for b in blocks[-2:]]
        if torch.cuda.is_available():
            from offload.tiers.io import kvikio_available

            if kvikio_available():
                m["disk_kvikio"] = kvikio_reads(path, file_size, blocks[-2:], repeats)
    finally:
        path.unlink(missing_ok=True)
    bar.update(1)

    m["index_search"] = index_search([8192] if quick else [8192, 32768, 131072], repeats)
    bar.update(1)
    if torch.cuda.is_available():
        sizes = [4 * KIB << (2 * i) for i in range(10) if 4 * KIB << (2 * i) <= GIB]
        result["machine"]["gpu"] = gpu_facts()
        m.update(gpu_transfers(sizes[:6] if quick else sizes, repeats))
        bar.update(1)
    bar.close()

    best_direct = max(r["median_gbs"] for r in m["disk_seq_direct"])
    result["planner"] = {
        "host_read_gbs": max(r["median_gbs"] for r in m["host_gemv_fp32"]),
        "gemv_curve_fp32": [[r["size"], r["median_gbs"]] for r in m["host_gemv_fp32"]],
        "gemv_curve_bf16": [[r["size"], r["median_gbs"]] for r in m["host_gemv_bf16"]],
        "gemv_curve_int4": [[r["size"], r["median_gbs"]] for r in m["host_gemv_int4"]],
        "gemv_curve_int8": [[r["size"], r["median_gbs"]] for r in m["host_gemv_int8"]],
        "disk_read_gbs": best_direct,
        "verify_gbs": m["checksum"][0]["median_gbs"],
        "index_keys_per_s": m["index_search"][-1]["keys_per_s"],
        "layer_overhead_ms": m["layer_overhead"]["median_ms"],
        "bound_layer_overhead_ms": m["bound_layer_overhead"]["median_ms"],
        "sparse_layer_overhead_ms": [[policy, r["median_ms"]] for policy, r in m["sparse_layer_overhead"].items()],
        "disk_block_bytes": max(m["disk_seq_direct"], key=lambda r: r["median_gbs"])["block"],
    }
    if "h2d_pinned" in m:
        result["planner"]["h2d_pinned_gbs"] = max(r["median_gbs"] for r in m["h2d_pinned"])
        result["planner"]["h2d_pageable_gbs"] = max(r["median_gbs"] for r in m["h2d_pageable"])
        result["planner"]["gpu_read_gbs"] = max(r["median_gbs"] for r in m["d2d"]) * 2  # d2d reads and writes
    result["notes"] = ("disk reads are cold: O_DIRECT bypasses the page cache ('direct'); 'dropped' reads are "
                       "buffered after posix_fadvise(DONTNEED) of the file; 'warm' is page-cache speed, for contrast")
    return result


def kvikio_reads(path: Path, size: int, blocks: list[int], repeats: int) -> list[dict]:
    import kvikio

    out = []
    dev = torch.device("cuda")
    with kvikio.CuFile(str(path), "r") as f:
        for b in blocks:
            buf = torch.empty(b, dtype=torch.uint8, device=dev)

            def go():
                for off in range(0, min(size, 64 * b), b):
                    f.pread(buf, b, off).get()
            out.append({"size": b, "block": b, **timed(go, min(size, 64 * b), repeats)})
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result["measurements"]
    series = [k for k, v in m.items() if isinstance(v, list) and len(v) > 1 and "size" in v[0]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k in series:
        pts = sorted((r["size"], r["median_gbs"]) for r in m[k])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
    for k in ("host_copy",):
        ax.axhline(m[k][0]["median_gbs"], linestyle="--", linewidth=1, label=f"{k} ({m[k][0]['size'] >> 20} MiB)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("transfer / block size (bytes)")
    ax.set_ylabel("GB/s (median)")
    ax.set_title("Bandwidth by path and size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


OUT_HELP = ("where to write the profile JSON (default: profile.json); an existing directory, or a path ending "
            "in /, means DIR/profile.json; missing parent directories are created; the PNG plot goes beside it")


def resolve_out(out: str | Path) -> Path:
    """The JSON file ``--out`` names: DIR/profile.json for a directory (existing, or new if it ends in a
    separator), else the path itself. Only resolves; :func:`offload.tiers.budget.ensure_writable_dir` creates and checks."""
    text = str(out)
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)):
        return path / "profile.json"
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: under a minute")
    p.add_argument("--out", default="profile.json", help=OUT_HELP)
    p.add_argument("--disk-dir", default=None, help="directory on the disk to measure (default: next to --out)")
    args = p.parse_args(argv)
    out = resolve_out(args.out)
    ensure_writable_dir(out.parent, "the folder of the profile (--out)")
    disk_dir = ensure_writable_dir(Path(args.disk_dir), "--disk-dir") if args.disk_dir else out.parent
    t0 = time.perf_counter()
    result = run_profile(args.quick, disk_dir)
    result["seconds"] = time.perf_counter() - t0
    png = out.with_suffix(".png")
    try:
        write_json_atomic(out, result)
        plot(result, png)
    except OSError as e:  # e.g. --out names a folder that appeared, or the disk filled, while measuring
        raise OffloadError(f"cannot write {e.filename or out}: {e.strerror or e}: choose a writable --out") from None
    pl = result["planner"]
    print(f"host read {pl['host_read_gbs']:.1f} GB/s, disk cold read {pl['disk_read_gbs']:.2f} GB/s "
          f"(O_DIRECT, best block {pl['disk_block_bytes'] >> 10} KiB), index search {pl['index_keys_per_s']:.3g} keys/s; "
          f"wrote {out} and {png} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
