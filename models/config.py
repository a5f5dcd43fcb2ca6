"""The architecture of a Llama-family decoder, read from HF `config.json` or GGUF metadata."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# HF `model_type` -> whether the q/k/v projections carry a bias by default.
SUPPORTED_MODEL_TYPES = {"llama": False, "qwen2": True}
ROPE_TYPES = ("default", "llama3", "linear")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF `rope_scaling`).

    `rope_type` "llama3" uses `factor`, `low_freq_factor`, `high_freq_factor` and
    `original_max_position_embeddings`; "linear" divides every frequency by `factor`.
    """

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported RoPE scaling {self.rope_type!r}; supported: {ROPE_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"RoPE scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"llama3 RoPE scaling needs high_freq_factor > low_freq_factor, got "
                             f"{self.high_freq_factor} <= {self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static architecture of a Llama-family decoder (hashable).

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_layers: the usual sizes.
      num_heads, num_kv_heads, head_dim: query heads, KV heads (GQA), per-head width.
      rms_norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base; `rope_scaling` optional frequency scaling; `rope_freq_factors`
        optional per-frequency divisors (GGUF `rope_freqs`), `head_dim // 2` of them.
      max_position_embeddings: the context the model was trained for (informative).
      tie_word_embeddings: the output projection is the token embedding.
      qkv_bias, o_bias, mlp_bias: which projections carry a bias (Qwen2: q/k/v).
      model_type: "llama" or "qwen2" (for messages).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig: num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(f"LlamaConfig.rope_freq_factors must have head_dim // 2 = {self.head_dim // 2} "
                             f"entries, got {len(self.rope_freq_factors)}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> LlamaConfig:
        """From a HF `config.json` dict (`model_type` "llama" or "qwen2")."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = cfg.get("architectures")
            raise ValueError(f"unknown architecture: model_type={model_type!r} (architectures={archs}); "
                             f"supported model types: {sorted(SUPPORTED_MODEL_TYPES)}")
        if cfg.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in cfg]
        if missing:
            raise ValueError(f"config.json lacks {missing}")
        heads = cfg["num_attention_heads"]
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling_from_hf(cfg.get("rope_scaling")),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=SUPPORTED_MODEL_TYPES[model_type] or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            model_type=model_type,
        )


def _rope_scaling_from_hf(scaling: Mapping[str, Any] | None) -> RopeScaling | None:
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    return RopeScaling(rope_type=rope_type, **{k: v for k, v in scaling.items() if k in fields})
