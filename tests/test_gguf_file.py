"""offload's GGUF header reader against the gguf library's reader: the same metadata values and the
same tensor views, on the default model and on a file holding every metadata type; one clear line
for files that are not GGUF, too new, or cut short."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from offload.errors import ModelLoadError
from offload.loaders.gguf_file import GGUFFile


def _same_as_the_library(path) -> GGUFFile:
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    assert ours.fields.keys() == theirs.fields.keys()
    for key, field in theirs.fields.items():
        want, got = field.contents(), ours.fields[key]
        assert type(got) is type(want) and got == want, key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, lib in zip(ours.tensors, theirs.tensors):
        assert (mine.tensor_type, mine.n_elements, mine.n_bytes, mine.data_offset) == \
               (lib.tensor_type, lib.n_elements, lib.n_bytes, lib.data_offset), mine.name
        assert mine.shape == tuple(reversed(lib.shape.tolist()))
        assert mine.data.dtype == lib.data.dtype and mine.data.shape == lib.data.shape
        assert np.array_equal(mine.data, lib.data), mine.name
    return ours


def test_the_default_model_reads_as_the_library_reads_it(smollm_path):
    f = _same_as_the_library(smollm_path)
    assert len(f.fields["tokenizer.ggml.tokens"]) == 49152
    assert {t.tensor_type.name for t in f.tensors} >= {"Q4_1", "Q8_0", "F32"}


def _write(path, tensors: dict[str, tuple[np.ndarray, object]]) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**60)
    w.add_int64("t.i64", -(2**60))
    w.add_float64("t.f64", 1 / 3)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "naïve ✓")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.strs", ["a", "", "ü"])
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)  # a block type: rows of bytes, the shape worked out
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_every_metadata_type_and_tensor_type_reads_as_the_library_reads_it(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    tensors = {"f32": (w, None), "f16": (w.astype(np.float16), None)}
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.BF16):
        tensors[qtype.name.lower()] = (gguf.quants.quantize(w, qtype), qtype)
    path = tmp_path / "all.gguf"
    _write(path, tensors)
    f = _same_as_the_library(path)
    assert f.fields["t.str"] == "naïve ✓" and f.fields["t.strs"] == ["a", "", "ü"]
    by_name = {t.name: t for t in f.tensors}
    assert by_name["f32"].shape == (8, 64) and np.array_equal(by_name["f32"].data, w)
    assert by_name["q8_0"].data.shape == (8, 64 // 32 * 34)  # rows of blocks, as bytes
    back = gguf.quants.dequantize(by_name["q8_0"].data, by_name["q8_0"].tensor_type)
    assert np.abs(back - w).max() < 0.05


def test_not_gguf_too_new_or_cut_short_is_one_clear_line(tmp_path, smollm_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        GGUFFile(junk)
    newer = tmp_path / "v9.gguf"
    newer.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="GGUF version 9"):
        GGUFFile(newer)
    data = smollm_path.read_bytes()
    for cut, where in ((1_000, "header"), (20 * 2**20, "tensor")):  # inside the vocabulary; inside the weights
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=f"{where}.*truncated"):
            GGUFFile(short)


def _mapped_resident_bytes(path) -> int:
    """Resident bytes of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:  # a mapping's first line: address range ... path
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="Linux /proc only")
def test_released_tensors_leave_the_process_and_read_again_the_same(smollm_path):
    f = GGUFFile(smollm_path.resolve())
    sums = [float(np.asarray(t.data, dtype=np.float64).sum()) for t in f.tensors]  # every page read in
    size = smollm_path.stat().st_size
    assert _mapped_resident_bytes(smollm_path.resolve()) > 0.8 * size
    for t in f.tensors:
        f.release(t)
    assert _mapped_resident_bytes(smollm_path.resolve()) < 0.05 * size
    assert sums == [float(np.asarray(t.data, dtype=np.float64).sum()) for t in f.tensors]  # read back from the file


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K", "Q8_0"])
def test_blocks_read_as_held_forms_are_the_librarys_weights(kind):
    """A GGUF tensor's blocks read straight into the run-time forms (int4 groups: codes, scale,
    zero; int8 groups: codes, scales) give back, weight for weight, what the gguf library
    dequantizes them to (fp32; Q4_K from random blocks, every 6-bit sub-block scale and min)."""
    from offload.loaders.gguf_blocks import int4_groups, int8_groups

    rng = np.random.default_rng(7)
    qtype = gguf.GGMLQuantizationType[kind]
    if kind == "Q4_K":
        raw = rng.integers(0, 256, (16, 2, 144), dtype=np.uint8)  # 16 rows of 2 super-blocks
        raw[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # d: finite
        raw[..., 2:4] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)  # dmin
        raw = raw.reshape(16, -1)
    else:
        raw = gguf.quants.quantize((rng.standard_normal((16, 512)) * 0.1).astype(np.float32), qtype)
    want = gguf.quants.dequantize(raw, qtype)  # [16, 512]
    if kind == "Q8_0":
        codes, scales = int8_groups(raw, kind)
        got = codes.astype(np.float32) * np.repeat(scales, 32, axis=1)
    else:
        codes, scale, zero = int4_groups(raw, kind)
        assert codes.dtype == np.uint8 and codes.max() <= 15
        got = (codes.astype(np.float32) - 8) * np.repeat(scale, 32, axis=1) + np.repeat(zero, 32, axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
