"""Ranking math shared by evaluation and the query API."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def ranks_among(scores, items, eligible=None):
    """0-based rank of each given item among the eligible items, ties broken by lower item id first.

    scores float [B, N]; items int [B, m]; eligible bool [B, N] or None (all items). The order is that of a
    stable descending sort, so it agrees with `jax.lax.top_k`. An item that is itself not eligible is ranked
    as if it were (counting only eligible items above it).
    """
    n = scores.shape[-1]
    own = jnp.take_along_axis(scores, items, axis=-1)[..., None]  # [B, m, 1]
    ids = jnp.arange(n)
    above = (scores[:, None, :] > own) | ((scores[:, None, :] == own) & (ids < items[..., None]))
    if eligible is not None:
        above &= eligible[:, None, :]
    return jnp.sum(above, axis=-1, dtype=jnp.int32)


def hit_ndcg(ranks: np.ndarray, ks) -> dict[str, float]:
    """HR@k and NDCG@k for one target per example, given its 0-based rank: NDCG@k = 1/log2(rank+2) if rank < k."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no examples to evaluate")
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = float(np.mean(hit))
        out[f"NDCG@{k}"] = float(np.mean(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)))
    return out
