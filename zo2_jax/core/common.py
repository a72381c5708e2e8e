"""Validation and state plumbing shared by the MeZO and ZO2 engines."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zo2_jax.core import options
from zo2_jax.core import spmd
from zo2_jax.core.options import ZOOptions
from zo2_jax.models.quant import is_qarray
from zo2_jax.models.model import check_batch  # noqa: F401  (the engines' batch check)
from zo2_jax.core.estimators import Estimator, as_estimator
from zo2_jax.core.parts import Pending, Spec, freeze_mask
from zo2_jax.core.storage import Int8Leaf, Storage
from zo2_jax.core.transforms import MeZOSGD, check_block_transform, mezo_sgd, resolve_mask

PyTree = Any
COMPUTE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _dtype_name(dtype) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:  # jax's extended dtypes (PRNG keys)
        return str(dtype)


def _describe(x) -> str:
    return f"{tuple(np.shape(x))} {_dtype_name(x.dtype)}"


def check_params(model, params: PyTree) -> None:
    """Raises a ValueError naming what is wrong unless `params` is {'outer': pytree, 'blocks':
    [pytree, ...]} with model.num_blocks float blocks of one structure, shapes and dtypes."""
    if not isinstance(params, Mapping) or set(params) != {"outer", "blocks"}:
        keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"params must be a dict {{'outer': ..., 'blocks': [...]}}, got {keys}")
    blocks = params["blocks"]
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise ValueError(f"params['blocks'] must be a non-empty list of block pytrees, got "
                         f"{type(blocks).__name__}")
    n = getattr(model, "num_blocks", len(blocks))
    if len(blocks) != n:
        raise ValueError(f"params has {len(blocks)} blocks, the model expects {n}")
    parts = [("outer", params["outer"])] + [(f"block {i}", b) for i, b in enumerate(blocks)]
    frozen = getattr(model, "frozen", None)
    for name, tree in parts:
        leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_qarray)
        if not leaves:
            raise ValueError(f"params {name} has no arrays")
        for path, x in leaves:
            if is_qarray(x):  # GGUF bytes: only where nothing is trained
                if frozen is None or getattr(path[0], "key", None) != frozen:
                    raise ValueError(f"params {name} leaf {jax.tree_util.keystr(path)} is a "
                                     f"quantised matrix (QArray), which cannot be trained: only "
                                     f"a frozen base (a LoRAModel's) can be kept quantised")
                continue
            if not jnp.issubdtype(getattr(x, "dtype", np.asarray(x).dtype), jnp.floating):
                raise ValueError(f"params {name} leaf {jax.tree_util.keystr(path)} has dtype "
                                 f"{np.asarray(x).dtype}; only floating-point parameters can be "
                                 f"trained (keep integer buffers out of params)")
    ref = jax.tree.structure(blocks[0])
    ref_leaves = jax.tree_util.tree_leaves_with_path(blocks[0])
    for i, b in enumerate(blocks[1:], start=1):
        if jax.tree.structure(b) != ref:
            raise ValueError(f"block {i} has tree structure {jax.tree.structure(b)}, block 0 has "
                             f"{ref}: every block must have the same structure")
        for (path, x), (_, x0) in zip(jax.tree_util.tree_leaves_with_path(b), ref_leaves):
            if np.shape(x) != np.shape(x0) or x.dtype != x0.dtype:
                raise ValueError(f"block {i} leaf {jax.tree_util.keystr(path)} is {_describe(x)}, "
                                 f"block 0 has {_describe(x0)}: blocks must share shapes and "
                                 f"dtypes (one compiled block function serves them all)")


def parallel_of(mesh, parallel: str, num_directions: int):
    """The engine's `spmd.Parallel` for `mesh=` (None, a Mesh, a device count or a list of
    devices), or None where it is one device of a single process (the one-device engine)."""
    options.check("parallel", parallel, ZOOptions)
    if mesh is None:
        return None
    m = spmd.as_mesh(mesh)
    if m.size == 1 and jax.process_count() == 1:
        return None
    return spmd.Parallel.make(m, parallel, num_directions)


def single_device(mesh) -> jax.Device:
    """The device of a one-device engine (`parallel_of` gave None)."""
    if mesh is None:
        return jax.devices()[0]
    return spmd.as_mesh(mesh).devices.flat[0]


def check_eps(eps) -> float:
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return eps


def _block_mask(mask_spec, blocks, model):
    if isinstance(mask_spec, Mapping) and set(mask_spec) == {"outer", "blocks"}:
        masks = [resolve_mask(m, b) for m, b in zip(mask_spec["blocks"], blocks)]
    else:
        masks = [resolve_mask(mask_spec, b, model) for b in blocks]
    for i, m in enumerate(masks[1:], start=1):
        if m != masks[0]:
            raise ValueError(f"the weight-decay mask of block {i} differs from block 0's; one "
                             f"compiled block function serves all blocks, so it must be the same")
    return masks[0]


def check_options(model, *, eps, num_directions, compute_dtype, storage, outer_storage,
                  clip_norm, directions="gaussian", estimator="mezo", **_) -> float:
    """The cheap argument checks (before any block is made or loaded); returns eps as a float."""
    for stage in ("context", "embed", "block", "head"):
        if not callable(getattr(model, stage, None)):
            raise TypeError(f"model must implement the seam (context, embed, block, head); "
                            f"{type(model).__name__} has no {stage}()")
    eps = check_eps(eps)
    options.check("num_directions", num_directions, ZOOptions)
    if not any(jnp.dtype(compute_dtype) == d for d in COMPUTE_DTYPES):
        raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
    if clip_norm is not None and not (math.isfinite(float(clip_norm)) and clip_norm > 0):
        raise ValueError(f"clip_norm must be None or a finite number > 0, got {clip_norm!r}")
    for name, st in (("storage", storage), ("outer_storage", outer_storage)):
        if st is not None and not isinstance(st, Storage):
            raise TypeError(f"{name} must be a zo2_jax.Storage, got {type(st).__name__}")
    options.check("directions", directions, ZOOptions)
    est = as_estimator(estimator)
    est.check_directions(num_directions)
    if est.curvature and clip_norm is not None:
        raise ValueError(f"clip_norm is not available with the {est.name} estimator: its update "
                         f"direction z / sqrt(H) uses the curvature H updates only when the "
                         f"deferred update runs, after the norm would be needed")
    return eps


def build_spec(model, params, tx, *, eps, num_directions, compute_dtype, storage,
               outer_storage, clip_norm, directions="gaussian", estimator="mezo") -> Spec:
    """Validates the engine arguments and returns the static Spec of the run."""
    eps = check_options(model, eps=eps, num_directions=num_directions,
                        compute_dtype=compute_dtype, storage=storage,
                        outer_storage=outer_storage, clip_norm=clip_norm, directions=directions,
                        estimator=estimator)
    check_params(model, params)
    tx = mezo_sgd(1e-6) if tx is None else tx
    outer_mask = block_mask = None
    if isinstance(tx, MeZOSGD):
        lr0 = tx.learning_rate(jnp.zeros([], jnp.int32)) if callable(tx.learning_rate) \
            else tx.learning_rate
        if not math.isfinite(float(lr0)):
            raise ValueError(f"the learning rate must be finite, got {float(lr0)} at step 0")
        m = tx.mask
        outer_mask = freeze_mask(resolve_mask(m["outer"] if isinstance(m, Mapping) and set(m) == {
            "outer", "blocks"} else m, params["outer"], model))
        block_mask = freeze_mask(_block_mask(m, params["blocks"], model))
    else:
        check_block_transform(tx)
    model_dtype = getattr(model, "dtype", None)
    if model_dtype is not None and jnp.dtype(model_dtype) != jnp.dtype(compute_dtype):
        warnings.warn(f"the model computes in {jnp.dtype(model_dtype).name} but compute_dtype is "
                      f"{jnp.dtype(compute_dtype).name}: the perturbed weights are cast to "
                      f"compute_dtype, then by the model to its own dtype", stacklevel=3)
    storage = storage or Storage()
    return Spec(model=model, eps=eps, num_directions=int(num_directions),
                compute_dtype=jnp.dtype(compute_dtype), storage=storage,
                outer_storage=outer_storage or storage, tx=tx, outer_mask=outer_mask,
                block_mask=block_mask, clip_norm=None if clip_norm is None else float(clip_norm),
                directions=directions, estimator=as_estimator(estimator),
                frozen=frozen_key(model, params))


def frozen_key(model, params) -> Optional[str]:
    """The model's frozen subtree key (`LoRAModel.frozen`), checked against `params`: every part
    a dict holding it; None for a model that trains all its parameters."""
    key = getattr(model, "frozen", None)
    if key is None:
        return None
    parts = [("outer", params["outer"])] + [(f"block {i}", b)
                                             for i, b in enumerate(params["blocks"])]
    for name, tree in parts:
        if callable(tree):
            continue  # a lazy block: checked when it is made
        if not isinstance(tree, Mapping) or key not in tree:
            got = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise ValueError(f"params {name} must be a dict with the frozen base under {key!r} "
                             f"(the model's `adapt` makes them), got {got}")
    return key


def lazy_blocks(params):
    """(params with every block described, make_block(i)) where blocks may be zero-argument
    callables that return the block: each is called once, when the engine encodes and offloads
    that block, so a model can be loaded (or created) one block at a time, e.g. straight into
    int8 host storage without a full-precision copy of the whole model anywhere.

    With callables, the returned params hold abstract stand-ins (jax.ShapeDtypeStruct leaves of
    block 0, made first) for the argument checks; block 0 itself is handed over by
    make_block(0) and not kept. Every later block is checked against block 0."""
    if not isinstance(params, Mapping):
        return params, lambda i: params["blocks"][i]
    blocks = params.get("blocks")
    if not isinstance(blocks, (list, tuple)) or not any(callable(b) for b in blocks):
        return params, lambda i: params["blocks"][i]
    if set(params) != {"outer", "blocks"}:
        raise ValueError(f"params must be a dict {{'outer': ..., 'blocks': [...]}}, got "
                         f"{sorted(params)}")

    def call(i):
        b = blocks[i]() if callable(blocks[i]) else blocks[i]
        leaves = jax.tree.leaves(b)
        if callable(b) or not leaves or not all(hasattr(x, "dtype") for x in leaves):
            raise ValueError(f"params['blocks'][{i}] gave {type(b).__name__}, expected a block "
                             f"pytree of arrays")
        return b

    held = {0: call(0)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.dtype(x.dtype)),
                            held[0])
    ref_tree, ref = jax.tree.structure(abstract), jax.tree.leaves(abstract)

    def make_block(i):
        if i in held:
            return held.pop(i)  # the engine owns block 0 from here: no reference kept
        b = call(i)
        got = [(jnp.shape(x), jnp.dtype(x.dtype)) for x in jax.tree.leaves(b)]
        if jax.tree.structure(b) != ref_tree or got != [(r.shape, r.dtype) for r in ref]:
            raise ValueError(f"params['blocks'][{i}]() returned a block unlike block 0 "
                             f"(structure, shapes or dtypes differ): every block must have the "
                             f"same structure, shapes and dtypes")
        return b

    return {"outer": params["outer"], "blocks": [abstract] * len(blocks)}, make_block


def prepare(model, params, tx, **options):
    """(spec, params, make_block) for an engine: the cheap checks first (before a lazily given
    block 0 is made), then `lazy_blocks`, then `build_spec`."""
    check_options(model, **options)
    params, make_block = lazy_blocks(params)
    return build_spec(model, params, tx, **options), params, make_block


# ---- state() / restore() -----------------------------------------------------------------------

def meta(spec: Spec, engine: str, num_blocks: int, key_impl: str) -> dict:
    """Small metadata stored next to the arrays of a state (checked on restore)."""
    return {"engine": engine, "num_blocks": num_blocks, "num_directions": spec.num_directions,
            "storage": dataclasses.asdict(spec.storage),
            "outer_storage": dataclasses.asdict(spec.outer_storage),
            "fused": spec.fused, "key_impl": key_impl, "directions": spec.directions,
            "estimator": dataclasses.asdict(spec.estimator)}


def pending_to_tree(p: Pending) -> dict:
    tree = {"key": jax.random.key_data(p.key), "coef": p.coef, "valid": p.valid}
    if p.curv is not None:
        tree["curv"] = p.curv
    return tree


def pending_from_tree(d: Mapping, key_impl: str) -> Pending:
    key = jax.random.wrap_key_data(jnp.asarray(d["key"]), impl=key_impl)
    curv = d.get("curv")
    return Pending(key, jnp.asarray(d["coef"], jnp.float32), jnp.asarray(d["valid"], bool),
                   None if curv is None else jnp.asarray(curv, jnp.float32))


def check_meta(spec: Spec, num_blocks: int, m: Mapping) -> None:
    want = meta(spec, "", num_blocks, "")
    # states saved before the options existed
    m = {"directions": "gaussian", "estimator": dataclasses.asdict(Estimator()), **m}
    for k in ("num_blocks", "num_directions", "storage", "outer_storage", "fused", "directions",
              "estimator"):
        if m.get(k) != want[k]:
            raise ValueError(f"state was saved with {k}={m.get(k)!r}, this engine has "
                             f"{k}={want[k]!r}: build the engine as the state's was (the "
                             f"command line reads its settings from the checkpoint)")


def check_like(name: str, got: PyTree, want: PyTree) -> None:
    """Raises unless `got` has the structure, shapes and dtypes of `want`."""
    is_leaf = lambda x: isinstance(x, Int8Leaf)  # noqa: E731
    if jax.tree.structure(got, is_leaf=is_leaf) != jax.tree.structure(want, is_leaf=is_leaf):
        raise ValueError(f"state[{name!r}] has structure {jax.tree.structure(got)}, expected "
                         f"{jax.tree.structure(want)}")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        if np.shape(a) != np.shape(b) or _dtype_name(a.dtype) != _dtype_name(b.dtype):
            raise ValueError(f"state[{name!r}] leaf {jax.tree_util.keystr(path)} is "
                             f"{_describe(a)}, expected {_describe(b)}")



def base_digest(spec: Spec, outer: PyTree, blocks) -> str:
    """SHA-256 (hex) of a model's frozen base (`Spec.frozen`) as stored: the frozen subtree of
    `outer`, then of each block from `blocks` (an iterable of block trees, in order), every
    leaf's path, dtype, shape and bytes (copied to the host one block at a time). The same
    stored base gives the same digest in either engine."""
    if spec.frozen is None:
        raise ValueError("base_digest: the model has no frozen base (Spec.frozen is None)")
    h = hashlib.sha256()

    def add(tag, tree):
        for path, x in jax.tree_util.tree_leaves_with_path(tree[spec.frozen]):
            a = np.ascontiguousarray(jax.device_get(x))
            h.update(f"{tag}{jax.tree_util.keystr(path)}|{a.dtype.name}|{a.shape}".encode())
            h.update(a.reshape(-1).view(np.uint8).data)
    add("outer", outer)
    for i, block in enumerate(blocks):
        add(f"block{i}", block)
    return h.hexdigest()
