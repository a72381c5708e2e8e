"""The benchmark record: benchmarks/table.py prints BENCHMARKS.md from it (one table per question,
the latest call per row, card, date, commit and command of each call), and benchmarks/matrix.py
appends to it (one process per row and code tree, failures recorded). Both run as a user runs
them, in their own processes."""

import datetime
import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "benchmarks", "table.py")
MATRIX = os.path.join(ROOT, "benchmarks", "matrix.py")

BASE = dict(schema=1, impl="zo2_jax", kind="speed", card="NVIDIA H200", date="2026-11-28",
            commit="not recorded", jax="0.11.2", model="opt_1_3b", layers=24, batch=1, seq=2048,
            storage="bfloat16", rounding="stochastic", compute="bfloat16", engine_asked={},
            engine={"max_inflight": 4, "packed": True, "branches": "fused", "blocks_per_call": 1},
            status="ok", streamed_bytes=2_400_000_000)


def speed(call, zo2, mezo=None, t_bus=0.05, **kw):
    """A row as matrix.py writes it (the derived fields as its derive() makes them)."""
    r = dict(BASE, call=call, command=f"bash {call}.sh", T_bus_s=t_bus,
             zo2_peak_device_bytes=1_530_000_000, zo2_host_peak_bytes=10.7e9)
    if zo2 is None:  # failed
        return dict(r, **kw)
    r.update(zo2_step_s=zo2, zo2_tok_s=2048 / zo2)
    if mezo:
        r.update(mezo_step_s=mezo, x_mezo=mezo / zo2, mezo_peak_device_bytes=3_600_000_000,
                 mezo_host_peak_bytes=11.1e9)
    r.update(T_limit_s=max(t_bus, mezo or 0), bound="compute" if (mezo or 0) > t_bus else "bus")
    r["x_T_limit"] = zo2 / r["T_limit_s"]
    r.update(kw)
    return r


def fixture_rows():
    old_new = dict(call="10a", date="2026-12-03", command="python benchmarks/matrix.py --code ...")
    return [
        speed("7d", 0.055, mezo=0.050, t_bus=0.054),
        speed(zo2=0.054, mezo=0.049, code="old", commit="a" * 40, dirty=False, **old_new),
        speed(zo2=0.0545, mezo=0.049, code="new", commit="b" * 40, dirty=True, **old_new),
        speed(zo2=None, model="opt_6_7b", status="oom", code="new", commit="b" * 40, dirty=True,
              zo2_error="XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory", **old_new),
        speed(zo2=0.475, t_bus=0.327, model="opt_175b", layers=4, code="new", commit="b" * 40,
              dirty=True, zo2_peak_device_bytes=17_340_000_000, streamed_bytes=14_500_000_000,
              engine={"max_inflight": 3, "packed": False, "branches": "sequential"},
              **old_new),
        dict(BASE, impl="reference_zo2", code="reference", commit="4bca25c" + "0" * 33,
             storage="float16", compute="float16", rounding=None, zo2_step_s=0.1339,
             zo2_tok_s=15298.0, zo2_peak_device_bytes=1_550_000_000, torch="2.11.0",
             engine_asked={"precision": "fp16"}, **old_new),
        dict(call="3b", card="NVIDIA H200", date="2026-11-28", commit="not recorded",
             command="bash 3b.sh", impl="zo2_jax", kind="precision", setup="A tiny task.",
             setting="bf16-sr", storage="bfloat16", acc_before=0.705, acc_after=0.945,
             final_mean_loss=1.0015, cos_to_fp32_update=0.7438),
    ]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def table(*args):
    return subprocess.run([sys.executable, TABLE, *args], capture_output=True, text=True,
                          timeout=60)


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_one_table_per_question_with_the_latest_call(tmp_path):
    proc = table(write(tmp_path / "r.jsonl", fixture_rows()))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    bus = section(out, "Speed against the bus limit and against MeZO")
    # old and new code of call 10a side by side; call 7d's figure only as "earlier"
    assert ("| opt_1_3b | 1x2048 | bf16 SR / bf16 | W4 G1 packed fused | old aaaaaaa | 54.0 | "
            "37926 | 2.40 | 50.0 (bus) | **1.08** | 49.0 | **0.91** | 1.02 (7d) | 10a |") in bus
    assert ("| opt_1_3b | 1x2048 | bf16 SR / bf16 | W4 G1 packed fused | new bbbbbbb+ | 54.5 | "
            "37578 | 2.40 | 50.0 (bus) | **1.09** |") in bus
    assert "| 7d |" not in bus
    # a failed row is shown with its status, not dropped
    assert "| opt_6_7b | **oom**: XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory |" in bus
    # each call once, with card, date, commits (dirty marked) and command
    assert ("- **10a**: NVIDIA H200, 2026-12-03, commit old aaaaaaa, new bbbbbbb+, jax 0.11.2: "
            "`python benchmarks/matrix.py --code ...`") in bus
    mem = section(out, "Device and host memory against MeZO")
    assert "| **1.53** | 3.60 | 10.7 | 11.1 | 10a |" in mem
    big = section(out, "The OPT-175B block shape")
    assert ("| 4 | bf16 SR / bf16 | W3 unpacked sequential | new bbbbbbb+ | 0.475 | 4312 | 14.5 | "
            "0.327 | **1.45** | **17.34** | 10.7 | 10a |") in big
    assert "opt_175b" not in bus  # its own table only
    ref = section(out, "Against the reference")
    assert "| reference ZO2 | opt_1_3b | 1x2048 | fp16 / fp16 | **15298** | 133.9 | 1.55 | 10a |" \
        in ref
    assert "best against best **2.48x** (bf16 SR / bf16 against its fp16)" in ref
    assert "commit old aaaaaaa, new bbbbbbb+, reference 4bca25c, jax 0.11.2, torch 2.11.0" in ref
    prec = section(out, "Host storage precision")
    assert "| bf16-sr | 0.705 | **0.945** | 1.00 | 0.74 | 3b |" in prec


