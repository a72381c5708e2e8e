#!/usr/bin/env bash
# Call 7b (2026-11-28): the stream's dispatch order, A/B in one process per row (bench_zo2.py
# --stream-variants W:hold:wrap; same engine and compiled functions, variants timed in turn):
#   3:1:0 = call 6's stream (no uploads into the next pass), 3:1:1 = uploads run on into the next
#   pass (the new default at W=3), 4:1:1 and 4:2:1 = one more slot, the host waiting on the last
#   one / two units' write-backs or not (4:2:1 is the new default at W=4), 5:2:1.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
R=$OUT/call7b.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
V=--stream-variants,3:1:0+3:1:1+4:1:1+4:2:1
ROW_TIMEOUT=140 bash benchmarks/run_ours.sh $R opt_125m:1:2048:bfloat16:bfloat16:$V > /dev/null
echo "t=${SECONDS}s"
ROW_TIMEOUT=200 bash benchmarks/run_ours.sh $R opt_1_3b:1:2048:bfloat16:bfloat16:$V+5:2:1 > /dev/null
echo "t=${SECONDS}s"
if (( SECONDS < 380 )); then
  ROW_TIMEOUT=100 bash benchmarks/run_ours.sh $R \
    opt_125m:1:2048:bfloat16:bfloat16:--engines,zo2,--blocks-per-call,2,$V > /dev/null
  echo "t=${SECONDS}s"
fi
# (the first attempt of this call ran `pytest tests/test_offload_exactness.py -k "W4 or G2"`:
#  2 passed; its rows failed on the variant list's commas)
python3 - "$R" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    m = r.get("mezo_step_s")
    print(f"{r['model']} {r['batch']}x{r['seq']} G{r.get('blocks_per_call')} units {r.get('units')} "
          f"mezo {m and m*1e3:.2f} ms  zo2(default) {r.get('zo2_step_s', 0)*1e3:.2f} ms  "
          f"T_bus {r.get('T_bus', 0)*1e3:.2f} ms  peak {r.get('zo2_peak_bytes', 0)/1e9:.2f} GB "
          f"{r.get('zo2_error', '')}")
    for v in r.get("zo2_variants", []):
        ms = v["median_s"] * 1e3
        print(f"   W{v['max_inflight']} hold{v['hold']} wrap{int(v['wrap'])}: {ms:7.2f} ms"
              + (f"  /MeZO {m*1e3/ms:.3f}" if m else "")
              + f"  /T_bus {ms/(r['T_bus']*1e3):.3f}  all {[round(x*1e3, 2) for x in v['step_s']]}")
PY
