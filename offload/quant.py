"""Weight-only int4 and int8 quantization for the CPU.

``quantize="int4"`` (tinygemm's layout, below) holds the projections in 4-bit groups of 32 and
computes through torch's fused kernel; ``quantize="int8"`` holds them as int8 codes with an fp32
scale per group of 32 input columns (:class:`Int8Weight`, GGUF's Q8_0 layout: 1.125 bytes per
weight) and computes through the numba kernels of :mod:`offload.kernels.cpu_quant`. Groups keep
int8 near-lossless where one scale per row was not (perplexity +0.90% on the default model with
row scales, +0.03% with groups: BENCHMARKS.md), and hold a Q8_0 tensor exactly and a Q6_K or Q5_x
one within half a step of its group. A file on a 4-bit grid of 32-weight groups (GGUF Q4_x) is
held by int4 groups up to the rounding of scale and zero to bf16. Embeddings and head are int8
groups in both schemes.

A linear weight W [N, K] is held as 4-bit codes q in 0..15 and, per group of ``group`` consecutive
input columns of each output row, a scale and a zero: W ~ (q - 8) * scale + zero, which is the
convention of ``torch.ops.aten._weight_int4pack_mm_for_cpu``. At group 32 with bf16 scale and zero
that is 0.625 bytes per weight against 2 in bf16: a decode step reads 3.2x fewer weight bytes, and
the kernel dequantizes in registers (measured on this CPU, FACTS.md: 4096x4096 bf16 3.13 ms, int4
0.51 ms). Codes are chosen round-to-nearest between each group's minimum and maximum, or on a
zero-centred grid (GGUF's Q4_0) where that holds the group more exactly.

On a GPU the codes are held in another order, the "nibbles" layout (two codes per byte, in input
order), and products run the Triton kernel of :mod:`offload.kernels.triton_quant`, which
dequantizes a tile at a time in registers; int8 weights keep their layout there and run its int8
kernel. Which layout an int4 weight holds is decided by the device its products run on
(:func:`int4_layout`), not by where its bytes are: a GPU run's layers streamed from host memory or
disk are packed for the GPU from the start.

The CPU kernel computes one input row at a time; from ``INT4_GEMM_ROWS`` rows (a prefill chunk) the
weight is unpacked a block of rows at a time to fp32 for the BLAS GEMM instead
(:mod:`offload.kernels.int4_pack`, 2-2.5x faster at 512 rows on an AVX2 CPU).

The fused int4 kernel takes bf16 activations on its fast path, whatever the model computes in: a
model computing in fp32 casts each product's input to bf16 and its output back (measured on an
AVX2 EPYC, 2 threads, 4096x4096: int4 with bf16 activations 1.58 ms, with fp32 activations 22.3 ms;
fp32 dense 5.7 ms).

Shapes: N output features, K input features, G = K / group groups per row.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .attention import product_dtype
from .config import ModelArgs
from .errors import OffloadError
from .kernels import (
    INT4_MID,
    PACK_TILE_ROWS,
    ROW_MULTIPLE,
    Int8Arrays,
    dequantize_int8_groups,
    int4_dequantize,
    int4_group_linear,
    int4_nibbles_dequantize,
    int4_nibbles_linear,
    int8_group_linear,
    pack_int4_nibbles,
)

INT4_GROUP = 32  # weights per scale/zero pair: GGUF's Q4_0 / Q4_1 / Q4_K sub-block size
INT4_MAX = 15
N_MULTIPLE = ROW_MULTIPLE  # the CPU packer needs N divisible by 16
QUANTIZE_SCHEMES = ("int4", "int8")
INT8_GROUP = 32  # input columns per scale of an int8 projection (GGUF's Q8_0 block)
INT8_SCALE_BYTES = 4  # int8 scales are fp32: a GGUF fp16 block scale fits exactly
KERNEL_DTYPE = torch.bfloat16  # the fused kernels' scales and activations (their fast path on every CPU)
SCALE_BYTES = 2  # bytes of one KERNEL_DTYPE scale or zero


INT4_CPU_LAYOUT = "cpu"  # torch's CPU packer's byte order (learned per CPU: kernels.int4_pack)
INT4_NIBBLES_LAYOUT = "nibbles"  # two codes per byte in input order, low nibble first (the Triton kernel's)


def int4_layout(device: torch.device | str) -> str:
    """The int4 layout the products on ``device`` read: torch's CPU packer's on a CPU, nibbles in
    order on a GPU."""
    return INT4_CPU_LAYOUT if torch.device(device).type == "cpu" else INT4_NIBBLES_LAYOUT


def int4_supported(out_features: int, in_features: int, group: int = INT4_GROUP) -> bool:
    """Whether the fused kernel takes a weight of this shape."""
    return out_features % N_MULTIPLE == 0 and in_features % group == 0 and in_features % 2 == 0


def int4_nbytes(out_features: int, in_features: int, scale_bytes: int, group: int = INT4_GROUP) -> int:
    """Bytes an :class:`Int4Weight` holds: packed codes and a scale + zero per group."""
    return out_features * in_features // 2 + (in_features // group) * out_features * 2 * scale_bytes


def int8_nbytes(out_features: int, in_features: int, group: int = INT8_GROUP) -> int:
    """Bytes an :class:`Int8Weight` holds: codes and an fp32 scale per group."""
    return out_features * in_features + out_features * (in_features // group) * INT8_SCALE_BYTES


def int8_supported(out_features: int, in_features: int, group: int = INT8_GROUP) -> bool:
    """Whether an :class:`Int8Weight` (groups of ``group`` inputs) can hold this shape."""
    return out_features > 0 and in_features > 0 and in_features % group == 0


def quantize_supported(scheme: str, out_features: int, in_features: int) -> bool:
    return (int4_supported if scheme == "int4" else int8_supported)(out_features, in_features)


def shape_rule(scheme: str) -> str:
    """What ``scheme`` asks of a weight's shape, for an error line."""
    if scheme == "int4":
        return f"outputs divisible by {N_MULTIPLE} and inputs by {INT4_GROUP}"
    return f"inputs divisible by {INT8_GROUP}"


