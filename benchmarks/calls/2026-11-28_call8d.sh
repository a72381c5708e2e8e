#!/usr/bin/env bash
# Call 8d (2026-11-28, the same 4-GPU host, last device minutes): why OPT-125M with int8 host
# storage ran at 0.68 of MeZO in call 8b (compute-bound, T_bus 1.8 ms): ZO2 alone with other
# unit sizes and with unpacked blocks, and profile_blocks' per-unit costs of the default.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 CUDA_VISIBLE_DEVICES=0
R=$OUT/call8d.jsonl
row() { (( SECONDS < $1 )) && ROW_TIMEOUT=$2 bash benchmarks/run_ours.sh $R $3 > /dev/null; echo "t=${SECONDS}s $3"; }
Z=--engines,zo2
row 999 70 opt_125m:1:2048:int8:bfloat16:$Z,--profile
row 999 60 opt_125m:1:2048:int8:bfloat16:$Z,--unpacked
row 300 60 opt_125m:1:2048:int8:bfloat16:$Z,--blocks-per-call,4
row 340 60 opt_125m:1:2048:int8:bfloat16:$Z,--blocks-per-call,1
row 380 60 opt_125m:1:2048:float32:bfloat16:$Z,--unpacked
python3 benchmarks/table.py $R
python3 -c "
import json,sys
for l in open('$R'):
    r=json.loads(l); p=r.get('profile')
    if p: print({k:(round(v,3) if isinstance(v,float) else v) for k,v in p.items()})
"
