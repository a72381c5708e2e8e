"""The estimators beyond MeZO's (`zo2_jax.core.estimators`): each against its paper's definition
and the exact directional derivative on the toy model, and ZO2 bit-identical to MeZO for each."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _toy import MODEL, PARAMS, counting_batch
from test_offload_exactness import assert_trees_identical, comparable_state
from zo2_jax import Estimator, ZOOptions
from zo2_jax.core.estimators import smallest_mask, smallest_threshold
from zo2_jax.core.noise import OUTER_PART, part_noise
from zo2_jax.offload import Storage, ZO2Engine
from zo2_jax.zo import MeZOEngine, mezo_sgd

EPS = 1e-3


def _np_mask(x, fraction):
    a = np.abs(np.asarray(x, np.float32)).ravel()
    k = min(a.size, max(1, math.ceil(fraction * a.size)))
    t = np.sort(a[~np.isnan(a)])[k - 1]
    return (np.abs(np.asarray(x, np.float32)) <= t) & ~np.isnan(np.asarray(x))


@pytest.mark.parametrize("fraction", [1e-6, 0.1, 0.25, 0.5, 0.999, 1.0])
def test_smallest_mask_is_an_exact_selection(fraction):
    rng = np.random.default_rng(0)
    f = jax.jit(smallest_mask, static_argnums=1)
    for x in (rng.normal(size=(37, 23)), np.round(rng.normal(size=(64, 8)), 1),  # ties
              rng.normal(size=(5, 7, 3)) * 1e-30, np.array([[0.0, -0.0, 3.0, -2.0]])):
        x = x.astype(np.float32)
        got = np.asarray(f(jnp.asarray(x), fraction))
        np.testing.assert_array_equal(got, _np_mask(x, fraction))
        k = min(x.size, max(1, math.ceil(fraction * x.size)))
        assert got.sum() >= k


def test_smallest_mask_by_magnitude_never_a_nan():
    x = jnp.asarray([[np.nan, 1.0, -0.5, 2.0], [-3.0, 0.25, np.inf, -np.inf]], jnp.float32)
    got = np.asarray(smallest_mask(x, 0.5))  # the 4 smallest magnitudes: 0.25, 0.5, 1, 2
    np.testing.assert_array_equal(got, [[False, True, True, True], [False, True, False, False]])
    assert not np.asarray(smallest_mask(x, 1.0))[0, 0]  # NaN: never, even with fraction 1


def _directions(key, j, params, fraction=None, kind="gaussian"):
    """d_j of the whole model: z_j per part, masked to the smallest `fraction` of each matrix
    (the numpy selection) when given."""
    def shape(z, theta):
        if fraction is None:
            return z
        return jax.tree.map(lambda z_, t: z_ * _np_mask(t, fraction) if t.ndim >= 2 else z_,
                            z, theta)
    return {"outer": shape(part_noise(key, j, OUTER_PART, params["outer"], kind),
                           params["outer"]),
            "blocks": [shape(part_noise(key, j, i, b, kind), b)
                       for i, b in enumerate(params["blocks"])]}


_loss = jax.jit(MODEL.loss)


def _shifted(params, d, s):
    return jax.tree.map(lambda p, z: p + s * EPS * z, params, d)


def _directional_derivative(params, d, batch):
    return float(jax.jvp(lambda p: MODEL.loss(p, batch), (params,), (d,))[1])


@pytest.fixture
def exact_matmuls():
    """float32 matrix products in full precision (a GPU's default, TF32, moves a loss by about
    1e-4 of itself, which (L^+ - L_0) / eps magnifies a thousandfold)."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.usefixtures("exact_matmuls")
