"""Bad input to the model loader: each error names the file, the tensor and expected vs found."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zo2_jax.models as zm
from zo2_jax.models.io import _write_safetensors


def _tiny_opt(tmp_path, **over):
    cfg = zm.DecoderConfig(model_type="opt", vocab_size=50, hidden_size=32, num_layers=2,
                           num_heads=4, intermediate_size=48, max_positions=32,
                           position_offset=2, **over)
    model = zm.Model(cfg)
    params = model.init(jax.random.key(0))
    out = zm.save_pretrained(model, params, str(tmp_path / "m"))
    return model, params, out


def _tensors(path):
    from zo2_jax.models.io import _Safetensors

    src = _Safetensors([path + "/model.safetensors"])
    return {n: np.array(src.get(n)) for n in src.names()}


def _edit_header(path, edit):
    """Rewrites a safetensors file's header with edit(header), keeping its data bytes."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header, data = json.loads(fh.read(n)), fh.read()
    edit(header)
    blob = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob + data)


def test_round_trip_of_random_model(tmp_path):
    model, params, out = _tiny_opt(tmp_path)
    m2, p2 = zm.load(out)
    assert m2.config.replace(extra=()) == model.config.replace(extra=())
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="nope"):
        zm.load("/tmp/definitely/nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(zm.CheckpointError, match="no config.json"):
        zm.load(str(tmp_path))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    with pytest.raises(zm.CheckpointError, match="no model.safetensors"):
        zm.load(str(tmp_path))


def test_unsupported_model_type(tmp_path):
    _, _, out = _tiny_opt(tmp_path)
    cfg = json.load(open(out + "/config.json"))
    cfg["model_type"] = "mamba"
    json.dump(cfg, open(out + "/config.json", "w"))
    with pytest.raises(zm.UnsupportedModelError, match="'mamba'.*supported"):
        zm.load(out)


def test_unsupported_rope_scaling():
    with pytest.raises(zm.UnsupportedModelError, match="yarn"):
        zm.config_from_hf({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4,
                           "num_hidden_layers": 1, "vocab_size": 10, "intermediate_size": 8,
                           "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_missing_config_field(tmp_path):
    with pytest.raises(ValueError, match="hidden_size"):
        zm.config_from_hf({"model_type": "llama", "num_attention_heads": 4})


@pytest.mark.parametrize("lazy", [False, True])
def test_missing_tensor(tmp_path, lazy):
    _, _, out = _tiny_opt(tmp_path)
    t = _tensors(out)
    name = "model.decoder.layers.1.fc2.weight"
    del t[name]
    _write_safetensors(out + "/model.safetensors", t)
    with pytest.raises(zm.CheckpointError, match=r"missing tensor 'model.decoder.layers.1.fc2"
                                                 r".weight' \(expected shape \(32, 48\)\)"):
        zm.load(out, lazy_blocks=lazy)  # lazily: at load, not when the engine reads block 1


@pytest.mark.parametrize("lazy", [False, True])
def test_unexpected_tensor(tmp_path, lazy):
    _, _, out = _tiny_opt(tmp_path)
    t = _tensors(out)
    t["model.decoder.layers.2.fc1.weight"] = np.zeros((48, 32), np.float32)
    _write_safetensors(out + "/model.safetensors", t)
    with pytest.raises(zm.CheckpointError, match="unexpected tensors.*layers.2.fc1"):
        zm.load(out, lazy_blocks=lazy)


@pytest.mark.parametrize("lazy", [False, True])
def test_shape_mismatch(tmp_path, lazy):
    _, _, out = _tiny_opt(tmp_path)
    t = _tensors(out)
    t["model.decoder.layers.1.self_attn.k_proj.weight"] = np.zeros((16, 32), np.float32)
    _write_safetensors(out + "/model.safetensors", t)
    with pytest.raises(zm.CheckpointError,
                       match=r"model.safetensors: tensor 'model.decoder.layers.1.self_attn.k_proj"
                             r".weight' has shape \(16, 32\), expected \(32, 32\)"):
        zm.load(out, lazy_blocks=lazy)


@pytest.mark.parametrize("lazy", [False, True])
def test_unreadable_dtype(tmp_path, lazy):
    """A tensor whose dtype the reader does not know is refused from the header."""
    _, _, out = _tiny_opt(tmp_path)

    def to_u32(header):
        entry = header["model.decoder.layers.1.fc1.bias"]
        entry["dtype"] = "U32"  # 4 bytes per value, like the F32 it replaces

    _edit_header(out + "/model.safetensors", to_u32)
    with pytest.raises(zm.CheckpointError, match=r"'model.decoder.layers.1.fc1.bias' has dtype "
                                                 r"U32"):
        zm.load(out, lazy_blocks=lazy)


@pytest.mark.parametrize("model_type", ["opt", "gpt2"])
def test_lazy_blocks_read_when_called(tmp_path, model_type):
    """lazy_blocks=True: callables that give the eager blocks, placed by place_block; nothing of
    a block is read before its call."""
    if model_type == "opt":
        model, params, out = _tiny_opt(tmp_path)
    else:  # GPT-2's fused c_attn: each of q, k, v is a third of one tensor
        model = zm.Model(zm.preset("gpt2", num_layers=2, hidden_size=32, num_heads=2,
                                   intermediate_size=64, vocab_size=40))
        params = model.init(jax.random.key(1))
        out = zm.save_pretrained(model, params, str(tmp_path / "g"))
    _, eager = zm.load(out)
    seen = []

    def place(i, tree):
        seen.append(i)
        return jax.device_put(tree)

    _, lazy = zm.load(out, place_block=place, lazy_blocks=True)
    assert seen == [] and all(callable(b) for b in lazy["blocks"])
    assert "read when called" in repr(lazy["blocks"][1])
    for i in (1, 0):
        got = lazy["blocks"][i]()
        assert jax.tree.structure(got) == jax.tree.structure(eager["blocks"][i])
        for a, b in zip(jax.tree.leaves(eager["blocks"][i]), jax.tree.leaves(got)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert seen == [1, 0]
    for a, b in zip(jax.tree.leaves(eager["outer"]), jax.tree.leaves(lazy["outer"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_not_a_safetensors_file(tmp_path):
    _, _, out = _tiny_opt(tmp_path)
    with open(out + "/model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", 5) + b"{{{{{")
    with pytest.raises(zm.CheckpointError, match="not a safetensors file"):
        zm.load(out)


def test_wrong_file_kind(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"x")
    with pytest.raises(zm.CheckpointError, match=r"\.gguf"):
        zm.load(str(p))


def test_bad_batch_shapes():
    model = zm.Model(zm.preset("gpt2", num_layers=1, hidden_size=32, num_heads=2,
                               intermediate_size=64, vocab_size=40))
    params = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"attention_mask.*\(2, 3\).*\(2, 4\)"):
        zm.logits(model, params, np.zeros((2, 4), np.int32), np.ones((2, 3), np.int32))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        zm.logits(model, params, np.zeros((4,), np.int32))


def test_bad_config_values():
    with pytest.raises(ValueError, match="num_heads 6 must be a multiple of num_kv_heads 4"):
        zm.DecoderConfig(model_type="llama", vocab_size=10, hidden_size=48, num_layers=1,
                         num_heads=6, num_kv_heads=4, intermediate_size=8)
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        zm.DecoderConfig(model_type="llama", vocab_size=10, hidden_size=48, num_layers=1,
                         num_heads=6, intermediate_size=8, norm="batchnorm")
    with pytest.raises(ValueError, match="unknown preset"):
        zm.preset("opt_1t")


def test_presets_param_counts():
    # Known sizes of the published models (within 2%: the tables differ slightly in vocab padding).
    for name, n in [("opt_125m", 125e6), ("opt_1_3b", 1.3e9), ("opt_6_7b", 6.7e9),
                    ("opt_175b", 175e9), ("gpt2", 124e6), ("gpt2_xl", 1.56e9)]:
        assert abs(zm.preset(name).num_params / n - 1) < 0.03, name


def test_init_places_blocks_in_pinned_host():
    dev = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    model = zm.Model(zm.preset("opt_125m", num_layers=2, hidden_size=32, num_heads=2,
                               intermediate_size=64, vocab_size=40))
    params = model.init(jax.random.key(0), jnp.bfloat16, block_sharding=host)
    for leaf in jax.tree.leaves(params["blocks"]):
        assert leaf.sharding.memory_kind == "pinned_host" and leaf.dtype == jnp.bfloat16
    assert not np.array_equal(np.asarray(params["blocks"][0]["attn"]["q"]["kernel"]),
                              np.asarray(params["blocks"][1]["attn"]["q"]["kernel"]))


@pytest.mark.parametrize("lazy", [False, True])
def test_truncated_file_is_refused_when_opened(tmp_path, lazy):
    """A truncated download fails at load, naming the file and the tensor, not minutes later
    when an engine reads the block."""
    _, _, out = _tiny_opt(tmp_path)
    path = out + "/model.safetensors"
    with open(path, "r+b") as fh:
        fh.truncate(len(open(path, "rb").read()) - 100)
    with pytest.raises(zm.CheckpointError, match=r"model.safetensors: tensor .* of a \d+-byte "
                                                 r"file: the file is truncated or corrupt"):
        zm.load(out, lazy_blocks=lazy)


def test_byte_range_unlike_the_shape_is_refused(tmp_path):
    _, _, out = _tiny_opt(tmp_path)
    _edit_header(out + "/model.safetensors",
                 lambda h: h["model.decoder.layers.0.fc1.bias"].update(shape=[47]))
    with pytest.raises(zm.CheckpointError, match=r"'model.decoder.layers.0.fc1.bias' spans 192 "
                                                 r"bytes, expected 188 for shape \(47,\) in F32"):
        zm.load(out, lazy_blocks=True)


@pytest.mark.parametrize("lazy", [False, True])
def test_fused_qkv_must_split_in_equal_thirds(tmp_path, lazy):
    model = zm.Model(zm.preset("gpt2", num_layers=1, hidden_size=32, num_heads=2,
                               intermediate_size=64, vocab_size=40))
    out = zm.save_pretrained(model, model.init(jax.random.key(1)), str(tmp_path / "g"))
    t = _tensors(out)
    t["transformer.h.0.attn.c_attn.weight"] = np.zeros((32, 98), np.float32)  # 96 + 2 stray
    _write_safetensors(out + "/model.safetensors", t)
    with pytest.raises(zm.CheckpointError, match=r"c_attn.weight' has shape \(32, 98\), "
                                                 r"expected \(32, 96\)"):
        zm.load(out, lazy_blocks=lazy)
