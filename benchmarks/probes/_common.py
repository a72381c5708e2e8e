"""What the probes share: this checkout's zo2_jax on the path (a probe measures the tree it sits
in), the record's model shapes, batches and timing from benchmarks/matrix.py, and the model flags.
Importing it is cheap: jax and zo2_jax load when a model is built."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for _path in (os.path.join(ROOT, "benchmarks"), ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from matrix import (command_line, git_identity, lazy_params, make_batch,  # noqa: E402,F401
                    nanogpt_shape, time_steps)

DTYPES = ("float32", "bfloat16")


def int_or_auto(text: str):
    """'auto' or an int >= 1 (ZO2's max_inflight, blocks_per_call)."""
    if text == "auto":
        return text
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or 'auto', got {text!r}")
    return v


def add_model_args(p: argparse.ArgumentParser, engines: str) -> None:
    """The model shape, precisions, engines and ZO2's placement options."""
    p.add_argument("--model", default="opt_1_3b", help="preset name (reference nanoGPT shape)")
    p.add_argument("--layers", type=int, help="override the number of layers")
    p.add_argument("--vocab-size", type=int,
                   help="override the vocabulary (50304): small values make quick CPU runs")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--storage", default="bfloat16", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--compute", default="bfloat16", choices=DTYPES)
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
    import jax
    import jax.numpy as jnp

    import zo2_jax.models as zm

    cfg = nanogpt_shape(a.model, a.seq, a.layers, a.vocab_size)
    compute = getattr(jnp, a.compute)
    attn = a.attn if compute != jnp.float32 and jax.default_backend() == "gpu" else "xla"
    return cfg, compute, attn, zm.Model(cfg, compute, attn)


def time_engine(engine, batch, steps: int, warmup: int, trace_dir=None) -> dict:
    """matrix.time_steps, the timed steps (not the warm-up) under a profiler trace if asked."""
    import jax

    around = (lambda: jax.profiler.trace(trace_dir)) if trace_dir else contextlib.nullcontext
    return time_steps(engine, batch, steps, warmup, around=around)


def finish(row: dict, json_out) -> dict:
    print(json.dumps(row), flush=True)
    if json_out:
        with open(json_out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    return row
