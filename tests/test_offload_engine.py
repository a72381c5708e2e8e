"""ZO2 engine: placement in pinned host memory, training, evaluation, resume, budget, pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _toy import MODEL, PARAMS, counting_batch, shared_sgd
from test_offload_exactness import CONFIGS, assert_trees_identical
from zo2_jax.offload import Storage, ZO2Engine
from zo2_jax.offload._stream import BlockStore, BlockStream
from zo2_jax.offload.plan import make_units
from zo2_jax.zo import MeZOEngine


def kinds(tree):
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


@pytest.mark.parametrize("packed", [True, False])
def test_streamed_blocks_and_optimizer_state_live_in_pinned_host(packed):
    # adam: a real optimiser state
    shared, zo2_only = CONFIGS["chain-adam-schedule-bf16sr-bf16compute-clip-sequential"]
    engine = ZO2Engine(MODEL, PARAMS, **shared, **zo2_only, packed=packed)
    store = engine._store
    for t in range(2):
        engine.step(counting_batch(jax.random.key(t)), jax.random.key(t))
        s = engine.state()
        assert engine.resident_blocks == {1}
        for i in range(MODEL.num_blocks):
            resident = i in engine.resident_blocks
            want = {"device"} if resident else {"pinned_host"}
            assert kinds(store.blocks[i]) == want and kinds(store.opts[i]) == want, (t, i)
            if packed and not resident:  # one buffer for the block, one for its adam state
                assert len(jax.tree.leaves(store.blocks[i])) == 1
                assert len(jax.tree.leaves(store.opts[i])) == 1
                # state() unpacks them on the host: the same trees as the resident block's
                assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(s["blocks"][i]))
                assert jax.tree.structure(s["blocks"][i]) == jax.tree.structure(s["blocks"][1])
                assert jax.tree.structure(s["opt_blocks"][i]) == \
                    jax.tree.structure(s["opt_blocks"][1])
            else:
                assert kinds(s["blocks"][i]) == want, (t, i)
                assert jax.tree.leaves(s["opt_blocks"][i]) and kinds(s["opt_blocks"][i]) == want
        assert kinds(s["outer"]) == kinds(s["opt_outer"]) == {"device"}
        assert {x.dtype for x in jax.tree.leaves(s["blocks"])} == {jnp.dtype(jnp.bfloat16)}
    assert kinds(engine.params()["blocks"][0]) == {"pinned_host"}
    assert engine.memory_kinds() == {"outer": "device", "blocks": [
        "device" if i == 1 else "pinned_host" for i in range(MODEL.num_blocks)]}


@pytest.mark.parametrize("engine_cls", [MeZOEngine, ZO2Engine])
def test_training_reduces_the_loss(engine_cls):
    engine = engine_cls(MODEL, PARAMS, tx=shared_sgd())
    held_out = counting_batch(jax.random.key(10_000))
    before = float(engine.eval_loss(held_out))
    prev, losses = None, []
    for t in range(300):
        metrics = engine.step(counting_batch(jax.random.key(t)), jax.random.key(50_000 + t))
        if prev is not None:  # read the previous step's metrics: the host never waits on this one
            losses.append(float(prev["loss"]))
        prev = metrics
    after = float(engine.eval_loss(held_out))
    assert after < before - 0.7, (before, after)
    assert np.mean(losses[-50:]) < np.mean(losses[:50]) - 0.5
    assert int(prev["skipped_total"]) == 0


def test_eval_logits_and_per_example_loss_match_the_model():
    engine = ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), resident_blocks=1)
    batch = counting_batch(jax.random.key(3))
    engine.step(batch, jax.random.key(0))
    params = engine.params()
    ref_loss, ref_logits = MODEL.head(params["outer"], _forward(params, batch), batch)
    np.testing.assert_allclose(engine.eval_loss(batch, per_example=True), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(engine.logits(batch), ref_logits, rtol=1e-5, atol=1e-5)


def _forward(params, batch):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
    ctx = MODEL.context(batch)
    h = MODEL.embed(params["outer"], batch)
    for b in params["blocks"]:
        h = MODEL.block(jax.device_put(b, dev), h, ctx)
    return h


@pytest.mark.parametrize("src,dst", [(ZO2Engine, ZO2Engine), (MeZOEngine, ZO2Engine),
                                     (ZO2Engine, MeZOEngine)])
def test_state_restore_resumes_exactly(src, dst):
    """Stop after 2 steps with an update pending, save to numpy, resume in a fresh engine (of
    either kind): 2 more steps give the parameters of 4 uninterrupted steps, bit for bit."""
    batches = [counting_batch(jax.random.key(t)) for t in range(4)]
    straight = ZO2Engine(MODEL, PARAMS, tx=shared_sgd())
    first = src(MODEL, PARAMS, tx=shared_sgd())
    for t in range(4):
        straight.step(batches[t], jax.random.key(t))
    for t in range(2):
        first.step(batches[t], jax.random.key(t))
    state = first.state()
    saved = {k: (v if k == "meta" else jax.device_get(v)) for k, v in state.items()}
    resumed = dst(MODEL, jax.tree.map(jnp.zeros_like, PARAMS), tx=shared_sgd())
    resumed.restore(saved)
    for t in range(2, 4):
        m = resumed.step(batches[t], jax.random.key(t))
    assert int(m["skipped_total"]) == 0
    assert_trees_identical(straight.params(), resumed.params(), "resumed vs uninterrupted")


def test_device_budget_chooses_resident_blocks():
    kw = dict(tx=shared_sgd(), batch_shape=(4, 8), max_inflight=2, packed=False,  # see below
              blocks_per_call=1)
    probe = ZO2Engine(MODEL, PARAMS, device_budget_bytes=10**9, **kw)
    fp = probe.footprint
    assert probe.resident_blocks == {0, 1, 2}  # plenty of room: everything resident
    assert fp["block"] > 0 and fp["activations"] > 0 and fp["outer"] > 0
    # max_inflight=1: k resident blocks need k + min(1, 3 - k) block slots; two fit => k = 1
    tight = fp["outer"] + fp["activations"] + 2 * fp["block"]
    engine = ZO2Engine(MODEL, PARAMS, device_budget_bytes=tight, **{**kw, "max_inflight": 1})
    assert engine.resident_blocks == {1}  # spread: the middle block
    minimum = fp["outer"] + fp["activations"] + 2 * fp["block"]
    with pytest.raises(ValueError, match="does not fit") as err:
        ZO2Engine(MODEL, PARAMS, device_budget_bytes=minimum - 1, **kw)
    assert f"{minimum:,}" in str(err.value) and "max_inflight=2" in str(err.value)
    with pytest.raises(ValueError, match=r"batch has shape \(2, 8\).*batch_shape=\(4, 8\)"):
        engine.step(counting_batch(jax.random.key(0), batch_size=2), jax.random.key(0))


def test_device_budget_counts_units_of_several_blocks():
    kw = dict(tx=shared_sgd(), batch_shape=(4, 8), max_inflight=1, packed=False)
    one = ZO2Engine(MODEL, PARAMS, device_budget_bytes=10**9, blocks_per_call=1, **kw).footprint
    three = ZO2Engine(MODEL, PARAMS, device_budget_bytes=10**9, blocks_per_call=3, **kw).footprint
    assert three["block"] == one["block"]
    assert three["activations"] >= one["activations"]  # the unit's scratch, compiled at G=3
    # W=1 unit of 3 blocks: all three streamed blocks are on the device at once
    minimum = three["outer"] + three["activations"] + 3 * three["block"]
    with pytest.raises(ValueError, match=r"3 streamed blocks \(max_inflight=1 x "
                                         r"blocks_per_call=3\)"):
        ZO2Engine(MODEL, PARAMS, device_budget_bytes=minimum - 1, blocks_per_call=3, **kw)
    # at exactly the minimum, keeping all three resident costs the same, and is preferred
    ok = ZO2Engine(MODEL, PARAMS, device_budget_bytes=minimum, blocks_per_call=3, **kw)
    assert ok.resident_blocks == {0, 1, 2} and ok.blocks_per_call == 1  # nothing streams


class LoggingStream(BlockStream):
    """Records the schedule's uploads, computes, write-backs and waits as it runs them, and the
    most device slots in use at once (counted from the ops, not from the schedule's own
    bookkeeping)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.events, self.peak, self._slots = [], 0, 0

    def _run(self, make_ops, fn=None, update=True):
        def logged():
            ops = make_ops()
            for op in ops:
                ups = [op] if op.kind == "upload" else list(op.uploads)
                if op.kind in ("compute", "wait"):
                    self.events.append((op.kind, op.unit))
                if op.kind == "write_back":
                    self.events.append(("back", op.unit))
                self.events.extend(("up", up.unit) for up in ups)
                self._slots += len(ups) - (op.kind == "wait")
                self.peak = max(self.peak, self._slots)
            return ops
        super()._run(logged, fn, update)

    def drain(self):
        super().drain()
        self._slots = 0  # uploads ahead are dropped

    def note(self, kind, u):
        self.events.append((kind, u))


