"""The training loop: data, engine, evaluation, checkpoints and metrics, as importable pieces.

`train(config)` runs a whole job; a notebook can instead call `load_model`, `make_data`,
`make_engine` and `evaluate` one by one. The loop reads step t-1's metrics only after step t has
been dispatched, so the host never stalls the device; checkpoints hold the engine state (with its
pending deferred update) and the data position together, so a resumed run is bit-identical.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import zo2_jax.models as zm
from zo2_jax.train import data as D
from zo2_jax.train import metrics as M
from zo2_jax.train.checkpoint import Checkpointer
from zo2_jax.train.config import DEFAULT_MODEL, TrainConfig

MODEL_KEYS = ("input_ids", "attention_mask", "loss_mask")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_model_path(model: str) -> str:
    if model == DEFAULT_MODEL:
        from zo2_jax.models.gguf import smollm2_gguf_path

        return smollm2_gguf_path()
    return model


def load_model(cfg: TrainConfig, lazy_blocks: bool = True):
    """(model, params, tokenizer). By default the blocks are callables that read each block from
    the checkpoint when `make_engine`'s engine asks for it (`zm.load(lazy_blocks=True)`): the
    engine encodes it on the device into its storage and, for ZO2, writes it to pinned host
    memory, so the full-precision model is never held whole. Such params are for an engine
    only; `lazy_blocks=False` gives arrays on the default device (for `zm.logits`, `generate`)."""
    path = resolve_model_path(cfg.model)
    model, params = zm.load(path, jnp.float32, compute_dtype=_DTYPES[cfg.compute_dtype],
                            lazy_blocks=lazy_blocks)
    return model, params, zm.load_tokenizer(path)


@dataclasses.dataclass
class Data:
    loader: D.Loader
    eval_batches: list  # classification: prompt-only batches; lm: packed windows
    task: Optional[D.ClassificationTask]


def make_data(cfg: TrainConfig, tokenizer) -> Data:
    """Training loader and evaluation batches for the configured task."""
    if cfg.task == "lm":
        docs = D.load_texts(cfg.train_file)
        loader = D.lm_loader(docs, tokenizer, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
        ev = D.load_texts(cfg.eval_file) if cfg.eval_file else docs
        eval_batches = list(D.batches(D.pack(ev, tokenizer, cfg.seq_len), cfg.batch_size,
                                      D.Padding(pad_id=D.pad_id_of(tokenizer),
                                                length=cfg.seq_len)))
        if cfg.eval_examples:
            eval_batches = eval_batches[:max(1, cfg.eval_examples // cfg.batch_size)]
        return Data(loader, eval_batches, None)
    task = D.ClassificationTask(cfg.template, cfg.label_words)
    train = D.load_examples(cfg.train_file or D.shipped_path("sentiment_train.jsonl"),
                            task.num_classes)
    if cfg.k_shot:
        train = D.kshot(train, cfg.k_shot, cfg.seed)
    ev = D.load_examples(cfg.eval_file or D.shipped_path("sentiment_eval.jsonl"),
                         task.num_classes)
    if cfg.eval_examples:
        ev = D.kshot(ev, cfg.eval_examples // task.num_classes, cfg.seed) \
            if cfg.eval_examples // task.num_classes else ev[:cfg.eval_examples]
    loader = task.loader(train, tokenizer, cfg.batch_size, seed=cfg.seed, max_len=cfg.max_len)
    return Data(loader, task.eval_batches(ev, tokenizer, cfg.batch_size, max_len=cfg.max_len),
                task)


def make_engine(cfg: TrainConfig, model, params):
    """The configured engine over `params` (which it takes over)."""
    from zo2_jax.offload import Storage, ZO2Engine
    from zo2_jax.zo import MeZOEngine

    storage = Storage(cfg.storage_dtype, rounding=cfg.rounding)
    common = dict(tx=cfg.optimizer_transform(), eps=cfg.eps, num_directions=cfg.num_directions,
                  compute_dtype=_DTYPES[cfg.compute_dtype], storage=storage,
                  directions=cfg.directions)
    if cfg.engine == "mezo":
        return MeZOEngine(model, params, **common)
    budget = None if cfg.device_budget_gb is None else int(cfg.device_budget_gb * 2 ** 30)
    return ZO2Engine(model, params, resident_blocks=cfg.resident_blocks,
                     max_inflight=cfg.max_inflight, device_budget_bytes=budget,
                     packed={"auto": "auto", "yes": True, "no": False}[cfg.packed],
                     branches=cfg.branches, blocks_per_call=cfg.blocks_per_call, **common)


def model_batch(batch: dict) -> dict:
    return {k: jnp.asarray(batch[k]) for k in MODEL_KEYS if k in batch}


def evaluate(engine, data: Data) -> dict:
    """Accuracy (classification) or mean loss (lm) on the evaluation batches, after a flush."""
    engine.flush()
    if data.task is None:
        losses = [np.asarray(engine.eval_loss(model_batch(b), per_example=True))
                  for b in data.eval_batches]
        return {"eval_loss": float(np.concatenate(losses).mean())}
    correct = count = 0
    for b in data.eval_batches:
        c, n = D.accuracy(engine.logits(model_batch(b)), b)
        correct, count = correct + c, count + n
    return {"accuracy": correct / count, "eval_count": count}


@dataclasses.dataclass
class Result:
    before: dict
    after: dict
    steps: int
    seconds: float
    metrics_path: str
    plot_path: Optional[str]
    skipped: int
    engine: Any = None  # holds the trained parameters (flushed), e.g. for export
    model: Any = None
    tokenizer: Any = None


def _to_host(step, m, t0, tokens):
    rec = {"kind": "train", "step": step}
    # projected_grad is [q] with q > 1 directions: keep every direction in the log.
    rec.update({k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist() for k, v in m.items()})
    dt = time.perf_counter() - t0
    rec.update(step_s=dt, tokens_per_s=tokens / dt if dt > 0 else float("nan"))
    rec.update(M.device_memory())
    rec.update(M.host_memory())
    return rec


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> Result:
    """Run the configured fine-tuning job end to end (resuming from checkpoint_dir if present)."""
    t_start = time.perf_counter()
    model, params, tok = load_model(cfg)
    data = make_data(cfg, tok)
    engine = make_engine(cfg, model, params)
    del params
    ckpt = Checkpointer(cfg.checkpoint_dir, cfg.keep_checkpoints) if cfg.checkpoint_dir else None
    start = 0
    if ckpt is not None and ckpt.latest_step() is not None:
        data_state, meta = ckpt.restore_engine(engine)
        data.loader.restore(data_state)
        start = int(meta["step"])
        log(f"resumed from {ckpt.directory} at step {start}")
    mlog = M.MetricsLog(cfg.out_dir, resume_step=start if start else None)
    before = evaluate(engine, data) if start == 0 else {}
    if before:
        mlog.write({"kind": "eval", "step": 0, **before})
        log(f"before: {_fmt(before)}")
    base_key = jax.random.key(cfg.seed)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.engine} {cfg.optimizer}",
                   dynamic_ncols=True)
    pending, skipped, t_prev = None, 0, time.perf_counter()
    for step in range(start, cfg.steps):
        batch = next(data.loader)
        mb = model_batch(batch)
        m = engine.step(mb, jax.random.fold_in(base_key, step))
        if pending is not None:  # step-1's scalars: the device is already busy with `step`
            rec = _to_host(*pending, t_prev, pending_tokens)
            t_prev = time.perf_counter()
            skipped = int(rec.get("skipped_total", skipped))
            _report(rec, mlog, bar)
        pending, pending_tokens = (step, m), int(np.asarray(batch["attention_mask"]).sum())
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            ev = evaluate(engine, data)
            mlog.write({"kind": "eval", "step": done, **ev})
            log(f"step {done}: {_fmt(ev)}")
        if ckpt is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            ckpt.save_engine(done, engine, data.loader.state(),
                      {"step": done, "config": cfg.to_json()})
    if pending is not None:
        rec = _to_host(*pending, t_prev, pending_tokens)
        skipped = int(rec.get("skipped_total", skipped))
        _report(rec, mlog, bar)
    if bar is not None:
        bar.close()
    after = evaluate(engine, data)
    mlog.write({"kind": "eval", "step": cfg.steps, **after})
    log(f"after {cfg.steps} steps: {_fmt(after)}")
    if ckpt is not None:
        if cfg.checkpoint_every and cfg.steps % cfg.checkpoint_every:
            ckpt.save_engine(cfg.steps, engine, data.loader.state(),
                      {"step": cfg.steps, "config": cfg.to_json()})
        ckpt.close()
    mlog.close()
    plot_path = None
    try:
        plot_path = M.plot(mlog.path, os.path.join(cfg.out_dir, "training.png"))
    except Exception as e:  # a missing font or backend must not lose a finished run
        warnings.warn(f"could not draw the plot: {e}")
    return Result(before, after, cfg.steps - start, time.perf_counter() - t_start, mlog.path,
                  plot_path, skipped, engine, model, tok)


def _report(rec, mlog, bar):
    mlog.write(rec)
    if not math.isfinite(rec.get("loss", 0.0)):
        warnings.warn(f"step {rec['step']}: non-finite loss; its update was skipped")
    if bar is not None:
        bar.set_postfix(loss=f"{rec['loss']:.4f}",
                        g=f"{float(np.mean(rec.get('projected_grad', 0))):.3g}",
                        refresh=False)
        bar.update(1)


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
