"""The ZO2 engine's plan: what streams, what stays resident, and how, decided before any block exists.

`make_plan` is the one place where the engine's automatic choices are made; `ZO2Engine` builds
what its plan says (`engine.plan`), and a plan made beforehand can be printed, changed with
`dataclasses.replace` or passed in (`ZO2Engine(..., plan=plan)`). Everything is decided from
abstract shapes: no block is made, copied or compiled, except that a device budget (or
`estimate_device=True`) compiles the three stage functions once to read their scratch memory.

The automatic rules, each against a threshold below:

- `packed="auto"`: a streamed block and its optimiser state travel as one contiguous buffer each
  way when they take at most PACK_AUTO_MAX_BYTES (fewer, larger transfers for small blocks; at
  large blocks packed and unpacked copies would coexist on the device).
- `branches="auto"`: the -eps branch runs after the +eps branch ("sequential", one perturbed copy
  of a block alive at a time) when one perturbed copy takes more than SEQUENTIAL_AUTO_MIN_BYTES;
  else both come from one pass over the weights ("fused").
- `max_inflight="auto"` (W, streamed units holding device memory at once): 4 while a block takes
  at most INFLIGHT_AUTO_MAX_BYTES, else 3; 3 when a device budget cannot hold 4.
- `blocks_per_call="auto"` (G): as many consecutive streamed blocks per jitted call as fit in
  UNIT_AUTO_BYTES while at least W + 2 units stream.
- the stream's `hold` (the units dispatched last, whose write-backs the host never waits on): 2
  from W = 4 with at least 4 streamed units, else 1.
- with a device budget: the most resident blocks (spread evenly over the depth) whose estimated
  peak fits.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Iterable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from zo2_jax.core import common
from zo2_jax.core import options
from zo2_jax.core import parts
from zo2_jax.core.options import ZOOptions, option
from zo2_jax.core.trees import tree_nbytes, tree_size
from zo2_jax.offload import _calls as calls
from zo2_jax.offload._pack import Packing

PyTree = Any

PACK_AUTO_MAX_BYTES = 1 << 30
SEQUENTIAL_AUTO_MIN_BYTES = 1 << 30
UNIT_AUTO_BYTES = 64 << 20
INFLIGHT_AUTO_MAX_BYTES = 1 << 30

# XLA's GPU client keeps pinned host buffers in one pool that grows up to this many GiB, read
# from XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB when the backend starts (64 when unset or not an int)
PINNED_POOL_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
PINNED_POOL_DEFAULT_GIB = 64


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    """Where a ZO2Engine keeps its blocks and how they stream: the options `make_plan` turns
    into a `Plan`. `ZO2Engine` and `make_plan` take them as keyword arguments (with
    `device_budget_bytes=` in bytes, and `resident_blocks=` also as a set of block indices);
    `TrainConfig.stream` holds them."""

    resident_blocks: int = option(0, "zo2: keep this many blocks on the device instead of "
                                  "streaming them (spread evenly over the depth)", "natural")
    max_inflight: Union[int, str] = option(
        "auto", f"zo2: streamed units holding device memory at once (an int >= 1, or auto: 4 "
        f"for blocks up to {INFLIGHT_AUTO_MAX_BYTES >> 30} GiB, else 3)", "count_or_auto")
    device_budget_gb: Optional[float] = option(
        None, "zo2: device memory the automatic choices may plan for, in GB (default: the "
        "device's)", "positive_or_none")
    packed: Union[bool, str] = option(
        "auto", f"zo2: move each streamed block as one buffer (yes), array by array (no), or "
        f"packed for blocks up to {PACK_AUTO_MAX_BYTES >> 30} GiB (auto)", "bool_or_auto")
    branches: str = option(
        "auto", f"zo2: make both perturbed copies of a block in one pass (fused) or one after "
        f"the other (sequential: less memory); auto is sequential where a perturbed block is "
        f"over {SEQUENTIAL_AUTO_MIN_BYTES >> 30} GiB", "choice",
        choices=("auto",) + parts.BRANCHES)
    blocks_per_call: Union[int, str] = option(
        "auto", f"zo2: consecutive blocks streamed per jitted call (an int >= 1, or auto: up "
        f"to {UNIT_AUTO_BYTES >> 20} MiB while at least max_inflight + 2 units stream)",
        "count_or_auto")

    def __post_init__(self):
        options.check_all(self)

    def engine_kwargs(self) -> dict:
        """`ZO2Engine`'s (and `make_plan`'s) keyword arguments for these options."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        gb = kw.pop("device_budget_gb")
        kw["device_budget_bytes"] = None if gb is None else int(gb * 2 ** 30)
        return kw


