"""Hugging Face adapters: config.json <-> DecoderConfig, and tensor names <-> parameter paths.

Each architecture is a page: a config translation and a table that says, for every leaf of our
parameter dicts, which Hugging Face tensor it comes from and how (transposed Linear, copied, or a
third of GPT-2's fused c_attn).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from zo2_jax.models.config import DecoderConfig

# How a Hugging Face tensor becomes our leaf: "T" transposes an nn.Linear weight [out, in] into a
# kernel [in, out]; "copy" keeps it; ("qkv", j) takes the j-th third of the last axis.
Spec = tuple[str, Any]


# Largest width, count or length a config may declare: past every real model (vocabularies of
# ~256k, contexts of ~10M), and small enough that nothing sized by it (rope tables) can exhaust
# memory before the tensors' own shapes are compared with it.
MAX_SIZE = 2 ** 24


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not supported."""


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match its config."""


# config.json keys by the kind of value they must hold, when present and not null.
_SIZE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings",
              "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "ffn_dim",
              "word_embed_proj_dim")
_POSITIVE_KEYS = ("rms_norm_eps", "layer_norm_epsilon", "rope_theta")
_BOOL_KEYS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window",
              "enable_bias", "do_layer_norm_before", "_remove_final_layer_norm",
              "layer_norm_elementwise_affine", "scale_attn_by_inverse_layer_idx",
              "scale_attn_weights")
_STR_KEYS = ("hidden_act", "activation_function")


def _is_size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIZE


def _is_positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check_values(c: dict, source: str) -> None:
    """Refuses a config whose known keys hold values of the wrong kind: sizes must be ints in
    1..MAX_SIZE, epsilons and rope parameters finite and positive, switches booleans (the string
    "false" would read as true)."""
    def bad(key, v, want):
        raise CheckpointError(f"{source}: config key {key!r} is {v!r}, expected {want}")

    for key in _SIZE_KEYS:
        if c.get(key) is not None and not _is_size(c[key]):
            bad(key, c[key], f"an int in 1..{MAX_SIZE:,}")
    for key in _POSITIVE_KEYS:
        if c.get(key) is not None and not _is_positive(c[key]):
            bad(key, c[key], "a finite positive number")
    for key in _BOOL_KEYS:
        if c.get(key) is not None and not isinstance(c[key], bool):
            bad(key, c[key], "true or false")
    for key in _STR_KEYS:
        if c.get(key) is not None and not isinstance(c[key], str):
            bad(key, c[key], "a string")
    for key in ("rope_parameters", "rope_scaling"):
        rope = c.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            bad(key, rope, "an object")
        for k in ("rope_type", "type"):
            if rope.get(k) is not None and not isinstance(rope[k], str):
                bad(f"{key}.{k}", rope[k], "a string")
        for k in ("rope_theta", "factor", "low_freq_factor", "high_freq_factor"):
            if rope.get(k) is not None and not _is_positive(rope[k]):
                bad(f"{key}.{k}", rope[k], "a finite positive number")
        if rope.get("original_max_position_embeddings") is not None and not _is_size(
                rope["original_max_position_embeddings"]):
            bad(f"{key}.original_max_position_embeddings",
                rope["original_max_position_embeddings"], f"an int in 1..{MAX_SIZE:,}")


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


# ---- config translation ------------------------------------------------------------------

def _rope_fields(c: dict, source: str) -> dict:
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(f"{source}: rope scaling type {kind!r} is not supported; "
                                    f"supported: default, linear, llama3")
    out = {"rope_theta": float(theta), "rope_type": kind,
           "rope_factor": float(rope.get("factor", 1.0))}
    if kind == "llama3":
        low, high = (float(_require(rope, k, source)) for k in ("low_freq_factor",
                                                                  "high_freq_factor"))
        if not high > low:
            raise CheckpointError(f"{source}: llama3 rope scaling needs high_freq_factor > "
                                  f"low_freq_factor, found {high} and {low}")
        out.update(rope_low_freq_factor=low, rope_high_freq_factor=high,
                   rope_original_max_positions=_require(rope, "original_max_position_embeddings",
                                                        source))
    return out


def _require(c: dict, key: str, source: str):
    if c.get(key) is None:
        raise CheckpointError(f"{source}: config has no {key!r}, which model_type "
                         f"{c.get('model_type')!r} needs")
    return c[key]


def config_from_hf(c: dict, source: str = "config.json") -> DecoderConfig:
    """Translate a Hugging Face config dict into a DecoderConfig.

    Raises:
      UnsupportedModelError: an architecture or option we do not implement.
      CheckpointError: a missing key, a value of the wrong kind, or an inconsistent config.
    """
    if not isinstance(c, dict):
        raise CheckpointError(f"{source}: the config should be a JSON object, found "
                              f"{type(c).__name__}")
    mt = c.get("model_type")
    if not isinstance(mt, str) or mt not in ADAPTERS:
        raise UnsupportedModelError(f"{source}: model_type {mt!r} is not supported; supported: "
                                    f"{sorted(ADAPTERS)}")
    check_values(c, source)
    try:
        cfg = ADAPTERS[mt].config_from_hf(c, source)
        return cfg.replace(extra=tuple(sorted((k, v) for k, v in c.items() if isinstance(
            v, (int, float, str, bool, type(None))))))
    except (UnsupportedModelError, CheckpointError):
        raise
    except ValueError as e:  # DecoderConfig's own consistency checks
        raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(cfg: DecoderConfig) -> dict:
    """A config.json dict that transformers loads into the same architecture."""
    out = dict(cfg.extra)
    out.update(ADAPTERS[cfg.model_type].config_to_hf(cfg))
    out["model_type"] = cfg.model_type
    for k in ("rope_scaling", "rope_parameters"):
        out.pop(k, None)
    if cfg.positions == "rope":
        rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
        if cfg.rope_type != "default":
            rope["factor"] = cfg.rope_factor
        if cfg.rope_type == "llama3":
            rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                        high_freq_factor=cfg.rope_high_freq_factor,
                        original_max_position_embeddings=cfg.rope_original_max_positions)
        out["rope_theta"] = cfg.rope_theta
        out["rope_parameters"] = rope
        if cfg.rope_type != "default":
            out["rope_scaling"] = dict(rope, type=cfg.rope_type)
    return out


def _opt_config(c, source):
    if not c.get("layer_norm_elementwise_affine", True):
        raise UnsupportedModelError(f"{source}: OPT with layer_norm_elementwise_affine=False is "
                                    f"not supported")
    d = _require(c, "hidden_size", source)
    bias = bool(c.get("enable_bias", True))
    pre = bool(c.get("do_layer_norm_before", True))
    return DecoderConfig(
        model_type="opt", vocab_size=_require(c, "vocab_size", source), hidden_size=d,
        num_layers=_require(c, "num_hidden_layers", source),
        num_heads=_require(c, "num_attention_heads", source),
        intermediate_size=c.get("ffn_dim", 4 * d),
        max_positions=c.get("max_position_embeddings", 2048), position_offset=2,
        pre_norm=pre, final_norm=pre and not c.get("_remove_final_layer_norm", False),
        activation=_act(c.get("activation_function", "relu"), source),
        qkv_bias=bias, out_bias=bias, mlp_bias=bias,
        tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        embed_dim=c.get("word_embed_proj_dim") or d)


def _opt_config_to_hf(cfg):
    return dict(architectures=["OPTForCausalLM"], vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, ffn_dim=cfg.intermediate_size,
                max_position_embeddings=cfg.max_positions, do_layer_norm_before=cfg.pre_norm,
                _remove_final_layer_norm=cfg.pre_norm and not cfg.final_norm,
                word_embed_proj_dim=cfg.embed_dim, activation_function=cfg.activation,
                enable_bias=cfg.qkv_bias, layer_norm_elementwise_affine=True,
                tie_word_embeddings=cfg.tie_embeddings)


def _act(name, source):
    name = {"gelu_pytorch_tanh": "gelu_new", "swish": "silu"}.get(name, name)
    if name not in ("relu", "gelu", "gelu_new", "silu"):
        raise UnsupportedModelError(f"{source}: activation {name!r} is not supported")
    return name


def _gpt2_config(c, source):
    if c.get("scale_attn_by_inverse_layer_idx") or not c.get("scale_attn_weights", True):
        raise UnsupportedModelError(f"{source}: GPT-2 attention scaling options "
                                    f"scale_attn_by_inverse_layer_idx / scale_attn_weights=False "
                                    f"are not supported")
    d = _require(c, "n_embd", source)
    return DecoderConfig(
        model_type="gpt2", vocab_size=_require(c, "vocab_size", source), hidden_size=d,
        num_layers=_require(c, "n_layer", source), num_heads=_require(c, "n_head", source),
        intermediate_size=c.get("n_inner") or 4 * d, max_positions=c.get("n_positions", 1024),
        norm_eps=c.get("layer_norm_epsilon", 1e-5),
        activation=_act(c.get("activation_function", "gelu_new"), source),
        tie_embeddings=bool(c.get("tie_word_embeddings", True)))


def _gpt2_config_to_hf(cfg):
    return dict(architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size,
                n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
                n_positions=cfg.max_positions, layer_norm_epsilon=cfg.norm_eps,
                activation_function=cfg.activation, tie_word_embeddings=cfg.tie_embeddings)


def _llama_config(c, source):
    mt = c["model_type"]
    if c.get("use_sliding_window") and mt == "qwen2":
        raise UnsupportedModelError(f"{source}: Qwen2 sliding-window attention is not supported")
    d, h = _require(c, "hidden_size", source), _require(c, "num_attention_heads", source)
    attn_bias = bool(c.get("attention_bias", False))
    return DecoderConfig(
        model_type=mt, vocab_size=_require(c, "vocab_size", source), hidden_size=d,
        num_layers=_require(c, "num_hidden_layers", source), num_heads=h,
        num_kv_heads=c.get("num_key_value_heads") or h,
        head_dim=c.get("head_dim") or d // h,
        intermediate_size=_require(c, "intermediate_size", source),
        max_positions=c.get("max_position_embeddings", 2048),
        norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6), norm_bias=False,
        positions="rope", **_rope_fields(c, source),
        activation=_act(c.get("hidden_act", "silu"), source), gated_mlp=True,
        qkv_bias=True if mt == "qwen2" else attn_bias,
        out_bias=False if mt == "qwen2" else attn_bias,
        mlp_bias=bool(c.get("mlp_bias", False)), qk_norm=mt == "qwen3",
        tie_embeddings=bool(c.get("tie_word_embeddings", False)))


def _llama_config_to_hf(cfg):
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}[cfg.model_type]
    out = dict(architectures=[arch], vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
               num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
               intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_positions,
               rms_norm_eps=cfg.norm_eps, hidden_act=cfg.activation, mlp_bias=cfg.mlp_bias,
               tie_word_embeddings=cfg.tie_embeddings)
    if cfg.model_type != "qwen2":
        out["attention_bias"] = cfg.qkv_bias
    return out


# ---- tensor tables -----------------------------------------------------------------------

def _linear(hf: str, ours: str, bias: bool) -> dict:
    spec = {(ours, "kernel"): (hf + ".weight", "T")}
    if bias:
        spec[(ours, "bias")] = (hf + ".bias", "copy")
    return spec


def _norm(hf: str, ours: str, bias: bool) -> dict:
    spec = {(ours, "scale"): (hf + ".weight", "copy")}
    if bias:
        spec[(ours, "bias")] = (hf + ".bias", "copy")
    return spec


def _nest(spec: dict) -> dict:
    out = {}
    for path, v in spec.items():
        flat = tuple(p for part in path for p in part.split("/"))
        d = out
        for p in flat[:-1]:
            d = d.setdefault(p, {})
        d[flat[-1]] = v
    return out


def _opt_tables(cfg, prefix):
    p = prefix + "decoder."
    outer = {("embed", "embedding"): (p + "embed_tokens.weight", "copy"),
             ("pos_embed", "embedding"): (p + "embed_positions.weight", "copy")}
    if cfg.embed_dim != cfg.hidden_size:
        outer.update(_linear(p + "project_in", "project_in", False))
        outer.update(_linear(p + "project_out", "project_out", False))
    if cfg.final_norm:
        outer.update(_norm(p + "final_layer_norm", "final_norm", True))
    if not cfg.tie_embeddings:
        outer.update(_linear("lm_head", "lm_head", False))

    def block(i):
        b, bias = f"{p}layers.{i}.", cfg.qkv_bias
        s = {}
        for ours, hf in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            s.update(_linear(b + "self_attn." + hf, "attn/" + ours, bias))
        s.update(_norm(b + "self_attn_layer_norm", "ln_attn", True))
        s.update(_norm(b + "final_layer_norm", "ln_mlp", True))
        s.update(_linear(b + "fc1", "mlp/fc1", bias))
        s.update(_linear(b + "fc2", "mlp/fc2", bias))
        return _nest(s)

    return _nest(outer), block


def _gpt2_tables(cfg, prefix):
    p = prefix
    outer = {("embed", "embedding"): (p + "wte.weight", "copy"),
             ("pos_embed", "embedding"): (p + "wpe.weight", "copy")}
    outer.update(_norm(p + "ln_f", "final_norm", True))
    if not cfg.tie_embeddings:
        outer.update(_linear("lm_head", "lm_head", False))

    def block(i):
        b = f"{p}h.{i}."
        s = {}
        for j, ours in enumerate("qkv"):
            s[("attn/" + ours, "kernel")] = (b + "attn.c_attn.weight", ("qkv", j))
            s[("attn/" + ours, "bias")] = (b + "attn.c_attn.bias", ("qkv", j))
        # GPT-2's Conv1D stores weights as [in, out], our kernel layout already.
        for ours, hf in (("attn/o", "attn.c_proj"), ("mlp/fc1", "mlp.c_fc"),
                         ("mlp/fc2", "mlp.c_proj")):
            s[(ours, "kernel")] = (b + hf + ".weight", "copy")
            s[(ours, "bias")] = (b + hf + ".bias", "copy")
        s.update(_norm(b + "ln_1", "ln_attn", True))
        s.update(_norm(b + "ln_2", "ln_mlp", True))
        return _nest(s)

    return _nest(outer), block


def _llama_tables(cfg, prefix):
    p = prefix
    outer = {("embed", "embedding"): (p + "embed_tokens.weight", "copy")}
    outer.update(_norm(p + "norm", "final_norm", False))
    if not cfg.tie_embeddings:
        outer.update(_linear("lm_head", "lm_head", False))

    def block(i):
        b = f"{p}layers.{i}."
        s = {}
        for ours, hf in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
            s.update(_linear(b + "self_attn." + hf, "attn/" + ours, cfg.qkv_bias))
        s.update(_linear(b + "self_attn.o_proj", "attn/o", cfg.out_bias))
        if cfg.qk_norm:
            s.update(_norm(b + "self_attn.q_norm", "attn/q_norm", False))
            s.update(_norm(b + "self_attn.k_norm", "attn/k_norm", False))
        s.update(_norm(b + "input_layernorm", "ln_attn", False))
        s.update(_norm(b + "post_attention_layernorm", "ln_mlp", False))
        for name in ("gate", "up", "down"):
            s.update(_linear(f"{b}mlp.{name}_proj", "mlp/" + name, cfg.mlp_bias))
        return _nest(s)

    return _nest(outer), block


@dataclasses.dataclass(frozen=True)
class Adapter:
    config_from_hf: Callable
    config_to_hf: Callable
    tables: Callable          # (cfg, prefix) -> (outer spec tree, block_i -> spec tree)
    prefixes: tuple[str, ...]  # checkpoint name prefixes, the one transformers writes first
    ignored: tuple[str, ...] = ()  # buffers some checkpoints carry (substrings)


ADAPTERS: dict[str, Adapter] = {
    "opt": Adapter(_opt_config, _opt_config_to_hf, _opt_tables, ("model.", "")),
    "gpt2": Adapter(_gpt2_config, _gpt2_config_to_hf, _gpt2_tables, ("transformer.", ""),
                    ignored=(".attn.bias", ".attn.masked_bias")),
    "llama": Adapter(_llama_config, _llama_config_to_hf, _llama_tables, ("model.",),
                     ignored=("rotary_emb.inv_freq",)),
    "qwen2": Adapter(_llama_config, _llama_config_to_hf, _llama_tables, ("model.",),
                     ignored=("rotary_emb.inv_freq",)),
    "qwen3": Adapter(_llama_config, _llama_config_to_hf, _llama_tables, ("model.",),
                     ignored=("rotary_emb.inv_freq",)),
}
