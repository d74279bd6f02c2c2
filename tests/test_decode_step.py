"""The bound single-row CPU decode step (offload.decode_step) against the model's generic forward:
the same kernels in the same order, so the logits must be equal bit for bit, for every weight form
and KV backend it runs beside; and the models it must not take keep the generic path."""

from __future__ import annotations

import pytest
import torch

from offload import LLM
from offload.attention import ForwardBatch
from offload.config import ModelArgs
from offload.model import Transformer


def _decode_logits(llm: LLM, prompts: list[list[int]], steps: int, bound: bool) -> torch.Tensor:
    """Prefill each prompt as its own cache row, then ``steps`` greedy decode steps of all rows
    together: their logits [steps, B, V], with the bound step or (bound=False) the generic forward."""
    model, backend = llm.model, llm.engine.backend
    step = model.decode_step
    backend.allocate(len(prompts), max(map(len, prompts)) + steps + 1)
    tokens = [int(llm.engine.prefill(row, prompt).argmax()) for row, prompt in enumerate(prompts)]
    lengths, out = [len(p) for p in prompts], []
    if not bound:
        model.decode_step = None
    try:
        for _ in range(steps):
            batch = ForwardBatch.decode(lengths, llm.device, tokens)
            with torch.inference_mode():
                logits = model(torch.tensor(tokens)[:, None], batch, backend)[:, -1]  # [B, V]
            out.append(logits)
            tokens, lengths = logits.argmax(-1).tolist(), batch.end_lengths
    finally:
        model.decode_step = step
    return torch.stack(out)


@pytest.mark.parametrize("family,settings", [
    ("llama", {}),
    ("llama", {"quantize": "int4"}),
    ("llama-tied", {"quantize": "int8"}),
    ("qwen2", {"quantize": "int4"}),  # the QKV bias
    ("mistral", {"quantize": "int4"}),  # a sliding window of 24 tokens, shorter than the context
    ("llama", {"quantize": "int4", "kv_dtype": "int8"}),
    ("llama", {"quantize": "int4", "kv_dtype": "int2"}),
    ("llama", {"quantize": "int4", "kv_policy": "quest", "kv_budget": 0.25, "dense_layers": 0}),
    ("llama", {"quantize": "int4", "kv_policy": "streaming", "window": 8, "sink": 2, "dense_layers": 1}),
])
def test_bound_step_equals_generic_forward(tiny_models, family, settings):
    folder, _ = tiny_models[family]
    llm = LLM(folder, dtype="bfloat16", max_context=128, verbose=False, **settings)
    assert llm.model.decode_step is not None
    prompt = [(7 * i + 3) % 290 + 3 for i in range(40)]
    generic = _decode_logits(llm, [prompt], 6, bound=False)
    bound = _decode_logits(llm, [prompt], 6, bound=True)
    assert torch.isfinite(bound).all()
    assert torch.equal(bound, generic), (bound - generic).abs().max()


@pytest.mark.parametrize("settings", [{}, {"kv_policy": "quest", "kv_budget": 0.25, "dense_layers": 0}])
def test_bound_step_of_several_rows_of_different_lengths(tiny_models, settings):
    """Three sequences of different lengths decoding together (generate on three prompts, a server
    step): each row's logits as the generic forward gives them."""
    llm = LLM(tiny_models["llama"][0], dtype="bfloat16", quantize="int4", max_context=128, verbose=False, **settings)
    prompts = [[(5 * i + r) % 290 + 3 for i in range(n)] for r, n in enumerate((40, 23, 57))]
    generic = _decode_logits(llm, prompts, 5, bound=False)
    bound = _decode_logits(llm, prompts, 5, bound=True)
    assert bound.shape[1] == 3 and torch.equal(bound, generic), (bound - generic).abs().max()


def test_models_the_step_does_not_take_keep_the_generic_path(tiny_models):
    fp32 = LLM(tiny_models["llama"][0], dtype="float32", max_context=64, verbose=False)
    assert fp32.model.decode_step is None  # fp32 keeps torch's ops (transformers' numbers bit for bit)
    qk_norm = LLM(tiny_models["qwen3"][0], dtype="bfloat16", max_context=64, verbose=False)
    assert qk_norm.model.decode_step is None
    args = ModelArgs(architecture="llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    streamed = Transformer(args, "cpu", torch.bfloat16, offloaded=frozenset({1}))
    streamed.bind_decode_step()
    assert streamed.decode_step is None
    resident = Transformer(args, "cpu", torch.bfloat16)
    resident.bind_decode_step()
    assert resident.decode_step is not None


def test_default_model_greedy_tokens_unchanged(smollm_path):
    """The default model as the README runs it (int4 projections, bf16): 24 greedy steps after a
    prompt give the generic path's logits exactly."""
    llm = LLM(smollm_path, verbose=False)
    assert llm.model.decode_step is not None
    prompt = llm.tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    generic = _decode_logits(llm, [prompt], 24, bound=False)
    bound = _decode_logits(llm, [prompt], 24, bound=True)
    assert torch.equal(bound, generic)
