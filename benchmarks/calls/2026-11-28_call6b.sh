#!/usr/bin/env bash
# Call 6b (2026-11-28): blocks_per_call (G consecutive streamed blocks per jitted call) where
# call 6a's timelines showed the device waiting for the host: OPT-125M and OPT-1.3B (1x2048,
# 16x256) and OPT-2.7B. MeZO beside the engine's defaults (G auto); G swept ZO2-only. Then a
# timeline of the 125M default, and the exactness tests of the G variants on the GPU.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
R=$OUT/call6b.jsonl
row() {  # row SECONDS_NEEDED spec
  if (( SECONDS + $1 > ${CALL_BUDGET:-470} )); then echo "skipped $2: no time left"; return; fi
  ROW_TIMEOUT=$1 bash benchmarks/run_ours.sh $R "$2"
}
row 60 opt_125m:1:2048:bfloat16:bfloat16
for g in 1 2 6 12; do row 40 opt_125m:1:2048:bfloat16:bfloat16:--engines,zo2,--blocks-per-call,$g; done
row 90 opt_1_3b:1:2048:bfloat16:bfloat16:--blocks-per-call,2
for g in 1 3; do row 50 opt_1_3b:1:2048:bfloat16:bfloat16:--engines,zo2,--blocks-per-call,$g; done
row 90 opt_1_3b:16:256:bfloat16:bfloat16:--blocks-per-call,2
row 100 opt_2_7b:1:2048:bfloat16:bfloat16:--blocks-per-call,2
if (( SECONDS + 50 < ${CALL_BUDGET:-470} )); then
  timeout 50 python3 benchmarks/timeline.py --model opt_125m --engines zo2 --steps 3 \
    --out /tmp/traces/opt_125m_auto --json-out $OUT/call6b_timeline.jsonl > /dev/null 2>>$OUT/call6b.log
fi
if (( SECONDS + 60 < ${CALL_BUDGET:-470} )); then
  timeout 60 python3 -m pytest -q -x tests/test_offload_exactness.py -k "G1 or G2 or Gauto" \
    2>&1 | tail -3
fi
python3 benchmarks/table.py $R
python3 - <<'PY'
import json, os
p = os.environ["OUT"] + "/call6b_timeline.jsonl"
for line in open(p) if os.path.exists(p) else []:
    r = json.loads(line)
    for dev, d in r["zo2"]["devices"].items():
        print("timeline", r["model"], "G", r["blocks_per_call"], r["zo2"]["step_ms_traced"], "busy",
              d["kernel_busy_ms"], "idle", d["kernel_idle_ms"], "h2d", d["h2d_busy_ms"],
              "under kernels", d["h2d_under_kernels_ms"])
PY
