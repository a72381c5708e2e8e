#!/usr/bin/env bash
# Call 8e (2026-11-28, one-GPU host, the session's last device minutes): per-unit costs measured
# alone (profile_blocks) for the two slow OPT-125M cases: unpacked int8 blocks (49 ms/step in
# call 8d, 24 arrays per unit of 2 blocks) and the forced one-unit case (G=12, 49 ms in call 7d).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
R=$OUT/call8e.jsonl
row() { (( SECONDS < $1 )) && ROW_TIMEOUT=$2 bash benchmarks/run_ours.sh $R $3 > /dev/null; echo "t=${SECONDS}s $3"; }
row 999 60 opt_125m:1:2048:int8:bfloat16:--engines,zo2,--unpacked,--profile
row 100 60 opt_125m:1:2048:bfloat16:bfloat16:--engines,zo2,--blocks-per-call,12,--profile
python3 benchmarks/table.py $R
python3 -c "
import json
for l in open('$R'):
    r=json.loads(l); p=r.get('profile')
    if p: print(r['storage'], r.get('blocks_per_call'), {k:(round(v,3) if isinstance(v,float) else v) for k,v in p.items()})
"
