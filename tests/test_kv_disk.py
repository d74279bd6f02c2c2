"""The KV's disk tier: rows back bit for bit in every layout, reads of just the selection, the
cache, checksums, failures, and a model's tokens unchanged with its KV on disk."""

import errno
import os

import numpy as np
import pytest
import torch

from offload import LLM, SamplingParams
from offload.config import DENSE_LAYERS, preset
from offload.errors import InvalidRequestError, OffloadError
from offload.prompt_cache import PromptKV
from offload.tiers import kv_disk
from offload.tiers.budget import BudgetError
from offload.tiers.kv_disk import EXTENT_BYTES, CorruptKVError, DiskKV, RowFormat
from offload.tiers.planner import LAYER_MAJOR_TOKENS, plan

H, D = 3, 64
BF16 = RowFormat(D, torch.bfloat16, None)  # 256-byte rows: 16 per extent
INT8 = RowFormat(D, torch.int8, torch.float32)  # codes + two fp32 scales: 136 bytes, 30 per extent
INT4 = RowFormat.for_kv(D, torch.float32, "int4")  # int8 keys + 4-bit values, fp32 scales: 116 bytes, 35 per extent


def kv_of(fmt: RowFormat, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if fmt.scale is None:
        return [torch.randn(H, n, D, generator=g).to(fmt.held) for _ in range(2)]
    if fmt.value_bits is not None:
        return fmt.quantize(*(torch.randn(H, n, D, generator=g) for _ in range(2)))
    codes = [torch.randint(-127, 128, (H, n, D), generator=g, dtype=torch.int8) for _ in range(2)]
    return codes + [torch.rand(H, n, 1, generator=g) for _ in range(2)]


def fill(disk: DiskKV, layer: int, parts: list[torch.Tensor], chunk: int, start: int = 0) -> None:
    n = parts[0].shape[1]
    for s in range(start, n, chunk):
        disk.write(layer, s, [p[:, s:min(n, s + chunk)] for p in parts])


def rows_of(parts: list[torch.Tensor], ids: np.ndarray) -> list[torch.Tensor]:
    index = torch.from_numpy(np.ascontiguousarray(ids)).long()[..., None]
    return [torch.gather(p, 1, index.expand(-1, -1, p.shape[-1])) for p in parts]


def cluster_order(n: int, run: int, seed: int) -> np.ndarray:
    """Each head's tokens 0..n-1 in runs of ``run`` shuffled tokens (what a cluster index lays out)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n) for _ in range(H)]).astype(np.int32)


@pytest.mark.parametrize("fmt", [BF16, INT8, INT4], ids=["bf16", "int8", "int4"])
def test_rows_come_back_bit_for_bit_in_token_order_and_an_index_order(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(kv_disk, "FLUSH_EXTENTS", 5)  # a relayout writes a few extents per request
    n = 2000
    parts = kv_of(fmt, n + 300)
    disk = DiskKV(tmp_path, [1, 4], H, 4096, fmt, cache_bytes=4 << 20, keep_tokens=64)
    fill(disk, 1, [p[:, :n] for p in parts], chunk=256)
    f = disk.files[1]
    assert f.written > 0 and f.written % fmt.rows_per_extent == 0  # whole extents went to disk as they aged
    assert f.mem_start == f.written and f.n == n  # the rest, the window included, is in memory
    assert os.path.getsize(f.path) >= (2 * f.extents_per_head + f.written // fmt.rows_per_extent) * fmt.extent_bytes
    assert all(torch.equal(a, b) for a, b in zip(fmt.decode(disk.read_range(1, 0, n)), [p[:, :n] for p in parts]))
    assert all(torch.equal(a, b) for a, b in zip(fmt.decode(disk.read_range(1, 37, 1500)),
                                                 [p[:, 37:1500] for p in parts]))
    ids = np.random.default_rng(1).integers(0, n, size=(H, 150))
    assert all(torch.equal(a, b) for a, b in zip(disk.gather(1, ids), rows_of(parts, ids)))
    # an index's order: tokens rewritten once, then appended as the index lays out more
    order = cluster_order(n, 16, 2)
    disk.lay_out(1, order)
    assert f.ordered and f.laid == n and np.array_equal(f.token_of[:, :n], order)
    fill(disk, 1, parts, chunk=1, start=n)  # decode steps
    more = np.concatenate([order, n + np.stack([np.random.default_rng(h).permutation(300) for h in range(H)])], 1)
    disk.lay_out(1, more.astype(np.int32))
    assert f.laid == n + 300 and f.written == (n + 300) // fmt.rows_per_extent * fmt.rows_per_extent
    assert all(torch.equal(a, b) for a, b in zip(fmt.decode(disk.read_range(1, 0, n + 300)), parts))
    ids = np.random.default_rng(3).integers(0, n + 300, size=(H, 200))
    assert all(torch.equal(a, b) for a, b in zip(disk.gather(1, ids), rows_of(parts, ids)))
    assert disk.files[4].written == 0  # the other layer untouched
    folder = disk.folder
    disk.close()
    assert not folder.exists()  # the KV on disk belongs to this store alone


def test_a_sequence_continued_from_an_earlier_point_drops_what_came_after(tmp_path):
    parts, other = kv_of(BF16, 1500), kv_of(BF16, 1500, seed=9)
    disk = DiskKV(tmp_path, [0], H, 2048, BF16, cache_bytes=1 << 20, keep_tokens=16)
    fill(disk, 0, parts, chunk=500)
    disk.lay_out(0, cluster_order(1500, 16, 0))
    disk.write(0, 700, [p[:, 700:1500] for p in other])  # a new continuation from token 700
    want = [torch.cat([a[:, :700], b[:, 700:]], 1) for a, b in zip(parts, other)]
    assert all(torch.equal(a, b) for a, b in zip(BF16.decode(disk.read_range(0, 0, 1500)), want))
    disk.close()


def test_a_held_layer_keeps_its_rows_in_memory_and_writes_them_once(tmp_path):
    """A layer-major prefill's pass: every chunk reads its prefix from memory (no disk read), the
    rows are written once when the pass ends, then only the window stays in memory."""
    n, window = 1500, 16
    parts = kv_of(BF16, n)
    disk = DiskKV(tmp_path, [0], H, 2048, BF16, cache_bytes=1 << 20, keep_tokens=window)
    disk.hold(0, 0, n)
    for s in range(0, n, 250):
        disk.write(0, s, [p[:, s:s + 250] for p in parts])
        prefix = BF16.decode(disk.read_range(0, 0, s + 250))
        assert all(torch.equal(a, b[:, :s + 250]) for a, b in zip(prefix, parts))
    assert disk.stats.bytes_read == disk.stats.bytes_written == 0 and disk.nbytes_on_disk() == 0
    disk.release(0)
    laid = (n - window) // 16 * 16  # whole extents past the window
    assert disk.nbytes_on_disk() == disk.stats.bytes_written == laid * BF16.row_bytes * H
    f = disk.files[0]
    assert f.mem_start == laid and f.memory_nbytes() == (n - laid) * BF16.row_bytes * H  # the big buffer is gone
    assert all(torch.equal(a, b) for a, b in zip(BF16.decode(disk.read_range(0, 0, n)), parts))
    # the next pass (the prompt's next group of chunks, or a continuation) reads the layer back
    # once, drops what came after its start, and attends to it in memory
    more = kv_of(BF16, 600, seed=3)
    read = disk.stats.bytes_read
    disk.hold(0, 1200, 1800)
    assert disk.stats.bytes_read - read == -(-1200 // 16) * 16 * BF16.row_bytes * H  # the extents of 0..1199, once
    for s in range(1200, 1800, 200):
        disk.write(0, s, [p[:, s - 1200:s - 1000] for p in more])
        disk.read_range(0, 0, s + 200)
    assert disk.stats.bytes_read - read == -(-1200 // 16) * 16 * BF16.row_bytes * H
    disk.release(0)
    want = [torch.cat([a[:, :1200], b], 1) for a, b in zip(parts, more)]
    assert all(torch.equal(a, b) for a, b in zip(BF16.decode(disk.read_range(0, 0, 1800)), want))
    assert disk.files[0].mem_start == (1800 - window) // 16 * 16
    disk.close()


def _memory_and_disk(folder, disk_dir) -> tuple[LLM, LLM]:
    """The same small cluster setup (8 prefill chunks of a 2,000-token prompt) in memory and on disk."""
    kw = dict(kv_policy="cluster", kv_budget=48, sink=4, window=16, dense_layers=1, max_context=2048,
              prefill_chunk_size=256, verbose=False)
    return LLM(folder, **kw), LLM(folder, kv_offload="disk", disk_dir=disk_dir, **kw)


def test_a_prompt_prefilled_into_the_kv_on_disk_reads_nothing_back(tiny_models, tmp_path):
    """Layer-major prefill: each disk layer's KV is written once, in its cluster index's order (built
    at the end of the layer's pass), and never read back during the prompt (chunk by chunk, each of
    8 chunks would read its layer's prefix back, and the index build the whole layer); logits equal
    the KV in memory, and so do the greedy tokens after it."""
    folder, _ = tiny_models["llama"]
    prompt = [int(t) for t in np.random.default_rng(2).integers(3, 290, size=2000)]
    base, disk = _memory_and_disk(folder, tmp_path)
    assert disk.engine.layer_major_tokens
    torch.testing.assert_close(disk.logits(prompt), base.logits(prompt), rtol=0, atol=1e-5)
    report = disk.tier_report()["kv"]["disk"]
    assert report["bytes_read"] == 0
    a = disk.args
    sparse_kv = (a.num_layers - 1) * len(prompt) * a.num_kv_heads * 2 * a.head_dim * 4  # fp32 K and V
    assert report["bytes_written"] == report["bytes_on_disk"] and 0.95 * sparse_kv < report["bytes_on_disk"] < sparse_kv
    assert disk.backend.kv.disk.files[1].ordered and (0, 1) in disk.backend.indexes
    assert disk.generate([prompt], GREEDY)[0].token_ids == base.generate([prompt], GREEDY)[0].token_ids
    disk.close()


def test_a_long_prompt_goes_layer_by_layer_a_group_of_chunks_at_a_time(tiny_models, tmp_path, monkeypatch):
    """Groups of 2 chunks (the hidden states held stay bounded): each disk layer's rows before a
    group are read back once for it (not once per chunk); logits and greedy tokens equal the KV in
    memory."""
    from offload import build

    monkeypatch.setattr(build, "LAYER_MAJOR_TOKENS", 512)
    folder, _ = tiny_models["llama"]
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, 290, size=2000)]
    base, disk = _memory_and_disk(folder, tmp_path)
    assert disk.engine.layer_major_tokens == 512
    torch.testing.assert_close(disk.logits(prompt), base.logits(prompt), rtol=0, atol=1e-5)
    a = disk.args
    row = a.num_kv_heads * 2 * a.head_dim * 4  # fp32 K and V of one token, every KV head
    read = disk.tier_report()["kv"]["disk"]["bytes_read"]
    # groups start at 512, 1024, 1536: at most their prefixes, once each (per chunk: 256 + 512 + ... + 1792)
    assert 0.9 * (512 + 1024 + 1536 - 3 * 24) * row < read / (a.num_layers - 1) <= (512 + 1024 + 1536) * row
    assert disk.generate([prompt], GREEDY)[0].token_ids == base.generate([prompt], GREEDY)[0].token_ids
    disk.close()


@pytest.mark.parametrize("merge_gap", [0, 3])
def test_a_selection_in_runs_reads_whole_runs_and_the_cache_serves_the_next_step(tmp_path, monkeypatch, merge_gap):
    monkeypatch.setattr(kv_disk, "MERGE_GAP_EXTENTS", merge_gap)
    n, rpe = 4096, BF16.rows_per_extent
    parts = kv_of(BF16, n)
    disk = DiskKV(tmp_path, [0], H, n, BF16, cache_bytes=2 << 20, keep_tokens=64)
    fill(disk, 0, parts, chunk=512)
    order = cluster_order(n, 16, 5)
    disk.lay_out(0, order)
    f = disk.files[0]
    # a selection of 12 clusters per head (runs of 16 slots, the index's layout)
    slots = np.random.default_rng(0).choice(f.written // 16, size=(H, 12), replace=False) * 16
    ids = np.take_along_axis(order, (slots[..., None] + np.arange(16)).reshape(H, -1), 1)
    before, requests_before = disk.stats.bytes_read, disk.stats.read_requests
    got = disk.gather(0, ids)
    assert all(torch.equal(a, b) for a, b in zip(got, rows_of(parts, ids)))
    runs = ids.size // rpe  # every run one extent
    if merge_gap == 0:
        assert disk.stats.bytes_read - before == runs * EXTENT_BYTES  # nothing more
    else:  # runs a few extents apart share a request: fewer requests, the extents between read and dropped
        gaps = np.diff(np.sort(slots // rpe, axis=1), axis=1)  # [Hkv, 11] extents between runs
        assert disk.stats.read_requests - requests_before == H + int((gaps > merge_gap + 1).sum())
        assert runs * EXTENT_BYTES <= disk.stats.bytes_read - before <= (1 + merge_gap) * runs * EXTENT_BYTES
    before, requests = disk.stats.bytes_read, disk.stats.read_requests
    disk.gather(0, ids)  # the next step selects the same: all of it from the cache
    assert disk.stats.bytes_read == before and disk.stats.read_requests == requests
    assert disk.report()["hit_rate"] == 0.5
    # a cache smaller than one step's selection says so
    small = DiskKV(tmp_path, [0], H, n, BF16, cache_bytes=8 * EXTENT_BYTES, keep_tokens=64)
    fill(small, 0, parts, chunk=512)
    with pytest.raises(OffloadError, match="cache .* cannot hold one layer's selection.*cpu_memory"):
        small.gather(0, ids)
    small.close()
    disk.close()


def test_an_extent_changed_on_disk_is_caught(tmp_path):
    parts = kv_of(BF16, 1200)
    disk = DiskKV(tmp_path, [0], H, 2048, BF16, cache_bytes=1 << 20, keep_tokens=16)
    fill(disk, 0, parts, chunk=600)
    f = disk.files[0]
    with open(f.path, "r+b") as raw:  # one byte of head 1's third extent
        raw.seek((f.extents_per_head + 2) * EXTENT_BYTES + 100)
        byte = raw.read(1)
        raw.seek(-1, os.SEEK_CUR)
        raw.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CorruptKVError, match="extent 2 of KV head 1 does not match its checksum"):
        disk.read_range(0, 0, 1200)
    with pytest.raises(CorruptKVError, match="extent 2 of KV head 1"):
        disk.gather(0, np.full((H, 1), 40))  # slot 40: extent 2
    disk.close()


def test_a_read_ahead_fills_the_cache_in_the_background_for_the_next_gather(tmp_path):
    """prefetch() reads the extents the cache lacks (whole runs, pads and cached ones skipped),
    returns before they land, and the layer's next gather waits, checks and uses them: no read of
    its own, rows bit for bit, each extent counted as read once and as a read-ahead hit."""
    n, rpe = 4096, BF16.rows_per_extent
    parts = kv_of(BF16, n)
    disk = DiskKV(tmp_path, [0], H, n, BF16, cache_bytes=2 << 20, keep_tokens=64)
    fill(disk, 0, parts, chunk=512)
    step = np.broadcast_to(np.arange(0, 10 * rpe), (H, 10 * rpe))  # extents 0..9 of each head
    disk.gather(0, step)
    nxt = np.broadcast_to(np.arange(5 * rpe, 15 * rpe), (H, 10 * rpe))  # half of it cached, extents 10..14 new
    read, requests = disk.stats.bytes_read, disk.stats.read_requests
    disk.prefetch(0, np.concatenate([nxt, np.full((H, 7), -1)], axis=1))  # -1: no token
    assert disk.stats.ahead_extents == 5 * H and disk.stats.read_requests - requests == H  # one run per head
    assert disk.stats.bytes_read - read == 5 * H * EXTENT_BYTES
    read, requests, missed = disk.stats.bytes_read, disk.stats.read_requests, disk.stats.extents_missed
    got = disk.gather(0, nxt)
    assert all(torch.equal(a, b) for a, b in zip(got, rows_of(parts, nxt)))
    assert (disk.stats.bytes_read, disk.stats.read_requests, disk.stats.extents_missed) == (read, requests, missed)
    assert disk.stats.ahead_hits == 5 * H and disk.report()["ahead_hits"] == 5 * H
    disk.prefetch(0, nxt)  # all cached: nothing to read
    assert disk.stats.read_requests == requests
    disk.close()


def test_a_read_ahead_never_evicts_what_its_gather_used_and_bad_bytes_are_read_again(tmp_path):
    """A cache of 20 extents: a gather of 12, then a read-ahead of 12 more takes only the 8 rows
    the gather did not use. An extent changed on disk comes back from a read-ahead unused: the
    gather that needs it reads it again and reports it."""
    n, rpe = 4096, BF16.rows_per_extent
    parts = kv_of(BF16, n)
    disk = DiskKV(tmp_path, [0], H, n, BF16, cache_bytes=20 * EXTENT_BYTES, keep_tokens=64)
    fill(disk, 0, parts, chunk=512)
    step = np.broadcast_to(np.arange(0, 4 * rpe), (H, 4 * rpe))  # 4 extents x 3 heads
    disk.gather(0, step)
    disk.prefetch(0, np.broadcast_to(np.arange(4 * rpe, 8 * rpe), (H, 4 * rpe)))
    assert disk.stats.ahead_extents == 8
    got = disk.gather(0, step)  # every row it used is still cached: no read
    assert disk.stats.extents_missed == 12 and all(torch.equal(a, b) for a, b in zip(got, rows_of(parts, step)))
    # a gather of more extents than the cache has rows (24 in 20) says so: no row is taken twice
    with pytest.raises(OffloadError, match="cannot hold one layer's selection"):
        disk.gather(0, np.broadcast_to(np.arange(8 * rpe, 16 * rpe), (H, 8 * rpe)))
    f = disk.files[0]
    with open(f.path, "r+b") as raw:  # one byte of head 0's extent 20
        raw.seek(20 * EXTENT_BYTES + 7)
        byte = raw.read(1)
        raw.seek(-1, os.SEEK_CUR)
        raw.write(bytes([byte[0] ^ 0x01]))
    bad = np.full((H, 1), 20 * rpe + 3)
    disk.prefetch(0, bad)
    with pytest.raises(CorruptKVError, match="extent 20 of KV head 0"):
        disk.gather(0, bad)
    disk.close()


def test_a_gather_waits_for_reads_ahead_that_hold_the_rows_it_needs(tmp_path, monkeypatch):
    """Rows being filled by a read-ahead of another layer are not evictable; a gather that needs
    them waits for that read-ahead to land (checked, then evictable) instead of failing."""
    import threading

    n, rpe = 4096, BF16.rows_per_extent
    parts = kv_of(BF16, n)
    disk = DiskKV(tmp_path, [0, 1], H, n, BF16, cache_bytes=24 * EXTENT_BYTES, keep_tokens=64)
    fill(disk, 0, parts, chunk=512)
    fill(disk, 1, parts, chunk=512)
    landed = threading.Event()
    read_one = DiskKV._read_one

    def slow(f, bufs, offset):  # the read-ahead's requests land only when the timer fires
        if threading.current_thread().name.startswith("offload-kv-ahead"):
            landed.wait(10)
        return read_one(f, bufs, offset)

    monkeypatch.setattr(DiskKV, "_read_one", staticmethod(slow))
    disk.gather(1, np.broadcast_to(np.arange(0, rpe), (H, rpe)))  # 3 rows
    disk.prefetch(1, np.broadcast_to(np.arange(rpe, 6 * rpe), (H, 5 * rpe)))  # 15 rows, pending
    assert disk.stats.ahead_extents == 15
    timer = threading.Timer(0.3, landed.set)
    timer.start()
    step = np.broadcast_to(np.arange(0, 7 * rpe), (H, 7 * rpe))  # 21 rows: more than the 9 not pending
    got = disk.gather(0, step)
    assert landed.is_set() and all(torch.equal(a, b) for a, b in zip(got, rows_of(parts, step)))
    timer.join()
    disk.close()


def test_disk_failures_are_one_clear_line(tmp_path, monkeypatch):
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    with pytest.raises(OffloadError, match="is a file, not a directory"):
        DiskKV(a_file, [0], H, 1024, BF16, cache_bytes=1 << 20, keep_tokens=16)
    # a killed run's folder is removed; a live process's is left alone
    dead, live = tmp_path / "kv-999999999-deadbeef", tmp_path / f"kv-{os.getppid()}-cafecafe"
    dead.mkdir()
    live.mkdir()
    (dead / "layer001.kv").write_bytes(b"\0" * 4096)
    disk = DiskKV(tmp_path, [0], H, 1024, BF16, cache_bytes=1 << 20, keep_tokens=16)
    assert not dead.exists() and live.exists()
    parts = kv_of(BF16, 1000)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kv_disk.os, "pwrite", full)
    with pytest.raises(OffloadError, match=r"disk_dir .* is full while writing the KV \(layer000.kv\): free space there"):
        fill(disk, 0, parts, chunk=1000)
    disk.close()

    def read_only(*args, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(kv_disk.Path, "mkdir", read_only)
    with pytest.raises(OffloadError, match="is not writable .*choose a writable disk_dir"):
        DiskKV(tmp_path / "sub", [0], H, 1024, BF16, cache_bytes=1 << 20, keep_tokens=16)


GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


@pytest.mark.parametrize("policy,kv_dtype,dtype,read_ahead", [
    ("cluster", None, "float32", True), ("cluster", None, "float32", False), ("quest", None, "float32", True),
    ("streaming", None, "float32", None), ("cluster", "int8", "float32", None), ("cluster", None, "bfloat16", None)])
def test_a_model_with_its_kv_on_disk_gives_the_same_tokens(tiny_models, tmp_path, monkeypatch, policy, kv_dtype,
                                                           dtype, read_ahead):
    """Greedy tokens equal the KV in memory; with read-ahead on, some of it is read ahead and used.
    In bf16 the two paths attend the same rows in different kernels (the disk's fetched rows through
    torch), whose logits differ by a bf16 step: the tokens may part only where the in-memory run's
    top two logits are that close."""
    from offload.sampling import Sampler

    folder, _ = tiny_models["llama"]
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 290, size=2000)]
    kw = dict(kv_policy=policy, kv_budget=48, sink=4, window=16, dense_layers=1, max_context=2048,
              prefill_chunk_size=256, kv_dtype=kv_dtype, dtype=dtype, verbose=False)
    base = LLM(folder, **kw)
    disk = LLM(folder, kv_offload="disk", disk_dir=tmp_path, kv_read_ahead=read_ahead, **kw)
    assert "KV on disk in" in disk.describe()
    steps: list[torch.Tensor] = []  # each step's logits [V], as the sampler sees them
    pick = Sampler.pick
    monkeypatch.setattr(Sampler, "pick", lambda self, logits: (steps.append(logits[0].float()), pick(self, logits))[1])
    expected = base.generate([prompt], GREEDY)[0].token_ids
    got = disk.generate([prompt], GREEDY)[0].token_ids
    if got != expected:
        i = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        top = torch.topk(steps[i], 2).values  # the in-memory run's step i
        assert dtype == "bfloat16" and top[0] - top[1] <= 2 * 2.0 ** -7 * top[0].abs(), (i, top)
    report = disk.tier_report()["kv"]["disk"]
    assert report["bytes_on_disk"] > 0 and report["bytes_written"] >= report["bytes_on_disk"]
    assert report["bytes_read"] > 0 and report["hit_rate"] > 0.5  # consecutive steps share most extents
    if read_ahead is not None:
        assert report["read_ahead"] is read_ahead and f"read-ahead {'on' if read_ahead else 'off'}" in disk.describe()
        assert (report["ahead_hits"] > 0) is read_ahead and report["ahead_hits"] <= report["ahead_extents"]
    # the memory side holds the dense layer, the recent rows and the cache, not the sparse layer's KV
    assert disk.backend.kv_nbytes("disk") == report["bytes_on_disk"]
    folder_on_disk = report["folder"]
    disk.close()
    assert not os.path.exists(folder_on_disk)


def test_the_kv_on_disk_refuses_what_it_cannot_serve(tiny_models, tmp_path):
    folder, _ = tiny_models["llama"]
    with pytest.raises(OffloadError, match="kv_offload='disk' puts the sparse layers' KV in disk_dir: give disk_dir"):
        LLM(folder, kv_policy="cluster", kv_offload="disk", verbose=False)
    with pytest.raises(OffloadError, match="kv_policy 'retrieval' reads keys all over the KV.*cluster"):
        LLM(folder, kv_policy="retrieval", kv_offload="disk", disk_dir=tmp_path, verbose=False)
    with pytest.raises(OffloadError, match="kv_offload must be None"):
        LLM(folder, kv_policy="cluster", kv_offload="nvme", verbose=False)
    llm = LLM(folder, kv_policy="cluster", kv_offload="disk", disk_dir=tmp_path, dense_layers=1, max_context=256,
              verbose=False)
    with pytest.raises(OffloadError, match="disk tier holds one sequence at a time; got a batch of 2"):
        llm.generate([[5, 6, 7], [8, 9, 10]], GREEDY)
    llm.close()


def test_plan_puts_the_kv_on_disk_when_memory_cannot_hold_it():
    args = preset("llama-3.1-8b")
    kw = dict(model="llama-3.1-8b", context=131072, device="cuda", dtype="bfloat16", kv_policy="cluster",
              gpu_memory=24 * 2**30, disk_dir="/nvme")
    roomy = plan(args, cpu_memory=64 * 2**30, kv_disk=None, **kw)
    assert "disk" not in roomy.kv_tiers  # 15.5 GiB of KV fits in 64 GiB of host memory
    tight = plan(args, cpu_memory=8 * 2**30, kv_disk=None, **kw)
    per_layer = args.kv_bytes_per_token(2) * 131072 // 32  # 512 MiB
    assert tight.kv_tiers["disk"] == (32 - DENSE_LAYERS) * per_layer  # the sparse layers' KV
    assert tight.layer_tiers == ("device",) * 32
    # the prompt prefilled layer by layer holds its hidden states on the device
    assert tight.prompt_hidden_bytes == LAYER_MAJOR_TOKENS * args.hidden_size * 2 and roomy.prompt_hidden_bytes == 0
    assert 0 < tight.kv_disk_cache_bytes and tight.tier_bytes()["host"] <= 8 * 2**30  # the cache takes what is left
    assert tight.bytes_per_token["disk_kv"] > 0 and "disk_kv" in tight.table()
    with pytest.raises(BudgetError, match="cpu_memory 1.00 GiB cannot hold .* smallest budget that works is"):
        plan(args, cpu_memory=2**30, kv_disk=True, **kw)


def test_a_prompt_cache_saved_from_and_restored_into_the_kv_on_disk(tmp_path, monkeypatch):
    """The disk layers are read back a layer at a time into the cache file and written again a
    layer at a time from it, and the cluster index's order is laid out at the first step after it:
    tokens equal a fresh in-memory run's."""
    from conftest import make_tiny_model

    folder = tmp_path / "model"
    make_tiny_model(folder, "llama", seed=5, num_hidden_layers=4, max_position_embeddings=2048)
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 290, size=1500)]
    kw = dict(kv_policy="cluster", kv_budget=48, sink=4, window=16, dense_layers=1, max_context=2048,
              prefill_chunk_size=256, verbose=False)
    fresh = LLM(folder, **kw).generate([prompt], GREEDY)[0].token_ids
    disk = LLM(folder, kv_offload="disk", disk_dir=tmp_path / "kv", **kw)
    path = disk.save_prompt(prompt, tmp_path / "p.cache")
    again = LLM(folder, kv_offload="disk", disk_dir=tmp_path / "kv2", **kw)
    stored_before = []  # per layer read from the cache: how many tokens each disk layer held then
    read_layer = PromptKV.layer

    def layer(self, i):
        stored_before.append((i, {j: f.n for j, f in again.backend.kv.disk.files.items()}))
        return read_layer(self, i)

    monkeypatch.setattr(PromptKV, "layer", layer)
    assert again.generate([prompt], GREEDY, prompt_cache=path)[0].token_ids == fresh
    # a layer at a time: each layer is stored before the next is read (never the whole KV in memory)
    assert [i for i, _ in stored_before] == list(range(again.args.num_layers))
    assert all(held == {j: len(prompt) if j < i else 0 for j in held} for i, held in stored_before)
    assert again.backend.kv.disk.files[1].ordered  # the restored index laid the KV out in its order
    report = again.tier_report()["kv"]["disk"]  # ... while the layer was in memory: written once, not read back
    assert report["bytes_written"] <= report["bytes_on_disk"] * 1.05
    disk.close()
    again.close()


