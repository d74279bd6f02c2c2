"""KIVI's 2-bit and 4-bit KV cache (Liu et al., 2024: "KIVI: a tuning-free asymmetric 2bit
quantization for KV cache"): ``kv_dtype="int2"`` or ``"int4"``.

A few key channels are large in every token (RoPE's low frequencies, outlier channels); values
have no such channels but vary token by token. So keys are quantized per channel over a group of
:data:`KIVI_GROUP` consecutive tokens, and values per token over groups of
:data:`KIVI_CHANNEL_GROUP` channels, both asymmetric: x ~ code * scale + minimum, codes 0..2^bits-1
packed 8/bits to a byte, scale and minimum in the compute dtype. A key group needs all its tokens
before it can be quantized: a row's newest tokens stay in the compute dtype in a residual buffer
(KIVI's R = 128 tokens; values too) until it fills, then its groups are quantized and it starts
over. Beyond KIVI, a row's first KIVI_SINK tokens (the attention sinks, whose keys are unlike the
others') are also kept in the compute dtype: measured on the default model at 2 bits, perplexity
+15.5% without them, +11.6% with 32 (BENCHMARKS.md, KIVI).

Prefill attends a chunk's own tokens as computed, not as the cache will hold them: a chunk of R
tokens then sees exactly what decode sees (its residual unquantized, everything before quantized).

Bytes per token and KV head, head_dim 64, bf16 scales: 2 bits 2 * 16 codes + 2 * 2 * 64 / 32 key
scale and minimum + 2 * 2 * 2 value scale and minimum = 48, against 256 in bf16 and 132 in int8;
plus, per row, R + KIVI_SINK tokens in the compute dtype.

On the CPU (bf16 or fp32) dense decode attends the codes in place (:meth:`KiviLayer.attend`: a
numba kernel unpacks each token into registers, offload.kernels.cpu_kivi) and the rows kept in the
compute dtype through torch, merged by log-sum-exp. Elsewhere, and for the sparse paths, codes are
unpacked through torch: a block of tokens at a time, or only the rows selected.

Shapes: B rows, Hkv KV heads, N tokens (capacity), D head_dim, P = D * bits / 8 packed bytes,
C = D / KIVI_CHANNEL_GROUP value groups, M tokens read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from offload.kernels import KiviArrays

KIVI_BITS = {"int4": 4, "int2": 2}  # kv_dtype -> bits per code
KIVI_GROUP = 32  # tokens per key group (KIVI's G: 32)
KIVI_CHANNEL_GROUP = 32  # channels per value group (KIVI's value group: 32)
KIVI_RESIDUAL = 128  # newest tokens a row keeps in the compute dtype, at most (KIVI's R: 128), whole groups
KIVI_SINK = 32  # first tokens of a row also kept in the compute dtype (attention sinks)
# A channel (or token group) whose values are all equal gets this scale rather than 0, so that
# decoding stays finite and the codes are all 0.
KIVI_SCALE_FLOOR = 1e-8


@dataclass(frozen=True)
class KiviFormat:
    """How a KIVI cache holds one KV head's keys and values of head_dim ``head_dim``."""

    bits: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.bits not in KIVI_BITS.values():
            raise ValueError(f"KIVI codes are {sorted(KIVI_BITS.values())} bits, got {self.bits}")
        if self.head_dim % self.channel_group or self.head_dim % self.per_byte:
            raise ValueError(f"a KIVI cache needs head_dim divisible by {self.channel_group}; got {self.head_dim}")

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    @property
    def top(self) -> int:
        """The largest code."""
        return (1 << self.bits) - 1

    @property
    def channel_group(self) -> int:
        return min(KIVI_CHANNEL_GROUP, self.head_dim)

    @property
    def packed_dim(self) -> int:
        return self.head_dim // self.per_byte

    def bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token and KV head as held once its group is quantized."""
        codes = 2 * self.packed_dim
        key_groups = 2 * self.head_dim * dtype_bytes / KIVI_GROUP  # a scale and a minimum per channel and group
        value_groups = 2 * (self.head_dim // self.channel_group) * dtype_bytes
        return int(codes + key_groups + value_groups)

    def quantize(self, x: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x float, reduced over ``dim`` (kept, size 1): codes uint8 (x's shape), scale and minimum
        (``dtype``, rounded before the codes are chosen, so that decoding gives back the nearest
        point of the grid it holds)."""
        x = x.float()
        lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
        scale = ((hi - lo) / self.top).clamp(min=KIVI_SCALE_FLOOR).to(dtype)
        lo = lo.to(dtype)
        codes = torch.round((x - lo.float()) / scale.float()).clamp(0, self.top).to(torch.uint8)
        return codes, scale, lo

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., D] uint8 -> [..., P], in planes: byte j holds channels j, j + P, j + 2P, ...
        (channel i * P + j in bits i*bits..), so that unpacking a plane is one shift and mask over
        P contiguous bytes, which a CPU kernel vectorizes."""
        planes = codes.view(*codes.shape[:-1], self.per_byte, self.packed_dim)  # [..., per, P]
        out = planes[..., 0, :].clone()
        for i in range(1, self.per_byte):
            out |= planes[..., i, :] << (i * self.bits)
        return out

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[..., P] uint8 -> codes [..., D] uint8."""
        shifts = torch.arange(0, 8, self.bits, dtype=torch.uint8, device=packed.device)  # [per]
        return ((packed[..., None, :] >> shifts[:, None]) & self.top).flatten(-2)


