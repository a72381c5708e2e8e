"""Zeroth-order estimation and the resident (MeZO) engine.

Noise: z_j for leaf s of part p at step key k is normal(fold_in(fold_in(fold_in(k, j), p),
crc32(s))), regenerated wherever it is needed; the projected gradient is
g_j = (L(theta + eps z_j) - L(theta - eps z_j)) / (2 eps), and the estimate (1/q) sum_j g_j z_j
feeds any optax transform (`mezo_sgd` is fused into one elementwise update). The engines' other
estimators (FZOO, Sparse-MeZO) are `Estimator`s (`zo2_jax.core.estimators`).
"""

from zo2_jax.core.estimators import Estimator
from zo2_jax.core.options import ZOOptions
from zo2_jax.core.transforms import MeZOSGD
from zo2_jax.core.transforms import MeZOSGDState
from zo2_jax.core.transforms import mezo_sgd
from zo2_jax.zo._estimator import ZOGrad
from zo2_jax.zo._estimator import apply_zo_grad
from zo2_jax.zo._estimator import zo_value_and_grad
from zo2_jax.zo._mezo import MeZOEngine

__all__ = [
    "Estimator",
    "MeZOEngine",
    "MeZOSGD",
    "MeZOSGDState",
    "ZOGrad",
    "ZOOptions",
    "apply_zo_grad",
    "mezo_sgd",
    "zo_value_and_grad",
]
