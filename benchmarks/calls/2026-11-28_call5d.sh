#!/usr/bin/env bash
# Call 5d (2026-11-28): the OPT-30B row that call 5c had no time left for (ZO2 only: MeZO's 60 GB
# of bf16 weights plus its step would also fit the H200, but not the call's time).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=100
ROW_TIMEOUT=240 bash benchmarks/run_ours.sh $OUT/call5d.jsonl \
  opt_30b:1:2048:bfloat16:bfloat16:--engines,zo2,--steps,4,--warmup,1
python3 benchmarks/table.py $OUT/call5d.jsonl
