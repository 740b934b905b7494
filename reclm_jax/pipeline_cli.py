"""`reclm-jax pipeline`: the whole method end to end (see `reclm_jax/pipeline.py`)."""

from __future__ import annotations

import argparse

from reclm_jax import config as config_lib
from reclm_jax.pipeline import PipelineConfig, run


def pipeline(args: argparse.Namespace) -> int:
    cfg = config_lib.load(PipelineConfig, args.config, args.overrides)
    tables = run(cfg, progress=not args.quiet)
    print(f"tables: {tables / 'tables.md'} (also .csv, .json and .png there); everything else under {cfg.out_dir}")
    return 0
