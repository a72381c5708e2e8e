"""Your own loop: the engine API in a few lines, and `zo_value_and_grad` on any pytree.

Part 1 drives a MeZOEngine by hand on a tiny decoder with synthetic "counting" batches:
`engine.step` returns device scalars at once (nothing waits for the device), the loop reads step
t-1's loss after dispatching step t, then `flush` applies the last deferred update, `params`
returns the trained weights, and `save_pretrained` writes a folder that `zm.load` (and
transformers) reads back.

Part 2 uses no engine: `zo_value_and_grad` turns any loss of a pytree into (loss, ZOGrad), the
ZOGrad is materialised as a gradient-shaped pytree and applied by a plain optax optimiser: a small
MLP fitting sin(x) from two forward passes per direction, with no backward pass.

    python examples/custom_loop.py --out /tmp/zo_export
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import optax

import zo2_jax.models as zm
from zo2_jax.zo import MeZOEngine, mezo_sgd, zo_value_and_grad


def counting_batch(key, batch: int = 8, seq: int = 16, period: int = 32) -> dict:
    ids_BxT = (jax.random.randint(key, (batch, 1), 0, period) + jnp.arange(seq)[None]) % period
    return {"input_ids": ids_BxT.astype(jnp.int32),
            "attention_mask": jnp.ones((batch, seq), jnp.int32)}


def engine_loop(steps: int, out_dir: str) -> None:
    cfg = zm.DecoderConfig(model_type="llama", vocab_size=64, hidden_size=32, num_layers=2,
                           num_heads=4, intermediate_size=64, max_positions=64, norm="rmsnorm",
                           norm_bias=False, positions="rope", activation="silu", gated_mlp=True,
                           qkv_bias=False, out_bias=False, mlp_bias=False)
    model = zm.Model(cfg)
    key = jax.random.key(0)
    engine = MeZOEngine(model, model.init(key), mezo_sgd(3e-3), eps=1e-2)

    prev = None
    for t in range(steps):
        metrics = engine.step(counting_batch(jax.random.fold_in(key, t)), jax.random.key(t))
        if prev is not None:  # step t-1 is done or nearly: reading it does not stall step t
            print(f"step {t - 1}: loss {float(prev['loss']):.4f}")
        prev = metrics
    print(f"step {steps - 1}: loss {float(prev['loss']):.4f}")

    engine.flush()               # the last step's update is deferred until now
    params = engine.params()     # {'outer': ..., 'blocks': [...]}, float32
    zm.save_pretrained(model, params, out_dir)
    model2, params2 = zm.load(out_dir)
    ids = counting_batch(jax.random.key(99))["input_ids"]
    diff = jnp.max(jnp.abs(zm.logits(model, params, ids) - zm.logits(model2, params2, ids)))
    print(f"exported to {out_dir}; reloaded logits differ by {float(diff):.1e}")


def pytree_loop(steps: int) -> None:
    def mlp(p, x_Nx1):
        return jnp.tanh(x_Nx1 @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def loss_fn(p, x, y):
        return jnp.mean((mlp(p, x) - y) ** 2)

    k1, k2 = jax.random.split(jax.random.key(1))
    params = {"w1": jax.random.normal(k1, (1, 16)), "b1": jnp.zeros(16),
              "w2": jax.random.normal(k2, (16, 1)) / 4, "b2": jnp.zeros(1)}
    x = jnp.linspace(-3, 3, 128)[:, None]
    y = jnp.sin(x)
    value_and_zo_grad = zo_value_and_grad(loss_fn, eps=1e-3, num_directions=4)
    tx = optax.adam(1e-2)

    @jax.jit
    def train_step(p, opt_state, key):
        loss, grad = value_and_zo_grad(p, key, x, y)  # grad: 4 scalars and a key
        # The estimate as a pytree like p; `zo2_jax.zo.apply_zo_grad(tx, grad, opt_state, p)` does
        # these three lines and also skips a step whose loss is not finite.
        updates, opt_state = tx.update(grad.materialize(p), opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state = tx.init(params)
    print(f"mlp: initial loss {float(loss_fn(params, x, y)):.4f}")
    for t in range(steps):
        params, opt_state, loss = train_step(params, opt_state, jax.random.key(t))
        if (t + 1) % (steps // 4) == 0:
            print(f"mlp step {t + 1}: loss {float(loss):.4f}")
    print(f"mlp: final loss {float(loss_fn(params, x, y)):.4f} (jax.grad never called)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="engine steps")
    p.add_argument("--mlp-steps", type=int, default=2000)
    p.add_argument("--out", help="export folder (default: a temporary one)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        engine_loop(a.steps, a.out or tmp)
    pytree_loop(a.mlp_steps)


if __name__ == "__main__":
    main()
