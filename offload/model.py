"""A Llama-family decoder in plain torch: Llama 2/3.x, Mistral, Qwen2/2.5 (QKV bias), Qwen3 (q/k norm).

Weights are stored fused where that saves kernel launches (q|k|v in one matrix, gate|up in one
matrix). Attention goes through an :class:`~offload.attention.AttentionBackend`, the seam that
sparse and offloaded attention replace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBackend, ForwardBatch, MixedBatch
from .config import ModelArgs
from .decode_step import CpuDecodeStep, LayerCalls, bind_product, binds
from .kernels import row_ops
from .quant import GivenRows, Int4Weight, Int8Weight, embedding, empty_weight, linear, quantize_weight
from .rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device, dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if row_ops.row_ops_apply(x):  # a decode step on the CPU: one compiled call, the same numbers
            return row_ops.rms_norm(x, self.weight, self.eps)
        # Normalise in fp32, scale in the compute dtype (the reference implementation's order).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def _param(shape: tuple[int, ...], device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)


def _weight(shape: tuple[int, int], device, dtype, quantize: str | None) -> nn.Parameter | Int4Weight | Int8Weight:
    """A projection weight [N, K]: dense, or an empty quantized one (a streaming buffer the store fills)."""
    return empty_weight(shape, quantize, dtype, device) if quantize else _param(shape, device, dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, device, dtype, quantize: str | None = None):
        super().__init__()
        self.args = args
        self.wqkv = _weight((args.q_size + 2 * args.kv_size, args.hidden_size), device, dtype, quantize)
        self.bqkv = _param((args.q_size + 2 * args.kv_size,), device, dtype) if args.attention_bias else None
        self.wo = _weight((args.hidden_size, args.q_size), device, dtype, quantize)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps, device, dtype)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps, device, dtype)

    def forward(self, x: torch.Tensor, layer: int, cos: torch.Tensor, sin: torch.Tensor,
                batch: ForwardBatch | MixedBatch, backend: AttentionBackend) -> torch.Tensor:
        a = self.args
        B, T, _ = x.shape
        qkv = linear(x, self.wqkv, self.bqkv)  # [B, T, (H + 2 Hkv) D]
        if not a.qk_norm and row_ops.row_ops_apply(qkv):  # the split and RoPE as one compiled call
            q, k, v = row_ops.rope_split(qkv, cos, sin, a.num_heads, a.num_kv_heads, a.head_dim)  # [B, H|Hkv, T, D]
        else:
            q, k, v = qkv.split((a.q_size, a.kv_size, a.kv_size), dim=-1)
            q = q.view(B, T, a.num_heads, a.head_dim).transpose(1, 2)  # [B, H, T, D]
            k = k.view(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
            v = v.view(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
            if a.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q = RotaryEmbedding.apply(q, cos, sin)  # [B, H, T, D]
            k = RotaryEmbedding.apply(k, cos, sin)  # [B, Hkv, T, D]
        if isinstance(batch, MixedBatch):  # B == 1: the parts laid end to end
            out = backend.forward_mixed(layer, q, k, v, batch)  # [1, H, N, D]
        else:
            out = backend.forward(layer, q, k, v, batch)  # [B, H, T, D]
        out = out.transpose(1, 2).reshape(B, T, a.q_size)  # [B, T, H D]
        return linear(out, self.wo)  # [B, T, hidden]


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, device, dtype, quantize: str | None = None):
        super().__init__()
        self.intermediate = args.intermediate_size
        self.w_gate_up = _weight((2 * args.intermediate_size, args.hidden_size), device, dtype, quantize)
        self.w_down = _weight((args.hidden_size, args.intermediate_size), device, dtype, quantize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = linear(x, self.w_gate_up)  # [B, T, 2I]
        if row_ops.row_ops_apply(gate_up):
            return linear(row_ops.silu_mul(gate_up), self.w_down)  # [B, T, hidden]
        gate, up = gate_up.split(self.intermediate, dim=-1)  # [B, T, I] each
        return linear(F.silu(gate) * up, self.w_down)  # [B, T, hidden]


class DecoderLayer(nn.Module):
    """``quantize``: "int4" or "int8" builds the projections as empty quantized weights (a streaming
    buffer for quantized layers); a layer loaded dense is converted with :meth:`quantize`."""

    def __init__(self, args: ModelArgs, device, dtype, quantize: str | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)
        self.attn = Attention(args, device, dtype, quantize)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)
        self.mlp = MLP(args, device, dtype, quantize)

    def quantize(self, scheme: str, given: dict[str, GivenRows] | None = None, layout: str | None = None,
                 int8: frozenset[str] = frozenset()) -> None:
        """Hold the four projection weights in ``scheme`` ("int4" or "int8" groups: fused kernels);
        the norms and the QKV bias stay in the compute dtype. Each dense weight is freed as its
        replacement lands. ``given``: weight name ("wqkv", "wo", "w_gate_up", "w_down") -> rows a
        checkpoint held in the scheme's form already (their dense rows are never read). ``layout``:
        int4's, that of the device the products will run on (a host staging layer of a GPU run is
        packed for the GPU); default: the layer's device's. ``int8``: weights held in int8 whatever the
        scheme (those a file gives in a finer type: quant.finer_projections)."""
        for owner, name in ((self.attn, "wqkv"), (self.attn, "wo"), (self.mlp, "w_gate_up"), (self.mlp, "w_down")):
            dense = getattr(owner, name)
            held = "int8" if name in int8 else scheme
            quantized = quantize_weight(dense.detach(), held, dense.dtype, (given or {}).get(name), layout)
            delattr(owner, name)  # a registered parameter gives way to the weight module
            setattr(owner, name, quantized)

    def forward(self, x, layer, cos, sin, batch, backend):
        attended = self.attn(self.attn_norm(x), layer, cos, sin, batch, backend)  # [B, T, hidden]
        if row_ops.row_ops_apply(x):  # the residual add and the next norm as one compiled call
            h, normed = row_ops.add_rms_norm(x, attended, self.ffn_norm.weight, self.ffn_norm.eps)  # [B, T, hidden] x2
        else:
            h = x + attended  # [B, T, hidden]
            normed = self.ffn_norm(h)  # [B, T, hidden]
        return h + self.mlp(normed)  # [B, T, hidden]


class Transformer(nn.Module):
    """The decoder. ``forward`` runs one prefill chunk or one decode step."""

    def __init__(self, args: ModelArgs, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 offloaded: frozenset[int] = frozenset(), staged_layers: bool = False):
        super().__init__()
        self.args, self.device, self.dtype = args, torch.device(device), dtype
        # Layers whose weights live in another tier have no storage here (meta tensors): a
        # LayerStreamer (offload.tiers) lends them a device buffer for the time they compute.
        self.offloaded = frozenset(offloaded)
        # staged_layers: every layer starts as meta tensors too, and the loader assembles each in a
        # staging layer and puts it in place once converted (a quantized load: the device never holds
        # the dense model).
        self.staged_layers = staged_layers
        self.streamer = None
        self.embed = _param((args.vocab_size, args.hidden_size), device, dtype)
        self.layers = nn.ModuleList(DecoderLayer(args, "meta" if i in self.offloaded or staged_layers else device, dtype)
                                    for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)
        self.lm_head = self.embed if args.tie_word_embeddings else _param(
            (args.vocab_size, args.hidden_size), device, dtype)
        self.rope = RotaryEmbedding(args, self.device)
        self.decode_step: CpuDecodeStep | None = None  # bound by bind_decode_step once the weights are final

    def bind_decode_step(self) -> None:
        """Bind the CPU decode step (:mod:`offload.decode_step`: decode steps of a few rows, the same
        numbers with the calls between the products bound once) to the weights as they are now: call
        it when they are final (loaded, quantized, flash FFNs in place). A model it does not apply to
        (not bf16 on the CPU, layers streamed, a flash FFN, q/k norm) keeps the generic path."""
        self.decode_step = None
        plain = (binds(self.device.type, self.dtype == torch.bfloat16, self.args.qk_norm, streamed=self.offloaded)
                 and all(type(layer.mlp) is MLP for layer in self.layers))
        if not plain:
            return
        layers = [LayerCalls(attn_norm=layer.attn_norm.weight, ffn_norm=layer.ffn_norm.weight, eps=layer.attn_norm.eps,
                             qkv=bind_product(layer.attn.wqkv, layer.attn.bqkv), o=bind_product(layer.attn.wo),
                             gate_up=bind_product(layer.mlp.w_gate_up), down=bind_product(layer.mlp.w_down))
                  for layer in self.layers]
        a = self.args
        self.decode_step = CpuDecodeStep(layers, a.num_heads, a.num_kv_heads, a.head_dim, a.hidden_size,
                                         a.intermediate_size, self.dtype, self.embed_tokens, self.head, self.rope)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, batch: ForwardBatch | MixedBatch, backend: AttentionBackend,
                all_logits: bool = False) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (all positions) or [B, 1, V] (last position), fp32.

        A :class:`MixedBatch` takes its parts' tokens end to end, [1, N], and returns the logits of
        its ``logit_index`` positions, [1, M, V]."""
        if self.decode_step is not None and CpuDecodeStep.takes(batch):
            return self.decode_step.run(tokens, batch, backend)  # [B, 1, V]
        x = self.embed_tokens(tokens)  # [B, T, hidden]
        cos, sin = self.rope.cos_sin(batch.positions, self.dtype)  # [B, 1, T, D]
        parts = batch.parts if isinstance(batch, MixedBatch) else [batch]
        for part in parts:
            backend.begin(part)
        for i, layer in enumerate(self.layers):
            streamed = i in self.offloaded
            if streamed:  # load (already in flight), compute, release
                layer = self.streamer.acquire(i)
            x = layer(x, i, cos, sin, batch, backend)
            if streamed:
                self.streamer.release(i)
        for part in parts:
            backend.end(part)
        if isinstance(batch, MixedBatch):
            return self.head(x[:, batch.logit_index])  # [1, M, V]
        if not all_logits:
            x = x[:, -1:]  # [B, 1, hidden]: prefill needs only the last position's logits
        return self.head(x)  # [B, T or 1, V]

    @torch.inference_mode()
    def prefill_layer_major(self, chunks: list[tuple[torch.Tensor, ForwardBatch]], backend: AttentionBackend,
                            all_logits: bool = False, last: bool = True) -> list[torch.Tensor]:
        """Consecutive chunks of one row's prompt, (tokens [1, T], batch) in order, run layer by layer
        (FlexGen's order) -> per chunk logits [1, T or 1, V] as :meth:`forward` gives them. Each
        streamed layer is loaded once for all of them, and a layer whose KV lives on disk has its
        rows in memory only while it runs (``backend.prefill_pass``; ``last``: these chunks end the
        prompt): chunk by chunk, every chunk would load every streamed layer again and read each disk
        layer's prefix back (quadratic bytes). The price: the chunks' hidden states are held at
        once, [n, hidden] in the compute dtype (the engine bounds n)."""
        xs = [self.embed_tokens(tokens) for tokens, _ in chunks]  # per chunk [1, T, hidden]
        rope = [self.rope.cos_sin(batch.positions, self.dtype) for _, batch in chunks]  # per chunk [1, 1, T, D] x2
        start, upto = chunks[0][1].start_lengths[0], chunks[-1][1].end_lengths[0]
        for i, layer in enumerate(self.layers):
            streamed = i in self.offloaded
            if streamed:
                layer = self.streamer.acquire(i)
            with backend.prefill_pass(i, start, upto, last):
                for c, (_, batch) in enumerate(chunks):
                    backend.begin(batch)  # masks are per chunk: rebuilt per layer, never all held at once
                    xs[c] = layer(xs[c], i, *rope[c], batch, backend)
                    backend.end(batch)
            if streamed:
                self.streamer.release(i)
        return [self.head(x if all_logits else x[:, -1:]) for x in xs]  # per chunk [1, T or 1, V]

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return embedding(tokens, self.embed)  # [B, T, hidden]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: x [B, T, hidden] -> fp32 logits [B, T, V]."""
        return linear(self.norm(x), self.lm_head).float()

    def quantize_int8_table(self, which: str, given: Int8Weight | None = None) -> None:
        """Hold the embedding table (``which="embed"``) or the LM head (``"lm_head"``) in int8: every
        decode step reads the whole head, half the bytes of bf16. A tied head is the embedding
        table: converting it converts both. The loader converts each table as it lands, so the
        dense form of only one is held beside the int8 ones; ``given``: the table as a checkpoint
        held it in int8 already (a GGUF Q8_0 table: its dense form is never written)."""
        if which == "embed":
            tied = self.lm_head is self.embed
            table = given.to(self.device) if given is not None else Int8Weight.from_float(self.embed.detach(), self.dtype)
            del self.embed  # a registered parameter gives way to the weight module
            self.embed = table
            if tied:
                del self.lm_head
                self.lm_head = table
        elif which == "lm_head":
            table = (given.to(self.device) if given is not None
                     else Int8Weight.from_float(self.lm_head.detach(), self.dtype))
            del self.lm_head
            self.lm_head = table
        else:
            raise ValueError(f"quantize_int8_table takes 'embed' or 'lm_head', got {which!r}")
