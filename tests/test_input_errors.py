"""Bad input deep in the pipeline (sampling values, token ids, text, NaN weights, output paths) is one
clear line naming the problem and the fix, never a traceback from inside torch or the tokenizer."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from offload import LLM, SamplingParams
from offload.errors import InvalidRequestError, NumericalError, OffloadError
from offload.sampling import Sampler

GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=4, temperature=1.0, top_p=0.9, seed=0, ignore_eos=True)


def run_cli(*args: str | bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offload", *args], capture_output=True, text=True, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("offload: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture
def llm(tiny_models):
    """A fresh tiny model per test: some tests poison its weights."""
    folder, _ = tiny_models["llama"]
    return LLM(folder, device="cpu", verbose=False)


# ---------------------------------------------------------------- 1. SamplingParams


def test_stop_none_string_and_list():
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


@pytest.mark.parametrize("stop", [[1], ["a", None], b"\n", 5])
def test_stop_must_be_strings(stop):
    with pytest.raises(InvalidRequestError, match="stop"):
        SamplingParams(stop=stop)


@pytest.mark.parametrize("field,value,needle", [
    ("max_new_tokens", 0, "positive integer"), ("max_new_tokens", 2.5, "positive integer"),
    ("max_new_tokens", True, "positive integer"), ("max_new_tokens", None, "positive integer"),
    ("temperature", -0.1, ">= 0"), ("temperature", math.nan, "finite"), ("temperature", math.inf, "finite"),
    ("temperature", "0.7", "number"),
    ("top_p", 0.0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"), ("top_p", math.nan, "(0, 1]"), ("top_p", None, "(0, 1]"),
    ("top_k", -1, "non-negative integer"), ("top_k", 2.0, "non-negative integer"),
    ("seed", 1.5, "integer"), ("seed", "7", "integer"), ("seed", 1 << 64, "2**64"),
    ("ignore_eos", "no", "True or False"),
])
def test_every_field_is_checked(field, value, needle):
    with pytest.raises(InvalidRequestError, match=field) as e:
        SamplingParams(**{field: value})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_numpy_numbers_are_accepted_as_python_ones():
    p = SamplingParams(max_new_tokens=np.int64(3), temperature=np.float32(0.5), top_k=np.int32(4), seed=np.int64(1))
    assert (p.max_new_tokens, p.top_k, p.seed) == (3, 4, 1) and type(p.max_new_tokens) is int
    assert type(p.temperature) is float


def test_coerce():
    p = SamplingParams(max_new_tokens=3)
    assert SamplingParams.coerce(p) is p
    with pytest.raises(InvalidRequestError, match="got dict: use SamplingParams\\(max_new_tokens=...\\)"):
        SamplingParams.coerce({"max_new_tokens": 3})


def test_dict_as_sampling_params_reaching_the_engine(llm):
    with pytest.raises(InvalidRequestError, match="must be a SamplingParams"):
        llm.engine.run([[5, 6, 7]], [{"max_new_tokens": 3}]).__next__()
    with pytest.raises(InvalidRequestError, match="2 SamplingParams for 1 prompts"):
        llm.engine.run([[5, 6, 7]], [GREEDY, GREEDY]).__next__()


def test_tiny_temperature_does_not_overflow():
    # logits / 1e-40 overflow to inf, and softmax of inf is NaN: multinomial used to fail inside torch
    sampler = Sampler([SamplingParams(temperature=1e-40, seed=0)], torch.device("cpu"))
    assert sampler(torch.tensor([[1.0, 3.0, 2.0]])) == [1]


# ---------------------------------------------------------------- 2. token ids


@pytest.mark.parametrize("bad", [None, 2.0, True, "7"])
def test_non_int_token_id(llm, bad):
    ids = [5, 6, bad, 7]
    with pytest.raises(InvalidRequestError, match=f"position 2 is {bad!r}"):
        llm.engine.check_prompt(ids)
    with pytest.raises(InvalidRequestError, match="position 2"):
        next(llm.engine.run([ids], [GREEDY]))


def test_out_of_vocabulary_token_names_its_position(llm):
    with pytest.raises(InvalidRequestError, match="token id 100000 at position 1 is outside the vocabulary"):
        llm.engine.check_prompt([5, 100000])


def test_numpy_token_ids_are_fine(llm):
    llm.engine.check_prompt([np.int64(5), 6])


def test_text_given_to_the_engine(llm):
    with pytest.raises(InvalidRequestError, match="list of token ids, got str"):
        llm.engine.check_prompt("hello")


# ---------------------------------------------------------------- 3. NaN / inf logits


def poison(llm, name_part: str, index=(0, 0), value=float("nan")) -> None:
    name, param = next((n, p) for n, p in llm.model.named_parameters() if name_part in n)
    with torch.no_grad():
        param[index] = value


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_weight_stops_at_prefill(llm, params, value):
    poison(llm, "wqkv", value=value)  # the first layer's first q/k/v weight: every logit goes NaN
    with pytest.raises(NumericalError, match=r"NaN/inf logits at step 0 \(prompt row 0\).*dtype='float32'"):
        llm.generate([[5, 6, 7, 8]], params)
    with pytest.raises(NumericalError):
        list(llm.stream([5, 6, 7, 8], params))


def embedding_name(llm) -> str:
    return next(n for n, p in llm.model.named_parameters() if p.dim() == 2 and p.shape[0] == llm.model.args.vocab_size)


@pytest.mark.parametrize("params", [[GREEDY] * 2, [SAMPLED, replace(SAMPLED, seed=1)]], ids=["greedy", "sampled"])
def test_nan_in_a_decode_step_names_the_step_and_row(llm, params):
    prompts = [[10, 11, 12], [40, 41, 42, 43]]
    firsts = [o.token_ids[0] for o in llm.generate(prompts, [replace(p, max_new_tokens=1) for p in params])]
    t = firsts[1]
    assert t != firsts[0] and t not in prompts[0] + prompts[1]  # holds for these seeds' tiny model
    # The embedding row of row 1's first generated token: the prefill is clean, decode step 1 is not.
    poison(llm, embedding_name(llm), index=(t,))
    with pytest.raises(NumericalError, match=r"at step 1 \(prompt row 1\)"):
        llm.generate(prompts, params)


def test_nan_in_a_finished_row_is_ignored(llm):
    prompts = [[10, 11, 12], [40, 41, 42, 43]]
    clean = llm.generate(prompts, [SamplingParams(max_new_tokens=1, ignore_eos=True), GREEDY])
    t = clean[0].token_ids[0]
    assert t not in prompts[1] + clean[1].token_ids
    poison(llm, embedding_name(llm), index=(t,))
    # Row 0 is done after its one token; it keeps decoding (NaN) only to keep the batch rectangular.
    again = llm.generate(prompts, [SamplingParams(max_new_tokens=1, ignore_eos=True), GREEDY])
    assert [o.token_ids for o in again] == [o.token_ids for o in clean]


def test_sampler_call_raises_on_nan():
    sampler = Sampler([SamplingParams(temperature=1.0, seed=0)], torch.device("cpu"))
    with pytest.raises(NumericalError, match="prompt row 0"):
        sampler(torch.tensor([[0.0, float("nan"), 1.0]]))


def test_sampler_flags_every_kind_of_non_finite_row_and_picks_the_first_maximum():
    """Greedy picks: the first maximal index (as argmax), and each row flagged exactly when one of
    its logits is NaN or infinite."""
    sampler = Sampler([SamplingParams()] * 5, torch.device("cpu"))
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0],  # a tie: the first
                           [0.0, float("-inf"), 1.0, 0.0],
                           [float("inf"), 0.0, 1.0, 0.0],
                           [float("inf"), float("-inf"), 0.0, 0.0],
                           [-3.0e4, 1.0e4, 9.0e3, 0.0]])  # large, finite
    picked, finite = sampler.pick(logits)
    assert finite == [True, False, False, False, True]
    assert picked[0] == 1 and picked[4] == 1


def test_nan_checkpoint_from_the_cli(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    src, _ = tiny_models["llama"]
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    shard = next(s for s in sorted(dst.glob("*.safetensors")) if any("q_proj" in k for k in load_file(s)))
    tensors = load_file(shard)
    name = next(k for k in tensors if "q_proj" in k)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    assert_one_line_error(run_cli("generate", "hello", "--model", str(dst), "--max-new-tokens", "3"),
                          "NaN/inf logits at step 0", "float32")


# ---------------------------------------------------------------- 4. text the tokenizer cannot take


@pytest.mark.parametrize("bad,needle", [(None, "got NoneType"), (5, "got int"), (b"hi", "bytes, not text")])
def test_encode_non_text(llm, bad, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        llm.tokenizer.encode(bad)


def test_encode_undecodable_bytes(llm):
    text = b"abc\xff\xfedef".decode("utf-8", errors="surrogateescape")  # as sys.argv holds such bytes
    with pytest.raises(InvalidRequestError, match="not valid text: character 3 is the byte 0xff"):
        llm.tokenizer.encode(text)
    with pytest.raises(InvalidRequestError, match="lone surrogate U\\+D800"):
        llm.tokenizer.encode("x\ud800")
    with pytest.raises(InvalidRequestError, match="not valid text"):
        llm.generate("abc\udcff", GREEDY)


def test_undecodable_bytes_on_the_command_line(tiny_models):
    folder, _ = tiny_models["llama"]
    proc = subprocess.run([sys.executable.encode(), b"-m", b"offload", b"generate", b"caf\xe9 au lait",
                           b"--model", str(folder).encode()], capture_output=True, timeout=600)
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    assert_one_line_error(proc, "not valid text", "0xe9")


# ---------------------------------------------------------------- 5. offload profile --out


@pytest.fixture
def fake_profile(monkeypatch):
    """main() without the minute of measuring: the path handling is what is under test."""
    import offload.profiles.bandwidth as bw

    seen = {}

    def run_profile(quick, disk_dir, progress=True):
        seen["disk_dir"] = disk_dir
        return {"quick": quick, "measurements": {}, "planner": {
            "host_read_gbs": 1.0, "disk_read_gbs": 1.0, "disk_block_bytes": 1 << 20, "index_keys_per_s": 1.0}}

    monkeypatch.setattr(bw, "run_profile", run_profile)
    monkeypatch.setattr(bw, "plot", lambda result, path: path.write_bytes(b"png"))
    return bw, seen


def test_profile_out_directory(fake_profile, tmp_path):
    bw, seen = fake_profile
    assert bw.main(["--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "profile.json").is_file() and (tmp_path / "profile.png").is_file()
    assert seen["disk_dir"] == tmp_path


def test_profile_out_missing_parents_are_created(fake_profile, tmp_path):
    bw, _ = fake_profile
    assert bw.main(["--quick", "--out", str(tmp_path / "a" / "b" / "p.json")]) == 0
    assert (tmp_path / "a" / "b" / "p.json").is_file()
    assert bw.main(["--quick", "--out", str(tmp_path / "new") + "/"]) == 0
    assert (tmp_path / "new" / "profile.json").is_file()


def test_profile_out_unwritable(fake_profile, tmp_path):
    bw, seen = fake_profile
    (tmp_path / "file").write_text("")
    with pytest.raises(OffloadError, match="folder of the profile .*file.*choose a writable location"):
        bw.main(["--quick", "--out", str(tmp_path / "file" / "sub" / "p.json")])
    assert "disk_dir" not in seen  # refused before measuring, not a minute later


def test_profile_out_help():
    import offload.profiles.bandwidth as bw

    assert "profile.json" in bw.OUT_HELP and "director" in bw.OUT_HELP
    assert bw.resolve_out("x.json").name == "x.json"
