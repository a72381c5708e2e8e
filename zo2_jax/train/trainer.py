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
import signal
import threading
import time
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import zo2_jax.models as zm
from zo2_jax.models.lora import LoRAModel, lora, save_merged, save_peft
from zo2_jax.models.prefix import PrefixModel, save_peft_prefix
from zo2_jax.core.trees import host_copy
from zo2_jax.train import data as D
from zo2_jax.train import metrics as M
from zo2_jax.train.checkpoint import CheckpointCorrupt, Checkpointer
from zo2_jax.train.config import (DEFAULT_MODEL, TrainConfig, against_checkpoint,
                                    same_path, saved_config)

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
    if cfg.base_format == "gguf" and not (os.path.isfile(path) and path.endswith(".gguf")):
        raise ValueError(f"base_format='gguf' keeps a .gguf model's own block formats; {path} is "
                         f"not a .gguf file (use Q8_0 or Q4_0 to quantise its blocks at load)")
    model, params = zm.load(path, jnp.float32, compute_dtype=_DTYPES[cfg.zo.compute_dtype],
                            lazy_blocks=lazy_blocks, keep_quantized=cfg.base_format == "gguf")
    if cfg.adapter != "none":
        # new adapters, seeded by the run's seed: LoRA's B = 0 (the base model's outputs); a
        # prefix of the base's keys and values of num_prefix random tokens (MeZO's init)
        key = jax.random.fold_in(jax.random.key(cfg.seed), 0x10A)
        model = (lora(model, cfg.lora_rank, cfg.lora_alpha) if cfg.adapter == "lora"
                 else PrefixModel(model, cfg.num_prefix))
        params = model.adapt(params, key)
        if cfg.base_format not in ("storage", "gguf"):
            params = model.quantize_base(params, cfg.base_format)
    return model, params, zm.load_tokenizer(path)


def export(model, params, out_dir: str, tokenizer=None) -> str:
    """Writes `params` as a Hugging Face folder; with LoRA adapters the merged model, and the
    adapters alone in PEFT's format under `out_dir`/adapter; with a prefix (which no weight
    can hold) the prefix alone in PEFT's PREFIX_TUNING format, for the base model it names."""
    if isinstance(model, PrefixModel):
        return save_peft_prefix(model, params, out_dir, base_model_name_or_path=model.base.source)
    if isinstance(model, LoRAModel):
        save_peft(model, params, os.path.join(out_dir, "adapter"),
                  base_model_name_or_path=model.base.source)
        return save_merged(model, params, out_dir, tokenizer=tokenizer)
    return zm.save_pretrained(model, params, out_dir, tokenizer=tokenizer)


def plain(model, params):
    """(model, params) of the plain architecture, adapters merged in, for generation (a
    prefix model runs as it is)."""
    return (model.base, model.merge(params)) if isinstance(model, LoRAModel) else (model, params)


@dataclasses.dataclass
class Data:
    loader: Optional[D.Loader]  # None for evaluation only
    eval_batches: list  # classification: prompt-only batches; lm: packed windows
    task: Optional[D.ClassificationTask]


@dataclasses.dataclass
class Texts:
    """A task's examples or documents as read from its files, before any tokenizer is involved."""
    train: list
    eval: list
    task: Optional[D.ClassificationTask]


