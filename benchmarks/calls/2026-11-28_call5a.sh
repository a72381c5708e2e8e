#!/usr/bin/env bash
# Call 5a (2026-11-28): where the OPT-175B block function's device scratch goes (XLA's buffer
# assignment on the GPU; a scheduler memory limit; branches ordered by a barrier); the 175B
# 4-layer memory levers (W=1 unpacked, int8 embeddings); rows not measured before.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=100
R=$OUT/call5a.jsonl; M=$OUT/block_memory.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1; free -g | head -2
XLA_FLAGS="--xla_dump_to=/tmp/dump" timeout 80 python3 benchmarks/pack_memory.py --only-block \
  --tag dump >> $M
( cd /tmp/dump && tar czf $OUT/block_dump.tgz $(ls | grep -E \
  'block_step.*(buffer-assignment|memory-usage-report|after_optimizations\.txt)') )
XLA_FLAGS="--xla_gpu_memory_limit_slop_factor=2" timeout 80 python3 benchmarks/pack_memory.py \
  --only-block >> $M
# (as run; since this call the option is `--branches sequential`, the same code in the engine)
timeout 80 python3 benchmarks/pack_memory.py --only-block --variant barrier >> $M
cat $M
ROW_TIMEOUT=90 bash benchmarks/run_ours.sh $R \
  opt_175b:1:2048:bfloat16:bfloat16:--engines,zo2,--layers,4,--steps,3,--warmup,1,--max-inflight,1,--unpacked \
  opt_175b:1:2048:bfloat16:bfloat16:--engines,zo2,--layers,4,--steps,3,--warmup,1,--max-inflight,2,--outer-storage,int8
ROW_TIMEOUT=60 bash benchmarks/run_ours.sh $R \
  opt_6_7b:1:2048:bfloat16:bfloat16 opt_125m:1:2048:bfloat16:bfloat16 \
  opt_2_7b:1:2048:bfloat16:bfloat16 opt_1_3b:16:256:bfloat16:bfloat16 \
  opt_6_7b:16:256:bfloat16:bfloat16
python3 benchmarks/table.py $R
