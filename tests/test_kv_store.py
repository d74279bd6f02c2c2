"""The KV store: writes land in each layer's tier, reads and gathers return the right rows and
count the bytes that cross to the device, prompt-cache prefixes round-trip."""

from __future__ import annotations

import pytest
import torch

from offload.attention import ForwardBatch
from offload.config import ModelArgs
from offload.tiers.kv_store import KVStore

ARGS = ModelArgs(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                 num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-5,
                 rope_theta=10000.0)
CPU = torch.device("cpu")


def _filled(host_layers=(), kv_dtype=None) -> tuple[KVStore, torch.Tensor, torch.Tensor]:
    store = KVStore(ARGS, CPU, torch.float32, host_layers=host_layers, kv_dtype=kv_dtype)
    store.allocate(2, 32)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(ARGS.num_layers, 2, 2, 20, 8, generator=g)  # [L, B, Hkv, T, D]
    v = torch.randn(ARGS.num_layers, 2, 2, 20, 8, generator=g)
    for row in range(2):
        batch = ForwardBatch.prefill(row, 0, 20, CPU)
        for layer in range(ARGS.num_layers):
            store.write(layer, k[layer, row:row + 1], v[layer, row:row + 1], batch)
    return store, k, v


def test_prefill_and_decode_writes_land_at_their_positions():
    store, k, v = _filled()
    assert torch.equal(store.k[1][0, :, :20], k[1, 0]) and torch.equal(store.v[2][1, :, :20], v[2, 1])
    # rows at different lengths: each row's token goes to its own position
    new_k, new_v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)  # [B, Hkv, 1, D]
    store.write(0, new_k, new_v, ForwardBatch.decode([20, 7], CPU))
    assert torch.equal(store.k[0][0, :, 20], new_k[0, :, 0]) and torch.equal(store.k[0][1, :, 7], new_k[1, :, 0])
    assert torch.equal(store.v[0][1, :, 7], new_v[1, :, 0])


def test_read_and_gather_return_the_rows_asked_for():
    store, k, _ = _filled(host_layers=[1, 2])
    keys, values = store.read(2, slice(0, 1), 5, 20)  # [1, Hkv, 15, D]
    assert torch.equal(keys[0], k[2, 0, :, 5:20])
    ids = torch.tensor([[[0, 3, 19, -1], [2, 2, 5, 1]]] * 2)  # [B, Hkv, M]; -1 is padding
    k_rows, _ = store.gather(1, ids)  # [B, Hkv, M, D]
    for b in range(2):
        for h in range(2):
            expected = k[1, b, h, ids[b, h].clamp(min=0)]  # [M, D]
            assert torch.equal(k_rows[b, h], expected)
    # the two staging buffers (alternating) are reused: narrower gathers do not allocate again
    store.gather(1, ids)
    buffers = [s.data_ptr() for s in store._staging.slots]
    store.gather(1, ids[:, :, :2])
    store.gather(1, ids[:, :, :3])
    assert [s.data_ptr() for s in store._staging.slots] == buffers


def test_prefix_round_trips_into_each_tier():
    store, k, v = _filled(host_layers=[2])
    prefix = [store.layer_prefix(layer, 1, 12) for layer in range(ARGS.num_layers)]  # [Hkv, 12, D] each
    assert all(pk.shape == (2, 12, 8) and torch.equal(pk, k[layer, 1, :, :12]) for layer, (pk, _) in enumerate(prefix))
    other = KVStore(ARGS, CPU, torch.float32, host_layers=[2])
    other.allocate(2, 32)
    for layer, (pk, pv) in enumerate(prefix):
        other.restore_layer(layer, 0, pk, pv)
    assert torch.equal(other.k[2][0, :, :12], k[2, 1, :, :12]) and torch.equal(other.v[0][0, :, :12], v[0, 1, :, :12])
    assert not other.k[2][0, :, 12:].any()


def test_nbytes_by_tier_and_bad_layers():
    store, _, _ = _filled(host_layers=[0])
    per_layer = 2 * 2 * 2 * 32 * 8 * 4  # K and V of [B=2, Hkv=2, N=32, D=8] fp32
    assert store.nbytes() == 3 * per_layer
    with pytest.raises(ValueError, match="beyond the model"):
        KVStore(ARGS, CPU, torch.float32, host_layers=[3])
