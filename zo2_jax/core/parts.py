"""Per-part math shared by the resident (MeZO) and offloaded (ZO2) engines.

A *part* is `outer` (embeddings, final norm, head) or one block. Both engines call exactly these
functions, in the same order, so for the same keys they produce bit-identical parameters.

Step t with key k_t, pending (k_{t-1}, c_{t-1}, valid_{t-1}) from step t-1, for each part P:

    theta   = decode(P)
    theta'  = update(theta, sum_j c_{t-1,j} z_j(k_{t-1}))        # the deferred update of step t-1
    P       = valid_{t-1} ? encode(theta', rounding key) : P      # exact identity when skipped
    W_j^+-  = cast(decode(P) +- eps * z_j(k_t), compute_dtype)    # j = 0..q-1, both branches
    h_j^+-  = stage(W_j^+-, h_j^+-)

then at the head  L_j^+- = mean_b loss_b(W_j^+-),  g_j = (L_j^+ - L_j^-) / (2 eps)  and
c_{t,j} = g_j / q (times min(1, clip / ||sum_j c_j z_j||) with clip_norm), so the update is
theta <- theta - lr * (1/q) sum_j g_j z_j for MeZO's rule, or any optax transform of that estimate.
That is MeZO's estimator; the others (`Spec.estimator`, `zo2_jax.core.estimators`) change which
branches run (FZOO: theta and the theta + eps d_j), the directions (Sparse-MeZO: d_j = z_j masked
to each matrix's smallest magnitudes) and the coefficients c_j; the stages below are the same.

Bit-identical across engines: MeZO compiles the stages into one function (a loop over stacked
blocks), ZO2 into one function per stage and unit. XLA optimises across whatever it sees: it CSEs
the outer perturbation of embed and head, hoists loop-invariant work out of MeZO's loop, fuses the
updated parameters into their consumers, picks reduction and dot strategies per fusion, and on GPU
contracts a multiply and an add of one fusion into an FMA (one rounding instead of two). Any of
these can move a float32 result by an ulp in one engine and not the other. So every stage pins its
inputs and outputs with `optimization_barrier` (`_pin`): between two pins both engines compile the
same computation, whatever surrounds it. Where a jit boundary already is (ZO2's one-block units)
a pin costs nothing; elsewhere (MeZO's loop, ZO2's multi-block units) it materialises a block's
updated parameters once more and keeps the update from fusing with the perturbation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from zo2_jax.core.estimators import Estimator
from zo2_jax.core.noise import OUTER_PART, gram, part_noise, rounding_key
from zo2_jax.core.storage import Storage
from zo2_jax.models.quant import is_qarray
from zo2_jax.core.transforms import MeZOSGD, fused_sgd_leaf, learning_rate_at

PyTree = Any


class Pending(NamedTuple):
    """The update of the last step, not yet applied to the parameters.

    Attributes:
      key: the step key whose directions z_j the update uses.
      coef: [q] float32, c_j = g_j / q (clipped with clip_norm); zeros when not valid.
      valid: bool scalar; False before the first step, after a flush and after a skipped step.
      curv: HiZOO's [q] curvatures |L_j^+ + L_j^- - 2 L_0| / (2 eps^2) (None otherwise).
    """

    key: jax.Array
    coef: jax.Array
    valid: jax.Array
    curv: Optional[jax.Array] = None  # [q] HiZOO's curvatures c_j (None for the others)


def _pin(tree):
    """An optimisation barrier: the values are computed here, once, and nothing is fused, CSE'd
    or moved across (see the module docstring)."""
    return jax.lax.optimization_barrier(tree)


def fixed_sum(x) -> jax.Array:
    """The sum of all elements of `x` in one fixed order (pairwise: halves added elementwise),
    whatever program it is compiled in. XLA picks a reduction's order per program, so the same
    reduction can round differently on one device and on a device of a mesh; elementwise adds
    it does not reorder."""
    x = jnp.ravel(x)
    rest = None
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            rest = x[-1] if rest is None else rest + x[-1]
            x = x[:-1]
        h = x.shape[0] // 2
        x = x[:h] + x[h:]
    total = x[0] if x.shape[0] else jnp.zeros([], x.dtype)
    return total if rest is None else total + rest


def fixed_mean(x) -> jax.Array:
    """`fixed_sum(x)` over the element count (the count pinned, so it is divided by, not
    multiplied by a rounded reciprocal)."""
    return fixed_sum(x) / _pin(jnp.asarray(jnp.size(x), x.dtype))


def empty_pending(num_directions: int, key: Optional[jax.Array] = None,
                  curv: bool = False) -> Pending:
    key = jax.random.key(0) if key is None else key
    zeros = lambda: jnp.zeros([num_directions], jnp.float32)  # noqa: E731  (distinct buffers)
    return Pending(key, zeros(), jnp.zeros([], bool), zeros() if curv else None)


def no_pending(spec: "Spec", key: Optional[jax.Array] = None) -> Pending:
    """The empty pending update of a run (with HiZOO's curvatures where its estimator has
    them)."""
    return empty_pending(spec.num_directions, key, curv=spec.estimator.curvature)


def freeze_mask(mask: PyTree) -> tuple:
    """A hashable form of a pytree of Python bools: (treedef, leaves)."""
    leaves, treedef = jax.tree.flatten(mask)
    return treedef, tuple(bool(m) for m in leaves)


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything static about a ZO run. Hashable: the engines pass it to module-level jitted
    functions as a static argument, so engines with equal specs share compiled code.

    `outer_mask` / `block_mask` are frozen (`freeze_mask`) MeZO weight-decay masks, used only
    when `tx` is fused (`MeZOSGD`).
    """

    model: Any
    eps: float
    num_directions: int
    compute_dtype: Any
    storage: Storage
    outer_storage: Storage
    tx: optax.GradientTransformation
    outer_mask: Optional[tuple]
    block_mask: Optional[tuple]
    clip_norm: Optional[float]
    directions: str = "gaussian"
    estimator: Estimator = Estimator()
    frozen: Optional[str] = None  # a top-level key of every part's tree that is never trained

    @property
    def fused(self) -> bool:
        return isinstance(self.tx, MeZOSGD)

    def storage_of(self, part: str) -> Storage:
        return self.outer_storage if part == "outer" else self.storage

    def mask_of(self, part: str) -> PyTree:
        treedef, leaves = self.outer_mask if part == "outer" else self.block_mask
        return trained(self, jax.tree.unflatten(treedef, leaves))


