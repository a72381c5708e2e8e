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
default rademacher), decay (none / cosine: the lr decays to 0 over the run's steps), lora (the
rank of LoRA adapters over a frozen base; 0, the default: every weight trained), prefix (the
virtual tokens of a MeZO prefix over a frozen base, initialised from real activations; 0: none)
and base (the adapters' base: storage, gguf (a GGUF model's own blocks), Q8_0, Q4_0). Several
comma-separated lrs (`lr=1e-7,3e-7,1e-6`) are swept first: each
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


def _decay(text: str) -> str:
    if text not in ("none", "cosine"):
        raise ValueError(text)
    return text


def _base(text: str) -> str:
    if text not in ("storage", "gguf", "Q8_0", "Q4_0"):
        raise ValueError(text)
    return text


METHOD_KEYS = {"q": int, "lr": _lrs, "fraction": float, "smooth": float, "eps": float,
               "directions": str, "decay": _decay, "lora": int, "prefix": int,
               "base": _base}


def parse_method(text: str) -> dict:
    """'fzoo:q=4:lr=1e-6' -> {'name': 'fzoo', 'q': 4, 'lr': 1e-6, ...} (with defaults)."""
    from zo2_jax.core.estimators import ESTIMATORS

    name, *rest = text.split(":")
    if name not in ESTIMATORS:
        raise argparse.ArgumentTypeError(f"method {text!r}: the estimator must be one of "
                                         f"{ESTIMATORS}")
    m = {"name": name, "q": 1, "lr": None, "fraction": 0.25, "smooth": 1e-8, "eps": 1e-3,
         "directions": "rademacher", "decay": "none", "lora": 0, "prefix": 0,
         "base": "storage"}
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
    if m["lora"] < 0 or m["prefix"] < 0 or (m["lora"] and m["prefix"]) or (
            m["base"] != "storage" and not (m["lora"] or m["prefix"])):
        raise argparse.ArgumentTypeError(f"method {text!r}: lora is the adapters' rank, prefix "
                                         f"the prefix's tokens (0: every weight trained; one of "
                                         f"them at most); base= needs lora=R or prefix=P")
    m["lrs"], m["lr"] = m["lr"], m["lr"][0]
    return m


def label(m: dict) -> str:
    extra = (f",f={m['fraction']:g}" if m["name"] == "sparse" else
             f",a={m['smooth']:g}" if m["name"] == "hizoo" else "")
    extra += ",cosine" if m.get("decay") == "cosine" else ""
    if m.get("lora") or m.get("prefix"):
        extra += (f",lora r{m['lora']}" if m.get("lora") else f",prefix {m['prefix']}") + (
            "" if m["base"] == "storage" else f" {m['base']}")
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
    if m.get("lora") or m.get("prefix"):  # adapters (seeded by the run's seed), frozen base
        from zo2_jax.models.lora import lora
        from zo2_jax.models.prefix import PrefixModel

        model = lora(model, m["lora"]) if m.get("lora") else PrefixModel(model, m["prefix"])
        params = model.adapt(load_params(m["base"] == "gguf"), jax.random.key(seed))
        if m["base"] in ("Q8_0", "Q4_0"):
            params = model.quantize_base(params, m["base"])
    else:
        params = load_params()
    engine = cls(model, params, tx, **kw)
    del params
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


def mean_curve(runs) -> list:
    """The seeds' mean curve: (passes, seconds, value) averaged point by point (the runs of one
    method share their eval points)."""
    n = min(len(r) for r in runs)
    return [tuple(sum(r[i][j] for r in runs) / len(runs) for j in range(3)) for i in range(n)]


def metric_of(row) -> str:
    """The metric of an eval or curve row: "accuracy" (higher is better) or "eval_loss"."""
    return row.get("metric") or ("accuracy" if "accuracy" in row else "eval_loss")


