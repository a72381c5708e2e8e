"""Offloaded zeroth-order training (ZO2): blocks in pinned host memory, streamed through the device.

`Storage` chooses how parameters are kept between steps (float32, bfloat16, float16 or int8, with
round-to-nearest or stochastic rounding); both engines use it.
"""

from zo2_jax.core.storage import Int8Leaf
from zo2_jax.core.storage import Storage
from zo2_jax.offload._zo2 import HostMemoryError
from zo2_jax.offload._zo2 import ZO2Engine

__all__ = [
    "HostMemoryError",
    "Int8Leaf",
    "Storage",
    "ZO2Engine",
]