def trained(spec: Spec, tree: PyTree) -> PyTree:
    """The trained subtree of a part's tree: all of it, or with a frozen base (`Spec.frozen`,
    e.g. LoRA's) everything but that key. Only it is perturbed, updated and given optimiser
    state; the frozen subtree is read by the model and kept bit for bit."""
    if spec.frozen is None:
        return tree
    return {k: v for k, v in tree.items() if k != spec.frozen}


def _rejoin(spec: Spec, tree: PyTree, whole: PyTree) -> PyTree:
    """`tree` (a trained subtree) with `whole`'s frozen subtree put back."""
    return tree if spec.frozen is None else {**tree, spec.frozen: whole[spec.frozen]}


# ---- parameters and optimiser state of one part ----------------------------------------------

def init_opt(spec: Spec, part: str, stored):
    """Optimiser state of a part (none for the fused MeZO-SGD: the engine keeps its count), and
    with a stateful estimator {"tx": that, key: its state} (`estimator_state`; the key is
    `Estimator.state_key`: "hessian" for HiZOO's H, "threshold" for Sparse-MeZO's)."""
    theta = trained(spec, spec.storage_of(part).decode(stored))
    tx_state = () if spec.fused else spec.tx.init(theta)
    if spec.estimator.stateful:
        return {"tx": tx_state, spec.estimator.state_key: spec.estimator.init_state(theta)}
    return tx_state


def has_opt(spec: Spec) -> bool:
    """Whether a part keeps any optimiser (or estimator) state."""
    return not spec.fused or spec.estimator.stateful


def estimator_state(spec: Spec, opt):
    """A part's estimator state (HiZOO's H, Sparse-MeZO's thresholds) in its optimiser state,
    or None."""
    return opt[spec.estimator.state_key] if spec.estimator.stateful and opt is not None else None


def _split_opt(spec: Spec, opt):
    return (opt["tx"], opt[spec.estimator.state_key]) if spec.estimator.stateful else (opt, None)


def init_part(spec: Spec, part: str, params: PyTree):
    """(stored, opt_state) of a part from float parameters (round-to-nearest encoding)."""
    stored = spec.storage_of(part).encode(params)
    return stored, init_opt(spec, part, stored)