def test_units_cut_runs_of_streamed_blocks_evenly():
    assert make_units(7, frozenset({2}), 1) == [(i,) for i in range(7)]
    assert make_units(7, frozenset({2}), 2) == [(0, 1), (2,), (3, 4), (5, 6)]
    assert make_units(7, frozenset({2}), 3) == [(0, 1), (2,), (3, 4), (5, 6)]
    assert make_units(12, frozenset(), 5) == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]
    assert make_units(5, frozenset(), 2) == [(0, 1), (2, 3), (4,)]
    assert make_units(3, frozenset({0, 1, 2}), 4) == [(0,), (1,), (2,)]
    with pytest.raises(ValueError, match="blocks per call must be >= 1"):
        make_units(3, frozenset(), 0)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
    store = BlockStore([jnp.zeros(())] * 3, [()] * 3, frozenset({1}))
    with pytest.raises(ValueError, match="mix resident and streamed"):
        BlockStream(store, dev, dev, 2, [(0, 1), (2,)])
    with pytest.raises(ValueError, match="once each"):
        BlockStream(store, dev, dev, 2, [(0,), (2,)])


@pytest.mark.parametrize("window,group,ahead", [
    (1, 1, False), (2, 1, False), (3, 1, False), (2, 2, False), (3, 2, False), (4, 1, False),
    (1, 1, True), (2, 1, True), (3, 1, True), (3, 2, True), (4, 1, True), (5, 1, True)])
