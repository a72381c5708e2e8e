"""Pytree helpers: sizes, and stacking a list of trees of one structure along a new axis."""

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
