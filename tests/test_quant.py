"""zo2_jax.models.quant: llama.cpp's block quantisations dequantised with jax, against the `gguf`
package's numpy dequantisation: random blocks of every type, and the shipped SmolLM2 GGUF."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zo2_jax.models.quant import (BLOCKS, QArray, dense, dequantize, nbytes, quantize,
                                  quantize_kernels, quantize_on_device)

QUANTS = [t for t in BLOCKS if t not in ("F32", "F16", "BF16")]


def _random_bytes(qtype, shape, seed):
    """Random blocks with finite float16 scales (random bytes, then each block's f16 fields
    overwritten with small random normal values)."""
    size, tsize = BLOCKS[qtype]
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape)) // size
    b = rng.integers(0, 256, (n, tsize), dtype=np.uint8)
    f16 = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
           "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [tsize - 2]}[qtype]
    for at in f16:
        b[:, at:at + 2] = (rng.standard_normal(n) * 0.01).astype(np.float16).view(
            np.uint8).reshape(n, 2)
    return b.reshape(-1)


@pytest.mark.parametrize("qtype", QUANTS)
def test_every_type_is_the_gguf_packages_dequantisation(qtype):
    size = BLOCKS[qtype][0]
    shape = (3, 2 * size)
    raw = _random_bytes(qtype, shape, seed=len(qtype))
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(shape)
    got = jax.jit(dequantize, static_argnums=(1, 2))(jnp.asarray(raw), qtype, shape)
    assert got.dtype == jnp.float32 and got.shape == shape
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32),
                                  np.asarray(want, np.float32).view(np.uint32))


@pytest.mark.parametrize("qtype,np_dtype", [("F32", np.float32), ("F16", np.float16)])
def test_float_types_are_the_bytes_reinterpreted(qtype, np_dtype):
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np_dtype)
    got = dequantize(jnp.asarray(x.view(np.uint8).reshape(-1)), qtype, x.shape)
    np.testing.assert_array_equal(np.asarray(got), x.astype(np.float32))
    bf = dequantize(jnp.asarray(np.array([0x80, 0x3F], np.uint8)), "BF16", (1,))
    assert float(bf[0]) == 1.0  # 0x3F80, little-endian


def test_bad_input_names_what_was_expected():
    with pytest.raises(ValueError, match="unsupported quantisation 'Q2_K'"):
        dequantize(jnp.zeros(84, jnp.uint8), "Q2_K", (256,))
    with pytest.raises(ValueError, match="last axis must be a multiple of 32"):
        nbytes("Q8_0", (4, 33))
    with pytest.raises(ValueError, match=r"a Q8_0 tensor of shape \(2, 32\) is 68 bytes of "
                                         r"uint8, got 67 of uint8"):
        dequantize(jnp.zeros(67, jnp.uint8), "Q8_0", (2, 32))
    with pytest.raises(ValueError, match="got 68 of int8"):
        dequantize(jnp.zeros(68, jnp.int8), "Q8_0", (2, 32))
    assert nbytes("Q4_K", (2, 512)) == 4 * 144


@pytest.mark.slow
def test_the_shipped_smollm2_tensors():
    """Every tensor of the shipped SmolLM2 GGUF, as the file stores it, dequantised on the device
    equals the gguf package's dequantisation."""
    from zo2_jax.models.gguf import smollm2_gguf_path

    reader = gguf.GGUFReader(smollm2_gguf_path())
    seen = set()
    for t in reader.tensors:
        qtype = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # numpy order
        if qtype in seen and len(seen) > 1 and not t.name.startswith("blk.0."):
            continue  # every type once, and all of block 0
        seen.add(qtype)
        want = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
        got = np.asarray(dequantize(jnp.asarray(raw), qtype, shape))
        np.testing.assert_array_equal(got.view(np.uint32), want.reshape(shape).view(np.uint32),
                                      err_msg=t.name)
    assert "Q4_1" in seen


