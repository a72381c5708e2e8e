"""ZO steps on several devices: a 1-D mesh, the blocks sharded over it, one copy of the model.

Where things live on a mesh of N devices (axis `AXIS`):
- `outer` (embeddings, final norm, head) is replicated: every device keeps and updates it.
- Each leaf of a block is sharded along its largest axis that N divides (`leaf_spec`; a leaf with
  no such axis, a bias of odd size, is replicated). ZO2 keeps the streamed blocks so in pinned host
  memory: the host holds one copy of the model whatever N is, and each device uploads and writes
  back only its shard, over its own link. MeZO keeps its stacked blocks so on the devices.
- Values that differ per device (hidden states, the model's context) are global arrays with a
  leading axis of N, device r's at index r.

A step's stages, each one jitted function per stage as on one device:
- outer (`outer_embed`): every device applies the deferred update to `outer` (the same values
  on all) and embeds its own branches.
- block (`block_step`): the deferred update runs on the shards (partitionable threefry: each
  device generates only its shard of z, and it equals that slice of one device's z), then the
  updated block, as stored (bf16 or int8: the smallest form), is all-gathered, and each device
  runs its branches through it.
- head (`head_finish`): each device the losses of its branches; the q losses of each sign are
  gathered (directions) or summed over the devices' rows (data), then every device computes the
  same projected gradients and pending update.

Two ways to split the forward work (`MODES`):
- "directions": q = kN, device r runs directions rk .. rk + k - 1 on the whole batch. Every value
  comes from the same operations as on one device, so parameters, losses and g are bit-identical
  to one device's for the same keys.
- "data": every device runs all q directions on its B/N rows. A loss is the sum of the devices'
  row sums over B, where one device takes the mean of all B rows: equal up to the float
  re-association of that reduction and of the dot products on fewer rows (the tests bound it).
  Each device also generates all of z for the forward (the work of one device's q directions),
  where "directions" splits it: with q >= N, "directions" is the cheaper split.

With N = 1 every function here is the one-device function of `parts`: `par` None.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zo2_jax.core import parts

PyTree = Any
AXIS = "zo"
MODES = ("data", "directions")
_R, _D = P(), P(AXIS)


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process, `jax.devices()`)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("a mesh needs at least one device")
    if len(set(devices)) != len(devices):
        raise ValueError(f"a mesh's devices must be distinct, got {devices}")
    return Mesh(np.array(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def as_mesh(mesh) -> Mesh:
    """A 1-D mesh from a Mesh (one axis), a device count (the first n of `jax.devices()`), or a
    list of devices."""
    if isinstance(mesh, Mesh):
        if mesh.axis_names != (AXIS,):
            # any 1-D mesh works: rebuild it over the same devices under our axis name
            if len(mesh.axis_names) != 1:
                raise ValueError(f"expected a 1-D mesh, got axes {mesh.axis_names} of shape "
                                 f"{dict(mesh.shape)}")
            return make_mesh(list(mesh.devices.flat))
        return mesh
    if isinstance(mesh, (int, np.integer)) and not isinstance(mesh, bool):
        have = jax.devices()
        if not 1 <= mesh <= len(have):
            raise ValueError(f"mesh={mesh}: this process sees {len(have)} devices "
                             f"({have[0].platform}); ask for 1..{len(have)}")
        return make_mesh(have[:mesh])
    if isinstance(mesh, (list, tuple)):
        return make_mesh(mesh)
    raise TypeError(f"mesh must be a jax.sharding.Mesh, a device count or a list of devices, "
                    f"got {type(mesh).__name__}")


def leaf_spec(shape, n: int, stacked: bool = False) -> P:
    """Sharding of one leaf over N devices: its largest axis that N divides (the first of equal
    ones; after the leading stacking axis of stacked blocks), or replicated if none."""
    dims = tuple(shape)[1:] if stacked else tuple(shape)
    best = None
    for a, d in enumerate(dims):
        if d >= n and d % n == 0 and (best is None or d > dims[best]):
            best = a
    if best is None:
        return _R
    spec = [None] * len(shape)
    spec[best + int(stacked)] = AXIS
    return P(*spec)


@dataclasses.dataclass(frozen=True)
class Parallel:
    """A mesh and how the forward work is split over it (hashable: a static argument).

    Attributes:
      mesh: a 1-D mesh (axis `AXIS`).
      mode: "directions" (q must be a multiple of N) or "data" (the batch size must be).
      num_directions: q.
    """

    mesh: Mesh
    mode: str
    num_directions: int
    auto: bool = dataclasses.field(default=False, compare=False)  # chosen by mode="auto"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"parallel must be one of {MODES} or 'auto', got {self.mode!r}")
        if self.mode == "directions" and self.num_directions % self.n:
            raise ValueError(
                f"parallel='directions' runs num_directions / devices directions on each "
                f"device: num_directions={self.num_directions} is not a multiple of the "
                f"{self.n} devices (use a multiple, or parallel='data')")

    @classmethod
    def make(cls, mesh, mode: str, num_directions: int) -> "Parallel":
        """`mode` "auto": directions where q is a multiple of N (each device generates only its
        directions' z, and the result is bit-identical to one device's), else data."""
        mesh = as_mesh(mesh)
        if mode == "auto":
            mode = "directions" if num_directions % mesh.size == 0 else "data"
            return cls(mesh, mode, int(num_directions), auto=True)
        return cls(mesh, mode, int(num_directions))

    def __str__(self) -> str:
        n, q = self.n, self.num_directions
        why = ""
        if self.auto:
            why = (f" (auto: num_directions={q} is a multiple of {n})" if self.mode == "directions"
                   else f" (auto: num_directions={q} is not a multiple of {n})")
        split = (f"{q // n} of the {q} directions per device" if self.mode == "directions"
                 else f"all {q} directions on 1/{n} of the batch per device")
        return (f"mesh of {n} devices ({len(self.mesh.local_devices)} in this process), "
                f"parallel={self.mode}{why}: {split}; each block sharded leaf by leaf")

    @property
    def n(self) -> int:
        return self.mesh.size

    def check_batch(self, batch_size: int) -> None:
        if self.mode == "data" and batch_size % self.n:
            raise ValueError(f"parallel='data' splits the batch over the {self.n} devices: "
                             f"batch size {batch_size} is not a multiple of {self.n} (use a "
                             f"multiple, or parallel='directions' with num_directions a "
                             f"multiple of {self.n})")

    # ---- placements -----------------------------------------------------------------------------

    def sharding(self, spec: P = _R, kind: str = "device") -> NamedSharding:
        return NamedSharding(self.mesh, spec, memory_kind=kind)

    def shardings(self, tree: PyTree, kind: str = "device", stacked: bool = False) -> PyTree:
        """A NamedSharding per leaf of a block (or of stacked blocks): see `leaf_spec`. Built
        once per tree structure and shapes (the stream asks for every block it moves)."""
        leaves, treedef = jax.tree.flatten(tree)
        shapes = tuple(tuple(np.shape(x)) for x in leaves)
        return _shardings(self, treedef, shapes, kind, stacked)

    def put(self, tree: PyTree, shardings: PyTree) -> PyTree:
        """`tree` (host values, the same on every process) placed as `shardings` (one sharding,
        or one per leaf). Works across processes: each places only its own devices' shards."""
        if isinstance(shardings, jax.sharding.Sharding):
            shardings = jax.tree.map(lambda _: shardings, tree)

        def one(x, s):
            if isinstance(x, jax.Array) and x.sharding == s:
                return x  # already there (a device_put would still cost host time)
            if jax.process_count() == 1 or (isinstance(x, jax.Array)
                                             and not x.is_fully_addressable):
                return jax.device_put(x, s)
            if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
                data = one(np.asarray(jax.random.key_data(x)), s)
                return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
        return jax.tree.map(one, tree, shardings)

    # ---- inside shard_map -----------------------------------------------------------------------

    def dirs(self):
        """This device's directions (None: all q)."""
        if self.mode == "data":
            return None
        k = self.num_directions // self.n
        r = jax.lax.axis_index(AXIS)
        return [r * k + i for i in range(k)]

    def rows(self, batch: dict, split: Optional[bool] = None) -> dict:
        """This device's rows of the batch (data), or the whole batch."""
        if not (self.mode == "data" if split is None else split):
            return batch
        b = jax.tree.leaves(batch)[0].shape[0] // self.n
        start = jax.lax.axis_index(AXIS) * b
        return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, b, 0), batch)

    def mean(self, batch_size: int):
        if self.mode == "directions":
            return None  # head_losses' own (parts.fixed_mean)
        return lambda x: jax.lax.psum(parts.fixed_sum(x), AXIS) / batch_size


