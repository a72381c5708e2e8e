#!/usr/bin/env python
"""Time the reference PyTorch ZO2 (github.com/liangyuwang/zo2) on its nanoGPT path.

The reference is not vendored: it is imported at run time from a checkout given by ``--zo2-path``
(default ``third_party/zo2``, git-ignored). Only its ``zo2.config``, ``zo2.optimizer`` and
``zo2.model.nanogpt`` modules are used; its top-level ``zo2/__init__.py`` is skipped because it
imports the Hugging Face OPT/Qwen code, which needs ``transformers==4.51`` and nothing here uses.

One training step is what the reference's ``test/mezo_sgd/nanogpt/test_speed.py`` times:
``model.zo_train(); model(input_ids, pos, labels)`` (two perturbed forwards plus the update;
for ZO2 the update of step t is applied inside step t+1's pass). Weights are random, data are
random token ids, as in the reference's tests.

Precision modes (``--precision``):
  fp32, fp16, bf16  the reference's ``--model_dtype``: ``torch.set_default_dtype`` while the
                    model is built, so weights are stored *and* computed in that dtype on host
                    and GPU alike (no master copy). fp16 is the default of its hf_opt
                    speed/memory tests (the published GPU-memory table); fp32 is the default of
                    its nanoGPT tests.
  amp               ZO2 only: ``MeZOSGDConfig(amp=True)``: blocks stored in fp16 on the host,
                    cast to fp32 on the GPU after upload, forward under ``torch.autocast`` in
                    ``--amp-dtype`` (reference default bf16), cast back to fp16 before offload.

Initialisation is not timed with the steps. ``--init-device auto`` builds the model on the GPU
when it fits (much faster than the reference's CPU init) and then moves the offloaded blocks to
host memory in their storage dtype, which is the state the reference's own CPU init leaves.

Prints one JSON line (and appends it to ``--json-out``); on any failure the line has "error".
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ZO2_PATH = REPO_ROOT / "third_party" / "zo2"

MODEL_NAMES = (
    "gpt2", "gpt2_medium", "gpt2_large", "gpt2_xl",
    "opt_125m", "opt_350m", "opt_1_3b", "opt_2_7b", "opt_6_7b",
    "opt_13b", "opt_30b", "opt_66b", "opt_175b",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="opt_1_3b", choices=MODEL_NAMES,
                   help="a GPTConfigs name of the reference's nanoGPT model")
    p.add_argument("--method", default="zo2", choices=("mezo", "zo2"),
                   help="mezo: everything resident on the device; zo2: blocks offloaded to host")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "amp"))
    p.add_argument("--amp-dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="autocast dtype for --precision amp (reference default: bf16)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=None,
                   help="tokens per sequence (default: the config's block_size, 2048 for OPT shapes)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: mezo only)")
    p.add_argument("--init-device", default="auto", choices=("auto", "device", "cpu"),
                   help="where the random weights are drawn (auto: on the device if they fit)")
    p.add_argument("--no-overlap", action="store_true",
                   help="ZO2 with overlap=False (no separate upload/offload/compute streams)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--zo2-path", default=str(DEFAULT_ZO2_PATH),
                   help="folder holding the reference's zo2/ package")
    p.add_argument("--json-out", default=None, help="append the JSON line to this file")
    return p.parse_args(argv)


def import_reference(zo2_path: str):
    """Import the reference's nanoGPT pieces without running zo2/__init__.py."""
    pkg_dir = Path(zo2_path).resolve() / "zo2"
    if not (pkg_dir / "__init__.py").is_file():
        raise FileNotFoundError(f"no zo2 package under {zo2_path!r} (see --zo2-path)")
    if str(pkg_dir.parent) not in sys.path:
        sys.path.insert(0, str(pkg_dir.parent))
    if "zo2" not in sys.modules:
        # A bare package object: submodules resolve from pkg_dir, the top-level __init__ (which
        # imports the transformers-4.51-only HF model code) is not executed.
        spec = importlib.machinery.ModuleSpec("zo2", None, is_package=True)
        spec.submodule_search_locations = [str(pkg_dir)]
        pkg = importlib.util.module_from_spec(spec)
        pkg.__path__ = [str(pkg_dir)]
        sys.modules["zo2"] = pkg
    from zo2.config.mezo_sgd import MeZOSGDConfig
    from zo2.model.nanogpt.mezo_sgd import get_nanogpt_mezo_sgd
    from zo2.model.nanogpt.model import GPTConfigs
    from zo2.utils.utils import seed_everything
    commit_file = pkg_dir.parent / "REFERENCE_COMMIT"
    commit = commit_file.read_text().strip() if commit_file.is_file() else None
    return MeZOSGDConfig, get_nanogpt_mezo_sgd, GPTConfigs, seed_everything, commit


