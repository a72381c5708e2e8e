"""One decoder configuration covers OPT, GPT-2 and the LLaMA family.

Every supported architecture is a decoder-only transformer that differs in a handful of switches
(norm kind, pre/post norm, learned or rotary positions, gated MLP, biases, q/k norms). One frozen
dataclass names those switches; the Hugging Face adapters in `hf.py` translate config.json to it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Optional

Norm = Literal["layernorm", "rmsnorm"]
Positions = Literal["learned", "rope"]
Activation = Literal["relu", "gelu", "gelu_new", "silu"]
RopeType = Literal["default", "linear", "llama3"]


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and switches of a decoder-only transformer.

    Attributes:
      model_type: Hugging Face model_type this config round-trips to ("opt", "gpt2", "llama",
        "qwen2", "qwen3").
      vocab_size, hidden_size, num_layers, num_heads: the usual.
      num_kv_heads: key/value heads (grouped-query attention when smaller than num_heads).
      head_dim: per-head width; defaults to hidden_size // num_heads.
      intermediate_size: MLP width.
      max_positions: learned position table size (without OPT's offset) or rope's context.
      norm, norm_eps, pre_norm: norm kind, epsilon, and whether norms come before the sublayers.
      final_norm: whether a norm follows the last block.
      positions, position_offset: learned tables (OPT offsets positions by 2) or rotary.
      rope_theta, rope_type, rope_factor, rope_low_freq_factor, rope_high_freq_factor,
        rope_original_max_positions: rotary frequencies and their scaling.
      activation, gated_mlp: MLP non-linearity and whether it is gate * up (LLaMA).
      qkv_bias, out_bias, mlp_bias, norm_bias: which layers carry biases.
      qk_norm: RMSNorm on queries and keys per head (Qwen3).
      tie_embeddings: the LM head reuses the token embedding.
      embed_dim: width of the token embedding when it differs from hidden_size (OPT-350m's
        word_embed_proj_dim, with project_in / project_out).
      extra: other Hugging Face config fields, kept for export.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int = 2048
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    pre_norm: bool = True
    final_norm: bool = True
    positions: Positions = "learned"
    position_offset: int = 0
    rope_theta: float = 10000.0
    rope_type: RopeType = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    activation: Activation = "relu"
    gated_mlp: bool = False
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    norm_bias: bool = True
    qk_norm: bool = False
    tie_embeddings: bool = True
    embed_dim: Optional[int] = None
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {value!r}")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                                 f"{self.num_heads}; give head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.embed_dim is None:
            object.__setattr__(self, "embed_dim", self.hidden_size)
        for name in ("num_kv_heads", "head_dim", "embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        checks = {"norm": Norm, "positions": Positions, "activation": Activation,
                  "rope_type": RopeType}
        for name, lit in checks.items():
            if getattr(self, name) not in lit.__args__:
                raise ValueError(f"DecoderConfig.{name}={getattr(self, name)!r}; expected one of "
                                 f"{lit.__args__}")

    @property
    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, e, f, hd = self.hidden_size, self.embed_dim, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = d * q + 2 * d * kv + q * d
        attn += (q + 2 * kv) * self.qkv_bias + d * self.out_bias
        mlp = (3 if self.gated_mlp else 2) * d * f + (f * (2 if self.gated_mlp else 1) + d) * self.mlp_bias
        norms = 2 * d * (2 if self.norm_bias and self.norm == "layernorm" else 1)
        block = attn + mlp + norms + (2 * hd if self.qk_norm else 0)
        outer = self.vocab_size * e * (1 if self.tie_embeddings else 2)
        if self.positions == "learned":
            outer += (self.max_positions + self.position_offset) * d
        if e != d:
            outer += 2 * e * d
        if self.final_norm:
            outer += d * (2 if self.norm_bias and self.norm == "layernorm" else 1)
        return outer + self.num_layers * block

    def replace(self, **kw) -> "DecoderConfig":
        """A copy with fields replaced; derived widths follow unless given or set explicitly."""
        derived = {"num_kv_heads": self.num_heads, "head_dim": self.hidden_size // self.num_heads,
                   "embed_dim": self.hidden_size}
        for name, default in derived.items():
            if name not in kw and getattr(self, name) == default:
                kw[name] = None
        return dataclasses.replace(self, **kw)


def _opt(layers: int, d: int, heads: int) -> DecoderConfig:
    return DecoderConfig(model_type="opt", vocab_size=50272, hidden_size=d, num_layers=layers,
                         num_heads=heads, intermediate_size=4 * d, max_positions=2048,
                         position_offset=2, activation="relu")


def _gpt2(layers: int, d: int, heads: int) -> DecoderConfig:
    return DecoderConfig(model_type="gpt2", vocab_size=50257, hidden_size=d, num_layers=layers,
                         num_heads=heads, intermediate_size=4 * d, max_positions=1024,
                         activation="gelu_new")


# Shapes of the reference's nanoGPT table, for benchmarks with random weights.
PRESETS: dict[str, DecoderConfig] = {
    "gpt2": _gpt2(12, 768, 12),
    "gpt2_medium": _gpt2(24, 1024, 16),
    "gpt2_large": _gpt2(36, 1280, 20),
    "gpt2_xl": _gpt2(48, 1600, 25),
    "opt_125m": _opt(12, 768, 12),
    "opt_350m": _opt(24, 1024, 16),
    "opt_1_3b": _opt(24, 2048, 32),
    "opt_2_7b": _opt(32, 2560, 32),
    "opt_6_7b": _opt(32, 4096, 32),
    "opt_13b": _opt(40, 5120, 40),
    "opt_30b": _opt(48, 7168, 56),
    "opt_66b": _opt(64, 9216, 72),
    "opt_175b": _opt(96, 12288, 96),
}


def preset(name: str, **overrides) -> DecoderConfig:
    """A shape-only config by name (see PRESETS), optionally with fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def rope_inv_freq(cfg: DecoderConfig):
    """Rotary inverse frequencies (numpy float32, [head_dim // 2]) with the config's scaling."""
    import numpy as np

    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        low_wl = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
        high_wl = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / cfg.rope_factor, inv)
        smooth = (cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)
