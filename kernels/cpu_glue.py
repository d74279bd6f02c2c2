"""The small row kernels between a CPU decode step's matrix products (numba): RMSNorm, the residual
add fused with the next norm, RoPE with the split of the fused q|k|v product, and SiLU-gate.

A decode step of a small model is more dispatch than arithmetic: torch spends 20-40 tensor ops per
layer between the four products (a norm is five: widen, mean of squares, rsqrt, narrow, scale; RoPE
with its split and transposes a dozen), each a few microseconds for a few hundred numbers. Here
each of those runs is one compiled call over the rows.

The numbers are torch's, op for op, in the compute dtype: bf16 arrives as its bits (uint16, numpy
has no bf16) and every result torch would round to bf16 is rounded here too (to nearest even, the
same place: RMSNorm normalises in fp32 and rounds before the weight, RoPE rounds each product and
the sum), so a bf16 result differs from torch's only where a sum's order moves an fp32 ulp (the
norm's sum of squares, SiLU's exp) across a bf16 rounding boundary.

Each kernel takes numpy arrays; its ``*_at`` entry takes the tensors' addresses and shapes instead
(``Tensor.data_ptr()``, a tenth of a microsecond where a numpy view of a tensor costs one: at four
or five tensors a call, the views cost more than the kernel) and a 0-length array ``like`` whose
dtype (uint16 for bf16, or float32) types them.

Shapes: M rows (B x T tokens), n features; qkv rows hold H query heads, then Hkv key and Hkv value
heads of D each.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .cpu_decode import bf16_round_bits, exp_inplace


def _load(src, i, j, rowf, rowbits, d):
    """rowf[d] <- src[i, j] as fp32, ``rowbits`` being ``rowf`` viewed as uint32 (plain-numpy form;
    inside the kernels :func:`_load_forms`)."""
    if src.dtype == np.uint16:
        rowbits[d] = np.uint32(src[i, j]) << 16
    else:
        rowf[d] = src[i, j]


@overload(_load, inline="always")
def _load_forms(src, i, j, rowf, rowbits, d):  # pragma: no cover - numba
    """bf16 bits become an fp32's high half (exact); fp32 is copied."""
    if src.dtype == types.uint16:
        def load(src, i, j, rowf, rowbits, d):
            rowbits[d] = np.uint32(src[i, j]) << 16
    else:
        def load(src, i, j, rowf, rowbits, d):
            rowf[d] = src[i, j]
    return load


def _round(rowbits, n, like):
    """rowf[:n] (whose bits ``rowbits`` are) rounded in place to ``like``'s dtype: bf16 (uint16) by
    :func:`~offload.kernels.cpu_decode.bf16_round_bits`; fp32 unchanged (plain-numpy form;
    :func:`_round_forms`)."""
    if like.dtype == np.uint16:
        for j in range(n):
            rowbits[j] = bf16_round_bits(rowbits[j]) << np.uint32(16)


@overload(_round, inline="always")
def _round_forms(rowbits, n, like):  # pragma: no cover - numba
    if like.dtype == types.uint16:
        def rnd(rowbits, n, like):
            for j in range(n):
                rowbits[j] = bf16_round_bits(rowbits[j]) << np.uint32(16)
    else:
        def rnd(rowbits, n, like):
            pass
    return rnd


def _store(dst, i, j, rowf, rowbits):
    """dst[i, j] <- rowf[j], already rounded (plain-numpy form; :func:`_store_forms`)."""
    dst[i, j] = rowbits[j] >> 16 if dst.dtype == np.uint16 else rowf[j]


@overload(_store, inline="always")
def _store_forms(dst, i, j, rowf, rowbits):  # pragma: no cover - numba
    if dst.dtype == types.uint16:
        def store(dst, i, j, rowf, rowbits):
            dst[i, j] = np.uint16(rowbits[j] >> np.uint32(16))
    else:
        def store(dst, i, j, rowf, rowbits):
            dst[i, j] = rowf[j]
    return store


