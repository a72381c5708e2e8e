"""Pytree helpers: sizes, stacking a list of trees of one structure along a new axis, and host
copies that jax does not cache."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def tree_size(tree: PyTree) -> int:
    """Total number of elements of the arrays (or ShapeDtypeStructs) in a pytree."""
    return int(sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree)))


def tree_nbytes(tree: PyTree) -> int:
    """Total bytes of the arrays (or ShapeDtypeStructs) in a pytree."""
    # x.dtype.itemsize: numpy dtypes and jax's extended ones (PRNG keys) alike
    return int(sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def stack(trees) -> PyTree:
    """Trees of one structure -> one tree with a new leading axis."""
    return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def take(tree: PyTree, i) -> PyTree:
    """Entry i (traced or static) of a stacked tree."""
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), tree)


def put(tree: PyTree, sub: PyTree, i) -> PyTree:
    """The stacked tree with entry i replaced by `sub`."""
    return jax.tree.map(lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y, i, 0), tree, sub)


def unstack(tree: PyTree, n: int) -> list:
    return [jax.tree.map(lambda x: x[i], tree) for i in range(n)]


def is_stacked(blocks) -> bool:
    return not isinstance(blocks, (list, tuple))


def host_copy(x) -> np.ndarray:
    """`x` as a numpy array on the host, without jax caching the copy on `x`.

    `np.asarray` of a jax array on a GPU keeps the host copy cached on the array for as long as
    the array lives; reading every streamed block in turn (a checkpoint) would then keep a second
    copy of the model. Here each call returns a copy of its own: on the CPU backend a read-only
    view of the buffer (jax's conversion without its cache, a private method), elsewhere, or
    where a jax version lacks that method, the host copy of a transient copy of `x` (made where
    `x` lives), whose cache dies with it. An array sharded over several processes is gathered
    (every process must call this). A typed PRNG key is returned as it is (numpy has no such
    dtype).
    """
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return x
    x.block_until_ready()
    if not x.is_fully_addressable:  # a mesh over several processes: gather the shards
        from jax.experimental import multihost_utils
        if x.sharding.memory_kind not in (None, "device"):
            x = jax.device_put(x, jax.memory.Space.Device)  # gathered on the devices
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    # On the CPU backend jax's conversion without its cache is a view of the (immutable) buffer.
    # Elsewhere the runtime keeps the host copy cached on the buffer it converts (two
    # conversions of one array return the same memory): convert a copy, whose cache dies with it.
    devices = x.sharding.device_set
    cpu = all(d.platform == "cpu" for d in devices)
    to_np = getattr(x, _UNCACHED, None) if cpu and len(devices) == 1 else None
    if to_np is not None:
        return to_np()[0]
    return np.asarray(x.copy())


# jax's np.asarray path less its cache: ArrayImpl._single_device_array_to_np_array_did_copy()
# returns (array, whether it copied). A name, so a test can take the fallback.
_UNCACHED = "_single_device_array_to_np_array_did_copy"
