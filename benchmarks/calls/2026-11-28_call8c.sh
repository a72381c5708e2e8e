#!/usr/bin/env bash
# Call 8c (2026-11-28, the same 4-GPU host, one GPU used): fp32 host storage at 2.7B and 6.7B
# beside MeZO; OPT-30B with bf16 storage beside MeZO (60 GB of weights fit the H200), which call
# 5d could not time; 13B with int8 storage (ZO2 only).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 CUDA_VISIBLE_DEVICES=0
export XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=100
R=$OUT/call8c.jsonl
row() { (( SECONDS < $1 )) && ROW_TIMEOUT=$2 bash benchmarks/run_ours.sh $R $3 > /dev/null; echo "t=${SECONDS}s $3"; }
row 999 200 opt_30b:1:2048:bfloat16:bfloat16:--steps,3,--warmup,1
row 300 90 opt_2_7b:1:2048:float32:bfloat16
row 330 110 opt_6_7b:1:2048:float32:bfloat16
row 380 90 opt_13b:1:2048:int8:bfloat16:--engines,zo2,--steps,3,--warmup,1
grep -h "row .* failed" ${R%.jsonl}.log
python3 benchmarks/table.py $R
