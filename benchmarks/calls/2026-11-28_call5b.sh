#!/usr/bin/env bash
# Call 5b (2026-11-28): branches="sequential" (the -eps branch after the +eps branch) against
# "fused" at the OPT-175B block shape (4 layers, bf16, unpacked; peak and step) and at OPT-1.3B
# (compute-bound: what the second generation of z costs); the exactness tests of the option.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=100
R=$OUT/call5b.jsonl
L=opt_175b:1:2048:bfloat16:bfloat16:--engines,zo2,--layers,4,--steps,3,--warmup,1,--unpacked
ROW_TIMEOUT=110 bash benchmarks/run_ours.sh $R $L,--max-inflight,2,--branches,fused \
  $L,--max-inflight,2,--branches,sequential $L,--max-inflight,3,--branches,sequential
ROW_TIMEOUT=150 bash benchmarks/run_ours.sh $R opt_1_3b:1:2048:bfloat16:bfloat16:--branches,fused \
  opt_1_3b:1:2048:bfloat16:bfloat16:--engines,zo2,--branches,sequential
python3 benchmarks/table.py $R
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_offload_exactness.py -k sequential \
  > $OUT/pytest.txt 2>&1; echo "pytest rc $?"; tail -3 $OUT/pytest.txt