def update_part(spec: Spec, part: str, stored, opt, pend: Pending, count, part_id):
    """Applies the pending update to one part; an exact identity when `pend.valid` is False."""
    # pinned with part_id, which varies per block, nothing here is hoisted out of MeZO's loop.
    # (The stored values need no pin: slicing them out of a stack or a packed buffer, fused or
    # not, moves bits and rounds nothing.)
    pend, count, part_id = _pin((pend, count, part_id))
    st = spec.storage_of(part)
    whole, stored = stored, trained(spec, stored)
    theta = st.decode(stored)  # the values the step that made `pend` perturbed
    q = range(spec.num_directions)
    opt, est = _split_opt(spec, opt)
    new_est = est
    if spec.estimator.curvature:
        # HiZOO: H from this step's curvatures first, then the step along z_j / sqrt(new H)
        zs = [part_noise(pend.key, j, part_id, theta, spec.directions) for j in q]
        new_est = _pin(spec.estimator.next_state(est, zs, pend.curv))
        shape = spec.estimator.shaper(theta, new_est)
        ds = [shape(z) for z in zs]
    else:  # the state (Sparse-MeZO's thresholds), if any, shapes the directions unchanged
        ds = directions(spec, pend.key, q, part_id, theta, est)
    gz = None
    for j, z in zip(q, ds):
        term = jax.tree.map(lambda z_: pend.coef[j] * z_, z)
        gz = term if gz is None else jax.tree.map(jnp.add, gz, term)
    if spec.fused:
        lr = learning_rate_at(spec.tx.learning_rate, count)
        wd = spec.tx.weight_decay
        new = jax.tree.map(lambda t, u, m: fused_sgd_leaf(t, u, lr, wd, m),
                           theta, gz, spec.mask_of(part))
        new_opt = opt
    else:
        updates, new_opt = spec.tx.update(gz, opt, theta)
        new = optax.apply_updates(theta, updates)
    encoded = st.encode(new, rounding_key(pend.key, part_id))
    # A select on a device flag, not lax.cond or a Python branch: no host synchronisation, and
    # the old stored bits (not a re-encoding of them, which could re-round) survive a skip.
    stored = _rejoin(spec, st.select(pend.valid, encoded, stored), whole)
    opt = jax.tree.map(lambda a, b: jnp.where(pend.valid, a, b), new_opt, opt)
    if est is not None:
        opt = {"tx": opt, spec.estimator.state_key: jax.tree.map(
            lambda a, b: jnp.where(pend.valid, a, b), new_est, est)}
    return _pin((stored, opt))


def directions_of(spec: Spec, dirs=None):
    """The direction indices a stage runs: all q (`dirs` None), or the given ones (a device's
    share of the directions on a mesh; traced scalars there)."""
    return range(spec.num_directions) if dirs is None else dirs


def directions(spec: Spec, key, js, part_id, theta, state=None) -> list:
    """The estimator's directions d_j of one part for j in `js`: z_j(key) (`part_noise`), shaped
    by the estimator from the part's values `theta` and its estimator `state` (Sparse-MeZO's
    mask, HiZOO's 1 / sqrt(H); see `estimators.Estimator.shaper`)."""
    shape = spec.estimator.shaper(theta, state)
    zs = [part_noise(key, j, part_id, theta, spec.directions) for j in js]
    return zs if shape is None else [shape(z) for z in zs]


def branches_of(spec: Spec, dirs=None) -> list:
    """The forward branches a stage runs for `dirs`, in carried order: (i, sign) for the i-th
    direction of `dirs`, sign +1 / -1, or (None, 0) for the unperturbed branch
    (`Estimator.branches`)."""
    return spec.estimator.branches(len(list(directions_of(spec, dirs))))


def perturbed(spec: Spec, part: str, stored, key, part_id, dirs=None, state=None):
    """The weights of each branch of `dirs` (default all j < q) in the compute dtype, in the
    order of `branches_of`, and the directions [d_j].

    The perturbation is added in float32 to the decoded weights and only then cast, so the d of
    the branches is exactly the d of the update (also with bfloat16 compute). `state`: the
    part's estimator state (`estimator_state`: HiZOO's H, Sparse-MeZO's thresholds), or None."""
    st = spec.storage_of(part)
    theta = trained(spec, st.decode(stored))
    zs = directions(spec, key, directions_of(spec, dirs), part_id, theta, state)
    ws = [_branch_weights(spec, theta, None if i is None else zs[i], sign)
          for i, sign in branches_of(spec, dirs)]
    return [_with_frozen(spec, st, w, stored) for w in ws], zs


