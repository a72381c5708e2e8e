"""Memory over a long ZO2 run: device memory, host resident set, the pinned pool and the live
jax arrays at the start (after warm-up) and the end of `--steps` steps, with an evaluation and a
`save_engine` checkpoint (two kept) every `--every` steps when `--dir` is given.

    python benchmarks/probes/soak.py --model opt_1_3b --steps 2000 --every 500 --dir /tmp/ck \
        --json-out $OUT/soak.jsonl
    python benchmarks/probes/soak.py --model tiny --vocab-size 512 --seq 64 --compute float32 \
        --storage float32 --steps 300 --every 100 --dir /tmp/ck      # a quick CPU run

Samples are taken at one phase of the cycle (after the eval and the checkpoint, waited for, and a
garbage collection) so a step's transient arrays are not counted. Device memory is the device's
memory_stats() (bytes_in_use, peak) where the backend has them (GPU; not the CPU backend); the
pinned pool is the live arrays' bytes by memory kind. A row: each figure at start and end and
its growth in %, and the RSS after every eval (a leak climbs; an allocator's one-off steps once).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import time

import jax
import jax.numpy as jnp

# _common first: it puts this checkout's zo2_jax on the path
from _common import add_model_args, build_model, finish, lazy_params, make_batch
from zo2_jax.offload import Storage, ZO2Engine  # noqa: E402
from zo2_jax.train.checkpoint import Checkpointer  # noqa: E402
from zo2_jax.zo import mezo_sgd  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def sample(trim: bool = False) -> dict:
    """Host RSS, device memory_stats (where there are), live arrays and their bytes by kind,
    Python's objects. `trim`: glibc's malloc_trim(0) first (returns freed heap pages to the
    system): RSS that grows without it but not with it is the allocator's, not a leak."""
    gc.collect()
    if trim:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        out = {"rss": int(f.read().split()[1]) * _PAGE, "live_arrays": 0,
               "py_objects": len(gc.get_objects())}
    stats = jax.devices()[0].memory_stats() or {}
    for k in ("bytes_in_use", "peak_bytes_in_use"):
        if k in stats:
            out[f"device_{k}"] = stats[k]
    for x in jax.live_arrays():
        k = f"live_{x.sharding.memory_kind}_bytes"
        out[k] = out.get(k, 0) + x.nbytes
        out["live_arrays"] += 1
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, engines="zo2")
    p.add_argument("--storage-rounding", default="stochastic", choices=["nearest", "stochastic"])
    p.add_argument("--steps", type=int, default=2000, help="steps after the warm-up")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--every", type=int, default=500, help="eval (and checkpoint) interval")
    p.add_argument("--dir", help="checkpoint folder (emptied first); none: no checkpoints")
    p.add_argument("--trim", action="store_true",
                   help="malloc_trim(0) before each sample (glibc): tells a leak from the "
                        "allocator keeping freed pages")
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    if a.steps < 1 or a.every < 1 or a.warmup < 1:
        p.error("--steps, --every and --warmup must be >= 1")
    cfg, compute, _, model = build_model(a)
    init_dtype = jnp.float32 if a.storage == "float32" else jnp.bfloat16
    engine = ZO2Engine(model, lazy_params(model, init_dtype), mezo_sgd(1e-6, weight_decay=0.0),
                       eps=1e-3, compute_dtype=compute,
                       storage=Storage(a.storage, rounding=a.storage_rounding),
                       max_inflight=a.max_inflight, branches=a.branches,
                       blocks_per_call=a.blocks_per_call)
    batch, held_out = make_batch(cfg, a.batch, a.seq), make_batch(cfg, a.batch, a.seq, seed=1)
    ck = None
    if a.dir:
        shutil.rmtree(a.dir, ignore_errors=True)
        ck = Checkpointer(a.dir, keep=2, asynchronous=True)
    key, prev, t = jax.random.key(1), None, 0
    rss_mib = {}  # step -> RSS after each eval/checkpoint: a leak climbs, a one-off steps once

    def cycle(steps: int) -> None:
        nonlocal prev, t
        for _ in range(steps):
            t += 1
            m = engine.step(batch, jax.random.fold_in(key, t))
            if prev is not None:
                float(prev["loss"])  # read a step late, as a training loop does
            prev = m
            if t % a.every == 0:
                checkpoint()

    def checkpoint() -> None:
        float(engine.eval_loss(held_out))
        if ck is not None:
            ck.save_engine(t, engine, {"pos": t}, {"step": t})
            ck.wait()
        rss_mib[t] = round(sample(a.trim)["rss"] / 2**20, 1)

    cycle(a.warmup)
    if t % a.every:
        checkpoint()  # compiled and allocated once before the first sample
    start, t0 = sample(a.trim), time.perf_counter()
    cycle(a.steps)
    if t % a.every:
        checkpoint()  # the end sample at the same phase as the start's
    seconds = time.perf_counter() - t0
    end = sample(a.trim)
    if ck is not None:
        ck.close()
    row = {"probe": "soak", "model": a.model, "layers": cfg.num_layers, "batch": a.batch,
           "seq": a.seq, "storage": a.storage, "compute": a.compute, "steps": a.steps,
           "warmup": a.warmup, "every": a.every, "checkpoints": ck is not None, "trim": a.trim,
           "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "date": time.strftime("%Y-%m-%d"), "seconds": round(seconds, 1),
           "streamed_bytes": engine.streamed_bytes(), "rss_mib_by_step": rss_mib}
    for k in sorted(set(start) | set(end)):
        s, e = start.get(k, 0), end.get(k, 0)
        row[f"{k}_start"], row[f"{k}_end"] = s, e
        row[f"{k}_growth_pct"] = round((e - s) / s * 100, 3) if s else None
    return finish(row, a.json_out)


if __name__ == "__main__":
    main()
