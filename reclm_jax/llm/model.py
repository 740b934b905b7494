"""The Llama-2 decoder as pure functions over an explicit parameter pytree.

Parameters are a plain dict; kernels are `[in, out]` (Hugging Face stores `[out, in]`: import/export transpose),
layers are stacked on a leading axis L and run with `jax.lax.scan`:

    {"embed": [V, D],
     "layers": {"attn_norm": [L, D], "q": [L, D, Hq*Dh], "k": [L, D, Hkv*Dh], "v": [L, D, Hkv*Dh],
                "o": [L, Hq*Dh, D], "mlp_norm": [L, D], "gate": [L, D, F], "up": [L, D, F], "down": [L, F, D]},
     "final_norm": [D],
     "lm_head": [D, V]}        # absent when cfg.tie_embeddings (logits = h @ embed.T)

`param_shapes(cfg)` gives this tree with shapes (for loaders to check against); `init_params(key, cfg)` fills it
randomly. Q and K columns are in the Hugging Face rotate-half layout (each head's first half of Dh pairs with
its second half), so HF import/export needs no permutation.

    forward(params, cfg, tokens [B,T] int32, positions [B,T] int32, *, attention_mask=None [B,T] bool,
            segment_ids=None [B,T] int32, shared_prefix=False, lora=None, lora_cfg=None, cache=None,
            dropout_rng=None, last_only=False)
        -> (logits [B,T,V] float32 ([B,1,V] if last_only), hidden [B,T,D] (after the final norm), cache)

`positions` are RoPE positions that count real tokens only (`positions_from_mask`); `attention_mask` marks
real tokens (None = all real). Without a cache, attention is causal over the T tokens given, and with
`segment_ids` only between tokens of the same segment (several samples packed in one row, each with its own
positions); with `shared_prefix` also from every segment to segment 0, a prompt that the row's other segments
all continue (several responses to one prompt in one row, each positioned after the prompt). With a cache
(`init_cache(cfg, batch, max_len)`), the T tokens are written at slots `cache["index"] ...` and attend to all
earlier real slots; the returned cache has them added. Cache pytree:

    {"k": [L, B, Hkv, Dh, S], "v": [L, B, Hkv, S, Dh],   # in cfg.compute_dtype
     "mask": [B, S] bool,                               # slot holds a real token
     "index": int32 scalar}                             # next slot to write (shared by the batch)

The cache is head-major with keys transposed, so that both attention products are plain batched matrix products
over contiguous [Dh, S] and [S, Dh] blocks (`cached_attention`): on XLA's CPU backend a [B, S, Hkv, Dh] cache made
decode attention 1.6-1.9x slower (`benchmarks/bench_decode_attention.py`).

Inside `jax.set_mesh(mesh)` the residual stream and the cache are pinned to the mesh's batch axes
(`sharding.constrain_batch`); the weights' layout comes from their own placement.

`lora` is a separate adapter pytree (see `lora.py`), `lora_cfg` its `LoraConfig`; `dropout_rng` turns on
LoRA dropout (training).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from reclm_jax.llm import lora as lora_lib
from reclm_jax.llm.sharding import constrain_batch
from reclm_jax.llm.config import LlamaConfig, LoraConfig

Params = dict[str, Any]
_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def param_shapes(cfg: LlamaConfig) -> Params:
    d, f, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {
        "embed": (v, d),
        "layers": {
            "attn_norm": (n, d), "q": (n, d, q_out), "k": (n, d, kv_out), "v": (n, d, kv_out),
            "o": (n, q_out, d), "mlp_norm": (n, d), "gate": (n, d, f), "up": (n, d, f), "down": (n, f, d),
        },
        "final_norm": (d,),
    }
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (d, v)
    return shapes


def init_params(key: jax.Array, cfg: LlamaConfig, std: float = 0.02) -> Params:
    """Random weights N(0, std) (Hugging Face's `initializer_range`), norms at one, in cfg.param_dtype."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))[0]]
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(cfg.param_dtype)
    out = [jnp.ones(s, dtype) if "norm" in p else (std * jax.random.normal(k, s, jnp.float32)).astype(dtype)
           for p, s, k in zip(paths, leaves, keys)]
    return jax.tree.unflatten(treedef, out)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> dict[str, jax.Array]:
    """An empty KV cache of `max_len` slots (dtype defaults to cfg.compute_dtype)."""
    lead = (cfg.num_layers, batch, cfg.num_kv_heads)
    dtype = jnp.dtype(dtype or cfg.compute_dtype)
    # Under a mesh the cache is split over the batch axes like the prompts (see `sharding.constrain_batch`).
    kv = lambda *shape: constrain_batch(jnp.zeros(lead + shape, dtype), dim=1)  # noqa: E731
    return {"k": kv(cfg.head_dim, max_len), "v": kv(max_len, cfg.head_dim),
            "mask": constrain_batch(jnp.zeros((batch, max_len), bool)), "index": jnp.zeros((), jnp.int32)}


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions counting real tokens only (left padding gets 0 and is masked anyway)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, Dh] (float32) for the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, H, Dh]: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def _masked_probs(scores: jax.Array, mask: jax.Array, dtype: Any) -> jax.Array:
    """Softmax over the last axis of float32 scores where `mask` (broadcast to them) holds, in `dtype`."""
    # A finite minimum keeps fully masked rows (left padding) finite instead of NaN.
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q [B,T,Hq,Dh], k/v [B,S,Hkv,Dh], mask [B,T,S] -> [B,T,Hq*Dh].

    Query head h reads kv head h // (Hq / Hkv), as Hugging Face's `repeat_kv` does.
    """
    b, t, hq, dh = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * dh ** -0.5
    probs = _masked_probs(scores, mask[:, None, None], v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq * dh)


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
    """`attention` over one layer's cache. q [B,T,Hq,Dh], keys [B,Hkv,Dh,S], values [B,Hkv,S,Dh], mask [B,T,S]
    -> [B,T,Hq*Dh].

    A kv head's T x (Hq / Hkv) queries form the rows of one matrix, so each product is [T*G, Dh] x [Dh, S].
    """
    b, t, hq, dh = q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    q = q.reshape(b, t, hkv, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, hkv, t * g, dh)
    scores = jnp.einsum("bkmd,bkds->bkms", q, keys, preferred_element_type=jnp.float32) * dh ** -0.5
    rows_mask = jnp.repeat(mask, g, axis=1)[:, None]  # [B, 1, T*G, S], rows in q's (t, g) order
    probs = _masked_probs(scores, rows_mask, values.dtype)
    out = jnp.einsum("bkms,bksd->bkmd", probs, values)
    return out.reshape(b, hkv, t, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, t, hq * dh)


def _decoder_layer(cfg: LlamaConfig, lora_cfg: LoraConfig | None, h, layer, adapter, rng, cos, sin, attend):
    """One pre-norm block. `attend(q, k, v) -> (attention output [B,T,Hq*Dh], aux)` decides what the queries
    attend to; returns (h, aux)."""
    b, t, _ = h.shape

    def linear(name, x):
        return lora_lib.linear(x, layer[name], adapter.get(name), lora_cfg,
                               None if rng is None else jax.random.fold_in(rng, lora_lib.target_index(name)),
                               matmul_dtype=cfg.matmul_dtype)

    x = rms_norm(h, layer["attn_norm"], cfg.rms_norm_eps)
    q = linear("q", x).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = linear("k", x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = linear("v", x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out, aux = attend(q, k, v)
    h = h + linear("o", out)
    x = rms_norm(h, layer["mlp_norm"], cfg.rms_norm_eps)
    return constrain_batch(h + linear("down", jax.nn.silu(linear("gate", x)) * linear("up", x))), aux


def forward(
    params: Params,
    cfg: LlamaConfig,
    tokens: jax.Array,
    positions: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    shared_prefix: bool = False,
    lora: Params | None = None,
    lora_cfg: LoraConfig | None = None,
    cache: dict[str, jax.Array] | None = None,
    dropout_rng: jax.Array | None = None,
    last_only: bool = False,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array] | None]:
    """Logits (float32), final hidden states and the updated cache; see the module docstring."""
    if lora is not None and lora_cfg is None:
        raise ValueError("forward: lora parameters given without lora_cfg")
    cdt = jnp.dtype(cfg.compute_dtype)
    b, t = tokens.shape
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), bool)
    attention_mask = attention_mask.astype(bool)
    # The residual stream stays split over the batch axes (true FSDP), whatever the weights' layout.
    h = constrain_batch(jnp.take(params["embed"], tokens, axis=0).astype(cdt))
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    layer_adapters = {} if lora is None else lora.get("layers", {})
    use_dropout = dropout_rng is not None and lora is not None and lora_cfg.dropout > 0
    layer_rngs = jax.random.split(dropout_rng, cfg.num_layers) if use_dropout else None
    lm_rng = jax.random.fold_in(dropout_rng, cfg.num_layers) if use_dropout else None

    if cache is None:
        causal = jnp.tril(jnp.ones((t, t), bool))
        mask = causal[None] & attention_mask[:, None, :]
        if segment_ids is not None:
            visible = segment_ids[:, :, None] == segment_ids[:, None, :]
            if shared_prefix:
                visible |= (segment_ids == 0)[:, None, :]
            mask &= visible

        def block(h, xs):
            layer, adapter, rng = xs
            return _decoder_layer(cfg, lora_cfg, h, layer, adapter, rng, cos, sin,
                                  lambda q, k, v: (attention(q, k, v, mask), None))

        if cfg.remat != "none":
            block = jax.checkpoint(block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        h, _ = jax.lax.scan(block, h, (params["layers"], layer_adapters, layer_rngs))
        new_cache = None
    else:
        if segment_ids is not None:
            raise ValueError("forward: segment_ids (packed rows) are for training passes, not with a cache")
        index = cache["index"]
        cache_mask = jax.lax.dynamic_update_slice(cache["mask"], attention_mask, (0, index))
        slots = jnp.arange(cache_mask.shape[1])
        mask = cache_mask[:, None, :] & (slots[None, None, :] <= index + jnp.arange(t)[None, :, None])

        def block(carry, xs):
            h, cache_k, cache_v = carry
            layer, adapter, rng, i = xs

            def attend(q, k, v):
                # Write this layer's new keys/values in place, then attend over the whole cache row.
                k = k.transpose(0, 2, 3, 1)[None].astype(cache_k.dtype)  # [1, B, Hkv, Dh, T]
                v = v.transpose(0, 2, 1, 3)[None].astype(cache_v.dtype)  # [1, B, Hkv, T, Dh]
                ck = jax.lax.dynamic_update_slice(cache_k, k, (i, 0, 0, 0, index))
                cv = jax.lax.dynamic_update_slice(cache_v, v, (i, 0, 0, index, 0))
                keys = jax.lax.dynamic_index_in_dim(ck, i, keepdims=False).astype(cdt)
                values = jax.lax.dynamic_index_in_dim(cv, i, keepdims=False).astype(cdt)
                return cached_attention(q, keys, values, mask), (ck, cv)

            h, (cache_k, cache_v) = _decoder_layer(cfg, lora_cfg, h, layer, adapter, rng, cos, sin, attend)
            return (h, cache_k, cache_v), None

        xs = (params["layers"], layer_adapters, layer_rngs, jnp.arange(cfg.num_layers))
        (h, cache_k, cache_v), _ = jax.lax.scan(block, (h, cache["k"], cache["v"]), xs)
        new_cache = {"k": cache_k, "v": cache_v, "mask": cache_mask, "index": index + t}

    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    logits = lm_logits(params, cfg, h[:, -1:] if last_only else h, lora, lora_cfg, lm_rng)
    return logits, h, new_cache


def lm_logits(params: Params, cfg: LlamaConfig, hidden: jax.Array, lora: Params | None = None,
              lora_cfg: LoraConfig | None = None, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Float32 logits [..., V] from final hidden states (tied: the transposed embedding)."""
    kernel = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    adapter = None if lora is None else lora.get("lm_head")
    return lora_lib.linear(hidden, kernel, adapter, lora_cfg, dropout_rng, out_dtype=jnp.float32,
                           matmul_dtype=cfg.matmul_dtype)

