"""Leave-one-out evaluation of a teacher in two protocols, each named in the output."""

from __future__ import annotations

import numpy as np

from reclm_jax.data.schema import MIN_SEQUENCE, Dataset
from reclm_jax.teacher.metrics import hit_ndcg
from reclm_jax.teacher.query import Teacher

SPLITS = ("valid", "test")
FULL = "full_ranking"


def sampled_name(num_negatives: int) -> str:
    return f"sampled_{num_negatives}"


def describe(protocol: str) -> str:
    if protocol == FULL:
        return "rank of the target among all items not in the user's history"
    n = protocol.removeprefix("sampled_")
    return (f"rank of the target among itself and {n} random items the user never interacted with "
            "(SASRec paper protocol; negatives drawn without replacement from the config seed)")


def split_examples(dataset: Dataset, split: str) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(users, histories, targets) of every user with a leave-one-out split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    users = np.array([u for u, s in enumerate(dataset.sequences) if len(s) >= MIN_SEQUENCE], np.int64)
    get = dataset.valid_example if split == "valid" else dataset.test_example
    examples = [get(int(u)) for u in users]
    return users, [h for h, _ in examples], np.array([t for _, t in examples], np.int32)


def sampled_candidates(dataset: Dataset, users: np.ndarray, targets: np.ndarray, num_negatives: int,
                       rng: np.random.Generator) -> np.ndarray:
    """bool [B, num_items]: each target plus `num_negatives` distinct items outside the user's whole sequence
    (fewer if the user has seen almost everything)."""
    n = dataset.num_items
    mask = np.zeros((len(users), n), bool)
    for b, u in enumerate(users):
        pool = np.setdiff1d(np.arange(n), dataset.sequences[u], assume_unique=False)
        mask[b, rng.choice(pool, min(num_negatives, pool.size), replace=False)] = True
        mask[b, targets[b]] = True
    return mask


def evaluate_split(teacher: Teacher, dataset: Dataset, split: str, protocols: tuple[str, ...] = (FULL,),
                   seed: int = 0) -> dict[str, dict[str, float]]:
    """{protocol: {"HR@k": .., "NDCG@k": ..}} for one split."""
    if dataset.num_items != teacher.num_items:
        raise ValueError(f"dataset {dataset.name} has {dataset.num_items} items, the teacher {teacher.num_items}")
    cfg = teacher.cfg.eval
    users, histories, targets = split_examples(dataset, split)
    out = {}
    for protocol in protocols:
        if protocol == FULL:
            ranks = teacher.ranks_among(histories, targets[:, None], exclude_history=True)
        elif protocol == sampled_name(cfg.num_negatives):
            # A separate stream per split so valid and test draw different negatives, both from the seed.
            rng = np.random.default_rng([seed, SPLITS.index(split)])
            cand = sampled_candidates(dataset, users, targets, cfg.num_negatives, rng)
            ranks = teacher.ranks_among(histories, targets[:, None], eligible=cand)
        else:
            raise ValueError(f"unknown protocol {protocol!r}")
        out[protocol] = hit_ndcg(ranks[:, 0], cfg.ks) | {"users": int(len(users))}
    return out


def evaluate(teacher: Teacher, dataset: Dataset) -> dict:
    """Both protocols on valid and test, in the layout saved to metrics.json."""
    protocols = (FULL, sampled_name(teacher.cfg.eval.num_negatives))
    per_split = {s: evaluate_split(teacher, dataset, s, protocols, seed=teacher.cfg.seed) for s in SPLITS}
    return {p: {"protocol": describe(p)} | {s: per_split[s][p] for s in SPLITS} for p in protocols}
