"""Compiled device memory (XLA's memory analysis, no execution) of ZO2's per-unit step function at
one model shape: with unpacked blocks ("block_fn") and, unless --only-block, with packed blocks
("unit_packed": the unpacking and re-packing inside the same call), for --blocks-per-call blocks.

    python benchmarks/probes/pack_memory.py --model opt_175b --storage bfloat16

`--adapter lora` compiles it for LoRA adapters over a frozen base kept as `--base` (the
storage format, or a GGUF block type such as Q4_0), as `--engine-adapter` rows run it.

`--branches sequential` compiles the engine's block function for branches="sequential" (the -eps
branch after the +eps branch; call 5a measured it as `--variant barrier`, the same code before it
moved into the engine). The default is "fused"; the engine's "auto" picks by block size.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

# _common first: it puts this checkout's zo2_jax on the path. The engine's private modules below
# are what this probe compiles: no public API gives the unit function alone.
from _common import nanogpt_shape
import zo2_jax.models as zm  # noqa: E402
from zo2_jax.offload import Storage  # noqa: E402
from zo2_jax.offload._pack import Packing  # noqa: E402
from zo2_jax.offload._calls import unit_fns as _unit_fns  # noqa: E402
from zo2_jax.core import common  # noqa: E402
from zo2_jax.core import parts  # noqa: E402
from zo2_jax.models import quant  # noqa: E402
from zo2_jax.models.lora import lora  # noqa: E402
from zo2_jax.zo import mezo_sgd  # noqa: E402


def stats(compiled) -> dict:
    m = compiled.memory_analysis()
    return {k: round(getattr(m, k) / 1e9, 3) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
        "temp_size_in_bytes")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt_175b")
    p.add_argument("--storage", default="bfloat16", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--only-block", action="store_true", help="skip the packed variant")
    p.add_argument("--blocks-per-call", type=int, default=1, help="blocks per unit (G)")
    p.add_argument("--branches", default="fused", choices=["fused", "sequential"],
                   help="the block function's branch schedule (see ZO2Engine)")
    p.add_argument("--adapter", default="none", choices=["none", "lora"])
    p.add_argument("--base", default="storage", help="adapter=lora: the frozen base's format "
                   "(storage, or a quant.QUANTIZABLE type)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--tag", default="", help="free text copied into the output row")
    a = p.parse_args(argv)
    cfg = nanogpt_shape(a.model, a.seq).replace(num_layers=2)
    model = zm.Model(cfg, jnp.bfloat16, "cudnn" if jax.default_backend() == "gpu" else "xla")
    if a.adapter == "lora":
        model = lora(model, a.lora_rank)
    blk = jax.eval_shape(lambda k: model.init_block(k, jnp.bfloat16), jax.random.key(0))
    outer = jax.eval_shape(lambda k: model.init_outer(k, jnp.bfloat16), jax.random.key(0))
    if a.adapter == "lora" and a.base != "storage":
        blk = jax.eval_shape(lambda b: {**b, "base": quant.quantize_kernels(b["base"], a.base)},
                             blk)
    spec = common.build_spec(model, {"outer": outer, "blocks": [blk, blk]}, mezo_sgd(1e-6),
                             eps=1e-3, num_directions=1, compute_dtype=jnp.bfloat16,
                             storage=Storage(a.storage, rounding="stochastic"),
                             outer_storage=None, clip_norm=None)
    b_s, b_o = jax.eval_shape(lambda x: parts.init_part(spec, "block", x), blk)
    lay = Packing.of(b_s, b_o, split=spec.frozen is not None)
    words = lambda lay: {k: jax.ShapeDtypeStruct((x.words,), jnp.uint32)  # noqa: E731
                         for k, x in zip(lay.keys, lay.layouts)} if hasattr(lay, "keys") else \
        jax.ShapeDtypeStruct((lay.words,), jnp.uint32)
    flat = words(lay.block)
    oflat = b_o if lay.opt.empty else jax.ShapeDtypeStruct((lay.opt.words,), jnp.uint32)
    B, T, G = a.batch, a.seq, a.blocks_per_call
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    hs = tuple(jax.ShapeDtypeStruct((B, T, cfg.hidden_size), jnp.bfloat16) for _ in range(2))
    ctx = jax.eval_shape(model.context, {"input_ids": ids, "attention_mask": ids})
    key = jax.eval_shape(lambda: jax.random.key(0))
    pend = jax.eval_shape(lambda: parts.empty_pending(1))
    c, pids = jax.ShapeDtypeStruct((), jnp.int32), (jax.ShapeDtypeStruct((), jnp.uint32),) * G
    fn = _unit_fns[a.branches]
    row = {"model": a.model, "storage": a.storage, "adapter": a.adapter, "base": a.base, "device": jax.devices()[0].device_kind,
           "branches": a.branches, "blocks_per_call": G, "tag": a.tag,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "block_gb": lay.block.nbytes / 1e9,
           "block_fn": stats(fn.lower(spec, None, [b_s] * G, [b_o] * G, pend, c, pids, key, hs,
                                      ctx, None).compile())}
    if not a.only_block:
        row["unit_packed"] = stats(fn.lower(spec, lay, [flat] * G, [oflat] * G, pend, c, pids,
                                            key, hs, ctx, None).compile())
    print(json.dumps(row))


if __name__ == "__main__":
    main()
