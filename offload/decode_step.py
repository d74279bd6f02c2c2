"""One decode step of a single sequence on the CPU with every call between the products bound once.

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
to one row and one token (a server's batches keep the generic path), with every layer resident
and of the plain form (no weights streamed, no flash FFN, no q/k norm): :meth:`for_model` says
None otherwise. Bound once the weights are final (:meth:`Transformer.bind_decode_step`).

Shapes: H query heads, Hkv KV heads, D head_dim, hidden = the model's width, I = its FFN width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention import AttentionBackend, ForwardBatch
from .kernels import row_ops
from .quant import Int4Weight, Int8Weight, linear

# A projection bound to its weight: x [1, K] in the compute dtype -> [1, N].
Product = Callable[[torch.Tensor], torch.Tensor]


def bind_product(weight: torch.Tensor | Int4Weight | Int8Weight, bias: torch.Tensor | None = None) -> Product:
    """``linear(x, weight, bias)`` for one row, with what it decides per call decided now: an int4
    weight on the CPU is the fused kernel on bf16 rows (what :func:`linear` runs for fewer than
    INT4_GEMM_ROWS rows, without its checks and reshapes); any other weight goes through linear."""
    if isinstance(weight, Int4Weight) and weight.packed.is_cpu and weight.dtype == torch.bfloat16:
        packed, group, scales_zeros = weight.packed, weight.group, weight.scales_zeros
        kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
        if bias is None:
            return lambda x: kernel(x, packed, group, scales_zeros)  # [1, N]
        return lambda x: kernel(x, packed, group, scales_zeros) + bias  # [1, N]
    return lambda x: linear(x, weight, bias)  # [1, N]


@dataclass(frozen=True)
class LayerCalls:
    """One decoder layer's weights as the step calls them."""

    attn_norm: torch.Tensor  # [hidden]
    ffn_norm: torch.Tensor  # [hidden]
    eps: float
    qkv: Product  # [1, hidden] -> [1, (H + 2 Hkv) D], bias included
    o: Product  # [1, H D] -> [1, hidden]
    gate_up: Product  # [1, hidden] -> [1, 2I]
    down: Product  # [1, I] -> [1, hidden]


class CpuDecodeStep:
    """A single-row CPU decode step over bound layers (see the module's docstring). ``layers``: the
    decoder layers (:class:`offload.model.DecoderLayer`, plain form), ``embed``/``head``/``rope``:
    the model's token lookup, final norm + LM head and rotary embedding."""

    def __init__(self, layers: list[LayerCalls], num_heads: int, num_kv_heads: int, head_dim: int, hidden: int,
                 intermediate: int, dtype: torch.dtype, embed: Callable[[torch.Tensor], torch.Tensor],
                 head: Callable[[torch.Tensor], torch.Tensor], rope):
        self.layers = layers
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dtype, self.embed, self.head, self.rope = dtype, embed, head, rope
        # The residual stream and its normed form, alternating between two buffers: each layer reads
        # one and writes the other. Buffers whose contents never outlive the next call are reused;
        # q, k, v and what attention returns are fresh per layer (a backend may keep them).
        self.x = torch.empty(1, hidden, dtype=dtype)  # [1, hidden]
        self.summed = torch.empty(1, hidden, dtype=dtype)  # [1, hidden]
        self.normed = torch.empty(1, hidden, dtype=dtype)  # [1, hidden]
        self.act = torch.empty(1, intermediate, dtype=dtype)  # [1, I]

    @staticmethod
    def takes(batch) -> bool:
        """Whether a model call is this step's: a decode of one row, one token."""
        return isinstance(batch, ForwardBatch) and batch.is_decode and len(batch.rows) == 1 and batch.num_new == 1

    @torch.inference_mode()
    def run(self, tokens: torch.Tensor, batch: ForwardBatch, backend: AttentionBackend) -> torch.Tensor:
        """tokens [1, 1] -> fp32 logits [1, 1, V], as :meth:`Transformer.forward` gives them."""
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        x, summed, normed, act = self.x, self.summed, self.normed, self.act
        x.copy_(self.embed(tokens).view(1, -1))  # [1, hidden]
        cos, sin = self.rope.cos_sin(batch.positions, self.dtype)  # [1, 1, 1, D] each
        backend.begin(batch)
        residual = None  # the last layer's MLP output, added into the stream by the next norm
        for i, layer in enumerate(self.layers):
            if residual is None:
                row_ops.rms_norm_into(x, layer.attn_norm, layer.eps, normed)
            else:  # x <- summed + residual, normed <- its norm
                row_ops.add_rms_norm_into(summed, residual, layer.attn_norm, layer.eps, x, normed)
            qkv = layer.qkv(normed)  # [1, (H + 2 Hkv) D]
            q, k, v = row_ops.rope_split_into(qkv, cos, sin, torch.empty(1, H, 1, D, dtype=self.dtype),
                                              torch.empty(1, Hkv, 1, D, dtype=self.dtype),
                                              torch.empty(1, Hkv, 1, D, dtype=self.dtype))  # [1, H|Hkv, 1, D]
            attended = backend.forward(i, q, k, v, batch)  # [1, H, 1, D]
            o = layer.o(attended.reshape(1, H * D))  # [1, hidden]
            row_ops.add_rms_norm_into(x, o, layer.ffn_norm, layer.eps, summed, normed)  # summed <- x + o
            residual = layer.down(row_ops.silu_mul_into(layer.gate_up(normed), act))  # [1, hidden]
        backend.end(batch)
        return self.head((summed + residual).view(1, 1, -1))  # [1, 1, V]
