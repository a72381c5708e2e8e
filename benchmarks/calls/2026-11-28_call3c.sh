#!/usr/bin/env bash
# Call 3c (2026-11-28): OPT-175B block shape at 8 and 16 layers and int8 (parallel branches,
# W=2), and the 6.7B bus-bound row at W=3 with a per-block profile.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=200
R=$OUT/rows.jsonl
S175="--engines,zo2,--steps,2,--warmup,1,--max-inflight,2"
ROW_TIMEOUT=80 bash benchmarks/run_ours.sh $R opt_175b:1:2048:int8:bfloat16:$S175,--layers,4
ROW_TIMEOUT=100 bash benchmarks/run_ours.sh $R opt_175b:1:2048:bfloat16:bfloat16:$S175,--layers,8
ROW_TIMEOUT=140 bash benchmarks/run_ours.sh $R opt_175b:1:2048:bfloat16:bfloat16:$S175,--layers,16
ROW_TIMEOUT=100 bash benchmarks/run_ours.sh $R opt_6_7b:1:2048:bfloat16:bfloat16:--max-inflight,3,--profile
python3 benchmarks/table.py $R
