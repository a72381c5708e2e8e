"""Where a step's time goes on the device: a jax profiler trace of a few steps, summarised.

    python benchmarks/probes/timeline.py --model opt_1_3b --engines zo2,mezo --steps 3 \\
        --out $OUT/trace
    python benchmarks/probes/timeline.py --summarize $OUT/trace/zo2 --steps 3   # an existing trace

For each device plane of the trace (one per GPU), per step:
- the time the device ran kernels (the union over all streams), and its idle time inside the
  traced window: idle time in a bus-bound step is the device waiting for uploads;
- the time host-to-device and device-to-host copies were running, and how much of each overlapped
  with kernels (a pipelined step hides its copies behind the kernels, or the kernels behind them);
- kernel time by XLA module (the unit function, outer and head stages), from the
  events' `hlo_module` statistic where the trace has it.

The summary is JSON (`--json-out`); the raw trace stays in `--out` (open it with TensorBoard's
profile plugin or xprof). `--summarize` reads a trace folder (its newest .xplane.pb) or a text
proto (.pbtxt) instead of running anything.
"""

from __future__ import annotations

import argparse
import glob
import os
import time
from collections import defaultdict

from _common import (add_model_args, build_model, finish, lazy_params, make_batch,
                     time_engine)


def _union_ns(intervals) -> int:
    """Total length of the union of [start, end) intervals."""
    total, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def _overlap_ns(a, b) -> int:
    """Length of (union of a) intersected with (union of b)."""
    return _union_ns(a) + _union_ns(b) - _union_ns(list(a) + list(b))


def _kind(name: str) -> str:
    n = name.lower().replace("to", "2")
    if "memcpy" in n or "memcopy" in n:
        if "h2d" in n:
            return "h2d"
        if "d2h" in n:
            return "d2h"
        return "copy"
    if "memset" in n:
        return "memset"
    return "kernel"


def _stat(event, key: str):
    for k, v in event.stats:
        if k == key:
            return v
    return None


def summarize(profile, steps: int) -> dict:
    """Per device plane of a `jax.profiler.ProfileData`: per-step kernel, copy and idle times
    in ms (see the module docstring)."""
    out = {}
    for plane in profile.planes:
        if not plane.name.startswith("/device:"):
            continue
        ivs = defaultdict(list)
        by_module = defaultdict(int)
        n_kernels = 0
        lines = list(plane.lines)
        # the CUDA streams' lines; others (summaries some tracers add) would count events twice
        streams = [ln for ln in lines if ln.name.startswith("Stream")] or lines
        for line in streams:
            for ev in line.events:
                s, e = int(ev.start_ns), int(ev.start_ns + ev.duration_ns)
                kind = _kind(ev.name)
                ivs[kind].append((s, e))
                if kind == "kernel":
                    n_kernels += 1
                    by_module[str(_stat(ev, "hlo_module") or "?")] += e - s
        every = [iv for v in ivs.values() for iv in v]
        if not every:
            continue
        window = max(e for _, e in every) - min(s for s, _ in every)
        ms = lambda ns: round(ns / 1e6 / steps, 3)  # noqa: E731
        kernels = ivs["kernel"]
        out[plane.name] = {
            "lines": [ln.name for ln in streams],
            "other_lines": [ln.name for ln in lines if ln not in streams],
            "window_ms": ms(window),
            "kernel_busy_ms": ms(_union_ns(kernels)),
            "kernel_idle_ms": ms(window - _union_ns(kernels)),
            "kernels_per_step": round(n_kernels / steps, 1),
            "h2d_busy_ms": ms(_union_ns(ivs["h2d"])),
            "d2h_busy_ms": ms(_union_ns(ivs["d2h"])),
            "h2d_and_d2h_together_ms": ms(_overlap_ns(ivs["h2d"], ivs["d2h"])),
            "h2d_under_kernels_ms": ms(_overlap_ns(ivs["h2d"], kernels)),
            "d2h_under_kernels_ms": ms(_overlap_ns(ivs["d2h"], kernels)),
            "kernel_ms_by_module": {k: ms(v) for k, v in
                                    sorted(by_module.items(), key=lambda kv: -kv[1])},
        }
    return out


def load(path: str):
    """A ProfileData: the newest .xplane.pb under the folder `path`, or the text proto `path`."""
    if path.endswith(".pbtxt") and os.path.isfile(path):
        import jax

        with open(path) as fh:
            return jax.profiler.ProfileData.from_text_proto(fh.read())
    files = sorted(glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no .xplane.pb trace under {path!r}")
    import jax

    return jax.profiler.ProfileData.from_file(files[-1])


def trace_engine(engine, batch, steps: int, warmup: int, trace_dir: str) -> dict:
    """The timed steps under the profiler (mean step time), and the trace's summary."""
    r = time_engine(engine, batch, steps, warmup, trace_dir=trace_dir)
    return {"step_ms_traced": round(1e3 * r["step_s_mean"], 3),
            "devices": summarize(load(trace_dir), steps)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, engines="zo2")
    p.add_argument("--packed", default="auto", choices=["auto", "yes", "no"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", help="folder for the raw traces (one per engine)")
    p.add_argument("--summarize", metavar="TRACE",
                   help="print the summary of an existing trace (folder or .pbtxt) over --steps "
                        "steps, and run nothing")
    p.add_argument("--json-out", help="append the summary as one JSON line")
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (the first step compiles)")
    engines = a.engines.split(",")
    if not engines or any(e not in ("zo2", "mezo") for e in engines):
        p.error(f"--engines takes zo2 and/or mezo, got {a.engines!r}")
    if a.summarize:
        return finish(summarize(load(a.summarize), a.steps), a.json_out)
    if not a.out:
        p.error("--out is required (or --summarize)")

    import jax
    import jax.numpy as jnp

    from zo2_jax.offload import Storage, ZO2Engine
    from zo2_jax.zo import MeZOEngine, mezo_sgd

    cfg, compute, _, model = build_model(a)
    common = dict(tx=mezo_sgd(1e-6), eps=1e-3, compute_dtype=compute,
                  storage=Storage(a.storage, rounding="stochastic"))
    init_dtype = jnp.float32 if a.storage == "float32" else jnp.bfloat16
    batch = make_batch(cfg, a.batch, a.seq)
    row = {"model": a.model, "layers": cfg.num_layers, "batch": a.batch, "seq": a.seq,
           "storage": a.storage, "compute": a.compute, "device": jax.devices()[0].device_kind,
           "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
    for name in engines:
        params = lazy_params(model, init_dtype)
        if name == "zo2":
            eng = ZO2Engine(model, params, max_inflight=a.max_inflight, branches=a.branches,
                            packed={"auto": "auto", "yes": True, "no": False}[a.packed],
                            blocks_per_call=a.blocks_per_call, **common)
            row.update(max_inflight=eng.max_inflight, packed=eng.packed, branches=eng.branches,
                       blocks_per_call=eng.blocks_per_call)
        else:
            eng = MeZOEngine(model, params, **common)
        del params
        row[name] = trace_engine(eng, batch, a.steps, a.warmup, os.path.join(a.out, name))
        del eng
        jax.clear_caches()
    return finish(row, a.json_out)


if __name__ == "__main__":
    main()
