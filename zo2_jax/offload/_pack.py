"""Packed blocks: a block's arrays as one contiguous uint32 buffer, so each is one transfer.

A streamed block of a transformer is a dozen or more arrays; moved one by one, each transfer
pays a fixed cost, so for the smaller blocks per-array overhead, not bandwidth, bounds the
transfer, where one contiguous buffer moves at nearly the bus's bandwidth. The ZO2
engine can therefore keep each streamed block (and its optimiser state) in pinned host memory as
one flat buffer; the engine's per-unit function unpacks it after the upload (slices and
bitcasts) and packs the updated block before the write-back, inside the same jitted call.

Packing is a pure re-arrangement of bits: any numeric dtype of 1, 2 or 4 bytes and bool (as one
byte), leaves aligned to `ALIGN_WORDS` 4-byte words, padding zero. Other leaves (PRNG keys in an
optimiser state, 8-byte dtypes) cannot be packed: `Layout.of` raises, and the engine's
packed="auto" then keeps the blocks unpacked. The layout is static (hashable): one compiled
function serves every block of one structure.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zo2_jax.core.trees import host_copy

PyTree = Any
ALIGN_WORDS = 128  # 512-byte alignment of every leaf inside the buffer



class _Leaf(NamedTuple):
    shape: tuple
    dtype: str
    offset: int  # in uint32 words
    words: int


def _dtype_of(x) -> np.dtype:
    try:
        dtype = np.dtype(x.dtype)
    except TypeError:  # e.g. a typed PRNG key
        raise ValueError(f"cannot pack a leaf of dtype {x.dtype}: only numeric and bool arrays "
                         f"can be packed") from None
    _ratio(dtype)
    return dtype


def _ratio(dtype) -> int:
    size = np.dtype(dtype).itemsize
    if size not in (1, 2, 4):
        raise ValueError(f"cannot pack a {np.dtype(dtype).name} leaf: only 1-, 2- and 4-byte "
                         f"dtypes are supported")
    return 4 // size


def _is_bool(name: str) -> bool:
    return name == "bool"


class Layout(NamedTuple):
    """Where each leaf of a pytree lives in a flat uint32 buffer (hashable; a static argument)."""

    treedef: Any
    leaves: tuple
    words: int

    @classmethod
    def of(cls, tree: PyTree) -> "Layout":
        """The layout of `tree` (arrays or ShapeDtypeStructs)."""
        flat, treedef = jax.tree.flatten(tree)
        leaves, off = [], 0
        for x in flat:
            shape, dtype = tuple(int(d) for d in np.shape(x)), _dtype_of(x)
            n = math.prod(shape)
            words = -(-n // _ratio(dtype))
            leaves.append(_Leaf(shape, dtype.name, off, words))
            off += -(-words // ALIGN_WORDS) * ALIGN_WORDS
        return cls(treedef, tuple(leaves), off)

    @property
    def empty(self) -> bool:
        return not self.leaves

    @property
    def nbytes(self) -> int:
        return 4 * self.words

    def abstract(self) -> PyTree:
        """The unpacked tree as ShapeDtypeStructs."""
        return jax.tree.unflatten(self.treedef, [jax.ShapeDtypeStruct(lf.shape, jnp.dtype(lf.dtype))
                                                 for lf in self.leaves])

    # ---- traced (inside jit) --------------------------------------------------------------------

    def _words_of(self, x, lf: _Leaf):
        r = _ratio(lf.dtype)
        x = jnp.asarray(x).reshape(-1)
        if _is_bool(lf.dtype):  # bitcasts do not take bool: one byte, 0 or 1
            x = x.astype(jnp.uint8)
        if r == 1:
            return jax.lax.bitcast_convert_type(x, jnp.uint32)
        x = jnp.pad(x, (0, lf.words * r - x.size)).reshape(lf.words, r)
        return jax.lax.bitcast_convert_type(x, jnp.uint32)

    def _check(self, tree) -> list:
        flat, treedef = jax.tree.flatten(tree)
        got = [(tuple(np.shape(x)), np.dtype(x.dtype).name) for x in flat]
        want = [(lf.shape, lf.dtype) for lf in self.leaves]
        if treedef != self.treedef or got != want:
            raise ValueError(f"tree does not match the packed layout: got {treedef} with "
                             f"{got}, expected {self.treedef} with {want}")
        return flat

    def pack(self, tree: PyTree) -> jax.Array:
        """uint32[words] holding every leaf of `tree` (traceable)."""
        flat = self._check(tree)
        parts, end = [], 0
        for x, lf in zip(flat, self.leaves):
            if lf.offset > end:
                parts.append(jnp.zeros((lf.offset - end,), jnp.uint32))
            if lf.words:
                parts.append(self._words_of(x, lf))
            end = lf.offset + lf.words
        if self.words > end:
            parts.append(jnp.zeros((self.words - end,), jnp.uint32))
        return jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.uint32)

    def unpack(self, buf: jax.Array) -> PyTree:
        """The tree stored in `buf` (traceable; slices and bitcasts)."""
        out = []
        for lf in self.leaves:
            dtype, r, n = jnp.dtype(lf.dtype), _ratio(lf.dtype), math.prod(lf.shape)
            seg = jax.lax.slice(buf, (lf.offset,), (lf.offset + lf.words,))
            x = jax.lax.bitcast_convert_type(seg, jnp.uint8 if _is_bool(lf.dtype) else dtype)
            if r > 1:
                x = x.reshape(-1)[:n]
            if _is_bool(lf.dtype):
                x = x != 0
            out.append(x.reshape(lf.shape))
        return jax.tree.unflatten(self.treedef, out)

    # ---- host (numpy) ---------------------------------------------------------------------------

    def unpack_host(self, buf) -> PyTree:
        """The tree stored in a host buffer, as numpy views of `host_copy(buf)`: a host copy
        (not cached on `buf`), or on the CPU backend the immutable buffer itself."""
        raw = host_copy(buf)
        if raw.dtype != np.uint32 or raw.shape != (self.words,):
            raise ValueError(f"expected a uint32[{self.words}] packed buffer, got "
                             f"{raw.dtype}{list(raw.shape)}")
        by = raw.view(np.uint8)
        out = []
        for lf in self.leaves:
            dtype = jnp.dtype(lf.dtype)
            n = math.prod(lf.shape)
            start = 4 * lf.offset
            out.append(by[start:start + n * dtype.itemsize].view(dtype).reshape(lf.shape))
        return jax.tree.unflatten(self.treedef, out)


class Split(NamedTuple):
    """A dict's entries packed one buffer each, {key: uint32[words]}: a block with a frozen base
    (`Spec.frozen`) keeps its trained and frozen parts apart, so the write-back can leave the
    frozen buffer out. The interface of `Layout` (hashable; a static argument)."""

    keys: tuple
    layouts: tuple

    @classmethod
    def of(cls, tree: PyTree) -> "Split":
        keys = tuple(sorted(tree))
        return cls(keys, tuple(Layout.of(tree[k]) for k in keys))

    @property
    def empty(self) -> bool:
        return all(lay.empty for lay in self.layouts)

    @property
    def nbytes(self) -> int:
        return sum(lay.nbytes for lay in self.layouts)

    def nbytes_of(self, keys) -> int:
        """Bytes of the buffers of `keys` only."""
        return sum(lay.nbytes for k, lay in zip(self.keys, self.layouts) if k in keys)

    def abstract(self) -> PyTree:
        return {k: lay.abstract() for k, lay in zip(self.keys, self.layouts)}

    def pack(self, tree: PyTree) -> dict:
        if not isinstance(tree, dict) or tuple(sorted(tree)) != self.keys:
            raise ValueError(f"tree does not match the packed layout: expected a dict with "
                             f"keys {list(self.keys)}, got "
                             f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}")
        return {k: lay.pack(tree[k]) for k, lay in zip(self.keys, self.layouts)}

    def unpack(self, bufs: dict) -> PyTree:
        return {k: lay.unpack(bufs[k]) for k, lay in zip(self.keys, self.layouts)}

    def unpack_host(self, bufs: dict) -> PyTree:
        """The entries of `bufs` (all of the layout's keys, or some) as numpy trees."""
        return {k: lay.unpack_host(bufs[k]) for k, lay in zip(self.keys, self.layouts)
                if k in bufs}


class Packing(NamedTuple):
    """Layouts of a streamed block (one buffer, or with `split` one per top-level key: `Split`)
    and of its optimiser state (which may have no arrays: then it is kept as its own empty tree,
    not packed)."""

    block: Any  # Layout or Split
    opt: Layout

    @classmethod
    def of(cls, stored: PyTree, opt: PyTree, split: bool = False) -> "Packing":
        return cls(Split.of(stored) if split else Layout.of(stored), Layout.of(opt))

    def pack(self, stored, opt):
        """(flat block, flat opt or the empty opt tree), new buffers (traceable)."""
        return self.block.pack(stored), (opt if self.opt.empty else self.opt.pack(opt))

    def unpack(self, flat, oflat):
        return self.block.unpack(flat), (oflat if self.opt.empty else self.opt.unpack(oflat))

    def unpack_host(self, flat, oflat):
        return (self.block.unpack_host(flat),
                oflat if self.opt.empty else self.opt.unpack_host(oflat))

    def abstract(self):
        return self.block.abstract(), self.opt.abstract()
