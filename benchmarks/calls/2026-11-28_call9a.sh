#!/usr/bin/env bash
# Call 9a (2026-11-28, one-GPU H200; prepared in session 7, run in session 8). It settles what
# BENCHMARKS.md "Not measured yet" leaves open, in one call (~8 min on a one-GPU H200 host):
# 1. OPT-125M 1x2048 with bf16 (the default), int8 and fp32 host storage: ZO2 and MeZO timed
#    alternately in one process, 5 times each (--interleave), against the spread between
#    processes (int8: 13.67 ms beside MeZO in call 8b, 9.58 ms alone in call 8d);
# 2. OPT-30B at W=4, hold 2 against the default W=3 on the same engine (1.153 x T_bus in 8c).
# Results: benchmarks/results/2026-11-28_h200_call9a.jsonl; BENCHMARKS.md "Call 9".
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=100
R=$OUT/call.jsonl
row() { (( SECONDS < $1 )) && ROW_TIMEOUT=$2 bash benchmarks/run_ours.sh $R $3 > /dev/null; echo "t=${SECONDS}s $3"; }
I=--steps,10,--warmup,2,--interleave,5
row 999 90 opt_125m:1:2048:bfloat16:bfloat16:$I
row 999 90 opt_125m:1:2048:int8:bfloat16:$I
row 300 90 opt_125m:1:2048:float32:bfloat16:$I
row 330 200 opt_30b:1:2048:bfloat16:bfloat16:--engines,zo2,--steps,3,--warmup,1,--stream-variants,4:2:1+3:1:1,--variant-reps,2
python3 benchmarks/table.py $R
python3 - "$R" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    iv = r.get("interleaved")
    if iv:
        print(r["model"], r["storage"], "ZO2", [round(x * 1e3, 2) for x in iv["zo2"]],
              "MeZO", [round(x * 1e3, 2) for x in iv["mezo"]], "ZO2/MeZO time %.3f" % iv["zo2_over_mezo"])
    for v in r.get("zo2_variants", []):
        print(r["model"], "W=%d hold=%d" % (v["max_inflight"], v["hold"]),
              [round(x, 3) for x in v["step_s"]], "x T_bus %.3f" % (v["median_s"] / r["T_bus"]))
PY
