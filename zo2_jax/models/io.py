"""Loading from Hugging Face folders and GGUF files, and export to Hugging Face safetensors.

Loading goes tensor by tensor: the safetensors files are memory-mapped, each block is assembled in
its target dtype and handed to `place_block` (for example a pinned-host sharding) before the next
one is read, so the whole model is never held twice. With `lazy_blocks=True` a block is read only
when the engine that takes it over asks for it, so no full-precision copy of the model is held.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from zo2_jax.models import hf
from zo2_jax.models.hf import CheckpointError
from zo2_jax.models.model import Model
from zo2_jax.models.quant import QArray

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": jnp.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
Placement = Union[None, jax.sharding.Sharding, Callable[[int, Any], Any]]


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # what a parameter may be stored as
_MAX_HEADER = 100 * 2 ** 20  # the safetensors format's own limit on its JSON header


def _load_json(raw, what: str):
    """JSON from bytes or text, with every parse failure (bad UTF-8, syntax, nesting deep enough
    to exhaust the recursion limit) a CheckpointError."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{what}: not valid JSON ({type(e).__name__}: {e})") from None


class _Safetensors:
    """Memory-mapped reader of one or more .safetensors files (no copy until asked).

    Every header is validated when the file is opened, as the safetensors library does: a JSON
    object of entries {dtype, shape, data_offsets} whose byte ranges match their shapes and
    dtypes and tile the data section exactly (in some order, no gap, no overlap, no trailing
    bytes), so no header edit can point a tensor at another's bytes or past the end of the file.
    """

    def __init__(self, files: list[str]):
        self.index: dict[str, tuple[str, dict, int]] = {}
        self._maps: dict[str, np.memmap] = {}
        for f in files:
            if not os.path.isfile(f):
                raise CheckpointError(f"{f}: file not found (named by the shard index)")
            size = os.path.getsize(f)
            with open(f, "rb") as fh:
                raw = fh.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{f}: not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", raw)
                if n > min(size - 8, _MAX_HEADER):
                    raise CheckpointError(f"{f}: not a safetensors file (its header length {n:,} "
                                          f"exceeds the file's {size:,} bytes or the format's "
                                          f"limit of {_MAX_HEADER:,})")
                header = _load_json(fh.read(n), f"{f}: not a safetensors file: its header")
            if not isinstance(header, dict):
                raise CheckpointError(f"{f}: not a safetensors file (its header is a "
                                      f"{type(header).__name__}, not a JSON object)")
            if not isinstance(header.pop("__metadata__", {}), dict):
                raise CheckpointError(f"{f}: its header's __metadata__ is not a JSON object")
            ranges = []
            for name, info in header.items():
                ranges.append(self._check_entry(f, name, info, 8 + n, size) + (name,))
                if name in self.index:
                    raise CheckpointError(f"{f}: tensor {name!r} is also in "
                                          f"{self.index[name][0]}")
                self.index[name] = (f, info, 8 + n)
            expected = 0
            for start, end, name in sorted(ranges):
                if start != expected:
                    raise CheckpointError(f"{f}: tensor {name!r} starts at data byte {start}, "
                                          f"expected {expected}: tensors overlap or leave a gap")
                expected = end
            if 8 + n + expected != size:
                raise CheckpointError(f"{f}: its tensors end at byte {8 + n + expected} of a "
                                      f"{size}-byte file: the file is corrupt")

    @staticmethod
    def _check_entry(f, name, info, base, size) -> tuple[int, int]:
        """A header entry whose byte range disagrees with its shape and dtype, or runs past the
        end of the file (a truncated download), is refused when the file is opened."""
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                and isinstance(info.get("shape"), list)
                and isinstance(info.get("data_offsets"), list)
                and all(is_int(d) and 0 <= d <= hf.MAX_SIZE for d in info["shape"])
                and len(info["data_offsets"]) == 2 and all(map(is_int, info["data_offsets"]))):
            raise CheckpointError(f"{f}: tensor {name!r} has a malformed header entry "
                                  f"{str(info)[:200]} (expected dtype, shape of ints in "
                                  f"0..{hf.MAX_SIZE:,}, data_offsets [start, end])")
        shape = info["shape"]
        start, end = info["data_offsets"]
        if info["dtype"] in _ST_DTYPES:
            want = math.prod(shape) * np.dtype(_ST_DTYPES[info["dtype"]]).itemsize
            if end - start != want:
                raise CheckpointError(f"{f}: tensor {name!r} spans {end - start} bytes, expected "
                                      f"{want} for shape {tuple(shape)} in {info['dtype']}")
        if not 0 <= start <= end or base + end > size:
            raise CheckpointError(f"{f}: tensor {name!r} lies at bytes {base + start}..{base + end}"
                                  f" of a {size}-byte file: the file is truncated or corrupt")
        return start, end

    def names(self) -> list[str]:
        return list(self.index)

    def has(self, name) -> bool:
        return name in self.index

    def shape(self, name) -> tuple:
        return tuple(self.index[name][1]["shape"])

    def where(self, name) -> str:
        return self.index[name][0]

    def check(self, name) -> None:
        """Raises CheckpointError if `name`'s dtype cannot be read (header only)."""
        f, info, _ = self.index[name]
        if info["dtype"] not in _FLOAT_DTYPES:  # integers would silently become weights
            raise CheckpointError(f"{f}: tensor {name!r} has dtype {info['dtype']}, expected one "
                                  f"of {list(_FLOAT_DTYPES)}")

    def get(self, name) -> np.ndarray:
        self.check(name)
        f, info, base = self.index[name]
        if f not in self._maps:
            self._maps[f] = np.memmap(f, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        buf = self._maps[f][base + start: base + end]
        return buf.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


class _GGUFSource:
    def __init__(self, ckpt):
        self.ckpt = ckpt
        self._names = set(ckpt.tensor_names())

    def names(self):
        return self.ckpt.tensor_names()

    def has(self, name):
        return name in self._names

    def shape(self, name):
        return tuple(self.ckpt.tensor_shape(name))

    def where(self, name):
        return self.ckpt.path

    def check(self, name) -> None:  # tensor types are checked when the file is opened
        pass

    def get(self, name):
        return self.ckpt.get_tensor(name)

    def get_raw(self, name):
        return self.ckpt.get_raw(name)


def _open(path: str):
    """(hf config dict, tensor source, description) for a folder or a .gguf file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder; expected a Hugging Face model "
                                f"folder (config.json + *.safetensors) or a .gguf file")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise CheckpointError(f"{path}: a file must be a .gguf; for safetensors give the "
                                  f"folder holding config.json")
        from zo2_jax.models.gguf import read_gguf

        ckpt = read_gguf(path)
        return ckpt.hf_config, _GGUFSource(ckpt), path
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json in this folder")
    config = _read_json(cfg_path)
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        weight_map = _read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) and v and os.path.basename(v) == v and not v.startswith(".")
                for v in weight_map.values()):
            raise CheckpointError(f"{index}: its weight_map should map tensor names to file names "
                                  f"in this folder")
        files = sorted({os.path.join(path, f) for f in weight_map.values()})
    elif os.path.exists(single):
        files = [single]
    else:
        found = sorted(os.listdir(path))
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              f"(found {found}); convert .bin checkpoints to safetensors first")
    return config, _Safetensors(files), path


def _read_json(path: str):
    if os.path.getsize(path) > _MAX_HEADER:
        raise CheckpointError(f"{path}: {os.path.getsize(path):,} bytes, too large for a JSON "
                              f"config (limit {_MAX_HEADER:,})")
    with open(path, "rb") as fh:
        return _load_json(fh.read(), path)


def _expect(source, hf_name: str, how, expected_shape: tuple, where: str) -> None:
    """Checks, from the headers alone, that `hf_name` exists, can be read and becomes a leaf of
    `expected_shape` under `how`."""
    if not source.has(hf_name):
        raise CheckpointError(f"{where}: missing tensor {hf_name!r} (expected shape "
                              f"{_hf_shape(how, expected_shape)})")
    shape = tuple(source.shape(hf_name))
    if how == "T":
        shape = tuple(reversed(shape))
    elif isinstance(how, tuple) and how[0] == "qkv" and shape:  # q, k, v: equal thirds
        shape = shape[:-1] + ((shape[-1] // 3,) if shape[-1] % 3 == 0 else (None,))
    if shape != tuple(expected_shape):
        raise CheckpointError(f"{source.where(hf_name)}: tensor {hf_name!r} has shape "
                              f"{source.shape(hf_name)}, expected {_hf_shape(how, expected_shape)}")
    source.check(hf_name)


def _convert(source, hf_name: str, how, expected_shape: tuple, dtype, where: str,
             quantized: bool = False):
    _expect(source, hf_name, how, expected_shape, where)
    if quantized and how == "T" and len(expected_shape) == 2:
        got = source.get_raw(hf_name)
        if got is not None:  # a [out, in] weight in a block format: its bytes, as stored
            raw, qtype = got
            return QArray(raw, qtype, tuple(reversed(expected_shape)), True)
    x = source.get(hf_name)
    if how == "T":
        x = x.T
    elif isinstance(how, tuple) and how[0] == "qkv":
        n = x.shape[-1] // 3
        x = x[..., how[1] * n:(how[1] + 1) * n]
    if tuple(x.shape) != tuple(expected_shape):  # the data disagrees with its own header
        raise CheckpointError(f"{source.where(hf_name)}: tensor {hf_name!r} read as shape "
                              f"{tuple(x.shape)}, expected {tuple(expected_shape)}")
    return np.asarray(x, dtype=dtype)


def _hf_shape(how, shape):
    if how == "T":
        return tuple(reversed(shape))
    if isinstance(how, tuple):
        return tuple(shape[:-1]) + (3 * shape[-1],)
    return tuple(shape)


def _fill(spec, shapes, source, dtype, where, used: set, read: bool = True,
          quantized: bool = False):
    """The tree of `spec`'s tensors, converted; with read=False only their header checks;
    `quantized`: block-quantised weights kept as QArray (see `load(keep_quantized=True)`)."""
    if isinstance(spec, dict):
        return {k: _fill(spec[k], shapes[k], source, dtype, where, used, read, quantized)
                for k in spec}
    name, how = spec
    used.add(name)
    if not read:
        return _expect(source, name, how, shapes.shape, where)
    return _convert(source, name, how, shapes.shape, dtype, where, quantized)


class _BlockReader:
    """A block of a checkpoint read when called (see `load(lazy_blocks=True)`)."""

    def __init__(self, i, spec, shapes, source, dtype, where, placement, quantized=False):
        self._args = (i, spec, shapes, source, dtype, where, placement, quantized)

    def __call__(self):
        i, spec, shapes, source, dtype, where, placement, quantized = self._args
        return _place(placement, i, _fill(spec, shapes, source, dtype, where, set(),
                                          quantized=quantized))

    def __repr__(self):
        return f"<block {self._args[0]} of {self._args[5]}, read when called>"


def _place(placement: Placement, i, tree):
    if placement is None:
        return jax.device_put(tree)
    if callable(placement) and not isinstance(placement, jax.sharding.Sharding):
        return placement(i, tree)
    return jax.device_put(tree, placement)


def load(path: str, dtype=jnp.float32, *, compute_dtype=None, attn_impl: str = "xla",
         place_block: Placement = None, place_outer: Placement = None,
         lazy_blocks: bool = False, keep_quantized: bool = False):
    """Load a model and its parameters from a Hugging Face folder or a GGUF file.

    Args:
      path: folder with config.json and model.safetensors (or a sharded index), or a .gguf file.
      dtype: dtype the parameters are stored in.
      compute_dtype: dtype the stages compute in (defaults to `dtype`).
      attn_impl: "xla" or "cudnn" (see Model).
      place_block: where each block goes: a Sharding, or a function (index, tree) -> tree.
      place_outer: where the outer parameters go (Sharding or function (-1, tree) -> tree).
      lazy_blocks: return each block as a zero-argument callable that reads (and places) it when
        called, for the engines, which call each once and keep only their encoded copy: no
        full-precision copy of the whole model exists anywhere. Every tensor's presence, shape
        and dtype is still checked here, from the headers; the files must stay in place until
        the engine has been built.
      keep_quantized: a GGUF file only: each block matrix the file stores in a block format
        (Q4_1, Q8_0, Q4_K, ...) stays in it, as a `quant.QArray` of its bytes, expanded on the
        device where the block runs; for a frozen base (`LoRAModel`), which is never updated.

    Returns:
      (model, params) with params = {"outer": dict, "blocks": [dict or callable, ...]}.
    """
    config, source, where = _open(path)
    if keep_quantized and not hasattr(source, "get_raw"):
        raise ValueError(f"keep_quantized reads a GGUF file's quantised blocks; {where} is a "
                         f"Hugging Face folder: quantise its blocks with "
                         f"LoRAModel.quantize_base(params, qtype) instead")
    cfg = hf.config_from_hf(config, where)
    adapter = hf.ADAPTERS[cfg.model_type]
    names = set(source.names())
    prefix = next((p for p in adapter.prefixes if any(n.startswith(p) for n in names
                                                        if "embed" in n or "wte" in n)),
                  adapter.prefixes[0])
    outer_spec, block_spec = adapter.tables(cfg, prefix)
    model = Model(cfg, compute_dtype or dtype, attn_impl, source=os.fspath(path))
    used: set[str] = set()
    outer = _fill(outer_spec, model.outer_shapes(), source, dtype, where, used)
    if cfg.tie_embeddings:  # some checkpoints also store the tied head; it must be the same
        used.update(n for n in names if n in ("lm_head.weight",))
    outer = _place(place_outer, -1, outer)
    shapes = model.block_shapes()
    if lazy_blocks:
        for i in range(cfg.num_layers):
            _fill(block_spec(i), shapes, source, dtype, where, used, read=False)
    else:
        blocks = [_place(place_block, i, _fill(block_spec(i), shapes, source, dtype, where, used,
                                               quantized=keep_quantized))
                  for i in range(cfg.num_layers)]
    unexpected = sorted(n for n in names - used if not any(s in n for s in adapter.ignored))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensors for {cfg.model_type} with "
                              f"{cfg.num_layers} layers: {unexpected[:10]}"
                              f"{' ...' if len(unexpected) > 10 else ''}")
    if lazy_blocks:
        blocks = [_BlockReader(i, block_spec(i), shapes, source, dtype, where, place_block,
                               keep_quantized) for i in range(cfg.num_layers)]
    return model, {"outer": outer, "blocks": blocks}


def load_tokenizer(path: str):
    """The tokenizer of a Hugging Face folder (AutoTokenizer, local files only) or GGUF file."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        from zo2_jax.models.gguf import read_gguf

        return read_gguf(path).tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata=None):
    header, offset = {}, 0
    for name, x in tensors.items():
        n = x.nbytes
        header[name] = {"dtype": _ST_NAMES[x.dtype], "shape": list(x.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for x in tensors.values():
            fh.write(np.ascontiguousarray(x).tobytes())
    os.replace(tmp, path)  # a killed export never leaves a truncated file under the real name


def hf_state_dict(model: Model, params, dtype=None) -> dict[str, np.ndarray]:
    """Our parameters as Hugging Face-named numpy arrays (host copies, one at a time)."""
    cfg = model.config
    adapter = hf.ADAPTERS[cfg.model_type]
    outer_spec, block_spec = adapter.tables(cfg, adapter.prefixes[0])
    out: dict[str, Any] = {}

    def add(spec, tree):
        for path, (name, how) in hf._flatten(spec):
            x = tree
            for p in path:
                x = x[p]
            x = np.asarray(jax.device_get(x))
            if dtype is not None:
                x = x.astype(dtype)
            if how == "T":
                out[name] = np.ascontiguousarray(x.T)
            elif isinstance(how, tuple):
                out.setdefault(name, [None] * 3)[how[1]] = x
            else:
                out[name] = x

    add(outer_spec, params["outer"])
    for i, bp in enumerate(params["blocks"]):
        add(block_spec(i), bp)
    return {k: (np.concatenate(v, axis=-1) if isinstance(v, list) else v) for k, v in out.items()}


def save_pretrained(model: Model, params, out_dir: str, *, dtype=None,
                    max_shard_bytes: int = 5 * 2 ** 30, tokenizer=None):
    """Write config.json and safetensors (sharded past `max_shard_bytes`) for transformers,
    and the tokenizer: `tokenizer`, or else the one of the file or folder the model was loaded
    from (`model.source`); without either, a warning says that the folder has none.

    Call `engine.flush()` first when the parameters come from a training engine.
    """
    os.makedirs(out_dir, exist_ok=True)
    tensors = hf_state_dict(model, params, dtype)
    config = hf.config_to_hf(model.config)
    first = next(iter(tensors.values()))
    config["torch_dtype"] = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                             np.dtype(jnp.bfloat16): "bfloat16"}.get(first.dtype, "float32")
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        if cur and size + v.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.nbytes
    shards.append(cur)
    meta = {"format": "pt"}
    if len(shards) == 1:
        _write_safetensors(os.path.join(out_dir, "model.safetensors"), shards[0], meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(os.path.join(out_dir, fname), shard, meta)
            weight_map.update({k: fname for k in shard})
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                       "weight_map": weight_map}, fh, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    if tokenizer is None and model.source is not None:
        try:
            tokenizer = load_tokenizer(model.source)
        except Exception as e:  # noqa: BLE001 - a model folder without a tokenizer is valid
            warnings.warn(f"{out_dir}: no tokenizer written: {model.source} has none that loads "
                          f"({type(e).__name__}: {e}); pass tokenizer=", stacklevel=2)
    elif tokenizer is None:
        warnings.warn(f"{out_dir}: no tokenizer written (the model was not loaded from a file): "
                      f"pass tokenizer= for a folder that AutoTokenizer loads", stacklevel=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
