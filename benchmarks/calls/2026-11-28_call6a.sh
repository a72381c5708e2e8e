#!/usr/bin/env bash
# Call 6a (2026-11-28): device timelines (jax profiler) of ZO2 and MeZO where ZO2 trails MeZO:
# OPT-125M 1x2048, OPT-1.3B 1x2048 and 16x256, the engine's defaults. Summaries into
# $OUT/call6a.jsonl, the raw traces into $OUT/traces.tgz (read them with timeline.load).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
R=$OUT/call6a.jsonl
for spec in opt_125m:1:2048 opt_1_3b:1:2048 opt_1_3b:16:256; do
  IFS=: read -r model batch seq <<<"$spec"
  timeout 120 python3 benchmarks/timeline.py --model $model --batch $batch --seq $seq \
    --engines zo2,mezo --steps 3 --out /tmp/traces/${model}_${batch}x${seq} --json-out $R \
    > /dev/null 2>>$OUT/call6a.log || echo "$spec failed" >&2
done
tar -C /tmp -czf $OUT/traces.tgz traces && ls -la $OUT
python3 - <<'PY'
import json, os
for line in open(os.environ["OUT"] + "/call6a.jsonl"):
    r = json.loads(line)
    for e in ("zo2", "mezo"):
        for dev, d in r[e]["devices"].items():
            print(r["model"], r["batch"], r["seq"], e, r[e]["step_ms_traced"], "busy",
                  d["kernel_busy_ms"], "idle", d["kernel_idle_ms"], "k/step", d["kernels_per_step"],
                  "h2d", d["h2d_busy_ms"], "d2h", d["d2h_busy_ms"],
                  {k: v for k, v in list(d["kernel_ms_by_module"].items())[:6]})
PY
