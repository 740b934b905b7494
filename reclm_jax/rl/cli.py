"""`reclm-jax ppo --config configs/ppo/<preset>.yaml [key=value ...]`: the RL stage (PPO with rule rewards)."""

from __future__ import annotations

import argparse

from reclm_jax import config
from reclm_jax.core.errors import UserError
from reclm_jax.rl.config import PPOConfig
from reclm_jax.rl.trainer import run


def register(sub) -> None:
    ppo = sub.add_parser("ppo", help="RL stage: PPO on the SFT model with the paper's item/list rewards")
    ppo.add_argument("--config", help="YAML config, e.g. configs/ppo/smollm2-135m.yaml (default: built-in defaults)")
    ppo.add_argument("overrides", nargs="*", metavar="key=value",
                     help="config overrides, e.g. ppo.lr=1e-5 rewards.item_level=false out_dir=runs/ppo-v3")
    ppo.add_argument("--no-resume", action="store_true", help="start afresh even if out_dir holds a run (its "
                     "checkpoints and logs are removed)")
    ppo.add_argument("--quiet", action="store_true", help="no progress bar")
    ppo.set_defaults(handler=_ppo)


def _ppo(args: argparse.Namespace) -> int:
    cfg = config.load(PPOConfig, args.config, args.overrides)
    try:
        metrics = run(cfg, resume=not args.no_resume, progress=not args.quiet).last
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    if metrics:
        shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("reward", "r_item", "r_list", "kl") if k in metrics)
        print(f"ppo: done, last step: {shown}; actor adapter in {cfg.out_dir}/actor")
    return 0
