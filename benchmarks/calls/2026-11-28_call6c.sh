#!/usr/bin/env bash
# Call 6c (2026-11-28): call 6b's OPT-125M rows again with row limits long enough to compile
# (6b's 40-60 s limits killed every 125M row before it printed). MeZO beside the default
# (blocks_per_call="auto", 4 at this shape); G swept ZO2-only; the GPU exactness tests last.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
R=$OUT/call6c.jsonl
row() {  # row SECONDS_NEEDED spec
  if (( SECONDS + $1 > ${CALL_BUDGET:-400} )); then echo "skipped $2: no time left"; return; fi
  echo "t=${SECONDS}s start $2"
  ROW_TIMEOUT=$1 bash benchmarks/run_ours.sh $R "$2"
}
row 110 opt_125m:1:2048:bfloat16:bfloat16
for g in 1 2 12; do row 80 opt_125m:1:2048:bfloat16:bfloat16:--engines,zo2,--blocks-per-call,$g; done
echo "t=${SECONDS}s rows done"
if (( SECONDS + 70 < ${CALL_BUDGET:-400} )); then
  timeout 70 python3 -m pytest -q -x tests/test_offload_exactness.py -k "G1 or G2 or Gauto" \
    2>&1 | tail -3
fi
python3 benchmarks/table.py $R
