"""Mesh tests, run by test_mesh.py in a process with 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8; the CPU backend has pinned_host memory).

Direction-parallel meshes must give bit-identical results to one device for the same keys;
data-parallel ones agree to within the bound stated in `zo2_jax.core.spmd`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _toy import MODEL, PARAMS, counting_batch, shared_sgd
from zo2_jax import Estimator
from zo2_jax.core import spmd, trees
from zo2_jax.offload import Storage, ZO2Engine
from zo2_jax.train.checkpoint import Checkpointer
from zo2_jax.zo import MeZOEngine, mezo_sgd

if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices: run through test_mesh.py", allow_module_level=True)

SR_BF16 = Storage("bfloat16", rounding="stochastic")
STEPS = 3


def _run(cls, mesh, kw, steps=STEPS, batch_size=4, **extra):
    e = cls(MODEL, PARAMS, mesh=mesh, **kw, **extra)
    metrics = []
    for t in range(steps):
        m = e.step(counting_batch(jax.random.key(100 + t), batch_size=batch_size),
                   jax.random.key(t))
        metrics.append({k: np.asarray(v) for k, v in m.items()})
    return e, metrics


def _state_leaves(e):
    e.flush()
    s = e.state()
    blocks, opts = s["blocks"], s["opt_blocks"]
    if trees.is_stacked(blocks):
        blocks, opts = trees.unstack(blocks, e.num_blocks), trees.unstack(opts, e.num_blocks)
    return [np.asarray(x) for x in jax.tree.leaves((s["outer"], s["opt_outer"], blocks, opts,
                                                     s["count"]))]


def _identical(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        assert np.array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8)), (
            f"leaf {i} differs: max |d| = {np.max(np.abs(x.astype(np.float64) - y)):.3g}")


CASES = {
    # name: (engine kwargs, ZO2-only kwargs, devices)
    "sgd-fp32-q4": (dict(tx=shared_sgd(), num_directions=4), dict(max_inflight=2), 4),
    "momentum-bf16sr-q8-G2": (dict(tx=optax.sgd(1e-3, momentum=0.9), num_directions=8,
                                   storage=SR_BF16), dict(blocks_per_call=2), 8),
    "adam-int8sr-q4-resident1-sequential-clip": (
        dict(tx=optax.adam(1e-3), num_directions=4, clip_norm=5.0,
             storage=Storage("int8", rounding="stochastic")),
        dict(resident_blocks=1, branches="sequential"), 4),
    "mezo_sgd-wd-bf16compute-rademacher-q8-on-4": (
        dict(tx=mezo_sgd(1e-3, weight_decay=0.05), num_directions=8, storage=SR_BF16,
             compute_dtype=jnp.bfloat16, directions="rademacher"), dict(max_inflight=3), 4),
    # FZOO: every device runs the unperturbed branch; its L_0 is the same on all
    "fzoo-rademacher-q4-on-4": (dict(tx=mezo_sgd(1e-3), num_directions=4, estimator="fzoo",
                                     directions="rademacher"), dict(max_inflight=2), 4),
    # Sparse-MeZO: the mask's selection counts run on the shards (the update) and on the
    # gathered block (the branches)
    "sparse-bf16sr-q2-on-2-sequential": (
        dict(tx=shared_sgd(), num_directions=2, estimator=Estimator("sparse", fraction=0.3),
             storage=SR_BF16), dict(branches="sequential"), 2),
    # HiZOO: H is sharded with its block (the update) and gathered with it (the branches)
    "hizoo-momentum-q2-on-2": (dict(tx=optax.sgd(1e-3, momentum=0.9), num_directions=2,
                                    estimator=Estimator("hizoo", smooth=0.05)),
                               dict(max_inflight=2), 2),
}
DEFAULT_CASES = ("sgd-fp32-q4", "fzoo-rademacher-q4-on-4")


@pytest.mark.parametrize("name", [n if n in DEFAULT_CASES
                                  else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(CASES)])
def test_directions_bit_identical_to_one_device(name):
    kw, zo2_kw, n = CASES[name]
    one, m1 = _run(MeZOEngine, None, kw)
    ref = _state_leaves(one)
    zo2, m2 = _run(ZO2Engine, n, dict(kw, parallel="directions"), **zo2_kw)
    mezo, m3 = _run(MeZOEngine, n, dict(kw, parallel="directions"))
    assert zo2.mesh.n == n and zo2.mesh.mode == "directions"
    for m in (m2, m3):
        for a, b in zip(m1, m):
            assert set(a) == set(b)
            for k in a:
                _identical([a[k]], [b[k]])
    _identical(ref, _state_leaves(zo2))
    _identical(ref, _state_leaves(mezo))


def test_streamed_blocks_are_one_copy_sharded_in_pinned_host():
    e, _ = _run(ZO2Engine, 4, dict(tx=optax.sgd(1e-3, momentum=0.9), num_directions=4,
                                   storage=SR_BF16), steps=1)
    assert e.memory_kinds()["blocks"] == ["pinned_host"] * 3
    for blk, opt in zip(e._store.blocks, e._store.opts):
        for x in jax.tree.leaves((blk, opt)):
            assert x.sharding.memory_kind == "pinned_host"
            want = jax.sharding.NamedSharding(e.mesh.mesh, spmd.leaf_spec(x.shape, 4))
            assert x.sharding.shard_shape(x.shape) == want.shard_shape(x.shape)
            shards = x.addressable_shards
            assert len(shards) == 4
            # every leaf of the toy has an axis of 16: each device holds a quarter, no copies
            assert sum(s.data.size for s in shards) == x.size
    # the outer parameters are replicated on the devices
    assert all(len(x.sharding.device_set) == 4 and x.sharding.is_fully_replicated
               for x in jax.tree.leaves(e._outer))


def test_leaf_spec():
    P = jax.sharding.PartitionSpec
    assert spmd.leaf_spec((16, 64), 4) == P(None, "zo")
    assert spmd.leaf_spec((64, 64), 4) == P("zo", None)
    assert spmd.leaf_spec((6,), 4) == P()
    assert spmd.leaf_spec((3, 6, 64), 4, stacked=True) == P(None, None, "zo")
    assert spmd.leaf_spec((), 4) == P()


def test_data_parallel_within_float_reassociation():
    """q = 1 on 4 devices splits the batch of 8: each loss is the devices' row sums over B,
    where one device takes the mean of all rows. The per-example losses of a row may also
    differ in the last bits (the dots run on fewer rows). Bound: |dL| <= 8 B ulp(L) per loss
    after the same parameters; the parameters then drift by the lr-scaled difference of g."""
    kw = dict(tx=shared_sgd(), num_directions=1)
    one, m1 = _run(MeZOEngine, None, kw, batch_size=8)
    zo2, m2 = _run(ZO2Engine, 4, dict(kw, parallel="data"), batch_size=8)
    mezo, m3 = _run(MeZOEngine, 4, dict(kw, parallel="data"), batch_size=8)
    assert zo2.mesh.mode == "data"
    ulp = np.spacing(np.float32(m1[0]["loss"]))
    for m in (m2, m3):
        # step 0 starts from the same parameters: only the reduction differs
        for k in ("loss_plus", "loss_minus"):
            assert abs(float(m[0][k]) - float(m1[0][k])) <= 8 * 8 * ulp, k
        for a, b in zip(m1, m):
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    for ref, got in ((_state_leaves(one), _state_leaves(zo2)),
                     (_state_leaves(one), _state_leaves(mezo))):
        for x, y in zip(ref, got):
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)
    # the two engines on the same mesh run the same programs: bit-identical to each other
    _identical(_state_leaves(zo2), _state_leaves(mezo))


def test_auto_mode_and_eval():
    e = ZO2Engine(MODEL, PARAMS, shared_sgd(), num_directions=4, mesh=4)
    assert e.mesh.mode == "directions"
    e1 = ZO2Engine(MODEL, PARAMS, shared_sgd(), num_directions=2, mesh=4)
    assert e1.mesh.mode == "data"
    one = MeZOEngine(MODEL, PARAMS, shared_sgd(), num_directions=4)
    for t in range(2):
        b, k = counting_batch(jax.random.key(t)), jax.random.key(t)
        e.step(b, k)
        one.step(b, k)
    for bs in (4, 6):  # 6 rows do not split over 4 devices: every device runs them all
        batch = counting_batch(jax.random.key(9), batch_size=bs)
        np.testing.assert_array_equal(np.asarray(e.eval_loss(batch, per_example=True)),
                                      np.asarray(one.eval_loss(batch, per_example=True)))
        assert np.asarray(e.logits(batch)).shape == np.asarray(one.logits(batch)).shape
        np.testing.assert_allclose(np.asarray(e.logits(batch)), np.asarray(one.logits(batch)),
                                   rtol=1e-6, atol=1e-6)
    _identical(jax.tree.leaves(jax.tree.map(np.asarray, one.params())),
               jax.tree.leaves(jax.tree.map(np.asarray, e.params())))


def test_bad_mesh_options_are_refused():
    kw = dict(tx=shared_sgd())
    with pytest.raises(ValueError, match="not a multiple of the 4 devices"):
        ZO2Engine(MODEL, PARAMS, num_directions=2, mesh=4, parallel="directions", **kw)
    with pytest.raises(ValueError, match="this process sees 8 devices"):
        MeZOEngine(MODEL, PARAMS, mesh=16, **kw)
    with pytest.raises(ValueError, match="packed=True"):
        ZO2Engine(MODEL, PARAMS, mesh=4, packed=True, **kw)
    with pytest.raises(ValueError, match="device= or mesh="):
        ZO2Engine(MODEL, PARAMS, mesh=4, device=jax.devices()[0], **kw)
    with pytest.raises(ValueError, match="parallel must be"):
        MeZOEngine(MODEL, PARAMS, mesh=4, parallel="model", **kw)
    e = MeZOEngine(MODEL, PARAMS, mesh=4, parallel="data", **kw)
    with pytest.raises(ValueError, match="batch size 6 is not a multiple of 4"):
        e.step(counting_batch(jax.random.key(0), batch_size=6), jax.random.key(0))
    with pytest.raises(ValueError, match="batch size 6"):
        ZO2Engine(MODEL, PARAMS, mesh=4, parallel="data", batch_shape=(6, 8), **kw)
    z = ZO2Engine(MODEL, PARAMS, mesh=4, parallel="data", **kw)
    with pytest.raises(ValueError, match="batch size 6 is not a multiple of 4"):
        z.step(counting_batch(jax.random.key(0), batch_size=6), jax.random.key(0))
    z.step(counting_batch(jax.random.key(0), batch_size=8), jax.random.key(0))  # still usable
    # a mesh of one device is the one-device engine on that device
    one = ZO2Engine(MODEL, PARAMS, mesh=[jax.devices()[3]], **kw)
    assert one.mesh is None and one.memory_kinds()["outer"] == "device"
    assert jax.tree.leaves(one._outer)[0].devices() == {jax.devices()[3]}


@pytest.mark.parametrize("target", [pytest.param("zo2-on-2", marks=pytest.mark.slow), "mezo-on-1",
                                    pytest.param("zo2-on-8", marks=pytest.mark.slow)])
def test_checkpoint_restores_onto_another_device_count(tmp_path, target):
    """A checkpoint of a 4-device ZO2 engine, written mid-run, restored onto another device
    count, continues exactly as the uninterrupted run."""
    kw = dict(tx=optax.sgd(1e-3, momentum=0.9), num_directions=8 if target == "zo2-on-8" else 4,
              storage=SR_BF16)
    batches = [counting_batch(jax.random.key(100 + t)) for t in range(4)]
    ref = MeZOEngine(MODEL, PARAMS, **kw)
    for t in range(4):
        ref.step(batches[t], jax.random.key(t))
    src = ZO2Engine(MODEL, PARAMS, mesh=4, **kw)
    for t in range(2):
        src.step(batches[t], jax.random.key(t))
    ck = Checkpointer(tmp_path)
    ck.save_engine(2, src, {}, {})
    ck.wait()
    cls, n = {"zo2-on-2": (ZO2Engine, 2), "mezo-on-1": (MeZOEngine, None),
              "zo2-on-8": (ZO2Engine, 8)}[target]
    dst = cls(MODEL, PARAMS, mesh=n, **kw)
    ck.restore_engine(dst)
    for t in range(2, 4):
        dst.step(batches[t], jax.random.key(t))
    _identical(_state_leaves(ref), _state_leaves(dst))
