"""Data and tasks, the training loop, checkpoints and metrics."""

from zo2_jax.train.checkpoint import Checkpointer
from zo2_jax.train.config import TrainConfig
from zo2_jax.train.trainer import Result
from zo2_jax.train.trainer import evaluate
from zo2_jax.train.trainer import train

__all__ = ["Checkpointer", "Result", "TrainConfig", "evaluate", "train"]