class HostMemoryError(MemoryError):
    """The streamed blocks cannot fit the pinned host memory that this process may use."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a ZO2Engine places and streams a model's blocks.

    Attributes:
      num_blocks: the model's blocks.
      resident: indices of the blocks kept on the device.
      units: the pass order: each resident block alone, runs of streamed blocks cut into units
        of consecutive blocks that travel and compute together (one jitted call each).
      max_inflight: W, the most streamed units holding device memory at once.
      hold: the host never waits on the write-backs of the `hold` units dispatched last.
      packed: streamed blocks travel as one contiguous buffer each (with their optimiser state).
      branches: "fused" or "sequential" scheduling of the +eps and -eps branches.
      block_bytes: one streamed block and its optimiser state, as stored on the host.
      streamed_bytes: bytes a step uploads (P_s).
      written_bytes: bytes a step writes back: P_s, or with a frozen base (LoRA) the trained
        part and optimiser state alone (the base is never written back).
      host_bytes: pinned host memory the streamed blocks need, with the units being written back.
      device_bytes: the estimated peak device memory, or None where not estimated.
      footprint: the estimate's ingredients in bytes (outer, block, activations), or None.
      reasons: one line per automatic choice: what was chosen and why.
      packing: the packed layout (None unless packed).
    """

    num_blocks: int
    resident: frozenset
    units: tuple
    max_inflight: int
    hold: int
    packed: bool
    branches: str
    block_bytes: int
    streamed_bytes: int
    host_bytes: int
    written_bytes: Optional[int] = None  # None: streamed_bytes
    device_bytes: Optional[int] = None
    footprint: Optional[dict] = dataclasses.field(default=None, compare=False)
    reasons: tuple = dataclasses.field(default=(), compare=False)
    packing: Optional[Packing] = dataclasses.field(default=None, repr=False)

    @property
    def streamed(self) -> tuple:
        """The streamed units, in pass order."""
        return tuple(u for u in self.units if u[0] not in self.resident)

    @property
    def blocks_per_call(self) -> int:
        """G: the largest streamed unit (runs are cut evenly: 12 blocks at G = 5 are 3 x 4)."""
        return max((len(u) for u in self.streamed), default=1)

    def step_time_bound(self, up: float, down: float, both: float,
                        compute: float = 0.0) -> float:
        """T_limit in seconds: the slowest of the compute time of a step with every block
        resident and the transfers, given pinned bandwidths in bytes/s (up, down, both at once)."""
        p, w = self.streamed_bytes, self.written
        return max(compute, p / up, w / down, (p + w) / both)

    @property
    def written(self) -> int:
        """Bytes a step writes back (`written_bytes`, or `streamed_bytes` when that is None)."""
        return self.streamed_bytes if self.written_bytes is None else self.written_bytes

    def __str__(self) -> str:
        gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
        n_res = len(self.resident)
        lines = [
            f"ZO2 plan: {self.num_blocks} blocks, {n_res} resident"
            + (f" {sorted(self.resident)}" if n_res else "")
            + f", {self.num_blocks - n_res} streamed as {len(self.streamed)} units "
            f"of up to {self.blocks_per_call}",
            f"  window W={self.max_inflight} units, hold={self.hold}, "
            f"{'packed' if self.packed else 'unpacked'}, {self.branches} branches",
            (f"  streamed per step: {gb(self.streamed_bytes)} each way " if self.written ==
             self.streamed_bytes else f"  streamed per step: {gb(self.streamed_bytes)} up, "
             f"{gb(self.written)} written back (the frozen base stays on the host) ")
            + f"({gb(self.block_bytes)} per block with its optimiser state)",
            f"  pinned host memory: {gb(self.host_bytes)}",
            "  device peak: " + (f"~{gb(self.device_bytes)} estimated" if self.device_bytes
                                 is not None else "not estimated (needs batch_shape)"),
        ]
        return "\n".join(lines + [f"  - {r}" for r in self.reasons])


