"""Triton kernels for sparse decode attention (GPU; on CPU only under TRITON_INTERPRET=1).

Import this module only after deciding on the backend: Triton reads TRITON_INTERPRET at import.
Each kernel has the same contract as its reference in :mod:`offload.kernels.reference`.

Work split (flash-decoding / split-K): one program per (sequence, KV head, split); a split walks
its slice of the key list in blocks of BLOCK_N with an online softmax and writes a partial
(out, lse); :func:`merge_kernel` then combines the splits, so a single query still fills the GPU.
The G query heads of a KV head share each K/V block read (grouped-query aware), padded to
BLOCK_G >= 16 rows for ``tl.dot``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_common import INTERPRET, dot

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); exp2 is the hardware instruction
BLOCK_N = 64 if not INTERPRET else 16  # keys per block; small under the interpreter (speed)
# Tests set this: fresh buffers are filled with NaN so an element a kernel fails to write shows.
POISON = False


def _alloc(shape, dtype, device) -> torch.Tensor:
    buf = torch.empty(shape, device=device, dtype=dtype)
    return buf.fill_(float("nan")) if POISON else buf


@triton.jit
def _online_softmax_step(scores, v, m_i, l_i, acc, FP32: tl.constexpr):
    """One block of an online softmax. scores [G, N] (log2 units, -inf where masked), v [N, D]."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # [G]
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked row stays all-zero
    alpha = tl.exp2(m_i - m_safe)  # [G]
    p = tl.exp2(scores - m_safe[:, None])  # [G, N]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, FP32)  # [G, D]
    return m_new, l_i, acc


@triton.jit
def _write_partial(out_ptr, lse_ptr, b, h, split, m_i, l_i, acc, offs_g, offs_d,
                   s_ob, s_oh, s_os, s_lb, s_lh, s_ls, G: tl.constexpr):
    """Store one split's normalised output [G, D] and natural-log lse [G]."""
    heads = h * G + offs_g  # [BLOCK_G] query heads of this KV head
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
    g_ok = offs_g < G
    tl.store(out_ptr + b * s_ob + heads[:, None] * s_oh + split * s_os + offs_d[None, :], out,
             mask=g_ok[:, None])
    tl.store(lse_ptr + b * s_lb + heads * s_lh + split * s_ls, lse, mask=g_ok)


