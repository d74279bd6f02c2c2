"""Copies checkpoint tensors, named the Hugging Face way, into the model's fused parameters.

Both loaders (safetensors folders and GGUF files) translate names to the Hugging Face scheme
and call :meth:`WeightAssembler.put` one tensor at a time, so at most one source tensor is
held beside the model while loading.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import ModelLoadError
from ..model import DecoderLayer, Transformer
from ..quant import GivenRows, Int8Weight, int4_layout

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class WeightAssembler:
    """``spill`` (offload.tiers.streaming.WeightSpill) receives the layers the model keeps off the
    device: each is assembled in a host-memory staging layer, handed over once complete, and
    dropped, so no more than a layer or two of them is ever held. ``quantize`` ("int4", "int8"): every
    layer is assembled in a staging layer (the model was built with ``staged_layers``: on the compute
    device for a resident layer, in host memory for an off-device one) and quantized the moment its last
    tensor lands, in the layout of the device it will compute on; then it takes its place (off-device
    layers go to the store, so stores hold its codes) and its dense pages are freed: a GPU holds one
    dense layer at most, the one being converted, never the dense model. The embedding table and LM
    head are converted each as it lands. ``int8_projections``: (layer, fused weight) held in int8
    whatever ``quantize`` says (a file's finer projections: quant.finer_projections; resident layers
    only, a streamed layer's buffer holds one scheme)."""

    def __init__(self, model: Transformer, source: str, spill=None, quantize: str | None = None,
                 int8_projections: frozenset[tuple[int, str]] = frozenset()):
        if bool(quantize) != model.staged_layers:
            raise ValueError("a quantized load needs a model built with staged_layers=True, and only it")
        self.model, self.args, self.source = model, model.args, source
        self.loaded: set[str] = set()
        self.spill, self.quantize = spill, quantize
        if any(layer in model.offloaded for layer, _ in int8_projections) or (int8_projections and not quantize):
            raise ValueError("int8_projections are for resident layers of a quantized load")
        self.int8_projections = int8_projections
        self._staged: dict[int, tuple[nn.Module, set[str]]] = {}  # layer -> (staging layer, names still due)
        self._meta_layers: dict[int, nn.Module] = {}
        self._complete: set[int] = set()  # staged layers handed over (no tensor of theirs may follow)
        self._given: dict[int, dict[str, GivenRows]] = {}  # layer -> weight -> rows given in the scheme's form

    def _target(self, name: str) -> tuple[torch.Tensor, str] | None:
        """The parameter slice that checkpoint tensor ``name`` fills, and its coverage key."""
        a, m = self.args, self.model
        if name == "model.embed_tokens.weight":
            return m.embed, name
        if name == "model.norm.weight":
            return m.norm.weight, name
        if name == "lm_head.weight":
            # A tied checkpoint may still store the head: it is the embedding, so skip it.
            return (None if a.tie_word_embeddings else (m.lm_head, name))
        match = _LAYER.match(name)
        if not match:
            return None
        i, rest = int(match.group(1)), match.group(2)
        if i >= a.num_layers:
            raise ModelLoadError(f"{self.source}: tensor {name} names layer {i}, but the config has "
                                 f"{a.num_layers} layers")
        layer = m.layers[i]
        if rest == "input_layernorm.weight":
            return layer.attn_norm.weight, name
        if rest == "post_attention_layernorm.weight":
            return layer.ffn_norm.weight, name
        if rest in ("self_attn.q_norm.weight", "self_attn.k_norm.weight") and a.qk_norm:
            norm = layer.attn.q_norm if rest.startswith("self_attn.q") else layer.attn.k_norm
            return norm.weight, name
        bias = re.match(r"self_attn\.([qkv]_proj)\.bias$", rest)
        if bias:
            if layer.attn.bqkv is None:
                raise ModelLoadError(f"{self.source}: checkpoint has {name} but the config has no attention bias")
            _, _, lo, hi = self._projections()[f"self_attn.{bias.group(1)}.weight"]
            return layer.attn.bqkv[lo:hi], name
        if rest in self._projections():
            owner, weight, lo, hi = self._projections()[rest]
            return getattr(getattr(layer, owner), weight)[lo:hi], name
        return None

    def _projections(self) -> dict[str, tuple[str, str, int, int]]:
        """A layer's projection tensors (Hugging Face names) -> the fused weight that holds them
        (module, weight) and their rows lo..hi-1 there."""
        a = self.args
        q, kv, inter, hidden = a.q_size, a.kv_size, a.intermediate_size, a.hidden_size
        return {"self_attn.q_proj.weight": ("attn", "wqkv", 0, q),
                "self_attn.k_proj.weight": ("attn", "wqkv", q, q + kv),
                "self_attn.v_proj.weight": ("attn", "wqkv", q + kv, q + 2 * kv),
                "self_attn.o_proj.weight": ("attn", "wo", 0, hidden),
                "mlp.gate_proj.weight": ("mlp", "w_gate_up", 0, inter),
                "mlp.up_proj.weight": ("mlp", "w_gate_up", inter, 2 * inter),
                "mlp.down_proj.weight": ("mlp", "w_down", 0, hidden)}

    def target(self, name: str) -> torch.Tensor | None:
        """The parameter (slice) checkpoint tensor ``name`` fills, None if unused; a meta tensor for
        a layer kept off the device (its shape is what a source must provide)."""
        found = self._target(name)
        return None if found is None else found[0]

    def _stage(self, name: str) -> int | None:
        """For a tensor of an off-device layer (or of any layer of a quantized load): make sure its
        staging layer is in place."""
        match = _LAYER.match(name)
        if not match:
            return None
        i = int(match.group(1))
        if i not in self.model.offloaded and not self.quantize:
            return None
        if i in self._complete:
            raise ModelLoadError(f"{self.source}: tensor {name} arrives after layer {i} was complete (a duplicate)")
        if i not in self._staged:
            if self.spill is None and i in self.model.offloaded:
                raise ModelLoadError(f"layer {i} is placed off the device but no store receives its weights")
            self._meta_layers[i] = self.model.layers[i]
            where = "cpu" if i in self.model.offloaded else self.model.device
            self.model.layers[i] = DecoderLayer(self.args, where, self.model.dtype)
            due = {n for n in self.expected() if n.startswith(f"model.layers.{i}.")}
            self._staged[i] = (self.model.layers[i], due)
        return i

    def _arriving(self, name: str) -> tuple[torch.Tensor, str] | None:
        """The target of a checkpoint tensor that has just arrived (None: one the model does not use);
        a tensor of a layer already complete is a duplicate."""
        match = _LAYER.match(name)
        if match and int(match.group(1)) in self._complete:
            raise ModelLoadError(f"{self.source}: tensor {name} arrives after layer {match.group(1)} was complete "
                                 "(a duplicate)")
        target = self._target(name)
        return None if target is None or target[0] is None else target

    def put(self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Copy checkpoint tensor ``name`` into its parameter; ``rows`` = (start, end) copies a block
        of rows (large tensors arrive in pieces so that no second full-size copy is ever held)."""
        target = self._arriving(name)
        if target is None:
            return  # tensors we do not use (rotary caches, a tied head)
        staged = self._stage(name)
        dest, key = self._target(name) if staged is not None else target  # the staging layer's slice
        full = dest
        if rows is not None:
            dest = dest[rows[0]:rows[1]]
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ModelLoadError(f"{self.source}: tensor {name} has shape {tuple(tensor.shape)}, but the "
                                 f"config implies {tuple(dest.shape)}; config and weights do not match")
        with torch.no_grad():
            dest.copy_(tensor)
        more = rows is not None and rows[1] < full.shape[0]
        del dest, full, target  # views of the dense weight: the conversion in _landed must be able to free it
        if not more:
            self._landed(key, staged)

    def put_codes(self, name: str, parts: tuple[torch.Tensor, ...]) -> None:
        """A checkpoint tensor already in the form the model holds it in (``quantize``'s scheme for a
        projection, int8 for the embedding table or LM head): int4 (codes [N, K] in 0..15, scale and
        zero [N, K / 32]) or int8 (codes [N, K], scales [N, K / 32]), fp32 scales. Its dense form is
        never written: the layer's conversion takes these rows as they are."""
        if not self.quantize:
            raise ModelLoadError(f"{self.source}: tensor {name} given in a quantized form to a model loaded dense")
        target = self._arriving(name)
        if target is None:
            return
        dest, key = target
        codes = parts[0]
        if tuple(codes.shape) != tuple(dest.shape):
            raise ModelLoadError(f"{self.source}: tensor {name} has shape {tuple(codes.shape)}, but the "
                                 f"config implies {tuple(dest.shape)}; config and weights do not match")
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            table = Int8Weight.from_codes(codes, parts[1], self.model.dtype)
            self.loaded.add(key)
            self.model.quantize_int8_table("embed" if key == "model.embed_tokens.weight" else "lm_head", given=table)
            return
        weight, first_row = self._projection_rows(name)
        staged = self._stage(name)
        layer = int(_LAYER.match(name).group(1))
        self._given.setdefault(layer, {}).setdefault(weight, {})[first_row] = parts
        self._landed(key, staged)

    def scheme_of(self, name: str) -> str | None:
        """The scheme checkpoint tensor ``name`` is held in: a projection's fused weight's (int8 for a
        finer one, else ``quantize``), ``quantize`` for anything else (None: a dense load)."""
        match = _LAYER.match(name)
        if match and match.group(2) in self._projections():
            weight = self._projections()[match.group(2)][1]
            if (int(match.group(1)), weight) in self.int8_projections:
                return "int8"
        return self.quantize

    def _projection_rows(self, name: str) -> tuple[str, int]:
        """Which fused projection weight a checkpoint's projection tensor is part of, and its first row."""
        rest = _LAYER.match(name).group(2)
        if rest not in self._projections():
            raise ModelLoadError(f"{self.source}: tensor {name} is not a projection weight; only those and the "
                                 "embedding table or LM head load in a quantized form")
        _, weight, first_row, _ = self._projections()[rest]
        return weight, first_row

    def _landed(self, key: str, staged: int | None) -> None:
        """Tensor ``key`` is complete: convert its table or layer once that is whole."""
        self.loaded.add(key)
        if staged is None and self.quantize and key in ("model.embed_tokens.weight", "lm_head.weight"):
            # as it lands: one dense table at a time
            self.model.quantize_int8_table("embed" if key == "model.embed_tokens.weight" else "lm_head")
        if staged is not None:
            module, due = self._staged[staged]
            due.discard(key)
            if not due:  # the layer is complete: to the store or into place, and its dense staging copy goes
                if self.quantize:  # packed for the device the layer will compute on, not the staging host
                    module.quantize(self.quantize, self._given.pop(staged, None), int4_layout(self.model.device),
                                    frozenset(w for layer, w in self.int8_projections if layer == staged))
                if staged in self.model.offloaded:
                    self.spill.put_layer(staged, module)
                    self.model.layers[staged] = self._meta_layers.pop(staged)
                else:
                    self.model.layers[staged] = module
                    del self._meta_layers[staged]
                del self._staged[staged]
                self._complete.add(staged)

    def expected(self) -> set[str]:
        a = self.args
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        if not a.tie_word_embeddings:
            names.add("lm_head.weight")
        per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
                     "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
        if a.attention_bias:
            per_layer += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
        if a.qk_norm:
            per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
        for i in range(a.num_layers):
            names.update(f"model.layers.{i}.{p}" for p in per_layer)
        return names

    def finish(self) -> None:
        missing = sorted(self.expected() - self.loaded)
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise ModelLoadError(f"{self.source}: checkpoint is missing tensors: {shown}; the download is "
                                 f"incomplete or the config does not match the weights")
