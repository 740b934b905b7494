"""The one training loop under kill -9: for the teacher, SFT and PPO, a run killed mid-way (SIGKILL from inside
its own step, so the pending asynchronous checkpoint may be half written) and started again continues with
exactly the losses of an uninterrupted run. Plus the loop's refusals and fall-backs: a changed config, a
damaged latest checkpoint, one log record per step after a resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import grain
import jax
import pytest

from reclm_jax.core.errors import RunError
from reclm_jax.training.loop import RunDir

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


def killing(step_fn, kill_at: int | None):
    """`step_fn`, but the process kills itself (SIGKILL, no clean-up) right after step `kill_at`."""
    def step(state, batch):
        state, scalars = step_fn(state, batch)
        if kill_at is not None and int(state.step) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return state, scalars
    return step


# ---- the three stages, each as `run(out_dir, kill_at)` through `training.loop.train` ------------------------
def run_teacher(out: Path, kill_at: int | None = None) -> None:
    from test_teacher import TINY, chain_dataset

    from reclm_jax.teacher import train as teacher_train

    original = teacher_train.loop.train
    teacher_train.loop.train = lambda run, state, step_fn, *a, **kw: original(run, state, killing(step_fn, kill_at), *a, **kw)
    try:
        cfg = replace(TINY, model=replace(TINY.model, length_buckets=1), train=replace(TINY.train, max_epochs=3))
        teacher_train.train_teacher(chain_dataset(), cfg, out, progress=False)
    finally:
        teacher_train.loop.train = original


def run_sft(out: Path, kill_at: int | None = None) -> None:
    from test_sft import setup, sft_config

    from reclm_jax.sft import trainer

    original = trainer.loop.train
    trainer.loop.train = lambda run, state, step_fn, *a, **kw: original(run, state, killing(step_fn, kill_at), *a, **kw)
    try:
        trainer.train(setup(), sft_config(out), progress=False)
    finally:
        trainer.loop.train = original


def run_ppo(out: Path, kill_at: int | None = None) -> None:
    import numpy as np
    from test_ppo import TITLES, one_line_per_token_world

    from reclm_jax import config
    from reclm_jax.eval.parse import Catalogue
    from reclm_jax.llm import model
    from reclm_jax.llm.chat import ChatPolicy
    from reclm_jax.llm.config import LlamaConfig
    from reclm_jax.rl import rollout
    from reclm_jax.rl.config import PPOConfig
    from reclm_jax.rl.trainer import PPOTrainer
    from reclm_jax.training import loop

    vocab, decode, teacher = one_line_per_token_world()
    cfg = config.load(PPOConfig, None, [f"out_dir={out}", "optim.lr=1e-2", "ppo.minibatches=2", "train.steps=6",
                                        "rollout.prompts_per_step=4", "rollout.max_new_tokens=3",
                                        "rollout.temperature=1.0", "checkpoint.every=1"])
    model_cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                            num_kv_heads=1, head_dim=16, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    scorer = rollout.Scorer(Catalogue(TITLES), teacher, np.ones((len(TITLES), 1), bool), decode)
    trainer = PPOTrainer(cfg, model.init_params(jax.random.key(0), model_cfg), model_cfg, scorer,
                         ChatPolicy(None, (2,), 0))
    prompts = [rollout.Prompt(tokens=(1,), history=(2, 3, 4), target=0, k=3),
               rollout.Prompt(tokens=(1,), history=(1,), target=3, k=2)]
    batches = iter(grain.MapDataset.range(10_000).map(lambda i: [prompts[i % 2]] * 4).to_iter_dataset())
    loop.train(RunDir(out, cfg), trainer.state, killing(trainer.step, kill_at), batches, total_steps=6,
               checkpoint=cfg.checkpoint, progress=False)


RUNS = {"teacher": (run_teacher, 2), "sft": (run_sft, 5), "ppo": (run_ppo, 3)}


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("stage", sorted(RUNS))
def test_kill_9_then_rerun_continues_with_identical_losses(stage, tmp_path):
    run, kill_at = RUNS[stage]
    script = f"import sys; sys.path.insert(0, 'tests'); import test_resume as t; t.RUNS[{stage!r}][0](t.Path(sys.argv[1]), {kill_at})"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "killed")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run(tmp_path / "killed")  # started again: resumes from the newest intact checkpoint
    run(tmp_path / "straight")
    killed, straight = losses(tmp_path / "killed"), losses(tmp_path / "straight")
    assert sorted(killed) == sorted(straight) and len(straight) > kill_at
    assert killed == pytest.approx(straight, rel=1e-6, abs=1e-7)


def test_a_damaged_latest_checkpoint_is_named_and_the_one_before_resumed(tmp_path, capsys):
    run_ppo(tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "damaged")
    last = tmp_path / "damaged" / "checkpoints" / "last"
    assert sorted(int(p.name) for p in last.iterdir() if p.name.isdigit()) == [5, 6]
    (last / "6" / "state" / "_METADATA").unlink()
    capsys.readouterr()
    run_ppo(tmp_path / "damaged")  # the run is complete at step 6, but step 6 cannot be restored: redo it
    out = capsys.readouterr().out
    assert "checkpoint step 6" in out and "cannot be restored" in out and "resuming from step 5 instead" in out
    assert losses(tmp_path / "damaged") == pytest.approx(losses(tmp_path / "straight"), rel=1e-6, abs=1e-7)


def test_a_changed_config_is_refused_before_anything_is_written(tmp_path):
    from reclm_jax.rl.config import PPOConfig

    out = tmp_path / "run"
    run_ppo(out)
    before = (out / "config.yaml").read_text()
    with pytest.raises(RunError, match=r"actor_lora.rank: 4 -> 8.*new out_dir.*--no-resume"):
        RunDir(out, replace(PPOConfig(out_dir=str(out)), actor_lora=replace(PPOConfig().actor_lora, rank=8)))
    assert (out / "config.yaml").read_text() == before
