"""Offloaded zeroth-order fine-tuning (ZO2): the blocks live in pinned host memory.

By default an OPT-125m-shaped model with random weights is made where it will live: each block is
created by a jitted initialiser straight into pinned host memory in bfloat16 (the storage dtype, so
the engine keeps those arrays as they are); the device holds only the embeddings and the streamed
blocks in flight (two at a time). Every step streams each block up once, applies the previous
step's update to it, runs both perturbed forward passes on it, and writes it back in bfloat16 with
stochastic rounding (round-to-nearest would lose MeZO's ~1e-7 relative updates).

The batches are synthetic "counting" sequences (token t+1 = token t + 1 mod a small range), so the
loss has something to learn; loss and step time are printed one step late, as a training loop
should read them (reading step t's loss right away would make the host wait for the device).

    python examples/finetune_offloaded.py                       # opt_125m shape (~1.5 min on CPU)
    python examples/finetune_offloaded.py --tiny                # ~25 s on CPU, mostly compiling
    python examples/finetune_offloaded.py --preset opt_1_3b --batch 8 --seq 512 --compute bfloat16
    python examples/finetune_offloaded.py --model path/to/opt-125m   # HF folder or .gguf file
"""

from __future__ import annotations

import argparse
import collections
import time

import jax
import jax.numpy as jnp

import zo2_jax.models as zm
from zo2_jax.offload import Storage, ZO2Engine
from zo2_jax.zo import mezo_sgd

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# --tiny: the OPT block structure at a width that compiles and runs in seconds on a CPU.
_TINY = dict(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=256, vocab_size=512,
             max_positions=128)


def counting_batch(key, batch: int, seq: int, vocab: int, period: int = 64) -> dict:
    """[batch, seq] sequences counting up from a random start, modulo `period` (learnable)."""
    start_Bx1 = jax.random.randint(key, (batch, 1), 0, min(period, vocab))
    ids_BxT = (start_Bx1 + jnp.arange(seq)[None]) % min(period, vocab)
    return {"input_ids": ids_BxT.astype(jnp.int32),
            "attention_mask": jnp.ones((batch, seq), jnp.int32)}


def build(args, host):
    """(model, params): loaded from --model, or a preset shape with random weights, with every
    block in pinned host memory."""
    # Blocks made or loaded in the storage dtype are adopted by the engine without a copy.
    store = jnp.float32 if args.storage == "int8" else _DTYPES[args.storage]
    compute = _DTYPES[args.compute]
    if args.model:
        if args.storage == "int8":  # each block read when the engine encodes it, so no
            # float32 copy of the model sits in pinned host memory beside the int8 one
            return zm.load(args.model, store, compute_dtype=compute, lazy_blocks=True)
        return zm.load(args.model, store, compute_dtype=compute, place_block=host)
    over = dict(_TINY) if args.tiny else {}
    over["max_positions"] = max(over.get("max_positions", 2048), args.seq)
    if args.layers:
        over["num_layers"] = args.layers
    model = zm.Model(zm.preset(args.preset, **over), compute)
    return model, model.init(jax.random.key(args.seed), store, block_sharding=host)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Hugging Face folder or .gguf file (instead of a preset)")
    p.add_argument("--preset", default="opt_125m", choices=sorted(zm.PRESETS))
    p.add_argument("--layers", type=int, help="override the preset's number of blocks")
    p.add_argument("--tiny", action="store_true", help="a narrow preset and short run (CPU smoke)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--storage", default="bfloat16", choices=["float32", "bfloat16", "float16",
                                                             "int8"])
    p.add_argument("--rounding", default="stochastic", choices=["nearest", "stochastic"])
    p.add_argument("--compute", default="float32", choices=["float32", "bfloat16"],
                   help="dtype the perturbed weights are computed in")
    p.add_argument("--resident-blocks", type=int, default=0,
                   help="blocks kept on the device (spread over the depth); the rest stream")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.model and (a.tiny or a.layers):
        p.error("--tiny and --layers shape a preset; they do not apply to --model")
    small = dict(steps=6, batch=2, seq=16) if a.tiny else dict(steps=5, batch=2, seq=32)
    for k, v in small.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def main(argv=None):
    args = parse(argv)
    dev = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    t0 = time.perf_counter()
    model, params = build(args, host)
    cfg = model.config
    print(f"model: {cfg.model_type}, {cfg.num_layers} blocks, hidden {cfg.hidden_size}, "
          f"{cfg.num_params / 1e6:.1f}M parameters ({time.perf_counter() - t0:.1f}s to make)")

    engine = ZO2Engine(model, params, mezo_sgd(args.lr), eps=args.eps,
                       compute_dtype=_DTYPES[args.compute],
                       storage=Storage(args.storage, rounding=args.rounding),
                       resident_blocks=args.resident_blocks)
    del params  # the engine owns them now (streamed blocks stay where they were made)
    where = collections.Counter(engine.memory_kinds()["blocks"])
    print(f"blocks by memory kind: {dict(where)}; resident on the device: "
          f"{sorted(engine.resident_blocks)}; {engine.streamed_bytes() / 2**20:.1f} MiB streamed "
          f"each way per step")

    key = jax.random.key(args.seed)
    vocab = cfg.vocab_size
    prev, starts = None, []
    for step in range(args.steps):
        starts.append(time.perf_counter())
        batch = counting_batch(jax.random.fold_in(key, 2 * step), args.batch, args.seq, vocab)
        metrics = engine.step(batch, jax.random.fold_in(key, 2 * step + 1))
        if prev is not None:  # step-1's scalars: the device is already busy with this step
            _report(step - 1, prev, starts[-1] - starts[-2])
        prev = metrics
    loss = float(prev["loss"])
    _report(args.steps - 1, prev, time.perf_counter() - starts[-1])
    if args.steps > 1:
        mean = (time.perf_counter() - starts[1]) / (args.steps - 1)
        print(f"mean step time after the first (which compiles): {mean:.3f}s, "
              f"{args.batch * args.seq / mean:.0f} tokens/s; last loss {loss:.4f}")
    print(f"done in {time.perf_counter() - t0:.1f}s")


def _report(step, metrics, seconds):
    # Reading a scalar waits for that step only; the next one is already queued.
    print(f"step {step}: loss {float(metrics['loss']):.4f}, "
          f"projected grad {float(metrics['projected_grad']):+.3g}, {seconds:.3f}s")


if __name__ == "__main__":
    main()
