"""Throughput and memory of ZO2 (offloaded) and MeZO (resident) on one GPU, in one process.

One row per invocation: a model shape with random weights made where they live (blocks on the
device, then written to pinned host memory for ZO2; never a CPU initialisation), a batch shape,
a host storage dtype and a compute dtype. ZO2 runs first, so its peak device memory is read
before MeZO's larger footprint exists. The pinned bandwidths are measured in the same process and
give T_limit = max(C, P_s/B_up, P_s/B_down, 2 P_s/B_bi) (DESIGN.md), with C the MeZO step time
where MeZO fits.

    python benchmarks/bench_zo2.py --model opt_1_3b --batch 1 --seq 2048 \
        --storage bfloat16 --compute bfloat16 --json-out results.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import zo2_jax.models as zm  # noqa: E402
from zo2_jax.cli import int_or_auto  # noqa: E402
from zo2_jax.offload import Storage, ZO2Engine  # noqa: E402
from zo2_jax.zo import MeZOEngine, mezo_sgd  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def nanogpt_shape(name: str, seq: int) -> zm.DecoderConfig:
    """The reference's nanoGPT shapes: GPT-2 blocks (GELU, 4x MLP, pre-LN, learned positions,
    biases) at OPT sizes, vocab 50304, untied head."""
    base = zm.preset(name)
    return zm.DecoderConfig(model_type="gpt2", vocab_size=50304, hidden_size=base.hidden_size,
                            num_layers=base.num_layers, num_heads=base.num_heads,
                            intermediate_size=4 * base.hidden_size,
                            max_positions=max(seq, 1024), activation="gelu_new",
                            tie_embeddings=False)


def _timed(fn, reps: int) -> float:
    """Median wall time of fn() (blocked until ready) over reps runs."""
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> dict:
    """Pinned host <-> device bandwidths (GB/s) with jax.device_put, as the engine uses them."""
    dev = jax.devices()[0]
    d_s = jax.sharding.SingleDeviceSharding(dev)
    h_s = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    n = nbytes // 4
    x_dev = jax.device_put(jnp.ones((n,), jnp.float32), d_s)
    x_host = jax.device_put(x_dev, h_s)
    y_dev = jax.device_put(jnp.zeros((n,), jnp.float32), d_s)
    for _ in range(2):  # warm the pinned pool
        jax.block_until_ready(jax.device_put(x_dev, h_s))
        jax.block_until_ready(jax.device_put(x_host, d_s))

    up = _timed(lambda: jax.device_put(x_host, d_s), reps)
    down = _timed(lambda: jax.device_put(x_dev, h_s), reps)
    both = _timed(lambda: (jax.device_put(x_host, d_s), jax.device_put(y_dev, h_s)), reps)
    return {"B_up": nbytes / up / 1e9, "B_down": nbytes / down / 1e9,
            "B_bi": 2 * nbytes / both / 1e9}


def lazy_params(model, dtype, seed: int = 0) -> dict:
    """Random parameters with the blocks as callables: each block is created on the device by
    one jitted function when the engine calls it (see the engines' `params`)."""
    key = jax.random.key(seed)
    init_b = jax.jit(lambda k: model.init_block(k, dtype))
    outer = jax.jit(lambda k: model.init_outer(k, dtype))(jax.random.fold_in(key, 2 ** 31 - 1))
    return {"outer": outer, "blocks": [lambda i=i: init_b(jax.random.fold_in(key, i))
                                       for i in range(model.num_blocks)]}


def make_batch(cfg, batch: int, seq: int, seed: int = 0) -> dict:
    ids = jax.random.randint(jax.random.key(seed), (batch, seq), 0, cfg.vocab_size, jnp.int32)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}


def time_engine(engine, batch, steps: int, warmup: int, trace_dir: Optional[str] = None) -> dict:
    """Mean step time with metrics read one step late (as the trainer does), and the share of
    wall time the host spent inside `step` (dispatch; near 1.0 would mean host-bound). With
    `trace_dir`, the timed steps (not the warm-up) run under `jax.profiler.trace`."""
    key = jax.random.key(1)
    prev = None
    for s in range(warmup):
        prev = engine.step(batch, jax.random.fold_in(key, s))
    jax.block_until_ready(prev)
    with jax.profiler.trace(trace_dir) if trace_dir else contextlib.nullcontext():
        t0 = time.perf_counter()
        dispatch = 0.0
        for s in range(steps):
            t = time.perf_counter()
            m = engine.step(batch, jax.random.fold_in(key, warmup + s))
            dispatch += time.perf_counter() - t
            if prev is not None:
                float(prev["loss"])  # step s-1's scalars, as a training loop reads them
            prev = m
        jax.block_until_ready(prev)
        total = time.perf_counter() - t0
    finite = bool(np.isfinite(float(prev["loss"])))
    return {"step_s": total / steps, "dispatch_share": dispatch / total, "loss_finite": finite}