def test_fzoo_step_is_the_papers_update():
    """FZOO: L_0 at theta, L_j^+ at theta + eps u_j; g_j = (L_j^+ - L_0) / eps (the directional
    derivative to first order); sigma the sample std of the L_j^+; theta' = theta - lr (1/q)
    sum_j g_j / sigma u_j."""
    q, lr = 4, 1e-2
    engine = MeZOEngine(MODEL, PARAMS, mezo_sgd(lr), eps=EPS, num_directions=q,
                        directions="rademacher", estimator="fzoo")
    batch, key = counting_batch(jax.random.key(0)), jax.random.key(7)
    m = engine.step(batch, key)
    d = [_directions(key, j, PARAMS, kind="rademacher") for j in range(q)]
    for z in d:
        assert all(set(np.unique(np.asarray(x))) <= {-1.0, 1.0} for x in jax.tree.leaves(z))
    l0 = float(_loss(PARAMS, batch))
    lp = np.array([float(_loss(_shifted(PARAMS, z, 1.0), batch)) for z in d])
    np.testing.assert_allclose(float(m["loss"]), l0, rtol=1e-6)
    np.testing.assert_allclose(float(m["loss_plus"]), lp.mean(), rtol=1e-6)
    g = np.asarray(m["projected_grad"], np.float64)
    # float32 losses near 3.4, differences of about 1e-3: g is known to about 1e-3
    np.testing.assert_allclose(g, (lp - l0) / EPS, atol=2e-3)
    exact = np.array([_directional_derivative(PARAMS, z, batch) for z in d])
    np.testing.assert_allclose(g, exact, rtol=0.05, atol=0.02)
    sigma = float(m["loss_spread"])
    np.testing.assert_allclose(sigma, np.std(lp, ddof=1), rtol=2e-2)
    coef = np.asarray(engine.state()["pending"]["coef"])
    np.testing.assert_allclose(coef, g / (q * sigma), rtol=1e-6)
    engine.flush()
    want = jax.tree.map(lambda p, *zs: p - lr * sum(c * z for c, z in zip(coef, zs)),
                        PARAMS, *d)
    for a, b in zip(jax.tree.leaves(engine.params()), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_fzoo_applies_nothing_when_the_perturbed_losses_are_equal():
    """sigma = 0 (here: eps so small that every perturbed loss rounds to L_0) gives a step of
    zero, not a division by zero."""
    engine = MeZOEngine(MODEL, PARAMS, mezo_sgd(1.0), eps=1e-30, num_directions=2,
                        estimator="fzoo")
    m = engine.step(counting_batch(jax.random.key(0)), jax.random.key(1))
    assert float(m["loss_spread"]) == 0.0 and int(m["skipped"]) == 0
    np.testing.assert_array_equal(np.asarray(engine.state()["pending"]["coef"]), 0.0)
    engine.flush()
    assert_trees_identical(engine.params(), PARAMS, "a zero step")


@pytest.mark.usefixtures("exact_matmuls")
def test_sparse_step_perturbs_and_updates_only_the_smallest_entries():
    """Sparse-MeZO: each matrix perturbed and updated only on its `fraction` smallest
    magnitudes (mask from the values the step perturbed); vectors dense; MeZO's two-sided g."""
    q, lr, fraction = 2, 1e-2, 0.3
    engine = MeZOEngine(MODEL, PARAMS, mezo_sgd(lr), eps=EPS, num_directions=q,
                        estimator=Estimator("sparse", fraction=fraction))
    batch, key = counting_batch(jax.random.key(0)), jax.random.key(3)
    m = engine.step(batch, key)
    d = [_directions(key, j, PARAMS, fraction) for j in range(q)]
    lp = np.array([float(_loss(_shifted(PARAMS, z, 1.0), batch)) for z in d])
    lm = np.array([float(_loss(_shifted(PARAMS, z, -1.0), batch)) for z in d])
    np.testing.assert_allclose(float(m["loss_plus"]), lp.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(m["loss_minus"]), lm.mean(), rtol=1e-6)
    g = np.asarray(m["projected_grad"], np.float64)
    exact = np.array([_directional_derivative(PARAMS, z, batch) for z in d])
    np.testing.assert_allclose(g, exact, rtol=0.02, atol=0.01)
    coef = np.asarray(engine.state()["pending"]["coef"])
    engine.flush()
    new = engine.params()
    want = jax.tree.map(lambda p, *zs: p - lr * sum(c * z for c, z in zip(coef, zs)),
                        PARAMS, *d)
    for a, b, p in zip(jax.tree.leaves(new), jax.tree.leaves(want), jax.tree.leaves(PARAMS)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        if p.ndim >= 2:  # outside the mask: untouched, bit for bit
            keep = ~_np_mask(p, fraction)
            np.testing.assert_array_equal(np.asarray(a)[keep], np.asarray(p)[keep])
            assert np.sum(np.asarray(a) != np.asarray(p)) <= math.ceil(fraction * p.size)
        else:
            assert np.all(np.asarray(a) != np.asarray(p))  # dense


def _state_tree(engine, key):
    s = engine.state()
    blocks = [jax.tree.map(lambda x: np.asarray(x[i]), s["opt_blocks"][key])
              for i in range(engine.num_blocks)]
    return {"outer": jax.tree.map(np.asarray, s["opt_outer"][key]), "blocks": blocks}


def test_sparse_thresholds_are_chosen_once_and_masks_follow_the_values():
    """Sparse-MeZO's threshold h of each matrix: the exact fraction-th smallest magnitude of the
    values at the start, kept in the optimiser state and unchanged by steps; each step perturbs
    and updates exactly the entries with |theta| <= h of the values it starts from."""
    fraction = 0.3
    engine = MeZOEngine(MODEL, PARAMS, optax.sgd(1e-2), eps=EPS,
                        estimator=Estimator("sparse", fraction=fraction))
    h0 = _state_tree(engine, "threshold")
    for p, h in zip(jax.tree.leaves(PARAMS), jax.tree.leaves(h0)):
        if p.ndim >= 2:
            assert h.shape == () and h == smallest_threshold(p, fraction)
            assert np.sum(np.abs(np.asarray(p)) <= np.asarray(h)) == math.ceil(fraction * p.size)
        else:
            assert h == np.inf
    before = PARAMS
    for t in range(3):  # a large lr: the values move, and the masks with them
        engine.step(counting_batch(jax.random.key(t)), jax.random.key(10 + t))
        engine.flush()
        after = jax.tree.map(np.asarray, engine.params())
        for p, a, h in zip(jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(h0)):
            moved = np.asarray(a) != np.asarray(p)
            if p.ndim >= 2:
                assert moved.any() and not (moved & (np.abs(np.asarray(p)) > h)).any()
        before = after
    assert_trees_identical(_state_tree(engine, "threshold"), h0, "thresholds")
    sel = [np.sum(np.abs(np.asarray(p)) <= h) for p, h in
           zip(jax.tree.leaves(before), jax.tree.leaves(h0)) if p.ndim >= 2]
    exact = [math.ceil(fraction * p.size) for p in jax.tree.leaves(before) if p.ndim >= 2]
    assert sel != exact  # the selected share drifted from `fraction` as the values moved


def _run_pair(kw, zo2_kw, steps=3):
    mezo, zo2 = MeZOEngine(MODEL, PARAMS, **kw), ZO2Engine(MODEL, PARAMS, **zo2_kw, **kw)
    for t in range(steps):
        batch, key = counting_batch(jax.random.key(t)), jax.random.key(50 + t)
        m1, m2 = mezo.step(batch, key), zo2.step(batch, key)
        assert set(m1) == set(m2)
        for k in m1:
            assert np.array_equal(np.asarray(m1[k]), np.asarray(m2[k])), (t, k, m1[k], m2[k])
    assert_trees_identical(comparable_state(mezo), comparable_state(zo2), "state")
    assert_trees_identical(mezo.params(), zo2.params(), "params")
    return mezo, zo2


SR_BF16 = Storage("bfloat16", rounding="stochastic")
PAIRS = {
    "fzoo-q3-rademacher-bf16sr-streamed": (
        dict(tx=mezo_sgd(1e-3), num_directions=3, directions="rademacher", estimator="fzoo",
             storage=SR_BF16), dict(resident_blocks=0, max_inflight=2, blocks_per_call=1)),
    "sparse-q2-momentum-sequential": (
        dict(tx=optax.sgd(1e-3, momentum=0.9), num_directions=2,
             estimator=Estimator("sparse", fraction=0.3)),
        dict(resident_blocks=1, branches="sequential")),
    "fzoo-q2-clip-int8sr-sequential": (
        dict(tx=mezo_sgd(1e-3), num_directions=2, estimator="fzoo", clip_norm=0.5,
             storage=Storage("int8", rounding="stochastic")),
        dict(resident_blocks=0, max_inflight=3, branches="sequential", blocks_per_call=2)),
    "sparse-q1-adam-bf16-compute-clip": (
        dict(tx=optax.adam(1e-3), estimator=Estimator("sparse", fraction=0.1), clip_norm=0.5,
             storage=SR_BF16, compute_dtype=jnp.bfloat16), dict(resident_blocks=0)),
}
PAIRS.update({
    "hizoo-q2-fused-sgd-streamed": (
        dict(tx=mezo_sgd(1e-3), num_directions=2, estimator=Estimator("hizoo", smooth=0.05)),
        dict(resident_blocks=0, max_inflight=2)),
    "hizoo-q1-momentum-bf16sr-sequential-G2": (
        dict(tx=optax.sgd(1e-3, momentum=0.9), estimator=Estimator("hizoo", smooth=0.05),
             storage=SR_BF16), dict(resident_blocks=1, branches="sequential",
                                    blocks_per_call=2)),
})
# The default run keeps FZOO's pair; the rest (each estimator at least once) run with the slow
# tests, as do the mesh and resume cases of every estimator.
SLOW_PAIRS = {"fzoo-q2-clip-int8sr-sequential", "sparse-q1-adam-bf16-compute-clip",
              "hizoo-q1-momentum-bf16sr-sequential-G2", "sparse-q2-momentum-sequential",
              "hizoo-q2-fused-sgd-streamed"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_PAIRS
                                  else n for n in PAIRS])
def test_zo2_matches_mezo_bit_for_bit(name):
    kw, zo2_kw = PAIRS[name]
    _run_pair(kw, zo2_kw)


def test_bad_estimator_options():
    with pytest.raises(ValueError, match="estimator must be one of"):
        MeZOEngine(MODEL, PARAMS, estimator="adam")
    with pytest.raises(ValueError, match="num_directions >= 2"):
        ZO2Engine(MODEL, PARAMS, estimator="fzoo")
    for bad in (0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 1\]"):
            Estimator("sparse", fraction=bad)
    with pytest.raises(TypeError, match="estimator must be a name"):
        MeZOEngine(MODEL, PARAMS, estimator=3)
    with pytest.raises(ValueError, match="num_directions >= 2"):
        ZOOptions(estimator="fzoo")
    with pytest.raises(ValueError, match="sparse_fraction"):
        ZOOptions(sparse_fraction=-1)
    assert ZOOptions(estimator="sparse", sparse_fraction=0.5).engine_kwargs()["estimator"] == \
        Estimator("sparse", 0.5)
    assert ZOOptions(estimator="hizoo", hessian_smooth=1e-6).engine_kwargs()["estimator"] == \
        Estimator("hizoo", smooth=1e-6)
    with pytest.raises(ValueError, match="smooth"):
        ZOOptions(estimator="hizoo", hessian_smooth=1.0)


def test_a_state_does_not_switch_estimator():
    a = MeZOEngine(MODEL, PARAMS, num_directions=2)
    b = MeZOEngine(MODEL, PARAMS, num_directions=2, estimator="fzoo")
    c = MeZOEngine(MODEL, PARAMS, num_directions=2, estimator=Estimator("sparse", 0.5))
    with pytest.raises(ValueError, match="estimator"):
        b.restore(a.state())
    with pytest.raises(ValueError, match="estimator"):
        c.restore(MeZOEngine(MODEL, PARAMS, num_directions=2,
                             estimator=Estimator("sparse", 0.25)).state())


# ---- HiZOO ----------------------------------------------------------------------------------------

def _whole(key, j, params, kind="gaussian"):
    return {"outer": part_noise(key, j, OUTER_PART, params["outer"], kind),
            "blocks": [part_noise(key, j, i, b, kind) for i, b in enumerate(params["blocks"])]}


def _hessian(engine):
    s = engine.state()
    blocks = [jax.tree.map(lambda x: x[i], s["opt_blocks"]["hessian"])
              for i in range(engine.num_blocks)]
    return {"outer": s["opt_outer"]["hessian"], "blocks": blocks}


@pytest.mark.usefixtures("exact_matmuls")
def test_hizoo_steps_are_the_reference_implementation():
    """HiZOO (the authors' trainer.py, q directions averaged): L_0 at theta, L_j^+- at
    theta +- eps z_j / sqrt(H); c_j = |L_j^+ + L_j^- - 2 L_0| / (2 eps^2);
    H' = (1 - a) H + (a / q) sum_j c_j H z_j^2; theta' = theta - lr (1/q) sum_j g_j z_j / sqrt(H').
    Two steps: the second perturbs along z / sqrt(H') with the H the first one made."""
    q, lr, a, eps = 2, 1e-2, 0.05, 1e-2  # a large eps: second differences well above rounding
    engine = MeZOEngine(MODEL, PARAMS, mezo_sgd(lr), eps=eps, num_directions=q,
                        estimator=Estimator("hizoo", smooth=a))
    theta, hess = PARAMS, jax.tree.map(jnp.ones_like, PARAMS)
    for t in range(2):
        batch, key = counting_batch(jax.random.key(t)), jax.random.key(20 + t)
        m = engine.step(batch, key)
        zs = [_whole(key, j, theta) for j in range(q)]
        ds = [jax.tree.map(lambda z, h: z / np.sqrt(h), z, hess) for z in zs]
        shift = lambda d, s: jax.tree.map(lambda p, d_: p + s * eps * d_, theta, d)  # noqa
        l0 = float(_loss(theta, batch))
        lp = np.array([float(_loss(shift(d, 1.0), batch)) for d in ds])
        lm = np.array([float(_loss(shift(d, -1.0), batch)) for d in ds])
        np.testing.assert_allclose(float(m["loss"]), l0, rtol=1e-6)
        np.testing.assert_allclose(float(m["loss_plus"]), lp.mean(), rtol=1e-6)
        np.testing.assert_allclose(float(m["loss_minus"]), lm.mean(), rtol=1e-6)
        pend = engine.state()["pending"]
        # a second difference of float32 losses near 3.4: known to about 1e-6 / (2 eps^2)
        curv = np.abs(lp + lm - 2 * l0) / (2 * eps * eps)
        np.testing.assert_allclose(np.asarray(pend["curv"]), curv, rtol=1e-3, atol=0.03)
        np.testing.assert_allclose(float(m["curvature"]), curv.mean(), rtol=1e-3, atol=0.03)
        g = np.asarray(m["projected_grad"], np.float64)
        np.testing.assert_allclose(g, (lp - lm) / (2 * eps), rtol=1e-4, atol=1e-4)
        coef, c = np.asarray(pend["coef"]), np.asarray(pend["curv"])
        engine.flush()
        hess = jax.tree.map(lambda h, *z: (1 - a) * h + (a / q) * sum(
            cj * h * zj * zj for cj, zj in zip(c, z)), hess, *zs)
        theta = jax.tree.map(lambda p, h, *z: p - lr * sum(
            cf * zj / np.sqrt(h) for cf, zj in zip(coef, z)), theta, hess, *zs)
        for x, y in zip(jax.tree.leaves(_hessian(engine)), jax.tree.leaves(hess)):
            np.testing.assert_allclose(x, y, rtol=1e-6)
        assert any(np.max(np.abs(np.asarray(h) - 1)) > 1e-3 for h in jax.tree.leaves(hess))
        for x, y in zip(jax.tree.leaves(engine.params()), jax.tree.leaves(theta)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_hizoo_with_no_smoothing_keeps_h_at_one():
    """smooth 0 (the reference's default schedule, constant0): H stays 1, so the step is
    MeZO's (plus the unperturbed pass; another program, so equal up to float rounding)."""
    kw = dict(tx=mezo_sgd(1e-2), num_directions=2)
    h = MeZOEngine(MODEL, PARAMS, estimator=Estimator("hizoo", smooth=0.0), **kw)
    m = MeZOEngine(MODEL, PARAMS, **kw)
    batch, key = counting_batch(jax.random.key(0)), jax.random.key(1)
    for t in range(2):
        a, b = h.step(batch, jax.random.fold_in(key, t)), m.step(batch, jax.random.fold_in(key, t))
        np.testing.assert_allclose(np.asarray(a["projected_grad"]),
                                   np.asarray(b["projected_grad"]), rtol=1e-3, atol=1e-3)
    assert all(np.all(np.asarray(x) == 1.0) for x in jax.tree.leaves(_hessian(h)))
    for x, y in zip(jax.tree.leaves(h.params()), jax.tree.leaves(m.params())):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=3e-5)


def test_hizoo_refuses_clip_norm_and_bad_smooth():
    with pytest.raises(ValueError, match="clip_norm is not available with the hizoo"):
        MeZOEngine(MODEL, PARAMS, estimator="hizoo", clip_norm=1.0)
    for bad in (1.0, -0.1, float("inf")):
        with pytest.raises(ValueError, match=r"smooth \(alpha\) must be a number in \[0, 1\)"):
            Estimator("hizoo", smooth=bad)
