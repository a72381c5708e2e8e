"""`Model`: a decoder split into the embed / block / head stages of the seam (see seam.py).

The Flax NNX modules of `layers.py` are split once into graph definitions; parameters travel as
plain nested dicts, so engines can place, encode, perturb and stream them like any pytree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zo2_jax.models.config import DecoderConfig, rope_inv_freq
from zo2_jax.models.layers import Block, Outer, check_prefix

PyTree = Any


def _abstract(module_fn):
    graphdef, state = nnx.split(nnx.eval_shape(module_fn))
    return graphdef, nnx.to_pure_dict(state)


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A decoder-only language model as three pure stages.

    Attributes:
      config: the architecture.
      dtype: compute dtype; parameters are cast to it at the start of every stage.
      attn_impl: "xla" (any mask, any dtype) or "cudnn" (fused GPU kernel, bf16/fp16).
      source: the file or folder it was loaded from (`load` sets it), where `save_pretrained`
        finds its tokenizer.
    """

    config: DecoderConfig
    dtype: Any = jnp.float32
    attn_impl: str = "xla"
    source: Optional[str] = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if self.attn_impl not in ("xla", "cudnn"):
            raise ValueError(f"attn_impl must be 'xla' or 'cudnn', got {self.attn_impl!r}")
        cfg = self.config
        gb, sb = _abstract(lambda: Block(cfg, nnx.Rngs(0)))
        go, so = _abstract(lambda: Outer(cfg, nnx.Rngs(0)))
        object.__setattr__(self, "_block_def", gb)
        object.__setattr__(self, "_outer_def", go)
        object.__setattr__(self, "_block_shapes", sb)
        object.__setattr__(self, "_outer_shapes", so)
        object.__setattr__(self, "_inv_freq",
                           rope_inv_freq(cfg) if cfg.positions == "rope" else None)

    @property
    def num_blocks(self) -> int:
        return self.config.num_layers

    def with_dtype(self, dtype) -> "Model":
        return Model(self.config, dtype, self.attn_impl, self.source)

    def with_num_layers(self, n: int) -> "Model":
        """The same architecture with `n` blocks (for timing a few blocks of a large model)."""
        return dataclasses.replace(self, config=self.config.replace(num_layers=n))

    # ---- parameter structure -------------------------------------------------------------

    def block_shapes(self, dtype=jnp.float32) -> PyTree:
        """ShapeDtypeStructs of one block's parameters."""
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), self._block_shapes)

    def outer_shapes(self, dtype=jnp.float32) -> PyTree:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), self._outer_shapes)

    def init_block(self, key, dtype=jnp.float32) -> PyTree:
        """Random parameters of one block (GPT-style N(0, 0.02) weights, unit norms)."""
        return nnx.to_pure_dict(nnx.state(Block(self.config, nnx.Rngs(key), dtype)))

    def init_outer(self, key, dtype=jnp.float32) -> PyTree:
        return nnx.to_pure_dict(nnx.state(Outer(self.config, nnx.Rngs(key), dtype)))

    def init(self, key, dtype=jnp.float32, *, block_sharding=None, outer_sharding=None) -> PyTree:
        """Random parameters {'outer', 'blocks'} made where they will live.

        Each block is created by one jitted function (compiled once) directly in `block_sharding`
        (for example pinned host memory), so a large model never passes through numpy.
        """
        init_b = jax.jit(lambda k: self.init_block(k, dtype), out_shardings=block_sharding)
        init_o = jax.jit(lambda k: self.init_outer(k, dtype), out_shardings=outer_sharding)
        outer = init_o(jax.random.fold_in(key, -1 % (2 ** 31)))
        blocks = [init_b(jax.random.fold_in(key, i)) for i in range(self.num_blocks)]
        return {"outer": outer, "blocks": blocks}

    def decay_mask(self, params: PyTree) -> PyTree:
        """True for matrices and embeddings, False for biases and norm scales (MeZO's rule)."""
        return decay_mask(params)

    # ---- the seam ------------------------------------------------------------------------

    def _cast(self, tree):
        return jax.tree.map(
            lambda x: x.astype(self.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def context(self, batch, offset: int = 0) -> dict:
        """Per-step tensors every block needs: positions, the attention mask, rope tables.

        The real tokens of each row are at positions offset, offset + 1, ... (`offset` tokens,
        e.g. a prefix, come before them, as in a KV cache); padding is at -1. The mask [B, 1, T, T]
        is causal over the real tokens; rope tables follow the positions."""
        if not (isinstance(offset, (int, np.integer)) and not isinstance(offset, bool)
                and offset >= 0):
            raise ValueError(f"offset must be an integer >= 0, got {offset!r}")
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = jnp.ones_like(ids)
        mask = mask.astype(jnp.int32)
        # padding gets -1, as OPT does
        positions = (jnp.cumsum(mask, axis=1) + int(offset)) * mask - 1
        T = ids.shape[1]
        causal = jnp.tril(jnp.ones((T, T), bool))
        att_mask = causal[None, None] & (mask[:, None, None, :] > 0)
        ctx = {"positions": positions, "mask": att_mask}
        if self.config.positions == "rope":
            freqs = jnp.maximum(positions, 0)[..., None].astype(jnp.float32) * self._inv_freq
            emb = jnp.concatenate([freqs, freqs], axis=-1)
            ctx["cos"], ctx["sin"] = jnp.cos(emb), jnp.sin(emb)
        return ctx

    def embed(self, outer, batch, ctx=None):
        if ctx is None:
            ctx = self.context(batch)
        module = nnx.merge(self._outer_def, nnx.State(self._cast(outer)))
        return module.embed_tokens(batch["input_ids"], ctx["positions"]).astype(self.dtype)

    def block(self, block_params, h, ctx, prefix=None, module_def=None):
        """One block's output; `prefix` (k_PxGK, v_PxGK), cast to the compute dtype: keys and
        values its attention sees before the step's own, always visible (a KV cache holding P
        tokens; the context's positions should then start at P: `context(batch, offset=P)`).
        `module_def`: the graph definition the parameters are merged into, for a block with
        parameters of its own in its modules (`LoRAModel`'s adapters); default the plain
        block's."""
        module = nnx.merge(module_def or self._block_def, nnx.State(self._cast(block_params)))
        if prefix is not None:
            cfg = self.config
            prefix = self._cast(check_prefix(prefix, cfg.num_kv_heads, cfg.head_dim))
        return module(h, ctx, self.attn_impl, prefix)

    def keys_values(self, block_params, h, ctx):
        """(k_BxTxGK, v_BxTxGK): what one block's KV cache holds for the tokens h (projected,
        q/k-normed, rotated), heads flattened as in the projections' outputs."""
        module = nnx.merge(self._block_def, nnx.State(self._cast(block_params)))
        k, v = module.keys_values(h, ctx)
        return k.reshape(k.shape[:2] + (-1,)), v.reshape(v.shape[:2] + (-1,))

    def head(self, outer, h, batch):
        """Per-example mean NLL over `loss_mask`ed targets, and float32 logits [B, T, V]."""
        module = nnx.merge(self._outer_def, nnx.State(self._cast(outer)))
        logits_BxTxV = module.logits(h).astype(jnp.float32)
        return per_example_loss(logits_BxTxV, batch), logits_BxTxV

    def apply(self, params, batch):
        """Full forward pass: (per-example loss [B], logits [B, T, V])."""
        ctx = self.context(batch)
        h = self.embed(params["outer"], batch, ctx)
        for bp in params["blocks"]:
            h = self.block(bp, h, ctx)
        return self.head(params["outer"], h, batch)


def per_example_loss(logits_BxTxV, batch):
    """Mean next-token NLL of each example over targets where loss_mask is 1."""
    ids = batch["input_ids"]
    mask = batch.get("loss_mask")
    if mask is None:
        mask = batch.get("attention_mask", jnp.ones_like(ids))
    targets, tmask = ids[:, 1:], mask[:, 1:].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return (nll * tmask).sum(1) / jnp.maximum(tmask.sum(1), 1.0)


def decay_mask(params: PyTree) -> PyTree:
    """Which leaves weight decay applies to: matrices and embeddings (rank >= 2), not biases or
    norm scales (rank < 2). MeZO's rule, and the default of every optimiser here."""
    return jax.tree.map(lambda x: np.ndim(x) >= 2, params)


def check_batch(batch, expected_shape: Optional[tuple] = None) -> tuple[int, int]:
    """Raises a ValueError unless `batch` is a dict of int [B, T] arrays of one shape (and
    `expected_shape`, when given). Returns (B, T)."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"batch must be a dict with 'input_ids' (and optionally "
                         f"'attention_mask', 'loss_mask'), got {got}")
    shape = tuple(np.shape(batch["input_ids"]))
    if len(shape) != 2:
        raise ValueError(f"batch['input_ids'] must be [batch, seq], got shape {shape}")
    for k, v in batch.items():
        if tuple(np.shape(v)) != shape:
            raise ValueError(f"batch[{k!r}] has shape {tuple(np.shape(v))}, expected {shape} "
                             f"like batch['input_ids']")
        dtype = getattr(v, "dtype", None) or np.asarray(v).dtype
        if not (jnp.issubdtype(dtype, jnp.integer) or dtype == bool):
            raise ValueError(f"batch[{k!r}] has dtype {dtype}, expected integers")
    if expected_shape is not None and shape != tuple(expected_shape):
        raise ValueError(f"batch has shape {shape}, but this engine was set up for batch_shape="
                         f"{tuple(expected_shape)} (its device budget was computed for it)")
    return shape


_jit_apply = jax.jit(lambda model, params, batch: model.apply(params, batch)[1],
                     static_argnums=0)


def logits(model: Model, params: PyTree, input_ids, attention_mask=None):
    """Logits [B, T, V] (float32) of `input_ids` [B, T] with an optional padding mask."""
    batch = {"input_ids": jnp.asarray(input_ids, jnp.int32)}
    if attention_mask is not None:
        batch["attention_mask"] = jnp.asarray(attention_mask, jnp.int32)
    check_batch(batch)
    # Parameters may sit in pinned host memory (ZO2Engine.params()); compute needs them on the
    # device, and jit refuses operands from two memory spaces.
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
    if any(getattr(getattr(x, "sharding", None), "memory_kind", "device") != "device"
           for x in jax.tree.leaves(params)):
        params = jax.device_put(params, dev)
    return _jit_apply(model, params, batch)


def generate(model: Model, params: PyTree, tokenizer, prompt: str, max_new_tokens: int = 20,
             *, stop_at_eos: bool = True) -> str:
    """Greedy continuation of `prompt`, decoded to text (a look at what a model says).

    The sequence lives in one fixed buffer so the forward pass compiles once.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = list(tokenizer(prompt)["input_ids"])
    n0 = len(ids)
    T = n0 + max_new_tokens
    buf = np.zeros((1, T), np.int32)
    buf[0, :n0] = ids
    eos = getattr(tokenizer, "eos_token_id", None)
    for n in range(n0, T):
        mask = (np.arange(T) < n).astype(np.int32)[None]
        nxt = int(jnp.argmax(logits(model, params, buf, mask)[0, n - 1]))
        buf[0, n] = nxt
        if stop_at_eos and nxt == eos:
            return tokenizer.decode(buf[0, n0:n].tolist())
    return tokenizer.decode(buf[0, n0:].tolist())
