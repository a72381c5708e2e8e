"""The stream schedule read as data: no arrays, no jax, only the ops each pass issues."""

import itertools
import random

import pytest

from zo2_jax.offload.plan import make_units, stream_hold
from zo2_jax.offload.schedule import Op, Schedule, simulate


def test_steady_state_of_a_training_loop_reads_as_written():
    """W = 3, one resident block and four streamed ones, two steps: the first step uploads three
    units ahead; from then on each write-back carries the upload two units ahead, and the host
    waits only for the write-back before last."""
    (_, first), (_, second) = simulate([(0,), (1,), (2,), (3,), (4,)], frozenset({0}), 3, 1,
                                       ["update+", "update+"])
    assert [repr(op) for op in first] == [
        "compute[0] resident",
        "upload[1] #1 +opt", "upload[2] #2 +opt", "upload[3] #3 +opt",
        "compute[1]", "write_back[1] #1",
        "compute[2]", "wait[1] #1", "write_back[2] #2 [upload[4] #4 +opt]",
        "compute[3]", "wait[2] #2", "write_back[3] #3 [upload[1] #5 +opt]",
        "compute[4]", "wait[3] #3", "write_back[4] #4 [upload[2] #6 +opt]"]
    assert [repr(op) for op in second] == [
        "compute[0] resident",
        "compute[1]", "wait[4] #4", "write_back[1] #5 [upload[3] #7 +opt]",
        "compute[2]", "wait[1] #5", "write_back[2] #6 [upload[4] #8 +opt]",
        "compute[3]", "wait[2] #6", "write_back[3] #7 [upload[1] #9 +opt]",
        "compute[4]", "wait[3] #7", "write_back[4] #8 [upload[2] #10 +opt]"]


def test_one_slot_serialises_upload_compute_and_write_back():
    (_, ops), = simulate([(0,), (1,), (2,)], frozenset(), 1, 1, ["update"])
    assert [repr(op) for op in ops] == [
        "upload[0] #1 +opt", "compute[0]", "write_back[0] #1",
        "wait[0] #1", "upload[1] #2 +opt", "compute[1]", "write_back[1] #2",
        "wait[1] #2", "upload[2] #3 +opt", "compute[2]", "write_back[2] #3"]


def test_a_read_pass_frees_a_slot_at_its_compute_and_uploads_without_optimiser_states():
    (_, ops), (_, upd) = simulate([(0, 1), (2, 3), (4, 5)], frozenset(), 3, 1,
                                  ["read+", "update"])
    assert not [op for op in ops if op.kind == "write_back"]
    assert all(not op.with_opt for op in ops if op.kind == "upload")
    assert [op for op in ops if op.kind == "compute"] == [
        Op("compute", (0, 1), 1), Op("compute", (2, 3), 2), Op("compute", (4, 5), 3)]
    # the next update pass first sends the optimiser states of the units read ahead
    assert [op for op in upd if op.kind == "opts"] == [Op("opts", (0, 1)), Op("opts", (2, 3))]
    assert upd.index(Op("opts", (2, 3))) < upd.index(Op("compute", (0, 1)))


