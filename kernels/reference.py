"""Plain-torch decode-attention operations: the CPU path and the oracle for the Triton kernels.

Conventions (one decode query per sequence):
  q            [B, H, D]          H query heads, G = H / Hkv heads per KV head
  k_cache      [B, Hkv, N, D]     keys after RoPE (gather attention)
  v_cache      [B, Hkv, N, D]
  selected     [B, Hkv, S] int    token ids chosen by an index, one list per KV head
  num_selected [B, Hkv] int       how many leading entries of ``selected`` are valid (<= S)
  seq_lens     [B] int            tokens in each sequence's cache

The dense part of every step, ``sink`` first tokens and the ``window`` most recent ones, is
attended without being listed: entry j < sink + window of the virtual list is token j (a sink)
or seq_len - window + (j - sink) (the window), clipped to the sequence. Selected ids must lie
outside the dense part, so nothing is counted twice (the indexes guarantee it).

Every function returns ``(out [B, H, D], lse [B, H])``, lse being the natural log-sum-exp of the
scaled scores (fp32), so that partial results over disjoint key sets merge exactly with
:func:`merge_attention_ref`. An empty key set gives out = 0 and lse = -inf.
"""

from __future__ import annotations

import torch

# The int8 KV convention, one place for the tensor quantizer (offload.tiers.kv_codec.quantize_kv) and
# the compiled writer (cpu_decode.store_int8_tokens): codes in -KV_CODE_MAX..KV_CODE_MAX (symmetric),
# scale = max|x| / KV_CODE_MAX and at least KV_SCALE_FLOOR, so an all-zero vector divides by something.
KV_CODE_MAX = 127
KV_SCALE_FLOOR = 1e-8
# torch's fused int4 kernel's codes are centred: w = (q - INT4_MID) * scale + zero, q in 0..15 (one place
# for the quantizer, offload.quant, and the unpacker, cpu_quant.int4_dequantize_t).
INT4_MID = 8


def dense_token_ids(seq_lens: torch.Tensor, sink: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids [B, sink + window] of the always-attended tokens and their validity mask [B, sink + window].

    A short sequence has fewer than sink + window tokens; the overlap of sink and window is
    dropped so that every token appears at most once.
    """
    j = torch.arange(sink + window, device=seq_lens.device)  # [Nd]
    n = seq_lens[:, None].to(torch.int64)  # [B, 1]
    n_sink = torch.clamp(n, max=sink)  # [B, 1] sinks that exist
    win_start = torch.maximum(n - window, n_sink)  # [B, 1] window never re-covers a sink
    ids = torch.where(j < sink, j, win_start + (j - sink))  # [B, Nd]
    valid = torch.where(j < sink, j < n_sink, ids < n)  # [B, Nd]
    return torch.where(valid, ids, 0), valid


def _attend_listed(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, D]; keys/values [B, Hkv, M, D]; valid [B, Hkv, M] -> out [B, H, D], lse [B, H].
    Computed in fp32 (the listed rows are a copy already: widening them is cheap, and bf16 matmuls
    on a CPU run at a fraction of fp32's speed)."""
    B, H, D = q.shape
    Hkv = keys.shape[1]
    qg = q.float().view(B, Hkv, H // Hkv, D)  # [B, Hkv, G, D]
    keys, values = keys.float(), values.float()  # [B, Hkv, M, D]
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * scale  # [B, Hkv, G, M]
    scores.masked_fill_(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G]
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, 0.0)[..., None])  # [B, Hkv, G, M]
    out = torch.matmul(probs, values)  # [B, Hkv, G, D]
    out = torch.where(finite[..., None], out, 0.0)
    return out.view(B, H, D).to(q.dtype), lse.view(B, H)


