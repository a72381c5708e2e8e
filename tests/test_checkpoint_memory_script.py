"""benchmarks/probes/checkpoint_memory.py on the CPU: save_engine / restore_engine hold about one
block beyond the engine's own in host memory, where save(state()) / restore(like) hold a whole
second copy of the streamed blocks (the side-by-side baseline, measured the same way)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "probes", "checkpoint_memory.py")


@pytest.mark.slow
def test_checkpointing_block_by_block_holds_no_second_copy(tmp_path):
    out = tmp_path / "r.jsonl"
    # A fixed mmap threshold: glibc then returns every freed block-sized buffer at once, so the
    # resident size follows what is alive (its adaptive threshold keeps freed ones).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--model", "opt_125m", "--layers", "12", "--vocab-size", "256",
         "--seq", "16", "--storage", "float32", "--compute", "float32", "--dir",
         str(tmp_path / "ck"), "--json-out", str(out)],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    s = r["streamed_bytes"]
    assert s > 300e6 and r["layers"] == 12  # a block is 1/12 of it
    assert r["engine_save_peak_bytes"] < 0.25 * s, r
    assert r["engine_restore_peak_bytes"] < 0.5 * s, r
    # the baseline: every block at once, which the probe sees
    assert r["state_restore_peak_bytes"] > 0.9 * s, r
    assert r["state_save_peak_bytes"] > 0.9 * s, r
