"""`reclm-jax ppo --config configs/ppo/<preset>.yaml [key=value ...]`: the RL stage (PPO with rule rewards)."""

from __future__ import annotations

import argparse

from reclm_jax import config
from reclm_jax.core.errors import UserError
from reclm_jax.rl.config import PPOConfig
from reclm_jax.rl.trainer import run


def ppo(args: argparse.Namespace) -> int:
    cfg = config.load(PPOConfig, args.config, args.overrides)
    try:
        metrics = run(cfg, resume=not args.no_resume, progress=not args.quiet).last
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    if metrics:
        shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("reward", "r_item", "r_list", "kl") if k in metrics)
        print(f"ppo: done, last step: {shown}; actor adapter in {cfg.out_dir}/actor")
    return 0
