"""benchmarks/precision_accuracy.py end to end on a tiny model: summary, plot, table."""

import json
import os
import sys

import pytest

from _tiny import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import precision_accuracy as pa  # noqa: E402


@pytest.mark.slow
def test_two_settings_same_data_and_keys(tmp_path, capsys):
    model = make_tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    summary = pa.main(["--model", model, "--steps", "3", "--batch", "4", "--eval-examples", "8",
                       "--lr", "1e-3", "--eps", "1e-2", "--settings", "fp32,bf16-nearest",
                       "--out", str(out)])
    with open(out / "summary.json") as fh:
        saved = json.load(fh)
    assert os.path.getsize(out / "precision_accuracy.png") > 1000
    rows = saved["results"]
    assert [r["setting"] for r in rows] == ["fp32", "bf16-nearest"]
    assert summary["results"][1]["acc_after"] == rows[1]["acc_after"]
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
    assert -1 <= bf16["drift"]["cos_to_fp32_update"] <= 1
    # Streamed bytes are at storage precision: bf16 moves half of float32's (up to the 512-byte
    # alignment of each array inside a packed block, not negligible in a tiny model).
    assert bf16["streamed_bytes_per_step"] * 2 == pytest.approx(fp32["streamed_bytes_per_step"],
                                                                rel=0.05)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-4].startswith("| setting | acc before | acc after | final mean loss")
    assert printed[-1].startswith("| bf16-nearest |")


@pytest.mark.parametrize("settings", ["fp32,bf17", "fp32,fp32", "fp32@abc", "int8-sr@-1", ""])
def test_bad_settings_are_rejected(settings):
    with pytest.raises(SystemExit):
        pa.parse_args(["--settings", settings])


def test_setting_with_its_own_lr():
    args = pa.parse_args(["--settings", "fp32,fp32@1e-5", "--lr", "3e-5"])
    assert [pa.split_setting(s, args.lr) for s in args.settings] == [("fp32", 3e-5),
                                                                     ("fp32", 1e-5)]