def test_pipeline_bounds_units_in_flight_and_prefetches(window, group, ahead):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    n, res = 7, 2
    where = [dev if i == res else host for i in range(n)]  # block 2 resident
    store = BlockStore([jax.device_put(jnp.full((4,), float(i)), where[i]) for i in range(n)],
                       [jax.device_put(jnp.zeros(()), where[i]) for i in range(n)],
                       frozenset({res}))
    units = make_units(n, store.resident, group)
    stream = LoggingStream(store, dev, host, window, units)
    streamed = [u for u in units if u != (res,)]
    assert len(streamed) == (6 if group == 1 else 3)

    def fn(u, blks, opts):
        assert len(blks) == len(opts) == len(u)
        assert all(x.sharding.memory_kind == "device" for x in blks + opts)
        return [b + 1.0 for b in blks], [o + 1.0 for o in opts]

    for _ in range(3):  # passes after the first start from the previous one's uploads
        stream.update_pass(fn, ahead=ahead)
        stream.note("head", -1)
        stream.prefetch(with_opt=True)
    assert stream.peak <= window
    assert stream.hold == (1 if window <= 3 else 2)
    ev = stream.events
    computes = [k for k, e in enumerate(ev) if e[0] == "compute"]
    for c in computes:  # every streamed unit was uploaded before its compute in the same pass
        u = ev[c][1]
        if u != (res,):
            ups = [k for k in range(c) if ev[k] == ("up", u)]
            assert ups, (u, ev)
    # never wait for the unit dispatched just before (that would idle the device), unless one
    # slot forces it (max_inflight=1 serialises transfers and compute); from W = 4 on, nor for
    # the one before it (its write-back ends about when the last compute does)
    for k, e in enumerate(ev):
        if e[0] == "wait" and window > 1:
            recent = [x[1] for x in ev[:k] if x[0] == "compute" and x[1] != (res,)]
            assert e[1] not in recent[-stream.hold:], ev
    heads = [k for k, e in enumerate(ev) if e == ("head", -1)]
    first = streamed[0]
    for h0, h1 in zip(heads, heads[1:]):
        # the next pass's first unit: uploaded during the pass (ahead) or after its head
        c1 = min(k for k in range(h0, h1) if ev[k] == ("compute", first))
        up = [k for k in range(h0 + 1, c1) if ev[k] == ("up", first)]
        before = [k for k in range(h0) if ev[k] == ("up", first) and
                  k > max(j for j in range(h0) if ev[j] == ("compute", first))]
        if ahead and window >= 2:
            assert before and not up, (h0, ev)
        elif window >= 2:
            assert up and not before, (h0, ev)
    if window >= 2:  # steady state: unit u+1 is uploaded while unit u computes
        second = ev[heads[0] + 1:heads[1]]
        after = [u for u in streamed if u[0] > res]
        for u, nxt in zip(after, after[1:]):
            assert second.index(("up", nxt)) < second.index(("compute", nxt)), second
            if window >= 3:  # and already before unit u computes
                assert second.index(("up", nxt)) < second.index(("compute", u)), second
    np.testing.assert_array_equal(np.asarray(store.blocks[6]), np.full((4,), 9.0))
    assert [b.sharding.memory_kind for b in store.blocks] == [w.memory_kind for w in where]


