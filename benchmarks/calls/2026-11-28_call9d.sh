#!/usr/bin/env bash
# Call 9d (2026-11-28, one-GPU H200): OPT-125M 1x2048 bf16, after ZO2Engine stopped re-putting a
# batch and key already on the device. The host's time by call (host_probe --breakdown) and the
# same-process A/B (bench_zo2 --interleave 5), with XLA's defaults and with while loops and
# conditionals captured in command buffers (CUDA graphs): the unit function's launch is the
# largest host cost (call 9c), and its blocks run in a fori_loop.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
WHILE_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL
for v in default while; do
  if [ $v = while ]; then export XLA_FLAGS=$WHILE_FLAGS; else unset XLA_FLAGS; fi
  timeout 120 python3 benchmarks/host_probe.py --model opt_125m --batch 1 --seq 2048 \
    --reps 3 --steps 20 --only-alone --breakdown --json-out $OUT/probe_$v.jsonl \
    2>>$OUT/probe_$v.log > /dev/null || echo "probe $v failed" >&2
  echo "t=${SECONDS}s probe $v"
  ROW_TIMEOUT=120 bash benchmarks/run_ours.sh $OUT/ab_$v.jsonl \
    opt_125m:1:2048:bfloat16:bfloat16:--steps,10,--warmup,2,--interleave,5 > /dev/null
  echo "t=${SECONDS}s A/B $v"
done
unset XLA_FLAGS
python3 - $OUT <<'PY'
import json, sys, os
d = sys.argv[1]
for v in ("default", "while"):
    for line in open(os.path.join(d, f"probe_{v}.jsonl")) if os.path.exists(os.path.join(d, f"probe_{v}.jsonl")) else []:
        r = json.loads(line); a, b = r["alone"]["zo2"], r["breakdown"]
        print(v, "probe: step", a["step_ms"], "busy", a["busy_ms"], "wait", a["wait_ms"], "inside(wrapped)", b["inside_step_ms"])
        for k, x in b["by_call"].items():
            print(f"   {k:18s} {x['per_step']:5.1f}/step {x['ms_per_step']:7.3f} ms/step {x['us_per_call']:8.1f} us/call")
    p = os.path.join(d, f"ab_{v}.jsonl")
    for line in open(p) if os.path.exists(p) else []:
        r = json.loads(line); iv = r.get("interleaved", {})
        print(v, "A/B: first ZO2 %.2f MeZO %.2f ms;" % (r.get("zo2_step_s", 0) * 1e3, r.get("mezo_step_s", 0) * 1e3),
              "interleaved ZO2", [round(x * 1e3, 2) for x in iv.get("zo2", [])],
              "MeZO", [round(x * 1e3, 2) for x in iv.get("mezo", [])], "ZO2/MeZO time %.3f" % iv.get("zo2_over_mezo", 0))
PY
