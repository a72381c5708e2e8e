"""Offloaded zeroth-order training (ZO2): blocks in pinned host memory, streamed through the device.

`make_plan` decides, before any block is made, what streams and what stays resident (and how);
`ZO2Engine` follows a plan (its own, or one given). `Storage` (from `zo2_jax.core`) chooses how
parameters are kept between steps; both engines use it.
"""

from zo2_jax.core.storage import Int8Leaf
from zo2_jax.core.storage import Storage
from zo2_jax.offload._zo2 import ZO2Engine
from zo2_jax.offload.plan import HostMemoryError
from zo2_jax.offload.plan import Plan
from zo2_jax.offload.plan import StreamOptions
from zo2_jax.offload.plan import make_plan

__all__ = [
    "HostMemoryError",
    "Int8Leaf",
    "Plan",
    "Storage",
    "StreamOptions",
    "ZO2Engine",
    "make_plan",
]
