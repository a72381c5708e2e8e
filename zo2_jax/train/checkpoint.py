"""Checkpoints with orbax: engine state, data position and run metadata saved together.

A checkpoint holds everything a resumed run needs to continue bit for bit: parameters as stored
(streamed blocks are saved from pinned host memory without a trip through the device), optimiser
states, the pending deferred update (key and projected gradient), the step, and the data loader's
position. Orbax writes each step into a temporary folder and renames it only when complete, so a
run killed during a save leaves the previous checkpoint intact; the leftover temporary folder is
removed the next time the manager opens the directory.

`save_engine` / `restore_engine` move an engine with streamed blocks (ZO2Engine) one block at a
time: its blocks go to a "blocks" item, one file per block with its optimiser state, written
during the save call (the rest is saved in the background as usual), and are read back one at a
time into the engine. Neither holds a second copy of the model in host memory, which a model
whose blocks fill most of the host (OPT-175B: 348 GB of bf16 blocks on a 512 GiB host) needs.

A model with adapters over a frozen base (`Spec.frozen`: LoRA, prefix tuning) is checkpointed
without the base: the adapters, their optimiser state and the rest of the state, and the base's
SHA-256 (`engine.base_digest()`). A restore keeps the base the engine was built with (read from
the model path) and refuses one whose digest differs.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import shutil
import zlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
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


_BLOCKS_FORMAT = 1
MANIFEST = "zo2_manifest.json"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointCorrupt(ValueError):
    """A saved checkpoint's file is missing, truncated or does not match its checksum."""


def _crc32_file(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(folder: str) -> list:
    """Every file under `folder`, relative, sorted (the manifest itself left out)."""
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def seal(folder: str) -> None:
    """Makes a finished checkpoint folder durable and checkable: fsyncs every file and folder in
    it, then writes MANIFEST (each file's size, and its CRC-32 except for block files, whose
    leaves carry theirs in the block index) atomically. Only a sealed checkpoint is checked in
    full on restore."""
    entries = {}
    for rel in _files(folder):
        path = os.path.join(folder, rel)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        entry = {"nbytes": os.path.getsize(path)}
        if not (rel.startswith("blocks" + os.sep) and rel.endswith(".bin")):
            entry["crc32"] = _crc32_file(path)
        entries[rel] = entry
    for root, dirs, _ in os.walk(folder):
        for d in dirs:
            _fsync_dir(os.path.join(root, d))
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "files": entries}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))
    _fsync_dir(folder)
    _fsync_dir(os.path.dirname(folder))


def verify(folder: str) -> bool:
    """Checks a checkpoint folder against its MANIFEST: every listed file present, with its size
    and checksum. Returns False for a folder without one (written before this version, or by a
    run killed before it was sealed: its blocks' checksums are still checked as they are read).

    Raises:
      CheckpointCorrupt: naming the first file that is missing, truncated or changed.
    """
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointCorrupt(f"{path}: the checkpoint's manifest cannot be read ({e})") from e
    for rel, entry in files.items():
        p = os.path.join(folder, rel)
        if not os.path.isfile(p):
            raise CheckpointCorrupt(f"{p}: missing from the checkpoint (its manifest lists it)")
        size = os.path.getsize(p)
        if size != entry["nbytes"]:
            raise CheckpointCorrupt(f"{p}: {size} bytes, the checkpoint's manifest says "
                                    f"{entry['nbytes']} (a truncated or damaged file)")
        if "crc32" in entry and _crc32_file(p) != entry["crc32"]:
            raise CheckpointCorrupt(f"{p}: does not match its checksum in the checkpoint's "
                                    f"manifest (a damaged file)")
    return True


def _leaf_entries(tree) -> list:
    return [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(tree)]


