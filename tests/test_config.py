"""Typed configs: YAML + dotted overrides, with errors that name the key."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from reclm_jax.config import ConfigError, load, to_dict


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    schedule: Literal["cosine", "linear"] = "cosine"


@dataclass(frozen=True)
class Run:
    name: str = "demo"
    steps: int = 10
    layers: tuple[str, ...] = ("q", "v")
    seed: int | None = None
    optim: Optim = field(default_factory=Optim)


def test_defaults_yaml_and_overrides(tmp_path):
    assert load(Run) == Run()
    path = tmp_path / "run.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 1e-4\nlayers: [q, k, v]\n")
    cfg = load(Run, path, ["optim.schedule=linear", "seed=3", "name=7"])
    assert cfg == Run(name="7", steps=20, layers=("q", "k", "v"), seed=3, optim=Optim(lr=1e-4, schedule="linear"))
    assert to_dict(cfg)["optim"] == {"lr": 1e-4, "schedule": "linear"}


def test_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'optim.lrr'"):
        load(Run, path)
    with pytest.raises(ConfigError, match=r"steps must be int, got 'many'"):
        load(Run, None, ["steps=many"])
    with pytest.raises(ConfigError, match=r"optim.schedule must be one of \['cosine', 'linear'\]"):
        load(Run, None, ["optim.schedule=step"])
    with pytest.raises(ConfigError, match="must look like key.subkey=value"):
        load(Run, None, ["steps"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(Run, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"steps must be int, got True"):
        load(Run, None, ["steps=true"])
