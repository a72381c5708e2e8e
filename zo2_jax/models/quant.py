"""llama.cpp's block quantisations (GGUF), dequantised on the device.

A GGUF tensor of a block-quantised type is a row-major run of fixed-size blocks: each block holds
`block_size` consecutive values of a row in `type_size` bytes (scales, minimums and packed
integers). `dequantize(raw, qtype, shape)` turns such bytes, as a uint8 jax array, into float32
values with jax operations, so the bytes can be uploaded as they are (a quarter to a half of
bf16's) and expanded on the device just before use. Each kernel follows the dequantisation of
the `gguf` package (`gguf.quants`), which `tests/test_quant.py` holds it to, bit for bit.

    raw = jnp.asarray(reader_tensor.data)                      # uint8, as stored in the file
    w = dequantize(raw, "Q4_K", (4096, 4096))                  # float32 on the device

Types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (blocks of 32) and Q4_K, Q5_K, Q6_K (super-blocks of 256),
plus F32, F16 and BF16 (a reinterpretation of the bytes). `quantize` makes Q8_0 (8 bits with a
float16 scale per 32 values), Q4_0, Q4_1, Q5_0 and Q5_1 bytes from float values on the host
(with the `gguf` package, as llama.cpp's converter does), so a Hugging Face checkpoint can be
held in the same formats.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# qtype -> (values per block, bytes per block), as llama.cpp defines them
BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
          "Q5_1": (32, 24), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
          "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2)}
QK_K = 256


def nbytes(qtype: str, shape) -> int:
    """Bytes of a tensor of `shape` stored as `qtype` (the last axis a multiple of its block)."""
    size, tsize = _block(qtype)
    n = math.prod(shape)
    if not shape or shape[-1] % size:
        raise ValueError(f"a {qtype} tensor's last axis must be a multiple of {size}, got shape "
                         f"{tuple(shape)}")
    return n // size * tsize


def _block(qtype: str) -> tuple:
    if qtype not in BLOCKS:
        raise ValueError(f"unsupported quantisation {qtype!r}; supported: {', '.join(BLOCKS)}")
    return BLOCKS[qtype]


def _f16(b: jax.Array) -> jax.Array:
    """float32 [n, 1] from little-endian float16 bytes [n, 2]."""
    return jax.lax.bitcast_convert_type(b, jnp.float16).astype(jnp.float32)[:, None]


def _nibbles(qs: jax.Array, group: int) -> jax.Array:
    """The 4-bit values of `qs` [n, m * group / 2 ...] as llama.cpp lays them out: in each run of
    `group` / 2 bytes, the low nibbles give the first `group` / 2 values, the high ones the
    next. Returns uint8 [n, -1]."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, group // 2) >> jnp.array([0, 4], jnp.uint8).reshape(1, 1, 2, 1)
    return (qs & 0x0F).reshape(n, -1)


def _high_bits(qh: jax.Array, n: int) -> jax.Array:
    """Q5_0 / Q5_1: bit i of the little-endian uint32 `qh` [n, 4] as uint8 [n, 32]."""
    word = jax.lax.bitcast_convert_type(qh.reshape(n, 4), jnp.uint32).reshape(n, 1)
    return ((word >> jnp.arange(32, dtype=jnp.uint32).reshape(1, 32)) & 1).astype(jnp.uint8)


