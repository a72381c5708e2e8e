#!/usr/bin/env bash
# Call 6e (2026-11-28, the last 4 minutes of device time): a timeline of OPT-125M with the landed
# defaults (blocks_per_call="auto" = 4), then the G=12 row again with the window-slot fix.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
timeout 55 python3 benchmarks/timeline.py --model opt_125m --engines zo2 --steps 3 \
  --out /tmp/traces/opt_125m_auto --json-out $OUT/call6e_timeline.jsonl > /dev/null 2>>$OUT/call6e.log
python3 - <<'PY'
import json, os
p = os.environ["OUT"] + "/call6e_timeline.jsonl"
for line in open(p) if os.path.exists(p) else []:
    r = json.loads(line)
    for dev, d in r["zo2"]["devices"].items():
        print("timeline", r["model"], "G", r["blocks_per_call"], r["zo2"]["step_ms_traced"], "busy",
              d["kernel_busy_ms"], "idle", d["kernel_idle_ms"], "h2d", d["h2d_busy_ms"],
              "under kernels", d["h2d_under_kernels_ms"], "k/step", d["kernels_per_step"])
PY
ROW_TIMEOUT=75 bash benchmarks/run_ours.sh $OUT/call6e.jsonl \
  opt_125m:1:2048:bfloat16:bfloat16:--engines,zo2,--blocks-per-call,12
