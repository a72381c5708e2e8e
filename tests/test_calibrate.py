"""zo2_jax.offload.calibrate: the most directions a bus-bound ZO2 step takes for free."""

import jax
import jax.numpy as jnp
import pytest

import zo2_jax.models as zm
from zo2_jax.offload import Storage
from zo2_jax.offload.calibrate import directions_for_bus, zo2_step_timer
from zo2_jax.zo import mezo_sgd


def test_doubles_q_while_the_step_stays_within_tolerance():
    # a bus-bound step of 1 s until the compute (0.3 s per direction) passes it
    asked = []

    def time_step(q):
        asked.append(q)
        return max(1.0, 0.3 * q)
    assert directions_for_bus(time_step) == (2, {1: 1.0, 2: 1.0, 4: 1.2})
    assert asked == [1, 2, 4]  # stops at the first q over the tolerance
    assert directions_for_bus(time_step, tolerance=0.25)[0] == 4
    # compute-bound from the start: q stays 1; a cap is respected
    assert directions_for_bus(lambda q: float(q))[0] == 1
    assert directions_for_bus(lambda q: 1.0, max_directions=12) == (8, {1: 1.0, 2: 1.0, 4: 1.0,
                                                                           8: 1.0})
    assert directions_for_bus(lambda q: 1.0, start=2, max_directions=8)[0] == 8  # FZOO: q >= 2


@pytest.mark.parametrize("kw, message", [
    (dict(start=0), "start"), (dict(start=4, max_directions=2), "start"),
    (dict(tolerance=-0.1), "tolerance"), (dict(tolerance=float("nan")), "tolerance")])
def test_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        directions_for_bus(lambda q: 1.0, **kw)


def _tiny():
    cfg = zm.DecoderConfig(model_type="gpt2", vocab_size=64, hidden_size=16, num_layers=4,
                           num_heads=2, intermediate_size=32, max_positions=32)
    return zm.Model(cfg)


def test_timer_refuses_what_it_cannot_time():
    class NoInit:
        pass
    with pytest.raises(TypeError, match="init_block"):
        zo2_step_timer(NoInit(), {})
    with pytest.raises(ValueError, match="layers"):
        zo2_step_timer(_tiny(), {}, layers=0)
    with pytest.raises(TypeError, match="sets num_directions itself"):
        zo2_step_timer(_tiny(), {}, num_directions=2)


@pytest.mark.slow
def test_timer_times_a_zo2_step_on_fewer_layers():
    model = _tiny()
    ids = jnp.zeros((2, 8), jnp.int32)
    time_step = zo2_step_timer(model, {"input_ids": ids}, layers=2, steps=2, warmup=1,
                               tx=mezo_sgd(1e-6), storage=Storage("bfloat16"),
                               estimator="fzoo")
    q, seconds = directions_for_bus(time_step, start=2, max_directions=4, tolerance=10.0)
    assert q == 4 and set(seconds) == {2, 4}
    assert all(0 < s < 60 for s in seconds.values())
    assert jax.devices()  # the engines ran on the default device
