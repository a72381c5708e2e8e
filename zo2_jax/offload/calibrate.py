"""Spending a bus-bound step's idle compute: the most directions a ZO2 step takes for free.

Where the bus bounds a ZO2 step (each streamed block up and down once per step), the device
waits for transfers. More directions add two forward passes each (FZOO: one) to every block
while it is on the device, and cost no wall-clock until the compute catches up with the bus: a
better estimate (q directions averaged) in the same step time.

`directions_for_bus(time_step)` finds that q by measurement: it doubles q from `start` while the
measured step time stays within `tolerance` of the time at `start`. `zo2_step_timer(model,
batch, ...)` is the usual `time_step`: a ZO2 engine over random parameters of the model's shapes
(optionally fewer layers: the ratio of compute to bus time is per block), timed for a few steps.

    time_step = zo2_step_timer(model, batch, layers=8, storage=Storage("bfloat16"))
    q, seconds = directions_for_bus(time_step)   # seconds: {q: step time}

The choice changes the estimate, so it is a measurement to make once per model, batch shape and
machine, not something an engine does behind a user's back: pass the q it gives to the engine.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def directions_for_bus(time_step: Callable[[int], float], *, start: int = 1,
                       max_directions: int = 32, tolerance: float = 0.05) -> tuple[int, dict]:
    """The largest q in start, 2 start, 4 start, ... <= max_directions whose step time is at most
    (1 + tolerance) x the step time at `start` (every q before it passing too).

    Args:
      time_step: q -> seconds per step with q directions (e.g. `zo2_step_timer`).
      start: the smallest q (2 for FZOO, which needs two).
      max_directions: the largest q tried.
      tolerance: the step-time increase still counted as free (measurement noise).

    Returns:
      (q, {q: seconds}) with every q measured.
    """
    if start < 1 or max_directions < start:
        raise ValueError(f"need 1 <= start <= max_directions, got start={start}, "
                         f"max_directions={max_directions}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    seconds = {start: float(time_step(start))}
    best, q = start, 2 * start
    while q <= max_directions:
        seconds[q] = float(time_step(q))
        if seconds[q] > (1.0 + tolerance) * seconds[start]:
            break
        best, q = q, 2 * q
    return best, seconds


def zo2_step_timer(model, batch: dict, *, layers: int = None, steps: int = 5, warmup: int = 2,
                   seed: int = 0, param_dtype=jnp.bfloat16, **engine_kwargs
                   ) -> Callable[[int], float]:
    """time_step(q) for `directions_for_bus`: the mean seconds per step of a `ZO2Engine` with
    num_directions=q over `steps` steps run back to back (as training runs them: uploads run on
    into the next step), after `warmup` steps, over random parameters of `model`'s shapes (each
    block made on the device when the engine takes it).

    Args:
      model: a model with `init_block(key, dtype)` and `init_outer(key, dtype)` (the zo2_jax
        decoders); `layers` (a zo2_jax decoder only) times a model of that many blocks instead.
      batch: a batch of the shape the run will use.
      engine_kwargs: the run's other `ZO2Engine` arguments (storage, estimator, tx, ...).
    """
    for name in ("init_block", "init_outer"):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"zo2_step_timer makes random parameters with model.{name}(key, "
                            f"dtype); {type(model).__name__} has none")
    if layers is not None:
        if not callable(getattr(model, "with_num_layers", None)):
            raise TypeError(f"layers= needs a zo2_jax decoder (a model with with_num_layers); "
                            f"{type(model).__name__} has none")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        model = model.with_num_layers(layers)
    if steps < 1 or warmup < 1:
        raise ValueError(f"steps and warmup must be >= 1 (the first step compiles), got "
                         f"steps={steps}, warmup={warmup}")
    if "num_directions" in engine_kwargs:
        raise TypeError("zo2_step_timer sets num_directions itself (the q it is called with)")
    from zo2_jax.offload._zo2 import ZO2Engine

    key = jax.random.key(seed)
    init_block = jax.jit(lambda k: model.init_block(k, param_dtype))
    outer = jax.jit(lambda k: model.init_outer(k, param_dtype))(jax.random.fold_in(key, 2**31 - 1))

    def time_step(q: int) -> float:
        params = {"outer": outer, "blocks": [lambda i=i: init_block(jax.random.fold_in(key, i))
                                             for i in range(model.num_blocks)]}
        engine = ZO2Engine(model, params, num_directions=q, **engine_kwargs)
        for t in range(warmup):
            jax.block_until_ready(engine.step(batch, jax.random.fold_in(key, t)))
        t0 = time.perf_counter()
        for t in range(steps):
            m = engine.step(batch, jax.random.fold_in(key, warmup + t))
        jax.block_until_ready(m)
        seconds = (time.perf_counter() - t0) / steps
        del engine
        return seconds

    return time_step


__all__ = ["directions_for_bus", "zo2_step_timer"]
