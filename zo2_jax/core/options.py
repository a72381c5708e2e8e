"""Options declared once: typed, frozen dataclasses whose fields carry their default, allowed
values and help text.

Each engine's options are one such dataclass (`ZOOptions` here, for both engines;
`zo2_jax.offload.StreamOptions` for ZO2's placement). The engines check their keyword arguments
against these declarations, `TrainConfig` nests the dataclasses, and the command line builds one
flag per field from the declaration (`zo2-jax train --help` prints the help text). A field's
`kind` says what it takes:

    choice            one of `choices`
    count             an int >= 1               count_or_auto   an int >= 1 or "auto"
    natural           an int >= 0               bool_or_auto    True, False or "auto"
    positive          a finite number > 0       positive_or_none   the same, or None
    fraction          a number in [0, 1)        nonnegative     a finite number >= 0
    bool, int, float, str, path, words          (checked by their owner)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, get_args

import numpy as np

from zo2_jax.core.estimators import ESTIMATORS, Estimator
from zo2_jax.core.noise import DIRECTIONS
from zo2_jax.core.storage import Rounding, Storage, StorageDType

AUTO = "auto"
ALL_COMMANDS = ("train", "eval", "export", "generate")
TRAINING = ("train",)

ComputeDtype = Literal["float32", "bfloat16"]
Directions = Literal["gaussian", "rademacher"]
Parallel = Literal["auto", "data", "directions"]


def option(default, help: str, kind: str, commands=ALL_COMMANDS, choices=None, metavar=None):
    """A dataclass field with its declaration: `kind` (see the module docstring), `choices` for a
    choice, and `commands`, the command-line commands whose flags include it."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, kind=kind, commands=tuple(commands),
        choices=None if choices is None else tuple(choices), metavar=metavar))


def _is_int(v) -> bool:
    return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, np.integer))


def _is_number(v) -> bool:
    return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, float, np.integer,
                                                                   np.floating))


_EXPECT = {
    "count": "an int >= 1", "count_or_auto": "an int >= 1 or 'auto'", "natural": "an int >= 0",
    "bool_or_auto": "True, False or 'auto'", "positive": "a finite number > 0",
    "positive_or_none": "a finite number > 0 or unset", "fraction": "a number in [0, 1)",
    "nonnegative": "a finite number >= 0"}


def valid(kind: str, value, choices=None) -> bool:
    """Whether `value` is allowed for a field of this kind (kinds without a rule: True)."""
    if kind == "choice":
        return isinstance(value, str) and value in choices
    if kind == "count":
        return _is_int(value) and value >= 1
    if kind == "count_or_auto":
        return value == AUTO if isinstance(value, str) else _is_int(value) and value >= 1
    if kind == "natural":
        return _is_int(value) and value >= 0
    if kind == "bool_or_auto":
        return isinstance(value, (bool, np.bool_)) or (isinstance(value, str) and value == AUTO)
    if kind in ("positive", "positive_or_none"):
        if value is None:
            return kind == "positive_or_none"
        return _is_number(value) and math.isfinite(value) and value > 0
    if kind == "fraction":
        return _is_number(value) and 0 <= value < 1
    if kind == "nonnegative":
        return _is_number(value) and math.isfinite(value) and value >= 0
    return True


def expected(field: dataclasses.Field) -> str:
    md = field.metadata
    if md["kind"] == "choice":
        return f"one of {list(md['choices'])}"
    return _EXPECT.get(md["kind"], md["kind"])


def check(name: str, value, owner) -> Any:
    """Raises a ValueError naming `name`, the value and what `owner`'s declaration allows,
    unless `value` is allowed. Returns the value (a bool_or_auto's "yes" / "no" as a bool)."""
    field = {f.name: f for f in dataclasses.fields(owner)}[name]
    md = field.metadata
    if md["kind"] == "bool_or_auto" and isinstance(value, str) and value in ("yes", "no"):
        value = value == "yes"  # the command line's spelling
    if not valid(md["kind"], value, md["choices"]):
        raise ValueError(f"{name} must be {expected(field)}, got {value!r}")
    return value


def check_all(obj) -> None:
    """`check` for every field of a dataclass instance (in its __post_init__)."""
    for f in dataclasses.fields(obj):
        v = check(f.name, getattr(obj, f.name), type(obj))
        if v is not getattr(obj, f.name):
            object.__setattr__(obj, f.name, v)