def gather_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         selected: torch.Tensor, num_selected: torch.Tensor, seq_lens: torch.Tensor,
                         scale: float, sink: int = 0, window: int = 0, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the dense part plus the selected tokens of each KV head. An int8 cache
    (codes) comes with its per-token scales k_scale/v_scale [B, Hkv, N]: the gathered rows are
    dequantized."""
    B, Hkv, N, D = k_cache.shape
    S = selected.shape[-1]
    dense_ids, dense_valid = dense_token_ids(seq_lens, sink, window)  # [B, Nd]
    ids = torch.cat([dense_ids[:, None].expand(B, Hkv, -1), selected.to(torch.int64)], dim=-1)  # [B, Hkv, M]
    sel_valid = torch.arange(S, device=q.device) < num_selected[..., None]  # [B, Hkv, S]
    valid = torch.cat([dense_valid[:, None].expand(B, Hkv, -1), sel_valid], dim=-1)  # [B, Hkv, M]
    ids = torch.where(valid, ids, 0)  # invalid slots read token 0, then are masked out
    keys = gather_rows(k_cache, ids)  # [B, Hkv, M, D]
    values = gather_rows(v_cache, ids)  # [B, Hkv, M, D]
    if k_scale is not None:
        keys = keys.float() * gather_rows(k_scale[..., None], ids).float()  # [B, Hkv, M, D] x [B, Hkv, M, 1]
        values = values.float() * gather_rows(v_scale[..., None], ids).float()
        out, lse = _attend_listed(q.float(), keys, values, valid, scale)
        return out.to(q.dtype), lse
    return _attend_listed(q, keys, values, valid, scale)


def gather_rows(cache: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """cache [B, Hkv, N, D], ids [B, Hkv, M] -> cache rows [B, Hkv, M, D].

    One index_select on the flattened (B*Hkv*N, D) view: a row copy per id. On CPU this is ~15x
    faster than advanced indexing and far faster than torch.gather with an index expanded over D.
    """
    B, Hkv, N, D = cache.shape
    base = (torch.arange(B * Hkv, device=ids.device) * N).view(B, Hkv, 1)  # [B, Hkv, 1]
    flat = cache.reshape(B * Hkv * N, D) if cache.is_contiguous() else cache.flatten(0, 2)
    return torch.index_select(flat, 0, (ids.to(torch.int64) + base).view(-1)).view(B, Hkv, -1, D)


def dense_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over every cached token (the full-cache baseline)."""
    N = k_cache.shape[2]
    valid = torch.arange(N, device=q.device) < seq_lens[:, None, None]  # [B, 1, N]
    return _attend_listed(q, k_cache, v_cache, valid.expand(-1, k_cache.shape[1], -1), scale)


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                attention_scaling: float = 1.0) -> torch.Tensor:
    """Rotate-half RoPE of x [..., M, D] (fp32) at integer positions [..., M]."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [..., M, D/2]
    cos, sin = freqs.cos() * attention_scaling, freqs.sin() * attention_scaling
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def shadowkv_attention_ref(q: torch.Tensor, u: torch.Tensor, sv: torch.Tensor, v_selected: torch.Tensor,
                           selected: torch.Tensor, num_selected: torch.Tensor, inv_freq: torch.Tensor,
                           scale: float, attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over selected tokens whose keys are rebuilt from low-rank pre-RoPE factors.

    u [B, N, R] and sv [B, R, Hkv*D] factor the pre-RoPE keys of all KV heads (ShadowKV keeps
    them on the device); the selected token's key is ``u[t] @ sv`` sliced to its head, rotated at
    position t. v_selected [B, Hkv, S, D] holds the selected tokens' values in selection order
    (fed from host memory).
    """
    B, Hkv, S = selected.shape
    D = v_selected.shape[-1]
    ids = selected.to(torch.int64)
    valid = torch.arange(S, device=q.device) < num_selected[..., None]  # [B, Hkv, S]
    ids = torch.where(valid, ids, 0)
    rows = gather_rows(u[:, None], ids.reshape(B, 1, Hkv * S)).view(B, Hkv, S, -1)  # [B, Hkv, S, R]
    sv_heads = sv.view(B, sv.shape[1], Hkv, D).permute(0, 2, 1, 3)  # [B, Hkv, R, D]
    keys_pre = torch.matmul(rows.float(), sv_heads.float())  # [B, Hkv, S, D]
    keys = rope_rotate(keys_pre, ids, inv_freq, attention_scaling).to(q.dtype)  # [B, Hkv, S, D]
    return _attend_listed(q, keys, v_selected, valid, scale)


