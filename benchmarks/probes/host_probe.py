"""Where a small-shape ZO2 step loses time to the host: per-step host work and waits, alone and
beside a live MeZO engine, with and without Python's garbage collector, plus device traces.

    python benchmarks/probes/host_probe.py --model opt_125m --batch 1 --seq 2048 --reps 5 \
        --out $OUT/trace --json-out $OUT/probe.jsonl

At OPT-125M a ZO2 step (~9-13 ms) is a few units of ~1.5 ms of kernels each, so any host delay
between them idles the device. For each phase, ZO2 is timed `--reps` times (`--steps` steps after
one warm-up step) and each step's host time is split into:
- `wait_ms`: blocked in the stream waiting for an older unit's write-back (a free slot);
- `busy_ms`: everything else inside `engine.step` (Python and XLA dispatch);
- the rest of the step's wall time: reading the previous step's loss (the host waiting for the
  device to finish that step), and the final drain.
A host-bound step has busy_ms close to the step time; a device-bound one waits instead.

Phases, in one process: `alone` (ZO2 only); `beside_mezo` (MeZO built and timed, then ZO2 and
MeZO alternately); `beside_mezo_gc_off` (the same with `gc.disable()` while timing);
`after_mezo` (MeZO deleted). With `--out`, one traced ZO2 rep per phase `alone` and
`beside_mezo` (`timeline.summarize`: kernel busy and device idle per step).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import gc
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# _common first: it puts this checkout's zo2_jax on the path
from _common import add_model_args, build_model, finish, lazy_params, make_batch
from timeline import load, summarize
from zo2_jax.offload import Storage, ZO2Engine
from zo2_jax.zo import MeZOEngine, mezo_sgd


def instrument(eng) -> dict:
    """Counts the time eng's stream spends blocked on slots (per call, accumulated)."""
    acc = {"wait": 0.0}
    st = eng._stream
    inner = st._wait

    def timed_wait(unit, token):
        t = time.perf_counter()
        inner(unit, token)
        acc["wait"] += time.perf_counter() - t

    st._wait = timed_wait
    return acc


def timed_rep(eng, acc, batch, steps: int, key_base: int, trace_dir=None) -> dict:
    """One warm-up step, then `steps` timed ones (metrics read a step late): mean ms per step
    of the wall time, the host's busy and waiting time inside step(), and the loss reads."""
    key = jax.random.key(key_base)
    jax.block_until_ready(eng.step(batch, jax.random.fold_in(key, 0)))
    ctx = jax.profiler.trace(trace_dir) if trace_dir else None
    if ctx:
        ctx.__enter__()
    prev, inside, read, step_ends = None, 0.0, 0.0, []
    acc["wait"] = 0.0
    t0 = time.perf_counter()
    for s in range(steps):
        t = time.perf_counter()
        m = eng.step(batch, jax.random.fold_in(key, 1 + s))
        t1 = time.perf_counter()
        inside += t1 - t
        if prev is not None:
            float(prev["loss"])
            read += time.perf_counter() - t1
            step_ends.append(time.perf_counter())
        prev = m
    jax.block_until_ready(prev)
    total = time.perf_counter() - t0
    if ctx:
        ctx.__exit__(None, None, None)
    wait = acc.get("wait", 0.0)
    gaps = np.diff(step_ends) * 1e3 if len(step_ends) > 1 else np.array([np.nan])
    ms = lambda x: round(x / steps * 1e3, 3)  # noqa: E731
    return {"step_ms": ms(total), "busy_ms": ms(inside - wait), "wait_ms": ms(wait),
            "read_ms": ms(read), "step_gap_ms_min": round(float(gaps.min()), 3),
            "step_gap_ms_max": round(float(gaps.max()), 3)}


def breakdown(eng, acc, batch, steps: int) -> dict:
    """Host time inside `eng.step` by call, per step (ms) and per call (us), over one rep of
    `steps` steps; the engine's module-level jitted functions and jax's transfer and wait
    functions are wrapped for its duration. A cProfile of a second rep goes to stderr."""
    from zo2_jax.offload import _calls as _zo2

    tot, cnt = collections.defaultdict(float), collections.Counter()

    def wrap(name, f):
        def g(*args, **kw):
            t = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                tot[name] += time.perf_counter() - t
                cnt[name] += 1
        return g

    saved = {"put": jax.device_put, "bur": jax.block_until_ready, "outer": _zo2.outer_fn,
             "head": _zo2.head_fn, "units": dict(_zo2.unit_fns)}
    jax.device_put = wrap("device_put", saved["put"])
    jax.block_until_ready = wrap("block_until_ready", saved["bur"])
    _zo2.outer_fn, _zo2.head_fn = wrap("outer_fn", saved["outer"]), wrap("head_fn", saved["head"])
    for b, f in saved["units"].items():
        _zo2.unit_fns[b] = wrap("unit_fn", f)
    try:
        rep = timed_rep(eng, acc, batch, steps, key_base=300)
        key = jax.random.key(301)
        saved["bur"](eng.step(batch, key))  # a warm-up step, not counted
        tot.clear()
        cnt.clear()
        inside = 0.0
        prev = None
        for s in range(steps):
            t = time.perf_counter()
            m = eng.step(batch, jax.random.fold_in(key, s))
            inside += time.perf_counter() - t
            if prev is not None:
                saved["bur"](prev["loss"])  # not counted: outside step()
            prev = m
        saved["bur"](prev)
        out = {"step_ms_wrapped": rep["step_ms"],
               "inside_step_ms": round(inside / steps * 1e3, 3),
               "by_call": {k: {"per_step": round(cnt[k] / steps, 2),
                               "ms_per_step": round(tot[k] / steps * 1e3, 3),
                               "us_per_call": round(tot[k] / max(cnt[k], 1) * 1e6, 1)}
                           for k in tot}}
        pr = cProfile.Profile()
        pr.enable()
        for s in range(steps):
            eng.step(batch, jax.random.fold_in(key, 100 + s))
        pr.disable()
        saved["bur"](eng.step(batch, jax.random.fold_in(key, 999)))
        pstats.Stats(pr, stream=sys.stderr).sort_stats("tottime").print_stats(20)
    finally:
        jax.device_put, jax.block_until_ready = saved["put"], saved["bur"]
        _zo2.outer_fn, _zo2.head_fn = saved["outer"], saved["head"]
        _zo2.unit_fns.update(saved["units"])
    # the wrappers are gone: later phases (and a caller of main) see jax and the engine as before
    out["restored"] = (jax.device_put is saved["put"] and jax.block_until_ready is saved["bur"]
                       and _zo2.outer_fn is saved["outer"] and _zo2.head_fn is saved["head"]
                       and _zo2.unit_fns == saved["units"])
    return out