def interleave(engines: dict, batch, steps: int, reps: int) -> dict:
    """Each engine timed `reps` more times, alternately, in one process (after both were built
    and timed once): {name: [step_s, ...], name_median_s: ..., 'zo2_over_mezo': ...}."""
    out = {name: [] for name in engines}
    for _ in range(reps):
        for name, eng in engines.items():
            out[name].append(time_engine(eng, batch, steps, warmup=1)["step_s"])
            print(f"[interleave {name}] {out[name][-1] * 1e3:.2f} ms/step", file=sys.stderr,
                  flush=True)
    for name in engines:
        out[f"{name}_median_s"] = float(np.median(out[name]))
    if "zo2" in engines and "mezo" in engines:
        out["zo2_over_mezo"] = out["zo2_median_s"] / out["mezo_median_s"]
    return out


def parse_variants(text: str) -> list:
    """'W:hold:wrap,...' (or '+'-separated, for run_ours.sh rows) -> [(W, hold, wrap)]."""
    out = []
    for item in filter(None, text.replace("+", ",").split(",")):
        try:
            w, hold, wrap = (int(x) for x in item.split(":"))
        except ValueError:
            raise SystemExit(f"--stream-variants: {item!r} is not W:hold:wrap (three ints)")
        if w < 1 or hold < 1 or wrap not in (0, 1):
            raise SystemExit(f"--stream-variants: {item!r} needs W >= 1, hold >= 1, wrap 0 or 1")
        out.append((w, hold, bool(wrap)))
    return out


def time_variants(eng, batch, variants, steps: int, reps: int) -> list:
    """Step time of one ZO2 engine under other stream settings (same compiled functions, same
    process), each variant timed `reps` times in turn (ABAB...); the engine's own settings are
    restored afterwards. Peak device memory is not separated per variant."""
    st = eng._stream
    own = (st.max_inflight, st.hold, st.wrap)
    out = [{"max_inflight": w, "hold": h, "wrap": wr, "step_s": []} for w, h, wr in variants]
    for _ in range(reps):
        for v in out:
            st.drain()
            st.max_inflight, st.hold, st.wrap = v["max_inflight"], v["hold"], v["wrap"]
            v["step_s"].append(time_engine(eng, batch, steps, warmup=1)["step_s"])
            print(f"[variant W={v['max_inflight']} hold={v['hold']} wrap={v['wrap']}] "
                  f"{v['step_s'][-1] * 1e3:.1f} ms/step", file=sys.stderr, flush=True)
    st.drain()
    st.max_inflight, st.hold, st.wrap = own
    for v in out:
        v["median_s"] = float(np.median(v["step_s"]))
    return out


def profile_blocks(eng, batch, reps: int = 5) -> dict:
    """Per-unit costs of a ZO2 step, each measured alone (nothing overlapping), in ms, for the
    first streamed unit (`blocks_per_call` blocks): its upload, the jitted unit function
    (unpacking, update, 2q branches and re-packing of each block), the write-back, and the same
    bytes moved as one contiguous buffer (the per-leaf transfer overhead is the difference).
    The pipelined step can at best hide all but the largest of the three sums."""
    import functools

    from zo2_jax.offload._zo2 import _head_fn, _outer_fn, unit_step

    spec, dev, host = eng.spec, eng._dev, eng._host
    if not eng._stream.streamed:
        return {"error": "every block is resident: nothing streams"}
    unit = eng._stream.streamed[0]
    unit_fn = jax.jit(functools.partial(unit_step, spec, eng._packing,  # no donation: reps reuse
                                        branches=eng.branches))
    stored = [eng._store.blocks[j] for j in unit]
    opt = [eng._store.opts[j] for j in unit]
    ids = tuple(eng._ids[j] for j in unit)
    nbytes = sum(x.nbytes for x in jax.tree.leaves((stored, opt)))
    flat_host = jax.device_put(jnp.zeros((nbytes,), jnp.uint8), host)
    b = jax.device_put(dict(batch), dev)
    key = jax.device_put(jax.random.key(7), dev)
    pend, count = eng._pending, eng._count
    outer = jax.tree.map(jnp.copy, (eng._outer, eng._opt_outer))
    _, _, hs, ctx, g = _outer_fn(spec, *jax.tree.map(jnp.copy, outer), pend, count, key, b)
    blk_dev, opt_dev = jax.device_put((stored, opt), dev)
    new_blk, new_opt, hs2, _ = unit_fn(blk_dev, opt_dev, pend, count, ids, key, hs, ctx, g)
    flat_dev = jax.device_put(flat_host, dev)
    jax.block_until_ready((new_blk, flat_dev, hs2))
    out = {
        "n_streamed": len(eng._stream.streamed), "blocks_per_call": len(unit),
        "block_bytes": nbytes, "leaves": len(jax.tree.leaves((stored, opt))),
        "up_ms": 1e3 * _timed(lambda: jax.device_put((stored, opt), dev), reps),
        "up_flat_ms": 1e3 * _timed(lambda: jax.device_put(flat_host, dev), reps),
        "packed": eng.packed,
        "compute_ms": 1e3 * _timed(lambda: unit_fn(blk_dev, opt_dev, pend, count, ids, key, hs,
                                                   ctx, g), reps),
        "down_ms": 1e3 * _timed(lambda: jax.device_put((new_blk, new_opt), host), reps),
        "down_flat_ms": 1e3 * _timed(lambda: jax.device_put(flat_dev, host), reps),
        # the outer stage donates its parameters: each rep gets a fresh copy (timed with it)
        "outer_ms": 1e3 * _timed(lambda: _outer_fn(
            spec, *jax.tree.map(jnp.copy, outer), pend, count, key, b), reps),
        "head_ms": 1e3 * _timed(lambda: _head_fn(spec, outer[0], key, hs2, b, g, pend, count,
                                                 eng._skipped_total), reps),
    }
    n = out["n_streamed"]
    out["sum_up_ms"], out["sum_compute_ms"], out["sum_down_ms"] = (
        n * out["up_ms"], n * out["compute_ms"], n * out["down_ms"])
    return out


