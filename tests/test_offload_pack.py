"""Packed blocks: a pytree as one uint32 buffer, bit for bit, on the device and on the host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zo2_jax.offload._pack import ALIGN_WORDS, Layout, Packing
from zo2_jax.core.storage import Int8Leaf


def _tree():
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "w_bf16": jax.random.normal(k[0], (7, 5)).astype(jnp.bfloat16),   # odd element count
        "q": Int8Leaf(jax.random.randint(k[1], (3, 11), -127, 128).astype(jnp.int8),
                      jax.random.uniform(k[2], (1, 11))),                 # 33 int8: padded word
        "b": jax.random.normal(k[3], (9,)),
        "scalar": jnp.array(3, jnp.int32),
        "f16": jnp.arange(3, dtype=jnp.float16),
        "none": jnp.zeros((0, 4), jnp.bfloat16),                          # zero-size leaf
        "flag": jnp.array([1, 0, 255], jnp.uint8),
        "finite": jnp.array([True, False, True, True, False]),              # bool (optax state)
    }


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_round_trip_device_and_host_bit_for_bit():
    tree = _tree()
    lay = Layout.of(tree)
    assert all(lf.offset % ALIGN_WORDS == 0 for lf in lay.leaves)
    flat = jax.jit(lay.pack)(tree)
    assert flat.dtype == jnp.uint32 and flat.shape == (lay.words,) and lay.nbytes == 4 * lay.words
    back = jax.jit(lay.unpack)(flat)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    assert _bits(back) == _bits(tree)
    host = lay.unpack_host(jax.device_put(flat, jax.sharding.SingleDeviceSharding(
        jax.devices()[0], memory_kind="pinned_host")))
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
    assert _bits(host) == _bits(tree)
    assert [x.dtype for x in jax.tree.leaves(host)] == [x.dtype for x in jax.tree.leaves(tree)]


def test_layout_is_static_and_checks_its_tree():
    tree = _tree()
    lay = Layout.of(tree)
    assert hash(lay) == hash(Layout.of(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)))
    bad = dict(tree, b=jnp.zeros((8,)))
    with pytest.raises(ValueError, match="does not match the packed layout"):
        lay.pack(bad)
    with pytest.raises(ValueError, match=r"expected a uint32\[\d+\] packed buffer"):
        lay.unpack_host(np.zeros((3,), np.uint32))
    with pytest.raises(ValueError, match="only 1-, 2- and 4-byte"):
        Layout.of({"x": np.zeros(3, np.float64)})
    with pytest.raises(ValueError, match="only numeric and bool arrays"):
        Layout.of({"k": jax.random.key(0)})


def test_packing_keeps_an_empty_optimizer_state_as_is():
    tree = _tree()
    p = Packing.of(tree, ())
    flat, opt = jax.jit(p.pack)(tree, ())
    assert opt == () and p.opt.empty
    stored, opt = p.unpack(flat, ())
    assert _bits(stored) == _bits(tree) and opt == ()
    assert jax.tree.structure(p.abstract()[0]) == jax.tree.structure(tree)
