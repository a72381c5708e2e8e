"""The ZO2 plan: made before the engine, printable, followed when given, refused when foreign."""

import dataclasses

import jax
import numpy as np
import pytest

from _toy import MODEL, PARAMS, ToyModel, counting_batch, shared_sgd
from test_offload_exactness import assert_trees_identical
from zo2_jax.offload import Plan, Storage, ZO2Engine, make_plan
from zo2_jax.offload import plan as planning

BF16 = Storage("bfloat16", rounding="stochastic")


@pytest.mark.parametrize("options", [
    {},
    {"resident_blocks": 1, "max_inflight": 2, "packed": False, "branches": "sequential"},
    {"blocks_per_call": 2, "storage": BF16},
])
def test_make_plan_is_the_plan_the_engine_follows(options):
    plan = make_plan(MODEL, PARAMS, shared_sgd(), **options)
    engine = ZO2Engine(MODEL, PARAMS, shared_sgd(), **options)
    assert engine.plan == plan
    assert (engine.max_inflight, engine.packed, engine.branches, engine.blocks_per_call,
            engine.resident_blocks) == (plan.max_inflight, plan.packed, plan.branches,
                                        plan.blocks_per_call, plan.resident)
    assert plan.streamed_bytes == engine.streamed_bytes()  # the plan's bytes are what moves
    assert plan.units == tuple(engine._stream.units) and plan.hold == engine._stream.hold


def test_the_plan_says_what_it_chose_and_why():
    plan = make_plan(MODEL, PARAMS, shared_sgd())
    text = str(plan)
    n = PARAMS["blocks"].__len__()
    assert f"ZO2 plan: {n} blocks, 0 resident, {n} streamed" in text
    for choice in (f"max_inflight={plan.max_inflight}", f"packed={plan.packed}",
                   f"branches={plan.branches}", f"blocks_per_call={plan.blocks_per_call}"):
        assert any(r.startswith(choice) for r in plan.reasons), (choice, plan.reasons)
    assert "device peak: not estimated" in text
    given = make_plan(MODEL, PARAMS, shared_sgd(), max_inflight=2, packed=False,
                      branches="fused", blocks_per_call=1)
    assert given.reasons == ()  # nothing was left to choose


def test_the_device_estimate_is_the_one_a_budget_plans_with():
    kw = dict(batch_shape=(4, 8), max_inflight=2, packed=False, blocks_per_call=1)
    plan = make_plan(MODEL, PARAMS, shared_sgd(), **kw)
    fp = plan.footprint
    n = len(PARAMS["blocks"])
    assert plan.device_bytes == fp["outer"] + fp["activations"] + 2 * fp["block"]
    budget = make_plan(MODEL, PARAMS, shared_sgd(), device_budget_bytes=plan.device_bytes + 1,
                       **kw)
    assert budget.resident == frozenset() and budget.device_bytes == plan.device_bytes
    roomy = make_plan(MODEL, PARAMS, shared_sgd(), device_budget_bytes=10**9, **kw)
    assert roomy.resident == frozenset(range(n)) and roomy.streamed_bytes == 0
    assert any("resident blocks" in r for r in roomy.reasons)
    assert "estimated" in str(roomy)


def test_an_engine_follows_a_changed_plan_with_the_same_results():
    plan = make_plan(MODEL, PARAMS, shared_sgd())
    serial = dataclasses.replace(plan, max_inflight=1, hold=1)
    a = ZO2Engine(MODEL, PARAMS, shared_sgd(), plan=serial)
    b = ZO2Engine(MODEL, PARAMS, shared_sgd())
    assert a.plan is serial and a._stream.max_inflight == 1
    for t in range(2):
        batch, key = counting_batch(jax.random.key(t)), jax.random.key(10 + t)
        ma, mb = a.step(batch, key), b.step(batch, key)
        assert np.array_equal(np.asarray(ma["loss"]), np.asarray(mb["loss"]))
    assert_trees_identical(a.params(), b.params(), "plan with W=1 vs the automatic plan")


def test_a_plan_with_placement_options_or_for_another_model_is_refused():
    plan = make_plan(MODEL, PARAMS, shared_sgd())
    with pytest.raises(ValueError, match=r"plan= decides the placement; leave \['max_inflight', "
                                         r"'packed'\] unset"):
        ZO2Engine(MODEL, PARAMS, shared_sgd(), plan=plan, max_inflight=2, packed=False)
    with pytest.raises(ValueError, match="plan= was made for .* blocks of .* bytes; this engine"):
        ZO2Engine(MODEL, PARAMS, shared_sgd(), plan=plan, storage=BF16)  # other block bytes
    deep = ToyModel(num_blocks=4)
    with pytest.raises(ValueError, match=f"made for {plan.num_blocks} blocks"):
        ZO2Engine(deep, deep.init(jax.random.key(0)), shared_sgd(), plan=plan)
    with pytest.raises(ValueError, match="do not cover blocks"):
        ZO2Engine(MODEL, PARAMS, shared_sgd(), plan=dataclasses.replace(plan, units=((0,),)))


def test_step_time_bound_is_the_slowest_of_compute_and_the_transfers():
    plan = make_plan(MODEL, PARAMS, shared_sgd(), packed=False)
    p = plan.streamed_bytes
    assert p > 0
    assert plan.step_time_bound(up=p, down=2 * p, both=4 * p) == 1.0  # the upload bounds it
    assert plan.step_time_bound(up=4 * p, down=4 * p, both=p) == 2.0  # both ways at once
    assert plan.step_time_bound(up=4 * p, down=4 * p, both=8 * p, compute=3.0) == 3.0


def test_stream_hold_rule():
    assert [planning.stream_hold(w, 8) for w in (1, 2, 3, 4, 6)] == [1, 1, 1, 2, 2]
    assert planning.stream_hold(4, 3) == 1  # three units: hold = 2 would leave no lookahead
    assert isinstance(make_plan(MODEL, PARAMS, shared_sgd()), Plan)
