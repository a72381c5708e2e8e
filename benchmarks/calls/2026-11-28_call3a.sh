#!/usr/bin/env bash
# Call 3a (2026-11-28): OPT-175B block shape memory (sequential vs parallel branches, bf16 and
# int8, 4/8/16 layers), then ZO2 beside MeZO at W=3 with per-block profiles. Output in $OUT.
# The --sequential-branches rows used an engine option that was removed after this call (it
# raised the peak; BENCHMARKS.md, call 3): run this at commit 76c1a90 to reproduce them, or drop them.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=200
mkdir -p /tmp/keep && cp .assets/*.part* /tmp/keep/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; free -g | head -2
R=$OUT/rows.jsonl
S175="--engines,zo2,--steps,3,--warmup,1,--max-inflight,2"
ROW_TIMEOUT=75 bash benchmarks/run_ours.sh $R \
  opt_175b:1:2048:bfloat16:bfloat16:$S175,--layers,4,--sequential-branches \
  opt_175b:1:2048:bfloat16:bfloat16:$S175,--layers,4 \
  opt_175b:1:2048:int8:bfloat16:$S175,--layers,4,--sequential-branches \
  opt_175b:1:2048:bfloat16:bfloat16:$S175,--layers,16,--sequential-branches
ROW_TIMEOUT=100 bash benchmarks/run_ours.sh $R \
  opt_1_3b:1:2048:bfloat16:bfloat16:--max-inflight,3,--profile \
  opt_1_3b:16:512:bfloat16:bfloat16:--max-inflight,3 \
  opt_1_3b:1:2048:float32:float32:--max-inflight,3,--profile \
  opt_6_7b:1:2048:bfloat16:bfloat16:--max-inflight,3,--profile
ROW_TIMEOUT=60 bash benchmarks/run_ours.sh $R \
  opt_175b:1:2048:bfloat16:bfloat16:$S175,--layers,8,--sequential-branches
python3 benchmarks/table.py $R
