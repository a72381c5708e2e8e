#!/usr/bin/env bash
# Call 4b (2026-11-28): the whole 96-layer OPT-175B shape, int8 host storage, packed blocks, W=3,
# on a 256 GiB host: the pinned pool is capped near the model's bytes (it grows by doubling
# regions up to its limit, and an uncapped pool overshot the host in call 3b). Then more sizes.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
R=$OUT/call4b.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | sed -n 2p
XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=${LIMIT175:-185} ROW_TIMEOUT=330 bash benchmarks/run_ours.sh $R \
  opt_175b:1:2048:int8:bfloat16:--engines,zo2,--steps,2,--warmup,1,--max-inflight,3
free -g | sed -n 2p
export XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=110
ROW_TIMEOUT=120 bash benchmarks/run_ours.sh $R \
  opt_13b:1:2048:bfloat16:bfloat16 \
  opt_2_7b:1:2048:bfloat16:bfloat16 \
  opt_1_3b:16:256:bfloat16:bfloat16
python3 benchmarks/table.py $R