@njit(cache=True, fastmath={"reassoc", "nsz"})
def rms_norm(x, weight, eps, out):  # pragma: no cover - numba
    """out[i] = weight * narrow(x[i] / sqrt(mean(x[i]^2) + eps)), x/out [M, n] and weight [n] in the
    compute dtype (uint16: bf16 bits; else fp32); the norm in fp32, rounded to the compute dtype
    before the weight's product (the reference implementation's order)."""
    M, n = x.shape
    bits = np.empty((2, n), np.uint32)  # a row and the weight, as fp32 (or its bits)
    f = bits.view(np.float32)
    weights = weight.reshape((1, n))
    for j in range(n):
        _load(weights, 0, j, f[1], bits[1], j)
    for i in range(M):
        _norm_row(x, i, n, eps, f[0], bits[0], f[1])
        for j in range(n):
            _store(out, i, j, f[0], bits[0])


@njit(inline="always", fastmath={"reassoc", "nsz"})
def _norm_row(x, i, n, eps, rowf, rowbits, weight):  # pragma: no cover - numba
    """rowf[:n] <- the normed row x[i] times ``weight`` (fp32 [n]), rounded as torch rounds them."""
    for j in range(n):
        _load(x, i, j, rowf, rowbits, j)
    total = np.float32(0.0)
    for j in range(n):
        total += rowf[j] * rowf[j]
    inv = np.float32(1.0) / np.sqrt(total / np.float32(n) + np.float32(eps))
    for j in range(n):
        rowf[j] = rowf[j] * inv
    _round(rowbits, n, x)
    for j in range(n):
        rowf[j] = rowf[j] * weight[j]
    _round(rowbits, n, x)


@njit(cache=True, fastmath={"reassoc", "nsz"})
def add_rms_norm(x, addend, weight, eps, summed, out):  # pragma: no cover - numba
    """summed[i] = narrow(x[i] + addend[i]) (the residual add), out[i] = rms_norm(summed[i]) as
    :func:`rms_norm` computes it. All [M, n] in the compute dtype; ``summed`` may be ``x``."""
    M, n = x.shape
    bits = np.empty((3, n), np.uint32)  # x's row, the addend's, the weight
    f = bits.view(np.float32)
    weights = weight.reshape((1, n))
    for j in range(n):
        _load(weights, 0, j, f[2], bits[2], j)
    for i in range(M):
        for j in range(n):
            _load(x, i, j, f[0], bits[0], j)
            _load(addend, i, j, f[1], bits[1], j)
        for j in range(n):
            f[0, j] = f[0, j] + f[1, j]
        _round(bits[0], n, x)
        for j in range(n):
            _store(summed, i, j, f[0], bits[0])
        _norm_row(summed, i, n, eps, f[0], bits[0], f[2])
        for j in range(n):
            _store(out, i, j, f[0], bits[0])


@njit(cache=True)
def rope_split(qkv, cos, sin, q, k, v):  # pragma: no cover - numba
    """The fused product's rows qkv [B*T, (H + 2 Hkv) D] -> q [B, H, T, D], k and v [B, Hkv, T, D]
    (contiguous), q and k rotated by cos/sin [B*T, D] in the rotate-half convention:
    x * cos + rotate_half(x) * sin, each product and the sum rounded to the compute dtype as torch's
    three ops round them."""
    B, num_heads, T, D = q.shape
    Hkv = k.shape[1]
    half = D // 2
    bits = np.empty((4, D), np.uint32)
    f = bits.view(np.float32)
    xf, cf, sf, rf = f[0], f[1], f[2], f[3]  # x, cos, sin, rotated x
    xb, cb, sb, rb = bits[0], bits[1], bits[2], bits[3]
    for b in range(B):
        for t in range(T):
            i = b * T + t
            for j in range(D):
                _load(cos, i, j, cf, cb, j)
                _load(sin, i, j, sf, sb, j)
            for head in range(num_heads + Hkv):
                base = head * D
                for j in range(D):
                    _load(qkv, i, base + j, xf, xb, j)
                for j in range(half):
                    rf[j] = -xf[half + j]
                    rf[half + j] = xf[j]
                for j in range(D):
                    xf[j] = xf[j] * cf[j]
                    rf[j] = rf[j] * sf[j]
                _round(xb, D, qkv)
                _round(rb, D, qkv)
                for j in range(D):
                    xf[j] = xf[j] + rf[j]
                _round(xb, D, qkv)
                if head < num_heads:
                    for j in range(D):
                        _store(q[b, head], t, j, xf, xb)
                else:
                    for j in range(D):
                        _store(k[b, head - num_heads], t, j, xf, xb)
            for head in range(Hkv):
                base = (num_heads + Hkv + head) * D
                for j in range(D):
                    v[b, head, t, j] = qkv[i, base + j]