def make_plan(model, params: PyTree, tx=None, *, eps: float = ZOOptions.eps,
              num_directions: int = ZOOptions.num_directions,
              compute_dtype: Any = jnp.float32, storage=None, outer_storage=None,
              clip_norm: Optional[float] = None, directions: str = ZOOptions.directions,
              estimator: Any = ZOOptions.estimator,
              resident_blocks: Union[int, Iterable[int]] = StreamOptions.resident_blocks,
              max_inflight: Union[int, str] = StreamOptions.max_inflight,
              packed: Union[bool, str] = StreamOptions.packed,
              branches: str = StreamOptions.branches,
              blocks_per_call: Union[int, str] = StreamOptions.blocks_per_call,
              device_budget_bytes: Optional[int] = None, batch_shape: Optional[tuple] = None,
              estimate_device: Optional[bool] = None) -> Plan:
    """The plan a `ZO2Engine` with these arguments would follow (see ZO2Engine for each), made
    without building the engine: print it, or pass it as `ZO2Engine(..., plan=plan)`.

    The device peak is estimated when `estimate_device` (default: when `batch_shape` is given)
    or under a device budget."""
    spec, params, _ = common.prepare(
        model, params, tx, eps=eps, num_directions=num_directions, compute_dtype=compute_dtype,
        storage=storage, outer_storage=outer_storage, clip_norm=clip_norm, directions=directions,
        estimator=estimator)
    return plan_for(spec, params, resident_blocks=resident_blocks, max_inflight=max_inflight,
                    packed=packed, branches=branches, blocks_per_call=blocks_per_call,
                    device_budget_bytes=device_budget_bytes, batch_shape=batch_shape,
                    estimate_device=(batch_shape is not None if estimate_device is None
                                     else estimate_device))


