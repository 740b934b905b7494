"""`reclm-jax sft --config configs/sft/<preset>.yaml [key=value ...]`: LoRA instruction tuning (resumes)."""

from __future__ import annotations

import argparse
import json

from reclm_jax import config as config_lib
from reclm_jax.core.errors import UserError
from reclm_jax.sft.config import SFTConfig
from reclm_jax.sft.trainer import run


def sft(args: argparse.Namespace) -> int:
    cfg = config_lib.load(SFTConfig, args.config, args.overrides)
    try:
        result = run(cfg, resume=not args.no_resume, progress=not args.quiet)
    except FileNotFoundError as e:
        raise UserError(f"{e} (teacher={cfg.teacher!r}: train one with `reclm-jax teacher train --out ...`)") from None
    except ValueError as e:
        raise UserError(str(e)) from None
    print(json.dumps({"step": result.step, "valid": result.valid, "best": result.best,
                      "adapter": f"{cfg.out_dir}/adapter"}, indent=1))
    return 0