def _fsync_dir(directory: str) -> None:
    """Makes a folder's entries (new files, renames) durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _dtype_name(x) -> str:
    return str(x.dtype) if _is_key(x) else np.dtype(x.dtype).name


class _BlocksHandler(ocp.CheckpointHandler):
    """An engine's blocks, one file per block (its leaves, then its optimiser state's, raw
    bytes back to back) and `index.json` naming each leaf's path, shape, dtype and offset. The
    save reads one block at a time from `read(i)`; the restore returns a `_BlockReader`."""

    def save(self, directory, args: "_BlocksSave") -> None:
        directory = os.fspath(directory)
        index = {"format": _BLOCKS_FORMAT, "num_blocks": args.num_blocks, "blocks": []}
        primary = jax.process_index() == 0
        for i in range(args.num_blocks):
            tree = args.read(i)  # on every process: a block sharded over processes is gathered
            if not primary:  # one process writes (the folder is shared)
                del tree
                continue
            name, offset, leaves = f"{i:05d}.bin", 0, []
            with open(os.path.join(directory, name), "wb") as f:
                for path, x in _leaf_entries(tree):
                    entry = {"path": path, "shape": list(np.shape(x)), "dtype": _dtype_name(x)}
                    if _is_key(x):  # a typed PRNG key: its data, and its implementation
                        entry["key_impl"] = str(jax.random.key_impl(x))
                        x = jax.random.key_data(x)
                    a = np.ascontiguousarray(x)
                    data = a.reshape(-1).view(np.uint8).data
                    leaves.append({**entry, "offset": offset, "nbytes": a.nbytes,
                                   "crc32": zlib.crc32(data)})
                    f.write(data)
                    offset += a.nbytes
                f.flush()
                os.fsync(f.fileno())
            index["blocks"].append({"file": name, "nbytes": offset, "leaves": leaves})
            del tree
        if not primary:
            return
        with open(os.path.join(directory, "index.json"), "w") as f:
            json.dump(index, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(directory)

    def restore(self, directory, args: "_BlocksRestore" = None) -> "_BlockReader":
        return _BlockReader(os.fspath(directory))


@ocp.args.register_with_handler(_BlocksHandler, for_save=True)
@dataclasses.dataclass
class _BlocksSave(ocp.args.CheckpointArgs):
    num_blocks: int
    read: Callable[[int], Any]  # i -> (block, optimiser state), host arrays


@ocp.args.register_with_handler(_BlocksHandler, for_restore=True)
@dataclasses.dataclass
class _BlocksRestore(ocp.args.CheckpointArgs):
    pass


class _BlockReader:
    """Reads a saved block (and its optimiser state) into numpy arrays shaped like a given
    tree; `check` compares the whole index with the engine's blocks before any is read."""

    def __init__(self, directory: str):
        self.directory = directory
        path = os.path.join(directory, "index.json")
        try:
            with open(path) as f:
                self.index = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointCorrupt(f"{path}: the checkpoint's block index cannot be read "
                                    f"({e})") from e
        if self.index.get("format") != _BLOCKS_FORMAT:
            raise ValueError(f"{path}: block format {self.index.get('format')!r}, this version "
                             f"reads {_BLOCKS_FORMAT}")

    def check(self, likes: list) -> None:
        """Raises, naming the block and leaf, unless the saved blocks have the count, leaves,
        shapes and dtypes of `likes` (one (block, opt) tree of ShapeDtypeStructs per block)
        and every block file has its full size."""
        saved = self.index["blocks"]
        if len(saved) != len(likes):
            raise ValueError(f"{self.directory}: the checkpoint has {len(saved)} blocks, the "
                             f"engine {len(likes)}; was it written for another model?")
        for i, (entry, like) in enumerate(zip(saved, likes)):
            want = _leaf_entries(like)
            if len(entry["leaves"]) != len(want):
                raise ValueError(f"{self.directory}: block {i} has {len(entry['leaves'])} arrays "
                                 f"saved, the engine expects {len(want)} (another optimiser "
                                 f"or storage?)")
            for got, (path, x) in zip(entry["leaves"], want):
                if got["path"] != path:
                    raise ValueError(
                        f"{self.directory}: block {i} has leaf {got['path']} saved where the "
                        f"engine has {path}: the checkpoint's blocks have another structure "
                        f"(another model, optimiser or engine version?)")
                if tuple(got["shape"]) != tuple(x.shape) or got["dtype"] != _dtype_name(x):
                    raise ValueError(
                        f"{self.directory}: block {i} leaf {got['path']} is saved as "
                        f"{got['dtype']}{got['shape']}, the engine expects {path} as "
                        f"{_dtype_name(x)}{list(x.shape)}")
            path = os.path.join(self.directory, entry["file"])
            size = os.path.getsize(path) if os.path.exists(path) else None
            if size != entry["nbytes"]:
                raise CheckpointCorrupt(f"{path}: block {i}'s file has "
                                 f"{'no file' if size is None else f'{size} bytes'}, its index "
                                 f"says {entry['nbytes']} bytes (a truncated or damaged "
                                 f"checkpoint: restore an earlier step)")

    def read(self, i: int, like):
        """Block i as numpy arrays in `like`'s tree structure."""
        entry = self.index["blocks"][i]
        path = os.path.join(self.directory, entry["file"])
        out = []
        with open(path, "rb") as f:
            for lf in entry["leaves"]:
                f.seek(lf["offset"])
                raw = np.empty(lf["nbytes"], np.uint8)
                got = f.readinto(memoryview(raw))
                if got != lf["nbytes"]:
                    raise CheckpointCorrupt(f"{path}: block {i} leaf {lf['path']} ends after "
                                     f"{got} of {lf['nbytes']} bytes (a truncated file)")
                if "crc32" in lf and zlib.crc32(raw) != lf["crc32"]:
                    raise CheckpointCorrupt(f"{path}: block {i} leaf {lf['path']} does not "
                                            f"match its checksum (a damaged file: restore an "
                                            f"earlier step)")
                if "key_impl" in lf:
                    data = raw.view(np.uint32).reshape(*lf["shape"], -1)
                    out.append(jax.random.wrap_key_data(data, impl=lf["key_impl"]))
                else:
                    out.append(raw.view(jnp.dtype(lf["dtype"])).reshape(lf["shape"]))
        return jax.tree.unflatten(jax.tree.structure(like), out)


