"""The `reclm-jax` command's start-up: help texts without the stage modules, handlers found on dispatch."""

import argparse
import importlib
import subprocess
import sys

from reclm_jax import cli


def test_help_imports_no_stage_module():
    script = ("import sys; from reclm_jax.cli import build_parser; build_parser().format_help(); "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'numpy', 'transformers', 'orbax') "
              "or m.startswith('reclm_jax.') and m not in ('reclm_jax.cli', 'reclm_jax.accelerators', "
              "'reclm_jax.core', 'reclm_jax.core.errors')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_command_has_a_handler_that_imports():
    def commands(parser: argparse.ArgumentParser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from commands(sub)
        if "handler" in parser._defaults:
            yield parser._defaults["handler"]

    found = list(commands(cli.build_parser()))
    assert sorted(found) == sorted(cli.HANDLERS)
    for spec in cli.HANDLERS.values():
        module, _, function = spec.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), spec


def test_choices_match_what_they_name():
    from reclm_jax.eval.parse import MATCH_MODES

    assert cli.MATCH_MODES == MATCH_MODES
