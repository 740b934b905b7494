"""`reclm-jax pipeline`: the whole method end to end (see `reclm_jax/pipeline.py`)."""

from __future__ import annotations

import argparse

from reclm_jax import config as config_lib
from reclm_jax.pipeline import PipelineConfig, run


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="dataset -> teacher -> SFT -> PPO -> evaluation -> export, resumable")
    p.add_argument("--config", default="configs/pipeline/demo.yaml", help="pipeline YAML (default: the demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sft.train.steps=10")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_pipeline)


def _pipeline(args: argparse.Namespace) -> int:
    cfg = config_lib.load(PipelineConfig, args.config, args.overrides)
    tables = run(cfg, progress=not args.quiet)
    print(f"tables: {tables / 'tables.md'} (also .csv, .json and .png there); everything else under {cfg.out_dir}")
    return 0
