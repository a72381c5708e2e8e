"""Checkpoints of adapters over a frozen base: the adapters and their optimiser state are
saved, the base is not (its SHA-256 is); a restore rebuilds the state around the engine's own
base, refuses another base, and resumes bit for bit in either engine."""

import os

import jax
import numpy as np
import optax
import pytest

from test_exactness_archs import batches, make_model
from test_offload_exactness import assert_trees_identical, comparable_state
from zo2_jax.models.lora import lora
from zo2_jax.offload import Storage, ZO2Engine
from zo2_jax.train.checkpoint import FROZEN_BASE, Checkpointer
from zo2_jax.zo import MeZOEngine

KW = dict(eps=1e-3, storage=Storage("bfloat16"))
ENGINES = {
    "zo2-packed": lambda m, p: ZO2Engine(m, p, optax.adam(1e-3), packed=True, max_inflight=2,
                                         **KW),
    "zo2-unpacked-resident": lambda m, p: ZO2Engine(m, p, optax.adam(1e-3), packed=False,
                                                    resident_blocks=1, **KW),
    "mezo": lambda m, p: MeZOEngine(m, p, optax.adam(1e-3), **KW),
}


def _setup(seed=3, base_change=None):
    base, params = make_model("llama-gqa-rope-scaling")
    if base_change is not None:
        params = base_change(params)
    model = lora(base, rank=2)
    return model, model.adapt(params, jax.random.key(seed))


def _run(engine, steps):
    for t, batch in zip(steps, batches(max(steps) + 1)[min(steps):]):
        engine.step(batch, jax.random.fold_in(jax.random.key(11), t))


def _saved_paths(step_dir):
    """Every array path a checkpoint holds: its orbax state item's and its block files'."""
    import json

    import orbax.checkpoint as ocp
    from etils import epath
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / "state")
    tree = getattr(tree, "tree", tree)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    index = os.path.join(step_dir, "blocks", "index.json")
    if os.path.exists(index):
        with open(index) as f:
            paths += [lf["path"] for b in json.load(f)["blocks"] for lf in b["leaves"]]
    return paths


SLOW = pytest.mark.slow


@pytest.mark.parametrize("src,dst", [
    ("zo2-packed", "zo2-packed"), pytest.param("zo2-unpacked-resident", "mezo", marks=SLOW),
    pytest.param("zo2-packed", "zo2-unpacked-resident", marks=SLOW),
    pytest.param("mezo", "mezo", marks=SLOW)])
def test_adapters_alone_are_saved_and_resume_exactly(tmp_path, src, dst):
    model, ap = _setup()
    straight = ENGINES[dst](model, ap)
    _run(straight, range(4))
    first = ENGINES[src](model, ap)
    _run(first, range(2))  # a pending update is part of the checkpoint
    ck = Checkpointer(str(tmp_path / "ck"), asynchronous=False)
    ck.save_engine(2, first, {"pos": 2}, {"step": 2})
    paths = _saved_paths(tmp_path / "ck" / "2")
    assert any("'lora'" in p for p in paths) and not any("'base'" in p for p in paths), paths
    saved = ck.read_meta(2)[FROZEN_BASE]
    assert saved == {"key": "base", "sha256": first.base_digest()}
    # a new engine over the same base with other adapters: the checkpoint's replace them
    resumed = ENGINES[dst](*_setup(seed=4))
    assert resumed.base_digest() == first.base_digest()  # the same base, either engine
    data, meta = Checkpointer(str(tmp_path / "ck")).restore_engine(resumed)
    assert (data, meta) == ({"pos": 2}, {"step": 2, FROZEN_BASE: saved})
    _run(resumed, range(2, 4))
    assert_trees_identical(comparable_state(straight), comparable_state(resumed),
                           f"{src} -> {dst}: resumed vs straight")


@pytest.mark.parametrize("dst", ["zo2-packed", pytest.param("mezo", marks=SLOW)])
def test_a_checkpoint_is_refused_onto_another_base_before_the_engine_changes(tmp_path, dst):
    model, ap = _setup()
    first = ENGINES["zo2-packed"](model, ap)
    _run(first, range(1))
    ck = Checkpointer(str(tmp_path / "ck"), asynchronous=False)
    ck.save_engine(1, first, {}, {"step": 1})

    def nudge(params):  # one weight of the last block, one bf16 step
        blocks = list(params["blocks"])
        q = blocks[-1]["attn"]["q"]["kernel"]
        blocks[-1] = {**blocks[-1], "attn": {**blocks[-1]["attn"], "q": {
            **blocks[-1]["attn"]["q"], "kernel": q.at[0, 0].add(0.5)}}}
        return {**params, "blocks": blocks}

    other = ENGINES[dst](*_setup(base_change=nudge))
    before = comparable_state(other)
    with pytest.raises(ValueError, match="trained over a base with SHA-256"):
        ck.restore_engine(other)
    assert_trees_identical(before, comparable_state(other), "untouched")
    # a model without adapters cannot take it either
    base, params = make_model("llama-gqa-rope-scaling")
    with pytest.raises(ValueError, match="has no adapters"):
        ck.restore_engine(MeZOEngine(base, params, optax.adam(1e-3), **KW))


def test_a_resumed_run_keeps_its_adapter_settings():
    """The adapters' settings are the checkpoint's model: a resume that changes one is refused;
    a config saved before `lora_base` became `base_format` still reads."""
    from zo2_jax.train.config import TrainConfig, against_checkpoint, saved_config
    saved = saved_config(TrainConfig(adapter="lora", lora_rank=4, base_format="Q4_0"))
    for given, flag in (({"lora_rank": 8}, "--lora-rank 8"), ({"adapter": "none"},
                                                                "--adapter 'none'")):
        with pytest.raises(ValueError, match=f"{flag} contradicts the checkpoint"):
            against_checkpoint(saved, given, "train", "ck")
    old = dict(saved)
    old["lora_base"] = old.pop("base_format")
    cfg, _ = against_checkpoint(old, {}, "train", "ck")
    assert (cfg.adapter, cfg.lora_rank, cfg.base_format) == ("lora", 4, "Q4_0")
    with pytest.raises(ValueError, match="num_prefix must be an integer >= 1, got 0"):
        TrainConfig(num_prefix=0)