def read_data(cfg: TrainConfig, train: bool = True) -> Texts:
    """Reads and checks the configured data files (or the shipped task): a bad file, line or
    label is reported here, before a model is loaded. `train=False` reads what evaluation needs."""
    if cfg.task == "lm":
        docs = D.load_texts(cfg.train_file) if train or not cfg.eval_file else []
        return Texts(docs, D.load_texts(cfg.eval_file) if cfg.eval_file else docs, None)
    task = D.ClassificationTask(cfg.template, cfg.label_words)
    examples = []
    if train:
        examples = D.load_examples(cfg.train_file or D.shipped_path("sentiment_train.jsonl"),
                                   task.num_classes)
        if cfg.k_shot:
            examples = D.kshot(examples, cfg.k_shot, cfg.seed)
    ev = D.load_examples(cfg.eval_file or D.shipped_path("sentiment_eval.jsonl"),
                         task.num_classes)
    if cfg.eval_examples:
        ev = D.kshot(ev, cfg.eval_examples // task.num_classes, cfg.seed) \
            if cfg.eval_examples // task.num_classes else ev[:cfg.eval_examples]
    return Texts(examples, ev, task)


def make_data(cfg: TrainConfig, tokenizer, texts: Optional[Texts] = None) -> Data:
    """Training loader and evaluation batches for the configured task (`texts` from `read_data`,
    read now when not given; with `texts` read for evaluation only, no loader)."""
    texts = read_data(cfg) if texts is None else texts
    if cfg.task == "lm":
        loader = D.lm_loader(texts.train, tokenizer, cfg.seq_len, cfg.batch_size,
                             seed=cfg.seed) if texts.train else None
        eval_batches = list(D.batches(D.pack(texts.eval, tokenizer, cfg.seq_len), cfg.batch_size,
                                      D.Padding(pad_id=D.pad_id_of(tokenizer),
                                                length=cfg.seq_len)))
        if cfg.eval_examples:
            eval_batches = eval_batches[:max(1, cfg.eval_examples // cfg.batch_size)]
        return Data(loader, eval_batches, None)
    task = texts.task
    loader = task.loader(texts.train, tokenizer, cfg.batch_size, seed=cfg.seed,
                         max_len=cfg.max_len) if texts.train else None
    return Data(loader, task.eval_batches(texts.eval, tokenizer, cfg.batch_size,
                                          max_len=cfg.max_len), task)


def make_engine(cfg: TrainConfig, model, params):
    """The configured engine over `params` (which it takes over)."""
    from zo2_jax.offload import ZO2Engine
    from zo2_jax.zo import MeZOEngine

    common = dict(tx=cfg.optimizer_transform(), **cfg.zo.engine_kwargs())
    if cfg.engine == "mezo":
        return MeZOEngine(model, params, **common)
    return ZO2Engine(model, params, **cfg.stream.engine_kwargs(), **common)


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
    before: dict  # evaluation before training ({} when resumed from a checkpoint without it)
    after: dict
    steps: int  # steps run by this call
    seconds: float
    metrics_path: str
    plot_path: Optional[str]
    skipped: int
    engine: Any = None  # holds the trained parameters (flushed), e.g. for export
    model: Any = None
    tokenizer: Any = None
    resumed_from: Optional[int] = None  # the checkpoint's step, when the run resumed
    export_path: Optional[str] = None  # where the fine-tuned model was exported (export_dir)
    config: Optional[TrainConfig] = None  # the run's config (a resumed run's, as merged)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `train`; the message says which step is saved and how to resume.

    Attributes:
      step: the last step that completed.
      saved_step: the newest checkpoint's step, or None when none exists.
    """

    def __init__(self, message: str, step: int, saved_step: Optional[int]):
        super().__init__(message)
        self.step, self.saved_step = step, saved_step


def _to_host(step, m, t0, tokens):
    rec = {"kind": "train", "step": step}
    # projected_grad is [q] with q > 1 directions: keep every direction in the log.
    rec.update({k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist() for k, v in m.items()})
    dt = time.perf_counter() - t0
    rec.update(step_s=dt, tokens_per_s=tokens / dt if dt > 0 else float("nan"))
    rec.update(M.device_memory())
    rec.update(M.host_memory())
    return rec


def resume_config(cfg: TrainConfig, given: Optional[dict] = None
                  ) -> tuple[TrainConfig, Optional[dict], list[str]]:
    """(config, saved metadata or None, notes) for a run of `cfg` in its checkpoint_dir.

    With a checkpoint there, the run continues the saved one: the saved config with `given` (the
    settings given anew; by default every field of `cfg` that differs from the saved value)
    merged in by `against_checkpoint`, which refuses a change to the model, optimiser, data or
    schedule and notes any other."""
    if not cfg.checkpoint_dir or not os.path.isdir(cfg.checkpoint_dir):
        return cfg, None, []
    meta = read_checkpoint_meta(cfg.checkpoint_dir)
    if meta is None:
        return cfg, None, []
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"{cfg.checkpoint_dir}: its checkpoint of step {meta.get('step')} "
                         f"records no training config (not written by zo2_jax's trainer?)")
    if given is None:
        mine = cfg.to_json()
        given = {k: v for k, v in mine.items() if k not in saved or _differs(k, v, saved[k])}
    merged, notes = against_checkpoint(saved, {**given, "checkpoint_dir": cfg.checkpoint_dir},
                                       "train", cfg.checkpoint_dir)
    return merged, meta, notes


def _differs(name, a, b) -> bool:
    if name in ("model", "train_file", "eval_file", "out_dir", "export_dir", "checkpoint_dir"):
        return not same_path(a, b)
    return a != b


def read_checkpoint_meta(directory: str, step: Optional[int] = None) -> Optional[dict]:
    """The metadata of the newest (or given) checkpoint in `directory` (its step, the config it
    was trained with, the evaluation before training), or None when there is none."""
    ck = Checkpointer(directory, read_only=True)
    try:
        if step is not None:
            return ck.read_meta(step)
        errors = []
        for s in sorted(ck.all_steps(), reverse=True):  # a damaged newest one: the one before
            try:
                return ck.read_meta(s)
            except ValueError as e:
                errors.append(str(e))
        if errors:
            raise CheckpointCorrupt(f"{directory}: no checkpoint's metadata can be read: "
                                    + "; ".join(errors))
        return None
    finally:
        ck.close()


def restore_newest_intact(ckpt: Checkpointer, engine, log: Callable[[str], None] = print
                          ) -> tuple[dict, dict]:
    """`ckpt.restore_engine(engine)` of the newest checkpoint that is intact: a damaged one
    (a missing, truncated or changed file: CheckpointCorrupt) is reported and the one before it
    tried. Returns (data state, metadata); raises CheckpointCorrupt if none is intact."""
    errors = []
    for step in sorted(ckpt.all_steps(), reverse=True):
        try:
            out = ckpt.restore_engine(engine, step)
        except CheckpointCorrupt as e:
            errors.append(f"step {step}: {e}")
            log(f"the checkpoint of step {step} is damaged ({e}); trying the one before it")
            continue
        if errors:
            log(f"using the checkpoint of step {step}, the newest intact one")
        return out
    raise CheckpointCorrupt(f"{ckpt.directory}: no intact checkpoint to resume from ("
                            + "; ".join(errors) + ")")


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> Result:
    """Run the configured fine-tuning job end to end.

    With a checkpoint in `cfg.checkpoint_dir`, the run resumes from it with the config it was
    saved with (see `resume_config`). Ctrl-C stops the run cleanly: with a checkpoint_dir the
    last completed step is saved first (a second Ctrl-C aborts the save), and
    `TrainingInterrupted` says what is saved and how to resume.
    """
    t_start = time.perf_counter()
    # Several processes (after jax.distributed.initialize) run this same loop on one mesh; the
    # first writes the log, the plot and the export, the others log into out_dir/process<k>.
    primary = jax.process_index() == 0
    if not primary:
        log = lambda *_: None  # noqa: E731
    cfg, meta, notes = resume_config(cfg)
    for note in notes:
        log(f"note: {note}")
    texts = read_data(cfg)  # bad data files fail here, before the model loads
    model, params, tok = load_model(cfg)
    data = make_data(cfg, tok, texts)
    engine = make_engine(cfg, model, params)
    del params
    ckpt = Checkpointer(cfg.checkpoint_dir, cfg.keep_checkpoints) if cfg.checkpoint_dir else None
    start, before, mlog = 0, {}, None
    completed, data_state = 0, None
    try:
        if meta is not None:
            data_state, meta = restore_newest_intact(ckpt, engine, log)
            data.loader.restore(data_state)
            start = completed = int(meta["step"])
            before = dict(meta.get("before") or {})
            log(f"resumed from {ckpt.directory} at step {start}")
        data_state = data.loader.state()
        log_dir = cfg.out_dir if primary else os.path.join(cfg.out_dir,
                                                           f"process{jax.process_index()}")
        mlog = M.MetricsLog(log_dir, resume_step=start if start else None)
        if start == 0:
            before = evaluate(engine, data)
            mlog.write({"kind": "eval", "step": 0, **before})
            log(f"before: {_fmt(before)}")
        run_meta = lambda step: {"step": step, "config": saved_config(cfg),  # noqa: E731
                                 "before": before}
        base_key = jax.random.key(cfg.seed)
        bar = None
        if cfg.progress and primary:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=start,
                       desc=f"{cfg.engine} {cfg.zo.estimator} {cfg.optimizer}",
                       dynamic_ncols=True)
        pending, skipped, t_prev = None, 0, time.perf_counter()
        with _DeferInterrupt(log) as stop:  # a Ctrl-C ends the loop between steps
            for step in range(start, cfg.steps):
                if stop.requested:
                    break
                batch = next(data.loader)
                mb = model_batch(batch)
                m = engine.step(mb, jax.random.fold_in(base_key, step))
                completed, data_state = step + 1, data.loader.state()
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
                    ckpt.save_engine(done, engine, data_state, run_meta(done))
        if stop.requested:
            raise KeyboardInterrupt
        if pending is not None:
            rec = _to_host(*pending, t_prev, pending_tokens)
            skipped = int(rec.get("skipped_total", skipped))
            _report(rec, mlog, bar)
        if bar is not None:
            bar.close()
        after = evaluate(engine, data)
        mlog.write({"kind": "eval", "step": cfg.steps, **after})
        log(f"after {cfg.steps} steps: {_fmt(after)}")
        if ckpt is not None and ckpt.latest_step() != cfg.steps:
            ckpt.save_engine(cfg.steps, engine, data_state, run_meta(cfg.steps))
        export_path = None
        if cfg.export_dir:
            params = engine.params()
            if jax.process_count() > 1:  # gathered on every process, written by the first
                params = jax.tree.map(host_copy, params)
            export_path = (export(model, params, cfg.export_dir, tokenizer=tok)
                           if primary else cfg.export_dir)
            del params
    except KeyboardInterrupt as e:
        if isinstance(e, TrainingInterrupted):
            raise
        raise _interrupted(cfg, ckpt, engine, completed, data_state,
                           lambda: run_meta(completed), log) from None
    finally:
        if ckpt is not None:
            ckpt.close()
        if mlog is not None:
            mlog.close()
    plot_path = None
    try:
        plot_path = M.plot(mlog.path, os.path.join(os.path.dirname(mlog.path), "training.png"))
    except Exception as e:  # a missing font or backend must not lose a finished run
        warnings.warn(f"could not draw the plot: {e}")
    return Result(before, after, cfg.steps - start, time.perf_counter() - t_start, mlog.path,
                  plot_path, skipped, engine, model, tok, resumed_from=start or None,
                  export_path=export_path, config=cfg)


class _DeferInterrupt:
    """While active (in the main thread), a first Ctrl-C only sets `requested`, so the loop stops
    between two steps with the engine whole; a second raises KeyboardInterrupt at once."""

    def __init__(self, log):
        self.requested, self._log, self._old = False, log, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._log("Ctrl-C: stopping after this step (Ctrl-C again to stop at once)")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _interrupted(cfg, ckpt, engine, completed, data_state, meta, log) -> TrainingInterrupted:
    """Saves the last completed step (when there is a checkpoint_dir) after a Ctrl-C; a second
    Ctrl-C during the save aborts it, leaving the checkpoints saved before intact."""
    head = f"interrupted after step {completed} of {cfg.steps}"
    if ckpt is None:
        return TrainingInterrupted(
            f"{head}; nothing was saved (no checkpoint_dir). To be able to stop and resume a "
            f"run, give it --checkpoint-dir DIR.", completed, None)
    last = ckpt.latest_step()
    resume = f"resume with: zo2-jax train --checkpoint-dir {cfg.checkpoint_dir}"
    if completed == 0 or last == completed or data_state is None:
        saved = "nothing saved yet" if last is None else f"the newest checkpoint is step {last}"
        return TrainingInterrupted(f"{head}; {saved}." + (f" {resume}" if last else ""),
                                   completed, last)
    log(f"{head}: saving step {completed} to {ckpt.directory} (Ctrl-C again to abort the save)")
    try:
        ckpt.save_engine(completed, engine, data_state, meta())
        ckpt.wait()
    except KeyboardInterrupt:
        return TrainingInterrupted(f"{head}; the save of step {completed} was aborted, the "
                                   f"newest checkpoint is "
                                   f"{'none' if last is None else f'step {last}'}."
                                   + (f" {resume}" if last else ""), completed, last)
    except Exception as e:  # e.g. the interrupt came mid-step: the engine's state is not whole
        return TrainingInterrupted(f"{head}; step {completed} could not be saved ({e}); the "
                                   f"newest checkpoint is "
                                   f"{'none' if last is None else f'step {last}'}."
                                   + (f" {resume}" if last else ""), completed, last)
    return TrainingInterrupted(f"{head}; saved step {completed} in {ckpt.directory}. {resume}",
                               completed, completed)


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
