"""The disk tier's store: bit-exact round trips, checksums, atomic replacement, direct I/O."""


import pytest
import torch

from offload.errors import OffloadError
from offload.tiers.io import StoreReader, aligned_empty
from offload.tiers.store import ALIGN, CorruptStoreError, StoreWriter, read_header, weighted_sum32, write_store

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8]


def _tensor(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_exact(tmp_path, dtype):
    shapes = [(1,), (7, 13), (3, 1021), (4099,), (0, 5)]
    tensors = {f"t{i}": _tensor(dtype, s, i) for i, s in enumerate(shapes)}
    path = write_store(tmp_path / "a.store", tensors, metadata={"kind": "test"}, extent=2 * ALIGN)
    with StoreReader(path) as r:
        assert r.metadata == {"kind": "test"}
        assert r.mode == "O_DIRECT"  # ext4 allows it; the page cache is not involved
        for name, t in tensors.items():
            got = r.read(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(torch.uint8) if got.numel() else got, t.view(torch.uint8) if t.numel() else t)
        out = torch.empty_like(tensors["t2"])
        assert r.read("t2", out=out) is out and torch.equal(out, tensors["t2"])
        assert r.bytes_read % r.align == 0 and r.bytes_read > 0  # whole O_DIRECT blocks


@pytest.mark.parametrize("block,threads", [(ALIGN, 1), (3 * ALIGN, 4), (64 * ALIGN, 2)])
def test_block_reads_by_several_threads_are_bit_exact(tmp_path, block, threads):
    """Reads split into blocks issued by several threads (the tuned setting) land every byte."""
    tensors = {"odd": _tensor(torch.bfloat16, (37, 1031), 1), "small": _tensor(torch.int8, (5,), 2)}
    path = write_store(tmp_path / "a.store", tensors, extent=4 * ALIGN)
    with StoreReader(path, read_block=block, reader_threads=threads) as r:
        for name, t in tensors.items():
            assert torch.equal(r.read(name).view(torch.uint8), t.view(torch.uint8))
    with pytest.raises(OffloadError, match="multiple of 4096"):
        StoreReader(path, read_block=1000)


def test_reusable_buffer_grows_while_a_view_of_it_is_held():
    """A reader thread can still hold a view of the shared read buffer (between its copy out and its
    return) when another read grows the buffer: growing must not fail (it used to raise BufferError
    in CI) and the held view keeps its bytes."""
    from offload.tiers.io import AlignedBuffer

    buf = AlignedBuffer(ALIGN)
    held = buf.reserve(16)[:16]
    held[:] = 7
    grown = buf.reserve(64 * ALIGN)
    assert len(grown) >= 64 * ALIGN and int(held.sum()) == 7 * 16


def test_concurrent_reads_of_growing_sizes_are_bit_exact(tmp_path):
    """Two threads reading tensors of growing sizes through one reader (the streamer's prefetch and
    a calibration pass do) each get their exact bytes."""
    from concurrent.futures import ThreadPoolExecutor

    tensors = {f"t{k}": _tensor(torch.float32, (k * 997 + 3,), k) for k in range(1, 25)}
    path = write_store(tmp_path / "g.store", tensors, extent=ALIGN)
    with StoreReader(path) as r, ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            got = list(pool.map(lambda name: (name, r.read(name)), tensors))
            assert all(torch.equal(t, tensors[name]) for name, t in got)


def test_partial_reads_cover_whole_extents(tmp_path):
    t = torch.arange(10 * 1024, dtype=torch.float32)  # 40 KiB: 5 extents of 8 KiB
    path = write_store(tmp_path / "b.store", {"x": t}, extent=2 * ALIGN)
    with StoreReader(path) as r:
        got = r.read_bytes("x", 2 * ALIGN, 5 * ALIGN)
        assert torch.equal(got.view(torch.float32), t[2048:5120])
        with pytest.raises(Exception, match="not extent-aligned"):
            r.read_bytes("x", 100, 200)


@pytest.mark.parametrize("threads,align,direct", [(1, 512, False), (4, 512, False), (4, 4096, False),
                                                  (4, 512, True), (1, 4096, True)])
def test_scattered_ranges_are_packed_in_order_and_verified(tmp_path, threads, align, direct):
    """read_ranges (flash bundles): many ranges in flight at once, packed in order, the tensor's
    last (short) extent included, with extents of 9 sectors (not whole pages), read at the device's
    512-byte unit or, on a 4 KiB-only device, through the pages around them, through a bounce
    buffer or straight into an aligned one; a flipped byte is a checksum error."""
    ext = 9 * 512
    t = torch.arange(12 * ext // 4 + 100, dtype=torch.float32)  # 12 extents and a short 13th
    path = tmp_path / "r.store"
    with StoreWriter(path) as w:
        w.add("x", t, extent=ext)
    raw = t.view(torch.uint8)
    ranges = [(6 * ext, 8 * ext), (0, ext), (12 * ext, raw.numel()), (3 * ext, 4 * ext)]
    if direct:  # whole sectors into an aligned buffer: the reads land in it with no copy
        ranges = [(6 * ext, 8 * ext), (0, ext), (3 * ext, 4 * ext)]
    with StoreReader(path, reader_threads=threads) as r:
        if r.mode == "O_DIRECT":
            assert r.align == 512  # this machine's disk; a 4 KiB-only device is forced below
        r.align = align
        total = sum(e - s for s, e in ranges)
        out = aligned_empty((total,), torch.uint8) if direct else torch.empty(total + 1, dtype=torch.uint8)[1:]
        r.read_ranges("x", ranges, out)
        assert torch.equal(out, torch.cat([raw[s:e] for s, e in ranges]))
        whole = aligned_empty((2 * ext,), torch.uint8) if direct else out[:2 * ext]
        assert torch.equal(r.read_bytes("x", 2 * ext, 4 * ext, out=whole), raw[2 * ext:4 * ext])
        with pytest.raises(OffloadError, match="not extent-aligned"):
            r.read_ranges("x", [(0, 100), (100, ext)], torch.empty(ext, dtype=torch.uint8))
    with open(path, "r+b") as f:  # flip one byte inside extent 7
        f.seek(7 * ext + 5)
        b = f.read(1)
        f.seek(7 * ext + 5)
        f.write(bytes([b[0] ^ 0x01]))
    with StoreReader(path, reader_threads=threads) as r:
        r.align = align
        with pytest.raises(CorruptStoreError, match="tensor 'x' extent 7"):
            r.read_ranges("x", ranges, out)


def test_back_to_back_tensors_load_in_one_verified_read(tmp_path):
    """A streamed layer's tensors lie back to back in the store: ``read_span`` reads them in one
    request into one aligned block (each at its store offset), verifies every extent, and refuses
    tensors that are not back to back."""
    tensors = {"a": _tensor(torch.bfloat16, (3, 1000), 1), "b": _tensor(torch.int8, (77,), 2),
               "c": _tensor(torch.float32, (2048,), 3), "d": _tensor(torch.float32, (5,), 4)}
    path = write_store(tmp_path / "s.store", tensors, extent=ALIGN)
    with StoreReader(path) as r:
        base, length, at = r.span_of(["a", "b", "c"])
        assert base == r.entry("a").offset and length == r.entry("c").offset + 2 * ALIGN - base
        block = aligned_empty((length,), torch.uint8)  # [span]
        before = r.bytes_read
        r.read_span(["a", "b", "c"], out=block)
        assert r.bytes_read - before == length  # one span, no per-tensor rounding on top
        for name in "abc":
            t = tensors[name]
            got = block[at[name]:at[name] + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            assert torch.equal(got, t)
        assert r.span_of(["a", "c"]) is None  # "b" lies between them
        with pytest.raises(OffloadError, match="not back to back"):
            r.read_span(["a", "c"], out=block)
    with open(path, "r+b") as f:  # flip one byte of "c"
        f.seek(StoreReader(path).entry("c").offset + ALIGN + 3)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x04]))
    with StoreReader(path) as r, pytest.raises(CorruptStoreError, match="tensor 'c' extent 1"):
        r.read_span(["a", "b", "c"], out=block)


