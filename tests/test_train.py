"""The trainer: exact resume, a run killed mid-checkpoint, metrics and plot, CLI errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from zo2_jax import cli
from zo2_jax.train.config import TrainConfig
from zo2_jax.train.trainer import train

from _tiny import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _cfg(tiny, tmp, **kw):
    base = dict(model=tiny, steps=6, batch_size=4, lr=1e-3, eps=1e-2, eval_examples=16,
                out_dir=str(tmp / "out"), progress=False, seed=3)
    base.update(kw)
    return TrainConfig.from_dict(base)


def _leaves(engine):
    return [np.asarray(x) for x in jax.tree.leaves(engine.params())]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("engine,optimizer,storage", [("mezo", "sgd", "float32"),
                                                      ("zo2", "adam", "bfloat16")])
@pytest.mark.slow
def test_resume_is_bit_exact(tiny, tmp_path, engine, optimizer, storage):
    kw = dict(engine=engine, optimizer=optimizer, storage_dtype=storage)
    full = train(_cfg(tiny, tmp_path / "a", **kw), log=lambda s: None)
    # Same run, stopped at step 4 (checkpointed), then resumed to 6 from the checkpoint.
    ck = str(tmp_path / "ck")
    part = _cfg(tiny, tmp_path / "b", steps=4, checkpoint_dir=ck, checkpoint_every=2, **kw)
    train(part, log=lambda s: None)
    resumed = train(part.replace(steps=6), log=lambda s: None)
    assert resumed.steps == 2
    _assert_same(_leaves(full.engine), _leaves(resumed.engine))
    recs = [json.loads(line) for line in open(resumed.metrics_path)]
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert steps == list(range(6))  # the log continues: earlier steps kept, none doubled


@pytest.mark.slow
def test_metrics_and_plot(tiny, tmp_path):
    res = train(_cfg(tiny, tmp_path, eval_every=3, num_directions=2), log=lambda s: None)
    recs = [json.loads(line) for line in open(res.metrics_path)]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert len(train_recs) == 6
    for key in ("loss", "projected_grad", "tokens_per_s", "step_s", "skipped_total",
                "host_rss_bytes"):
        assert key in train_recs[0], key
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [0, 3, 6]
    assert os.path.getsize(res.plot_path) > 1000


_KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from zo2_jax.train.config import TrainConfig
from zo2_jax.train.trainer import train
cfg = TrainConfig.from_dict(dict(
    model={model!r}, steps=400, batch_size=4, lr=1e-3, eps=1e-2, eval_examples=8,
    out_dir={out!r}, progress=False, seed=3, checkpoint_dir={ck!r}, checkpoint_every=1,
    keep_checkpoints=2, engine={engine!r}))
train(cfg, log=lambda s: print(s, flush=True))
"""


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["mezo", "zo2"])  # zo2: blocks one file each (save_engine)
def test_killed_during_checkpointing_resumes_exactly(tiny, tmp_path, engine):
    ck = str(tmp_path / "ck")
    script = _KILL_SCRIPT.format(tests=os.path.dirname(__file__), model=tiny,
                                 out=str(tmp_path / "o1"), ck=ck, engine=engine)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # checkpoints are written every step, so a kill lands in or near a save
        deadline = time.time() + 240
        while time.time() < deadline:
            done = [d for d in os.listdir(ck) if d.isdigit()] if os.path.isdir(ck) else []
            if len(done) >= 2 and int(max(done, key=int)) >= 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the training subprocess wrote no checkpoints in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Resume to step 8 from whatever survived, and compare with an uninterrupted run.
    base = _cfg(tiny, tmp_path / "x", steps=8, eval_examples=8, batch_size=4, engine=engine)
    resumed = train(base.replace(checkpoint_dir=ck, checkpoint_every=1, keep_checkpoints=2,
                                 out_dir=str(tmp_path / "o2")), log=lambda s: None)
    full = train(base, log=lambda s: None)
    _assert_same(_leaves(full.engine), _leaves(resumed.engine))