def test_the_extent_checksum_is_the_weight_stores_weighted_sum():
    from offload.tiers.store import weighted_sum32

    data = np.random.default_rng(0).integers(0, 256, size=(5, EXTENT_BYTES), dtype=np.uint8)
    assert list(kv_disk.extent_checksums(data)) == [weighted_sum32(torch.from_numpy(row)) for row in data]


def test_the_disk_benchmark_runs_both_tiers_and_checks_the_budget_from_outside(tiny_models, tmp_path):
    """bench_kv_disk on a tiny model: each tier in its own process, the prompt shared through a
    prompt cache, tokens and passkey answers compared, the runtime's private peak measured from
    outside against the budget, JSON and PNG written, the shared prompts removed."""
    import json

    from offload.profiles import bench_kv_disk

    folder, _ = tiny_models["llama"]
    out = tmp_path / "bench"
    assert bench_kv_disk.main(["--model", str(folder), "--context", "640", "--policies", "cluster", "--steps", "6",
                               "--depths", "0.5", "--share-prefill", "--cpu-memory", "2GiB", "--prefill-chunk", "256",
                               "--dense-layers", "1", "--out-dir", str(out)]) == 0
    result = json.loads((out / "bench_kv_disk.json").read_text())
    row = result["rows"][0]
    assert row["same_tokens"] and row["same_passkey"]
    disk = row["disk"]
    assert disk["cpu_budget"] == 2 << 30 and disk["within_budget"] is True
    assert 0 < disk["runtime_peak"] < disk["peak_anon"] <= disk["peak_rss"]
    assert disk["disk"]["selected_per_token"] > 0 and 0 <= disk["disk"]["hit_rate"] <= 1
    assert row["memory"]["cpu_budget"] is None and row["memory"]["within_budget"] is None
    assert (out / "bench_kv_disk.png").stat().st_size > 0 and not (out / "prompts").exists()


