#!/usr/bin/env bash
# Call 9b (2026-11-28, one-GPU H200): where OPT-125M's ZO2 step loses time to the host
# (benchmarks/host_probe.py: alone, beside a live MeZO engine, with gc off, after MeZO is
# deleted; one traced rep alone and one beside MeZO), for bf16, int8 and fp32 host storage;
# then OPT-6.7B 16x256 beside MeZO if time is left.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
P=$OUT/probe.jsonl
for st in bfloat16 int8 float32; do
  timeout 150 python3 benchmarks/host_probe.py --model opt_125m --batch 1 --seq 2048 \
    --storage $st --reps 5 --steps 10 --out /tmp/trace_$st --json-out $P 2>>$OUT/probe.log \
    > /dev/null || echo "probe $st failed" >&2
  echo "t=${SECONDS}s probe $st"
done
(( SECONDS < 380 )) && ROW_TIMEOUT=150 bash benchmarks/run_ours.sh $OUT/rows.jsonl \
  opt_6_7b:16:256:bfloat16:bfloat16 > /dev/null && echo "t=${SECONDS}s 6.7B 16x256"
python3 - "$P" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r["model"], r["storage"], "G", r["blocks_per_call"], "W", r["max_inflight"], "hold", r["hold"])
    for ph in ("alone", "beside_mezo", "beside_mezo_gc_off", "after_mezo"):
        for n, s in r[ph].items():
            print(f"  {ph:20s} {n:4s} step {s['step_ms']:7.2f} busy {s['busy_ms']:6.2f} wait {s['wait_ms']:6.2f} read {s['read_ms']:6.2f} all {s['step_ms_all']}")
    for t in ("alone_trace", "beside_trace"):
        for dev, d in r.get(t, {}).get("devices", {}).items():
            print(f"  {t:12s} step {r[t]['step_ms']:.2f} busy {r[t]['busy_ms']:.2f} kernels {d['kernel_busy_ms']} idle {d['kernel_idle_ms']} h2d {d['h2d_busy_ms']} d2h {d['d2h_busy_ms']}")
PY
[ -f $OUT/rows.jsonl ] && python3 benchmarks/table.py $OUT/rows.jsonl
