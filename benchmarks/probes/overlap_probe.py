"""Does a runtime `jax.device_put` overlap device work that was dispatched *before* it?

The block stream issues uploads and write-backs from Python between jitted calls. Whether a copy
can run under a kernel depends on what the runtime makes the copy wait for: a copy that waits for
all work already queued on the compute stream overlaps only with work queued after it. This probe
times, in one process, a jitted compute `f` (about `--compute-ms`) and pinned-host copies of
`--mib` MiB in each order, and reports how long the host was held by each dispatch:

    python benchmarks/probes/overlap_probe.py --json-out probe.jsonl

Rows (medians of --reps): compute alone, upload alone, download alone; then pairs in both
orders, waiting either for both or only for the copy; and f, upload, f (does the upload run
under the second f when it must wait for the first?).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=512, help="bytes per copy, MiB")
    p.add_argument("--compute-ms", type=float, default=10.0, help="target time of f, ms")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json-out")
    a = p.parse_args()

    dev = jax.devices()[0]
    d_s = jax.sharding.SingleDeviceSharding(dev)
    h_s = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    n = a.mib * (1 << 20) // 4
    host = jax.device_put(jax.device_put(jnp.ones((n,), jnp.float32), d_s), h_s)
    down_src = jax.device_put(jnp.full((n,), 2.0, jnp.float32), d_s)
    side = 1024 if dev.platform == "cpu" else 4096
    x = jax.device_put(jnp.ones((side, side), jnp.bfloat16) * 1e-3, d_s)

    def make_f(iters):
        @jax.jit
        def f(x):
            return jax.lax.fori_loop(0, iters, lambda i, y: (y @ x) * 0.5 + x, x)
        return f

    def wall(fn, reps=a.reps):
        ts, hs = [], []
        for _ in range(reps + 1):
            t = time.perf_counter()
            out, h = fn()
            jax.block_until_ready(out)
            ts.append(time.perf_counter() - t)
            hs.append(h)
        return float(np.median(ts[1:]) * 1e3), float(np.median(hs[1:]) * 1e3)

    # size f to about --compute-ms
    iters = 8
    f = make_f(iters)
    jax.block_until_ready(f(x))
    t1, _ = wall(lambda: (f(x), 0.0), 3)
    iters = max(1, int(iters * a.compute_ms / max(t1, 1e-3)))
    f = make_f(iters)
    jax.block_until_ready(f(x))

    def timed_dispatch(call):
        t = time.perf_counter()
        out = call()
        return out, time.perf_counter() - t

    def up():
        return jax.device_put(host, d_s)

    def down():
        return jax.device_put(down_src, h_s)

    for _ in range(2):  # warm the pinned pool and both directions
        jax.block_until_ready((up(), down()))

    rows = {}

    def row(name, fn):
        rows[name], rows[name + " (host ms in the copy's dispatch)"] = wall(fn)

    row("f alone", lambda: timed_dispatch(lambda: f(x)))
    row("upload alone", lambda: timed_dispatch(up))
    row("download alone", lambda: timed_dispatch(down))

    def f_then(copy, wait_all):
        def fn():
            c = f(x)
            o, h = timed_dispatch(copy)
            return ((c, o) if wait_all else o), h
        return fn

    def copy_then_f(copy):
        def fn():
            o, h = timed_dispatch(copy)
            c = f(x)
            return (c, o), h
        return fn

    row("f then upload, wait both", f_then(up, True))
    row("f then upload, wait upload", f_then(up, False))
    row("upload then f, wait both", copy_then_f(up))
    row("f then download, wait both", f_then(down, True))
    row("f then download, wait download", f_then(down, False))
    row("download then f, wait both", copy_then_f(down))

    def f_up_f():
        c1 = f(x)
        o, h = timed_dispatch(up)
        c2 = f(c1)
        return (c2, o), h

    row("f, upload, f(f) (wait all)", f_up_f)

    def f_up_g_uses():
        # the stream's pattern: upload u+1 issued after compute u is queued, then compute u+1
        c1 = f(x)
        o, h = timed_dispatch(up)
        c2 = f(x) + o[:1].astype(jnp.bfloat16)[0]
        return (c1, c2), h

    row("f, upload, f+use(upload)", f_up_g_uses)

    res = {"device": dev.device_kind, "jax": jax.__version__, "mib": a.mib, "f_iters": iters,
           "rows_ms": rows}
    if a.json_out:
        with open(a.json_out, "a") as fh:
            fh.write(json.dumps(res) + "\n")
    print(f"{dev.device_kind}, jax {jax.__version__}, copies of {a.mib} MiB")
    for k, v in rows.items():
        if "(host" not in k:
            print(f"  {k:34s} {v:8.2f} ms   host in copy dispatch "
                  f"{rows[k + ' (host ms in the copy' + chr(39) + 's dispatch)']:6.2f} ms")


if __name__ == "__main__":
    main()