def plan_for(spec: parts.Spec, params: PyTree, *,
             resident_blocks=StreamOptions.resident_blocks,
             max_inflight=StreamOptions.max_inflight, packed=StreamOptions.packed,
             branches=StreamOptions.branches, blocks_per_call=StreamOptions.blocks_per_call,
             device_budget_bytes: Optional[int] = None, batch_shape: Optional[tuple] = None,
             estimate_device: bool = False) -> Plan:
    """`make_plan` from an engine spec and prepared parameters (`params["blocks"][0]` a tree;
    only its shapes are read)."""
    packed, branches, max_inflight, blocks_per_call = (
        options.check(name, v, StreamOptions) for name, v in (
            ("packed", packed), ("branches", branches), ("max_inflight", max_inflight),
            ("blocks_per_call", blocks_per_call)))
    if device_budget_bytes is not None and batch_shape is None:
        raise ValueError("device_budget_bytes needs batch_shape=(batch, seq) to estimate "
                         "the activations")
    n = len(params["blocks"])
    block = params["blocks"][0]
    reasons = []
    resident = _resident_set(resident_blocks, n)
    explicit = None if resident_blocks is None or (
        isinstance(resident_blocks, (int, np.integer)) and resident_blocks == 0) else resident

    if _is_auto(branches):
        copy = tree_size(block) * jnp.dtype(spec.compute_dtype).itemsize
        branches = "sequential" if copy > SEQUENTIAL_AUTO_MIN_BYTES else "fused"
        reasons.append(f"branches={branches}: one perturbed copy of a block is "
                       f"{copy / 2**20:.0f} MiB ({'>' if branches == 'sequential' else '<='} "
                       f"{SEQUENTIAL_AUTO_MIN_BYTES / 2**20:.0f} MiB)")
    packing = _layout(spec, block, packed) if packed is not False else None
    if _is_auto(packed):
        size = None if packing is None else packing.block.nbytes + packing.opt.nbytes
        packed = size is not None and size <= PACK_AUTO_MAX_BYTES
        reasons.append("packed=False: a leaf cannot be packed" if size is None else
                       f"packed={packed}: a block with its optimiser state is "
                       f"{size / 2**20:.0f} MiB ({'<=' if packed else '>'} "
                       f"{PACK_AUTO_MAX_BYTES / 2**20:.0f} MiB)")
    packed = bool(packed)
    per_block = (packing.block.nbytes + packing.opt.nbytes if packed
                 else _stored_bytes(spec, block))
    if spec.frozen is None:
        written_per_block = per_block
    elif packed:
        written_per_block = packing.opt.nbytes + packing.block.nbytes_of(
            [k for k in packing.block.keys if k != spec.frozen])
    else:
        written_per_block = _written_bytes(spec, block)

    if _is_auto(max_inflight):
        windows = [4, 3] if per_block <= INFLIGHT_AUTO_MAX_BYTES else [3]
        w_reason = (f"max_inflight={windows[0]}: a block is {per_block / 2**20:.0f} MiB "
                    f"({'<=' if len(windows) == 2 else '>'} "
                    f"{INFLIGHT_AUTO_MAX_BYTES / 2**20:.0f} MiB)")
    else:
        windows = [int(max_inflight)]
        w_reason = None

    def auto_group(w: int, n_streamed: int) -> int:
        return max(1, min(UNIT_AUTO_BYTES // max(per_block, 1), n_streamed // (w + 2)))

    fps: dict = {}

    def fp_at(group: int) -> dict:
        if group not in fps:
            fp = footprint(spec, params, batch_shape,
                           {"outer": calls.outer_fn, "block": calls.unit_fns[branches],
                            "head": calls.head_fn}, group, packing if packed else None)
            if packed:  # the packed and unpacked copies of about two blocks coexist, beyond
                fp["transport"] = 2 * fp["block"]  # what XLA's statistics count
            fps[group] = fp
        return fps[group]

    for k, w in enumerate(windows):
        group = (auto_group(w, n - len(resident)) if _is_auto(blocks_per_call)
                 else min(int(blocks_per_call), n))
        if device_budget_bytes is None:
            break
        try:
            planned = plan_resident(fp_at(group), n, w, int(device_budget_bytes), explicit, group)
        except ValueError:
            if k + 1 < len(windows):
                w_reason = f"max_inflight={windows[k + 1]}: the budget cannot hold {w} units"
                continue
            raise
        planned_fp, planned_slots = fp_at(group), w * group
        if _is_auto(blocks_per_call):  # fewer streamed blocks than planned for: smaller units
            group = min(group, auto_group(w, n - len(planned)))  # (never more memory)
        if explicit is None:
            reasons.append(f"{len(planned)} resident blocks: the most whose estimated peak fits "
                           f"device_budget_bytes={int(device_budget_bytes):,}")
        resident = planned
        break
    if w_reason:
        reasons.append(w_reason)
    units = tuple(make_units(n, resident, group))
    streamed = [u for u in units if u[0] not in resident]
    if _is_auto(blocks_per_call) and streamed:
        reasons.append(f"blocks_per_call={max(len(u) for u in streamed)}: units up to "
                       f"{UNIT_AUTO_BYTES / 2**20:.0f} MiB with at least W + 2 = {w + 2} "
                       f"streamed units where the depth allows")
    hold = stream_hold(w, len(streamed))
    n_streamed = n - len(resident)
    fp = device = None
    if device_budget_bytes is not None:  # the estimate the resident set was chosen under
        fp, device = planned_fp, _need(planned_fp, n, len(resident), planned_slots)
    elif estimate_device and batch_shape is not None:
        fp = fp_at(group)
        device = _need(fp, n, len(resident), w * group)
    return Plan(
        num_blocks=n, resident=frozenset(resident), units=units, max_inflight=w, hold=hold,
        packed=packed and n_streamed > 0, branches=branches, block_bytes=per_block,
        streamed_bytes=per_block * n_streamed,
        written_bytes=None if spec.frozen is None else written_per_block * n_streamed,
        # the units being written back hold new host copies of what is written back
        host_bytes=per_block * n_streamed + written_per_block * w * min(group, n_streamed),
        device_bytes=device, footprint=fp, reasons=tuple(reasons),
        packing=packing if packed and n_streamed else None)


def stream_hold(max_inflight: int, n_streamed_units: int) -> int:
    """With W <= 3 (or at most 3 streamed units) the next upload's slot is the write-back of the
    unit before last, so the host may wait on it (hold = 1); from W = 4 it waits only on older
    ones (hold = 2), which ended long before. With L streamed units a unit's next upload needs its
    own write-back from L units back, so hold = 2 at L = 3 would leave no lookahead."""
    return 1 if max_inflight <= 3 or n_streamed_units <= 3 else 2


def check_plan(plan: Plan, spec: parts.Spec, params: PyTree) -> None:
    """Refuses a plan made for another model, storage or optimiser: its block count and block
    bytes (and packed layout) must be this engine's."""
    n = len(params["blocks"])
    block = params["blocks"][0]
    packing = _layout(spec, block, True) if plan.packed else None
    per_block = (packing.block.nbytes + packing.opt.nbytes if plan.packed
                 else _stored_bytes(spec, block))
    if plan.num_blocks != n or plan.block_bytes != per_block or plan.packing != packing:
        raise ValueError(
            f"plan= was made for {plan.num_blocks} blocks of {plan.block_bytes:,} bytes; this "
            f"engine has {n} blocks of {per_block:,} bytes (with its storage and optimiser "
            f"state){'' if plan.packing == packing else ' and another packed layout'}: make "
            f"the plan with the same model, storage and optimiser")
    if sorted(i for u in plan.units for i in u) != list(range(n)):
        raise ValueError(f"plan.units {plan.units} do not cover blocks 0..{n - 1} once each")
    if not isinstance(plan.max_inflight, int) or plan.max_inflight < 1 or plan.hold < 1:
        raise ValueError(f"plan.max_inflight ({plan.max_inflight}) and plan.hold ({plan.hold}) "
                         f"must be ints >= 1")


# ---- option checks ---------------------------------------------------------------------------

def _is_auto(v) -> bool:
    return isinstance(v, str) and v == "auto"


def check_batch_shape(batch_shape) -> Optional[tuple]:
    if batch_shape is None:
        return None
    batch_shape = tuple(int(d) for d in batch_shape)
    if len(batch_shape) != 2 or min(batch_shape) < 1:
        raise ValueError(f"batch_shape must be (batch, seq), got {batch_shape}")
    return batch_shape


def _resident_set(resident_blocks, n) -> frozenset:
    if resident_blocks is None:
        return frozenset()
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


# ---- sizes -----------------------------------------------------------------------------------

def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)


def _layout(spec, block, packed) -> Optional[Packing]:
    """The static layout of a packed streamed block, from abstract shapes (no block made);
    None under packed="auto" when a leaf cannot be packed (e.g. a PRNG key in the optimiser
    state)."""
    try:
        return Packing.of(*_stored_shapes(spec, block), split=spec.frozen is not None)
    except ValueError as e:
        if packed is True:
            raise ValueError(f"packed=True: a block or its optimiser state cannot be packed "
                             f"({e}); use packed=False or 'auto'") from None
        return None


def _stored_shapes(spec, block) -> tuple:
    """(stored block, optimiser state) of one block, as abstract shapes (nothing made)."""
    return jax.eval_shape(lambda p: parts.init_part(spec, "block", p), _abstract(block))


def _written_bytes(spec, block) -> int:
    """Bytes of one unpacked block's write-back with a frozen base: its trained part and
    optimiser state."""
    stored, opt = _stored_shapes(spec, block)
    return tree_nbytes(parts.trained(spec, stored)) + tree_nbytes(opt)


def _stored_bytes(spec, block) -> int:
    """Bytes of one stored block and its optimiser state, from abstract shapes."""
    return tree_nbytes(_stored_shapes(spec, block))


def make_units(n: int, resident: frozenset, per_call: int) -> list:
    """The pass order as units: each resident block alone; each maximal run of consecutive
    streamed blocks cut into ceil(len / per_call) units of near-equal size (at most two unit
    sizes per run; each distinct size is compiled once)."""
    if per_call < 1:
        raise ValueError(f"blocks per call must be >= 1, got {per_call}")
    units, run = [], []

    def close():
        if run:
            k = -(-len(run) // per_call)
            q, r = divmod(len(run), k)
            start = 0
            for j in range(k):
                size = q + (1 if j < r else 0)
                units.append(tuple(run[start:start + size]))
                start += size
            run.clear()

    for i in range(n):
        if i in resident:
            close()
            units.append((i,))
        else:
            run.append(i)
    close()
    return units


# ---- device memory ---------------------------------------------------------------------------
# Peak device memory of a ZO2 step, estimated as
#     outer (stored + optimiser state)
#   + resident blocks (stored + optimiser state each)
#   + min(W x G, streamed) streamed blocks in flight (W units of G blocks)
#   + activations: the 2q hidden states (in and out of a block), the context, and the largest
#     scratch space XLA reports for the compiled outer, unit (at G blocks) and head functions.

def spread(k: int, n: int) -> frozenset:
    """k block indices spread evenly over n, so the bus can catch up between streamed blocks."""
    return frozenset(int((j + 0.5) * n / k) for j in range(k)) if k else frozenset()


def _temp_bytes(fn, spec, *args) -> Optional[int]:
    try:
        stats = fn.lower(spec, *args).compile().memory_analysis()
    except Exception:  # a backend without memory analysis: fall back to the caller's estimate
        return None
    return None if stats is None else int(stats.temp_size_in_bytes)


def footprint(spec: parts.Spec, params: PyTree, batch_shape, fns: dict, group: int = 1,
              packing=None) -> dict:
    """Bytes of each ingredient of the peak, from abstract shapes and compiled-memory statistics.

    `fns` holds the engine's jitted 'outer', 'block' (its unit step: Spec, packing, blocks,
    ...) and 'head' functions; the unit step's scratch is taken for `group` blocks per call,
    stored packed with `packing` (or as trees with None)."""
    o_s, o_o = jax.eval_shape(lambda p: parts.init_part(spec, "outer", p),
                              _abstract(params["outer"]))
    b_s, b_o = jax.eval_shape(lambda p: parts.init_part(spec, "block", p),
                              _abstract(params["blocks"][0]))
    B, T = batch_shape
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32)
             for k in ("input_ids", "attention_mask", "loss_mask")}
    key = jax.eval_shape(lambda: jax.random.key(0))
    pend = jax.eval_shape(lambda: parts.no_pending(spec))
    count, pid = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.uint32)
    _, _, hs, ctx, g = jax.eval_shape(lambda *a: parts.outer_embed(spec, *a),
                                      o_s, o_o, pend, count, key, batch)
    u_s, u_o = (b_s, b_o) if packing is None else jax.eval_shape(packing.pack, b_s, b_o)
    temps = [_temp_bytes(fns["outer"], spec, o_s, o_o, pend, count, key, batch),
             _temp_bytes(fns["block"], spec, packing, [u_s] * group, [u_o] * group, pend,
                         count, (pid,) * group, key, hs, ctx, g),
             _temp_bytes(fns["head"], spec, o_s, key, hs, batch, g, pend, count, count)]
    # Without statistics: decoded weights, z and two perturbed copies of a block (float32), per
    # block of a unit (its loop runs over a stacked copy), and the hidden states once more.
    block_f32 = 4 * tree_size(params["blocks"][0])
    fallback = 4 * block_f32 * group + 2 * tree_nbytes(hs)
    scratch = max([t for t in temps if t is not None], default=fallback)
    return {"outer": tree_nbytes(o_s) + tree_nbytes(o_o),
            "block": tree_nbytes(b_s) + tree_nbytes(b_o),
            "activations": 2 * tree_nbytes(hs) + tree_nbytes(ctx) + tree_nbytes(batch) + scratch}