def test_stream_hold_and_wrap_settings():
    """hold defaults to 1 up to W = 3 and 2 beyond, must be >= 1; wrap=False keeps a pass
    with ahead=True from uploading into the next one."""
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    store = BlockStore([jax.device_put(jnp.full((2,), float(i)), host) for i in range(5)],
                       [jax.device_put(jnp.zeros(()), host) for i in range(5)], frozenset())
    assert [BlockStream(store, dev, host, w).hold for w in (1, 2, 3, 4, 6)] == [1, 1, 1, 2, 2]
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="hold must be an int >= 1"):
            BlockStream(store, dev, host, 3, hold=bad)
    deep = LoggingStream(store, dev, host, 5, hold=3)  # any hold is honoured, not only 1 or 2
    deep.update_pass(lambda u, b, o: (b, o), ahead=True)
    assert [e.unit for e in deep.schedule._held()] == [(2,), (3,), (4,)]
    deep.drain()
    for wrap in (False, True):
        stream = LoggingStream(store, dev, host, 3, wrap=wrap)
        stream.update_pass(lambda u, b, o: ([x + 1.0 for x in b], o), ahead=True)
        # uploaded ahead into the next pass: two slots besides the newest write-back's
        assert set(stream._uploaded) == ({(0,), (1,)} if wrap else set())
        assert len(stream.schedule.window) == 3
        stream.drain()
    np.testing.assert_array_equal(np.asarray(store.blocks[4]), np.full((2,), 6.0))


def test_a_unit_not_uploaded_ahead_waits_only_for_its_own_slot():
    """After a pass without uploads ahead (flush, then an eval), the next pass's first unit may
    wait for any slot it needs, but the lookahead after it still never waits on the write-backs
    of the `hold` units dispatched last; a read pass's uploads ahead get their optimiser
    states before the next update pass's first compute."""
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    n = 6
    store = BlockStore([jax.device_put(jnp.full((2,), float(i)), host) for i in range(n)],
                       [jax.device_put(jnp.full((), float(i)), host) for i in range(n)],
                       frozenset())
    stream = LoggingStream(store, dev, host, 4)
    assert stream.hold == 2

    def upd(u, b, o):
        return [x + 1.0 for x in b], [x + 1.0 for x in o]

    stream.update_pass(upd)  # like flush(): no uploads ahead
    stream.events.clear()
    stream.read_pass(lambda u, b: b[0], ahead=True)
    ev = stream.events
    first = ev.index(("compute", (0,)))
    assert ("wait", (4,)) not in ev[:first] and ("wait", (5,)) not in ev[:first], ev
    assert stream._uploaded and all(o is None for _, o in stream._uploaded.values())
    seen = []
    stream.update_pass(lambda u, b, o: seen.append((u, o)) or upd(u, b, o), ahead=True)
    for u, o in seen:  # every compute got device copies of its current optimiser states
        assert o is not None and float(o[0]) == float(u[0]) + 1.0
    stream.drain()
    np.testing.assert_array_equal(np.asarray(store.blocks[5]), np.full((2,), 7.0))


def test_a_failed_pass_waits_for_the_write_backs_it_leaves_running(monkeypatch):
    """reset() after an exception mid-pass still waits for the write-backs in flight, so the
    next pass neither exceeds W units on the device nor uploads from a host copy still being
    written."""
    import zo2_jax.offload._stream as stream_mod

    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    store = BlockStore([jax.device_put(jnp.full((2,), float(i)), host) for i in range(5)],
                       [jax.device_put(jnp.zeros(()), host) for i in range(5)], frozenset())
    stream = BlockStream(store, dev, host, 3)
    stream.update_pass(lambda u, b, o: ([x + 1.0 for x in b], o), ahead=True)
    pending = list(stream._tokens.values())
    assert pending
    waited = []
    real = stream_mod.jax.block_until_ready
    monkeypatch.setattr(stream_mod.jax, "block_until_ready",
                        lambda x: waited.append(x) or real(x))

    def boom(u, b):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        stream.read_pass(boom)
    assert all(any(t is w for w in waited) for t in pending)
    assert not stream.schedule.window and not stream._uploaded and not stream._tokens


