"""Typed configs: YAML + dotted overrides, with errors that name the key."""

import re
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


def test_a_bad_override_is_blamed_on_the_command_line_and_named_by_the_users_key(tmp_path):
    from reclm_jax.sft.config import SFTConfig

    path = tmp_path / "sft.yaml"
    path.write_text("lora:\n  alpha: 4.0\ncheckpoint:\n  every: 7\n")
    with pytest.raises(ConfigError, match=r"^the command line \(over .*sft.yaml\): lora.rank must be >= 1, got 0$"):
        load(SFTConfig, path, ["lora.rank=0"])
    path.write_text("lora:\n  rank: 0\n")
    with pytest.raises(ConfigError, match=r"^.*sft.yaml: lora.rank must be >= 1, got 0$"):
        load(SFTConfig, path, ["train.steps=3"])


def test_a_section_given_in_part_keeps_its_fields_stage_defaults(tmp_path):
    from reclm_jax.rl.config import PPOConfig
    from reclm_jax.sft.config import SFTConfig

    path = tmp_path / "c.yaml"
    path.write_text("checkpoint:\n  every: 7\nactor_lora:\n  rank: 8\n")
    ppo = load(PPOConfig, path)
    assert (ppo.checkpoint.every, ppo.checkpoint.keep_last) == (7, 2)  # PPO keeps 2, not the class's 3
    assert (ppo.actor_lora.rank, ppo.actor_lora.alpha, ppo.actor_lora.dropout) == (8, 2.0, 0.0)
    assert load(SFTConfig, None, ["checkpoint.every=5"]).checkpoint.best_metric == "seqrec/NDCG@K"


def test_overrides_may_follow_options(capsys):
    from reclm_jax.cli import build_parser, main

    assert main(["sft", "--quiet", "bogus.key=1"]) == 2  # taken as an override: the config names the key
    assert "unknown config key 'bogus'" in capsys.readouterr().err
    args, extra = build_parser().parse_known_args(["sft", "a.b=1", "--quiet", "c=2"])
    assert (args.overrides, extra, args.quiet) == (["a.b=1"], ["c=2"], True)


def test_every_stage_names_its_optimiser_in_one_optim_section():
    from reclm_jax.pipeline import PipelineConfig
    from reclm_jax.training.optim import OptimConfig

    cfg = load(PipelineConfig, None, ["teacher.optim.b2=0.9", "sft.optim.lr=5e-4", "ppo.optim.clip_norm=null"])
    assert all(isinstance(c.optim, OptimConfig) for c in (cfg.teacher, cfg.sft, cfg.ppo))
    # each stage keeps its own defaults beside what was set (Adam b2 0.98; the SFT schedule; PPO's lr)
    assert (cfg.teacher.optim.b2, cfg.teacher.optim.lr, cfg.teacher.optim.clip_norm) == (0.9, 1e-3, None)
    assert (cfg.sft.optim.lr, cfg.sft.optim.schedule, cfg.sft.optim.clip_norm) == (5e-4, "polynomial", 1.0)
    assert (cfg.ppo.optim.lr, cfg.ppo.optim.clip_norm) == (5e-6, None)
    assert PipelineConfig().teacher.optim.b2 == 0.98


@pytest.mark.parametrize("old, new", [("ppo.ppo.lr=1e-3", "ppo.optim.lr"),
                                      ("ppo.ppo.grad_clip=1", "ppo.optim.clip_norm"),
                                      ("teacher.train.adam_b2=0.9", "teacher.optim.b2")])
def test_an_old_optimiser_key_names_its_new_key(old, new):
    from reclm_jax.pipeline import PipelineConfig

    with pytest.raises(ConfigError, match=rf"^the command line: config key '{old.split('=')[0]}' is now '{new}'$"):
        load(PipelineConfig, None, [old])


@pytest.mark.parametrize("override, message", [
    ("sft.lora.rank=0", "sft.lora.rank must be >= 1, got 0"),  # a declared rule, by its full key
    ("ppo.optim.b2=1.0", "ppo.optim.b2 must be in [0, 1), got 1.0"),
    ("teacher.model.dropout=-0.1", "teacher.model.dropout must be in [0, 1), got -0.1"),
    ("sft.tasks.min_k=11", "sft.tasks.min_k (11) must be <= max_k (10)"),  # a cross-field check()
    ("ppo.ppo.minibatches=3", "ppo.rollout.prompts_per_step = 16 must divide into ppo.minibatches = 3 "
                              "(a minibatch takes whole prompts, each with its responses)"),
    ("sft.valid.users=null", None),  # None passes a rule
])
def test_rules_are_declared_once_and_name_the_full_key(override, message):
    from reclm_jax.pipeline import PipelineConfig

    if message is None:
        load(PipelineConfig, None, [override])
        return
    with pytest.raises(ConfigError, match=f"^the command line: {re.escape(message)}$"):
        load(PipelineConfig, None, [override])


def test_rules_and_choices_also_hold_for_configs_built_in_code():
    from reclm_jax.llm.config import LoraConfig, ModelConfig

    with pytest.raises(ConfigError, match=r"^rank must be >= 1, got 0$"):
        LoraConfig(rank=0)
    with pytest.raises(ConfigError, match=r"^param_dtype must be one of \['float32', 'bfloat16', 'float16'\]"):
        ModelConfig(param_dtype="bf16")
