"""The optimiser of every stage: the `optim` config section, built into an optax chain here and nowhere else.

Global-norm clipping (unless `clip_norm` is null), then AdamW (decoupled weight decay; 0 = Adam) at a constant
learning rate or on the polynomial schedule with linear warmup. Each stage declares its own defaults as the
default of its `optim` field (the teacher: Adam, b2 0.98; SFT: the reference's schedule; PPO: lr 5e-6, clip 0.5).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import optax

from reclm_jax.config import Fraction, NonNegative, Positive, Section


@dataclass(frozen=True)
class OptimConfig(Section):
    lr: Positive = 1e-3  # the (peak) learning rate
    # "constant": lr throughout. "polynomial": linear warmup over ceil(warmup_ratio x steps) steps to lr, then
    # polynomial decay (decay_power) to end_lr at the last step (Hugging Face's polynomial decay with warmup)
    schedule: Literal["constant", "polynomial"] = "constant"
    end_lr: NonNegative = 0.0
    warmup_ratio: Fraction = 0.0
    decay_power: Positive = 2.0
    weight_decay: NonNegative = 0.0
    b1: Fraction = 0.9
    b2: Fraction = 0.999
    eps: Positive = 1e-8
    clip_norm: Positive | None = None  # the global gradient norm is clipped to this; null: no clipping


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate at each step of a run of `total_steps` optimiser steps."""
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    decay = optax.polynomial_schedule(cfg.lr, cfg.end_lr, cfg.decay_power, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


@functools.cache  # one object per setting: jitted steps that take it as a static argument compile once
def optimizer(cfg: OptimConfig, total_steps: int | None = None) -> optax.GradientTransformation:
    """The optimiser of a run of `total_steps` steps (None: a stage with a constant rate only, PPO)."""
    if cfg.schedule != "constant" and total_steps is None:
        raise ValueError(f"optim.schedule={cfg.schedule} needs the run's length; this stage supports 'constant' only")
    # A constant rate is passed as a number: no schedule step counter in the optimiser state.
    lr = cfg.lr if cfg.schedule == "constant" else schedule(cfg, total_steps)
    adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return adamw if cfg.clip_norm is None else optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