def held_format(scheme: str) -> str:
    """How a projection of ``scheme`` is held, in words: the start-up line says it, and a weight
    store records it (:func:`stored_format`)."""
    kernel = str(KERNEL_DTYPE).removeprefix("torch.")
    if scheme == "int4":
        return f"groups of {INT4_GROUP}, {kernel} scale + zero"
    return f"groups of {INT8_GROUP}, float32 scale"


def stored_format(scheme: str, layout: str = INT4_CPU_LAYOUT) -> str:
    """What a weight store records of a projection of ``scheme`` (a store of another is rewritten,
    never read into these buffers): how it is held and, for int4, in which ``layout``. The CPU
    layout's order follows the vector width torch's kernels run at (blocks of 32 rows on AVX2, 64 on
    AVX-512), so a store written on one CPU would be misread on another; the nibbles layout is the
    same everywhere."""
    held = f"{scheme}: {held_format(scheme)}"
    if scheme == "int4" and layout == INT4_CPU_LAYOUT:
        held += f", packed by torch's {torch.backends.cpu.get_cpu_capability()} kernels"
    elif scheme == "int4":
        held += f", {layout} layout"
    return held


# GGUF block types by the run-time scheme that holds them in about the file's bytes: 4 bits and
# fewer in int4 groups of 32 (Q4_0 / Q4_1 / Q4_K exactly, up to bf16 scale and zero), 5 to 8 bits in
# int8 groups of 32 (Q8_0 exactly, Q5_x / Q6_K within half a step of their group).
GGUF_INT4_TYPES = frozenset({"Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS"})
GGUF_INT8_TYPES = frozenset({"Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K"})
GGUF_FINER_TYPES = GGUF_INT8_TYPES | {"F16", "BF16", "F32"}  # more than 4 bits: int8 holds them nearer than int4