def reset_host_peak() -> None:
    """Resets VmHWM to the current RSS (Linux), so each engine's host peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def host_peak_gb() -> float:
    """Peak resident host memory of this process since the last reset_host_peak() (VmHWM;
    pinned buffers count once touched)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return 0.0


def peak_bytes() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("peak_bytes_in_use", 0))


def add_model_args(p: argparse.ArgumentParser, engines: str) -> None:
    """The flags bench_zo2.py and timeline.py share: the model shape, precisions, engines and
    ZO2's placement options."""
    p.add_argument("--model", default="opt_1_3b", help="preset name (reference nanoGPT shape)")
    p.add_argument("--layers", type=int, help="override the number of layers")
    p.add_argument("--vocab-size", type=int,
                   help="override the vocabulary (50304): small values make quick CPU runs")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--storage", default="bfloat16", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--compute", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--attn", default="cudnn", choices=["xla", "cudnn"],
                   help="attention kernel (xla for float32 compute and off GPUs)")
    p.add_argument("--engines", default=engines, help="comma-separated: zo2, mezo")
    p.add_argument("--max-inflight", default="auto", type=int_or_auto,
                   help="ZO2's streamed units in flight: an int or 'auto'")
    p.add_argument("--branches", default="auto", choices=["auto", "fused", "sequential"],
                   help="ZO2's branch schedule in the block function (see ZO2Engine)")
    p.add_argument("--blocks-per-call", default="auto", type=int_or_auto,
                   help="ZO2's consecutive streamed blocks per jitted call: an int or 'auto'")


