"""Prompt caching: KV + index structures saved, verified and restored; output equal to a fresh run."""

import pytest
import torch

from offload import LLM, SamplingParams
from offload.errors import InvalidRequestError, OffloadError
from offload.tiers.store import CorruptStoreError, write_store

GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


def _ids(hf, n, seed=0):
    return torch.randint(3, hf.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("policy", ["dense", "retrieval", "shadowkv", "sentence", "quest", "cluster"])
def test_cached_prompt_generates_what_a_fresh_run_does(tiny_models, tmp_path, policy):
    """A prompt of whole Quest pages (96 = 6 x 16): decode goes past what the saved index was sized for."""
    folder, hf = tiny_models["qwen2"]
    kw = {} if policy == "dense" else dict(kv_budget=6, sink=2, window=4, dense_layers=1, telemetry=True)
    llm = LLM(folder, kv_policy=policy, **kw)
    prompt = _ids(hf, 96)
    fresh = llm.generate([prompt], GREEDY)[0].token_ids
    fresh_indexes = dict(llm.backend.indexes) if policy != "dense" else {}
    path = LLM(folder, kv_policy=policy, **kw).save_prompt(prompt, tmp_path / "p.cache")  # sized for the prompt
    reloaded = LLM(folder, kv_policy=policy, **kw)  # a new process would start here
    cached = reloaded.generate([prompt], GREEDY, prompt_cache=path)[0].token_ids
    assert cached == fresh
    assert reloaded.stats.prompt_tokens == 96
    if policy != "dense":  # the selections came from the restored indexes, equal to freshly built ones
        assert reloaded.backend.indexes.keys() == fresh_indexes.keys()
        assert reloaded.telemetry.summary()["mass"] == pytest.approx(llm.telemetry.summary()["mass"], abs=1e-6)


def test_cached_prefix_prefills_only_the_rest(tiny_models, tmp_path, monkeypatch):
    folder, hf = tiny_models["llama"]
    llm = LLM(folder)
    prefix, question = _ids(hf, 70), _ids(hf, 9, seed=1)
    path = llm.save_prompt(prefix, tmp_path / "book.cache")
    fresh = LLM(folder).generate([prefix + question], GREEDY)[0].token_ids
    prefilled = []
    original = llm.engine.prefill
    monkeypatch.setattr(llm.engine, "prefill", lambda row, ids, all_logits=False, begin=0: (
        prefilled.append(len(ids) - begin), original(row, ids, all_logits, begin))[1])
    assert llm.generate([prefix + question], GREEDY, prompt_cache=path)[0].token_ids == fresh
    assert prefilled == [9]


def test_prompt_cache_is_verified(tiny_models, tmp_path):
    folder, hf = tiny_models["qwen2"]
    llm = LLM(folder, kv_policy="retrieval", kv_budget=6, sink=2, window=4, dense_layers=1)
    prompt = _ids(hf, 80)
    path = llm.save_prompt(prompt, tmp_path / "p.cache")
    with pytest.raises(InvalidRequestError, match="different settings"):
        LLM(folder, kv_policy="retrieval", kv_budget=8, sink=2, window=4, dense_layers=1).generate(
            [prompt], GREEDY, prompt_cache=path)
    with pytest.raises(InvalidRequestError, match="different fingerprint"):
        LLM(tiny_models["llama"][0], kv_policy="retrieval", kv_budget=6, sink=2, window=4, dense_layers=1).generate(
            [prompt], GREEDY, prompt_cache=path)
    with pytest.raises(InvalidRequestError, match="does not start with the cached prompt"):
        llm.generate([prompt[1:] + [5]], GREEDY, prompt_cache=path)
    with pytest.raises(InvalidRequestError, match="not found"):
        llm.generate([prompt], GREEDY, prompt_cache=tmp_path / "missing.cache")
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # inside the K tensor
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="tensor 'k/0' extent 0"):
        llm.generate([prompt], GREEDY, prompt_cache=path)
    old = write_store(tmp_path / "old.cache", {"k": torch.zeros(2)}, metadata={"format": "offload-prompt-cache/1"})
    with pytest.raises(OffloadError, match=r"not a prompt cache of this version \(offload-prompt-cache/1, this one "
                                           r"reads offload-prompt-cache/3\): save it again with LLM.save_prompt"):
        llm.generate([prompt], GREEDY, prompt_cache=old)
    with pytest.raises(OffloadError, match="cannot be saved"):
        LLM(folder, kv_policy="hnsw", kv_budget=6, sink=2, window=4, dense_layers=1).save_prompt(
            prompt, tmp_path / "h.cache")