@pytest.mark.parametrize("qtype,bits", [("Q8_0", 8), ("Q4_0", 4), ("Q4_1", 4), ("Q5_0", 5),
                                        ("Q5_1", 5)])
def test_quantize_then_dequantize_on_the_device(qtype, bits):
    """Float values made into blocks on the host (per 32 values: a scale, and a minimum for the
    _1 types) come back within a step of their block's grid, in the bytes nbytes names."""
    x = np.random.default_rng(1).standard_normal((8, 96)).astype(np.float32)
    q = quantize(x, qtype)
    assert q.dtype == np.uint8 and q.size == nbytes(qtype, x.shape)
    y = np.asarray(dequantize(jnp.asarray(q), qtype, x.shape))
    blocks = x.reshape(-1, 32)
    span = (np.abs(blocks).max(1) * 2 if qtype.endswith("_0") else np.ptp(blocks, 1))
    step = span / (2 ** bits - 1)
    err = np.abs(y - x).reshape(-1, 32).max(1)
    assert np.all(err <= step * 1.01 + 1e-6), (err / step).max()
    np.testing.assert_array_equal(y, gguf.quants.dequantize(q, gguf.GGMLQuantizationType[qtype]))


def test_quantize_refuses_what_it_cannot_make():
    with pytest.raises(ValueError, match="quantize makes Q8_0, Q4_0"):
        quantize(np.zeros((2, 256), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(np.zeros((2, 40), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.full((1, 32), np.nan, np.float32), "Q4_0")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantize_on_the_device_makes_the_gguf_packages_bytes(qtype):
    """Blocks of zeros, of ties at halves, of one value, of wide ranges: the same bytes."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 128)).astype(np.float32) * np.float32(3.0)
    x[0, :32] = 0.0
    x[1, :32] = np.arange(32, dtype=np.float32) * np.float32(0.5) - 8  # halves
    x[2, 32:64] = 1.25
    x[3, :32] *= 1e-4
    x[4] *= 1e4
    np.testing.assert_array_equal(np.asarray(jax.jit(quantize_on_device, static_argnums=1)(
        jnp.asarray(x), qtype)), quantize(x, qtype))
    with pytest.raises(ValueError, match="quantize_on_device makes Q8_0, Q4_0"):
        quantize_on_device(x, "Q5_1")


def test_a_qarray_is_a_transposed_kernel_in_gguf_bytes():
    """QArray.of(kernel [in, out]) stores kernel.T as a file stores a weight; value() gives the
    kernel back (stacked copies too); quantize_kernels replaces only the kernels that fit."""
    k = jnp.asarray(np.random.default_rng(3).standard_normal((64, 48)), jnp.float32)
    qa = QArray.of(k, "Q8_0")
    assert qa.raw.shape == (48, nbytes("Q8_0", (1, 64))) and qa.shape == (48, 64)
    np.testing.assert_array_equal(np.asarray(qa.raw), quantize(np.asarray(k).T, "Q8_0"))
    np.testing.assert_allclose(np.asarray(qa.value()), np.asarray(k), atol=0.05)
    two = jax.tree.map(lambda a: jnp.stack([a, a]), qa)
    assert two.value().shape == (2, 64, 48)
    tree = {"a": {"kernel": k, "bias": jnp.zeros(48)}, "b": {"kernel": jnp.zeros((40, 8))}}
    q = quantize_kernels(tree, "Q4_0")
    assert isinstance(q["a"]["kernel"], QArray) and q["a"]["kernel"].qtype == "Q4_0"
    assert q["a"]["bias"] is tree["a"]["bias"] and q["b"]["kernel"] is tree["b"]["kernel"]
    assert dense(q)["a"]["kernel"].shape == (64, 48)
    with pytest.raises(ValueError, match="is 3264 bytes of uint8"):
        QArray(jnp.zeros((2, 3), jnp.uint8), "Q8_0", (48, 64)).value()
