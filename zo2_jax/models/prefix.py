"""Prefix tuning over a frozen base (MeZO's non-reparameterised variant): `PrefixModel` wraps a
`Model`, and every attention layer gets P trained "virtual tokens" given directly as their keys
and values.

A block's parameters are {"prefix": {"k": k_PxGK, "v": v_PxGK}, "base": the base block}; the
outer part has nothing trained ({"base": outer}). As for LoRA (`FrozenBaseModel`), the engines
perturb, update and keep optimiser state for the prefixes alone; the base is read, never written.

The prefix holds what a KV cache holds: keys and values after the projections, the q/k norms
(Qwen3) and the rotation (rope), G kv heads of head dim K flattened to G*K as the projections
lay them out. The model runs as if the cache already held P tokens: the real tokens attend to
the P prefix entries (always visible, also from padded queries) and causally to themselves, and
their positions start at P (learned positions and rope alike); padding keeps position -1. This
is PEFT's PREFIX_TUNING (past_key_values plus P ones prepended to the attention mask), so
`save_peft_prefix` writes an adapter `peft.PeftModel.from_pretrained` runs to the same logits.
MeZO's `prefix.py` differs in one point: it patches the attention modules only, so the real
tokens keep positions 0..T-1 there.

Initialisation (`adapt`): MeZO's `init_by_real_act`, the base model's keys and values of P token
ids drawn uniformly from the vocabulary (one sequence at positions 0..P-1), so a new prefix
model computes exactly what the base computes on [those P tokens] + the batch; or MeZO's random
init, N(0, 1) entries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zo2_jax.models.lora import FROZEN, FrozenBaseModel

PyTree = Any

PREFIX = "prefix"
Init = Literal["real", "random"]
INITS = ("real", "random")


def check_num_prefix(num_prefix, name: str = "num_prefix") -> None:
    """Raises a ValueError unless `num_prefix` is an integer >= 1 (`name` names the option)."""
    if not (isinstance(num_prefix, (int, np.integer)) and not isinstance(num_prefix, bool)
            and num_prefix >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {num_prefix!r}")


def _on_device(tree: PyTree) -> PyTree:
    """`tree` with every leaf outside device memory (a block in pinned host memory) copied to the
    default device, where the initialisation computes."""
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
    return jax.tree.map(
        lambda x: x if getattr(getattr(x, "sharding", None), "memory_kind", "device") == "device"
        else jax.device_put(x, dev), tree)


@dataclasses.dataclass(frozen=True, eq=False)
class PrefixModel(FrozenBaseModel):
    """A `Model` whose attention layers each see `num_prefix` trained prefix keys and values
    before the step's own.

    Attributes:
      base: the wrapped model.
      num_prefix: P, the virtual tokens per layer.
    """

    base: Any
    num_prefix: int = 5
    frozen = FROZEN
    trained = PREFIX

    def __post_init__(self):
        check_num_prefix(self.num_prefix)
        object.__setattr__(self, "num_prefix", int(self.num_prefix))

    @property
    def prefix_shape(self) -> tuple[int, int]:
        """(P, G*K): one block's prefix keys (and values)."""
        cfg = self.config
        return self.num_prefix, cfg.num_kv_heads * cfg.head_dim

    # ---- parameters ------------------------------------------------------------------------------
    def init_prefix(self, key, dtype=jnp.float32) -> dict:
        """One block's prefix with N(0, 1) entries (MeZO's `torch.randn` when not initialised by
        real activations)."""
        kk, kv = jax.random.split(key)
        return {"k": jax.random.normal(kk, self.prefix_shape, jnp.float32).astype(dtype),
                "v": jax.random.normal(kv, self.prefix_shape, jnp.float32).astype(dtype)}

    def init_block(self, key, dtype=jnp.float32) -> PyTree:
        """A random base block (`Model.init_block`) with a random prefix (`init_prefix`)."""
        return {PREFIX: self.init_prefix(jax.random.fold_in(key, 1), dtype),
                FROZEN: self.base.init_block(key, dtype)}

    def init_tokens(self, key) -> jax.Array:
        """The P token ids (int32 [P], uniform over the vocabulary) whose keys and values
        `adapt(init="real")` with `key` takes."""
        return jax.random.randint(key, (self.num_prefix,), 0, self.config.vocab_size, jnp.int32)

    def real_prefixes(self, base_params: PyTree, key, dtype=jnp.float32) -> list:
        """Every block's {"k", "v"} for the tokens `init_tokens(key)` run through the base model
        as one sequence at positions 0..P-1: what its KV cache would hold.

        The blocks are taken one at a time, in order (each needs the previous block's output),
        holding only the hidden states of the P tokens in between: a block given as a
        zero-argument callable is called once here and not kept; blocks in host memory are copied
        to the device for the computation (QArray matrices dequantised where used, as in a step).
        """
        base = self.base
        batch = {"input_ids": self.init_tokens(key)[None]}
        ctx = base.context(batch)
        h = jax.jit(lambda outer, ctx: base.embed(outer, batch, ctx))(
            _on_device(base_params["outer"]), ctx)

        @jax.jit
        def step(block, h, ctx):
            k, v = base.keys_values(block, h, ctx)
            return {"k": k[0].astype(dtype), "v": v[0].astype(dtype)}, base.block(block, h, ctx)

        out = []
        for b in base_params["blocks"]:
            pre, h = step(_on_device(b() if callable(b) else b), h, ctx)
            out.append(pre)
        return out

    def adapt(self, base_params: PyTree, key, dtype=jnp.float32, init: Init = "real") -> PyTree:
        """Trainable parameters for the engines from the base model's {'outer', 'blocks'}: each
        block {"prefix": {"k", "v"}, "base": the block}, outer {"base": outer}.

        init="real" takes the base model's keys and values of P random tokens (`real_prefixes`),
        init="random" N(0, 1) entries (`init_prefix`, key folded with the block's index). Blocks
        given as zero-argument callables (`common.lazy_blocks`) stay lazy: their prefixes are
        made here, their base is read when the engine calls them; with init="real" each such
        block is therefore read twice (once here, one block at a time, and once by the engine).
        """
        if init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
        if not isinstance(base_params, Mapping) or set(base_params) != {"outer", "blocks"}:
            got = sorted(base_params) if isinstance(base_params, Mapping) else \
                type(base_params).__name__
            raise ValueError(f"base_params must be the base model's {{'outer', 'blocks'}}, got "
                             f"{got}")
        blocks = list(base_params["blocks"])
        if len(blocks) != self.num_blocks:
            raise ValueError(f"base_params has {len(blocks)} blocks, the model has "
                             f"{self.num_blocks}")
        if init == "real":
            prefixes = self.real_prefixes(base_params, key, dtype)
        else:
            prefixes = [self.init_prefix(jax.random.fold_in(key, i), dtype)
                        for i in range(len(blocks))]

        def block(pre, b):
            if callable(b):
                return lambda: block(pre, b())
            return {PREFIX: pre, FROZEN: b}
        return {"outer": {FROZEN: base_params["outer"]},
                "blocks": [block(p, b) for p, b in zip(prefixes, blocks)]}

    def prefix_of(self, block_params: PyTree) -> tuple:
        """(k_PxGK, v_PxGK) of one block's parameters; a ValueError naming the expected and
        given structure or shapes unless they are {"prefix": {"k", "v"}, "base": ...} with
        prefixes of `prefix_shape`."""
        want = (f"{{'{PREFIX}': {{'k': {list(self.prefix_shape)}, 'v': "
                f"{list(self.prefix_shape)}}}, '{FROZEN}': the base block}}")
        pre = block_params.get(PREFIX) if isinstance(block_params, Mapping) else None
        if not isinstance(pre, Mapping) or set(pre) != {"k", "v"} or FROZEN not in block_params:
            got = (sorted(block_params) if isinstance(block_params, Mapping)
                   else type(block_params).__name__)
            raise ValueError(f"a PrefixModel block's parameters must be {want} (`adapt` makes "
                             f"them), got {got}")
        ks, vs = tuple(np.shape(pre["k"])), tuple(np.shape(pre["v"]))
        if ks != self.prefix_shape or vs != self.prefix_shape:
            raise ValueError(f"prefix keys {ks} and values {vs}: both must be [num_prefix, "
                             f"num_kv_heads * head_dim] = {list(self.prefix_shape)}")
        return pre["k"], pre["v"]

    # ---- the seam --------------------------------------------------------------------------------
    def context(self, batch) -> dict:
        """The base's context with the real tokens' positions starting at P."""
        cfg, P = self.config, self.num_prefix
        T = np.shape(batch["input_ids"])[1]
        if cfg.positions == "learned" and T + P > cfg.max_positions:
            raise ValueError(f"a sequence of {T} tokens after {P} prefix tokens needs "
                             f"{T + P} positions, the model has {cfg.max_positions}")
        return self.base.context(batch, offset=P)

    def embed(self, outer, batch, ctx=None):
        return self.base.embed(outer[FROZEN], batch, self.context(batch) if ctx is None else ctx)

    def block(self, block_params, h, ctx):
        prefix = self.prefix_of(block_params)
        return self.base.block(block_params[FROZEN], h, ctx, prefix=prefix)

    def apply(self, params, batch):
        """Full forward pass: (per-example loss [B], logits [B, T, V]) of the real tokens."""
        if not isinstance(params, Mapping) or set(params) != {"outer", "blocks"}:
            got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
            raise ValueError(f"params must be a dict {{'outer': ..., 'blocks': [...]}} (`adapt` "
                             f"makes it), got {got}")
        if len(params["blocks"]) != self.num_blocks:
            raise ValueError(f"params has {len(params['blocks'])} blocks, the model has "
                             f"{self.num_blocks}")
        ctx = self.context(batch)
        h = self.embed(params["outer"], batch, ctx)
        for bp in params["blocks"]:
            h = self.block(bp, h, ctx)
        return self.head(params["outer"], h, batch)