def merge_attention_ref(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of P disjoint key sets.

    outs [P, B, H, D] (any float dtype, e.g. one part computed on the CPU and moved over),
    lses [P, B, H] fp32 -> out [B, H, D] in outs' dtype, lse [B, H].
    """
    lse = torch.logsumexp(lses.float(), dim=0)  # [B, H]
    finite = torch.isfinite(lse)
    weights = torch.exp(lses.float() - torch.where(finite, lse, 0.0))  # [P, B, H]
    weights = torch.where(torch.isfinite(lses), weights, 0.0)
    out = (weights[..., None] * outs.float()).sum(dim=0)  # [B, H, D]
    return out.to(outs.dtype), lse


def kv_decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                            scale: float, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, D] over a KV cache k/v [B, Hkv, N, D]: row b sees tokens lo[b]..hi[b]-1.
    An int8 cache is dequantized by its per-token scales [B, Hkv, N]; everything is widened to fp32,
    then attended (the oracle of the CPU kernels)."""
    keys, values = k.float(), v.float()  # [B, Hkv, N, D]
    if k_scale is not None:
        keys = keys * k_scale.float()[..., None]
        values = values * v_scale.float()[..., None]
    t = torch.arange(k.shape[2], device=q.device)  # [N]
    valid = (t >= lo[:, None]) & (t < hi[:, None])  # [B, N]
    out, lse = _attend_listed(q.float(), keys, values, valid[:, None, :].expand(-1, k.shape[1], -1), scale)
    return out.to(q.dtype), lse


def dequantize_int8_groups(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes [..., K] int8 times scales [..., G] (one per group of K / G consecutive columns) -> fp32 [..., K]."""
    group = codes.shape[-1] // scales.shape[-1]
    return codes.float() * scales.float().repeat_interleave(group, dim=-1)


def int8_group_linear_ref(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W^T in fp32 for W = codes [N, K] int8 * scales [N, G] (one scale per group of
    K / G consecutive columns of a row): dequantize, then multiply (the oracle of the CPU kernel)."""
    return x.float() @ dequantize_int8_groups(codes, scales).t()  # [M, N]


def pack_int4_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes [N, K] (0..15, any integer dtype) -> the nibbles layout, uint8 [N, K/2]: byte j of a
    row holds the codes of inputs 2j (low nibble) and 2j + 1 (high nibble)."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)  # [N, K/2]


def unpack_int4_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The nibbles layout uint8 [N, K/2] -> codes uint8 [N, K] in 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)  # [N, K]


def int4_nibbles_dequantize(packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """The nibbles layout uint8 [N, K/2] with scale and zero [G, N, 2] -> W [N, K] in fp32:
    w = (q - INT4_MID) * scale + zero per group of K / G consecutive inputs of a row."""
    codes = unpack_int4_nibbles(packed).float()  # [N, K]
    N, K = codes.shape
    G = scales_zeros.shape[0]
    scale, zero = scales_zeros.float().permute(1, 0, 2).unbind(-1)  # [N, G] each
    return ((codes.view(N, G, K // G) - INT4_MID) * scale[..., None] + zero[..., None]).view(N, K)


def int4_nibbles_linear_ref(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W^T in fp32 for an int4 weight in the nibbles layout: dequantize, then multiply (the
    oracle of the Triton kernel)."""
    return x.float() @ int4_nibbles_dequantize(packed, scales_zeros).t()  # [M, N]
