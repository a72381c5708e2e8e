"""ZO2: zeroth-order training with the blocks (and their optimiser state) in pinned host memory.

Per step t (key k_t), outer parameters stay on the device; each streamed block is uploaded once,
in a unit of consecutive blocks, and while it is on the device one jitted call (`_calls.py`), for
each block of the unit:

1. applies the deferred update of step t-1 (z regenerated from k_{t-1}, scaled by g_{t-1});
2. runs the perturbed branches (theta' +- eps z_j(k_t); see `estimator`) on the hidden states it
   carries;
3. returns the updated block, which is written back to pinned host memory.

The projected gradient stays a device scalar: no host synchronisation between steps. `flush()`
applies the last pending update. The math is `zo2_jax.core.parts`, shared with MeZOEngine, so the
two engines give bit-identical parameters for the same keys, storage and compute dtype. Where
each block lives and how units stream is the engine's `Plan` (`plan.py`); the order of uploads,
computes, write-backs and waits is `schedule.py` (data), carried out by `_stream.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zo2_jax.core import common
from zo2_jax.core import parts
from zo2_jax.core import spmd
from zo2_jax.core import trees
from zo2_jax.core.noise import OUTER_PART, as_key
from zo2_jax.core.estimators import Estimator
from zo2_jax.core.options import ZOOptions
from zo2_jax.core.storage import Storage
from zo2_jax.core.trees import tree_nbytes
from zo2_jax.offload import _calls as calls
from zo2_jax.offload import plan as planning
from zo2_jax.core.trees import host_copy
from zo2_jax.offload._pack import Packing
from zo2_jax.offload._stream import BlockStore, BlockStream
from zo2_jax.offload.plan import Plan, StreamOptions

PyTree = Any
_PLACEMENT_DEFAULTS = {**StreamOptions().engine_kwargs()}


def _memory_kinds(device) -> list:
    return [m.kind for m in device.addressable_memories()]


class ZO2Engine:
    """ZO training of a model larger than device memory (ZO2, arXiv 2503.12668).

    Same update as `zo2_jax.zo.MeZOEngine` (see there for the math and the common arguments:
    model, params, tx, eps, num_directions, compute_dtype, storage, outer_storage, clip_norm,
    directions, estimator). Results are bit-identical to MeZOEngine's for any placement below.

    Placement (decided by `zo2_jax.offload.make_plan`, which holds every "auto" rule; the
    engine's choice is `engine.plan`, printable):
      plan: a `Plan` to follow (from `make_plan`, possibly changed with `dataclasses.replace`);
        then the options below must keep their defaults.
      resident_blocks: blocks kept on the device: a count (spread evenly over the depth) or a set
        of indices. Default 0 (every block streamed).
      max_inflight: W >= 1, the most streamed units holding device memory at once (the one
        computing, the ones uploading and the ones being written back), or "auto". An upload
        starts only after the device work dispatched before it: with W >= 3 the upload of unit
        u+2 runs under compute(u+1) beside the write-back of unit u; W = 2 makes uploads and
        computes take turns. Each slot costs one unit of device memory.
      device_budget_bytes: keep as many blocks resident as the estimated peak allows; needs
        `batch_shape`. Raises if even the minimum does not fit.
      batch_shape: (B, T) of every batch (required with a budget; then enforced).
      packed: True: each streamed block (with its optimiser state) is one contiguous buffer in
        pinned host memory, one transfer each way, unpacked and packed again inside its unit's
        jitted call; False: one transfer per array; "auto".
      branches: "fused": each matrix's two perturbed copies come from one pass over the weights
        (z generated once, both copies alive together); "sequential": the -eps branch after
        the +eps branch, one perturbed copy at a time (z generated again); "auto".
      blocks_per_call: G, how many consecutive streamed blocks travel and compute together as
        one unit (one batched upload, one jitted call, one batched write-back), or "auto". Larger
        units cost the host fewer dispatches; `max_inflight` counts units, so up to W x G
        streamed blocks hold device memory. Resident blocks are units of their own.
      device: the device (default: the first).
      mesh, parallel: several devices, as for MeZOEngine: each streamed block's leaves are
        sharded over the mesh in pinned host memory (one copy of the model on the host), each
        device uploads and writes back its shard, the update runs on the shards and the
        updated block is all-gathered on the devices. Blocks stream unpacked on a mesh.
      params: as for MeZOEngine; blocks may be zero-argument callables, each called once when
        its block is encoded and offloaded (load or create a model one block at a time, e.g.
        straight into int8 host storage, with no full-precision copy of the whole model).

    Example:
      >>> engine = ZO2Engine(model, params, mezo_sgd(1e-6),
      ...                    storage=Storage("bfloat16", rounding="stochastic"))
      >>> print(engine.plan)
      >>> for t, batch in enumerate(batches):
      ...     metrics = engine.step(batch, jax.random.fold_in(key, t))
      >>> engine.flush()
    """

    def __init__(self, model, params: PyTree, tx: Optional[optax.GradientTransformation] = None,
                 *, eps: float = ZOOptions.eps, num_directions: int = ZOOptions.num_directions,
                 compute_dtype: Any = jnp.float32, storage: Optional[Storage] = None,
                 outer_storage: Optional[Storage] = None, clip_norm: Optional[float] = None,
                 directions: str = ZOOptions.directions,
                 estimator: Union[str, Estimator] = ZOOptions.estimator,
                 plan: Optional[Plan] = None,
                 resident_blocks: Union[int, Iterable[int]] = StreamOptions.resident_blocks,
                 max_inflight: Union[int, str] = StreamOptions.max_inflight,
                 device_budget_bytes: Optional[int] = None, batch_shape: Optional[tuple] = None,
                 device: Optional[jax.Device] = None,
                 packed: Union[bool, str] = StreamOptions.packed,
                 branches: str = StreamOptions.branches,
                 blocks_per_call: Union[int, str] = StreamOptions.blocks_per_call,
                 mesh=None, parallel: str = ZOOptions.parallel):
        placement = dict(resident_blocks=resident_blocks, max_inflight=max_inflight,
                         packed=packed, branches=branches, blocks_per_call=blocks_per_call,
                         device_budget_bytes=device_budget_bytes)
        spec, params, make_block = common.prepare(
            model, params, tx, eps=eps, num_directions=num_directions,
            compute_dtype=compute_dtype, storage=storage, outer_storage=outer_storage,
            clip_norm=clip_norm, directions=directions, estimator=estimator)
        self.spec = spec
        n = self.num_blocks = len(params["blocks"])
        par = self._par = common.parallel_of(mesh, parallel, spec.num_directions)
        if par is not None and device is not None:
            raise ValueError("ZO2Engine: give either device= or mesh=, not both")
        dev = (device or common.single_device(mesh)) if par is None else None
        for d in ([dev] if par is None else list(par.mesh.devices.flat)):
            if d.process_index == jax.process_index() and "pinned_host" not in _memory_kinds(d):
                raise ValueError(f"device {d} has no 'pinned_host' memory (it has "
                                 f"{_memory_kinds(d)}); ZO2 streams blocks from pinned host "
                                 f"memory")
        if par is None:
            self._dev = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
            self._host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
        else:
            # outer, batches and scalars replicated; blocks sharded leaf by leaf
            # (`_block_shardings`); Space.Host: decoded blocks (params()) keep their sharding
            self._dev = par.sharding()
            self._host = jax.memory.Space.Host
            if packed is True:
                raise ValueError("packed=True: packed blocks are one flat buffer each, which a "
                                 "mesh cannot shard leaf by leaf; on a mesh blocks stream "
                                 "unpacked (leave packed unset)")
            placement["packed"] = False
        self._batch_shape = planning.check_batch_shape(batch_shape)
        if par is not None and self._batch_shape is not None:
            par.check_batch(self._batch_shape[0])
        if plan is None:
            plan = planning.plan_for(spec, params, batch_shape=self._batch_shape, **placement)
        else:
            given = sorted(k for k, v in placement.items() if not (
                v is _PLACEMENT_DEFAULTS[k] or (isinstance(v, (str, int, np.integer))
                                                and not isinstance(v, bool)
                                                and v == _PLACEMENT_DEFAULTS[k])))
            if given:
                raise ValueError(f"ZO2Engine: plan= decides the placement; leave {given} "
                                 f"unset (or make the plan with them: make_plan(...))")
            planning.check_plan(plan, spec, params)
        if par is not None:
            plan = dataclasses.replace(plan, reasons=plan.reasons + (
                f"{par}; blocks stream unpacked on a mesh", f"pinned host memory and "
                f"bytes streamed are the whole mesh's: each device moves 1/{par.n}"))
        self.plan = plan
        self._packing = plan.packing
        resident = plan.resident
        if n > len(resident):  # before any block goes to the host (lazily given: only block 0 made)
            # on a mesh this process holds its devices' shards: its share of one copy
            share = 1.0 if par is None else len(par.mesh.local_devices) / par.n
            planning.check_host_memory(
                int(plan.host_bytes * share),
                planning.pinned_pool_limit(dev if par is None else par.mesh.local_devices[0]),
                planning.host_total_bytes())

        self._outer, self._opt_outer = calls.init_fn(spec, "outer",
                                                     self._put(params["outer"], self._dev))
        blocks, opts = [], []
        for i in range(n):
            b = make_block(i)
            if par is not None:  # encoded on the shards, then each shard to its host memory
                s, o = calls.init_fn(spec, "block", par.put(b, par.shardings(b)))
                kind = "device" if i in resident else "pinned_host"
                s, o = jax.device_put((s, o), (par.shardings(s, kind), par.shardings(o, kind)))
            elif i not in resident and self._packing is not None:
                s, o = jax.device_put(calls.pinit_fn(spec, self._packing,
                                                     jax.device_put(b, self._dev)), self._host)
            elif i not in resident and self._stored_as_is(b):
                # Already in pinned host memory in the storage dtype (e.g. Model.init(...,
                # block_sharding=pinned host)): encoding is the identity, and the engine never
                # writes into a stored array (it replaces it), so keep it without a round trip.
                s = b
                o = jax.device_put(calls.init_opt_fn(spec, "block", jax.device_put(b, self._dev)),
                                   self._host) if parts.has_opt(spec) else ()
            else:
                s, o = calls.init_fn(spec, "block", jax.device_put(b, self._dev))
                if i not in resident:
                    s, o = jax.device_put((s, o), self._host)
            if i not in resident:
                jax.block_until_ready((s, o))  # one block on the device at a time while loading
            blocks.append(s)
            opts.append(o)
            del b
        self._store = BlockStore(blocks, opts, resident)
        # on a mesh, transfers name each leaf's sharding in the other memory
        self._stream = BlockStream(
            self._store, self._dev if par is None else (
                lambda t: self._block_shardings(t, "device")),
            self._host if par is None else (lambda t: self._block_shardings(t, "pinned_host")),
            plan.max_inflight, plan.units, hold=plan.hold, frozen=spec.frozen)
        self._ids = [self._put(np.uint32(i), self._dev) for i in range(n)]
        self._pending = self._put(parts.no_pending(spec), self._dev)
        self._count = self._put(np.zeros([], np.int32), self._dev)
        self._skipped_total = self._put(np.zeros([], np.int32), self._dev)
        self._dirty = False
        self._broken: Optional[str] = None  # why the engine must not run (a failed restore)
        self._digest: Optional[str] = None  # base_digest(), once computed

    # The plan's choices, as attributes of the engine.
    resident_blocks = property(lambda self: self.plan.resident)
    max_inflight = property(lambda self: self.plan.max_inflight)
    packed = property(lambda self: self.plan.packed)
    branches = property(lambda self: self.plan.branches)
    blocks_per_call = property(lambda self: self.plan.blocks_per_call)
    footprint = property(lambda self: self.plan.footprint)

    @property
    def mesh(self):
        """The engine's mesh (`spmd.Parallel`: mesh, mode, q), or None on one device."""
        return self._par

    def _put(self, tree, sharding):
        return spmd.put(self._par, tree, sharding)

    def _block_shardings(self, tree, kind: str):
        """Where the engine keeps a block (or its optimiser state) in memory `kind`: per leaf,
        sharded over the mesh (`spmd.leaf_spec`), or on the one device."""
        if self._par is not None:
            return self._par.shardings(tree, kind)
        one = self._dev if kind == "device" else self._host
        return jax.tree.map(lambda _: one, tree)

    def _stored_as_is(self, block) -> bool:
        st = self.spec.storage
        if st.dtype == "int8":
            return False
        return all(isinstance(x, jax.Array) and x.dtype == jnp.dtype(st.dtype)
                   and x.sharding == self._host for x in jax.tree.leaves(block))

    def streamed_bytes(self) -> int:
        """Bytes each step uploads: the streamed blocks (at storage precision) and their
        optimiser states. The write-back moves as much, or with a frozen base (LoRA) the trained
        part and optimiser states alone (`plan.written_bytes`)."""
        return sum(tree_nbytes(self._store.blocks[i]) + tree_nbytes(self._store.opts[i])
                   for i in range(self.num_blocks) if i not in self._store.resident)

    def memory_kinds(self) -> dict:
        """Where the parameters live: {'outer': kind, 'blocks': [kind per block]}, each
        'device' or 'pinned_host'."""
        kind = lambda tree: jax.tree.leaves(tree)[0].sharding.memory_kind  # noqa: E731
        return {"outer": kind(self._outer), "blocks": [kind(b) for b in self._store.blocks]}

    # ---- training -------------------------------------------------------------------------------

    def step(self, batch: dict, key) -> dict:
        """One ZO step; returns device scalars like MeZOEngine.step (read them a step later:
        reading forces the host to wait for this step). The host waits only for write-backs
        of older units, to keep at most `max_inflight` streamed units on the device.

        A step that raises once the outer parameters are updated (e.g. out of memory in a
        block) leaves some blocks updated and others not: the engine then refuses to run, or to
        give its state, until `restore` (e.g. `Checkpointer.restore_engine`) succeeds."""
        self._check_usable()
        common.check_batch(batch, self._batch_shape)
        if self._par is not None:
            self._par.check_batch(jax.tree.leaves(batch)[0].shape[0])
        batch = self._to_device(dict(batch))
        key = self._to_device(as_key(key))
        pend, count = self._pending, self._count
        self._outer, self._opt_outer, hs, ctx, g = calls.outer_fn(
            self.spec, self._outer, self._opt_outer, pend, count, key, batch, par=self._par)
        with self._partial("a step"):
            return self._step_blocks(batch, key, pend, count, hs, ctx, g)

    @contextlib.contextmanager
    def _partial(self, what: str):
        """Marks the engine unusable when the body raises: its parts hold two states."""
        try:
            yield
        except BaseException as e:
            self._broken = (f"{what} raised midway ({type(e).__name__}: {e}): some of this "
                            f"engine's parts hold its update and others not; restore a saved "
                            f"state (Checkpointer.restore_engine) or build a new engine")
            raise

    def _step_blocks(self, batch, key, pend, count, hs, ctx, g) -> dict:
        carry = [hs, g]
        unit_fn = calls.unit_fns[self.branches]

        def compute(unit, blks, opts):
            blks, opts, carry[0], carry[1] = unit_fn(
                self.spec, self._packing_of(unit), blks, opts, pend, count, self._unit_ids(unit),
                key, carry[0], ctx, carry[1], par=self._par)
            return blks, opts

        self._stream.update_pass(compute, ahead=True)
        self._pending, self._count, self._skipped_total, metrics = calls.head_fn(
            self.spec, self._outer, key, carry[0], batch, carry[1], pend, count,
            self._skipped_total, parts.estimator_state(self.spec, self._opt_outer), par=self._par)
        self._stream.prefetch(with_opt=True)
        self._dirty = True
        return metrics

    def flush(self) -> None:
        """Applies the pending update to every part (before evaluating, saving or exporting)."""
        self._check_usable()
        if not self._dirty:
            return
        pend, count = self._pending, self._count
        self._outer, self._opt_outer = calls.update_fn(self.spec, "outer", self._outer,
                                                  self._opt_outer, pend, count, OUTER_PART,
                                                  par=self._par)
        with self._partial("a flush"):
            self._stream.update_pass(lambda unit, blks, opts: calls.unit_update_fn(
                self.spec, self._packing_of(unit), blks, opts, pend, count,
                self._unit_ids(unit), par=self._par))
            # Committed to the device like the step's outputs, so the next step hits the jit
            # cache. A failure here leaves the blocks updated and the pending update not
            # cleared: the engine must refuse to run, as for a failure in a block.
            self._count, self._pending = self._put(
                (count + pend.valid.astype(jnp.int32),
                 parts.no_pending(self.spec, pend.key)), self._dev)
        self._dirty = False

    # ---- evaluation -----------------------------------------------------------------------------

    def _forward(self, batch):
        self._check_usable()
        common.check_batch(batch, self._batch_shape)
        self.flush()
        batch = self._to_device(dict(batch))
        h, ctx = calls.eval_embed_fn(self.spec, self._outer, batch, par=self._par)
        carry = [h]

        def compute(unit, blks):
            carry[0] = calls.unit_eval_fn(self.spec, self._packing_of(unit), blks, carry[0], ctx,
                                          par=self._par)
            return carry[0]

        self._stream.read_pass(compute, ahead=True)
        out = calls.eval_head_fn(self.spec, self._outer, carry[0], batch, par=self._par)
        self._stream.prefetch(with_opt=False)
        return out

    def eval_loss(self, batch: dict, per_example: bool = False) -> jax.Array:
        """Loss at the current parameters (flushed first), blocks streamed like a step: the mean
        over the batch, or per example ([B], float32)."""
        loss_b, _ = self._forward(batch)
        return loss_b if per_example else jnp.mean(loss_b)

    def logits(self, batch: dict) -> jax.Array:
        """The model's logits at the current parameters (flushed first)."""
        return self._forward(batch)[1]

    # ---- parameters and state -------------------------------------------------------------------

    def params(self) -> PyTree:
        """Flushes, then returns {'outer', 'blocks': [...]} decoded to float32: outer and resident
        blocks on the device, streamed blocks in pinned host memory (new arrays, or the stored
        host arrays themselves with float32 storage, which the engine never modifies in place)."""
        self.flush()
        blocks = list(self._store.blocks)
        f32_host = self.spec.storage.dtype == "float32" and self._packing is None

        def decode(unit, blks):
            if unit[0] in self._store.resident:
                new = calls.unit_decode_fn(self.spec, None, blks)
            else:
                new = jax.device_put(calls.unit_decode_fn(self.spec, self._packing, blks), self._host)
            for i, b in zip(unit, new):
                blocks[i] = b
            return new

        if f32_host:  # nothing to decode on the host side: skip the round trip
            for i in self._store.resident:
                blocks[i] = calls.decode_fn(self.spec.storage, self._store.blocks[i])
        else:
            self._stream.read_pass(decode)
        return {"outer": calls.decode_fn(self.spec.outer_storage, self._outer), "blocks": blocks}

    def _to_device(self, tree):
        """`tree` on the engine's device. A jax.device_put costs host time even when it has
        nothing to move, a few % of a small model's step, whose speed is the host's: leaves
        already on the device are passed as they are, committed or not. jit keeps one executable
        per pattern of committed arguments, so a loop that switches between committed and
        uncommitted keys or batches compiles each pattern once, a one-off cost where committing
        them here would cost on every step."""
        if all(isinstance(x, jax.Array) and x.sharding == self._dev
               for x in jax.tree.leaves(tree)):
            return tree
        return self._put(tree, self._dev)

    def _packing_of(self, unit) -> Optional[Packing]:
        return None if unit[0] in self._store.resident else self._packing

    def _unit_ids(self, unit) -> tuple:
        return tuple(self._ids[i] for i in unit)

    def _is_packed(self, i: int) -> bool:
        return self._packing is not None and i not in self._store.resident

    def _unpacked(self) -> tuple[list, list]:
        """The store's blocks and optimiser states as trees (packed ones unpacked on the host)."""
        blocks, opts = list(self._store.blocks), list(self._store.opts)
        for i in range(self.num_blocks):
            if self._is_packed(i):
                blocks[i], opts[i] = self._packing.unpack_host(blocks[i], opts[i])
        return blocks, opts

    def state(self, blocks: bool = True) -> dict:
        """Everything an exact resume needs (see MeZOEngine.state); blocks and their optimiser
        states are lists. Streamed blocks are host arrays: pinned host jax arrays (the engine's
        own; it never writes into them), or, for packed blocks, numpy arrays unpacked from a
        host copy of each packed buffer (on a GPU jax keeps that copy cached on the buffer
        until the block is next updated; on the CPU backend they are views of the buffer).
        Device arrays are the engine's own: save them before the next step, which donates
        them. With `blocks=False`, without "blocks" and "opt_blocks": what
        `Checkpointer.save_engine` saves beside the blocks it reads one at a time through
        `block_state`, so a checkpoint never holds a second copy of every block."""
        self._check_usable()
        out = self._small_state()
        if blocks:
            out["blocks"], out["opt_blocks"] = self._unpacked()
        return out

    def _small_state(self) -> dict:
        return {"outer": self._outer, "opt_outer": self._opt_outer,
                "pending": common.pending_to_tree(self._pending), "count": self._count,
                "skipped_total": self._skipped_total,
                "meta": common.meta(self.spec, "ZO2Engine", self.num_blocks,
                                    str(jax.random.key_impl(self._pending.key)))}

    def state_like(self, blocks: bool = False) -> dict:
        """`state(blocks=False)` as jax.ShapeDtypeStructs placed where the engine keeps each
        part (a restore's target; usable after a failed restore too); `block_like(i)` gives
        the blocks'. With `blocks`, also "blocks" and "opt_blocks" as in `state()`, placed in
        pinned host memory (read from nothing: a restore target that copies no block)."""
        out = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if isinstance(x, jax.Array) else x, self._small_state())
        if blocks:
            pairs = [self.block_like(i) for i in range(self.num_blocks)]
            host = lambda t: jax.tree.map(  # noqa: E731
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), t,
                self._block_shardings(t, "pinned_host"))
            out["blocks"] = [host(b) for b, _ in pairs]
            out["opt_blocks"] = [host(o) for _, o in pairs]
        return out

    def block_state(self, i: int, frozen: bool = True) -> tuple[PyTree, PyTree]:
        """Block `i` and its optimiser state as in `state()["blocks"][i]`, as numpy arrays on
        the host (packed blocks unpacked), copied from the engine's arrays without jax keeping
        the copy cached on them: reading every block in turn holds one block's copy at a time.
        With `frozen=False`, the block without its frozen base (`Spec.frozen`; the base is
        not copied). The pending update is not applied (it is part of the state)."""
        self._check_usable()
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"block {i}: the engine has blocks 0..{self.num_blocks - 1}")
        blk, opt = self._without_base(self._store.blocks[i], frozen), self._store.opts[i]
        if self._is_packed(i):
            return self._packing.unpack_host(
                jax.tree.map(host_copy, blk), opt if self._packing.opt.empty else host_copy(opt))
        return jax.tree.map(host_copy, blk), jax.tree.map(host_copy, opt)

    def block_like(self, i: int, frozen: bool = True) -> tuple[PyTree, PyTree]:
        """Shapes and dtypes (jax.ShapeDtypeStruct) of `block_state(i, frozen)`, read from
        nothing."""
        if self._is_packed(i):
            blk, opt = self._packing.abstract()
        else:
            sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
            blk, opt = (jax.tree.map(sds, self._store.blocks[i]),
                        jax.tree.map(sds, self._store.opts[i]))
        return self._without_base(blk, frozen), opt

    def _without_base(self, block: PyTree, frozen: bool) -> PyTree:
        f = self.spec.frozen
        return block if frozen or f is None else {k: v for k, v in block.items() if k != f}

    def base_digest(self) -> str:
        """SHA-256 (hex) of the frozen base of a model with adapters (`common.base_digest`,
        equal to a MeZOEngine's for the same stored base), read from the host one block at a
        time: computed at the first call, then kept until a restore. A checkpoint of such a
        model holds the adapters alone and this digest, to check the base it is restored
        onto."""
        if self._digest is None:
            blocks = (self.block_state(i)[0] for i in range(self.num_blocks))
            self._digest = common.base_digest(self.spec, self._outer, blocks)
        return self._digest

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise RuntimeError(self._broken)

    def restore(self, state: dict, read_block=None) -> None:
        """Loads a `state()` of this engine or of a MeZOEngine with the same storage and q.

        With `read_block`, `state` has no "blocks" or "opt_blocks": `read_block(i)` returns
        block i and its optimiser state (like `block_state(i)`) and is called for one block at
        a time, each placed before the next is read, so a restore holds one block beyond the
        engine's own (`Checkpointer.restore_engine` reads a checkpoint this way). Should a
        block fail to read or not match after earlier ones were placed, the engine refuses to
        run until a later restore succeeds: it would hold blocks of two states."""
        common.check_meta(self.spec, self.num_blocks, state["meta"])
        if read_block is None:
            blocks, opts = state["blocks"], state["opt_blocks"]
            if trees.is_stacked(blocks):
                blocks = trees.unstack(blocks, self.num_blocks)
                opts = trees.unstack(opts, self.num_blocks)
            blocks, opts = list(blocks), list(opts)
        elif "blocks" in state or "opt_blocks" in state:
            raise ValueError("restore: the blocks come either in state['blocks'] or from "
                             "read_block, not both")
        for name, got, want in (("outer", state["outer"], self._outer),
                                ("opt_outer", state["opt_outer"], self._opt_outer),
                                ("count", state["count"], self._count),
                                ("skipped_total", state["skipped_total"], self._skipped_total)):
            common.check_like(name, got, want)
        if read_block is None:
            for i in range(self.num_blocks):
                want = self.block_like(i)
                common.check_like(f"blocks[{i}]", blocks[i], want[0])
                common.check_like(f"opt_blocks[{i}]", opts[i], want[1])
        pending = common.pending_from_tree(state["pending"], state["meta"]["key_impl"])
        common.check_like("pending", pending.coef, self._pending.coef)
        self._stream.drain()
        self._digest = None
        placed = 0  # blocks of the restored state in the engine; after the first, a failure
        try:        # (reading, checking or placing a block, or the last transfers) leaves the
            for i in range(self.num_blocks):  # engine holding two states
                if read_block is None:
                    blk, opt = blocks[i], opts[i]
                    blocks[i] = opts[i] = None  # the engine's copy is the only one left
                else:
                    blk, opt = read_block(i)
                    want = self.block_like(i)
                    common.check_like(f"blocks[{i}]", blk, want[0])
                    common.check_like(f"opt_blocks[{i}]", opt, want[1])
                self._place(i, blk, opt)
                placed += 1
                del blk, opt
            outer = self._put((state["outer"], state["opt_outer"], pending, state["count"],
                               state["skipped_total"]), self._dev)
        except BaseException as e:
            if placed > 0:
                self._broken = (
                    f"this engine's restore failed after {placed} of {self.num_blocks} blocks "
                    f"({type(e).__name__}: {e}); it holds blocks 0..{placed - 1} of the "
                    f"restored state and the rest of its earlier one: restore a state again, "
                    f"or build a new engine")
            raise
        self._outer, self._opt_outer, self._pending, self._count, self._skipped_total = outer
        self._broken = None
        self._dirty = True

    def _place(self, i: int, blk, opt) -> None:
        """Block i and its optimiser state into the engine's store, where it keeps them
        (packed on the device first when streamed packed); waits until they are there."""
        if self._is_packed(i):
            new = jax.device_put(calls.pack_fn(self._packing, *jax.device_put(
                (blk, opt), self._dev)), self._host)
        else:
            kind = "device" if i in self._store.resident else "pinned_host"
            new = self._put((blk, opt), (self._block_shardings(blk, kind),
                                         self._block_shardings(opt, kind)))
        self._store.blocks[i], self._store.opts[i] = jax.block_until_ready(new)
