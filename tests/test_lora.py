"""LoRA adapters over a frozen base (`zo2_jax.models.lora`): the estimate is over the adapters
alone, the base is never written, ZO2 == MeZO bit for bit, and the merged model is the model the
adapters describe."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zo2_jax.models as zm
from test_exactness_archs import HF_CONFIGS, batches, make_model, user_chain
from test_offload_exactness import assert_trees_identical, comparable_state
from zo2_jax.core.noise import part_noise
from zo2_jax.models.lora import LoRAModel, lora
from zo2_jax.offload import Storage, ZO2Engine
from zo2_jax.zo import MeZOEngine, mezo_sgd


def _steps_match(mezo, zo2, n):
    """n steps of both engines with the same keys: equal metrics and states, bit for bit."""
    for t, batch in enumerate(batches(n)):
        key = jax.random.fold_in(jax.random.key(11), t)
        m1, m2 = mezo.step(batch, key), zo2.step(batch, key)
        for k in m1:
            assert np.array_equal(np.asarray(m1[k]), np.asarray(m2[k])), (t, k, m1[k], m2[k])
    assert_trees_identical(comparable_state(mezo), comparable_state(zo2), "state")


def estimate_and_directional_derivative(model, ap, batch, trained):
    """(MeZO's projected gradient of one step with key 9, the exact derivative of the mean loss
    along that step's z over the blocks' `trained` subtrees) of an adapter model."""
    key = jax.random.key(9)
    e = MeZOEngine(model, ap, mezo_sgd(0.0), eps=1e-3, num_directions=1)
    g = float(e.step(batch, key)["projected_grad"])
    # the trained subtree of block i is {trained: ...}: its paths start with that key
    zs = [part_noise(key, 0, i, {trained: b[trained]})[trained]
          for i, b in enumerate(ap["blocks"])]

    def loss(parts):
        p = {"outer": ap["outer"], "blocks": [{**b, trained: a} for b, a in
                                              zip(ap["blocks"], parts)]}
        return jnp.mean(model.apply(p, batch)[0])
    _, exact = jax.jvp(loss, ([b[trained] for b in ap["blocks"]],), (zs,))
    return g, exact


def _qarrays(tree):
    """The QArray leaves of `tree` (a quantised base's matrices), in tree order."""
    from zo2_jax.models import quant
    return [x for x in jax.tree.leaves(tree, is_leaf=quant.is_qarray) if quant.is_qarray(x)]


def _adapted(name="llama-gqa-rope-scaling", **kw):
    base, params = make_model(name)
    model = lora(base, **kw)
    return base, params, model, model.adapt(params, jax.random.key(3))


def test_new_adapters_leave_the_base_model_unchanged():
    base, params, model, ap = _adapted(rank=4)
    batch = batches(1)[0]
    np.testing.assert_array_equal(np.asarray(model.apply(ap, batch)[1]),
                                  np.asarray(base.apply(params, batch)[1]))


def test_merge_is_the_lora_forward():
    """x (W + s A B) against x W + s (x A) B on every target, and the merged model's logits
    against the adapted model's."""
    base, params, model, ap = _adapted(rank=2, alpha=3.0)
    ap["blocks"] = [dict(b, lora=jax.tree.map(
        lambda x: jax.random.normal(jax.random.key(x.size), x.shape) * 0.1, b["lora"]))
        for b in ap["blocks"]]
    merged = model.merge(ap)
    x = jax.random.normal(jax.random.key(0), (5, base.config.hidden_size))
    for t in model.targets:
        a, b = (ap["blocks"][0]["lora"][t][k] for k in ("A", "B"))
        w = params["blocks"][0]
        for k in t.split("."):
            w = w[k]
        mw = merged["blocks"][0]
        for k in t.split("."):
            mw = mw[k]
        if w["kernel"].shape[0] != x.shape[1]:
            continue
        np.testing.assert_allclose(x @ mw["kernel"], x @ w["kernel"] + 1.5 * (x @ a) @ b,
                                   rtol=1e-5, atol=1e-5)
    batch = batches(1)[0]
    # the adapted model runs the LoRA forward, the merged one x (W + s A B): float32 rounding
    np.testing.assert_allclose(np.asarray(model.apply(ap, batch)[1]),
                               np.asarray(base.apply(merged, batch)[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimator", ["mezo", pytest.param("fzoo", marks=pytest.mark.slow)])
def test_zo2_matches_mezo_and_the_base_is_never_written(estimator):
    base, params, model, ap = _adapted(rank=4)
    kw = dict(eps=1e-3, num_directions=2, estimator=estimator,
              storage=Storage("bfloat16", rounding="stochastic"))
    mezo = MeZOEngine(model, ap, user_chain(model), **kw)
    zo2 = ZO2Engine(model, ap, user_chain(model), max_inflight=2, **kw)
    _steps_match(mezo, zo2, 3)
    got = zo2.params()
    stored = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32),
                          {"outer": params["outer"], "blocks": params["blocks"]})
    # the base: the encoded initial weights, bit for bit, after the updates
    assert_trees_identical(jax.tree.map(np.asarray, {"outer": got["outer"]["base"],
                                                     "blocks": [b["base"] for b in got["blocks"]]}),
                           jax.tree.map(np.asarray, stored), "base")
    # the adapters moved (B from zero)
    assert all(float(jnp.abs(b["lora"]["attn.q"]["B"]).max()) > 0 for b in got["blocks"])


@pytest.mark.parametrize("packed", [True, False])
def test_zo2_writes_back_the_adapters_only(packed):
    """A streamed block's base stays the host's own arrays across steps (never downloaded or
    replaced), the plan counts the write-back as adapters and optimiser state alone, and a
    saved state restores into a new engine (packed: the base and the adapters in buffers of
    their own)."""
    base, params, model, ap = _adapted(rank=4)
    kw = dict(eps=1e-3, storage=Storage("bfloat16"), max_inflight=2, packed=packed)
    zo2 = ZO2Engine(model, ap, optax.adam(1e-3), **kw)
    assert zo2.packed is packed and not zo2.resident_blocks
    before = [jax.tree.leaves(b["base"]) for b in zo2._store.blocks]
    for t, batch in enumerate(batches(2)):
        zo2.step(batch, jax.random.fold_in(jax.random.key(5), t))
    state = zo2.state()
    for i, b in enumerate(zo2._store.blocks):
        after = jax.tree.leaves(b["base"])
        assert len(after) == len(before[i]) and all(x is y for x, y in zip(after, before[i]))
        assert {x.sharding.memory_kind for x in jax.tree.leaves(b)} == {"pinned_host"}
    plan = zo2.plan
    n_adapter = sum(np.size(x) for x in jax.tree.leaves(ap["blocks"][0]["lora"]))
    # bf16 adapters, adam's float32 mu and nu, its count; packed: alignment padding beside
    trained = model.num_blocks * (2 * n_adapter + 8 * n_adapter)
    assert trained <= plan.written_bytes < trained + model.num_blocks * 4096 * 4
    # what is not written back is the base, bf16 (with padding when packed)
    base_bytes = sum(2 * np.size(x) for x in jax.tree.leaves(ap["blocks"][0]["base"]))
    left = (plan.streamed_bytes - plan.written_bytes) / model.num_blocks
    assert base_bytes <= left < base_bytes + 512 * len(jax.tree.leaves(ap["blocks"][0]["base"]))
    assert plan.step_time_bound(up=1.0, down=1.0, both=1e30) == plan.streamed_bytes
    # pinned host memory: the blocks, and new copies of the adapters of the units in flight
    assert plan.host_bytes == plan.streamed_bytes + (
        plan.written_bytes // model.num_blocks * plan.max_inflight * plan.blocks_per_call)
    assert "written back" in str(plan)
    again = ZO2Engine(model, ap, optax.adam(1e-3), **kw)
    # copies: a restore takes the device arrays it is given as its own
    again.restore(jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False)
                               if isinstance(x, jax.Array) else x, state))
    assert_trees_identical(comparable_state(zo2), comparable_state(again), "restored")
    batch = batches(1, seed=7)[0]
    key = jax.random.key(8)
    m1, m2 = zo2.step(batch, key), again.step(batch, key)
    assert np.array_equal(np.asarray(m1["loss"]), np.asarray(m2["loss"]))


def test_optimizer_state_covers_the_adapters_only():
    _, _, model, ap = _adapted(rank=4)
    e = MeZOEngine(model, ap, optax.adam(1e-3), eps=1e-3)
    s = e.state()
    n_adapter = sum(np.size(x) for x in jax.tree.leaves(ap["blocks"][0]["lora"]))
    # adam's mu and nu of the adapters of every block (stacked), and counts; none of the base
    arrays = [x for x in jax.tree.leaves(s["opt_blocks"]) if np.ndim(x) >= 2]
    assert sum(np.size(x) for x in arrays) == 2 * n_adapter * model.num_blocks
    assert all(np.size(x) == 1 for x in jax.tree.leaves(s["opt_outer"]))


def test_the_estimate_is_the_directional_derivative_over_the_adapters():
    """MeZO's g = (L(a + eps z) - L(a - eps z)) / 2 eps against the exact derivative of the loss
    along z (jax.jvp over the adapters), z regenerated as the engine makes it (block i: part i);
    the base gets no z."""
    base, params, model, ap = _adapted("opt-pre-ln-proj", rank=4)
    ap["blocks"] = [dict(b, lora=jax.tree.map(
        lambda x: jax.random.normal(jax.random.key(x.size + i), x.shape) * 0.3, b["lora"]))
        for i, b in enumerate(ap["blocks"])]
    batch = batches(1, seed=5)[0]
    g, exact = estimate_and_directional_derivative(model, ap, batch, "lora")
    assert abs(float(exact)) > 1e-3
    # float32 losses near 4.1, differences of about 1e-4: g is known to about 1e-3
    np.testing.assert_allclose(g, float(exact), rtol=0.05, atol=2e-3)


def test_bad_settings_are_refused():
    base, params = make_model("gpt2")
    with pytest.raises(ValueError, match="rank must be"):
        lora(base, rank=0)
    with pytest.raises(ValueError, match="alpha must be"):
        lora(base, alpha=float("nan"))
    with pytest.raises(ValueError, match="not a matrix of this model's blocks"):
        lora(base, targets=["attn.nope"])
    with pytest.raises(ValueError, match="exceeds the smaller side"):
        lora(base, rank=10_000)
    model = lora(base)
    # the base model's params, not adapted ones
    with pytest.raises(ValueError, match="frozen base under 'base'"):
        MeZOEngine(model, params, mezo_sgd(1e-3))
    assert isinstance(model, LoRAModel) and set(HF_CONFIGS)
    assert zm.Model is type(base)


def _random_adapters(model, ap, scale=0.05):
    ap = dict(ap)
    ap["blocks"] = [dict(b, lora=jax.tree.map(
        lambda x: jax.random.normal(jax.random.key(x.size + 7 * i), x.shape) * scale, b["lora"]))
        for i, b in enumerate(ap["blocks"])]
    return ap


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_export_merged_and_peft_load_in_transformers_and_peft(tmp_path, kind):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    if kind == "llama":
        from _tiny import make_tiny_model
        folder = make_tiny_model(tmp_path / "base")
    else:
        cfg = transformers.OPTConfig(vocab_size=61, hidden_size=16, num_attention_heads=4,
                                     num_hidden_layers=2, ffn_dim=24, max_position_embeddings=32,
                                     word_embed_proj_dim=16)
        torch.manual_seed(0)
        folder = str(tmp_path / "base")
        transformers.OPTForCausalLM(cfg).save_pretrained(folder)
    base, params = zm.load(folder)
    model = lora(base, rank=2, alpha=4.0)
    ap = _random_adapters(model, model.adapt(params, jax.random.key(0)))
    ids = np.array([[3, 5, 9, 11, 4, 2, 8]], np.int64)
    ours = np.asarray(model.apply(ap, {"input_ids": jnp.asarray(ids, jnp.int32)})[1])

    from zo2_jax.models.lora import save_merged, save_peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the OPT folder has no tokenizer to copy
        merged_dir = save_merged(model, ap, str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir)
    with torch.no_grad():
        got = merged(torch.tensor(ids)).logits.float().numpy()
    np.testing.assert_allclose(got, ours, rtol=2e-4, atol=2e-4)

    save_peft(model, ap, str(tmp_path / "adapter"), base_model_name_or_path=folder)
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        before = plain(torch.tensor(ids)).logits.float().numpy()
    adapted = peft.PeftModel.from_pretrained(plain, str(tmp_path / "adapter"))
    with torch.no_grad():
        got = adapted(torch.tensor(ids)).logits.float().numpy()
    assert np.abs(got - before).max() > 1e-3  # the adapters did load and change the output
    np.testing.assert_allclose(got, ours, rtol=2e-4, atol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("base_format", ["storage", "Q4_0"])
def test_trainer_trains_exports_and_resumes_lora(tmp_path, base_format):
    """`--adapter lora` through the trainer: only the adapters change, the export holds the
    merged model and the PEFT adapters, and a resumed run equals an uninterrupted one (also
    over a base kept in Q4_0)."""
    from _tiny import make_tiny_model
    from zo2_jax.train import trainer as T
    from zo2_jax.train.config import TrainConfig
    folder = make_tiny_model(tmp_path / "base")
    kw = dict(model=folder, adapter="lora", lora_rank=2, engine="zo2", batch_size=4,
              eval_examples=8, lr=1e-2, progress=False, base_format=base_format)
    T.train(TrainConfig(steps=4, out_dir=str(tmp_path / "a"), export_dir=str(tmp_path / "m"),
                        **kw))
    T.train(TrainConfig(steps=2, out_dir=str(tmp_path / "b"), checkpoint_dir=str(tmp_path / "ck"),
                        **kw))
    T.train(TrainConfig(steps=4, out_dir=str(tmp_path / "b"), checkpoint_dir=str(tmp_path / "ck"),
                        export_dir=str(tmp_path / "r"), **kw))
    base, bp = zm.load(folder)
    whole, wp = zm.load(str(tmp_path / "m"))
    resumed, rp = zm.load(str(tmp_path / "r"))
    for a, b in zip(jax.tree.leaves(wp), jax.tree.leaves(rp)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    changed = [not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(bp["blocks"]), jax.tree.leaves(wp["blocks"]))]
    assert any(changed)  # the merged deltas
    for a, b in zip(jax.tree.leaves(bp["outer"]), jax.tree.leaves(wp["outer"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # no adapters there
    assert (tmp_path / "m" / "adapter" / "adapter_model.safetensors").exists()


def test_a_quantized_base_needs_lora_and_gguf_a_gguf_file(tmp_path):
    from _tiny import make_tiny_model
    from zo2_jax.train import trainer as T
    from zo2_jax.train.config import TrainConfig
    with pytest.raises(ValueError, match="base_format='Q8_0' keeps a frozen base quantised"):
        TrainConfig(base_format="Q8_0")
    with pytest.raises(ValueError, match="base_format must be one of|is not allowed"):
        TrainConfig(adapter="lora", base_format="Q4_K")
    folder = make_tiny_model(tmp_path / "base")
    with pytest.raises(ValueError, match="base_format='gguf' keeps a .gguf model's own"):
        T.load_model(TrainConfig(model=folder, adapter="lora", base_format="gguf"))
    model, params, _ = T.load_model(TrainConfig(model=folder, adapter="lora", base_format="Q8_0"))
    blk = params["blocks"][0]()
    assert {x.qtype for x in _qarrays(blk["base"])} == {"Q8_0"}


# ---- a quantised frozen base ----------------------------------------------------------------

def _wide(rank=4):
    """A llama with matrices wide enough for GGUF blocks of 32 (hidden 64, MLP 128)."""
    import transformers
    cfg = zm.config_from_hf(transformers.LlamaConfig(
        vocab_size=61, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=3, intermediate_size=128, max_position_embeddings=64).to_dict())
    base = zm.Model(cfg)
    params = base.init(jax.random.key(7))
    model = lora(base, rank=rank)
    return base, params, model, model.adapt(params, jax.random.key(3))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1"])
def test_quantized_base_logits_match_the_dequantized_reference(qtype):
    """Every block matrix kept as GGUF bytes (QArray), expanded on the device where a block runs:
    the logits of both engines against the plain model over the dequantised weights."""
    from zo2_jax.models import quant
    base, params, model, ap = _wide()
    qp = model.quantize_base(ap, qtype)
    kernels = _qarrays(qp["blocks"][0]["base"])
    assert len(kernels) == 7 and all(k.qtype == qtype and k.raw.dtype == jnp.uint8
                                     for k in kernels)
    # the reference: the dequantised matrices as plain float32 weights
    ref_params = {"outer": params["outer"], "blocks": [quant.dense(b["base"]) for b in qp["blocks"]]}
    batch = batches(1)[0]
    ref = np.asarray(base.apply(ref_params, batch)[1])
    err = float(np.max(np.abs(ref - np.asarray(base.apply(params, batch)[1]))))
    assert err > 1e-4  # the quantisation changed the model
    np.testing.assert_allclose(np.asarray(model.apply(qp, batch)[1]), ref, rtol=1e-5, atol=1e-5)
    for engine in (MeZOEngine(model, qp, mezo_sgd(1e-3), eps=1e-3),
                   ZO2Engine(model, qp, mezo_sgd(1e-3), eps=1e-3, max_inflight=2)):
        np.testing.assert_allclose(np.asarray(engine.logits(batch)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [True, False])
def test_zo2_matches_mezo_over_a_quantized_base(packed):
    """Bit for bit, the Q4_0 bytes uploaded as they are and never written back, and a step
    uploads about a quarter of a bf16 base's bytes."""
    base, params, model, ap = _wide()
    qp = model.quantize_base(ap, "Q4_0")
    kw = dict(eps=1e-3, storage=Storage("bfloat16"))
    mezo = MeZOEngine(model, qp, optax.adam(1e-3), **kw)
    zo2 = ZO2Engine(model, qp, optax.adam(1e-3), max_inflight=2, packed=packed, **kw)
    raw = [[np.asarray(x.raw) for x in _qarrays(b["base"])] for b in qp["blocks"]]
    _steps_match(mezo, zo2, 3)
    for i, b in enumerate(zo2.state()["blocks"]):
        got = [np.asarray(x.raw) for x in _qarrays(b["base"])]
        assert len(got) == 7 and all(np.array_equal(g, r) for g, r in zip(got, raw[i]))
    full = ZO2Engine(model, ap, optax.adam(1e-3), max_inflight=2, packed=packed, **kw)
    kernel_values = sum(np.size(x) for x in jax.tree.leaves(params["blocks"][0])
                        if np.ndim(x) == 2) * model.num_blocks
    # Q4_0: 18 bytes per 32 values against bf16's 64
    saved = full.streamed_bytes() - zo2.streamed_bytes()
    # (packed: each leaf's buffer padded to 512 bytes)
    assert saved == pytest.approx(kernel_values * (2 - 18 / 32), rel=0.01 if not packed else 0.05)


def test_a_gguf_base_kept_in_its_own_blocks():
    """load(keep_quantized=True): the shipped SmolLM2's block matrices stay the file's Q4_1
    bytes (q and k rows un-permuted), expanding to exactly the weights a plain load
    dequantises; LoRA over them gives the plain model's logits, on both engines."""
    from zo2_jax.models import quant
    from zo2_jax.models.gguf import smollm2_gguf_path
    path = smollm2_gguf_path()
    base, params = zm.load(path, jnp.float32)
    _, qparams = zm.load(path, jnp.float32, keep_quantized=True, lazy_blocks=True)
    for i in (0, base.num_blocks - 1):
        blk = qparams["blocks"][i]()
        kept = _qarrays(blk)
        assert len(kept) == 7 and {x.qtype for x in kept} == {"Q4_1"}
        assert_trees_identical(jax.tree.map(np.asarray, quant.dense(blk)),
                               jax.tree.map(np.asarray, params["blocks"][i]), f"block {i}")
    model = lora(base, rank=4)
    batch = {"input_ids": jnp.asarray(np.random.default_rng(0).integers(0, 1000, (2, 12)),
                                      jnp.int32)}
    ref = np.asarray(base.apply(params, batch)[1])
    adapted = model.adapt(qparams, jax.random.key(0))
    engine = ZO2Engine(model, adapted, mezo_sgd(1e-4), eps=1e-3)
    # uploaded: Q4_1's 20 bytes per 32 values of each matrix, float32 norms and adapters
    leaves = jax.tree.leaves(params["blocks"])
    adapters = sum(np.size(x) for x in jax.tree.leaves(model.init_adapters(jax.random.key(0))))
    want = (sum(np.size(x) for x in leaves if np.ndim(x) == 2) * 20 / 32
            + 4 * sum(np.size(x) for x in leaves if np.ndim(x) < 2)
            + 4 * adapters * base.num_blocks)
    assert engine.streamed_bytes() == pytest.approx(want, rel=0.01)
    np.testing.assert_allclose(np.asarray(engine.logits(batch)), ref, rtol=2e-4, atol=2e-4)


def test_quantized_blocks_are_refused_where_they_would_be_trained(tmp_path):
    from zo2_jax.models import quant
    from zo2_jax.models.gguf import smollm2_gguf_path
    base, params = zm.load(smollm2_gguf_path(), jnp.float32, keep_quantized=True,
                           lazy_blocks=True)
    with pytest.raises(ValueError, match="quantised matrix .QArray., which cannot be trained"):
        MeZOEngine(base, {"outer": params["outer"],
                          "blocks": [b() for b in params["blocks"]]}, mezo_sgd(1e-4))
    _, _, model, ap = _wide()
    with pytest.raises(ValueError, match="qtype must be one of"):
        model.quantize_base(ap, "Q4_K")
    # a Hugging Face folder has no GGUF blocks to keep
    folder = str(tmp_path / "hf")
    tiny, tparams = make_model("llama-gqa-rope-scaling")
    zm.save_pretrained(tiny, tparams, folder)
    with pytest.raises(ValueError, match="keep_quantized reads a GGUF file"):
        zm.load(folder, keep_quantized=True)
    assert quant.is_qarray(quant.QArray.of(jnp.ones((32, 4)), "Q8_0"))
