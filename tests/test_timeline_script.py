"""benchmarks/timeline.py: the trace summary on a synthetic GPU trace, and a tiny CPU run."""

import json
import os
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import timeline  # noqa: E402

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


def test_summary_of_a_synthetic_gpu_trace():
    s = timeline.summarize(jax.profiler.ProfileData.from_text_proto(TRACE), steps=2)
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
    row = timeline.main(["--model", "opt_125m", "--layers", "2", "--seq", "32", "--steps", "1",
                         "--warmup", "1", "--out", str(out), "--json-out",
                         str(tmp_path / "t.jsonl")])
    assert row["zo2"]["step_ms_traced"] > 0 and row["branches"] in ("fused", "sequential")
    assert timeline.load(str(out / "zo2")) is not None
    assert json.loads((tmp_path / "t.jsonl").read_text())["model"] == "opt_125m"


def test_bad_arguments_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        timeline.main(["--engines", "zo3", "--out", str(tmp_path)])
    assert "--engines takes zo2 and/or mezo" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no .xplane.pb trace under"):
        timeline.load(str(tmp_path))