class KiviLayer:
    """One layer's K and V of every cache row in KIVI's form, on one device, allocated once:

    - ``k_codes``, ``v_codes`` [B, Hkv, N, P] uint8 (packed);
    - ``k_scale``, ``k_min`` [B, Hkv, ceil(N / KIVI_GROUP), D]: per key group and channel;
    - ``v_scale``, ``v_min`` [B, Hkv, N, C]: per token and channel group;
    - ``k_kept``, ``v_kept`` [B, Hkv, S + R, D] in the compute dtype: each row's first S =
      KIVI_SINK tokens (``k_sink``: a view) and its newest ``length[b] % R`` tokens (``k_recent``,
      R = KIVI_RESIDUAL: a view), quantized when R of them have gathered;
    - ``length[b]``: tokens written to row b.

    Writes continue a row (or start it over at 0): tokens before a write's first position are
    those written before."""

    def __init__(self, fmt: KiviFormat, batch_size: int, heads: int, capacity: int, dtype: torch.dtype,
                 device: torch.device, pin: bool):
        self.fmt, self.dtype = fmt, dtype
        D, groups = fmt.head_dim, -(-capacity // KIVI_GROUP)

        def zeros(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(batch_size, heads, *shape, dtype=dt, device=device, pin_memory=pin)

        self.k_codes = zeros(capacity, fmt.packed_dim, dt=torch.uint8)
        self.v_codes = zeros(capacity, fmt.packed_dim, dt=torch.uint8)
        self.k_scale, self.k_min = zeros(groups, D), zeros(groups, D)
        C = D // fmt.channel_group
        self.v_scale, self.v_min = zeros(capacity, C), zeros(capacity, C)
        self.residual, self.sink = KIVI_RESIDUAL, min(KIVI_SINK, capacity)
        self.k_kept, self.v_kept = zeros(self.sink + self.residual, D), zeros(self.sink + self.residual, D)
        self.k_sink, self.v_sink = self.k_kept[:, :, :self.sink], self.v_kept[:, :, :self.sink]  # views
        self.k_recent, self.v_recent = self.k_kept[:, :, self.sink:], self.v_kept[:, :, self.sink:]
        self.length = [0] * batch_size
        self._arrays: KiviArrays | None = None  # the CPU kernel's views, made on first use

    def kernel_arrays(self) -> KiviArrays | None:
        """numpy views of this layer for the CPU decode kernel; None off the CPU or in a dtype it does
        not take (fp16)."""
        if self.device.type != "cpu" or self.dtype not in (torch.bfloat16, torch.float32):
            return None
        if self._arrays is None:
            self._arrays = KiviArrays(self.k_codes, self.v_codes, self.k_scale, self.k_min, self.v_scale, self.v_min,
                                      self.k_kept, self.v_kept, KIVI_GROUP, self.fmt.bits)
        return self._arrays

    def attend(self, arrays: KiviArrays, q: torch.Tensor, lo: list[int], hi: list[int], scale: float) -> torch.Tensor:
        """Decode attention of q [B, H, D] (CPU) over tokens lo[b]..hi[b]-1 of rows 0..B-1 -> [B, H, D]
        fp32, in one kernel call: the quantized tokens from their codes, the sinks and the residual
        from the kept rows."""
        Hkv, B = self.k_codes.shape[1], len(lo)
        bounds = np.empty((B, 6), np.int64)  # codes lo, hi; kept rows: sinks lo, hi, residual lo, hi
        for b, (a, z) in enumerate(zip(lo, hi)):
            done = self.length[b] - self.length[b] % self.residual  # tokens held as codes
            c0 = max(a, min(self.sink, done))
            s1 = max(min(a, self.sink), min(z, self.sink, done))  # sinks the residual does not hold
            bounds[b] = (c0, max(c0, min(z, done)), min(a, s1), s1,
                         self.sink + max(a, done) - done, self.sink + max(z, done) - done)
        longest = int(max(bounds[:, 1] - bounds[:, 0]))
        return arrays.attend(q, np.repeat(bounds[:, None], Hkv, axis=1), scale, longest)[0]  # [B, H, D]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.k_codes, self.v_codes, self.k_scale, self.k_min, self.v_scale, self.v_min,
                self.k_kept, self.v_kept]

    @property
    def device(self) -> torch.device:
        return self.k_codes.device

    @property
    def capacity(self) -> int:
        return self.k_codes.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def write(self, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens start..start+T-1 of ``row``: k, v [Hkv, T, D]. The groups they fill are
        quantized; the rest wait in the recent buffer."""
        R, T = self.residual, k.shape[1]
        if start > self.length[row]:
            raise ValueError(f"a KIVI cache row is written in order: row {row} holds {self.length[row]} "
                             f"tokens, a write starts at {start}")
        if start + T > self.capacity:
            raise ValueError(f"tokens up to {start + T} do not fit a KIVI cache of {self.capacity}")
        first = start - start % R  # first token of the residual ``start`` falls in
        have = start - first
        if have and self.length[row] - self.length[row] % R > first:  # quantized already: back to floats
            ks, vs = self.read(row, first, start)
            self.k_recent[row, :, :have], self.v_recent[row, :, :have] = ks, vs
        if start < self.sink:
            upto = min(self.sink, start + T)
            self.k_sink[row, :, start:upto] = k[:, :upto - start]
            self.v_sink[row, :, start:upto] = v[:, :upto - start]
        if have + T < R:  # the residual does not fill (a decode step): the tokens join it as they are
            self.k_recent[row, :, have:have + T] = k
            self.v_recent[row, :, have:have + T] = v
            self.length[row] = start + T
            return
        k_all = torch.cat([self.k_recent[row, :, :have], k.to(self.device, self.dtype)], dim=1)  # [Hkv, have + T, D]
        v_all = torch.cat([self.v_recent[row, :, :have], v.to(self.device, self.dtype)], dim=1)
        full = (have + T) // R * R
        if full:
            self._quantize(row, first, k_all[:, :full], v_all[:, :full])
        rest = have + T - full
        self.k_recent[row, :, :rest] = k_all[:, full:]
        self.v_recent[row, :, :rest] = v_all[:, full:]
        self.length[row] = start + T

    def _quantize(self, row: int, first: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Whole groups from token ``first`` (a multiple of KIVI_GROUP): k, v [Hkv, n, D], n a
        multiple of KIVI_GROUP."""
        fmt, G = self.fmt, KIVI_GROUP
        Hkv, n, D = k.shape
        codes, scale, lo = fmt.quantize(k.view(Hkv, n // G, G, D), dim=2, dtype=self.dtype)  # [Hkv, g, G, D], [Hkv, g, 1, D]
        self.k_codes[row, :, first:first + n] = fmt.pack(codes.view(Hkv, n, D))
        g0 = first // G
        self.k_scale[row, :, g0:g0 + n // G] = scale[:, :, 0]
        self.k_min[row, :, g0:g0 + n // G] = lo[:, :, 0]
        Cg = fmt.channel_group
        codes, scale, lo = fmt.quantize(v.view(Hkv, n, D // Cg, Cg), dim=3, dtype=self.dtype)  # [Hkv, n, C, Cg], [Hkv, n, C, 1]
        self.v_codes[row, :, first:first + n] = fmt.pack(codes.view(Hkv, n, D))
        self.v_scale[row, :, first:first + n] = scale[..., 0]
        self.v_min[row, :, first:first + n] = lo[..., 0]

    def read(self, row: int, start: int, end: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens start..end-1 of ``row``: k, v [Hkv, end - start, D] in ``dtype`` (default: the
        compute dtype); tokens beyond the row's length read as 0."""
        dtype = dtype or self.dtype
        span = self.span(row, start, end)
        arrays = self.kernel_arrays()
        if arrays is not None and dtype in (torch.bfloat16, torch.float32):
            k, v = arrays.read(row, start, end, dtype)  # [Hkv, M, D] each: one compiled pass, 5x the torch form's speed
            span.lay_kept_over(k, v)
            return k, v
        return span.unpack(dtype)

    def span(self, row: int, start: int, end: int) -> "KiviSpan":
        """What tokens start..end-1 of ``row`` are read from, as views of this layer."""
        G, n = KIVI_GROUP, self.length[row]
        tokens, groups = slice(start, end), slice(start // G, -(-end // G))
        done = n - n % self.residual  # tokens quantized; the residual holds done..n-1
        sinks = slice(start, max(start, min(end, self.sink, done)))  # those the residual does not hold
        recent_lo = max(start, done)
        recent = slice(recent_lo - done, max(recent_lo, min(end, n)) - done)
        return KiviSpan(self.fmt, start, end, n, recent_lo,
                        self.k_codes[row, :, tokens], self.v_codes[row, :, tokens], self.k_scale[row, :, groups],
                        self.k_min[row, :, groups], self.v_scale[row, :, tokens], self.v_min[row, :, tokens],
                        self.k_sink[row, :, sinks], self.v_sink[row, :, sinks],
                        self.k_recent[row, :, recent], self.v_recent[row, :, recent])

    def take(self, row: int, ids: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's own tokens of ``row``: ids [Hkv, M] (below the row's length) -> k, v [Hkv, M, D]
        in ``dtype`` (default: the compute dtype); only these are unpacked."""
        G, D = KIVI_GROUP, self.fmt.head_dim
        dtype = dtype or self.dtype
        n = self.length[row]
        done = n - n % self.residual
        arrays = self.kernel_arrays()
        if arrays is not None and dtype in (torch.bfloat16, torch.float32):  # one compiled pass
            return arrays.take(row, ids, min(self.sink, done), self.sink, done, dtype)  # [Hkv, M, D] each
        ids = ids.to(self.device).long()
        at = ids[..., None]  # [Hkv, M, 1]
        groups = (ids // G)[..., None].expand(-1, -1, D)  # [Hkv, M, D]
        k = _keys(self.fmt, self.k_codes[row].gather(1, at.expand(-1, -1, self.fmt.packed_dim)),
                  self.k_scale[row].gather(1, groups), self.k_min[row].gather(1, groups), dtype)
        C = self.v_scale.shape[-1]
        v = _values(self.fmt, self.v_codes[row].gather(1, at.expand(-1, -1, self.fmt.packed_dim)),
                    self.v_scale[row].gather(1, at.expand(-1, -1, C)), self.v_min[row].gather(1, at.expand(-1, -1, C)),
                    dtype)
        for k_held, v_held, first in ((self.k_recent, self.v_recent, done), (self.k_sink, self.v_sink, 0)):
            size = k_held.shape[2]
            inside = (ids >= first) & (ids < first + size)  # [Hkv, M] tokens held in the compute dtype
            if size:  # (no test of inside.any(): on a GPU it would wait for the device every layer)
                at_held = (ids - first).clamp(0, size - 1)[..., None].expand(-1, -1, D)  # [Hkv, M, D]
                k = torch.where(inside[..., None], k_held[row].gather(1, at_held).to(k.dtype), k)
                v = torch.where(inside[..., None], v_held[row].gather(1, at_held).to(v.dtype), v)
        return k, v

    def move_row(self, src: int, dst: int, n: int) -> None:
        """Row ``src`` (n tokens: all it holds, or more when the last sampled token is not written
        yet) into row ``dst``, as held: its residual moves whole, so a shorter prefix cannot."""
        if n < self.length[src]:
            raise ValueError(f"a KIVI cache row moves whole: row {src} holds {self.length[src]} tokens, not {n}")
        n = self.length[src]
        groups = -(-n // KIVI_GROUP)
        for t in (self.k_codes, self.v_codes, self.v_scale, self.v_min):
            t[dst, :, :n] = t[src, :, :n]
        for t in (self.k_scale, self.k_min):
            t[dst, :, :groups] = t[src, :, :groups]
        for t in (self.k_kept, self.v_kept):
            t[dst] = t[src]
        self.length[dst] = n


@dataclass(frozen=True)
class KiviSpan:
    """What tokens start..end-1 of one cache row are read from, as the layer holds them: views of
    the layer, or copies on another device (:meth:`to`: a host-tier layer's read crosses as codes,
    about a fifth of the compute dtype's bytes at 2 bits, and is unpacked where it lands)."""

    fmt: KiviFormat
    start: int
    end: int
    length: int  # tokens the row holds
    recent_from: int  # the token the first of recent_k is
    k_codes: torch.Tensor  # [Hkv, M, P]
    v_codes: torch.Tensor
    k_scale: torch.Tensor  # [Hkv, g, D] the key groups start // G .. (end - 1) // G
    k_min: torch.Tensor
    v_scale: torch.Tensor  # [Hkv, M, C]
    v_min: torch.Tensor
    sink_k: torch.Tensor  # [Hkv, s, D] the sinks among the span's tokens (from ``start``), as written
    sink_v: torch.Tensor
    recent_k: torch.Tensor  # [Hkv, r, D] the residual's tokens among them (from ``recent_from``), as written
    recent_v: torch.Tensor

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.k_codes, self.v_codes, self.k_scale, self.k_min, self.v_scale, self.v_min, self.sink_k,
                self.sink_v, self.recent_k, self.recent_v)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def to(self, device: torch.device) -> "KiviSpan":
        moved = [t.to(device, non_blocking=True) for t in self.tensors]
        return KiviSpan(self.fmt, self.start, self.end, self.length, self.recent_from, *moved)

    def unpack(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [Hkv, M, D] in ``dtype`` through torch, where the span lies."""
        k, v = self.unpacked_codes(dtype)
        self.lay_kept_over(k, v)
        return k, v

    def unpacked_codes(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token from its codes (the kept rows not laid over): k, v [Hkv, M, D]."""
        G, M = KIVI_GROUP, self.end - self.start
        skip = self.start % G
        k_scale = self.k_scale.repeat_interleave(G, dim=1)[:, skip:skip + M]  # [Hkv, M, D]
        k_min = self.k_min.repeat_interleave(G, dim=1)[:, skip:skip + M]
        return (_keys(self.fmt, self.k_codes, k_scale, k_min, dtype),
                _values(self.fmt, self.v_codes, self.v_scale, self.v_min, dtype))

    def lay_kept_over(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Into k, v [Hkv, M, D] (unpacked from codes): the residual's and the sinks' tokens as
        written, and 0 beyond the row's length."""
        start, end, n = self.start, self.end, self.length
        at, r = self.recent_from - start, self.recent_k.shape[1]
        k[:, at:at + r], v[:, at:at + r] = self.recent_k, self.recent_v  # the residual's tokens
        s = self.sink_k.shape[1]
        k[:, :s], v[:, :s] = self.sink_k, self.sink_v  # the sinks
        if end > max(n, start):
            k[:, max(n, start) - start:] = 0
            v[:, max(n, start) - start:] = 0


# Codes times scale plus minimum in fp32 (exact for the product), rounded once to ``dtype``: the
# compiled read (KiviArrays.read) gives the same bits.
def _keys(fmt: KiviFormat, packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """packed [Hkv, M, P], scale and minimum per token and channel [Hkv, M, D] -> keys [Hkv, M, D]."""
    return (fmt.unpack(packed).float() * scale.float() + lo.float()).to(dtype)


def _values(fmt: KiviFormat, packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """packed [Hkv, M, P], scale and minimum per token and channel group [Hkv, M, C] -> values [Hkv, M, D]."""
    Hkv, M, _ = packed.shape
    C, Cg = scale.shape[-1], fmt.channel_group
    codes = fmt.unpack(packed).view(Hkv, M, C, Cg).float()  # [Hkv, M, C, Cg]
    return (codes * scale[..., None].float() + lo[..., None].float()).view(Hkv, M, C * Cg).to(dtype)
