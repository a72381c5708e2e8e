"""Parameter storage codecs: how a parameter is kept between steps (on the host or on the device).

Both engines keep every parameter *encoded* by a `Storage` and decode it to float32 whenever it is
used; the update is computed in float32 on the decoded values and encoded again:

    theta     = decode(stored)                          # float32
    theta'    = update(theta)                           # float32 (see zo2_jax.zo)
    stored'   = encode(theta', key)                     # storage dtype

Formats (per leaf):

* ``float32``: stored as is (4 bytes/parameter). Exact.
* ``bfloat16`` / ``float16``: 2 bytes/parameter. Relative error of one rounding: 2^-9 (bf16),
  2^-11 (fp16, inside its range 6e-5..65504; larger values saturate to 65504 under stochastic
  rounding, to inf under round-to-nearest).
* ``int8``: 1 byte/parameter plus one float32 scale per output channel (the last axis, as in Flax's
  [in, out] kernels) for leaves of rank >= 2: ``q = round(x / s)``, ``s = max|x| / 127`` over all
  other axes; error |x - s*q| <= s/2 (nearest) or < s (stochastic). Leaves of rank < 2 (biases,
  norm scales) are small and sensitive, so they are kept in ``vector_dtype`` (float32 by default,
  or bfloat16).

Rounding: ``nearest`` (round half to even) or ``stochastic``: round up with probability equal to
the distance to the lower neighbour over the gap, so E[encode(x)] = x. A MeZO update is about 1e-7
relative per element, far below a bf16 step (2^-8 relative): round-to-nearest returns the old value
and the update is lost; stochastic rounding keeps it in expectation at the price of rounding noise
of the order of one step per write. Stochastic rounding is keyed (from the step key, the part and
the leaf path), so a run is reproducible and both engines round identically.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Literal, NamedTuple, Optional, get_args

import jax
import jax.numpy as jnp
import numpy as np

from zo2_jax.core.trees import tree_nbytes
from zo2_jax.models.quant import is_qarray

PyTree = Any
StorageDType = Literal["float32", "bfloat16", "float16", "int8"]
Rounding = Literal["nearest", "stochastic"]

_FLOAT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Int8Leaf(NamedTuple):
    """An int8-encoded leaf: ``x ~= q * scale``, scale broadcast along the last axis."""

    q: jax.Array      # int8, the leaf's shape
    scale: jax.Array  # float32, shape [1, ..., 1, C]


def _is_encoded_leaf(x) -> bool:
    return isinstance(x, Int8Leaf) or is_qarray(x)


def path_hash(path) -> int:
    """A stable 32-bit id of a pytree path (crc32 of its `keystr`), for per-leaf keys."""
    return zlib.crc32(jax.tree_util.keystr(path).encode())


def _leaf_key(key: Optional[jax.Array], path) -> Optional[jax.Array]:
    return None if key is None else jax.random.fold_in(key, path_hash(path))


def _stochastic_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
    # Adding 16 random bits below the bf16 mantissa and truncating rounds the magnitude up with
    # probability (dropped bits) / 2^16: exactly unbiased, and a carry moves into the exponent
    # correctly. Non-finite values are passed through round-to-nearest.
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    y = jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)
    return jnp.where(jnp.isfinite(x), y, x.astype(jnp.bfloat16))


def _stochastic_generic(x: jax.Array, key: jax.Array, dtype) -> jax.Array:
    # lo <= x < hi are neighbouring values of `dtype`; pick hi with probability (x-lo)/(hi-lo).
    near = x.astype(dtype)
    inf = jnp.asarray(jnp.inf, dtype)
    lo = jnp.where(near.astype(jnp.float32) > x, jnp.nextafter(near, -inf), near)
    hi = jnp.nextafter(lo, inf)
    lo32, hi32 = lo.astype(jnp.float32), hi.astype(jnp.float32)
    p_up = (x - lo32) / (hi32 - lo32)
    u = jax.random.uniform(key, x.shape, jnp.float32)
    return jnp.where(u < p_up, hi, lo)


def _round_float(x: jax.Array, dtype, key: Optional[jax.Array]) -> jax.Array:
    if dtype == jnp.float32:
        return x.astype(jnp.float32)
    if key is None:
        return x.astype(dtype)
    if dtype == jnp.bfloat16:
        return _stochastic_bf16(x, key)
    return _stochastic_generic(x, key, dtype)


@dataclasses.dataclass(frozen=True)
class Storage:
    """How parameters are stored between steps.

    Attributes:
      dtype: "float32", "bfloat16", "float16" or "int8".
      rounding: "stochastic" (the default) or "nearest", used when an updated value is
        written; the initial encoding of the user's parameters is always round-to-nearest.
      vector_dtype: int8 only: storage of leaves of rank < 2, "float32" or "bfloat16".

    Example:
      >>> s = Storage("bfloat16")
      >>> enc = s.encode({"w": jnp.ones((2, 3))}, jax.random.key(0))
      >>> s.decode(enc)["w"].dtype
      dtype('float32')
    """

    dtype: StorageDType = "float32"
    rounding: Rounding = "stochastic"
    vector_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self):
        if self.dtype not in get_args(StorageDType):
            raise ValueError(f"Storage dtype must be one of {list(get_args(StorageDType))}, "
                             f"got {self.dtype!r}")
        if self.rounding not in get_args(Rounding):
            raise ValueError(f"Storage rounding must be one of {list(get_args(Rounding))}, "
                             f"got {self.rounding!r}")
        if self.vector_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"Storage vector_dtype must be float32 or bfloat16, "
                             f"got {self.vector_dtype!r}")

    @property
    def stochastic(self) -> bool:
        return self.rounding == "stochastic" and self.dtype != "float32"

    def encode(self, tree: PyTree, key: Optional[jax.Array] = None) -> PyTree:
        """Encodes a float pytree. With `key` and rounding="stochastic", rounds stochastically
        with a per-leaf key fold_in(key, crc32(leaf path)); otherwise rounds to nearest."""
        key = key if self.stochastic else None

        def enc(path, x):
            if is_qarray(x):  # a frozen base kept quantised: stored as it is
                return x
            x = jnp.asarray(x, jnp.float32)
            k = _leaf_key(key, path)
            if self.dtype != "int8":
                return _round_float(x, _FLOAT_DTYPES[self.dtype], k)
            if x.ndim < 2:
                return _round_float(x, _FLOAT_DTYPES[self.vector_dtype], k)
            absmax = jnp.max(jnp.abs(x), axis=tuple(range(x.ndim - 1)), keepdims=True)
            scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
            y = x / scale
            if k is None:
                y = jnp.round(y)
            else:
                y = jnp.floor(y + jax.random.uniform(k, x.shape, jnp.float32))
            return Int8Leaf(jnp.clip(y, -127, 127).astype(jnp.int8), scale)

        return jax.tree_util.tree_map_with_path(enc, tree, is_leaf=is_qarray)

    def decode(self, tree: PyTree, keep_quantized: bool = False) -> PyTree:
        """Decodes an encoded pytree to float32. QArray leaves (a quantised frozen base) are
        dequantised, or with `keep_quantized` left as they are (for a model that dequantises
        each matrix where it is used)."""

        def dec(x):
            if isinstance(x, Int8Leaf):
                return x.q.astype(jnp.float32) * x.scale
            if is_qarray(x):
                return x if keep_quantized else x.value(jnp.float32)
            return x.astype(jnp.float32)

        return jax.tree.map(dec, tree, is_leaf=_is_encoded_leaf)

    def select(self, pred: jax.Array, new: PyTree, old: PyTree) -> PyTree:
        """Leafwise ``where(pred, new, old)`` over encoded pytrees (scales included)."""
        return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)

    def encoded_shapes(self, tree: PyTree) -> PyTree:
        """ShapeDtypeStructs of the encoding of `tree` (arrays or ShapeDtypeStructs)."""
        shapes = jax.tree.map(lambda x: x if is_qarray(x) else
                              jax.ShapeDtypeStruct(np.shape(x), jnp.float32), tree,
                              is_leaf=is_qarray)
        return jax.eval_shape(self.encode, shapes)

    def nbytes(self, tree: PyTree) -> int:
        """Bytes the encoding of `tree` occupies."""
        return tree_nbytes(self.encoded_shapes(tree))