class Checkpointer:
    """Asynchronous save / restore of (engine state, data state, metadata) by step.

    For an engine, `save_engine` / `restore_engine` (blocks one at a time for a ZO2Engine);
    `save` / `restore` take any state tree:

      >>> ck = Checkpointer("ckpt", keep=2)
      >>> ck.save_engine(step, engine, loader.state(), {"step": step})
      >>> data_state, meta = ck.restore_engine(engine)   # the latest step

    Args:
      directory: where checkpoints live (created if missing, unless read_only).
      keep: how many recent checkpoints to keep.
      asynchronous: write in the background; the training loop continues meanwhile.
      read_only: only restore: `directory` must exist, and the unfinished saves in it are left
        alone (they may be another process's, still being written).
    """

    def __init__(self, directory: str, keep: int = 3, asynchronous: bool = True,
                 read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(directory)
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"{directory}: no such checkpoint folder")
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                               read_only=read_only,
                                               enable_async_checkpointing=asynchronous,
                                               cleanup_tmp_directories=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._unsealed: list = []  # steps saved by this object, not sealed yet

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def read_meta(self, step: Optional[int] = None) -> dict:
        """The metadata saved with `step` (latest if None), without reading any array."""
        step = self._step(step)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax's own errors name neither the folder nor the cure
            raise ValueError(f"{self.directory}/{step}: its metadata cannot be read ({e}); is it "
                             f"a zo2_jax checkpoint?") from e
        return dict(out["meta"])

    def save(self, step: int, state: PyTree, data_state: dict, meta: dict) -> None:
        """Start saving; returns once the arrays are safe to change (device work may go on)."""
        arrays, engine_meta = _split(state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                  data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave({**meta, "engine_meta": engine_meta}))
        self._save(step, args)

    def _save(self, step: int, args) -> None:
        """The manager's save, then the sealing of whatever has finished. A save that fails
        leaves no temporary folder and names the cause; the checkpoints before it are intact."""
        try:
            self._manager.save(step, args=args, force=True)
        except BaseException as e:
            for tmp in glob.glob(os.path.join(glob.escape(self.directory),
                                              f"{step}{_TMP_SUFFIX}*")):
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                last = [s for s in self.all_steps() if s != step]
                raise OSError(e.errno, f"saving step {step} to {self.directory} failed "
                              f"({e.strerror or e}); the checkpoints saved before are intact "
                              f"(newest: {max(last) if last else 'none'})"
                              + ("; free disk space, then resume" if e.errno == errno.ENOSPC
                                 else "")) from e
            raise
        self._unsealed.append(step)
        self._seal_finished()

    def _seal_finished(self) -> None:
        """Seals the steps this object saved once no save is running (`seal`)."""
        if self.read_only or not self._unsealed or self._manager.is_saving_in_progress():
            return
        if jax.process_index() != 0:  # the primary process seals (the folder is shared)
            self._unsealed.clear()
            return
        for step in self._unsealed:
            folder = os.path.join(self.directory, str(step))
            if os.path.isdir(folder):  # (a step the manager has since deleted is gone)
                seal(folder)
        self._unsealed.clear()

    def verify(self, step: Optional[int] = None) -> bool:
        """Checks `step` (latest if None) against its manifest (see `verify`); True if sealed
        and intact, False if not sealed. Raises CheckpointCorrupt naming a damaged file."""
        step = self._step(step)
        self._seal_finished()
        return verify(os.path.join(self.directory, str(step)))

    def save_engine(self, step: int, engine, data_state: dict, meta: dict) -> None:
        """Save `engine`'s state: an engine with streamed blocks (`block_state`, ZO2Engine) has
        them written one at a time during this call, the rest in the background; any other
        engine is saved as `save(step, engine.state(), ...)`. With a frozen base (adapters)
        the base is left out and its digest recorded (see the module docstring)."""
        f = _frozen_key(engine)
        if f is not None:
            meta = {**meta, FROZEN_BASE: {"key": f, "sha256": engine.base_digest()}}
        if not hasattr(engine, "block_state"):
            state = engine.state()
            if f is not None:
                state = {**state, "outer": _drop(state["outer"], f),
                         "blocks": _drop(state["blocks"], f)}
            return self.save(step, state, data_state, meta)
        arrays, engine_meta = _split(engine.state(blocks=False))
        if f is not None:
            arrays["outer"] = _drop(arrays["outer"], f)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(arrays),
            blocks=_BlocksSave(engine.num_blocks, engine.block_state if f is None else
                               lambda i: engine.block_state(i, frozen=False)),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave({**meta, "engine_meta": engine_meta}))
        self._save(step, args)

    def restore_engine(self, engine, step: Optional[int] = None) -> tuple[dict, dict]:
        """Restore `step` (latest if None) into `engine`; returns (data state, metadata). Blocks
        saved one per file (`save_engine` with a ZO2Engine) are checked against the engine's
        before any is read, then read one at a time into it (into a MeZOEngine: all read, then
        restored). Checkpoints written by `save` are restored as `restore` does. A checkpoint
        saved without its frozen base is restored around the engine's own base, after its
        digest is checked against the saved one."""
        step = self._step(step)
        self.verify(step)
        f = self._check_base(step, engine)
        blocks_dir = os.path.join(self.directory, str(step), "blocks")
        streamed = hasattr(engine, "block_state")
        if not os.path.isdir(blocks_dir):
            if f is None:
                state, data, meta = self.restore(step, _state_like(engine))
            else:
                like = _state_like(engine)
                blocks = like["blocks"]
                trimmed = {**like, "outer": _drop(like["outer"], f), "blocks": (
                    [_drop(b, f) for b in blocks] if isinstance(blocks, list)
                    else _drop(blocks, f))}
                state, data, meta = self.restore(step, trimmed)
                state = self._with_base(engine, state, f)
            engine.restore(state)
            return data, meta
        if streamed:
            like = engine.state_like()
            likes = [engine.block_like(i) if f is None else engine.block_like(i, frozen=False)
                     for i in range(engine.num_blocks)]
        else:
            like = dict(engine.state())
            one = lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype)  # noqa: E731
            b, o = (jax.tree.map(one, like.pop(k)) for k in ("blocks", "opt_blocks"))
            likes = [(b if f is None else _drop(b, f), o)] * engine.num_blocks
        if f is not None:
            like["outer"] = _drop(like["outer"], f)
        reader = _BlockReader(blocks_dir)
        reader.check(likes)  # before anything is read
        arrays, _ = _split(like)
        out = self._restore_items(step, arrays)
        state, meta = self._rebuild(step, arrays, out)
        if streamed:
            read = lambda i: reader.read(i, likes[i])  # noqa: E731
            if f is not None:  # each block around the engine's own base, read as it is placed
                state["outer"] = _rejoin(state["outer"], engine.state(blocks=False)["outer"], f)
                read = lambda i: _rejoin_pair(reader.read(i, likes[i]),  # noqa: E731
                                              _own_base(engine, i, f), f)
            engine.restore(state, read_block=read)
        else:
            pairs = [reader.read(i, likes[i]) for i in range(engine.num_blocks)]
            state["blocks"] = [p[0] for p in pairs]
            state["opt_blocks"] = [p[1] for p in pairs]
            if f is not None:
                state = self._with_base(engine, state, f)
            engine.restore(state)
        return dict(out["data"]), meta

    def _check_base(self, step: int, engine) -> Optional[str]:
        """The frozen key when checkpoint `step` was saved without its base (None when it holds
        the whole state), after checking the engine's base digest against the saved one."""
        saved = self.read_meta(step).get(FROZEN_BASE)
        if saved is None:
            return None
        f = _frozen_key(engine)
        if f != saved["key"]:
            raise ValueError(f"{self.directory}/{step} holds adapters without their frozen base "
                             f"{saved['key']!r}; this engine's model "
                             + ("has no adapters" if f is None else f"freezes {f!r}")
                             + ": build it with the adapters the run was saved with")
        digest = engine.base_digest()
        if digest != saved["sha256"]:
            raise ValueError(f"{self.directory}/{step}: its adapters were trained over a base "
                             f"with SHA-256 {saved['sha256'][:16]}..., this engine's base has "
                             f"{digest[:16]}...: load the model (and its base format, "
                             f"--base-format) the run was saved with")
        return f

    @staticmethod
    def _with_base(engine, state: dict, f: str) -> dict:
        """A restored MeZO-layout state (blocks stacked or a list) with the engine's own frozen
        base put back into its outer part and blocks."""
        own = engine.state()
        state = {**state, "outer": _rejoin(state["outer"], own["outer"], f)}
        if isinstance(state["blocks"], list):
            base = own["blocks"]
            if isinstance(base, list):
                state["blocks"] = [_rejoin(b, o, f) for b, o in zip(state["blocks"], base)]
            else:  # stacked on a leading axis
                state["blocks"] = [_rejoin(b, {f: jax.tree.map(lambda x: x[i], base[f])}, f)
                                   for i, b in enumerate(state["blocks"])]
        else:
            state["blocks"] = _rejoin(state["blocks"], own["blocks"], f)
        return state

    def _step(self, step: Optional[int]) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
        return step

    def restore(self, step: Optional[int], like: PyTree) -> tuple[PyTree, dict, dict]:
        """Restore `step` (latest if None) into arrays placed like `like` (a checkpoint written
        by `save`; `restore_engine` reads either kind)."""
        step = self._step(step)
        if os.path.isdir(os.path.join(self.directory, str(step), "blocks")):
            raise ValueError(f"{self.directory}/{step} holds its blocks one per file "
                             f"(save_engine): restore it with restore_engine(engine)")
        self.verify(step)
        arrays, _ = _split(like)
        out = self._restore_items(step, arrays)
        state, meta = self._rebuild(step, arrays, out)
        return state, dict(out["data"]), meta

    def _check_shapes(self, step: int, arrays: PyTree) -> None:
        """Compares the saved arrays' shapes with `arrays`' before reading any: a failed orbax
        read leaves background reads that print tracebacks when the process exits."""
        from etils import epath

        try:
            saved = ocp.StandardCheckpointHandler().metadata(
                epath.Path(self.directory) / str(step) / "state")
        except Exception:  # noqa: BLE001 - no metadata to check against: orbax's own checks
            return
        saved = getattr(saved, "tree", saved)
        got = [x for x in jax.tree.leaves(saved) if hasattr(x, "shape")]
        want = jax.tree_util.tree_leaves_with_path(arrays)
        if len(got) != len(want):
            raise ValueError(f"{self.directory}/{step}: the checkpoint has {len(got)} arrays, this "
                             f"engine's state {len(want)}: it was written for another model, "
                             f"optimiser or storage (its run's settings are in its metadata)")
        if sorted(tuple(g.shape) for g in got) == sorted(tuple(np.shape(w)) for _, w in want):
            return  # (leaf order is orbax's business; only the shapes are compared here)
        for g, (path, w) in zip(got, want):
            if tuple(g.shape) != tuple(np.shape(w)):
                raise ValueError(f"{self.directory}/{step}: {jax.tree_util.keystr(path)} is saved "
                                 f"with shape {tuple(g.shape)}, this model's is "
                                 f"{tuple(np.shape(w))}: the checkpoint was written for another "
                                 f"model (its run's --model is in its metadata)")

    def _restore_items(self, step: int, arrays: PyTree):
        self._check_shapes(step, arrays)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(arrays)),
                                  data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        try:
            return self._manager.restore(step, args=args)
        except ValueError as e:
            if "do not match" in str(e):
                raise ValueError(f"{self.directory}/{step}: the saved state does not have this "
                                 f"engine's structure (written with another optimiser, storage "
                                 f"or model?): {e}") from e
            if "Requested shape" in str(e) or "strict=False" in str(e):
                raise ValueError(f"{self.directory}/{step}: the saved parameters have other "
                                 f"shapes than this model's: the checkpoint was written for "
                                 f"another model (its run's --model is in its metadata)") from None
            raise

    def _rebuild(self, step: int, arrays: PyTree, out) -> tuple[dict, dict]:
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
        return state, meta

    def wait(self) -> None:
        """Block until background saves have finished (and seal them)."""
        self._manager.wait_until_finished()
        self._seal_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._seal_finished()
        self._manager.close()


