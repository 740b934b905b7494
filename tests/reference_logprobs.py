"""Scoring whole sequences through the model's all-position logits: the straightforward path that the SFT loss
(response positions only) and PPO's log-probs and values are tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from reclm_jax.llm import model


def token_logprobs(params, cfg, tokens, attention_mask=None, *, lora=None, lora_cfg=None, dropout_rng=None):
    """log p(tokens[:, t+1] | tokens[:, :t+1]) [B, T-1] float32, and hidden [B, T, D] (`hidden[:, t]` predicts
    token t+1). Left- or right-padded batches (positions come from the mask); entries whose target is padding
    are meaningless: mask them with `attention_mask[:, 1:]`."""
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, bool)
    logits, hidden, _ = model.forward(params, cfg, tokens, model.positions_from_mask(attention_mask),
                                      attention_mask=attention_mask, lora=lora, lora_cfg=lora_cfg,
                                      dropout_rng=dropout_rng)
    logits = logits[:, :-1]
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1), hidden