def compute_weights(spec: Spec, storage: Storage, stored: PyTree) -> PyTree:
    """`stored` decoded to the compute dtype; QArray leaves (a quantised frozen base) stay as
    they are: the model dequantises each matrix where it is used, so a block's dequantised
    weights never exist all at once."""
    return jax.tree.map(lambda t: t if is_qarray(t) else t.astype(spec.compute_dtype),
                        storage.decode(stored, keep_quantized=True), is_leaf=is_qarray)


def _with_frozen(spec: Spec, storage: Storage, w: PyTree, stored: PyTree) -> PyTree:
    """A branch's weights with the frozen subtree of `stored` put back (`compute_weights`)."""
    if spec.frozen is None:
        return w
    return {**w, spec.frozen: compute_weights(spec, storage, stored[spec.frozen])}


def _gram(spec: Spec, part: str, stored, key, part_id, zs, dirs, state=None):
    """The part's Gram matrix of all q directions: from `zs` when they are all of them, else
    regenerated (a device of a direction-parallel mesh holds only its own)."""
    if dirs is None:
        return gram(zs)
    theta = trained(spec, spec.storage_of(part).decode(stored))
    return gram(directions(spec, key, range(spec.num_directions), part_id, theta, state))


def _branch_weights(spec: Spec, theta, z, sign: int):
    """theta + eps z (sign 1), theta - eps z (sign -1) or theta (sign 0), in float32, then cast
    to the compute dtype."""
    cd, eps = spec.compute_dtype, spec.eps
    if sign == 0:
        return jax.tree.map(lambda t: t.astype(cd), theta)
    if sign == 1:
        return jax.tree.map(lambda t, z_: (t + eps * z_).astype(cd), theta, z)
    return jax.tree.map(lambda t, z_: (t - eps * z_).astype(cd), theta, z)


# ---- the three stages of a training step -------------------------------------------------------

def outer_embed(spec: Spec, stored, opt, pend: Pending, count, key, batch, dirs=None):
    """Updates `outer`, embeds the branches (`branches_of`) of `dirs` (default all q directions):
    (stored, opt, hs, ctx, gram or None)."""
    stored, opt = update_part(spec, "outer", stored, opt, pend, count, OUTER_PART)
    key, batch = _pin((key, batch))
    ctx = spec.model.context(batch)
    ws, zs = perturbed(spec, "outer", stored, key, OUTER_PART, dirs,
                       estimator_state(spec, opt))
    hs = tuple(spec.model.embed(w, batch) for w in ws)
    g = None if spec.clip_norm is None else _gram(spec, "outer", stored, key, OUTER_PART, zs,
                                                  dirs, estimator_state(spec, opt))
    return _pin((stored, opt, hs, ctx, g))


BRANCHES = ("fused", "sequential")


def _sequential_branches(spec: Spec, stored, part_id, key, hs, ctx, gram_acc, dirs=None,
                         state=None):
    """The branches through one block, each branch's weights made only once the previous
    branch's output exists (an optimization barrier orders them): one perturbed copy of the
    block at a time instead of the +eps and -eps copies together, at the cost of generating
    each z twice (three times with clip_norm, for the Gram matrix). Same values as the fused
    schedule."""
    st = spec.storage_of("block")
    src, k, out = stored, key, []
    js = list(directions_of(spec, dirs))
    for b, (i, sign) in enumerate(branches_of(spec, dirs)):
        theta = trained(spec, st.decode(src))
        z = None if i is None else directions(spec, k, [js[i]], part_id, theta, state)[0]
        h = spec.model.block(_with_frozen(spec, st, _branch_weights(spec, theta, z, sign), src),
                             hs[b], ctx)
        # the next branch's z must not be shared with (CSE'd into) this one's: its key and
        # weights come through the barrier, after this branch's output
        h, src, k = jax.lax.optimization_barrier((h, src, k))
        out.append(h)
    if gram_acc is not None:
        theta = trained(spec, st.decode(src))
        gram_acc = gram_acc + gram(directions(spec, k, range(spec.num_directions), part_id,
                                              theta, state))
    return tuple(out), gram_acc


