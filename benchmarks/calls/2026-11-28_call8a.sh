#!/usr/bin/env bash
# Call 8a (2026-11-28, 4-GPU host for its 512 GiB of host memory, one GPU used): the whole
# 96-layer OPT-175B shape with bf16 host storage (348 GB of blocks; calls 4b and 6d ran int8).
# One set-up, two stream settings: W=2 first (the row's peak device memory is W=2's, the setting
# of the 14 GB target), then the engine's defaults at this block size (W=3, hold 1, uploads into
# the next step) as a variant on the same engine (same process, same compiled functions).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 CUDA_VISIBLE_DEVICES=0
R=$OUT/call8a.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | sed -n 2p
XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=${LIMIT175:-400} ROW_TIMEOUT=${T175:-560} \
  bash benchmarks/run_ours.sh $R \
  opt_175b:1:2048:bfloat16:bfloat16:--engines,zo2,--steps,2,--warmup,1,--max-inflight,2,--stream-variants,3:1:1,--variant-reps,1
echo "t=${SECONDS}s"; free -g | sed -n 2p
grep -v -i warn ${R%.jsonl}.log | tail -8
python3 benchmarks/table.py $R
python3 - "$R" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print({k: r.get(k) for k in ("zo2_step_s", "T_bus", "zo2_peak_bytes", "zo2_host_peak_gb",
                                 "zo2_init_s", "max_inflight", "branches", "packed")})
    for v in r.get("zo2_variants", []):
        print("variant", v["max_inflight"], v["hold"], v["wrap"], v["step_s"],
              "x T_bus", v["median_s"] / r["T_bus"])
PY