def scheme_for_file(types: Mapping[str, int]) -> tuple[str | None, str]:
    """The scheme that holds a GGUF file's projection weights (block type -> weights of that type)
    in about the bytes the file gives them, and what the file holds, in words. The scheme of most of
    the weights decides: a Q4_K_M file (Q4_K with Q6_K in some down and value projections) is int4
    (its finer tensors: :func:`finer_projections`); a Q8_0 or Q6_K file is int8; a float file None."""
    total = sum(types.values())
    ranked = sorted(types.items(), key=lambda kv: -kv[1])
    words = "GGUF " + ", ".join(f"{name} ({count / total:.0%})" if len(types) > 1 else name
                                for name, count in ranked) + " projections"
    int4 = sum(n for t, n in types.items() if t in GGUF_INT4_TYPES)
    int8 = sum(n for t, n in types.items() if t in GGUF_INT8_TYPES)
    if 2 * int4 >= total:
        return "int4", words
    if 2 * (int4 + int8) >= total:
        return "int8", words
    return None, words


# A checkpoint's projection tensor (Hugging Face name, less the layer prefix) -> the fused weight of
# a decoder layer that holds it (offload.model: q|k|v and gate|up are one matrix each).
FUSED_PROJECTIONS = {"self_attn.q_proj.weight": "wqkv", "self_attn.k_proj.weight": "wqkv",
                     "self_attn.v_proj.weight": "wqkv", "self_attn.o_proj.weight": "wo",
                     "mlp.gate_proj.weight": "w_gate_up", "mlp.up_proj.weight": "w_gate_up",
                     "mlp.down_proj.weight": "w_down"}
_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def finer_projections(tensors: Mapping[str, tuple[str, int]]) -> frozenset[tuple[int, str]]:
    """The fused weights (layer, name) of an int4 model that a file gives, in whole or part, in a
    finer type than 4 bits (a Q4_K_M file's Q6_K value and down projections, Q8_0 or F16 ones): held
    in int8 groups, each within half an int8 step of its blocks, where int4 would lose their extra
    bits. ``tensors``: projection weights by Hugging Face name -> (block type, weights)."""
    finer = set()
    for name, (kind, _) in tensors.items():
        match = _LAYER_TENSOR.match(name)
        if match and kind in GGUF_FINER_TYPES and match.group(2) in FUSED_PROJECTIONS:
            finer.add((int(match.group(1)), FUSED_PROJECTIONS[match.group(2)]))
    return frozenset(finer)


def finer_nbytes(args: ModelArgs, finer: frozenset[tuple[int, str]]) -> int:
    """Bytes the ``finer`` weights (:func:`finer_projections`) hold in int8 beyond what int4 would."""
    shapes = dict(zip(("wqkv", "wo", "w_gate_up", "w_down"), projection_shapes(args)))
    return sum(int8_nbytes(*shapes[name]) - int4_nbytes(*shapes[name], SCALE_BYTES) for _, name in finer)


def projection_nbytes(out_features: int, in_features: int, quantize: str) -> int:
    """Bytes one projection weight holds in a quantized scheme."""
    if quantize == "int4":
        return int4_nbytes(out_features, in_features, SCALE_BYTES)
    return int8_nbytes(out_features, in_features)


def quantize_weight(w: torch.Tensor, scheme: str, dtype: torch.dtype, given: "GivenRows | None" = None,
                    layout: str | None = None) -> "Int4Weight | Int8Weight":
    """w [N, K] as the scheme's weight module, on w's device; ``dtype`` the compute dtype of its
    outputs. ``given``: rows whose codes a checkpoint already holds in the scheme's form (their rows
    of w are not read). ``layout``: an int4 weight's (:func:`int4_layout` of the device its products
    run on; default: w's device's)."""
    if scheme == "int4":
        return Int4Weight.from_float(w, dtype, given=given, layout=layout)
    return Int8Weight.from_float(w, dtype, given=given)


# first row -> that run of rows in a scheme's form, as a checkpoint held them: int4 (codes [n, K] in
# 0..15, scale [n, G], zero [n, G]), int8 (codes [n, K], scales [n, G]); fp32 scales and zeros.
GivenRows = dict[int, tuple[torch.Tensor, ...]]


