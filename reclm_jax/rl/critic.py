"""The critic: the frozen base plus its own LoRA, and a value head Linear(h, w) -> GELU -> Linear(w, 1) on the
final hidden state (w = 64 in the official code).

The head is an ordinary float32 parameter pytree that is part of the trained state, so the optimiser updates
it (the official code builds the head but never hands it to its optimiser: its values stay at random init).

    head = init_head(key, hidden_size, width)
    values = value(head, hidden)          # hidden [..., D] -> values [...] float32
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]


def init_head(key: jax.Array, hidden_size: int, width: int = 64) -> Params:
    """PyTorch nn.Linear's default init: weights and biases uniform in +-1/sqrt(fan_in)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)

    def uniform(k, shape, fan_in):
        bound = fan_in ** -0.5
        return jax.random.uniform(k, shape, jnp.float32, -bound, bound)

    return {
        "w1": uniform(k1, (hidden_size, width), hidden_size), "b1": uniform(k2, (width,), hidden_size),
        "w2": uniform(k3, (width, 1), width), "b2": uniform(k4, (1,), width),
    }


def value(head: Params, hidden: jax.Array) -> jax.Array:
    """Values [...] (float32) from hidden states [..., D]; exact (erf) GELU as PyTorch's nn.GELU()."""
    h = jax.nn.gelu(hidden.astype(jnp.float32) @ head["w1"] + head["b1"], approximate=False)
    return (h @ head["w2"] + head["b2"])[..., 0]