def test_directions_and_time_to_accuracy_tables(tmp_path):
    call = dict(call="12a", date="2026-12-04", model="opt_6_7b", layers=32)
    rows = fixture_rows() + [
        speed(zo2=0.262, mezo=0.204, t_bus=0.26, **call),                # q = 1: MeZO's
        speed(zo2=0.265, mezo=0.41, t_bus=0.26, q=2, **call),
        speed(zo2=0.43, mezo=0.82, t_bus=0.26, q=4, **call),
        speed(zo2=0.25, mezo=0.2, t_bus=0.26, directions="rademacher", **call),
        speed(zo2=0.30, mezo=0.5, t_bus=0.26, q=4, estimator="fzoo", directions="rademacher",
              **call)]
    tta = dict(probe="time_to_accuracy", kind="summary", task="sentiment", model="m.gguf",
               call="12b", card="NVIDIA H200", date="2026-12-04", commit="c" * 40,
               command="python benchmarks/time_to_accuracy.py ...", seeds=[0, 1, 2],
               target=0.83)
    rows += [dict(tta, method="mezo(q=1,lr=3e-05)", final_mean=0.83,
                  passes_to_target_mean=3600.0, passes_fraction_of_baseline=0.9,
                  mean_curve_passes_to_target=3200, mean_curve_fraction_of_baseline=0.8,
                  best_of_mean_curve=0.84, best_at_passes=3600, seconds_to_target_mean=12.0),
             dict(tta, method="fzoo(q=4,lr=1e-06)", final_mean=0.86,
                  passes_to_target_mean=1000.0, passes_fraction_of_baseline=0.25,
                  mean_curve_passes_to_target=800, mean_curve_fraction_of_baseline=0.2,
                  best_of_mean_curve=0.87, best_at_passes=2000, seconds_to_target_mean=3.1),
             dict(tta, method="sparse(q=1,lr=3e-05,f=0.25)", final_mean=0.80,
                  passes_to_target_mean=None, passes_fraction_of_baseline=None,
                  mean_curve_passes_to_target=None, mean_curve_fraction_of_baseline=None,
                  best_of_mean_curve=0.81, best_at_passes=400, seconds_to_target_mean=None),
             dict(tta, method="hizoo(q=1,lr=3e-05,a=1e-06)", seeds=[], incomplete_seeds=[0],
                  status="cut short: none of its 1 seeds reached the budget")]
    out = table(write(tmp_path / "r.jsonl", rows)).stdout
    # the q > 1 and FZOO rows stay out of the q = 1 tables; the q = 1 row is there
    bus = section(out, "Speed against the bus limit and against MeZO")
    assert "| 262.0 |" in bus
    assert not any(x in bus for x in ("| 265.0 |", "| 430.0 |", "| 300.0 |"))
    d = section(out, "Directions per second: the idle compute of a bus-bound step")
    row = "| opt_6_7b | 1x2048 | bf16 SR / bf16 | mezo (gaussian) |"
    assert f"{row} 1 | 262.0 | 204.0 | 3.8 | **1.00** |" in d
    assert f"{row} 2 | 265.0 | 410.0 | 7.5 | **1.98** |" in d
    # FZOO's z is Rademacher: against the Rademacher q = 1 row
    assert "| mezo (rademacher) | 1 | 250.0 | 200.0 | 4.0 | **1.00** |" in d
    assert "| fzoo (rademacher) | 4 | 300.0 | 500.0 | 13.3 | **3.33** |" in d
    t = section(out, "Time to accuracy against MeZO-SGD: estimators and adapters")
    assert ("| sentiment | m.gguf | fzoo(q=4,lr=1e-06) | 3 | 0.860 | 0.830 | 1000 | 800 | "
            "**0.20** | 0.870 @ 2000 | 3.1 | 12b |") in t
    assert ("| sentiment | m.gguf | sparse(q=1,lr=3e-05,f=0.25) | 3 | 0.800 | 0.830 | - | - | "
            "**-** | 0.810 @ 400 | - | 12b |") in t
    assert ("| sentiment | m.gguf | hizoo(q=1,lr=3e-05,a=1e-06) | 0 (+1 cut short) | - | 0.830 | "
            "- | - | **-** | - | - | 12b |") in t