def test_the_disk_benchmark_with_a_synthetic_kv(tiny_models, tmp_path):
    """--synthetic-kv: the KV written as a layer-major prefill writes it (the disk tier holds each
    layer for its pass, builds its index at the pass's end and writes its rows once, reading
    nothing back), the same greedy tokens from both tiers."""
    import json

    from offload.profiles import bench_kv_disk

    folder, _ = tiny_models["llama"]
    out = tmp_path / "bench"
    assert bench_kv_disk.main(["--model", str(folder), "--context", "1500", "--policies", "cluster", "--steps", "5",
                               "--synthetic-kv", "--dense-layers", "1", "--out-dir", str(out)]) == 0
    row = json.loads((out / "bench_kv_disk.json").read_text())["rows"][0]
    assert row["same_tokens"] and len(row["disk"]["tokens"]) == 5
    disk = row["disk"]["disk"]
    assert disk["prefill_bytes_read"] == 0 and disk["bytes_written"] == disk["bytes_on_disk"] > 0
    assert disk["first_step_bytes_read"] < disk["bytes_on_disk"] / 4  # the index was built in the pass: no relayout


def test_int4_rows_hold_keys_in_int8_and_values_within_half_a_4bit_step():
    """A 4-bit row: each token's key in int8 (the memory tiers' codec) and its value in 4-bit codes with
    a scale and zero per 32 channels, every value within half a step of its group; its bytes are what
    the planner counts."""
    from offload.config import preset as model_preset
    from offload.tiers.kv_codec import quantize_kv
    from offload.tiers.kv_disk import DiskKVSizing

    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(H, 50, D, generator=g) * 3, torch.randn(H, 50, D, generator=g)
    rows = INT4.encode(INT4.quantize(k, v))  # [H, 50, R]
    assert rows.shape[-1] == INT4.row_bytes == D + 4 + D // 2 + 2 * 2 * 4 == 116
    kc, vc, ks, vs = INT4.decode(rows)
    want_kc, want_ks = quantize_kv(k, torch.float32)
    assert torch.equal(kc, want_kc) and torch.equal(ks, want_ks)
    assert torch.equal(INT4.dequantize(kc, ks, torch.float32, keys=True), kc.float() * ks)
    back = INT4.dequantize(vc, vs, torch.float32, keys=False)  # [H, 50, D]
    step = vs.view(H, 50, -1, 2)[..., 0].repeat_interleave(32, dim=-1)  # [H, 50, D]
    assert ((back - v).abs() <= step / 2 + 1e-5).all()
    assert torch.allclose(back.view(H, 50, -1, 32).amin(-1), v.view(H, 50, -1, 32).amin(-1), atol=1e-6)
    two = RowFormat.for_kv(D, torch.float32, "int2")  # the same with 2-bit values, four codes a byte
    rows = two.encode(two.quantize(k, v))
    assert rows.shape[-1] == two.row_bytes == D + 4 + D // 4 + 2 * 2 * 4 == 100
    _, vc, _, vs = two.decode(rows)
    back = two.dequantize(vc, vs, torch.float32, keys=False)  # [H, 50, D]
    step = vs.view(H, 50, -1, 2)[..., 0].repeat_interleave(32, dim=-1)  # [H, 50, D]
    assert ((back - v).abs() <= step / 2 + 1e-5).all() and (back.view(H, 50, -1, 32).amax(-1) > 0).any()
    args = model_preset("llama-3.2-1b")
    for dtype, b in ((torch.bfloat16, 2), (torch.float32, 4)):
        for kv_dtype in ("int4", "int2"):
            sizing = DiskKVSizing(args, b, kv_dtype, 4096, 100, 15)
            assert sizing.row_bytes == RowFormat.for_kv(args.head_dim, dtype, kv_dtype).row_bytes


