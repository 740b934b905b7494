"""Two JAX processes on localhost (jax.distributed with CPU collectives over gloo), 2 CPU devices each, run SFT
steps and a PPO update on one 4-device mesh, each process feeding only its own rows, and get what one process
with 4 devices gets."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    jax.config.update("jax_num_cpu_devices", 4 // nproc)
    from reclm_jax.llm import sharding
    if nproc > 1:
        sharding.initialize_distributed(sharding.MeshConfig(multi_host=True, coordinator_address=f"localhost:{port}",
                                                            num_processes=nproc, process_id=pid))
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, "tests")
    import test_sft as t
    from test_ppo import MODEL, make_case
    from reclm_jax.rl import update
    from reclm_jax.rl.trainer import data_mesh
    from reclm_jax.sft import step as step_lib
    from reclm_jax.sft.config import OptimConfig
    from reclm_jax.sft.trainer import place
    assert jax.device_count() == 4 and jax.process_count() == nproc

    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=-1))
    params = jax.device_get(t.base_params())
    lora = jax.device_get(jax.tree.map(lambda x: x + 0.01, t.init_lora(jax.random.key(1), params, t.CFG, t.LORA)))
    tx = step_lib.optimizer(OptimConfig(lr=1e-2, warmup_ratio=0.0), t.TOTAL)
    placed = place(mesh, params, lora, tx)
    fn = step_lib.jit_train_step(t.CFG, t.LORA, tx, t.ACCUM, t.T, placed.shardings, mesh=mesh)
    state, losses = placed.state, []
    for _, batch in zip(range(2), t.batches()):
        rows = len(batch["tokens"]) // nproc  # this process's share of the global batch
        local = {k: v[pid * rows:(pid + 1) * rows] for k, v in batch.items()}
        state, metrics = fn(state, placed.params, placed.put_batch(local), jax.random.key(0))
        losses.append(float(metrics["loss"]))
    adapter = multihost_utils.process_allgather(state["lora"], tiled=True)

    cfg, base, ppo_state, rollout = make_case()
    mesh = data_mesh()
    rows = len(rollout["tokens"]) // nproc
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    local = {k: v[pid * rows:(pid + 1) * rows] for k, v in rollout.items()}
    batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), x), local)
    with jax.set_mesh(mesh):
        new, metrics = update.ppo_update(put(jax.device_get(base), P()), put(jax.device_get(ppo_state), P()), batch,
                                         jax.random.key(3), model_cfg=MODEL, actor_cfg=cfg.actor_lora,
                                         critic_cfg=cfg.critic_lora, hyper=cfg.ppo, shards=mesh.size)
    head = multihost_utils.process_allgather(new.params["critic"]["head"], tiled=True)
    if pid == 0:
        json.dump({"losses": losses, "adapter": [float(np.abs(x).sum()) for x in jax.tree.leaves(adapter)],
                   "ppo": {k: float(v) for k, v in jax.device_get(metrics).items()},
                   "head": [float(np.abs(x).sum()) for x in jax.tree.leaves(head)]}, open(out, "w"))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(nproc: int, out: Path) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(nproc), str(port), str(out)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(nproc)]
    for p in procs:
        _, err = p.communicate(timeout=1200)
        assert p.returncode == 0, err[-4000:]
    return json.loads(out.read_text())


def test_two_processes_equal_one_process(tmp_path):
    one = _run(1, tmp_path / "one.json")
    two = _run(2, tmp_path / "two.json")
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["adapter"] == pytest.approx(one["adapter"], rel=1e-4)
    for name, value in one["ppo"].items():
        assert two["ppo"][name] == pytest.approx(value, rel=1e-3, abs=1e-5), name
    assert two["head"] == pytest.approx(one["head"], rel=1e-4)
