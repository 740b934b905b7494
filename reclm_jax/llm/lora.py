"""LoRA adapters as a separate pytree over a frozen base, so several adapters share one set of base weights.

    lora = {"layers": {"q": {"a": [L, D, r], "b": [L, r, Hq*Dh]}, ...},   # chosen layer targets only
            "lm_head": {"a": [D, r], "b": [r, V]}}                      # if "lm_head" is a target

A target computes `x @ W + (alpha / rank) * dropout(x) @ a @ b`. `a` starts uniform in +-1/sqrt(in) (PEFT's
Kaiming-uniform default), `b` at zero, so a fresh adapter leaves the model exactly unchanged. Adapters are
float32 (trainable master weights); they are cast to the compute dtype where applied.
PEFT's `lora_A.weight` [r, in] is `a.T` and `lora_B.weight` [out, r] is `b.T`.

    init(key, params, cfg, lora_cfg) -> lora
    merge(params, lora, lora_cfg) -> params      # base weights with the adapter folded in
    linear(x, w, adapter, lora_cfg, dropout_rng, out_dtype=None, matmul_dtype=None)   # used by model.forward
    low_rank(x, a, b, scale, out_dtype)   # linear's adapter path, with a transpose-free backward (custom VJP)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from reclm_jax.llm.config import LAYER_TARGETS, LORA_TARGETS, LlamaConfig, LoraConfig

Params = dict[str, Any]


def target_index(name: str) -> int:
    return LORA_TARGETS.index(name)


def _base_kernel(params: Params, cfg: LlamaConfig, target: str) -> jax.Array:
    if target == "lm_head":
        return params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    return params["layers"][target]


def init(key: jax.Array, params: Params, cfg: LlamaConfig, lora_cfg: LoraConfig) -> Params:
    """A fresh adapter for `lora_cfg.targets` (an exact no-op until trained)."""
    r = lora_cfg.rank
    lora: Params = {}
    for target in lora_cfg.targets:
        shape = _base_kernel(params, cfg, target).shape  # [L, in, out] or [in, out]
        *lead, fan_in, fan_out = shape
        bound = fan_in ** -0.5
        adapter = {
            "a": jax.random.uniform(jax.random.fold_in(key, target_index(target)), (*lead, fan_in, r),
                                    jnp.float32, -bound, bound),
            "b": jnp.zeros((*lead, r, fan_out), jnp.float32),
        }
        if target in LAYER_TARGETS:
            lora.setdefault("layers", {})[target] = adapter
        else:
            lora[target] = adapter
    return lora


def delta(adapter: Params, lora_cfg: LoraConfig) -> jax.Array:
    """The adapter's weight update `scale * a @ b` ([L, in, out] or [in, out], float32)."""
    return lora_cfg.scale * jnp.matmul(adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32))


def merge(params: Params, lora: Params, lora_cfg: LoraConfig) -> Params:
    """Base parameters with the adapter folded in (same structure, dtypes and shardings as `params`, which it
    leaves unchanged). A stacked target is copied once, then folded one layer at a time in place, so the float32
    temporaries are one layer's matrix, not the stack's (Llama-2-7B's stacked MLP matrix is 5.8 GB in float32;
    one program over the stack gets it back from XLA's CPU compiler, which widens the loop to float32)."""
    merged = {**params, "layers": dict(params["layers"])}
    for target, adapter in lora.get("layers", {}).items():
        w = params["layers"][target]
        out = jnp.copy(w)
        for i in range(w.shape[0]):
            layer = {"a": adapter["a"][i], "b": adapter["b"][i]}
            out = _set_layer(out, jnp.int32(i), _fold(w[i], layer, lora_cfg))
        merged["layers"][target] = out
    if "lm_head" in lora:
        if "lm_head" not in params:  # tied embeddings
            raise ValueError("lora.merge: an lm_head adapter cannot be merged into tied embeddings "
                             "(the update would change the input embedding too); drop 'lm_head' from "
                             "LoraConfig.targets or untie the model")
        merged["lm_head"] = _fold(params["lm_head"], lora["lm_head"], lora_cfg)
    return merged


