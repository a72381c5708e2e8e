"""Parity with Hugging Face transformers (PyTorch, CPU) on tiny random configs.

Each variant is built in transformers, saved with save_pretrained, loaded through
zo2_jax.models.load, and compared on a left-padded batch: fp32 logits agree within 1e-4 of the
logits' scale at every real token. The export round trip (our save_pretrained, loaded back by
transformers) is checked the same way.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import zo2_jax.models as zm  # noqa: E402

V = 97
COMMON_LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=128)

VARIANTS = {
    "opt_pre_ln": ("OPTConfig", dict(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                     ffn_dim=96, num_attention_heads=4, max_position_embeddings=64,
                                     word_embed_proj_dim=64)),
    "opt_post_ln_proj": ("OPTConfig", dict(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                           ffn_dim=96, num_attention_heads=4,
                                           max_position_embeddings=64, word_embed_proj_dim=32,
                                           do_layer_norm_before=False)),
    "opt_no_bias_untied": ("OPTConfig", dict(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                             ffn_dim=96, num_attention_heads=4,
                                             max_position_embeddings=64, enable_bias=False,
                                             tie_word_embeddings=False,
                                             activation_function="gelu")),
    "gpt2": ("GPT2Config", dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "llama2_mha_untied": ("LlamaConfig", dict(COMMON_LLAMA, num_key_value_heads=4,
                                              tie_word_embeddings=False)),
    "llama3_gqa_tied_rope_llama3": ("LlamaConfig", dict(
        COMMON_LLAMA, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_rope_linear_bias": ("LlamaConfig", dict(
        COMMON_LLAMA, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2": ("Qwen2Config", dict(COMMON_LLAMA, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(COMMON_LLAMA, num_key_value_heads=2, head_dim=24,
                                  tie_word_embeddings=False)),
    "smollm2_like": ("LlamaConfig", dict(vocab_size=V, hidden_size=48, intermediate_size=128,
                                         num_hidden_layers=3, num_attention_heads=3,
                                         num_key_value_heads=1, tie_word_embeddings=True,
                                         rope_theta=100000.0, rms_norm_eps=1e-5)),
}


def _hf_model(kind, kw, seed=0):
    torch.manual_seed(seed)
    cfg = getattr(transformers, kind)(**kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    # Random norms and biases too, so a mix-up of any two tensors shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln" in name else 0))
    return model


def _batch(seed=0, B=3, T=11):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, size=(B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    ids[mask == 0] = 1
    return ids, mask


def _hf_logits(model, ids, mask, model_type):
    kw = {}
    if model_type != "opt":  # OPT derives positions from the mask itself
        kw["position_ids"] = torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     **kw).logits.float().numpy()


def _close(ours, ref, mask, tol=1e-4):
    valid = mask.astype(bool)
    a, b = np.asarray(ours)[valid], ref[valid]
    scale = np.abs(b).max()
    err = np.abs(a - b).max() / scale
    assert err < tol, f"max relative error {err:.2e} >= {tol}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_and_export(variant, tmp_path):
    kind, kw = VARIANTS[variant]
    hf_model = _hf_model(kind, kw)
    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir)
    ids, mask = _batch()
    ref = _hf_logits(hf_model, ids, mask, hf_model.config.model_type)

    model, params = zm.load(str(hf_dir), dtype=jnp.float32)
    assert model.num_blocks == hf_model.config.num_hidden_layers
    ours = zm.logits(model, params, ids, mask)
    assert ours.shape == ref.shape
    _close(ours, ref, mask)

    out = zm.save_pretrained(model, params, str(tmp_path / "export"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(hf_model)
    _close(_hf_logits(back, ids, mask, hf_model.config.model_type), ref, mask, tol=1e-5)


def test_right_padding_matches_unpadded(tmp_path):
    kind, kw = VARIANTS["llama3_gqa_tied_rope_llama3"]
    _hf_model(kind, kw).save_pretrained(tmp_path)
    model, params = zm.load(str(tmp_path))
    ids = np.random.default_rng(1).integers(3, V, size=(1, 9))
    mask = np.ones((1, 12), np.int64)
    mask[:, 9:] = 0
    padded = np.concatenate([ids, np.ones((1, 3), ids.dtype)], axis=1)
    a = zm.logits(model, params, ids)
    b = zm.logits(model, params, padded, mask)
    np.testing.assert_allclose(np.asarray(b)[:, :9], np.asarray(a), rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint_and_bf16(tmp_path):
    kind, kw = VARIANTS["qwen2"]
    hf_model = _hf_model(kind, kw)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model, params = zm.load(str(tmp_path / "hf"), dtype=jnp.bfloat16, compute_dtype=jnp.float32)
    assert params["blocks"][0]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
    ids, mask = _batch()
    ref = _hf_logits(hf_model, ids, mask, "qwen2")
    _close(zm.logits(model, params, ids, mask), ref, mask, tol=2e-2)
    zm.save_pretrained(model, params, str(tmp_path / "out"), max_shard_bytes=30_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    m2, p2 = zm.load(str(tmp_path / "out"), dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(p2["blocks"][1]["mlp"]["up"]["kernel"]),
                                  np.asarray(params["blocks"][1]["mlp"]["up"]["kernel"]))