def test_a_4bit_kv_on_disk(tiny_models, tmp_path):
    """kv_dtype='int4' with the KV on disk: KIVI in memory (the dense layer), 4-bit rows on disk (the
    sparse layers: int8 keys, 4-bit values, head_dim 16: 36 of the float rows' 128 bytes); logits
    as near the float disk run's as KIVI's 4 bits in memory come to the float memory run's, and a prompt
    cache saved from it restores the same tokens (and not into KIVI in memory). 2 bits likewise, with
    2-bit values."""
    folder, _ = tiny_models["llama"]
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 290, size=1500)]
    kw = dict(kv_policy="cluster", kv_budget=48, sink=4, window=16, dense_layers=1, max_context=2048,
              prefill_chunk_size=256, dtype="float32", kv_offload="disk", verbose=False)
    exact = LLM(folder, disk_dir=tmp_path / "f", **kw)
    four = LLM(folder, disk_dir=tmp_path / "q", kv_dtype="int4", **kw)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    want, got = exact.logits(prompt)[-1], four.logits(prompt)[-1]  # [V]: the last position over the disk rows
    kv = four.backend.kv
    assert kv.disk.fmt == RowFormat(16, torch.int8, torch.float32, 4, 16) and kv.disk.fmt.row_bytes == 36
    assert kv.kivi_layers[0] is not None and kv.kivi_layers[1] is None
    memory = {k: v for k, v in kw.items() if k != "kv_offload"}
    kivi_err = (LLM(folder, kv_dtype="int4", **memory).logits(prompt)[-1] - want).abs().max()  # measured 0.197 x max
    assert (got - want).abs().max() <= 1.25 * kivi_err and kivi_err <= 0.25 * want.abs().max()  # measured 0.204
    out = four.generate([prompt], params)[0].token_ids
    exact.generate([prompt], params)
    for llm, row_bytes in ((exact, 128), (four, 36)):  # the rows on disk, in 36 bytes each instead of 128
        store = llm.backend.kv.disk
        written = sum(f.written for f in store.files.values()) * llm.args.num_kv_heads
        assert llm.tier_report()["kv"]["disk"]["bytes_on_disk"] == written * row_bytes > 0
    path = four.save_prompt(prompt, tmp_path / "p.cache")
    again = LLM(folder, disk_dir=tmp_path / "q2", kv_dtype="int4", **kw)
    assert again.generate([prompt], params, prompt_cache=path)[0].token_ids == out
    in_memory = LLM(folder, kv_dtype="int4", **memory)  # KIVI everywhere: another form of the same setting
    with pytest.raises(InvalidRequestError, match="kv_disk_rows"):
        in_memory.generate([prompt], params, prompt_cache=path)
    for llm in (exact, four, again):
        llm.close()
    two = LLM(folder, disk_dir=tmp_path / "z", kv_dtype="int2", **kw)  # 2-bit values: 32 bytes a row of 16 dims
    assert (two.logits(prompt)[-1] - want).abs().max() <= 1.25 * (LLM(folder, kv_dtype="int2", **memory).logits(
        prompt)[-1] - want).abs().max()
    assert two.backend.kv.disk.fmt.row_bytes == 16 + 4 + 4 + 8
    two.close()
