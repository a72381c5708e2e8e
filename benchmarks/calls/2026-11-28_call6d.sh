#!/usr/bin/env bash
# Call 6d (2026-11-28, 2-GPU host for its 256 GiB of host memory, one GPU used):
# 1. the exactness tests of blocks_per_call on the GPU (units of 2+ blocks now run as a fori_loop,
#    as MeZO does: unrolled, they failed bit-identity in fp32 in call 6c);
# 2. OPT-125M 1x2048 with the defaults (blocks_per_call="auto" = 4) beside MeZO, and G=12;
# 3. the whole 96-layer OPT-175B shape, int8 host storage, with the engine's defaults (W=3,
#    unpacked and sequential branches at this block size, by "auto").
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
R=$OUT/call6d.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | sed -n 2p
timeout 80 python3 -m pytest -q tests/test_offload_exactness.py -k "G1 or G2 or Gauto" 2>&1 | tail -3
echo "t=${SECONDS}s"
ROW_TIMEOUT=110 bash benchmarks/run_ours.sh $R opt_125m:1:2048:bfloat16:bfloat16
echo "t=${SECONDS}s"
XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=190 ROW_TIMEOUT=${T175:-300} \
  bash benchmarks/run_ours.sh $R opt_175b:1:2048:int8:bfloat16:--engines,zo2,--steps,2,--warmup,1
echo "t=${SECONDS}s"; free -g | sed -n 2p
if (( SECONDS < 480 )); then
  ROW_TIMEOUT=80 bash benchmarks/run_ours.sh $R opt_125m:1:2048:bfloat16:bfloat16:--engines,zo2,--blocks-per-call,12
fi
tail -3 ${R%.jsonl}.log
python3 benchmarks/table.py $R
