"""ZO2 (offloaded, Python-driven pipeline) must give bit-identical results to MeZO (one jit).

Same keys, storage and compute dtype => identical per-step losses and projected gradients, and
identical parameters and optimiser states after flush(), for N = 1, 2 and 5 steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _toy import MODEL, PARAMS, counting_batch, shared_sgd
from zo2_jax.offload import Storage, ZO2Engine
from zo2_jax.zo import MeZOEngine, mezo_sgd
from zo2_jax.core.noise import OUTER_PART, part_noise

SR_BF16 = Storage("bfloat16", rounding="stochastic")

CONFIGS = {
    # name: (engine kwargs shared by both engines, ZO2-only kwargs)
    "mezo_sgd-fp32-q1-streamed-W2-G1": (dict(tx=shared_sgd()),
                                        dict(resident_blocks=0, max_inflight=2,
                                             blocks_per_call=1)),
    # one transfer per array, the toy's 3 blocks in one call
    "mezo_sgd-fp32-q1-streamed-W2-unpacked-G3": (dict(tx=shared_sgd()),
                                                 dict(resident_blocks=0, max_inflight=2,
                                                      packed=False, blocks_per_call=3)),
    # W = 4: the host never waits on the two units dispatched last (hold = 2)
    "mezo_sgd-fp32-q1-streamed-W4-G1": (dict(tx=shared_sgd()),
                                        dict(resident_blocks=0, max_inflight=4,
                                             blocks_per_call=1)),
    # units of 2 and 1 blocks (two compiled sizes), packed blocks and optimiser states
    "momentum-bf16sr-q1-W2-G2": (dict(tx=optax.sgd(1e-3, momentum=0.9), storage=SR_BF16),
                                 dict(max_inflight=2, blocks_per_call=2)),
    # branches="sequential": one branch after the other in the block function (MeZO: fused)
    "mezo_sgd-schedule-bf16sr-q2-clip-resident1-W1-sequential": (
        dict(tx=mezo_sgd(optax.linear_schedule(3e-3, 1e-3, 4), weight_decay=0.05),
             storage=SR_BF16, num_directions=2, clip_norm=5.0),
        dict(resident_blocks=1, max_inflight=1, branches="sequential")),
    "momentum-int8sr-q2-resident{0,2}-W3-sequential": (
        dict(tx=optax.sgd(1e-3, momentum=0.9), num_directions=2,
             storage=Storage("int8", rounding="stochastic")),
        dict(resident_blocks={0, 2}, max_inflight=3, branches="sequential")),
    "chain-adam-schedule-bf16sr-bf16compute-clip-sequential": (
        dict(tx=optax.chain(
            optax.add_decayed_weights(1e-2, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)),
            optax.inject_hyperparams(optax.adam)(
                learning_rate=optax.cosine_decay_schedule(1e-3, 5))),
            storage=SR_BF16, compute_dtype=jnp.bfloat16, clip_norm=5.0),
         dict(resident_blocks=1, branches="sequential")),
}


def _bits(tree):
    return [np.atleast_1d(np.asarray(x)).view(np.uint8) for x in jax.tree.leaves(tree)]


def assert_trees_identical(a, b, what):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb), what
    for i, (x, y) in enumerate(zip(_bits(a), _bits(b))):
        assert x.shape == y.shape and np.array_equal(x, y), (
            f"{what}: leaf {i} differs in {np.mean(x != y):.3f} of its bytes")


def comparable_state(engine):
    s = engine.state()
    blocks, opts = s["blocks"], s["opt_blocks"]
    if isinstance(engine, MeZOEngine):  # stacked -> list, as ZO2 keeps them
        blocks = [jax.tree.map(lambda x: x[i], blocks) for i in range(engine.num_blocks)]
        opts = [jax.tree.map(lambda x: x[i], opts) for i in range(engine.num_blocks)]
    return {"outer": s["outer"], "blocks": blocks, "opt_outer": s["opt_outer"],
            "opt_blocks": opts, "count": s["count"], "pending": s["pending"]}


def check_grad_norm(engine, metrics, key):
    """clip_norm's norm, from the Gram matrix of the directions accumulated part by part, equals
    the norm of the materialised estimate (1/q) sum_j g_j z_j over every part."""
    q = engine.spec.num_directions
    g = np.atleast_1d(np.asarray(metrics["projected_grad"], np.float64))
    parts_ = [(OUTER_PART, PARAMS["outer"])] + list(enumerate(PARAMS["blocks"]))
    sq = 0.0
    for pid, tree in parts_:
        est = sum(g[j] / q * np.concatenate([np.ravel(z) for z in jax.tree.leaves(
            part_noise(key, j, pid, tree))]).astype(np.float64) for j in range(q))
        sq += float(np.sum(est ** 2))
    np.testing.assert_allclose(float(metrics["grad_norm"]), np.sqrt(sq), rtol=1e-4)
    assert float(metrics["grad_norm"]) > engine.spec.clip_norm  # the clip is exercised


# The three slowest on a 2-core CPU (about 30 s each) run with the slow tests.
SLOW_CONFIGS = {"momentum-bf16sr-q1-W2-G2", "mezo_sgd-schedule-bf16sr-q2-clip-resident1-W1-sequential",
                "momentum-int8sr-q2-resident{0,2}-W3-sequential"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CONFIGS
                                  else n for n in CONFIGS])
def test_zo2_matches_mezo_bit_for_bit(name):
    shared, zo2_only = CONFIGS[name]
    mezo = MeZOEngine(MODEL, PARAMS, **shared)
    zo2 = ZO2Engine(MODEL, PARAMS, **shared, **zo2_only)
    for t in range(5):
        batch, key = counting_batch(jax.random.key(t)), jax.random.key(100 + t)
        m1, m2 = mezo.step(batch, key), zo2.step(batch, key)
        for k in m1:
            assert np.array_equal(np.asarray(m1[k]), np.asarray(m2[k])), (name, t, k, m1[k], m2[k])
        if "grad_norm" in m1 and t == 0:
            check_grad_norm(mezo, m1, key)
        if t + 1 in (1, 2, 5):
            p1, p2 = mezo.params(), zo2.params()
            assert_trees_identical(p1, p2, f"{name}: params after {t + 1} steps")
            assert_trees_identical(comparable_state(mezo), comparable_state(zo2),
                                   f"{name}: stored params and optimiser states after {t + 1}")
    assert int(mezo.state()["count"]) == 5  # every update was applied (flushed)


def test_directions_validated():
    with pytest.raises(ValueError, match="directions must be one of"):
        ZO2Engine(MODEL, PARAMS, directions="normal")


@pytest.mark.slow
def test_rademacher_zo2_matches_mezo_and_state_records_it():
    kw = dict(tx=shared_sgd(), directions="rademacher",
              storage=Storage("bfloat16", rounding="stochastic"))
    mezo, zo2 = MeZOEngine(MODEL, PARAMS, **kw), ZO2Engine(MODEL, PARAMS, max_inflight=2,
                                                                branches="sequential", **kw)
    gauss = MeZOEngine(MODEL, PARAMS, tx=shared_sgd(), storage=kw["storage"])
    for t in range(3):
        batch, key = counting_batch(jax.random.key(t)), jax.random.key(100 + t)
        m1, m2, m3 = mezo.step(batch, key), zo2.step(batch, key), gauss.step(batch, key)
        assert np.array_equal(np.asarray(m1["loss"]), np.asarray(m2["loss"]))
    assert not np.array_equal(np.asarray(m1["loss"]), np.asarray(m3["loss"]))
    assert_trees_identical(mezo.params(), zo2.params(), "rademacher")
    with pytest.raises(ValueError, match="directions"):
        gauss.restore(mezo.state())  # a trajectory must not switch its noise silently


def test_flush_midway_changes_nothing():
    """flush() only applies the pending update early: the trajectory is bit-identical."""
    kw = dict(tx=shared_sgd())  # the spec of the first config: its compiled code is reused
    a, b, c = MeZOEngine(MODEL, PARAMS, **kw), ZO2Engine(MODEL, PARAMS, **kw), ZO2Engine(
        MODEL, PARAMS, **kw)
    for t in range(3):
        batch, key = counting_batch(jax.random.key(t)), jax.random.key(100 + t)
        for e in (a, b, c):
            e.step(batch, key)
        b.flush()
        c.eval_loss(batch)  # flushes too, then streams read-only
    assert_trees_identical(a.params(), b.params(), "flushed every step vs once")
    assert_trees_identical(a.params(), c.params(), "evaluated every step vs never")


@pytest.mark.slow
def test_real_llama_model_bit_for_bit():
    """The same claim on a tiny real LLaMA-shaped model from zo2_jax.models (rotary positions,
    RMSNorm, gated MLP, grouped-query attention, tied embeddings), two steps, one resident block."""
    zm = pytest.importorskip("zo2_jax.models")
    cfg = zm.DecoderConfig(
        model_type="llama", vocab_size=64, hidden_size=16, num_layers=3, num_heads=2,
        num_kv_heads=1, intermediate_size=32, max_positions=16, norm="rmsnorm", positions="rope",
        activation="silu", gated_mlp=True, qkv_bias=False, out_bias=False, mlp_bias=False,
        norm_bias=False, tie_embeddings=True)
    model = zm.Model(cfg)
    params = model.init(jax.random.key(0))
    kw = dict(tx=mezo_sgd(1e-3, weight_decay=0.1))
    mezo, zo2 = MeZOEngine(model, params, **kw), ZO2Engine(model, params, resident_blocks=1, **kw)
    for t in range(2):
        batch = counting_batch(jax.random.key(t), vocab=64)
        del batch["poison"]
        batch["attention_mask"] = batch["attention_mask"].at[0, :2].set(0)  # left padding
        m1, m2 = mezo.step(batch, jax.random.key(t)), zo2.step(batch, jax.random.key(t))
        assert np.isfinite(float(m1["loss"]))
        assert np.array_equal(np.asarray(m1["loss"]), np.asarray(m2["loss"]))
        assert np.array_equal(np.asarray(m1["projected_grad"]), np.asarray(m2["projected_grad"]))
    assert_trees_identical(mezo.params(), zo2.params(), "LLaMA params after 2 steps")


@pytest.mark.slow
@pytest.mark.parametrize("group", [1, 2])
def test_deep_stream_defaults_match_mezo_with_evals_between_steps(group):
    """A deeper toy (8 blocks) streams enough units for the defaults' W = 4 with hold = 2 and
    for uploads that run on into the next pass (and, at G=2, 4 units of 2): steps with eval
    passes in between (read passes consume uploads made for an update pass, and upload into
    the next), then flush, stay bit-identical to MeZO."""
    from _toy import ToyModel

    deep = ToyModel(num_blocks=8)
    params = deep.init(jax.random.key(3))
    kw = dict(tx=optax.sgd(1e-3, momentum=0.9), storage=SR_BF16)
    mezo = MeZOEngine(deep, params, **kw)
    zo2 = ZO2Engine(deep, params, blocks_per_call=group, **kw)
    assert zo2.max_inflight == 4 and zo2._stream.hold == 2
    assert len(zo2._stream.streamed) == 8 // group
    for t in range(4):
        batch, key = counting_batch(jax.random.key(t)), jax.random.key(100 + t)
        m1, m2 = mezo.step(batch, key), zo2.step(batch, key)
        assert np.array_equal(np.asarray(m1["loss"]), np.asarray(m2["loss"])), t
        if t % 2:
            e1, e2 = mezo.eval_loss(batch), zo2.eval_loss(batch)
            assert np.array_equal(np.asarray(e1), np.asarray(e2)), t
    assert_trees_identical(mezo.params(), zo2.params(), f"deep toy, G={group}")
    assert_trees_identical(comparable_state(mezo), comparable_state(zo2), f"deep G={group} state")
