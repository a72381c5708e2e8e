"""The zeroth-order estimator: against jax.grad, its noise, its optax plumbing, the engine math."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _toy import MODEL, PARAMS, counting_batch, shared_sgd
from zo2_jax.zo import MeZOEngine, ZOGrad, apply_zo_grad, mezo_sgd, zo_value_and_grad
from zo2_jax.core.noise import OUTER_PART, part_noise

THETA = {"a": jnp.linspace(-1.0, 1.0, 12), "b": {"c": jnp.arange(9.0).reshape(3, 3) / 9.0}}
W = {"a": jnp.linspace(0.5, 2.0, 12), "b": {"c": jnp.full((3, 3), 1.5)}}


def quadratic(p, shift):
    return sum(jnp.sum(0.5 * w * (x - shift) ** 2) for w, x in
               zip(jax.tree.leaves(W), jax.tree.leaves(p)))


def cosine(a, b):
    a, b = jnp.concatenate([x.ravel() for x in a]), jnp.concatenate([x.ravel() for x in b])
    return float(jnp.vdot(a, b) / jnp.linalg.norm(a) / jnp.linalg.norm(b)), a, b


@pytest.mark.parametrize("q,samples", [(1, 4000), (4, 1000)])
def test_average_estimate_approaches_jax_grad(q, samples):
    """E[g z] = grad for Gaussian z; with d = 21 and n = q*samples directions the relative error
    of the mean is about sqrt((d + 1) / n) (0.074): require cosine > 0.98, error < 0.25."""
    vg = zo_value_and_grad(quadratic, eps=1e-3, num_directions=q)

    @jax.jit
    def mean_estimate(keys):
        est = jax.vmap(lambda k: vg(THETA, k, 0.3)[1].materialize(THETA))(keys)
        return jax.tree.map(lambda x: x.mean(0), est)

    est = mean_estimate(jax.random.split(jax.random.key(0), samples))
    grad = jax.grad(quadratic)(THETA, 0.3)
    cos, a, b = cosine(jax.tree.leaves(est), jax.tree.leaves(grad))
    assert cos > 0.98, cos
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 0.25


def test_projected_gradient_is_the_directional_derivative():
    """For a quadratic the central difference is exact: g = <grad, z> (up to float32)."""
    loss, zg = jax.jit(zo_value_and_grad(quadratic, eps=1e-2))(THETA, jax.random.key(5), 0.3)
    z = ZOGrad(jnp.ones(1), zg.key).materialize(THETA)
    grad = jax.grad(quadratic)(THETA, 0.3)
    want = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(z)))
    np.testing.assert_allclose(zg.g[0], want, rtol=2e-3)
    np.testing.assert_allclose(loss, quadratic(THETA, 0.3), rtol=1e-3)  # f + O(eps^2)


def test_noise_is_keyed_by_step_direction_part_and_leaf():
    tree = {"x": jnp.zeros((64,)), "y": jnp.zeros((64,))}
    k = jax.random.key(1)
    z = part_noise(k, 0, 3, tree)
    np.testing.assert_array_equal(z["x"], part_noise(k, 0, 3, tree)["x"])  # regenerated exactly
    others = [z["y"], part_noise(k, 1, 3, tree)["x"], part_noise(k, 0, 4, tree)["x"],
              part_noise(k, 0, OUTER_PART, tree)["x"],
              part_noise(jax.random.key(2), 0, 3, tree)["x"]]
    for o in others:
        assert abs(float(jnp.corrcoef(z["x"], o)[0, 1])) < 0.5
    big = part_noise(k, 0, 0, {"w": jnp.zeros((100_000,))})["w"]
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1.0) < 0.02
    # a leaf's z depends on its own path, not on which other leaves share the part
    np.testing.assert_array_equal(part_noise(k, 0, 3, {"x": tree["x"]})["x"], z["x"])


def test_rademacher_directions_are_fair_independent_signs():
    k = jax.random.key(3)
    z = part_noise(k, 0, 1, {"w": jnp.zeros((333, 301))}, "rademacher")["w"]  # not 32-aligned
    assert z.shape == (333, 301) and z.dtype == jnp.float32
    assert set(np.unique(np.asarray(z))) == {-1.0, 1.0}
    flat = np.asarray(z).ravel()
    assert abs(flat.mean()) < 0.01
    # neighbouring elements (bits of one word) and elements 32 apart are uncorrelated
    for lag in (1, 31, 32, 33):
        assert abs(np.corrcoef(flat[:-lag], flat[lag:])[0, 1]) < 0.02, lag
    np.testing.assert_array_equal(z, part_noise(k, 0, 1, {"w": jnp.zeros((333, 301))},
                                                "rademacher")["w"])
    with pytest.raises(ValueError, match="directions must be one of"):
        part_noise(k, 0, 1, {"w": jnp.zeros((3,))}, "uniform")


def test_apply_zo_grad_fused_and_optax_rules():
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones((4,))}
    grad = ZOGrad(jnp.array([2.0, -1.0]), jax.random.key(3))
    est = grad.materialize(params)
    # MeZO's rule: decay only where the mask (default: rank >= 2) says so
    tx = mezo_sgd(0.1, weight_decay=0.5)
    new, state = apply_zo_grad(tx, grad, tx.init(params), params)
    np.testing.assert_allclose(new["w"], 1.0 - 0.1 * (est["w"] + 0.5), rtol=1e-6)
    np.testing.assert_allclose(new["b"], 1.0 - 0.1 * est["b"], rtol=1e-6)
    assert int(state.count) == 1
    # the same transform through plain optax plumbing agrees
    upd, _ = tx.update(est, tx.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, upd)["w"], new["w"], rtol=1e-6)
    # any optax transform gets the materialised estimate
    sgd = optax.sgd(0.1)
    new2, _ = apply_zo_grad(sgd, grad, sgd.init(params), params)
    np.testing.assert_allclose(new2["w"], 1.0 - 0.1 * est["w"], rtol=1e-6)
    # a non-finite projected gradient is an exact identity, state included
    bad = ZOGrad(jnp.array([jnp.nan, 1.0]), grad.key)
    same, st = apply_zo_grad(tx, bad, state, params)
    np.testing.assert_array_equal(same["w"], params["w"])
    assert int(st.count) == 1


def test_mezo_sgd_schedule_and_mask():
    tx = mezo_sgd(optax.piecewise_constant_schedule(1.0, {1: 0.5}), weight_decay=0.1,
                  mask=lambda p: {"w": False, "b": True})
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    g = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    u1, state = tx.update(g, state, params)
    u2, state = tx.update(g, state, params)
    np.testing.assert_allclose(u1["w"], -1.0)      # lr 1, no decay on w (mask)
    np.testing.assert_allclose(u1["b"], -1.1)      # decay on b
    np.testing.assert_allclose(u2["w"], -0.5)      # the schedule moved on


def test_engine_step_matches_the_formula():
    """MeZOEngine: L+ is the loss at theta + eps z, L- at theta - eps z, with z_p from the step
    key for part p (outer: OUTER_PART, block i: i); after flush theta' = theta - lr (g z + wd m
    theta) with m = rank >= 2."""
    eps, lr, wd = 1e-3, 3e-3, 0.1
    engine = MeZOEngine(MODEL, PARAMS, tx=shared_sgd(), eps=eps)
    batch, key = counting_batch(jax.random.key(0)), jax.random.key(42)
    m = engine.step(batch, key)

    @jax.jit  # one compilation for the reference, not one per eager op
    def reference(params, key):
        z = {"outer": part_noise(key, 0, OUTER_PART, params["outer"]),
             "blocks": [part_noise(key, 0, i, b) for i, b in enumerate(params["blocks"])]}
        shifted = lambda s: jax.tree.map(lambda p, z_: p + s * eps * z_, params, z)  # noqa: E731
        return z, MODEL.loss(shifted(1.0), batch), MODEL.loss(shifted(-1.0), batch)

    z, loss_plus, loss_minus = reference(PARAMS, key)
    np.testing.assert_allclose(m["loss_plus"], loss_plus, rtol=1e-5)
    np.testing.assert_allclose(m["loss_minus"], loss_minus, rtol=1e-5)
    g = float(m["projected_grad"])
    # the logged g is exactly the float32 quotient of the logged losses, and the g the update
    # applies (the pending coefficient, q = 1)
    lp, lm = np.float32(m["loss_plus"]), np.float32(m["loss_minus"])
    assert np.float32(m["projected_grad"]) == (lp - lm) / np.float32(2 * eps)
    assert np.asarray(engine.state()["pending"]["coef"])[0] == np.float32(m["projected_grad"])
    want = jax.tree.map(lambda p, z_: p - lr * (g * z_ + (wd * p if p.ndim >= 2 else 0.0)),
                        PARAMS, z)
    for a, b in zip(jax.tree.leaves(engine.params()), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
