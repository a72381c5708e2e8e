#!/usr/bin/env bash
# Call 4a (2026-11-28): packed blocks (one buffer per block) against unpacked, beside MeZO; the
# OPT-175B block shape at W = 1, 2, 3 (device peak); the exactness tests on the GPU.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=110
R=$OUT/call4a.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | sed -n 2p
L175="--engines,zo2,--layers,4,--steps,3,--warmup,1"
ROW_TIMEOUT=110 bash benchmarks/run_ours.sh $R \
  opt_1_3b:1:2048:bfloat16:bfloat16:--profile \
  opt_1_3b:1:2048:bfloat16:bfloat16:--engines,zo2,--unpacked,--profile \
  opt_6_7b:1:2048:bfloat16:bfloat16 \
  opt_175b:1:2048:bfloat16:bfloat16:$L175,--max-inflight,2 \
  opt_175b:1:2048:bfloat16:bfloat16:$L175,--max-inflight,2,--unpacked \
  opt_175b:1:2048:bfloat16:bfloat16:$L175,--max-inflight,3 \
  opt_175b:1:2048:bfloat16:bfloat16:$L175,--max-inflight,1
timeout 140 python3 -m pytest -q -x -p no:cacheprovider tests/test_offload_pack.py \
  tests/test_offload_exactness.py > $OUT/pytest.log 2>&1; echo "pytest rc $?"; tail -3 $OUT/pytest.log
python3 benchmarks/table.py $R