@pytest.mark.parametrize("argv,message", [
    (["train", "--engine", "zo3"], "invalid choice: 'zo3'"),
    (["train", "--lr", "nan"], "lr must be a finite number > 0"),
    (["train", "--eps", "0"], "eps must be a finite number > 0"),
    (["train", "--steps", "-1"], "steps must be a finite number > 0"),
    (["train", "--model", "/nonexistent/model"], "no such file or folder"),
    (["train", "--train-file", "/nonexistent.jsonl"], "train_file"),
    (["train", "--engine", "mezo", "--resident-blocks", "2"], "apply to engine='zo2' only"),
    (["train", "--checkpoint-every", "5"], "checkpoint_dir is not"),
    (["train", "--engine", "mezo", "--packed", "no"], "apply to engine='zo2' only"),
    (["train", "--engine", "zo2", "--packed", "maybe"], "invalid choice: 'maybe'"),
    (["train", "--engine", "mezo", "--branches", "sequential"], "apply to engine='zo2' only"),
    (["train", "--engine", "zo2", "--branches", "interleaved"], "invalid choice: 'interleaved'"),
    (["train", "--engine", "zo2", "--blocks-per-call", "many"], "expected an int or 'auto'"),
    (["train", "--engine", "zo2", "--blocks-per-call", "0"], "blocks_per_call must be an int"),
    (["train", "--engine", "mezo", "--blocks-per-call", "2"], "apply to engine='zo2' only"),
    (["train", "--engine", "zo2", "--max-inflight", "0"], "max_inflight must be an int"),
    (["train", "--engine", "zo2", "--max-inflight", "some"], "expected an int or 'auto'"),
    (["train", "--engine", "mezo", "--max-inflight", "4"], "apply to engine='zo2' only"),
    (["train", "--storage-dtype", "int4"], "invalid choice: 'int4'"),
    (["train", "--schedule", "cosine", "--warmup-steps", "500", "--steps", "100"],
     "warmup_steps"),
    (["train", "--task", "lm"], "task='lm' needs a train_file"),
    (["generate", "--max-new-tokens", "0"], "max-new-tokens must be >= 1"),
])
def test_cli_rejects_bad_flags_before_loading(argv, message, capsys):
    t = time.time()
    parse_error = "invalid choice" in message or "expected an int" in message  # argparse's own
    with pytest.raises(SystemExit) if parse_error else _nullcontext():
        code = cli.main(argv)
        assert code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert time.time() - t < 5  # nothing heavy was started


def test_cli_config_file(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.0\n")
    assert cli.main(["train", "--config", str(p)]) == 2
    assert "lr must be a finite number > 0" in capsys.readouterr().err
    p.write_text("learning_rate: 1.0\n")
    assert cli.main(["train", "--config", str(p)]) == 2
    assert "unknown config keys ['learning_rate']" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    p.write_text("engine: zo2\npacked: no\n")  # YAML reads no as false: the same choice
    assert cli.config_from_args(cli.build_parser().parse_args(
        ["train", "--config", str(p)])).stream.packed is False


def test_cli_flags_override_config_file(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"lr": 0.5, "steps": 7}))
    args = cli.build_parser().parse_args(["train", "--config", str(p), "--steps", "9"])
    cfg = cli.config_from_args(args)
    assert (cfg.lr, cfg.steps) == (0.5, 9)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_zo2_placement_options_reach_the_engine():
    from _toy import MODEL, PARAMS

    from zo2_jax.train.trainer import make_engine

    from zo2_jax.offload import StreamOptions

    cfg = TrainConfig(engine="zo2", progress=False, stream=StreamOptions(
        packed=False, branches="sequential", max_inflight=2, resident_blocks=1,
        blocks_per_call=1))
    eng = make_engine(cfg, MODEL, PARAMS)
    assert (eng.packed, eng.branches, len(eng.resident_blocks)) == (False, "sequential", 1)
    assert (eng.blocks_per_call, eng.max_inflight) == (1, 2)
    eng = make_engine(TrainConfig(engine="zo2", progress=False), MODEL, PARAMS)
    # "auto" on three tiny blocks: packed, fused, 4 slots, one block per call (3 < W + 2)
    assert (eng.packed, eng.branches, eng.max_inflight, eng.blocks_per_call) == (
        True, "fused", 4, 1)
    eng = make_engine(TrainConfig(engine="zo2", progress=False).replace(blocks_per_call=3),
                      MODEL, PARAMS)
    assert eng.blocks_per_call == 3


def test_cli_says_when_the_host_cannot_hold_the_blocks(tiny, tmp_path, capsys, monkeypatch):
    """A model over the pinned pool's limit (XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB on a GPU) is
    refused at the engine's start with the variable to set; the CLI prints it and exits 2."""
    import zo2_jax.offload.plan as zo2_mod

    monkeypatch.setattr(zo2_mod, "pinned_pool_limit", lambda dev: 1 << 10)
    code = cli.main(["train", "--model", tiny, "--engine", "zo2", "--steps", "1",
                     "--out-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "zo2-jax train: error: ZO2Engine: the streamed blocks" in err
    # the blocks' GiB rounded up, plus one for the pool's own overhead
    assert "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB to at least 2 (GiB)" in err
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")
