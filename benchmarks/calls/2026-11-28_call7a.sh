#!/usr/bin/env bash
# Call 7a (2026-11-28): what a runtime device_put waits for (benchmarks/overlap_probe.py), at a
# large copy (512 MiB, ~10 ms) and at OPT-125M's unit size (56 MiB against ~3 ms of compute).
set -u
export PYTHONUNBUFFERED=1
python3 benchmarks/overlap_probe.py --mib 512 --compute-ms 10 --json-out $OUT/call7a_probe.jsonl
python3 benchmarks/overlap_probe.py --mib 56 --compute-ms 3 --json-out $OUT/call7a_probe.jsonl