def curves_of(rows) -> tuple[dict, dict]:
    """From per-eval rows or "curve" rows (sweeps left out): ({method: {seed: [(passes,
    seconds, value)]}}, {method: its first row}), methods in the order they first appear."""
    curves, first = {}, {}
    for r in rows:
        if r.get("kind") == "curve":
            first.setdefault(r["method"], r)
            curves.setdefault(r["method"], {})[r["seed"]] = [tuple(p) for p in r["points"]]
            continue
        if r.get("kind") is not None:
            continue
        value = r[metric_of(r)]
        first.setdefault(r["method"], r)
        curves.setdefault(r["method"], {}).setdefault(r["seed"], []).append(
            (r["forward_passes"], r["seconds"], value))
    return curves, first


def summarize(rows, budget: int, ident: dict) -> list:
    """Summary rows (kind "summary"), one per method, from the per-eval rows of one call and task.

    A seed counts when its run reached the whole budget (a call cut short leaves runs that did
    not: `incomplete_seeds`; status "ok" where at least one seed counts). The target is the
    first method's (the baseline's) mean final value. Per method: its mean final value; per
    seed, the forward passes and seconds at its first eval at or beyond the target (means where
    every seed got there); and the passes at which the seeds' mean curve first got there, and
    that curve's best value and where. Fractions are of the baseline's budget.
    """
    curves, first = curves_of(rows)
    if not curves:
        raise ValueError("no eval rows to summarize")
    metric = metric_of(next(iter(first.values())))
    higher = metric == "accuracy"
    done = {}
    for name, seeds in curves.items():
        per = passes_per_step({"name": first[name]["estimator"], "q": first[name]["q"]})
        full = per * (budget // per)
        done[name] = {s: pts for s, pts in seeds.items() if pts[-1][0] == full}
    baseline = next(iter(curves))
    if not done[baseline]:
        raise ValueError(f"the baseline {baseline} has no run that reached the budget")
    base_runs = list(done[baseline].values())
    target = sum(r[-1][2] for r in base_runs) / len(base_runs)
    base_passes = base_runs[0][-1][0]
    out = []
    for name, runs in done.items():
        incomplete = sorted(set(curves[name]) - set(runs))
        row = {**ident, "kind": "summary", "method": name, "estimator": first[name]["estimator"],
               "q": first[name]["q"], "lr": first[name]["lr"], "baseline": baseline,
               "metric": metric, "target": target, "seeds": sorted(runs),
               "incomplete_seeds": incomplete,
               "status": "ok" if runs else
               f"cut short: none of its {len(incomplete)} seeds reached the budget"}
        if runs:
            hits = [reach(runs[s], target, higher) for s in sorted(runs)]
            every = all(h[0] is not None for h in hits)
            mean = (lambda i: sum(h[i] for h in hits) / len(hits)) if every else None
            mean_pts = mean_curve(list(runs.values()))
            curve = reach(mean_pts, target, higher)[0]
            best = (max if higher else min)(mean_pts, key=lambda p: p[2])
            row.update({
                "final_mean": sum(r[-1][2] for r in runs.values()) / len(runs),
                "passes_to_target": [h[0] for h in hits],
                "seconds_to_target": [h[1] for h in hits],
                "passes_to_target_mean": mean(0) if mean else None,
                "seconds_to_target_mean": mean(1) if mean else None,
                "passes_fraction_of_baseline": mean(0) / base_passes if mean else None,
                "mean_curve_passes_to_target": curve,
                "mean_curve_fraction_of_baseline": curve / base_passes if curve is not None
                else None,
                "best_of_mean_curve": best[2], "best_at_passes": best[0]})
        out.append(row)
    return out


def plot(path, curves, metric, title):
    """Value against forward passes and against seconds: each seed thin, the seeds' mean bold.
    `curves`: {label: [run, ...]}, a run a list of (passes, seconds, value)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, runs) in enumerate(curves.items()):
        color = f"C{i % 10}"
        for run in runs:
            for ax, x in zip(axes, (0, 1)):
                ax.plot([p[x] for p in run], [p[2] for p in run], color=color, lw=0.6,
                        alpha=0.35)
        mean = mean_curve(runs)
        for ax, x in zip(axes, (0, 1)):
            ax.plot([p[x] for p in mean], [p[2] for p in mean], color=color, marker=".", lw=1.8,
                    label=f"{name}, {len(runs)} seed{'s' * (len(runs) > 1)}")
    axes[0].set_xlabel("forward passes")
    axes[1].set_xlabel("seconds (training steps only)")
    for ax in axes:
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


IDENT_KEYS = ("probe", "task", "model", "engine", "budget", "batch_size", "device", "date",
              "commit", "dirty", "call", "command")


def summarize_file(a) -> int:
    """--summarize: the summary (and, with --out, the record: one "curve" row per method and
    seed, the sweep choices, the summaries) of one call and task from a run's JSONL rows, also
    of a call cut short."""
    with open(a.summarize) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rows = [r for r in rows if r.get("probe") == "time_to_accuracy" and r.get("task") == a.task]
    calls = list(dict.fromkeys(r.get("call") for r in rows))
    if a.call is not None:
        calls = [c for c in calls if c == a.call]
    if len(calls) != 1:
        raise SystemExit(f"{a.summarize}: rows of task {a.task!r} from calls {calls}: give "
                         f"--call to choose one")
    rows = [r for r in rows if r.get("call") == calls[0]]
    evals = [r for r in rows if "kind" not in r or r["kind"] == "curve"]
    if not evals:
        raise SystemExit(f"{a.summarize}: no eval rows of task {a.task!r}, call {calls[0]!r}")
    ident = {k: evals[0][k] for k in IDENT_KEYS if k in evals[0]}
    table = summarize(evals, ident["budget"], ident)
    curves, first = curves_of(evals)
    record = []
    for name, seeds in curves.items():
        keep = {k: first[name][k] for k in ("estimator", "q", "lr")}
        record += [{**ident, "kind": "curve", "method": name, **keep,
                    "metric": metric_of(first[name]), "seed": seed, "points": pts}
                   for seed, pts in seeds.items()]
    record += [r for r in rows if r.get("kind") == "sweep_choice"] + table
    if a.out:
        with open(a.out, "a") as fh:
            for r in record:
                fh.write(json.dumps(r) + "\n")
    if a.plot:
        done = {r["method"]: r["seeds"] for r in table}
        shown = {(name if done[name] else f"{name} (cut short)"):
                 [curves[name][s] for s in (done[name] or curves[name])] for name in curves}
        plot(a.plot, shown, metric_of(evals[0]), f"{a.task}: {ident['model']}, budget "
             f"{ident['budget']} forward passes, {ident['device']}, call {ident['call']}")
    print_table(table)
    return 0


def print_table(table) -> None:
    def f(v, width, digits=0):
        return format("-" if v is None else f"{v:.{digits}f}", f">{width}")

    print(f"\n{'method':40s} {'final':>8s} {'passes to target':>18s} {'mean curve':>11s} "
          f"{'s to target':>12s}")
    for r in table:
        print(f"{r['method']:40s} {f(r.get('final_mean'), 8, 4)} "
              f"{f(r.get('passes_to_target_mean'), 18)} "
              f"{f(r.get('mean_curve_passes_to_target'), 11)} "
              f"{f(r.get('seconds_to_target_mean'), 12, 2)}  {r['status']}"
              + (f", seeds {r['incomplete_seeds']} cut short" if r["incomplete_seeds"] else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["sentiment", "stdlib"], default="sentiment")
    p.add_argument("--model", default=None, help="model folder or GGUF (default: the shipped "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("--method", action="append", type=parse_method,
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
    p.add_argument("--summarize", metavar="ROWS",
                   help="run nothing: summarize (and plot) --task's rows of one call (--call) "
                   "from this JSONL file; with --out, append the call's record (a curve row per "
                   "method and seed, the sweep choices, the summaries)")
    a = p.parse_args(argv)
    if a.summarize:
        return summarize_file(a)
    if not a.method:
        p.error("give at least one --method (the first is the baseline)")
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.budget < 1 or a.eval_every < 1:
        p.error("--budget and --eval-every must be >= 1")

    import jax
    import jax.numpy as jnp
    import optax

    import zo2_jax.models as zm
    from zo2_jax.train.config import TrainConfig
    from zo2_jax.train.trainer import resolve_model_path
    from zo2_jax.zo import mezo_sgd

    sys.path.insert(0, os.path.join(HERE, "probes"))
    from _common import command_line, git_identity

    a.compute_dtype = getattr(jnp, a.compute_dtype)
    path = resolve_model_path(a.model or TrainConfig().model)
    model, _ = zm.load(path, jnp.float32, compute_dtype=a.compute_dtype, lazy_blocks=True)
    load_params = lambda keep=False: zm.load(  # noqa: E731
        path, jnp.float32, compute_dtype=a.compute_dtype, lazy_blocks=True,
        keep_quantized=keep)[1]
    tokenizer = zm.load_tokenizer(path)
    loader_of, eval_batches, metric, higher, task = make_task(a, tokenizer)
    commit, dirty = git_identity(ROOT)
    ident = {"probe": "time_to_accuracy", "task": a.task, "model": os.path.basename(path),
             "engine": a.engine, "budget": a.budget, "batch_size": a.batch_size,
             "device": jax.devices()[0].device_kind, "date": time.strftime("%Y-%m-%d"),
             "commit": commit, "dirty": dirty, "call": a.call,
             "command": command_line(sys.argv[1:] if argv is None else argv)}

    evals = []  # the per-eval rows of the seeds' runs (not the sweeps')

    def write(row):
        print(json.dumps(row), flush=True)
        if "kind" not in row:
            evals.append(row)
        if a.out:
            with open(a.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    txs = {}

    def compiled(m, budget):
        """The method's transform for a run of `budget` forward passes (with decay=cosine, the
        lr decays to 0 over the run's steps), its step and evaluation compiled on a throwaway
        engine (one transform per lr and budget: a method's seeds share compiled code)."""
        steps = max(1, budget // passes_per_step(m)) if m["decay"] == "cosine" else None
        key = (tuple(sorted((k, repr(v)) for k, v in m.items() if k != "lrs")), steps)
        if key in txs:  # compiled already (a swept lr, now run in full)
            return txs[key]
        tx = txs[key] = mezo_sgd(
            optax.cosine_decay_schedule(m["lr"], steps) if steps else m["lr"])
        warm = dict(a.__dict__, budget=passes_per_step(m), eval_every=passes_per_step(m))
        run_method(argparse.Namespace(**warm), model, load_params, m, tx, loader_of,
                   eval_batches[:1], task, 0, metric, lambda row: None)
        return tx

    sweep_budget = a.sweep_budget or max(1, a.budget // 4)
    for m in a.method:
        if len(m["lrs"]) > 1:
            results = {}
            for lr in m["lrs"]:
                trial = dict(m, lr=lr)
                emit = lambda row, trial=trial: write({  # noqa: E731
                    **ident, "kind": "sweep", "method": label(trial), "estimator": m["name"],
                    "q": m["q"], "lr": trial["lr"], "seed": seeds[0], **row})
                pts = run_method(argparse.Namespace(**dict(a.__dict__, budget=sweep_budget)),
                                 model, load_params, trial, compiled(trial, sweep_budget),
                                 loader_of, eval_batches, task, seeds[0], metric, emit)
                results[lr] = pts[-1][2]
            ranked = [lr for lr in m["lrs"] if results[lr] == results[lr]]  # not NaN
            best = (max if higher else min)(ranked, key=results.get) if ranked else m["lrs"][0]
            write({**ident, "kind": "sweep_choice", "estimator": m["name"], "q": m["q"],
                   "lrs": m["lrs"], "finals": [results[lr] for lr in m["lrs"]],
                   "sweep_budget": sweep_budget, "seed": seeds[0], "chosen": best})
            m = dict(m, lr=best)
        name = label(m)
        tx = compiled(m, a.budget)
        for seed in seeds:
            emit = lambda row, seed=seed: write({**ident, "method": name, "estimator": m[  # noqa
                "name"], "q": m["q"], "lr": m["lr"], "seed": seed, **row})
            run_method(a, model, load_params, m, tx, loader_of, eval_batches, task, seed,
                       metric, emit)
    table = summarize(evals, a.budget, ident)
    for row in table:
        write(row)
    if a.plot:
        plot(a.plot, {name: list(runs.values()) for name, runs in curves_of(evals)[0].items()},
             metric, f"{a.task}: {os.path.basename(path)}, budget {a.budget} forward passes, "
             f"seeds {a.seeds}")
    print_table(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