def count_params(cfg) -> int:
    """Parameters of the reference's nanoGPT GPT (untied wte / lm_head, biases, 2 LayerNorms)."""
    d, v, t, n = cfg.n_embd, cfg.vocab_size, cfg.block_size, cfg.n_layer
    b = 1 if cfg.bias else 0
    block = (d * 3 * d + b * 3 * d) + (d * d + b * d) + (d * 4 * d + b * 4 * d) \
        + (4 * d * d + b * d) + 2 * (d + b * d)
    return n * block + v * d + t * d + (d + b * d) + v * d


def main(argv=None) -> int:
    args = parse_args(argv)
    rec: dict = {
        "impl": "reference_zo2", "model": args.model, "method": args.method,
        "precision": args.precision, "batch": args.batch, "seq": args.seq,
        "steps": args.steps, "warmup": args.warmup,
    }
    if args.precision == "amp":
        rec["amp_dtype"] = args.amp_dtype
    try:
        _run(args, rec)
        rc = 0
    except BaseException as exc:  # noqa: BLE001 - any failure becomes a JSON line
        if isinstance(exc, KeyboardInterrupt):
            raise
        name = type(exc).__name__
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "OutOfMemory" in name or "out of memory" in str(exc).lower():
            rec["error"] = f"OOM: {msg}"[:500]
        else:
            rec["error"] = f"{name}: {msg}"[:500]
        rec["traceback_tail"] = traceback.format_exc().strip().splitlines()[-4:]
        _add_peak(rec)
        rc = 1
    line = json.dumps(rec, sort_keys=False)
    print(line, flush=True)
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "a") as f:
            f.write(line + "\n")
    return rc


