"""benchmarks/pack_memory.py (compiled memory, nothing executed) on the smallest preset."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import pack_memory  # noqa: E402


@pytest.mark.slow
def test_both_branch_schedules_report_memory(capsys):
    rows = {}
    for branches in ("fused", "sequential"):
        pack_memory.main(["--model", "opt_125m", "--seq", "64", "--only-block",
                          "--branches", branches])
        row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        rows[branches] = row
        fn = row["block_fn"]
        assert row["branches"] == branches and "unit_packed" not in row
        # the stored block is donated: its output aliases the argument
        assert fn["alias_size_in_bytes"] > 0 and fn["temp_size_in_bytes"] > 0
    assert rows["fused"]["block_gb"] == rows["sequential"]["block_gb"]


@pytest.mark.slow
def test_packed_units_of_two_blocks_report_memory(capsys):
    pack_memory.main(["--model", "opt_125m", "--seq", "64", "--blocks-per-call", "2"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["blocks_per_call"] == 2
    for k in ("block_fn", "unit_packed"):
        # two blocks' arguments, each donated and aliased by its output
        assert row[k]["argument_size_in_bytes"] >= 2 * row["block_gb"] * 0.99
        assert row[k]["alias_size_in_bytes"] > 0
