"""Keyed random directions: z is never stored, it is regenerated from the key where it is needed.

For step key k, direction j (0 <= j < q), part p and leaf path s:

    z_j[p, s] = normal(fold_in(fold_in(fold_in(k, j), p), crc32(keystr(s))), shape, float32)

(or, with Rademacher directions, +-1 from the bits of the same key).

A part is `outer` (p = OUTER_PART) or block i (p = i); s is the leaf's path inside its part. The
same z therefore comes back in the +eps branch, the -eps branch and the deferred update, whether a
block is resident, streamed, or stacked along a scan axis. Stochastic rounding of the written
values draws from fold_in(fold_in(k, ROUNDING_STREAM), p), a stream no direction uses.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zo2_jax.core.storage import path_hash

PyTree = Any

OUTER_PART = 0x7FFFFFFF      # part id of `outer`; blocks use their index
ROUNDING_STREAM = 0xFFFFFFFF  # fold_in tag of the stochastic-rounding stream (never a direction)


def as_key(key) -> jax.Array:
    """A typed PRNG key from a typed key or raw uint32 key data; raises on anything else."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"expected one PRNG key (shape ()), got a key array of shape "
                             f"{key.shape}")
        return key
    arr = np.asarray(key) if not isinstance(key, jax.Array) else key
    if arr.dtype != np.uint32 or arr.ndim != 1:
        raise TypeError(f"expected a PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), "
                        f"got {type(key).__name__} with dtype {arr.dtype} and shape {arr.shape}")
    return jax.random.wrap_key_data(jnp.asarray(arr))


def direction_key(key: jax.Array, j: int) -> jax.Array:
    return jax.random.fold_in(key, j)


def part_key(key: jax.Array, part_id) -> jax.Array:
    return jax.random.fold_in(key, jnp.asarray(part_id, jnp.uint32))


def rounding_key(key: jax.Array, part_id) -> jax.Array:
    """Key of the stochastic rounding of a part written by the update of step key `key`."""
    return part_key(jax.random.fold_in(key, ROUNDING_STREAM), part_id)


DIRECTIONS = ("gaussian", "rademacher")


def rademacher(key: jax.Array, shape) -> jax.Array:
    """Independent +-1 (float32) with probability 1/2 each: one random bit per element, 32 unpacked
    from each 32-bit word, so it costs ~1/32 of the generator work of `jax.random.normal`."""
    n = int(np.prod(shape, dtype=np.int64))
    words = jax.random.bits(key, ((n + 31) // 32,), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)[None, :]) & jnp.uint32(1)
    return (bits.reshape(-1)[:n].astype(jnp.float32) * 2.0 - 1.0).reshape(shape)


def leaf_noise(key: jax.Array, shape, kind: str = "gaussian") -> jax.Array:
    if kind == "gaussian":
        return jax.random.normal(key, shape, jnp.float32)
    if kind == "rademacher":
        return rademacher(key, shape)
    raise ValueError(f"directions must be one of {DIRECTIONS}, got {kind!r}")


def part_noise(key: jax.Array, j: int, part_id, tree: PyTree, kind: str = "gaussian") -> PyTree:
    """z_j for every leaf of `tree` (one part), float32, shaped like the leaves: standard normal
    (`kind='gaussian'`, MeZO's) or +-1 (`'rademacher'`, Spall's SPSA; E[z z^T] = I as well)."""
    pk = part_key(direction_key(key, j), part_id)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: leaf_noise(jax.random.fold_in(pk, path_hash(path)), np.shape(x), kind),
        tree)


def gram(zs: list[PyTree]) -> jax.Array:
    """[q, q] matrix of inner products <z_j, z_k> over the leaves of one part (float32).

    Elementwise products and sums, not dots: a float32 dot may run in TF32 on a GPU.
    """
    q = len(zs)
    leaves = [jax.tree.leaves(z) for z in zs]
    g = [[None] * q for _ in range(q)]
    for a in range(q):
        for b in range(a + 1):
            g[a][b] = g[b][a] = sum(jnp.sum(x * y) for x, y in zip(leaves[a], leaves[b]))
    return jnp.stack([jnp.stack(row) for row in g]).astype(jnp.float32)
