"""The errors a user can cause. The CLI prints any `UserError` as one line naming the command (no traceback)
and exits with status 2; every other exception is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, stated so that the user can fix it."""


class ConfigError(UserError, ValueError):
    """A config file or override names an unknown key or holds a bad value."""


class DataError(UserError, ValueError):
    """Bad dataset input: the message names the file, line or field."""


class FormatError(UserError, ValueError):
    """A checkpoint, adapter, tokenizer or GGUF file is missing, malformed, or does not match the model config."""


class AssetError(UserError, RuntimeError):
    """An asset could not be fetched or is not what we expected."""


class RunError(UserError):
    """A training run cannot start or continue as asked (an output directory holding another run, a damaged
    checkpoint without a good one before it, a loss that is no longer finite)."""
