"""Evaluation metrics of the paper (section 3), defined exactly, per output list.

Every metric looks at one output: its parsed item ids in order (-1 for an unknown title), the k the
instruction asked for, and where needed the user's history, the target item, and `in_target` (bool per
item: it belongs to the instruction's category C; ignored for unknown items). "@K" is always @k, the
requested count (the paper's @10 for k = 10, and @K = k in the ItemCount test).

Per list:
- HR@K = 1 if the target is among the first k items, else 0 (an unknown title, id -1, is never a hit).
- NDCG@K = 1 / log2(p + 2) with p the 0-based position of the target's first occurrence among the first
  k items, else 0 (one relevant item, so the ideal DCG is 1).
- TCP@K (Eq. 7) = 100/k * #{i <= k : item_i exists and is in C}. As in Eq. 7, repeats and history items
  count; RepeatItem@K and InHistory@K report those.
- Count_in = #{i <= k : item_i exists and is in C} (= k * TCP@K / 100), the count Eq. 8 compares.
- CPA (Eq. 8) = 100 * 1(Count_in <= k*m) for CP <= m, 1(Count_in >= k*m) for CP >= m,
  1(|Count_in - k*m| <= 1) for CP ~ m; and 0 when none of the first k items exists (an empty,
  unparseable or wholly hallucinated list says nothing about its proportion: it fails, never scores).
- CorrectCount = 100 if the list holds exactly k items (known or not), else 0.
- RepeatItem@K = 100/k * #{i <= k : item_i is a known item that appeared earlier in the list}.
- NonExist@K = 100/k * #{i <= k : item_i is unknown}.
- InHistory@K = 100/k * #{i <= k : item_i is a known item in the user's history}.
- TC1¬2P@K (Table 7) = TCP@K with C = C1 minus C2 (percent of items in C1 and not in C2).
- C1 PA (Table 7) = CPA of the "C1 <= m" part (m = 20 % in the paper).

The three formatting rates are per list, over the k requested slots (like Eq. 7's 1/K): each user weighs
the same, as in HR and NDCG, and a short list is not excused (a missing slot is simply not an error of
that kind; CorrectCount reports it). Percent like the paper's Tables 3-5; HR and NDCG are fractions
like its tables. An empty output is a list of 0 items and is never skipped: HR, NDCG, TCP, CPA and
CorrectCount are 0 for it. `aggregate` averages over lists; `estimate` also gives each mean a 95 %
percentile bootstrap confidence interval over the lists (users) and their number.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from reclm_jax.core.controls import KIND_CODE, PROPORTION_KINDS, Control, quota
from reclm_jax.eval.lists import in_history_mask, pad, repeat_mask, valid_mask

# The suffix of a control metric measured on the same user's plain (I0) answer: the paper's values in parentheses.
NO_CONTROL = "/no_control"
METRICS = ("HR@K", "NDCG@K", "TCP@K", "CPA", "CorrectCount", "RepeatItem@K", "NonExist@K", "InHistory@K")


def evaluate_batch(item_ids: Sequence[Sequence[int]], k, history: Sequence[Sequence[int]], target,
                   in_target: Sequence[Sequence[bool]] | None = None,
                   controls: Sequence[Control] | None = None) -> dict[str, np.ndarray]:
    """The metrics of B outputs, vectorised (tests/reference_metrics.py holds the one-list definitions it is
    tested equal to): metric name -> float array [B].

    CPA is computed when every control is a proportion control (a mix is an error). For Table 7 pass
    `in_target` = C1 & ~C2 (its TCP@K is TC1¬2P@K), or `in_target` = C1 with Control("<=", 0.2) (its CPA
    is C1 PA).
    """
    ids, lengths = pad(item_ids, -1, np.int64)
    b, n = ids.shape
    hist, _ = pad(history, -1, np.int64)
    k = np.broadcast_to(np.asarray(k, dtype=np.int64), (b,))
    target = np.broadcast_to(np.asarray(target, dtype=np.int64), (b,))
    if (k < 1).any():
        raise ValueError(f"every k must be >= 1, got {k.min()}")
    valid = valid_mask(lengths, n)
    first_k = valid & (np.arange(n)[None, :] < k[:, None])
    known = first_k & (ids >= 0)

    hit = known & (ids == target[:, None])
    any_hit = hit.any(1)
    out = {
        "HR@K": any_hit.astype(np.float64),
        "NDCG@K": np.where(any_hit, 1.0 / np.log2(hit.argmax(1) + 2.0), 0.0),
        "CorrectCount": 100.0 * (lengths == k),
        "RepeatItem@K": 100.0 * (repeat_mask(ids, valid) & first_k).sum(1) / k,
        "NonExist@K": 100.0 * (first_k & (ids < 0)).sum(1) / k,
        "InHistory@K": 100.0 * (in_history_mask(ids, valid, hist) & first_k).sum(1) / k,
    }
    if in_target is not None:
        in_arr, in_lengths = pad(in_target, False, bool)
        if in_lengths.shape != lengths.shape or (in_lengths != lengths).any():
            raise ValueError("in_target must hold one row per output, as long as its item_ids row")
        n_in = (known & in_arr).sum(1)
        out["TCP@K"] = 100.0 * n_in / k
        proportion = [c.kind in PROPORTION_KINDS for c in controls or ()]
        if any(proportion) and not all(proportion):
            raise ValueError("controls mix proportion and other kinds: evaluate CPA batches separately")
        if controls is not None and all(proportion):
            kind = np.array([c.code for c in controls])
            q = quota(k, np.array([c.m for c in controls]))
            ok = np.select([kind == KIND_CODE["<="], kind == KIND_CODE[">="]], [n_in <= q, n_in >= q],
                           np.abs(n_in - q) <= 1)
            out["CPA"] = 100.0 * (ok & known.any(1))
    return out


def aggregate(samples: Sequence[Mapping[str, float]] | Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean of each metric over the lists: from per-sample dicts (all with the same metrics, so no list is
    silently left out of any mean) or from `evaluate_batch`'s arrays."""
    if isinstance(samples, Mapping):
        if any(np.size(values) == 0 for values in samples.values()):
            raise ValueError("aggregate needs at least one evaluated sample")
        return {name: float(np.mean(values)) for name, values in samples.items()}
    if not samples:
        raise ValueError("aggregate needs at least one evaluated sample")
    names = list(samples[0])
    for i, sample in enumerate(samples):
        if set(sample) != set(names):
            raise ValueError(f"sample {i} has metrics {sorted(sample)}, sample 0 has {sorted(names)}")
    return {name: float(np.mean([s[name] for s in samples])) for name in names}


