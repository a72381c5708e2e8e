"""Exact resume under every engine option that changes state: q > 1, Rademacher directions,
clip_norm, int8 storage (with a resident block in ZO2), several blocks per call (ZO2), for both
engines.

Each case saves mid-stream: right after `step` returns, with no flush and no wait, so the step's
device work (and, in ZO2, the next step's uploads, prefetched after the head) is still in flight.
Then, against a run that never stopped: the saving run continues undisturbed; a fresh engine
restores the checkpoint and continues; and (ZO2) an engine that has run a step of its own, its
prefetched uploads in flight, restores `save(state())` and continues. All must hold the same
parameters, optimiser states, pending update and counters, bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _toy import MODEL, PARAMS, counting_batch
from test_offload_exactness import assert_trees_identical
from zo2_jax import Estimator
from zo2_jax.offload import Storage, ZO2Engine
from zo2_jax.train.checkpoint import Checkpointer
from zo2_jax.zo import MeZOEngine

# One transform object for every case (a state to save: momentum); equal specs share compiles.
TX = optax.sgd(1e-3, momentum=0.9)
CLIP = 5.0
# option name: (kwargs of both engines, ZO2-only kwargs, engines it applies to)
OPTIONS = {
    "q2": (dict(num_directions=2), {}, ("mezo", "zo2")),
    "rademacher": (dict(directions="rademacher"), {}, ("mezo", "zo2")),
    "clip_norm": (dict(clip_norm=CLIP), {}, ("mezo", "zo2")),
    "int8-resident1": (dict(storage=Storage("int8", rounding="stochastic")),
                       dict(resident_blocks=1), ("mezo", "zo2")),
    "blocks_per_call2": ({}, dict(blocks_per_call=2), ("zo2",)),
    # the estimators: FZOO's q >= 2; HiZOO's H in the optimiser state, its curvatures pending;
    # Sparse-MeZO's thresholds in the optimiser state (with clip_norm: its Gram is masked too)
    "fzoo": (dict(num_directions=2, estimator="fzoo"), {}, ("mezo", "zo2")),
    "sparse": (dict(num_directions=2, estimator=Estimator("sparse", fraction=0.3),
                    clip_norm=CLIP), {}, ("mezo", "zo2")),
    "hizoo": (dict(num_directions=2, estimator=Estimator("hizoo", smooth=0.05)), {},
              ("mezo", "zo2")),
    "all": (dict(num_directions=2, directions="rademacher", clip_norm=CLIP,
                 storage=Storage("int8", rounding="stochastic")),
            dict(resident_blocks=1, blocks_per_call=2), ("mezo", "zo2")),
}
# The default suite runs every option at once in ZO2 (one compilation); each alone is slow.
DEFAULT = {("zo2", "all")}
N, K = 4, 2  # steps in all; the checkpoint is written after step K
BATCHES = [counting_batch(jax.random.key(t)) for t in range(N)]


def _cases():
    for name, (_, _, engines) in OPTIONS.items():
        for engine in engines:
            marks = () if (engine, name) in DEFAULT else (pytest.mark.slow,)
            yield pytest.param(engine, name, marks=marks, id=f"{engine}-{name}")


def _make(engine: str, option: str, params=PARAMS):
    shared, zo2_only, _ = OPTIONS[option]
    if engine == "mezo":
        return MeZOEngine(MODEL, params, tx=TX, **shared)
    return ZO2Engine(MODEL, params, tx=TX, **shared, **zo2_only)


def _run(engine, steps) -> list:
    return [engine.step(BATCHES[t], jax.random.key(100 + t)) for t in steps]


def _zeros():
    return jax.tree.map(jnp.zeros_like, PARAMS)


@pytest.mark.parametrize("engine,option", list(_cases()))
def test_resume_mid_stream_is_exact(tmp_path, engine, option):
    straight = _make(engine, option)
    metrics = _run(straight, range(N))
    if "clip_norm" in OPTIONS[option][0]:  # the clip is exercised
        assert all(float(m["grad_norm"]) > CLIP for m in metrics)
    if OPTIONS[option][0].get("num_directions", 1) > 1:
        assert np.shape(metrics[-1]["projected_grad"]) == (2,)

    first = _make(engine, option)
    _run(first, range(K))
    # mid-stream: no flush, no block_until_ready; ZO2's uploads for step K are in flight
    if engine == "zo2":
        assert first._stream._uploaded, "no upload of the next step in flight at the save"
    ck = Checkpointer(str(tmp_path / "engine"), asynchronous=True)
    ck.save_engine(K, first, {"pos": K}, {"step": K})
    whole = None
    if engine == "zo2":  # the other way to save: the whole state() through save()
        whole = Checkpointer(str(tmp_path / "state"), asynchronous=True)
        whole.save(K, first.state(), {"pos": K}, {"step": K})
    _run(first, range(K, N))  # the saving run goes on undisturbed
    ck.wait()

    fresh = _make(engine, option, _zeros())
    assert ck.restore_engine(fresh) == ({"pos": K}, {"step": K})
    _run(fresh, range(K, N))
    resumed = {"saving run": first, "save_engine -> fresh engine": fresh}

    if whole is not None:
        whole.wait()
        used = _make(engine, option, _zeros())
        _run(used, [N - 1])  # a step of its own: its pending update and prefetched uploads
        state, data, meta = whole.restore(K, used.state())
        used.restore(state)
        assert (data, meta) == ({"pos": K}, {"step": K})
        _run(used, range(K, N))
        resumed["save(state()) -> used engine"] = used

    want = straight.state()
    for what, e in resumed.items():
        assert_trees_identical(want, e.state(), f"{engine}-{option}: {what}, state")
    want = straight.params()
    for what, e in resumed.items():
        assert_trees_identical(want, e.params(), f"{engine}-{option}: {what}, params")
