#!/usr/bin/env bash
# Call 4c (2026-11-28): compiled memory of the block / unpack / pack kernels at the OPT-175B block
# shape; OPT-1.3B packed (Transport) vs unpacked beside MeZO; the exactness tests on the GPU.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=110
R=$OUT/call4c.jsonl
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
timeout 60 python3 benchmarks/pack_memory.py --model opt_175b | tee $OUT/pack_memory.json
ROW_TIMEOUT=150 bash benchmarks/run_ours.sh $R \
  opt_1_3b:1:2048:bfloat16:bfloat16:--profile \
  opt_1_3b:1:2048:bfloat16:bfloat16:--engines,zo2,--unpacked,--profile
python3 benchmarks/table.py $R
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_offload_pack.py \
  tests/test_offload_exactness.py > $OUT/pytest.log 2>&1; echo "pytest rc $?"; tail -3 $OUT/pytest.log