def _add_peak(rec):
    torch = sys.modules.get("torch")
    if torch is not None and rec.get("_cuda"):
        try:
            rec["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
            rec["peak_gpu_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        except Exception:  # noqa: BLE001
            pass
    rec.pop("_cuda", None)


def _run(args, rec):
    import torch

    rec["torch"] = torch.__version__
    rec["python"] = platform.python_version()
    dev = torch.device(args.device)
    is_cuda = dev.type == "cuda"
    if is_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA requested but torch.cuda.is_available() is False")
        # The reference compares p.device with torch.device(working_device): it needs an index.
        dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(dev)
        rec["gpu"] = torch.cuda.get_device_name(dev)
        rec["_cuda"] = True
    else:
        rec["gpu"] = None
    rec["device"] = str(dev)

    if args.method == "zo2" and not is_cuda:
        raise NotImplementedError("the reference ZO2 path hard-codes CUDA (torch.cuda.Stream, "
                                  "torch.cuda.get/set_rng_state, torch.cuda.synchronize)")
    if args.precision == "amp" and args.method != "zo2":
        raise NotImplementedError("the reference's AMP mode exists only in the ZO2 optimizer")

    t_imp = time.perf_counter()
    MeZOSGDConfig, get_nanogpt_mezo_sgd, GPTConfigs, seed_everything, commit = \
        import_reference(args.zo2_path)
    rec["reference_commit"] = commit
    rec["import_s"] = round(time.perf_counter() - t_imp, 3)

    cfg = getattr(GPTConfigs(), args.model)
    seq = args.seq if args.seq is not None else cfg.block_size
    rec["seq"] = seq
    if seq > cfg.block_size:
        raise ValueError(f"--seq {seq} exceeds {args.model}'s block_size {cfg.block_size}")
    rec["shape"] = {"layers": cfg.n_layer, "hidden": cfg.n_embd, "heads": cfg.n_head,
                    "vocab": cfg.vocab_size, "block_size": cfg.block_size, "bias": cfg.bias}
    n_params = count_params(cfg)
    rec["n_params"] = n_params

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    amp = args.precision == "amp"
    build_dtype = torch.float32 if amp else dtypes[args.precision]
    zo_kwargs = dict(lr=args.lr, weight_decay=args.weight_decay, eps=args.eps,
                     working_device=str(dev))
    if args.method == "zo2":
        zo_kwargs.update(offloading_device="cpu", overlap=not args.no_overlap)
        if amp:
            zo_kwargs.update(amp=True, amp_precision=dtypes[args.amp_dtype])
    zo_cfg = MeZOSGDConfig(**zo_kwargs)
    zo_cfg.zo2 = args.method == "zo2"   # the reference's tests set it this way too
    host_dtype = zo_cfg.precision_on_offloading_device if amp else build_dtype
    gpu_dtype = zo_cfg.precision_on_working_device if amp else build_dtype
    rec["host_dtype"] = str(host_dtype).replace("torch.", "") if args.method == "zo2" else None
    rec["gpu_dtype"] = str(gpu_dtype).replace("torch.", "")
    if args.method == "zo2":
        rec["overlap"] = zo_cfg.overlap

    # Where to draw the random weights.
    init_dev = torch.device("cpu")
    if is_cuda and args.init_device != "cpu":
        need = n_params * torch.tensor([], dtype=build_dtype).element_size()
        free, _ = torch.cuda.mem_get_info(dev)
        if args.init_device == "device" or need < 0.8 * free or args.method == "mezo":
            init_dev = dev
    rec["init_device"] = init_dev.type

    sync = (lambda: torch.cuda.synchronize(dev)) if is_cuda else (lambda: None)

    # ---- build (timed as init_s, not with the steps) ----
    seed_everything(args.seed)
    sync()
    t0 = time.perf_counter()
    orig_dtype = torch.get_default_dtype()
    torch.set_default_dtype(build_dtype)
    try:
        with torch.device(init_dev):
            model = get_nanogpt_mezo_sgd(zo_cfg)(cfg, zo_cfg)
    finally:
        torch.set_default_dtype(orig_dtype)
    if args.method == "mezo":
        model = model.to(dev)
    elif init_dev.type != "cpu":
        # Built on the GPU: the ZO2 optimizer left every block there. Put the offloaded blocks
        # on the host in their storage dtype (the state its own CPU init would give).
        for i in model.opt.offloading_blocks:
            model.transformer.h[i] = model.transformer.h[i].to(device="cpu", dtype=host_dtype)
        if amp:
            model.opt.init_zo2_amp()  # the reference's own cast by device (a no-op check here)
    sync()
    rec["init_s"] = round(time.perf_counter() - t0, 3)
    if is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        rec["gpu_bytes_after_init"] = int(torch.cuda.memory_allocated(dev))

    # ---- data, as the reference's prepare_data (labels are the inputs shifted by one) ----
    data = torch.randint(0, cfg.vocab_size, (args.batch, seq + 1)).to(dev)
    input_ids, labels = data[:, :seq], data[:, 1:seq + 1]
    pos = torch.arange(seq, dtype=torch.long, device=dev).unsqueeze(0)

    def step():
        model.zo_train()
        return model(input_ids, pos, labels)

    losses = []
    for _ in range(args.warmup):
        losses.append(float(step()))
    sync()
    times = []
    t_all = time.perf_counter()
    for _ in range(args.steps):
        sync()
        ts = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - ts)
        losses.append(float(loss))
    sync()
    total = time.perf_counter() - t_all

    tokens = args.batch * seq
    med = statistics.median(times) if times else float("nan")
    rec.update({
        "step_s": round(med, 6),
        "tokens_per_s": round(tokens / med, 2) if times else None,
        "step_s_mean": round(total / max(len(times), 1), 6),
        "step_s_min": round(min(times), 6) if times else None,
        "step_s_all": [round(t, 6) for t in times],
        "losses_first_last": [losses[0], losses[-1]] if losses else None,
        "loss_finite": all(math.isfinite(x) for x in losses),
    })
    if args.method == "zo2":
        p0 = next(model.transformer.h[model.opt.offloading_blocks[0]].parameters(), None) \
            if model.opt.offloading_blocks else None
        if p0 is not None:
            rec["host_block_device"] = str(p0.device)
            rec["host_block_dtype"] = str(p0.dtype).replace("torch.", "")
            rec["host_block_pinned"] = bool(p0.is_pinned()) if p0.device.type == "cpu" else None
    _add_peak(rec)


if __name__ == "__main__":
    sys.exit(main())