CONFIDENCE = 0.95  # the level of every reported interval


@dataclass(frozen=True)
class Bootstrap:
    """How `estimate` draws its confidence intervals: `resamples` samples of the lists (users) with
    replacement, seeded by `seed` and the task's name, so every model is resampled with the same users."""

    resamples: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.resamples < 1:
            raise ValueError(f"bootstrap resamples must be >= 1, got {self.resamples}")


def percentile_interval(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The percentile bootstrap interval at CONFIDENCE of the mean of each column of `values` [n, M], from
    resample weights [R, n] (how often each of the n rows is drawn in each of R resamples; rows sum to n):
    the (1 - CONFIDENCE)/2 and (1 + CONFIDENCE)/2 quantiles (linear interpolation) of the R resample means."""
    means = weights @ values / weights.shape[1]
    tail = (1.0 - CONFIDENCE) / 2
    return np.quantile(means, tail, axis=0), np.quantile(means, 1.0 - tail, axis=0)


def estimate(per_list: Mapping[str, np.ndarray], bootstrap: Bootstrap, name: str) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "lo", "hi", "n"}}: each metric's mean over its n lists (as `aggregate`) and the
    95 % percentile bootstrap interval [lo, hi] of that mean. All metrics share the resamples (users drawn
    with replacement, seeded by `bootstrap.seed` and `name`, e.g. the task), so their intervals are paired;
    n is the number of lists (users) behind each figure. A constant metric gets lo = hi = mean (up to
    rounding)."""
    names = list(per_list)
    values = np.stack([np.asarray(per_list[m], dtype=np.float64) for m in names], axis=1)
    n = values.shape[0]
    if n == 0:
        raise ValueError("estimate needs at least one evaluated sample")
    rng = np.random.default_rng([bootstrap.seed, zlib.crc32(name.encode())])
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=bootstrap.resamples).astype(np.float64)
    lo, hi = percentile_interval(values, weights)
    mean = values.mean(0)
    return {m: {"mean": float(mean[j]), "lo": float(lo[j]), "hi": float(hi[j]), "n": n} for j, m in enumerate(names)}
