#!/usr/bin/env bash
# Call 4b (2026-11-28): packed blocks with unpack/pack as separate kernels (call 4a fused them into
# the block function and paid 2.4 blocks of device memory at the OPT-175B shape); then the whole
# 96-layer OPT-175B shape, int8 host storage, W=3, on a 256 GiB host, with the pinned pool capped
# near the model's bytes (the pool grows by doubling regions up to its limit; uncapped, it
# overshot the host in call 3b).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=110
R=$OUT/call4b.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | sed -n 2p
L175="--engines,zo2,--layers,4,--steps,3,--warmup,1"
ROW_TIMEOUT=100 bash benchmarks/run_ours.sh $R \
  opt_1_3b:1:2048:bfloat16:bfloat16:--profile \
  opt_175b:1:2048:bfloat16:bfloat16:$L175,--max-inflight,2 \
  opt_175b:1:2048:bfloat16:bfloat16:$L175,--max-inflight,3
python3 benchmarks/table.py $R
XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=${LIMIT175:-190} ROW_TIMEOUT=${T175:-360} \
  bash benchmarks/run_ours.sh $R opt_175b:1:2048:int8:bfloat16:--engines,zo2,--steps,2,--warmup,1,--max-inflight,3
free -g | sed -n 2p; tail -5 ${R%.jsonl}.log
python3 benchmarks/table.py $R