@pytest.mark.parametrize("units_streamed", [1, 2])
def test_fewer_units_than_slots_never_upload_a_copy_still_written_back(units_streamed):
    """With fewer streamed units than W, the next pass's first unit may still be on its way back
    to the host: the stream waits for that write-back before uploading it again (an upload from
    a host copy still being written was 3x slower on an H200), except for the unit dispatched
    last, which the next pass's first compute waits for instead. Slots are released every pass
    (with the old bookkeeping a second slot of the same unit never was)."""
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    n = 4
    store = BlockStore([jax.device_put(jnp.full((4,), float(i)), host) for i in range(n)],
                       [jax.device_put(jnp.zeros(()), host) for i in range(n)], frozenset())
    stream = LoggingStream(store, dev, host, 3, make_units(n, frozenset(), n // units_streamed))
    assert len(stream.streamed) == units_streamed
    first, last = stream.streamed[0], stream.streamed[-1]

    def fn(u, blks, opts):
        return [b + 1.0 for b in blks], [o for o in opts]

    for _ in range(6):
        stream.update_pass(fn)
        stream.note("head", -1)
        stream.prefetch(with_opt=True)
        # prefetched: every unit but the one dispatched last (its write-back is the newest work)
        want = {u for u in stream.streamed if u != last}
        assert set(stream._uploaded) == want
        assert len(stream.schedule.window) <= 3
        assert [e.unit for e in stream.schedule.window].count(first) == 1  # one slot per unit
    ev = stream.events
    for k, e in enumerate(ev):  # every upload of a unit comes after the wait for its write-back
        if e[0] == "up" and ("compute", e[1]) in ev[:k]:
            back = max(j for j in range(k) if ev[j] == ("compute", e[1]))
            assert ("wait", e[1]) in ev[back:k], ev
    np.testing.assert_array_equal(np.asarray(store.blocks[3]), np.full((4,), 9.0))


@pytest.mark.slow
def test_blocks_given_as_callables_are_made_one_at_a_time():
    """Blocks may be zero-argument callables (load or create one block at a time): each is
    called once, in order, and the engine trains exactly as with the concrete blocks."""
    from zo2_jax.offload import Storage

    import gc
    import weakref

    calls, first = [], []

    def maker(i):
        def make():
            calls.append(i)
            if i == 2:  # block 0 was encoded by now: the engine must not keep the caller's copy
                gc.collect()
                assert first[-1]() is None, "block 0 kept alive while later blocks are made"
            b = jax.tree.map(jnp.array, PARAMS["blocks"][i])
            if i == 0:
                first.append(weakref.ref(jax.tree.leaves(b)[0]))
            return b
        return make

    kw = dict(tx=shared_sgd(), storage=Storage("int8", rounding="stochastic"))
    lazy = {"outer": PARAMS["outer"], "blocks": [maker(i) for i in range(len(PARAMS["blocks"]))]}
    n = len(PARAMS["blocks"])
    a, b = ZO2Engine(MODEL, PARAMS, **kw), ZO2Engine(MODEL, lazy, **kw)
    assert calls == list(range(n))
    c = MeZOEngine(MODEL, lazy, **kw)
    assert calls == list(range(n)) * 2
    for t in range(2):
        batch, key = counting_batch(jax.random.key(t)), jax.random.key(100 + t)
        a.step(batch, key), b.step(batch, key), c.step(batch, key)
    assert_trees_identical(a.params(), b.params(), "lazy blocks")
    assert_trees_identical(a.params(), c.params(), "lazy blocks, MeZO")

    bad = dict(lazy, blocks=list(lazy["blocks"]))
    bad["blocks"][1] = lambda: jax.tree.map(lambda x: x[..., :1], PARAMS["blocks"][1])
    with pytest.raises(ValueError, match=r"params\['blocks'\]\[1\]\(\) returned a block unlike"):
        ZO2Engine(MODEL, bad, **kw)
    with pytest.raises(ValueError, match="params must be a dict"):
        ZO2Engine(MODEL, dict(lazy, extra=1), **kw)
    made = []
    with pytest.raises(ValueError, match="eps must be"):  # checked before block 0 is made
        MeZOEngine(MODEL, {"outer": PARAMS["outer"], "blocks": [
            lambda: made.append(1) or PARAMS["blocks"][0]] * 3}, eps=-1.0)
    assert not made


def test_packed_auto_follows_the_block_size_and_is_validated(monkeypatch):
    import zo2_jax.offload.plan as zo2_mod

    assert ZO2Engine(MODEL, PARAMS, tx=shared_sgd()).packed  # tiny blocks: packed
    monkeypatch.setattr(zo2_mod, "PACK_AUTO_MAX_BYTES", 0)
    assert not ZO2Engine(MODEL, PARAMS, tx=shared_sgd()).packed
    assert ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), packed=True).packed
    assert not ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), resident_blocks=len(PARAMS["blocks"]),
                         packed=True).packed  # nothing streams: nothing to pack
    with pytest.raises(ValueError, match="packed must be True, False or 'auto'"):
        ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), packed="maybe")
    # with a device budget, packed blocks count the packed/unpacked copies that coexist
    kw = dict(tx=shared_sgd(), device_budget_bytes=1 << 40, batch_shape=(4, 8))
    on, off = ZO2Engine(MODEL, PARAMS, packed=True, **kw), ZO2Engine(MODEL, PARAMS, packed=False,
                                                                      **kw)
    assert on.footprint["transport"] == 2 * on.footprint["block"] and \
        "transport" not in off.footprint


