#!/usr/bin/env bash
# Call 3b (2026-11-28): host-storage precision study on SmolLM2-135M (GGUF carried in two parts
# over two calls), then the whole 96-layer OPT-175B shape with int8 host storage.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=230
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
P0=/tmp/keep/smollm2.gguf.part00; [ -f $P0 ] || P0=.assets/smollm2.gguf.part00
cat $P0 .assets/smollm2.gguf.part01 > /tmp/smollm2.gguf; md5sum /tmp/smollm2.gguf
timeout 270 python3 benchmarks/precision_accuracy.py --model /tmp/smollm2.gguf --engine mezo \
  --settings fp32,bf16-nearest,bf16-sr,int8-sr --steps 500 --time-budget 240 --out /tmp/prec \
  > $OUT/precision.log 2>&1; tail -20 $OUT/precision.log
cp /tmp/prec/summary.json /tmp/prec/precision_accuracy.png $OUT/ 2>/dev/null
timeout 280 python3 benchmarks/bench_zo2.py --model opt_175b --storage int8 --engines zo2 \
  --steps 2 --warmup 1 --max-inflight 2 --json-out $OUT/rows175.jsonl 2>&1 | tail -3
python3 benchmarks/table.py $OUT/rows175.jsonl
