"""PPO's math as small pure functions over [batch, time] arrays with a response mask; all jit-able.

Conventions: `mask[b, t]` is 1 on response tokens and 0 on prompt and padding. Responses are contiguous,
so the token after the last response token has mask 0 and bootstraps nothing (the episode ends at EOS or
at the length bound). Means and variances are taken over masked tokens only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Unbiased variance over masked elements (Bessel-corrected, as TRL does)."""
    n = mask.sum()
    mean = masked_mean(x, mask)
    return ((x - mean) ** 2 * mask).sum() / jnp.maximum(n - 1.0, 1.0)


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over masked elements; with shift_mean=False the mean is added back (scale only),
    which is how rewards are whitened so that their sign survives."""
    mean = masked_mean(x, mask)
    out = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    return (out if shift_mean else out + mean) * mask


def token_rewards(
    scores: jax.Array, logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array, kl_coef: float
) -> tuple[jax.Array, jax.Array]:
    """Per-token reward of Eq. 6: the placed item/list scores minus kl_coef times the per-token KL estimate
    log pi(y_t) - log pi_ref(y_t). Returns (rewards, kl), both zero off the mask."""
    kl = (logprobs - ref_logprobs) * mask
    return (scores - kl_coef * kl) * mask, kl


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation as a reverse scan over time.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t;  A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}.
    Returns (advantages, returns = advantages + values), both zero off the mask.
    """
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    deltas = rewards + gamma * next_values * next_mask - values

    def step(carry, xs):
        delta, m_next = xs
        adv = delta + gamma * lam * m_next * carry
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros_like(rewards[:, 0]), (deltas.T, next_mask.T), reverse=True)
    adv = adv.T * mask
    return adv, (adv + values) * mask


def group_advantages(rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """Leave-one-out advantages of k >= 2 responses to each prompt, rewards and mask [G, k, R]: response i's
    return (the sum of its per-token rewards) minus the mean return of the prompt's other responses, on every
    token of response i. What a prompt gives all its answers alike (a user whose lists the teacher scores high)
    cancels; what is left is how this answer did against its siblings."""
    totals = (rewards * mask).sum(-1)  # [G, k]
    k = totals.shape[1]
    baseline = (totals.sum(1, keepdims=True) - totals) / (k - 1)
    return (totals - baseline)[..., None] * mask


def policy_loss(
    logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, mask: jax.Array, clip_eps: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-eps, 1+eps)), r = pi/pi_old.

    Also returns the clip fraction and the approximate KL(pi_old || pi) with the k3 estimator
    (r - 1) - log r, which is unbiased and never negative; PPO stops an epoch early when it grows.
    """
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    stats = {
        "clip_frac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
    }
    return loss, stats


def value_loss(
    values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, clip: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss: 0.5 * mean over tokens of max((V - R)^2, (V_old + clip(V - V_old) - R)^2)."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    loss = 0.5 * masked_mean(jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
    return loss, {"value_clip_frac": masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).astype(jnp.float32), mask)}


def entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over masked tokens of the entropy of softmax(logits) (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return masked_mean(-(jnp.exp(logp) * logp).sum(-1), mask)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var[R - V] / Var[R] over masked tokens (1 is a perfect critic, <= 0 no better than a constant)."""
    return 1.0 - masked_var(returns - values, mask) / jnp.maximum(masked_var(returns, mask), 1e-8)