def test_branches_auto_follows_the_perturbed_copy_size_and_is_validated(monkeypatch):
    import zo2_jax.offload.plan as zo2_mod

    assert ZO2Engine(MODEL, PARAMS, tx=shared_sgd()).branches == "fused"  # tiny blocks
    # auto compares one perturbed copy of a block, in the compute dtype, with the threshold
    n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(PARAMS["blocks"][0]))
    monkeypatch.setattr(zo2_mod, "SEQUENTIAL_AUTO_MIN_BYTES", 3 * n)
    sequential = ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), compute_dtype=jnp.float32)
    fused = ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), compute_dtype=jnp.bfloat16,
                      storage=Storage("bfloat16"))
    assert (sequential.branches, fused.branches) == ("sequential", "fused")
    # the schedule is the block function's own argument: the other stages share compiled code
    assert sequential.spec == ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), branches="fused").spec
    assert ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), branches="fused").branches == "fused"
    for bad in ("interleaved", None, True):
        with pytest.raises(ValueError, match=r"branches must be one of \['auto', 'fused', 'sequential'\]"):
            ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), branches=bad)


@pytest.mark.slow
def test_optimizer_states_that_cannot_all_be_packed():
    """A bool leaf (apply_if_finite) is packed as a byte; a PRNG key (add_noise) cannot be
    packed: 'auto' keeps such blocks unpacked, True says why it cannot."""
    import optax

    flag_tx = optax.apply_if_finite(optax.sgd(1e-3, momentum=0.9), 3)
    zo2 = ZO2Engine(MODEL, PARAMS, tx=flag_tx)
    mezo = MeZOEngine(MODEL, PARAMS, tx=flag_tx)
    assert zo2.packed
    for t in range(2):
        batch, key = counting_batch(jax.random.key(t)), jax.random.key(7 + t)
        zo2.step(batch, key), mezo.step(batch, key)
    assert_trees_identical(zo2.params(), mezo.params(), "bool optimiser state, packed")
    flags = [x for x in jax.tree.leaves(zo2.state()["opt_blocks"][0]) if x.dtype == bool]
    assert flags and all(bool(f) for f in flags)

    noisy = optax.chain(optax.add_noise(0.01, 0.55, 0), optax.sgd(1e-3))
    assert not ZO2Engine(MODEL, PARAMS, tx=noisy).packed
    with pytest.raises(ValueError, match="packed=True: a block or its optimiser state cannot"):
        ZO2Engine(MODEL, PARAMS, tx=noisy, packed=True)
    a = ZO2Engine(MODEL, PARAMS, tx=noisy, packed=False)
    a.step(counting_batch(jax.random.key(0)), jax.random.key(0))
    b = ZO2Engine(MODEL, PARAMS, tx=noisy, blocks_per_call=1)
    # the key leaves of the optimiser state pass the restore's checks (copied: a's device
    # arrays are donated by its next step)
    b.restore(jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, a.state()))
    for e in (a, b):
        e.step(counting_batch(jax.random.key(1)), jax.random.key(1))
    assert_trees_identical(a.params(), b.params(), "PRNG-key optimiser state, restored")


