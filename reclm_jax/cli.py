"""The `reclm-jax` command. Each pipeline stage contributes its sub-commands from its own `cli` module."""

from __future__ import annotations

import argparse
import sys

from reclm_jax import pipeline_cli, plan
from reclm_jax.core.errors import UserError
from reclm_jax.data import cli as data_cli
from reclm_jax.eval import cli as eval_cli
from reclm_jax.llm import cli as llm_cli
from reclm_jax.rl import cli as rl_cli
from reclm_jax.sft import cli as sft_cli
from reclm_jax.teacher import cli as teacher_cli

STAGES = (data_cli, teacher_cli, llm_cli, sft_cli, rl_cli, eval_cli, pipeline_cli, plan)  # in pipeline order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reclm-jax",
        description="Controllable LLM recommendations (RecLM-gen) in JAX: data, SASRec teacher, "
        "instruction tuning, PPO and evaluation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for stage in STAGES:
        stage.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `key=value` overrides may follow options too (`sft --quiet a.b=1`): argparse takes positionals in one run
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.parse_args(argv)  # the usual error, with the sub-command's usage line
    try:
        return args.handler(args) or 0
    except UserError as e:
        print(f"reclm-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
