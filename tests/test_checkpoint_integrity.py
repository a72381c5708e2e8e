"""Checkpoints that survive damaged files, full disks and failures while a restore places blocks."""

import errno
import json
import os

import jax
import numpy as np
import optax
import pytest

from _toy import MODEL, PARAMS, counting_batch, shared_sgd
from test_offload_exactness import assert_trees_identical
from zo2_jax.core import trees
from zo2_jax.offload import ZO2Engine
from zo2_jax.train import checkpoint as C
from zo2_jax.train.checkpoint import Checkpointer
from zo2_jax.train.trainer import restore_newest_intact
from zo2_jax.zo import MeZOEngine

BATCHES = [counting_batch(jax.random.key(t)) for t in range(6)]


def _engine(**kw):
    return ZO2Engine(MODEL, PARAMS, **{"tx": shared_sgd(), "resident_blocks": 0, **kw})


def _run(engine, steps):
    for t in steps:
        engine.step(BATCHES[t], jax.random.key(100 + t))


def _two_checkpoints(tmp_path, save=None):
    """An engine trained 4 steps, saved at steps 2 and 4; and its state at step 2."""
    engine, ck = _engine(), Checkpointer(str(tmp_path / "ck"), asynchronous=False)
    save = save or (lambda step: ck.save_engine(step, engine, {"at": step}, {"step": step}))
    _run(engine, range(2))
    save(2)
    at2 = jax.device_get(engine.state())
    _run(engine, range(2, 4))
    save(4)
    return ck, at2


def _flip(path, offset=-3):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def _orbax_file(step_dir):
    """The largest file orbax wrote for the state's arrays."""
    files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir / "state") for n in ns]
    return max(files, key=os.path.getsize)


def test_every_file_of_a_finished_checkpoint_is_in_its_manifest(tmp_path):
    ck, _ = _two_checkpoints(tmp_path)
    folder = tmp_path / "ck" / "4"
    manifest = json.loads((folder / C.MANIFEST).read_text())["files"]
    on_disk = {os.path.relpath(os.path.join(r, n), folder) for r, _, ns in os.walk(folder)
               for n in ns} - {C.MANIFEST}
    assert set(manifest) == on_disk and any(f.endswith(".bin") for f in manifest)
    assert all("crc32" in e for f, e in manifest.items() if not f.endswith(".bin"))
    index = json.loads((folder / "blocks" / "index.json").read_text())
    assert all("crc32" in leaf for b in index["blocks"] for leaf in b["leaves"])
    assert ck.verify(4) is True


