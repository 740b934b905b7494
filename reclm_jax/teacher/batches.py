"""Training batches (grain): windows of users' train sequences, next-item targets at every position.

A train sequence longer than max_len+1 is cut into windows ending at its end, max_len apart, so every
training item is a target once per epoch (the newest window keeps the full context). A batch holds windows
of one length bucket (`ModelConfig.padded_length`) and always `batch_size` rows: a bucket's last batch is
filled with all-padding rows, which carry no loss.
"""

from __future__ import annotations

import grain
import numpy as np

from reclm_jax.data.schema import Dataset
from reclm_jax.teacher.config import ModelConfig


def training_windows(dataset: Dataset, max_len: int) -> list[tuple[int, int, int]]:
    """(user, start, end): inputs are train_sequence[start:end-1], targets train_sequence[start+1:end]."""
    windows = []
    for u in range(dataset.num_users):
        end = len(dataset.train_sequence(u))
        while end >= 2:
            windows.append((u, max(0, end - max_len - 1), end))
            end -= max_len
    return windows


def sample_negatives(rng: np.random.Generator, seen: np.ndarray, num_items: int, size: int) -> np.ndarray:
    """`size` items drawn uniformly from those not in `seen` (sorted unique ids), with replacement."""
    neg = rng.integers(0, num_items, size)
    if seen.size >= num_items:  # nothing unseen is left: fall back to uniform
        return neg
    bad = np.isin(neg, seen, assume_unique=False)
    while bad.any():
        neg[bad] = rng.integers(0, num_items, int(bad.sum()))
        bad = np.isin(neg, seen)
    return neg


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def epoch_plan(windows, cfg: ModelConfig, batch_size: int, rng: np.random.Generator) -> list[list[tuple]]:
    """Shuffled batches of windows, each batch drawn from one length bucket (so it pads to a short length)."""
    buckets: dict[int, list[int]] = {}
    for i, (_, start, end) in enumerate(windows):
        buckets.setdefault(cfg.padded_length(end - start - 1), []).append(i)
    plan = []
    for length in sorted(buckets):
        idx = rng.permutation(buckets[length])
        plan += [[windows[j] for j in idx[k:k + batch_size]] for k in range(0, len(idx), batch_size)]
    return [plan[i] for i in rng.permutation(len(plan))]


def epoch_batches(dataset: Dataset, windows, *, cfg: ModelConfig, batch_size: int, negatives: bool, seed: int,
                  epoch: int):
    """A grain dataset of dict batches: tokens, targets (and negatives) int32 [batch_size, bucket length], item i
    as i+1 and 0 for padding / no target. Shuffling and negatives depend only on (seed, epoch)."""
    train = [dataset.train_sequence(u) for u in range(dataset.num_users)]
    seen: dict[int, np.ndarray] = {}
    n = dataset.num_items

    def make_batch(plan, rng: np.random.Generator):
        length = cfg.padded_length(max(end - start - 1 for _, start, end in plan))
        keys = ("tokens", "targets", "negatives") if negatives else ("tokens", "targets")
        out = {key: np.zeros((batch_size, length), np.int32) for key in keys}
        for row, (u, start, end) in enumerate(plan):
            seq = train[u][start:end].astype(np.int32) + 1
            first = length - len(seq) + 1
            out["tokens"][row, first:] = seq[:-1]
            out["targets"][row, first:] = seq[1:]
            if negatives:
                if u not in seen:
                    seen[u] = np.unique(train[u])
                out["negatives"][row, first:] = sample_negatives(rng, seen[u], n, len(seq) - 1) + 1
        return out

    s = epoch_seed(seed, epoch)
    plan = epoch_plan(windows, cfg, batch_size, np.random.default_rng(s))
    return grain.MapDataset.source(plan).random_map(make_batch, seed=s)