def _check(units, resident, W, hold, passes, wrap):
    """Invariants of any schedule: at most W slots; each streamed unit computed once per pass on
    an upload made for it (with optimiser states in update passes); resident units never move;
    no wait on the tickets of the `hold` units dispatched last (W > 1), except to fetch a unit
    the next compute needs that was not uploaded ahead; no upload of a unit
    whose write-back has not been waited for; each ticket waited at most once; a drain leaves
    nothing to wait for."""
    streamed = [u for u in units if u[0] not in resident]
    slots, live, on_device, waited = 0, {}, {}, set()
    recent: list = []   # tickets of units dispatched, newest last
    backs: dict = {}    # unit -> ticket of its write-back not yet waited for
    for p, ops in simulate(units, resident, W, hold, passes, wrap):
        computed = []
        for k, op in enumerate(ops):
            ups = [op] if op.kind == "upload" else list(op.uploads)
            if op.kind == "wait":
                assert op.ticket in live and op.ticket not in waited, (p, op)
                nxt = next((o.unit for o in ops[k:] if o.kind == "compute"), None)
                fetching = nxt is not None and nxt not in on_device and nxt[0] not in resident
                if W > 1 and p != "drain" and not fetching:  # a unit not uploaded ahead may
                    assert op.ticket not in recent[-hold:], (p, op, recent)  # wait on any
                waited.add(op.ticket)
                del live[op.ticket]
                if backs.get(op.unit) == op.ticket:
                    del backs[op.unit]
                slots -= 1
            elif op.kind == "opts":
                assert on_device[op.unit] is False
                on_device[op.unit] = True
            elif op.kind == "compute" and op.resident:
                assert op.unit[0] in resident and len(op.unit) == 1
                computed.append(op.unit)
            elif op.kind == "compute":
                assert op.unit in on_device, (p, op)
                with_opt = on_device.pop(op.unit)  # a read pass may get optimiser states too
                assert with_opt or p.startswith("read"), (p, op)
                computed.append(op.unit)
                if p.startswith("read"):
                    recent.append(op.ticket)
                else:  # its write-back is the newest work from here on (the waits that
                    back = next(o for o in ops[k:] if o.kind == "write_back")  # precede it
                    assert back.unit == op.unit  # free slots for the uploads it carries)
                    recent.append(back.ticket)
            elif op.kind == "write_back":
                assert p.startswith("update") and computed[-1] == op.unit
                backs[op.unit] = op.ticket
            for up in ups:
                assert up.unit in streamed and up.unit not in on_device
                assert up.unit not in backs, (p, up, "uploaded before its write-back ended")
                live[up.ticket] = up.unit
                on_device[up.unit] = up.with_opt
                slots += 1
                assert slots <= W, (p, op)
        if p == "drain":
            assert not backs, backs
            slots, live, on_device = 0, {}, {}
        if p.startswith(("update", "read")):
            assert computed == list(units), (p, computed)


@pytest.mark.parametrize("seed", range(4))
def test_every_schedule_keeps_the_invariants(seed):
    rng = random.Random(seed)
    kinds = ["update", "update+", "read", "read+", "prefetch", "prefetch-opt", "drain"]
    for n, group, W, wrap in itertools.product((1, 3, 4, 7), (1, 2, 3), (1, 2, 3, 4, 6),
                                               (True, False)):
        for resident in (frozenset(), frozenset({0}), frozenset({n // 2})):
            if len(resident) == n:
                continue
            units = make_units(n, resident, group)
            n_streamed = len([u for u in units if u[0] not in resident])
            for hold in sorted({stream_hold(W, n_streamed), 1, 3}):
                passes = [rng.choice(kinds) for _ in range(8)] + ["drain"]
                _check(units, resident, W, hold, passes, wrap)


def test_lookahead_runs_into_the_next_pass_only_when_asked():
    units = [(i,) for i in range(6)]
    for wrap, ahead in itertools.product((True, False), (True, False)):
        s = Schedule(units, frozenset(), 4, 2, wrap)
        s.update_pass(ahead=ahead)
        assert set(s.uploaded) == ({(0,), (1,)} if wrap and ahead else set())
        # a prefetch after the head fills the slots left: hold = 2 keeps two for write-backs
        ups = [op.unit for op in s.prefetch(with_opt=True) if op.kind == "upload"]
        assert ups == ([] if wrap and ahead else [(0,), (1,)]), (wrap, ahead, ups)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="once each"):
        Schedule([(0,), (2,)], frozenset(), 2, 1)
    with pytest.raises(ValueError, match="mix resident and streamed"):
        Schedule([(0, 1), (2,)], frozenset({1}), 2, 1)
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="hold must be an int >= 1"):
            Schedule([(0,)], frozenset(), 2, bad)
        with pytest.raises(ValueError, match="max_inflight must be an int >= 1"):
            Schedule([(0,)], frozenset(), bad, 1)
    with pytest.raises(ValueError, match="unknown pass 'step'"):
        simulate([(0,)], frozenset(), 1, 1, ["step"])


def test_the_schedule_module_imports_only_the_standard_library():
    import ast
    import sys

    import zo2_jax.offload.schedule as mod
    tree = ast.parse(open(mod.__file__).read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names
