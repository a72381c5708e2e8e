"""benchmarks/time_to_accuracy.py: its method syntax, its held-out standard-library task, its
target arithmetic, and (slow) a whole run on a tiny model as a user runs it."""

import argparse
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "time_to_accuracy.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import time_to_accuracy as tta  # noqa: E402


def test_method_syntax():
    m = tta.parse_method("sparse:q=2:lr=1e-5:fraction=0.1")
    assert (m["name"], m["q"], m["lr"], m["fraction"], m["directions"]) == (
        "sparse", 2, 1e-5, 0.1, "rademacher")
    assert tta.passes_per_step(m) == 4 and m["lrs"] == [1e-5]
    assert tta.parse_method("fzoo:q=2:lr=1e-7,3e-7")["lrs"] == [1e-7, 3e-7]  # a sweep
    assert tta.passes_per_step(tta.parse_method("fzoo:q=4:lr=1")) == 5
    m = tta.parse_method("fzoo:q=4:lr=1e-6:decay=cosine")
    assert m["decay"] == "cosine" and tta.label(m) == "fzoo(q=4,lr=1e-06,cosine)"
    m = tta.parse_method("mezo:lr=1e-4:lora=8:base=gguf")
    assert (m["lora"], m["base"]) == (8, "gguf") and tta.label(m) == "mezo(q=1,lr=0.0001,lora r8 gguf)"
    assert tta.label(tta.parse_method("mezo:lr=1e-4:lora=4")) == "mezo(q=1,lr=0.0001,lora r4)"
    for bad, why in (("adam:lr=1", "must be one of"), ("mezo", "give its lr"),
                     ("mezo:lr=1:q", "not key=value"), ("mezo:lr=x", "bad value for lr"),
                     ("mezo:lr=1,-1", "bad value for lr"),
                     ("mezo:lr=1:beta=2", "not key=value"),
                     ("mezo:lr=1:decay=linear", "bad value for decay"),
                     ("mezo:lr=1:base=Q4_0", "base= needs lora"),
                     ("mezo:lr=1:lora=8:base=Q4_K", "bad value for base")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            tta.parse_method(bad)


def test_stdlib_task_holds_out_whole_modules():
    train, ev = tta.stdlib_docs(max_chars=300_000)
    assert train and ev
    assert sum(map(len, train)) < 300_000 + max(map(len, train))  # the cap holds
    assert (train, ev) == tta.stdlib_docs(max_chars=300_000)  # the same split every time
    train, ev = tta.stdlib_docs(max_chars=10**10)  # all of it: about a tenth held out
    assert not set(train) & set(ev)  # a module is on one side only
    assert 0.05 < len(ev) / (len(ev) + len(train)) < 0.2


def test_reach():
    pts = [(0, 0.0, 0.5), (10, 1.0, 0.6), (20, 2.0, 0.8)]
    assert tta.reach(pts, 0.6, higher=True) == (10, 1.0)
    assert tta.reach(pts, 0.9, higher=True) == (None, None)
    assert tta.reach([(0, 0.0, 3.0), (5, 0.5, 2.0)], 2.5, higher=False) == (5, 0.5)


def _evals(method, estimator, q, seed, values, every):
    ident = dict(probe="time_to_accuracy", task="sentiment", model="m.gguf", budget=8,
                 call="c1", device="cpu")
    return [dict(ident, method=method, estimator=estimator, q=q, lr=1e-3, seed=seed,
                 step=i, forward_passes=i * every, seconds=0.5 * i, accuracy=v)
            for i, v in enumerate(values)]


def synthetic_rows():
    rows = []
    # the baseline: 2 passes a step, budget 8 -> evals at 0, 4, 8 passes
    rows += _evals("mezo", "mezo", 1, 0, [0.5, 0.6, 0.7], 4)
    rows += _evals("mezo", "mezo", 1, 1, [0.5, 0.7, 0.9], 4)  # target: (0.7 + 0.9) / 2 = 0.8
    # fzoo q=3: 4 passes a step, 2 steps: evals at 0, 4, 8
    rows += _evals("fzoo", "fzoo", 3, 0, [0.5, 0.85, 0.6], 4)
    rows += _evals("fzoo", "fzoo", 3, 1, [0.5, 0.75, 0.8], 4)
    rows += _evals("fzoo", "fzoo", 3, 2, [0.5, 0.9], 4)  # cut short: never reached 8 passes
    return rows


def test_summarize_counts_only_runs_that_reached_the_budget():
    table = {r["method"]: r for r in tta.summarize(synthetic_rows(), 8, {"task": "sentiment"})}
    base, f = table["mezo"], table["fzoo"]
    assert base["target"] == pytest.approx(0.8) and base["final_mean"] == pytest.approx(0.8)
    assert base["passes_to_target"] == [None, 8] and base["passes_to_target_mean"] is None
    assert base["mean_curve_passes_to_target"] == 8 and base["status"] == "ok"
    assert f["seeds"] == [0, 1] and f["incomplete_seeds"] == [2]
    assert f["status"] == "ok"
    assert f["passes_to_target"] == [4, 8] and f["passes_to_target_mean"] == 6
    assert f["passes_fraction_of_baseline"] == pytest.approx(0.75)
    assert f["mean_curve_passes_to_target"] == 4  # (0.85 + 0.75) / 2 = 0.8
    assert f["mean_curve_fraction_of_baseline"] == pytest.approx(0.5)
    assert (f["best_of_mean_curve"], f["best_at_passes"]) == (pytest.approx(0.8), 4)
    assert f["final_mean"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="baseline mezo has no run that reached"):
        tta.summarize([r for r in synthetic_rows() if r["forward_passes"] < 8], 8, {})


@pytest.mark.slow
def test_summarize_a_file_writes_the_record_and_the_plot(tmp_path):
    raw = tmp_path / "raw.jsonl"
    rows = synthetic_rows() + [dict(synthetic_rows()[0], call="c0")]  # another call's row
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [sys.executable, SCRIPT, "--summarize", str(raw), "--task", "sentiment"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "give --call" in r.stderr
    out, png = tmp_path / "rec.jsonl", tmp_path / "p.png"
    r = subprocess.run(args + ["--call", "c1", "--out", str(out), "--plot", str(png)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = [json.loads(line) for line in open(out)]
    curves = [x for x in rec if x["kind"] == "curve"]
    assert len(curves) == 5 and curves[0]["points"] == [[0, 0.0, 0.5], [4, 0.5, 0.6],
                                                         [8, 1.0, 0.7]]
    summary = [x for x in rec if x["kind"] == "summary"]
    assert [x["method"] for x in summary] == ["mezo", "fzoo"]
    assert png.stat().st_size > 1000 and "ok, seeds [2] cut short" in r.stdout
    # the record summarizes again to the same summaries
    again = tmp_path / "again.jsonl"
    r = subprocess.run([sys.executable, SCRIPT, "--summarize", str(out), "--task", "sentiment",
                        "--out", str(again)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x for x in map(json.loads, open(again)) if x["kind"] == "summary"] == summary


@pytest.mark.slow
def test_a_run_on_a_tiny_model(tmp_path):
    from _tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    out, png = tmp_path / "tta.jsonl", tmp_path / "tta.png"
    r = subprocess.run([sys.executable, SCRIPT, "--model", model, "--task", "sentiment",
                        "--budget", "12", "--eval-every", "6", "--seeds", "0,1",
                        "--batch-size", "4", "--method", "mezo:q=1:lr=1e-3",
                        "--method", "fzoo:q=2:lr=1e-4,1e-5:decay=cosine", "--sweep-budget", "6",
                        "--out", str(out), "--plot", str(png)],
                       capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(out)]
    points = [x for x in rows if "kind" not in x]
    sweep = [x for x in rows if x.get("kind") == "sweep"]
    assert sorted({x["lr"] for x in sweep}) == [1e-5, 1e-4] and {x["seed"] for x in sweep} == {0}
    assert [x["forward_passes"] for x in sweep if x["lr"] == 1e-4] == [0, 6]
    choice = [x for x in rows if x.get("kind") == "sweep_choice"]
    assert len(choice) == 1 and choice[0]["chosen"] in (1e-4, 1e-5)
    chosen = f"fzoo(q=2,lr={choice[0]['chosen']:g},cosine)"
    # mezo: 2 passes a step, 6 steps, evals after 3 and 6; fzoo: 3 passes, 4 steps, evals 2, 4
    for method, passes in (("mezo(q=1,lr=0.001)", [0, 6, 12]), (chosen, [0, 6, 12])):
        for seed in (0, 1):
            got = [x["forward_passes"] for x in points if x["method"] == method
                   and x["seed"] == seed]
            assert got == passes, (method, seed, got)
    summary = {x["method"]: x for x in rows if x.get("kind") == "summary"}
    assert set(summary) == {"mezo(q=1,lr=0.001)", chosen}
    base = summary["mezo(q=1,lr=0.001)"]
    assert base["passes_to_target_mean"] is not None  # the baseline reaches its own mean final
    assert all(0 <= x["accuracy"] <= 1 for x in points)
    assert png.stat().st_size > 1000
    assert "passes to target" in r.stdout
