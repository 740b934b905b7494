"""The whole method, end to end: dataset -> teacher -> SFT -> PPO -> evaluation -> export.

Each stage writes into its own folder under `out_dir` and is skipped when its output already exists, so an
interrupted pipeline resumes where it stopped (and the SFT/PPO stages resume inside themselves too). The stage
configs are the stages' own dataclasses; the pipeline fills in the paths that connect them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import jax

from reclm_jax import config as config_lib
from reclm_jax.config import Count, Section
from reclm_jax.core.errors import ConfigError
from reclm_jax.data.config import DataConfig
from reclm_jax.data.load import load_dataset
from reclm_jax.eval.evaluate import CONSTRAIN_MODES, GenerationSettings, ModelRun, run_evaluation
from reclm_jax.llm import hf_io
from reclm_jax.llm.tokenizer import load_tokenizer
from reclm_jax.rl.config import PPOConfig
from reclm_jax.rl.trainer import run as run_ppo
from reclm_jax.sft.config import SFTConfig
from reclm_jax.sft.trainer import run as run_sft
from reclm_jax.tasks.evaluation import check_tasks
from reclm_jax.teacher.config import TeacherConfig
from reclm_jax.teacher.query import Teacher
from reclm_jax.teacher.train import train_teacher

STAGES = ("teacher", "sft", "ppo", "evaluate", "export")


@dataclass(frozen=True)
class EvalSection(Section):
    users: Count | None = 50  # test users per task (None: every user, as the paper)
    seed: int = 0  # of the test set and of the bootstrap
    title_match: Literal["strict", "lenient"] = "strict"  # how answer titles name items (eval.parse)
    bootstrap: Count = 1000  # resamples of the users behind each 95 % interval
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    # Also decode under these constraints ("catalogue", "intent"): extra rows beside the unconstrained ones.
    constrain: tuple[str, ...] = ()
    # Which models get the constrained rows: "all", or "final" (the last trained one: what would be served).
    constrain_models: Literal["all", "final"] = "all"
    tasks: tuple[str, ...] = ()  # only these test tasks (names as in tasks.evaluation.TEST_TASKS); () = all

    def check(self) -> None:
        check_tasks(self.tasks)
        unknown = [m for m in self.constrain if m not in CONSTRAIN_MODES[1:]]
        if unknown:
            raise ValueError(f"constrain: unknown modes {unknown}; modes are {', '.join(CONSTRAIN_MODES[1:])}")


@dataclass(frozen=True)
class PipelineConfig(Section):
    out_dir: str = "runs/pipeline"
    stages: tuple[str, ...] = STAGES  # which stages to run, in pipeline order
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)  # out_dir, teacher and data are set by the pipeline
    ppo: PPOConfig = field(default_factory=PPOConfig)  # likewise, plus model.sft_adapter
    eval: EvalSection = field(default_factory=EvalSection)

    def check(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages: unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")


class Layout:
    """Where each stage writes, and the file whose presence means the stage is done."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.teacher = self.root / "teacher"
        self.sft = self.root / "sft"
        self.sft_adapter = self.sft / "adapter"
        self.ppo = self.root / "ppo"
        self.ppo_adapter = self.ppo / "actor"
        self.eval = self.root / "eval"
        self.export = self.root / "export"

    def done(self, stage: str) -> bool:
        marker = {
            "teacher": self.teacher / "metrics.json",
            "sft": self.sft_adapter / "adapter_config.json",
            "ppo": self.ppo_adapter / "adapter_config.json",
            "evaluate": self.eval / "tables.md",
            "export": self.export / "config.json",
        }[stage]
        return marker.is_file()