@functools.lru_cache(maxsize=512)
def _shardings(par: Parallel, treedef, shapes, kind: str, stacked: bool) -> PyTree:
    return jax.tree.unflatten(treedef, [par.sharding(leaf_spec(s, par.n, stacked), kind)
                                        for s in shapes])


def put(par: Optional[Parallel], tree: PyTree, shardings: PyTree) -> PyTree:
    """`tree` placed as `shardings`: `jax.device_put` on one device (`par` None), else
    `par.put` (which also works across processes)."""
    return jax.device_put(tree, shardings) if par is None else par.put(tree, shardings)


def _smap(par: Parallel, f, in_specs, out_specs):
    return jax.shard_map(f, mesh=par.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


def _dev(tree):
    return jax.tree.map(lambda x: x[None], tree)


def _undev(tree):
    return jax.tree.map(lambda x: x[0], tree)


def _batch_size(batch) -> int:
    return jax.tree.leaves(batch)[0].shape[0]


def _constrain(par: Parallel, tree):
    return jax.lax.with_sharding_constraint(tree, par.shardings(tree))


# ---- the stages of a step (par None: one device, `parts` itself) --------------------------------

def outer_embed(spec, par: Optional[Parallel], stored, opt, pend, count, key, batch):
    if par is None:
        return parts.outer_embed(spec, stored, opt, pend, count, key, batch)

    def f(stored, opt, pend, count, key, batch):
        stored, opt, hs, ctx, g = parts.outer_embed(spec, stored, opt, pend, count, key,
                                                    par.rows(batch), dirs=par.dirs())
        return stored, opt, _dev(hs), _dev(ctx), g
    return _smap(par, f, (_R,) * 6, (_R, _R, _D, _D, _R))(stored, opt, pend, count, key, batch)


def update_part(spec, par: Optional[Parallel], part: str, stored, opt, pend, count, part_id):
    """The deferred update of one part; on a mesh a block's is computed on its shards."""
    stored, opt = parts.update_part(spec, part, stored, opt, pend, count, part_id)
    if par is None or part == "outer":
        return stored, opt
    return _constrain(par, stored), _constrain(par, opt)


def block_step(spec, par: Optional[Parallel], stored, opt, pend, count, part_id, key, hs, ctx,
               gram_acc, branches: str = "fused"):
    if par is None:
        return parts.block_step(spec, stored, opt, pend, count, part_id, key, hs, ctx, gram_acc,
                                branches)
    stored, opt = update_part(spec, par, "block", stored, opt, pend, count, part_id)

    def f(full, state, part_id, key, hs, ctx, g):
        hs, g = parts.block_forward(spec, full, part_id, key, _undev(hs), _undev(ctx), g,
                                    branches, par.dirs(), state)
        return _dev(hs), g
    # in_specs P() for the block (and HiZOO's H): the shards are all-gathered, in their stored
    # form
    hs, gram_acc = _smap(par, f, (_R, _R, _R, _R, _D, _D, _R), (_D, _R))(
        stored, parts.estimator_state(spec, opt), part_id, key, hs, ctx, gram_acc)
    return stored, opt, hs, gram_acc


def head_finish(spec, par: Optional[Parallel], stored, key, hs, batch, gram_acc, pend, count,
                skipped_total, state=None):
    """`state`: outer's estimator state (`parts.estimator_state`), or None."""
    if par is None:
        return parts.head_finish(spec, stored, key, hs, batch, gram_acc, pend, count,
                                 skipped_total, state)
    size = _batch_size(batch)

    def f(stored, key, hs, batch, gram_acc, pend, count, skipped_total, state):
        losses, rest = parts.head_losses(
            spec, stored, key, _undev(hs), par.rows(batch),
            (key, gram_acc, pend, count, skipped_total), dirs=par.dirs(), mean=par.mean(size),
            state=state)
        if par.mode == "directions":
            # every device's L^+ and L^- in direction order; L_0 (the whole batch at theta)
            # is the same on every device
            losses = losses._replace(**{
                k: jax.lax.all_gather(getattr(losses, k), AXIS, tiled=True)
                for k in ("plus", "minus") if getattr(losses, k) is not None})
        return parts.finish(spec, losses, *rest)
    return _smap(par, f, (_R, _R, _D) + (_R,) * 6, _R)(
        stored, key, hs, batch, gram_acc, pend, count, skipped_total, state)


# ---- evaluation: the batch split over the devices where it divides ------------------------------

def _eval_split(par: Parallel, batch) -> bool:
    return _batch_size(batch) % par.n == 0


def eval_embed(spec, par: Optional[Parallel], stored, batch):
    if par is None:
        return parts.eval_embed(spec, stored, batch)
    split = _eval_split(par, batch)

    def f(stored, batch):
        return _dev(parts.eval_embed(spec, stored, par.rows(batch, split)))
    return _smap(par, f, (_R, _R), _D)(stored, batch)


def eval_block(spec, par: Optional[Parallel], stored, h, ctx):
    if par is None:
        return parts.eval_block(spec, stored, h, ctx)
    f = lambda full, h, ctx: _dev(parts.eval_block(spec, full, _undev(h), _undev(ctx)))  # noqa
    return _smap(par, f, (_R, _D, _D), _D)(stored, h, ctx)


def eval_head(spec, par: Optional[Parallel], stored, h, batch):
    if par is None:
        return parts.eval_head(spec, stored, h, batch)
    split = _eval_split(par, batch)

    def f(stored, h, batch):
        out = parts.eval_head(spec, stored, _undev(h), par.rows(batch, split))
        # gathered: every device (and process) holds the whole batch's losses and logits
        return jax.lax.all_gather(out, AXIS, tiled=True) if split else out
    return _smap(par, f, (_R, _D, _R), _R)(stored, h, batch)
