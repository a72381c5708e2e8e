"""ZO2: zeroth-order training with the blocks (and their optimiser state) in pinned host memory.

Per step t (key k_t), outer parameters stay on the device; each streamed block is uploaded once,
in a unit of `blocks_per_call` consecutive blocks, and while it is on the device one jitted call
(compiled once per unit size, shared by all units of that size), for each block of the unit:

1. applies the deferred update of step t-1 (z regenerated from k_{t-1}, scaled by g_{t-1});
2. runs the 2q perturbed branches (theta' +- eps z_j(k_t)) on the hidden states it carries;
3. returns the updated block, which is written back to pinned host memory.

The projected gradient stays a device scalar: no host synchronisation between steps. `flush()`
applies the last pending update. The math is `zo2_jax.core.parts`, shared with MeZOEngine, so the
two engines give bit-identical parameters for the same keys, storage and compute dtype.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Any, Iterable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zo2_jax.core import common
from zo2_jax.core import parts
from zo2_jax.core import trees
from zo2_jax.core.noise import OUTER_PART, as_key
from zo2_jax.core.storage import Storage
from zo2_jax.core.trees import tree_nbytes, tree_size
from zo2_jax.offload._budget import footprint, plan_resident, spread
from zo2_jax.offload._pack import Packing, host_copy
from zo2_jax.offload._stream import BlockStore, BlockStream, make_units

PyTree = Any
PACK_AUTO_MAX_BYTES = 1 << 30  # packed="auto": pack blocks up to this size (stored + opt state)
# branches="auto": sequential when one perturbed copy of a block (its parameters in the compute
# dtype) is larger than this
SEQUENTIAL_AUTO_MIN_BYTES = 1 << 30
# blocks_per_call="auto": as many consecutive streamed blocks per jitted call as fit in this many
# bytes (stored + optimiser state, per unit), keeping at least W + 2 streamed units
UNIT_AUTO_BYTES = 64 << 20
# max_inflight="auto": 4 slots while a block (stored + optimiser state) is at most this size,
# 3 above it
INFLIGHT_AUTO_MAX_BYTES = 1 << 30


# XLA's GPU client keeps pinned host buffers in one pool that grows up to this many GiB, read
# from XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB when the backend starts (64 when unset or not an int)
PINNED_POOL_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
PINNED_POOL_DEFAULT_GIB = 64


class HostMemoryError(MemoryError):
    """The streamed blocks cannot fit the pinned host memory that this process may use."""


def _is_auto(v) -> bool:
    return isinstance(v, str) and v == "auto"


def pinned_pool_limit(device, environ=os.environ) -> Optional[int]:
    """Bytes of pinned host memory XLA lets `device`'s client hold, or None where no such pool
    exists (the CPU backend's pinned_host is ordinary host memory)."""
    if device.platform != "gpu":
        return None
    try:
        gib = int(environ.get(PINNED_POOL_ENV, "") or PINNED_POOL_DEFAULT_GIB)
    except ValueError:  # XLA logs an error and keeps its default
        gib = PINNED_POOL_DEFAULT_GIB
    return gib << 30


def _host_total_bytes() -> Optional[int]:
    """MemTotal of /proc/meminfo (None where unreadable)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_host_memory(need: int, limit: Optional[int], total: Optional[int]) -> None:
    """Refuses (HostMemoryError) a model whose streamed blocks need more pinned host memory than
    XLA's pool `limit` allows, before any block is made; warns where they need more than the
    host's `total` memory, since pinned memory cannot be swapped out. `need` counts the stored
    blocks and optimiser states, and the units being written back."""
    if limit is not None and need > limit:
        gib = -(-need // (1 << 30)) + 1
        raise HostMemoryError(
            f"ZO2Engine: the streamed blocks and their optimiser states need about "
            f"{need / 1e9:.1f} GB of pinned host memory, over the {limit / 1e9:.1f} GB "
            f"({limit >> 30} GiB) that XLA's pinned pool may hold ({PINNED_POOL_ENV}, "
            f"{PINNED_POOL_DEFAULT_GIB} when unset). "
            f"Set {PINNED_POOL_ENV} to at least {gib} (GiB) before jax starts, and below the "
            f"host's memory; or store fewer bytes (int8 storage halves bf16; the CLI's "
            f"--storage-dtype int8), or keep more blocks resident on the device "
            f"(resident_blocks; --resident-blocks)")
    if total is not None and need > total:
        warnings.warn(
            f"ZO2Engine: the streamed blocks need about {need / 1e9:.1f} GB of pinned host "
            f"memory, more than the {total / 1e9:.1f} GB this host reports (MemTotal). Pinned "
            f"memory cannot be swapped out: unless this host's memory grows on demand (some "
            f"virtual machines), placing the blocks will fail partway", RuntimeWarning,
            stacklevel=3)


def _memory_kinds(device) -> list:
    return [m.kind for m in device.addressable_memories()]


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)  # fresh buffers, never aliases of donated state


# One module-level jitted function per stage, the hashable Spec static: the unit functions serve
# every unit of one size (one structure), and engines with equal specs share compiled code.
_outer_fn = jax.jit(parts.outer_embed, static_argnums=0, donate_argnums=(1, 2))
_head_fn = jax.jit(parts.head_finish, static_argnums=0)
_update_fn = jax.jit(parts.update_part, static_argnums=(0, 1), donate_argnums=(2, 3))
_init_fn = jax.jit(parts.init_part, static_argnums=(0, 1))
_init_opt = jax.jit(parts.init_opt, static_argnums=(0, 1))
_eval_embed = jax.jit(parts.eval_embed, static_argnums=0)
_eval_head = jax.jit(parts.eval_head, static_argnums=0)
_decode = jax.jit(lambda storage, stored: _copy(storage.decode(stored)), static_argnums=0)


# A unit is one block or a run of consecutive streamed blocks computed by one jitted call (see
# _stream.py). `packing` (static) is the layout of packed streamed blocks, or None: then the
# unit's blocks and optimiser states are trees. Packed blocks are unpacked after the upload and
# packed again before the write-back inside the same call.

def _unpacked(packing, blk, opt):
    return (blk, opt) if packing is None else packing.unpack(blk, opt)


def _packed(packing, blk, opt):
    return (blk, opt) if packing is None else packing.pack(blk, opt)


def _over_unit(blks, opts, ids, carry, one):
    """Runs `one(blk, opt, pid, carry) -> (blk, opt, carry)` over a unit's blocks in order.

    Two or more blocks go through a `fori_loop` over their stacked copies, as in MeZO's step:
    one compiled body for every block. Unrolled, XLA fuses across block boundaries, which on a
    GPU changed fp32 results in the last bits (measured, H200, call 6c) and made compile time
    grow with the unit. The stacking and unstacking copies cost a few microseconds at the
    block sizes that `blocks_per_call="auto"` groups."""
    if len(blks) == 1:
        b, o, carry = one(blks[0], opts[0], ids[0], carry)
        return [b], [o], carry
    pids = jnp.stack(ids)

    def body(i, c):
        sb, so, carry = c
        b, o, carry = one(trees.take(sb, i), trees.take(so, i), pids[i], carry)
        return trees.put(sb, b, i), trees.put(so, o, i), carry

    sb, so, carry = jax.lax.fori_loop(0, len(blks), body,
                                      (trees.stack(blks), trees.stack(opts), carry))
    return trees.unstack(sb, len(blks)), trees.unstack(so, len(blks)), carry


def unit_step(spec, packing, blks, opts, pend, count, ids, key, hs, ctx, gram_acc,
              branches: str = "fused"):
    """`parts.block_step` over the unit's blocks in order: (blocks, opts, hs, gram)."""
    def one(blk, opt, pid, carry):
        blk, opt = _unpacked(packing, blk, opt)
        blk, opt, hs, g = parts.block_step(spec, blk, opt, pend, count, pid, key, carry[0], ctx,
                                           carry[1], branches)
        return (*_packed(packing, blk, opt), (hs, g))

    new_b, new_o, (hs, gram_acc) = _over_unit(blks, opts, ids, (hs, gram_acc), one)
    return new_b, new_o, hs, gram_acc


def _unit_update(spec, packing, blks, opts, pend, count, ids):
    def one(blk, opt, pid, carry):
        blk, opt = parts.update_part(spec, "block", *_unpacked(packing, blk, opt), pend, count,
                                     pid)
        return (*_packed(packing, blk, opt), carry)

    new_b, new_o, _ = _over_unit(blks, opts, ids, (), one)
    return new_b, new_o


def _unit_eval(spec, packing, blks, h, ctx):
    unpack = (lambda b: b) if packing is None else packing.block.unpack  # noqa: E731
    if len(blks) == 1:
        return parts.eval_block(spec, unpack(blks[0]), h, ctx)
    stacked = trees.stack(blks)  # a loop, as in _over_unit (without write-back of blocks)
    return jax.lax.fori_loop(0, len(blks), lambda i, h: parts.eval_block(
        spec, unpack(trees.take(stacked, i)), h, ctx), h)


def _unit_decode(spec, packing, blks):
    return [_copy(spec.storage.decode(b if packing is None else packing.block.unpack(b)))
            for b in blks]


# one step function per branch schedule (see parts.block_step), so that the other stages'
# compiled code does not depend on the schedule
_unit_fns = {b: jax.jit(functools.partial(unit_step, branches=b), static_argnums=(0, 1),
                        donate_argnums=(2, 3, 8, 10)) for b in parts.BRANCHES}
_unit_update_fn = jax.jit(_unit_update, static_argnums=(0, 1), donate_argnums=(2, 3))
_unit_eval_fn = jax.jit(_unit_eval, static_argnums=(0, 1))
_unit_decode_fn = jax.jit(_unit_decode, static_argnums=(0, 1))
_pack_fn = jax.jit(lambda lay, stored, opt: lay.pack(stored, opt), static_argnums=0)


# Packed streamed blocks (see _pack.py): made and re-packed on the device, one block at a time.
_pinit_fn = jax.jit(lambda spec, lay, p: lay.pack(*parts.init_part(spec, "block", p)),
                    static_argnums=(0, 1))


class ZO2Engine:
    """ZO training of a model larger than device memory (ZO2, arXiv 2503.12668).

    Same update as `zo2_jax.zo.MeZOEngine` (see there for the math and the common arguments:
    model, params, tx, eps, num_directions, compute_dtype, storage, outer_storage, clip_norm).

    Args:
      resident_blocks: blocks kept on the device: a count (spread evenly over the depth) or a set
        of indices. Default 0 (every block streamed).
      max_inflight: W >= 1, the most streamed units (of `blocks_per_call` blocks) holding device
        memory at once, counting the one computing, the ones uploading and the ones being written
        back, or "auto" (default): 4 while a block (stored, with its optimiser state) is at
        most `INFLIGHT_AUTO_MAX_BYTES` (1 GiB), else 3; with a device budget that cannot hold
        4, 3. A copy starts only after the device work dispatched before it, so the upload of
        unit u+2 is dispatched after compute(u) and runs under compute(u+1), beside the
        write-back of unit u. With W = 3 its slot is that of unit u-1, whose write-back ends
        about when compute(u) does: the host waits for it before it can dispatch compute(u+1).
        With W >= 4 it waits only on older write-backs and never holds the device back (see
        `_stream.py`). Measured on an H200 (BENCHMARKS.md, call 7), bf16,
        one process each: OPT-1.3B 1x2048 53.4 ms/step at W = 4 against 65.5 ms at W = 3
        (MeZO 49.2 ms); OPT-2.7B 105.8 against 120.6 ms; OPT-6.7B 263 against 271 ms. W = 2
        serialises the two transfers (H100, OPT-1.3B shape, 8 layers: 40.8 ms/step at W = 2,
        26.2 ms at W = 3). Each slot costs one unit of device memory.
      device_budget_bytes: let the engine choose how many blocks stay resident so that its
        estimated peak fits; needs `batch_shape`. Raises if even the minimum does not fit.
      batch_shape: (B, T) of every batch (required with a budget; then enforced).
      device: the device (default: the first).
      params: as for MeZOEngine, blocks possibly zero-argument callables, each called once when
        its block is encoded and offloaded (load or create a model one block at a time, e.g.
        straight into int8 host storage, with no full-precision copy of the whole model).
      directions: see MeZOEngine.
      packed: True: keep each streamed block (and its optimiser state) in pinned host memory
        as one contiguous buffer, moved by one transfer each way, unpacked on the device at the
        start of its unit's jitted call and packed again at its end. False: one
        transfer per array. "auto" (default): packed when a block (with its optimiser state)
        is at most `PACK_AUTO_MAX_BYTES` (1 GiB). Measured on an H200 (BENCHMARKS.md, call 4):
        OPT-1.3B shape, 100 MB blocks of 16 arrays, 1x2048 bf16: 67 ms/step packed against
        76-83 ms unpacked, the same peak device memory (1.31 vs 1.29 GB); OPT-175B block shape
        (3.6 GB blocks), W=2: peak 22.4 GB packed against 15.2 GB unpacked (packed and
        unpacked copies of about two blocks coexist; 24.4 GB with the unpacking and packing
        inside the block function, as now), where per-array costs hardly matter.
        Bit-identical results either way; `state()` and `params()` return unpacked trees.
      branches: how the block function schedules the +eps and -eps branches. "fused": each
        matrix's two perturbed copies come from one pass over the weights (z generated once),
        so both copies are alive together. "sequential": the -eps branch runs after the +eps
        branch, one perturbed copy at a time, z generated a second time (and a third with
        clip_norm). "auto" (default): sequential when one perturbed copy of a block (its
        parameters in the compute dtype) is larger than `SEQUENTIAL_AUTO_MIN_BYTES` (1 GiB).
        Bit-identical results either way. Measured on an H200 (BENCHMARKS.md, call 5), bf16:
        OPT-175B block shape, 4 layers, W=2, unpacked: peak 12.65 GB sequential against
        15.15 GB fused (block-function scratch 2.76 vs 5.27 GB), 658 against 596 ms/step;
        OPT-1.3B 1x2048, where compute bounds the step: 69.0 against 66.4 ms/step.
      blocks_per_call: G, how many consecutive streamed blocks travel and compute together as
        one unit: one batched upload, one jitted call (unpacking, updating, running the
        branches through and re-packing each block in turn) and one batched write-back. Every
        such call costs the host a fixed dispatch time (~1 ms per block with G = 1 on an H200,
        BENCHMARKS.md call 6), which small blocks cannot hide: with G > 1 the device gets
        longer runs of work per dispatch. `max_inflight` then counts units, so up to W x G
        streamed blocks hold device memory, and a computing unit of G >= 2 blocks makes a
        stacked copy of itself (its loop runs over one array per leaf; the device budget
        counts it through the compiled scratch). "auto" (default): as many blocks as fit in
        `UNIT_AUTO_BYTES` (64 MiB, stored + optimiser state) while at least W + 2 units stream
        (W slots and a lookahead of two units need that many), at least one; runs of streamed
        blocks are cut into units of near-equal size. Resident blocks are units of their own.
        At OPT-125M (12 blocks of 14 MB) that is 2 per call: 9.2 ms/step at W = 4 against
        10.3 ms with 4 per call and 12.5-13.2 ms with one (H200, call 7).
        Bit-identical results for any G.

    Example:
      >>> engine = ZO2Engine(model, params, mezo_sgd(1e-6),
      ...                    storage=Storage("bfloat16", rounding="stochastic"))
      >>> for t, batch in enumerate(batches):
      ...     metrics = engine.step(batch, jax.random.fold_in(key, t))
      >>> engine.flush()
    """

    def __init__(self, model, params: PyTree, tx: Optional[optax.GradientTransformation] = None,
                 *, eps: float = 1e-3, num_directions: int = 1,
                 compute_dtype: Any = jnp.float32, storage: Optional[Storage] = None,
                 outer_storage: Optional[Storage] = None, clip_norm: Optional[float] = None,
                 directions: str = "gaussian",
                 resident_blocks: Union[int, Iterable[int]] = 0,
                 max_inflight: Union[int, str] = "auto",
                 device_budget_bytes: Optional[int] = None, batch_shape: Optional[tuple] = None,
                 device: Optional[jax.Device] = None,
                 packed: Union[bool, str] = "auto", branches: str = "auto",
                 blocks_per_call: Union[int, str] = "auto"):
        if not (isinstance(packed, (bool, np.bool_)) or packed == "auto"):
            raise ValueError(f"packed must be True, False or 'auto', got {packed!r}")
        packed = packed if packed == "auto" else bool(packed)
        if branches not in ("auto",) + parts.BRANCHES:
            raise ValueError(f"branches must be 'auto', 'fused' or 'sequential', got {branches!r}")
        if not _is_auto(blocks_per_call) and (isinstance(blocks_per_call, (bool, np.bool_)) or
                                              not isinstance(blocks_per_call, (int, np.integer))
                                              or blocks_per_call < 1):
            raise ValueError(f"blocks_per_call must be an int >= 1 or 'auto', got "
                             f"{blocks_per_call!r}")
        spec, params, make_block = common.prepare(
            model, params, tx, eps=eps, num_directions=num_directions,
            compute_dtype=compute_dtype, storage=storage, outer_storage=outer_storage,
            clip_norm=clip_norm, directions=directions)
        if branches == "auto":
            copy = tree_size(params["blocks"][0]) * jnp.dtype(spec.compute_dtype).itemsize
            branches = "sequential" if copy > SEQUENTIAL_AUTO_MIN_BYTES else "fused"
        self.branches = branches
        self.spec = spec
        n = self.num_blocks = len(params["blocks"])
        dev = device or jax.devices()[0]
        if "pinned_host" not in _memory_kinds(dev):
            raise ValueError(f"device {dev} has no 'pinned_host' memory (it has "
                             f"{_memory_kinds(dev)}); ZO2 streams blocks from pinned host memory")
        self._dev = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
        self._host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
        if not _is_auto(max_inflight) and (isinstance(max_inflight, (bool, np.bool_)) or
                                           not isinstance(max_inflight, (int, np.integer)) or
                                           max_inflight < 1):
            raise ValueError(f"max_inflight must be an int >= 1 or 'auto', got {max_inflight!r}")
        if batch_shape is not None:
            batch_shape = tuple(int(d) for d in batch_shape)
            if len(batch_shape) != 2 or min(batch_shape) < 1:
                raise ValueError(f"batch_shape must be (batch, seq), got {batch_shape}")
        self._batch_shape = batch_shape

        resident = self._resident_set(resident_blocks, n)
        packing = self._layout(spec, params["blocks"][0], packed) if packed is not False else None
        if packed == "auto":
            packed = (packing is not None and
                      packing.block.nbytes + packing.opt.nbytes <= PACK_AUTO_MAX_BYTES)
        per_block = (packing.block.nbytes + packing.opt.nbytes if packed
                     else self._stored_bytes(spec, params["blocks"][0]))
        explicit = (None if resident_blocks is None or (
            isinstance(resident_blocks, (int, np.integer)) and resident_blocks == 0) else resident)
        if _is_auto(max_inflight):  # 4 slots for small blocks; 3 if a budget cannot hold 4
            windows = [4, 3] if per_block <= INFLIGHT_AUTO_MAX_BYTES else [3]
        else:
            windows = [int(max_inflight)]

        def auto_group(w: int, n_streamed: int) -> int:
            return max(1, min(UNIT_AUTO_BYTES // max(per_block, 1), n_streamed // (w + 2)))

        self.footprint = None  # with a budget: the estimated peak's ingredients, in bytes
        if device_budget_bytes is not None and batch_shape is None:
            raise ValueError("device_budget_bytes needs batch_shape=(batch, seq) to estimate "
                             "the activations")
        fps = {}
        for k, w in enumerate(windows):
            group = (auto_group(w, n - len(resident)) if _is_auto(blocks_per_call)
                     else min(int(blocks_per_call), n))
            if device_budget_bytes is None:
                break
            if group not in fps:
                fp = footprint(spec, params, batch_shape,
                               {"outer": _outer_fn, "block": _unit_fns[branches],
                                "head": _head_fn}, group, packing if packed else None)
                if packed:  # measured at the OPT-175B block shape (BENCHMARKS.md, call 4):
                    # packed and unpacked copies of ~2 blocks coexist beyond XLA's statistics
                    fp["transport"] = 2 * fp["block"]
                fps[group] = fp
            try:
                planned = plan_resident(fps[group], n, w, int(device_budget_bytes), explicit,
                                        group)
            except ValueError:
                if k + 1 < len(windows):
                    continue  # "auto": one slot fewer
                raise
            self.footprint = fps[group]
            if _is_auto(blocks_per_call):  # fewer streamed blocks than planned for: smaller
                # units (never more memory than the plan counted)
                group = min(group, auto_group(w, n - len(planned)))
            resident = planned
            break
        self.max_inflight = max_inflight = w
        self.resident_blocks = resident
        self._packing = packing if packed and len(resident) < n else None
        self.packed = self._packing is not None
        n_streamed = n - len(resident)
        if n_streamed:  # before any block goes to the host (lazily given: only block 0 made)
            check_host_memory(per_block * (n_streamed + w * min(group, n_streamed)),
                              pinned_pool_limit(dev), _host_total_bytes())

        self._outer, self._opt_outer = _init_fn(spec, "outer",
                                                jax.device_put(params["outer"], self._dev))
        blocks, opts = [], []
        for i in range(n):
            b = make_block(i)
            if i not in resident and self._packing is not None:
                s, o = jax.device_put(_pinit_fn(spec, self._packing, jax.device_put(b, self._dev)),
                                      self._host)
            elif i not in resident and self._stored_as_is(b):
                # Already in pinned host memory in the storage dtype (e.g. Model.init(...,
                # block_sharding=pinned host)): encoding is the identity, and the engine never
                # writes into a stored array (it replaces it), so keep it without a round trip.
                s = b
                o = jax.device_put(_init_opt(spec, "block", jax.device_put(b, self._dev)),
                                   self._host) if not spec.fused else ()
            else:
                s, o = _init_fn(spec, "block", jax.device_put(b, self._dev))
                if i not in resident:
                    s, o = jax.device_put((s, o), self._host)
            if i not in resident:
                jax.block_until_ready((s, o))  # one block on the device at a time while loading
            blocks.append(s)
            opts.append(o)
            del b
        self._store = BlockStore(blocks, opts, resident)
        self._stream = BlockStream(self._store, self._dev, self._host, int(max_inflight),
                                   make_units(n, resident, group))
        # the largest unit actually streamed (runs are cut evenly: 12 blocks at G=5 are 3 x 4)
        self.blocks_per_call = max((len(u) for u in self._stream.streamed), default=1)
        self._ids = [jax.device_put(np.uint32(i), self._dev) for i in range(n)]
        self._pending = jax.device_put(parts.empty_pending(spec.num_directions), self._dev)
        self._count = jax.device_put(jnp.zeros([], jnp.int32), self._dev)
        self._skipped_total = jax.device_put(jnp.zeros([], jnp.int32), self._dev)
        self._dirty = False
        self._broken: Optional[str] = None  # why the engine must not run (a failed restore)

    @staticmethod
    def _layout(spec, block, packed) -> Optional[Packing]:
        """The static layout of a packed streamed block, from abstract shapes (no block made);
        None under packed="auto" when a leaf cannot be packed (e.g. a PRNG key in the
        optimiser state)."""
        shapes = jax.eval_shape(lambda p: parts.init_part(spec, "block", p), jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), block))
        try:
            return Packing.of(*shapes)
        except ValueError as e:
            if packed is True:
                raise ValueError(f"packed=True: a block or its optimiser state cannot be packed "
                                 f"({e}); use packed=False or 'auto'") from None
            return None

    @staticmethod
    def _stored_bytes(spec, block) -> int:
        """Bytes of one stored block and its optimiser state, from abstract shapes."""
        return tree_nbytes(jax.eval_shape(lambda p: parts.init_part(spec, "block", p),
                                          jax.tree.map(lambda x: jax.ShapeDtypeStruct(
                                              jnp.shape(x), x.dtype), block)))

    def _stored_as_is(self, block) -> bool:
        st = self.spec.storage
        if st.dtype == "int8":
            return False
        return all(isinstance(x, jax.Array) and x.dtype == jnp.dtype(st.dtype)
                   and x.sharding == self._host for x in jax.tree.leaves(block))

    def streamed_bytes(self) -> int:
        """Bytes each step moves in each direction: the streamed blocks (at storage precision)
        and their optimiser states. The bus-time bound of a step is this over the bandwidth."""
        return sum(tree_nbytes(self._store.blocks[i]) + tree_nbytes(self._store.opts[i])
                   for i in range(self.num_blocks) if i not in self._store.resident)

    def memory_kinds(self) -> dict:
        """Where the parameters live: {'outer': kind, 'blocks': [kind per block]}, each
        'device' or 'pinned_host'."""
        kind = lambda tree: jax.tree.leaves(tree)[0].sharding.memory_kind  # noqa: E731
        return {"outer": kind(self._outer), "blocks": [kind(b) for b in self._store.blocks]}

    @staticmethod
    def _resident_set(resident_blocks, n) -> frozenset:
        if isinstance(resident_blocks, (int, np.integer)):
            if not 0 <= resident_blocks <= n:
                raise ValueError(f"resident_blocks={resident_blocks} must be between 0 and the "
                                 f"number of blocks, {n}")
            return spread(int(resident_blocks), n)
        idx = frozenset(int(i) for i in resident_blocks)
        bad = sorted(i for i in idx if not 0 <= i < n)
        if bad:
            raise ValueError(f"resident_blocks has indices {bad} outside 0..{n - 1}")
        return idx

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
        batch = self._to_device(dict(batch))
        key = self._to_device(as_key(key))
        pend, count = self._pending, self._count
        self._outer, self._opt_outer, hs, ctx, g = _outer_fn(
            self.spec, self._outer, self._opt_outer, pend, count, key, batch)
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
        unit_fn = _unit_fns[self.branches]

        def compute(unit, blks, opts):
            blks, opts, carry[0], carry[1] = unit_fn(
                self.spec, self._packing_of(unit), blks, opts, pend, count, self._unit_ids(unit),
                key, carry[0], ctx, carry[1])
            return blks, opts

        self._stream.update_pass(compute, ahead=True)
        self._pending, self._count, self._skipped_total, metrics = _head_fn(
            self.spec, self._outer, key, carry[0], batch, carry[1], pend, count,
            self._skipped_total)
        self._stream.prefetch(with_opt=True)
        self._dirty = True
        return metrics

    def flush(self) -> None:
        """Applies the pending update to every part (before evaluating, saving or exporting)."""
        self._check_usable()
        if not self._dirty:
            return
        pend, count = self._pending, self._count
        self._outer, self._opt_outer = _update_fn(self.spec, "outer", self._outer,
                                                  self._opt_outer, pend, count, OUTER_PART)
        with self._partial("a flush"):
            self._stream.update_pass(lambda unit, blks, opts: _unit_update_fn(
                self.spec, self._packing_of(unit), blks, opts, pend, count,
                self._unit_ids(unit)))
        # Committed to the device like the step's outputs, so the next step hits the jit cache.
        self._count, self._pending = jax.device_put(
            (count + pend.valid.astype(jnp.int32),
             parts.empty_pending(self.spec.num_directions, pend.key)), self._dev)
        self._dirty = False

    # ---- evaluation -----------------------------------------------------------------------------

    def _forward(self, batch):
        self._check_usable()
        common.check_batch(batch, self._batch_shape)
        self.flush()
        batch = self._to_device(dict(batch))
        h, ctx = _eval_embed(self.spec, self._outer, batch)
        carry = [h]

        def compute(unit, blks):
            carry[0] = _unit_eval_fn(self.spec, self._packing_of(unit), blks, carry[0], ctx)
            return carry[0]

        self._stream.read_pass(compute, ahead=True)
        out = _eval_head(self.spec, self._outer, carry[0], batch)
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
                new = _unit_decode_fn(self.spec, None, blks)
            else:
                new = jax.device_put(_unit_decode_fn(self.spec, self._packing, blks), self._host)
            for i, b in zip(unit, new):
                blocks[i] = b
            return new

        if f32_host:  # nothing to decode on the host side: skip the round trip
            for i in self._store.resident:
                blocks[i] = _decode(self.spec.storage, self._store.blocks[i])
        else:
            self._stream.read_pass(decode)
        return {"outer": _decode(self.spec.outer_storage, self._outer), "blocks": blocks}

    def _to_device(self, tree):
        """`tree` on the engine's device. A jax.device_put costs ~0.2 ms of host time even when
        it has nothing to move (H200 host, BENCHMARKS.md call 9c; a key array costs as much as a
        batch), a few % of a small model's step, whose speed is the host's (call 9b): leaves
        already on the device are passed as they are, committed or not. jit keeps one executable
        per pattern of committed arguments, so a loop that switches between committed and
        uncommitted keys or batches compiles each pattern once, a one-off cost where committing
        them here would cost on every step."""
        if all(isinstance(x, jax.Array) and x.sharding == self._dev
               for x in jax.tree.leaves(tree)):
            return tree
        return jax.device_put(tree, self._dev)

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

    def state_like(self) -> dict:
        """`state(blocks=False)` as jax.ShapeDtypeStructs placed where the engine keeps each
        part (a restore's target; usable after a failed restore too); `block_like(i)` gives
        the blocks'."""
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if isinstance(x, jax.Array) else x, self._small_state())

    def block_state(self, i: int) -> tuple[PyTree, PyTree]:
        """Block `i` and its optimiser state as in `state()["blocks"][i]`, as numpy arrays on
        the host (packed blocks unpacked), copied from the engine's arrays without jax keeping
        the copy cached on them: reading every block in turn holds one block's copy at a time.
        The pending update is not applied (it is part of the state)."""
        self._check_usable()
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"block {i}: the engine has blocks 0..{self.num_blocks - 1}")
        blk, opt = self._store.blocks[i], self._store.opts[i]
        if self._is_packed(i):
            return self._packing.unpack_host(
                host_copy(blk), opt if self._packing.opt.empty else host_copy(opt))
        return jax.tree.map(host_copy, blk), jax.tree.map(host_copy, opt)

    def block_like(self, i: int) -> tuple[PyTree, PyTree]:
        """Shapes and dtypes (jax.ShapeDtypeStruct) of `block_state(i)`, read from nothing."""
        if self._is_packed(i):
            return self._packing.abstract()
        sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
        return jax.tree.map(sds, self._store.blocks[i]), jax.tree.map(sds, self._store.opts[i])

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
        for i in range(self.num_blocks):
            if read_block is None:
                blk, opt = blocks[i], opts[i]
                blocks[i] = opts[i] = None  # the engine's copy is the only one left
            else:
                try:
                    blk, opt = read_block(i)
                    want = self.block_like(i)
                    common.check_like(f"blocks[{i}]", blk, want[0])
                    common.check_like(f"opt_blocks[{i}]", opt, want[1])
                except BaseException as e:
                    if i > 0:
                        self._broken = (
                            f"this engine's restore failed at block {i} of {self.num_blocks} "
                            f"({type(e).__name__}: {e}); it holds blocks 0..{i - 1} of the "
                            f"restored state and the rest of its earlier one: restore a "
                            f"state again, or build a new engine")
                    raise
            if self._is_packed(i):  # packed on the device, one block at a time
                new = jax.device_put(_pack_fn(self._packing, *jax.device_put(
                    (blk, opt), self._dev)), self._host)
                self._store.blocks[i], self._store.opts[i] = jax.block_until_ready(new)
            else:
                where = self._dev if i in self._store.resident else self._host
                self._store.blocks[i], self._store.opts[i] = jax.block_until_ready(
                    jax.device_put((blk, opt), where))
            del blk, opt
        self._outer, self._opt_outer, self._pending, self._count, self._skipped_total = (
            jax.device_put((state["outer"], state["opt_outer"], pending, state["count"],
                            state["skipped_total"]), self._dev))
        self._broken = None
        self._dirty = True
