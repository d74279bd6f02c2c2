"""A decode step on the CPU with every call between the products bound once.

On a CPU a decode step of a small model is mostly calls, not arithmetic: the default model's
(SmolLM2-135M, int4 projections, bf16) read its 96 MB of weights in ~6 ms, and the module tree
around them (nn.Module dispatch, shape checks, a fresh tensor per row op, the kernels' argument
checks) took another ~4.5 ms of its 11.4 ms step at 32 tokens of context, where llama.cpp's whole
step is 8.1 ms (BENCHMARKS.md). :class:`CpuDecodeStep` runs the same kernels in the same order on
the same numbers (the logits are bit-identical to :meth:`Transformer.forward`'s): the norms,
RoPE and the SiLU gate into buffers allocated once and checked once, each projection a call
bound to its weight, each layer's residual add fused into the next layer's norm (as the generic
path fuses the one inside a layer). Attention goes through the backend's ``forward`` as it does
for every model call, so every KV policy and tier keeps working.

It applies where the row kernels do (bf16 rows on the CPU: :func:`offload.kernels.row_ops.row_ops_apply`),
to decode steps of up to MAX_ROWS rows (one token each: ``generate`` on a few prompts, a server's
step with no prompt joining; a mixed call keeps the generic path), with every layer resident and of
the plain form (no weights streamed, no flash FFN, no q/k norm): the model binds none otherwise.
Bound once the weights are final (:meth:`Transformer.bind_decode_step`).

Shapes: B rows, H query heads, Hkv KV heads, D head_dim, hidden = the model's width, I = its FFN width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention import AttentionBackend, ForwardBatch
from .kernels import row_ops
from .kernels.cpu_int4_gemv import decode_product, decode_rows
from .kernels.int4_pack import INT4_GEMM_ROWS
from .quant import INT4_CPU_LAYOUT, Int4Weight, Int8Weight, linear

# Rows a bound step takes: fewer than the int4 products' GEMM path starts at (the fused kernel is
# what the generic forward runs for them too), within what the row kernels take.
MAX_ROWS = min(INT4_GEMM_ROWS - 1, row_ops.ROW_OPS_MAX_ROWS)

def binds(device_type: str, bf16: bool, qk_norm: bool, streamed: bool) -> bool:
    """Whether a model of these settings runs the bound step: bf16 on the CPU, every layer resident
    (none streamed), no q/k norm. (A model also checks that its layers' FFNs are the plain MLP: a
    flash FFN keeps the generic path.) The planner prices a step by the same rule."""
    return device_type == "cpu" and bf16 and not qk_norm and not streamed


# A projection bound to its weight: (x [B, K] in the compute dtype, out [B, N]) -> [B, N], the result
# written into out where the kernel can (the C kernel), else a fresh tensor.
Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def bind_product(weight: torch.Tensor | Int4Weight | Int8Weight, bias: torch.Tensor | None = None) -> Product:
    """``linear(x, weight, bias)`` for up to MAX_ROWS rows, with what it decides per call decided
    now: an int4 weight on the CPU is the fused kernel on bf16 rows (what :func:`linear` runs for
    fewer than INT4_GEMM_ROWS rows, without its checks and reshapes: the C kernel up to its
    ``decode_rows()`` where this process chose it); any other weight goes through linear."""
    if (isinstance(weight, Int4Weight) and weight.layout == INT4_CPU_LAYOUT and weight.packed.is_cpu
            and weight.dtype == torch.bfloat16):
        packed, group, scales_zeros = weight.packed, weight.group, weight.scales_zeros
        torch_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
        c_kernel = decode_product(packed, scales_zeros, group)  # None: torch's is this process's choice
        c_rows = decode_rows() if c_kernel is not None else 0

        def kernel(x, out):  # [B, K] -> [B, N]: the one linear would run for B rows
            if x.shape[0] <= c_rows:
                return c_kernel(x, out)
            return torch_kernel(x, packed, group, scales_zeros)
        if bias is None:
            return kernel
        return lambda x, out: kernel(x, out).add_(bias)  # [B, N]
    return lambda x, out: linear(x, weight, bias)  # [B, N]


@dataclass(frozen=True)
class LayerCalls:
    """One decoder layer's weights as the step calls them."""

    attn_norm: torch.Tensor  # [hidden]
    ffn_norm: torch.Tensor  # [hidden]
    eps: float
    qkv: Product  # [B, hidden] -> [B, (H + 2 Hkv) D], bias included
    o: Product  # [B, H D] -> [B, hidden]
    gate_up: Product  # [B, hidden] -> [B, 2I]
    down: Product  # [B, I] -> [B, hidden]