FROZEN_BASE = "frozen_base"  # metadata of a checkpoint saved without its frozen base


def _frozen_key(engine) -> Optional[str]:
    """The engine's frozen top-level key (`Spec.frozen`, e.g. adapters' "base"), or None."""
    return getattr(getattr(engine, "spec", None), "frozen", None)


def _drop(tree: dict, f: str) -> dict:
    return {k: v for k, v in tree.items() if k != f}


def _rejoin(tree: dict, whole: dict, f: str) -> dict:
    return {**tree, f: whole[f]}


def _own_base(engine, i: int, f: str) -> dict:
    """{f: block i's frozen base}, copied to memory of its own: `block_state` may return views
    of the engine's buffers (the CPU backend), which placing block i frees."""
    return {f: jax.tree.map(np.array, engine.block_state(i)[0][f])}


def _rejoin_pair(pair: tuple, whole: dict, f: str) -> tuple:
    block, opt = pair
    return _rejoin(block, whole, f), opt


def _state_like(engine) -> dict:
    """The target of a restore from a `save(state())` checkpoint, from the engine's shapes and
    placement alone (an engine with streamed blocks: host arrays for its blocks), so a restore
    neither copies every block first nor needs a usable engine."""
    if not hasattr(engine, "state_like"):
        return engine.state()
    return engine.state_like(blocks=True)
