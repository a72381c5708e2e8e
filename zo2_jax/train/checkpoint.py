"""Checkpoints with orbax: engine state, data position and run metadata saved together.

A checkpoint holds everything a resumed run needs to continue bit for bit: parameters as stored
(streamed blocks are saved from pinned host memory without a trip through the device), optimiser
states, the pending deferred update (key and projected gradient), the step, and the data loader's
position. Orbax writes each step into a temporary folder and renames it only when complete, so a
run killed during a save leaves the previous checkpoint intact; the leftover temporary folder is
removed the next time the manager opens the directory.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

PyTree = Any


def _abstract(tree: PyTree) -> PyTree:
    """Shape, dtype and placement of every leaf, so a restore lands where the state lives."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                        if isinstance(x, jax.Array) else x, tree)


def _split(state: dict) -> tuple[dict, Optional[dict]]:
    """Arrays (saved by orbax's array handler) apart from the engine's JSON metadata."""
    state = dict(state)
    return state, state.pop("meta", None)


class Checkpointer:
    """Asynchronous save / restore of (engine state, data state, metadata) by step.

    Args:
      directory: where checkpoints live (created if missing).
      keep: how many recent checkpoints to keep.
      asynchronous: write in the background; the training loop continues meanwhile.
    """

    def __init__(self, directory: str, keep: int = 3, asynchronous: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=asynchronous,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: PyTree, data_state: dict, meta: dict) -> None:
        """Start saving; returns once the arrays are safe to change (device work may go on)."""
        arrays, engine_meta = _split(state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                  data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave({**meta, "engine_meta": engine_meta}))
        self._manager.save(step, args=args, force=True)

    def restore(self, step: Optional[int], like: PyTree) -> tuple[PyTree, dict, dict]:
        """Restore `step` (latest if None) into arrays placed like `like`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
        arrays, _ = _split(like)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(arrays)),
                                  data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        out = self._manager.restore(step, args=args)
        meta = dict(out["meta"])
        # Orbax hands back lists and dicts where the state had tuples and named tuples: rebuild
        # the exact containers of `like` from the restored leaves (same order, same count).
        leaves = jax.tree.leaves(out["state"])
        structure = jax.tree.structure(arrays)
        if len(leaves) != structure.num_leaves:
            raise ValueError(f"{self.directory}/{step}: checkpoint has {len(leaves)} arrays, the "
                             f"engine state expects {structure.num_leaves}; was it written by a "
                             f"different engine or model?")
        state = dict(jax.tree.unflatten(structure, leaves))
        if meta.get("engine_meta") is not None:
            state["meta"] = meta.pop("engine_meta")
        return state, dict(out["data"]), meta

    def wait(self) -> None:
        """Block until background saves have finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
