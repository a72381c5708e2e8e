"""benchmarks/probes/timeline.py, run as a user runs it: the trace summary of a synthetic GPU
trace, a tiny CPU run, and its refusals."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "probes", "timeline.py")

# One GPU, two streams, over 2 steps (times in ps from the line's timestamp):
#   stream 7: block_step kernel [0, 4) us, pack kernel [6, 8) us
#   stream 9: H2D copy [3, 7) us, D2H copy [1, 2) us;  a summary line that must be ignored
TRACE = """
planes {
  name: "/device:GPU:0"
  lines { name: "Stream #7" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 4000000
             stats { metadata_id: 9 str_value: "jit_block_step" } }
    events { metadata_id: 1 offset_ps: 6000000 duration_ps: 2000000
             stats { metadata_id: 9 str_value: "jit_pack" } } }
  lines { name: "Stream #9" timestamp_ns: 1000
    events { metadata_id: 2 offset_ps: 3000000 duration_ps: 4000000 }
    events { metadata_id: 3 offset_ps: 1000000 duration_ps: 1000000 } }
  lines { name: "XLA Modules" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 8000000 } }
  event_metadata { key: 1 value { id: 1 name: "fusion_1" } }
  event_metadata { key: 2 value { id: 2 name: "MemcpyH2D" } }
  event_metadata { key: 3 value { id: 3 name: "MemcpyDtoH" } }
  stat_metadata { key: 9 value { id: 9 name: "hlo_module" } }
}
planes { name: "/host:CPU" lines { name: "python" timestamp_ns: 0
  events { metadata_id: 1 offset_ps: 0 duration_ps: 99000000 } }
  event_metadata { key: 1 value { id: 1 name: "step" } } }
"""


def run(*args, timeout=120):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def last_json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_summary_of_a_synthetic_gpu_trace(tmp_path):
    (tmp_path / "trace.pbtxt").write_text(TRACE)
    s = last_json(run("--summarize", str(tmp_path / "trace.pbtxt"), "--steps", "2"))
    assert list(s) == ["/device:GPU:0"]  # host planes are not summarised
    g = s["/device:GPU:0"]
    assert g["lines"] == ["Stream #7", "Stream #9"] and g["other_lines"] == ["XLA Modules"]
    per_step = lambda us: round(us / 1e3 / 2, 3)  # noqa: E731
    assert g["window_ms"] == per_step(8) and g["kernel_busy_ms"] == per_step(6)
    assert g["kernel_idle_ms"] == per_step(2) and g["kernels_per_step"] == 1.0
    assert g["h2d_busy_ms"] == per_step(4) and g["d2h_busy_ms"] == per_step(1)
    assert g["h2d_and_d2h_together_ms"] == 0.0
    assert g["h2d_under_kernels_ms"] == per_step(2)  # [3, 4) and [6, 7)
    assert g["d2h_under_kernels_ms"] == per_step(1)
    assert g["kernel_ms_by_module"] == {"jit_block_step": per_step(4), "jit_pack": per_step(2)}


@pytest.mark.slow
def test_tiny_run_writes_a_trace_and_a_summary(tmp_path):
    out = tmp_path / "trace"
    row = last_json(run("--model", "opt_125m", "--layers", "2", "--seq", "32", "--steps", "1",
                        "--warmup", "1", "--vocab-size", "256", "--out", str(out),
                        "--json-out", str(tmp_path / "t.jsonl"), timeout=600))
    assert row["branches"] in ("fused", "sequential") and row["layers"] == 2
    assert isinstance(row["zo2"]["step_ms_traced"], float)
    assert json.loads((tmp_path / "t.jsonl").read_text()) == row
    # the raw trace it left is readable by the same script
    assert isinstance(last_json(run("--summarize", str(out / "zo2"), "--steps", "1")), dict)


def test_bad_arguments_are_named(tmp_path):
    proc = run("--engines", "zo3", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--engines takes zo2 and/or mezo" in proc.stderr
    proc = run("--summarize", str(tmp_path))
    assert proc.returncode == 1 and "no .xplane.pb trace under" in proc.stderr
