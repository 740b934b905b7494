"""Checkpointer: state + data iterator + extra round trip, keep-last-N, best-by-metric, and kill -9 safety."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from reclm_jax import config
from reclm_jax.core.errors import RunError
from reclm_jax.teacher.config import TeacherConfig
from reclm_jax.training.checkpoints import Checkpointer, abstract
from reclm_jax.training.loop import CONFIG, CheckpointConfig, RunDir, train
from reclm_jax.training.run_log import RunLog


def batches():
    return grain.MapDataset.range(100).batch(4).to_iter_dataset()


def state(step):
    return {"step": jnp.int32(step), "lora": {"a": jnp.full((3, 2), float(step))}, "opt": (jnp.ones(2) * step,)}


def saved_steps(directory):
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_round_trip_with_data_position_and_keep_last(tmp_path):
    it = iter(batches())
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        for step in (1, 2, 3):
            next(it)
            ckpt.save(step, state(step), data=it, extra={"step": step, "note": "x"})
        expected_next = next(it)
        ckpt.wait()
        assert saved_steps(tmp_path / "last") == [2, 3]
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        assert ckpt.latest_step() == 3
        fresh = iter(batches())
        restored, extra = ckpt.restore(abstract(state(0)), data=fresh)
    assert extra == {"step": 3, "note": "x"}
    np.testing.assert_array_equal(restored["lora"]["a"], np.full((3, 2), 3.0))
    assert int(restored["step"]) == 3 and isinstance(restored["opt"], tuple)
    np.testing.assert_array_equal(next(fresh), expected_next)  # the stream continues where it was saved


def test_best_is_kept_by_metric_across_restarts(tmp_path):
    with Checkpointer(tmp_path, best_metric="ndcg", best_mode="max") as ckpt:
        assert ckpt.save_best(10, {"a": jnp.ones(2)}, {"ndcg": 0.2, "hr": 0.5})
        assert not ckpt.save_best(20, {"a": jnp.zeros(2)}, {"ndcg": 0.1})
        assert not ckpt.save_best(25, {"a": jnp.zeros(2)}, {"ndcg": float("nan")})
        with pytest.raises(KeyError, match="best_metric 'ndcg' is not among"):
            ckpt.save_best(26, {"a": jnp.zeros(2)}, {"hr": 1.0})
    with Checkpointer(tmp_path, best_metric="ndcg", best_mode="max") as ckpt:
        assert ckpt.best_value == pytest.approx(0.2)
        assert ckpt.save_best(30, {"a": jnp.full(2, 3.0)}, {"ndcg": 0.3})
        ckpt.wait()
        params, info = ckpt.restore_best(abstract({"a": jnp.ones(2)}))
    np.testing.assert_array_equal(params["a"], [3.0, 3.0])
    assert info["step"] == 30 and info["metric"] == "ndcg" and info["value"] == pytest.approx(0.3)
    assert saved_steps(tmp_path / "best") == [30]


def test_restore_without_checkpoint_names_the_directory(tmp_path):
    with Checkpointer(tmp_path) as ckpt, pytest.raises(FileNotFoundError, match=str(tmp_path / "last")):
        ckpt.restore(abstract(state(0)))


SAVE_FOREVER = textwrap.dedent("""
    import sys, jax.numpy as jnp
    from reclm_jax.training.checkpoints import Checkpointer
    ckpt = Checkpointer(sys.argv[1], keep_last=2)
    big = jnp.arange(4_000_000, dtype=jnp.float32)  # 16 MB, so that a save takes a while
    step = 0
    while True:
        step += 1
        ckpt.save(step, {"step": jnp.int32(step), "x": big + step})
        print(step, flush=True)