def phase(name, engines: dict, accs: dict, batch, steps: int, reps: int, gc_off=False) -> dict:
    out = {n: [] for n in engines}
    if gc_off:
        gc.collect()
        gc.disable()
    try:
        for r in range(reps):
            for n, eng in engines.items():
                out[n].append(timed_rep(eng, accs[n], batch, steps, key_base=100 + r))
                print(f"[{name}] {n} {out[n][-1]}", file=sys.stderr, flush=True)
    finally:
        if gc_off:
            gc.enable()
    summary = {}
    for n, rows in out.items():
        summary[n] = {k: round(float(np.median([x[k] for x in rows])), 3) for k in rows[0]}
        summary[n]["step_ms_all"] = [x["step_ms"] for x in rows]
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, engines="zo2,mezo")
    p.add_argument("--storage-rounding", default="stochastic", choices=["nearest", "stochastic"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--breakdown", action="store_true",
                   help="one more rep alone, its host time inside step() split by call")
    p.add_argument("--only-alone", action="store_true", help="skip the MeZO phases")
    p.add_argument("--out", help="folder for the traces (one ZO2 rep traced per phase)")
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    if a.steps < 2 or a.reps < 1:
        p.error("--steps must be >= 2 and --reps >= 1")
    cfg, compute, _, model = build_model(a)
    common = dict(tx=mezo_sgd(1e-6, weight_decay=0.0), eps=1e-3, compute_dtype=compute,
                  storage=Storage(a.storage, rounding=a.storage_rounding))
    init_dtype = jnp.float32 if a.storage == "float32" else jnp.bfloat16
    batch = make_batch(cfg, a.batch, a.seq)
    row = {"model": a.model, "layers": cfg.num_layers, "batch": a.batch, "seq": a.seq,
           "storage": a.storage, "compute": a.compute, "device": jax.devices()[0].device_kind,
           "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "steps": a.steps,
           "reps": a.reps}
    zo2 = ZO2Engine(model, lazy_params(model, init_dtype), max_inflight=a.max_inflight,
                    branches=a.branches, blocks_per_call=a.blocks_per_call, **common)
    row.update(max_inflight=zo2.max_inflight, hold=zo2._stream.hold,
               blocks_per_call=zo2.blocks_per_call, units=len(zo2._stream.streamed))
    accs = {"zo2": instrument(zo2), "mezo": {}}
    jax.block_until_ready(zo2.step(batch, jax.random.key(0)))  # compile
    row["alone"] = phase("alone", {"zo2": zo2}, accs, batch, a.steps, a.reps)
    if a.out:
        row["alone_trace"] = timed_rep(zo2, accs["zo2"], batch, 5, 7,
                                       trace_dir=os.path.join(a.out, "alone"))
        row["alone_trace"]["devices"] = summarize(load(os.path.join(a.out, "alone")), 5)
    if a.breakdown:
        row["breakdown"] = breakdown(zo2, accs["zo2"], batch, a.steps)
        print(f"[breakdown] {row['breakdown']}", file=sys.stderr, flush=True)
    if a.only_alone:
        return finish(row, a.json_out)
    mezo = MeZOEngine(model, lazy_params(model, init_dtype), **common)
    jax.block_until_ready(mezo.step(batch, jax.random.key(0)))
    both = {"zo2": zo2, "mezo": mezo}
    row["beside_mezo"] = phase("beside_mezo", both, accs, batch, a.steps, a.reps)
    row["beside_mezo_gc_off"] = phase("beside_mezo_gc_off", both, accs, batch, a.steps, a.reps,
                                      gc_off=True)
    if a.out:
        row["beside_trace"] = timed_rep(zo2, accs["zo2"], batch, 5, 8,
                                        trace_dir=os.path.join(a.out, "beside"))
        row["beside_trace"]["devices"] = summarize(load(os.path.join(a.out, "beside")), 5)
    del both, mezo
    gc.collect()
    row["after_mezo"] = phase("after_mezo", {"zo2": zo2}, accs, batch, a.steps, a.reps)
    return finish(row, a.json_out)


if __name__ == "__main__":
    main()
