"""What a new user meets: checkpoints that describe themselves, clear errors for bad input,
Ctrl-C, and the command line's help."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

import zo2_jax.models as zm
from zo2_jax import cli
from zo2_jax.train import trainer as T
from zo2_jax.train.checkpoint import Checkpointer
from zo2_jax.train.config import TrainConfig

from _tiny import make_tiny_model

TINY = ["--batch-size", "4", "--eval-examples", "32", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _json_line(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


def _tensors(folder) -> dict:
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.slow
def test_eval_and_export_of_a_checkpoint_need_no_training_flags(tiny, tmp_path, monkeypatch,
                                                                capsys):
    """Trained with non-default engine, storage, lr, schedule and directions; the last checkpoint
    holds a pending update. eval and export with only --checkpoint-dir apply it as training did."""
    monkeypatch.chdir(tmp_path)
    train_flags = ["--engine", "zo2", "--storage-dtype", "bfloat16", "--lr", "3e-3",
                   "--schedule", "cosine", "--directions", "rademacher", "--eps", "1e-2"]
    assert cli.main(["train", "--model", tiny, *train_flags, "--steps", "6",
                     "--checkpoint-dir", "ck", "--checkpoint-every", "3", "--export-dir", "trained",
                     "--out-dir", "out", *TINY]) == 0
    res = _json_line(capsys.readouterr().out)
    assert Checkpointer("ck").all_steps() == [3, 6]

    assert cli.main(["eval", "--checkpoint-dir", "ck"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == res["after"]
    assert cli.main(["export", "--checkpoint-dir", "ck", "--out", "exported"]) == 0
    capsys.readouterr()
    mine, theirs = _tensors("trained"), _tensors("exported")
    assert sorted(mine) == sorted(theirs)
    for name in mine:
        np.testing.assert_array_equal(mine[name], theirs[name], err_msg=name)
    assert os.path.exists("exported/tokenizer.json")

    # The pending update matters: applied with the default lr it gives another model.
    meta = T.read_checkpoint_meta("ck")
    wrong = TrainConfig.from_dict({**meta["config"], "lr": 1e-5})
    model, params, _ = T.load_model(wrong)
    engine = T.make_engine(wrong, model, params)
    Checkpointer("ck", read_only=True).restore_engine(engine)
    zm.save_pretrained(model, engine.params(), "wrong")
    wrong_lr = _tensors("wrong")
    assert any(not np.array_equal(mine[n], wrong_lr[n]) for n in mine)

    # A flag that contradicts the checkpoint is refused, naming the saved value; others noted.
    assert cli.main(["eval", "--checkpoint-dir", "ck", "--storage-dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert "--storage-dtype 'float32' contradicts" in err and "storage_dtype='bfloat16'" in err
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 1e-5\n")
    assert cli.main(["export", "--checkpoint-dir", "ck", "--config", str(cfg_file),
                     "--out", "x"]) == 2
    assert "lr=0.003" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint-dir", "ck", "--eval-examples", "16"]) == 0
    out = capsys.readouterr()
    assert "note: eval_examples: the checkpoint's run used 32; using 16" in out.err
    assert json.loads(out.out.strip().splitlines()[-1])["eval_count"] == 16


@pytest.mark.slow
def test_resume_reads_its_config_and_reports_the_first_evaluation(tiny, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--model", tiny, "--lr", "2e-3", "--steps", "3",
                     "--checkpoint-dir", "ck", "--out-dir", "out", *TINY]) == 0
    first = _json_line(capsys.readouterr().out)
    # Nothing but the checkpoint and the new length: the model, lr and data come from it.
    assert cli.main(["train", "--checkpoint-dir", "ck", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    again = _json_line(out)
    assert again["resumed_from"] == 3 and again["steps"] == 2
    assert again["before"] == first["before"]
    assert "note: steps: the checkpoint's run used 3; using 5 as given" in out
    assert T.read_checkpoint_meta("ck")["config"]["lr"] == 2e-3
    # What the saved run's data depends on cannot change on resume.
    assert cli.main(["train", "--checkpoint-dir", "ck", "--steps", "7",
                     "--batch-size", "2"]) == 2
    assert "--batch-size 2 contradicts" in capsys.readouterr().err
    # Nor, from Python, the model.
    other = make_tiny_model(tmp_path / "other", layers=3)
    with pytest.raises(ValueError, match="--model .* contradicts"):
        T.train(TrainConfig(model=other, checkpoint_dir="ck", steps=7, batch_size=4,
                            lr=2e-3, eval_examples=32, progress=False))


@pytest.mark.slow
def test_a_moved_model_and_a_checkpoint_of_another_model(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = str(tmp_path / "m")
    shutil.copytree(tiny, model)
    assert cli.main(["train", "--model", model, "--steps", "2", "--checkpoint-dir", "ck",
                     "--out-dir", "out", *TINY]) == 0
    capsys.readouterr()
    os.rename(model, tmp_path / "moved")
    assert cli.main(["eval", "--checkpoint-dir", "ck"]) == 2
    assert "which is not there any more: pass --model" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint-dir", "ck", "--model", str(tmp_path / "moved")]) == 0
    assert "not there any more; using" in capsys.readouterr().err
    other = make_tiny_model(tmp_path / "three", layers=3)
    for command in (["eval"], ["train", "--no-progress"]):
        assert cli.main([*command, "--checkpoint-dir", "ck", "--model", other]) == 2
        err = capsys.readouterr().err
        assert "is saved with shape (2, 32, 16), this model's is (3, 32, 16)" in err, err
        assert "written for another model" in err


def test_config_files_and_values(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-5\nsteps: 7\nlabel_words: [' bad', ' good']\n")
    cfg = cli.config_from_args(cli.build_parser().parse_args(["train", "--config", str(p)]))
    assert (cfg.lr, cfg.steps, cfg.label_words) == (1e-5, 7, (" bad", " good"))
    p.write_text("lr: 1e-5\n  steps: 7\n")
    assert cli.main(["train", "--config", str(p)]) == 2
    assert "not valid YAML at line 2" in capsys.readouterr().err
    p.write_text("label_words: great\n")
    assert cli.main(["train", "--config", str(p)]) == 2
    assert "label_words must be a list of words" in capsys.readouterr().err
    p.write_text("lr: fast\n")
    assert cli.main(["train", "--config", str(p)]) == 2
    assert "lr must be a number, got 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["train"], ["eval"]])
def test_a_bad_data_file_is_reported_before_the_model_loads(tmp_path, monkeypatch, capsys,
                                                             command):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 1}\n{"text": "no label"}\n')

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(T, "load_model", no_load)
    flag = "--train-file" if command == ["train"] else "--eval-file"
    assert cli.main([*command, flag, str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "label" in err, err


def test_help_lists_each_commands_own_options(capsys):
    helps = {}
    for command in ("train", "eval", "export", "generate"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    from zo2_jax.train.config import flat_fields

    for name in flat_fields():  # TrainConfig's and the nested engine options' fields
        assert "--" + name.replace("_", "-") in helps["train"], name
    assert "--packed {auto,yes,no}" in helps["train"] and "--eps X" in helps["train"]
    assert "--lr" not in helps["eval"] and "--steps" not in helps["export"]
    assert "--eval-file" in helps["eval"] and "--eval-file" not in helps["generate"]
    assert "--checkpoint-dir" in helps["export"] and "--out" in helps["export"]
    assert "(default: 1e-05)" in helps["train"] and "(default: 200)" in helps["train"]
    top = " ".join(cli.build_parser().format_help().split())
    assert "SmolLM2-135M-Instruct" in top and "runs/demo/model" in top


_CTRL_C_TIMEOUT = 180


def _interrupted_run(tiny, tmp_path, *extra):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "zo2_jax.cli", "train", "--model", tiny, "--steps", "100000",
         "--out-dir", str(out), *TINY, *extra], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, t = out / "metrics.jsonl", time.time()
    try:
        while time.time() - t < _CTRL_C_TIMEOUT:
            time.sleep(0.3)
            if metrics.exists() and metrics.read_text().count('"train"') >= 3:
                break
        else:
            pytest.fail("the run logged no training steps in time")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=_CTRL_C_TIMEOUT)
    finally:
        proc.kill()
    return proc.returncode, stdout, stderr


@pytest.mark.slow
def test_ctrl_c_saves_the_last_step_and_says_how_to_resume(tiny, tmp_path):
    code, stdout, stderr = _interrupted_run(tiny, tmp_path, "--checkpoint-dir", "ck",
                                            "--lr", "2e-3")
    assert code == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "Ctrl-C: stopping after this step" in stdout
    assert "resume with: zo2-jax train --checkpoint-dir ck" in stderr, stderr
    saved = Checkpointer(str(tmp_path / "ck")).all_steps()
    assert len(saved) == 1 and f"saved step {saved[0]} in" in stderr
    # The saved step resumes (from Python here), with the run's own settings.
    res = T.train(TrainConfig(checkpoint_dir=str(tmp_path / "ck"), steps=saved[0] + 1,
                              model=tiny, lr=2e-3, batch_size=4, eval_examples=32,
                              progress=False, out_dir=str(tmp_path / "out")), log=lambda s: None)
    assert res.resumed_from == saved[0] and res.steps == 1

    (tmp_path / "x").mkdir()
    code, _, stderr = _interrupted_run(tiny, tmp_path / "x")
    assert code == 130 and "Traceback" not in stderr, stderr
    assert "nothing was saved (no checkpoint_dir)" in stderr


def test_a_reading_command_leaves_unfinished_saves_alone(tmp_path):
    """eval / export / generate may run beside a training run that is writing a checkpoint: they
    open the folder read-only, so orbax's clean-up of unfinished saves is not theirs to do."""
    ck = Checkpointer(str(tmp_path), asynchronous=False)
    ck.save(1, {"a": np.zeros(3)}, {"position": 1}, {"step": 1})
    ck.close()
    unfinished = tmp_path / "2.orbax-checkpoint-tmp-1764720000"  # orbax names them so
    (unfinished / "state").mkdir(parents=True)
    reader = Checkpointer(str(tmp_path), read_only=True)
    assert reader.read_meta() == {"step": 1, "engine_meta": None}
    reader.wait()
    reader.close()
    assert T.read_checkpoint_meta(str(tmp_path))["step"] == 1
    assert unfinished.exists()
    writer = Checkpointer(str(tmp_path), asynchronous=False)  # the training side cleans it
    writer.save(2, {"a": np.ones(3)}, {"position": 2}, {"step": 2})  # up before its next save
    writer.close()
    assert not unfinished.exists()
    assert T.read_checkpoint_meta(str(tmp_path))["step"] == 2


