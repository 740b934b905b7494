"""The fixed valid and test instruction sets (paper section 3), identical for every evaluated model.

Control targets come from the data and the teacher only, fixed by the seed:
- +C, ~ and >=: the target item's most specific category, i.e. the one with the fewest catalogue items
  (`labels.most_specific_category`: the deepest on hierarchical categories, as the official code; the
  rarest genre on flat multi-genre data such as MovieLens), drawn once per user;
- -C and <=: the category most frequent in the teacher's top-10 for the user that the target is not in
  (section 3.2.2), drawn once per user;
- the combined tests (Table 7): +C1 & -C2 with C1 = the +C category and C2 = the -C category;
  C1 <= 20 % & -C2 with C1 = the -C category and C2 the next one by the same rule.
Users whose target has no category (or is in every category) get no controlled test sample, and counts
say so in `EvalSet.skipped`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reclm_jax.core.controls import Control
from reclm_jax.tasks import labels as L
from reclm_jax.tasks.samples import SEQ, Example, Request, Sample, TaskContext, render, split_example
from reclm_jax.tasks.training import task_rng

# name -> (control kind, m) per part; the k of every test task is cfg.test_k except ItemCount's.
TEST_TASKS: dict[str, tuple[tuple[str, float], ...]] = {
    "seqrec": (("seq", 0.0),),
    "+c": (("+c", 0.0),),
    "-c": (("-c", 0.0),),
    "<=20%": (("<=", 0.2),),
    "~30%": (("~", 0.3),),
    ">=30%": ((">=", 0.3),),
    "item_count": (("seq", 0.0),),
    "+c1&-c2": (("+c", 0.0), ("-c", 0.0)),
    "c1<=20%&-c2": (("<=", 0.2), ("-c", 0.0)),
}
VALID_TASKS: dict[str, tuple[tuple[str, float], ...]] = {
    "seqrec": (("seq", 0.0),),
    "+c": (("+c", 0.0),),
    "-c": (("-c", 0.0),),
    "~50%": (("~", 0.5),),
}


@dataclass(frozen=True)
class EvalSet:
    split: str
    tasks: dict[str, list[Sample]]
    skipped: dict[str, int]  # users left out of a task because the data cannot state its control


def eval_users(num_users: int, count: int | None, seed: int, split: str) -> np.ndarray:
    """A seeded random subset of `count` users (all users, in order, when count is None or too large)."""
    if count is None or count >= num_users:
        return np.arange(num_users)
    return np.sort(task_rng(seed, 0, f"{split}:users").permutation(num_users)[:count])


def _categories(ctx: TaskContext, examples: list[Example], rng) -> tuple[list, list, list]:
    """Per example: the target's most specific category (+C), the -C category and the next -C category
    (or None)."""
    top = ctx.top([e.history for e in examples], 10)
    pos, neg, neg2 = [], [], []
    for ex, row in zip(examples, top):
        pos.append(L.most_specific_category(ex.target, ctx.cats, ctx.dataset.categories, rng))
        c = L.negative_category(row, ex.target, ctx.cats, rng)
        neg.append(c)
        neg2.append(None if c is None else L.negative_category(row, ex.target, ctx.cats, rng, skip=(c,)))
    return pos, neg, neg2


def check_tasks(names: Sequence[str], split: str = "test") -> None:
    """Raise ValueError naming the unknown task names of `split` and listing the known ones."""
    table = VALID_TASKS if split == "valid" else TEST_TASKS
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown {split} tasks {unknown}; tasks are {', '.join(table)}")


def build_eval_set(ctx: TaskContext, split: str, only: tuple[str, ...] | None = None) -> EvalSet:
    """The valid (VALID_TASKS: I0, +C, -C, ~50 %) or test (TEST_TASKS) samples, or just the tasks named in
    `only`; prompts only, generate form."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    cfg = ctx.cfg
    table = VALID_TASKS if split == "valid" else TEST_TASKS
    check_tasks(only or (), split)
    count = cfg.valid_users if split == "valid" else cfg.test_users
    users = eval_users(ctx.dataset.num_users, count, cfg.seed, split)
    examples = [split_example(ctx.dataset, int(u), split, cfg.max_history) for u in users]
    pos, neg, neg2 = _categories(ctx, examples, task_rng(cfg.seed, 0, f"{split}:categories"))
    tasks, skipped = {}, {}
    for name, parts in table.items():
        if only is not None and name not in only:
            continue
        rng = task_rng(cfg.seed, 0, f"{split}:{name}")
        out, missing = [], 0
        for i, ex in enumerate(examples):
            k = int(rng.integers(cfg.item_count_k[0], cfg.item_count_k[1] + 1)) if name == "item_count" else cfg.test_k
            source = {"+c": pos, "~": pos, ">=": pos, "-c": neg, "<=": neg, "seq": None}[parts[0][0]]
            cats = [-1 if source is None else source[i]]
            if len(parts) == 2:
                cats.append((neg2 if parts[0][0] == "<=" else neg)[i])
            if any(c is None for c in cats):
                missing += 1
                continue
            controls = tuple((SEQ if kind == "seq" else Control(kind, m), c) for (kind, m), c in zip(parts, cats))
            out.append(render(ctx, Request(name, ex, controls, k), None, rng))
        tasks[name], skipped[name] = out, missing
    return EvalSet(split, tasks, skipped)