""")


@pytest.mark.slow
def test_kill_9_during_saves_leaves_a_restorable_latest_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        for line in proc.stdout:  # wait until some saves have been started, then kill mid-write
            if int(line) >= 4:
                break
        time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        step = ckpt.latest_step()
        assert step is not None and step >= 2
        restored, _ = ckpt.restore(abstract({"step": jnp.int32(0), "x": jnp.zeros(4_000_000, jnp.float32)}))
    assert int(restored["step"]) == step
    np.testing.assert_array_equal(restored["x"][:3], np.arange(3) + step)


@pytest.mark.parametrize("damage", ["truncate the largest data file", "delete _METADATA"])
def test_a_damaged_latest_checkpoint_is_named_and_the_one_before_restored(tmp_path, damage):
    with Checkpointer(tmp_path, keep_last=2, async_save=False) as ckpt:
        ckpt.save(1, state(1))
        ckpt.save(2, state(2))
    step_dir = tmp_path / "last" / "2" / "state"
    if damage.startswith("truncate"):
        big = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    else:
        (step_dir / "_METADATA").unlink()
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        restored, _, step, warnings = ckpt.restore_newest(abstract(state(0)))
        assert ckpt.latest_step() == 1  # the damaged step is gone, so the run can save step 2 again
        ckpt.save(2, state(2))
    assert step == 1 and int(restored["step"]) == 1
    assert "checkpoint step 2" in warnings[0]
    assert warnings[-1] == "resuming from step 1 instead (removed the damaged step 2)"


def test_a_key_added_since_a_run_was_recorded_resumes_while_it_keeps_its_default(tmp_path):
    # a run recorded before `optim.eps` and `eval.batch_size` existed, and with an `old_key` that no longer does
    recorded = config.to_dict(TeacherConfig())
    del recorded["optim"]["eps"], recorded["eval"]["batch_size"]
    recorded["train"]["old_key"] = 1
    (tmp_path / "checkpoints" / "last" / "3").mkdir(parents=True)
    (tmp_path / CONFIG).write_text(yaml.safe_dump(recorded))
    with pytest.raises(RunError, match=r"\(train.old_key: 1 -> \(no longer a key\)\)"):
        RunDir(tmp_path, TeacherConfig())
    del recorded["train"]["old_key"]
    (tmp_path / CONFIG).write_text(yaml.safe_dump(recorded))
    RunDir(tmp_path, TeacherConfig())  # the new keys hold their defaults: the same run
    changed = config.load(TeacherConfig, None, ["optim.eps=1e-6"])
    with pytest.raises(RunError, match=r"optim.eps: not recorded \(a key added since, default 1e-08\) -> 1e-06\)"):
        RunDir(tmp_path, changed)


def test_run_log_reports_throughput_only_for_steps_that_count_tokens(tmp_path):
    log = RunLog(tmp_path, total_steps=3, progress=False)
    for step, tokens in [(1, 0), (2, 0), (3, 64)]:
        log.step(step, {"loss": 1.0}, tokens=tokens)
    log.close()
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())}
    assert "step_time_s" not in records[1]  # no previous step to time against
    assert records[2]["step_time_s"] > 0 and "tokens_per_s" not in records[2]  # the teacher: no "0 tok/s"
    assert records[3]["tokens_per_s"] == pytest.approx(64 / records[3]["step_time_s"])


def test_a_step_that_runs_out_of_memory_names_the_last_checkpoint_and_the_plan_command(tmp_path):
    """XLA's RESOURCE_EXHAUSTED in a step becomes a RunError saying what was kept and where to look."""
    def step(s, batch):
        if int(s["step"]) == 2:  # a program whose output (1 PiB) no allocator grants
            jax.jit(lambda: jnp.ones((1 << 50,), jnp.uint8))().block_until_ready()
        return {**s, "step": s["step"] + 1}, {"loss": 0.0}

    with pytest.raises(RunError, match=r"step 3 ran out of memory \(RESOURCE_EXHAUSTED: .*\); the last checkpoint is "
                                       r"step 2 in .*reclm-jax plan --config .*config\.yaml"):
        train(RunDir(tmp_path, TeacherConfig()), state(0), step, iter(batches()), total_steps=5,
              checkpoint=CheckpointConfig(every=2), progress=False)
    assert saved_steps(tmp_path / "checkpoints" / "last") == [2]