def _rows_in_form(w: torch.Tensor, r0: int, r1: int, given: GivenRows | None, convert) -> tuple[torch.Tensor, ...]:
    """Rows r0..r1-1 in a scheme's form: copied from the ``given`` runs that cover them, the rest
    converted from w by ``convert(rows of w)`` (a checkpoint may hold some parts of a fused weight in
    the scheme's form and others not)."""
    pieces, r = [], r0
    for lo in sorted(given or ()):
        run = given[lo]
        hi = lo + run[0].shape[0]
        if hi <= r or lo >= r1:
            continue
        if lo > r:
            pieces.append(convert(w[r:lo]))
            r = lo
        end = min(hi, r1)
        pieces.append(tuple(part[r - lo:end - lo].to(w.device) for part in run))
        r = end
    if r < r1:
        pieces.append(convert(w[r:r1]))
    return pieces[0] if len(pieces) == 1 else tuple(torch.cat(p) for p in zip(*pieces))


def empty_weight(shape: tuple[int, int], scheme: str, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> "Int4Weight | Int8Weight":
    """An unfilled weight module of the scheme (a streaming buffer the store fills), in the layout of
    the device it computes on."""
    return (Int4Weight if scheme == "int4" else Int8Weight)(*shape, dtype, device=device)


def projection_shapes(args: ModelArgs) -> list[tuple[int, int]]:
    """[N, K] of one decoder layer's four projection weights (q|k|v fused, o, gate|up fused, down)."""
    return [(args.q_size + 2 * args.kv_size, args.hidden_size), (args.hidden_size, args.q_size),
            (2 * args.intermediate_size, args.hidden_size), (args.hidden_size, args.intermediate_size)]


def layer_nbytes(args: ModelArgs, dtype_bytes: int, quantize: str | None) -> int:
    """Bytes one decoder layer holds: everything in the compute dtype, or its projections in the
    ``quantize`` scheme (KERNEL_DTYPE scales) beside norms and bias in the compute dtype. The
    planner places and streams these."""
    if not quantize:
        return args.layer_param_count() * dtype_bytes
    shapes = projection_shapes(args)
    rest = args.layer_param_count() - sum(n * k for n, k in shapes)  # norms, QKV bias
    return sum(projection_nbytes(n, k, quantize) for n, k in shapes) + rest * dtype_bytes


def embedding_nbytes(args: ModelArgs, dtype_bytes: int, quantize: str | None) -> int:
    """Bytes of the embedding table and the LM head (one table when tied): int8 groups when quantized."""
    one = (int8_nbytes(args.vocab_size, args.hidden_size) if quantize
           else args.vocab_size * args.hidden_size * dtype_bytes)
    return one * (1 if args.tie_word_embeddings else 2)


# Weights quantized at a time: the quantizers' fp32 and int32 temporaries (about ten of this size)
# stay small whatever the matrix (an 8B model's 14336-wide rows included). The CPU packer lays rows
# out in blocks whose size depends on the CPU; blocks of whole PACK_TILE_ROWS pack as the whole matrix
# does on any of them (32-row tiles did on AVX2 alone: 288-row parts of a 14336-wide matrix would
# have cut AVX-512's 64-row blocks).
QUANTIZE_BLOCK_ELEMENTS = 1 << 22


def quantize_rows(in_features: int) -> int:
    """Rows quantized at a time for rows of ``in_features``: whole packing tiles, about
    QUANTIZE_BLOCK_ELEMENTS weights."""
    return max(PACK_TILE_ROWS, QUANTIZE_BLOCK_ELEMENTS // in_features // PACK_TILE_ROWS * PACK_TILE_ROWS)


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4 per group of ``group`` input columns (each group on the better of an
    asymmetric and a zero-centred grid: :func:`_quantize_int4_rows`).
    w [N, K] -> codes int32 [N, K] in 0..15, scale [N, G], zero [N, G] (fp32 holding ``dtype``
    values: the codes are chosen against the scale and zero the kernel will hold), with
    w ~ (codes - INT4_MID) * scale + zero."""
    N, K = w.shape
    rows = quantize_rows(K)
    parts = [_quantize_int4_rows(w[r:r + rows], group, dtype) for r in range(0, N, rows)]
    return tuple(torch.cat(p) for p in zip(*parts))


def _quantize_int4_rows(w: torch.Tensor, group: int, dtype: torch.dtype):
    """Each group on the better of two grids, by its largest error: from its least to its largest
    value (asymmetric: what a Q4_1 block is), or centred on zero with its largest-magnitude value at
    code 0 (ggml's Q4_0: w = d * (q - 8), d = that value / -8). A Q4_0 tensor often lacks the top
    code in a block; the first grid alone would requantize it onto a finer, shifted grid and add up
    to half a step of error to every weight."""
    N, K = w.shape
    groups = w.float().reshape(N, K // group, group)  # [N, G, group]
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, G]
    scale = ((hi - lo).clamp(min=1e-12) / INT4_MAX).to(dtype).float()  # [N, G]; a constant group keeps codes 0
    zero = (lo + INT4_MID * scale).to(dtype).float()  # (q - 8) * scale + zero == q * scale + lo
    codes = _int4_codes(groups, scale, zero)  # [N, G, group]
    extreme = torch.where(hi.abs() > lo.abs(), hi, lo)  # [N, G] signed
    sym_scale = torch.where(extreme.abs() > 1e-12, extreme / -INT4_MID, 1e-12).to(dtype).float()  # [N, G]
    sym_zero = torch.zeros_like(sym_scale)
    sym_codes = _int4_codes(groups, sym_scale, sym_zero)  # [N, G, group]
    better = _int4_error(sym_codes, sym_scale, sym_zero, groups) < _int4_error(codes, scale, zero, groups)  # [N, G]
    codes = torch.where(better[..., None], sym_codes, codes)
    scale, zero = torch.where(better, sym_scale, scale), torch.where(better, sym_zero, zero)
    return codes.reshape(N, K).to(torch.int32), scale, zero


def _int4_codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Nearest codes of groups [N, G, group] on the grid (q - 8) * scale + zero, scale/zero [N, G]."""
    return torch.round((groups - zero[..., None]) / scale[..., None] + INT4_MID).clamp(0, INT4_MAX)


def _int4_error(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Largest error per group [N, G] of codes [N, G, group] against the values they stand for."""
    return ((codes - INT4_MID) * scale[..., None] + zero[..., None] - groups).abs().amax(dim=-1)


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The reference: codes [N, K], scale/zero [N, G] -> W [N, K] in fp32."""
    N, K = codes.shape
    group = K // scale.shape[1]
    grouped = (codes.float().reshape(N, -1, group) - INT4_MID) * scale[..., None] + zero[..., None]  # [N, G, group]
    return grouped.reshape(N, K)


class Int4Weight(nn.Module):
    """One linear weight in int4 groups: ``packed`` (uint8 [N, K/2] in ``layout``: torch's CPU
    packer's order, or nibbles in input order for the GPU kernel) and ``scales_zeros`` ([G, N, 2] in
    KERNEL_DTYPE). Call it like ``F.linear(x, W, bias)``; ``dtype`` is the compute dtype its outputs
    are given in. ``layout`` defaults to the one of ``device`` (:func:`int4_layout`)."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, group: int = INT4_GROUP,
                 device: torch.device | str = "cpu", layout: str | None = None):
        super().__init__()
        if not int4_supported(out_features, in_features, group):
            raise OffloadError(f"int4 weights need out_features divisible by {N_MULTIPLE} and in_features by "
                               f"{group}; got {out_features} x {in_features}")
        layout = layout or int4_layout(device)
        if layout not in (INT4_CPU_LAYOUT, INT4_NIBBLES_LAYOUT):
            raise ValueError(f"unknown int4 layout {layout!r}: {INT4_CPU_LAYOUT!r} or {INT4_NIBBLES_LAYOUT!r}")
        self.out_features, self.in_features, self.group, self.dtype = out_features, in_features, group, dtype
        self.layout = layout
        self.packed = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device),
                                   requires_grad=False)  # [N, K/2]
        self.scales_zeros = nn.Parameter(torch.empty(in_features // group, out_features, 2, dtype=KERNEL_DTYPE,
                                                     device=device), requires_grad=False)  # [G, N, 2]

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype: torch.dtype, group: int = INT4_GROUP,
                   given: GivenRows | None = None, layout: str | None = None) -> "Int4Weight":
        """Quantize w [N, K] (any float dtype) on its device, into ``layout`` (default: that device's);
        rows in ``given`` take those codes (a GGUF Q4 tensor's own, :mod:`offload.loaders.gguf_blocks`)
        and their scales and zeros as the kernel holds them (bf16)."""
        N, K = w.shape
        out = cls(N, K, dtype, group, device=w.device, layout=layout)
        rows = quantize_rows(K)

        def convert(dense: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return _quantize_int4_rows(dense, group, KERNEL_DTYPE)

        for r in range(0, N, rows):  # row blocks of whole packing tiles: small temporaries
            codes, scale, zero = _rows_in_form(w, r, min(N, r + rows), given, convert)
            out.load_codes(codes.to(torch.int32), scale, zero, first_row=r)
        return out

    def load_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, first_row: int = 0) -> None:
        """Fill rows first_row.. (for the CPU layout a multiple of PACK_TILE_ROWS) from codes int32 [n, K]
        and scale/zero [n, G]."""
        rows = slice(first_row, first_row + codes.shape[0])
        if self.layout == INT4_NIBBLES_LAYOUT:
            packed = pack_int4_nibbles(codes)  # [n, K/2]
        elif first_row % PACK_TILE_ROWS:
            raise ValueError(f"int4 rows are packed in tiles of {PACK_TILE_ROWS}: first_row {first_row} is inside one")
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).cpu(), 1)  # [n, K/2]
        with torch.no_grad():
            self.packed[rows].copy_(packed)
            self.scales_zeros[:, rows].copy_(torch.stack([scale.t(), zero.t()], dim=-1))  # [G, n, 2]

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_zeros.numel() * self.scales_zeros.element_size()

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.layout == INT4_NIBBLES_LAYOUT:
            out = int4_nibbles_linear(x.reshape(-1, self.in_features), self.packed, self.scales_zeros, self.group)
        else:
            out = int4_group_linear(x.reshape(-1, self.in_features), self.packed, self.scales_zeros, self.group)  # [M, N]
        if out.dtype != x.dtype:  # (a no-op .to still costs a microsecond, four times a layer)
            out = out.to(x.dtype)
        if bias is not None:
            out = out + bias
        return out.view(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        """W [N, K] in the compute dtype."""
        if self.layout == INT4_NIBBLES_LAYOUT:
            return int4_nibbles_dequantize(self.packed, self.scales_zeros).to(self.dtype)
        return int4_dequantize(self.packed, self.scales_zeros, self.group).to(self.dtype)


INT8_MAX = 127


class Int8Weight(nn.Module):
    """A weight in int8 with an fp32 scale per group of ``group`` input columns of each output row
    (symmetric): W[n, k] ~ codes[n, k] * scales[n, k // group], GGUF's Q8_0 layout. The projections
    with ``quantize="int8"``, and the embedding table and LM head with either scheme (tied or not;
    lookups dequantize the rows they touch). Products run the numba kernels on a CPU, the Triton kernel on a GPU
    (:func:`offload.kernels.int8_group_linear`). ``dtype`` is the compute dtype its outputs and
    looked-up rows are given in."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, group: int = INT8_GROUP,
                 device: torch.device | str = "cpu"):
        super().__init__()
        if not int8_supported(out_features, in_features, group):
            raise OffloadError(f"int8 weights need inputs divisible by {group}; got {out_features} x {in_features}")
        self.out_features, self.in_features, self.group, self.dtype = out_features, in_features, group, dtype
        self.codes = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                  requires_grad=False)  # [N, K]
        self.scales = nn.Parameter(torch.empty(out_features, in_features // group, dtype=torch.float32,
                                               device=device), requires_grad=False)  # [N, G]
        self._arrays: Int8Arrays | None = None  # the kernels' views of codes and scales, made on first use

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype: torch.dtype, group: int = INT8_GROUP,
                   given: GivenRows | None = None) -> "Int8Weight":
        """Quantize w [N, K] (any float dtype) on its device: per group, scale = max |w| / 127 and codes
        rounded to nearest. A group already on such a grid (GGUF Q8_0) comes back exactly; rows in
        ``given`` take those codes and scales as they are (a Q8_0 tensor's own)."""
        N, K = w.shape
        out = cls(N, K, dtype, group, device=w.device)

        def convert(dense: torch.Tensor) -> tuple[torch.Tensor, ...]:
            groups = dense.float().reshape(-1, K // group, group)  # [n, G, group]
            scale = groups.abs().amax(dim=-1).clamp(min=1e-12) / INT8_MAX  # [n, G]
            codes = torch.round(groups / scale[..., None]).clamp(-INT8_MAX, INT8_MAX)  # [n, G, group]
            return codes.reshape(-1, K), scale

        with torch.no_grad():
            step = quantize_rows(K)
            for r in range(0, N, step):  # row blocks: small fp32 temporaries
                codes, scale = _rows_in_form(w, r, min(N, r + step), given, convert)
                out.codes[r:r + step] = codes
                out.scales[r:r + step] = scale
        return out

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> "Int8Weight":
        """The weight a checkpoint holds in this form: codes int8 [N, K], scales [N, G]."""
        N, K = codes.shape
        out = cls(N, K, dtype, K // scales.shape[1])
        with torch.no_grad():
            out.codes.copy_(codes)
            out.scales.copy_(scales)
        return out

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * self.scales.element_size()

    def _kernel_arrays(self) -> Int8Arrays | None:
        """The numpy views the CPU kernels read, made again only if the storage moved (a streaming
        buffer refilled in place keeps them); None off the CPU."""
        codes, scales = self.codes, self.scales
        if codes.device.type != "cpu":
            return None
        if self._arrays is None or not self._arrays.are_views_of(codes, scales):
            self._arrays = Int8Arrays(codes, scales)
        return self._arrays

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        out = int8_group_linear(x.reshape(-1, self.in_features), self.codes, self.scales,
                                arrays=self._kernel_arrays()).to(x.dtype)  # [M, N]
        if bias is not None:
            out = out + bias
        return out.view(*lead, self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` [...] dequantized: [..., K] in the compute dtype (an embedding lookup)."""
        return dequantize_int8_groups(self.codes[ids], self.scales[ids]).to(self.dtype)  # [..., K]

    def dequantize(self) -> torch.Tensor:
        """W [N, K] in the compute dtype."""
        return dequantize_int8_groups(self.codes, self.scales).to(self.dtype)


# Up to this many rows, a CPU fp32 product computes W @ x^T (measured faster from 1 to 128 rows).
SKINNY_ROWS = 64
# From this many rows a bf16 product on a CPU without native bf16 runs in fp32 (see linear()).
BF16_UPCAST_ROWS = 16


def linear(x: torch.Tensor, weight: torch.Tensor | Int4Weight | Int8Weight,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a dense weight, the quantized kernel for a quantized one."""
    if isinstance(weight, (Int4Weight, Int8Weight)):
        return weight.forward(x, bias)  # no hooks to run: Module.__call__'s machinery costs ~1.5 us, 4x a layer
    rows = x.numel() // x.shape[-1]
    if rows >= BF16_UPCAST_ROWS and product_dtype(weight) != weight.dtype:
        # No native bf16 (AVX2 alone): a bf16 product of many rows takes a scalar path; fp32 with the
        # weight widened per call is faster from 16 rows (measured, [M, 576] x [3072, 576]^T, 2
        # threads: M=16 5.7 -> 3.0 ms, M=1024 240 -> 46 ms; M=1 0.38 in bf16 against 3.9 widened).
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and 0 < rows <= SKINNY_ROWS:
        # Few rows (decode, a short prompt): on the CPU the fp32 product runs 1.3-4x faster as
        # W @ x^T than as F.linear's x @ W^T (torch 2.13 / MKL, 2 cores; the default model's LM head
        # at 8 rows: 19.6 against 41.8 ms): the skinny operand is then the one the GEMM packs. One row
        # goes as two copies: the GEMM reads the weight faster than the matrix-vector kernel does
        # (the default model's decode step: 77 against 114 ms).
        x2 = x.reshape(rows, -1)  # [rows, K]
        if rows == 1:
            x2 = torch.cat([x2, x2])  # [2, K]
        out = torch.matmul(weight, x2.T).T[:rows].contiguous()  # [rows, N]
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def embedding(ids: torch.Tensor, table: torch.Tensor | Int8Weight) -> torch.Tensor:
    """``F.embedding`` for a dense table, a dequantizing lookup for an int8 one."""
    if isinstance(table, Int8Weight):
        return table.rows(ids)
    return F.embedding(ids, table)