@dataclasses.dataclass(frozen=True)
class ZOOptions:
    """The zeroth-order estimate and how parameters are kept: the options both engines share.

    `MeZOEngine` and `ZO2Engine` take these as keyword arguments (`storage=` as a `Storage`,
    `compute_dtype=` as a dtype: `engine_kwargs()` converts); `TrainConfig.zo` holds them.
    """

    eps: float = option(1e-3, "perturbation scale: the two forward passes see theta +- eps*z",
                        "positive", TRAINING)
    num_directions: int = option(1, "random directions averaged per step (two forward passes "
                                 "each)", "count", TRAINING)
    directions: Directions = option("gaussian", "distribution of z: gaussian (MeZO's) or "
                                    "rademacher (+-1, far cheaper to generate)", "choice",
                                    TRAINING, choices=DIRECTIONS)
    estimator: str = option("mezo", "zeroth-order estimator: mezo (two-sided SPSA, 2q forward "
                            "passes), fzoo (one-sided from a shared unperturbed pass, step "
                            "normalised by the loss spread; q + 1 passes, q >= 2) or sparse "
                            "(Sparse-MeZO: only each matrix's smallest-magnitude entries "
                            "perturbed) or hizoo (HiZOO: a diagonal Hessian estimate per "
                            "parameter shapes the directions; 2q + 1 passes)", "choice",
                            TRAINING, choices=ESTIMATORS)
    sparse_fraction: float = option(Estimator.fraction, "the sparse estimator: fraction of each "
                                    "matrix perturbed (its smallest magnitudes, by a threshold "
                                    "chosen at the start), in (0, 1]",
                                    "positive", TRAINING)
    hessian_smooth: float = option(Estimator.smooth, "the hizoo estimator: alpha, the weight of "
                                   "each step's curvature in the Hessian estimate, in [0, 1)",
                                   "nonnegative", TRAINING)
    storage_dtype: StorageDType = option(Storage.dtype, "how parameters are stored (on the "
                                         "host with zo2); low-bit storage halves or quarters "
                                         "the bytes moved per step", "choice",
                                         choices=get_args(StorageDType))
    rounding: Rounding = option(Storage.rounding, "rounding of updates into a low-bit storage "
                                "dtype; stochastic keeps tiny updates in expectation", "choice",
                                choices=get_args(Rounding))
    compute_dtype: ComputeDtype = option("float32", "dtype of the forward passes", "choice",
                                         choices=("float32", "bfloat16"))
    devices: int = option(1, "devices to run on, as one mesh: the first N of jax.devices() "
                          "(every process's, after jax.distributed.initialize); 0: all of them",
                          "natural", ("train", "eval"))
    parallel: Parallel = option(AUTO, "how a mesh splits a step: directions (each device its "
                                "share of num_directions; bit-identical to one device) or data "
                                "(each device its rows of the batch); auto: directions when "
                                "num_directions is a multiple of the devices", "choice",
                                TRAINING, choices=(AUTO, "data", "directions"))

    def __post_init__(self):
        check_all(self)
        self.make_estimator().check_directions(self.num_directions)

    def make_estimator(self) -> Estimator:
        return Estimator(self.estimator, self.sparse_fraction, self.hessian_smooth)

    def storage(self) -> Storage:
        return Storage(self.storage_dtype, rounding=self.rounding)

    def engine_kwargs(self) -> dict:
        """The engines' keyword arguments for these options."""
        import jax.numpy as jnp
        return dict(eps=self.eps, num_directions=self.num_directions,
                    directions=self.directions, estimator=self.make_estimator(),
                    storage=self.storage(),
                    compute_dtype=jnp.dtype(self.compute_dtype), mesh=self.mesh(),
                    parallel=self.parallel)

    def mesh(self):
        """The engines' `mesh=`: None for one device, else the device count (0: all)."""
        if self.devices == 1:
            return None
        import jax
        return self.devices or len(jax.devices())


def default(owner, name: str):
    """The declared default of `owner.name` (for keyword arguments that mirror a field)."""
    return {f.name: f for f in dataclasses.fields(owner)}[name].default


__all__ = ["AUTO", "ZOOptions", "check", "check_all", "default", "option", "valid"]