@njit(cache=True)
def silu_mul(gate_up, out):  # pragma: no cover - numba
    """out[i] = narrow(narrow(silu(gate)) * up) for gate_up [M, 2I] = [gate | up] -> out [M, I]:
    torch's F.silu(gate) * up, each op rounded to the compute dtype."""
    M, n = out.shape
    bits = np.empty((3, n), np.uint32)
    f = bits.view(np.float32)
    gf, uf, ef = f[0], f[1], f[2]
    exp_bits = np.empty(n, np.int32)
    gb, ub = bits[0], bits[1]
    for i in range(M):
        for j in range(n):
            _load(gate_up, i, j, gf, gb, j)
            _load(gate_up, i, n + j, uf, ub, j)
        for j in range(n):  # e = exp(-|g|) in (0, 1]: silu(g) = g / (1 + exp(-g)) either side of 0
            ef[j] = -abs(gf[j])
        exp_inplace(ef, exp_bits, n)
        for j in range(n):
            gf[j] = gf[j] / (np.float32(1.0) + ef[j]) if gf[j] >= 0 else gf[j] * ef[j] / (np.float32(1.0) + ef[j])
        _round(gb, n, gate_up)
        for j in range(n):
            gf[j] = gf[j] * uf[j]
        _round(gb, n, gate_up)
        for j in range(n):
            _store(out, i, j, gf, gb)


@intrinsic
def _pointer(typingctx, address):  # pragma: no cover - numba
    """An integer address as a void pointer (for numba.carray)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(address), codegen


@njit(cache=True)
def rms_norm_at(x, weight, out, M, n, eps, like):  # pragma: no cover - numba
    """:func:`rms_norm` of contiguous memory at these addresses: x/out [M, n], weight [n]."""
    rms_norm(carray(_pointer(x), (M, n), like.dtype), carray(_pointer(weight), (n,), like.dtype), eps,
             carray(_pointer(out), (M, n), like.dtype))


@njit(cache=True)
def add_rms_norm_at(x, addend, weight, summed, out, M, n, eps, like):  # pragma: no cover - numba
    """:func:`add_rms_norm` of contiguous memory at these addresses: x/addend/summed/out [M, n]."""
    add_rms_norm(carray(_pointer(x), (M, n), like.dtype), carray(_pointer(addend), (M, n), like.dtype),
                 carray(_pointer(weight), (n,), like.dtype), eps, carray(_pointer(summed), (M, n), like.dtype),
                 carray(_pointer(out), (M, n), like.dtype))


@njit(cache=True)
def rope_split_at(qkv, cos, sin, q, k, v, B, T, H, Hkv, D, like):  # pragma: no cover - numba
    """:func:`rope_split` of contiguous memory at these addresses."""
    rope_split(carray(_pointer(qkv), (B * T, (H + 2 * Hkv) * D), like.dtype),
               carray(_pointer(cos), (B * T, D), like.dtype), carray(_pointer(sin), (B * T, D), like.dtype),
               carray(_pointer(q), (B, H, T, D), like.dtype), carray(_pointer(k), (B, Hkv, T, D), like.dtype),
               carray(_pointer(v), (B, Hkv, T, D), like.dtype))


@njit(cache=True)
def silu_mul_at(gate_up, out, M, n, like):  # pragma: no cover - numba
    """:func:`silu_mul` of contiguous memory at these addresses: gate_up [M, 2n], out [M, n]."""
    silu_mul(carray(_pointer(gate_up), (M, 2 * n), like.dtype), carray(_pointer(out), (M, n), like.dtype))
