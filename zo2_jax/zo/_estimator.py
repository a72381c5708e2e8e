"""Function-level zeroth-order gradients, in the spirit of `jax.value_and_grad`, on any pytree.

For a loss f, step key k and q directions z_j (Gaussian, one per leaf, regenerated from k; see
`zo2_jax.core.noise`; the whole pytree is one part, PART_ID):

    L_j^+- = f(theta +- eps z_j),   g_j = (L_j^+ - L_j^-) / (2 eps),
    grad_hat = (1/q) sum_j g_j z_j         (an unbiased estimate of the gradient of a smoothed f)

`zo_value_and_grad` returns the value (the mean of the 2q branch losses, f(theta) + O(eps^2)) and
a `ZOGrad` (the q scalars and the key: a few bytes); `ZOGrad.materialize` builds grad_hat as a
pytree, and `apply_zo_grad` applies it through any optax transform (fused for `mezo_sgd`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from zo2_jax.core.common import check_eps
from zo2_jax.core.noise import as_key, part_noise
from zo2_jax.core.transforms import (MeZOSGD, MeZOSGDState, fused_sgd_leaf, learning_rate_at,
                                    resolve_mask)

PyTree = Any
PART_ID = 0  # the part id of a whole pytree (engines use OUTER_PART and block indices)


class ZOGrad(NamedTuple):
    """A zeroth-order gradient estimate, stored as its projected gradients and key.

    Attributes:
      g: [q] float32 projected gradients g_j = (L_j^+ - L_j^-) / (2 eps).
      key: the key the directions z_j were drawn from.
    """

    g: jax.Array
    key: jax.Array

    def coefficients(self) -> jax.Array:
        return self.g / self.g.shape[0]

    def materialize(self, params: PyTree) -> PyTree:
        """The estimate (1/q) sum_j g_j z_j as a pytree like `params` (leaf dtypes kept)."""
        est = _estimate(self.key, self.coefficients(), params)
        return jax.tree.map(lambda u, p: u.astype(jnp.result_type(p)), est, params)


def _estimate(key, coef, params) -> PyTree:
    """sum_j coef_j z_j (float32), z_j drawn for `params` as one part."""
    out = None
    for j in range(coef.shape[0]):
        term = jax.tree.map(lambda z: coef[j] * z, part_noise(key, j, PART_ID, params))
        out = term if out is None else jax.tree.map(jnp.add, out, term)
    return out


def zo_value_and_grad(loss_fn: Callable[..., jax.Array], eps: float = 1e-3,
                      num_directions: int = 1) -> Callable[..., tuple[jax.Array, ZOGrad]]:
    """Creates a function returning the loss and a zeroth-order gradient estimate of `loss_fn`.

    Args:
      loss_fn: (params, *args, **kwargs) -> scalar loss; params any pytree of float arrays.
      eps: perturbation scale (> 0).
      num_directions: q, directions averaged (2q evaluations of loss_fn).

    Returns:
      (params, key, *args, **kwargs) -> (loss, ZOGrad), jittable; loss is the mean of the 2q
      branch losses.

    Example:
      >>> value_and_zo_grad = zo_value_and_grad(lambda p, x: jnp.sum((p["w"] - x) ** 2))
      >>> loss, grad = value_and_zo_grad({"w": jnp.zeros(3)}, jax.random.key(0), 1.0)
      >>> grad.materialize({"w": jnp.zeros(3)})["w"].shape
      (3,)
    """
    eps = check_eps(eps)
    if not isinstance(num_directions, int) or num_directions < 1:
        raise ValueError(f"num_directions must be an int >= 1, got {num_directions!r}")

    def fn(params, key, *args, **kwargs):
        key = as_key(key)
        losses_p, losses_m = [], []
        for j in range(num_directions):
            z = part_noise(key, j, PART_ID, params)
            shift = lambda s: jax.tree.map(  # noqa: E731
                lambda p, z_: (p.astype(jnp.float32) + s * eps * z_).astype(p.dtype), params, z)
            losses_p.append(jnp.asarray(loss_fn(shift(1.0), *args, **kwargs), jnp.float32))
            losses_m.append(jnp.asarray(loss_fn(shift(-1.0), *args, **kwargs), jnp.float32))
        lp, lm = jnp.stack(losses_p), jnp.stack(losses_m)
        return jnp.mean((lp + lm) / 2), ZOGrad((lp - lm) / (2 * eps), key)

    return fn


def apply_zo_grad(tx: optax.GradientTransformation, grad: ZOGrad, opt_state, params: PyTree):
    """Applies a ZO gradient through `tx`: returns (new params, new optimiser state).

    For `mezo_sgd` the update theta - lr * (g*z + wd * mask * theta) is one elementwise expression
    with z generated inside; any other transform gets the materialised estimate. A non-finite g
    leaves params and state unchanged (an exact identity).
    """
    ok = jnp.all(jnp.isfinite(grad.g))
    c = jnp.where(ok, grad.coefficients(), 0.0)
    if isinstance(tx, MeZOSGD):
        lr = learning_rate_at(tx.learning_rate, opt_state.count)
        mask = resolve_mask(tx.mask, params)
        gz = _estimate(grad.key, c, params)
        new = jax.tree.map(lambda p, u, m: fused_sgd_leaf(
            p.astype(jnp.float32), u, lr, tx.weight_decay, m).astype(p.dtype), params, gz, mask)
        new_state = MeZOSGDState(opt_state.count + 1)
    else:
        gz = jax.tree.map(lambda u, p: u.astype(jnp.result_type(p)),
                          _estimate(grad.key, c, params), params)
        updates, new_state = tx.update(gz, opt_state, params)
        new = optax.apply_updates(params, updates)
    pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ok, x, y), a, b)  # noqa: E731
    return pick(new, params), pick(new_state, opt_state)
