"""benchmarks/probes/precision_accuracy.py, run as a user runs it: end to end on a tiny model
(summary, plot, table, rows of the benchmark record that benchmarks/table.py prints), and its
checks of --settings."""

import json
import os
import subprocess
import sys

import pytest

from _tiny import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "probes", "precision_accuracy.py")


def run(*args, timeout=60):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_two_settings_same_data_and_keys(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    out, record = tmp_path / "out", tmp_path / "record.jsonl"
    proc = run("--model", model, "--steps", "3", "--batch", "4", "--eval-examples", "8",
               "--lr", "1e-3", "--eps", "1e-2", "--settings", "fp32,bf16-nearest",
               "--out", str(out), "--record", str(record), "--call", "p1", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "summary.json") as fh:
        saved = json.load(fh)
    assert os.path.getsize(out / "precision_accuracy.png") > 1000
    rows = saved["results"]
    assert [r["setting"] for r in rows] == ["fp32", "bf16-nearest"]
    for r in rows:
        assert len(r["loss"]) == 3 and r["eval_count"] == 8 and r["skipped"] == 0
        assert 0 <= r["acc_before"] <= 1 and 0 <= r["acc_after"] <= 1
        assert os.path.exists(os.path.join(out, r["setting"], "metrics.jsonl"))
    fp32, bf16 = rows
    # Same batches and keys: bf16 storage only perturbs the weights by its rounding, so the
    # first step's loss is close to float32's but not bit-equal (the storage is really bf16).
    assert fp32["loss"][0] == pytest.approx(bf16["loss"][0], rel=1e-2)
    assert fp32["loss"][0] != bf16["loss"][0]
    assert fp32["drift"]["init_rounding_rel_norm"] == 0.0
    assert 0 < bf16["drift"]["init_rounding_rel_norm"] < 1e-2
    assert fp32["drift"]["update_rel_norm"] > 0
    # Same keys, and at lr 1e-3 an update is far above bf16's rounding step: round-to-nearest
    # keeps nearly all of it, so bf16's update points where fp32's does.
    assert bf16["drift"]["cos_to_fp32_update"] > 0.99
    # Streamed bytes are at storage precision: bf16 moves half of float32's (up to the 512-byte
    # alignment of each array inside a packed block, not negligible in a tiny model).
    assert bf16["streamed_bytes_per_step"] * 2 == pytest.approx(fp32["streamed_bytes_per_step"],
                                                                rel=0.05)
    printed = proc.stdout.strip().splitlines()
    assert printed[-4].startswith("| setting | acc before | acc after | final mean loss")
    assert printed[-1].startswith(f"| bf16-nearest | {bf16['acc_before']:.3f} | "
                                  f"{bf16['acc_after']:.3f} |")
    # the record rows, one per setting, print as BENCHMARKS.md's precision table
    rec = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(r["call"], r["kind"], r["setting"], r["acc_after"]) for r in rec] == [
        ("p1", "precision", r["setting"], r["acc_after"]) for r in rows]
    table = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "table.py"),
                            str(record)], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert f"| bf16-nearest | {bf16['acc_before']:.3f} | **{bf16['acc_after']:.3f}** |" \
        in table.stdout


@pytest.mark.parametrize("settings", ["fp32,bf17", "fp32,fp32", "fp32@abc", "int8-sr@-1", ""])
def test_bad_settings_are_rejected(settings):
    proc = run("--settings", settings, "--dry-run")
    assert proc.returncode == 2 and "--settings" in proc.stderr


def test_setting_with_its_own_lr():
    proc = run("--settings", "fp32,fp32@1e-5", "--lr", "3e-5", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["fp32: storage float32, rounding nearest, lr 3e-05",
                                        "fp32@1e-5: storage float32, rounding nearest, lr 1e-05"]
