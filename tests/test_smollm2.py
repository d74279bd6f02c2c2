"""End-to-end checks on the real default model, SmolLM2-135M-Instruct Q4_1 (GGUF), against transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import shakespeare

from offload import SamplingParams


@pytest.fixture(scope="module")
def prompt_ids(smollm):
    ids = smollm.tokenizer.encode(shakespeare())
    assert len(ids) > 4096
    return ids[:512]


@pytest.mark.slow
def test_logits_match_transformers_512_tokens(smollm, smollm_hf, prompt_ids):
    ours = smollm.logits(prompt_ids)  # [512, V]
    with torch.no_grad():
        ref = smollm_hf(torch.tensor([prompt_ids])).logits[0]  # [512, V]
    assert (ours - ref).abs().max().item() < 1e-3


@pytest.mark.slow
def test_chunked_prefill_matches_transformers(smollm, smollm_hf, prompt_ids):
    with torch.no_grad():
        ref = smollm_hf(torch.tensor([prompt_ids])).logits[0]
    old = smollm.engine.prefill_chunk_size
    smollm.engine.prefill_chunk_size = 96  # 512 tokens in 6 chunks, the last one partial
    try:
        ours = smollm.logits(prompt_ids)
    finally:
        smollm.engine.prefill_chunk_size = old
    assert (ours - ref).abs().max().item() < 1e-3


@pytest.mark.slow
def test_greedy_64_tokens_identical_to_transformers(smollm, smollm_hf, prompt_ids):
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=2)
    with torch.no_grad():
        ref = smollm_hf.generate(torch.tensor([prompt_ids]), generation_config=cfg)[0, len(prompt_ids):].tolist()
    out = smollm.generate([prompt_ids], SamplingParams(max_new_tokens=64, ignore_eos=True))[0]
    assert len(out.token_ids) == 64
    assert out.token_ids == ref


@pytest.mark.slow
def test_cli_capital_of_france():
    proc = subprocess.run([sys.executable, "-m", "offload", "generate", "The capital of France is",
                           "--max-new-tokens", "8", "--stats"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "decode" in proc.stderr and "tok/s" in proc.stderr


@pytest.mark.slow
def test_cli_reads_stdin():
    proc = subprocess.run([sys.executable, "-m", "offload", "generate", "--max-new-tokens", "4"],
                          input="The capital of France is", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


@pytest.mark.slow
def test_stream_equals_generate(smollm):
    params = SamplingParams(max_new_tokens=40)
    text = smollm.generate("Once upon a time, in a small village,", params)[0].text
    pieces = list(smollm.stream("Once upon a time, in a small village,", params))
    assert len(pieces) > 5
    assert "".join(pieces) == text


def test_stop_string(smollm):
    out = smollm.generate("The capital of France is", SamplingParams(max_new_tokens=32, stop=["."]))[0]
    assert out.finish_reason == "stop"
    assert out.text == " Paris"


def test_chat_template_and_eos(smollm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = smollm.tokenizer.apply_chat_template(messages)
    assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                        "<|im_start|>assistant\n")
    ids = smollm.tokenizer.encode(rendered, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|>, <|im_end|> are single special tokens
    out = smollm.generate("What is the capital of France?", SamplingParams(max_new_tokens=64), chat=True)[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended by <|im_end|>, which is not part of the text
    assert "<|im_end|>" not in out.text


@pytest.mark.slow
def test_batch_of_different_lengths(smollm):
    prompts = ["The capital of France is", "Water boils at a temperature of", "One, two, three, four,"]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batched = smollm.generate(prompts, params)
    for prompt, out in zip(prompts, batched):
        single = smollm.generate(prompt, params)[0]
        if out.token_ids != single.token_ids:
            # Batched and single runs use different GEMM shapes, so fp32 sums differ in the last bits;
            # they may only part ways where the two candidates' logits are a near-tie.
            i = next(i for i, (a, b) in enumerate(zip(out.token_ids, single.token_ids)) if a != b)
            logits = smollm.logits(single.prompt_token_ids + single.token_ids[:i])[-1]
            margin = (logits[single.token_ids[i]] - logits[out.token_ids[i]]).abs().item()
            assert margin < 1e-3, (prompt, i, margin)
    assert "Paris" in batched[0].text


@pytest.mark.slow
def test_seeded_sampling(smollm):
    p = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    a = smollm.generate("My favourite food is", p)[0].token_ids
    b = smollm.generate("My favourite food is", p)[0].token_ids
    c = smollm.generate("My favourite food is", SamplingParams(
        max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=99, ignore_eos=True))[0].token_ids
    assert a == b and a != c
    greedy = smollm.generate("My favourite food is", SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    top1 = smollm.generate("My favourite food is", SamplingParams(max_new_tokens=16, temperature=1.0, top_k=1,
                                                                  ignore_eos=True))[0]
    assert greedy.token_ids == top1.token_ids


def test_top_p_keeps_only_the_nucleus():
    from offload.sampling import Sampler

    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]])  # probs ~ .72, .26, .01, ...
    sampler = Sampler([SamplingParams(temperature=1.0, top_p=0.9, seed=0)], torch.device("cpu"))
    draws = {sampler(logits)[0] for _ in range(300)}
    assert draws == {0, 1}
