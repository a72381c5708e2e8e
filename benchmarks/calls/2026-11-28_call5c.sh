#!/usr/bin/env bash
# Call 5c (2026-11-28): rows not measured before, MeZO beside ZO2 (the engine's defaults:
# W=3, packed="auto", branches="auto"), in order of importance; a row starts only while the
# call has time left for it.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=100
R=$OUT/call5c.jsonl
row() {  # row SECONDS_NEEDED spec
  if (( SECONDS + $1 > ${CALL_BUDGET:-540} )); then echo "skipped $2: no time left"; return; fi
  ROW_TIMEOUT=$1 bash benchmarks/run_ours.sh $R "$2"
}
row 130 opt_6_7b:1:2048:bfloat16:bfloat16
row 90 opt_125m:1:2048:bfloat16:bfloat16
row 110 opt_2_7b:1:2048:bfloat16:bfloat16
row 110 opt_1_3b:16:256:bfloat16:bfloat16
row 170 opt_13b:1:2048:bfloat16:bfloat16
row 200 opt_30b:1:2048:bfloat16:bfloat16:--engines,zo2
python3 benchmarks/table.py $R
