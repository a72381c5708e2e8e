"""Host memory and time of checkpointing a ZO2Engine: `Checkpointer.save_engine` /
`restore_engine` (blocks one at a time) against `save(engine.state())` / `restore(like)` (every
block at once), side by side in one process on one engine.

The process's resident memory is sampled every millisecond during each call; a row gives its
peak above the level before the call, next to the engine's streamed bytes. The restore goes back
into the same engine (a resumed run's engine holds its blocks already, as this one does).

    python benchmarks/probes/checkpoint_memory.py --model opt_1_3b --dir /tmp/ck --json-out r.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time

import jax

# _common first: it puts this checkout's zo2_jax on the path
from _common import DTYPES, build_model, lazy_params
from zo2_jax.offload import Storage, ZO2Engine  # noqa: E402
from zo2_jax.train.checkpoint import Checkpointer  # noqa: E402
from zo2_jax.zo import mezo_sgd  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_during(fn) -> tuple[float, int, int]:
    """(seconds, peak RSS above the level before, RSS after minus before) of fn()."""
    base, peak, stop = rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        dt = time.perf_counter() - t0
        stop.set()
        t.join()
    return dt, max(peak[0], rss()) - base, rss() - base


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt_1_3b")
    p.add_argument("--layers", type=int)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--storage", default="bfloat16", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--compute", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--attn", default="xla", choices=["xla", "cudnn"])
    p.add_argument("--packed", default="auto", choices=["auto", "yes", "no"])
    p.add_argument("--modes", default="engine,state",
                   help="comma-separated: engine (save_engine/restore_engine), state "
                        "(save(state())/restore(like)), each in turn on the same engine")
    p.add_argument("--dir", required=True, help="checkpoint folder (emptied first)")
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    modes = a.modes.split(",")
    if not modes or any(m not in ("engine", "state") for m in modes):
        p.error(f"--modes {a.modes!r}: expected a comma-separated list of engine, state")
    cfg, compute, _, model = build_model(a)
    packed = {"auto": "auto", "yes": True, "no": False}[a.packed]
    engine = ZO2Engine(model, lazy_params(model, compute), tx=mezo_sgd(1e-6),
                       storage=Storage(a.storage, rounding="stochastic"), packed=packed)
    ids = jax.numpy.ones((1, a.seq), jax.numpy.int32)
    batch = {"input_ids": ids, "attention_mask": ids}
    jax.block_until_ready(engine.step(batch, jax.random.key(0)))  # blocks written by the engine
    shutil.rmtree(a.dir, ignore_errors=True)
    row = {"model": a.model, "layers": cfg.num_layers, "storage": a.storage,
           "packed": engine._packing is not None, "streamed_bytes": engine.streamed_bytes(),
           "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "date": time.strftime("%Y-%m-%d"), "rss_before": rss()}
    for n, mode in enumerate(modes, start=1):
        ck = Checkpointer(a.dir, keep=len(modes), asynchronous=True)
        if mode == "engine":
            save = lambda: (ck.save_engine(n, engine, {}, {"step": n}), ck.wait())  # noqa: E731
            restore = lambda: ck.restore_engine(engine, n)  # noqa: E731
        else:
            save = lambda: (ck.save(n, engine.state(), {}, {"step": n}), ck.wait())  # noqa: E731

            def restore():
                state, _, _ = ck.restore(n, engine.state())
                engine.restore(state)
        for what, fn in (("save", save), ("restore", restore)):
            s, peak, after = peak_during(fn)
            row[f"{mode}_{what}_s"], row[f"{mode}_{what}_peak_bytes"] = round(s, 3), peak
            row[f"{mode}_{what}_after_bytes"] = after
        ck.close()
    jax.block_until_ready(engine.step(batch, jax.random.key(1)))  # still trains
    if a.json_out:
        with open(a.json_out, "a") as f:
            f.write(json.dumps(row) + "\n")
    gb = 1e9
    print(f"{a.model} x{cfg.num_layers} {a.storage} packed={row['packed']}: streamed "
          f"{row['streamed_bytes'] / gb:.2f} GB")
    for mode in modes:
        print(f"  {mode:6s} save {row[f'{mode}_save_s']:7.2f} s, peak +"
              f"{row[f'{mode}_save_peak_bytes'] / gb:.2f} GB | restore "
              f"{row[f'{mode}_restore_s']:7.2f} s, peak +"
              f"{row[f'{mode}_restore_peak_bytes'] / gb:.2f} GB")
    return row


if __name__ == "__main__":
    main()