def stage_configs(cfg: PipelineConfig) -> tuple[SFTConfig, PPOConfig]:
    """The SFT and PPO configs with the paths and dataset that connect the stages derived from the pipeline's
    `out_dir` and `data`. A connecting field the user set in a stage section to something else is an error
    (it would be ignored), never silently replaced."""
    lay = Layout(cfg.out_dir)
    derived = {
        "sft.out_dir": str(lay.sft), "sft.teacher": str(lay.teacher), "sft.data": cfg.data,
        "ppo.out_dir": str(lay.ppo), "ppo.teacher": str(lay.teacher), "ppo.data": cfg.data,
        "ppo.model.base": cfg.sft.model.base, "ppo.model.tokenizer": cfg.sft.model.tokenizer,
        "ppo.model.random_init": cfg.sft.model.random_init, "ppo.model.sft_adapter": str(lay.sft_adapter),
    }
    defaults = {"sft": SFTConfig(), "ppo": PPOConfig()}
    for key, value in derived.items():
        stage, *path = key.split(".")
        given, default = getattr(cfg, stage), defaults[stage]
        for name in path:
            given, default = getattr(given, name), getattr(default, name)
        if given != default and given != value:
            source = "data" if path == ["data"] else "out_dir" if path[-1] in ("out_dir", "teacher", "sft_adapter") else f"sft.model.{path[-1]}"
            raise ConfigError(f"{key} is derived by the pipeline (from {source}: {value}); remove it from the "
                              f"{stage} section")
    sft = replace(cfg.sft, out_dir=str(lay.sft), teacher=str(lay.teacher), data=cfg.data)
    ppo = replace(
        cfg.ppo,
        out_dir=str(lay.ppo),
        teacher=str(lay.teacher),
        data=cfg.data,
        model=replace(cfg.ppo.model, base=cfg.sft.model.base, tokenizer=cfg.sft.model.tokenizer,
                      random_init=cfg.sft.model.random_init, sft_adapter=str(lay.sft_adapter)),
    )
    return sft, ppo


def run(cfg: PipelineConfig, *, progress: bool = True) -> Path:
    """Run the configured stages; returns the folder holding the evaluation tables."""
    lay = Layout(cfg.out_dir)
    lay.root.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, lay.root / "pipeline.yaml")
    sft_cfg, ppo_cfg = stage_configs(cfg)
    dataset = load_dataset(cfg.data)
    _say(f"dataset {dataset.name}: {dataset.num_users} users, {dataset.num_items} items")

    for stage in cfg.stages:
        if lay.done(stage):
            _say(f"[{stage}] done already in {lay.root}, skipped")
            continue
        _say(f"[{stage}] ...")
        start = time.perf_counter()
        if stage == "teacher":
            train_teacher(dataset, cfg.teacher, lay.teacher, progress=progress)
        elif stage == "sft":
            run_sft(sft_cfg, progress=progress)
        elif stage == "ppo":
            run_ppo(ppo_cfg, progress=progress)
        elif stage == "evaluate":
            _evaluate(cfg, lay, dataset, sft_cfg, progress)
        elif stage == "export":
            _export(cfg, lay, sft_cfg)
        _say(f"[{stage}] done in {time.perf_counter() - start:.0f} s")
    return lay.eval


def _evaluate(cfg: PipelineConfig, lay: Layout, dataset, sft_cfg: SFTConfig, progress: bool) -> None:
    base, tok = sft_cfg.model.base, sft_cfg.model.tokenizer
    runs = [ModelRun(f"{base} (zero-shot)", base, (), tok)]
    if lay.done("sft"):
        runs.append(ModelRun("SFT", base, (str(lay.sft_adapter),), tok))
    if lay.done("ppo"):
        runs.append(ModelRun("SFT + PPO", base, (str(lay.sft_adapter), str(lay.ppo_adapter)), tok))
    if cfg.eval.constrain_models == "final":
        runs = [replace(r, constrain=r is runs[-1]) for r in runs]
    task_cfg = replace(sft_cfg.tasks, seed=cfg.eval.seed, test_users=cfg.eval.users, sharegpt_ratio=0.0)
    run_evaluation(dataset, Teacher.load(lay.teacher), runs, lay.eval, task_cfg=task_cfg,
                   settings=cfg.eval.generation, title_match=cfg.eval.title_match, resamples=cfg.eval.bootstrap,
                   teacher_path=str(lay.teacher), progress=progress, constrain=cfg.eval.constrain,
                   tasks=cfg.eval.tasks)
    _say((lay.eval / "tables.md").read_text())


def _export(cfg: PipelineConfig, lay: Layout, sft_cfg: SFTConfig) -> None:
    """The final model (base + SFT + PPO adapters, merged) as a Hugging Face directory for vLLM."""
    adapters = [a for a in (lay.sft_adapter, lay.ppo_adapter) if (a / "adapter_config.json").is_file()]
    model_cfg, params = hf_io.load_merged(sft_cfg.model.base, adapters)
    hf_io.save_hf_dir(lay.export, jax.device_get(params), model_cfg, tokenizer=load_tokenizer(sft_cfg.model.tokenizer))
    _say(f"[export] merged Hugging Face model in {lay.export} (serve it with: vllm serve {lay.export})")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
