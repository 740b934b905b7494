"""The pipeline command end to end on the smallest real model (the tiny Llama-vocabulary GGUF) and ML-100k."""

import json

import pytest

from reclm_jax import assets, config
from reclm_jax.cli import main
from reclm_jax.pipeline import Layout, PipelineConfig, stage_configs


def test_stage_configs_connect_the_stages():
    cfg = config.load(PipelineConfig, "configs/pipeline/demo.yaml", ["out_dir=/x"])
    sft, ppo = stage_configs(cfg)
    assert (sft.out_dir, sft.teacher, ppo.teacher) == ("/x/sft", "/x/teacher", "/x/teacher")
    assert ppo.model.sft_adapter == "/x/sft/adapter" and ppo.model.base == sft.model.base == "smollm2-135m"
    assert sft.data == ppo.data == cfg.data
    with pytest.raises(config.ConfigError, match="unknown stage"):
        config.load(PipelineConfig, None, ["stages=[teacher, dpo]"])
    assert (cfg.eval.title_match, cfg.eval.bootstrap) == ("strict", 1000)  # strict titles, 1000 resamples
    with pytest.raises(config.ConfigError, match="title_match must be one of"):
        config.load(PipelineConfig, None, ["eval.title_match=loose"])
    assert cfg.eval.tasks == ("seqrec", "+c", "-c")
    with pytest.raises(config.ConfigError, match=r"unknown test tasks \['\+x'\]; tasks are seqrec, \+c, -c, <=20%"):
        config.load(PipelineConfig, None, ["eval.tasks=[seqrec, +x]"])
    with pytest.raises(config.ConfigError, match="ppo.rollout.title_match must be one of|title_match must be one"):
        config.load(PipelineConfig, None, ["ppo.rollout.title_match=exact"])


@pytest.mark.parametrize("preset", ["demo", "repro-ml100k"])
def test_pipeline_presets_load_and_connect(preset):
    cfg = config.load(PipelineConfig, f"configs/pipeline/{preset}.yaml")  # every section's rules run here
    sft, ppo = stage_configs(cfg)
    assert ppo.model.sft_adapter == f"{cfg.out_dir}/sft/adapter" and sft.tasks.max_history == ppo.prompts.max_history


def tiny_model_stages(gguf: str) -> list[str]:
    """Overrides that shrink the demo's SFT, PPO and evaluation to a few steps of the tiny GGUF model (and run
    PPO, which the demo leaves out)."""
    return [
        "stages=[teacher, sft, ppo, evaluate, export]",
        f"sft.model.base={gguf}", f"sft.model.tokenizer={gguf}",
        "sft.tasks.min_k=3", "sft.tasks.max_k=3", "sft.tasks.max_length=384", "sft.tasks.buckets=[384]",
        "sft.train.global_batch=2", "sft.train.micro_batch=2", "sft.train.steps=2", "sft.valid.every=0",
        "sft.checkpoint.every=2",
        "ppo.rollout.prompts_per_step=2", "ppo.rollout.max_new_tokens=8", "ppo.ppo.minibatches=1",
        "ppo.ppo.epochs=1", "ppo.train.steps=1", "ppo.checkpoint.every=1",
        "eval.users=2", "eval.generation.max_new_tokens=8", "eval.generation.batch_size=4",
    ]


@pytest.mark.network
@pytest.mark.slow
def test_pipeline_runs_every_stage_then_skips_them(tmp_path, capsys):
    gguf = str(assets.fetch("tiny-llama-vocab") / "tiny.gguf")
    out = tmp_path / "run"
    overrides = [
        f"out_dir={out}",
        "teacher.model.max_len=10", "teacher.model.width=16", "teacher.train.max_epochs=2",
        "teacher.train.batch_size=256",
        *tiny_model_stages(gguf),
    ]
    args = ["pipeline", "--config", "configs/pipeline/demo.yaml", "--quiet", *overrides]
    assert main(args) == 0
    lay = Layout(out)
    assert all(lay.done(stage) for stage in ("teacher", "sft", "ppo", "evaluate", "export"))
    tables = json.loads((lay.eval / "tables.json").read_text())
    assert "SFT + PPO" in json.dumps(tables) and "SASRec" in json.dumps(tables)
    # the demo's constrain_models=final: constrained rows for the final model only
    assert "SFT + PPO [intent-constrained]" in json.dumps(tables) and "SFT [intent-constrained]" not in json.dumps(tables)
    assert json.loads((lay.export / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    capsys.readouterr()
    assert main(args) == 0  # a second run finds every stage done
    err = capsys.readouterr().err
    assert all(f"[{s}] done already" in err for s in ("teacher", "sft", "ppo", "evaluate", "export"))
