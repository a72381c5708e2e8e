"""Bad input gets a clear error; a non-finite loss skips its update and training goes on."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _toy import MODEL, PARAMS, counting_batch, shared_sgd
from test_offload_exactness import CONFIGS, assert_trees_identical
from zo2_jax.offload import Storage, ZO2Engine
from zo2_jax.zo import MeZOEngine, mezo_sgd

ENGINES = [MeZOEngine, ZO2Engine]


@pytest.mark.parametrize("engine_cls", ENGINES)
@pytest.mark.parametrize("eps", [0.0, -1e-3, float("nan"), float("inf")])
def test_bad_eps(engine_cls, eps):
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        engine_cls(MODEL, PARAMS, tx=shared_sgd(), eps=eps)


def test_bad_learning_rates_and_options():
    with pytest.raises(ValueError, match="learning_rate must be finite"):
        mezo_sgd(float("nan"))
    with pytest.raises(ValueError, match="weight_decay"):
        mezo_sgd(1e-3, weight_decay=-0.1)
    with pytest.raises(ValueError, match="learning rate must be finite.*step 0"):
        MeZOEngine(MODEL, PARAMS, tx=mezo_sgd(lambda count: jnp.inf * count + jnp.nan))
    with pytest.raises(ValueError, match="num_directions"):
        MeZOEngine(MODEL, PARAMS, tx=shared_sgd(), num_directions=0)
    with pytest.raises(ValueError, match="clip_norm"):
        MeZOEngine(MODEL, PARAMS, tx=shared_sgd(), clip_norm=-1.0)
    with pytest.raises(ValueError, match="compute_dtype"):
        MeZOEngine(MODEL, PARAMS, tx=shared_sgd(), compute_dtype=jnp.int8)
    with pytest.raises(ValueError, match="max_inflight"):
        ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), max_inflight=0)
    with pytest.raises(ValueError, match="resident_blocks=4 must be between 0 and .* 3"):
        ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), resident_blocks=4)
    with pytest.raises(ValueError, match=r"indices \[7\] outside 0..2"):
        ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), resident_blocks={0, 7})
    with pytest.raises(ValueError, match="needs batch_shape"):
        ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), device_budget_bytes=10**9)


@pytest.mark.parametrize("tx", [
    optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
    optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=1.0),
    optax.chain(optax.add_decayed_weights(1e-4), optax.chain(optax.clip_by_global_norm(1.0))),
], ids=["chain", "inject_hyperparams", "nested"])
def test_global_norm_clipping_inside_tx_is_refused(tx):
    with pytest.raises(ValueError, match="clip_by_global_norm.*clip_norm"):
        MeZOEngine(MODEL, PARAMS, tx=tx)


def test_malformed_params():
    blocks = PARAMS["blocks"]
    cases = [
        ({"outer": PARAMS["outer"]}, "must be a dict"),
        ({"outer": PARAMS["outer"], "blocks": blocks[:2]}, "has 2 blocks, the model expects 3"),
        ({"outer": PARAMS["outer"], "blocks": [blocks[0], {"w": blocks[1]["w"]}, blocks[2]]},
         "block 1 has tree structure"),
        ({"outer": PARAMS["outer"], "blocks": [blocks[0], blocks[1], {
            **blocks[2], "w": jnp.zeros((16, 8))}]},
         r"block 2 leaf \['w'\] is \(16, 8\) float32, block 0 has \(16, 16\) float32"),
        ({"outer": PARAMS["outer"], "blocks": [blocks[0], {
            **blocks[1], "b": blocks[1]["b"].astype(jnp.bfloat16)}, blocks[2]]},
         r"block 1 leaf \['b'\] is \(16,\) bfloat16, block 0 has \(16,\) float32"),
        ({"outer": {**PARAMS["outer"], "step": jnp.zeros((), jnp.int32)}, "blocks": blocks},
         r"outer leaf \['step'\] has dtype int32"),
    ]
    for params, msg in cases:
        for cls in ENGINES:
            with pytest.raises(ValueError, match=msg):
                cls(MODEL, params, tx=shared_sgd())


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_malformed_batches(engine_cls):
    engine = engine_cls(MODEL, PARAMS, tx=shared_sgd())
    good = counting_batch(jax.random.key(0))
    cases = [
        ({"attention_mask": good["attention_mask"]}, "must be a dict with 'input_ids'"),
        ({**good, "input_ids": good["input_ids"][None]}, r"must be \[batch, seq\]"),
        ({**good, "attention_mask": good["attention_mask"][:, :5]},
         r"batch\['attention_mask'\] has shape \(4, 5\), expected \(4, 8\)"),
        ({**good, "loss_mask": good["attention_mask"].astype(jnp.float32)},
         r"batch\['loss_mask'\] has dtype float32, expected integers"),
    ]
    for batch, msg in cases:
        with pytest.raises(ValueError, match=msg):
            engine.step(batch, jax.random.key(0))
        with pytest.raises(ValueError, match=msg):
            engine.eval_loss(batch)
    with pytest.raises(TypeError, match="expected a PRNG key"):
        engine.step(good, 3)
    engine.step(good, jax.random.key(0))  # refused before any change: the engine goes on


def test_restore_refuses_a_different_configuration():
    a = ZO2Engine(MODEL, PARAMS, tx=shared_sgd())
    b = ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), storage=Storage("bfloat16"))
    with pytest.raises(ValueError, match="state was saved with storage="):
        b.restore(a.state())
    state = a.state()
    state["opt_outer"], state["outer"] = state["opt_outer"], {"embed": state["outer"]["embed"]}
    with pytest.raises(ValueError, match=r"state\['outer'\] has structure"):
        a.restore(state)


@pytest.mark.parametrize("engine_cls,config", [
    (MeZOEngine, "mezo_sgd-fp32-q1-streamed-W2-G1"),
    # adam: its state must not advance
    (ZO2Engine, "chain-adam-schedule-bf16sr-bf16compute-clip-sequential"),
])
def test_non_finite_loss_skips_the_update_and_training_continues(engine_cls, config):
    shared, zo2_only = CONFIGS[config]
    kw = {**shared, **(zo2_only if engine_cls is ZO2Engine else {})}
    ref, eng = engine_cls(MODEL, PARAMS, **kw), engine_cls(MODEL, PARAMS, **kw)
    b0, b2 = counting_batch(jax.random.key(0)), counting_batch(jax.random.key(2))
    ref.step(b0, jax.random.key(0))
    ref.flush()

    m0 = eng.step(b0, jax.random.key(0))
    m1 = eng.step(counting_batch(jax.random.key(1), poison=True), jax.random.key(1))
    assert int(m0["skipped"]) == 0 and int(m1["skipped"]) == 1 and int(m1["skipped_total"]) == 1
    assert not np.isfinite(float(m1["loss"]))
    # the poisoned step applied step 0's update and queued nothing: flushing changes nothing
    eng.flush()
    assert_trees_identical(ref.state()["blocks"], eng.state()["blocks"], "after a skipped step")
    assert_trees_identical(ref.state()["opt_blocks"], eng.state()["opt_blocks"], "opt state")
    assert int(eng.state()["count"]) == 1
    before = eng.params()
    m2 = eng.step(b2, jax.random.key(2))
    m3 = eng.step(b2, jax.random.key(3))
    assert int(m2["skipped"]) == 0 and int(m3["skipped_total"]) == 1
    assert np.isfinite(float(m3["loss"]))
    after = eng.params()
    assert not np.array_equal(np.asarray(after["blocks"][0]["w"]),
                              np.asarray(before["blocks"][0]["w"]))
    assert int(eng.state()["count"]) == 3
