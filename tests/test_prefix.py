"""Prefix tuning over a frozen base (`zo2_jax.models.prefix`): a prefix initialised by real
activations makes the model compute what the base computes on [the init tokens] + the batch, the
estimate is over the prefixes alone and the base is never written, ZO2 == MeZO bit for bit, and
the PEFT export runs in `peft` to our logits."""

import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zo2_jax.models as zm
from test_exactness_archs import HF_CONFIGS, V, batches, make_model
from test_lora import _qarrays, _steps_match, estimate_and_directional_derivative
from test_offload_exactness import assert_trees_identical
from zo2_jax.models.prefix import PrefixModel, prompt_embeddings, save_peft_prefix
from zo2_jax.offload import Storage, ZO2Engine
from zo2_jax.zo import MeZOEngine, mezo_sgd

P = 3


def _adapted(name="llama-gqa-rope-scaling", num_prefix=P, init="real"):
    base, params = make_model(name)
    model = PrefixModel(base, num_prefix)
    return base, params, model, model.adapt(params, jax.random.key(3), init=init)


def _padded(kind):
    """batches(1)'s two rows with padding: none, the second row's last 4 tokens (right) or its
    first 4 (left)."""
    batch = dict(batches(1)[0])
    mask = np.ones(batch["input_ids"].shape, np.int32)
    if kind == "right":
        mask[1, -4:] = 0
    elif kind == "left":
        mask[1, :4] = 0
    if kind != "none":
        batch["attention_mask"] = jnp.asarray(mask)
    return batch, mask


# each architecture with one padding in the default run, the other paddings in the slow one
_FAST = {("opt-pre-ln-proj", "right"), ("llama-gqa-rope-scaling", "left"), ("qwen3", "none")}


@pytest.mark.parametrize("name,padding", [
    pytest.param(n, p, marks=() if (n, p) in _FAST else pytest.mark.slow)
    for n in ("opt-pre-ln-proj", "llama-gqa-rope-scaling", "qwen3")
    for p in ("none", "right", "left")])
def test_real_init_is_the_base_model_on_the_init_tokens_then_the_batch(name, padding):
    """Learned positions (OPT), rope with grouped-query heads (LLaMA), q/k norms (Qwen3): the
    prefix model's logits of the real tokens against the base model's on [P init tokens] + batch
    (those always visible: ones prepended to the mask)."""
    base, params, model, ap = _adapted(name)
    batch, mask = _padded(padding)
    ours = np.asarray(model.apply(ap, batch)[1])
    toks = np.broadcast_to(np.asarray(model.init_tokens(jax.random.key(3))), (2, P))
    full = {"input_ids": jnp.concatenate([jnp.asarray(toks), batch["input_ids"]], 1),
            "attention_mask": jnp.concatenate([jnp.ones((2, P), jnp.int32), jnp.asarray(mask)],
                                              1)}
    ref = np.asarray(base.apply(params, full)[1])[:, P:]
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], rtol=1e-5, atol=1e-5)
    # and the prefix matters: without it the logits are another model's
    plain = np.asarray(base.apply(params, batch)[1])
    assert np.abs(plain[real] - ours[real]).max() > 1e-3
    pre = ap["blocks"][0]["prefix"]
    cfg = base.config
    assert pre["k"].shape == pre["v"].shape == (P, cfg.num_kv_heads * cfg.head_dim)


def test_the_seam_stages_are_the_full_forward_pass():
    """context / embed (without a context: it makes the prefix's own) / block / head, as the
    engines call them, against apply."""
    _, _, model, ap = _adapted("opt-post-ln")
    batch, _ = _padded("right")
    ctx = model.context(batch)
    np.testing.assert_array_equal(np.asarray(ctx["positions"][0]), np.arange(P, P + 12))
    np.testing.assert_array_equal(np.asarray(ctx["positions"][1]),
                                  np.r_[np.arange(P, P + 8), [-1] * 4])
    h = model.embed(ap["outer"], batch)
    for b in ap["blocks"]:
        h = model.block(b, h, ctx)
    np.testing.assert_array_equal(np.asarray(model.head(ap["outer"], h, batch)[1]),
                                  np.asarray(model.apply(ap, batch)[1]))