def block_step(spec: Spec, stored, opt, pend: Pending, count, part_id, key, hs, ctx, gram_acc,
               branches: str = "fused"):
    """Updates block `part_id` and runs the step's branches through it: (stored, opt, hs, gram).

    `branches` schedules the branches: "fused" makes the +eps and -eps weights of each matrix
    in one pass (z generated once, both copies alive together); "sequential" runs one branch
    after the other (about half the scratch memory, z generated twice). Both give bit-identical
    values. (An argument, not a Spec field: the other stages do not depend on it.)"""
    stored, opt = update_part(spec, "block", stored, opt, pend, count, part_id)
    return (stored, opt, *block_forward(spec, stored, part_id, key, hs, ctx, gram_acc, branches,
                                        state=estimator_state(spec, opt)))


def block_forward(spec: Spec, stored, part_id, key, hs, ctx, gram_acc, branches: str = "fused",
                  dirs=None, state=None):
    """The branches of `dirs` (default all q) through block `part_id` as stored (already
    updated): (hs, gram). `block_step` without the update (a mesh runs the update on its
    shards, and this on the gathered block)."""
    if branches not in BRANCHES:
        raise ValueError(f"branches must be one of {BRANCHES}, got {branches!r}")
    key, hs, ctx, gram_acc, part_id = _pin((key, hs, ctx, gram_acc, part_id))
    if branches == "sequential":
        hs, gram_acc = _sequential_branches(spec, stored, part_id, key, hs, ctx, gram_acc, dirs,
                                            state)
        return _pin((stored, hs, gram_acc))[1:]
    ws, zs = perturbed(spec, "block", stored, key, part_id, dirs, state)
    hs = tuple(spec.model.block(w, h, ctx) for w, h in zip(ws, hs))
    if gram_acc is not None:
        gram_acc = gram_acc + _gram(spec, "block", stored, key, part_id, zs, dirs, state)
    return _pin((stored, hs, gram_acc))[1:]


def head_finish(spec: Spec, stored, key, hs, batch, gram_acc, pend: Pending, count, skipped_total,
                state=None):
    """Losses of the branches, the projected gradients, the new pending update and metrics.

    Returns (pending, count, skipped_total, metrics); count counts applied updates, so it grows
    by one if the update applied during this step (the previous pending one) was valid.
    """
    losses, (key, gram_acc, pend, count, skipped_total) = head_losses(
        spec, stored, key, hs, batch, (key, gram_acc, pend, count, skipped_total), state=state)
    return finish(spec, losses, key, gram_acc, pend, count, skipped_total)


class Losses(NamedTuple):
    """The mean losses of a step's branches (float32): `plus` [k] at theta + eps d_j, `minus`
    [k] at theta - eps d_j (None for a one-sided estimator), `zero` [] at theta (None for a
    two-sided one)."""

    plus: jax.Array
    minus: Optional[jax.Array]
    zero: Optional[jax.Array]


def head_losses(spec: Spec, stored, key, hs, batch, rest=(), dirs=None, mean=None, state=None):
    """The `Losses` of the branches of `dirs` (default all q directions), and `rest` passed
    through the same barrier. `mean` reduces the per-example losses (a data-parallel mesh sums
    over its devices' rows)."""
    stored, key, hs, batch, rest, state = _pin((stored, key, hs, batch, rest, state))
    mean = fixed_mean if mean is None else mean
    # the per-example losses pinned before the mean: XLA may otherwise merge the model's
    # reduction over tokens with the mean over rows into one, in an order that depends on what
    # else the program holds (one device's q directions, or a mesh device's share)
    loss = lambda w, h: mean(_pin(spec.model.head(w, h, batch)[0].astype(jnp.float32)))  # noqa
    ws, _ = perturbed(spec, "outer", stored, key, OUTER_PART, dirs, state)
    signs = [s for _, s in branches_of(spec, dirs)]
    losses = [loss(w, h) for w, h in zip(ws, hs)]
    pick = lambda sign: jnp.stack([x for x, s in zip(losses, signs) if s == sign])  # noqa: E731
    out = Losses(pick(1), None if spec.estimator.one_sided else pick(-1),
                 pick(0)[0] if spec.estimator.unperturbed else None)
    # Pinned: the logged losses, the logged g and the applied coefficients all come from these
    # values, computed once (XLA may otherwise compute a loss twice, in two fusions that round
    # differently, and the logged g would not be the one the update applies).
    return _pin(out), rest