def test_adapter_table_against_full_parameter_zo2(tmp_path):
    call = dict(call="13a", date="2026-12-04", model="opt_30b", layers=48, seq=512,
                streamed_bytes=59_200_000_000)
    rows = fixture_rows() + [
        speed(zo2=1.658, t_bus=1.2195, **call),
        speed(zo2=1.1507, t_bus=1.1233, adapter="lora", lora_rank=8,
              written_bytes=99_000_000, **call)]
    proc = table(write(tmp_path / "r.jsonl", rows))
    assert proc.returncode == 0, proc.stderr
    text = section(proc.stdout, "Adapters: LoRA and prefix tuning over a frozen, read-only base")
    lines = [x for x in text.splitlines() if x.startswith("| opt_30b")]
    assert len(lines) == 2
    assert "| none | 1658.0 | 59.20 | 59.20 | 1219.5 | - | **1.36** | - |" in lines[0]
    # 1.658 / 1.1507 faster than full ZO2; written back: the adapters alone
    assert "| lora r8 | 1150.7 | 59.20 | 0.10 | 1123.3 | - | **1.02** | **1.44x** |" in lines[1]
    # adapter rows stay out of the full-parameter speed table
    speed_rows = section(proc.stdout, "Speed against the bus limit and against MeZO")
    assert "opt_30b" in speed_rows and "1150.7" not in speed_rows


def test_write_gives_what_it_prints(tmp_path):
    rec = write(tmp_path / "r.jsonl", fixture_rows())
    assert table(rec, "--write", str(tmp_path / "B.md")).stdout == ""
    assert (tmp_path / "B.md").read_text() == table(rec).stdout


@pytest.mark.parametrize("field", ["card", "date", "commit", "command"])
def test_a_row_without_its_identity_is_refused(tmp_path, field):
    rows = fixture_rows()
    del rows[1][field]
    proc = table(write(tmp_path / "r.jsonl", rows))
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"r.jsonl:2: the row (opt_1_3b, call 10a) has no {field}" in proc.stderr
    assert ("every row needs call, card, date, commit, command (write 'not recorded' where "
            "unknown)") in proc.stderr


def test_benchmarks_md_is_the_record_printed():
    proc = table(os.path.join(ROOT, "benchmarks", "record.jsonl"))
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(ROOT, "BENCHMARKS.md")) as fh:
        assert fh.read() == proc.stdout, "regenerate: python benchmarks/table.py " \
                                         "benchmarks/record.jsonl --write BENCHMARKS.md"
    # one table per question (eleven), the latest figures: about 25 lines a table
    assert len(proc.stdout.splitlines()) <= 280


