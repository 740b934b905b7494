"""One epoch of SL training samples (paper section 2.2, counts as in its Table 8) and the RL prompts.

Per epoch, for the v2 task set: one I0, one I1 and one I2 sample per user (each from its own random point
of the user's train sequence), one I3 sample per item, and sharegpt_ratio x those in I4 conversations; all
shuffled. Every epoch draws new samples; each task has its own random stream (seed, epoch, task), so
the samples of one task do not change when another task is added or removed.
"""

from __future__ import annotations

import zlib

import numpy as np

from reclm_jax.tasks.samples import Sample, TaskContext, recommendation_samples, search_samples, train_examples
from reclm_jax.tasks.sharegpt import Conversations, sharegpt_samples



def task_rng(seed: int, epoch: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(name.encode())])


def training_samples(ctx: TaskContext, epoch: int, conversations: Conversations | None = None) -> list[Sample]:
    """The shuffled samples of one epoch for ctx.cfg.tasks."""
    cfg, ds = ctx.cfg, ctx.dataset
    out: list[Sample] = []
    for task in cfg.tasks:
        rng = task_rng(cfg.seed, epoch, task)
        if task in ("seqrec", "control", "proportion"):
            out += recommendation_samples(ctx, task, train_examples(ds, cfg.max_history, rng), rng)
        elif task == "search":
            out += search_samples(ctx, range(ds.num_items), rng)
    if cfg.mixes_sharegpt:
        if conversations is None:
            raise ValueError("the task set mixes in ShareGPT (I4): pass the conversations read from tasks.sharegpt_path")
        count = round(cfg.sharegpt_ratio * len(out))
        out += sharegpt_samples(conversations, count, task_rng(cfg.seed, epoch, "sharegpt"))
    order = task_rng(cfg.seed, epoch, "shuffle").permutation(len(out))
    return [out[i] for i in order]


def rl_prompts(ctx: TaskContext, epoch: int) -> list[Sample]:
    """RL-stage prompts (no response): one per user from the train part, the control kind uniform over
    cfg.rl_kinds (the paper: I0, +C, -C, <=, >=, ~) and k uniform in cfg.rl_k, generate form, drawn as the SL
    tasks draw them."""
    rng = task_rng(ctx.cfg.seed, epoch, "rl")
    examples = train_examples(ctx.dataset, ctx.cfg.max_history, rng)
    groups = {"seq": "seqrec", "+c": "control", "-c": "control"}
    out = []
    kinds = [ctx.cfg.rl_kinds[int(i)] for i in rng.integers(len(ctx.cfg.rl_kinds), size=len(examples))]
    for kind in ctx.cfg.rl_kinds:
        chosen = [ex for ex, kd in zip(examples, kinds) if kd == kind]
        out += recommendation_samples(ctx, groups.get(kind, "proportion"), chosen, rng, k_range=ctx.cfg.rl_k,
                                      with_labels=False, kinds=(kind,))
    return sorted(out, key=lambda s: s.user)
