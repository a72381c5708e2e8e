"""LoRA adapters over a frozen base: `LoRAModel` wraps a `Model`, and its parameters are the
adapters (trained) beside the base weights (frozen).

A part's parameters are {"lora": adapters, "base": the base part}; the outer part has no
adapters ({"base": outer}). `LoRAModel.frozen` names the frozen subtree, and the engines
(`zo2_jax.core.parts`) perturb, update and keep optimiser state for the rest only: the estimate
is over the adapters alone, the base is read and never written. `FrozenBaseModel` holds what
every such wrapper shares (this one and `prefix.PrefixModel`): the base's config and stages
outside the blocks, `quantize_base`, the decay mask of the trained part.

For a target matrix with kernel W [in, out] the adapters are A [in, r] and B [r, out], and the
block runs the LoRA forward x W + (alpha / r) (x A) B (`layers.Linear`: the merged weight is never
made, so a quantised base matrix is dequantised once per use and nothing of the block's size is
added); `merge` gives W + (alpha / r) A B for export. B starts at zero, so a new adapter leaves
the base model's outputs unchanged. In the PEFT library's terms (torch Linear weights [out, in])
lora_A.weight is A^T and lora_B.weight B^T.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zo2_jax.models import quant
from zo2_jax.models.layers import Block

PyTree = Any

FROZEN = "base"
ADAPTERS = "lora"
# the attention projections and the MLP, by architecture family (paths in a block's tree)
ATTENTION = ("attn.q", "attn.k", "attn.v", "attn.o")
MLP_TARGETS = ("mlp.fc1", "mlp.fc2", "mlp.gate", "mlp.up", "mlp.down")


def check_rank_alpha(rank, alpha, prefix: str = "") -> None:
    """Raises ValueError unless rank is an integer >= 1 and alpha a finite number > 0 (`prefix`
    names them as the caller's options do, e.g. "lora_")."""
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise ValueError(f"{prefix}rank must be an integer >= 1, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{prefix}alpha must be a finite number > 0, got {alpha!r}")


class FrozenBaseModel:
    """What a model of trained parameters beside a frozen base (`LoRAModel`, `PrefixModel`)
    shares: a dataclass field `base` (the wrapped `Model`), every part's parameters a dict with
    the base's under `frozen` ("base") and the trained ones under the class's `trained` key; the
    outer part {"base": outer} (nothing trained there)."""

    frozen = FROZEN
    trained: str  # the key of the trained subtree of a block's parameters
    base: Any

    @property
    def config(self):
        return self.base.config

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def num_blocks(self) -> int:
        return self.base.num_blocks

    def with_dtype(self, dtype):
        return dataclasses.replace(self, base=self.base.with_dtype(dtype))

    def with_num_layers(self, n: int):
        """The same trained parts over `n` blocks of the base's shape (for timing a few blocks)."""
        return dataclasses.replace(self, base=self.base.with_num_layers(n))

    def init_outer(self, key, dtype=jnp.float32) -> PyTree:
        return {FROZEN: self.base.init_outer(key, dtype)}

    def quantize_base(self, params: PyTree, qtype: str) -> PyTree:
        """`params` (from `adapt`) with every block's base matrices kept in the GGUF block
        format `qtype` (`quant.QArray`: Q8_0 or Q4_0 made on the device, the other
        `quant.QUANTIZABLE` types on the host), dequantised on the device where a block runs.
        Biases, norms and the outer part stay as they are; lazy blocks stay lazy."""
        return quantize_base(params, qtype)

    def decay_mask(self, params: PyTree) -> PyTree:
        """Weight decay on the trained matrices; the base (never updated) False."""
        return jax.tree_util.tree_map_with_path(
            lambda path, x: bool(path and getattr(path[0], "key", None) == self.trained
                                 and np.ndim(x) >= 2), params)

    def head(self, outer, h, batch):
        return self.base.head(outer[FROZEN], h, batch)


def quantize_base(params: PyTree, qtype: str) -> PyTree:
    """`params` ({'outer', 'blocks'}, each block a dict with the frozen base under "base") with
    every block's base matrices kept in the GGUF block format `qtype` (see
    `FrozenBaseModel.quantize_base`); the other entries of a block as they are, lazy blocks lazy."""
    if qtype not in quant.QUANTIZABLE:
        raise ValueError(f"qtype must be one of {list(quant.QUANTIZABLE)}, got {qtype!r}")
    q = (jax.jit(quant.quantize_kernels, static_argnums=1) if qtype in
         quant.DEVICE_QUANTIZABLE else quant.quantize_kernels)

    def block(b):
        if callable(b):
            return lambda: block(b())
        return {**b, FROZEN: q(b[FROZEN], qtype)}
    return {"outer": params["outer"], "blocks": [block(b) for b in params["blocks"]]}


def _get(tree, path: str):
    for k in path.split("."):
        tree = tree[k]
    return tree


def _set(tree, path: str, value):
    """A copy of nested dict `tree` with `path` replaced."""
    head, _, rest = path.partition(".")
    out = dict(tree)
    out[head] = _set(tree[head], rest, value) if rest else value
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class LoRAModel(FrozenBaseModel):
    """A `Model` with LoRA adapters on the kernels named by `targets` (paths in a block's
    parameters such as "attn.q" or "mlp.fc1"; default: every attention projection and MLP
    matrix the architecture has).

    Attributes:
      base: the wrapped model.
      rank: r, the adapters' inner size.
      alpha: the scale numerator: the delta is (alpha / rank) A B.
      targets: the adapted kernels.
    """

    base: Any
    rank: int = 8
    alpha: float = 16.0
    targets: Optional[tuple] = None
    frozen = FROZEN
    trained = ADAPTERS

    def __post_init__(self):
        check_rank_alpha(self.rank, self.alpha)
        shapes = self.base.block_shapes()
        have = [t for t in ATTENTION + MLP_TARGETS if _has(shapes, t)]
        targets = tuple(have) if self.targets is None else tuple(self.targets)
        if not targets:
            raise ValueError("targets is empty: name at least one block matrix to adapt")
        for t in targets:
            if not _has(shapes, t):
                raise ValueError(f"LoRA target {t!r} is not a matrix of this model's blocks; "
                                 f"its matrices are {have}")
            shape = _get(shapes, t)["kernel"].shape
            if self.rank > min(shape):
                raise ValueError(f"rank {self.rank} exceeds the smaller side of {t}'s kernel "
                                 f"{tuple(shape)}")
        object.__setattr__(self, "targets", targets)
        lora = {"targets": targets, "rank": self.rank, "scale": self.scale}
        cfg = self.base.config
        object.__setattr__(self, "_block_def", nnx.graphdef(nnx.eval_shape(
            lambda: Block(cfg, nnx.Rngs(0), lora=lora))))

    # ---- what the engines and the trainer read (config, dtype, num_blocks, with_dtype,
    # with_num_layers, init_outer, quantize_base, decay_mask, head: FrozenBaseModel) -----------
    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def adapter_shapes(self) -> dict:
        """{target: {"A": (in, r), "B": (r, out)}} of one block."""
        shapes = self.base.block_shapes()
        out = {}
        for t in self.targets:
            n_in, n_out = _get(shapes, t)["kernel"].shape
            out[t] = {"A": (n_in, self.rank), "B": (self.rank, n_out)}
        return out

    def init_adapters(self, key, dtype=jnp.float32) -> dict:
        """One block's adapters: A uniform in +-1/sqrt(in) (PEFT's Kaiming-uniform bound with
        a = sqrt(5)), B zero."""
        out = {}
        for i, (t, s) in enumerate(self.adapter_shapes().items()):
            bound = 1.0 / math.sqrt(s["A"][0])
            a = jax.random.uniform(jax.random.fold_in(key, i), s["A"], jnp.float32, -bound, bound)
            out[t] = {"A": a.astype(dtype), "B": jnp.zeros(s["B"], dtype)}
        return out

    def init_block(self, key, dtype=jnp.float32) -> PyTree:
        """A random base block (`Model.init_block`) with new adapters."""
        return {ADAPTERS: self.init_adapters(jax.random.fold_in(key, 1), dtype),
                FROZEN: self.base.init_block(key, dtype)}

    def adapt(self, base_params: PyTree, key, dtype=jnp.float32) -> PyTree:
        """Trainable parameters for the engines from the base model's {'outer', 'blocks'}: each
        block {"lora": new adapters, "base": the block}, outer {"base": outer}. Blocks given as
        zero-argument callables (`common.lazy_blocks`) stay lazy."""
        def block(i, b):
            if callable(b):
                return lambda: block(i, b())
            return {ADAPTERS: self.init_adapters(jax.random.fold_in(key, i), dtype), FROZEN: b}
        return {"outer": {FROZEN: base_params["outer"]},
                "blocks": [block(i, b) for i, b in enumerate(base_params["blocks"])]}

    def merged_block(self, params: PyTree) -> PyTree:
        """The base block (quantised matrices dequantised) with each target kernel W replaced
        by W + (alpha / r) A B (in the kernel's dtype, the product in float32)."""
        w = quant.dense(params[FROZEN])
        for t, ab in params[ADAPTERS].items():
            k = _get(w, t)["kernel"]
            delta = jnp.matmul(ab["A"].astype(jnp.float32), ab["B"].astype(jnp.float32),
                               precision=jax.lax.Precision.HIGHEST) * self.scale
            w = _set(w, t, dict(_get(w, t), kernel=(k.astype(jnp.float32) + delta).astype(k.dtype)))
        return w

    def merge(self, params: PyTree) -> PyTree:
        """The base model's {'outer', 'blocks'} with the adapters merged in (for export,
        evaluation with the plain model, or generation)."""
        return {"outer": params["outer"][FROZEN],
                "blocks": [self.merged_block(b) for b in params["blocks"]]}

    # ---- the seam ------------------------------------------------------------------------------
    def context(self, batch) -> dict:
        return self.base.context(batch)

    def embed(self, outer, batch, ctx=None):
        return self.base.embed(outer[FROZEN], batch, ctx)

    def block(self, block_params, h, ctx):
        """The LoRA forward x W + (alpha / r) (x A) B on every target (`layers.Linear`; the
        merged weights are never made, quantised base matrices are dequantised one at a time
        where they are used)."""
        w = block_params[FROZEN]
        for t, ab in block_params[ADAPTERS].items():
            w = _set(w, t, {**_get(w, t), "lora_a": ab["A"], "lora_b": ab["B"]})
        return self.base.block(w, h, ctx, module_def=self._block_def)

    def apply(self, params, batch):
        """Full forward pass through the seam: (per-example loss [B], logits [B, T, V])."""
        ctx = self.context(batch)
        h = self.embed(params["outer"], batch, ctx)
        for bp in params["blocks"]:
            h = self.block(bp, h, ctx)
        return self.head(params["outer"], h, batch)


def _has(shapes, path: str) -> bool:
    try:
        return "kernel" in _get(shapes, path)
    except (KeyError, TypeError):
        return False


def lora(model, rank: int = 8, alpha: float = 16.0,
         targets: Optional[Sequence[str]] = None) -> LoRAModel:
    """`LoRAModel(model, rank, alpha, targets)`."""
    return LoRAModel(model, rank, alpha, None if targets is None else tuple(targets))


# ---- export ------------------------------------------------------------------------------------

def save_merged(model: LoRAModel, params: PyTree, out_dir: str, **kwargs) -> str:
    """The adapters merged into the base weights (`LoRAModel.merge`), written as a Hugging Face
    folder by `save_pretrained` (kwargs: dtype, max_shard_bytes, tokenizer)."""
    from zo2_jax.models.io import save_pretrained
    return save_pretrained(model.base, model.merge(params), out_dir, **kwargs)


def peft_modules(model: LoRAModel) -> list:
    """Per block, {target: its module name in the base model's transformers class}, e.g.
    {"attn.q": "model.layers.3.self_attn.q_proj", ...} for block 3."""
    from zo2_jax.models import hf
    cfg = model.config
    adapter = hf.ADAPTERS.get(cfg.model_type)
    if adapter is None:
        raise ValueError(f"no Hugging Face names for model_type {cfg.model_type!r}")
    _, block_spec = adapter.tables(cfg, adapter.prefixes[0])
    out = []
    for i in range(model.num_blocks):
        spec, names = block_spec(i), {}
        for t in model.targets:
            name, how = _get(spec, t)["kernel"]
            if how != "T" or not name.endswith(".weight"):
                raise ValueError(f"{t} is stored as part of {name!r} in {cfg.model_type} "
                                 f"checkpoints, not as a Linear of its own: PEFT's format "
                                 f"cannot hold its adapter; export the merged model "
                                 f"(save_merged) instead")
            names[t] = name[: -len(".weight")]
        out.append(names)
    return out


def save_peft(model: LoRAModel, params: PyTree, out_dir: str, *,
              base_model_name_or_path: Optional[str] = None) -> str:
    """The adapters alone in the PEFT library's LoRA format: adapter_config.json and
    adapter_model.safetensors (float32) with lora_A.weight = A^T [r, in] and lora_B.weight =
    B^T [out, r] per target module, which `peft.PeftModel.from_pretrained` loads onto the base
    model."""
    import json
    import os

    from zo2_jax.models.io import _write_safetensors
    modules = peft_modules(model)
    tensors = {}
    for names, b in zip(modules, params["blocks"], strict=True):
        for t, ab in b[ADAPTERS].items():
            mod = "base_model.model." + names[t]
            tensors[mod + ".lora_A.weight"] = np.ascontiguousarray(
                np.asarray(jax.device_get(ab["A"]), np.float32).T)
            tensors[mod + ".lora_B.weight"] = np.ascontiguousarray(
                np.asarray(jax.device_get(ab["B"]), np.float32).T)
    os.makedirs(out_dir, exist_ok=True)
    _write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), tensors,
                       {"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": model.rank,
        "lora_alpha": float(model.alpha), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "target_modules": sorted({modules[0][t].rsplit(".", 1)[-1] for t in model.targets}),
        "base_model_name_or_path": base_model_name_or_path or model.base.source,
        "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    return out_dir
