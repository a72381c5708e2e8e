"""A tiny causal language model implementing the seam, so ZO tests do not depend on real models.

Few leaves on purpose: on CPU, XLA compile time grows with the number of per-leaf noise kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _rmsnorm(x, scale):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


class ToyModel:
    """outer = {'embed': [V, D] (tied), 'norm': {'scale': [D]}};
    block = {'w': [D, D], 'b': [D], 'norm': {'scale': [D]}}:
        h + tanh(causal_mean(rmsnorm(h) * scale @ w) + b)
    where causal_mean averages over the visible (causal, unpadded) positions given by ctx."""

    def __init__(self, vocab: int = 32, dim: int = 16, num_blocks: int = 3):
        self.vocab, self.dim, self.num_blocks = vocab, dim, num_blocks

    def init(self, key, dtype=jnp.float32):
        d, v = self.dim, self.vocab
        ks = jax.random.split(key, 1 + self.num_blocks)
        outer = {"embed": (0.5 * jax.random.normal(ks[0], (v, d))).astype(dtype),
                 "norm": {"scale": jnp.ones((d,), dtype)}}
        blocks = [{"w": (jax.random.normal(k, (d, d)) / np.sqrt(d)).astype(dtype),
                   "b": jnp.zeros((d,), dtype), "norm": {"scale": jnp.ones((d,), dtype)}}
                  for k in ks[1:]]
        return {"outer": outer, "blocks": blocks}

    def context(self, batch):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", jnp.ones_like(ids)) > 0
        T = ids.shape[1]
        vis = (jnp.tril(jnp.ones((T, T), bool))[None] & mask[:, None, :]).astype(jnp.float32)
        return {"mix_BxTxT": vis / jnp.maximum(vis.sum(-1, keepdims=True), 1.0)}

    def embed(self, outer, batch):
        return outer["embed"][batch["input_ids"]]

    def block(self, p, h, ctx):
        x = _rmsnorm(h, p["norm"]["scale"]) @ p["w"]
        mixed = jnp.einsum("bts,bsd->btd", ctx["mix_BxTxT"].astype(x.dtype), x)
        return h + jnp.tanh(mixed + p["b"])

    def head(self, outer, h, batch):
        x = _rmsnorm(h, outer["norm"]["scale"])
        logits = (x @ outer["embed"].T).astype(jnp.float32)
        ids = batch["input_ids"]
        mask = batch.get("loss_mask", batch.get("attention_mask", jnp.ones_like(ids)))
        tmask = mask[:, 1:].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        loss_B = (nll * tmask).sum(1) / jnp.maximum(tmask.sum(1), 1.0)
        if "poison" in batch:  # tests inject a non-finite loss through the data, not a recompile
            loss_B = jnp.where(jnp.any(batch["poison"] > 0), jnp.nan, loss_B)
        return loss_B, logits

    def decay_mask(self, params):
        return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)

    def loss(self, params, batch):
        """Mean loss of unperturbed params (reference for tests)."""
        ctx = self.context(batch)
        h = self.embed(params["outer"], batch)
        for b in params["blocks"]:
            h = self.block(b, h, ctx)
        return jnp.mean(self.head(params["outer"], h, batch)[0])


def counting_batch(key, batch_size: int = 4, seq: int = 8, vocab: int = 32, poison: bool = False):
    """Sequences that count up mod vocab from a random start: the next token is learnable.
    With poison=True the toy head returns NaN losses (a 'poison' field of ones)."""
    start = jax.random.randint(key, (batch_size, 1), 0, vocab)
    ids = (start + jnp.arange(seq)[None]) % vocab
    return {"input_ids": ids.astype(jnp.int32),
            "attention_mask": jnp.ones((batch_size, seq), jnp.int32),
            "poison": jnp.full((batch_size, seq), int(poison), jnp.int32)}


# Shared across test files: engines built from the same model, params and transform objects have
# equal (hashable) specs, so they reuse each other's compiled step functions. On CPU, compiling
# the per-leaf noise kernels dominates the test time.
MODEL = ToyModel()
PARAMS = MODEL.init(jax.random.key(0))


def shared_sgd():
    """The MeZO-SGD transform most engine tests share (one object: one compilation)."""
    from zo2_jax.zo import mezo_sgd

    global _SGD
    if _SGD is None:
        _SGD = mezo_sgd(3e-3, weight_decay=0.1)
    return _SGD


_SGD = None