def test_auto_slots_and_blocks_per_call_follow_the_block_size_and_are_validated(monkeypatch):
    """max_inflight="auto": 4 slots for blocks up to INFLIGHT_AUTO_MAX_BYTES, else 3;
    blocks_per_call="auto": as many blocks as fit in UNIT_AUTO_BYTES while at least W + 2
    units stream; the stream holds back its waits on two units only with 4+ units."""
    import zo2_jax.offload.plan as zo2_mod
    from _toy import ToyModel

    eng = ZO2Engine(MODEL, PARAMS, tx=shared_sgd())
    # tiny blocks, but 3 of them: W = 4 and one block per unit (3 < W + 2), hold 1 (3 units)
    assert (eng.max_inflight, eng.blocks_per_call, eng._stream.hold) == (4, 1, 1)
    deep = ToyModel(num_blocks=12)
    deep_params = deep.init(jax.random.key(0))
    eng = ZO2Engine(deep, deep_params, tx=shared_sgd())
    assert (eng.max_inflight, eng.blocks_per_call, eng._stream.hold) == (4, 2, 2)  # 12 // 6
    assert [len(u) for u in eng._stream.streamed] == [2] * 6
    eng = ZO2Engine(deep, deep_params, tx=shared_sgd(), max_inflight=2)
    assert (eng.max_inflight, eng.blocks_per_call, eng._stream.hold) == (2, 3, 1)  # 12 // 4
    eng = ZO2Engine(deep, deep_params, tx=shared_sgd(), resident_blocks=6)
    assert eng.blocks_per_call == 1 and len(eng._stream.streamed) == 6  # 6 streamed // 6
    # resident blocks given as a numpy array; auto units over the streamed ones only
    eng = ZO2Engine(deep, deep_params, tx=shared_sgd(), resident_blocks=np.array([0, 11]))
    assert eng.resident_blocks == {0, 11} and eng.blocks_per_call == 1  # 10 // 6
    # with a budget, "auto" falls back to 3 slots where 4 do not fit (as the old default)
    from zo2_jax.offload.plan import _need
    fp = ZO2Engine(deep, deep_params, tx=shared_sgd(), packed=False, max_inflight=3,
                   blocks_per_call=2, batch_shape=(4, 8), device_budget_bytes=10**9).footprint
    budget = _need(fp, 12, 0, 3 * 2)  # W=3 x G=2 fits exactly; W=4 x G=2 does not
    eng = ZO2Engine(deep, deep_params, tx=shared_sgd(), packed=False, batch_shape=(4, 8),
                    device_budget_bytes=budget)
    assert (eng.max_inflight, eng.blocks_per_call, eng.resident_blocks) == (3, 2, frozenset())
    with pytest.raises(ValueError, match="max_inflight=4 x blocks_per_call=2"):
        ZO2Engine(deep, deep_params, tx=shared_sgd(), packed=False, batch_shape=(4, 8),
                  device_budget_bytes=budget, max_inflight=4)
    per_block = eng.plan.block_bytes
    monkeypatch.setattr(zo2_mod, "UNIT_AUTO_BYTES", 2 * per_block)
    eng = ZO2Engine(deep, deep_params, tx=shared_sgd(), packed=False, max_inflight=1)
    assert [len(u) for u in eng._stream.streamed] == [2] * 6 and eng.blocks_per_call == 2
    monkeypatch.setattr(zo2_mod, "UNIT_AUTO_BYTES", 1)
    assert ZO2Engine(deep, deep_params, tx=shared_sgd(), packed=False).blocks_per_call == 1
    monkeypatch.setattr(zo2_mod, "INFLIGHT_AUTO_MAX_BYTES", per_block - 1)
    eng = ZO2Engine(deep, deep_params, tx=shared_sgd(), packed=False)
    assert (eng.max_inflight, eng._stream.hold) == (3, 1)
    for bad in (0, -1, True, 2.5, "many", None, np.array([2, 3])):
        with pytest.raises(ValueError, match="blocks_per_call must be an int >= 1 or 'auto'"):
            ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), blocks_per_call=bad)
        with pytest.raises(ValueError, match="max_inflight must be an int >= 1 or 'auto'"):
            ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), max_inflight=bad)



def test_pinned_pool_limit_reads_xla_s_variable():
    from types import SimpleNamespace

    from zo2_jax.offload.plan import pinned_pool_limit

    gpu, cpu = SimpleNamespace(platform="gpu"), SimpleNamespace(platform="cpu")
    key = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
    assert pinned_pool_limit(gpu, {}) == 64 << 30  # XLA's default
    assert pinned_pool_limit(gpu, {key: "400"}) == 400 << 30
    assert pinned_pool_limit(gpu, {key: "lots"}) == 64 << 30  # XLA keeps its default too
    assert pinned_pool_limit(cpu, {key: "1"}) is None  # no pinned pool on the CPU backend


def test_host_memory_check_names_the_limit_and_the_fix():
    from zo2_jax.offload import HostMemoryError
    from zo2_jax.offload.plan import check_host_memory

    check_host_memory(10 << 30, 64 << 30, 512 << 30)  # fits: nothing said
    with pytest.raises(HostMemoryError, match=r"need about 375\.8 GB of pinned host memory, "
                                              r"over the 68\.7 GB \(64 GiB\).*"
                                              r"XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB to at least "
                                              r"351 \(GiB\)"):
        check_host_memory(350 << 30, 64 << 30, None)
    with pytest.warns(RuntimeWarning, match=r"more than the 34\.4 GB this host reports"):
        check_host_memory(40 << 30, None, 32 << 30)


