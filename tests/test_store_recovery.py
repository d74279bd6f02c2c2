"""Recovering from bad files: content fingerprints, stale temp files, corrupt stores and caches, kvikio failing."""

import os
import subprocess
import sys
import types

import pytest
import torch

from offload import fingerprint as fp
from offload.config import preset
from offload.prompt_cache import load_prompt_cache, model_fingerprint, save_prompt_cache
from offload.tiers import io as io_mod
from offload.tiers.io import StoreReader
from offload.tiers.store import ALIGN, CorruptStoreError, read_header, write_store
from offload.tiers.streaming import WeightSpill

ARGS = preset("smollm2-135m")


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


@pytest.fixture
def hash_calls(tmp_path, monkeypatch):
    """A private fingerprint cache; counts the files actually hashed."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    calls = []
    real = fp._hash_file
    monkeypatch.setattr(fp, "_hash_file", lambda path: (calls.append(path), real(path))[1])
    return calls


# ---------------------------------------------------------------- 1. content fingerprints
def test_same_name_and_size_but_other_bytes_is_another_model(tmp_path, hash_calls):
    a, b, c = (tmp_path / d / "model.gguf" for d in "abc")
    for p, payload in ((a, b"GGUF" + bytes(1000)), (b, b"GGUF" + bytes(999) + b"\1"), (c, b"GGUF" + bytes(1000))):
        p.parent.mkdir()
        p.write_bytes(payload)
    assert a.stat().st_size == b.stat().st_size
    assert model_fingerprint(ARGS, a) != model_fingerprint(ARGS, b)
    assert model_fingerprint(ARGS, a) == model_fingerprint(ARGS, c) == fp.source_fingerprint(ARGS, c)  # bytes only
    assert model_fingerprint(ARGS, a) != model_fingerprint(ARGS.replace(rms_norm_eps=1e-6), a)


def test_safetensors_folders_differing_in_one_byte_differ(tmp_path, hash_calls):
    from safetensors.torch import save_file

    folders = []
    for name, bump in (("x", 0.0), ("y", 1.0)):
        folder = tmp_path / name / "model"
        folder.mkdir(parents=True)
        w = torch.arange(64, dtype=torch.float32)
        w[7] += bump
        save_file({"model.norm.weight": w}, str(folder / "model-00001-of-00001.safetensors"))
        (folder / "config.json").write_text('{"model_type": "llama"}')
        folders.append(folder)
    sizes = [sorted(f.stat().st_size for f in folder.iterdir()) for folder in folders]
    assert sizes[0] == sizes[1]
    assert model_fingerprint(ARGS, folders[0]) != model_fingerprint(ARGS, folders[1])
    before = model_fingerprint(ARGS, folders[0])
    (folders[0] / "config.json").write_text('{"model_type": "qwen2"}')  # the config is part of the model too
    assert model_fingerprint(ARGS, folders[0]) != before


def test_digest_is_cached_by_path_size_mtime_and_inode(tmp_path, hash_calls):
    model = tmp_path / "m.gguf"
    model.write_bytes(os.urandom(3 * 4096 + 5))
    first = model_fingerprint(ARGS, model)
    assert len(hash_calls) == 1
    sidecars = list((tmp_path / "xdg" / "offload" / "fingerprints").glob("*.json"))
    assert len(sidecars) == 1 and str(model.absolute()) in sidecars[0].read_text()
    assert model_fingerprint(ARGS, model) == first and len(hash_calls) == 1  # a stat, not a hash
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: same bytes, hashed again
    assert model_fingerprint(ARGS, model) == first and len(hash_calls) == 2
    assert model_fingerprint(ARGS, model) == first and len(hash_calls) == 2
    replaced = tmp_path / "new.gguf"  # same size and mtime, other bytes, another inode (a new download)
    replaced.write_bytes(os.urandom(3 * 4096 + 5))
    os.utime(replaced, ns=(st.st_atime_ns, model.stat().st_mtime_ns))
    os.replace(replaced, model)
    assert model_fingerprint(ARGS, model) != first and len(hash_calls) == 3
    sidecars[0].write_text("{not json")  # a damaged sidecar is only a cache miss
    assert model_fingerprint(ARGS, model) != first and len(hash_calls) == 4


def test_dummy_weights_hash_no_file(tmp_path, hash_calls):
    assert model_fingerprint(ARGS, "smollm2-135m", dummy_seed=0) != model_fingerprint(ARGS, "smollm2-135m",
                                                                                      dummy_seed=1)
    assert model_fingerprint(ARGS, "smollm2-135m", dummy_seed=0) == model_fingerprint(ARGS, "smollm2-135m", 0)
    assert hash_calls == []


# ---------------------------------------------------------------- 2. stale temp files
def test_writer_removes_temp_files_of_dead_writers_only(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is now no live process's
    stale = tmp_path / f".old.store.tmp-{child.pid}"
    live = tmp_path / f".other.store.tmp-{os.getpid()}"
    locked = tmp_path / f".shared.store.tmp-{child.pid}"  # a dead pid here, but a writer holds it (pid namespaces)
    unrelated = tmp_path / ".notes.tmp-x"
    for p in (stale, live, locked, unrelated):
        p.write_bytes(b"\0" * 4096)
    import fcntl

    with open(locked, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        write_store(tmp_path / "new.store", {"w": torch.randn(10)})
    assert not stale.exists()
    assert live.exists() and locked.exists() and unrelated.exists()
    assert (tmp_path / "new.store").is_file()


# ---------------------------------------------------------------- 3. corrupt stores and caches
class _Layer(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(3 * ALIGN // 4, generator=g))  # 12 KiB: one 4 MiB extent


def _spill(path, layers=(1, 2)):
    spill = WeightSpill(path, list(layers), "fp-1", torch.float32)
    spill.begin()
    for i in layers:
        spill.put_layer(i, _Layer(i))
    spill.finish()
    return spill


def test_weight_store_of_another_layout_is_rewritten(tmp_path):
    """A store written for quantized projections of another layout (int8 with row scales, before
    groups) holds tensors of other shapes under the same names: it is rewritten, never read."""
    path = tmp_path / "m.weights"
    old = WeightSpill(path, [1], "fp-1", torch.float32, layout="int8: a bfloat16 scale per row")
    old.begin()
    old.put_layer(1, _Layer(1))
    old.finish()
    assert WeightSpill(path, [1], "fp-1", torch.float32, layout="int8: a bfloat16 scale per row").reusable
    new = WeightSpill(path, [1], "fp-1", torch.float32, layout="int8: groups of 32, float32 scale")
    assert not new.reusable
    meta, _ = read_header(path)
    assert meta["layout"] == "int8: a bfloat16 scale per row"  # untouched until the new one is written
    new.begin()
    new.put_layer(1, _Layer(1))
    new.finish()
    assert read_header(path)[0]["layout"] == "int8: groups of 32, float32 scale"
    assert not WeightSpill(path, [1], "fp-1", torch.float32).reusable  # nor read as a dense store


@pytest.mark.parametrize("where", ["extent", "header"])
def test_corrupt_weight_store_is_rebuilt(tmp_path, capsys, where):
    path = tmp_path / "m.weights"
    assert not _spill(path).reusable
    assert _spill(path).reusable  # intact: reused, nothing said
    assert capsys.readouterr().err == ""
    _, entries = read_header(path)
    _flip(path, entries["layers.2.w"].offset + 2 * ALIGN + 3 if where == "extent" else path.stat().st_size - 40)
    spill = WeightSpill(path, [1, 2], "fp-1", torch.float32)
    assert not spill.reusable and not path.exists()  # deleted before the rebuild needs the space
    err = capsys.readouterr().err.strip().splitlines()
    reason = "checksum mismatch in tensor 'layers.2.w' extent 0" if where == "extent" else "header checksum"
    assert len(err) == 1 and err[0].startswith(f"offload: weight store {path} failed verification (")
    assert reason in err[0] and err[0].endswith("); rebuilding it from the model")
    spill.begin()
    for i in (1, 2):
        spill.put_layer(i, _Layer(i))
    spill.finish()
    assert _spill(path).reusable
    with StoreReader(path) as r:
        assert torch.equal(r.read("layers.2.w"), _Layer(2).w.detach())


def test_corrupt_store_mid_run_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "m.weights"
    _spill(path)
    with StoreReader(path) as r:  # opened while intact (a running generation), then damaged
        _flip(path, r.entries["layers.1.w"].offset + 5)
        with pytest.raises(CorruptStoreError) as info:
            r.read("layers.1.w")
    msg = str(info.value)
    assert str(path) in msg and "tensor 'layers.1.w' extent 0" in msg and "delete it" in msg
    assert "\n" not in msg and info.value.path == path


def test_streamed_model_rebuilds_a_corrupt_store(tmp_path, monkeypatch, capsys):
    """End to end: a damaged store is rebuilt at the next load; damage after loading is a clear error."""
    from conftest import make_tiny_model

    from offload import LLM
    from offload.tiers import planner as planner_mod

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(planner_mod, "RUNTIME_RESERVE", 0)
    folder = tmp_path / "model"
    hf = make_tiny_model(folder, "llama", seed=3, num_hidden_layers=4)
    ids = torch.randint(3, hf.config.vocab_size, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    resident = LLM(folder, verbose=False)
    args = resident.args
    layer = args.layer_param_count() * 4
    fixed = args.vocab_size * args.hidden_size * 4 * 2 + args.hidden_size * 4
    budget = fixed + args.kv_bytes_per_token(4) * 64 + 3 * layer + layer // 2
    kw = dict(cpu_memory=budget, disk_dir=tmp_path / "store", max_context=64, verbose=False)
    LLM(folder, **kw).close()
    [store] = (tmp_path / "store").glob("*.weights")
    _, entries = read_header(store)
    last = max(int(name.split(".")[1]) for name in entries)
    _flip(store, entries[f"layers.{last}.mlp.w_down"].offset + 11)
    capsys.readouterr()
    again = LLM(folder, **kw)
    err = capsys.readouterr().err
    assert f"offload: weight store {store} failed verification (checksum mismatch in tensor 'layers.{last}." in err
    assert torch.equal(again.logits(ids), resident.logits(ids))  # rebuilt from the model
    _flip(store, read_header(store)[1][f"layers.{last}.mlp.w_down"].offset + 11)  # damaged while running
    with pytest.raises(CorruptStoreError, match=f"store {store} is corrupt .*: delete it"):
        again.logits(ids)
    again.close()


def _cache(path):
    k = torch.randn(2, 2, 300, 16)  # [L, Hkv, n, D]
    return save_prompt_cache(path, fingerprint="f", dtype=torch.float32, policy="dense", settings={},
                             token_ids=list(range(300)), layers=zip(k, k + 1), logits=torch.randn(50),
                             index_states={})


@pytest.mark.parametrize("where", ["k", "header", "trailer"])
def test_corrupt_prompt_cache_says_save_it_again(tmp_path, where):
    path = _cache(tmp_path / "book.cache")
    offset = {"k": read_header(path)[1]["k/1"].offset + 100, "header": path.stat().st_size - 40,
              "trailer": path.stat().st_size - 30}[where]
    _flip(path, offset)
    with pytest.raises(CorruptStoreError) as info:
        load_prompt_cache(path, fingerprint="f", dtype=torch.float32, policy="dense", settings={}, device="cpu")
    msg = str(info.value)
    assert msg.startswith(f"prompt cache {path} is corrupt (") and msg.endswith("save it again with LLM.save_prompt")
    assert "rebuild" not in msg and "source weights" not in msg and "\n" not in msg
    if where == "k":
        assert "tensor 'k/1' extent 0" in msg


# ---------------------------------------------------------------- 4. kvikio failing at run time
class _FakeFuture:
    def __init__(self, fn):
        self.fn = fn

    def get(self):
        return self.fn()


def _fake_kvikio(monkeypatch, fail_open=False, fail_read=False):
    opened = []

    class CuFile:
        def __init__(self, path, mode):
            if fail_open:
                raise RuntimeError("cuFileDriverOpen failed")
            self.fd = os.open(path, os.O_RDONLY)
            opened.append(self)

        def pread(self, out, nbytes, offset):
            def run():
                if fail_read:
                    raise RuntimeError("cuFileRead: GDS not supported on this filesystem")
                out[:nbytes].numpy()[:] = memoryview(os.pread(self.fd, nbytes, offset))
                return nbytes
            return _FakeFuture(run)

        def close(self):
            os.close(self.fd)

    monkeypatch.setitem(sys.modules, "kvikio", types.SimpleNamespace(CuFile=CuFile))
    monkeypatch.setattr(io_mod, "resolve_io_backend", lambda io_backend, device: "kvikio")  # allowed on cpu here
    return opened


@pytest.mark.parametrize("fail", [None, "open", "read"])
def test_kvikio_failure_falls_back_to_posix_once(tmp_path, monkeypatch, capsys, fail):
    opened = _fake_kvikio(monkeypatch, fail_open=fail == "open", fail_read=fail == "read")
    t = {"a": torch.randn(3000), "b": torch.randn(77, 5)}
    path = write_store(tmp_path / "k.store", t, extent=ALIGN)
    with StoreReader(path, io_backend="kvikio") as r:
        assert r.mode == ("kvikio" if fail in (None, "read") else "O_DIRECT")
        for _ in range(2):
            assert torch.equal(r.read("a"), t["a"]) and torch.equal(r.read("b"), t["b"])
            assert torch.equal(r.read_bytes("a", ALIGN, 2 * ALIGN).view(torch.float32), t["a"][1024:2048])
            out = torch.empty_like(t["a"])
            assert torch.equal(r.read("a", out=out), t["a"])
        assert r.mode == ("kvikio" if fail is None else "O_DIRECT")  # the effective mode
        assert r.backend == ("kvikio" if fail is None else "posix")
    err = capsys.readouterr().err.strip().splitlines()
    if fail is None:
        assert err == [] and len(opened) == 1
    else:
        assert len(err) == 1 and err[0].startswith("offload: kvikio read failed (RuntimeError: cuFile")
        assert err[0].endswith("); falling back to POSIX reads")


def test_kvikio_checksum_error_is_not_a_fallback(tmp_path, monkeypatch, capsys):
    """A corrupt store read through kvikio is a corrupt store, not a kvikio failure."""
    _fake_kvikio(monkeypatch)
    path = write_store(tmp_path / "k.store", {"a": torch.randn(3000)}, extent=ALIGN)
    _flip(path, ALIGN + 9)
    with StoreReader(path, io_backend="kvikio") as r:
        with pytest.raises(CorruptStoreError, match="tensor 'a' extent 1"):
            r.read("a")
        assert r.mode == "kvikio"
    assert "falling back" not in capsys.readouterr().err


# ---------------------------------------------------------------- 5. the docstring names the real reader
def test_store_docs_name_the_real_reader():
    import offload.tiers.store as store_mod

    assert "DirectReader" not in store_mod.__doc__ and "StoreReader" in store_mod.__doc__
    assert hasattr(io_mod, "StoreReader")
