"""Flax NNX layers of the decoder: one Block and one Outer module for every architecture.

The modules are the definition; engines never hold them. `model.py` splits them into a graph
definition and a plain dict of parameters, and merges the two back inside jitted stage functions.
Shapes in names: B batch, T query length, S key length, D hidden, H heads, G kv heads, K head dim,
P prefix length (keys and values given to every attention layer before the step's own, as a KV
cache holds them: `with_prefix`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zo2_jax.models.config import DecoderConfig
from zo2_jax.models.quant import is_qarray

_INIT = nnx.initializers.normal(0.02)


class Linear(nnx.Linear):
    """`nnx.Linear` (y = x W + b, W an [in, out] kernel) that also runs

    - a kernel kept as a `quant.QArray` (a quantised frozen base): dequantised to the input's
      dtype where it is used, once its input exists (an optimisation barrier orders it), so
      a block's dequantised matrices are made one at a time, not all up front;
    - LoRA adapters (`lora=(rank, scale)`): parameters lora_a [in, r] and lora_b [r, out] beside
      the kernel, and y = x W + b + scale (x A) B, the merged W + scale A B never made.
    """

    def __init__(self, n_in: int, n_out: int, bias: bool, rngs: nnx.Rngs, dtype, lora=None):
        super().__init__(n_in, n_out, use_bias=bias, kernel_init=_INIT, param_dtype=dtype,
                         rngs=rngs)
        self.lora_scale = None
        if lora is not None:
            rank, scale = lora
            self.lora_a = nnx.Param(jnp.zeros((n_in, rank), dtype))
            self.lora_b = nnx.Param(jnp.zeros((rank, n_out), dtype))
            self.lora_scale = float(scale)

    def __call__(self, x):
        kernel = self.kernel.get_value()
        if is_qarray(kernel):
            x, kernel = jax.lax.optimization_barrier((x, kernel))
            w = kernel.value(x.dtype)
            y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
            if self.bias is not None:
                y = y + self.bias[...].astype(y.dtype)
        else:
            y = super().__call__(x)
        if self.lora_scale is not None:
            a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
            y = y + (jnp.matmul(jnp.matmul(x, a), b) * self.lora_scale).astype(y.dtype)
        return y


def _linear(cfg_in: int, cfg_out: int, bias: bool, rngs: nnx.Rngs, dtype, lora=None,
            name: str = "") -> Linear:
    """A Linear, with LoRA adapters when `lora` ({"targets": paths, "rank", "scale"}) names
    `name` (its path in the block, e.g. "attn.q")."""
    adapt = lora is not None and name in lora["targets"]
    return Linear(cfg_in, cfg_out, bias, rngs, dtype,
                  (lora["rank"], lora["scale"]) if adapt else None)


class Norm(nnx.Module):
    """LayerNorm or RMSNorm, always computed in float32 (as Hugging Face does)."""

    def __init__(self, dim: int, kind: str, eps: float, bias: bool, dtype=jnp.float32):
        self.kind, self.eps = kind, eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype)) if bias and kind == "layernorm" else None

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            mean = x32.mean(-1, keepdims=True)
            var = jnp.square(x32 - mean).mean(-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
            if self.bias is not None:
                y = y + self.bias[...].astype(jnp.float32)
            return y.astype(x.dtype)
        var = jnp.square(x32).mean(-1, keepdims=True)
        # LLaMA multiplies by the scale after casting back to the input dtype.
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * y


def _activation(name: str, x):
    if name == "relu":
        return jax.nn.relu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "gelu_new":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)


def rotate(x_BxTxHxK, cos_BxTxK, sin_BxTxK):
    """Rotary embedding in the Hugging Face (rotate_half) layout."""
    half = x_BxTxHxK.shape[-1] // 2
    x1, x2 = x_BxTxHxK[..., :half], x_BxTxHxK[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BxTxK[:, :, None, :], sin_BxTxK[:, :, None, :]
    return (x_BxTxHxK * cos + rotated * sin).astype(x_BxTxHxK.dtype)


def attend(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS, impl: str = "xla"):
    """Softmax attention with grouped-query heads; logits and softmax in float32.

    `impl="cudnn"` uses jax.nn.dot_product_attention's fused kernel (GPU, bf16/fp16 only).
    """
    B, T, H, K = q_BxTxHxK.shape
    G = k_BxSxGxK.shape[2]
    scale = K ** -0.5
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask_Bx1xTxS,
                                            scale=scale, implementation="cudnn")
    q = q_BxTxHxK.reshape(B, T, G, H // G, K)
    att_BxGxRxTxS = jnp.einsum("btgrk,bsgk->bgrts", q, k_BxSxGxK,
                               preferred_element_type=jnp.float32) * scale
    neg = jnp.finfo(jnp.float32).min
    att_BxGxRxTxS = jnp.where(mask_Bx1xTxS[:, :, None], att_BxGxRxTxS, neg)
    probs = jax.nn.softmax(att_BxGxRxTxS, axis=-1).astype(v_BxSxGxK.dtype)
    out = jnp.einsum("bgrts,bsgk->btgrk", probs, v_BxSxGxK)
    return out.reshape(B, T, H, K)


def check_prefix(prefix, num_kv_heads: int, head_dim: int):
    """(k_PxGK, v_PxGK) from `prefix`, a pair of arrays of one shape [P, G*K] with P >= 1;
    raises a ValueError naming the expected and the given shapes otherwise (shapes are static,
    so this runs once, at trace time)."""
    width = num_kv_heads * head_dim
    want = (f"a prefix (keys, values) of two arrays [P, {width}] (P >= 1 virtual tokens; "
            f"{num_kv_heads} kv heads x head dim {head_dim})")
    if not isinstance(prefix, (tuple, list)) or len(prefix) != 2:
        raise ValueError(f"expected {want}, got {type(prefix).__name__}")
    k, v = prefix
    ks, vs = tuple(np.shape(k)), tuple(np.shape(v))
    if len(ks) != 2 or ks[0] < 1 or ks[1] != width or vs != ks:
        raise ValueError(f"expected {want}, got keys {ks} and values {vs}")
    return k, v


def with_prefix(k_BxTxGxK, v_BxTxGxK, mask_Bx1xTxT, prefix):
    """The step's keys, values and mask with P prefix entries in front: the prefix (k_PxGK, v_PxGK)
    is broadcast over the batch and always visible (True mask columns, also for padded queries),
    as if a KV cache already held P tokens. Returns (k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS), S = P+T."""
    B, _, G, K = k_BxTxGxK.shape
    k_PxGK, v_PxGK = check_prefix(prefix, G, K)
    P = k_PxGK.shape[0]

    def put(x_PxGK, y_BxTxGxK):
        x = jnp.broadcast_to(x_PxGK.reshape(1, P, G, K).astype(y_BxTxGxK.dtype), (B, P, G, K))
        return jnp.concatenate([x, y_BxTxGxK], axis=1)
    seen_Bx1xTxP = jnp.ones(mask_Bx1xTxT.shape[:-1] + (P,), bool)
    mask_Bx1xTxS = jnp.concatenate([seen_Bx1xTxP, mask_Bx1xTxT.astype(bool)], axis=-1)
    return put(k_PxGK, k_BxTxGxK), put(v_PxGK, v_BxTxGxK), mask_Bx1xTxS


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs, dtype, lora=None):
        D, H, G, K = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.q = _linear(D, H * K, cfg.qkv_bias, rngs, dtype, lora, "attn.q")
        self.k = _linear(D, G * K, cfg.qkv_bias, rngs, dtype, lora, "attn.k")
        self.v = _linear(D, G * K, cfg.qkv_bias, rngs, dtype, lora, "attn.v")
        self.o = _linear(H * K, D, cfg.out_bias, rngs, dtype, lora, "attn.o")
        if cfg.qk_norm:
            self.q_norm = Norm(K, "rmsnorm", cfg.norm_eps, False, dtype)
            self.k_norm = Norm(K, "rmsnorm", cfg.norm_eps, False, dtype)

    def project(self, h_BxTxD, ctx):
        """(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK): projected, q/k-normed and rotated, i.e. the keys
        and values a KV cache holds for these tokens."""
        cfg = self.cfg
        B, T, _ = h_BxTxD.shape
        q = self.q(h_BxTxD).reshape(B, T, cfg.num_heads, cfg.head_dim)
        k = self.k(h_BxTxD).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = self.v(h_BxTxD).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.positions == "rope":
            q = rotate(q, ctx["cos"].astype(q.dtype), ctx["sin"].astype(q.dtype))
            k = rotate(k, ctx["cos"].astype(k.dtype), ctx["sin"].astype(k.dtype))
        return q, k, v

    def __call__(self, h_BxTxD, ctx, impl: str, prefix=None):
        """Self-attention of the step's tokens; with `prefix` (k_PxGK, v_PxGK) they also attend
        to P prefix entries (`with_prefix`)."""
        cfg = self.cfg
        B, T, _ = h_BxTxD.shape
        q, k, v = self.project(h_BxTxD, ctx)
        mask = ctx["mask"]
        if prefix is not None:
            k, v, mask = with_prefix(k, v, mask, prefix)
        out = attend(q, k, v, mask, impl)
        return self.o(out.reshape(B, T, cfg.num_heads * cfg.head_dim))


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs, dtype, lora=None):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.activation, self.gated = cfg.activation, cfg.gated_mlp
        if cfg.gated_mlp:
            self.gate = _linear(D, F, cfg.mlp_bias, rngs, dtype, lora, "mlp.gate")
            self.up = _linear(D, F, cfg.mlp_bias, rngs, dtype, lora, "mlp.up")
            self.down = _linear(F, D, cfg.mlp_bias, rngs, dtype, lora, "mlp.down")
        else:
            self.fc1 = _linear(D, F, cfg.mlp_bias, rngs, dtype, lora, "mlp.fc1")
            self.fc2 = _linear(F, D, cfg.mlp_bias, rngs, dtype, lora, "mlp.fc2")

    def __call__(self, h):
        if self.gated:
            return self.down(_activation(self.activation, self.gate(h)) * self.up(h))
        return self.fc2(_activation(self.activation, self.fc1(h)))


class Block(nnx.Module):
    """One transformer layer; pre-norm (GPT-2, LLaMA, most OPT) or post-norm (OPT-350m)."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs, dtype=jnp.float32, lora=None):
        """`lora`: None, or {"targets": the adapted matrices' paths ("attn.q", "mlp.fc1", ...),
        "rank", "scale"}: those Linears carry LoRA adapters (`Linear`)."""
        self.pre_norm = cfg.pre_norm
        self.ln_attn = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, cfg.norm_bias, dtype)
        self.attn = Attention(cfg, rngs, dtype, lora)
        self.ln_mlp = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, cfg.norm_bias, dtype)
        self.mlp = MLP(cfg, rngs, dtype, lora)

    def __call__(self, h_BxTxD, ctx, impl: str = "xla", prefix=None):
        """The layer's output; `prefix` (k_PxGK, v_PxGK): keys and values its attention sees
        before the step's own (see `with_prefix`)."""
        if self.pre_norm:
            h_BxTxD = h_BxTxD + self.attn(self.ln_attn(h_BxTxD), ctx, impl, prefix)
            return h_BxTxD + self.mlp(self.ln_mlp(h_BxTxD))
        h_BxTxD = self.ln_attn(h_BxTxD + self.attn(h_BxTxD, ctx, impl, prefix))
        return self.ln_mlp(h_BxTxD + self.mlp(h_BxTxD))

    def keys_values(self, h_BxTxD, ctx):
        """(k_BxTxGxK, v_BxTxGxK): what this layer's KV cache holds for the tokens h."""
        x = self.ln_attn(h_BxTxD) if self.pre_norm else h_BxTxD
        _, k, v = self.attn.project(x, ctx)
        return k, v