def matrix(*args, timeout=900):
    return subprocess.run([sys.executable, MATRIX, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("args, message", [
    (["--row", "opt_1_3b"], "expected MODEL:BATCHxSEQ"),
    (["--row", "tiny:1x16,foo=1"], "unknown key 'foo'"),
    (["--row", "tiny:1x16,packed=maybe"], "packed='maybe'"),
    (["--row", "tiny:1x16,estimator=fzoo"], "q must be >= 1 (>= 2 with estimator=fzoo)"),
    (["--row", "tiny:1x16,estimator=adam"], "estimator='adam'"),
    (["--row", "tiny:1x16", "--code", "new=/nonexistent"], "checkout with zo2_jax/"),
])
def test_matrix_refuses_bad_rows_and_trees(args, message):
    proc = matrix(*args, timeout=60)
    assert proc.returncode != 0 and message in proc.stderr


def test_matrix_names_the_commit_of_a_tree_without_git(tmp_path):
    # an exported old tree (no .git of its own) is named on the command line; a row that the
    # call's time limit leaves out is written as skipped, with its identity
    (tmp_path / "old" / "zo2_jax").mkdir(parents=True)
    out = tmp_path / "r.jsonl"
    proc = matrix("--code", f"old={tmp_path / 'old'}@abc1234+", "--row", "opt_1_3b:1x2048",
                  "--time-limit", "0", "--out", str(out), timeout=60)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(out.read_text())
    assert (row["code"], row["commit"], row["dirty"], row["status"]) == ("old", "abc1234", True,
                                                                         "skipped")
    proc = matrix("--code", "new=.@0000000", "--row", "tiny:1x16", "--out", str(out))
    assert proc.returncode != 0 and "is a checkout of" in proc.stderr


@pytest.mark.slow
def test_matrix_writes_a_row_per_row_and_code_failures_included(tmp_path):
    out = tmp_path / "record.jsonl"
    common = ["--code", "new=.", "--out", str(out), "--bandwidth-mib", "4"]
    proc = matrix(*common, "--row", "tiny:1x16,vocab=256,q=2,estimator=fzoo,directions=rademacher",
                  "--row", "nope:1x16",
                  "--steps", "2", "--warmup", "1", "--call", "t1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a row that cannot finish in its time limit (OPT-1.3B on a CPU), and one past the call's
    proc = matrix(*common, "--row", "opt_1_3b:1x2048", "--row-timeout", "3", "--min-row-s", "0",
                  "--call", "t2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = matrix(*common, "--row", "tiny:1x16", "--time-limit", "0", "--call", "t3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["call"], r["model"], r["status"]) for r in rows] == [
        ("t1", "tiny", "ok"), ("t1", "nope", "failed"), ("t2", "opt_1_3b", "timeout"),
        ("t3", "tiny", "skipped")]
    ok, bad = rows[0], rows[1]
    assert "nope" in bad["error"]
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    assert ok["commit"] == commit and isinstance(ok["dirty"], bool) and ok["code"] == "new"
    assert ok["card"] == "cpu" and ok["jax"] and ok["repeat"] == 0
    assert ok["date"] == datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    assert "matrix.py" in ok["command"] and "--row tiny:1x16,vocab=256" in ok["command"]
    assert (ok["q"], ok["estimator"], ok["directions"]) == (2, "fzoo", "rademacher")
    assert (ok["layers"], ok["vocab"], ok["batch"], ok["seq"]) == (2, 256, 1, 16)
    assert (ok["storage"], ok["compute"], ok["step_stat"]) == ("bfloat16", "bfloat16", "median")
    for name in ("zo2", "mezo"):  # MeZO fits: it ran in the same process
        assert len(ok[f"{name}_steps_s"]) == 2
        assert ok[f"{name}_step_s"] == pytest.approx(statistics.median(ok[f"{name}_steps_s"]),
                                                     abs=2e-6)  # the list is rounded to 1 us
        assert ok[f"{name}_tok_s"] == pytest.approx(16 / ok[f"{name}_step_s"])
        assert ok[f"{name}_loss_finite"] is True and ok[f"{name}_host_peak_bytes"] > 0
    # P_s is the two blocks at storage precision: 12 d^2 + 13 d parameters each, bf16, and
    # the alignment of each array inside a packed block
    assert 2 * 2 * (12 * 64 ** 2 + 13 * 64) <= ok["streamed_bytes"] < 1.3 * 2 * 2 * 49984
    t_bus = max(ok["streamed_bytes"] / (ok["B_up"] * 1e9),
                ok["streamed_bytes"] / (ok["B_down"] * 1e9),
                2 * ok["streamed_bytes"] / (ok["B_bi"] * 1e9))
    assert ok["T_bus_s"] == pytest.approx(t_bus)
    assert ok["T_limit_s"] == pytest.approx(max(t_bus, ok["mezo_step_s"]))
    assert ok["x_T_limit"] == pytest.approx(ok["zo2_step_s"] / ok["T_limit_s"])
    assert ok["x_mezo"] == pytest.approx(ok["mezo_step_s"] / ok["zo2_step_s"])
    assert ok["engine"]["max_inflight"] >= 1 and ok["engine_asked"] == {}
    # the failed rows print with their status
    proc = table(str(out))
    assert proc.returncode == 0, proc.stderr
    assert "| nope | **failed**:" in proc.stdout and "| opt_1_3b | **timeout**:" in proc.stdout