def _transport(fp: dict) -> str:
    t = fp.get("transport")
    return f" + packed transport ~{t:,} (packed=False avoids it)" if t else ""


def _need(fp: dict, n: int, k: int, w: int) -> int:
    # "transport": the packed and unpacked copies that coexist when blocks travel packed
    transport = fp.get("transport", 0) if n > k else 0
    return fp["outer"] + fp["activations"] + transport + (k + min(w, n - k)) * fp["block"]


def plan_resident(fp: dict, n: int, max_inflight: int, budget: int,
                  resident: Optional[frozenset], group: int = 1) -> frozenset:
    """The resident set: `resident` checked against the budget, or the most blocks that fit
    (spread evenly), with up to max_inflight units of `group` streamed blocks on the device.
    Raises a ValueError naming the numbers when the minimum does not fit."""
    w = max_inflight * group
    slots = (f"max_inflight={max_inflight}" if group == 1 else
             f"max_inflight={max_inflight} x blocks_per_call={group}")
    if resident is not None:
        need = _need(fp, n, len(resident), w)
        if need > budget:
            raise ValueError(
                f"device_budget_bytes={budget:,} is too small for {len(resident)} resident "
                f"blocks: needs ~{need:,} (outer {fp['outer']:,} + {len(resident)} resident and "
                f"{min(w, n - len(resident))} in-flight blocks ({slots}) x {fp['block']:,} + "
                f"activations ~{fp['activations']:,}{_transport(fp)})")
        return resident
    minimum = _need(fp, n, 0, w)
    if minimum > budget:
        raise ValueError(
            f"the model does not fit device_budget_bytes={budget:,}: the minimum is ~{minimum:,} "
            f"= outer {fp['outer']:,} + {min(w, n)} streamed blocks ({slots}) x "
            f"{fp['block']:,} (stored + optimiser state) + activations ~{fp['activations']:,}"
            f"{_transport(fp)}. "
            f"Lower max_inflight, blocks_per_call, the batch shape, or the storage precision.")
    k = max(k for k in range(n + 1) if _need(fp, n, k, w) <= budget)
    return spread(k, n)


# ---- host memory -----------------------------------------------------------------------------

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


def host_total_bytes() -> Optional[int]:
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
    blocks and optimiser states, and the units being written back (`Plan.host_bytes`)."""
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
            stacklevel=4)
