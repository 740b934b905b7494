"""Padded batches of item lists and the vectorised per-item checks that rewards and metrics share.

A batch of B ragged lists becomes an int64 array [B, N] (N the longest list, at least 1) plus lengths [B];
positions at or past a list's length are padding and every check below is False there.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pad(rows: Sequence[Sequence], fill, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(array [B, N] with `fill` past each row's end, lengths [B])."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    out = np.full((len(rows), max(1, int(lengths.max(initial=0)))), fill, dtype=dtype)
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return out, lengths


def valid_mask(lengths: np.ndarray, n: int) -> np.ndarray:
    """bool [B, n]: position j holds a real item of list b."""
    return np.arange(n)[None, :] < np.asarray(lengths)[:, None]


def repeat_mask(ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """bool [B, N]: a known item (id >= 0) that already appeared earlier in its list."""
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, None, :]
    earlier = np.tri(ids.shape[1], k=-1, dtype=bool)  # earlier[j, j'] = j' < j
    return (same & earlier).any(-1) & (ids >= 0) & valid


def in_history_mask(ids: np.ndarray, valid: np.ndarray, history: np.ndarray) -> np.ndarray:
    """bool [B, N]: a known item that is in the user's history (history padded with any negative id)."""
    return (ids[:, :, None] == history[:, None, :]).any(-1) & (ids >= 0) & valid


def in_category(item_ids: Sequence[Sequence[int]], categories: Sequence[int],
                category_matrix: np.ndarray) -> list[list[bool]]:
    """Per list and item: the item is known and in its list's category (none is for category -1: no control)."""
    return [[bool(c >= 0 and i >= 0 and category_matrix[i, c]) for i in row] for row, c in zip(item_ids, categories)]