def build_model(a):
    """(config, compute dtype, attention kernel, model) from add_model_args' flags."""
    cfg = nanogpt_shape(a.model, a.seq)
    if a.layers:
        cfg = cfg.replace(num_layers=a.layers)
    if a.vocab_size:
        cfg = cfg.replace(vocab_size=a.vocab_size)
    compute = DTYPES[a.compute]
    attn = a.attn if compute != jnp.float32 and jax.default_backend() == "gpu" else "xla"
    return cfg, compute, attn, zm.Model(cfg, compute, attn)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, engines="zo2,mezo")
    p.add_argument("--rounding", default="stochastic", choices=["nearest", "stochastic"])
    p.add_argument("--resident-blocks", type=int, default=0)
    pk = p.add_mutually_exclusive_group()
    pk.add_argument("--unpacked", action="store_true",
                    help="ZO2 with packed=False (one transfer per array of a block)")
    pk.add_argument("--packed", action="store_true",
                    help="ZO2 with packed=True (default: 'auto', packed up to 1 GiB blocks)")
    p.add_argument("--outer-storage", choices=["float32", "bfloat16", "int8"],
                   help="host storage of embeddings/head (default: as --storage)")
    p.add_argument("--profile", action="store_true",
                   help="after timing ZO2, measure each per-unit cost alone (profile_blocks)")
    p.add_argument("--stream-variants", default="",
                   help="after timing ZO2, time the same engine again with other stream settings, "
                        "each 'W:hold:wrap', separated by ',' or '+' (e.g. '3:1:0+3:1:1+4:2:1'; "
                        "BlockStream's "
                        "max_inflight, hold and wrap), in that order, --variant-reps times")
    p.add_argument("--variant-reps", type=int, default=2)
    p.add_argument("--interleave", type=int, default=0,
                   help="after both engines are built and timed, time them N more times each, "
                        "alternately (ZO2, MeZO, ZO2, ...), in the same process: a same-process "
                        "A/B with repeats (both engines stay alive: small shapes only; MeZO's "
                        "peak then includes ZO2's buffers)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    variants = parse_variants(a.stream_variants)

    cfg, compute, attn, model = build_model(a)
    storage = Storage(a.storage, rounding=a.rounding)
    outer_storage = Storage(a.outer_storage, rounding=a.rounding) if a.outer_storage else None
    batch = make_batch(cfg, a.batch, a.seq)
    row = {"impl": "zo2_jax", "model": a.model, "layers": cfg.num_layers, "batch": a.batch,
           "seq": a.seq, "storage": a.storage, "rounding": a.rounding, "compute": a.compute,
           "attn": attn, "params": cfg.num_params, "outer_storage": a.outer_storage or a.storage,
           "device": jax.devices()[0].device_kind,
           "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
    init_dtype = jnp.float32 if a.storage == "float32" else jnp.bfloat16
    tx = mezo_sgd(1e-6, weight_decay=0.0)
    kept = {}  # with --interleave: the engines, kept alive for the alternating repeats
    for name in a.engines.split(","):
        t = time.perf_counter()
        reset_host_peak()
        try:
            common = dict(tx=tx, eps=1e-3, compute_dtype=compute, storage=storage,
                          outer_storage=outer_storage)
            # Each block is made on the device when the engine asks for it and encoded there
            # (ZO2 then writes it to pinned host memory): no second copy of the model anywhere.
            params = lazy_params(model, init_dtype)
            if name == "zo2":
                packed = False if a.unpacked else (True if a.packed else "auto")
                eng = ZO2Engine(model, params, resident_blocks=a.resident_blocks,
                                max_inflight=a.max_inflight, packed=packed,
                                branches=a.branches, blocks_per_call=a.blocks_per_call, **common)
            else:
                eng = MeZOEngine(model, params, **common)
            del params
            row[f"{name}_init_s"] = time.perf_counter() - t
            # Progress on stderr (run_ours.sh keeps it in the row's log): a row killed at its
            # time limit still leaves what it had measured.
            print(f"[{name}] set-up {row[f'{name}_init_s']:.1f} s, host peak "
                  f"{host_peak_gb():.1f} GB", file=sys.stderr, flush=True)
            r = time_engine(eng, batch, a.steps, a.warmup)
            row[f"{name}_step_s"] = r["step_s"]
            row[f"{name}_tok_s"] = a.batch * a.seq / r["step_s"]
            row[f"{name}_dispatch_share"] = r["dispatch_share"]
            row[f"{name}_loss_finite"] = r["loss_finite"]
            row[f"{name}_peak_bytes"] = peak_bytes()
            row[f"{name}_host_peak_gb"] = host_peak_gb()
            print(f"[{name}] {r['step_s'] * 1e3:.1f} ms/step, peak device "
                  f"{row[f'{name}_peak_bytes'] / 1e9:.2f} GB, host peak "
                  f"{row[f'{name}_host_peak_gb']:.1f} GB", file=sys.stderr, flush=True)
            if name == "zo2" and variants:
                row["zo2_variants"] = time_variants(eng, batch, variants, a.steps,
                                                    a.variant_reps)
            if name == "zo2" and a.profile:
                row["profile"] = profile_blocks(eng, batch)
            if name == "zo2":
                row["streamed_bytes"] = sum(
                    x.nbytes for i, b in enumerate(eng._store.blocks)
                    if i not in eng._store.resident for x in jax.tree.leaves(b))
                row["max_inflight"] = eng.max_inflight
                row["hold"] = eng._stream.hold
                row["packed"] = eng.packed
                row["branches"] = eng.branches
                row["blocks_per_call"] = eng.blocks_per_call
                row["units"] = len(eng._stream.streamed)
            if a.interleave:
                kept[name] = eng
            del eng
        except Exception as e:  # an OOM for MeZO at large shapes is a result, not a crash
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if not a.interleave:
            jax.clear_caches()
    if a.interleave and len(kept) > 1:
        row["interleaved"] = interleave(kept, batch, a.steps, a.interleave)
    kept.clear()
    row.update(bandwidth())  # after the engines: its 1 GiB buffers would set the peak
    ps = row.get("streamed_bytes")
    if ps:
        bus = max(ps / (row["B_up"] * 1e9), ps / (row["B_down"] * 1e9),
                  2 * ps / (row["B_bi"] * 1e9))
        c = row.get("mezo_step_s", 0.0)
        row["T_bus"] = bus
        row["T_limit"] = max(c, bus)
        if "zo2_step_s" in row:
            row["zo2_over_T_limit"] = row["zo2_step_s"] / row["T_limit"]
    print(json.dumps(row), flush=True)
    if a.json_out:
        with open(a.json_out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