def test_lazy_blocks_are_read_once_by_adapt_and_stay_lazy():
    """Blocks given as callables: adapt calls each once, in order (the hidden states of the P
    tokens carried from one to the next), and returns callables (the base still unread) whose
    blocks equal the eager adapt's."""
    base, params = make_model("llama-gqa-rope-scaling")
    model = PrefixModel(base, P)
    calls = []

    def lazy(i):
        def read():
            calls.append(i)
            return params["blocks"][i]
        return read
    got = model.adapt({"outer": params["outer"],
                       "blocks": [lazy(i) for i in range(base.num_blocks)]}, jax.random.key(3))
    assert calls == [0, 1, 2]
    assert all(callable(b) for b in got["blocks"])
    want = model.adapt(params, jax.random.key(3))
    made = [b() for b in got["blocks"]]
    assert calls == [0, 1, 2, 0, 1, 2]
    assert_trees_identical(jax.tree.map(np.asarray, made),
                           jax.tree.map(np.asarray, want["blocks"]), "lazy blocks")
    # random init reads nothing
    calls.clear()
    got = model.adapt({"outer": params["outer"],
                       "blocks": [lazy(i) for i in range(base.num_blocks)]}, jax.random.key(3),
                      init="random")
    assert calls == [] and all(callable(b) for b in got["blocks"])


def test_random_init_is_standard_normal_and_keyed():
    _, _, model, ap = _adapted(num_prefix=64, init="random")
    x = np.concatenate([np.ravel(b["prefix"][k]) for b in ap["blocks"] for k in ("k", "v")])
    assert abs(x.mean()) < 0.05 and abs(x.std() - 1.0) < 0.05
    # every block and both of k, v drawn apart; the same key gives the same prefixes
    firsts = {float(b["prefix"][k][0, 0]) for b in ap["blocks"] for k in ("k", "v")}
    assert len(firsts) == 2 * model.num_blocks
    again = model.adapt(make_model("llama-gqa-rope-scaling")[1], jax.random.key(3),
                        init="random")
    assert_trees_identical(jax.tree.map(np.asarray, [b["prefix"] for b in ap["blocks"]]),
                           jax.tree.map(np.asarray, [b["prefix"] for b in again["blocks"]]),
                           "random prefixes")


def test_decay_mask_is_the_prefix_matrices_only():
    _, _, model, ap = _adapted()
    mask = model.decay_mask(ap["blocks"][0])
    assert mask["prefix"] == {"k": True, "v": True}
    assert not any(jax.tree.leaves(mask["base"]))
    assert not any(jax.tree.leaves(model.decay_mask(ap["outer"])))


