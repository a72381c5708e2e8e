#!/usr/bin/env bash
# Call 9c (2026-11-28, one-GPU H200): OPT-125M 1x2048, ZO2 alone, the host's time inside step()
# split by call (host_probe.py --breakdown; a cProfile goes to the log), bf16 and int8 storage.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
P=$OUT/probe.jsonl
for st in bfloat16 int8; do
  timeout 150 python3 benchmarks/host_probe.py --model opt_125m --batch 1 --seq 2048 \
    --storage $st --reps 3 --steps 20 --only-alone --breakdown --json-out $P \
    2>>$OUT/probe_$st.log > /dev/null || echo "probe $st failed" >&2
  echo "t=${SECONDS}s probe $st"
done
python3 - "$P" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    a, b = r["alone"]["zo2"], r["breakdown"]
    print(r["storage"], "step", a["step_ms"], "busy", a["busy_ms"], "wait", a["wait_ms"], "| wrapped inside", b["inside_step_ms"])
    for k, v in b["by_call"].items():
        print(f"   {k:18s} {v['per_step']:5.1f}/step {v['ms_per_step']:7.3f} ms/step {v['us_per_call']:8.1f} us/call")
PY
for st in bfloat16 int8; do grep -A24 "Ordered by" $OUT/probe_$st.log | cut -c1-150; done
