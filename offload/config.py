"""Model hyper-parameters: one frozen, self-validating dataclass for every supported family.

``ModelArgs`` is built from a Hugging Face ``config.json`` (:meth:`ModelArgs.from_hf_config`),
from GGUF metadata (see :mod:`offload.loaders.gguf`) or from a named preset
(:func:`preset`), so that a user can plan for a model whose weights are not on disk.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ModelLoadError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

# Leading layers a sparse KV policy leaves dense (their attention is broad: no small selection holds
# it). Measured on the default model (BENCHMARKS.md, 2026-12-03): with every layer sparse, the cluster
# index at 3% captures 0.43 of layer 0's attention mass at 8K and 0.82 of layer 1's, as much as
# layers 2-8 (0.72-0.86); with layer 1 sparse too the 32K mass is 0.900 (0.905 with two dense
# layers), and passkeys and 128 greedy tokens at 8K equal dense for cluster, retrieval and shadowkv.
# Quest and RetrievalAttention keep two; at 128K each dense layer reads the whole KV (a third of
# the sparse step of a 1B model), so only the one that needs it stays.
DENSE_LAYERS = 1

# config.json "architectures" entries that map onto the families above.
_HF_ARCH_CLASSES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are adjusted for contexts beyond pre-training.

    kind: "linear" (positions divided by ``factor``), "llama3" (Llama 3.1's band-wise
    rescaling), "yarn", or "freq_factors" (explicit per-frequency divisors, as GGUF
    files of Llama 3.1 carry in the ``rope_freqs`` tensor).
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    freq_factors: tuple[float, ...] | None = None

    KINDS = ("linear", "llama3", "yarn", "freq_factors")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise UnsupportedModelError(
                f"rope_scaling type '{self.kind}' is not supported; supported types: "
                f"{', '.join(self.KINDS)} (or no rope_scaling)"
            )
        if self.kind != "freq_factors" and not self.factor > 0:
            raise ModelLoadError(f"rope_scaling factor must be positive, got {self.factor}")

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any] | None) -> "RopeScaling | None":
        if not raw:
            return None
        kind = raw.get("rope_type", raw.get("type"))
        if kind in (None, "default"):
            return None
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in fields and v is not None}
        kwargs.pop("kind", None)
        return cls(kind=kind, **kwargs)


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a decoder-only Llama-family transformer."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False  # bias on q, k and v projections (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # keys older than this many positions are masked
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    name: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture '{self.architecture}': offload runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} models"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelLoadError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ModelLoadError("model config: rms_norm_eps and rope_theta must be positive")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ModelLoadError(f"model config: sliding_window must be positive, got {self.sliding_window}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def group_size(self) -> int:
        """Query heads served by one KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V for one token across all layers."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def layer_param_count(self) -> int:
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        norms = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return attn + mlp + norms

    def param_count(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self.hidden_size + self.num_layers * self.layer_param_count()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str = "config.json") -> "ModelArgs":
        """Build from a Hugging Face ``config.json`` dictionary, rejecting what we cannot run."""
        model_type = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        arch = model_type if model_type in SUPPORTED_ARCHITECTURES else None
        if arch is None:
            arch = next((_HF_ARCH_CLASSES[a] for a in archs if a in _HF_ARCH_CLASSES), None)
        if arch is None:
            found = model_type or (archs[0] if archs else "none given")
            raise UnsupportedModelError(
                f"{source}: unsupported architecture '{found}': offload runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} models (Llama 2/3.x, Mistral, Qwen2/2.5/3)"
            )
        if cfg.get("mlp_bias"):
            raise UnsupportedModelError(f"{source}: mlp_bias=true is not supported")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            head_dim = cfg.get("head_dim") or hidden // heads
            # transformers >= 5 nests rope settings under "rope_parameters".
            rope_params = dict(cfg.get("rope_parameters") or {})
            rope_theta = float(cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
            rope_raw = cfg.get("rope_scaling") or rope_params or None
            sliding = cfg.get("sliding_window")
            if arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
                sliding = None  # Qwen configs carry a window that is off unless enabled
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=RopeScaling.from_hf(rope_raw),
                attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
                qk_norm=arch == "qwen3",
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                sliding_window=int(sliding) if sliding else None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                name=str(cfg.get("_name_or_path", "")),
            )
        except KeyError as e:
            raise ModelLoadError(f"{source}: missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: invalid value ({e})") from None

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


# Presets: shapes of popular checkpoints, for planning and dummy-weight benchmarks.
_PRESETS: dict[str, ModelArgs] = {}


def _register(name: str, **kw: Any) -> None:
    _PRESETS[name] = ModelArgs(name=name, **kw)


_register("llama-3.1-8b", architecture="llama", vocab_size=128256, hidden_size=4096,
          intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
          max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
          rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=8192),
          bos_token_id=128000, eos_token_ids=(128001, 128008, 128009))
_register("llama-3.2-1b", architecture="llama", vocab_size=128256, hidden_size=2048,
          intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
          max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
          rope_scaling=RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=8192),
          tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009))
_register("qwen2.5-7b", architecture="qwen2", vocab_size=152064, hidden_size=3584,
          intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
          max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
          rope_scaling=RopeScaling("yarn", factor=4.0, original_max_position_embeddings=32768),
          attention_bias=True, bos_token_id=151643, eos_token_ids=(151645, 151643))
_register("qwen3-8b", architecture="qwen3", vocab_size=151936, hidden_size=4096,
          intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
          max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True,
          bos_token_id=151643, eos_token_ids=(151645,))
_register("mistral-7b", architecture="mistral", vocab_size=32768, hidden_size=4096,
          intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
          max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
          bos_token_id=1, eos_token_ids=(2,))
_register("smollm2-135m", architecture="llama", vocab_size=49152, hidden_size=576,
          intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
          max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
          tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,))


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def preset(name: str) -> ModelArgs:
    """Hyper-parameters of a well-known checkpoint, by name (see :func:`preset_names`)."""
    key = name.lower()
    if key not in _PRESETS:
        raise ModelLoadError(f"unknown preset '{name}'; known presets: {', '.join(preset_names())}")
    return _PRESETS[key]