@pytest.mark.parametrize("packed", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_zo2_matches_mezo_and_the_base_is_never_written(packed):
    """Bit for bit over 3 steps (bf16 storage, adam); afterwards the base is the encoded initial
    weights and the prefixes moved."""
    base, params, model, ap = _adapted()
    kw = dict(eps=1e-3, storage=Storage("bfloat16"))
    mezo = MeZOEngine(model, ap, optax.adam(1e-3), **kw)
    zo2 = ZO2Engine(model, ap, optax.adam(1e-3), max_inflight=2, packed=packed, **kw)
    _steps_match(mezo, zo2, 3)
    got = zo2.params()
    stored = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    assert_trees_identical(jax.tree.map(np.asarray, {"outer": got["outer"]["base"],
                                                     "blocks": [b["base"] for b in got["blocks"]]}),
                           jax.tree.map(np.asarray, stored), "base")
    for b, b0 in zip(got["blocks"], ap["blocks"]):
        start = np.asarray(b0["prefix"]["k"].astype(jnp.bfloat16).astype(jnp.float32))
        assert np.abs(np.asarray(b["prefix"]["k"]) - start).max() > 0


def test_optimizer_state_covers_the_prefix_only():
    _, _, model, ap = _adapted()
    e = MeZOEngine(model, ap, optax.adam(1e-3), eps=1e-3)
    s = e.state()
    n_prefix = 2 * P * model.prefix_shape[1]
    assert sum(np.size(x) for x in jax.tree.leaves(ap["blocks"][0]["prefix"])) == n_prefix
    # adam's mu and nu of the prefixes of every block (stacked), and counts; none of the base
    arrays = [x for x in jax.tree.leaves(s["opt_blocks"]) if np.ndim(x) >= 2]
    assert sum(np.size(x) for x in arrays) == 2 * n_prefix * model.num_blocks
    assert all(np.size(x) == 1 for x in jax.tree.leaves(s["opt_outer"]))


def test_the_estimate_is_the_directional_derivative_over_the_prefix():
    """MeZO's g = (L(p + eps z) - L(p - eps z)) / 2 eps against the exact derivative of the loss
    along z (jax.jvp over the prefixes), z regenerated as the engine makes it (block i: part i,
    over its {"prefix": ...}); the base gets no z."""
    base, params, model, ap = _adapted()
    batch = batches(1, seed=5)[0]
    g, exact = estimate_and_directional_derivative(model, ap, batch, "prefix")
    assert abs(float(exact)) > 1e-2
    # float32 losses near 4.1, differences of about 5e-5: g is known to about 1e-3
    np.testing.assert_allclose(g, float(exact), rtol=0.05, atol=1e-3)


def test_quantized_base_is_the_dequantized_reference():
    """quantize_base (LoRA's, shared) keeps the block matrices as Q8_0 bytes; the prefix model
    over them computes what it computes over the dequantised weights, and the init pass reads
    quantised blocks too."""
    import transformers
    from zo2_jax.models import quant
    cfg = zm.config_from_hf(transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, intermediate_size=128, max_position_embeddings=64).to_dict())
    base = zm.Model(cfg)
    params = base.init(jax.random.key(7))
    model = PrefixModel(base, P)
    qp = model.quantize_base(model.adapt(params, jax.random.key(3)), "Q8_0")
    assert len(_qarrays(qp["blocks"][0]["base"])) == 7
    dense = {"outer": qp["outer"], "blocks": [dict(b, base=quant.dense(b["base"]))
                                              for b in qp["blocks"]]}
    batch = batches(1)[0]
    np.testing.assert_allclose(np.asarray(model.apply(qp, batch)[1]),
                               np.asarray(model.apply(dense, batch)[1]), rtol=1e-5, atol=1e-5)
    # the real-activation init over a quantised base: its dequantised weights' activations
    qbase = {"outer": params["outer"], "blocks": [b["base"] for b in qp["blocks"]]}
    got = model.adapt(qbase, jax.random.key(3))
    want = model.adapt({"outer": params["outer"], "blocks": [b["base"] for b in dense["blocks"]]},
                       jax.random.key(3))
    for a, b in zip(got["blocks"], want["blocks"]):
        np.testing.assert_allclose(np.asarray(a["prefix"]["k"]), np.asarray(b["prefix"]["k"]),
                                   rtol=1e-5, atol=1e-5)


def test_bad_settings_are_refused():
    base, params = make_model("opt-post-ln")
    for bad in (0, -1, 2.5, True, "5", None):
        with pytest.raises(ValueError, match="num_prefix must be an integer >= 1, got "
                                             + re.escape(repr(bad))):
            PrefixModel(base, bad)
    model = PrefixModel(base, P)
    with pytest.raises(ValueError, match="init must be one of"):
        model.adapt(params, jax.random.key(0), init="zeros")
    with pytest.raises(ValueError, match="base_params has 2 blocks, the model has 3"):
        model.adapt({"outer": params["outer"], "blocks": params["blocks"][:2]}, jax.random.key(0))
    ap = model.adapt(params, jax.random.key(0))
    batch = batches(1)[0]
    # a prefix of the wrong shape: P rows of G*K = 16 each, for keys and values alike
    wrong = dict(ap, blocks=[dict(b, prefix={"k": b["prefix"]["k"][:2], "v": b["prefix"]["v"]})
                             for b in ap["blocks"]])
    with pytest.raises(ValueError, match=r"prefix keys \(2, 16\) and values \(3, 16\): both "
                                         r"must be \[num_prefix, num_kv_heads \* head_dim\]"):
        model.apply(wrong, batch)
    with pytest.raises(ValueError, match="a PrefixModel block's parameters must be"):
        model.apply({"outer": ap["outer"], "blocks": [b["base"] for b in ap["blocks"]]}, batch)
    # the base model's params, not adapted ones
    with pytest.raises(ValueError, match="frozen base under 'base'"):
        MeZOEngine(model, params, mezo_sgd(1e-3))
    # Model.block's own check (any P, but [P, G*K] for keys and values)
    ctx = base.context(batch, offset=2)
    h = base.embed(params["outer"], batch, ctx)
    k = jnp.zeros((2, 16))
    with pytest.raises(ValueError, match=r"prefix \(keys, values\) of two arrays \[P, 16\].*"
                                         r"got keys \(2, 8\) and values \(2, 16\)"):
        base.block(params["blocks"][0], h, ctx, prefix=(k[:, :8], k))
    with pytest.raises(ValueError, match="got dict"):
        base.block(params["blocks"][0], h, ctx, prefix={"k": k, "v": k})
    assert base.block(params["blocks"][0], h, ctx, prefix=(k, k)).shape == h.shape
    with pytest.raises(ValueError, match="offset must be an integer >= 0, got -1"):
        base.context(batch, offset=-1)
    # learned positions: the prefix takes P of them
    long = {"input_ids": jnp.zeros((1, 31), jnp.int32)}
    with pytest.raises(ValueError, match="31 tokens after 3 prefix tokens needs 34 positions, "
                                         "the model has 32"):
        model.apply(ap, long)