@dataclass(frozen=True)
class RowBuffers:
    """A step's buffers for B rows, whose contents never outlive the next call that reads them: the
    residual stream and its sum, alternating (each layer reads one and writes the other), the
    normed rows, the SiLU gate's output, and the products' outputs (each read by the next call)."""

    x: torch.Tensor  # [B, hidden]
    summed: torch.Tensor  # [B, hidden]
    normed: torch.Tensor  # [B, hidden]
    act: torch.Tensor  # [B, I]
    qkv: torch.Tensor  # [B, (H + 2 Hkv) D]
    o: torch.Tensor  # [B, hidden]
    gate_up: torch.Tensor  # [B, 2I]
    down: torch.Tensor  # [B, hidden]

    @classmethod
    def empty(cls, rows: int, hidden: int, intermediate: int, qkv: int, dtype: torch.dtype) -> "RowBuffers":
        widths = (hidden, hidden, hidden, intermediate, qkv, hidden, 2 * intermediate, hidden)
        return cls(*(torch.empty(rows, width, dtype=dtype) for width in widths))


class CpuDecodeStep:
    """A CPU decode step over bound layers (see the module's docstring). ``layers``: each decoder
    layer's weights as the step calls them, ``embed``/``head``/``rope``: the model's token lookup,
    final norm + LM head and rotary embedding."""

    def __init__(self, layers: list[LayerCalls], num_heads: int, num_kv_heads: int, head_dim: int, hidden: int,
                 intermediate: int, dtype: torch.dtype, embed: Callable[[torch.Tensor], torch.Tensor],
                 head: Callable[[torch.Tensor], torch.Tensor], rope):
        self.layers = layers
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.hidden, self.intermediate = hidden, intermediate
        self.dtype, self.embed, self.head, self.rope = dtype, embed, head, rope
        self._buffers: dict[int, RowBuffers] = {}  # rows -> buffers, made on a step of that many rows

    @staticmethod
    def takes(batch) -> bool:
        """Whether a model call is this step's: a decode step (one token a row) of up to MAX_ROWS rows."""
        return (isinstance(batch, ForwardBatch) and batch.is_decode and batch.num_new == 1
                and len(batch.rows) <= MAX_ROWS)

    @torch.inference_mode()
    def run(self, tokens: torch.Tensor, batch: ForwardBatch, backend: AttentionBackend) -> torch.Tensor:
        """tokens [B, 1] -> fp32 logits [B, 1, V], as :meth:`Transformer.forward` gives them."""
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        B = len(batch.rows)
        buffers = self._buffers.get(B)
        if buffers is None:
            buffers = self._buffers[B] = RowBuffers.empty(B, self.hidden, self.intermediate, (H + 2 * Hkv) * D,
                                                          self.dtype)
        x, summed, normed, act = buffers.x, buffers.summed, buffers.normed, buffers.act
        x.copy_(self.embed(tokens).view(B, -1))  # [B, hidden]
        cos, sin = self.rope.cos_sin(batch.positions, self.dtype)  # [B, 1, 1, D] each
        backend.begin(batch)
        residual = None  # the last layer's MLP output, added into the stream by the next norm
        for i, layer in enumerate(self.layers):
            if residual is None:
                row_ops.rms_norm_into(x, layer.attn_norm, layer.eps, normed)
            else:  # x <- summed + residual, normed <- its norm
                row_ops.add_rms_norm_into(summed, residual, layer.attn_norm, layer.eps, x, normed)
            qkv = layer.qkv(normed, buffers.qkv)  # [B, (H + 2 Hkv) D]
            # q, k, v and what attention returns are fresh per layer: a backend may keep them
            q, k, v = row_ops.rope_split_into(qkv, cos, sin, torch.empty(B, H, 1, D, dtype=self.dtype),
                                              torch.empty(B, Hkv, 1, D, dtype=self.dtype),
                                              torch.empty(B, Hkv, 1, D, dtype=self.dtype))  # [B, H|Hkv, 1, D]
            attended = backend.forward(i, q, k, v, batch)  # [B, H, 1, D]
            o = layer.o(attended.reshape(B, H * D), buffers.o)  # [B, hidden]
            row_ops.add_rms_norm_into(x, o, layer.ffn_norm, layer.eps, summed, normed)  # summed <- x + o
            gate_up = layer.gate_up(normed, buffers.gate_up)  # [B, 2I]
            residual = layer.down(row_ops.silu_mul_into(gate_up, act), buffers.down)  # [B, hidden]
        backend.end(batch)
        return self.head((summed + residual).view(B, 1, -1))  # [B, 1, V]
