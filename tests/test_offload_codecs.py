"""Storage codecs: round-trip error bounds, unbiased and reproducible stochastic rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zo2_jax.offload import Int8Leaf, Storage

X = {"w": jax.random.normal(jax.random.key(0), (64, 32)) * 3.0,
     "b": jax.random.normal(jax.random.key(1), (32,)),
     "s": jnp.float32(0.7)}


def roundtrip(storage, tree, key=None):
    return jax.jit(lambda t, k: storage.decode(storage.encode(t, k)))(tree, key)


def test_float32_is_exact():
    out = roundtrip(Storage("float32", rounding="stochastic"), X, jax.random.key(0))
    for k in X:
        np.testing.assert_array_equal(out[k], X[k])


@pytest.mark.parametrize("dtype,rel", [("bfloat16", 2.0 ** -8), ("float16", 2.0 ** -10)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_half_precision_within_one_ulp(dtype, rel, rounding):
    """Nearest: |x - y| <= ulp/2; stochastic: < ulp (ulp <= 2^-7 |x| for bf16, 2^-10 for fp16)."""
    st = Storage(dtype, rounding=rounding)
    enc = st.encode(X, jax.random.key(3))
    assert enc["w"].dtype == jnp.dtype(dtype)
    out = st.decode(enc)
    bound = rel * (1.0 if rounding == "stochastic" else 0.5)
    for k in X:
        x = np.asarray(X[k], np.float64)
        err = np.abs(np.asarray(out[k], np.float64) - x)
        assert np.all(err <= 2 * bound * np.abs(x) + 1e-30), (k, float(np.max(err / np.abs(x))))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_int8_per_channel_error_and_vector_leaves(rounding):
    st = Storage("int8", rounding=rounding)
    enc = st.encode(X, jax.random.key(4))
    assert isinstance(enc["w"], Int8Leaf) and enc["w"].q.dtype == jnp.int8
    assert enc["w"].scale.shape == (1, 32)  # one scale per output channel (last axis)
    assert enc["b"].dtype == jnp.float32 and enc["s"].dtype == jnp.float32  # rank < 2: kept
    out = st.decode(enc)
    scale = np.max(np.abs(np.asarray(X["w"])), axis=0) / 127.0
    err = np.abs(np.asarray(out["w"]) - np.asarray(X["w"]))
    bound = (0.5 if rounding == "nearest" else 1.0) * scale * (1 + 1e-5)
    assert np.all(err <= bound[None, :]), float(np.max(err / scale))
    np.testing.assert_array_equal(out["b"], X["b"])
    assert Storage("int8", vector_dtype="bfloat16").encode(X)["b"].dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8"])
def test_stochastic_rounding_is_unbiased(dtype):
    """A value between two representable numbers: the mean of n roundings is within 5 standard
    errors (p*(1-p)*gap^2/n) of the value, while round-to-nearest is off by its bias."""
    st = Storage(dtype, rounding="stochastic")
    n = 20000
    # 1 + 0.3 ulp (bf16 ulp at 1 is 2^-7, fp16 2^-10); for int8 a channel (column) with absmax
    # 127 has scale 1, so 5.3 sits 0.3 of a step above 5.
    if dtype == "int8":
        x, gap = jnp.concatenate([jnp.full((1, 1), 127.0), jnp.full((n, 1), 5.3)]), 1.0
        take = lambda d: d[1:, 0]  # noqa: E731
        value = 5.3
    else:
        gap = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10
        value = 1.0 + 0.3 * gap
        x, take = jnp.full((n,), value, jnp.float32), (lambda d: d)
    value = float(np.float32(value))
    dec = np.asarray(take(st.decode(st.encode({"x": x}, jax.random.key(7)))["x"]), np.float64)
    # every rounding lands on one of the two neighbours
    np.testing.assert_allclose(np.unique(dec), [value - 0.3 * gap, value + 0.7 * gap],
                               rtol=0, atol=1e-3 * gap)
    stderr = np.sqrt(0.3 * 0.7 / n) * gap
    assert abs(dec.mean() - value) < 5 * stderr, (dec.mean() - value, stderr)
    nearest = np.asarray(take(Storage(dtype).decode(Storage(dtype).encode({"x": x}))["x"]))
    assert abs(nearest.mean() - value) > 0.25 * gap  # the bias stochastic rounding removes


def test_stochastic_rounding_is_keyed():
    st = Storage("bfloat16", rounding="stochastic")
    a, b = st.encode(X, jax.random.key(1)), st.encode(X, jax.random.key(1))
    c = st.encode(X, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a["w"]), np.asarray(b["w"]))
    assert not np.array_equal(np.asarray(a["w"]), np.asarray(c["w"]))
    # without a key (the initial encoding), rounding is to nearest
    np.testing.assert_array_equal(np.asarray(st.encode(X)["w"]),
                                  np.asarray(X["w"].astype(jnp.bfloat16)))


def test_small_updates_survive_stochastic_rounding_in_expectation():
    """DESIGN.md 'Precision': a 1e-4-relative update vanishes under bf16 round-to-nearest but is
    kept on average by stochastic rounding."""
    n = 20000
    x = jnp.ones((n,), jnp.float32)
    upd = x * (1 + 1e-4)
    nearest = Storage("bfloat16", rounding="nearest")
    near = nearest.decode(nearest.encode({"x": upd}))["x"]
    st = Storage("bfloat16", rounding="stochastic")
    sr = st.decode(st.encode({"x": upd}, jax.random.key(0)))["x"]
    assert float(jnp.mean(near)) == 1.0
    assert abs(float(jnp.mean(sr)) - (1 + 1e-4)) < 5 * np.sqrt(0.0128 * 0.9872 / n) * 2 ** -7


def test_storage_validation_and_sizes():
    with pytest.raises(ValueError, match="dtype"):
        Storage("int4")
    with pytest.raises(ValueError, match="rounding"):
        Storage("bfloat16", rounding="up")
    assert Storage("float32").nbytes(X) == 4 * (64 * 32 + 32 + 1)
    assert Storage("bfloat16").nbytes(X) == 2 * (64 * 32 + 32 + 1)
    assert Storage("int8").nbytes(X) == 64 * 32 + 4 * 32 + 4 * (32 + 1)
