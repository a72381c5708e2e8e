"""benchmarks/probes/pack_memory.py (compiled memory, nothing executed) on the smallest preset,
run as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "probes", "pack_memory.py")


def run(*args) -> dict:
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_both_branch_schedules_report_memory():
    rows = {}
    for branches in ("fused", "sequential"):
        row = rows[branches] = run("--model", "opt_125m", "--seq", "64", "--only-block",
                                   "--branches", branches)
        fn = row["block_fn"]
        assert row["branches"] == branches and "unit_packed" not in row
        # the stored block is donated: its output aliases the argument
        assert fn["alias_size_in_bytes"] > 0 and fn["temp_size_in_bytes"] > 0
    assert rows["fused"]["block_gb"] == rows["sequential"]["block_gb"]


@pytest.mark.slow
def test_packed_units_of_two_blocks_report_memory():
    row = run("--model", "opt_125m", "--seq", "64", "--blocks-per-call", "2")
    assert row["blocks_per_call"] == 2
    for k in ("block_fn", "unit_packed"):
        # two blocks' arguments, each donated and aliased by its output
        assert row[k]["argument_size_in_bytes"] >= 2 * row["block_gb"] * 0.99
        assert row[k]["alias_size_in_bytes"] > 0
