"""The mesh engine beside the one-device engine, in one process: step time, peak device memory
and whether the two give the same losses and g, bit for bit.

    python benchmarks/probes/mesh_probe.py --model opt_1_3b --devices 1,all --json-out $OUT/m.jsonl

`--devices` lists the mesh sizes to run: an int, or "all" (every device). A size of 1 runs the
mesh code path on one device (a one-device `Parallel`, which the engines otherwise replace by
their one-device path): on a one-GPU machine it measures what the mesh path costs over the
one-device path, and checks the mesh path's shard_map stages on the GPU. Each mesh row runs
parallel="directions" with num_directions a multiple of its size (bit-identical to one device);
`--parallel data` runs the data split instead (equal to within float re-association).
`--trace DIR` adds to each row a profiler trace of a few more steps, summarised as
`timeline.py` does (kernel, copy and idle time per device and step).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from _common import (ROOT, add_model_args, build_model, command_line, finish,
                     git_identity, lazy_params, make_batch, time_engine)
from timeline import trace_engine
from zo2_jax.core import common, spmd
from zo2_jax.offload import Storage, ZO2Engine
from zo2_jax.zo import mezo_sgd


def _engine(model, a, q: int, n, compute):
    init_dtype = jnp.float32 if a.storage == "float32" else jnp.bfloat16
    kw = dict(eps=1e-3, compute_dtype=compute, num_directions=q,
              storage=Storage(a.storage, rounding="stochastic"), max_inflight=a.max_inflight,
              branches=a.branches)
    if n is None:
        return ZO2Engine(model, lazy_params(model, init_dtype), mezo_sgd(1e-6),
                         packed={"auto": "auto", "yes": True, "no": False}[a.packed], **kw)
    if n == 1:  # the mesh path on one device: bypass parallel_of's one-device shortcut
        real = common.parallel_of
        common.parallel_of = lambda mesh, parallel, q_: spmd.Parallel(  # noqa: E731
            spmd.make_mesh(jax.devices()[:1]), "directions" if parallel == "auto" else parallel,
            q_)
        try:
            return ZO2Engine(model, lazy_params(model, init_dtype), mezo_sgd(1e-6), mesh=1,
                             parallel=a.parallel, **kw)
        finally:
            common.parallel_of = real
    return ZO2Engine(model, lazy_params(model, init_dtype), mezo_sgd(1e-6), mesh=n,
                     parallel=a.parallel, **kw)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, engines="zo2")
    p.add_argument("--devices", default="1,all", help="mesh sizes, comma-separated")
    p.add_argument("--parallel", default="directions", choices=["directions", "data"])
    p.add_argument("--packed", default="auto", choices=["auto", "yes", "no"],
                   help="the one-device path's packing (a mesh streams unpacked): 'no' "
                        "compares like with like")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--trace", metavar="DIR",
                   help="also trace --trace-steps steps of each row under DIR, summarised")
    p.add_argument("--trace-steps", type=int, default=3)
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    cfg, compute, _, model = build_model(a)
    batch = make_batch(cfg, a.batch, a.seq)
    sizes = [len(jax.devices()) if s == "all" else int(s) for s in a.devices.split(",")]
    q = int(np.lcm.reduce(sizes)) if a.parallel == "directions" else 1
    commit, dirty = git_identity(ROOT)
    ident = {"commit": commit, "dirty": dirty}

    def run(n):
        eng = _engine(model, a, q, n, compute)
        t0 = time.perf_counter()
        timing = time_engine(eng, batch, a.steps, a.warmup)
        m = eng.step(batch, jax.random.key(12345))  # one more step, its metrics compared
        out = {k: np.asarray(m[k]) for k in ("loss_plus", "loss_minus", "projected_grad")}
        label = "one-device" if n is None else f"mesh{n}"
        traced = (trace_engine(eng, batch, a.trace_steps, 1, os.path.join(a.trace, label))
                  if a.trace else None)
        stats = [d.memory_stats() or {} for d in jax.local_devices()[:max(n or 1, 1)]]
        row = {"probe": "mesh", "model": a.model, "batch": a.batch, "seq": a.seq,
               "layers": cfg.num_layers, "storage": a.storage, "compute": a.compute,
               "devices": n or 1, "path": "one-device" if n is None else "mesh",
               "packed": eng.packed,
               "parallel": None if n is None else eng.mesh.mode, "num_directions": q,
               "step_s": timing["step_s"], "step_s_mean": timing["step_s_mean"],
               "tokens_per_s": a.batch * a.seq / timing["step_s"],
               "peak_device_bytes": max((s.get("peak_bytes_in_use", 0) for s in stats),
                                        default=None),
               "streamed_bytes": eng.streamed_bytes(), "seconds": time.perf_counter() - t0,
               "device": jax.devices()[0].device_kind, "command": command_line(sys.argv[1:]), **ident}
        if traced:
            row["trace"] = traced
        del eng
        return row, out

    base, ref = run(None)
    finish(base, a.json_out)
    for n in sizes:
        row, out = run(n)
        row["same_as_one_device"] = all(np.array_equal(ref[k].view(np.uint32),
                                                       out[k].view(np.uint32)) for k in ref)
        row["speed_vs_one_device"] = base["step_s"] / row["step_s"]
        finish(row, a.json_out)


if __name__ == "__main__":
    main()
