"""Zeroth-order estimators: which forward passes a step runs, along which directions, and how the
step's coefficients come from the losses.

Every estimator here needs, while a part is on the device, only the part itself, the step's key
and a few scalars, so it streams like MeZO-SGD (`parts` runs it for both engines):

- "mezo" (MeZO, arXiv 2305.17333): two-sided SPSA. For each of q directions z_j, the losses
  L_j^+- at theta +- eps z_j; g_j = (L_j^+ - L_j^-) / (2 eps), coefficient c_j = g_j / q.
  2q forward passes a step.
- "fzoo" (FZOO, Dang et al. 2025, arXiv 2506.09034): one-sided, with the unperturbed loss L_0
  shared by all q directions: g_j = (L_j^+ - L_0) / eps, and the step normalised by the spread
  of the perturbed losses, c_j = g_j / (q sigma), sigma the sample standard deviation of the
  L_j^+ (a step whose perturbed losses are all equal applies nothing). q + 1 forward passes a
  step; q >= 2. The paper draws Rademacher directions (`directions="rademacher"`). The update
  is then lr * normalised gradient: FZOO's learning rates are not MeZO's (sigma is about
  eps * |grad|).
- "sparse" (Sparse-MeZO, Liu et al. 2024, arXiv 2402.15751): MeZO's two-sided estimate with
  each matrix perturbed (and updated) only where |theta| <= h, h a threshold per matrix. Each
  h is chosen once, when the part's state is made (`init_state`), as the exact `fraction`-th
  smallest magnitude of the values then (`smallest_threshold`), and kept in the part's
  optimiser state (a float32 scalar per matrix: it streams with its block and checkpoints hold
  it). The mask itself is one elementwise comparison with the values of each step, computed
  on the device where a direction is made and never stored; as the values move, the masked
  share drifts from `fraction`. Vectors (biases, norm scales) stay dense. 2q forward passes a
  step.
- "hizoo" (HiZOO, Zhao et al. 2024, arXiv 2402.15173): a diagonal Hessian estimate H per
  parameter (ones at the start), kept in each part's optimiser state so it streams with its
  block. The branches are theta and theta +- eps z_j / sqrt(H); with the curvature
  c_j = |L_j^+ + L_j^- - 2 L_0| / (2 eps^2) the deferred update first moves
  H <- (1 - alpha) H + (alpha / q) sum_j c_j H z_j^2, then steps along d_j = z_j / sqrt(H) with
  c_j = g_j / q, g_j = (L_j^+ - L_j^-) / (2 eps) (the reference implementation's order). 2q + 1
  forward passes a step; the state is one float32 per parameter (4 more bytes per parameter
  each way on ZO2's bus). `alpha` (`smooth`): the paper sweeps 1e-6 to 1e-12; 0 keeps H = 1.

The coefficients c_j multiply the directions d_j in the estimate sum_j c_j d_j that `tx`
receives, so every estimator composes with any optax transform.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

PyTree = Any
ESTIMATORS = ("mezo", "fzoo", "sparse", "hizoo")


@dataclasses.dataclass(frozen=True)
class Estimator:
    """A zeroth-order estimator (see the module docstring). Hashable: part of the engines' Spec.

    Attributes:
      name: "mezo", "fzoo", "sparse" or "hizoo".
      fraction: "sparse": the fraction of each matrix perturbed (its smallest magnitudes), in
        (0, 1]; 1 perturbs everything (MeZO's directions).
      smooth: "hizoo": alpha, the weight of each step's curvature in H, in [0, 1).
    """

    name: str = "mezo"
    fraction: float = 0.25
    smooth: float = 1e-8

    def __post_init__(self):
        if self.name not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.name!r}")
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (
                math.isfinite(f) and 0 < f <= 1):
            raise ValueError(f"the sparse estimator's fraction must be a number in (0, 1], got "
                             f"{f!r}")
        object.__setattr__(self, "fraction", float(f))
        a = self.smooth
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (
                math.isfinite(a) and 0 <= a < 1):
            raise ValueError(f"the hizoo estimator's smooth (alpha) must be a number in [0, 1), "
                             f"got {a!r}")
        object.__setattr__(self, "smooth", float(a))

    def __str__(self) -> str:
        if self.name == "sparse":
            return f"sparse(fraction={self.fraction:g})"
        return f"hizoo(smooth={self.smooth:g})" if self.name == "hizoo" else self.name

    @property
    def one_sided(self) -> bool:
        """Whether the branches are L_0 and the L_j^+ (FZOO), not the L_j^+ and L_j^-."""
        return self.name == "fzoo"

    @property
    def unperturbed(self) -> bool:
        """Whether a step also runs the unperturbed branch (L_0)."""
        return self.name in ("fzoo", "hizoo")

    @property
    def stateful(self) -> bool:
        """Whether each part keeps estimator state (HiZOO's H, Sparse-MeZO's thresholds) beside
        its optimiser state."""
        return self.name == "hizoo" or (self.name == "sparse" and self.fraction < 1.0)

    @property
    def curvature(self) -> bool:
        """Whether a step measures curvatures that the deferred update needs (HiZOO's c_j, in
        the pending update) and moves the state with them."""
        return self.name == "hizoo"

    @property
    def state_key(self) -> Optional[str]:
        """The key of the estimator state in a part's optimiser state, or None."""
        if not self.stateful:
            return None
        return "hessian" if self.name == "hizoo" else "threshold"

    def init_state(self, theta: PyTree) -> PyTree:
        """A part's estimator state: HiZOO's H, ones (float32) like `theta`; Sparse-MeZO's
        threshold of each matrix (a float32 scalar: `smallest_threshold` of its values now;
        +inf for a vector, which stays dense)."""
        if self.name == "sparse":
            return jax.tree.map(lambda t: smallest_threshold(t, self.fraction) if jnp.ndim(t) >= 2
                                else jnp.float32(jnp.inf), theta)
        return jax.tree.map(lambda t: jnp.ones(jnp.shape(t), jnp.float32), theta)

    def check_directions(self, num_directions: int) -> None:
        if self.one_sided and num_directions < 2:
            raise ValueError(f"the fzoo estimator normalises by the spread of its perturbed "
                             f"losses: it needs num_directions >= 2, got {num_directions}")

    def next_state(self, state: PyTree, zs: list, curv: jax.Array) -> PyTree:
        """HiZOO's H after a step with raw directions `zs` and curvatures `curv` [q]:
        (1 - alpha) H + (alpha / q) sum_j c_j H z_j^2. (Only HiZOO's state moves.)"""
        acc = None
        for j, z in enumerate(zs):
            term = jax.tree.map(lambda z_: curv[j] * (z_ * z_), z)
            acc = term if acc is None else jax.tree.map(jnp.add, acc, term)
        a, q = self.smooth, len(zs)
        return jax.tree.map(lambda h, c: (1.0 - a) * h + (a / q) * h * c, state, acc)

    def forward_passes(self, num_directions: int) -> int:
        """Forward passes of a step with q directions (one device)."""
        return (num_directions if self.one_sided else 2 * num_directions) + int(self.unperturbed)

    def branches(self, k: int) -> list:
        """The forward branches of a step over k directions, in the order their hidden states
        are carried: (i, sign) for the i-th direction with sign +1 / -1, or (None, 0) for the
        unperturbed one."""
        both = [(i, s) for i in range(k) for s in ((1,) if self.one_sided else (1, -1))]
        return ([(None, 0)] if self.unperturbed else []) + both

    def shaper(self, theta: PyTree, state: PyTree = None
               ) -> Optional[Callable[[PyTree], PyTree]]:
        """The map from raw directions z to the estimator's d (a function of the part's values
        `theta`, float32, and its estimator `state`), or None where d = z."""
        if self.name == "hizoo":
            # 1 / sqrt(H) made once and pinned: the same values whatever program (or
            # sharding) then uses them
            scale = jax.lax.optimization_barrier(
                jax.tree.map(lambda h: 1.0 / jnp.sqrt(h), state))
            return lambda z: jax.tree.map(jnp.multiply, z, scale)
        if not self.stateful:  # mezo, fzoo, sparse with fraction 1
            return None
        masks = jax.tree.map(lambda t, h: jnp.abs(t) <= h if t.ndim >= 2 else None, theta, state)
        return lambda z: jax.tree.map(
            lambda z_, m: z_ if m is None else jnp.where(m, z_, jnp.zeros_like(z_)), z, masks,
            is_leaf=lambda x: x is None)


def as_estimator(value) -> Estimator:
    """An Estimator from an Estimator or its name."""
    if isinstance(value, Estimator):
        return value
    if isinstance(value, str):
        return Estimator(value)
    raise TypeError(f"estimator must be a name ({', '.join(ESTIMATORS)}) or a "
                    f"zo2_jax.Estimator, got {type(value).__name__}")


def smallest_threshold(x: jax.Array, fraction: float) -> jax.Array:
    """The smallest float32 t with at least ceil(fraction * size) entries of |x| <= t (NaNs never
    count): `|x| <= t` selects the fraction of smallest magnitudes, and entries tied with the
    largest of them.

    Found exactly, with no sort: the bit patterns of non-negative float32 values order like the
    values, so a binary search over the 2^31 patterns (31 counting passes over `x`) finds it.
    Counts are integers, so t is the same whatever program (or sharding) computes it."""
    a = jax.lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.uint32)
    k = min(x.size, max(1, math.ceil(fraction * x.size)))

    def step(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        enough = jnp.sum((a <= mid).astype(jnp.int32)) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    # +inf is 0x7F800000; NaNs (above it) are never selected
    lo, hi = jax.lax.fori_loop(0, 31, step, (jnp.uint32(0), jnp.uint32(0x7F800000)))
    return jax.lax.bitcast_convert_type(hi, jnp.float32)


def smallest_mask(x: jax.Array, fraction: float) -> jax.Array:
    """True on the ceil(fraction * size) entries of `x` of smallest magnitude (and on entries
    tied with the largest of them), False elsewhere and on NaNs (`smallest_threshold`)."""
    return jnp.abs(x.astype(jnp.float32)) <= smallest_threshold(x, fraction)


__all__ = ["ESTIMATORS", "Estimator", "as_estimator", "smallest_mask", "smallest_threshold"]
