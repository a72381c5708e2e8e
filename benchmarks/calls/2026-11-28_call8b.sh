#!/usr/bin/env bash
# Call 8b (2026-11-28, the same 4-GPU host as call 8a, one GPU used): the host-storage rows of
# issue 5's table with the landed defaults, 1x2048, ZO2 beside MeZO (MeZO keeps its weights on
# the device in the same storage) in the same process: int8 at 125M-6.7B, then fp32 storage with
# bf16 compute.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 CUDA_VISIBLE_DEVICES=0
export XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=100
R=$OUT/call8b.jsonl
row() { (( SECONDS < $1 )) && ROW_TIMEOUT=$2 bash benchmarks/run_ours.sh $R $3 > /dev/null; echo "t=${SECONDS}s $3"; }
row 999 90 opt_125m:1:2048:int8:bfloat16
row 999 90 opt_1_3b:1:2048:int8:bfloat16
row 400 90 opt_2_7b:1:2048:int8:bfloat16
row 400 110 opt_6_7b:1:2048:int8:bfloat16
row 480 80 opt_125m:1:2048:float32:bfloat16
row 480 90 opt_1_3b:1:2048:float32:bfloat16
grep -h "row .* failed" ${R%.jsonl}.log
python3 benchmarks/table.py $R