@triton.jit
def gather_attention_kernel(
        q_ptr, k_ptr, v_ptr, sel_ptr, nsel_ptr, lens_ptr, out_ptr, lse_ptr,
        s_qb, s_qh, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_sb, s_sh, s_nb,
        s_ob, s_oh, s_os, s_lb, s_lh, s_ls,
        num_kv_heads, split_len, total_len, sm_scale_log2,
        SINK: tl.constexpr, WINDOW: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
        D: tl.constexpr, BLOCK_N: tl.constexpr, FP32: tl.constexpr):
    pid_bh, split = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // num_kv_heads, pid_bh % num_kv_heads
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + b * s_qb + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :],
                mask=(offs_g < G)[:, None], other=0.0)  # [BLOCK_G, D]
    seq_len = tl.load(lens_ptr + b)
    n_sel = tl.load(nsel_ptr + b * s_nb + h)
    n_sink = tl.minimum(seq_len, SINK)
    win_start = tl.maximum(seq_len - WINDOW, n_sink)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, total_len)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + offs_n  # [BLOCK_N] positions in the virtual list: dense part, then selection
        is_dense = j < SINK + WINDOW
        dense_id = tl.where(j < SINK, j, win_start + (j - SINK))
        dense_ok = tl.where(j < SINK, j < n_sink, dense_id < seq_len)
        s_pos = j - (SINK + WINDOW)
        sel_ok = (~is_dense) & (s_pos < n_sel) & (j < end)
        sel_id = tl.load(sel_ptr + b * s_sb + h * s_sh + s_pos, mask=sel_ok, other=0)
        tok = tl.where(is_dense, dense_id, sel_id).to(tl.int64)
        ok = tl.where(is_dense, dense_ok, sel_ok) & (j < end)
        k = tl.load(k_ptr + b * s_kb + h * s_kh + tok[:, None] * s_kn + offs_d[None, :],
                    mask=ok[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_ptr + b * s_vb + h * s_vh + tok[:, None] * s_vn + offs_d[None, :],
                    mask=ok[:, None], other=0.0)  # [BLOCK_N, D]
        scores = dot(q, tl.trans(k), FP32) * sm_scale_log2  # [BLOCK_G, BLOCK_N]
        scores = tl.where(ok[None, :], scores, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(scores, v, m_i, l_i, acc, FP32)
    _write_partial(out_ptr, lse_ptr, b, h, split, m_i, l_i, acc, offs_g, offs_d,
                   s_ob, s_oh, s_os, s_lb, s_lh, s_ls, G)


@triton.jit
def shadowkv_attention_kernel(
        q_ptr, u_ptr, sv_ptr, v_ptr, sel_ptr, nsel_ptr, freq_ptr, out_ptr, lse_ptr,
        s_qb, s_qh, s_ub, s_un, s_svb, s_svr, s_vb, s_vh, s_vn, s_sb, s_sh, s_nb,
        s_ob, s_oh, s_os, s_lb, s_lh, s_ls,
        num_kv_heads, rank, split_len, total_len, sm_scale_log2, rope_scaling,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr, FP32: tl.constexpr):
    pid_bh, split = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // num_kv_heads, pid_bh % num_kv_heads
    HALF: tl.constexpr = D // 2
    offs_g = tl.arange(0, BLOCK_G)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    q_rows = q_ptr + b * s_qb + (h * G + offs_g)[:, None] * s_qh
    g_ok = (offs_g < G)[:, None]
    q1 = tl.load(q_rows + offs_h[None, :], mask=g_ok, other=0.0)  # [BLOCK_G, D/2]
    q2 = tl.load(q_rows + HALF + offs_h[None, :], mask=g_ok, other=0.0)  # [BLOCK_G, D/2]
    inv_freq = tl.load(freq_ptr + offs_h)  # [D/2] fp32
    r_ok = offs_r < rank
    sv_cols = sv_ptr + b * s_svb + offs_r[:, None] * s_svr + h * D + offs_h[None, :]
    sv1 = tl.load(sv_cols, mask=r_ok[:, None], other=0.0)  # [BLOCK_R, D/2] first half of the head
    sv2 = tl.load(sv_cols + HALF, mask=r_ok[:, None], other=0.0)  # [BLOCK_R, D/2] second half
    n_sel = tl.load(nsel_ptr + b * s_nb + h)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    start = split * split_len
    end = tl.minimum(tl.minimum(start + split_len, total_len), n_sel)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + offs_n
        ok = j < end
        tok = tl.load(sel_ptr + b * s_sb + h * s_sh + j, mask=ok, other=0).to(tl.int64)  # [BLOCK_N]
        u = tl.load(u_ptr + b * s_ub + tok[:, None] * s_un + offs_r[None, :],
                    mask=ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
        # Pre-RoPE key halves, rebuilt in registers: never written to global memory.
        k1 = dot(u, sv1, FP32)  # [BLOCK_N, D/2] fp32
        k2 = dot(u, sv2, FP32)  # [BLOCK_N, D/2] fp32
        angle = tok.to(tl.float32)[:, None] * inv_freq[None, :]  # [BLOCK_N, D/2] at the true position
        cos = tl.cos(angle) * rope_scaling
        sin = tl.sin(angle) * rope_scaling
        k1r = (k1 * cos - k2 * sin).to(q1.dtype)
        k2r = (k2 * cos + k1 * sin).to(q1.dtype)
        scores = (dot(q1, tl.trans(k1r), FP32) + dot(q2, tl.trans(k2r), FP32)) * sm_scale_log2
        scores = tl.where(ok[None, :], scores, float("-inf"))  # [BLOCK_G, BLOCK_N]
        v = tl.load(v_ptr + b * s_vb + h * s_vh + j[:, None] * s_vn + offs_d[None, :],
                    mask=ok[:, None], other=0.0)  # [BLOCK_N, D] values in selection order
        m_i, l_i, acc = _online_softmax_step(scores, v, m_i, l_i, acc, FP32)
    _write_partial(out_ptr, lse_ptr, b, h, split, m_i, l_i, acc, offs_g, offs_d,
                   s_ob, s_oh, s_os, s_lb, s_lh, s_ls, G)


@triton.jit
def merge_kernel(out_parts_ptr, lse_parts_ptr, out_ptr, lse_ptr, num_heads, num_parts,
                 s_pb, s_ph, s_pp, s_lb, s_lh, s_lp, s_ob, s_oh, s_Lb, s_Lh,
                 D: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[b, h] = sum_p exp(lse_p - lse) out_p, lse = logsumexp_p lse_p (natural log)."""
    pid = tl.program_id(0)
    b, h = pid // num_heads, pid % num_heads
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, D)
    p_ok = offs_p < num_parts
    lse = tl.load(lse_parts_ptr + b * s_lb + h * s_lh + offs_p * s_lp, mask=p_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)  # [BLOCK_P]; 0 for empty parts
    total = tl.sum(w, axis=0)
    parts = tl.load(out_parts_ptr + b * s_pb + h * s_ph + offs_p[:, None] * s_pp + offs_d[None, :],
                    mask=p_ok[:, None], other=0.0).to(tl.float32)  # [BLOCK_P, D]
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + b * s_ob + h * s_oh + offs_d, out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + b * s_Lb + h * s_Lh, tl.where(total == 0.0, float("-inf"), m_safe + tl.log(total)))


# ---------------------------------------------------------------------------- launchers

def _block_g(group: int) -> int:
    return max(16, triton.next_power_of_2(group))


_SM_COUNT: dict[int, int] = {}


def _num_splits(total_len: int, programs: int, device: torch.device) -> tuple[int, int]:
    """Split the key list so that programs * splits covers the GPU a few times over."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        target = 4 * _SM_COUNT[index]
    else:
        target = 4
    max_splits = max(1, math.ceil(total_len / BLOCK_N))
    splits = max(1, min(max_splits, math.ceil(target / max(programs, 1))))
    split_len = math.ceil(max(total_len, 1) / splits / BLOCK_N) * BLOCK_N
    return math.ceil(max(total_len, 1) / split_len), split_len


def merge_parts(out_parts: torch.Tensor, lse_parts: torch.Tensor, out_dtype: torch.dtype):
    """out_parts [B, H, P, D] (fp32), lse_parts [B, H, P] -> out [B, H, D], lse [B, H]."""
    B, H, P, D = out_parts.shape
    out = _alloc((B, H, D), out_dtype, out_parts.device)
    lse = _alloc((B, H), torch.float32, out_parts.device)
    merge_kernel[(B * H,)](out_parts, lse_parts, out, lse, H, P,
                           out_parts.stride(0), out_parts.stride(1), out_parts.stride(2),
                           lse_parts.stride(0), lse_parts.stride(1), lse_parts.stride(2),
                           out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
                           D=D, BLOCK_P=triton.next_power_of_2(P))
    return out, lse


def _partials(B: int, H: int, splits: int, D: int, device: torch.device):
    return (_alloc((B, H, splits, D), torch.float32, device),  # [B, H, P, D]
            _alloc((B, H, splits), torch.float32, device))  # [B, H, P]


def gather_attention(q, k_cache, v_cache, selected, num_selected, seq_lens, scale, sink, window):
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], selected.shape[-1]
    G = H // Hkv
    total = sink + window + S
    splits, split_len = _num_splits(total, B * Hkv, q.device)
    out_parts, lse_parts = _partials(B, H, splits, D, q.device)
    gather_attention_kernel[(B * Hkv, splits)](
        q, k_cache, v_cache, selected, num_selected, seq_lens, out_parts, lse_parts,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), selected.stride(0), selected.stride(1),
        num_selected.stride(0), out_parts.stride(0), out_parts.stride(1), out_parts.stride(2),
        lse_parts.stride(0), lse_parts.stride(1), lse_parts.stride(2),
        Hkv, split_len, total, scale * LOG2E,
        SINK=sink, WINDOW=window, G=G, BLOCK_G=_block_g(G), D=D, BLOCK_N=BLOCK_N,
        FP32=INTERPRET or q.dtype == torch.float32)
    return merge_parts(out_parts, lse_parts, q.dtype)


def shadowkv_attention(q, u, sv, v_selected, selected, num_selected, inv_freq, scale, attention_scaling):
    B, H, D = q.shape
    Hkv, S = selected.shape[1], selected.shape[2]
    G, R = H // Hkv, u.shape[-1]
    splits, split_len = _num_splits(S, B * Hkv, q.device)
    out_parts, lse_parts = _partials(B, H, splits, D, q.device)
    shadowkv_attention_kernel[(B * Hkv, splits)](
        q, u, sv, v_selected, selected, num_selected, inv_freq, out_parts, lse_parts,
        q.stride(0), q.stride(1), u.stride(0), u.stride(1), sv.stride(0), sv.stride(1),
        v_selected.stride(0), v_selected.stride(1), v_selected.stride(2),
        selected.stride(0), selected.stride(1), num_selected.stride(0),
        out_parts.stride(0), out_parts.stride(1), out_parts.stride(2),
        lse_parts.stride(0), lse_parts.stride(1), lse_parts.stride(2),
        Hkv, R, split_len, S, scale * LOG2E, attention_scaling,
        G=G, BLOCK_G=_block_g(G), D=D, BLOCK_R=max(16, triton.next_power_of_2(R)), BLOCK_N=BLOCK_N,
        FP32=INTERPRET or q.dtype == torch.float32)
    return merge_parts(out_parts, lse_parts, q.dtype)


def merge_attention(outs: torch.Tensor, lses: torch.Tensor):
    """outs [P, B, H, D], lses [P, B, H] -> (out [B, H, D], lse [B, H])."""
    return merge_parts(outs.permute(1, 2, 0, 3), lses.permute(1, 2, 0), outs.dtype)