@pytest.mark.parametrize("damage", ["flip-block", "flip-state", "truncate-state", "missing-meta"])
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_one_before_is_used(
        tmp_path, damage):
    ck, at2 = _two_checkpoints(tmp_path)
    folder = tmp_path / "ck" / "4"
    if damage == "flip-block":
        victim = folder / "blocks" / "00001.bin"
        _flip(victim)
    elif damage == "flip-state":
        victim = folder / os.path.relpath(_orbax_file(folder), folder)
        _flip(victim, offset=len(victim.read_bytes()) // 2)
    elif damage == "truncate-state":
        victim = folder / os.path.relpath(_orbax_file(folder), folder)
        victim.write_bytes(victim.read_bytes()[:-7])
    else:
        victim = next(p for p in (folder / "meta").rglob("*") if p.is_file())
        victim.unlink()
    target = _engine()
    with pytest.raises(C.CheckpointCorrupt, match=str(victim.name)):
        ck.restore_engine(target)
    logs = []
    data, meta = restore_newest_intact(ck, target, logs.append)
    assert (data, meta["step"]) == ({"at": 2}, 2)
    assert "step 4 is damaged" in logs[0] and "step 2, the newest intact one" in logs[1]
    assert_trees_identical(at2, jax.device_get(target.state()), "fell back to step 2")
    _run(target, range(2, 3))  # and it trains on


def test_no_intact_checkpoint_is_an_error_naming_each(tmp_path):
    ck, _ = _two_checkpoints(tmp_path)
    for step in (2, 4):
        (tmp_path / "ck" / str(step) / "blocks" / "00000.bin").unlink()
    with pytest.raises(C.CheckpointCorrupt, match=r"no intact checkpoint .*step 4: .*00000\.bin"
                                                  r".*step 2: .*00000\.bin"):
        restore_newest_intact(ck, _engine(), lambda s: None)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_says_so(tmp_path,
                                                                             monkeypatch):
    engine, ck = _engine(), Checkpointer(str(tmp_path / "ck"), asynchronous=False)
    _run(engine, range(2))
    ck.save_engine(2, engine, {}, {"step": 2})
    at2 = jax.device_get(engine.state())
    _run(engine, range(2, 4))
    real = engine.block_state

    def full(i):
        if i == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(i)

    monkeypatch.setattr(engine, "block_state", full)
    with pytest.raises(OSError, match=r"saving step 4 to .* failed \(No space left on device\); "
                                      r"the checkpoints saved before are intact \(newest: 2\); "
                                      r"free disk space"):
        ck.save_engine(4, engine, {}, {"step": 4})
    assert sorted(os.listdir(tmp_path / "ck")) == ["2"]  # no temporary folder left behind
    assert ck.all_steps() == [2] and ck.verify(2)
    target = _engine()
    ck.restore_engine(target)
    assert_trees_identical(at2, jax.device_get(target.state()), "the previous checkpoint")


@pytest.mark.parametrize("where", ["place", "outer"])
def test_a_failure_placing_a_restored_block_stops_the_engine_until_a_good_restore(
        tmp_path, monkeypatch, where):
    ck, at2 = _two_checkpoints(tmp_path)
    target = _engine()
    real_place = target._place
    real_put = jax.device_put

    def place(i, blk, opt):
        if where == "place" and i == 1:
            raise MemoryError("RESOURCE_EXHAUSTED: out of memory while packing")
        return real_place(i, blk, opt)

    def put(x, *a, **kw):  # the outer parameters' transfer, after every block is placed
        if where == "outer" and isinstance(x, tuple) and len(x) == 5:
            raise MemoryError("RESOURCE_EXHAUSTED: out of memory")
        return real_put(x, *a, **kw)

    monkeypatch.setattr(target, "_place", place)
    monkeypatch.setattr(jax, "device_put", put)
    with pytest.raises(MemoryError):
        ck.restore_engine(target, 2)
    monkeypatch.setattr(jax, "device_put", real_put)
    n = 1 if where == "place" else 3
    with pytest.raises(RuntimeError, match=f"restore failed after {n} of 3 blocks"):
        target.step(BATCHES[0], jax.random.key(0))
    monkeypatch.setattr(target, "_place", real_place)
    ck.restore_engine(target, 2)
    assert_trees_identical(at2, jax.device_get(target.state()), "restored again")


def test_a_flush_failing_after_its_blocks_stops_the_engine(monkeypatch):
    import zo2_jax.offload._zo2 as zo2_mod

    engine = _engine()
    _run(engine, range(1))

    def empty(*a, **kw):
        raise MemoryError("RESOURCE_EXHAUSTED: out of memory")

    monkeypatch.setattr(zo2_mod.parts, "empty_pending", empty)
    with pytest.raises(MemoryError):
        engine.flush()
    with pytest.raises(RuntimeError, match="a flush raised midway"):
        engine.step(BATCHES[1], jax.random.key(1))


def test_a_save_state_checkpoint_restores_into_an_engine_without_copying_its_blocks(
        tmp_path, monkeypatch):
    """The older format (`save(state())`): the restore target comes from the engine's shapes, so
    neither state() (which copies every block) nor a usable engine is needed."""
    ck = Checkpointer(str(tmp_path / "ck"), asynchronous=False)
    source = _engine(packed=True)
    _run(source, range(2))
    ck.save(2, source.state(), {"at": 2}, {"step": 2})
    at2 = jax.device_get(source.state())
    target = _engine(packed=True)
    target._broken = "broken by a test"  # a failed step earlier: state() refuses
    monkeypatch.setattr(target, "state", lambda *a, **k: pytest.fail("state() was called"))
    ck.restore_engine(target, 2)
    monkeypatch.undo()
    assert_trees_identical(at2, jax.device_get(target.state()), "old format")


def test_same_shaped_leaves_of_another_tree_are_refused_by_path(tmp_path):
    ck, _ = _two_checkpoints(tmp_path)
    index_path = tmp_path / "ck" / "4" / "blocks" / "index.json"
    index = json.loads(index_path.read_text())
    leaves = index["blocks"][0]["leaves"]
    same = [(a, b) for a in range(len(leaves)) for b in range(a + 1, len(leaves))
            if leaves[a]["shape"] == leaves[b]["shape"]
            and leaves[a]["dtype"] == leaves[b]["dtype"]]
    a, b = same[0]
    leaves[a]["path"], leaves[b]["path"] = leaves[b]["path"], leaves[a]["path"]
    index_path.write_text(json.dumps(index))
    os.remove(tmp_path / "ck" / "4" / C.MANIFEST)  # (else the manifest names the index first)
    target = _engine()
    with pytest.raises(ValueError, match=r"block 0 has leaf .* saved where the engine has"):
        ck.restore_engine(target, 4)
    mezo = MeZOEngine(MODEL, PARAMS, tx=shared_sgd())
    with pytest.raises(ValueError, match=r"block 0 has leaf .* saved where the engine has"):
        ck.restore_engine(mezo, 4)
    ck.restore_engine(mezo, 2)  # a ZO2 checkpoint into MeZO: same paths, it loads


def test_host_copy_leaves_no_cached_copy_and_has_a_tested_fallback(monkeypatch):
    x = jax.device_put(np.arange(12.0, dtype=np.float32).reshape(3, 4))
    for uncached in (trees._UNCACHED, "no_such_method_in_this_jax"):
        monkeypatch.setattr(trees, "_UNCACHED", uncached)
        a, b = trees.host_copy(x), trees.host_copy(x)
        np.testing.assert_array_equal(a, np.asarray(jax.device_get(x)))
        np.testing.assert_array_equal(a, b)
        assert getattr(x, "_npy_value", None) is None, uncached  # nothing cached on x
    monkeypatch.setattr(trees, "_UNCACHED", trees._UNCACHED)
    key = jax.random.key(0)
    assert trees.host_copy(key) is key
    # with the fallback, a checkpoint still round-trips exactly (optimiser state with arrays)
    monkeypatch.setattr(trees, "_UNCACHED", "no_such_method_in_this_jax")
    engine = _engine(tx=optax.adam(1e-3))
    _run(engine, range(1))
    blk, opt = engine.block_state(1)
    assert_trees_identical(jax.device_get(engine.state()["blocks"][1]), blk, "block 1")