@functools.partial(jax.jit, static_argnums=2)
def _fold(w: jax.Array, adapter: Params, lora_cfg: LoraConfig) -> jax.Array:
    return (w.astype(jnp.float32) + delta(adapter, lora_cfg)).astype(w.dtype)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack: jax.Array, i: jax.Array, layer: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0)  # in place: the stack is donated


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def mixed_dot(x: jax.Array, w: jax.Array, dtype: Any, out_dtype: Any) -> jax.Array:
    """`x @ w` [..., K] x [K, N] from inputs cast to `dtype`, accumulated in float32, returned in `out_dtype`.

    The backward products take `dtype` inputs too: JAX's own rule would multiply the float32 cotangent by a
    float32 copy of `w`, i.e. run the backward at the float32 rate and convert the weights on every step.
    """
    return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32).astype(out_dtype)


def _mixed_dot_fwd(x, w, dtype, out_dtype):
    return mixed_dot(x, w, dtype, out_dtype), (x, w)


def _mixed_dot_bwd(dtype, out_dtype, res, g):
    x, w = res
    g = g.astype(dtype)
    dx = jnp.dot(g, w.astype(dtype).T, preferred_element_type=jnp.float32).astype(x.dtype)
    lead = tuple(range(x.ndim - 1))  # dw is dropped by XLA where w is frozen (the LoRA base weights)
    dw = jnp.tensordot(x.astype(dtype), g, (lead, lead), preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


mixed_dot.defvjp(_mixed_dot_fwd, _mixed_dot_bwd)


def linear(x: jax.Array, w: jax.Array, adapter: Params | None, lora_cfg: LoraConfig | None,
           dropout_rng: jax.Array | None, out_dtype: Any = None, matmul_dtype: Any = None) -> jax.Array:
    """`x @ w` (+ the LoRA path when `adapter` is given); `out_dtype` defaults to x's dtype. `matmul_dtype`
    (None = x's dtype) is the input dtype of the `x @ w` product only (`mixed_dot`); the low-rank path stays
    in x's dtype, so the adapter's gradients keep its precision."""
    if matmul_dtype is None or jnp.dtype(matmul_dtype) == x.dtype:
        y = jnp.dot(x, w.astype(x.dtype), preferred_element_type=out_dtype)
    else:
        y = mixed_dot(x, w, jnp.dtype(matmul_dtype), jnp.dtype(out_dtype or x.dtype))
    if adapter is None:
        return y
    if dropout_rng is not None and lora_cfg.dropout > 0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - lora_cfg.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora_cfg.dropout), 0).astype(x.dtype)
    update = low_rank(x, adapter["a"].astype(x.dtype), adapter["b"].astype(x.dtype), lora_cfg.scale,
                      jnp.dtype(out_dtype or x.dtype))
    return y + update.astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def low_rank(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, out_dtype: Any) -> jax.Array:
    """`scale * (x @ a) @ b` [..., out] from x [..., in], a [in, r], b [r, out]: the LoRA path, with a
    backward that never transposes a [tokens, in] or [tokens, out] array.

    JAX's own rule contracts over the token axes (a's gradient `x^T dlow`, b's `low^T g`) and XLA's CPU
    backend then writes the big operand transposed before the product (for gate/up a [tokens, 1536] copy,
    ~12 % of a SmolLM2 SFT step, BENCHMARKS.md). Here the small [tokens, r] factor is transposed instead;
    the optimisation barriers keep XLA from folding those transposes back into the products.
    """
    return (scale * jnp.dot(jnp.dot(x, a), b, preferred_element_type=out_dtype)).astype(out_dtype)


def _low_rank_fwd(x, a, b, scale, out_dtype):
    low = jnp.dot(x, a)
    return (scale * jnp.dot(low, b, preferred_element_type=out_dtype)).astype(out_dtype), (x, a, b, low)


def _low_rank_bwd(scale, out_dtype, res, g):
    x, a, b, low = res
    r = a.shape[-1]
    g = (scale * g).astype(b.dtype)
    d_low = jnp.dot(g, b.T)
    tokens_first = lambda y: jax.lax.optimization_barrier(y.reshape(-1, r).T)  # noqa: E731  [r, tokens]
    db = jnp.dot(tokens_first(low), g.reshape(-1, g.shape[-1]))
    da = jax.lax.optimization_barrier(jnp.dot(tokens_first(d_low), x.reshape(-1, x.shape[-1]))).T
    return jnp.dot(d_low, a.T).astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)