def _scale_min_k4(scales: jax.Array) -> tuple:
    """Q4_K / Q5_K: the 8 six-bit scales and minimums packed in 12 bytes [n, 12]."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(jnp.float32), mn.astype(jnp.float32)


def _q8_0(b):
    return b[:, 2:].view(jnp.int8).astype(jnp.float32) * _f16(b[:, :2])


def _q4_0(b):
    q = _nibbles(b[:, 2:], 32).astype(jnp.int8) - jnp.int8(8)
    return _f16(b[:, :2]) * q.astype(jnp.float32)


def _q4_1(b):
    q = _nibbles(b[:, 4:], 32).astype(jnp.float32)
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q5_0(b):
    q = (_nibbles(b[:, 6:], 32) | (_high_bits(b[:, 2:6], b.shape[0]) << 4)).astype(jnp.int8)
    return _f16(b[:, :2]) * (q - jnp.int8(16)).astype(jnp.float32)


def _q5_1(b):
    q = (_nibbles(b[:, 8:], 32) | (_high_bits(b[:, 4:8], b.shape[0]) << 4)).astype(jnp.float32)
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q4_k(b):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn).reshape(n, -1, 1)
    q = _nibbles(b[:, 16:], 64).reshape(n, -1, 32).astype(jnp.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn).reshape(n, -1, 1)
    qh, qs = b[:, 16:16 + QK_K // 8], b[:, 16 + QK_K // 8:]
    ql = _nibbles(qs, 64).reshape(n, -1, 32)
    hi = (qh.reshape(n, 1, 32) >> jnp.arange(8, dtype=jnp.uint8).reshape(1, 8, 1)) & 1
    q = (ql | (hi << 4)).astype(jnp.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, :QK_K // 2], b[:, QK_K // 2:QK_K // 2 + QK_K // 4]
    scales = b[:, QK_K // 2 + QK_K // 4:QK_K // 2 + QK_K // 4 + QK_K // 16]
    d = _f16(b[:, -2:]) * scales.view(jnp.int8).astype(jnp.float32)
    low = _nibbles(ql, 128).reshape(n, -1, 32)
    high = ((qh.reshape(n, -1, 1, 32) >> jnp.array([0, 2, 4, 6], jnp.uint8).reshape(1, 1, 4, 1))
            & 0x03).reshape(n, -1, 32)
    q = (low | (high << 4)).astype(jnp.int8) - jnp.int8(32)
    return (d.reshape(n, QK_K // 16, 1) * q.reshape(n, QK_K // 16, -1).astype(jnp.float32)
            ).reshape(n, QK_K)


_KERNELS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
            "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(raw: jax.Array, qtype: str, shape, dtype=jnp.float32) -> jax.Array:
    """The values of a tensor of `shape` stored as `qtype` in the bytes `raw` (uint8, any shape
    holding exactly `nbytes(qtype, shape)` bytes), as `dtype`. Traceable: use it inside jit."""
    shape = tuple(int(d) for d in shape)
    size, tsize = _block(qtype)
    want = nbytes(qtype, shape)
    if raw.dtype != jnp.uint8 or raw.size != want:
        raise ValueError(f"a {qtype} tensor of shape {shape} is {want} bytes of uint8, got "
                         f"{raw.size} of {raw.dtype}")
    if qtype in ("F32", "F16", "BF16"):
        kind = {"F32": jnp.float32, "F16": jnp.float16, "BF16": jnp.bfloat16}[qtype]
        values = jax.lax.bitcast_convert_type(raw.reshape(-1, tsize), kind)
        return values.reshape(shape).astype(dtype)
    values = _KERNELS[qtype](raw.reshape(-1, tsize))
    return values.reshape(shape).astype(dtype)


QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def quantize(x, qtype: str) -> np.ndarray:
    """The bytes (uint8, one row of blocks per row of `x`) of float values `x` (numpy, last axis
    a multiple of 32) stored as `qtype`, one of QUANTIZABLE, made on the host by the `gguf`
    package. `dequantize(jnp.asarray(q), qtype, x.shape)` expands them again."""
    import gguf

    if qtype not in QUANTIZABLE:
        raise ValueError(f"quantize makes {', '.join(QUANTIZABLE)}; got {qtype!r}")
    x = np.asarray(x, np.float32)
    nbytes(qtype, x.shape)  # checks the last axis
    if not np.all(np.isfinite(x)):
        raise ValueError(f"cannot quantize non-finite values to {qtype}")
    return np.ascontiguousarray(gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype]))


def _roundf(x):
    """llama.cpp's roundf: halves away from zero (as `gguf.quants.np_roundf`)."""
    a = jnp.abs(x)
    floored = jnp.floor(a)
    return jnp.sign(x) * (floored + jnp.floor(2 * (a - floored)))


def _f16_bytes(d):
    """float32 [n, 1] -> its float16's little-endian bytes [n, 2]."""
    return jax.lax.bitcast_convert_type(d.astype(jnp.float16), jnp.uint8).reshape(-1, 2)


