"""zo2_jax: zeroth-order fine-tuning (MeZO) with ZO2 offloading, in JAX.

    import zo2_jax as zo2

    model, params = zo2.load("path/to/hf_folder_or.gguf")
    engine = zo2.ZO2Engine(model, params, zo2.mezo_sgd(1e-6),
                           storage=zo2.Storage("bfloat16", rounding="stochastic"))
    metrics = engine.step(batch, key)           # two forward passes, no backward
    zo2.save_pretrained(model, engine.params(), "out/")

The names below come from the subpackages, which can be imported on their own:

- `zo2_jax.models`: Flax NNX decoders (OPT, GPT-2, the LLaMA family), `load` / `save_pretrained`;
- `zo2_jax.zo`: the SPSA estimator, `mezo_sgd`, the resident `MeZOEngine`;
- `zo2_jax.offload`: `ZO2Engine`, blocks streamed from pinned host memory;
- `zo2_jax.core`: what both engines stand on (storage codecs, keyed noise, the per-part math);
- `zo2_jax.train`: data, the training loop, checkpoints (`TrainConfig`, `train.train`).

Importing `zo2_jax` imports none of them (nor jax): each name is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "zo2_jax.models": ["CheckpointError", "DecoderConfig", "Model", "UnsupportedModelError",
                       "generate", "load", "load_tokenizer", "logits", "per_example_loss",
                       "preset", "save_pretrained"],
    "zo2_jax.core.storage": ["Int8Leaf", "Storage"],
    "zo2_jax.zo": ["Estimator", "MeZOEngine", "MeZOSGD", "MeZOSGDState", "ZOGrad",
                   "apply_zo_grad", "ZOOptions", "mezo_sgd", "zo_value_and_grad"],
    "zo2_jax.offload": ["HostMemoryError", "Plan", "StreamOptions", "ZO2Engine", "make_plan"],
    # not `train` itself: `zo2_jax.train` is the subpackage (`zo2_jax.train.train(config)`)
    "zo2_jax.train": ["Checkpointer", "Result", "TrainConfig", "evaluate"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBPACKAGES = ("core", "models", "offload", "train", "zo")

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"zo2_jax.{name}")
    else:
        raise AttributeError(f"module 'zo2_jax' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from zo2_jax.core.storage import Int8Leaf, Storage  # noqa: F401
    from zo2_jax.models import (CheckpointError, DecoderConfig, Model,  # noqa: F401
                                UnsupportedModelError, generate, load, load_tokenizer, logits,
                                per_example_loss, preset, save_pretrained)
    from zo2_jax.offload import (HostMemoryError, Plan, StreamOptions, ZO2Engine,  # noqa: F401
                                 make_plan)
    from zo2_jax.train import Checkpointer, Result, TrainConfig, evaluate  # noqa: F401
    from zo2_jax.zo import (Estimator, MeZOEngine, MeZOSGD, MeZOSGDState, ZOGrad,  # noqa: F401
                            ZOOptions, apply_zo_grad, mezo_sgd, zo_value_and_grad)
