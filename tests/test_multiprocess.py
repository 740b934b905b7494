"""Two processes on localhost as two hosts (`jax.distributed.initialize`, gloo CPU collectives, one CPU device
each), on a tiny model over real ML-100k, against one process driving two devices:
- `reclm-jax sft`, each process reading its own rows of every batch, gives the same losses; kill -9 of one
  process stops the other within the heartbeat timeout, and starting both again resumes from the newest
  checkpoint to the same losses;
- `reclm-jax ppo`, each process sampling its own rows of the rollout and updating on them, gives the same
  rewards, losses and KL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reclm_jax import assets

ROOT = Path(__file__).parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.network]
STEPS = 6
PPO_STEPS = 2
HEARTBEAT_S = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "reclm_jax.cli", *args]


def env(devices: int) -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    subprocess.run(cli("teacher", "train", "--dataset", "ml-100k", "--out", str(out), "--quiet", "model.max_len=10",
                       "model.width=16", "model.ffn_dim=16", "train.max_epochs=1", "train.batch_size=512"),
                   cwd=ROOT, env=env(1), check=True, capture_output=True, timeout=300)
    return out


def sft_args(out: Path, teacher: Path) -> list[str]:
    gguf = assets.fetch("tiny-llama-vocab") / "tiny.gguf"
    return ["sft", "--quiet", f"out_dir={out}", f"teacher={teacher}", "data.name=ml-100k", f"model.base={gguf}",
            f"model.tokenizer={gguf}", "tasks.task_set=v1", "tasks.sharegpt_ratio=0", "tasks.min_k=3",
            "tasks.max_k=3", "tasks.max_length=256", "tasks.max_response_tokens=96", "tasks.buckets=[128,192,256]",
            "train.global_batch=4", "train.micro_batch=2", f"train.steps={STEPS}", "valid.every=0",
            "checkpoint.every=1", "checkpoint.async_save=false", "optim.lr=1e-2"]


def ppo_args(out: Path, teacher: Path) -> list[str]:
    gguf = assets.fetch("tiny-llama-vocab") / "tiny.gguf"
    return ["ppo", "--quiet", f"out_dir={out}", f"teacher={teacher}", "data.name=ml-100k", f"model.base={gguf}",
            f"model.tokenizer={gguf}", f"train.steps={PPO_STEPS}", "rollout.prompts_per_step=4",
            "rollout.max_new_tokens=24", "rollout.max_prompt_tokens=192", "ppo.minibatches=2",
            "checkpoint.async_save=false", "optim.lr=1e-3"]


def start_pair(args: list[str], port: int) -> list[subprocess.Popen]:
    return [subprocess.Popen(cli(*args, "mesh.multi_host=true",
                                 f"mesh.coordinator_address=127.0.0.1:{port}", "mesh.num_processes=2",
                                 f"mesh.process_id={i}", f"mesh.heartbeat_timeout_s={HEARTBEAT_S}"),
                             cwd=ROOT, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


def run_alone(args: list[str]) -> None:
    """The reference: one process driving two devices."""
    proc = subprocess.run(cli(*args), cwd=ROOT, env=env(2), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def finish(pair: list[subprocess.Popen]) -> list[str]:
    """Both processes' output, once both have exited 0."""
    outs = [p.communicate(timeout=600)[0] for p in pair]
    assert [p.returncode for p in pair] == [0, 0], "\n".join(o[-3000:] for o in outs)
    return outs


def logged(out: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if key in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r[key] for r in records if key in r}


def checkpoints(out: Path) -> list[int]:
    last = out / "checkpoints" / "last"
    return sorted(int(p.name) for p in last.iterdir() if p.name.isdigit()) if last.is_dir() else []


def test_two_processes_train_like_one_and_resume_after_kill_9(teacher, tmp_path):
    single = tmp_path / "single"
    run_alone(sft_args(single, teacher))

    pair_dir = tmp_path / "pair"
    pair = start_pair(sft_args(pair_dir, teacher), free_port())
    deadline = time.monotonic() + 600
    while not checkpoints(pair_dir) or checkpoints(pair_dir)[-1] < 2:  # two steps on disk, then kill one host
        assert time.monotonic() < deadline and all(p.poll() is None for p in pair), \
            "\n".join(p.communicate()[0][-2000:] for p in pair)
        time.sleep(0.2)
    pair[1].send_signal(signal.SIGKILL)
    survivor_out, _ = pair[0].communicate(timeout=HEARTBEAT_S * 6)  # the peer's heartbeat stops: it must not hang
    assert pair[0].returncode != 0, survivor_out[-2000:]
    pair[1].wait()
    assert checkpoints(pair_dir)[-1] < STEPS

    outs = finish(start_pair(sft_args(pair_dir, teacher), free_port()))  # both started again: resume
    assert "resumed from step" in outs[0]
    assert sorted(logged(pair_dir, "loss")) == list(range(1, STEPS + 1))
    assert logged(pair_dir, "loss") == pytest.approx(logged(single, "loss"), rel=5e-4)
    assert (pair_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_two_processes_run_ppo_like_one(teacher, tmp_path):
    single = tmp_path / "single"
    run_alone(ppo_args(single, teacher))
    pair_dir = tmp_path / "pair"
    finish(start_pair(ppo_args(pair_dir, teacher), free_port()))
    for key in ("reward", "r_list", "format/NonExist@K", "loss", "pg_loss", "vf_loss", "kl", "entropy", "grad_norm"):
        assert sorted(logged(pair_dir, key)) == list(range(1, PPO_STEPS + 1)), key
        assert logged(pair_dir, key) == pytest.approx(logged(single, key), rel=1e-4, abs=1e-6), key
    assert (pair_dir / "actor" / "adapter_model.safetensors").is_file()
