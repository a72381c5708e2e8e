#!/usr/bin/env bash
# Our rows of BENCHMARKS.md, one process per row (clean peak-memory numbers), into $1 (JSONL).
# Usage: bash benchmarks/run_ours.sh out.jsonl "opt_1_3b:1:2048:bfloat16:bfloat16" ...
#        (model:batch:seq:storage:compute[:extra flags separated by commas])
set -u
out=$1; shift
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
for row in "$@"; do
  IFS=: read -r model batch seq storage compute extra <<<"$row"
  timeout ${ROW_TIMEOUT:-240} python3 benchmarks/bench_zo2.py --model "$model" --batch "$batch" \
    --seq "$seq" --storage "$storage" --compute "$compute" ${extra//,/ } --json-out "$out" \
    2>>"${out%.jsonl}.log" | tail -1 || echo "row $row failed or timed out" >&2
done
