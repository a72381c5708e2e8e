#!/usr/bin/env bash
# Call 7f (2026-11-28, the last minutes of device time): the two headline rows again at the final
# commit of the session (after the review fixes, which leave a training loop's steady state as
# in call 7d), beside MeZO in the same process.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
R=$OUT/call7f.jsonl
ROW_TIMEOUT=90 bash benchmarks/run_ours.sh $R opt_125m:1:2048:bfloat16:bfloat16 > /dev/null; echo "t=${SECONDS}s"
(( SECONDS < 110 )) && ROW_TIMEOUT=95 bash benchmarks/run_ours.sh $R opt_1_3b:1:2048:bfloat16:bfloat16 > /dev/null
echo "t=${SECONDS}s"
python3 benchmarks/table.py $R 2>/dev/null | tail -4
