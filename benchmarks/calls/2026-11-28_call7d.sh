#!/usr/bin/env bash
# Call 7d (2026-11-28): the landed defaults after call 7 (max_inflight="auto" = 4 below 1 GiB
# blocks, blocks_per_call="auto" keeping W+2 units, uploads into the next pass, hold = 2) beside
# MeZO in the same process, and the reference PyTorch ZO2 (third_party/zo2, carried) beside them.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
R=$OUT/call7d.jsonl; REF=$OUT/call7d_ref.jsonl
row() { local t=$1; shift; ROW_TIMEOUT=$t bash benchmarks/run_ours.sh $R "$@" > /dev/null; echo "t=${SECONDS}s"; }
ref() { timeout $1 python3 benchmarks/reference_zo2.py --model opt_1_3b --method zo2 --precision $2 \
  --steps 6 --warmup 2 --json-out $REF > /dev/null 2>>$OUT/call7d_ref.log; echo "t=${SECONDS}s ref $2"; }
row 100 opt_125m:1:2048:bfloat16:bfloat16
row 120 opt_1_3b:1:2048:bfloat16:bfloat16
ref 80 fp16
ref 80 fp32
row 90 opt_1_3b:1:2048:float32:float32:--engines,zo2
(( SECONDS < 380 )) && row 120 opt_1_3b:16:256:bfloat16:bfloat16
(( SECONDS < 440 )) && row 130 opt_2_7b:1:2048:bfloat16:bfloat16
(( SECONDS < 520 )) && row 60 opt_125m:1:2048:bfloat16:bfloat16:--engines,zo2,--blocks-per-call,12
python3 benchmarks/table.py $R 2>/dev/null | tail -12
python3 - "$REF" <<'PY'
import json, sys, os
if os.path.exists(sys.argv[1]):
    for line in open(sys.argv[1]):
        r = json.loads(line)
        print("reference", r.get("model"), r.get("method"), r.get("precision"), r.get("tokens_per_s"),
              r.get("step_s"), r.get("peak_gpu_bytes"), r.get("error", ""))
PY
