"""The trained teacher in-process: batched, jitted, deterministic top-k / rank / score queries.

Histories are lists of 0-based dataset item ids, oldest first; only the most recent `max_len` are used.
Queries run in fixed-size batches (`eval.batch_size`, padded); each batch holds histories of one length bucket
(`model.length_buckets` of them), so there are a handful of shapes, each compiled once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reclm_jax.teacher import checkpoint
from reclm_jax.teacher.config import TeacherConfig
from reclm_jax.teacher.metrics import ranks_among
from reclm_jax.teacher.sasrec import SASRec


def build_model(cfg: TeacherConfig, num_items: int) -> SASRec:
    return SASRec(cfg.model, num_items, nnx.Rngs(params=cfg.seed))


def abstract_params(cfg: TeacherConfig, num_items: int):
    """(graphdef, pure-dict params of shape structs) without allocating weights."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, num_items)))
    return graphdef, nnx.to_pure_dict(state)


def encode_histories(histories: Sequence[Sequence[int]], max_len: int, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (tokens int32 [B, max_len]: the most recent max_len items left-padded, item i as i+1;
    seen bool [B, num_items]: the items of each whole history)."""
    tokens = np.zeros((len(histories), max_len), np.int32)
    seen = np.zeros((len(histories), num_items), bool)
    for b, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64).reshape(-1)
        if h.size and (h.min() < 0 or h.max() >= num_items):
            raise ValueError(f"history {b} holds item ids outside 0..{num_items - 1}")
        seen[b, h] = True
        recent = h[-max_len:]
        if recent.size:
            tokens[b, max_len - recent.size:] = recent + 1
    return tokens, seen


def _last_scores(graphdef, params, tokens):
    model = nnx.merge(graphdef, params)
    return model.item_scores(model(tokens)[:, -1])


@functools.partial(jax.jit, static_argnums=(0,))
def _scores(graphdef, params, tokens):
    return _last_scores(graphdef, params, tokens)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _topk(graphdef, params, tokens, eligible, k):
    scores = jnp.where(eligible, _last_scores(graphdef, params, tokens), -jnp.inf)
    values, ids = jax.lax.top_k(scores, k)
    return jnp.where(values > -jnp.inf, ids, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,))
def _ranks(graphdef, params, tokens, items, eligible):
    return ranks_among(_last_scores(graphdef, params, tokens), items, eligible)


class Teacher:
    def __init__(self, cfg: TeacherConfig, num_items: int, params):
        self.cfg = cfg
        self.num_items = num_items
        self.batch_size = cfg.eval.batch_size
        self._graphdef, _ = abstract_params(cfg, num_items)
        self._params = params

    @classmethod
    def load(cls, path: str | Path) -> "Teacher":
        """The best parameters of a trained teacher directory."""
        path = Path(path)
        cfg, info = checkpoint.read_info(path)
        _, like = abstract_params(cfg, info["num_items"])
        return cls(cfg, info["num_items"], checkpoint.load_best(path, like))

    # ---- batching ---------------------------------------------------------------------------------
    def _batches(self, histories, *row_arrays) -> Iterator[tuple]:
        """Yield (rows, tokens, seen, *row_arrays[rows]) per batch of up to `batch_size` histories.

        A batch holds histories of one length bucket only, so each history's padded input, and hence its
        result, does not depend on the other histories in the call. `rows` are the batch's positions in the
        input (write back with out[rows] = result[:len(rows)]); short batches repeat their first row.
        """
        if isinstance(histories, np.ndarray) and histories.ndim == 1 and histories.dtype != object:
            raise ValueError("histories must be a sequence of histories (one list of item ids per user)")
        cfg, q = self.cfg.model, self.batch_size
        buckets = np.array([cfg.padded_length(min(len(h), cfg.max_len)) for h in histories], np.int64)
        for length in np.unique(buckets):
            members = np.flatnonzero(buckets == length)
            for start in range(0, len(members), q):
                rows = members[start:start + q]
                tokens, seen = encode_histories([histories[i] for i in rows], int(length), self.num_items)
                pad = np.concatenate([np.arange(len(rows)), np.zeros(q - len(rows), int)])
                yield (rows, tokens[pad], seen[pad], *(a[rows][pad] for a in row_arrays))

    def _row_mask(self, mask, batch: int, name: str) -> np.ndarray:
        """A bool mask [num_items] or [B, num_items] as [B, num_items]."""
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape not in ((self.num_items,), (batch, self.num_items)):
            raise ValueError(f"{name} must be a bool array of shape ({self.num_items},) or ({batch}, {self.num_items}), "
                             f"got {mask.dtype} {mask.shape}")
        return np.broadcast_to(mask, (batch, self.num_items))

    # ---- queries ----------------------------------------------------------------------------------
    def scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [B, num_items]: the teacher's score of every item as the next one after each history."""
        out = np.zeros((len(histories), self.num_items), np.float32)
        for rows, tok, _ in self._batches(histories):
            out[rows] = np.asarray(_scores(self._graphdef, self._params, tok))[: len(rows)]
        return out

    def topk(self, histories: Sequence[Sequence[int]], k: int, include: np.ndarray | None = None,
             exclude: np.ndarray | None = None) -> np.ndarray:
        """int32 [B, k]: the k best items per history, best first, never one from the history itself.

        include (+C) keeps only the items it marks, exclude (-C) drops the ones it marks; each is a bool mask
        [num_items] or [B, num_items]. Positions left without an eligible item are -1.
        """
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        b = len(histories)
        eligible = np.ones((b, self.num_items), bool)
        if include is not None:
            eligible &= self._row_mask(include, b, "include")
        if exclude is not None:
            eligible &= ~self._row_mask(exclude, b, "exclude")
        kk = min(k, self.num_items)
        out = np.full((b, k), -1, np.int32)
        for rows, tok, seen, elig in self._batches(histories, eligible) if kk else ():
            out[rows, :kk] = np.asarray(_topk(self._graphdef, self._params, tok, elig & ~seen, kk))[: len(rows)]
        return out

    def rank(self, histories: Sequence[Sequence[int]], items: np.ndarray) -> np.ndarray:
        """int32 [B, m]: 0-based rank of each given item among ALL items by score (ties: lower id first)."""
        items = np.asarray(items)
        if items.ndim != 2 or items.shape[0] != len(histories) or not np.issubdtype(items.dtype, np.integer):
            raise ValueError(f"items must be an int array [{len(histories)}, m], got {items.dtype} {items.shape}")
        if items.size and (items.min() < 0 or items.max() >= self.num_items):
            raise ValueError(f"items hold ids outside 0..{self.num_items - 1}")
        return self.ranks_among(histories, items)

    def ranks_among(self, histories, items: np.ndarray, eligible: np.ndarray | None = None,
                    exclude_history: bool = False) -> np.ndarray:
        """Ranks of `items` [B, m] counting only items marked in `eligible` [B, num_items] (None: all) and,
        with exclude_history, not in the history (evaluation's protocols)."""
        rows = (items.astype(np.int32),) if eligible is None else (items.astype(np.int32), eligible)
        out = np.zeros(items.shape, np.int32)
        for batch_rows, tok, seen, it, *elig in self._batches(histories, *rows):
            mask = elig[0] if elig else np.ones_like(seen)
            if exclude_history:
                mask = mask & ~seen
            out[batch_rows] = np.asarray(_ranks(self._graphdef, self._params, tok, it, mask))[: len(batch_rows)]
        return out