def finish(spec: Spec, losses: Losses, key, gram_acc, pend: Pending, count, skipped_total):
    """From the losses of all q directions: (pending, count, skipped_total, metrics) of
    head_finish."""
    loss_p, loss_m, loss_0 = losses
    q = spec.num_directions
    if spec.estimator.one_sided:
        # FZOO: one-sided differences, the step normalised by the spread of the L_j^+
        g = _pin((loss_p - loss_0) / _pin(jnp.float32(spec.eps)))
        mu = fixed_mean(loss_p)
        sigma = jnp.sqrt(fixed_sum((loss_p - mu) ** 2) / _pin(jnp.float32(q - 1)))
        valid = jnp.all(jnp.isfinite(loss_p) & jnp.isfinite(g)) & jnp.isfinite(loss_0)
        coef = jnp.where(sigma > 0, g / (q * jnp.where(sigma > 0, sigma, 1.0)), 0.0)
    else:
        # 2 eps pinned too: divided by a constant, XLA multiplies by its rounded reciprocal, an
        # ulp away from the quotient a user computes from the logged losses
        g = _pin((loss_p - loss_m) / _pin(jnp.float32(2.0 * spec.eps)))
        valid = jnp.all(jnp.isfinite(loss_p) & jnp.isfinite(loss_m) & jnp.isfinite(g))
        coef = g / q
        if spec.estimator.unperturbed:
            valid = valid & jnp.isfinite(loss_0)
    curv = None
    if spec.estimator.curvature:
        # HiZOO's curvature of each direction, |L^+ + L^- - 2 L_0| / (2 eps^2)
        curv = _pin(jnp.abs(loss_p + loss_m - 2.0 * loss_0)
                    / _pin(jnp.float32(2.0 * spec.eps * spec.eps)))
        valid = valid & jnp.all(jnp.isfinite(curv))
    if spec.clip_norm is not None:
        # ||sum_j c_j z_j||^2 = c^T G c with G the Gram matrix accumulated over all parts.
        norm = jnp.sqrt(jnp.maximum(fixed_sum(coef[:, None] * gram_acc * coef[None, :]), 0.0))
        coef = coef * jnp.where(norm > spec.clip_norm, spec.clip_norm / norm, 1.0)
    coef = jnp.where(valid, coef, 0.0)
    if curv is not None:
        curv = jnp.where(valid, curv, 0.0)
    skipped = jnp.logical_not(valid).astype(jnp.int32)
    skipped_total = skipped_total + skipped
    metrics = {
        "loss": loss_0 if spec.estimator.unperturbed else fixed_mean((loss_p + loss_m) / 2.0),
        "loss_plus": fixed_mean(loss_p),
        "projected_grad": g[0] if spec.num_directions == 1 else g,
        "skipped": skipped,
        "skipped_total": skipped_total,
    }
    if spec.estimator.one_sided:
        metrics["loss_spread"] = sigma
    else:
        metrics["loss_minus"] = fixed_mean(loss_m)
    if curv is not None:
        metrics["curvature"] = fixed_mean(curv)
    if spec.clip_norm is not None:
        metrics["grad_norm"] = norm
    return (Pending(key, coef, valid, curv), count + pend.valid.astype(jnp.int32), skipped_total,
            metrics)


# ---- evaluation (no perturbation) ---------------------------------------------------------------

def eval_embed(spec: Spec, stored, batch):
    stored, batch = _pin((stored, batch))
    w = jax.tree.map(lambda t: t.astype(spec.compute_dtype), spec.outer_storage.decode(stored))
    return _pin((spec.model.embed(w, batch), spec.model.context(batch)))


def eval_block(spec: Spec, stored, h, ctx):
    stored, h, ctx = _pin((stored, h, ctx))
    return _pin(spec.model.block(compute_weights(spec, spec.storage, stored), h, ctx))


def eval_head(spec: Spec, stored, h, batch):
    """(per-example loss [B] float32, logits)."""
    stored, h, batch = _pin((stored, h, batch))
    w = jax.tree.map(lambda t: t.astype(spec.compute_dtype), spec.outer_storage.decode(stored))
    loss_b, logits = spec.model.head(w, h, batch)
    return loss_b.astype(jnp.float32), logits
