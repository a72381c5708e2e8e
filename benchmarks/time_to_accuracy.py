"""Time to accuracy: MeZO-SGD against the other estimators, same budget of forward passes,
several seeds; forward passes and seconds to reach MeZO-SGD's final accuracy (or loss).

    python benchmarks/time_to_accuracy.py --task sentiment --budget 4000 --seeds 0,1,2 \\
        --method mezo:q=1:lr=3e-5 --method fzoo:q=4:lr=1e-6 \\
        --method sparse:q=1:lr=3e-5:fraction=0.25 --out $OUT/tta.jsonl --plot $OUT/tta.png

Tasks (the model: the shipped SmolLM2-135M-Instruct GGUF unless `--model`):
- `sentiment`: the shipped classification task (accuracy on its 200 evaluation examples).
- `stdlib`: causal-LM loss on Python's own standard library source (every Python install has
  it): the modules whose path hashes into the last tenth are held out for evaluation, the rest
  are trained on (`stdlib_docs`).

A method is `NAME:key=value:...` with NAME an estimator (mezo, fzoo, sparse, hizoo) and keys
q (directions), lr, fraction (sparse), smooth (hizoo), eps, directions (gaussian / rademacher,
default rademacher). Several comma-separated lrs (`lr=1e-7,3e-7,1e-6`) are swept first: each
runs the first seed on `--sweep-budget` forward passes, and the best final value picks the lr
the seeds run with (sweep rows have kind "sweep"; the choice is a row of kind "sweep_choice").

Every method gets the same number of forward passes (`--budget`): its steps are the budget over
its passes per step (MeZO-SGD and sparse 2q, FZOO q + 1, HiZOO 2q + 1), evaluated every
`--eval-every` passes. Seconds are training time only: the step time summed, evaluations and
compilation left out (each method compiles on a warm-up engine first).

Rows (JSON lines, `--out`): one per evaluation point, then one summary per method: its mean
final value over seeds, and the forward passes and seconds at which each seed first reached
MeZO-SGD's mean final value (the first method given is the baseline), with their mean.
`--plot` draws the value against forward passes and against seconds (mean over seeds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

def _lrs(text: str) -> list:
    lrs = [float(x) for x in text.split(",")]
    if not lrs or any(not (x > 0 and x < float("inf")) for x in lrs):
        raise ValueError(text)
    return lrs


METHOD_KEYS = {"q": int, "lr": _lrs, "fraction": float, "smooth": float, "eps": float,
               "directions": str}


def parse_method(text: str) -> dict:
    """'fzoo:q=4:lr=1e-6' -> {'name': 'fzoo', 'q': 4, 'lr': 1e-6, ...} (with defaults)."""
    from zo2_jax.core.estimators import ESTIMATORS

    name, *rest = text.split(":")
    if name not in ESTIMATORS:
        raise argparse.ArgumentTypeError(f"method {text!r}: the estimator must be one of "
                                         f"{ESTIMATORS}")
    m = {"name": name, "q": 1, "lr": None, "fraction": 0.25, "smooth": 1e-8, "eps": 1e-3,
         "directions": "rademacher"}
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or key not in METHOD_KEYS:
            raise argparse.ArgumentTypeError(f"method {text!r}: {item!r} is not key=value with "
                                             f"a key among {sorted(METHOD_KEYS)}")
        try:
            m[key] = METHOD_KEYS[key](value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"method {text!r}: bad value for {key}: {value!r}")
    if m["lr"] is None:
        raise argparse.ArgumentTypeError(f"method {text!r}: give its lr=...")
    m["lrs"], m["lr"] = m["lr"], m["lr"][0]
    return m


def label(m: dict) -> str:
    extra = (f",f={m['fraction']:g}" if m["name"] == "sparse" else
             f",a={m['smooth']:g}" if m["name"] == "hizoo" else "")
    return f"{m['name']}(q={m['q']},lr={m['lr']:g}{extra})"


def passes_per_step(m: dict) -> int:
    from zo2_jax.core.estimators import Estimator

    return Estimator(m["name"]).forward_passes(m["q"])


def stdlib_docs(max_chars: int = 4_000_000) -> tuple[list, list]:
    """(train, eval) source texts of the standard library's .py modules (tests, site-packages
    and idlelib left out; each text once), split by a hash of the module's path: about a tenth
    held out. Each side stops at `max_chars`."""
    root = sysconfig.get_paths()["stdlib"]
    train, ev, sizes, seen = [], [], [0, 0], set()
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in (
            "test", "tests", "site-packages", "idlelib", "__pycache__", "dist-packages"))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            held = hashlib.sha256(rel.encode()).digest()[0] < 26  # 26 / 256: about a tenth
            side = 1 if held else 0
            if sizes[side] >= max_chars:
                continue
            try:
                with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                    text = fh.read()
            except (UnicodeDecodeError, OSError):
                continue
            digest = hashlib.sha256(text.encode()).digest()
            if not text.strip() or digest in seen:  # an empty __init__.py, a copied file
                continue
            seen.add(digest)
            (ev if held else train).append(text)
            sizes[side] += len(text)
    if not train or not ev:
        raise RuntimeError(f"found no standard library sources under {root}")
    return train, ev


def make_task(a, tokenizer):
    """(loader factory seed -> Loader, eval batches, metric name, higher_is_better)."""
    from zo2_jax.train import data as D
    from zo2_jax.train.config import TrainConfig
    from zo2_jax.train.trainer import make_data, read_data

    if a.task == "sentiment":
        cfg = TrainConfig(batch_size=a.batch_size)
        texts = read_data(cfg)
        data = make_data(cfg, tokenizer, texts)
        loader = lambda seed: texts.task.loader(texts.train, tokenizer, a.batch_size,  # noqa
                                                seed=seed, max_len=cfg.max_len)
        return loader, data.eval_batches, "accuracy", True, data.task
    train, ev = stdlib_docs()
    windows = D.pack(ev, tokenizer, a.seq_len)[:a.eval_windows]
    pad = D.Padding(pad_id=D.pad_id_of(tokenizer), length=a.seq_len)
    eval_batches = list(D.batches(windows, a.batch_size, pad))
    loader = lambda seed: D.lm_loader(train, tokenizer, a.seq_len, a.batch_size,  # noqa: E731
                                      seed=seed)
    return loader, eval_batches, "eval_loss", False, None


def evaluate(engine, eval_batches, task) -> float:
    import numpy as np

    from zo2_jax.train import data as D
    from zo2_jax.train.trainer import model_batch

    engine.flush()
    if task is None:
        return float(np.concatenate([np.asarray(engine.eval_loss(model_batch(b),
                                                                 per_example=True))
                                     for b in eval_batches]).mean())
    correct = count = 0
    for b in eval_batches:
        c, n = D.accuracy(engine.logits(model_batch(b)), b)
        correct, count = correct + c, count + n
    return correct / count


def run_method(a, model, load_params, m, tx, loader_of, eval_batches, task, seed, metric,
               emit) -> list:
    """One (method, seed) run: the eval points as (passes, seconds, value)."""
    import jax

    from zo2_jax.offload import ZO2Engine
    from zo2_jax.train.trainer import model_batch
    from zo2_jax.zo import MeZOEngine

    from zo2_jax import Estimator

    kw = dict(eps=m["eps"], num_directions=m["q"], directions=m["directions"],
              estimator=Estimator(m["name"], m["fraction"], m["smooth"]),
              compute_dtype=a.compute_dtype)
    cls = MeZOEngine if a.engine == "mezo" else ZO2Engine
    engine = cls(model, load_params(), tx, **kw)
    per = passes_per_step(m)
    steps = a.budget // per
    every = max(1, a.eval_every // per)
    loader = loader_of(seed)
    base = jax.random.key(seed)
    points = [(0, 0.0, evaluate(engine, eval_batches, task))]
    emit({"step": 0, "forward_passes": 0, "seconds": 0.0, metric: points[0][2]})
    seconds, t0 = 0.0, None
    for step in range(steps):
        batch = model_batch(next(loader))
        if t0 is None:
            t0 = time.perf_counter()
        metrics = engine.step(batch, jax.random.fold_in(base, step))
        if (step + 1) % every == 0 or step + 1 == steps:
            jax.block_until_ready(metrics)
            seconds += time.perf_counter() - t0
            t0 = None
            value = evaluate(engine, eval_batches, task)
            points.append(((step + 1) * per, seconds, value))
            emit({"step": step + 1, "forward_passes": (step + 1) * per, "seconds": seconds,
                  metric: value, "train_loss": float(metrics["loss"])})
    return points


def reach(points, target, higher: bool):
    """(passes, seconds) of the first eval point at or beyond `target`, or (None, None)."""
    for p, s, v in points:
        if (v >= target) if higher else (v <= target):
            return p, s
    return None, None


def plot(path, curves, metric, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in curves.items():
        n = min(len(r) for r in runs)
        arr = np.array([[pt for pt in r[:n]] for r in runs], dtype=float)  # seeds x n x 3
        mean = arr.mean(0)
        axes[0].plot(mean[:, 0], mean[:, 2], marker=".", label=name)
        axes[1].plot(mean[:, 1], mean[:, 2], marker=".", label=name)
    axes[0].set_xlabel("forward passes")
    axes[1].set_xlabel("seconds (training steps only)")
    for ax in axes:
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["sentiment", "stdlib"], default="sentiment")
    p.add_argument("--model", default=None, help="model folder or GGUF (default: the shipped "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("--method", action="append", type=parse_method, required=True,
                   help="NAME:key=value:... (repeatable; the first is the baseline)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=int, default=4000, help="forward passes per run")
    p.add_argument("--eval-every", type=int, default=400, help="forward passes between evals")
    p.add_argument("--sweep-budget", type=int, default=None,
                   help="forward passes of each swept lr's run (default: a quarter of --budget)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128, help="stdlib: tokens per window")
    p.add_argument("--eval-windows", type=int, default=64, help="stdlib: held-out windows")
    p.add_argument("--engine", choices=["mezo", "zo2"], default="mezo")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--call", default=None, help="the call's name, recorded in every row")
    p.add_argument("--out", help="append JSON rows here")
    p.add_argument("--plot", help="write the PNG here")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.budget < 1 or a.eval_every < 1:
        p.error("--budget and --eval-every must be >= 1")

    import jax
    import jax.numpy as jnp

    import zo2_jax.models as zm
    from zo2_jax.train.config import TrainConfig
    from zo2_jax.train.trainer import resolve_model_path
    from zo2_jax.zo import mezo_sgd

    sys.path.insert(0, os.path.join(HERE, "probes"))
    from _common import command_line, git_identity

    a.compute_dtype = getattr(jnp, a.compute_dtype)
    path = resolve_model_path(a.model or TrainConfig().model)
    model, _ = zm.load(path, jnp.float32, compute_dtype=a.compute_dtype, lazy_blocks=True)
    load_params = lambda: zm.load(path, jnp.float32, compute_dtype=a.compute_dtype,  # noqa
                                  lazy_blocks=True)[1]
    tokenizer = zm.load_tokenizer(path)
    loader_of, eval_batches, metric, higher, task = make_task(a, tokenizer)
    commit, dirty = git_identity(ROOT)
    ident = {"probe": "time_to_accuracy", "task": a.task, "model": os.path.basename(path),
             "engine": a.engine, "budget": a.budget, "batch_size": a.batch_size,
             "device": jax.devices()[0].device_kind, "date": time.strftime("%Y-%m-%d"),
             "commit": commit, "dirty": dirty, "call": a.call,
             "command": command_line(sys.argv[1:] if argv is None else argv)}

    def write(row):
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def compiled(m):
        """The method's transform, its step and evaluation compiled on a throwaway engine (one
        transform per lr: a method's seeds share compiled code)."""
        tx = mezo_sgd(m["lr"])
        warm = dict(a.__dict__, budget=passes_per_step(m), eval_every=passes_per_step(m))
        run_method(argparse.Namespace(**warm), model, load_params, m, tx, loader_of,
                   eval_batches[:1], task, 0, metric, lambda row: None)
        return tx

    sweep_budget = a.sweep_budget or max(1, a.budget // 4)
    curves, finals = {}, {}
    for m in a.method:
        if len(m["lrs"]) > 1:
            results = {}
            for lr in m["lrs"]:
                trial = dict(m, lr=lr)
                emit = lambda row, trial=trial: write({  # noqa: E731
                    **ident, "kind": "sweep", "method": label(trial), "estimator": m["name"],
                    "q": m["q"], "lr": trial["lr"], "seed": seeds[0], **row})
                pts = run_method(argparse.Namespace(**dict(a.__dict__, budget=sweep_budget)),
                                 model, load_params, trial, compiled(trial), loader_of,
                                 eval_batches, task, seeds[0], metric, emit)
                results[lr] = pts[-1][2]
            ranked = [lr for lr in m["lrs"] if results[lr] == results[lr]]  # not NaN
            best = (max if higher else min)(ranked, key=results.get) if ranked else m["lrs"][0]
            write({**ident, "kind": "sweep_choice", "estimator": m["name"], "q": m["q"],
                   "lrs": m["lrs"], "finals": [results[lr] for lr in m["lrs"]],
                   "sweep_budget": sweep_budget, "seed": seeds[0], "chosen": best})
            m = dict(m, lr=best)
        name = label(m)
        tx = compiled(m)
        curves[name] = []
        for seed in seeds:
            emit = lambda row, seed=seed: write({**ident, "method": name, "estimator": m[  # noqa
                "name"], "q": m["q"], "lr": m["lr"], "seed": seed, **row})
            curves[name].append(run_method(a, model, load_params, m, tx, loader_of,
                                           eval_batches, task, seed, metric, emit))
        finals[name] = sum(r[-1][2] for r in curves[name]) / len(seeds)
    baseline = list(curves)[0]
    target = finals[baseline]
    table = []
    for name, runs in curves.items():
        hits = [reach(r, target, higher) for r in runs]
        ok = [h for h in hits if h[0] is not None]
        mean = (lambda i: sum(h[i] for h in ok) / len(ok)) if len(ok) == len(hits) else None
        per = passes_per_step(a.method[0])
        base_passes = per * (a.budget // per)
        row = {**ident, "kind": "summary", "method": name, "baseline": baseline,
               "target": target, "final_mean": finals[name], "seeds": seeds,
               "passes_to_target": [h[0] for h in hits], "seconds_to_target": [h[1] for h in hits],
               "passes_to_target_mean": mean(0) if mean else None,
               "seconds_to_target_mean": mean(1) if mean else None,
               "passes_fraction_of_baseline": (mean(0) / base_passes) if mean else None}
        write(row)
        table.append(row)
    if a.plot:
        plot(a.plot, curves, metric, f"{a.task}: {os.path.basename(path)}, budget {a.budget} "
             f"forward passes, seeds {a.seeds}")
    print(f"\n{'method':40s} {'final':>8s} {'passes to target':>18s} {'s to target':>12s}")
    for r in table:
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        print(f"{r['method']:40s} {r['final_mean']:8.4f} "
              f"{f(r['passes_to_target_mean'], '18.0f')} {f(r['seconds_to_target_mean'], '12.2f')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