def test_an_offset_shifts_the_real_tokens_positions_only():
    """Model.context(batch, offset): the real tokens' positions (and rope tables) shifted,
    padding still at -1, the mask unchanged; offset 0 is the context as before."""
    base, params = make_model("llama-gqa-rope-scaling")
    batch, _ = _padded("left")
    c0, c1 = base.context(batch), base.context(batch, offset=4)
    assert_trees_identical(jax.tree.map(np.asarray, c0),
                           jax.tree.map(np.asarray, base.context(batch, offset=0)), "offset 0")
    np.testing.assert_array_equal(np.asarray(c0["mask"]), np.asarray(c1["mask"]))
    pos0, pos1 = np.asarray(c0["positions"]), np.asarray(c1["positions"])
    np.testing.assert_array_equal(pos1, np.where(pos0 >= 0, pos0 + 4, -1))
    assert not np.allclose(np.asarray(c0["cos"]), np.asarray(c1["cos"]))


# ---- export --------------------------------------------------------------------------------------

def _hf_base(tmp_path, kind):
    import torch
    import transformers
    if kind == "llama":
        from _tiny import make_tiny_model
        return make_tiny_model(tmp_path / "base")
    cfg = transformers.OPTConfig(vocab_size=61, hidden_size=16, num_attention_heads=4,
                                 num_hidden_layers=2, ffn_dim=24, max_position_embeddings=32,
                                 word_embed_proj_dim=16)
    torch.manual_seed(0)
    folder = str(tmp_path / "base")
    transformers.OPTForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_export_loads_in_peft_with_our_logits(tmp_path, kind):
    """save_peft_prefix, then peft.PeftModel.from_pretrained over the transformers model: the
    same logits as ours, unpadded and right-padded (peft prepends ones to the attention mask);
    left-padded too: for OPT as it is (transformers counts its positions from the mask, as we
    do), for LLaMA with position_ids from the mask (transformers' LLaMA numbers the tokens from
    the cache length whatever the mask, so a left-padded row's positions differ from ours unless
    given; peft adds P to given position_ids). The config's sizes are the ones peft derives
    itself (the kv heads for GQA)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    folder = _hf_base(tmp_path, kind)
    base, params = zm.load(folder)
    model = PrefixModel(base, P)
    ap = model.adapt(params, jax.random.key(0), init="random")
    ap["blocks"] = [dict(b, prefix=jax.tree.map(lambda x: x * 0.5, b["prefix"]))
                    for b in ap["blocks"]]
    out = save_peft_prefix(model, ap, str(tmp_path / "adapter"), base_model_name_or_path=folder)
    config = json.load(open(f"{out}/adapter_config.json"))
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder)
    own = peft.get_peft_model(plain, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                             num_virtual_tokens=P))
    want = own.peft_config["default"]
    for k in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers",
              "prefix_projection"):
        assert config[k] == getattr(want, k), k
    assert config["peft_type"] == "PREFIX_TUNING" and config["task_type"] == "CAUSAL_LM"

    plain = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    adapted = peft.PeftModel.from_pretrained(plain, out).eval()
    np.testing.assert_array_equal(
        adapted.prompt_encoder["default"].embedding.weight.detach().numpy(),
        prompt_embeddings(model, ap))
    ids = np.array([[3, 5, 9, 11, 4, 2, 8], [7, 1, 6, 12, 10, 3, 5]], np.int64)
    cases = ["none", "right"] + (["left"] if kind == "opt" else ["left-positions"])
    for case in cases:
        mask = np.ones_like(ids)
        if case == "right":
            mask[1, -3:] = 0
        elif case.startswith("left"):
            mask[1, :3] = 0
        batch = {"input_ids": jnp.asarray(ids, jnp.int32)}
        kwargs = {}
        if case != "none":
            batch["attention_mask"] = jnp.asarray(mask, jnp.int32)
            kwargs["attention_mask"] = torch.tensor(mask)
        if case == "left-positions":
            # the positions without the prefix: peft adds num_virtual_tokens itself
            kwargs["position_ids"] = torch.tensor(np.cumsum(mask, 1) * mask - 1)
        ours = np.asarray(model.apply(ap, batch)[1])
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' past_key_values deprecation
            got = adapted(input_ids=torch.tensor(ids), **kwargs).logits.float().numpy()
            before = plain(input_ids=torch.tensor(ids)).logits.float().numpy()
        real = mask.astype(bool)
        assert np.abs(got - before)[real].max() > 1e-3, case  # the prefix did load
        np.testing.assert_allclose(got[real], ours[real], rtol=2e-4, atol=2e-4, err_msg=case)


def test_export_refuses_lazy_blocks_and_other_models(tmp_path):
    base, params = make_model("opt-post-ln")
    model = PrefixModel(base, P)
    lazy = model.adapt({"outer": params["outer"],
                        "blocks": [lambda b=b: b for b in params["blocks"]]}, jax.random.key(0))
    with pytest.raises(ValueError, match="is a lazy block"):
        save_peft_prefix(model, lazy, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="needs a PrefixModel, got Model"):
        save_peft_prefix(base, params, str(tmp_path / "b"))
    assert set(HF_CONFIGS)


@pytest.mark.slow
@pytest.mark.parametrize("base_format", ["storage", "Q8_0"])
def test_trainer_trains_exports_and_resumes_a_prefix(tmp_path, base_format):
    """`--adapter prefix` through the trainer: the export is the PEFT prefix alone, it changed
    from the init, and a resumed run (a checkpoint of the prefixes alone) equals an
    uninterrupted one."""
    from safetensors.numpy import load_file

    from _tiny import make_tiny_model
    from zo2_jax.train import trainer as T
    from zo2_jax.train.config import TrainConfig
    folder = make_tiny_model(tmp_path / "base")
    kw = dict(model=folder, adapter="prefix", num_prefix=3, engine="zo2", batch_size=4,
              eval_examples=8, lr=1e-2, progress=False, base_format=base_format)
    T.train(TrainConfig(steps=4, out_dir=str(tmp_path / "a"), export_dir=str(tmp_path / "m"),
                        **kw))
    T.train(TrainConfig(steps=2, out_dir=str(tmp_path / "b"), checkpoint_dir=str(tmp_path / "ck"),
                        **kw))
    T.train(TrainConfig(steps=4, out_dir=str(tmp_path / "b"), checkpoint_dir=str(tmp_path / "ck"),
                        export_dir=str(tmp_path / "r"), **kw))
    straight = load_file(str(tmp_path / "m" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "r" / "adapter_model.safetensors"))
    assert list(straight) == ["prompt_embeddings"]
    np.testing.assert_array_equal(straight["prompt_embeddings"], resumed["prompt_embeddings"])
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 3
    model, params, _ = T.load_model(TrainConfig(**{**kw, "model": folder}), lazy_blocks=False)
    init = prompt_embeddings(model, params)
    assert not np.array_equal(init, straight["prompt_embeddings"])  # trained
