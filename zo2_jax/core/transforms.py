"""The update rule: MeZO's SGD as an optax transform the engines fuse; checks on user transforms.

MeZO's rule, with g*z the zeroth-order gradient estimate and m the weight-decay mask (True for
matrices and embeddings, False for biases and norm scales):

    theta <- theta - lr_t * (g*z + wd * m * theta)

`mezo_sgd` returns a real `optax.GradientTransformation` (so it works anywhere optax does), of the
subclass `MeZOSGD`, which the engines recognise: for it they compute the line above in one jitted
elementwise expression with z generated inside, never materialising g*z.
"""

from __future__ import annotations

import math
import types
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zo2_jax.models.model import decay_mask

PyTree = Any
Schedule = Callable[[jax.Array], jax.Array]
MaskSpec = Union[None, PyTree, Callable[[PyTree], PyTree]]


class MeZOSGDState(NamedTuple):
    """Number of updates applied so far (drives a learning-rate schedule)."""

    count: jax.Array


class MeZOSGD(optax.GradientTransformation):
    """The GradientTransformation returned by `mezo_sgd`; carries its hyperparameters so the
    engines can fuse it. Attributes: learning_rate, weight_decay, mask."""

    # A NamedTuple subclass without __slots__ gets a __dict__, so the attributes below can be set
    # while (init, update) stay the tuple every optax combinator expects.


def learning_rate_at(learning_rate: Union[float, Schedule], count: jax.Array) -> jax.Array:
    """The learning rate after `count` applied updates, as a float32 scalar."""
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    return jnp.asarray(lr, jnp.float32)


def resolve_mask(mask: MaskSpec, params: PyTree, model=None) -> PyTree:
    """A pytree of Python bools like `params`: mask(params) if callable, mask if a pytree, else
    model.decay_mask(params) when the model has one, else rank >= 2."""
    if mask is None:
        if model is not None and hasattr(model, "decay_mask"):
            mask = model.decay_mask(params)
        else:
            mask = decay_mask(params)
    elif callable(mask):
        mask = mask(params)
    try:
        return jax.tree.map(lambda m, _: bool(np.asarray(m)), mask, params)
    except ValueError as e:
        raise ValueError(f"weight-decay mask does not match the parameters' structure: "
                         f"{jax.tree.structure(mask)} vs {jax.tree.structure(params)}") from e


def fused_sgd_leaf(theta, gz, lr, wd: float, decay: bool):
    """theta - lr * (gz + wd * theta) where decay, theta - lr * gz elsewhere (float32)."""
    if decay and wd != 0.0:
        return theta - lr * (gz + wd * theta)
    return theta - lr * gz


def mezo_sgd(learning_rate: Union[float, Schedule], weight_decay: float = 0.0,
             mask: MaskSpec = None) -> MeZOSGD:
    """MeZO's SGD: theta <- theta - lr_t * (grad + wd * mask * theta).

    Args:
      learning_rate: a float or an optax schedule of the number of applied updates (skipped steps
        do not count).
      weight_decay: L2 coefficient wd >= 0, added to the gradient as in MeZO (not decoupled
        from the learning rate).
      mask: which leaves decay: None (the model's `decay_mask`, else rank >= 2), a pytree of bools
        like the parameters, or a callable params -> such a pytree. Engines call it on each part
        (`outer` and one block) separately.

    Returns:
      A `MeZOSGD` (an `optax.GradientTransformation`); the engines fuse it with noise generation.

    Example:
      >>> tx = mezo_sgd(1e-6, weight_decay=0.1)
      >>> state = tx.init({"w": jnp.ones((2, 2))})
    """
    if not callable(learning_rate):
        if not math.isfinite(float(learning_rate)):
            raise ValueError(f"learning_rate must be finite, got {learning_rate!r}")
    if not math.isfinite(float(weight_decay)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay!r}")

    def init_fn(params):
        del params
        return MeZOSGDState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None and weight_decay != 0.0:
            raise ValueError("mezo_sgd with weight_decay needs params in update()")
        lr = learning_rate_at(learning_rate, state.count)
        ref = updates if params is None else params
        decay = resolve_mask(mask, ref)

        def leaf(g, p, d):
            step = g.astype(jnp.float32)
            if d and weight_decay != 0.0:
                step = step + weight_decay * p.astype(jnp.float32)
            return (-lr * step).astype(g.dtype)

        return jax.tree.map(leaf, updates, ref, decay), MeZOSGDState(count=state.count + 1)

    tx = MeZOSGD(init_fn, update_fn)
    tx.learning_rate = learning_rate
    tx.weight_decay = float(weight_decay)
    tx.mask = mask
    return tx


# ---- transforms that need the whole gradient -----------------------------------------------

_GLOBAL_NORM_FACTORIES = ("clip_by_global_norm",)


def find_global_norm_transform(tx: Any, _depth: int = 0, _seen=None) -> Optional[str]:
    """Name of an optax transform inside `tx` that needs the global norm of the whole gradient,
    found by walking the closures of optax's combinators (chain, inject_hyperparams, masked, ...);
    None if there is none. Such a transform cannot run block by block: use the engines'
    exact `clip_norm` instead."""
    seen = set() if _seen is None else _seen
    if _depth > 12 or id(tx) in seen:
        return None
    seen.add(id(tx))
    if isinstance(tx, optax.GradientTransformation):
        return (find_global_norm_transform(tx.init, _depth + 1, seen)
                or find_global_norm_transform(tx.update, _depth + 1, seen))
    if isinstance(tx, (tuple, list)):
        for t in tx:
            found = find_global_norm_transform(t, _depth + 1, seen)
            if found:
                return found
        return None
    if isinstance(tx, types.FunctionType):
        name = tx.__qualname__.split(".")[0]
        if name in _GLOBAL_NORM_FACTORIES and (tx.__module__ or "").startswith("optax"):
            return f"optax.{name}"
        for cell in tx.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            found = find_global_norm_transform(contents, _depth + 1, seen)
            if found:
                return found
    return None


def check_block_transform(tx: Any) -> None:
    """Raises if `tx` is not a GradientTransformation or needs the whole gradient at once."""
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(f"tx must be an optax.GradientTransformation, got {type(tx).__name__}")
    found = find_global_norm_transform(tx)
    if found:
        raise ValueError(
            f"tx contains {found}, which needs the norm of the whole gradient, but the engines "
            f"update block by block (it would clip each block by its own norm). Pass "
            f"clip_norm=... to the engine instead: it clips by the exact global norm |g|*||z||.")
