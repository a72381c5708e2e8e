#!/usr/bin/env bash
# Call 7c (2026-11-28): hold=2 at W=4 against W=3 (uploads into the next pass in both) where
# call 7b did not look: OPT-125M with 1 and 3 blocks per call, OPT-1.3B 16x256, OPT-2.7B and
# OPT-6.7B 1x2048 (bus-bound).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
R=$OUT/call7c.jsonl
V=--stream-variants,3:1:1+4:2:1
row() { local t=$1; shift; ROW_TIMEOUT=$t bash benchmarks/run_ours.sh $R "$@" > /dev/null; echo "t=${SECONDS}s"; }
row 90 opt_125m:1:2048:bfloat16:bfloat16:--engines,zo2,--blocks-per-call,1,$V
row 90 opt_125m:1:2048:bfloat16:bfloat16:--engines,zo2,--blocks-per-call,3,$V+4:1:1
row 150 opt_1_3b:16:256:bfloat16:bfloat16:$V
(( SECONDS < 330 )) && row 170 opt_2_7b:1:2048:bfloat16:bfloat16:$V
(( SECONDS < 460 )) && row 120 opt_6_7b:1:2048:bfloat16:bfloat16:--engines,zo2,$V
python3 - "$R" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    m = r.get("mezo_step_s") or 0.0
    print(f"{r['model']} {r['batch']}x{r['seq']} G{r.get('blocks_per_call')} units {r.get('units')} "
          f"mezo {m*1e3:.2f} ms  zo2(default) {r.get('zo2_step_s', 0)*1e3:.2f} ms  "
          f"T_bus {r.get('T_bus', 0)*1e3:.2f} ms  peak {r.get('zo2_peak_bytes', 0)/1e9:.2f} GB "
          f"{r.get('zo2_error', '')} {r.get('mezo_error', '')[:80]}")
    for v in r.get("zo2_variants", []):
        ms = v["median_s"] * 1e3
        print(f"   W{v['max_inflight']} hold{v['hold']} wrap{int(v['wrap'])}: {ms:7.2f} ms"
              + (f"  /MeZO {m*1e3/ms:.3f}" if m else "")
              + f"  /T_bus {ms/(r['T_bus']*1e3):.3f}  all {[round(x*1e3, 2) for x in v['step_s']]}")
PY
