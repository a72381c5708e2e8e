"""Device-memory planning: which blocks stay resident under a byte budget.

Peak device memory of a ZO2 step, estimated as

    outer (stored + optimiser state)
  + resident blocks (stored + optimiser state each)
  + min(W x G, streamed) streamed blocks in flight (stored + optimiser state each; W units of
    G blocks per call)
  + activations: the 2q hidden states (in and out of a block), the context, and the largest
    scratch space XLA reports for the compiled outer, unit (at G blocks) and head functions.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from zo2_jax.core import parts
from zo2_jax.core.trees import tree_nbytes, tree_size

PyTree = Any


def spread(k: int, n: int) -> frozenset:
    """k block indices spread evenly over n, so the bus can catch up between streamed blocks."""
    return frozenset(int((j + 0.5) * n / k) for j in range(k)) if k else frozenset()


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)


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
    pend = jax.eval_shape(lambda: parts.empty_pending(spec.num_directions))
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
