"""SASRec (Kang & McAuley 2018) in Flax NNX: causal self-attention over a user's recent items.

Inputs are left-padded token arrays [B, L] where token 0 is padding and token i+1 is dataset item i, so
the most recent item always sits at position L-1. Scores are dot products with the item embeddings.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from reclm_jax.teacher.config import ModelConfig

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu}


class CausalSelfAttention(nnx.Module):
    """Multi-head self-attention under a given boolean mask [B, L, L] (True: may attend)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        self.num_heads = cfg.num_heads
        self.qkv = nnx.Linear(cfg.width, 3 * cfg.width, kernel_init=init, rngs=rngs)
        self.out = nnx.Linear(cfg.width, cfg.width, kernel_init=init, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x, mask, *, deterministic: bool, rngs: nnx.Rngs | None):
        b, length, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, length, 3 * self.num_heads, d // self.num_heads), 3, axis=2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.num_heads)
        weights = jax.nn.softmax(jnp.where(mask[:, None], logits, -1e9), axis=-1)
        weights = self.dropout(weights, deterministic=deterministic, rngs=rngs)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, d))


class Block(nnx.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        d = cfg.width
        self.attn_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.attn = CausalSelfAttention(cfg, rngs)
        self.ffn_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.ffn_in = nnx.Linear(d, cfg.ffn_dim, kernel_init=init, rngs=rngs)
        self.ffn_out = nnx.Linear(cfg.ffn_dim, d, kernel_init=init, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)
        self.act = ACTIVATIONS[cfg.activation]

    def __call__(self, x, mask, *, deterministic: bool, rngs: nnx.Rngs | None):
        drop = lambda y: self.dropout(y, deterministic=deterministic, rngs=rngs)  # noqa: E731
        h = self.attn_norm(x)
        x = x + drop(self.attn(h, mask=mask, deterministic=deterministic, rngs=rngs))
        h = self.ffn_out(drop(self.act(self.ffn_in(self.ffn_norm(x)))))
        return x + drop(h)


class SASRec(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_items: int, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        self.cfg = cfg
        self.num_items = num_items
        self.item_embed = nnx.Embed(num_items + 1, cfg.width, embedding_init=init, rngs=rngs)
        self.pos_embed = nnx.Embed(cfg.max_len, cfg.width, embedding_init=init, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_blocks)])
        self.final_norm = nnx.LayerNorm(cfg.width, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, tokens: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
        """tokens int [B, L] (L <= max_len) -> hidden states [B, L, width]; position t sees tokens <= t only."""
        length = tokens.shape[-1]
        valid = (tokens > 0)[..., None]
        # Absolute positions of the left-padded window: the newest item always gets position max_len-1.
        pos = jnp.arange(self.cfg.max_len - length, self.cfg.max_len)
        x = self.item_embed(tokens) * math.sqrt(self.cfg.width) + self.pos_embed(pos)
        x = self.dropout(x, deterministic=deterministic, rngs=rngs) * valid
        causal = jnp.tril(jnp.ones((length, length), bool))
        # Keys must be real items; each position may always see itself so that padded rows never attend to nothing.
        mask = (causal & (tokens > 0)[:, None, :]) | jnp.eye(length, dtype=bool)
        for block in self.blocks:
            x = block(x, mask, deterministic=deterministic, rngs=rngs) * valid
        return self.final_norm(x)

    def item_scores(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., width] -> scores [..., num_items] for dataset items 0..num_items-1."""
        return hidden @ self.item_embed.embedding[1:].T

    def token_scores(self, hidden: jax.Array, tokens: jax.Array) -> jax.Array:
        """hidden [..., width], tokens int [...] -> the score of each given token's item."""
        return jnp.sum(hidden * self.item_embed(tokens), axis=-1)
