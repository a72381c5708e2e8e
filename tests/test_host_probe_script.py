"""benchmarks/probes/host_probe.py, run as a user runs it: a tiny CPU run of the probe and its
per-call breakdown, and its refusal of too few steps."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "probes", "host_probe.py")


def run(*args, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_tiny_run_splits_the_host_time_and_restores_jax(tmp_path):
    proc = run("--model", "opt_125m", "--layers", "2", "--vocab-size", "256", "--seq", "16",
               "--steps", "2", "--reps", "1", "--only-alone", "--breakdown",
               "--blocks-per-call", "1", "--json-out", str(tmp_path / "p.jsonl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    # its wrappers of jax and of the engine's functions are gone after the breakdown
    assert row["breakdown"]["restored"] is True
    a = row["alone"]["zo2"]
    # the host's time inside step() (busy + waits) is part of the step's wall time
    assert a["busy_ms"] + a["wait_ms"] <= a["step_ms"] + 0.002
    calls = row["breakdown"]["by_call"]
    # per step: one unit call per streamed unit, an outer stage and a head, and one transfer
    # call per unit (its write-back with the uploads after it) at most, plus a prefetch
    assert calls["unit_fn"]["per_step"] == row["units"] == 2
    assert calls["outer_fn"]["per_step"] == calls["head_fn"]["per_step"] == 1
    assert calls["device_put"]["per_step"] <= row["units"] + 1
    assert "Ordered by" in proc.stderr  # the cProfile
    assert json.loads((tmp_path / "p.jsonl").read_text()) == row


def test_bad_arguments_are_named():
    proc = run("--steps", "1", timeout=120)
    assert proc.returncode == 2 and "--steps must be >= 2" in proc.stderr