def test_flipped_byte_is_a_clear_checksum_error(tmp_path):
    t = torch.randn(3000)
    path = write_store(tmp_path / "c.store", {"w": t}, extent=ALIGN)
    with open(path, "r+b") as f:  # flip one byte inside extent 2 of "w"
        f.seek(2 * ALIGN + 17)
        b = f.read(1)
        f.seek(2 * ALIGN + 17)
        f.write(bytes([b[0] ^ 0x10]))
    with StoreReader(path) as r:
        with pytest.raises(CorruptStoreError, match="tensor 'w' extent 2"):
            r.read("w")
        assert torch.equal(r.read_bytes("w", 0, 2 * ALIGN).view(torch.float32), t[:2 * ALIGN // 4])  # others fine


def test_header_corruption_and_truncation_are_detected(tmp_path):
    path = write_store(tmp_path / "d.store", {"w": torch.randn(100)})
    data = bytearray(path.read_bytes())
    data[-40] ^= 1  # inside the header
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="header checksum"):
        read_header(path)
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(CorruptStoreError, match="trailer"):
        read_header(path)


def test_interrupted_write_keeps_previous_file(tmp_path):
    path = tmp_path / "e.store"
    old = torch.randn(50)
    write_store(path, {"w": old})
    with pytest.raises(RuntimeError):
        with StoreWriter(path) as w:
            w.add("w", torch.zeros(50))
            raise RuntimeError("killed mid-write")
    assert [p.name for p in tmp_path.iterdir()] == ["e.store"]  # no temp file left behind
    with StoreReader(path) as r:
        assert torch.equal(r.read("w"), old)


def test_weighted_sum_detects_swapped_words():
    a = torch.arange(64, dtype=torch.uint8)
    b = a.clone().view(torch.int32)
    b[[0, 1]] = b[[1, 0]]
    assert weighted_sum32(a) != weighted_sum32(b.view(torch.uint8))
    big = torch.full((1 << 20,), 255, dtype=torch.uint8)  # wraps int64 products: value stays exact mod 2^32
    w = 0xFFFFFFFF
    n = big.numel() // 4
    assert weighted_sum32(big) == (w * n * (n + 1) // 2) % (1 << 32)


def test_layer_streamer_serves_every_layer_and_recovers_from_a_pass_stopped_early(tmp_path):
    """Double-buffered streaming on the CPU: each acquired buffer holds that layer's weights, in
    order and after a pass that stopped early (the pipeline restarts with distinct layers in its
    buffers, so the next passes are double-buffered again)."""
    from offload.tiers.io import StoreReader
    from offload.tiers.store import StoreWriter
    from offload.tiers.streaming import LayerStreamer, layer_tensor_name

    weights = {layer: torch.full((4, 8), float(layer)) for layer in range(4)}
    path = tmp_path / "layers.store"
    with StoreWriter(path, metadata={}) as w:
        for layer, t in weights.items():
            w.add(layer_tensor_name(layer, "weight"), t)
    streamer = LayerStreamer(lambda: torch.nn.Linear(8, 4, bias=False), [0, 1, 2, 3],
                             StoreReader(path, device="cpu"), torch.device("cpu"), slots=2)

    def run(layers):
        for layer in layers:
            module = streamer.acquire(layer)
            assert torch.equal(module.weight, weights[layer]), layer
            streamer.release(layer)

    run([0, 1, 2, 3])
    run([0])  # a pass that stopped after its first layer
    run([0])  # out of order: layer 0's buffer was already reloaded with layer 2
    assert len(set(streamer._holds.values())) == len(streamer.slots)  # distinct layers in the buffers
    run([1, 2, 3, 0, 1])
    assert len(set(streamer._holds.values())) == len(streamer.slots)
    streamer.close()
