"""Checkpointer.save_engine / restore_engine: streamed blocks written and read one at a time,
exact resume, and the faults a checkpoint meets (a truncated or foreign block file, a read that
fails halfway)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _toy import MODEL, PARAMS, counting_batch, shared_sgd
from test_offload_exactness import assert_trees_identical
from zo2_jax.offload import Storage, ZO2Engine
from zo2_jax.train import checkpoint as C
from zo2_jax.train.checkpoint import Checkpointer
from zo2_jax.zo import MeZOEngine

BF16 = Storage("bfloat16", rounding="stochastic")
# packed streamed blocks with a resident one; unpacked streamed blocks with an optimiser state
SETUPS = {
    "packed-resident1-sgd": dict(tx=shared_sgd(), storage=BF16, resident_blocks=1, packed=True),
    "unpacked-adam": dict(tx=optax.adam(1e-3), storage=BF16, resident_blocks=0, packed=False),
}
BATCHES = [counting_batch(jax.random.key(t)) for t in range(4)]


def _engine(kw, params=PARAMS):
    return ZO2Engine(MODEL, params, **kw)


def _run(engine, steps):
    for t in steps:
        engine.step(BATCHES[t], jax.random.key(100 + t))


def _zeros():
    return jax.tree.map(jnp.zeros_like, PARAMS)


@pytest.mark.parametrize("name", list(SETUPS))
def test_save_engine_and_restore_engine_resume_exactly_block_by_block(tmp_path, name,
                                                                      monkeypatch):
    kw = SETUPS[name]
    straight = _engine(kw)
    _run(straight, range(4))
    first = _engine(kw)
    _run(first, range(2))  # an update is pending: it is part of the checkpoint
    ck = Checkpointer(str(tmp_path / "ck"), asynchronous=True)
    reads = []
    real_block_state = first.block_state
    monkeypatch.setattr(first, "block_state", lambda i: reads.append(i) or real_block_state(i))
    ck.save_engine(2, first, {"pos": 7}, {"step": 2})
    assert reads == list(range(MODEL.num_blocks))  # each block read once, in turn
    ck.wait()
    step_dir = tmp_path / "ck" / "2"
    index = json.loads((step_dir / "blocks" / "index.json").read_text())
    assert [b["file"] for b in index["blocks"]] == [f"{i:05d}.bin" for i in range(3)]
    for b in index["blocks"]:  # every leaf of the block and of its optimiser state, in full
        assert os.path.getsize(step_dir / "blocks" / b["file"]) == b["nbytes"] > 0
    resumed = _engine(kw, _zeros())
    placed = []  # block i is read only once block i - 1 has been placed in the engine
    real_read = C._BlockReader.read

    def read(self, i, like):
        if i > 0:
            assert resumed._store.blocks[i - 1] is not originals[i - 1], i
        placed.append(i)
        return real_read(self, i, like)

    originals = list(resumed._store.blocks)
    monkeypatch.setattr(C._BlockReader, "read", read)
    data, meta = Checkpointer(str(tmp_path / "ck")).restore_engine(resumed)
    assert (data, meta) == ({"pos": 7}, {"step": 2}) and placed == [0, 1, 2]
    _run(resumed, range(2, 4))
    assert_trees_identical(straight.state(), resumed.state(), f"{name}: resumed vs straight")


@pytest.mark.slow
def test_a_zo2_checkpoint_restores_into_mezo(tmp_path):
    zo2 = _engine(dict(tx=shared_sgd()))
    _run(zo2, range(2))
    ck = Checkpointer(str(tmp_path / "ck"), asynchronous=False)
    ck.save_engine(2, zo2, {}, {"step": 2})
    mezo = MeZOEngine(MODEL, _zeros(), tx=shared_sgd())
    ck.restore_engine(mezo)
    _run(zo2, range(2, 4))
    _run(mezo, range(2, 4))
    assert_trees_identical(zo2.params(), mezo.params(), "mezo from a zo2 checkpoint")
    # the other way: a MeZO checkpoint (one item, stacked blocks) into MeZO, through either call
    ck.save_engine(4, mezo, {}, {"step": 4})
    assert not (tmp_path / "ck" / "4" / "blocks").exists()
    again = MeZOEngine(MODEL, _zeros(), tx=shared_sgd())
    ck.restore_engine(again, 4)
    assert_trees_identical(mezo.state(), again.state(), "mezo round trip")
    with pytest.raises(ValueError, match="restore it with restore_engine"):
        ck.restore(2, zo2.state())


def _saved(tmp_path, kw=None):
    engine = _engine(kw or dict(tx=shared_sgd(), resident_blocks=0))
    _run(engine, range(2))
    ck = Checkpointer(str(tmp_path / "ck"), asynchronous=False)
    ck.save_engine(2, engine, {}, {"step": 2})
    return ck, tmp_path / "ck" / "2" / "blocks"


def test_a_truncated_block_file_is_named_before_the_engine_changes(tmp_path):
    ck, blocks = _saved(tmp_path)
    path = blocks / "00001.bin"
    path.write_bytes(path.read_bytes()[:-5])
    target = _engine(dict(tx=shared_sgd(), resident_blocks=0))
    _run(target, range(1))
    before = jax.device_get(target.state())
    with pytest.raises(C.CheckpointCorrupt, match=r"00001\.bin: 1147 bytes, the checkpoint's "
                                                  r"manifest says 1152"):
        ck.restore_engine(target)
    (blocks.parent / C.MANIFEST).unlink()  # unsealed (a run killed before sealing it)
    with pytest.raises(C.CheckpointCorrupt, match=r"00001\.bin: block 1's file has .* bytes, its "
                                                  r"index"):
        ck.restore_engine(target)
    assert_trees_identical(before, jax.device_get(target.state()), "untouched")
    target.step(BATCHES[1], jax.random.key(0))  # and it still runs


def test_blocks_of_another_optimiser_are_refused_naming_the_block(tmp_path):
    ck, _ = _saved(tmp_path)  # saved with MeZO-SGD: no optimiser arrays
    target = _engine(dict(tx=optax.adam(1e-3), resident_blocks=0))
    with pytest.raises(ValueError, match="block 0 has 3 arrays saved, the engine expects 10"):
        ck.restore_engine(target)
    target.step(BATCHES[0], jax.random.key(0))


def test_a_restore_failing_halfway_stops_the_engine_until_a_good_one(tmp_path, monkeypatch):
    ck, _ = _saved(tmp_path)
    target = _engine(dict(tx=shared_sgd(), resident_blocks=0))
    real_read = C._BlockReader.read

    def failing(self, i, like):
        if i == 2:
            raise OSError("disk gone")
        return real_read(self, i, like)

    monkeypatch.setattr(C._BlockReader, "read", failing)
    with pytest.raises(OSError, match="disk gone"):
        ck.restore_engine(target)
    for call in (lambda: target.step(BATCHES[0], jax.random.key(0)), target.flush,
                 target.state, lambda: target.eval_loss(BATCHES[0])):
        with pytest.raises(RuntimeError, match="restore failed after 2 of 3 blocks"):
            call()
    monkeypatch.setattr(C._BlockReader, "read", real_read)
    ck.restore_engine(target)  # a good restore makes it whole again
    target.step(BATCHES[2], jax.random.key(0))


def test_block_state_is_the_state_s_blocks_one_at_a_time():
    engine = _engine(SETUPS["packed-resident1-sgd"])
    _run(engine, range(2))
    state = engine.state()
    assert "blocks" not in engine.state(blocks=False)
    for i in range(MODEL.num_blocks):
        blk, opt = engine.block_state(i)
        assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(blk))
        assert_trees_identical(blk, jax.device_get(state["blocks"][i]), f"block {i}")
        assert jax.tree.structure(opt) == jax.tree.structure(state["opt_blocks"][i])
        like = engine.block_like(i)
        assert [(x.shape, x.dtype) for x in jax.tree.leaves(like[0])] == [
            (x.shape, x.dtype) for x in jax.tree.leaves(blk)]
    with pytest.raises(IndexError, match="blocks 0..2"):
        engine.block_state(3)


def test_a_typed_prng_key_in_a_block_state_round_trips(tmp_path):
    key = jax.random.key(3)

    class Reader:
        num_blocks = 1

    handler = C._BlocksHandler()
    tree = ({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"k": key})
    os.makedirs(tmp_path / "b")
    handler.save(str(tmp_path / "b"), C._BlocksSave(1, lambda i: tree))
    reader = handler.restore(str(tmp_path / "b"))
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    reader.check([like])
    got = reader.read(0, like)
    np.testing.assert_array_equal(got[0]["w"], tree[0]["w"])
    assert got[1]["k"].dtype == key.dtype
    np.testing.assert_array_equal(jax.random.key_data(got[1]["k"]), jax.random.key_data(key))


@pytest.mark.parametrize("where", ["step", "flush"])
def test_a_step_or_flush_raising_midway_stops_the_engine_until_a_restore(tmp_path, where,
                                                                         monkeypatch):
    """Out of memory in the second unit: the outer part and the first unit hold the update,
    the rest not. The engine says so instead of training on, and a restore makes it whole."""
    kw = dict(tx=shared_sgd(), resident_blocks=0, blocks_per_call=1)
    straight = _engine(kw)
    _run(straight, range(3))
    engine = _engine(kw)
    _run(engine, range(2))
    ck = Checkpointer(str(tmp_path / "ck"), asynchronous=False)
    ck.save_engine(2, engine, {}, {"step": 2})
    stream = engine._stream
    real = stream.update_pass

    def failing(compute, **kw):
        def c(unit, *args):
            if unit == stream.streamed[1]:
                raise MemoryError("RESOURCE_EXHAUSTED: out of memory")
            return compute(unit, *args)
        return real(c, **kw)

    monkeypatch.setattr(stream, "update_pass", failing)
    with pytest.raises(MemoryError):
        if where == "step":
            engine.step(BATCHES[2], jax.random.key(102))
        else:
            engine.flush()
    monkeypatch.setattr(stream, "update_pass", real)
    for call in (lambda: engine.step(BATCHES[2], jax.random.key(102)), engine.state,
                 lambda: engine.logits(BATCHES[0])):
        with pytest.raises(RuntimeError, match=f"a {where} raised midway .*MemoryError"):
            call()
    ck.restore_engine(engine)
    _run(engine, range(2, 3))
    assert_trees_identical(straight.state(), engine.state(), "restored after a failed " + where)
