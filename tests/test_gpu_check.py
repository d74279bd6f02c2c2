"""`python -m offload.profiles.gpu_check`: on a machine without a GPU it says so in one line and
writes nothing; importing it leaves CUDA alone; the parts that need no GPU (scheduling, failure
recording, figures, the Markdown table, the CPU path of the kernel check and of the decode
timing) give the numbers they should."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from offload.profiles import gpu_check as gc

NO_GPU = not torch.cuda.is_available()


def _module(args: list[str], cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    # cwd outside the checkout: `-m` puts cwd on sys.path, where kernels/ would shadow PyPI's `kernels`
    return subprocess.run([sys.executable, "-m", "offload.profiles.gpu_check", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU path")
def test_without_gpu_one_line_exit_0_and_nothing_written(tmp_path):
    run = _module(["--out", str(tmp_path / "out")], cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = (run.stdout + run.stderr).splitlines()
    assert len(lines) == 1, lines
    assert lines[0] == (f"gpu_check: no CUDA GPU is usable here (torch {torch.__version__}, cuda available: False): "
                        "nothing measured")
    assert list(tmp_path.iterdir()) == []


def test_import_does_not_initialise_cuda(tmp_path):
    code = "import torch, offload.profiles.gpu_check; print(torch.cuda.is_initialized())"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


@pytest.mark.skipif(not NO_GPU, reason="the stage succeeds on a GPU")
def test_a_failing_stage_process_records_one_error_line(tmp_path):
    result = gc.run_child("gather_bandwidth", 300, tmp_path, None)
    assert result["status"] == "failed"
    assert "\n" not in result["error"] and len(result["error"]) > 10
    assert result["error"].split(":")[0].endswith(("Error", "Exception")), result["error"]
    assert json.loads((tmp_path / "gather_bandwidth.json").read_text()) == result


def test_a_stage_past_its_limit_is_killed_and_recorded(tmp_path):
    t0 = time.monotonic()
    run = gc.run_process([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 3,
                         cwd=tmp_path)
    assert time.monotonic() - t0 < 30
    assert run["timed_out"] and run["stdout"] == "started\n"
    assert gc.child_result(None, run["rc"], True, 3, "") == {"status": "timed out",
                                                             "error": "no result within its 3 s limit"}


def test_child_result_keeps_partial_figures_and_names_the_crash():
    timed_out = gc.child_result({"status": "running", "load_s": 21.5, "prefill_s": 41.25}, -9, True, 240.0, "")
    assert timed_out == {"status": "timed out", "load_s": 21.5, "prefill_s": 41.25,
                         "error": "no result within its 240 s limit; the figures saved before are kept"}
    stderr = "Traceback (most recent call last):\nRuntimeError: CUDA error: an illegal memory access\n\n"
    crashed = gc.child_result({"status": "running"}, -11, False, 90.0, stderr)
    assert crashed == {"status": "failed", "error": "the stage process exited with code -11: "
                                                    "RuntimeError: CUDA error: an illegal memory access"}
    assert gc.child_result(None, 1, False, 90.0, "")["error"] == "the stage process exited with code 1: no output"
    done = {"status": "ok", "GBps": 2202.8}
    assert gc.child_result(done, 0, False, 60.0, "noise") == done


def test_error_line_is_one_line():
    assert gc.error_line(ValueError("bad shape\nmore detail")) == "ValueError: bad shape"
    assert gc.error_line(TimeoutError()) == "TimeoutError"


def test_pytest_counts_from_the_summary_line():
    assert gc.pytest_counts("....F.\n1 failed, 61 passed, 2 skipped in 31.52s\n") == {
        "passed": 61, "failed": 1, "errors": 0, "skipped": 2}
    assert gc.pytest_counts("EE\n2 errors in 0.51s") == {"passed": 0, "failed": 0, "errors": 2, "skipped": 0}
    assert gc.pytest_counts("======== 3 passed, 1 error in 2.10s ========")["errors"] == 1
    assert gc.pytest_counts("no tests ran in 0.01s") == {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}


def test_stage_time_limits_and_the_128k_floor():
    stage = gc.Stage("x", "x", cap_s=180, min_s=30)
    assert gc.stage_timeout(stage, 400.0) == (180, None)
    assert gc.stage_timeout(stage, 100.0) == (100.0, None)
    assert gc.stage_timeout(stage, 20.4) == (None, "20 s of the budget left, the stage needs at least 30 s")
    assert gc.stage_timeout(stage, -3.0) == (None, "0 s of the budget left, the stage needs at least 30 s")
    short = {"status": "ok", "load_s": 20.0, "prefill_s": 12.0, "first_step_s": 30.0}
    assert gc.long_context_floor(short) == 20.0 + 4 * 42.0
    assert gc.long_context_floor({"status": "timed out", "prefill_s": 12.0}) is None
    assert gc.long_context_floor(None) is None
    assert sum(s.min_s for s in gc.STAGES) <= gc.TOTAL_BUDGET_S  # every stage can start in a good run
    assert gc.STAGES[-1].name == "decode_128k"  # the longest goes last and takes what is left


def test_overall_ok_needs_every_stage_and_passing_kernels():
    good = {s.name: {"status": "ok"} for s in gc.STAGES}
    good["kernel_tests"]["checks_passed"] = True
    assert gc.overall_ok(good)
    assert not gc.overall_ok({**good, "kernel_direct": {"status": "ok", "checks_passed": False}})
    assert not gc.overall_ok({**good, "decode_128k": {"status": "skipped", "error": "no time"}})
    assert not gc.overall_ok({k: v for k, v in good.items() if k != "store_read"})


def test_bandwidth_and_overlap_figures():
    # Llama-3.1-8B layer at 128K: 8 KV heads x (4 sinks + 64 window + 2,621 selected) x 128 dims x K and V, bf16
    nbytes = gc.gather_kv_bytes(1, 8, 4 + 64 + int(0.02 * 131072), 128, 2)
    assert nbytes == 11_014_144
    fig = gc.bandwidth_figures(nbytes, 5e-6, 4e12)
    assert fig["GBps"] == pytest.approx(2202.8288)
    assert fig["roofline_pct"] == pytest.approx(55.07072)
    assert fig["kv_mib"] == pytest.approx(10.50390625)
    assert fig["seconds_us"] == pytest.approx(5.0)
    ov = gc.overlap_figures(step_s=0.024, compute_s=0.004, streamed_bytes=1_000_000_000, h2d_bytes_per_s=50e9)
    assert ov["transfer_ms"] == pytest.approx(20.0) and ov["bound_ms"] == pytest.approx(20.0)
    assert ov["step_over_bound"] == pytest.approx(1.2) and ov["serial_ms"] == pytest.approx(24.0)
    assert ov["compute_ms"] == pytest.approx(4.0) and ov["h2d_GBps"] == pytest.approx(50.0)


def test_half_streaming_budget_streams_half_the_1b_layers_from_host():
    from offload import preset
    from offload.tiers.planner import plan

    args = preset("llama-3.2-1b")
    budget, streamed = gc.half_streaming_budget(args, 1024)
    assert (args.num_layers, streamed) == (16, 8)
    p = plan(args, model="x", context=1024, device="cuda", dtype="bfloat16", gpu_memory=budget)
    assert p.layer_tiers == ("device",) * 8 + ("host",) * 8
    assert p.layer_bytes == 60_821_504 * 2  # q|k|v, o, gate|up, down and two norms in bf16
    wider = plan(args, model="x", context=1024, device="cuda", dtype="bfloat16", gpu_memory=budget + p.layer_bytes)
    assert len(wider.streamed_layers) == 7  # a layer more of budget keeps one more resident


def test_synthetic_inputs_select_distinct_ids_outside_the_dense_part():
    B, H, Hkv, D, N, S = 2, 8, 2, 64, 1000, 37
    q, k, v, sel, counts, seq_lens = gc.synthetic_decode_inputs(B, H, Hkv, D, N, S, torch.bfloat16,
                                                                torch.device("cpu"), ragged=True)
    assert q.shape == (B, H, D) and k.shape == v.shape == (B, Hkv, N, D) and k.dtype == torch.bfloat16
    assert sel.shape == (B, Hkv, S) and sel.dtype == torch.int32 and seq_lens.tolist() == [N, N]
    assert int(sel.min()) >= gc.SINK and int(sel.max()) < N - gc.WINDOW
    for row in sel.view(-1, S):
        assert len(set(row.tolist())) == S and row.tolist() == sorted(row.tolist())
    assert counts.shape == (B, Hkv) and 0 <= int(counts.min()) and int(counts.max()) <= S
    full = gc.synthetic_decode_inputs(1, 4, 1, 64, 300, 10, torch.float32, torch.device("cpu"))[4]
    assert full.tolist() == [[10]]


def test_compare_uses_the_kernel_tests_tolerance():
    want = (torch.full((1, 2, 4), 0.5), torch.full((1, 2), 3.0))  # out [B, H, D], lse [B, H]
    off = (want[0] + 1e-3, want[1])
    fp32 = gc.compare("gather_attention", torch.float32, (1, 2, 1, 4, 10, 2), off, want)
    assert not fp32["ok"] and fp32["tol"] == pytest.approx(2e-5)
    assert fp32["max_abs_err"] == pytest.approx(1e-3, rel=1e-4)
    bf16 = gc.compare("gather_attention", torch.bfloat16, (1, 2, 1, 4, 10, 2), off, want)
    assert bf16["ok"] and bf16["tol"] == pytest.approx(2e-2) and bf16["dtype"] == "bfloat16"
    nan = (want[0].clone().fill_(float("nan")), want[1])
    assert not gc.compare("merge_attention", torch.bfloat16, (1,), nan, want)["ok"]
    lse_off = gc.compare("merge_attention", torch.float32, (1,), (want[0], want[1] + 1e-3), want)
    assert not lse_off["ok"] and lse_off["lse_max_abs_err"] == pytest.approx(1e-3, rel=1e-3)


def test_kernel_check_on_cpu_with_the_torch_backend_is_exact():
    checks = gc.check_kernels(torch.device("cpu"), "torch")
    assert len(checks) == 3 * 2 * len(gc.DIRECT_SHAPES)
    assert {(c["op"], c["dtype"]) for c in checks} == {(op, dt) for op in ("gather_attention", "shadowkv_attention",
                                                                          "merge_attention")
                                                       for dt in ("float32", "bfloat16")}
    assert all(c["ok"] and c["max_abs_err"] == 0.0 and c["lse_max_abs_err"] == 0.0 for c in checks)


def test_drop_page_cache(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 8192)
    assert gc.drop_page_cache(path) is True


def test_decode_timing_on_cpu_reports_prefill_then_steps(tmp_path):
    from offload import LLM

    # a tiny Llama config with dummy weights: the same engine path as the 8B stage, in a second
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 1024}))
    llm = LLM(str(tmp_path), load_format="dummy", seed=0, device="cpu", dtype="float32", kv_policy="quest",
              max_context=512, kv_offload=True, verbose=False)
    saved: list[dict] = []
    fig = gc.measure_decode(llm, 512, lambda **f: saved.append(f))
    assert fig["context"] == 512 and fig["prompt_tokens"] == 512 - gc.PROMPT_SLACK
    assert fig["decode_steps_timed"] == gc.DECODE_TOKENS - 2  # the first token is prefill's, the first step builds
    assert fig["prefill_s"] > 0 and fig["first_step_s"] > 0 and fig["decode_ms"] > 0
    assert fig["peak_device_gib"] is None and fig["peak_host_gib"] > 0
    assert fig["kv_fetched_mib_per_step"] > 0  # kv_offload: sinks + window + selection crossed per step
    # the prefill time is saved before the first decode step, the first step's time right after it
    first_with_step = next(i for i, f in enumerate(saved) if "first_step_s" in f)
    assert first_with_step > 0 and saved[first_with_step - 1]["prefill_s"] > 0


RESULTS = {
    "device": "NVIDIA H200", "torch": "2.13.0+cu130", "cuda": "13.0", "date": "2026-11-30",
    "command": "python -m offload.profiles.gpu_check --out gpu_check", "elapsed_s": 431.6, "ok": False,
    "stages": {
        "kernel_tests": {"status": "ok", "passed": 61, "failed": 0, "errors": 0, "skipped": 0, "checks_passed": True},
        "kernel_direct": {"status": "ok", "checks_passed": True, "checks": [
            {"op": "gather_attention", "dtype": "bfloat16", "shape": [1, 32, 8, 128, 8192, 164],
             "max_abs_err": 0.0039, "lse_max_abs_err": 0.00012, "tol": 0.02, "ok": True}]},
        "gather_bandwidth": {"status": "ok", "heads": 32, "kv_heads": 8, "head_dim": 128, "context": 131072,
                             "selected": 2621, "sink": 4, "window": 64, "dtype": "bfloat16",
                             **gc.bandwidth_figures(11_014_144, 5e-6, 4e12)},
        "store_read": {"status": "ok", "file_gib": 1.0, "write_GBps": 1.234, "posix_GBps": 2.5,
                       "posix_mode": "O_DIRECT", "posix_cache_dropped": True,
                       "kvikio": "kvikio unavailable: ModuleNotFoundError: No module named 'kvikio'"},
        "quant_products": {"status": "ok", "copy_GBps": 3900.0, "checks_passed": False, "products": [
            {"N": 4096, "K": 4096, "M": 1, "bf16_us": 14.2, "int4_us": 6.1, "int4_rel_err": 0.004, "int4_ok": True,
             "int4_weight_GBps": 1718.0, "int4_roofline_pct": 88.1, "int8_us": 9.0, "int8_rel_err": 0.05,
             "int8_ok": False, "int8_weight_GBps": 2098.0, "int8_roofline_pct": 107.6}]},
        "decode_128k": {"status": "timed out", "error": "no result within its 150 s limit", "load_s": 9.5,
                        "layers": "32/0/0", "prefill_s": 88.25},
        "decode_32k": {"status": "skipped", "error": "10 s of the budget left, the stage needs at least 60 s"},
    },
}


def test_markdown_table_from_results():
    md = gc.render_markdown(RESULTS)
    lines = md.splitlines()
    assert lines[0] == "## GPU check: NVIDIA H200 — 2026-11-30"
    assert "torch 2.13.0+cu130 (CUDA 13.0); 432 s; every stage ran and the kernels matched: no." in lines
    assert "python -m offload.profiles.gpu_check --out gpu_check" in lines
    for row in ["| 1. kernel tests, compiled | tests passed / failed / errors / skipped | 61 / 0 / 0 / 0 |",
                "| 6. int4 / int8 products, Triton | 4096 x 4096, 1 rows | bf16 14.2 us; int4 6.1 us (1718 GB/s of "
                "weight, 88% of copy reads, rel err 0.004); int8 9.0 us (2098 GB/s of weight, 108% of copy reads, "
                "rel err 0.05 FAIL) |",
                "| 1. kernels vs torch reference | gather_attention bfloat16 (1, 32, 8, 128, 8192, 164) | "
                "max abs err 0.0039 (lse 0.00012), tol 0.02: ok |",
                "| 2. gather attention at 128K | % of copy roofline | 55.1% |",
                "| 2. gather attention at 128K | achieved | 2203 GB/s |",
                "| 2. gather attention at 128K | shape | B=1 H=32 Hkv=8 D=128, 131,072 tokens, 2,621 selected + "
                "4 sinks + 64 window, bfloat16 |",
                "| 5. 1 GiB store read into GPU memory | POSIX read, verified, into GPU memory | 2.50 GB/s (O_DIRECT, "
                "page cache dropped: True) |",
                "| 5. 1 GiB store read into GPU memory | kvikio | kvikio unavailable: ModuleNotFoundError: No module "
                "named 'kvikio' |",
                "| 3. 8B decode, 128K, 24 GiB cap | status | timed out: no result within its 150 s limit |",
                "| 3. 8B decode, 128K, 24 GiB cap | prefill | 88.2 s |",
                "| 3. 8B decode, 128K, 24 GiB cap | load (dummy weights); layers device/host/disk | 9.5 s; 32/0/0 |",
                "| 3. 8B decode, 32K, 24 GiB cap | status | skipped: 10 s of the budget left, the stage needs at "
                "least 60 s |"]:
        assert row in lines, row
    assert not any("kvikio read" in ln for ln in lines)  # no figure, no row
    assert not any("decode, engine stats" in ln for ln in lines)  # the timed-out stage did not reach it
    assert lines[lines.index("| stage | figure | value |") + 1] == "|---|---|---|"


def _fake_stages(monkeypatch, short_run: dict) -> list[str]:
    """main() on this CPU as on a GPU, with canned stage results: what it schedules, writes and returns."""
    ran: list[str] = []
    monkeypatch.setattr(gc.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gc.torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(gc, "stage_kernel_tests", lambda timeout: ran.append("kernel_tests") or {
        "status": "ok", "passed": 61, "failed": 0, "errors": 0, "skipped": 0, "checks_passed": True})
    canned = {"decode_32k": short_run, "kernel_direct": {"status": "ok", "checks": [], "checks_passed": True}}
    monkeypatch.setattr(gc, "run_child", lambda stage, timeout, work, tmp: ran.append(stage) or dict(
        canned.get(stage, {"status": "ok"})))
    return ran


def test_main_runs_every_stage_and_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    ran = _fake_stages(monkeypatch, {"status": "ok", "load_s": 10.0, "prefill_s": 5.0, "first_step_s": 10.0})
    assert gc.main(["--out", str(tmp_path / "out")]) == 0
    assert ran == [s.name for s in gc.STAGES]
    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert doc["ok"] is True and doc["device"] == "NVIDIA H200" and list(doc["stages"]) == ran
    assert doc["command"] == f"python -m offload.profiles.gpu_check --out {tmp_path / 'out'}"
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| 1. kernel tests, compiled | tests passed / failed / errors / skipped | 61 / 0 / 0 / 0 |" in md
    out = capsys.readouterr().out
    assert "gpu_check: [9/9] 3. 8B decode, 128K, 24 GiB cap: up to " in out and md in out


def test_main_skips_the_128k_run_the_32k_one_says_cannot_finish(tmp_path, monkeypatch):
    ran = _fake_stages(monkeypatch, {"status": "ok", "load_s": 10.0, "prefill_s": 30.0, "first_step_s": 20.0})
    assert gc.main(["--out", str(tmp_path), "--budget-s", "200"]) == 1  # a stage did not run: not a pass
    assert "decode_128k" not in ran
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    skipped = doc["stages"]["decode_128k"]
    assert skipped["status"] == "skipped" and skipped["error"].startswith(
        "the 32K run predicts at least 210 s at 128K, ")  # 10 + 4 x (30 + 20)
    assert doc["ok"] is False


def test_main_skips_stages_it_has_no_time_for(tmp_path, monkeypatch):
    ran = _fake_stages(monkeypatch, {"status": "ok", "load_s": 1.0, "prefill_s": 1.0, "first_step_s": 1.0})
    assert gc.main(["--out", str(tmp_path), "--budget-s", "35"]) == 1
    assert ran == ["kernel_tests", "kernel_direct", "gather_bandwidth", "store_read", "quant_products"]  # each needs <= 35 s
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["stages"]["layer_overlap"]["error"].endswith("the stage needs at least 40 s")
