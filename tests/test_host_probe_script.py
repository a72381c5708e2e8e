"""benchmarks/host_probe.py: a tiny CPU run of the probe and its per-call breakdown."""

import json
import os
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import host_probe  # noqa: E402


@pytest.mark.slow
def test_tiny_run_splits_the_host_time_and_restores_jax(tmp_path, capsys):
    put, wait = jax.device_put, jax.block_until_ready
    row = host_probe.main(["--model", "opt_125m", "--layers", "2", "--vocab-size", "256",
                           "--seq", "16", "--steps", "2", "--reps", "1", "--only-alone",
                           "--breakdown", "--blocks-per-call", "1",
                           "--json-out", str(tmp_path / "p.jsonl")])
    assert jax.device_put is put and jax.block_until_ready is wait  # the wrappers are gone
    a = row["alone"]["zo2"]
    assert a["step_ms"] > 0 and a["busy_ms"] >= 0 and a["wait_ms"] >= 0
    calls = row["breakdown"]["by_call"]
    # per step: one unit call per streamed unit, an outer stage and a head, and one transfer
    # call per unit (its write-back with the uploads after it) at most, plus a prefetch
    assert calls["unit_fn"]["per_step"] == row["units"] == 2
    assert calls["outer_fn"]["per_step"] == calls["head_fn"]["per_step"] == 1
    assert calls["device_put"]["per_step"] <= row["units"] + 1
    assert "Ordered by" in capsys.readouterr().err  # the cProfile
    assert json.loads((tmp_path / "p.jsonl").read_text())["breakdown"] == row["breakdown"]


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        host_probe.main(["--steps", "1"])
    assert "--steps must be >= 2" in capsys.readouterr().err
