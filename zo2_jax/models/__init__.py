"""Models: Flax NNX decoders split into embed / block / head stages, and their checkpoints."""

from zo2_jax.models.config import DecoderConfig
from zo2_jax.models.config import PRESETS
from zo2_jax.models.config import preset
from zo2_jax.models.hf import UnsupportedModelError
from zo2_jax.models.hf import config_from_hf
from zo2_jax.models.hf import config_to_hf
from zo2_jax.models.io import CheckpointError
from zo2_jax.models.io import hf_state_dict
from zo2_jax.models.io import load
from zo2_jax.models.io import load_tokenizer
from zo2_jax.models.io import save_pretrained
from zo2_jax.models.model import Model
from zo2_jax.models.model import generate
from zo2_jax.models.model import logits
from zo2_jax.models.model import per_example_loss
from zo2_jax.models.prefix import PrefixModel
from zo2_jax.models.seam import Seam

__all__ = [
    "CheckpointError",
    "DecoderConfig",
    "Model",
    "PRESETS",
    "PrefixModel",
    "Seam",
    "UnsupportedModelError",
    "config_from_hf",
    "config_to_hf",
    "generate",
    "hf_state_dict",
    "load",
    "load_tokenizer",
    "logits",
    "per_example_loss",
    "preset",
    "save_pretrained",
]
