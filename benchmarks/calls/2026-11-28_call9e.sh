#!/usr/bin/env bash
# Call 9e (2026-11-28, one-GPU H200): the landed code with both host-time changes (no device_put
# for a batch or key already on the device; a unit's write-back and the next uploads in one
# device_put). OPT-125M 1x2048 bf16, int8 and fp32 storage interleaved with MeZO (5 repeats),
# the host breakdown for bf16, OPT-1.3B 1x2048 (bus-bound) beside MeZO, and the engine's
# bit-identity tests against MeZO on the GPU.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
R=$OUT/ab.jsonl
I=--steps,10,--warmup,2,--interleave,5
for st in bfloat16 int8 float32; do
  ROW_TIMEOUT=90 bash benchmarks/run_ours.sh $R opt_125m:1:2048:$st:bfloat16:$I > /dev/null
  echo "t=${SECONDS}s 125M $st"
done
timeout 60 python3 benchmarks/host_probe.py --model opt_125m --batch 1 --seq 2048 --reps 3 \
  --steps 20 --only-alone --breakdown --json-out $OUT/probe.jsonl 2>>$OUT/probe.log >/dev/null
echo "t=${SECONDS}s probe"
(( SECONDS < 300 )) && ROW_TIMEOUT=80 bash benchmarks/run_ours.sh $R opt_1_3b:1:2048:bfloat16:bfloat16 >/dev/null
echo "t=${SECONDS}s 1.3B"
(( SECONDS < 360 )) && timeout $((470 - SECONDS)) python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_offload_exactness.py -k "bit_for_bit and not real_llama or deep_stream" 2>&1 | tail -3
echo "t=${SECONDS}s tests"
python3 benchmarks/table.py $R
python3 - $OUT <<'PY'
import json, sys, os
d = sys.argv[1]
for line in open(os.path.join(d, "ab.jsonl")):
    r = json.loads(line); iv = r.get("interleaved")
    if iv:
        print(r["model"], r["storage"], "first ZO2 %.2f MeZO %.2f;" % (r["zo2_step_s"] * 1e3, r["mezo_step_s"] * 1e3),
              "ZO2", [round(x * 1e3, 2) for x in iv["zo2"]], "MeZO", [round(x * 1e3, 2) for x in iv["mezo"]],
              "ZO2/MeZO time %.3f" % iv["zo2_over_mezo"])
p = os.path.join(d, "probe.jsonl")
for line in open(p) if os.path.exists(p) else []:
    r = json.loads(line); a, b = r["alone"]["zo2"], r["breakdown"]
    print("probe: step", a["step_ms"], "busy", a["busy_ms"], "wait", a["wait_ms"], "inside(wrapped)", b["inside_step_ms"])
    for k, x in b["by_call"].items():
        print(f"   {k:18s} {x['per_step']:5.1f}/step {x['ms_per_step']:7.3f} ms/step {x['us_per_call']:8.1f} us/call")
PY
