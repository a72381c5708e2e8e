#!/usr/bin/env bash
# Call 4d (2026-11-28): the levers left for the 14 GB bf16 target at the OPT-175B block shape:
# W=1 with unpacked blocks, and W=2 with int8 embeddings/head (outer storage).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=110
R=$OUT/call4d.jsonl
L175="--engines,zo2,--layers,4,--steps,2,--warmup,1,--unpacked"
ROW_TIMEOUT=75 bash benchmarks/run_ours.sh $R \
  opt_175b:1:2048:bfloat16:bfloat16:$L175,--max-inflight,1 \
  opt_175b:1:2048:bfloat16:bfloat16:$L175,--max-inflight,2,--outer-storage,int8
python3 benchmarks/table.py $R