def prefix(model, num_prefix: int = 5) -> PrefixModel:
    """`PrefixModel(model, num_prefix)`."""
    return PrefixModel(model, num_prefix)


# ---- export ------------------------------------------------------------------------------------

def prompt_embeddings(model: PrefixModel, params: PyTree) -> np.ndarray:
    """The prefixes as PEFT's `prompt_embeddings` (float32 [P, L * 2 * G*K]): row p holds, for
    each layer l in order, its keys then its values of virtual token p, each [G*K] head-major, as
    `PeftModelForCausalLM.get_prompt` views it ([P, 2L, G, K], keys at 2l, values at 2l + 1)."""
    parts = []
    for i, b in enumerate(params["blocks"]):
        if callable(b):
            raise ValueError(f"params['blocks'][{i}] is a lazy block (a callable); export the "
                             f"engine's parameters (engine.params())")
        k, v = model.prefix_of(b)
        parts += [np.asarray(jax.device_get(k), np.float32),
                  np.asarray(jax.device_get(v), np.float32)]
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def save_peft_prefix(model: PrefixModel, params: PyTree, out_dir: str,
                     base_model_name_or_path: Optional[str] = None) -> str:
    """The prefixes alone in the PEFT library's PREFIX_TUNING format (`prefix_projection` off):
    adapter_config.json and adapter_model.safetensors holding the tensor "prompt_embeddings"
    (see `prompt_embeddings`), which `peft.PeftModel.from_pretrained` loads onto the base model's
    transformers class. For grouped-query attention the config gives the kv heads, as PEFT
    itself sets them: token_dim = G*K, num_attention_heads = G."""
    import json
    import os

    from zo2_jax.models.io import _write_safetensors
    if not isinstance(model, PrefixModel):
        raise ValueError(f"save_peft_prefix needs a PrefixModel, got {type(model).__name__}")
    cfg = model.config
    if len(params["blocks"]) != model.num_blocks:
        raise ValueError(f"params has {len(params['blocks'])} blocks, the model has "
                         f"{model.num_blocks}")
    tensors = {"prompt_embeddings": prompt_embeddings(model, params)}
    os.makedirs(out_dir, exist_ok=True)
    _write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), tensors,
                       {"format": "pt"})
    token_dim = cfg.num_kv_heads * cfg.head_dim
    config = {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
        "num_virtual_tokens": model.num_prefix, "token_dim": token_dim,
        "num_transformer_submodules": 1, "num_attention_heads": cfg.num_kv_heads,
        "num_layers": model.num_blocks, "encoder_hidden_size": token_dim,
        "prefix_projection": False, "init_weights": None, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path or model.base.source,
        "revision": None, "modules_to_save": None,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    return out_dir
