"""MeZO: the resident engine. Every parameter on the device, one jitted step with donated state.

The step is written once against the seam (model.context / embed / block / head) and shares its
per-part math (`zo2_jax.core.parts`) with the offloaded ZO2 engine; it also applies the same
deferred-update schedule (the update of step t is applied at the start of step t+1, or by `flush`),
so both engines give bit-identical parameters for the same keys. Blocks are stored stacked along a leading axis and
visited by a `fori_loop` that updates them in place (dynamic_update_slice on the donated carry), so
the step compiles once whatever the depth and needs one copy of the parameters.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import optax

from zo2_jax.core import common
from zo2_jax.core import parts
from zo2_jax.core import spmd
from zo2_jax.core import trees
from zo2_jax.core.noise import OUTER_PART, as_key
from zo2_jax.core.estimators import Estimator
from zo2_jax.core.options import ZOOptions
from zo2_jax.core.storage import Storage

PyTree = Any


def _depth(state) -> int:
    return jax.tree.leaves(state["blocks"])[0].shape[0]


# Module-level jitted functions with the (hashable) Spec static: engines with equal specs share
# compiled code.

# `par` (static): the mesh (`spmd.Parallel`), or None on one device, where every stage is the
# `parts` function itself.

@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _step(spec: parts.Spec, par, state, batch, key):
    pend, count = state["pending"], state["count"]
    outer, opt_outer, hs, ctx, g = spmd.outer_embed(
        spec, par, state["outer"], state["opt_outer"], pend, count, key, batch)

    def body(i, carry):
        blocks, opts, hs, g = carry
        b, o, hs, g = spmd.block_step(spec, par, trees.take(blocks, i), trees.take(opts, i),
                                      pend, count, i.astype(jnp.uint32), key, hs, ctx, g)
        return trees.put(blocks, b, i), trees.put(opts, o, i), hs, g

    blocks, opts, hs, g = jax.lax.fori_loop(
        0, _depth(state), body, (state["blocks"], state["opt_blocks"], hs, g))
    pend, count, skipped_total, metrics = spmd.head_finish(
        spec, par, outer, key, hs, batch, g, pend, count, state["skipped_total"],
        parts.estimator_state(spec, opt_outer))
    new = {"outer": outer, "opt_outer": opt_outer, "blocks": blocks, "opt_blocks": opts,
           "pending": pend, "count": count, "skipped_total": skipped_total}
    return new, metrics


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _flush(spec: parts.Spec, par, state):
    pend, count = state["pending"], state["count"]
    outer, opt_outer = parts.update_part(spec, "outer", state["outer"], state["opt_outer"],
                                         pend, count, OUTER_PART)

    def body(i, carry):
        blocks, opts = carry
        b, o = spmd.update_part(spec, par, "block", trees.take(blocks, i), trees.take(opts, i),
                                pend, count, i.astype(jnp.uint32))
        return trees.put(blocks, b, i), trees.put(opts, o, i)

    blocks, opts = jax.lax.fori_loop(0, _depth(state), body,
                                     (state["blocks"], state["opt_blocks"]))
    return {**state, "outer": outer, "opt_outer": opt_outer, "blocks": blocks,
            "opt_blocks": opts, "count": count + pend.valid.astype(jnp.int32),
            "pending": parts.no_pending(spec, pend.key)}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(spec: parts.Spec, par, state, batch):
    h, ctx = spmd.eval_embed(spec, par, state["outer"], batch)
    h = jax.lax.fori_loop(0, _depth(state), lambda i, h: spmd.eval_block(
        spec, par, trees.take(state["blocks"], i), h, ctx), h)
    return spmd.eval_head(spec, par, state["outer"], h, batch)


@functools.partial(jax.jit, static_argnums=0)
def _decode(spec: parts.Spec, state):
    # jnp.copy: a fresh buffer even where decoding is the identity (float32 storage), so the
    # result is not an alias of the state that the next step donates.
    outer = jax.tree.map(jnp.copy, spec.outer_storage.decode(state["outer"]))
    blocks = jax.tree.map(jnp.copy, spec.storage.decode(state["blocks"]))
    return {"outer": outer, "blocks": trees.unstack(blocks, _depth(state))}


_init_part = jax.jit(parts.init_part, static_argnums=(0, 1))
_set_block = jax.jit(lambda blocks, opts, b, o, i: (trees.put(blocks, b, i),
                                                      trees.put(opts, o, i)),
                     donate_argnums=(0, 1))


class MeZOEngine:
    """Zeroth-order training with every parameter on the device (MeZO, arXiv 2305.17333).

    Per step, with key k_t and directions z_j regenerated from it (see `zo2_jax.zo`):

        L_j^+- = mean_batch loss(theta +- eps z_j),  g_j = (L_j^+ - L_j^-) / (2 eps)
        theta <- tx(theta, (1/q) sum_j g_j z_j)          # applied at the start of step t+1

    Args:
      model: implements the seam (`zo2_jax.models.Seam`).
      params: {'outer': pytree, 'blocks': [pytree, ...]} of float arrays (copied by the engine).
        A block may also be a zero-argument callable returning it, called once when the engine
        encodes that block: the model is then never held twice (the caller's copy and the
        engine's), which matters when it fills most of the device.
      tx: any optax GradientTransformation. It is applied per part, `tx.update(g*z, state,
        params)` for outer and for each block, each with its own state (`tx.init(part)`), so a
        transform that needs the whole gradient would see one part at a time: the engines refuse
        `optax.clip_by_global_norm` where they find it (in chain, inject_hyperparams, ...; a
        custom transform hiding it would clip each part by its own norm): use `clip_norm`.
        `mezo_sgd(...)` (the default, lr 1e-6) is fused into one elementwise update.
      eps: perturbation scale (> 0).
      num_directions: q, SPSA directions per step (2q forward passes; FZOO's q + 1).
      compute_dtype: dtype of the perturbed weights fed to the model (float32 or bfloat16).
      storage: how parameters are kept between steps (`Storage`); updates are computed in float32.
      outer_storage: storage of `outer` (defaults to `storage`).
      clip_norm: clip the estimate (1/q) sum_j g_j z_j to this global L2 norm before `tx`, exactly:
        ||sum_j c_j z_j||^2 = c^T G c, with the Gram matrix G_jk = <z_j, z_k> accumulated part by
        part while z is generated for the forward pass, so it is complete when the deferred
        update runs. Adds metrics['grad_norm'] (before clipping).
      directions: 'gaussian' (MeZO's z ~ N(0, I)) or 'rademacher' (z in {-1, +1}^d, Spall's
        SPSA: also E[z z^T] = I, a lower-variance estimate, and ~30x cheaper to generate, which
        matters where the noise, not the forward pass, bounds the step, e.g. small models on CPU).
      estimator: "mezo" (two-sided SPSA, the default), "fzoo", "sparse" or "hizoo", or a
        `zo2_jax.Estimator` (e.g. `Estimator("sparse", fraction=0.25)`); see
        `zo2_jax.core.estimators`. Bit-identical between the engines for each.
      mesh: run on several devices (`zo2_jax.core.spmd`): a device count (the first n of
        `jax.devices()`), a list of devices or a 1-D `jax.sharding.Mesh`; the stacked blocks are
        sharded leaf by leaf over it, `outer` replicated. None (default) or one device: one
        device. Batches (and keys) are placed on every device; across processes each process
        passes the same ones.
      parallel: how a mesh splits a step: "directions" (q a multiple of the devices;
        bit-identical to one device), "data" (the batch size a multiple of the devices), or
        "auto" (directions where q allows).

    Example:
      >>> engine = MeZOEngine(model, params, mezo_sgd(1e-6), eps=1e-3)
      >>> metrics = engine.step(batch, jax.random.key(0))  # device scalars; read them later
      >>> params = engine.params()
    """

    def __init__(self, model, params: PyTree, tx: Optional[optax.GradientTransformation] = None,
                 *, eps: float = ZOOptions.eps, num_directions: int = ZOOptions.num_directions,
                 compute_dtype: Any = jnp.float32, storage: Optional[Storage] = None,
                 outer_storage: Optional[Storage] = None, clip_norm: Optional[float] = None,
                 directions: str = ZOOptions.directions,
                 estimator: Union[str, Estimator] = ZOOptions.estimator, mesh=None,
                 parallel: str = ZOOptions.parallel):
        spec, params, make_block = common.prepare(
            model, params, tx, eps=eps, num_directions=num_directions,
            compute_dtype=compute_dtype, storage=storage, outer_storage=outer_storage,
            clip_norm=clip_norm, directions=directions, estimator=estimator)
        self.spec = spec
        self.num_blocks = len(params["blocks"])
        self._par = common.parallel_of(mesh, parallel, spec.num_directions)
        if self._par is None:
            dev = common.single_device(mesh)
            self._dev = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
        else:
            self._dev = self._par.sharding()
        put = lambda t: self._put(t, self._dev)  # noqa: E731
        outer, opt_outer = _init_part(spec, "outer", put(params["outer"]))
        # Blocks are encoded one at a time and written into preallocated stacked buffers (in
        # place, donated), so loading needs one extra block, not a second copy of the model.
        blocks = opts = None
        for i in range(self.num_blocks):
            s, o = _init_part(spec, "block", put(make_block(i)))
            if blocks is None:
                stacked = lambda t: jax.tree.map(  # noqa: E731
                    lambda x: jax.ShapeDtypeStruct((self.num_blocks,) + x.shape, x.dtype), t)
                zeros = lambda t: jax.tree.map(  # noqa: E731
                    lambda x, sh: jnp.zeros(x.shape, x.dtype, device=sh), t,
                    self._blocks_sharding(t))
                blocks, opts = zeros(stacked(s)), zeros(stacked(o))
            blocks, opts = _set_block(blocks, opts, s, o, i)
        # Committed to the device, like every later state, so step 2 reuses step 1's executable.
        self._state = self._place({
            "outer": outer, "opt_outer": opt_outer, "blocks": blocks, "opt_blocks": opts,
            "pending": parts.no_pending(spec),
            "count": jnp.zeros([], jnp.int32), "skipped_total": jnp.zeros([], jnp.int32)})
        self._dirty = False  # a valid update may be pending (host-side hint, avoids idle flushes)
        self._digest: Optional[str] = None  # base_digest(), once computed

    # ---- placement ------------------------------------------------------------------------------

    @property
    def mesh(self):
        """The engine's mesh (`spmd.Parallel`: mesh, mode, q), or None on one device."""
        return self._par

    def _put(self, tree, shardings):
        return spmd.put(self._par, tree, shardings)

    def _blocks_sharding(self, stacked_tree):
        """Where stacked blocks live: the device, or sharded over the mesh (`spmd.leaf_spec`)."""
        if self._par is None:
            return jax.tree.map(lambda _: self._dev, stacked_tree)
        return self._par.shardings(stacked_tree, stacked=True)

    def _inputs(self, batch: dict, key=None):
        """On a mesh, the batch (and key) placed on every device (as global arrays across
        processes: each process passes the same values); on one device as they are."""
        if self._par is None:
            return batch if key is None else (batch, key)
        if key is not None:
            self._par.check_batch(jax.tree.leaves(batch)[0].shape[0])
        batch = self._par.put(dict(batch), self._dev)
        return batch if key is None else (batch, self._par.put(key, self._dev))

    def _place(self, state: dict) -> dict:
        """A state dict placed where the engine keeps each part (stacked blocks sharded on a
        mesh, the rest replicated)."""
        out = {k: self._put(v, self._dev) for k, v in state.items()
               if k not in ("blocks", "opt_blocks")}
        for k in ("blocks", "opt_blocks"):
            if k in state:
                out[k] = self._put(state[k], self._blocks_sharding(state[k]))
        return out

    # ---- public API ----------------------------------------------------------------------------

    def step(self, batch: dict, key) -> dict:
        """One ZO step on `batch` with step key `key`; returns a dict of device scalars:
        loss (mean of L+ and L-), loss_plus, loss_minus, projected_grad ([q] if q > 1:
        g_j = (L_j^+ - L_j^-) / (2 eps) in float32, exactly the g that the update applies, as
        g / q times clip_norm's factor), skipped (1 if a loss was not finite: no update from
        this step), skipped_total (and grad_norm with clip_norm). Nothing here waits for the
        device."""
        common.check_batch(batch)
        batch, key = self._inputs(batch, as_key(key))
        self._state, metrics = _step(self.spec, self._par, self._state, batch, key)
        self._dirty = True
        return metrics

    def flush(self) -> None:
        """Applies the pending update (call before evaluating, saving or exporting)."""
        if self._dirty:
            self._state = _flush(self.spec, self._par, self._state)
            self._dirty = False

    def eval_loss(self, batch: dict, per_example: bool = False) -> jax.Array:
        """Loss at the current parameters (after flushing), no perturbation: the mean over the
        batch, or per example ([B], float32)."""
        common.check_batch(batch)
        self.flush()
        loss_b, _ = _forward(self.spec, self._par, self._state, self._inputs(batch))
        return loss_b if per_example else jnp.mean(loss_b)

    def logits(self, batch: dict) -> jax.Array:
        """The model's logits at the current parameters (after flushing)."""
        common.check_batch(batch)
        self.flush()
        return _forward(self.spec, self._par, self._state, self._inputs(batch))[1]

    def params(self) -> PyTree:
        """Flushes, then returns {'outer', 'blocks': [...]} decoded to float32 on the device
        (new arrays, unaffected by later steps)."""
        self.flush()
        return _decode(self.spec, self._state)

    def state(self) -> dict:
        """Everything an exact resume needs: parameters as stored (blocks stacked on a leading
        axis), optimiser states, the pending update, counters, and 'meta' (plain Python values).
        The arrays are the engine's own: save them before the next step, which donates them."""
        s = self._state
        return {"outer": s["outer"], "blocks": s["blocks"], "opt_outer": s["opt_outer"],
                "opt_blocks": s["opt_blocks"], "pending": common.pending_to_tree(s["pending"]),
                "count": s["count"], "skipped_total": s["skipped_total"],
                "meta": common.meta(self.spec, "MeZOEngine", self.num_blocks,
                                    str(jax.random.key_impl(s["pending"].key)))}

    def base_digest(self) -> str:
        """SHA-256 (hex) of the frozen base of a model with adapters (`common.base_digest`,
        equal to a ZO2Engine's for the same stored base): computed at the first call, then
        kept until a restore. A checkpoint of such a model holds the adapters alone and this
        digest, to check the base it is restored onto."""
        if self._digest is None:
            s, f = self._state, self.spec.frozen
            blocks = ({f: jax.tree.map(lambda x: x[i], s["blocks"][f])}  # noqa: B023
                      for i in range(self.num_blocks)) if f is not None else ()
            self._digest = common.base_digest(self.spec, s["outer"], blocks)
        return self._digest

    def restore(self, state: dict) -> None:
        """Loads a `state()` of this engine, or of a ZO2Engine with the same storage and q
        (blocks as a list); host, numpy or device arrays. Device arrays it is given become the
        engine's own (later steps donate them)."""
        common.check_meta(self.spec, self.num_blocks, state["meta"])
        for name in ("outer", "opt_outer", "count", "skipped_total"):
            common.check_like(name, state[name], self._state[name])
        pending = common.pending_from_tree(state["pending"], state["meta"]["key_impl"])
        common.check_like("pending", pending.coef, self._state["pending"].coef)
        blocks, opts = state["blocks"], state["opt_blocks"]
        stacked = trees.is_stacked(blocks)
        if stacked:
            common.check_like("blocks", blocks, self._state["blocks"])
            common.check_like("opt_blocks", opts, self._state["opt_blocks"])
        else:
            one = lambda t: jax.tree.map(  # noqa: E731
                lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), t)
            want_b, want_o = one(self._state["blocks"]), one(self._state["opt_blocks"])
            for i in range(self.num_blocks):
                common.check_like(f"blocks[{i}]", blocks[i], want_b)
                common.check_like(f"opt_blocks[{i}]", opts[i], want_o)
        # An explicit memory kind: a Device target would keep pinned-host arrays (a ZO2 state)
        # where they are.
        put = lambda t: self._put(t, self._dev)  # noqa: E731
        new = self._place({k: state[k] for k in ("outer", "opt_outer", "count", "skipped_total")})
        new["pending"] = put(pending)
        if stacked:
            new.update(self._place({"blocks": blocks, "opt_blocks": opts}))
        else:  # block by block into the engine's own stacked buffers (donated): no second copy
            b, o = self._state.pop("blocks"), self._state.pop("opt_blocks")
            for i in range(self.num_blocks):
                b, o = _set_block(b, o, put(blocks[i]), put(opts[i]), i)
            new["blocks"], new["opt_blocks"] = b, o
        self._state = new
        self._dirty = True
        self._digest = None
