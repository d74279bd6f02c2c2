"""Our runtime against transformers on tiny random Llama / Mistral / Qwen2 / Qwen3 folders (fp32)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES
from transformers import GenerationConfig

from offload import LLM, SamplingParams
from offload.attention import ForwardBatch

PROMPT_LEN, DECODE_STEPS = 40, 12


def _tokens(vocab: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_logits_match_transformers(tiny_models, family):
    folder, hf = tiny_models[family]
    llm = LLM(folder, device="cpu", dtype="float32", prefill_chunk_size=16)
    ids = _tokens(hf.config.vocab_size, PROMPT_LEN + DECODE_STEPS, seed=1)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]  # [T, V]
    ours = llm.logits(ids)  # [T, V] through 3 prefill chunks
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decode_steps_match_transformers(tiny_models, family):
    """Prefill a prompt, then decode token by token: each step's logits equal the full forward's."""
    folder, hf = tiny_models[family]
    llm = LLM(folder, device="cpu", dtype="float32")
    ids = _tokens(hf.config.vocab_size, PROMPT_LEN + DECODE_STEPS, seed=2)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]  # [T, V]
    llm.backend.allocate(1, len(ids))
    step_logits = [llm.engine.prefill(0, ids[:PROMPT_LEN])]
    for n in range(PROMPT_LEN, len(ids) - 1):
        batch = ForwardBatch.decode([n], llm.device)
        step_logits.append(llm.model(torch.tensor([[ids[n]]]), batch, llm.backend)[0, -1])
    ours = torch.stack(step_logits)  # [DECODE_STEPS, V]
    assert (ours - ref[PROMPT_LEN - 1:-1]).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_matches_transformers(tiny_models, family):
    folder, hf = tiny_models[family]
    llm = LLM(folder, device="cpu", dtype="float32", prefill_chunk_size=8)
    ids = _tokens(hf.config.vocab_size, 30, seed=3)
    with torch.no_grad():
        cfg = GenerationConfig(max_new_tokens=20, do_sample=False, eos_token_id=2, pad_token_id=0)
        ref = hf.generate(torch.tensor([ids]), generation_config=cfg)[0, len(ids):].tolist()
    out = llm.generate([ids], SamplingParams(max_new_tokens=20))[0]
    if ref[-1] == 2:  # transformers keeps the EOS token; we report it as finish_reason="stop"
        ref = ref[:-1]
        assert out.finish_reason == "stop"
    assert out.token_ids == ref


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_prefill_equals_one_shot(tiny_models, chunk):
    folder, hf = tiny_models["qwen2"]
    ids = _tokens(hf.config.vocab_size, 150, seed=4)
    one_shot = LLM(folder, device="cpu", dtype="float32", prefill_chunk_size=1024).logits(ids)
    chunked = LLM(folder, device="cpu", dtype="float32", prefill_chunk_size=chunk).logits(ids)
    assert (one_shot - chunked).abs().max().item() < 5e-5


def test_long_prompt_prefill_blocks_scores(tiny_models, monkeypatch):
    """With a tiny score budget the masked prefill (a prompt past the sliding window: the CPU's
    causal path does not apply) splits queries into many blocks and stays exact."""
    import offload.indexes.dense as attention

    folder, hf = tiny_models["mistral"]  # window 24, 100 tokens
    ids = _tokens(hf.config.vocab_size, 100, seed=5)
    llm = LLM(folder, device="cpu", dtype="float32", prefill_chunk_size=64)
    ref = llm.logits(ids)
    monkeypatch.setattr(attention, "PREFILL_SCORE_BYTES", 4 * 4 * 100 * 3)  # 3 query rows per block
    assert (llm.logits(ids) - ref).abs().max().item() < 5e-5


def test_batch_of_different_lengths_equals_single_runs(tiny_models):
    folder, hf = tiny_models["mistral"]
    llm = LLM(folder, device="cpu", dtype="float32")
    prompts = [_tokens(hf.config.vocab_size, n, seed=10 + n) for n in (5, 33, 17)]
    params = SamplingParams(max_new_tokens=15, ignore_eos=True)
    batched = [o.token_ids for o in llm.generate(prompts, params)]
    single = [llm.generate([p], params)[0].token_ids for p in prompts]
    assert batched == single


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
@pytest.mark.parametrize("kv_policy", ["dense", "quest"])
def test_mixed_call_equals_separate_calls(tiny_models, family, kv_policy):
    """A MixedBatch (a decode step of rows of different lengths with two prompts laid beside it, as
    the server batches them) gives the logits of a decode call and two prefill calls, and leaves
    the same KV behind."""
    from offload.attention import MixedBatch

    folder, hf = tiny_models[family]
    V = hf.config.vocab_size
    kw = {} if kv_policy == "dense" else dict(kv_policy=kv_policy, kv_budget=16, dense_layers=1)
    lengths = [30, 7]  # rows 0, 1 decode; rows 2, 3 take prompts (mistral's window is 24)
    prompts = [_tokens(V, n, seed=20 + n) for n in (9, 26)]
    step = _tokens(V, 2, seed=31)

    def run(mixed: bool):
        llm = LLM(folder, device="cpu", dtype="float32", max_context=64, verbose=False, **kw)
        engine, backend, model = llm.engine, llm.backend, llm.engine.model
        backend.allocate(4, 64)
        for row, n in enumerate(lengths):  # rows 0, 1: prompts already in flight
            engine.prefill(row, _tokens(V, n, seed=row))
            backend.build_indexes(row, n)
        decode = ForwardBatch.decode(lengths, model.device, step)
        prefills = [ForwardBatch.prefill(2 + i, 0, len(p), model.device, p) for i, p in enumerate(prompts)]
        if mixed:
            tokens = torch.tensor([step + prompts[0] + prompts[1]])  # [1, N]
            logits = model(tokens, MixedBatch.of(decode, prefills), backend)[0]  # [4, V]
        else:
            logits = torch.cat([model(torch.tensor(step)[:, None], decode, backend)[:, -1]] +
                               [model(torch.tensor([p]), b, backend)[:, -1] for p, b in zip(prompts, prefills)])
        filled = [n + 1 for n in lengths] + [len(p) for p in prompts]  # tokens cached per row
        kv = backend.kv
        rows = [(kv.k[layer][row, :, :n], kv.v[layer][row, :, :n])
                for layer in range(hf.config.num_hidden_layers) for row, n in enumerate(filled)]
        return logits, rows

    (mixed, kv_mixed), (separate, kv_separate) = run(True), run(False)
    assert mixed.shape == (4, V) and torch.isfinite(mixed).all()
    assert (mixed - separate).abs().max().item() < 1e-4
    for (k1, v1), (k2, v2) in zip(kv_mixed, kv_separate):
        assert (k1 - k2).abs().max().item() < 1e-5 and (v1 - v2).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("start", [0, 1, 37, 300])
@pytest.mark.parametrize("T,H,Hkv", [(1, 4, 4), (5, 6, 2), (64, 9, 3)])
def test_causal_prefill_attention_matches_masked_softmax(dtype, tol, start, T, H, Hkv):
    """The CPU prefill's two flash calls merged by log-sum-exp = softmax over every key up to each
    query's position (float64), and a query with a NaN comes out NaN, the others untouched."""
    from offload.attention import causal_prefill_attention

    g = torch.Generator().manual_seed(start * 100 + T)
    D, N = 32, start + T
    q, k, v = (torch.randn(1, h, n, D, generator=g).to(dtype) for h, n in ((H, T), (Hkv, N), (Hkv, N)))
    got = causal_prefill_attention(q, k, v, start, 0.3)  # [1, H, T, D]
    group = H // Hkv
    scores = torch.einsum("htd,hnd->htn", q[0].double(), k[0].double().repeat_interleave(group, 0)) * 0.3
    visible = torch.arange(N)[None, :] <= torch.arange(start, N)[:, None]  # [T, N]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    want = torch.einsum("htn,hnd->htd", probs, v[0].double().repeat_interleave(group, 0))
    assert got.shape == q.shape and got.dtype == dtype
    assert (got[0].double() - want).abs().max().item() < tol
    q[0, H - 1, T - 1, 0] = float("nan")
    poisoned = causal_prefill_attention(q, k, v, start, 0.3)
    assert poisoned[0, H - 1, T - 1].isnan().all()
    assert torch.equal(poisoned[0, :H - 1], got[0, :H - 1])
