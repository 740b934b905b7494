"""Typed configs: dataclasses with defaults, read from YAML, overridden by dotted `key=value` pairs.

Every stage declares its config as a dataclass (defaults live there and nowhere else). A YAML file holds
only what differs from the defaults; CLI overrides like `optim.lr=3e-4` apply last. Unknown keys and
values of the wrong type fail early with a message naming the file and the key.

Validation is declared, not written: a field's rule is part of its type (`rank: Count = 16`, with `Count`,
`Positive`, `NonNegative`, `Fraction` below, or `Annotated[T, Rule(...)]`; choices are `Literal`s), and a
section's cross-field rules are its `check()` method. Every config dataclass derives from `Section`, whose
`validate` applies both on construction; the loader names the full dotted key of what fails
(`sft.lora.rank must be >= 1, got 0`), so `check()` messages start with the (section-relative) key they blame.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml

from reclm_jax.core.errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Rule:
    holds: Callable[[Any], bool]
    text: str  # what the value must be, e.g. "must be >= 1"


Count = Annotated[int, Rule(lambda v: v >= 1, "must be >= 1")]
NonNegativeInt = Annotated[int, Rule(lambda v: v >= 0, "must be >= 0")]
Positive = Annotated[float, Rule(lambda v: v > 0, "must be > 0")]
NonNegative = Annotated[float, Rule(lambda v: v >= 0, "must be >= 0")]
Fraction = Annotated[float, Rule(lambda v: 0 <= v < 1, "must be in [0, 1)")]


class Section:
    """The base of every config dataclass: `validate` runs on construction."""

    def __post_init__(self) -> None:
        validate(self)

    def check(self) -> None:
        """Cross-field rules (raise ValueError, the message starting with the key it blames)."""


def validate(cfg: Section) -> None:
    """Apply the field rules declared in `cfg`'s types (None always passes), then `cfg.check()`."""
    for name, rules in _rules(type(cfg)).items():
        value = getattr(cfg, name)
        for r in rules:
            if value is not None and not r.holds(value):
                raise ConfigError(f"{name} {r.text}, got {value!r}")
    cfg.check()


@functools.cache
def _rules(cls: type) -> dict[str, list[Rule]]:
    """{field: its rules}: `Annotated` rules and `Literal` choices, also inside `X | None`."""
    out, hints = {}, typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp, found = hints[f.name], []
        for arg in typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,):
            if typing.get_origin(arg) is Annotated:
                found += [m for m in arg.__metadata__ if isinstance(m, Rule)]
            elif typing.get_origin(arg) is typing.Literal:
                choices = typing.get_args(arg)
                found.append(Rule(lambda v, c=choices: v in c, f"must be one of {list(choices)}"))
        if found:
            out[f.name] = found
    return out


def load(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Build `cls` from its defaults, then the YAML file at `path`, then `overrides` (`a.b=value`)."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    if not overrides:
        return from_dict(cls, raw, source)
    from_dict(cls, raw, source)  # the file alone must be valid: what fails from here on is an override's fault
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else "")
    return from_dict(cls, raw, "the command line" if path is None else f"the command line (over {path})")


def from_dict(cls: type[T], raw: dict[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict, checking keys and value types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        moved = getattr(cls, "MOVED", {}).get(key)  # a key renamed since: {old name: new key in the parent}
        if key not in fields and moved:
            parent = prefix.rstrip(".").rpartition(".")[0]
            raise ConfigError(f"{source}: config key {name!r} is now {(parent + '.' if parent else '') + moved!r}")
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown config key {name!r} (known here: {known})")
        field = fields[key]
        if field.default_factory is not dataclasses.MISSING and isinstance(value, dict):
            # A section given in part keeps the other values of its field's default (PPO's `checkpoint`
            # keeps its keep_last=2 when a file sets only `every`), not those of the section's class.
            default = field.default_factory()
            if dataclasses.is_dataclass(default):
                value = _merge(to_dict(default), value)
        kwargs[key] = _coerce(hints[key], value, source, name)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a rule of `validate`, whose message starts with the key it blames
        raise ConfigError(f"{source}: {prefix}{e}") from None
    except TypeError as e:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts and lists (for YAML/JSON dumps and checkpoints)."""
    return dataclasses.asdict(cfg)


def dump(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    node[leaf] = value


def _coerce(tp: Any, value: Any, source: str, name: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} must be a mapping, got {value!r}")
        return from_dict(tp, value, source, prefix=f"{name}.")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {name}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{source}: {name} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {name} must be a list, got {value!r}")
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        items = [_coerce(elem, v, source, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-3" as a string
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {name} must be {tp.__name__}, got {value!r}")
    return value
