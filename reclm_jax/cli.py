"""The `reclm-jax` command. Each pipeline stage contributes its sub-commands from its own `cli` module."""

from __future__ import annotations

import argparse
import importlib
import sys

# Stage modules in pipeline order; each defines `register(subparsers)`. Heavy imports (jax, torch) happen
# inside the command handlers so that `reclm-jax --help` stays fast.
STAGES = (
    "reclm_jax.data.cli",
    "reclm_jax.teacher.cli",
    "reclm_jax.llm.cli",
    "reclm_jax.sft.cli",
    "reclm_jax.rl.cli",
    "reclm_jax.eval.cli",
    "reclm_jax.pipeline_cli",
)


class UserError(Exception):
    """A problem with the user's input: printed as one clear line, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reclm-jax",
        description="Controllable LLM recommendations (RecLM-gen) in JAX: data, SASRec teacher, "
        "instruction tuning, PPO and evaluation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in STAGES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from reclm_jax.assets import AssetError
    from reclm_jax.config import ConfigError
    from reclm_jax.data.schema import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (UserError, ConfigError, DataError, AssetError) as e:
        print(f"reclm-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
