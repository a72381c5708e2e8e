"""The device side of ZO2: one jitted function per stage of a step, compiled once per unit size.

A unit is one block or a run of consecutive streamed blocks computed by one jitted call. The
functions take the hashable `Spec` and the unit's `Packing` (or None) as static arguments, so
engines with equal specs share compiled code. The math is `zo2_jax.core.parts`; on a mesh (the
static keyword `par`, a `spmd.Parallel`) its sharded form in `zo2_jax.core.spmd`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from zo2_jax.core import parts
from zo2_jax.core import spmd
from zo2_jax.core import trees


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)  # fresh buffers, never aliases of donated state


# One module-level jitted function per stage, the hashable Spec static: the unit functions serve
# every unit of one size (one structure), and engines with equal specs share compiled code.
def _outer(spec, stored, opt, pend, count, key, batch, par=None):
    return spmd.outer_embed(spec, par, stored, opt, pend, count, key, batch)


def _head(spec, stored, key, hs, batch, gram_acc, pend, count, skipped_total, state=None,
          par=None):
    return spmd.head_finish(spec, par, stored, key, hs, batch, gram_acc, pend, count,
                            skipped_total, state)


def _update(spec, part, stored, opt, pend, count, part_id, par=None):
    return spmd.update_part(spec, par, part, stored, opt, pend, count, part_id)


def _eval_embed(spec, stored, batch, par=None):
    return spmd.eval_embed(spec, par, stored, batch)


def _eval_head(spec, stored, h, batch, par=None):
    return spmd.eval_head(spec, par, stored, h, batch)


outer_fn = jax.jit(_outer, static_argnums=0, static_argnames="par", donate_argnums=(1, 2))
head_fn = jax.jit(_head, static_argnums=0, static_argnames="par")
update_fn = jax.jit(_update, static_argnums=(0, 1), static_argnames="par",
                    donate_argnums=(2, 3))
init_fn = jax.jit(parts.init_part, static_argnums=(0, 1))
init_opt_fn = jax.jit(parts.init_opt, static_argnums=(0, 1))
eval_embed_fn = jax.jit(_eval_embed, static_argnums=0, static_argnames="par")
eval_head_fn = jax.jit(_eval_head, static_argnums=0, static_argnames="par")
decode_fn = jax.jit(lambda storage, stored: _copy(storage.decode(stored)), static_argnums=0)


# A unit is one block or a run of consecutive streamed blocks computed by one jitted call (see
# schedule.py). `packing` (static) is the layout of packed streamed blocks, or None: then the
# unit's blocks and optimiser states are trees. Packed blocks are unpacked after the upload and
# packed again before the write-back inside the same call.

def _unpacked(packing, blk, opt):
    return (blk, opt) if packing is None else packing.unpack(blk, opt)


def _packed(packing, blk, opt):
    return (blk, opt) if packing is None else packing.pack(blk, opt)


def _over_unit(blks, opts, ids, carry, one):
    """Runs `one(blk, opt, pid, carry) -> (blk, opt, carry)` over a unit's blocks in order.

    Two or more blocks go through a `fori_loop` over their stacked copies, as in MeZO's step:
    one compiled body for every block. Unrolled, XLA would fuse across block boundaries, which
    can change float32 results in the last bits (then ZO2 would no longer equal MeZO bit for
    bit) and makes compile time grow with the unit."""
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
              branches: str = "fused", par=None):
    """`parts.block_step` over the unit's blocks in order: (blocks, opts, hs, gram)."""
    def one(blk, opt, pid, carry):
        given = blk
        blk, opt = _unpacked(packing, blk, opt)
        blk, opt, hs, g = spmd.block_step(spec, par, blk, opt, pend, count, pid, key, carry[0],
                                          ctx, carry[1], branches)
        blk, opt = _packed(packing, blk, opt)
        if spec.frozen is not None:  # the frozen base's buffers as they came, not re-packed
            blk = {**blk, spec.frozen: given[spec.frozen]}
        return blk, opt, (hs, g)

    new_b, new_o, (hs, gram_acc) = _over_unit(blks, opts, ids, (hs, gram_acc), one)
    return new_b, new_o, hs, gram_acc


def _unit_update(spec, packing, blks, opts, pend, count, ids, par=None):
    def one(blk, opt, pid, carry):
        blk, opt = spmd.update_part(spec, par, "block", *_unpacked(packing, blk, opt), pend,
                                    count, pid)
        return (*_packed(packing, blk, opt), carry)

    new_b, new_o, _ = _over_unit(blks, opts, ids, (), one)
    return new_b, new_o


def _unit_eval(spec, packing, blks, h, ctx, par=None):
    unpack = (lambda b: b) if packing is None else packing.block.unpack  # noqa: E731
    if len(blks) == 1:
        return spmd.eval_block(spec, par, unpack(blks[0]), h, ctx)
    stacked = trees.stack(blks)  # a loop, as in _over_unit (without write-back of blocks)
    return jax.lax.fori_loop(0, len(blks), lambda i, h: spmd.eval_block(
        spec, par, unpack(trees.take(stacked, i)), h, ctx), h)


def _unit_decode(spec, packing, blks):
    return [_copy(spec.storage.decode(b if packing is None else packing.block.unpack(b)))
            for b in blks]


# one step function per branch schedule (see parts.block_step), so that the other stages'
# compiled code does not depend on the schedule
unit_fns = {b: jax.jit(functools.partial(unit_step, branches=b), static_argnums=(0, 1),
                        static_argnames="par", donate_argnums=(2, 3, 8, 10))
            for b in parts.BRANCHES}
unit_update_fn = jax.jit(_unit_update, static_argnums=(0, 1), static_argnames="par",
                         donate_argnums=(2, 3))
unit_eval_fn = jax.jit(_unit_eval, static_argnums=(0, 1), static_argnames="par")
unit_decode_fn = jax.jit(_unit_decode, static_argnums=(0, 1))
pack_fn = jax.jit(lambda lay, stored, opt: lay.pack(stored, opt), static_argnums=0)


# Packed streamed blocks (see _pack.py): made and re-packed on the device, one block at a time.
pinit_fn = jax.jit(lambda spec, lay, p: lay.pack(*parts.init_part(spec, "block", p)),
                    static_argnums=(0, 1))