def quantize_on_device(x: jax.Array, qtype: str) -> jax.Array:
    """`quantize` with jax operations (traceable, on the device), for Q8_0 and Q4_0: the same
    bytes as the `gguf` package makes (tests/test_quant.py holds it to them), as uint8
    [rows, row bytes] for `x` [rows, cols]."""
    if qtype not in DEVICE_QUANTIZABLE:
        raise ValueError(f"quantize_on_device makes {', '.join(DEVICE_QUANTIZABLE)}; got {qtype!r}")
    x = jnp.asarray(x, jnp.float32)
    shape = x.shape
    nbytes(qtype, shape)  # checks the last axis
    blocks = x.reshape(-1, 32)
    if qtype == "Q8_0":
        d = jnp.max(jnp.abs(blocks), axis=1, keepdims=True) / 127
    else:  # Q4_0: the scale from the value of largest magnitude, with its sign
        imax = jnp.argmax(jnp.abs(blocks), axis=-1, keepdims=True)
        d = jnp.take_along_axis(blocks, imax, axis=-1) / -8
    inv = jnp.where(d == 0, 0.0, 1 / jnp.where(d == 0, 1.0, d))  # 1 / d, 0 for an all-zero block
    if qtype == "Q8_0":
        qs = jax.lax.bitcast_convert_type(_roundf(blocks * inv).astype(jnp.int8), jnp.uint8)
    else:
        q = jnp.clip(jnp.trunc(blocks * inv + jnp.float32(8.5)).astype(jnp.uint8), 0, 15)
        q = q.reshape(-1, 2, 16)
        qs = q[:, 0] | (q[:, 1] << 4)
    out = jnp.concatenate([_f16_bytes(d), qs], axis=1)
    return out.reshape(shape[:-1] + (-1,))


DEVICE_QUANTIZABLE = ("Q8_0", "Q4_0")


@dataclasses.dataclass(frozen=True)
class QArray:
    """A matrix kept in a GGUF block format: `raw` (uint8 [rows, row bytes], as stored in a
    GGUF file; any leading axes stack several) holds the matrix of `shape` [rows, cols], whose
    rows run along the quantisation blocks. `value()` is that matrix dequantised, transposed
    when `transpose` (a [out, in] weight as files store it, used as an [in, out] kernel).

    A pytree whose only child is `raw`: it travels (device_put, packing, stacking) as the bytes
    and is expanded on the device only where it is used. For a frozen base (`LoRAModel`):
    `zo2_jax.core.storage.Storage.decode` expands it; nothing ever encodes or updates it."""

    raw: jax.Array
    qtype: str
    shape: tuple
    transpose: bool = True

    @classmethod
    def of(cls, kernel, qtype: str) -> "QArray":
        """An [in, out] kernel quantised as its transpose (rows along `in`, as llama.cpp and
        GGUF files store a weight), on the device for DEVICE_QUANTIZABLE types (traceable),
        else on the host (`quantize`)."""
        n_in, n_out = kernel.shape
        if qtype in DEVICE_QUANTIZABLE:
            raw = quantize_on_device(jnp.asarray(kernel).T, qtype)
        else:
            raw = quantize(np.asarray(kernel, np.float32).T, qtype)
        return cls(raw, qtype, (int(n_out), int(n_in)), True)

    def value(self, dtype=jnp.float32) -> jax.Array:
        """The dequantised matrix (leading axes of `raw` kept), as `dtype` (traceable)."""
        w = dequantize(self.raw, self.qtype, self.raw.shape[:-2] + tuple(self.shape), dtype)
        return jnp.swapaxes(w, -1, -2) if self.transpose else w


jax.tree_util.register_dataclass(QArray, data_fields=["raw"],
                                 meta_fields=["qtype", "shape", "transpose"])


def is_qarray(x) -> bool:
    return isinstance(x, QArray)


def dense(tree, dtype=jnp.float32):
    """`tree` with every QArray replaced by its value (other leaves as they are)."""
    return jax.tree.map(lambda x: x.value(dtype) if isinstance(x, QArray) else x, tree,
                        is_leaf=is_qarray)


def quantize_kernels(tree, qtype: str):
    """`tree` (one block's parameters) with every "kernel" leaf whose rows fit `qtype`'s blocks
    (`in` a multiple of 32 or 256) replaced by its QArray; biases, norm scales and other leaves
    as they are. Traceable for DEVICE_QUANTIZABLE types."""
    size, _ = _block(qtype)

    def one(path, x):
        name = getattr(path[-1], "key", None) if path else None
        if name == "kernel" and np.ndim(x) == 2 and x.shape[0] % size == 0:
            return QArray.of(x, qtype)
        return x
    return jax.tree_util.tree_map_with_path(one, tree)


__all__ = ["BLOCKS", "DEVICE_QUANTIZABLE", "QUANTIZABLE", "QArray", "dense", "dequantize",
           "nbytes", "quantize", "quantize_kernels", "quantize_on_device"]