def test_engine_refuses_blocks_over_the_pinned_pool_before_placing_them(monkeypatch):
    """The refusal comes before any block is written to the host: of lazily given blocks only
    block 0 (made for the argument checks) was made. The count includes the units in flight."""
    import zo2_jax.offload.plan as zo2_mod
    from zo2_jax.offload import HostMemoryError

    calls = []

    def maker(i):
        def make():
            calls.append(i)
            return PARAMS["blocks"][i]
        return make

    n = len(PARAMS["blocks"])
    lazy = {"outer": PARAMS["outer"], "blocks": [maker(i) for i in range(n)]}
    per_block = ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), max_inflight=1,
                          blocks_per_call=1).streamed_bytes() // n
    monkeypatch.setattr(zo2_mod, "host_total_bytes", lambda: None)
    # n stored blocks + W=2 units of 1 block being written back
    monkeypatch.setattr(zo2_mod, "pinned_pool_limit", lambda dev: (n + 2) * per_block)
    ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), max_inflight=2, blocks_per_call=1)
    monkeypatch.setattr(zo2_mod, "pinned_pool_limit", lambda dev: (n + 2) * per_block - 1)
    with pytest.raises(HostMemoryError, match="pinned host memory"):
        ZO2Engine(MODEL, lazy, tx=shared_sgd(), max_inflight=2, blocks_per_call=1)
    assert calls == [0]
    # resident blocks are not counted: one block fewer on the host fits again
    ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), max_inflight=2, blocks_per_call=1,
              resident_blocks=[0])


def test_a_training_step_makes_one_transfer_call_per_streamed_unit(monkeypatch):
    """Each unit's write-back goes out in one device_put with the uploads that follow it, and a
    batch and key already on the device are not put there again: a device_put costs ~0.2 ms of
    host time, which bounds small models' steps (BENCHMARKS.md call 9)."""
    import zo2_jax.offload._stream as stream_mod

    engine = ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), resident_blocks=0, max_inflight=3,
                       blocks_per_call=1)
    n_units = len(engine._stream.streamed)
    assert n_units >= 3
    dev = engine._dev
    batch = jax.device_put(counting_batch(jax.random.key(0)), dev)
    for t in range(2):
        engine.step(batch, jax.random.key(t))
    calls = []
    real = stream_mod.jax.device_put
    monkeypatch.setattr(stream_mod.jax, "device_put", lambda x, s, **kw: calls.append(
        (jax.tree.structure(x), s)) or real(x, s, **kw))
    uploads = []
    monkeypatch.setattr(engine._stream, "_payload", lambda u, w, f=engine._stream._payload:
                        uploads.append(u) or f(u, w))
    m = engine.step(batch, jax.device_put(jax.random.key(7), dev))  # committed: not put again
    assert np.isfinite(float(m["loss"]))
    # a unit's write-back and the uploads after it; then the prefetch after the head, if any
    assert len(calls) <= n_units + 1, calls
    assert sorted(uploads) == sorted(engine._stream.streamed), uploads  # each unit once a step
    # a batch given on the host still works, and is put on the device
    m = engine.step(counting_batch(jax.random.key(1)), jax.random.key(8))
    assert np.isfinite(float(m["loss"]))


def test_to_device_moves_only_what_is_not_there():
    engine = ZO2Engine(MODEL, PARAMS, tx=shared_sgd())
    on = {"a": jax.device_put(jnp.ones(3), engine._dev)}
    assert engine._to_device(on) is on
    loose = {"a": jnp.ones(3)}  # on the device, uncommitted: passed too (no put per step)
    assert not loose["a"].committed and engine._to_device(loose) is loose
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    for tree in ({"a": np.ones(3)}, {"a": jax.device_put(jnp.ones(3), host)}):
        out = engine._to_device(tree)
        assert out["a"].sharding == engine._dev
        np.testing.assert_array_equal(np.asarray(out["a"]), np.ones(3))


def test_a_loop_mixing_committed_and_uncommitted_inputs_trains_the_same():
    """Uncommitted keys and batches are passed through, not put (committed) on every step; a
    loop switching between the two compiles each pattern once and computes the same step."""
    ref = ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), resident_blocks=0)
    mixed = ZO2Engine(MODEL, PARAMS, tx=shared_sgd(), resident_blocks=0)
    dev = mixed._dev
    for t in range(4):
        batch, key = counting_batch(jax.random.key(t)), jax.random.fold_in(jax.random.key(9), t)
        ref.step(batch, key)
        if t % 2:
            batch, key = jax.device_put(batch, dev), jax.device_put(key, dev)
            assert key.committed
        else:
            assert not key.committed and not batch["input_ids"].committed
        mixed.step(batch, key)
    ref.flush()
    mixed.flush()
    assert_trees_identical(mixed.state(), ref.state(), "mixed inputs")
