"""The runtime's shape: one config resolved once, plan == generate, settings checked before any
model loads, the disk tier's directory checked before anything is written, the layering kept."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from offload import LLM, SamplingParams
from offload.cli import build_parser, main
from offload.engine_config import EngineConfig
from offload.errors import InvalidRequestError, OffloadError
from offload.indexes import policy_names
from offload.tiers.budget import BudgetError, check_disk_dir

ROOT = Path(__file__).resolve().parents[1]


def _resolved(command: str, flags: list[str]):
    argv = [command, *flags] + (["a prompt"] if command == "generate" else [])
    ns = build_parser().parse_args(argv)
    return EngineConfig.from_cli(ns, prompt="a prompt").resolve(planning=command == "plan")


@pytest.mark.parametrize("flags", [
    [],
    pytest.param(["--cpu-memory", "450MiB", "--disk-dir", "{tmp}", "--max-context", "1024"], marks=pytest.mark.slow),
    pytest.param(["--cpu-memory", "900MiB", "--disk-dir", "{tmp}", "--kv-policy", "auto", "--max-context", "8192"],
                 marks=pytest.mark.slow),
    pytest.param(["--cpu-memory", "auto", "--kv-policy", "quest", "--dense-layers", "4"], marks=pytest.mark.slow),
    pytest.param(["--kv-policy", "auto", "--max-context", "2048"], marks=pytest.mark.slow),
])
def test_plan_and_generate_resolve_the_same_placement(flags, smollm_path, tmp_path):
    flags = ["--model", str(smollm_path)] + [f.replace("{tmp}", str(tmp_path)) for f in flags]
    planned, generated = _resolved("plan", flags), _resolved("generate", flags)
    assert planned.kv_policy == generated.kv_policy and planned.selection == generated.selection
    p, g = planned.placement, generated.placement
    assert (p.layer_tiers, p.kv_tiers, p.index_tiers, p.context) == (g.layer_tiers, g.kv_tiers, g.index_tiers, g.context)
    assert p.predicted_step_ms == pytest.approx(g.predicted_step_ms)
    if "auto" not in flags:  # "auto" budgets follow free memory, which moves between two readings
        assert p == g


@pytest.mark.slow
def test_plan_prints_the_table_generate_prints(smollm_path, tmp_path, capsys):
    flags = ["--model", str(smollm_path), "--cpu-memory", "450MiB", "--disk-dir", str(tmp_path),
             "--max-context", "1024"]
    assert main(["plan", *flags]) == 0
    assert _resolved("generate", flags).placement.table() in capsys.readouterr().out


@pytest.mark.parametrize("settings, message", [
    ({"kv_budget": 1.5}, "whole number of tokens"),
    ({"kv_budget": 0}, "kv_budget must be"),
    ({"kv_budget": -0.5}, "kv_budget must be"),
    ({"model": 123}, "model must be a path"),
    ({"kv_policy": "nope"}, "unknown kv_policy 'nope'"),
    ({"sink": -1}, "sink must be an integer >= 0"),
    ({"cpu_memory": "8 parsecs"}, "cannot read cpu_memory"),
    ({"max_context": 0}, "max_context must be a positive integer"),
    ({"dtype": "int3"}, "unknown dtype 'int3'"),
    ({"kv_read_ahead": "yes"}, r"kv_read_ahead must be None \(auto\), True or False"),
])
def test_bad_settings_fail_before_anything_loads(settings, message):
    with pytest.raises(OffloadError, match=message):
        EngineConfig(**settings)


def test_unknown_setting_and_dense_layers_beyond_the_model(smollm_path):
    with pytest.raises(OffloadError, match="unknown setting 'kv_polcy'"):
        LLM(smollm_path, kv_polcy="quest", verbose=False)
    with pytest.raises(OffloadError, match="dense_layers 100 is more than the model's 30 layers"):
        EngineConfig(model=smollm_path, dense_layers=100).resolve()


def test_a_model_that_cannot_fit_says_what_to_pass():
    """llama-3.1-8b in fp32 (32 GB) on this 24 GiB box: one line before the allocator is asked."""
    with pytest.raises(OffloadError, match=r"needs .* free: pass cpu_memory=\.\.\. with disk_dir=.*bfloat16"):
        EngineConfig(model="llama-3.1-8b", load_format="dummy", device="cpu", dtype="float32").resolve()


def test_disk_dir_is_checked_before_anything_is_written(tmp_path, smollm_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OffloadError, match="is a file, not a directory"):
        EngineConfig(model=smollm_path, cpu_memory="450MiB", max_context=256, disk_dir=a_file).resolve()
    with pytest.raises(OffloadError, match="is not writable"):
        check_disk_dir(Path("/proc/offload-disk-tier"), 0)
    with pytest.raises(BudgetError, match="free but the disk tier needs"):
        check_disk_dir(tmp_path / "new", 1 << 60)
    assert (tmp_path / "new").is_dir() and not list((tmp_path / "new").iterdir())  # the probe left nothing


@pytest.mark.slow
def test_host_searched_policies_keep_their_kv_on_the_host_on_a_gpu(smollm_path):
    """Retrieval walks its graph with numba over host memory: planned for a GPU, its KV is there."""
    base = EngineConfig(model=smollm_path, device="cuda", kv_policy="retrieval")
    assert base.resolve(planning=True).kv_offload
    assert base.replace(kv_policy="quest", kv_offload=False).resolve(planning=True).kv_offload is False
    with pytest.raises(OffloadError, match="searches its index on the host"):
        base.replace(kv_offload=False).resolve(planning=True)


def test_plan_with_a_gpu_budget_and_no_gpu_says_to_pass_the_device(capsys):
    assert main(["plan", "--model", "llama-3.1-8b", "--gpu-memory", "24GiB", "--max-context", "8192"]) == 2
    assert "pass --device cuda" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-3.1-8b", "--gpu-memory", "24GiB", "--device", "cuda",
                 "--max-context", "131072", "--kv-policy", "retrieval"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16 on cuda, context 131,072" in out and "index_search" in out


def test_bad_requests_are_one_clear_error(tiny_models, tmp_path):
    folder, _ = tiny_models["llama"]
    llm = LLM(folder, verbose=False)
    with pytest.raises(InvalidRequestError, match="sampling_params must be a SamplingParams"):
        llm.generate("Hi", {"max_new_tokens": 4})
    with pytest.raises(InvalidRequestError, match="a prompt must be"):
        llm.generate([None])
    with pytest.raises(InvalidRequestError, match="position 1 is None"):
        llm.generate([[5, None]])
    with pytest.raises(InvalidRequestError, match="does not exist"):
        llm.save_prompt("Hi", tmp_path / "missing" / "cache.store")
    assert len(llm.generate("Hi", SamplingParams(max_new_tokens=2, ignore_eos=True))[0].token_ids) == 2


def test_policy_names_live_only_in_indexes():
    """The CLI help and the planner read the registry; no runtime module names a policy."""
    sparse = [name for name in policy_names() if name != "dense"]  # dense is the exact mode, named everywhere
    quoted = re.compile("[\"'](" + "|".join(sparse) + ")[\"']")
    offenders = [f"{path.relative_to(ROOT)}: {m.group(0)}"
                 for folder in ("offload", "tiers", "kernels") for path in sorted((ROOT / folder).rglob("*.py"))
                 for m in quoted.finditer(path.read_text())]
    assert not offenders, offenders
    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert all(name in help_text for name in policy_names())


def test_layering_and_api_size():
    assert len((ROOT / "offload" / "llm.py").read_text().splitlines()) < 200
    for folder in ("tiers", "indexes", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not re.search(r"offload\.llm|from \.\.?llm", path.read_text()), path