def test_save_pretrained_writes_the_tokenizer_of_the_source(tiny, tmp_path):
    import transformers

    model, params = zm.load(tiny)
    assert model.source == tiny
    out = zm.save_pretrained(model, params, str(tmp_path / "out"))  # no tokenizer=
    ref = zm.load_tokenizer(tiny)
    assert transformers.AutoTokenizer.from_pretrained(out)("It was great")["input_ids"] == \
        ref("It was great")["input_ids"]
    bare = zm.Model(model.config)  # built, not loaded: nothing to take a tokenizer from
    with pytest.warns(UserWarning, match="no tokenizer written"):
        zm.save_pretrained(bare, params, str(tmp_path / "bare"))
    assert not (tmp_path / "bare" / "tokenizer.json").exists()


def test_calibrate_refuses_bad_flags_before_loading_a_model(capsys):
    for flags, why in ((["--layers", "0"], "--layers, --max-directions and --calibrate-steps"),
                       (["--tolerance", "-1"], "--tolerance must be >= 0"),
                       (["--estimator", "fzoo", "--max-directions", "1"],
                        "the fzoo estimator needs at least 2 directions"),
                       (["--model", "/nonexistent/model"], "/nonexistent/model")):
        assert cli.main(["calibrate", *flags]) == 2
        assert why in capsys.readouterr().err


@pytest.mark.slow
def test_calibrate_times_the_run_and_names_the_directions(tiny, capsys):
    assert cli.main(["calibrate", "--model", tiny, "--estimator", "fzoo", "--max-directions", "4",
                     "--layers", "1", "--calibrate-steps", "1", *TINY[:2]]) == 0
    out = capsys.readouterr().out
    res = _json_line(out)
    assert res["num_directions"] in (2, 4) and res["estimator"] == "fzoo"
    assert set(res["seconds_per_step"]) <= {"2", "4"} and "2" in res["seconds_per_step"]
    assert res["layers"] == 1 and res["batch"]["input_ids"][0] == 4
    assert f"Train with --num-directions {res['num_directions']}." in out