class Outer(nnx.Module):
    """Everything outside the blocks: embeddings, optional projections, final norm, LM head."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.embed_dim, embedding_init=_INIT,
                               param_dtype=dtype, rngs=rngs)
        if cfg.positions == "learned":
            self.pos_embed = nnx.Embed(cfg.max_positions + cfg.position_offset, cfg.hidden_size,
                                       embedding_init=_INIT, param_dtype=dtype, rngs=rngs)
        if cfg.embed_dim != cfg.hidden_size:
            self.project_in = _linear(cfg.embed_dim, cfg.hidden_size, False, rngs, dtype)
            self.project_out = _linear(cfg.hidden_size, cfg.embed_dim, False, rngs, dtype)
        if cfg.final_norm:
            self.final_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, cfg.norm_bias, dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg.embed_dim, cfg.vocab_size, False, rngs, dtype)

    def embed_tokens(self, input_ids_BxT, positions_BxT):
        cfg = self.cfg
        h = self.embed(input_ids_BxT)
        if cfg.embed_dim != cfg.hidden_size:
            h = self.project_in(h)
        if cfg.positions == "learned":
            h = h + self.pos_embed(positions_BxT + cfg.position_offset)
        return h

    def logits(self, h_BxTxD):
        cfg = self.cfg
        if cfg.final_norm:
            h_BxTxD = self.final_norm(h_BxTxD)
        if cfg.embed_dim != cfg.hidden_size:
            h_BxTxD = self.project_out(h_BxTxD)
        if cfg.tie_embeddings:
            return self.embed.attend(h_BxTxD)
        return self.lm_head(h_BxTxD)
